"""UniAlign: `config.py` (schema, ablation switches, validation), `model.py` (modules, frozen
backbone, step-0 state), `step.py` (modality-aware gradient accumulation), `label_embeddings.py`
(text anchors), `teachers.py` (model-distillation teachers and their CLI), `evaluate.py` (zero-shot,
retrieval, routing) and `method.py` (the `Method` the registry serves)."""
