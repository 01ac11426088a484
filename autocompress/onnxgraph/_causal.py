"""Decoder LMs (Hugging Face causal language models) as deployable ONNX graphs.

The contract the measurement side codes against:

- :func:`is_causal_lm` says whether a (compressed) model is a decoder LM that is exported with
  its KV cache (the task's model wrapper, :class:`CausalLM`);
- :func:`export_causal_lm` writes the ONNX graph with the KV cache as inputs and outputs;
- :func:`causal_lm_feeds` gives the named input batches of that graph latency is timed on:
  ``prefill`` (the prompt, an empty cache; ``prefill_<n>`` for each of several prompt lengths)
  and ``decode`` (one new token on a cache of ``context_len`` tokens).

The graph's inputs are ``input_ids`` ``(batch, sequence)``, ``attention_mask`` ``(batch, past +
sequence)``, ``position_ids`` ``(batch, sequence)`` and ``past_key_values.<i>.key`` /
``.value`` ``(batch, kv_heads, past, head_dim)`` for each layer ``i``; its outputs ``logits``
``(batch, sequence, vocab)`` and ``present.<i>.key`` / ``.value`` ``(batch, kv_heads, past +
sequence, head_dim)``. Batch, sequence and past length are dynamic; a prefill is the same graph
with a past of length 0 (ONNX Runtime takes the zero-size inputs).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autocompress._inputs import tensors_of, to_numpy_feed
from autocompress.onnxgraph._export import ONNX_OPSET, bake_for_export, store_compressed

__all__ = ["CausalLM", "causal_lm_feeds", "export_causal_lm", "is_causal_lm", "position_limit",
           "prefill_feed"]

# The example the cached step is traced at: a past and a new sequence of different lengths, a
# batch of 2, so that no axis is specialised to a constant.
_TRACE_BATCH, _TRACE_PAST, _TRACE_NEW = 2, 3, 2


class CausalLM(nn.Module):
    """A Hugging Face causal LM (Llama, Qwen2, Mistral, GPT-2, ... ``*ForCausalLM``) as a
    task's model: ``forward(input_ids, attention_mask) -> logits``, without a KV cache (what
    training, the metric and a plain export see). The Hugging Face model is the submodule
    ``lm``, so layer names are its own under ``lm.`` (``lm.model.layers.0.self_attn.q_proj``).
    It is exported with its KV cache (:func:`export_causal_lm`).
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> Any:
        """The Hugging Face model's config."""
        return self.lm.config

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _CachedStep(nn.Module):
    """One step of ``lm`` with its KV cache as flat tensors: rebuilds a ``DynamicCache`` from
    the past keys and values, returns the logits and the present keys and values."""

    def __init__(self, lm: nn.Module, layers: int) -> None:
        super().__init__()
        self.lm, self.layers = lm, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=_config(self.lm))
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=True, **{_cache_arg(self.lm): cache})
        return (out.logits, *_flat_cache(out))


def _cache_arg(lm: nn.Module) -> str:
    """The name of ``forward``'s cache argument: ``cache`` (transformers 5.x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (4.x)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _flat_cache(out: Any) -> list[torch.Tensor]:
    """The keys and values of each layer of a model output's cache, in layer order."""
    cache = out.get("cache") if out.get("cache") is not None else out.past_key_values
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder LM exported with its KV cache (a :class:`CausalLM`)."""
    return isinstance(model, CausalLM)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's past (input) and present (output) key/value names for ``layers`` layers."""
    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    return [f"past_key_values.{n}" for n in kv], [f"present.{n}" for n in kv]


def export_causal_lm(model: nn.Module, example_inputs: Any, path: str | Path, *,
                     contrib_ops: bool = True) -> Path:
    """Writes ``model`` (a :class:`CausalLM`, compressed or not) as an ONNX graph with the KV
    cache as inputs and outputs (module docstring), its compressed weights stored and its
    quantized activations run as :func:`~autocompress.onnxgraph.export_onnx` does.

    Args:
        model: The (compressed) :class:`CausalLM`.
        example_inputs: The task's example batch (``input_ids``, or a dict holding it): its
            tokens are what the graph is traced on.
        path: The file to write.
        contrib_ops: As :func:`~autocompress.onnxgraph.export_onnx`'s.
    """
    path = Path(path)
    shapes = _cache_shapes(model)
    baked = bake_for_export(model)
    step = _CachedStep(baked.model.get_submodule("lm"), len(shapes)).eval()
    gen = torch.Generator().manual_seed(0)
    feed = _feed(_tokens(example_inputs), shapes, _TRACE_BATCH, _TRACE_NEW, _TRACE_PAST,
                 fill=lambda shape: torch.randn(shape, generator=gen))
    pasts, presents = cache_names(len(shapes))
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 2: "past"} for name in pasts},
        **{name: {0: "batch", 2: "total"} for name in presents}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on the cache's Python control flow
        torch.onnx.export(step, tuple(feed.values()), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=list(feed),
                          output_names=["logits", *presents], dynamic_axes=axes)
    length = int(_tokens(example_inputs).shape[-1])
    store_compressed(model, baked, path, lambda: [to_numpy_feed(
        _feed(_tokens(example_inputs), shapes, 1, length, 0))], contrib_ops=contrib_ops)
    return path


