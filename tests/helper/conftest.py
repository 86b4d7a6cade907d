"""Fixtures for the root helper's tests; they live in helper_fixtures.py, which tests/ansible uses too."""

from helper_fixtures import bus, helper, machine_restored, polkit_files, users, workdir

__all__ = ["bus", "helper", "machine_restored", "polkit_files", "users", "workdir"]
