"""Continual cross-modal generalization: the DCID baseline: the same stages as comet_vt_at_it with every COMET part off.

    python -m unialign_jax.train --config=configs/dcid_vt_at_it.py --workdir=workdirs/dcid_vt_at_it
    python -m unialign_jax.train --config=configs/dcid_vt_at_it.py:size=reference --workdir=workdirs/dcid_vt_at_it_ref
    python -m unialign_jax.train --config=configs/dcid_vt_at_it.py:pm=false,ewc=false --workdir=workdirs/dcid_vt_at_it_ablation

Text is the mediator linking the stages. Arg string (see `configlib.continual_config`):
`data=synthetic`, `size=small|reference`, `seed=N`, `steps=N` per stage, and the ablation
switches `pm`, `moe`, `gate`, `ewc`, `sl` (true|false).
"""

from unialign_jax import configlib


def get_config(arg=None):
    return configlib.continual_config(arg, [("video", "text"), ("audio", "text"), ("image", "text")], comet=False)
