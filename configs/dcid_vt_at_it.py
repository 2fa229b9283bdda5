"""The DCID baseline: comet_vt_at_it's stages with every COMET part off.

    python -m unialign_jax.train --config=configs/dcid_vt_at_it.py --workdir=workdirs/dcid_vt_at_it

Text mediates between the stages. The arg string (`:size=reference,seed=1,pm=false,...`) is
documented at `unialign_jax.methods.cmg.config.continual_config`.
"""

from unialign_jax.methods.cmg import config as cmg_config


def get_config(arg=None):
    return cmg_config.continual_config(arg, [("video", "text"), ("audio", "text"), ("image", "text")], comet=False)
