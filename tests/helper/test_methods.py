"""The one declaration per method (autoglm_helper.contract.bus.METHODS) is what the helper serves: each is
exported on the bus with its arguments, has a handler taking exactly those arguments, and a call that does not
match its signature is refused naming the declared arguments."""

from __future__ import annotations

import inspect

import pytest
from autoglm_helper.contract.bus import BUS_NAME, ERROR_PREFIX, INTERFACE, METHODS, OBJECT_PATH
from autoglm_helper.service import Helper as Service
from dbus_fast import Message, MessageType
from dbus_fast.introspection import Node
from helper_parts import Helper


def test_every_declared_method_is_exported_with_its_signature(helper: Helper) -> None:
    reply = helper.c.raw(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                 interface="org.freedesktop.DBus.Introspectable", member="Introspect"))
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    (iface,) = (i for i in Node.parse(reply.body[0]).interfaces if i.name == INTERFACE)
    exported = {m.name: ([(a.name, a.signature) for a in m.in_args], [a.signature for a in m.out_args])
                for m in iface.methods}
    declared = {m.name: ([(a.name, a.type) for a in m.args], ["s"]) for m in METHODS.values()}
    assert exported == declared


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_declared_method_has_a_handler_taking_its_arguments(name: str) -> None:
    params = list(inspect.signature(getattr(Service, "do_" + name)).parameters)
    assert params == ["self", "caller", "fds", *(a.name for a in METHODS[name].args)]


def test_no_handler_is_left_without_a_declaration() -> None:
    assert {n.removeprefix("do_") for n in dir(Service) if n.startswith("do_")} == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_call_with_another_signature_is_refused_naming_the_declared_arguments(helper: Helper, name: str) -> None:
    reply = helper.c.call(name, "ss", ["x", "y"])
    wanted = ", ".join(f"{a.name} {a.type}" for a in METHODS[name].args)
    assert reply.message_type == MessageType.ERROR and reply.error_name == ERROR_PREFIX + "InvalidArgs"
    assert reply.body[0] == f"{name}: arguments (ss) do not match; allowed: ({wanted})"


def test_a_dry_run_flag_names_a_boolean_argument() -> None:
    for method in METHODS.values():
        if method.dry_run_arg is not None:
            assert [a.type for a in method.args if a.name == method.dry_run_arg] == ["b"]
