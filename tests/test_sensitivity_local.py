"""The cheap sensitivity profile: layer-local probes on calibration statistics, their gain onto
model-level distortion, progress lines, the cache, and the seeding's calibrated variants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from autocompress.compress import Calibration, PlanError, input_stats
from autocompress.compress._registry import describe_layers
from autocompress.config._space import load_search_space
from autocompress.tune import _profile_run, _sensitivity
from autocompress.tune._local_probes import is_local, local_error
from autocompress.tune._sensitivity import Probe, Sensitivity, probe_settings, profile


def _space(task, knobs: dict):
    layers = describe_layers(task.model, task.example_inputs)
    return load_search_space({"layers": [{"knobs": knobs}]}, source="inline.yaml").resolve(layers)


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    return tmp_path / "sensitivity"


@pytest.fixture(scope="module")
def stats(tiny):
    """The tiny MLP's first layer with the input statistics of 128 training samples."""
    layer = tiny.model.get_submodule("net.0")
    return layer, input_stats(tiny.model, [layer], Calibration.from_task(tiny, 128))[layer]


def test_local_error_grows_with_fewer_bits_and_more_sparsity(stats) -> None:
    layer, st = stats
    shape, before = (layer.in_features,), layer.weight.detach().clone()
    bits = [local_error("net.0", layer, {"bits": b}, shape, st)[0] for b in (8, 6, 4, 3, 2)]
    assert 0 < bits[0] and all(a < b for a, b in zip(bits, bits[1:], strict=False))
    sparsity = [local_error("net.0", layer, {"sparsity": s}, shape, st)[0]
                for s in (0.25, 0.5, 0.75, 0.9)]
    assert all(a < b for a, b in zip(sparsity, sparsity[1:], strict=False))
    assert torch.equal(layer.weight, before)  # the probes compress a copy


# The methods that minimize this very error (GPTQ, SparseGPT); Wanda and AWQ are heuristics
# whose defining tests (tests/test_sparse.py, the AWQ tests) use inputs with outlier channels.
@pytest.mark.parametrize(("naive", "calibrated"), [
    ({"bits": 3}, {"bits": 3, "quantizer": "gptq"}),
    ({"sparsity": 0.5}, {"sparsity": 0.5, "pruner": "sparsegpt"}),
    ({"sparsity": 0.5, "structure": "2:4"}, {"sparsity": 0.5, "structure": "2:4", "pruner": "sparsegpt"}),
])
def test_a_calibrated_variant_is_less_distorting_than_its_naive_one(stats, naive, calibrated) -> None:
    layer, st = stats
    shape = (layer.in_features,)
    base = local_error("net.0", layer, naive, shape, st)[0]
    try:
        better = local_error("net.0", layer, calibrated, shape, st)[0]
    except PlanError as e:
        if "not implemented yet" in str(e):
            pytest.skip(str(e))
        raise
    assert better < base


def test_calibration_from_stats_runs_no_forward(stats) -> None:
    layer, st = stats
    model = torch.nn.Sequential(layer)
    calls = []
    handle = layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        got = input_stats(model, [layer], Calibration.from_stats({"0": st}))[layer]
    finally:
        handle.remove()
    assert not calls and torch.equal(got.gram, st.gram) and got.gram is not st.gram
    assert not Calibration.from_stats({"0": st}).is_empty
    with pytest.raises(ValueError, match="no statistics"):
        input_stats(model, [layer], Calibration.from_stats({"other": st}))


def test_which_probes_are_local(tiny) -> None:
    linear = tiny.model.get_submodule("net.0")
    assert is_local(linear, {"bits": 4}) and is_local(linear, {"sparsity": 0.5, "structure": "2:4"})
    assert not is_local(linear, {"sparsity": 0.5, "structure": "channel"})
    assert not is_local(linear, {"bits": 8, "act_bits": 8})
    assert not is_local(torch.nn.Embedding(10, 4), {"bits": 4})


def test_local_predictions_follow_the_model_level_distortion(tiny, cache) -> None:
    """The gain maps each layer's local errors onto the distortion of the whole model: a
    prediction is within a factor 3 of the distortion measured with the model."""
    space = _space(tiny, {"bits": [2, 3, 4, 8, None], "sparsity": [0.0, 0.25, 0.5, 0.75]})
    sens = profile(tiny, space, batches=1, use_cache=False)
    subset = [next(iter(tiny.val_loader))]
    reference = _profile_run.outputs(tiny.model, subset)
    checked = 0
    for p in sens.probes:
        if math.isnan(p.local) or p.distortion < 1e-5:
            continue
        _, measured = _profile_run.model_probe(tiny, p.layer, p.knobs, subset, reference)
        assert measured / 3 < p.distortion < measured * 3, p
        checked += 1
    assert checked >= 10


