"""fp16 / bf16 weights (``bits: fp16 | bf16``) and power-of-two levels (``scheme: pow2``).

The shared behaviour (shapes, the size formula, formats kept through training, ONNX export,
alone and with sparsity, channel pruning, rank and decompositions) runs in
``test_compress.py``'s suite (``METHODS``, ``DECOMPOSITIONS``); hand-computed sizes are in
``test_size.py``, the search-space errors in ``test_space.py``. Here: the formats
themselves, the plan and its refusals, the ONNX graph, the packed format and rebuilding a
trial from MLflow.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autocompress.compress import apply, bake
from autocompress.compress._fold import find_folds, fold_into
from autocompress.compress._knobs import reconcile
from autocompress.compress._modules import WeightCompression
from autocompress.compress._plan import LayerPlan, Plan, PlanError
from autocompress.compress.formats import (
    compressed_value,
    float_bytes,
    float_from_bytes,
    pow2_codes,
    pow2_from_codes,
    quantize_weight,
    round_to_float,
)
from autocompress.deploy._packed import PackedFormatError, load_packed, save_packed
from autocompress.measure import size_bytes
from autocompress.onnxgraph import export_onnx
from tests.models import MODELS
from tests.test_compress import run_onnx, train_steps

FLOATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.3


# --- pow2 levels ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(3, 6), rows=st.integers(1, 6), cols=st.integers(1, 40),
       seed=st.integers(0, 2**16), zero_row=st.booleans())
def test_pow2_levels_are_zero_and_signed_powers_of_two_of_the_best_candidate_scale(
        bits: int, rows: int, cols: int, seed: int, zero_row: bool) -> None:
    w = weights(rows, cols, seed)
    if zero_row:
        w[0] = 0
    q, scale = quantize_weight(w, bits, "pow2")
    levels = 2 ** (bits - 1) - 1
    top = 2 ** (levels - 1)
    # integers 0 or +-2**e, e = 0..levels-1: scale * q = s * 2**-k with s = scale * top
    mag = q.abs()[q != 0]
    mantissa, exponent = torch.frexp(mag)
    assert (mantissa == 0.5).all() and (exponent >= 1).all() and (mag <= top).all()
    s = (scale * top).flatten()
    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    candidates = [amax * 2.0 ** (-j / 4) for j in range(4)]
    assert all(any(torch.equal(s[r], c[r]) for c in candidates) for r in range(rows))
    # each weight at the level nearest in value, for the chosen scale (brute force)
    grid = torch.tensor([0.0] + [2.0 ** -k for k in range(levels)])
    for r in range(rows):
        signed = torch.cat([grid, -grid[1:]]) * s[r]
        nearest = signed[(w[r, :, None] - signed).abs().argmin(dim=1)]
        torch.testing.assert_close(q[r] * scale[r], nearest, atol=1e-7, rtol=1e-6)
    # and that scale is the best of the candidates
    error = ((q * scale - w) ** 2).sum(dim=1)
    for c in candidates:
        a = (w.abs() / c[:, None])
        best = (grid[None, None] - a[..., None]).abs().argmin(dim=2)
        other = ((grid[best] * c[:, None] - w.abs()) ** 2).sum(dim=1)
        assert (error <= other * (1 + 1e-5) + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(["fp16", "bf16", ("pow2", 3), ("pow2", 4), ("pow2", 6), ("uniform", 4)]),
       rows=st.integers(1, 5), cols=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_compressing_compressed_values_again_changes_nothing(fmt, rows: int, cols: int,
                                                            seed: int) -> None:
    """What rebuilding a trial from its logged weights relies on."""
    w = weights(rows, cols, seed)
    bits, scheme = (fmt, "uniform") if isinstance(fmt, str) else (fmt[1], fmt[0])
    once = compressed_value(w, bits, scheme)
    assert torch.equal(compressed_value(once, bits, scheme), once)
    if not isinstance(fmt, str):
        q, scale = quantize_weight(w, bits, scheme)
        q2, scale2 = quantize_weight(once, bits, scheme)
        assert torch.equal(q2, q) and torch.equal(scale2, scale)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(3, 6), data=st.data())
def test_pow2_codes_round_trip_in_bits(bits: int, data) -> None:
    levels = 2 ** (bits - 1) - 1
    values = [0] + [sign * 2**e for e in range(levels) for sign in (1, -1)]
    q = np.array(data.draw(st.lists(st.sampled_from(values), max_size=50)), np.int64)
    codes = pow2_codes(q, bits)
    assert ((codes >= 0) & (codes < 2**bits)).all()
    np.testing.assert_array_equal(pow2_from_codes(codes, bits), q)
    assert len(set(pow2_codes(np.array(values), bits).tolist())) == 2**bits - 1


def test_pow2_beats_uniform_only_at_few_bits() -> None:
    """On Gaussian weights the calibrated pow2 levels lose less than uniform at 3 bits and
    more at 4 (doubling steps are too coarse at the top): the reason it is a knob."""
    w = weights(64, 256, 0)

    def mse(bits: int, scheme: str) -> float:
        return float(((compressed_value(w, bits, scheme) - w) ** 2).mean())

    assert mse(3, "pow2") < mse(3, "uniform")
    assert mse(4, "pow2") > mse(4, "uniform")


# --- fp16 / bf16 ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_16_bit_floats_round_to_nearest_and_come_back_exactly(fmt: str) -> None:
    w = weights(8, 50, 1)
    rounded = round_to_float(w, fmt)
    assert torch.equal(rounded, w.to(FLOATS[fmt]).float())
    assert (rounded - w).abs().max() <= w.abs().max() * (2**-11 if fmt == "fp16" else 2**-8)
    np.testing.assert_array_equal(float_from_bytes(float_bytes(rounded.numpy(), fmt), fmt),
                                  rounded.numpy().ravel())
    assert len(float_bytes(rounded.numpy(), fmt)) == 2 * rounded.numel()


def test_fp16_saturates_instead_of_overflowing() -> None:
    out = round_to_float(torch.tensor([1e6, -7e4, 1.0]), "fp16")
    assert out.tolist() == [65504.0, -65504.0, 1.0]


@pytest.mark.parametrize(("bits", "scheme"), [("fp16", "uniform"), ("bf16", "uniform"), (4, "pow2")])
def test_fake_quant_forward_is_the_stored_value_and_the_gradient_passes_straight(
        bits: int | str, scheme: str) -> None:
    w = weights(6, 10, 2).requires_grad_()
    wc = WeightCompression(w.shape, bits, scheme)
    wc.mask[0, 0] = False
    out = wc(w)
    expected = compressed_value(w.detach() * wc.mask, bits, scheme)
    assert torch.equal(out.detach(), expected)
    g = torch.randn_like(w)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g * wc.mask)


# --- the plan ---------------------------------------------------------------------------------


def test_plan_tokens_json_and_defaults() -> None:
    plan = Plan({"a": LayerPlan(bits="fp16"), "b": LayerPlan(sparsity=0.5, bits=4, scheme="pow2"),
                 "c": LayerPlan(bits="bf16", rank=0.25), "d": LayerPlan(bits=4, scheme="pow2",
                                                                        act_bits=8)})
    assert plan.summary() == "a: fp16 | b: s0.50 b4 pow2 | c: bf16 r0.25 | d: b4 pow2 a8"
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["layers"]["a"]["bits"] == "fp16"
    assert plan.flatten()["b/scheme"] == "pow2"
    # Plans written before the knob existed are uniform.
    old = Plan.from_dict({"layers": {"fc": {"bits": 4}}})
    assert old.layers["fc"].scheme == "uniform"
    assert LayerPlan(scheme="uniform").is_identity


REFUSED = [
    ({"scheme": "pow2"}, r"scheme='pow2' needs integer bits in 3..6 .*got bits=None",
     {"scheme": "uniform"}),
    ({"scheme": "pow2", "bits": 2}, r"in 3..6 .*got bits=2", {"scheme": "uniform"}),
    ({"scheme": "pow2", "bits": 8}, r"in 3..6 .*got bits=8", {"scheme": "uniform"}),
    ({"scheme": "pow2", "bits": "fp16"}, r"in 3..6 .*got bits='fp16'", {"scheme": "uniform"}),
    ({"bits": "fp16", "act_bits": 8}, r"act_bits=8 needs integer weights .*got bits='fp16'",
     {"act_bits": None}),
    ({"bits": "bf16", "act_bits": "dynamic"}, r"act_bits='dynamic' needs bits=8 .*got bits='bf16'",
     {"act_bits": None}),
    ({"bits": 5, "scheme": "pow2", "act_bits": 8}, r"pow2' needs bits <= 4: .*got bits=5",
     {"act_bits": None}),
]


@pytest.mark.parametrize(("knobs", "message", "fallback"), REFUSED,
                         ids=[str(k) for k, _, _ in REFUSED])
def test_combinations_are_refused_and_a_search_falls_back(knobs: dict, message: str,
                                                          fallback: dict) -> None:
    with pytest.raises(PlanError, match=f"layer 'fc': .*{message}"):
        Plan({"fc": LayerPlan(**knobs)})
    reconciled = LayerPlan(**reconcile(knobs))
    reconciled.check_combination()
    assert reconciled == LayerPlan(**{**knobs, **fallback})


@pytest.mark.parametrize("bits", [3, 4])
def test_pow2_with_8_bit_activations_up_to_4_bits(bits: int, tmp_path: Path) -> None:
    """pow2 integers fit int8 up to 4 bits (64), so the layer runs on QLinear kernels."""
    spec = MODELS["conv2d"]
    lp = LayerPlan(bits=bits, scheme="pow2", act_bits=8)
    lp.check_combination()
    new = apply(spec.build(), Plan({spec.second: lp}), spec.example_inputs())
    path = export_onnx(new, spec.example_inputs(), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" in ops
    x = spec.example_inputs(8, seed=3)
    with torch.no_grad():
        expected = new(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x), expected, atol=0.01 * np.abs(expected).max())


# --- ONNX -------------------------------------------------------------------------------------


def _initializers(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    from onnx import numpy_helper

    return {i.name: (i.data_type, numpy_helper.to_array(i)) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_16_bit_weights_are_exported_as_16_bit_initializers_cast_to_float(fmt: str,
                                                                          tmp_path: Path) -> None:
    """conv2d's convs are followed by BatchNorm, which the exporter folds into them: the
    stored values stay the trained ones, a Mul applies the fold; the Linear head has none."""
    spec = MODELS["conv2d"]
    plan = Plan({name: LayerPlan(bits=fmt) for name in ("conv1", "conv2", "head")})
    new = apply(spec.build(), plan, spec.example_inputs())
    train_steps(new, spec.example_inputs())
    path = export_onnx(new, spec.example_inputs(), tmp_path / "m.onnx")
    dtype = onnx.TensorProto.FLOAT16 if fmt == "fp16" else onnx.TensorProto.BFLOAT16
    halves = {k: v for k, (t, v) in _initializers(path).items() if t == dtype}
    assert len(halves) == 3
    trained = {bake(new).get_parameter(f"{n}.weight").numpy().astype(np.float32).tobytes()
               for n in ("conv1", "conv2", "head")}
    stored = {np.asarray(v, np.float32).tobytes() for v in halves.values()}
    assert stored == trained
    nodes = onnx.load(str(path)).graph.node
    assert sum(n.op_type == "Cast" for n in nodes) == 3
    assert sum(n.op_type == "Mul" and n.name.endswith("_fold") for n in nodes) == 2  # BN-folded
    x = spec.example_inputs(16, seed=4)
    with torch.no_grad():
        expected = new(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # all optimizations
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-5, rtol=0)
    fp32 = export_onnx(spec.build(), spec.example_inputs(), tmp_path / "fp32.onnx")
    assert path.stat().st_size < fp32.stat().st_size


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
def test_pow2_weights_are_int8_up_to_4_bits_and_exact_fp32_above(bits: int, tmp_path: Path) -> None:
    spec = MODELS["mlp"]  # no BatchNorm: the stored initializer is the weight itself
    new = apply(spec.build(), Plan({"net.2": LayerPlan(bits=bits, scheme="pow2")}),
                spec.example_inputs())
    path = export_onnx(new, spec.example_inputs(), tmp_path / "m.onnx")
    inits = _initializers(path)
    int8 = [v for k, (t, v) in inits.items() if t == onnx.TensorProto.INT8 and k.endswith("_quantized")]
    weight = bake(new).net[2].weight.numpy()
    if bits <= 4:
        (q,) = int8
        mag = np.abs(q[q != 0]).astype(np.int64)
        assert (mag & (mag - 1) == 0).all() and mag.max() <= 2 ** (2 ** (bits - 1) - 2)
    else:
        assert not int8
        assert any(np.array_equal(v, weight) or np.array_equal(v, weight.T)
                   for _, (t, v) in inits.items() if t == onnx.TensorProto.FLOAT)
    x = spec.example_inputs(8, seed=5)
    with torch.no_grad():
        expected = new(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x), expected, atol=1e-5, rtol=0)


# --- packed -----------------------------------------------------------------------------------


PACKED = {
    "fp16+bf16": {"first": {"bits": "fp16"}, "second": {"bits": "bf16", "sparsity": 0.6},
                  "output": {"bits": "fp16", "sparsity": 0.3}},
    "pow2": {"first": {"bits": 3, "scheme": "pow2", "sparsity": 0.5, "structure": "channel"},
             "second": {"bits": 6, "scheme": "pow2", "rank": 0.5, "sparsity": 0.6},
             "output": {"bits": 4, "scheme": "pow2", "act_bits": 8}},
}


def _packed_plan(spec, layers: dict) -> Plan:
    roles = {"first": spec.first, "second": spec.second, "output": spec.output}
    return Plan({roles[k]: LayerPlan(**v) for k, v in layers.items()})


@pytest.mark.parametrize("name", list(PACKED))
@pytest.mark.parametrize("model", list(MODELS))
def test_packed_round_trip_is_exact(model: str, name: str, tmp_path: Path) -> None:
    spec = MODELS[model]
    new = apply(spec.build(), _packed_plan(spec, PACKED[name]), spec.example_inputs(4))
    train_steps(new, spec.example_inputs(4))
    info = save_packed(new, tmp_path / "m.acpk")
    assert info.path.read_bytes()[4] == 2  # new encodings: format version 2
    assert info.payload_bytes == size_bytes(new)
    loaded = load_packed(info.path)
    folds = find_folds(new)
    baked = bake(new)
    fold_into(baked, folds)  # a BatchNorm after a conv is stored folded into it
    rescaled = {f"{f.conv}.weight" for f in folds}  # codes x (scale x f), not (codes x scale) x f
    for key, value in loaded.state_dict().items():
        if key in rescaled:
            torch.testing.assert_close(value, baked.state_dict()[key], rtol=1e-6, atol=1e-7)
        elif key in baked.state_dict() and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, baked.state_dict()[key]), key
    x = spec.example_inputs(8)
    torch.testing.assert_close(loaded(x), baked(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded(x), bake(new)(x), atol=1e-5, rtol=0)


def test_files_without_new_encodings_stay_format_version_1(tmp_path: Path) -> None:
    """Readers of earlier releases read them: version 1, integer encodings only (the payload
    code of fp32 and uniform tensors is unchanged)."""
    spec = MODELS["conv2d"]
    new = apply(spec.build(), Plan({spec.first: LayerPlan(bits=4, sparsity=0.5)}), spec.example_inputs())
    path = save_packed(new, tmp_path / "m.acpk").path
    data = path.read_bytes()
    assert data[4] == 1
    header = json.loads(zlib.decompress(data[9:9 + int.from_bytes(data[5:9], "little")]))
    assert {type(entry[1]) for entry in header["tensors"]} == {int}
    torch.testing.assert_close(load_packed(path)(spec.example_inputs()), bake(new)(spec.example_inputs()))


def test_an_unknown_encoding_is_refused(tmp_path: Path) -> None:
    spec = MODELS["mlp"]
    new = apply(spec.build(), Plan({spec.first: LayerPlan(bits="fp16")}), spec.example_inputs())
    data = save_packed(new, tmp_path / "m.acpk").path.read_bytes()
    length = int.from_bytes(data[5:9], "little")
    header = json.loads(zlib.decompress(data[9:9 + length]))
    header["tensors"][0][1] = "fp4"
    new_header = zlib.compress(json.dumps(header).encode())
    bad = tmp_path / "bad.acpk"
    bad.write_bytes(data[:5] + len(new_header).to_bytes(4, "little") + new_header + data[9 + length:])
    with pytest.raises(PackedFormatError, match="unknown tensor encoding 'fp4'"):
        load_packed(bad)


# --- rebuilding a trial from MLflow -------------------------------------------------------------


def test_a_trial_is_rebuilt_from_mlflow(tmp_path: Path) -> None:
    """A trial logged as the search logs it (plan.json, model.pt of the baked weights) comes
    back with the same outputs and size_bytes."""
    from autocompress.deploy._rebuild import rebuild_from_run
    from autocompress.tasks import load_task
    from autocompress.tracking._writer import SearchTracker

    task = load_task("tests.models:tiny_task")
    plan = Plan({"net.0": LayerPlan(bits="fp16", sparsity=0.3),
                 "net.2": LayerPlan(bits=4, scheme="pow2", act_bits=8),
                 "net.4": LayerPlan(bits="bf16", rank=0.5),
                 "net.6": LayerPlan(bits=5, scheme="pow2", sparsity=0.4)})
    trial = apply(task.model, plan, task.example_inputs)
    train_steps(trial, task.example_inputs)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SearchTracker.start(uri, "formats", {"task": "tests.models:tiny_task"},
                                  {"accuracy": 1.0}, [("accuracy", "max")], echo=lambda _: None)
    tracker.trial_started("t0", {})
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "plan.json").write_text(plan.to_json(indent=2))
    weights = io.BytesIO()
    torch.save(bake(trial).state_dict(), weights)
    (artifacts / "model.pt").write_bytes(weights.getvalue())
    tracker.trial_finished("t0", {"accuracy": 1.0}, plan.summary(), artifacts)
    tracker.finish()

    rebuilt = rebuild_from_run(tracker.trials["t0"].run_id, uri)
    x = task.example_inputs
    assert rebuilt.plan == plan
    torch.testing.assert_close(rebuilt.model(x), trial(x), atol=0, rtol=0)
    assert size_bytes(rebuilt.model) == size_bytes(trial)
    for mod, ref in zip(bake(rebuilt.model).modules(), bake(trial).modules(), strict=True):
        if isinstance(mod, nn.Linear):
            assert torch.equal(mod.weight, ref.weight)
