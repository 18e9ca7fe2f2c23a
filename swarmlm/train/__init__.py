"""Training: data, DiLoCo, aggregation, privacy, checkpoints, evaluation."""
