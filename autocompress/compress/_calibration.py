"""Calibration data for the post-training methods, and the statistics of each layer's inputs.

The calibrated methods (GPTQ, AWQ, SparseGPT, Wanda, reconstruction after structured pruning,
whitened low-rank) decide from what a layer sees: a few hundred samples of the task's training
inputs (:class:`Calibration`), run through the model as it is when the method runs (after the
methods ordered before it), with forward pre-hooks on the layers that need them, all in one
pass (:func:`input_stats`). Per layer they keep the Gram matrix of its inputs ``X^T X``
(``X``: one row per token / output position, one column per input of a weight row: a Linear's
input features, a conv's unfolded ``C_in * kernel`` patch), from which

- the layer-local output error of any replacement weight ``W'`` is
  ``tr((W' - W) H (W' - W)^T)`` (:func:`output_error`, ``H = X^T X / rows``): GPTQ's and
  SparseGPT's objective, and a cheap per-layer sensitivity;
- Wanda's input norms are ``sqrt(diag(X^T X))``; AWQ's activation scales are the mean ``|x|``
  per input channel (``InputStats.mean_abs``).

Without calibration data (:meth:`Calibration.empty`, what rebuilding a logged trial passes)
the calibrated methods only set up the layers' structure; the weights are then loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress._inputs import batch_size, run, take

__all__ = ["DEFAULT_SAMPLES", "Calibration", "InputStats", "calibration_problem", "hooked_pass",
           "inverse_hessian_factor",
           "input_rows", "input_stats", "output_error", "weight_matrix"]

DEFAULT_SAMPLES = 256  # calibration samples of a trial (``search.calibration_samples``)
GRAM_BUDGET_BYTES = 1 << 30  # Gram matrices held at once; more layers take more passes


@dataclass(frozen=True)
class Calibration:
    """Input batches the calibrated methods run the model on.

    Attributes:
        batches: Input batches in the task's form (a tensor, a tuple or a dict of tensors).
        stats: Input statistics already measured, by layer name (:meth:`from_stats`):
            :func:`input_stats` returns copies of them without running the model.
    """

    batches: tuple[Any, ...] = ()
    stats: Mapping[str, InputStats] = field(default_factory=dict, compare=False, repr=False)

    @property
    def samples(self) -> int:
        """Samples over all batches."""
        return sum(batch_size(b) for b in self.batches)

    @property
    def is_empty(self) -> bool:
        """No data: the calibrated methods set up structure only (the weights are loaded)."""
        return not self.batches and not self.stats

    @classmethod
    def empty(cls) -> Calibration:
        """No data (see :attr:`is_empty`)."""
        return cls(())

    @classmethod
    def from_batches(cls, batches: Iterable[Any], samples: int = DEFAULT_SAMPLES) -> Calibration:
        """The first ``samples`` samples of ``batches`` (the last batch cut to fit)."""
        kept, have = [], 0
        for batch in batches:
            if have >= samples:
                break
            n = batch_size(batch)
            kept.append(batch if have + n <= samples else take(batch, samples - have))
            have += n
        return cls(tuple(kept))

    @classmethod
    def from_stats(cls, stats: Mapping[str, InputStats]) -> Calibration:
        """Statistics measured before, by layer name, and no batches: the sensitivity
        profile's layer-local probes compress one layer (of the same name) by a calibrated
        method without a forward pass. Only :func:`input_stats` of those layers works on it."""
        return cls((), dict(stats))

    @classmethod
    def from_task(cls, task: Any, samples: int = DEFAULT_SAMPLES) -> Calibration:
        """``samples`` samples of ``task``'s training inputs (``Task.calibration_batches``)."""
        return cls.from_batches(task.calibration_batches(samples), samples)


