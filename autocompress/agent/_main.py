"""The ``autocompress agent`` command: its options, the token file, serving until interrupted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocompress.agent._measure import DEFAULT_MAX_UPLOAD_MB, DEFAULT_QUEUE, DEFAULT_TIMEOUT_S
from autocompress.agent._server import AgentServer


def read_token(path: str | Path) -> str:
    """The token in ``path`` (stripped); ValueError when it is missing or empty."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    return token


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token-file", required=True, help="file holding the shared secret token")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted model in MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                   help=f"measurements allowed to wait while one runs (default {DEFAULT_QUEUE})")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"abort a measurement after this many seconds (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--quiet", action="store_true", help="do not log each request")


def run(args: argparse.Namespace) -> int:
    """Serves until interrupted; returns the exit status (2 on bad options)."""
    try:
        token = read_token(args.token_file)
        if not args.max_upload_mb > 0:
            raise ValueError(f"--max-upload-mb={args.max_upload_mb}; allowed: a number > 0")
        if args.queue < 0:
            raise ValueError(f"--queue={args.queue}; allowed: an integer >= 0")
        if not args.timeout_s > 0:
            raise ValueError(f"--timeout-s={args.timeout_s}; allowed: a number > 0")
    except ValueError as e:
        print(f"autocompress agent: error: {e}", file=sys.stderr)
        return 2
    try:
        mode = Path(args.token_file).expanduser().stat().st_mode
        if mode & 0o077:
            print(f"autocompress agent: warning: {args.token_file} is readable by other users "
                  f"(chmod 600 it)", file=sys.stderr)
    except OSError:
        pass
    server = AgentServer((args.host, args.port), token,
                         max_upload_bytes=int(args.max_upload_mb * (1 << 20)), queue=args.queue,
                         timeout_s=args.timeout_s, quiet=args.quiet)
    host, port = server.server_address[:2]
    print(f"autocompress agent listening on http://{host}:{port} ({server.facts['cpu']}, "
          f"onnxruntime {server.facts['onnxruntime']})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="autocompress agent", description="the remote device agent")
    add_arguments(p)
    return run(p.parse_args(argv))
