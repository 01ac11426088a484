"""One suite over every compression method, alone and combined, on every model family.

Expectations are computed independently of the implementation: channel pruning must give the
same tensors as the same model family built narrower (``ModelSpec.width_of``), low-rank layers
hold ``r * (in * k + out)`` weights (SVD; Tucker-2 and CP: ``factor_leaves``), stored
bytes follow the formula in ``autocompress.measure.size`` (re-implemented here as
``ref_weight_bytes``), and weights hold the values of their format (``assert_in_format``: at most
``2**bits - 1`` levels per row, pow2 levels signed powers of two, fp16/bf16 representable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from autocompress.compress import apply, bake, list_methods
from autocompress.compress._plan import LayerPlan, Plan, PlanError
from autocompress.measure import count_params, size_bytes
from autocompress.onnxgraph import export_onnx
from tests.models import MODELS, ModelSpec
from tests.test_size import reference_bytes

ACT_QUANT_BYTES = 8  # fp32 scale + int32 zero point, see autocompress.measure.size


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One plan on one model family; ``layers`` maps a role (first/second/output) to knobs."""

    model: str
    method: str
    layers: dict[str, dict]

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    def plan(self) -> dict[str, LayerPlan]:
        roles = {"first": self.spec.first, "second": self.spec.second, "output": self.spec.output}
        return {roles.get(role, role): LayerPlan(**knobs) for role, knobs in self.layers.items()}


METHODS: dict[str, dict[str, dict]] = {
    "lowrank": {"second": {"rank": 0.25}},
    "prune-unstructured": {"second": {"sparsity": 0.5}},
    "prune-channel": {"first": {"sparsity": 0.5, "structure": "channel"}},
    # the second layer loses inputs to the first entry and outputs to its own
    "prune-channel-two-layers": {"first": {"sparsity": 0.5, "structure": "channel"},
                                 "second": {"sparsity": 0.25, "structure": "channel"}},
    "quantize-w4": {"second": {"bits": 4}},
    "quantize-w8-output": {"output": {"bits": 8}},
    "quantize-act8": {"second": {"bits": 8, "act_bits": 8}},
    # rank, channel and bits on one layer: the second low-rank factor loses channels, and both
    # factors are quantized.
    "rank+channel+bits-same-layer": {
        "first": {"rank": 0.5, "sparsity": 0.5, "structure": "channel", "bits": 8}},
    "rank+unstructured+bits+act-same-layer": {
        "second": {"rank": 0.5, "sparsity": 0.3, "bits": 3, "act_bits": 8}},
    # every method, each on a different layer
    "all-methods-different-layers": {
        "first": {"sparsity": 0.5, "structure": "channel"},
        "second": {"rank": 0.5, "bits": 8, "act_bits": 8},
        "output": {"sparsity": 0.5, "bits": 4},
    },
    # 16-bit float weights (no scales) and power-of-two levels (scheme pow2)
    "fp16": {"second": {"bits": "fp16"}},
    "bf16-output": {"output": {"bits": "bf16"}},
    "unstructured+bf16": {"second": {"sparsity": 0.6, "bits": "bf16"}},  # stored sparse
    "pow2-w4": {"second": {"bits": 4, "scheme": "pow2"}},
    "pow2-w6-output": {"output": {"bits": 6, "scheme": "pow2"}},  # exported as fp32 values
    "pow2-w3+act8": {"second": {"bits": 3, "scheme": "pow2", "act_bits": 8}},
    "rank+channel+fp16-same-layer": {
        "first": {"rank": 0.5, "sparsity": 0.5, "structure": "channel", "bits": "fp16"}},
    "rank+unstructured+pow2-same-layer": {
        "second": {"rank": 0.5, "sparsity": 0.3, "bits": 5, "scheme": "pow2"}},
}
# Couplings that only some families have.
EXTRA: dict[str, dict[str, dict[str, dict]]] = {
    "conv1d": {
        "prune-channel-before-flatten": {"conv2": {"sparsity": 0.5, "structure": "channel"}},
    },
    "residual": {
        # stem and conv_b feed one residual add: the group is cut once, at the ratio of the
        # first of them in the model, whatever the plan's order.
        "prune-channel-residual-coupled": {
            "stem": {"sparsity": 0.5, "structure": "channel"},
            "conv_b": {"sparsity": 0.25, "structure": "channel"},
        },
        "prune-channel-residual-coupled-plan-reversed": {
            "conv_b": {"sparsity": 0.25, "structure": "channel"},
            "stem": {"sparsity": 0.5, "structure": "channel"},
        },
        "prune-channel-concat-branch": {"branch2": {"sparsity": 0.5, "structure": "channel"}},
        "prune-channel-inside-block": {"conv_a": {"sparsity": 0.75, "structure": "channel"}},
    },
}
# Tucker-2 and CP decompose a conv's kernel (a Linear refuses them): the conv families only.
DECOMPOSITIONS: dict[str, dict[str, dict]] = {
    "tucker": {"second": {"rank": 0.5, "decomposition": "tucker"}},
    "cp": {"second": {"rank": 0.25, "decomposition": "cp"}},
    "tucker+channel+bits-same-layer": {"first": {"rank": 0.5, "decomposition": "tucker",
                                                 "sparsity": 0.5, "structure": "channel",
                                                 "bits": 4}},
    "cp+unstructured+bits+act-same-layer": {"second": {"rank": 0.5, "decomposition": "cp",
                                                       "sparsity": 0.3, "bits": 4, "act_bits": 8}},
    "tucker+pow2": {"second": {"rank": 0.5, "decomposition": "tucker", "bits": 4,
                               "scheme": "pow2"}},
    "cp+channel+bf16": {"first": {"rank": 0.5, "decomposition": "cp", "sparsity": 0.5,
                                  "structure": "channel", "bits": "bf16"}},
}
CASES = [Case(m, method, layers) for m in MODELS for method, layers in METHODS.items()]
CASES += [Case(m, method, layers) for m in ("conv1d", "conv2d", "residual")
          for method, layers in DECOMPOSITIONS.items()]
