"""Pure loss functions over arrays, each returning (loss, metrics)."""
