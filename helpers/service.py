"""The root helper on the system bus: authorize, audit, run one transaction at a time, exit when idle.

dbus-fast method handlers do not see the sender, so a message handler takes every call to our
interface: it asks the bus daemon who the caller is, authorizes through polkit, runs the engine
in a worker thread under one lock, audits, and replies. The exported ServiceInterface only serves
introspection, the Version property and the Changed signal.
"""

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import sys
import syslog
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, dbus_signal

from . import model
from .contract.bus import (
    BUS_NAME,
    CHANGED_RESULTS,
    ERROR_PREFIX,
    INTERFACE,
    METHODS,
    OBJECT_PATH,
    HelperError,
    Method,
    Report,
)
from .contract.catalogue import clip
from .transaction import Engine
from .units import SYSTEMD, Systemd

# Calls one uid may have in flight at once (each connection, until the bus tells who is behind it); more are
# refused with Busy. Root is not limited: it already may do anything, and is the only caller of a fleet's tooling.
MAX_CALLS_IN_FLIGHT = 4
KNOWN_SENDERS = 1024  # remembered sender → uid pairs (a unique bus name is never reused, so an entry stays true)
TEXT_CHARS = 16 * 1024  # the most of one error text the reply and the audit line carry
DEFAULT_STATE_DIR = "/var/lib/autoglm-tune"
log = logging.getLogger("autoglm-tune-helper")
Caller = dict[str, Any]  # uid and pid, from the bus daemon
Fds = tuple[int, ...]  # the descriptors passed with the call

try:
    VERSION = version("autoglm-tune")
except PackageNotFoundError:
    VERSION = "unknown"


class HelperInterface(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(INTERFACE)

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":  # type: ignore[name-defined]  # noqa: F821 (a D-Bus type, as dbus-fast reads it)
        return VERSION

    @dbus_signal()
    def Changed(self, txid: "s") -> "s":  # type: ignore[name-defined]  # noqa: F821
        return txid

    def introspect(self) -> intr.Interface:
        """The methods are served by the message handler; list them for introspection here."""
        iface = super().introspect()
        for method in METHODS.values():
            args = [intr.Arg(a.type, intr.ArgDirection.IN, a.name) for a in method.args]
            iface.methods.append(intr.Method(method.name, args, [intr.Arg("s", intr.ArgDirection.OUT, "report_json")]))
        return iface


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode(errors="surrogatepass"))


def check_arguments(msg: Message, method: Method) -> HelperError | None:
    """The signature and the size of every string argument, before anything parses or keeps them. The error is
    returned, not raised: a raised one's traceback would keep this frame, and the oversize string in it, alive."""
    if msg.signature != method.signature:
        wanted = ", ".join(f"{a.name} {a.type}" for a in method.args)
        return HelperError("InvalidArgs", f"{method.name}: arguments ({clip(msg.signature)}) do not match; "
                           f"allowed: ({wanted})")
    for arg, value in zip(method.args, msg.body, strict=True):
        cap = arg.max_bytes
        if cap is not None and (len(value) > cap or _utf8_len(value) > cap):
            return HelperError("InvalidArgs", f"{arg.name}: {_utf8_len(value)} bytes is too long; allowed: at most "
                               f"{cap} bytes")
    return None