CASES += [Case(m, method, layers) for m, extra in EXTRA.items() for method, layers in extra.items()]
PARAMS = [pytest.param(c, id=f"{c.model}-{c.method}") for c in CASES]


# --- references -------------------------------------------------------------------------------


FLOATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def ref_weight_bytes(weight: torch.Tensor, bits: int | str, rows: int) -> int:
    """A stored weight at plan value ``bits``: integer levels with one scale per row, or
    16-bit floats (fp16/bf16) without scales (layouts: ``tests.test_size.reference_bytes``)."""
    return reference_bytes(weight, 16) if bits in FLOATS else reference_bytes(weight, bits, rows)


def kept_channels(out: int, sparsity: float) -> int:
    return out - min(round(sparsity * out), out - 1)


def factor_leaves(name: str, lp: LayerPlan, original: tuple[int, ...], out: int,
                  fan_in: int) -> list[tuple[str, int, int]]:
    """``(name, weights, rows)`` of each factor of a factorized layer, from the original
    weight's shape (ranks) and the layer's ``out`` channels and ``fan_in`` after pruning."""
    o, i, kernel = original[0], original[1], original[2:]
    k = math.prod(kernel)

    def kept(full: int) -> int:
        return max(1, round(lp.rank * full))

    if lp.decomposition == "tucker":  # 1x1, core, 1x1
        r_in, r_out = kept(min(i, o * k)), kept(min(o, i * k))
        shapes = [(r_in, fan_in // k), (r_out, r_in * k), (out, r_out)]
    elif lp.decomposition == "cp":  # 1x1, a depthwise conv per kernel side, 1x1
        r = kept(math.ceil(o * i * k / (o + i + sum(kernel) - len(original) + 1)))
        shapes = [(r, fan_in // k), *((r, side) for side in kernel), (out, r)]
    else:
        r = kept(min(o, i * k))
        shapes = [(r, fan_in), (out, r)]
    return [(f"{name}.{j}", rows * cols, rows) for j, (rows, cols) in enumerate(shapes)]


def narrow_model(spec: ModelSpec, plan: dict[str, LayerPlan]) -> nn.Module:
    """The family built with the widths channel pruning should leave.

    Coupled layers share a width keyword; the first of them in the model sets it.
    """
    base = spec.build()
    order = [name for name, _ in base.named_modules()]
    widths: dict[str, int] = {}
    for name in sorted(plan, key=order.index):
        lp = plan[name]
        if lp.structure == "channel" and lp.sparsity > 0:
            out = base.get_submodule(name).weight.shape[0]
            widths.setdefault(spec.width_of[name], kept_channels(out, lp.sparsity))
    return spec.build(**widths)


def expected_params_and_bytes(spec: ModelSpec, plan: dict[str, LayerPlan],
                              compressed: nn.Module) -> tuple[int, int]:
    """Params and stored bytes the compressed model should have, from the original's shapes.

    The nonzero count of a quantized weight is taken from ``compressed`` (rounding decides
    which values become zero); everything else follows from the shapes and the plan.
    """
    base = spec.build()
    narrow = narrow_model(spec, plan)
    params = sum(p.numel() for p in narrow.parameters())
    nbytes = 4 * sum(t.numel() for k, t in narrow.state_dict().items()
                     if not k.endswith("num_batches_tracked"))
    for bn, conv in spec.folds.items():  # stored folded into its conv (which has a bias)
        if conv in plan and plan[conv].bits in FLOATS:
            continue  # not into a 16-bit float weight: rescaled values would round again
        channels = narrow.get_submodule(bn).num_features
        params -= 2 * channels  # weight and bias
        nbytes -= 4 * 4 * channels  # and the running mean and variance
    for name, lp in plan.items():
        w = narrow.get_submodule(name).weight
        out, fan_in = w.shape[0], w[0].numel()
        leaves = [(name, out * fan_in, out)]
        if lp.rank is not None:
            original = tuple(base.get_submodule(name).weight.shape)
            leaves = factor_leaves(name, lp, original, out, fan_in)
        params += sum(numel for _, numel, _ in leaves) - out * fan_in
        nbytes -= 4 * out * fan_in
        for leaf, numel, rows in leaves:
            weight = compressed.get_submodule(leaf).weight
            if lp.bits is not None:
                nbytes += ref_weight_bytes(weight, lp.bits, rows)
            elif lp.sparsity > 0 and lp.structure == "unstructured":
                assert int(torch.count_nonzero(weight)) == numel - round(lp.sparsity * numel)
                nbytes += reference_bytes(weight, 32)
            else:
                nbytes += 4 * numel
        if lp.act_bits is not None:  # one range per weight-bearing module (both factors)
            nbytes += ACT_QUANT_BYTES * len(leaves)
    return params, nbytes


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def weight_leaves(model: nn.Module, name: str) -> list[nn.Module]:
    """The layer, or every factor of a low-rank layer."""
    mod = model.get_submodule(name)
    return list(mod) if isinstance(mod, nn.Sequential) else [mod]


def assert_in_format(w: torch.Tensor, lp: LayerPlan, where: str) -> None:
    """``w`` holds values of ``lp``'s format: fp16/bf16 representable; integer bits: at most
    ``2**bits - 1`` values per row; pow2: each row's magnitudes are 0 or its largest times
    ``2**-k``, ``k < 2**(bits-1) - 1``."""
    if lp.bits in FLOATS:
        assert torch.equal(w.to(FLOATS[lp.bits]).float(), w), f"{where}: not {lp.bits} values"
        return
    distinct = max(len(torch.unique(row)) for row in w.flatten(1))
    assert distinct <= 2**lp.bits - 1, f"{where}: {distinct} values at {lp.bits} bits"
    if lp.scheme == "pow2":
        mag = w.flatten(1).abs()
        ratio = mag / mag.amax(dim=1, keepdim=True).clamp_min(1e-30)
        mantissa, exponent = torch.frexp(ratio[ratio > 0])
        assert (mantissa == 0.5).all(), f"{where}: a level is not a power of two"
        assert (exponent - 1 > -(2 ** (lp.bits - 1) - 1)).all(), f"{where}: too small a level"


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """A few Adam steps towards random targets (large lr: every weight moves)."""
    targets = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), targets).backward()
        optimizer.step()
    model.eval()


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    """Runs the exported file as written: constant folding only.

    Higher ORT levels may rewrite DequantizeLinear(int8) + MatMul into MatMulNBits, which also
    quantizes the activations and changes the numbers; that choice belongs to the runtime.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


# --- the suite --------------------------------------------------------------------------------


@pytest.fixture(params=PARAMS)
def compressed(request) -> tuple[Case, nn.Module, nn.Module, torch.Tensor]:
    """``(case, original, compressed, example inputs)``."""
    case: Case = request.param
    model, x = case.spec.build(), case.spec.example_inputs()
    return case, model, apply(model, Plan(case.plan()), x), x


def test_input_model_is_untouched(compressed, tmp_path: Path) -> None:
    """Compressing, training, baking and exporting the copy leave the original as it was."""
    case, model, new, x = compressed
    train_steps(new, x)
    export_onnx(new, x, tmp_path / "model.onnx")
    fresh = case.spec.build()  # the same seed builds the same model
    assert_same_state(model, snapshot(fresh))
    assert torch.equal(model(x), fresh(x))
    for mod in model.modules():
        assert not parametrize.is_parametrized(mod) and not mod._forward_pre_hooks


def test_output_shape_unchanged(compressed) -> None:
    _, model, new, x = compressed
    with torch.no_grad():
        out = new(x)
    assert out.shape == model(x).shape
    assert torch.isfinite(out).all()


def test_params_and_size_match_the_formula(compressed) -> None:
    case, model, new, _ = compressed
    plan = case.plan()
    params, nbytes = expected_params_and_bytes(case.spec, plan, new)
    assert count_params(new)[0] == params
    assert size_bytes(new) == nbytes
    only_act = all(set(k) == {"act_bits"} for k in case.layers.values())
    if only_act:
        assert size_bytes(new) == size_bytes(model) + ACT_QUANT_BYTES
    else:
        assert size_bytes(new) < size_bytes(model)
        # a BatchNorm after an fp16/bf16 weight is not folded: its parameters are stored
        unfolded = {bn for bn, conv in case.spec.folds.items()
                    if conv in plan and plan[conv].bits in FLOATS}
        extra = sum(2 * new.get_submodule(bn).num_features for bn in unfolded)
        assert count_params(new)[1] <= count_params(model)[1] + extra


def test_channel_pruned_shapes_match_a_narrower_model(compressed) -> None:
    """Every layer not factorized has exactly the shapes of the family built narrower."""
    case, _, new, _ = compressed
    plan = case.plan()
    narrow = narrow_model(case.spec, plan)
    factorized = {n for n, lp in plan.items() if lp.rank is not None}
    for name, mod in narrow.named_modules():
        if name in factorized or not list(mod.parameters(recurse=False)):
            continue
        got = new.get_submodule(name)
        assert got.weight.shape == mod.weight.shape, name
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            assert got.running_mean.shape == mod.running_mean.shape, name


def test_unstructured_masks_and_quantization_survive_training(compressed) -> None:
    case, _, new, x = compressed
    plan = case.plan()
    masked = {}  # leaf -> the positions its mask zeroes: its smallest-magnitude weights
    for name, lp in plan.items():
        for leaf in weight_leaves(new, name):
            if lp.sparsity > 0 and lp.structure == "unstructured":
                dense = leaf.parametrizations.weight.original.detach()
                k = round(lp.sparsity * dense.numel())
                masked[leaf] = dense.abs().flatten().argsort()[:k]
                assert (leaf.weight.detach().flatten()[masked[leaf]] == 0).all()
    before = {leaf: leaf.weight.detach().clone() for leaf in masked}
    train_steps(new, x)
    baked = bake(new)
    for name, lp in plan.items():
        pairs = zip(weight_leaves(new, name), weight_leaves(baked, name), strict=True)
        for leaf, baked_leaf in pairs:
            w = leaf.weight.detach()
            assert torch.equal(baked_leaf.weight, w)
            if leaf in masked:
                assert (w.flatten()[masked[leaf]] == 0).all(), f"{name}: a masked weight moved"
                assert not torch.equal(w, before[leaf]), "training did not move the weights"
            if lp.bits is not None:
                assert_in_format(w, lp, name)


def test_onnx_export_matches_torch(compressed, tmp_path: Path) -> None:
    case, _, new, x = compressed
    path = export_onnx(new, x, tmp_path / "model.onnx")
    with torch.no_grad():
        expected = new(x).numpy()
    # With act_bits 8 the deployed graph also rounds the tensors between quantized layers to
    # 8 bits (calibrated ranges; see onnxgraph/_ort_quant.py), which the torch model does not.
    static = any(lp.act_bits == 8 for lp in case.plan().values())
    atol = 0.01 * float(np.abs(expected).max()) if static else 1e-4
    np.testing.assert_allclose(run_onnx(path, x), expected, atol=atol, rtol=0)
    graph = onnx.load(str(path)).graph
    plan = case.plan()

    def stored(dtype: int, suffix: str) -> int:
        return sum(i.data_type == dtype and i.name.endswith(suffix) for i in graph.initializer)

    def leaves_where(pred) -> int:
        return sum(len(weight_leaves(new, n)) for n, lp in plan.items() if pred(lp))

    # Integer levels that fit int8 (uniform; pow2 up to 4 bits) are int8 + DequantizeLinear;
    # pow2 over 4 bits stays fp32; fp16/bf16 are 16-bit initializers + Cast.
    assert stored(onnx.TensorProto.INT8, "_quantized") == leaves_where(
        lambda lp: isinstance(lp.bits, int) and (lp.scheme == "uniform" or lp.bits <= 4))
    assert stored(onnx.TensorProto.FLOAT16, "_fp16") == leaves_where(lambda lp: lp.bits == "fp16")
    assert stored(onnx.TensorProto.BFLOAT16, "_bf16") == leaves_where(lambda lp: lp.bits == "bf16")
    has_qdq = any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert has_qdq == any(lp.act_bits is not None for lp in plan.values())


# --- identity plans ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("plan", [
    pytest.param({}, id="empty"),
    pytest.param({"first": LayerPlan()}, id="defaults"),
    pytest.param({"first": LayerPlan(scheme="uniform", decomposition="cp")}, id="no-bits-no-rank"),
    pytest.param({"first": LayerPlan(structure="channel"), "output": LayerPlan()},
                 id="channel-at-zero-sparsity"),
])
def test_identity_plan_changes_nothing(model: str, plan: dict[str, LayerPlan]) -> None:
    spec = MODELS[model]
    m, x = spec.build(), spec.example_inputs()
    roles = {"first": spec.first, "output": spec.output}
    new = apply(m, Plan({roles[k]: v for k, v in plan.items()}), x)
    assert new is not m
    assert torch.equal(new(x), m(x))
    assert size_bytes(new) == size_bytes(m)
    assert count_params(new) == count_params(m)
    assert_same_state(new, snapshot(m))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("knobs", [{"bits": "fp16"}, {"bits": "bf16"}, {"bits": 4},
                                   {"bits": 3, "scheme": "pow2"}, {"bits": 6, "scheme": "pow2"}],
                         ids=["fp16", "bf16", "w4", "pow2-w3", "pow2-w6"])
def test_weights_already_in_the_format_are_kept_exactly(model: str, knobs: dict) -> None:
    """A model whose weights are already in the format comes back unchanged: rebuilding a
    trial re-applies its plan to the logged (already compressed) weights."""
    spec = MODELS[model]
    x = spec.example_inputs()
    plan = Plan({spec.first: LayerPlan(**knobs), spec.output: LayerPlan(**knobs)})
    once = bake(apply(spec.build(), plan, x))
    twice = apply(once, plan, x)
    assert torch.equal(twice(x), once(x))
    assert_same_state(bake(twice), snapshot(once))


# --- pruning details --------------------------------------------------------------------------


def _matching_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Index in ``old`` of each row of ``new`` (rows are unique in random weights)."""
    idx = []
    for row in new.flatten(1):
        hits = (old.flatten(1) == row).all(dim=1).nonzero().flatten().tolist()
        assert len(hits) == 1, "a kept channel is not an original channel"
        idx.append(hits[0])
    return idx


def test_channel_pruning_removes_the_matching_inputs_of_the_next_layer() -> None:
    spec = MODELS["conv2d"]
    m, x = spec.build(), spec.example_inputs()
    new = apply(m, Plan({"conv1": LayerPlan(sparsity=0.5, structure="channel")}), x)
    kept = _matching_rows(new.conv1.weight, m.conv1.weight)
    assert kept == sorted(kept) and len(kept) == 4
    assert torch.equal(new.conv1.bias, m.conv1.bias[kept])
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new.bn1, key), getattr(m.bn1, key)[kept]), key
    assert torch.equal(new.conv2.weight, m.conv2.weight[:, kept])


