"""Real parts for the root helper's tests (the fixtures are in helper_fixtures.py): a private system-like
dbus-daemon, polkitd with our action and an example rule, two unprivileged users (one in the `autoglm` group),
and the real helper as a subprocess. Every helper test snapshots all catalogue knobs and /proc/swaps and must
leave them as it found them (the fixture restores them and fails the test otherwise).

Needs root, a real kernel with /proc/sys and zswap, dbus-daemon and polkitd (tests/run installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from autoglm_helper import knobs
from autoglm_helper.contract import catalogue
from autoglm_helper.contract.bus import BUS_NAME, INTERFACE, OBJECT_PATH
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POLKITD = "/usr/lib/polkit-1/polkitd"
ACTION_FILE = Path("/usr/share/polkit-1/actions/io.github.autoglm_tune.policy")
RULE_FILE = Path("/etc/polkit-1/rules.d/50-autoglm-tune.rules")
DENIED_USER, ALLOWED_USER, GROUP = "agt-helper-denied", "agt-helper-allowed", "autoglm"
SWAP_DIR_ROOT = "/var/lib/autoglm-tune"

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
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <includedir>{confdir}</includedir>
</busconfig>
"""


def _wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Bus:
    """A private system-like dbus-daemon (optionally with polkitd on it)."""

    def __init__(self, workdir: Path, with_polkit: bool) -> None:
        self.dir = workdir
        confdir = workdir / "system.d"
        confdir.mkdir(parents=True)
        workdir.chmod(0o755)
        shutil.copy(ROOT / "systemd/dbus/io.github.autoglm_tune.Helper1.conf", confdir)
        shutil.copy("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf", confdir)
        self.socket = workdir / "system_bus_socket"
        (workdir / "system.conf").write_text(BUS_CONF.format(socket=self.socket, confdir=confdir))
        self.address = f"unix:path={self.socket}"
        with open(workdir / "daemon.log", "w") as log:
            self.daemon = subprocess.Popen(
                ["dbus-daemon", f"--config-file={workdir / 'system.conf'}", "--nofork"], stderr=log
            )
        _wait(self.socket.exists, "the bus socket")
        self.polkitd: subprocess.Popen[bytes] | None = None
        if with_polkit:
            with open(workdir / "polkitd.log", "w") as log:
                self.polkitd = subprocess.Popen(
                    [POLKITD, "--no-debug"], env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address},
                    stdout=log, stderr=subprocess.STDOUT,
                )
            client = Client(self.address)
            _wait(lambda: client.has_owner("org.freedesktop.PolicyKit1"), "polkitd on the bus")
            client.close()

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def stop(self) -> None:
        for proc in (self.polkitd, self.daemon):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


class Client:
    """A synchronous D-Bus client with its own event loop (tests and hypothesis are synchronous)."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus: MessageBus = self.loop.run_until_complete(self._connect(address))

    @staticmethod
    async def _connect(address: str) -> MessageBus:
        return await MessageBus(bus_address=address).connect()

    def message(self, member: str, signature: str, body: list[Any]) -> Message:
        return Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=member,
                       signature=signature, body=body)

    def raw(self, msg: Message, timeout: float = 60) -> Message:
        return self.loop.run_until_complete(asyncio.wait_for(self.bus.call(msg), timeout))

    def call(self, member: str, signature: str = "", body: list[Any] | None = None) -> Message:
        return self.raw(self.message(member, signature, body or []))

    def ok(self, member: str, *args: Any) -> dict[str, Any]:
        """Apply/Rollback (sbb) or Status (); the decoded report, failing on an error reply."""
        reply = self.call(member, "sbb" if args else "", list(args))
        assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return json.loads(reply.body[0])

    def error(self, member: str, *args: Any) -> tuple[str, str]:
        reply = self.call(member, "sbb" if args else "", list(args))
        assert reply.message_type == MessageType.ERROR, reply.body
        return reply.error_name or "", reply.body[0]

    def has_owner(self, name: str) -> bool:
        reply = self.raw(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                 interface="org.freedesktop.DBus", member="NameHasOwner", signature="s", body=[name]))
        return bool(reply.body[0])

    def settle(self, seconds: float) -> None:
        """Let the loop run (flush writes, receive) for a while."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(EOFError, OSError):
            self.loop.run_until_complete(self.bus.wait_for_disconnect())
        self.loop.close()


