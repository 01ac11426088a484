"""Search spaces: which compression knobs to search, over which values, for which layers.

A search space file is a list of rules under ``layers:``. Each rule selects layers and gives
each selected layer a domain per knob (a :class:`~autocompress.plan.LayerPlan` field)::

    version: 1                        # optional
    layers:
      - name: convs                   # optional; names the shared group, default "rule<i>"
        match: 're:features\\..*'     # exact module name or "re:" regex (fullmatch); or a list
        types: [Conv1d, Conv2d]       # optional: module type names
        exclude: ["features.0"]       # optional: names / "re:" patterns left out
        share: false                  # true: one sampled value for all layers of the rule
        knobs:
          sparsity: {low: 0.0, high: 0.9, step: 0.05}   # range: low, high, step?, log?
          structure: [unstructured, channel]           # choices
          bits: [2, 3, 4, 6, 8, fp16, null]            # choices; null = keep fp32
          scheme: [uniform, pow2]                      # integer bits: even or power-of-two levels
          rank: {low: 0.1, high: 1.0, step: 0.05}      # 1.0 (full rank) = no factorization
          act_bits: null                               # a fixed value

Rules apply in order; a later rule overrides an earlier one per layer and per knob. Knobs a
layer does not get stay at their ``LayerPlan`` defaults; layers that no rule selects are left
out of the plan.

The knob table (:mod:`autocompress.compress._knobs`) turns a sampled value into a plan value;
two of its rules matter when writing a space:

* ``rank`` 1.0 means full rank, i.e. no factorization, and becomes ``rank: null`` in the plan:
  a full-rank factorization stores more weights than the layer it replaces. So
  ``rank: {low: 0.1, high: 1.0, step: 0.05}`` searches "off, or a rank in [0.1, 0.95]". Without
  a ``step`` the value 1.0 is (almost) never drawn, so every selected layer is factorized.
* The output layer (``LayerInfo.is_output``) cannot lose output channels, since they are the
  classes. ``channel`` is dropped from its ``structure`` choices; if ``channel`` was its only
  choice it gets ``unstructured``. In a ``share: true`` rule the shared value may still be
  ``channel``; the output layer then uses ``unstructured``.

Optuna parameters are named ``"<layer>/<knob>"``, or ``"<group>/<knob>"`` for shared rules.

Example:
    >>> space = load_search_space({"layers": [{"types": ["Linear"], "knobs": {"bits": [4, 8]}}]})
    >>> [r.types for r in space.rules]
    [('Linear',)]
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autocompress._errors import ConfigError, did_you_mean
from autocompress.config._checks import check_keys, compile_pattern, matches, type_name
from autocompress.config._domain import Knob, parse_knobs
from autocompress.config._yaml import read_yaml

if TYPE_CHECKING:

    from autocompress.compress._layers import LayerInfo
    from autocompress.config._resolve import ResolvedSpace

__all__ = ["LAYER_TYPES", "Rule", "SearchSpace", "load_search_space"]

SPACE_VERSION = 1
# The layer kinds (autocompress.compress._layers.KINDS), repeated so that reading a config does
# not import torch (a test checks that the two agree).
LAYER_TYPES = ("Conv1d", "Conv2d", "Linear", "Embedding", "Conv1D", "Block")
_BLOCK = LAYER_TYPES[-1]  # blocks (compress/_blocks.py): only a rule naming the type selects them

_RULE_KEYS = ("name", "match", "types", "exclude", "share", "knobs")
_TOP_KEYS = ("version", "layers")
_NAME_RE = re.compile(r"[A-Za-z_][\w.-]*")
_RESERVED_NAME_RE = re.compile(r"rule\d+")


@dataclass(frozen=True)
class Rule:
    """One rule of a search space: which layers, and the knob domains they get.

    Attributes:
        knobs: Knob name to domain.
        match: Module names or ``re:`` patterns (``re.fullmatch``); empty selects every layer.
        types: Module type names; empty allows every type but ``Block`` (blocks, which
            only ``drop`` applies to, are selected by naming the type).
        exclude: Names or ``re:`` patterns of layers left out.
        share: One sampled value per knob for all layers of the rule.
        name: Optional name, used for the parameters of a shared rule.
    """

    knobs: dict[str, Knob]
    match: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    share: bool = False
    name: str | None = None

    def selects(self, layer: LayerInfo) -> bool:
        """True if the rule applies to ``layer``."""
        return ((not self.match or any(matches(p, layer.name) for p in self.match))
                and (layer.type in self.types if self.types else layer.type != _BLOCK)
                and not any(matches(p, layer.name) for p in self.exclude))

    def group(self, index: int) -> str:
        """Parameter prefix of a shared rule: its name, or ``rule<index>``."""
        return self.name or f"rule{index}"

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, leaving out keys at their defaults."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        for key in ("match", "types", "exclude"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.share:
            out["share"] = True
        out["knobs"] = {k: v.to_spec() for k, v in self.knobs.items()}
        return out

    def selector(self) -> str:
        """A short human description of what the rule selects."""
        parts = [f"{key} {list(getattr(self, key))}" for key in ("match", "types", "exclude")
                 if getattr(self, key)]
        text = ", ".join(parts) or "every layer"
        return f"rule {self.name!r} ({text})" if self.name else text


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: rules, applied in order.

    Attributes:
        rules: The rules.
        source: Where the rules came from (a file name), used in error messages.
        key_prefix: Key path of the rules inside ``source`` (``search_space`` when inline in an
            experiment file), used in error messages.
    """

    rules: tuple[Rule, ...]
    source: str | None = field(default=None, compare=False)
    key_prefix: str = field(default="", compare=False, repr=False)

    def resolve(self, layers: Sequence[LayerInfo]) -> ResolvedSpace:
        """Applies the rules to a model's layers.

        Values a layer cannot take (``KnobSpec.refuses``: e.g. ``channel`` on the output layer)
        are dropped from its domain; a domain left empty becomes the knob's default (in a
        ``share: true`` rule, a shared value the layer refuses becomes the default for it when
        the plan is built).

        Args:
            layers: The model's compressible layers (``find_layers``); only ``name``, ``type``
                and ``is_output`` are used.

        Returns:
            The per-layer domains, in the order of ``layers``.

        Raises:
            ConfigError: A ``match`` pattern or a whole rule selects no layer (the message
                lists the layers), or two parameters would share a name.
        """
        from autocompress.config._resolve import resolve

        try:
            return resolve(self.rules, layers)
        except ConfigError as e:
            raise e.located(self.source, self.key_prefix) from None

    def to_dict(self) -> dict[str, Any]:
        """The YAML form; ``load_search_space(space.to_dict()) == space``."""
        return {"version": SPACE_VERSION, "layers": [r.to_dict() for r in self.rules]}