def test_channel_pruning_removes_the_smallest_channels() -> None:
    spec = MODELS["mlp"]
    m, x = spec.build(), spec.example_inputs()
    with torch.no_grad():  # make channels 0..7 of net.0 clearly the least important
        m.net[0].weight[:8] *= 1e-3
        m.net[0].bias[:8] *= 1e-3
        m.net[2].weight[:, :8] *= 1e-3
    new = apply(m, Plan({"net.0": LayerPlan(sparsity=0.25, structure="channel")}), x)
    assert _matching_rows(new.net[0].weight, m.net[0].weight) == list(range(8, 32))


def test_residual_coupled_layers_lose_the_same_channels() -> None:
    spec = MODELS["residual"]
    m, x = spec.build(), spec.example_inputs()
    plan = Plan({"conv_b": LayerPlan(sparsity=0.5, structure="channel"),
                 "branch2": LayerPlan(sparsity=0.5, structure="channel")})
    new = apply(m, plan, x)
    kept = _matching_rows(new.stem.weight, m.stem.weight)
    assert len(kept) == 4
    assert _matching_rows(new.conv_b.weight, m.conv_b.weight) == kept
    for bn, old in ((new.stem_bn, m.stem_bn), (new.bn_b, m.bn_b)):
        assert torch.equal(bn.weight, old.weight[kept])
        assert torch.equal(bn.running_mean, old.running_mean[kept])
    # every reader of the residual sum loses the same input channels
    assert torch.equal(new.conv_a.weight, m.conv_a.weight[:, kept])
    assert torch.equal(new.branch1.weight, m.branch1.weight[:, kept])
    b2 = _matching_rows(new.branch2.weight, m.branch2.weight[:, kept])
    assert len(b2) == 2
    # the head sees branch1's 4 channels, then branch2's kept ones (offset 4)
    assert torch.equal(new.head.weight, m.head.weight[:, [0, 1, 2, 3] + [4 + i for i in b2]])
    assert new(x).shape == (4, 4)


