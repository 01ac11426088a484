"""The rules across knobs: knob values that are each valid but not together, one
:class:`KnobRule` each (:data:`KNOB_RULES`), read by :meth:`LayerPlan.check_combination`
(refuse) and :func:`~autocompress.compress._knobs.reconcile` (repair).

Torch-free, like the knob table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from autocompress.compress._knob_values import POW2_BITS, POW2_INT8_BITS, integer_bits

__all__ = ["KNOB_RULES", "KnobRule"]


@dataclass(frozen=True)
class KnobRule:
    """Knob values that are each valid but not together: the one place a rule is written.

    :meth:`LayerPlan.check_combination` refuses a plan entry that breaks a rule, with the
    rule's message; :func:`reconcile` (a sampled entry) repairs it by setting the rule's knob
    back to its default. Rules are checked and repaired in order, each on the values the
    earlier ones repaired.

    Attributes:
        knob: The knob whose value the rule is about; ``applies`` holds only while it is off
            its default, and repairing sets it back to its default.
        applies: ``applies(values) -> bool`` (every knob's value, defaults filled in).
        needs: ``needs(values) -> bool``: whether the other knobs allow that value.
        message: ``message(values) -> str``: why not, in words, for the error.
        example: A plan entry (the knobs that differ from the defaults) that breaks the rule
            and no earlier one (the tests check it).
    """

    knob: str
    applies: Callable[[Mapping[str, Any]], bool]
    needs: Callable[[Mapping[str, Any]], bool]
    message: Callable[[Mapping[str, Any]], str]
    example: Mapping[str, Any]

    def broken(self, values: Mapping[str, Any]) -> bool:
        """Whether ``values`` (every knob's value) break the rule."""
        return self.applies(values) and not self.needs(values)


_POW2_RANGE = f"{POW2_BITS.start}..{POW2_BITS.stop - 1}"

KNOB_RULES: tuple[KnobRule, ...] = (
    KnobRule(
        "scheme", lambda v: v["scheme"] == "pow2",
        lambda v: integer_bits(v["bits"]) and v["bits"] in POW2_BITS,
        lambda v: f"scheme='pow2' needs integer bits in {_POW2_RANGE} (a sign and an exponent "
                  f"code per weight), got bits={v['bits']!r}",
        {"bits": 8, "scheme": "pow2"}),
    KnobRule(
        # ONNX Runtime's integer MatMul takes int8 weights (8-bit, one scale per channel).
        "act_bits", lambda v: v["act_bits"] == "dynamic",
        lambda v: v["bits"] == 8 and v["scheme"] == "uniform",
        lambda v: f"act_bits='dynamic' needs bits=8 (ONNX Runtime's integer MatMul takes int8 "
                  f"weights), got bits={v['bits']!r}",
        {"bits": 4, "act_bits": "dynamic"}),
    KnobRule(
        # QLinearConv/QLinearMatMul take integer weights (2-8 bits are stored as int8).
        "act_bits", lambda v: v["act_bits"] == 8, lambda v: integer_bits(v["bits"]),
        lambda v: f"act_bits=8 needs integer weights (bits 2..8): ONNX Runtime's QLinear "
                  f"kernels take int8 weights, got bits={v['bits']!r}",
        {"bits": "fp16", "act_bits": 8}),
    KnobRule(
        "act_bits",
        lambda v: v["act_bits"] == 8 and v["scheme"] == "pow2" and integer_bits(v["bits"]),
        lambda v: v["bits"] <= POW2_INT8_BITS,
        lambda v: f"act_bits=8 with scheme='pow2' needs bits <= {POW2_INT8_BITS}: ONNX Runtime's "
                  f"QLinear kernels take int8 weights, and pow2 levels fit int8 only up to "
                  f"{POW2_INT8_BITS} bits, got bits={v['bits']!r}",
        {"bits": 6, "scheme": "pow2", "act_bits": 8}),
    KnobRule(
        # 2:4 keeps 2 of every 4 consecutive input weights: half of them.
        "structure", lambda v: v["structure"] == "2:4", lambda v: v["sparsity"] == 0.5,
        lambda v: f"structure='2:4' keeps 2 of every 4 weights: it needs sparsity=0.5, "
                  f"got sparsity={v['sparsity']!r}",
        {"sparsity": 0.3, "structure": "2:4"}),
    KnobRule(
        "quantizer", lambda v: v["quantizer"] != "rtn",
        lambda v: integer_bits(v["bits"]) and v["scheme"] == "uniform",
        lambda v: f"quantizer={v['quantizer']!r} rounds to uniform integer levels: it needs "
                  f"integer bits (2..8) with scheme='uniform', got bits={v['bits']!r}, "
                  f"scheme={v['scheme']!r}",
        {"bits": "fp16", "quantizer": "gptq"}),
    KnobRule(
        "group_size", lambda v: v["group_size"] is not None,
        lambda v: integer_bits(v["bits"]) and v["scheme"] == "uniform" and v["act_bits"] is None,
        lambda v: f"group_size={v['group_size']!r} needs integer bits (2..8) with "
                  f"scheme='uniform' and no act_bits (ONNX Runtime's integer kernels take one "
                  f"scale per output channel), got bits={v['bits']!r}, scheme={v['scheme']!r}, "
                  f"act_bits={v['act_bits']!r}",
        {"bits": 8, "act_bits": "dynamic", "group_size": 64}),
)
