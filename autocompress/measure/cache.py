"""Latency cache: latency depends on the compressed architecture and precision, not on weight values.

A measurement is keyed by a signature of the exported ONNX graph with the *values* of its
floating-point and 8-bit initializers left out (names, shapes and dtypes kept; integer shape
constants kept, since they change the structure), plus the :class:`Target` and the facts of the
machine that measures (CPU, runtime versions, host; the agent's facts for ``device: remote``).
So two trials whose plans give the same structure and precisions are measured once, in one
search and across searches with the same target.

The cache is an SQLite file, ``latency_cache.db`` in ``$AUTOCOMPRESS_CACHE`` (default
``~/.cache/autocompress``, where the trained baselines are cached too);
``AUTOCOMPRESS_LATENCY_CACHE=0`` turns it off, any other value names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import onnx

# Initializer types whose values are weights (left out of the signature).
_VALUE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                "string_data")


def cache_path() -> Path | None:
    """The SQLite file of the cache, or None when turned off."""
    setting = os.environ.get("AUTOCOMPRESS_LATENCY_CACHE")
    if setting is not None and setting.strip().lower() in ("0", "off", "false", "no", ""):
        return None
    if setting:
        return Path(setting).expanduser()
    root = Path(os.environ.get("AUTOCOMPRESS_CACHE", Path.home() / ".cache" / "autocompress"))
    return root / "latency_cache.db"


def _strip(tensor: onnx.TensorProto) -> None:
    if tensor.data_type in _VALUE_TYPES:
        for name in _DATA_FIELDS:
            tensor.ClearField(name)
        # external data would otherwise carry file offsets that differ with the values
        tensor.ClearField("external_data")


def graph_signature(path: str | Path) -> str:
    """SHA-256 of the ONNX model at ``path`` with weight values left out."""
    model = onnx.load(str(path))
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            _strip(tensor)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    _strip(attr.t)
    model.ClearField("producer_version")
    model.ClearField("doc_string")
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def cache_key(graph_sig: str, target: dict[str, Any], facts: dict[str, str]) -> str:
    blob = json.dumps({"graph": graph_sig, "target": target, "facts": facts}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30)
    conn.execute("CREATE TABLE IF NOT EXISTS latency (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
                 "created REAL NOT NULL)")
    return conn


def lookup(key: str) -> dict[str, Any] | None:
    """The cached result (a ``LatencyResult.to_dict()``) for ``key``, or None."""
    path = cache_path()
    if path is None:
        return None
    try:
        with _connect(path) as conn:
            row = conn.execute("SELECT result FROM latency WHERE key = ?", (key,)).fetchone()
        conn.close()
    except sqlite3.Error:
        return None  # a broken cache only costs a measurement
    return json.loads(row[0]) if row else None


def store(key: str, result: dict[str, Any]) -> None:
    path = cache_path()
    if path is None:
        return
    try:
        with _connect(path) as conn:
            conn.execute("INSERT OR REPLACE INTO latency VALUES (?, ?, ?)",
                         (key, json.dumps(result), time.time()))
        conn.close()
    except sqlite3.Error:
        pass