def test_plan_order_does_not_matter() -> None:
    spec = MODELS["residual"]
    m, x = spec.build(), spec.example_inputs()
    knobs = {"conv_b": LayerPlan(sparsity=0.25, structure="channel", bits=4),
             "stem": LayerPlan(sparsity=0.5, structure="channel"),
             "conv_a": LayerPlan(sparsity=0.5, structure="channel")}
    forward, backward = Plan(knobs), Plan(dict(reversed(knobs.items())))
    assert forward == backward and hash(forward) == hash(backward)
    a, b = apply(m, forward, x), apply(m, backward, x)
    assert_same_state(a, snapshot(b))


def test_channel_pruning_the_output_layer_is_refused() -> None:
    spec = MODELS["conv2d"]
    m, x = spec.build(), spec.example_inputs()
    with pytest.raises(PlanError, match="'head'.*output"):
        apply(m, Plan({"head": LayerPlan(sparsity=0.5, structure="channel")}), x)


def test_channel_pruning_a_factorized_output_layer_is_refused() -> None:
    spec = MODELS["mlp"]
    m, x = spec.build(), spec.example_inputs()
    with pytest.raises(PlanError, match="net.6"):
        apply(m, Plan({"net.6": LayerPlan(sparsity=0.5, structure="channel", rank=0.5)}), x)


