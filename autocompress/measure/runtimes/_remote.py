"""The remote device agent: the exported ONNX model is uploaded to ``autocompress agent`` on
the deployment machine, which times it there by the same protocol (:mod:`autocompress.agent`).

One request per workload: a workload other than the example's shape (a sequence length, a
decoder's prefill or decode step) sends its input shapes (``shapes``, :func:`input_shapes`),
so the agent times the same feeds a local measurement would.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from autocompress.measure.runtimes._base import Runtime

if TYPE_CHECKING:
    from autocompress.measure._results import LatencyResult, Prepared
    from autocompress.measure.target import Target

REMOTE_TIMEOUT_S = 300.0  # one HTTP request (upload, queueing on the agent, measuring)
REMOTE_BUSY_WAIT_S = 900.0  # how long to keep retrying while the agent answers 503 (busy)


def _agent_request(url: str, token_env: str, path: str, body: bytes | None = None) -> dict:
    """One request to the agent at ``url``; retries while it is busy (503)."""
    token = os.environ.get(token_env, "")
    if not token:
        raise RuntimeError(f"target.token_env: environment variable {token_env!r} (the "
                           f"device agent's token) is not set")
    full = url.rstrip("/") + path
    deadline = time.monotonic() + REMOTE_BUSY_WAIT_S
    delay = 0.2
    while True:
        req = urllib.request.Request(full, data=body, method="POST" if body is not None else "GET",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=REMOTE_TIMEOUT_S) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", "")
            except (ValueError, AttributeError, OSError):
                message = ""
            if e.code == 503 and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise RuntimeError(f"device agent at {url} answered {e.code} to {path.split('?')[0]}"
                               f": {message or e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RuntimeError(f"cannot reach the device agent at {url}: {reason}") from None


@functools.lru_cache(maxsize=16)
def _agent_facts(url: str, token_env: str) -> tuple[tuple[str, str], ...]:
    facts = _agent_request(url, token_env, "/info")
    return tuple(sorted((str(k), str(v)) for k, v in facts.items()))


def input_shapes(batch: object) -> str:
    """The ``shapes`` setting of a ``/measure`` request: ``{input name: shape}`` of ``batch``
    as compact JSON (the agent builds inputs of these shapes)."""
    from autocompress._inputs import input_names, tensors_of

    return json.dumps({name: list(t.shape) for name, t in zip(
        input_names(batch), tensors_of(batch), strict=True)}, separators=(",", ":"))


def target_facts(target: Target) -> dict[str, str]:
    """Device facts of ``target``'s agent (``agent.cpu``, ...; fetched once); {} when local."""
    if target.device != "remote":
        return {}
    return {f"agent.{k}": v for k, v in _agent_facts(str(target.url), str(target.token_env))}


class RemoteAgent(Runtime):
    """ONNX Runtime on a device agent (``target: {device: remote, url, token_env}``)."""

    name = "onnxruntime"
    artifact = "onnx"

    def integer_kernels(self, target: Target) -> str | None:
        return None  # the agent runs the ONNX file on ONNX Runtime's CPU provider

    def facts(self, target: Target) -> dict[str, str]:
        facts = dict(_agent_facts(str(target.url), str(target.token_env)))
        return {"cpu": facts.get("cpu", ""), "runtime_version": facts.get("onnxruntime", "")}

    def cache_facts(self, target: Target) -> dict[str, str]:
        return target_facts(target)

    def measure(self, prepared: Prepared, target: Target) -> LatencyResult:
        from autocompress.measure._results import LatencyResult
        from autocompress.measure.runtimes._ort import has_activation_quant

        assert prepared.onnx is not None
        facts = self.facts(target)
        settings = {"threads": target.threads, "batch_size": target.batch_size,
                    **target.timing.to_dict(),
                    "fold_weight_qdq": int(not has_activation_quant(prepared.onnx))}
        if prepared.workloads != ("",):  # a workload's shapes (the one batch: as before)
            settings["shapes"] = input_shapes(prepared.batch)
        query = urllib.parse.urlencode(settings)
        r = _agent_request(str(target.url), str(target.token_env), f"/measure?{query}", prepared.onnx)
        return LatencyResult(float(r["latency_ms"]), float(r["p90_ms"]), float(r["iqr_ms"]),
                             int(r["runs"]), target.runtime, target.device, int(r["threads"]),
                             int(r["batch_size"]), float(r.get("ci_low_ms", math.nan)),
                             float(r.get("ci_high_ms", math.nan)), str(r.get("stopped", "")),
                             facts["runtime_version"], facts["cpu"])
