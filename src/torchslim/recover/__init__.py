"""Accuracy recovery: the trainer, losses and the fine-tune / distillation step."""
