"""The pure parts of the model-process methods and of `status`: what the helper accepts for a transient unit,
the D-Bus properties it sends systemd, and the status lines. No machine needed."""

from __future__ import annotations

import json

import pytest
from autoglm_helper import model
from autoglm_helper.contract.bus import HelperError
from autoglm_helper.contract.catalogue import MODEL_MEMORY_SHARE_MAX
from autoglm_tune.model_status import model_lines

GIB = 1 << 30
GOOD = {"argv": ["/usr/bin/llama-server", "-m", "/m.gguf"], "environment": {"OMP_NUM_THREADS": "2"}, "port": 8080,
        "cpus": [2, 3], "sched_policy": "batch", "nice": -5, "io_class": "best-effort", "io_priority": 4,
        "oom_score_adj": -500, "memory_low": GIB, "memory_high": 0, "memlock": 2 * GIB}


def test_unit_request_and_properties() -> None:
    req = model.unit_request(json.dumps(GOOD), cpu_count=4, mem_total=8 * GIB)
    props = {name: value for name, value in model.unit_properties(req, 1000, 0, "session-3.scope")}
    assert props["User"].value == "1000" and props["NoNewPrivileges"].value is True
    assert props["Slice"].value == "user-1000.slice" and props["TasksMax"].value == model.TASKS_MAX
    assert props["BindsTo"].value == props["After"].value == ["session-3.scope"]
    assert props["ExecStart"].value == [["/usr/bin/llama-server", GOOD["argv"], False]]
    assert props["CPUAffinity"].value == bytes([0b1100])
    assert props["CPUSchedulingPolicy"].value == 3 and props["Nice"].value == -5
    assert props["CPUWeight"].value == 305  # nice -5's CFS weight, 3121 of nice 0's 1024, on systemd's 100
    assert props["IOSchedulingClass"].value == 2 and props["IOSchedulingPriority"].value == 4
    assert props["OOMScoreAdjust"].value == -500 and props["MemoryLow"].value == GIB
    assert "MemoryHigh" not in props  # 0: none
    assert props["LimitMEMLOCK"].value == props["LimitMEMLOCKSoft"].value == 2 * GIB
    assert props["StandardOutputFileDescriptor"].signature == "h" and props["StandardErrorFileDescriptor"].value == 0
    assert props["Environment"].value == ["OMP_NUM_THREADS=2"]
    assert props["Type"].value == "exec" and props["WorkingDirectory"].value == "/"
    signatures = {name: value.signature for name, value in props.items()}
    assert signatures == {
        "Description": "s", "Type": "s", "ExecStart": "a(sasb)", "User": "s", "WorkingDirectory": "s",
        "Environment": "as", "CPUAffinity": "ay", "NoNewPrivileges": "b", "CollectMode": "s",
        "TimeoutStopUSec": "t", "CPUSchedulingPolicy": "i", "Nice": "i", "IOSchedulingClass": "i",
        "IOSchedulingPriority": "i", "OOMScoreAdjust": "i", "MemoryLow": "t", "LimitMEMLOCK": "t",
        "LimitMEMLOCKSoft": "t", "StandardOutputFileDescriptor": "h", "StandardErrorFileDescriptor": "h",
        "Slice": "s", "TasksMax": "t", "BindsTo": "as", "After": "as", "CPUWeight": "t",
    }  # systemd's types for each property (org.freedesktop.systemd1(5))
    unbound = {n for n, _ in model.unit_properties(req, 1000, 0)}  # a caller outside any session
    assert "Slice" in unbound and "TasksMax" in unbound and not unbound & {"BindsTo", "After"}
    dollar = model.unit_request(json.dumps({**GOOD, "argv": ["/bin/echo", "$HOME"]}), 4, 8 * GIB)
    exec_start = {n: v for n, v in model.unit_properties(dollar, 1, None)}["ExecStart"].value
    assert exec_start == [["/bin/echo", ["/bin/echo", "$$HOME"], False]]  # systemd would expand $HOME
    assert model.unit_name(1000, 8080) == "autoglm-model-1000-8080.service"
    wide = model.unit_request(json.dumps({**GOOD, "cpus": [9]}), cpu_count=16, mem_total=8 * GIB)
    assert {n: v for n, v in model.unit_properties(wide, 0, None)}["CPUAffinity"].value == bytes([0, 2])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"argv": []}, "argv: not a list of strings"),
        ({"argv": ["/bin/x", "a\0b"]}, "argv: not a list of strings"),
        ({"environment": {"BAD NAME": "x"}}, "environment: not an object"),
        ({"cpus": [4]}, "allowed: CPU numbers 0–3"),
        ({"cpus": [True]}, "cpus:"),
        ({"nice": -11}, "allowed: an integer -10–19"),
        ({"oom_score_adj": -901}, "allowed: an integer -900–1000"),
        ({"memlock": int(8 * GIB * MODEL_MEMORY_SHARE_MAX) + 1}, "memlock:"),
        ({"sched_policy": "fifo"}, "allowed: other, batch, idle"),
        ({"port": 0}, "port:"),
        ({"ExecStartPre": ["/bin/sh"]}, "unit.ExecStartPre: unknown key"),
        ({"working_directory": "relative"}, "working_directory:"),
    ],
)
def test_unit_request_refusals(change: dict, needle: str) -> None:
    with pytest.raises(HelperError) as caught:
        model.unit_request(json.dumps({**GOOD, **change}), cpu_count=4, mem_total=8 * GIB)
    assert caught.value.kind == "InvalidArgs" and needle in str(caught.value), str(caught.value)


