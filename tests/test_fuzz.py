"""The differential fuzzer (tests/fuzz_machine.py): random sequences of Django writes, and
after every step every cached read compared with the ORM's read.

In the plain test run it is bounded and derandomized (a fixed sequence of examples, well
under a minute). ``make fuzz`` (or ``TC_FUZZ_MINUTES=N pytest tests/test_fuzz.py -s``) runs
it for a time budget with fresh random seeds, batch after batch, then prints how many
examples and steps ran; on a failure Hypothesis prints the shrunk sequence of steps.

    python -m tests.test_fuzz --minutes 10
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from django.conf import settings  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

HAS_SNAPSHOT = "snapshot" in settings.DATABASES
DATABASES = ["default", "snapshot"] if HAS_SNAPSHOT else ["default"]
FUZZ_MINUTES = float(os.environ.get("TC_FUZZ_MINUTES") or 0)

SUPPRESS = [
    HealthCheck.too_slow,
    HealthCheck.function_scoped_fixture,
    HealthCheck.filter_too_much,
    HealthCheck.data_too_large,
]

# The bounded run of `make test`: the same examples every time.
BOUNDED = hsettings(
    max_examples=int(os.environ.get("TC_FUZZ_EXAMPLES") or 6),
    stateful_step_count=int(os.environ.get("TC_FUZZ_STEPS") or 20),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=SUPPRESS,
    print_blob=True,
)


def fuzz_settings() -> hsettings:
    """One batch of the timed run: fresh random seeds; failures are saved (under .venv,
    which git ignores) and replayed first by the next run."""
    return hsettings(
        max_examples=5,  # short batches: the time budget is checked between them
        stateful_step_count=int(os.environ.get("TC_FUZZ_STEPS") or 40),
        derandomize=False,
        database=DirectoryBasedExampleDatabase(
            os.environ.get("TC_FUZZ_DB") or ".venv/hypothesis-fuzz"
        ),
        deadline=None,
        suppress_health_check=SUPPRESS,
        print_blob=True,
    )


def _machine(variant: str) -> type:
    from tests.fuzz_machine import ReadCommittedMachine, RepeatableReadMachine

    return {"read_committed": ReadCommittedMachine, "repeatable_read": RepeatableReadMachine}[
        variant
    ]


def _summary(variant: str, counts: dict[str, int], elapsed: float, batches: int) -> str:
    rules = sorted((k[5:], v) for k, v in counts.items() if k.startswith("rule:"))
    lines = [
        f"fuzz [{variant}]: {counts.get('examples', 0)} examples, {counts.get('steps', 0)} "
        f"steps, {counts.get('probes', 0)} cached reads compared, {batches} batch(es), "
        f"{elapsed:.1f} s",
        "  rules run: " + ", ".join(f"{k}={v}" for k, v in rules),
    ]
    return "\n".join(lines)


@pytest.mark.django_db(transaction=True, databases=DATABASES)
@pytest.mark.parametrize("variant", ["read_committed", "repeatable_read"])
def test_cached_reads_agree_with_the_orm_after_random_writes(variant: str) -> None:
    if variant == "repeatable_read" and not HAS_SNAPSHOT:
        pytest.skip('tests/settings.py has no "snapshot" (REPEATABLE READ) alias')
    from hypothesis.stateful import run_state_machine_as_test

    from tests.fuzz_machine import CacheMachine, close_worker

    machine = _machine(variant)
    CacheMachine.counts.clear()
    start = time.monotonic()
    batches = 0
    try:
        if FUZZ_MINUTES > 0:
            budget = FUZZ_MINUTES * 60 / 2  # two variants share the budget
            while time.monotonic() - start < budget:
                run_state_machine_as_test(machine, settings=fuzz_settings())
                batches += 1
        else:
            run_state_machine_as_test(machine, settings=BOUNDED)
            batches = 1
    finally:
        close_worker()
        print(
            "\n" + _summary(variant, dict(CacheMachine.counts), time.monotonic() - start, batches),
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="time budget, shared by the two variants (default 10)",
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per example")
    parser.add_argument("pytest_args", nargs="*", help="more arguments for pytest")
    args = parser.parse_args(argv)
    os.environ["TC_FUZZ_MINUTES"] = str(args.minutes)
    if args.steps:
        os.environ["TC_FUZZ_STEPS"] = str(args.steps)
    # pytest in a process of its own: processes it spawns re-import the parent's __main__,
    # and this module reads the settings at import, before a child could set its own.
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            os.path.abspath(__file__),
            "-p",
            "no:cacheprovider",
            "-x",
            "-s",
            "-q",
            *args.pytest_args,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
