"""The remote device agent: times ONNX models on the machine it runs on, over HTTP.

Run it on the deployment machine (it needs only ``onnxruntime`` and ``numpy``: the
``autocompress[agent]`` extra; it never imports torch)::

    autocompress agent --host 0.0.0.0 --port 8765 --token-file ~/.autocompress-token

and point an experiment at it with ``target: {device: remote, url: http://HOST:8765,
token_env: AUTOCOMPRESS_AGENT_TOKEN}``.

Endpoints (every request needs ``Authorization: Bearer TOKEN``, else 401):

- ``GET /info``: device facts (CPU model, cores, runtime versions, platform) as JSON.
- ``POST /measure?threads=T&batch_size=B[&warmup=&min_runs=&max_runs=&budget_s=&rel_ci=&min_time_s=
  &fold_weight_qdq=0|1&shapes=JSON]`` with the raw ONNX model as the body: the timings as JSON
  (``latency_ms`` median, ``p90_ms``, ``iqr_ms``, ``runs``, ``ci_low_ms``, ``ci_high_ms``,
  ``threads``, ``batch_size``, ``stopped``), by the protocol of
  :mod:`autocompress.measure._timing`. ``shapes`` (optional, ``{input name: [dims]}``) gives
  the shapes of the inputs to time (one workload of the target: a sequence length, a decoder's
  prefill or decode step); without it the inputs take their declared shapes, a dynamic first
  dimension ``batch_size`` (as before).

Errors are JSON ``{"error": ...}``: 400 bad model or settings, 401 bad or missing token, 404
unknown path, 411 no Content-Length, 413 upload too large, 503 busy (one measurement runs at a
time and at most ``--queue`` wait), 504 measurement took longer than ``--timeout-s``. The body
is parsed only by ONNX Runtime (never unpickled or executed as code); the agent keeps serving
after any bad request.
"""

from autocompress.agent._main import add_arguments, main, read_token, run
from autocompress.agent._measure import (
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
    SETTINGS,
    BadRequest,
    device_facts,
    measure,
    parse_settings,
)
from autocompress.agent._server import AgentServer, Handler

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "DEFAULT_QUEUE", "DEFAULT_TIMEOUT_S", "SETTINGS", "AgentServer",
           "BadRequest", "Handler", "add_arguments", "device_facts", "main", "measure",
           "parse_settings", "read_token", "run"]
