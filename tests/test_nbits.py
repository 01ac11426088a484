"""Group-wise integer weights on ONNX Runtime's block-wise kernels (``onnxgraph/_nbits.py``).

A tiny MLP (Linear layers exported as ``Gemm``) and a tiny BERT (``MatMul`` + bias ``Add``,
three embedding ``Gather``s), 4- and 8-bit weights in groups of 32/64/128, rounded to nearest
or by GPTQ: exported, every Linear is one ``MatMulNBits`` (its bias folded in) and every
embedding one ``GatherBlockQuantized``; ONNX Runtime's outputs match the PyTorch compressed
model; the packed codes and scales in the graph are the stored ones (decoded back); the
graph stores the bytes the size model counts; ``contrib_ops=False`` writes standard
operators only; layers the kernels do not take keep the standard form.
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from autocompress._inputs import run, to_numpy_feed
from autocompress.compress import Calibration, apply, stored_weights
from autocompress.compress._plan import Plan
from autocompress.compress.formats import FORMATS
from autocompress.measure import size_report
from autocompress.onnxgraph import ACCURACY_LEVEL, export_onnx, pack_codes, unpack_codes
from tests.models import MLP
from tests.real_models import tokens

CONTRIB = "com.microsoft"
# MatMulNBits at accuracy_level 4 rounds each block of its input to int8. Measured here, the
# largest error over the cases below, as a fraction of the output's largest magnitude: the
# MLP 1.2e-2 (four layers' roundings add up on small random-init outputs), BERT 6.5e-4 (its
# LayerNorms renormalize; the normalized embeddings are off by 1.6e-4 at most). About 3x
# headroom. The standard-op form is exact up to float summation order.
KERNEL_TOL = {"mlp": 3e-2, "bert": 2e-3}
STANDARD_TOL = 1e-5


def _mlp() -> tuple[nn.Module, torch.Tensor, list[str], list[str]]:
    """Widths 128/256 (every group size divides them); 2-D input: Linear layers are Gemm."""
    torch.manual_seed(0)
    model = MLP(h1=256, h2=128, h3=128, inputs=128).eval()
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    return model, x, ["net.0", "net.2", "net.4", "net.6"], []


def _bert() -> tuple[nn.Module, Any, list[str], list[str]]:
    """Hidden 128, FFN 256: Linear layers are MatMul + Add, embeddings Gathers (the pooler is
    never run: left out)."""
    from transformers import BertConfig, BertModel

    from autocompress.tasks.minilm import SentenceEncoder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=32)
    model = SentenceEncoder(BertModel(config)).eval()
    names = [n for n, m in model.named_modules() if "pooler" not in n]
    return (model, tokens(batch=32, length=12, vocab=64, seed=3),
            [n for n in names if isinstance(model.get_submodule(n), nn.Linear)],
            [n for n in names if isinstance(model.get_submodule(n), nn.Embedding)])


MODELS = {"mlp": _mlp, "bert": _bert}


@cache
def _compressed(family: str, bits: int, group: int, quantizer: str
                ) -> tuple[nn.Module, Any, list[str], list[str]]:
    """The model with every Linear (``quantizer``) and embedding (round to nearest: the
    calibrated quantizers refuse embeddings) at ``bits`` in groups of ``group``."""
    model, x, linears, embeddings = MODELS[family]()
    layers = {n: {"bits": bits, "group_size": group, "quantizer": quantizer} for n in linears}
    layers |= {n: {"bits": bits, "group_size": group} for n in embeddings}
    plan = Plan.from_dict({"version": 1, "layers": layers})
    return apply(model, plan, x, calibration=Calibration((x,))), x, linears, embeddings


def _ort(path: Path, x: Any) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, to_numpy_feed(x))[0]


def _expected(model: nn.Module, x: Any) -> np.ndarray:
    with torch.no_grad():
        return run(model, x).numpy()


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _decoded(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """``(signed codes (rows, width), scales, zero point)`` a kernel node computes with."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, zero = attrs["bits"], 2 ** (attrs["bits"] - 1)
    if node.op_type == "MatMulNBits":
        packed, scales = inits[node.input[1]], inits[node.input[2]]
        assert packed.shape == (attrs["N"], scales.shape[1], attrs["block_size"] * bits // 8)
        codes = unpack_codes(packed, bits).reshape(attrs["N"], -1)[:, :attrs["K"]]
    else:
        packed, scales = inits[node.input[0]], inits[node.input[2]]
        assert (attrs["gather_axis"], attrs["quantize_axis"]) == (0, 1)
        codes = unpack_codes(packed, bits)
    assert len(node.input) < 4 or node.input[3] == ""  # no zero_points: the default 2**(bits-1)
    return codes - zero, scales, zero


CASES = [(b, g, q) for b in (4, 8) for g in (32, 64, 128) for q in ("rtn", "gptq")]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize(("bits", "group", "quantizer"), CASES,
                         ids=[f"int{b}-g{g}-{q}" for b, g, q in CASES])
def test_grouped_weights_run_on_the_block_wise_kernels(family: str, bits: int, group: int,
                                                       quantizer: str, tmp_path: Path) -> None:
    model, x, linears, embeddings = _compressed(family, bits, group, quantizer)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulNBits"] == len(linears) and ops["GatherBlockQuantized"] == len(embeddings)
    assert not ops["Gemm"] and (family == "bert" or not ops["MatMul"])  # BERT: attention's stay
    assert not [i for i in proto.graph.initializer if i.name.endswith("_codes")]  # no Cast/Mul form
    # Every bias (a Gemm's C, the Add after a MatMul) went into its MatMulNBits.
    biased = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6]
    assert len(biased) == len(linears)
    assert (CONTRIB, 1) in {(o.domain, o.version) for o in proto.opset_import}

    got, expected = _ort(path, x), _expected(model, x)
    assert _relative_error(got, expected) < KERNEL_TOL[family]

    stored, inits = stored_weights(model), _initializers(proto)
    kernels = [n for n in proto.graph.node if n.domain == CONTRIB]
    assert sorted(n.name.rpartition("/")[0] for n in kernels) == sorted(stored)
    rows = {r.name: r for r in size_report(model)}
    for node in kernels:
        name = node.name.rpartition("/")[0]
        codes, scales, zero = _decoded(node, inits)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"]) == (bits, group)
        assert np.array_equal(codes, stored[name].values.reshape(len(codes), -1))  # the codes
        assert np.array_equal(scales.ravel(), stored[name].scale)  # and scales, as stored
        if node.op_type == "MatMulNBits":
            assert attrs["accuracy_level"] == ACCURACY_LEVEL
        # The graph stores what the size model counts: packed codes and fp32 scales.
        graph_bytes = sum(inits[i].nbytes for i in node.input if i.endswith(("_nbits", "_blocks")))
        graph_bytes += scales.nbytes
        assert graph_bytes == rows[name].bytes


