"""The joint bound of comet_vt_at_it: ONE stage training video-text, audio-text and image-text together.

    python -m unialign_jax.train --config=configs/joint_vt_at_it.py --workdir=workdirs/joint_vt_at_it

Mixed batches: every step holds one batch of each pair, each pair from its own shuffle of its stage's
classes, so video and audio are never paired. The arg string (`:seed=1,moe=false,...`) is documented
at `unialign_jax.methods.cmg.config.joint_config`.
"""

from unialign_jax.methods.cmg import config as cmg_config


def get_config(arg=None):
    return cmg_config.joint_config(arg, [("video", "text"), ("audio", "text"), ("image", "text")])