@pytest.mark.parametrize("name", ["nope", "net.5", "net"])
def test_unknown_layer_names_the_valid_ones(name: str) -> None:
    spec = MODELS["mlp"]
    m, x = spec.build(), spec.example_inputs()
    with pytest.raises(PlanError) as err:
        apply(m, Plan({name: LayerPlan(bits=8)}), x)
    message = str(err.value)
    assert repr(name) in message
    for valid in ("net.0", "net.2", "net.4", "net.6"):
        assert repr(valid) in message


def test_methods_run_in_a_fixed_order_and_unknown_methods_fail() -> None:
    assert list_methods() == ["lowrank", "prune", "quantize"]
    spec = MODELS["mlp"]
    with pytest.raises(PlanError, match="unknown compression method 'distill'"):
        apply(spec.build(), Plan(), spec.example_inputs(), methods=["distill"])


@pytest.mark.parametrize("model", list(MODELS))
def test_full_rank_factorization_reproduces_the_layer(model: str) -> None:
    spec = MODELS[model]
    m, x = spec.build(), spec.example_inputs()
    new = apply(m, Plan({spec.first: LayerPlan(rank=1.0), spec.second: LayerPlan(rank=1.0)}), x)
    assert isinstance(new.get_submodule(spec.first), nn.Sequential)
    torch.testing.assert_close(new(x), m(x), atol=1e-5, rtol=1e-4)


