"""CMG, DCID and COMET: `config.py` (schema, continual configs, validation), `model.py` (the stage's
modules and fresh state), `step.py` (the jitted train step), `continual.py` (what passes between
stages), `evaluate.py` (cross-modal protocol) and `method.py` (the `Method` the registry serves)."""
