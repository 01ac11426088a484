"""Small models shaped like the ones users bring (built locally, random init, no downloads):
a CNN with ``Conv2d`` subclasses, depthwise convs and squeeze-excite; a two-input model; a
dict-input model with an unused head; a ViT-like ``nn.TransformerEncoder``; tiny Hugging Face
BERT and GPT-2 (when transformers is installed), wrapped like the ``minilm`` task's encoder
(mean-pooled, normalized embeddings).

Each builder returns ``(model, example_inputs)``; :func:`task_of` makes an
``autocompress.Task`` of one (targets: the model's own outputs, so a trial's metric is its
fidelity to the original).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autocompress import Task
from autocompress._inputs import run, take
from autocompress.tasks.minilm import SentenceEncoder


class PaddedConv2d(nn.Conv2d):
    """A ``Conv2d`` subclass with "same" padding computed in forward (timm / EfficientNet style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel_size[0] // 2
        return F.conv2d(F.pad(x, (pad, pad, pad, pad)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


Size = int | tuple[int, int]


def same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis, ``(before, after)``: uneven (one more after)
    when the total is odd, e.g. kernel 3, stride 2 on 8 positions: ``(0, 1)``."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame`` (EfficientNet ports): TensorFlow's "same" padding computed from the
    input's size in forward. Its constructor takes no ``padding`` and a required ``name``, so
    ``type(layer)(in, out, kernel, ...)`` with ``nn.Conv2d``'s arguments fails."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: Size, stride: Size = 1,
                 dilation: Size = 1, bias: bool = True, *, name: str) -> None:
        super().__init__(in_ch, out_ch, kernel_size, stride, 0, dilation, bias=bias)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [same_pad(*a) for a in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
        x = F.pad(x, [*pads[1], *pads[0]])  # F.pad lists the last axis first
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: the weight standardized per output channel in forward, so neither a
    factorization nor a folded BatchNorm scale survives it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.flatten(1)
        w = ((w - w.mean(1, keepdim=True)) / (w.std(1, keepdim=True) + 1e-5)).view_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SameCNN(nn.Module):
    """Two strided ``Conv2dSame`` (no bias, each followed by a BatchNorm), a head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2, bias=False, name="stem")
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = Conv2dSame(8, 12, (3, 4), stride=(2, 1), bias=False, name="conv")
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.stem(x)))
        return self.head(F.relu(self.bn2(self.conv(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class MobileNetish(nn.Module):
    """stem (PaddedConv2d) -> depthwise (PaddedConv2d, groups=C) -> SE -> pointwise -> head."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = PaddedConv2d(3, width, 3, padding=0)
        self.bn = nn.BatchNorm2d(width)
        self.depthwise = PaddedConv2d(width, width, 3, padding=0, groups=width)
        self.se = SqueezeExcite(width, 4)
        self.pointwise = nn.Conv2d(width, 2 * width, 1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.se(F.relu(self.depthwise(x)))
        x = F.relu(self.pointwise(x)).mean((2, 3))
        return self.head(x)


class TwoInputs(nn.Module):
    """An image and a metadata vector, as positional arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.meta = nn.Linear(5, 8)
        self.head = nn.Linear(8 * 16 + 8, 3)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([F.relu(self.conv(image)).flatten(1), F.relu(self.meta(meta))], 1))


class TokensWithUnusedHead(nn.Module):
    """Keyword inputs ``tokens`` and ``mask``; ``unused`` runs in forward but its result is
    dropped, ``never`` never runs (both must stay out of any plan)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.unused = nn.Linear(dim, 2)
        self.never = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(tokens)))
        self.unused(h)  # computed and thrown away, like BERT's pooler under a pooled wrapper
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class TinyViT(nn.Module):
    """Patches (a strided conv) through ``nn.TransformerEncoder`` (whose layers read their
    linears' weights directly, for PyTorch's fused fast path), mean-pooled, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)  # deep copies: equal initial layers
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def tokens(batch: int = 2, length: int = 12, vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - 3:] = 0  # padding at the end
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen), "attention_mask": mask}


def mobilenetish() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MobileNetish().eval(), torch.randn(2, 3, 8, 8)


def same_cnn() -> tuple[nn.Module, torch.Tensor]:
    """:class:`SameCNN` on 16 x 15 images: TensorFlow's padding is uneven on the stem's rows
    (16: ``(0, 1)``; its 15 columns: ``(1, 1)``) and on both axes of ``conv`` (kernel 3 x 4,
    stride (2, 1) on 8 x 8: ``(0, 1)`` and ``(1, 2)``)."""
    torch.manual_seed(0)
    return SameCNN().eval(), torch.randn(4, 3, 16, 15)


def tiny_vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyViT().eval(), torch.randn(2, 3, 16, 16)


def two_inputs() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return TwoInputs().eval(), (torch.randn(2, 1, 4, 4), torch.randn(2, 5))


def tokens_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    x = tokens()
    return TokensWithUnusedHead().eval(), {"tokens": x["input_ids"], "mask": x["attention_mask"]}


def tiny_bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return SentenceEncoder(BertModel(config)).eval(), tokens()


def tiny_gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return SentenceEncoder(GPT2Model(config)).eval(), tokens()


class _Pairs(Dataset):
    def __init__(self, inputs, targets) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if isinstance(self.inputs, dict):
            return {k: v[i] for k, v in self.inputs.items()}, self.targets[i]
        if isinstance(self.inputs, tuple):
            return tuple(v[i] for v in self.inputs), self.targets[i]
        return self.inputs[i], self.targets[i]


def fidelity(model: nn.Module, loader) -> float:
    """Mean cosine similarity of the model's outputs to the targets (the original outputs)."""
    total = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            out = run(model.eval(), x)
            total += float(F.cosine_similarity(out.flatten(1), y.flatten(1)).sum())
            count += len(y)
    return total / max(count, 1)


def task_of(model: nn.Module, example_inputs, n: int = 16, name: str = "real") -> Task:
    """A task whose targets are ``model``'s own outputs on ``n`` samples made by repeating
    ``example_inputs`` with noise (floats) or shuffled tokens (integers)."""
    from autocompress._inputs import map_tensors, repeat_to

    gen = torch.Generator().manual_seed(1)

    def jitter(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t + 0.1 * torch.randn(t.shape, generator=gen)
        return t[torch.randperm(len(t), generator=gen)]

    inputs = map_tensors(repeat_to(example_inputs, n), jitter)
    with torch.no_grad():
        targets = run(model.eval(), inputs)
    loader = DataLoader(_Pairs(inputs, targets), batch_size=8)
    return Task(model=model, train_loader=loader, val_loader=loader,
                example_inputs=take(example_inputs, 1), metric=fidelity, loss_fn=F.mse_loss, name=name)
