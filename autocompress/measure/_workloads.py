"""The input batches a latency is timed on: one per sequence length of the target, or a
decoder LM's prefill and decode steps.

Foundation stub (issue 26): ``latency_ms`` becomes the target's aggregate over these, each
reported as well.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autocompress._inputs import repeat_to
from autocompress.measure.target import Target
from autocompress.onnxgraph import causal_lm_feeds, is_causal_lm

__all__ = ["workload_feeds"]


def workload_feeds(model: nn.Module, example_inputs: Any, target: Target) -> dict[str, Any]:
    """``{workload name: input batch}`` latency is timed on for ``target`` (module docstring);
    ``{"": batch}`` for one batch at the example's shape."""
    if is_causal_lm(model):
        lengths = target.seq_len or (_length(example_inputs),)
        return causal_lm_feeds(model, example_inputs, lengths, target.context_len or max(lengths),
                               target.batch_size)
    return {"": repeat_to(example_inputs, target.batch_size)}


def _length(example_inputs: Any) -> int:
    from autocompress._inputs import tensors_of

    return int(tensors_of(example_inputs)[0].shape[1])