@dataclass
class InputStats:
    """What one layer's inputs were over the calibration data.

    Attributes:
        gram: ``X^T X`` (float64, ``d x d``), ``X`` the layer's input rows (:func:`input_rows`).
        rows: Rows of ``X`` seen.
        abssum: Sum of ``|x|`` per input column (float64, ``d``).
        absmax: Largest ``|x|`` per input column (float32, ``d``).
    """

    gram: torch.Tensor
    rows: int = 0
    abssum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    absmax: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    @classmethod
    def zeros(cls, d: int) -> InputStats:
        return cls(torch.zeros(d, d, dtype=torch.float64), 0,
                   torch.zeros(d, dtype=torch.float64), torch.zeros(d))

    def copy(self) -> InputStats:
        """An independent copy (a method may change its tensors in place)."""
        return InputStats(self.gram.clone(), self.rows, self.abssum.clone(), self.absmax.clone())

    def add(self, rows: torch.Tensor) -> None:
        """Accumulates input rows ``(n, d)``."""
        x = rows.detach().to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.rows += x.shape[0]
        self.abssum += x.abs().sum(0)
        self.absmax = torch.maximum(self.absmax, rows.detach().abs().amax(0).float())

    @property
    def hessian(self) -> torch.Tensor:
        """``X^T X / rows`` (float64): the layer's output error is ``tr(D H D^T)``."""
        return self.gram / max(self.rows, 1)

    @property
    def norms(self) -> torch.Tensor:
        """The L2 norm of each input column over all rows (Wanda's ``||X_j||``), float32."""
        return self.gram.diagonal().clamp_min(0).sqrt().float()

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean ``|x|`` per input column (AWQ's activation scale), float32."""
        return (self.abssum / max(self.rows, 1)).float()


def calibration_problem(module: nn.Module) -> str | None:
    """Why the calibrated methods cannot take ``module`` (None if they can): they need a
    weight matrix whose rows each multiply one input row (a Linear, or a conv with
    ``groups=1`` through its unfolded patches)."""
    if isinstance(module, nn.Embedding):
        return "its inputs are token indices, not activations a calibration can weigh"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.groups != 1:
            return f"a grouped conv (groups={module.groups}) has no single input matrix"
        if module.padding_mode != "zeros":
            return f"a conv with padding_mode={module.padding_mode!r} cannot be unfolded"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"{type(module).__name__} is not a Linear or a conv"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as the ``(out, d)`` matrix that multiplies :func:`input_rows`."""
    return module.weight.detach().flatten(1)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s input ``x`` as rows ``(n, d)``: one per token (Linear) or output position
    (conv: the unfolded patch), ``d`` the columns of :func:`weight_matrix`."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x, kernel = x.unsqueeze(-2), (1, *module.kernel_size)
        stride, dilation = (1, *module.stride), (1, *module.dilation)
        padding: Any = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        kernel, stride, dilation, padding = (module.kernel_size, module.stride, module.dilation,
                                             module.padding)
    if isinstance(padding, str):  # "valid" or stride-1 "same"
        padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in
                                                           zip(dilation, kernel, strict=True))
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _chunks(modules: Sequence[nn.Module]) -> Iterable[list[nn.Module]]:
    """``modules`` in groups whose Gram matrices fit :data:`GRAM_BUDGET_BYTES` together."""
    chunk: list[nn.Module] = []
    used = 0
    for m in modules:
        need = 8 * weight_matrix(m).shape[1] ** 2
        if chunk and used + need > GRAM_BUDGET_BYTES:
            yield chunk
            chunk, used = [], 0
        chunk.append(m)
        used += need
    if chunk:
        yield chunk


@torch.no_grad()
def input_stats(model: nn.Module, modules: Sequence[nn.Module],
                calibration: Calibration) -> dict[nn.Module, InputStats]:
    """The :class:`InputStats` of each of ``modules`` (layers of ``model``) over
    ``calibration``: the model runs in eval mode, one pass per group of layers whose Gram
    matrices fit in memory together (one pass for a small model). Layers whose statistics
    ``calibration`` carries (:meth:`Calibration.from_stats`, by name in ``model``) cost no pass.

    Raises:
        ValueError: ``calibration`` is empty (or has no batches for a layer it has no
            statistics of), or a module cannot be calibrated (:func:`calibration_problem`).
    """
    if calibration.is_empty:
        raise ValueError("input_stats needs calibration data; got an empty Calibration")
    for m in modules:
        if (problem := calibration_problem(m)) is not None:
            raise ValueError(problem)
    names = {m: n for n, m in model.named_modules()} if calibration.stats else {}
    known = {m: calibration.stats[names[m]].copy() for m in modules
             if names.get(m) in calibration.stats}
    unique = [m for m in dict.fromkeys(modules) if m not in known]
    if unique and not calibration.batches:
        raise ValueError(f"no calibration batches, and no statistics of {names.get(unique[0])!r}")
    stats = {m: InputStats.zeros(weight_matrix(m).shape[1]) for m in unique}
    for chunk in _chunks(unique):
        hooked_pass(model, chunk, calibration,
                    lambda mod, x: stats[mod].add(input_rows(mod, x)))
    return {**known, **stats}


@torch.no_grad()
def hooked_pass(model: nn.Module, modules: Sequence[nn.Module], calibration: Calibration,
                see: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """Runs ``model`` (in eval mode, put back afterwards) over ``calibration``'s batches,
    calling ``see(module, input)`` before each of ``modules`` runs."""
    handles = [m.register_forward_pre_hook(lambda mod, args: see(mod, args[0])) for m in modules]
    was_training = model.training
    model.eval()
    try:
        for batch in calibration.batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def inverse_hessian_factor(h: torch.Tensor, damp: float, tries: int) -> torch.Tensor | None:
    """The upper Cholesky factor of ``(H + lambda I)^-1`` (GPTQ's and SparseGPT's), ``lambda``
    ``damp`` of ``H``'s mean diagonal, grown tenfold (from 1e-8 if it is 0) while the
    factorization fails, ``tries`` times at most; None if it never succeeds."""
    eye = torch.eye(len(h), dtype=h.dtype)
    lam = damp * float(h.diagonal().mean())
    for _ in range(tries):
        low, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0:
                return upper
        lam = 10 * lam if lam > 0 else 1e-8
    return None


def output_error(weight: torch.Tensor, new: torch.Tensor, stats: InputStats) -> float:
    """The layer-local output error of replacing ``weight`` by ``new`` (both ``(out, d)`` or
    the layer's shape), relative to the output's energy: ``tr(D H D^T) / tr(W H W^T)`` with
    ``D = new - weight`` and ``H`` the inputs' Hessian (0: the same outputs on the
    calibration data)."""
    w = weight.detach().flatten(1).to(torch.float64)
    d = new.detach().flatten(1).to(torch.float64) - w
    h = stats.hessian
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))

