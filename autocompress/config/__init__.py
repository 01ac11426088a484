"""Configuration: experiment and search space files as validated dataclasses.

Bad input raises :class:`ConfigError` naming the file, the dotted key and what is allowed.
"""

from autocompress._lazy import lazy_exports

_WHERE = {
    "ConfigError": "autocompress.config._errors",
    "did_you_mean": "autocompress.config._errors",
    "read_yaml": "autocompress.config._errors",
    "Experiment": "autocompress.config._experiment",
    "Objective": "autocompress.config._experiment",
    "SearchSettings": "autocompress.config._experiment",
    "Constraints": "autocompress.config._experiment",
    "load_experiment": "autocompress.config._experiment",
    "SearchSpace": "autocompress.config._space",
    "Rule": "autocompress.config._space",
    "load_search_space": "autocompress.config._space",
    "LAYER_TYPES": "autocompress.config._space",
    "Knob": "autocompress.config._domain",
    "ResolvedSpace": "autocompress.config._resolve",
    "LayerSpace": "autocompress.config._resolve",
    "Slot": "autocompress.config._resolve",
    "KNOBS": "autocompress.config._knobs",
    "KNOB_TABLE": "autocompress.config._knobs",
    "KnobSpec": "autocompress.config._knobs",
    "EXPERIMENT_VERSION": "autocompress.config._experiment",
    "SAMPLERS": "autocompress.config._experiment",
    "METRICS": "autocompress.config._experiment",
    "MAX_OBJECTIVES": "autocompress.config._experiment",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
