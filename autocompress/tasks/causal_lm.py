"""Decoder LMs as a task kind: any Hugging Face causal LM on text, next-token prediction.

:func:`causal_lm_task` makes a :class:`~autocompress.Task` of a ``*ForCausalLM`` model (Llama,
Qwen2, Mistral, GPT-2, ...), its tokenizer and some texts: the texts are tokenized as one
stream and cut into chunks of ``seq_len`` tokens, the inputs are ``{"input_ids",
"attention_mask"}``, the targets the same token ids. The model is wrapped in
:class:`~autocompress.onnxgraph.CausalLM` (logits, no cache; layer names are the Hugging Face
ones under ``lm.``), so that its ONNX export carries the KV cache and latency is timed on
prefill and decode steps.

- metric: next-token accuracy on the validation chunks (the argmax of the logits at each
  position equals the next token; higher is better), :func:`next_token_accuracy`;
- :func:`perplexity` too (``Task.info["perplexity"]`` for the baseline);
- loss: next-token cross-entropy (logits shifted by one, :func:`next_token_loss`);
- distillation: token-level KL to the original model's logits (temperature 1, averaged over
  tokens, :func:`token_kl`);
- a small fine-tuning learning rate (:data:`FINETUNE_LR`): the model is pretrained.

Example:
    >>> task = causal_lm_task(AutoModelForCausalLM.from_pretrained(path),  # doctest: +SKIP
    ...                       AutoTokenizer.from_pretrained(path), texts, seq_len=128)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocompress.onnxgraph import CausalLM
from autocompress.tasks._task import Task

__all__ = ["FINETUNE_LR", "SEQ_LEN", "causal_lm_task", "next_token_accuracy", "next_token_loss",
           "perplexity", "text_chunks", "token_kl"]

SEQ_LEN = 128
# The usual order of magnitude for fine-tuning a pretrained LM of ~100M parameters with AdamW
# (not measured here: the built-in smollm2 experiment is post-training).
FINETUNE_LR = 2e-5


class _Chunks(Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits at each position against the next token (``targets``: the
    input ids), averaged over the predicted tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


def token_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` of the logits at each token (temperature
    1), averaged over the tokens."""
    s, t = student.float().flatten(0, -2), teacher.float().flatten(0, -2)
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean",
                    log_target=True)


def _next_token_stats(model: nn.Module, loader: Iterable) -> tuple[float, float]:
    """``(accuracy, mean negative log-likelihood)`` of the next tokens over ``loader``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = nll = count = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            logits = model(**{k: v.to(device) for k, v in x.items()})[:, :-1].float()
            nxt = y.to(device)[:, 1:]
            correct += float((logits.argmax(-1) == nxt).sum())
            nll += float(F.cross_entropy(logits.flatten(0, 1), nxt.flatten(), reduction="sum"))
            count += nxt.numel()
    model.train(was_training)
    return correct / max(count, 1), nll / max(count, 1)


def next_token_accuracy(model: nn.Module, loader: Iterable) -> float:
    """The fraction of positions where the argmax of the logits is the next token."""
    return _next_token_stats(model, loader)[0]


def perplexity(model: nn.Module, loader: Iterable) -> float:
    """``exp`` of the mean next-token cross-entropy over ``loader``."""
    return math.exp(_next_token_stats(model, loader)[1])


def text_chunks(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """``texts`` tokenized as one stream (joined by blank lines, no special tokens) and cut
    into ``(chunks, seq_len)`` token ids; the remainder is dropped."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len)


def causal_lm_task(model: nn.Module, tokenizer: Any, texts: Sequence[str], *,
                   seq_len: int = SEQ_LEN, name: str = "causal_lm", train_samples: int = 256,
                   val_samples: int = 64, batch_size: int = 8,
                   finetune_lr: float | None = FINETUNE_LR, seed: int = 0,
                   info: dict | None = None) -> Task:
    """The next-token task of a Hugging Face causal LM on ``texts`` (module docstring).

    Args:
        model: A Hugging Face ``*ForCausalLM`` model (or one already wrapped in ``CausalLM``).
        tokenizer: Its tokenizer: any callable ``tokenizer(text, add_special_tokens=False)``
            returning a mapping with ``input_ids``.
        texts: The text; :func:`text_chunks` cuts it into chunks of ``seq_len`` tokens.
        seq_len: Tokens per chunk: the example's sequence length (at most the model's
            ``max_position_embeddings``).
        name: The task's name.
        train_samples: At most this many training chunks.
        val_samples: Validation chunks (at most a quarter of them all), spread evenly over
            the text; the training chunks are the others, in order.
        batch_size: Rows per batch of both loaders.
        finetune_lr: ``Task.finetune_lr``.
        seed: Seeds the training loader's shuffling.
        info: Facts added to ``Task.info`` (which holds the sizes and the baseline's
            ``accuracy`` and ``perplexity``).

    Raises:
        ValueError: ``seq_len`` over the model's ``max_position_embeddings``, or text too
            short for two chunks.
    """
    lm = model if isinstance(model, CausalLM) else CausalLM(model)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len}: over the model's max_position_embeddings={limit}")
    chunks = text_chunks(tokenizer, texts, seq_len)
    if len(chunks) < 2:
        raise ValueError(f"the texts make {len(chunks)} chunk(s) of {seq_len} tokens; at least "
                         f"2 are needed (a training and a validation one)")
    n_val = max(1, min(val_samples, len(chunks) // 4))
    val_idx = torch.linspace(0, len(chunks) - 1, n_val).round().long().unique()
    train_mask = torch.ones(len(chunks), dtype=torch.bool)
    train_mask[val_idx] = False
    train_ids, val_ids = chunks[train_mask][:train_samples], chunks[val_idx]
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(_Chunks(train_ids), batch_size=batch_size, shuffle=True, generator=gen)
    val = DataLoader(_Chunks(val_ids), batch_size=batch_size)
    accuracy, nll = _next_token_stats(lm.eval(), val)
    example = {"input_ids": val_ids[:1], "attention_mask": torch.ones_like(val_ids[:1])}
    return Task(model=lm, train_loader=train, val_loader=val, example_inputs=example,
                metric=next_token_accuracy, loss_fn=next_token_loss, distill_loss=token_kl,
                name=name, finetune_lr=finetune_lr,
                info={"train_samples": len(train_ids), "val_samples": len(val_ids),
                      "seq_len": seq_len, "accuracy": accuracy, "perplexity": math.exp(nll),
                      "metric": "next-token accuracy", **(info or {})})
