"""Shared test setup.

- The repository root goes on ``sys.path`` so that ``tests.models`` imports (and the user task
  reference ``"tests.models:tiny_task"`` resolves) whichever way pytest is started.
- Torch uses one intra-op thread: the test models are tiny, and on a busy machine several
  threads spin against each other and make every step many times slower.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """The trained tiny task, built once. Tests that train must work on copies of its model."""
    from tests.models import tiny_task

    return tiny_task()


@pytest.fixture
def serial() -> dict[str, str]:
    """Keyword arguments that run a search on the serial backend (in this process, no Ray):
    ``ac.search(..., **serial)``. For tests of the search loop that do not test Ray itself."""
    return {"backend": "serial"}
