"""The ``autocompress`` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input (message on stderr naming what is wrong), 1 other failure.
One module per command group (``_model``: layers, sensitivity, trial; ``_search``: search,
pareto; ``_deploy``: export, report; ``_serve``: ui, agent); ``_parser`` puts them together.
Choices and help are read from the registries when the parser is built, so a task, sampler,
runtime, metric or export format registered before :func:`main` runs is listed and accepted.
``--help`` imports no torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autocompress._errors import ConfigError
from autocompress.cli._common import DEFAULT_TRACKING_URI, EXIT_BAD_INPUT
from autocompress.cli._parser import build_parser

__all__ = ["DEFAULT_TRACKING_URI", "EXIT_BAD_INPUT", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autocompress`` console script."""
    from autocompress.compress import PlanError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, PlanError) as e:
        print(f"autocompress: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        return 130
