"""Megatron-style training engine for continual pretraining and EfficientScale."""
