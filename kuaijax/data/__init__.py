"""Data: generated data sets (tfds builders), tokenizers, sources by name, grain LM pipelines.

Modules are imported directly (e.g. `from kuaijax.data import pipeline`); importing this package
loads nothing heavy.
"""