class Helper:
    """The real helper, as a subprocess on a private bus, with its own state directory."""

    def __init__(self, bus: Bus, state_dir: Path) -> None:
        self.bus = bus
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Client | None = None

    def start(self, *extra: str) -> Helper:
        with open(self.state_dir.parent / "helper.log", "a") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "autoglm-tune-helper"), "--state-dir", str(self.state_dir), *extra],
                env=self.bus.env(), stdout=log, stderr=subprocess.STDOUT,
            )
        if self.client is None:
            self.client = Client(self.bus.address)
        client = self.client
        _wait(lambda: client.has_owner(BUS_NAME) or self.proc.poll() is not None, "the helper on the bus")
        assert self.proc.poll() is None, f"the helper exited with {self.proc.returncode}"
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        client = self.client
        assert client is not None
        _wait(lambda: not client.has_owner(BUS_NAME), "the helper's name to vanish")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def journal(self) -> list[dict[str, Any]]:
        tx_dir = self.state_dir / "tx"
        return sorted((json.loads(p.read_text()) for p in tx_dir.glob("*.json")), key=lambda t: t["started_ns"])

    def audit(self) -> list[dict[str, Any]]:
        path = self.state_dir / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- the machine: read and restore every knob the helper may touch ---------------------------


def read_knobs() -> dict[str, str]:
    out = {}
    for knob in catalogue.SCALAR_KNOBS.values():
        path = Path("/") / knob.path
        if path.exists():
            out[knob.name] = path.read_text().strip()
    return out


def machine() -> dict[str, Any]:
    return {"knobs": read_knobs(), "swaps": Path("/proc/swaps").read_text(),
            "var_lib": os.path.exists(SWAP_DIR_ROOT)}


def restore_knobs(saved: dict[str, str]) -> None:
    for name, value in saved.items():
        path = Path("/") / catalogue.SCALAR_KNOBS[name].path
        if path.read_text().strip() != value:
            path.write_text(value)



def cli(bus: Bus, *args: str, user: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed autoglm-tune CLI against the private bus, as root or as `user`."""
    argv = [str(BIN / "autoglm-tune"), *args]
    if user is not None:
        command = f"DBUS_SYSTEM_BUS_ADDRESS={bus.address} exec " + " ".join(map(shlex.quote, argv))
        argv = ["su", "-s", "/bin/sh", user, "-c", command]
    return subprocess.run(argv, env=bus.env(), capture_output=True, text=True, input=stdin, timeout=120)


def scalar_change(knob: str, current: Any, target: Any) -> dict[str, Any]:
    return {"knob": knob, "current": current, "target": target, "persistence": "runtime", "reason": "test"}


def plan_json(*changes: dict[str, Any]) -> str:
    return json.dumps({"version": 1, "changes": list(changes)})


def full_plan() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A change to every scalar knob this kernel has (zswap switched last); returns (changes, targets)."""
    now = {name: live(name) for name in read_knobs()}
    targets: dict[str, Any] = {}
    for name, value in now.items():
        knob = catalogue.SCALAR_KNOBS[name]
        if knob.kind == "bool":
            targets[name] = not value
        elif knob.kind == "word":
            targets[name] = next(c for c in knobs.compressors() if c != value)
        else:
            assert knob.maximum is not None
            targets[name] = value + 1 if value < knob.maximum else value - 1
    order = sorted(targets, key=lambda n: n == "zswap.enabled")
    return [scalar_change(n, now[n], targets[n]) for n in order], targets


def live(knob: str) -> Any:
    return catalogue.SCALAR_KNOBS[knob].parse((Path("/") / catalogue.SCALAR_KNOBS[knob].path).read_text())
