"""Tucker-2 and CP decompositions of convolutions (``decomposition: tucker | cp``).

The shared behaviour (shapes after channel pruning, size formula, masks and quantization
through training, ONNX export) runs in ``test_compress.py``'s suite (``DECOMPOSITIONS``); here:
the decompositions themselves, refusals, hand-computed sizes and MACs, the plan and search
space, the packed format and rebuilding from logged weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.compress import LowRank, apply, bake, count_macs
from autocompress.compress._decompose import cp_als, cp_rank, tucker_ranks
from autocompress.compress._plan import LayerPlan, Plan, PlanError
from autocompress.compress._registry import describe_layers
from autocompress.compress.lowrank import factorize
from autocompress.config import load_search_space
from autocompress.deploy._packed import load_packed, save_packed
from autocompress.deploy._rebuild import load_baked_state
from autocompress.measure import count_params, size_bytes
from autocompress.onnxgraph import export_onnx
from tests import real_models
from tests.models import MODELS
from tests.real_models import Conv2dSame
from tests.test_compress import run_onnx, train_steps
from tests.test_size import reference_bytes

ROOT = Path(__file__).resolve().parents[1]

# (conv, one input): every way a conv can place its kernel, and a Conv1d.
CONVS = {
    "conv2d-stride2": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (8, 9, 9)),
    "conv2d-rect-dilated-reflect": (
        lambda: nn.Conv2d(6, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                          padding_mode="reflect"), (6, 11, 13)),
    "conv2d-same-no-bias": (lambda: nn.Conv2d(8, 8, 3, padding="same", bias=False), (8, 7, 7)),
    "conv1d-stride2": (lambda: nn.Conv1d(6, 10, 5, stride=2, padding=2), (6, 20)),
}


def build(case: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    make, shape = CONVS[case]
    torch.manual_seed(seed)
    return make(), torch.randn(2, *shape)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def with_cp_rank(conv: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """``conv`` with a kernel of CP rank ``rank`` (a sum of ``rank`` outer products)."""
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen) for n in conv.weight.shape]
    letters = "abcd"[:len(factors)]
    spec = ",".join(f"{c}r" for c in letters) + "->" + letters
    with torch.no_grad():
        conv.weight.copy_(torch.einsum(spec, *factors))
    return conv


# --- the decompositions -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CONVS))
def test_tucker_at_full_rank_reproduces_the_conv(case: str) -> None:
    conv, x = build(case)
    chain = factorize(conv, 1.0, "tucker")
    assert isinstance(chain, LowRank) and len(chain) == 3
    torch.testing.assert_close(chain(x), conv(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CONVS))
def test_cp_recovers_a_kernel_of_low_cp_rank(case: str) -> None:
    conv, x = build(case)
    with_cp_rank(conv, 4)
    fraction = next(f / 100 for f in range(1, 101) if cp_rank(conv.weight.shape, f / 100) == 4)
    chain = factorize(conv, fraction, "cp")
    assert len(chain) == conv.weight.dim()  # 1x1, one depthwise conv per kernel side, 1x1
    assert rel_error(chain(x), conv(x)) < 1e-4


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp"])
def test_error_falls_as_the_rank_grows(decomposition: str) -> None:
    conv, x = build("conv2d-stride2")
    errors = [rel_error(factorize(conv, f, decomposition)(x), conv(x)) for f in (0.25, 0.5, 1.0)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1  # CP at the generic rank fits a random kernel closely too


def test_cp_als_is_deterministic_and_balances_its_factors() -> None:
    w = torch.randn(12, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    a, b = cp_als(w, 10), cp_als(w, 10)
    for fa, fb in zip(a, b, strict=True):
        assert torch.equal(fa, fb)
    norms = torch.stack([f.norm(dim=0) for f in a])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))  # each term's norm spread evenly


def test_factor_layers_split_stride_padding_and_dilation_by_axis() -> None:
    conv, _ = build("conv2d-rect-dilated-reflect")  # 6 -> 12, 3x5, stride (2,1), dilation (1,2)
    tucker = factorize(conv, 0.5, "tucker", fit=False)
    assert [tuple(m.weight.shape) for m in tucker] == [(3, 6, 1, 1), (6, 3, 3, 5), (12, 6, 1, 1)]
    assert (tucker[1].stride, tucker[1].padding, tucker[1].dilation) == ((2, 1), (1, 2), (1, 2))
    cp = factorize(conv, 0.25, "cp", fit=False)
    r = cp_rank(conv.weight.shape, 0.25)  # ceil(1080 / (12 + 6 + 3 + 5 - 3)) = 47 -> 12
    assert r == 12
    assert [tuple(m.weight.shape) for m in cp] == [(r, 6, 1, 1), (r, 1, 3, 1), (r, 1, 1, 5),
                                                   (12, r, 1, 1)]
    vertical, horizontal = cp[1], cp[2]
    assert vertical.groups == horizontal.groups == r
    assert (vertical.stride, vertical.padding, vertical.dilation) == ((2, 1), (1, 0), (1, 1))
    assert (horizontal.stride, horizontal.padding, horizontal.dilation) == ((1, 1), (0, 2), (1, 2))
    assert {m.padding_mode for m in cp} == {"reflect"}
    assert cp[-1].bias is not None and all(m.bias is None for m in cp[:-1])


def test_ranks_are_fractions_of_each_full_rank() -> None:
    # Tucker: r_out = rank * min(O, I*k) (svd's r), r_in = rank * min(I, O*k), at least 1.
    assert tucker_ranks((16, 8, 3, 3), 1.0) == (8, 16)
    assert tucker_ranks((16, 8, 3, 3), 0.5) == (4, 8)
    assert tucker_ranks((16, 1, 3, 3), 0.1) == (1, 1)
    assert tucker_ranks((64, 3, 3, 3), 0.5) == (2, 14)  # r_out: min(64, 27) = 27
    # CP: rank * ceil(O*I*k / (O + I + sum of sides - N + 1)).
    assert cp_rank((16, 8, 3, 3), 1.0) == math.ceil(1152 / 27) == 43
    assert cp_rank((10, 6, 5), 0.5) == round(0.5 * math.ceil(300 / 19))


# --- the plan -----------------------------------------------------------------------------


def test_plan_token_json_and_defaults() -> None:
    lp = LayerPlan(rank=0.25, decomposition="tucker", bits=4)
    plan = Plan({"conv": lp, "fc": LayerPlan(rank=0.5), "other": LayerPlan(rank=0.25, decomposition="cp")})
    assert plan.summary() == "conv: b4 r0.25 tucker | fc: r0.50 | other: r0.25 cp"
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.flatten()["conv/decomposition"] == "tucker"
    # No rank, nothing to decompose: the entry is the identity.
    assert LayerPlan(decomposition="cp").is_identity
    # Plans written before the knob existed are svd.
    old = Plan.from_dict({"layers": {"fc": {"rank": 0.5}}})
    assert old.layers["fc"].decomposition == "svd"


@pytest.mark.parametrize("value", ["tt", "SVD", None, 1])
def test_unknown_decompositions_are_refused(value: object) -> None:
    allowed = r"allowed: one of \['svd', 'tucker', 'cp', 'whitened'\]"
    with pytest.raises(PlanError, match=rf"decomposition=.* {allowed}"):
        LayerPlan(rank=0.5, decomposition=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_a_decomposition_without_rank_changes_nothing(decomposition: str) -> None:
    spec = MODELS["conv2d"]
    m, x = spec.build(), spec.example_inputs()
    new = apply(m, Plan({spec.second: LayerPlan(decomposition=decomposition)}), x)
    assert torch.equal(new(x), m(x))
    assert size_bytes(new) == size_bytes(m)


# --- refusals -----------------------------------------------------------------------------


class Mixed(nn.Module):
    """A 3x3 conv, a 1x1 conv, a grouped conv, an embedding-free Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.point(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize(("layer", "refused", "why"), [
    ("point", "decomposition='{}'", "1x1 conv takes svd only"),
    ("grouped", "rank=0.5", "grouped conv"),  # no rank at all, whatever the decomposition
    ("head", "decomposition='{}'", "Linear layers take svd only"),
])
@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_layers_without_a_plain_spatial_kernel_refuse_tucker_and_cp(
        layer: str, refused: str, why: str, decomposition: str) -> None:
    model, x = Mixed(), torch.randn(2, 4, 6, 6)
    plan = Plan({layer: LayerPlan(rank=0.5, decomposition=decomposition)})
    with pytest.raises(PlanError, match=f"layer '{layer}': cannot take "
                                        f"{refused.format(decomposition)}.*{why}"):
        apply(model, plan, x)


def test_refusals_are_listed_and_leave_the_search_domain() -> None:
    model, x = Mixed(), torch.randn(2, 4, 6, 6)
    layers = describe_layers(model, x)
    refused = {la.name for la in layers if any(r.knob == "decomposition" for r in la.refusals)}
    assert refused == {"point", "grouped", "head"}
    resolved = load_search_space(ROOT / "search_spaces" / "full.yaml").resolve(layers)
    domains = {ls.name: ls.knobs["decomposition"].knob for ls in resolved.layers}
    assert domains["conv"].choices == ("svd", "whitened", "tucker", "cp")
    # Linear layers keep svd and whitened (calibrated SVD); a grouped conv has no input matrix
    assert domains["point"].choices == domains["head"].choices == ("svd", "whitened")
    assert domains["grouped"].value == "svd"


def test_embeddings_refuse_tucker_and_cp() -> None:
    with pytest.raises(PlanError, match="Embedding layers take svd"):
        factorize(nn.Embedding(10, 4), 0.5, "cp")


# --- size, MACs, combinations ---------------------------------------------------------------


def test_size_and_macs_match_a_hand_count() -> None:
    conv, x = build("conv2d-stride2")  # 8 -> 16, 3x3, stride 2: 9x9 in, 5x5 out
    model = nn.Sequential(conv)
    tucker = apply(model, Plan({"0": LayerPlan(rank=0.5, decomposition="tucker")}), x)
    # r_in 4, r_out 8: 1x1 4x8, core 8x4x3x3, 1x1 16x8, bias 16
    assert count_params(tucker)[0] == 32 + 288 + 128 + 16
    assert size_bytes(tucker) == 4 * (32 + 288 + 128 + 16)
    assert count_macs(tucker, x) == {"0.0": 81 * 4 * 8, "0.1": 25 * 8 * 4 * 9, "0.2": 25 * 16 * 8}
    cp = apply(model, Plan({"0": LayerPlan(rank=0.25, decomposition="cp")}), x)
    # R = round(0.25 * 43) = 11: 1x1 11x8, 3x1 and 1x3 depthwise 11x3 each, 1x1 16x11, bias 16
    assert count_params(cp)[0] == 88 + 33 + 33 + 176 + 16
    assert count_macs(cp, x) == {"0.0": 81 * 11 * 8, "0.1": 5 * 9 * 11 * 3, "0.2": 25 * 11 * 3,
                                 "0.3": 25 * 16 * 11}
    cp4 = apply(model, Plan({"0": LayerPlan(rank=0.25, decomposition="cp", bits=4)}), x)
    rows = {"0.0": (88, 11), "0.1": (33, 11), "0.2": (33, 11), "0.3": (176, 16)}
    assert all(cp4.get_submodule(leaf).weight.numel() == n for leaf, (n, _) in rows.items())
    expected = 4 * 16 + sum(reference_bytes(cp4.get_submodule(leaf).weight, 4, r)
                            for leaf, (n, r) in rows.items())
    assert size_bytes(cp4) == expected


@pytest.mark.parametrize("decomposition", ["tucker", "cp"])
def test_channel_pruning_and_4_bit_weights_act_on_every_factor(decomposition: str) -> None:
    spec = MODELS["conv2d"]
    m, x = spec.build(), spec.example_inputs()
    plan = Plan({spec.first: LayerPlan(rank=0.5, decomposition=decomposition, sparsity=0.5,
                                       structure="channel", bits=4)})
    new = apply(m, plan, x)
    chain = new.get_submodule(spec.first)
    assert chain[-1].out_channels == 4 and new.bn1.num_features == 4  # half of 8 channels
    assert new.conv2.in_channels == 4
    for factor in chain:
        w = factor.weight.detach()
        assert max(len(torch.unique(row)) for row in w.flatten(1)) <= 15  # 4-bit levels
    assert new(x).shape == m(x).shape


# --- deployment ---------------------------------------------------------------------------

PLANS = {
    "fp32": {"conv1": LayerPlan(rank=0.5, decomposition="cp"),
             "conv2": LayerPlan(rank=0.5, decomposition="tucker")},
    "w8a8+sparse": {"conv1": LayerPlan(rank=1.0, decomposition="cp", bits=8, act_bits=8),
                    "conv2": LayerPlan(rank=0.5, decomposition="tucker", sparsity=0.4, bits=4)},
}


@pytest.mark.parametrize(("name", "atol"), [("fp32", 1e-5), ("w8a8+sparse", 2e-3)])
def test_export_onnx_runs_on_onnxruntime_like_torch(name: str, atol: float, tmp_path: Path) -> None:
    """fp32 factors are plain convs; with 8-bit activations ONNX Runtime's QLinear kernels
    also round the tensors between the factors (as they do around any layer: ~4e-4 here for
    the same plan without factorization), hence the looser tolerance."""
    spec = MODELS["conv2d"]
    new = apply(spec.build(), Plan(PLANS[name]), spec.example_inputs())
    x = spec.example_inputs(8, seed=3)
    path = export_onnx(new, spec.example_inputs(), tmp_path / "model.onnx")
    with torch.no_grad():
        expected = new(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(PLANS))
def test_packed_round_trip(name: str, tmp_path: Path) -> None:
    spec = MODELS["conv2d"]
    new = apply(spec.build(), Plan(PLANS[name]), spec.example_inputs())
    info = save_packed(new, tmp_path / "m.acpk")
    loaded = load_packed(info.path)
    x = spec.example_inputs(8, seed=3)
    torch.testing.assert_close(loaded(x), bake(new)(x), atol=1e-5, rtol=0)
    assert info.payload_bytes == size_bytes(new)


@pytest.mark.parametrize("name", list(PLANS))
def test_applying_the_plan_again_rebuilds_the_architecture_of_the_logged_weights(name: str) -> None:
    spec = MODELS["conv2d"]
    baseline, x = spec.build(), spec.example_inputs()
    plan = Plan(PLANS[name])
    trial = apply(baseline, plan, x)
    train_steps(trial, x)
    state = bake(trial).state_dict()
    rebuilt = apply(baseline, plan, x)
    load_baked_state(rebuilt, state, plan)
    torch.testing.assert_close(rebuilt(x), trial(x), atol=1e-6, rtol=0)
    assert size_bytes(rebuilt) == size_bytes(trial)


# --- conv subclasses (timm's Conv2dSame, StdConv2d) -----------------------------------------

SUBCLASSED = {  # (conv, one input): TensorFlow's "same" padding uneven on at least one axis
    "same-3x3-stride2": (lambda: Conv2dSame(6, 10, 3, stride=2, name="a"), (6, 8, 7)),
    "same-3x4-stride(2,1)-dilated": (
        lambda: Conv2dSame(5, 9, (3, 4), stride=(2, 1), dilation=(1, 2), name="b"), (5, 10, 11)),
}


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp"])
@pytest.mark.parametrize("case", list(SUBCLASSED))
def test_a_conv_subclass_keeps_its_padding_in_every_decomposition(case: str,
                                                                   decomposition: str) -> None:
    make, shape = SUBCLASSED[case]
    torch.manual_seed(0)
    conv, x = make(), torch.randn(2, *shape)
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      padding="valid", dilation=conv.dilation)
    assert conv(x).shape != plain(x).shape  # its padding is its own forward's
    if decomposition == "cp":  # exact only for a kernel of low CP rank
        with_cp_rank(conv, 3)
    ranks = {"svd": 1.0, "tucker": 1.0,
             "cp": next(f / 100 for f in range(1, 101) if cp_rank(conv.weight.shape, f / 100) == 3)}
    chain = factorize(conv, ranks[decomposition], decomposition)
    spatial = [m for m in chain if math.prod(m.kernel_size) > 1]
    assert spatial and all(type(m) is Conv2dSame and m.name == conv.name for m in spatial)
    assert all(type(m) is nn.Conv2d for m in chain if m not in spatial)  # 1x1: plain
    assert rel_error(chain(x), conv(x)) < 1e-4


