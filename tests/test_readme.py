"""The README's Python examples run as written (in order, in one fresh process)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_the_readme_has_the_python_api_example() -> None:
    code = "\n".join(python_blocks())
    for name in ("ac.Task(", "ac.search(", "result.front", "ac.export("):
        assert name in code


@pytest.mark.slow
def test_readme_python_examples_run_as_written(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    checks = ("\nassert isinstance(make_task(), Task) and make_task().name == 'digits-mlp'\n"
              "print('README OK')\n")
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(python_blocks()) + checks)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "README OK" in proc.stdout
    assert "onnxruntime:" in proc.stdout and "load_packed:" in proc.stdout
    for path in ("dist/model.onnx", "dist/export.json", "dist/packed/model.acpk", "mlflow.db"):
        assert (tmp_path / path).is_file(), path
