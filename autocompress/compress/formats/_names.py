"""The names of the weight formats, the registry that holds them and the mapping between a name
and the plan's ``bits``/``scheme`` values.

Torch-free: the knob table (``compress/_knobs.py``) reads the formats' names from here, so a
search space's ``bits: fp8`` is validated without importing a format's code, and a new built-in
format is offered by the ``bits`` knob with no edit there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autocompress._registry import Registry

if TYPE_CHECKING:
    from autocompress.compress.formats._base import WeightFormat

__all__ = ["BUILTIN_FORMATS", "FORMATS", "GROUP_SIZES", "float_format_names", "format_name",
           "plan_values"]

#: ``group_size`` plan values: input columns sharing one scale (grouped uniform formats,
#: ``int4-g128``); None is one scale per output channel.
GROUP_SIZES = (32, 64, 128)

_UNIFORM = "autocompress.compress.formats._uniform"
_GROUPED = "autocompress.compress.formats._grouped"
_POW2 = "autocompress.compress.formats._pow2"
_FLOAT16 = "autocompress.compress.formats._float16"

#: ``{name: module that registers it}``: names are known without importing torch-heavy code.
BUILTIN_FORMATS: dict[str, str] = {
    "fp32": "autocompress.compress.formats._fp32",
    **{f"int{b}": _UNIFORM for b in range(2, 9)},
    **{f"pow2-{b}": _POW2 for b in range(3, 7)},
    "fp16": _FLOAT16,
    "bf16": _FLOAT16,
    "fp8": "autocompress.compress.formats._fp8",
    **{f"int{b}-g{g}": _GROUPED for b in range(2, 9) for g in GROUP_SIZES},
}

FORMATS: Registry[WeightFormat] = Registry("weight format", BUILTIN_FORMATS)


def format_name(bits: int | str | None, scheme: str = "uniform",
                group_size: int | None = None) -> str:
    """The format name of plan values ``bits``/``scheme``/``group_size``: ``None`` is
    ``"fp32"``, a string names itself (``"fp16"``), an integer is ``"int<bits>"``
    (``scheme: uniform``) or ``"<scheme>-<bits>"`` (``"pow2-4"``), with ``"-g<group_size>"``
    when a group size is given (``"int4-g128"``; only integer ``bits`` have groups)."""
    if bits is None:
        return "fp32"
    if isinstance(bits, str):
        return bits
    name = f"int{bits}" if scheme == "uniform" else f"{scheme}-{bits}"
    return f"{name}-g{group_size}" if group_size else name


def plan_values(name: str) -> tuple[int | str | None, str, int | None]:
    """The plan's ``(bits, scheme, group_size)`` of format ``name``: the inverse of
    :func:`format_name`."""
    base, _, group = name.rpartition("-g")
    if base and group.isdigit():
        bits, scheme, _ = plan_values(base)
        return bits, scheme, int(group)
    if name == "fp32":
        return None, "uniform", None
    scheme, _, bits = name.rpartition("-")
    if scheme:
        return int(bits), scheme, None
    if name.startswith("int") and name[3:].isdigit():
        return int(name[3:]), "uniform", None
    return name, "uniform", None


def float_format_names() -> tuple[str, ...]:
    """The formats the ``bits`` knob names by a string (``fp16``, ``bf16``, ``fp8``), in
    registration order (mildest first)."""
    return tuple(n for n in FORMATS.names() if isinstance(plan_values(n)[0], str))