@pytest.mark.parametrize("decomposition", ["svd", "tucker", "cp"])
def test_low_rank_plans_apply_to_a_cnn_of_conv_subclasses(decomposition: str) -> None:
    """What a search's trial does: every low-rank value the layers do not refuse applies."""
    model, x = real_models.same_cnn()
    layers = {la.name: la for la in describe_layers(model, x)}
    for name in ("stem", "conv"):
        assert layers[name].cls == "Conv2dSame"
        assert not any(r.knob in ("rank", "decomposition") for r in layers[name].refusals)
    for fraction in (0.5, 1.0):
        plan = Plan({name: LayerPlan(rank=fraction, decomposition=decomposition)
                     for name in ("stem", "conv")})
        new = apply(model, plan, x)
        assert isinstance(new.stem, LowRank) and new(x).shape == model(x).shape
    if decomposition != "cp":  # the last, full-rank plan reproduces the model
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-4)


class FixedPadConv2d(nn.Conv2d):
    """Pads both axes by an amount its constructor fixed from its square kernel."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__(in_ch, out_ch, kernel_size)
        self.pad = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [self.pad] * 4))


def test_subclasses_whose_forward_factors_do_not_reproduce_refuse_once() -> None:
    """StdConv2d standardizes its weight: no factorization of it computes the same, so rank is
    refused (one reason for both layers, so the search prints it once). FixedPadConv2d's
    k x 1 and 1 x k CP factors would each pad both axes by k // 2, so it refuses cp only."""
    from autocompress.tune._driver import _limits_summary

    model = nn.Sequential(real_models.StdConv2d(3, 6, 3, padding=1), nn.ReLU(),
                          real_models.StdConv2d(6, 6, 3, padding=1), FixedPadConv2d(6, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    layers = {la.name: la for la in describe_layers(model, x)}
    for name in ("0", "2"):
        (rank,) = [r for r in layers[name].refusals if r.knob in ("rank", "decomposition")]
        assert rank.knob == "rank" and "StdConv2d computes its own forward" in rank.reason
    (cp,) = [r for r in layers["3"].refusals if r.knob in ("rank", "decomposition")]
    assert (cp.knob, cp.value) == ("decomposition", "cp") and "FixedPadConv2d" in cp.reason
    (line,) = [line for line in _limits_summary(list(layers.values())) if "StdConv2d" in line]
    assert line.startswith("never sampled: rank (") and line.endswith("on 2 layer(s): 0, 2")
    with pytest.raises(PlanError, match="layer '2': cannot take rank=0.5 .*StdConv2d"):
        apply(model, Plan({"2": LayerPlan(rank=0.5)}), x)
    with pytest.raises(PlanError, match="layer '3': cannot take decomposition='cp'"):
        apply(model, Plan({"3": LayerPlan(rank=0.5, decomposition="cp")}), x)
    new = apply(model, Plan({"3": LayerPlan(rank=1.0, decomposition="tucker")}), x)
    torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-4)
