"""Training: distributed setup, schedules, batches, the loop, evaluation, metrics and FLOPs."""
