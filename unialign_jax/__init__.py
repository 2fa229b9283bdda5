"""unialign_jax: unified multimodal representation learning in JAX/Flax (COMET, CMG/DCID, UniAlign)."""

__version__ = "0.1.0"
