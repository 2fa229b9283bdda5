"""COMET in Table 1's alternative order: audio-text, then video-text, then image-text.

    python -m unialign_jax.train --config=configs/comet_at_vt_it.py --workdir=workdirs/comet_at_vt_it

Text mediates between the stages. The arg string (`:size=reference,seed=1,pm=false,...`) is
documented at `unialign_jax.methods.cmg.config.continual_config`.
"""

from unialign_jax.methods.cmg import config as cmg_config


def get_config(arg=None):
    return cmg_config.continual_config(arg, [("audio", "text"), ("video", "text"), ("image", "text")], comet=True)
