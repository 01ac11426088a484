"""What the device agent does for a request: check the settings, describe the device, time an
ONNX model (by the protocol of :mod:`autocompress.measure._timing`). Torch-free."""

from __future__ import annotations

import json
import os
import platform
import threading
import urllib.parse
from typing import Any

DEFAULT_MAX_UPLOAD_MB = 256.0
DEFAULT_QUEUE = 2
DEFAULT_TIMEOUT_S = 120.0
MAX_BUDGET_S = 60.0
MAX_RUNS = 100_000

# name: (type, low, high): what a request may ask for. The defaults of the timing settings are
# TimingSettings' own, so a measurement here follows the same protocol as a local one.
SETTINGS: dict[str, tuple[type, float, float]] = {
    "threads": (int, 1, 1024),
    "batch_size": (int, 1, 65536),
    "warmup": (int, 0, 10_000),
    "min_runs": (int, 1, MAX_RUNS),
    "max_runs": (int, 1, MAX_RUNS),
    "budget_s": (float, 1e-6, MAX_BUDGET_S),
    "rel_ci": (float, 0.0, 0.999),
    "min_time_s": (float, 0.0, MAX_BUDGET_S),
    "fold_weight_qdq": (int, 0, 1),
}


MAX_SHAPE_INPUTS = 256
MAX_DIM = 1 << 24


def _defaults() -> dict[str, Any]:
    from autocompress.measure import TimingSettings

    return {"threads": 1, "batch_size": 1, "fold_weight_qdq": 0, "shapes": {},
            **{k: min(v, SETTINGS[k][2]) for k, v in TimingSettings().to_dict().items()}}


class BadRequest(Exception):
    """A client error; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_settings(query: str) -> dict[str, Any]:
    """The measurement settings of a ``/measure`` query string (BadRequest when invalid)."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                                       max_num_fields=len(SETTINGS) + 1)
    except ValueError as e:
        raise BadRequest(f"bad query string: {e}") from None
    out = _defaults()
    seen: set[str] = set()
    for key, raw in pairs:
        if key not in SETTINGS and key != "shapes":
            raise BadRequest(f"unknown setting {key!r}; allowed: {sorted([*SETTINGS, 'shapes'])}")
        if key in seen:
            raise BadRequest(f"setting {key!r} given twice")
        seen.add(key)
        if key == "shapes":
            out[key] = parse_shapes(raw)
            continue
        kind, low, high = SETTINGS[key]
        try:
            value = int(raw) if kind is int else float(raw)
        except ValueError:
            raise BadRequest(f"{key}={raw!r}; allowed: {'an integer' if kind is int else 'a number'} "
                             f"from {low:g} to {high:g}") from None
        if not low <= value <= high:  # also refuses NaN
            raise BadRequest(f"{key}={raw!r}; allowed: from {low:g} to {high:g}")
        out[key] = value
    from autocompress.measure import TimingSettings

    try:
        TimingSettings.from_mapping(out)  # the protocol's own checks (max_runs >= min_runs, ...)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return out


def parse_shapes(raw: str) -> dict[str, list[int]]:
    """The ``shapes`` setting: JSON ``{input name: [dim, ...]}``, the shapes of the inputs
    to time (a workload's: a sequence length, a decoder's prefill or decode step); inputs not
    named take their declared shapes (BadRequest when invalid)."""
    try:
        shapes = json.loads(raw)
    except ValueError:
        shapes = None
    if (not isinstance(shapes, dict) or len(shapes) > MAX_SHAPE_INPUTS or not all(
            isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                           and 0 <= d <= MAX_DIM for d in dims)
            for dims in shapes.values())):
        raise BadRequest(f"shapes={raw[:200]!r}; allowed: JSON {{input name: [dims]}} of "
                         f"integers from 0 to {MAX_DIM}")
    return shapes


