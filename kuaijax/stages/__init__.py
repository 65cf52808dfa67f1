"""The stage pipeline: one way to run every experiment (see `runner` for the config it reads).

Stage types register themselves where they are defined (`base.register_stage_type`); the built-in
ones live in this package's modules and are found by name on first use.
"""

from kuaijax.stages.base import Stage, register_stage_type
from kuaijax.stages.runner import run_pipeline

__all__ = ['Stage', 'register_stage_type', 'run_pipeline']
