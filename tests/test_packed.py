"""The packed format: bit packing, round trips on every model family, size vs size_bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autocompress
from autocompress.compress import apply
from autocompress.compress._bake import bake
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.deploy._packed import PackedFormatError, load_packed, pack_bits, save_packed, unpack_bits
from autocompress.measure import size_bytes, size_report
from autocompress.tasks.digits import DigitsCNN
from tests.models import MODELS, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_bits_round_trip(bits: int, data) -> None:
    values = np.array(data.draw(st.lists(st.integers(0, 2 ** bits - 1), max_size=70)), dtype=np.int64)
    buf = pack_bits(values, bits)
    assert len(buf) == -(-len(values) * bits // 8)  # ceil(n * b / 8), as size.py counts it
    np.testing.assert_array_equal(unpack_bits(buf, bits, len(values)), values)


def _plan(spec: ModelSpec) -> Plan:
    """Every method at once: channels removed, masks, 3-8 bit weights, low rank, int8 inputs."""
    return Plan({
        spec.first: LayerPlan(sparsity=0.5, structure="channel", bits=4, act_bits=8),
        spec.second: LayerPlan(sparsity=0.6, bits=3, rank=0.5),
        spec.output: LayerPlan(sparsity=0.3, bits=8),
    })


@pytest.mark.parametrize("spec", MODELS.values(), ids=list(MODELS))
@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "fp32"])
def test_round_trip_gives_the_same_outputs(spec: ModelSpec, compressed: bool, tmp_path: Path) -> None:
    model = spec.build()
    x = spec.example_inputs(8)
    if compressed:
        model = apply(model, _plan(spec), spec.example_inputs(4))
    info = save_packed(model, tmp_path / "m.acpk")
    loaded = load_packed(info.path)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), bake(model)(x), atol=1e-5, rtol=0)
    # The payload is exactly what size_bytes counts; the header is the architecture only.
    assert info.payload_bytes == size_bytes(model)
    assert info.file_bytes == info.payload_bytes + info.header_bytes == info.path.stat().st_size
    assert info.header_bytes < 1024


DIGITS_PLANS = {
    "int8": {name: {"bits": 8} for name in
             ("features.0", "features.3", "features.7", "classifier.1", "classifier.3")},
    "heavy": {  # the smallest model of the demo search's front (about 14 KiB)
        "features.0": {"sparsity": 0.65, "structure": "channel", "bits": 3, "rank": 0.5},
        "features.3": {"sparsity": 0.45, "structure": "channel", "bits": 8},
        "features.7": {"bits": 3, "rank": 0.25},
        "classifier.1": {"sparsity": 0.8, "structure": "channel", "bits": 5, "rank": 0.25},
        "classifier.3": {"sparsity": 0.2, "bits": 5}},
    "sparse": {"features.3": {"sparsity": 0.8}, "features.7": {"sparsity": 0.9, "bits": 4},
               "classifier.1": {"sparsity": 0.7, "bits": 6}},
    "fp16-bf16-pow2": {"features.0": {"bits": "fp16"}, "features.3": {"bits": 3, "scheme": "pow2"},
                       "features.7": {"sparsity": 0.5, "bits": 4, "scheme": "pow2"},
                       "classifier.1": {"sparsity": 0.8, "bits": "bf16"},
                       "classifier.3": {"bits": 6, "scheme": "pow2"}},
    # GPTQ (calibrated on the two example inputs) per channel and group-wise (version 6)
    "gptq-grouped": {"features.0": {"bits": 4, "quantizer": "gptq"},
                     "features.3": {"bits": 4, "quantizer": "gptq", "group_size": 32},
                     "features.7": {"sparsity": 0.5, "bits": 3, "quantizer": "gptq",
                                    "group_size": 64},
                     "classifier.1": {"bits": 4, "quantizer": "gptq", "group_size": 128,
                                      "rank": 0.25},
                     "classifier.3": {"bits": 4, "group_size": 128}},
    "awq": {"features.0": {"bits": 4, "quantizer": "awq"},
            "features.3": {"sparsity": 0.5, "bits": 3, "quantizer": "awq", "act_bits": 8},
            "features.7": {"bits": 4, "rank": 0.5, "quantizer": "awq"},
            "classifier.1": {"bits": 8, "quantizer": "awq", "act_bits": "dynamic"},
            "classifier.3": {"bits": 4, "quantizer": "awq"}},
}


@pytest.mark.parametrize("layers", DIGITS_PLANS.values(), ids=list(DIGITS_PLANS))
def test_packed_file_is_within_5_percent_of_size_bytes(layers: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = apply(DigitsCNN().eval(), Plan.from_dict({"version": 1, "layers": layers}), x)
    info = save_packed(model, tmp_path / "digits.acpk")
    reported = size_bytes(model)
    assert 12 * 1024 < reported < 100 * 1024
    assert abs(info.file_bytes / reported - 1) < 0.05, (info, reported)
    torch.testing.assert_close(load_packed(info.path)(x), bake(model)(x), atol=1e-5, rtol=0)


class _DirectTensors(nn.Module):
    """A forward that reads a parameter and a buffer directly (fx ``get_attr``) and uses
    torch functions and methods (cat, slicing, softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.scale = nn.Parameter(torch.tensor([1.5, -2.0, 0.5, 1.0]))
        self.register_buffer("shift", torch.tensor([0.1, 0.0, -0.3, 0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * self.scale + self.shift
        y = torch.cat([y[:, :2], torch.relu(y[:, 2:])], dim=1)
        return y.softmax(dim=-1)


def test_tensors_read_directly_by_the_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DirectTensors().eval()
    x = torch.randn(5, 6)
    loaded = load_packed(save_packed(model, tmp_path / "m.acpk").path)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)
    assert dict(loaded.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert "shift" in dict(loaded.named_buffers())


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on values: not traceable
            return self.fc(x)
        return -self.fc(x)


def _my_op(x: torch.Tensor) -> torch.Tensor:
    return x * 2


torch.fx.wrap("_my_op")


class _CustomFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _my_op(self.fc(x))


def test_unsupported_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PackedFormatError, match="cannot be traced"):
        save_packed(_Branchy(), tmp_path / "a.acpk")
    with pytest.raises(PackedFormatError, match="_my_op"):
        save_packed(_CustomFunction(), tmp_path / "b.acpk")
    hooked = MODELS["mlp"].build()
    hooked.net[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(PackedFormatError, match="hooks"):
        save_packed(hooked, tmp_path / "c.acpk")
    assert not list(tmp_path.iterdir())  # nothing written when refused


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    spec = MODELS["mlp"]
    model = apply(spec.build(), _plan(spec), spec.example_inputs(4))  # ends with scales
    path = save_packed(model, tmp_path / "m.acpk").path
    data = path.read_bytes()
    for name, content, match in (("magic", b"XXXX" + data[4:], "not a packed model"),
                                 ("version", data[:4] + b"\x09" + data[5:], "version 9"),
                                 ("short", data[:-10], "truncated"),
                                 ("header", data[:12] + data[40:], "damaged header"),
                                 ("long", data + b"\0", "left after")):
        bad = tmp_path / f"{name}.acpk"
        bad.write_bytes(content)
        with pytest.raises(PackedFormatError, match=match):
            load_packed(bad)


def test_load_packed_is_a_lazy_top_level_export(tmp_path: Path) -> None:
    path = save_packed(MODELS["conv2d"].build(), tmp_path / "m.acpk").path
    script = ("import sys, autocompress; assert 'torch' not in sys.modules; "
              f"m = autocompress.load_packed({str(path)!r}); "
              "import torch; print(tuple(m(torch.zeros(2, 1, 8, 8)).shape))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "(2, 4)"
    assert autocompress.load_packed is load_packed


# --- the delta (relative-index) layout ----------------------------------------------------------

def _header(data: bytes) -> dict:
    length = int.from_bytes(data[5:9], "little")
    return json.loads(zlib.decompress(data[9:9 + length]))


def _with_header(data: bytes, header: dict) -> bytes:
    length = int.from_bytes(data[5:9], "little")
    new = zlib.compress(json.dumps(header).encode())
    return data[:5] + len(new).to_bytes(4, "little") + new + data[9 + length:]


@pytest.mark.parametrize("knobs", [
    {"sparsity": 0.95},
    {"sparsity": 0.9, "bits": 4},
    {"sparsity": 0.95, "bits": 2},
    {"sparsity": 0.9, "bits": 4, "scheme": "pow2"},
    {"sparsity": 0.95, "bits": "fp16"},
    {"sparsity": 0.97, "bits": 8, "rank": 0.5},
], ids=["fp32", "4bit", "2bit", "pow2", "fp16", "rank-8bit"])
def test_very_sparse_weights_use_the_delta_layout_and_come_back_exactly(knobs: dict,
                                                                         tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    x = torch.randn(4, 300)
    new = apply(model, Plan({"0": LayerPlan(**knobs)}), x)
    delta = [r for r in size_report(new) if r.layout.kind == "delta"]
    assert delta and all(r.layout.width >= 1 for r in delta)
    info = save_packed(new, tmp_path / "m.acpk")
    data = info.path.read_bytes()
    assert data[4] == 3  # the delta layout: format version 3
    assert info.payload_bytes == size_bytes(new)
    loaded, baked = load_packed(info.path), bake(new)
    for key, value in baked.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded(x), baked(x), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4).map(lambda v: v == 0), min_size=1, max_size=400),
       st.sampled_from([2, 4, 8, 32]))
def test_any_zero_pattern_round_trips_in_the_smallest_layout(mask: list[bool], bits: int) -> None:
    torch.manual_seed(len(mask))
    weight = torch.where(torch.tensor(mask), torch.randn(len(mask)).abs() + 0.5, 0.0)
    model = nn.Sequential(nn.Linear(len(mask), 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight.view(1, -1))
    new = model if bits == 32 else apply(model, Plan({"0": LayerPlan(bits=bits)}),
                                         torch.randn(2, len(mask)))
    with tempfile.TemporaryDirectory() as tmp:
        info = save_packed(new, Path(tmp) / "m.acpk")
        assert info.payload_bytes == size_bytes(new)
        assert torch.equal(load_packed(info.path).state_dict()["0.weight"], bake(new)[0].weight)


def test_a_damaged_delta_index_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    new = apply(model, Plan({"0": LayerPlan(sparsity=0.95, bits=4)}), torch.randn(4, 300))
    data = save_packed(new, tmp_path / "m.acpk").path.read_bytes()
    header = _header(data)
    entry = next(e for e in header["tensors"] if isinstance(e[2], list))
    for layout, match in (([0, 5], "unknown tensor layout"), ([17, 5], "unknown tensor layout"),
                          ("delta", "unknown tensor layout"),
                          ([entry[2][0], entry[2][1] * 40], "truncated|runs past")):
        entry[2] = layout
        bad = tmp_path / "bad.acpk"
        bad.write_bytes(_with_header(data, header))
        with pytest.raises(PackedFormatError, match=match):
            load_packed(bad)