class Helper:
    def __init__(self, engine: Engine, audit_path: str, idle_timeout: float) -> None:
        self.engine = engine
        self.audit_path = audit_path
        self.idle_timeout = idle_timeout
        self.lock = asyncio.Lock()
        self.busy = 0
        self.last_call = time.monotonic()
        self.interface = HelperInterface()
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight: dict[int | str, int] = {}  # calls being served, by uid (or by sender, until its uid is known)
        self.uids: dict[str, int] = {}  # sender → uid, for callers seen before
        self.bus: MessageBus

    def audit(self, caller: dict[str, Any], method: str, report: dict[str, Any], result: str, detail: str) -> None:
        """Every call, allowed or denied: one syslog line and one JSON line in the audit file."""
        changes = [{"subject": c["subject"], "old": c["old"], "new": c["target"] if c.get("new") is None else c["new"]}
                   for c in report.get("changes", [])]
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **caller, "method": method,
                 "txid": report.get("txid", ""), "result": result, "detail": detail, "changes": changes}
        line = json.dumps(entry)
        syslog.syslog(syslog.LOG_NOTICE if result != "denied" else syslog.LOG_WARNING, line)
        try:
            fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # the call is answered anyway; syslog has the line
            log.exception("cannot write the audit file %s", self.audit_path)

    async def _dbus(self, dest: str, path: str, iface: str, member: str, sig: str, body: list[Any]) -> Message:
        return await self.bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                           signature=sig, body=body))

    async def credentials(self, sender: str) -> dict[str, Any]:
        reply = await self._dbus("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                 "GetConnectionCredentials", "s", [sender])
        if reply.message_type != MessageType.METHOD_RETURN:
            raise HelperError("NotAuthorized", f"the bus does not know the caller {sender}")
        creds = reply.body[0]
        return {"uid": creds["UnixUserID"].value, "pid": creds["ProcessID"].value if "ProcessID" in creds else None}

    async def authorize(self, sender: str, caller: dict[str, Any], action: str) -> None:
        """polkit decides; when polkit is not on the bus (or fails), only uid 0 is allowed."""
        reply = await self._dbus(
            "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority", "CheckAuthorization", "(sa{sv})sa{ss}us",
            [["system-bus-name", {"name": Variant("s", sender)}], action, {}, 1, ""])
        polkit_answered = reply.message_type == MessageType.METHOD_RETURN
        allowed = bool(reply.body[0][0]) if polkit_answered else caller["uid"] == 0
        if not allowed:
            raise HelperError("NotAuthorized", f"uid {caller['uid']} is not authorized for {action}")

    def on_message(self, msg: Message) -> bool | None:
        # The descriptors that came with this message, taken now: dbus-fast hands a message with none the
        # unmarshaller's own list, which the next message's descriptors are then appended to (dbus 1.16's
        # GetConnectionCredentials reply carries the caller's pidfd). Each descriptor is closed exactly once.
        fds = tuple(msg.unix_fds)
        method = METHODS.get(msg.member or "")
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != OBJECT_PATH
                or msg.interface != INTERFACE or method is None):
            for fd in fds:  # descriptors sent along with anything else are not kept open
                os.close(fd)
            return None
        refusal = check_arguments(msg, method)
        if refusal is not None:
            msg.body = []  # an oversize argument is not kept while the caller is looked up for the audit
        counted = None
        if refusal is None:
            counted = self.uids.get(msg.sender, msg.sender)
            refusal = self._enter(counted)
        task = asyncio.ensure_future(self.serve(msg, method, fds, refusal, None if refusal else counted))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def _enter(self, key: int | str) -> HelperError | None:
        """Count one more call of `key` (a uid, or a sender whose uid is not known yet), or say why not."""
        if key == 0:
            return None
        if self.in_flight.get(key, 0) >= MAX_CALLS_IN_FLIGHT:
            who = f"uid {key}" if isinstance(key, int) else f"the connection {key}"
            return HelperError("Busy", f"{who} has {MAX_CALLS_IN_FLIGHT} calls in flight; allowed: at most "
                               f"{MAX_CALLS_IN_FLIGHT} at once, try again when one has been answered")
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        return None

    def _leave(self, key: int | str | None) -> None:
        if key is None or key == 0:
            return
        self.in_flight[key] -= 1
        if not self.in_flight[key]:
            del self.in_flight[key]

    def _known(self, sender: str, uid: int) -> None:
        if sender not in self.uids and len(self.uids) >= KNOWN_SENDERS:
            del self.uids[next(iter(self.uids))]
        self.uids[sender] = uid

    async def serve(self, msg: Message, method: Method, fds: Fds, refusal: HelperError | None,
                    counted: int | str | None) -> None:
        """Answer one call: `refusal` is what on_message already refused it for, `counted` the key it is counted
        under in in_flight (None: not counted)."""
        self.busy += 1
        caller: dict[str, Any] = {"uid": None, "pid": None}
        report: dict[str, Any] = {}
        try:
            caller = await self.credentials(msg.sender)
            if refusal is not None:
                raise refusal
            if isinstance(counted, str):  # the first call of this sender: count it under its uid from now on
                self._known(msg.sender, caller["uid"])
                self._leave(counted)
                counted = None
                busy = self._enter(caller["uid"])
                if busy is not None:
                    raise busy
                counted = caller["uid"]
            if method.action is not None and not method.is_dry_run(msg.body):
                await self.authorize(msg.sender, caller, method.action)
            report = await self.call(msg, method, caller, fds)
            reply = Message.new_method_return(msg, "s", [json.dumps(report)])
            result, detail = report["result"], ""
        except OSError as exc:  # systemd refused or a /proc write failed: the caller gets the reason
            reply = Message.new_error(msg, ERROR_PREFIX + "Failed", clip(str(exc), TEXT_CHARS))
            result, detail = "error", clip(str(exc), TEXT_CHARS)
        except HelperError as exc:
            report = exc.report
            reply = Message.new_error(msg, ERROR_PREFIX + exc.kind, clip(str(exc), TEXT_CHARS))
            result, detail = ("denied" if exc.kind == "NotAuthorized" else exc.kind), clip(str(exc), TEXT_CHARS)
        except Exception as exc:  # never crash on a caller's input; the audit and the log keep the cause
            log.exception("%s failed", method.name)
            reply = Message.new_error(msg, ERROR_PREFIX + "Failed", f"internal error: {type(exc).__name__}")
            result, detail = "error", clip(repr(exc), TEXT_CHARS)
        finally:
            self._leave(counted)
        for fd in fds:  # systemd holds its own copy of a passed log descriptor
            os.close(fd)
        self.audit(caller, method.name, report, result, detail)
        self.bus.send(reply)
        if result in CHANGED_RESULTS and report.get("txid"):
            self.interface.Changed(report["txid"])
        self.busy -= 1
        self.last_call = time.monotonic()

    async def call(self, msg: Message, method: Method, caller: Caller, fds: Fds) -> Report:
        """Run one authorized method in a worker thread (the exclusive ones one at a time, under the lock)."""
        handler = getattr(self, "do_" + method.name)
        if not method.exclusive:
            return await asyncio.to_thread(handler, caller, fds, *msg.body)
        async with self.lock:
            return await asyncio.to_thread(handler, caller, fds, *msg.body)

    # ---- one handler per method of METHODS: do_<name>(caller, fds, *arguments) -------------------

    def do_Apply(self, caller: Caller, fds: Fds, plan_json: str, dry_run: bool, force: bool) -> Report:
        return self.engine.apply(plan_json, dry_run, force, caller)

    def do_Rollback(self, caller: Caller, fds: Fds, txid: str, dry_run: bool, force: bool) -> Report:
        return self.engine.rollback(txid, dry_run, force)

    def do_Status(self, caller: Caller, fds: Fds) -> Report:
        return {"result": "status", **self.engine.status()}

    def do_SetProcess(self, caller: Caller, fds: Fds, pid: int, settings_json: str, dry_run: bool) -> Report:
        return model.set_process(pid, caller["uid"], model.process_request(settings_json), dry_run)

    def do_StartModel(self, caller: Caller, fds: Fds, unit_json: str, log_fd: int) -> Report:
        if not 0 <= log_fd < len(fds):
            raise HelperError("InvalidArgs", "log_fd: no file descriptor was passed; allowed: the model log, "
                              "open for writing")
        request = model.unit_request(unit_json, os.cpu_count() or 1, model.mem_total())
        return model.start_model(self.engine.systemd, request, caller["uid"], fds[log_fd], caller["pid"])

    def do_StopModel(self, caller: Caller, fds: Fds, unit: str) -> Report:
        return model.stop_model(self.engine.systemd, unit, caller["uid"])

    async def recover(self) -> None:
        """Roll back what a crash left pending (unit steps need systemd, so this runs once connected). Nothing
        here stops the helper from starting: what recovery could not do stays in the journal for Status."""
        try:
            left = await asyncio.to_thread(self.engine.recover)
        except Exception:
            log.exception("recovery did not finish")
            return
        for tx in left:
            log.warning("recovered transaction %s left by a crash: now %s", tx["txid"], tx["state"])
            report = {"txid": tx["txid"], "changes": tx["steps"]}
            self.audit({"uid": 0, "pid": os.getpid()}, "Recover", report, tx["state"], "left pending by a crash")

    async def run(self) -> None:
        self.bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        owned = await self._dbus("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                 "NameHasOwner", "s", [SYSTEMD])
        if owned.message_type == MessageType.METHOD_RETURN and owned.body[0]:
            self.engine.use_systemd(Systemd(self.bus, asyncio.get_running_loop()))
        await self.recover()
        self.bus.add_message_handler(self.on_message)
        self.bus.export(OBJECT_PATH, self.interface)
        if await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE) != RequestNameReply.PRIMARY_OWNER:
            raise SystemExit(f"autoglm-tune-helper: {BUS_NAME} is already owned")
        while self.idle_timeout <= 0 or self.busy or time.monotonic() - self.last_call < self.idle_timeout:
            await asyncio.sleep(0.2 if self.idle_timeout <= 0 else min(0.2, self.idle_timeout))
            if not self.bus.connected and not self.busy:  # the bus went away (a test's private bus): done
                return
        await self.bus.release_name(BUS_NAME)
        self.bus.disconnect()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024


def _fixed_mmap_threshold() -> None:
    """Large buffers (a message of up to the bus's 32 MiB, the string unpacked from it) in their own mappings,
    returned to the kernel when freed. glibc otherwise raises its threshold to 32 MiB after the first such
    free, and a flood of big messages then fragments the heap: 600 MiB that stay resident."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator keeps its own rules
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="autoglm-tune-helper", description="autoglm-tune's root helper (D-Bus).")
    parser.add_argument("--state-dir", default=os.environ.get("AUTOGLM_TUNE_STATE_DIR", DEFAULT_STATE_DIR))
    parser.add_argument("--audit-log", help="JSON-lines audit file (default: STATE_DIR/audit.jsonl)")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="exit after this many idle seconds; 0: never")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="autoglm-tune-helper: %(message)s")
    syslog.openlog("autoglm-tune-helper", syslog.LOG_PID, syslog.LOG_DAEMON)
    if os.geteuid() != 0:
        sys.exit("autoglm-tune-helper: must run as root")
    os.umask(0o077)
    _fixed_mmap_threshold()
    engine = Engine(args.state_dir)
    helper = Helper(engine, args.audit_log or os.path.join(args.state_dir, "audit.jsonl"), args.idle_timeout)
    asyncio.run(helper.run())