def device_facts() -> dict[str, Any]:
    """CPU model, cores, runtime versions and platform of this machine."""
    import numpy as np
    import onnxruntime as ort

    from autocompress.measure import cpu_model

    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "usable_cores": usable,
            "onnxruntime": ort.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "providers": ",".join(ort.get_available_providers())}


def _inputs(session: Any, batch_size: int, shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Random inputs of the model's declared shapes (a dynamic first dim becomes
    ``batch_size``), or of ``shapes`` for the inputs named there."""
    import numpy as np

    rng = np.random.default_rng(0)
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    shapes = shapes or {}
    unknown = sorted(set(shapes) - {inp.name for inp in session.get_inputs()})
    if unknown:
        raise BadRequest(f"shapes names {unknown}, which the model has no input of; its inputs: "
                         f"{[inp.name for inp in session.get_inputs()]}")
    feed = {}
    for inp in session.get_inputs():
        if inp.type not in dtypes:
            raise BadRequest(f"input {inp.name!r} has type {inp.type}; supported: {sorted(dtypes)}")
        shape = _shape(inp, shapes[inp.name]) if inp.name in shapes else []
        for axis, dim in enumerate([] if inp.name in shapes else inp.shape):
            if isinstance(dim, int) and dim > 0:
                if axis == 0 and dim != batch_size:
                    raise BadRequest(f"input {inp.name!r} has a fixed batch dimension {dim}, but "
                                     f"batch_size={batch_size}")
                shape.append(dim)
            elif axis == 0:
                shape.append(batch_size)
            else:
                raise BadRequest(f"input {inp.name!r} has a dynamic dimension {dim!r} at axis "
                                 f"{axis}; export the model with a fixed shape there")
        dtype = dtypes[inp.type]
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype=dtype)
    return feed


def _shape(inp: Any, dims: list[int]) -> list[int]:
    """``dims`` for input ``inp``, checked against its declared rank and fixed dimensions."""
    if len(dims) != len(inp.shape):
        raise BadRequest(f"shapes: input {inp.name!r} has {len(inp.shape)} dimensions, "
                         f"{len(dims)} given")
    for axis, (declared, dim) in enumerate(zip(inp.shape, dims, strict=True)):
        if isinstance(declared, int) and declared > 0 and declared != dim:
            raise BadRequest(f"shapes: input {inp.name!r} has a fixed dimension {declared} at "
                             f"axis {axis}, {dim} given")
    return dims


def measure(model: bytes, settings: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Times the ONNX ``model`` bytes with ``settings`` (TimeoutError past ``timeout_s``)."""
    import onnxruntime as ort

    from autocompress.measure import TimingSettings, time_runs
    from autocompress.measure.runtimes import session_options

    opts = session_options(settings["threads"], bool(settings["fold_weight_qdq"]))
    try:
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises several types for malformed models
        raise BadRequest(f"not a loadable ONNX model: {str(e).strip()[:500]}") from None
    feed = _inputs(session, settings["batch_size"], settings.get("shapes"))
    run_options = ort.RunOptions()
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        run_options.terminate = True  # makes the running (and every later) session.run fail

    timer = threading.Timer(timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        session.run(None, feed, run_options)  # a first run surfaces shape / kernel errors as 400
    except Exception as e:
        timer.cancel()
        if expired.is_set():
            raise TimeoutError(f"measurement took longer than {timeout_s:g} s") from None
        raise BadRequest(f"the model does not run: {str(e).strip()[:500]}") from None
    try:
        t = time_runs(lambda: session.run(None, feed, run_options),
                      TimingSettings.from_mapping(settings))
    except Exception:
        if expired.is_set():
            raise TimeoutError(f"measurement took longer than {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()
    return {"latency_ms": t.latency_ms, "p90_ms": t.p90_ms, "iqr_ms": t.iqr_ms, "runs": t.runs,
            "ci_low_ms": t.ci_low_ms, "ci_high_ms": t.ci_high_ms, "stopped": t.stopped,
            "threads": settings["threads"], "batch_size": settings["batch_size"]}
