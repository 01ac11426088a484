"""``nn.MultiheadAttention.out_proj``: a layer that its attention uses through a functional
call, discovered as running and compressed for real (quantized, sparse, low-rank)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.compress import FunctionalLowRank, LayerPlan, Plan, PlanError, apply, bake, describe_layers
from autocompress.onnxgraph import export_onnx
from tests.test_prune_transformers import HEADS, HIDDEN, encoder
from tests.test_prune_transformers import no_mha_fastpath as no_fastpath

OUT_PROJ = [f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
PLANS = {
    "int8": LayerPlan(bits=8),
    "int4-g32": LayerPlan(bits=4, group_size=32),
    "sparse": LayerPlan(sparsity=0.5),
    "rank": LayerPlan(rank=0.5),
}


def test_out_proj_is_listed_as_running() -> None:
    model, x = encoder()
    layers = {la.name: la for la in describe_layers(model, x)}
    for name in OUT_PROJ:
        assert layers[name].used
        assert layers[name].macs == x.shape[1] * HIDDEN * HIDDEN
        refused = {(r.knob, r.value) for r in layers[name].refusals}
        assert {("act_bits", None), ("structure", "channel"), ("quantizer", "gptq")} <= refused
        assert not any(r.knob == "rank" for r in layers[name].refusals)


def _functional_out_proj(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first layer's attention computed by hand from its compressed weights."""
    attn = model.encoder.layers[0].self_attn
    w = bake(model).encoder.layers[0].self_attn.out_proj
    weight = w.weight.detach()
    bias = w.bias.detach()
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    heads = [t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2)
    return F.linear(o, weight, bias)


@pytest.mark.parametrize("which", list(PLANS))
def test_out_proj_compressed(which: str, tmp_path: Path) -> None:
    model, x = encoder()
    plan = Plan(dict.fromkeys(OUT_PROJ, PLANS[which]))
    new = apply(model, plan, x)
    attn = new.encoder.layers[0].self_attn
    if which == "rank":
        assert isinstance(attn.out_proj, FunctionalLowRank)
    else:
        assert attn.out_proj.weight is not None
        assert not torch.equal(attn.out_proj.weight, model.encoder.layers[0].self_attn.out_proj.weight)
    with torch.no_grad():
        fused = new(x)  # PyTorch's fused encoder kernel reads the same weight
    with torch.no_grad(), no_fastpath():
        torch.testing.assert_close(fused, new(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(new(x), model(x))
        got = attn(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(got, _functional_out_proj(new, x), atol=1e-5, rtol=1e-5)
        want = bake(new)(x).numpy()
        path = export_onnx(new, x, tmp_path / "model.onnx")
    out = ort.InferenceSession(str(path)).run(None, {ort.InferenceSession(str(path)).get_inputs()[0].name:
                                                     x.numpy()})[0]
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


def test_out_proj_refuses_what_needs_its_call() -> None:
    model, x = encoder()
    with pytest.raises(PlanError, match="out_proj'.*act_bits.*functional call"):
        apply(model, Plan({OUT_PROJ[0]: LayerPlan(bits=8, act_bits="dynamic")}), x)
    with pytest.raises(PlanError, match="out_proj'.*channel.*functional call"):
        apply(model, Plan({OUT_PROJ[0]: LayerPlan(sparsity=0.5, structure="channel")}), x)


@pytest.mark.parametrize("which", list(PLANS))
def test_out_proj_rebuilds_from_logged_weights(which: str) -> None:
    from autocompress.compress import Calibration
    from autocompress.deploy._rebuild import load_baked_state

    model, x = encoder()
    plan = Plan(dict.fromkeys(OUT_PROJ, PLANS[which]))
    new = apply(model, plan, x)
    again = apply(model, plan, x, calibration=Calibration.empty())
    load_baked_state(again, bake(new).state_dict(), plan)
    with torch.no_grad(), no_fastpath():
        torch.testing.assert_close(bake(again)(x), bake(new)(x))