def test_progress_lines_and_the_cache(tiny, cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_profile_run, "PROGRESS_SECONDS", 0.0)
    space = _space(tiny, {"bits": [4, None], "sparsity": [0.0, 0.5],
                          "structure": ["unstructured", "channel"]})
    lines: list[str] = []
    sens = profile(tiny, space, batches=1, echo=lines.append)
    assert lines[0].startswith(f"sensitivity: {len(sens.probes)} probes (")
    assert any("input statistics of" in line for line in lines)
    counts = [line for line in lines if "/" in line and "layer-local" in line]
    assert counts[-1].startswith(f"sensitivity: {len(sens.probes)}/{len(sens.probes)} probes")
    assert "model-level" in counts[-1] and lines[-1].startswith("sensitivity: done in")
    # Channel probes ran on the model (a metric), weight probes locally (a local error).
    kinds = {(math.isnan(p.metric), math.isnan(p.local)) for p in sens.probes}
    assert kinds == {(True, False), (False, True)}
    (entry,) = cache.glob("*.json")
    data = json.loads(entry.read_text())
    assert {"local", "distortion", "metric"} <= set(data["probes"][0])
    again = profile(tiny, space, batches=1, echo=lines.append)
    assert again.cached and again.to_csv() == sens.to_csv()
    monkeypatch.setattr(_sensitivity, "_FORMAT", _sensitivity._FORMAT + 1)  # a new format
    assert not profile(tiny, space, batches=1).cached


def test_variants_are_probed_where_local_only(tiny) -> None:
    space = _space(tiny, {"bits": [4, None], "quantizer": ["rtn", "gptq"], "group_size": [None, 32],
                          "sparsity": [0.0, 0.5], "structure": ["unstructured", "channel"],
                          "pruner": ["magnitude", "sparsegpt"]})
    layer = space.layers[1]  # 32 inputs: takes groups of 32
    settings = probe_settings(layer.knobs)
    assert {"bits": 4, "quantizer": "gptq", "group_size": 32} in settings
    assert {"sparsity": 0.5, "structure": "unstructured", "pruner": "sparsegpt"} in settings
    assert {"sparsity": 0.5, "structure": "channel", "pruner": "sparsegpt"} in settings
    # A model-level variant's prediction reads its default variant's probe.
    sens = Sensitivity(0.9, (Probe(layer.name, {"sparsity": 0.5, "structure": "channel"}, 0.8, 0.1),), 1)
    assert sens.distortion(layer.name, "sparsity", 0.5, structure="channel", pruner="sparsegpt") == 0.1


def test_the_seeding_prefers_a_less_distorting_calibrated_variant(tiny) -> None:
    from autocompress.tune._seeds import best_variant, layer_options

    space = _space(tiny, {"bits": [4, None], "quantizer": ["rtn", "gptq"], "group_size": [None, 32],
                          "sparsity": [0.0, 0.5], "pruner": ["magnitude", "wanda", "sparsegpt"]})
    layer = space.layers[1]  # 32 inputs: takes groups of 32
    shape = (32, 32)

    def probe(knobs: dict, d: float) -> Probe:
        return Probe(layer.name, knobs, math.nan, d, d)

    probes = (probe({"bits": 4}, 0.05), probe({"bits": 4, "quantizer": "gptq"}, 0.01),
              probe({"bits": 4, "quantizer": "gptq", "group_size": 32}, 0.005),
              probe({"bits": 4, "group_size": 32}, 0.02),
              probe({"sparsity": 0.5, "structure": "unstructured"}, 0.2),
              probe({"sparsity": 0.5, "structure": "unstructured", "pruner": "wanda"}, 0.1),
              probe({"sparsity": 0.5, "structure": "unstructured", "pruner": "sparsegpt"}, 0.3))
    sens = Sensitivity(0.9, probes, 1)
    assert best_variant(layer, {"bits": 4}, sens, shape).knobs == {
        "bits": 4, "quantizer": "gptq", "group_size": 32}
    assert best_variant(layer, {"sparsity": 0.5}, sens, shape).knobs["pruner"] == "wanda"
    options = layer_options(layer, shape, sens)
    four = [o for o in options if o.knobs.get("bits") == 4 and not o.knobs.get("sparsity")]
    assert four and four[0].knobs.get("quantizer") == "gptq"
    # Not offered: the naive one (a failed calibrated probe is never chosen).
    failed = Sensitivity(0.9, (probes[0], probe({"bits": 4, "quantizer": "gptq"}, math.nan)), 1)
    assert best_variant(layer, {"bits": 4}, failed, shape).knobs == {"bits": 4}
