"""The managers' generic types, as users' type checkers see them: mypy with the django-stubs
plugin and the project's configuration checks tests/typing_cases/managers.py, whose
assert_type() lines say that reads are typed as the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).parent / "typing_cases" / "managers.py"


def test_reads_are_typed_as_the_model() -> None:
    # The configuration is pyproject.toml's [tool.mypy] (strict, the django-stubs plugin,
    # tests.settings), with the stubs of the Django this virtualenv runs (django-stubs 5.2
    # or 6.1). Only the cases are judged here: `make lint` checks the package itself.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", str(CASES.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
