"""Configuration: experiment and search space files as validated dataclasses.

Bad input raises :class:`ConfigError` naming the file, the dotted key and what is allowed.
"""

from autocompress._lazy import lazy_exports

_EXPORTS = {
    "autocompress._errors": ("ConfigError", "did_you_mean"),
    "_yaml": ("read_yaml",),
    "_experiment": (
        "Experiment", "Objective", "SearchSettings", "Constraints", "load_experiment", "parse_experiment",
        "EXPERIMENT_VERSION", "METRICS", "MAX_OBJECTIVES", "IN_MEMORY_PREFIX",
    ),
    "_samplers": ("SAMPLERS", "SamplerBuilder"),
    "_space": ("SearchSpace", "Rule", "load_search_space", "LAYER_TYPES"),
    "_domain": ("Knob",),
    "_resolve": ("ResolvedSpace", "LayerSpace", "Slot"),
    "autocompress.compress": ("KNOBS", "KNOB_TABLE", "KnobSpec"),  # what a space may search
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
