"""Fixtures for the root helper's tests: the private bus with polkitd, the test users, the polkit files,
one helper per module, and the check that every test leaves the machine as it found it.

A module rather than conftest.py, so other test folders can use the same fixtures: tests/helper/conftest.py
and tests/ansible/conftest.py import them (each folder gets its own session-wide bus)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from autoglm_helper import knobs
from helper_parts import (
    ACTION_FILE,
    ALLOWED_USER,
    DENIED_USER,
    GROUP,
    ROOT,
    RULE_FILE,
    SWAP_DIR_ROOT,
    Bus,
    Helper,
    machine,
    restore_knobs,
)


@pytest.fixture(autouse=True)
def machine_restored() -> Iterator[dict[str, Any]]:
    """Each test must leave every catalogue knob, the swap areas and /var/lib/autoglm-tune as found."""
    before = machine()
    yield before
    after = machine()
    restore_knobs(before["knobs"])
    for area in set(knobs.swap_areas()) - {line.split()[0] for line in before["swaps"].splitlines()[1:]}:
        subprocess.run(["swapoff", area], check=False)
    if not before["var_lib"]:
        shutil.rmtree(SWAP_DIR_ROOT, ignore_errors=True)
    assert after == before, "the test left the machine changed"


# ---- session-wide real parts ---------------------------------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the helper tests need root (CI runs them as root)")
    path = Path(tempfile.mkdtemp(prefix="autoglm-helper-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def users() -> Iterator[None]:
    """The test users and the group; only what this fixture created is removed afterwards."""
    made_group = subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0
    if made_group:
        _run("groupadd", GROUP)
    made = []
    for user, groups in ((DENIED_USER, []), (ALLOWED_USER, ["-G", GROUP])):
        if subprocess.run(["id", user], capture_output=True).returncode != 0:
            _run("useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", *groups, user)
            made.append(user)
    yield
    for user in made:
        _run("userdel", user)
    if made_group:
        _run("groupdel", GROUP)


@pytest.fixture(scope="session")
def polkit_files() -> Iterator[None]:
    """Our action file and the example group rule, in the only places polkitd reads them from."""
    saved = {p: p.read_bytes() if p.exists() else None for p in (ACTION_FILE, RULE_FILE)}
    shutil.copy(ROOT / "systemd/polkit/io.github.autoglm_tune.policy", ACTION_FILE)
    shutil.copy(ROOT / "systemd/polkit/50-autoglm-tune.rules", RULE_FILE)
    shutil.chown(RULE_FILE, "polkitd", "root")
    RULE_FILE.chmod(0o644)
    yield
    for path, content in saved.items():
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)


@pytest.fixture(scope="session")
def bus(workdir: Path, users: None, polkit_files: None) -> Iterator[Bus]:
    b = Bus(workdir / "bus", with_polkit=True)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def helper(bus: Bus, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Helper]:
    """One helper process per test module, with a fresh state directory."""
    state = workdir / f"state-{request.module.__name__.rsplit('.', 1)[-1]}"
    h = Helper(bus, state).start("--idle-timeout", "0")
    yield h
    h.stop()


