"""Shared test set-up. Under CI=true a skipped test fails the run: real parts must be there."""

from __future__ import annotations

import os
import signal

import pytest

# A suite started in the background by a non-interactive shell (`./.ci/run &`, nohup) inherits SIGINT ignored, and
# so would every CLI it starts: its Ctrl-C tests would then test nothing a user's terminal does. A handler here is
# reset to the default in each child at exec, as a terminal's shell gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module that skips itself while it is collected (module-level pytest.skip, importorskip) reports here,
    not in a test report: it is a skip all the same."""
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _skipped:
        print(f"\nCI=true: {len(_skipped)} test(s) skipped, which is a failure here:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
