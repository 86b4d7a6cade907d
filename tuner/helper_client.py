"""D-Bus client of the root helper. Its errors become typed exceptions (exit codes) here, in one place.

Honours DBUS_SYSTEM_BUS_ADDRESS like every D-Bus program (dbus-fast's BusType.SYSTEM does).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from autoglm_helper.contract.bus import BUS_NAME, ERROR_PREFIX, INTERFACE, METHODS, OBJECT_PATH
from dbus_fast import BusType, Message, MessageType
from dbus_fast._private.address import get_bus_address  # what BusType.SYSTEM connects to: the env or the default
from dbus_fast.aio import MessageBus

from .errors import (
    EXIT_DIFFERS,
    EXIT_FAILED_ROLLED_BACK,
    EXIT_HELPER_UNREACHABLE,
    EXIT_NOT_AUTHORIZED,
    BadInput,
    TuneError,
)

CALL_TIMEOUT = 600.0  # swapoff of a large area can take minutes


class Drift(TuneError):
    """Live values differ from what the plan (or the applied transaction) expected: exit 1, nothing changed."""

    exit_code = EXIT_DIFFERS


class NotAuthorized(TuneError):
    exit_code = EXIT_NOT_AUTHORIZED


class FailedRolledBack(TuneError):
    """A step failed; the helper undid the steps already done."""

    exit_code = EXIT_FAILED_ROLLED_BACK


class HelperUnreachable(TuneError):
    exit_code = EXIT_HELPER_UNREACHABLE


HELPER_ERRORS: dict[str, type[TuneError]] = {
    "InvalidArgs": BadInput,
    "NotSupported": BadInput,
    "Drift": Drift,
    "NotAuthorized": NotAuthorized,
    "Failed": FailedRolledBack,
    "Busy": HelperUnreachable,  # too many calls of this uid in flight: nothing was done, try again
}
BUS_ERRORS: dict[str, type[TuneError]] = {"org.freedesktop.DBus.Error.AccessDenied": NotAuthorized}


# Where the example polkit rule is, in the source tree and the installed package (autoglm_tune/systemd/polkit/).
GROUP_RULE = "systemd/polkit/50-autoglm-tune.rules"


def not_authorized_hint(member: str) -> str:
    """What lets the caller through: the polkit action of `member` and the example group rule, or sudo."""
    action = METHODS[member].action if member in METHODS else None
    what = f"polkit action {action}" if action else "the bus policy"
    return (f"{what}: the example rule {GROUP_RULE} grants it to the group autoglm (copy it to /etc/polkit-1/rules.d/, "
            "then 'sudo usermod -aG autoglm $USER' and log in again), or run with sudo")


def unreachable_hint() -> str:
    """Which bus was tried and what puts the helper on it."""
    source = "from DBUS_SYSTEM_BUS_ADDRESS" if os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") else "the default"
    return (f"system bus {get_bus_address(BusType.SYSTEM)} ({source}); install the helper with "
            "'sudo autoglm-tune system install' and make sure dbus is running")


def error_for(name: str, text: str, member: str = "") -> TuneError:
    """The typed exception for a D-Bus error reply: the one mapping of helper errors to exit codes."""
    kind = name.removeprefix(ERROR_PREFIX)
    if name.startswith(ERROR_PREFIX) and kind in HELPER_ERRORS:
        error = HELPER_ERRORS[kind]
        return error(f"{text}; {not_authorized_hint(member)}" if error is NotAuthorized else text)
    if BUS_ERRORS.get(name) is NotAuthorized:
        return NotAuthorized(f"the bus refused {member or 'the call'} ({name}: {text}); {not_authorized_hint(member)}")
    return HelperUnreachable(f"the root helper did not answer ({name}: {text}) on the {unreachable_hint()}")


async def _call(member: str, signature: str, body: list[Any], fds: list[int] | None = None) -> dict[str, Any]:
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=bool(fds)).connect()
    except Exception as exc:  # any failure to connect or authenticate means: no helper to talk to
        raise HelperUnreachable(f"cannot connect to the {unreachable_hint()} ({exc})") from None
    try:
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            signature=signature,
            body=body,
            unix_fds=fds or [],
        )
        reply = await asyncio.wait_for(bus.call(msg), CALL_TIMEOUT)
    except TimeoutError:
        raise HelperUnreachable(f"the root helper did not answer {member} within {CALL_TIMEOUT:.0f} s") from None
    finally:
        bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        raise error_for(reply.error_name or "", reply.body[0] if reply.body else "", member)
    return json.loads(reply.body[0])


def apply(plan: dict[str, Any], dry_run: bool, force: bool) -> dict[str, Any]:
    return asyncio.run(_call("Apply", "sbb", [json.dumps(plan), dry_run, force]))


def rollback(txid: str, dry_run: bool, force: bool) -> dict[str, Any]:
    return asyncio.run(_call("Rollback", "sbb", [txid, dry_run, force]))


def status() -> dict[str, Any]:
    return asyncio.run(_call("Status", "", []))


def set_process(pid: int, settings: dict[str, int], dry_run: bool) -> dict[str, Any]:
    """Negative nice / oom_score_adj for the caller's own process, within the helper's bounds."""
    return asyncio.run(_call("SetProcess", "usb", [pid, json.dumps(settings), dry_run]))


def start_model(unit: dict[str, Any], log_fd: int) -> dict[str, Any]:
    """The model as a transient systemd unit run as the caller; its output goes to `log_fd`."""
    return asyncio.run(_call("StartModel", "sh", [json.dumps(unit), 0], [log_fd]))


def stop_model(unit: str) -> dict[str, Any]:
    return asyncio.run(_call("StopModel", "s", [unit]))
