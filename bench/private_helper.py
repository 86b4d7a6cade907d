#!/usr/bin/env python3
"""Run a command with the root helper on a private system-like D-Bus, for machines without a system bus
(e.g. a CI VM whose PID 1 is not systemd): the `autoglm-tune` config of `autoglm-tune bench` needs it.

    sudo /opt/autoglm-venv/bin/python bench/private_helper.py -- autoglm-tune bench ...

Starts dbus-daemon (no polkitd: the helper then allows uid 0 only) and the installed
`autoglm-tune-helper` with a temporary state directory, runs the command with DBUS_SYSTEM_BUS_ADDRESS
set, passes SIGINT/SIGTERM/SIGHUP on to it, and stops both daemons afterwards. Exit status: the command's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from autoglm_helper.contract.bus import BUS_NAME
from dbus_fast import Message
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/><allow receive_type="method_return"/>
    <allow receive_type="error"/><allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <includedir>{confdir}</includedir>
</busconfig>
"""


async def _has_owner(address: str, name: str) -> bool:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                    member="NameHasOwner", signature="s", body=[name])
        )
        return bool(reply and reply.body[0])
    finally:
        bus.disconnect()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def private_helper() -> Iterator[str]:
    """A private bus with the helper on it; yields the bus address. Everything is stopped and removed after."""
    work = Path(tempfile.mkdtemp(prefix="autoglm-private-helper-"))
    work.chmod(0o755)
    confdir = work / "system.d"
    confdir.mkdir()
    shutil.copy(ROOT / "systemd/dbus/io.github.autoglm_tune.Helper1.conf", confdir)
    socket = work / "system_bus_socket"
    (work / "system.conf").write_text(BUS_CONF.format(socket=socket, confdir=confdir))
    address = f"unix:path={socket}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(work / "daemon.log", "wb") as log:
            procs.append(subprocess.Popen(["dbus-daemon", f"--config-file={work / 'system.conf'}", "--nofork"],
                                          stderr=log))
        deadline = time.monotonic() + 10
        while not socket.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("dbus-daemon did not create its socket")
            time.sleep(0.02)
        with open(work / "helper.log", "wb") as log:
            procs.append(subprocess.Popen(
                [str(BIN / "autoglm-tune-helper"), "--state-dir", str(work / "state"), "--idle-timeout", "0"],
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}, stdout=log, stderr=subprocess.STDOUT,
            ))
        while not asyncio.run(_has_owner(address, BUS_NAME)):
            if procs[-1].poll() is not None or time.monotonic() > deadline + 20:
                raise TimeoutError(f"the helper did not come up: {(work / 'helper.log').read_text()}")
            time.sleep(0.05)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: private_helper.py -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    with private_helper() as address:
        child = subprocess.Popen(argv, env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address})
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: child.send_signal(s))
        return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
