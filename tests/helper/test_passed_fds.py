"""Descriptors passed to the helper are closed exactly once, whatever arrives while a call is served.

dbus-fast hands a message that carries no descriptors the unmarshaller's own list, and appends the next
message's descriptors to that same list. On Debian 13 (dbus 1.16) that next message is the
GetConnectionCredentials reply with the caller's pidfd, so the helper closed it twice, its call died with
EBADF and `sudo autoglm-tune apply` waited for a reply that never came. Here another client's descriptor
arrives while an Apply is in flight, which is the same aliasing on this machine's dbus 1.14."""

from __future__ import annotations

import asyncio
import json
import os

from autoglm_helper.contract.bus import BUS_NAME, INTERFACE, OBJECT_PATH
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from helper_parts import Helper


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def apply_while_a_descriptor_arrives(address: str) -> Message:
    caller = await MessageBus(bus_address=address).connect()
    sender = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    try:
        apply = caller.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member="Apply",
                                    signature="sbb", body=[json.dumps({"version": 1, "changes": []}), False, False]))
        pending = asyncio.ensure_future(apply)
        await asyncio.sleep(0)
        with open("/dev/null") as devnull:  # Status takes no arguments: refused, its descriptor closed
            wrong = await asyncio.wait_for(sender.call(Message(
                destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member="Status", signature="h",
                body=[0], unix_fds=[devnull.fileno()])), 30)
        assert wrong.error_name == "io.github.autoglm_tune.Helper1.Error.InvalidArgs", wrong.body
        return await asyncio.wait_for(pending, 30)
    finally:
        caller.disconnect()
        sender.disconnect()


def test_a_descriptor_arriving_during_a_call_is_closed_once_and_the_call_answered(helper: Helper) -> None:
    assert helper.proc is not None
    before = open_fds(helper.proc.pid)
    for _ in range(20):
        reply = asyncio.run(apply_while_a_descriptor_arrives(helper.bus.address))
        assert reply.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR)
        assert reply.error_name != "org.freedesktop.DBus.Error.NoReply"
    helper.c.settle(0.2)
    assert helper.proc.poll() is None
    assert open_fds(helper.proc.pid) == before  # none kept open, none of its own closed
    assert "Bad file descriptor" not in (helper.state_dir.parent / "helper.log").read_text()
