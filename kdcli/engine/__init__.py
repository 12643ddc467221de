"""The training loop, evaluation and metrics, checkpoints and the report."""
