"""Decoder LMs (Hugging Face causal language models) as deployable ONNX graphs.

Foundation stub (issue 26): the decoder-LM work fills these in. The contract the measurement
side codes against:

- :func:`is_causal_lm` says whether a (compressed) model is a decoder LM that is exported with
  its KV cache (the task's model wrapper);
- :func:`export_causal_lm` writes the ONNX graph with the KV cache as inputs and outputs;
- :func:`causal_lm_feeds` gives the named input batches of that graph latency is timed on:
  ``prefill`` (the prompt, an empty cache; ``prefill_<n>`` for each of several prompt lengths)
  and ``decode`` (one new token on a cache of ``context_len`` tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["causal_lm_feeds", "export_causal_lm", "is_causal_lm"]


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder LM exported with its KV cache."""
    return False


def export_causal_lm(model: nn.Module, example_inputs: Any, path: str | Path, *,
                     contrib_ops: bool = True) -> Path:
    """Writes ``model`` as an ONNX graph with the KV cache as inputs and outputs."""
    raise NotImplementedError


def causal_lm_feeds(model: nn.Module, example_inputs: Any, prompt_lens: tuple[int, ...],
                    context_len: int, batch_size: int) -> dict[str, Any]:
    """The named input batches of :func:`export_causal_lm`'s graph (module docstring)."""
    raise NotImplementedError
