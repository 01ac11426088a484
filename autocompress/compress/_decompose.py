"""Tensor decompositions of a convolution's kernel into a chain of smaller convolutions.

Both act on the weight ``W`` of a ``Conv1d``/``Conv2d`` with ``groups=1`` and a spatial kernel
(not 1x1), ``O x I x k_1 (x k_2)``, and give conv modules, so that pruning, quantization,
export and the packed format treat the factors as any other layer. The factors that carry the
layer's kernel (Tucker's core, CP's depthwise convs) are of the layer's own class
(:func:`~autocompress.compress._convs.respecified`), so that a subclass that pads in its
forward (TensorFlow's "same" padding) pads them as it padded the layer; the 1x1 factors are
plain:

- **Tucker-2** (Kim et al., 2016, "Compression of Deep Convolutional Neural Networks for Fast
  and Low Power Mobile Applications"): ``W ~= G x_O U_out x_I U_in`` with orthonormal
  ``U_in`` (``I x r_in``) and ``U_out`` (``O x r_out``): a 1x1 conv ``I -> r_in``, the core
  conv ``r_in -> r_out`` with the layer's kernel, stride, padding and dilation, and a 1x1 conv
  ``r_out -> O`` with the bias. Computed by HOSVD (the leading left singular vectors of the
  two channel unfoldings), refined by a few HOOI sweeps (De Lathauwer et al., 2000), each of
  which can only lower the error.
- **CP** (Lebedev et al., 2015, "Speeding-up Convolutional Neural Networks Using Fine-tuned
  CP-Decomposition"): ``W ~= sum_r a_O[:, r] o a_I[:, r] o a_1[:, r] (o a_2[:, r])``, rank
  ``R``: a 1x1 conv ``I -> R``, a depthwise ``k_1 x 1`` conv, a depthwise ``1 x k_2`` conv
  (``groups=R``; stride, padding and dilation split by axis) and a 1x1 conv ``R -> O`` with
  the bias; for a Conv1d one depthwise ``k`` conv. Computed by alternating least squares
  (:func:`cp_als`), started from the leading singular vectors of each unfolding.

The first 1x1 conv has no bias, so it maps zero padding to zero padding and commutes with any
padding mode; so does the depthwise conv along one axis with padding along the other.
"""

from __future__ import annotations

import functools
import math
from typing import cast

import torch
from torch import nn

from autocompress.compress._convs import respecified

#: Damping of the Gram matrix whitened low-rank factorizes through, relative to its mean
#: diagonal (GPTQ's ``percdamp``): inputs that never vary on the calibration data still get an
#: invertible whitening.
WHITEN_DAMP = 0.01
#: HOOI sweeps after the HOSVD start of Tucker-2.
TUCKER_SWEEPS = 5
#: Most ALS sweeps of CP, and the relative improvement of its error below which it stops.
CP_SWEEPS = 100
CP_TOL = 1e-4

Conv = nn.Conv1d | nn.Conv2d


