"""UniAlign on the digits (CPU scale): frozen all-MiniLM-L6-v2 as the ONE backbone for image, video and
audio, text as the anchor modality.

    export UNIALIGN_FSDD_DIR=$PWD/../shared/data/fsdd/recordings   # real spoken digits (else espeak-ng)
    python -m unialign_jax.methods.unialign.teachers --config=configs/unialign_digits.py --workdir=workdirs/unialign_digits
    python -m unialign_jax.train --config=configs/unialign_digits.py --workdir=workdirs/unialign_digits
    python -m unialign_jax.evaluate --workdir=workdirs/unialign_digits
    python configs/unialign_digits.py          # trainable / frozen parameter counts by module group

The teachers' command is optional here (`teachers.auto_train`: a run without cached teacher features
trains them first, in seconds). Ablations in the arg string (`unialign_config.parse_ablation_arg`):
Table 8 `routing=grouped|global`, `experts=N`, `top_k=K`; Table 10 `soft_bind=false`,
`anchor_distil=false`, `model_distil=false`; plus `data=digits|synthetic`, `steps=N`, `seed=N`, e.g.

    python -m unialign_jax.train --config=configs/unialign_digits.py:soft_bind=false,anchor_distil=false,model_distil=false \
        --workdir=workdirs/unialign_digits_nce_only

Model: the MiniLM encoder (6 post-LN layers, width 384), a paper argument in miniature: a transformer
pretrained on one modality (here text) encodes others through trained tokenizers and modality-aware
MoE-LoRA experts (2 per modality, top-2, r=4, alpha=32), everything pretrained frozen. Each modality's
per-step features [T, D] enter through a linear `FeatureTokenizer`; the embedding space is MiniLM's own
(384), where the text anchors live: captions (MiniLM word-piece states, pooled) and class prompts.
Each modality reads its own shuffle of the digits (never paired with another modality), with its own
class-prompt template, so soft binding (Eq. 11) bridges three differently named label sets.

`data=synthetic` trains on the procedural world instead (no MiniLM text: anchors are class centroids
of the world's text features; the backbone is still MiniLM).
"""

import ml_collections

from unialign_jax import configlib
from unialign_jax.methods.unialign import config as unialign_config

MODALITIES = ("image", "video", "audio", "text")
ENCODED = ("image", "video", "audio")
PROMPTS = {  # one class-name template per dataset: three label sets for soft modality binding
    "image": "a handwritten digit {name}",
    "video": "a video of a handwritten {name}",
    "audio": "someone saying {name}",
}
MINILM = dict(width=384, depth=6, num_heads=12, mlp_dim=1536, norm_position="post", activation="gelu",
              layer_norm_epsilon=1e-12)


def data_config(name: str) -> ml_collections.ConfigDict:
    if name == "digits":
        from unialign_jax.data import digits  # pylint: disable=import-outside-toplevel

        return digits.default_config()
    if name == "synthetic":
        return configlib.synthetic_data(MODALITIES, configlib.digits_shapes(), num_train=2000, num_test=500)
    raise ValueError(f"data={name!r}: this config supports data=digits or data=synthetic.")


def get_config(arg=None):
    arg = unialign_config.parse_ablation_arg(arg, data="digits")
    config = unialign_config.base_config(arg)
    config.model.modalities = MODALITIES
    config.model.input_shapes = dict(configlib.digits_shapes())
    config.model.backbone = "bert"
    config.model.backbone_weights = "minilm"
    config.model.transformer = dict(MINILM)
    config.model.tokenizers = {m: dict(kind="features") for m in ENCODED}
    config.model.embed_dim = 384
    config.accumulation = dict(steps=1, micro_batch_sizes={m: 32 for m in ENCODED})
    config.batch_size = 96
    config.optim.learning_rate = 1e-3  # the paper's 2e-4 is for 100 epochs at batch 2048
    config.optim.warmup_steps = 30
    config.log_every = 25
    config.checkpoint.every = 200
    config.anchors.templates = dict(PROMPTS)
    if arg.data == "synthetic":
        config.anchors.source = "text_centroids"
    config.teachers.modalities = ENCODED
    config.teachers.dims = {m: 384 for m in ENCODED}
    config.teachers.auto_train = True
    data = data_config(arg.data)
    datasets = {m: data for m in ENCODED}
    config.stages = [unialign_config.unialign_stage("unialign", MODALITIES, datasets, steps=arg.steps or 200)]
    config.eval.data = dict(datasets)
    config.eval.batch_size = 128
    return config


if __name__ == "__main__":
    from unialign_jax.methods.unialign import model  # pylint: disable=import-outside-toplevel

    print(model.parameter_table(get_config()))
