"""Fixtures for the Ansible tests: the root helper's private bus with polkitd and the real helper (the fixtures
of tests/helper, imported from its helper_fixtures module), every catalogue knob restored after each test, and
a runner for ansible-playbook (ansible_parts.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helper"))

from ansible_parts import Ansible
from helper_fixtures import bus, helper, machine_restored, polkit_files, users, workdir

__all__ = ["bus", "helper", "machine_restored", "polkit_files", "users", "workdir"]


@pytest.fixture
def ansible(tmp_path: Path) -> Ansible:
    home = tmp_path / "ansible-home"
    home.mkdir()
    return Ansible(home)
