"""Knob values: the weight formats ``bits`` names, value tests, and the helpers the knob table
(:mod:`autocompress.compress._knobs`) builds its entries from (mildest values, summary tokens,
report cells).

Torch-free, like the table.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from autocompress.compress.formats._names import GROUP_SIZES, float_format_names

__all__ = ["BLOCK", "CALIBRATED", "DECOMPOSITIONS", "FLOAT_FORMATS", "GROUP_SIZES", "HEAT_BITS", "PRUNERS",
           "QUANTIZERS", "STRUCTURES", "STRUCTURE_TOKENS", "POW2_BITS", "POW2_INT8_BITS", "Knob", "act_token",
           "bits_cell", "first_of", "integer_bits", "is_number", "mildest_bits", "mildest_rank",
           "mildest_sparsity", "same"]

# The weight formats ``bits`` names by a string (compress/formats/: fp16, bf16, fp8), mildest
# first: every built-in format whose plan value is a name.
FLOAT_FORMATS = float_format_names()
POW2_BITS = range(3, 7)  # ``scheme: pow2`` bit-widths: 2 bits is ternary either way; 7+ would
# reach exponents (2**-62 ...) that no weight needs
#: ``structure`` values: how a ``sparsity`` is spent (``2:4``: two of every four consecutive
#: input weights, the N:M pattern of sparse tensor cores), and their summary tokens.
STRUCTURES = ("unstructured", "channel", "2:4")
STRUCTURE_TOKENS = {"unstructured": "", "channel": "ch", "2:4": "nm"}
#: ``decomposition`` values (``whitened``: SVD of the weight times the Cholesky factor of its
#: calibration inputs' Gram matrix, SVD-LLM; ``lowrank.py``).
DECOMPOSITIONS = ("svd", "tucker", "cp", "whitened")
PRUNERS = ("magnitude", "wanda", "sparsegpt")  # ``pruner`` values (how a sparsity is chosen)
QUANTIZERS = ("rtn", "gptq", "awq")  # ``quantizer`` values (how integer weights are rounded)
# ``group_size`` values (input columns sharing a scale): GROUP_SIZES, from the formats' names.
#: The knob values that need calibration data (``compress/_calibration.py``).
CALIBRATED = {"pruner": ("wanda", "sparsegpt"), "quantizer": ("gptq", "awq"),
              "decomposition": ("whitened",)}
#: The kind of a block (``compress/_blocks.py``): the only layers that take ``drop``.
BLOCK = "Block"
POW2_INT8_BITS = 4  # pow2 integers (up to 2**(2**(b-1) - 2)) fit int8 up to 4 bits (64)


class Knob(Protocol):
    """What the table reads of a search space's domain (:class:`autocompress.config.Knob`)."""

    @property
    def kind(self) -> str: ...  # "range", "choice" or "fixed"

    @property
    def choices(self) -> tuple[Any, ...]: ...

    @property
    def value(self) -> Any: ...

    def bounds(self) -> tuple[float, float]: ...

    def snap(self, value: Any) -> Any: ...

    def contains(self, value: Any) -> bool: ...


def integer_bits(bits: Any) -> bool:
    """Whether a ``bits`` plan value is an integer bit-width (not a float format, not None)."""
    return type(bits) is int


def is_number(value: Any) -> bool:
    """An int or float, not a bool, not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same kind (0.0 is not False, 8 is not 8.0 for an integer knob)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _numbers(knob: Knob) -> list[Any]:
    return [c for c in knob.choices if is_number(c)]


def first_of(knob: Knob, preferred: list[Any]) -> Any:
    """The first of ``preferred`` among ``knob``'s choices, else its first choice."""
    return next((p for p in preferred if any(same(p, c) for c in knob.choices)), knob.choices[0])


def mildest_sparsity(knob: Knob) -> Any:
    """The lowest sparsity."""
    return knob.snap(knob.bounds()[0]) if knob.kind == "range" else first_of(knob, sorted(_numbers(knob)))


def mildest_bits(knob: Knob) -> Any:
    """8 bits (the warm start stores int8), then fewer bits, then the 16-bit floats, then fp8,
    then fp32."""
    if knob.kind == "range":
        low, high = knob.bounds()
        return int(high) if high < 8 else 8 if knob.contains(8) else int(low)
    return first_of(knob, [8, *sorted(_numbers(knob), reverse=True), *FLOAT_FORMATS, None])


def mildest_rank(knob: Knob) -> Any:
    """No factorization, else the highest rank."""
    if knob.kind == "range":
        return knob.snap(knob.bounds()[1])
    return first_of(knob, [None, *sorted(_numbers(knob), reverse=True)])


def act_token(act_bits: Any) -> str:
    """``a8`` (observed range) or ``adyn`` (ONNX Runtime's dynamic quantization)."""
    return "adyn" if act_bits == "dynamic" else f"a{act_bits}"


# Where the non-integer formats sit on the report's bit-width colour scale (fp8 between 8 and
# the 16-bit floats).
HEAT_BITS: dict[Any, float] = {"fp8": 8.5, "fp16": 9, "bf16": 10, None: 11}


def bits_cell(knobs: dict[str, Any]) -> tuple[float, str]:
    """The bit-width heat map's cell: position on the scale, and e.g. ``4 pow2 a8``."""
    bits: Any = knobs.get("bits")
    text = "fp32" if bits is None else str(bits)
    if knobs.get("scheme", "uniform") != "uniform" and integer_bits(bits):
        text += f" {knobs['scheme']}"
    if knobs.get("act_bits"):
        text += f" {act_token(knobs['act_bits'])}"
    position: float = HEAT_BITS[bits] if bits in HEAT_BITS else bits
    return position, text
