"""Flax NNX model components."""