def spatial_problem(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be decomposed by Tucker-2 or CP (None if it can)."""
    if not isinstance(layer, nn.Conv1d | nn.Conv2d):
        return (f"{type(layer).__name__} layers take svd only: tucker and cp decompose a "
                f"conv's spatial kernel")
    if layer.groups != 1:
        return f"a grouped conv (groups={layer.groups}) has no single kernel to decompose"
    if math.prod(layer.kernel_size) == 1:
        return "a 1x1 conv takes svd only: it has no spatial kernel for tucker and cp"
    return None


def kept(fraction: float, full: int) -> int:
    """``round(fraction * full)``, at least 1."""
    return max(1, round(fraction * full))


def tucker_ranks(shape: torch.Size | tuple[int, ...], fraction: float) -> tuple[int, int]:
    """``(r_in, r_out)``: ``fraction`` of the full rank of each channel unfolding,
    ``min(I, O*k)`` and ``min(O, I*k)`` (``k`` the kernel's size), each at most the other
    times ``k`` (a larger one adds nothing)."""
    out, inp, k = shape[0], shape[1], math.prod(shape[2:])
    r_in, r_out = kept(fraction, min(inp, out * k)), kept(fraction, min(out, inp * k))
    r_in = min(r_in, r_out * k)
    return r_in, min(r_out, r_in * k)


def cp_rank(shape: torch.Size | tuple[int, ...], fraction: float) -> int:
    """``fraction`` of the generic CP rank of a tensor of ``shape``.

    That rank is taken as ``ceil(prod(shape) / (sum(shape) - N + 1))`` (``N`` modes): the
    fewest rank-one terms with as many free parameters as the tensor has entries (each term
    has ``sum(shape)`` numbers, less ``N - 1`` scalings), the rank of almost every tensor of
    most shapes (Strassen, 1983; Comon et al., 2009). So, as for SVD, rank 1.0 can hold the
    layer and stores about its number of weights, and rank ``f`` stores about ``f`` of them.
    """
    generic = math.ceil(math.prod(shape) / (sum(shape) - len(shape) + 1))
    return kept(fraction, generic)


# --- the decompositions -----------------------------------------------------------------------


def _leading(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``matrix`` (columns)."""
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :r]


def tucker2(w: torch.Tensor, r_in: int, r_out: int,
            sweeps: int = TUCKER_SWEEPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv weight ``w`` (``O x I x ...``) on its two channel modes.

    Returns:
        ``(u_in, core, u_out)``: ``I x r_in``, ``r_out x r_in x ...`` and ``O x r_out``, in
        float64, with ``w ~= einsum("ab...,oa,ib->oi...", core, u_out, u_in)``.
    """
    w = w.double()
    u_out = _leading(w.flatten(1), r_out)
    u_in = _leading(w.transpose(0, 1).flatten(1), r_in)
    for _ in range(sweeps):  # HOOI: each factor from w projected on the other
        u_in = _leading(torch.einsum("oi...,oa->ia...", w, u_out).flatten(1), r_in)
        u_out = _leading(torch.einsum("oi...,ib->ob...", w, u_in).flatten(1), r_out)
    return u_in, torch.einsum("oi...,oa,ib->ab...", w, u_out, u_in), u_out


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: that mode's index in rows, the others (in order) in columns."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _mttkrp(t: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """``unfold(t, mode) @ khatri_rao(other factors)`` without forming the Khatri-Rao product:
    one einsum contracting the modes in turn, the first (largest) contraction a matmul."""
    modes = "abcdefgh"[:t.dim()]
    others = [m for m in range(t.dim()) if m != mode]
    subscripts = ",".join(f"{modes[m]}z" for m in others)
    return torch.einsum(f"{modes},{subscripts}->{modes[mode]}z", t, *(factors[m] for m in others))


def _start(t: torch.Tensor, mode: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """ALS start of one factor: the unfolding's leading singular vectors, then random columns."""
    u = _leading(_unfold(t, mode), rank)
    extra = torch.randn(t.shape[mode], rank - u.shape[1], generator=gen, dtype=t.dtype).to(t.device)
    return torch.cat([u, extra], dim=1)


def cp_als(t: torch.Tensor, rank: int, sweeps: int = CP_SWEEPS, tol: float = CP_TOL,
           seed: int = 0) -> list[torch.Tensor]:
    """Rank-``rank`` CP decomposition of ``t`` by alternating least squares.

    Each sweep solves every factor in turn exactly for the others fixed (Kolda & Bader, 2009,
    "Tensor Decompositions and Applications", Fig. 3.3); it stops after ``sweeps`` sweeps or
    when a sweep lowers the error by less than ``tol`` of itself (a fit on its way to exact
    keeps going). Deterministic for a given ``seed``.

    Returns:
        One ``t.shape[n] x rank`` factor per mode (float64), the terms' norms shared evenly
        between them, with ``t ~= sum_r outer(f_0[:, r], f_1[:, r], ...)``.
    """
    t = t.double()
    gen = torch.Generator().manual_seed(seed)
    factors = [_start(t, n, rank, gen) for n in range(t.dim())]
    norm2, previous = t.square().sum(), math.inf
    for _ in range(sweeps):
        for n in range(t.dim()):
            gram = _gram(factors, n)
            mttkrp = _mttkrp(t, factors, n)
            factors[n] = _solve(gram, mttkrp)
        # ||t - x||^2 = ||t||^2 - 2 <t, x> + ||x||^2, both from the last mode's products
        last = factors[-1]
        residual = norm2 - 2 * (mttkrp * last).sum() + (gram * (last.T @ last)).sum()
        error = math.sqrt(max(float(residual), 0.0) / max(float(norm2), 1e-300))
        if previous - error < tol * error:
            break
        previous = error
    return _balance(factors)


def cp_tensor(factors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_r outer(f_0[:, r], f_1[:, r], ...)``: the tensor that CP factors (as
    :func:`cp_als` returns them) stand for."""
    modes = "abcdefgh"[:len(factors)]
    return torch.einsum(",".join(f"{m}z" for m in modes) + f"->{modes}", *factors)


def _gram(factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """The Hadamard product of the Gram matrices of every factor but ``mode``'s."""
    others = [f.T @ f for m, f in enumerate(factors) if m != mode]
    return functools.reduce(torch.mul, others)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram^-1`` for a symmetric positive semi-definite ``gram``, with a tiny ridge:
    ``gram`` is singular when the rank exceeds the product of the other modes' sizes, and
    ``rhs`` then lies in its range, so the ridge gives the minimum-norm solution."""
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, rhs.T).T


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same terms with each term's norm spread evenly over its factors (better-conditioned
    factors for quantization and fine-tuning)."""
    norms = [f.norm(dim=0).clamp_min(1e-300) for f in factors]
    share = math.prod(norms) ** (1 / len(factors))
    return [f / n * share for f, n in zip(factors, norms, strict=True)]


def whitened_weights(w: torch.Tensor, gram: torch.Tensor, r: int) -> list[torch.Tensor]:
    """The two factors of rank ``r`` that keep most of ``w``'s outputs on the inputs whose
    Gram matrix is ``gram`` (SVD-LLM, Wang et al. 2024): with ``S`` the Cholesky factor of
    the (damped, :data:`WHITEN_DAMP`) Gram matrix, ``X^T X = S S^T``, the output error of a
    replacement ``W'`` is ``||(W - W') S||``, least for the truncated SVD of ``W S``,
    ``U_r Sigma_r V_r^T``: ``W' = U_r Sigma_r V_r^T S^-1``. The singular values are split
    evenly between the factors, as svd's are.

    Args:
        w: The weight ``(out, d)`` (a conv's flattened: ``d`` its unfolded patch).
        gram: ``X^T X`` of its input rows, ``d x d``.
        r: The kept rank.

    Returns:
        ``[inner, outer]``: ``r x d`` and ``out x r``, in ``w``'s dtype, ``w ~= outer @ inner``.
    """
    h = gram.double().clone()
    h.diagonal().add_(WHITEN_DAMP * h.diagonal().mean().clamp_min(1e-12))
    s = torch.linalg.cholesky(h)
    u, sigma, vh = torch.linalg.svd(w.flatten(1).double() @ s, full_matrices=False)
    root = sigma[:r].sqrt()
    inner = root[:, None] * torch.linalg.solve_triangular(s, vh[:r], upper=False, left=False)
    return [inner.to(w.dtype), (u[:, :r] * root).to(w.dtype)]


# --- the layers -------------------------------------------------------------------------------


def pointwise(layer: Conv, c_in: int, c_out: int, bias: bool = False) -> Conv:
    """A plain 1x1 conv of ``layer``'s kind and padding mode: a factor that does not carry the
    layer's kernel, so no padding that a subclass computes in its forward applies to it."""
    return cast(Conv, respecified(layer, c_in, c_out, 1, bias, keep_class=False))


def tucker_layers(layer: Conv, r_in: int, r_out: int) -> list[Conv]:
    """The Tucker-2 chain of ``layer`` (weights not set): 1x1 ``I -> r_in``, the core (of
    ``layer``'s own class, :func:`~autocompress.compress._convs.respecified`), 1x1
    ``r_out -> O`` with the bias."""
    core = respecified(layer, r_in, r_out, layer.kernel_size, False, stride=layer.stride,
                       padding=layer.padding, dilation=layer.dilation)
    return [pointwise(layer, layer.in_channels, r_in), cast(Conv, core),
            pointwise(layer, r_out, layer.out_channels, bias=layer.bias is not None)]


def _along(value: tuple[int, ...] | str, axis: int, neutral: int) -> tuple[int, ...] | str:
    """``value`` (a per-axis tuple) on ``axis`` only, ``neutral`` on the others; a padding
    string (``same``, ``valid``) applies per axis as it is."""
    if isinstance(value, str):
        return value
    return tuple(v if i == axis else neutral for i, v in enumerate(value))


def cp_layers(layer: Conv, rank: int) -> list[Conv]:
    """The CP chain of ``layer`` (weights not set): 1x1 ``I -> R``, one depthwise conv per
    spatial axis (of ``layer``'s own class, with its stride, padding and dilation on that
    axis), 1x1 ``R -> O`` with the bias."""
    axes = len(layer.kernel_size)
    depthwise = [
        cast(Conv, respecified(
            layer, rank, rank, _along(layer.kernel_size, axis, 1), False, groups=rank,
            stride=_along(layer.stride, axis, 1), padding=_along(layer.padding, axis, 0),
            dilation=_along(layer.dilation, axis, 1)))
        for axis in range(axes)
    ]
    return [pointwise(layer, layer.in_channels, rank), *depthwise,
            pointwise(layer, rank, layer.out_channels, bias=layer.bias is not None)]


def tucker_weights(w: torch.Tensor, r_in: int, r_out: int) -> list[torch.Tensor]:
    """The weights of :func:`tucker_layers`, in order."""
    u_in, core, u_out = tucker2(w, r_in, r_out)
    ones = (1,) * (w.dim() - 2)
    return [u_in.T.reshape(r_in, -1, *ones), core, u_out.reshape(*u_out.shape, *ones)]


def cp_weights(w: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """The weights of :func:`cp_layers`, in order."""
    out_f, in_f, *spatial = cp_als(w, rank)
    axes = len(spatial)
    ones = (1,) * axes

    def depthwise(axis: int, f: torch.Tensor) -> torch.Tensor:
        shape = [1] * axes
        shape[axis] = f.shape[0]
        return f.T.reshape(rank, 1, *shape)

    return [in_f.T.reshape(rank, -1, *ones),
            *(depthwise(axis, f) for axis, f in enumerate(spatial)),
            out_f.reshape(*out_f.shape, *ones)]
