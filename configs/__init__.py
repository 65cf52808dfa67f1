"""Experiment configs, one `get_config(arg=None)` per file; shared parts are imported, never loaded by path."""
