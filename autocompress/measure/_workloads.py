"""The input batches a latency is timed on: one per sequence length of the target, or a
decoder LM's prefill and decode steps.

- No ``target.seq_len``, not a decoder: one batch at the example's shape, named ``""`` (as
  before: one result, the cache keys of old).
- ``target.seq_len`` on an ordinary model: one batch per length, named ``seq<n>``. The token
  inputs (integer tensors with a second axis) and the inputs of the same shape (attention
  masks, token type ids) are resized on axis 1: the example's values repeated or cut to the
  length, masks (inputs whose name has ``mask``) all ones. The graph is then exported with a
  dynamic sequence axis (:func:`dynamic_sequence`). A length above what the model takes (a
  Hugging Face ``config.max_position_embeddings``, or the model failing at that length) is
  refused (:func:`workload_feeds` raises a ConfigError naming ``target.seq_len``).
- A decoder LM (:func:`~autocompress.onnxgraph.is_causal_lm`): the graph's own feeds
  (:func:`~autocompress.onnxgraph.causal_lm_feeds`): ``prefill`` (``prefill_<n>`` per prompt
  length) and ``decode``.

``latency_ms`` is then the target's ``aggregate`` over the workloads, or a decoder's decode
step (:func:`~autocompress.measure._results.combine`), and each workload is reported as
``latency_<workload>_ms``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from autocompress._errors import ConfigError
from autocompress._inputs import input_names, map_tensors, repeat_to, take, tensors_of
from autocompress._inputs import run as call
from autocompress.measure.target import Target
from autocompress.onnxgraph import causal_lm_feeds, is_causal_lm, position_limit

__all__ = ["dynamic_sequence", "position_limit", "workload_feeds", "workload_key"]


def workload_feeds(model: nn.Module, example_inputs: Any, target: Target) -> dict[str, Any]:
    """``{workload name: input batch}`` latency is timed on for ``target`` (module docstring);
    ``{"": batch}`` for one batch at the example's shape.

    Raises:
        ConfigError: A ``target.seq_len`` above the model's position limit, or one the model
            fails at (key ``target.seq_len``, the limit named).
    """
    if is_causal_lm(model):
        lengths = target.seq_len or (_length(example_inputs),)
        _check_lengths(model, example_inputs, lengths)
        context = target.context_len or max(lengths)
        limit = position_limit(model)
        if limit is not None and context + 1 > limit:  # the decoded token takes a position too
            raise ConfigError(f"target.context_len={context}: a token decoded after {context} "
                              f"cached ones is above the model's position limit of {limit} "
                              f"tokens; allowed: up to {limit - 1}", key="target.context_len")
        return causal_lm_feeds(model, example_inputs, lengths, context, target.batch_size)
    if target.seq_len is None:
        return {"": repeat_to(example_inputs, target.batch_size)}
    _check_lengths(model, example_inputs, target.seq_len)
    return {f"seq{n}": repeat_to(at_length(example_inputs, n), target.batch_size)
            for n in target.seq_len}


def dynamic_sequence(model: nn.Module, target: Target) -> bool:
    """Whether ``model`` is exported with a dynamic sequence axis for ``target``: with a
    ``seq_len`` on an ordinary model (a decoder's export has its own axes)."""
    return target.seq_len is not None and not is_causal_lm(model)


def at_length(example_inputs: Any, n: int) -> Any:
    """``example_inputs`` with the token inputs and the inputs of their shape resized to ``n``
    on axis 1 (module docstring); the other inputs as they are."""
    names = input_names(example_inputs)
    tensors = tensors_of(example_inputs)
    shapes = {tuple(t.shape) for t in tensors if t.dim() >= 2 and not t.is_floating_point()}
    if not shapes:
        raise ConfigError(f"target.seq_len={n}: the example inputs have no token input (an "
                          f"integer tensor with a sequence axis) to set the length of",
                          key="target.seq_len")
    resized = {id(t): _resized(t, n, "mask" in name.lower())
               for name, t in zip(names, tensors, strict=True) if tuple(t.shape) in shapes}
    return map_tensors(example_inputs, lambda t: resized.get(id(t), t))


def _resized(t: torch.Tensor, n: int, mask: bool) -> torch.Tensor:
    if mask:
        return torch.ones((t.shape[0], n, *t.shape[2:]), dtype=t.dtype)
    reps = -(-n // t.shape[1])
    return t.repeat(1, reps, *([1] * (t.dim() - 2)))[:, :n].contiguous()


def _check_lengths(model: nn.Module, example_inputs: Any, lengths: tuple[int, ...]) -> None:
    """Refuses a length above :func:`position_limit`; without one, runs the model once at the
    longest length above the example's, and refuses it if that fails."""
    longest = max(lengths)
    limit = position_limit(model)
    if limit is not None:
        if longest > limit:
            raise ConfigError(f"target.seq_len={list(lengths)}: {longest} is above the model's "
                              f"position limit of {limit} tokens (config.max_position_embeddings)"
                              f"; allowed: lengths up to {limit}", key="target.seq_len")
        return
    if is_causal_lm(model) or longest <= _length(example_inputs):
        return
    was_training = model.training
    try:
        with torch.no_grad():
            call(model.eval(), at_length(take(example_inputs, 1), longest))
    except Exception as e:  # noqa: BLE001  (whatever the model raises at that length)
        raise ConfigError(f"target.seq_len={list(lengths)}: the model fails at {longest} tokens "
                          f"({type(e).__name__}: {str(e).strip()[:200]}); its limit is below "
                          f"that: allowed: shorter lengths", key="target.seq_len") from None
    finally:
        model.train(was_training)


def _length(example_inputs: Any) -> int:
    return int(tensors_of(example_inputs)[0].shape[1])


def workload_key(key: str, name: str, batch: Any) -> str:
    """The latency-cache key of workload ``name`` (input ``batch``) of the model whose key is
    ``key``: ``key`` itself for the one workload ``""``, else a hash of it, the name and the
    shape and dtype of every input (the lengths and the decoder's cache are in those)."""
    if name == "":
        return key
    shapes = [(n, list(t.shape), str(t.dtype))
              for n, t in zip(input_names(batch), tensors_of(batch), strict=True)]
    blob = json.dumps({"key": key, "workload": name, "inputs": shapes})
    return hashlib.sha256(blob.encode()).hexdigest()
