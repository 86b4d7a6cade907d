"""Typed errors, each with its exit code; `fail` is the one place a command turns one into its line and code."""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_DIFFERS = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_AUTHORIZED = 3
EXIT_FAILED_ROLLED_BACK = 4
EXIT_HELPER_UNREACHABLE = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended


class TuneError(Exception):
    """Base class: a message for the user and the exit code it maps to."""

    exit_code = 1


class BadInput(TuneError):
    """A policy file, flag, facts file or plan the tool cannot use: exit 2, nothing changed."""

    exit_code = EXIT_BAD_INPUT


class Interrupted(TuneError):
    """Ctrl-C: the line says whether the root helper committed."""

    exit_code = EXIT_INTERRUPTED


def fail(exc: TuneError) -> SystemExit:
    """Print the one-line error and return the exit to raise (`raise fail(exc) from None`)."""
    print(f"autoglm-tune: error: {exc}", file=sys.stderr, flush=True)
    return SystemExit(exc.exit_code)