def test_low_rank_of_a_grouped_conv_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 16, 2))
    with pytest.raises(PlanError, match="layer '0': .*grouped"):
        apply(model, Plan({"0": LayerPlan(rank=0.5)}), torch.randn(2, 4, 6, 6))


# --- the mask rule: pruning's, re-applied by regrowth ----------------------------------------


def test_regrowth_reapplies_the_magnitude_rule_of_unstructured_pruning() -> None:
    from autocompress.compress._modules import Regrowth, weight_compression
    from autocompress.compress.prune import magnitude_mask, mask_smallest

    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    mask_smallest(layer, 0.5)
    wc = weight_compression(layer)
    original = layer.parametrizations.weight.original
    assert torch.equal(wc.mask, magnitude_mask(original.detach(), 12))
    with torch.no_grad():
        original[~wc.mask] *= 100  # the pruned grow large: regrowth brings them back
    with Regrowth(layer) as regrowth:
        regrowth.refresh()
    assert int(wc.mask.sum()) == 12
    assert torch.equal(wc.mask, magnitude_mask(original.detach(), 12))


def test_regrowth_keeps_the_pattern_of_the_rule_that_made_the_mask() -> None:
    """A pruning method with its own pattern (as 2:4 pruning does) names its rule on the
    weight; regrowth re-applies that rule, not magnitude's."""
    from autocompress.compress._modules import Regrowth, weight_compression
    from autocompress.compress.prune import MASK_RULES

    def first_of_each_row(w: torch.Tensor, pruned: int) -> torch.Tensor:
        mask = torch.ones_like(w, dtype=torch.bool)
        mask[:, : pruned // len(w)] = False
        return mask

    MASK_RULES.register("test-first-columns", first_of_each_row)
    try:
        layer = nn.Linear(6, 4)
        wc = weight_compression(layer)
        wc.mask.copy_(first_of_each_row(layer.weight.detach(), 8))
        wc.mask_rule = "test-first-columns"
        with torch.no_grad():
            layer.parametrizations.weight.original[:, :2] = 100.0  # magnitude would keep them
        with Regrowth(layer) as regrowth:
            regrowth.refresh()
        assert not wc.mask[:, :2].any() and wc.mask[:, 2:].all()
    finally:
        MASK_RULES.unregister("test-first-columns")
