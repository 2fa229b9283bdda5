"""CMG/DCID pre-training (trimodal video-audio-text by default), the baseline COMET extends.

    python -m unialign_jax.train --config=configs/cmg_avt.py --workdir=workdirs/cmg_avt
    python -m unialign_jax.train --config=configs/cmg_avt.py:modalities=audio+text --workdir=workdirs/cmg_at
    python -m unialign_jax.train --config=configs/cmg_avt.py:size=reference --workdir=workdirs/cmg_ref

Arg string: `data=digits` (default: real handwriting, speech and MiniLM captions) or
`data=synthetic` (the procedural world), or `data=features,dataset=NAME` (your pre-extracted
features at the reference dimensions, converted by `python -m unialign_jax.data.convert`), `size=small|reference` (reference = the CMG
code's dimensions: video 10x7x7x512, audio 10x128, text 10x768, codebook 400x256, batch 80,
Adam 4e-4), `modalities=video+audio+text` (any '+'-joined set of two or more), `steps=N`.
"""

from unialign_jax import configlib
from unialign_jax.methods.cmg import config as cmg_config


def get_config(arg=None):
    arg = configlib.parse_arg(arg, data="digits", size="small", modalities="video+audio+text", steps=0, dataset="")
    modalities = configlib.split_modalities(arg.modalities)
    data_name = cmg_config.resolve_data(arg.data, modalities)
    config = cmg_config.cmg_config(size=arg.size, modalities=modalities, data=data_name)
    shapes = dict(config.model.input_shapes)
    if data_name == "features":
        if not arg.dataset:
            raise ValueError("data=features needs dataset=NAME (converted by python -m unialign_jax.data.convert).")
        data = configlib.features_data(arg.dataset)
    elif data_name == "digits":
        data = configlib.digits_data()
    else:
        data = configlib.synthetic_data(modalities, shapes)
    steps = arg.steps or (1000 if arg.size == "small" else 3000)
    config.stages = [
        configlib.stage(
            "pretrain", modalities, data, steps=steps, codebook_rows=config.quantizer.initial_active_codes
        )
    ]
    config.eval.data = data
    return config