def test_stop_model_names() -> None:
    for bad in ("dbus.service", "autoglm-model-x-1.service", "../autoglm-model-1-1.service", 5):
        with pytest.raises(HelperError, match="is not a model unit"):
            model.stop_model(None, bad, 1000)
    with pytest.raises(HelperError) as caught:
        model.stop_model(None, "autoglm-model-1001-8080.service", 1000)
    assert caught.value.kind == "NotAuthorized"


def test_status_lines() -> None:
    record = {"pid": 42, "url": "http://127.0.0.1:8080/health", "log": "/l", "unit": "autoglm-model-1-8080.service"}
    process = {"pid": 42, "cpus": "2-3", "threads": 5, "nice": -5, "sched_policy": "batch", "io_class": "idle",
               "io_priority": 0, "oom_score_adj": 0, "rss_kib": 2048, "uss_kib": 1024, "swap_kib": 0,
               "locked_kib": None}
    pressure = {"cgroup": "/system.slice/autoglm-model-1-8080.service", "some_ms": 1500.0, "some_avg10": 2.5,
                "full_ms": 400.0, "full_avg10": 0.75}
    delays = {"pid": 42, "threads": 5, "delay_accounting": True, "blkio_delay_ms": 30.0, "cpu_delay_ms": 7.0,
              "memory_pressure": pressure}
    lines = model_lines(record, process, delays)
    assert lines[0] == "model: http://127.0.0.1:8080/health (pid 42, unit autoglm-model-1-8080.service, log /l)"
    assert "  cpus 2-3, threads 5" in lines and "  memory RSS 2 MiB (its own 1 MiB), swap 0 MiB, locked ?" in lines
    assert lines[-2] == "  delays over 5 threads: block I/O 30 ms, waiting for a CPU 7 ms"
    assert lines[-1] == ("  memory pressure of /system.slice/autoglm-model-1-8080.service: stalled 1500 ms "
                         "(all tasks 400 ms); last 10 s 2.50 % (all 0.75 %)")
    off = model_lines(record, process, {**delays, "delay_accounting": False, "memory_pressure": None})
    assert "delay_accounting = true" in off[-2] and "block I/O 30" not in off[-2]
    assert off[-1] == "  memory pressure: unknown (needs cgroup v2 with PSI)"
    assert model_lines(record, None, None)[-1] == "  the process is gone"
    assert model_lines(record, process, None)[-1] == "  delays: not read (the process ended)"
