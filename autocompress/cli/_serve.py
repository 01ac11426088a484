"""Commands that serve: ``ui`` (the MLflow UI) and ``agent`` (the remote device agent)."""

from __future__ import annotations

import argparse
from typing import Any

from autocompress.cli._common import DEFAULT_TRACKING_URI


def add_parsers(sub: Any) -> None:
    """Adds ``ui`` and ``agent`` to the subcommands ``sub``."""
    from autocompress.agent import add_arguments as add_agent_arguments

    p = sub.add_parser("ui", help="the MLflow UI on the same store")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("agent", help="serve latency measurements of ONNX models on this device")
    add_agent_arguments(p)
    p.set_defaults(fn=cmd_agent)


def cmd_ui(args: argparse.Namespace) -> int:
    from autocompress.tracking import serve_ui

    return serve_ui(args.tracking_uri, args.host, args.port)


def cmd_agent(args: argparse.Namespace) -> int:
    from autocompress.agent import run

    return run(args)
