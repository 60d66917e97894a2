"""Training stage: `trainer` (Ray Train: one run, resumable, logged to MLflow), `loop` (what each worker
runs), `tune` (Ray Tune search with ASHA) and `init_from` (start from another model's matching tensors)."""