def causal_lm_feeds(model: nn.Module, example_inputs: Any, prompt_lens: tuple[int, ...],
                    context_len: int, batch_size: int) -> dict[str, Any]:
    """The named input batches of :func:`export_causal_lm`'s graph latency is timed on:
    ``prefill`` (``prefill_<n>`` for each of several prompt lengths ``n``: the prompt, the
    example's tokens repeated to ``n``, on an empty cache) and ``decode`` (one new token at
    position ``context_len`` on a cache of ``context_len`` tokens), ``batch_size`` rows each,
    dicts of tensors named as the graph's inputs.

    Raises:
        ValueError: A prompt length, or ``context_len`` + the decoded token, over the model's
            ``max_position_embeddings``.
    """
    limit = position_limit(model)
    if limit is not None:
        for n in prompt_lens:
            if n > limit:
                raise ValueError(f"target.seq_len={n}: over the model's max_position_embeddings="
                                 f"{limit}")
        if context_len >= limit:
            raise ValueError(f"target.context_len={context_len}: the decoded token's position "
                             f"must be below the model's max_position_embeddings={limit}")
    shapes, tokens = _cache_shapes(model), _tokens(example_inputs)
    prefill = {("prefill" if len(prompt_lens) == 1 else f"prefill_{n}"):
               _feed(tokens, shapes, batch_size, n, 0) for n in prompt_lens}
    return {**prefill, "decode": _feed(tokens, shapes, batch_size, 1, context_len)}


def prefill_feed(graph_inputs: Sequence[tuple[str, Sequence[Any]]], input_ids: np.ndarray,
                 attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The inputs of :func:`export_causal_lm`'s graph that run whole sequences on an empty
    cache (what an exported decoder LM is evaluated with): ``graph_inputs`` are the graph's
    ``(name, shape)`` (an ONNX Runtime session's inputs; a cache input's head count and head
    size are static), positions follow the mask (left padding starts at 0)."""
    ids = np.asarray(input_ids, np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}
    for name, shape in graph_inputs:
        if name.startswith("past_key_values."):
            feed[name] = np.zeros((ids.shape[0], int(shape[1]), 0, int(shape[3])), np.float32)
    names = {name for name, _ in graph_inputs}
    return {k: v for k, v in feed.items() if k in names}


def _feed(tokens: torch.Tensor, shapes: list[tuple[int, int]], batch: int, new: int, past: int,
          fill: Callable[[tuple[int, ...]], torch.Tensor] = torch.zeros) -> dict[str, torch.Tensor]:
    """The graph's inputs for ``new`` tokens (the example's first row repeated) after a cache
    of ``past`` tokens (zeros, or ``fill(shape)``)."""
    row = tokens[0].repeat(-(-new // tokens.shape[-1]))[:new]
    feed = {"input_ids": row.expand(batch, new).contiguous(),
            "attention_mask": torch.ones(batch, past + new, dtype=torch.long),
            "position_ids": torch.arange(past, past + new).expand(batch, new).contiguous()}
    names = cache_names(len(shapes))[0]
    for i, (heads, dim) in enumerate(shapes):
        feed[names[2 * i]] = fill((batch, heads, past, dim))
        feed[names[2 * i + 1]] = fill((batch, heads, past, dim))
    return feed


def _tokens(example_inputs: Any) -> torch.Tensor:
    """The token ids of an example batch: its ``input_ids``, or its first tensor."""
    if isinstance(example_inputs, Mapping) and "input_ids" in example_inputs:
        return example_inputs["input_ids"].long()
    return tensors_of(example_inputs)[0].long()


def _cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of each layer's cache, as the model runs (after any heads were
    removed), from one token through it."""
    lm = model.lm if isinstance(model, CausalLM) else model
    device = next((p.device for p in lm.parameters()), torch.device("cpu"))
    with torch.no_grad():
        out = lm(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    return [(int(k.shape[1]), int(k.shape[3])) for k in _flat_cache(out)[::2]]


def _config(module: nn.Module) -> Any:
    """A Hugging Face model's (or :class:`CausalLM`'s) config, or None."""
    return getattr(module, "config", None)


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes: the ``max_position_embeddings`` of the first
    Hugging Face config among its modules, or None when it has none."""
    for module in model.modules():
        limit = getattr(_config(module), "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None
