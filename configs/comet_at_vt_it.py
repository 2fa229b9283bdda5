"""Continual cross-modal generalization: audio-text, then video-text, then image-text (paper Table 1, dagger rows).

    python -m unialign_jax.train --config=configs/comet_at_vt_it.py --workdir=workdirs/comet_at_vt_it
    python -m unialign_jax.train --config=configs/comet_at_vt_it.py:size=reference --workdir=workdirs/comet_at_vt_it_ref
    python -m unialign_jax.train --config=configs/comet_at_vt_it.py:pm=false,ewc=false --workdir=workdirs/comet_at_vt_it_ablation

Text is the mediator linking the stages. Arg string (see `configlib.continual_config`):
`data=synthetic`, `size=small|reference`, `seed=N`, `steps=N` per stage, and the ablation
switches `pm`, `moe`, `gate`, `ewc`, `sl` (true|false).
"""

from unialign_jax import configlib


def get_config(arg=None):
    return configlib.continual_config(arg, [("audio", "text"), ("video", "text"), ("image", "text")], comet=True)