@pytest.mark.parametrize("family", MODELS)
def test_without_contrib_ops_the_graph_has_standard_operators_only(family: str,
                                                                    tmp_path: Path) -> None:
    model, x, linears, embeddings = _compressed(family, 4, 32, "rtn")
    path = export_onnx(model, x, tmp_path / "m.onnx", contrib_ops=False)
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    codes = [i for i in proto.graph.initializer if i.name.endswith("_codes")]
    assert len(codes) == len(linears) + len(embeddings)  # int8 codes + Cast/Mul/Reshape
    assert _relative_error(_ort(path, x), _expected(model, x)) < STANDARD_TOL


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
def test_bits_the_kernels_do_not_take_keep_the_standard_form(bits: int, tmp_path: Path) -> None:
    """MatMulNBits and GatherBlockQuantized take 2, 4 and 8 bits."""
    model, x, linears, _ = _compressed("mlp", bits, 32, "rtn")
    proto = onnx.load(str(export_onnx(model, x, tmp_path / "m.onnx")))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulNBits"] == (len(linears) if bits == 2 else 0)
    tol = KERNEL_TOL["mlp"] if bits == 2 else STANDARD_TOL
    assert _relative_error(_ort(tmp_path / "m.onnx", x), _expected(model, x)) < tol


class _Shared(nn.Module):
    """A conv (no kernel), then one Linear applied twice (its weight read by two MatMuls in
    the exported graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 8)
        self.fc = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        return self.fc(torch.relu(self.fc(h)))


def test_weights_read_by_other_nodes_keep_the_standard_form(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _Shared().eval(), torch.randn(4, 4, 15)
    plan = Plan.from_dict({"version": 1, "layers": {"conv": {"bits": 4, "group_size": 32},
                                                    "fc": {"bits": 4, "group_size": 32}}})
    new = apply(model, plan, x)
    path = export_onnx(new, x, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.domain == CONTRIB]
    assert len([i for i in proto.graph.initializer if i.name.endswith("_codes")]) == 2
    assert _relative_error(_ort(path, x), _expected(new, x)) < STANDARD_TOL


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_onnx_runtimes_and_round_trips(bits: int) -> None:
    codes = np.random.default_rng(0).integers(0, 2 ** bits, size=(3, 5, 32))
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 32 * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits), codes)
    if bits == 4:  # onnxruntime's own int4 packing: the first value in the low nibble
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

        ours = DefaultWeightOnlyQuantizer.pack_int8_to_int4(codes.astype(np.int8))
        assert np.array_equal(packed.ravel(), ours)


@pytest.mark.parametrize("name", FORMATS.names())
def test_a_block_wise_form_computes_the_stored_value(name: str) -> None:
    """Every format with :meth:`WeightFormat.blocks` (80 columns: the last group short)."""
    fmt = FORMATS.get(name)
    w = torch.randn(6, 80, generator=torch.Generator().manual_seed(0)) * 0.3
    stored = fmt.store(fmt.fake_quant(w))
    blocks = fmt.blocks(stored)
    if blocks is None:
        pytest.skip(f"{name}: not block-wise")
    assert blocks.codes.min() >= 0 and blocks.codes.max() < 2 ** blocks.bits
    assert np.all(blocks.codes.reshape(6, -1)[:, blocks.width:] == blocks.zero_point)  # padding = 0
    values = (blocks.codes - blocks.zero_point).astype(np.float32) * blocks.scales[:, :, None]
    assert np.array_equal(values.reshape(6, -1)[:, :blocks.width], stored.dequantized())
