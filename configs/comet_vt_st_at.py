"""COMET in the Ref-YouTube-VOS order: video-text, then speech-text, then audio-text.

    python -m unialign_jax.train --config=configs/comet_vt_st_at.py --workdir=workdirs/comet_vt_st_at

Text mediates between the stages. The arg string (`:size=reference,seed=1,pm=false,...`) is
documented at `unialign_jax.methods.cmg.config.continual_config`.
"""

from unialign_jax.methods.cmg import config as cmg_config


def get_config(arg=None):
    return cmg_config.continual_config(arg, [("video", "text"), ("speech", "text"), ("audio", "text")], comet=True)
