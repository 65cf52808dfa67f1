"""The generic training loop: optimizer, jitted step, checkpoints, metrics."""
