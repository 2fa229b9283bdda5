"""Continual cross-modal generalization: video-text, then speech-text, then audio-text (the paper's Ref-YouTube-VOS order).

    python -m unialign_jax.train --config=configs/comet_vt_st_at.py --workdir=workdirs/comet_vt_st_at
    python -m unialign_jax.train --config=configs/comet_vt_st_at.py:size=reference --workdir=workdirs/comet_vt_st_at_ref
    python -m unialign_jax.train --config=configs/comet_vt_st_at.py:pm=false,ewc=false --workdir=workdirs/comet_vt_st_at_ablation

Text is the mediator linking the stages. Arg string (see `configlib.continual_config`):
`data=synthetic`, `size=small|reference`, `seed=N`, `steps=N` per stage, and the ablation
switches `pm`, `moe`, `gate`, `ewc`, `sl` (true|false).
"""

from unialign_jax import configlib


def get_config(arg=None):
    return configlib.continual_config(arg, [("video", "text"), ("speech", "text"), ("audio", "text")], comet=True)