def load_search_space(path_or_mapping: str | os.PathLike | Mapping[str, Any], *,
                      source: str | None = None, key_prefix: str = "") -> SearchSpace:
    """Reads and validates a search space.

    Args:
        path_or_mapping: A YAML file, or the already-parsed mapping (e.g. inline in an
            experiment file).
        source: Name used for the origin in error messages; default: the path.
        key_prefix: Key path of the mapping inside ``source``, e.g. ``search_space``.

    Returns:
        The validated search space (not yet applied to a model: see
        :meth:`SearchSpace.resolve`).

    Raises:
        ConfigError: The file is missing, empty or not valid YAML, or a rule has an unknown
            key or knob, a bad range, choice, type name or regex.
    """
    if isinstance(path_or_mapping, Mapping):
        data: Any = path_or_mapping
    else:
        source = source if source is not None else str(path_or_mapping)
        data = read_yaml(path_or_mapping)
    try:
        rules = _parse_space(data)
    except ConfigError as e:
        raise e.located(source, key_prefix) from None
    return SearchSpace(rules, source=source, key_prefix=key_prefix)


# --- parsing -------------------------------------------------------------------------------


def _parse_space(data: Any) -> tuple[Rule, ...]:
    if data is None:
        raise ConfigError("empty search space; expected a mapping with a 'layers' list of rules")
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping with a 'layers' list of rules, "
                          f"got {type_name(data)}")
    check_keys(data, _TOP_KEYS, "")
    version = data.get("version", SPACE_VERSION)
    if version != SPACE_VERSION or isinstance(version, bool):
        raise ConfigError(f"version {version!r} is not supported; allowed: {SPACE_VERSION}",
                          key="version")
    raw_rules = data.get("layers")
    if not isinstance(raw_rules, list | tuple) or not raw_rules:
        raise ConfigError(f"expected a non-empty list of rules, got {type_name(raw_rules)}",
                          key="layers")
    rules = tuple(_parse_rule(raw, f"layers[{i}]") for i, raw in enumerate(raw_rules))
    _check_rule_names(rules)
    return rules


def _parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a rule mapping with 'knobs', got {type_name(raw)}",
                          key=where)
    check_keys(raw, _RULE_KEYS, where)
    share = raw.get("share", False)
    if not isinstance(share, bool):
        raise ConfigError(f"expected true or false, got {type_name(share)}", key=f"{where}.share")
    return Rule(
        knobs=parse_knobs(raw.get("knobs"), f"{where}.knobs"),
        match=_parse_patterns(raw.get("match"), f"{where}.match", allow_empty=False),
        types=_parse_types(raw.get("types"), f"{where}.types"),
        exclude=_parse_patterns(raw.get("exclude"), f"{where}.exclude", allow_empty=True),
        share=share,
        name=_parse_name(raw.get("name"), f"{where}.name"),
    )


def _parse_name(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not _NAME_RE.fullmatch(raw):
        raise ConfigError(f"{raw!r} is not a valid rule name; allowed: letters, digits, '_', "
                          f"'.', '-', starting with a letter or '_'", key=where)
    if _RESERVED_NAME_RE.fullmatch(raw):
        raise ConfigError(f"{raw!r} is reserved for unnamed rules; pick another name", key=where)
    return raw


def _parse_patterns(raw: Any, where: str, *, allow_empty: bool) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ConfigError(f"expected a module name, a 're:' pattern or a list of them, "
                          f"got {type_name(raw)}", key=where)
    if not items and not allow_empty:
        raise ConfigError("empty list; give at least one pattern or leave the key out", key=where)
    for j, item in enumerate(items):
        key = where if isinstance(raw, str) else f"{where}[{j}]"
        if not isinstance(item, str) or item in ("", "re:"):
            raise ConfigError(f"expected a module name or a 're:' pattern, got {item!r}", key=key)
        if item.startswith("re:"):
            try:
                compile_pattern(item[3:])
            except (re.error, OverflowError, RecursionError) as e:
                raise ConfigError(f"bad regular expression {item!r}: {e}", key=key) from None
    return tuple(items)


def _parse_types(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"expected a non-empty list of type names from {list(LAYER_TYPES)}, "
                          f"got {raw!r}", key=where)
    for item in items:
        if item not in LAYER_TYPES:
            hint = did_you_mean(item, LAYER_TYPES) if isinstance(item, str) else ""
            raise ConfigError(f"unknown layer type {item!r}{hint}; allowed: {list(LAYER_TYPES)}",
                              key=where)
    return tuple(items)


def _check_rule_names(rules: Sequence[Rule]) -> None:
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"rule name {rule.name!r} is used twice", key=f"layers[{i}].name")
        if rule.name is not None:
            seen.add(rule.name)
