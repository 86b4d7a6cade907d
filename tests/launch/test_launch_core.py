"""The pure core of launch: CPU list formats, ioprio values, memory fit, keep-resident choice, template
rendering, systemd quoting, presets — no machine needed. And the GGUF header reader on real files."""

from __future__ import annotations

import struct
from importlib import resources
from pathlib import Path

import pytest
from autoglm_tune import gguf_header, launch, procsettings
from autoglm_tune.errors import BadInput
from autoglm_tune.planner import ProcessPlan
from autoglm_tune.policy import load_policy
from autoglm_tune.presets import load_preset, preset_names
from hypothesis import given
from hypothesis import strategies as st

SHAPE = gguf_header.ModelShape(
    "llama", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim_k=64, head_dim_v=64, context_length=2048
)


def machine(**kw: object) -> launch.Machine:
    base = dict(
        allowed_cpus=(0, 1, 2, 3),
        mem_available=8 << 30,
        swap_free=2 << 30,
        memlock_hard=8 << 20,
        cap_eff=0,
        model_bytes=1 << 30,
        shape=SHAPE,
        schedulers={"vda": "mq-deadline"},
    )
    return launch.Machine(**{**base, **kw})  # type: ignore[arg-type]


PROCESS = ProcessPlan(
    cpus=[1, 2, 3],
    threads=3,
    sched_policy="batch",
    nice=5,
    io_class="best-effort",
    io_priority=6,
    oom_score_adj=300,
    reasons=[],
)


def model_policy(**kw: object) -> dict:
    return {**load_policy(etc_dir=Path("/nonexistent"))["model"], "model_path": "/m/model.gguf", **kw}


@given(st.sets(st.integers(0, 300), min_size=1))
def test_cpu_ranges_round_trip(cpus: set[int]) -> None:
    text = procsettings.cpu_ranges(sorted(cpus))
    back = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        back |= set(range(int(lo), int(hi or lo) + 1))
    assert back == cpus
    assert int(procsettings.cpu_mask(sorted(cpus)), 16) == sum(1 << c for c in cpus)


def test_cpu_formats() -> None:
    assert procsettings.cpu_ranges([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"
    assert procsettings.cpu_mask([0, 1, 2, 3, 6]) == "0x4f"


def test_ioprio_values() -> None:
    assert procsettings.ioprio_value("best-effort", 6) == 2 << 13 | 6
    assert procsettings.ioprio_value("idle", 6) == 3 << 13
    assert procsettings.ioprio_value("none", 4) == 0
    assert procsettings.ioprio_syscalls("x86_64") == (251, 252)
    assert procsettings.ioprio_syscalls("aarch64") == (30, 31)


def test_ioprio_note_says_when_priority_has_no_effect() -> None:
    assert procsettings.active_scheduler("none [mq-deadline] kyber bfq") == "mq-deadline"
    assert procsettings.ioprio_note("best-effort", {"vda": "mq-deadline"}, "/m") is None
    note = procsettings.ioprio_note("idle", {"nvme0n1": "none"}, "/m/x.gguf")
    assert note and "no effect" in note and "nvme0n1 uses the none scheduler" in note
    assert "kyber" in (procsettings.ioprio_note("best-effort", {"sda": "kyber"}, "/m") or "")
    assert "not on a block device" in (procsettings.ioprio_note("idle", {}, "/m") or "")
    assert procsettings.ioprio_note("none", {"nvme0n1": "none"}, "/m") is None


def test_explain_names_the_setting_and_the_capability() -> None:
    line = procsettings.explain("oom_score_adj", -500, 13, 0)
    assert line.startswith("oom_score_adj = -500 not set (Permission denied: ") and "CAP_SYS_RESOURCE" in line
    assert line.endswith("the model runs with oom_score_adj = 0")
    assert "CAP_SYS_NICE" in procsettings.explain("nice", -5, 13, 0)


@pytest.mark.parametrize(
    ("available", "swap", "verdict"),
    [(8 << 30, 0, "fits"), (1 << 29, 2 << 30, "tight"), (1 << 29, 0, "does not fit"), (None, 0, "unknown")],
)
def test_memory_fit(available: int | None, swap: int, verdict: str) -> None:
    fit = launch.memory_fit(machine(mem_available=available, swap_free=swap), 4096)
    assert fit is not None and fit.verdict == verdict
    assert fit.kv_bytes == 4 * 2 * (64 + 64) * 4096 * 2
    assert fit.need == (1 << 30) + fit.kv_bytes
    assert "1024 MiB + KV cache 8 MiB (4096 tokens, f16) = 1032 MiB needed" in fit.message()


def test_no_model_file_no_memory_estimate() -> None:
    assert launch.memory_fit(machine(model_bytes=None, shape=None), 4096) is None


def test_keep_resident_choice() -> None:
    def choose(wanted: str, **kw: object) -> str:
        return launch.build_spec(
            PROCESS, model_policy(keep_resident=wanted), load_preset("llama-server"), machine(**kw)
        ).keep_resident

    assert choose("auto") == "none"  # 8 MiB memlock limit, no CAP_IPC_LOCK
    assert choose("auto", cap_eff=1 << launch.CAP_IPC_LOCK) == "mlock"
    assert choose("auto", memlock_hard=None) == "mlock"
    assert choose("auto", memlock_hard=None, mem_available=1 << 29) == "none"  # would not fit: do not lock
    assert choose("none", memlock_hard=None) == "none"
    spec = launch.build_spec(PROCESS, model_policy(keep_resident="mlock"), load_preset("llama-server"), machine())
    assert spec.keep_resident == "mlock" and any("RLIMIT_MEMLOCK" in w for w in spec.warnings)
    assert "--mlock" in spec.argv and spec.settings.raise_memlock


def test_spec_argv_environment_and_dropped_arguments() -> None:
    spec = launch.build_spec(
        PROCESS,
        model_policy(args=["--alias", "{{ model_name }}-{{ cpu_list }}"], environment={"EXTRA": "{{ cpu_mask }}"}),
        load_preset("llama-server"),
        machine(memlock_hard=None),
    )
    assert spec.argv == [
        "llama-server",
        "--model",
        "/m/model.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
        "--threads",
        "3",
        "--threads-batch",
        "3",
        "--ctx-size",
        "4096",
        "--mlock",
        "--alias",
        "model-1-3",
    ]
    assert spec.environment == {"OMP_NUM_THREADS": "3", "EXTRA": "0xe"}
    assert spec.health_url == "http://127.0.0.1:8080/health"
    assert spec.settings.cpus == (1, 2, 3) and spec.settings.to_dict()["cpu_list"] == "1-3"
    no_mmap = launch.build_spec(
        PROCESS, model_policy(mmap=False, keep_resident="none"), load_preset("llama-server"), machine()
    )
    assert "--no-mmap" in no_mmap.argv and "--mlock" not in no_mmap.argv


def test_wildcard_host_is_reached_on_loopback() -> None:
    spec = launch.build_spec(PROCESS, model_policy(host="0.0.0.0"), load_preset("ollama"), machine())
    assert spec.health_url == "http://127.0.0.1:8080/api/version"
    assert spec.environment["OLLAMA_HOST"] == "0.0.0.0:8080"
    assert launch.url_host("::") == "[::1]" and launch.url_host("fe80::1") == "[fe80::1]"


def test_context_beyond_the_trained_length_is_a_warning() -> None:
    spec = launch.build_spec(PROCESS, model_policy(context_size=8192), load_preset("llama-server"), machine())
    assert any("context_size = 8192 exceeds the 2048 tokens" in w for w in spec.warnings)
    fine = launch.build_spec(PROCESS, model_policy(context_size=2048), load_preset("llama-server"), machine())
    assert not any("context_size" in w for w in fine.warnings)


def test_cpus_outside_the_cgroup_are_bad_input() -> None:
    with pytest.raises(BadInput, match=r"\[process\] cpus: CPUs \[3\] .* allowed: a subset of 0-2"):
        launch.build_spec(PROCESS, model_policy(), load_preset("llama-server"), machine(allowed_cpus=(0, 1, 2)))


def test_expected_denials_for_dry_run() -> None:
    plan = ProcessPlan(
        cpus=[1],
        threads=1,
        sched_policy="other",
        nice=-5,
        io_class="realtime",
        io_priority=0,
        oom_score_adj=-500,
        reasons=[],
    )
    spec = launch.build_spec(plan, model_policy(), load_preset("llama-server"), machine())
    assert [d.split(" ")[0] for d in spec.expected_denials] == ["nice", "oom_score_adj", "io_class"]
    caps = 1 << launch.CAP_SYS_NICE | 1 << launch.CAP_SYS_RESOURCE | 1 << launch.CAP_SYS_ADMIN
    assert (
        launch.build_spec(plan, model_policy(), load_preset("llama-server"), machine(cap_eff=caps)).expected_denials
        == []
    )


def test_ioprio_blind_disk_is_a_warning() -> None:
    spec = launch.build_spec(
        PROCESS, model_policy(), load_preset("llama-server"), machine(schedulers={"nvme0n1": "none"})
    )
    assert any("has no effect" in w and "nvme0n1" in w for w in spec.warnings)


def test_every_preset_renders() -> None:
    assert preset_names() == ["llama-cpp-python", "llama-server", "ollama", "vllm-cpu"]
    for name in preset_names():
        spec = launch.build_spec(PROCESS, model_policy(preset=name), load_preset(name), machine())
        assert spec.argv[0] and all("{" not in a for a in spec.argv), name
        assert spec.health_url.startswith("http://127.0.0.1:8080/"), name


def test_systemd_quote() -> None:
    assert launch.systemd_quote("--port") == "--port"
    assert launch.systemd_quote("a b") == '"a b"'
    assert launch.systemd_quote('50% "x" $HOME\\') == '"50%% \\"x\\" $$HOME\\\\"'
    assert launch.systemd_quote("") == '""'


def test_unit_omits_io_class_none_and_memlock_without_mlock() -> None:
    plan = ProcessPlan(
        cpus=[0], threads=1, sched_policy="idle", nice=10, io_class="none", io_priority=4, oom_score_adj=0, reasons=[]
    )
    spec = launch.build_spec(plan, model_policy(keep_resident="none"), load_preset("llama-server"), machine())
    template = resources.files("autoglm_tune.policies").joinpath("model.service.j2").read_text()
    text = launch.render_unit(spec, template)
    assert "IOSchedulingClass" not in text and "LimitMEMLOCK" not in text and "MemoryLow" not in text
    assert "CPUAffinity=0\n" in text and "CPUSchedulingPolicy=idle\n" in text and "Nice=10\n" in text
    assert "\nCPUWeight=11\n" in text  # nice 10's CFS weight, 110 of 1024, on systemd's scale of 100


def write_gguf(path: Path, kvs: list[tuple[str, int, bytes]], version: int = 3) -> None:
    body = b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs))
    for key, vtype, raw in kvs:
        body += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + raw
    path.write_bytes(body)


def gstr(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_gguf_reader_handles_arrays_and_per_layer_heads(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(
        path,
        [
            ("general.architecture", 8, gstr("qwen2")),
            ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + gstr("a") + gstr("b") + gstr("c")),
            ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2000) + b"\0" * 8000),
            ("qwen2.block_count", 4, struct.pack("<I", 2)),
            ("qwen2.embedding_length", 4, struct.pack("<I", 512)),
            ("qwen2.attention.head_count", 4, struct.pack("<I", 8)),
            ("qwen2.attention.head_count_kv", 9, struct.pack("<IQ", 4, 2) + struct.pack("<II", 2, 4)),
            ("qwen2.context_length", 10, struct.pack("<Q", 32768)),
        ],
    )
    meta = gguf_header.read_metadata(path)
    assert meta["tokenizer.ggml.tokens"] is None and meta["tokenizer.ggml.scores"] is None
    shape = gguf_header.model_shape(meta, str(path))
    assert (shape.n_layer, shape.n_head_kv, shape.head_dim_k, shape.context_length) == (2, 4, 64, 32768)
    assert shape.kv_cache_bytes(100) == 2 * 4 * 128 * 100 * 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML", "not a GGUF file"),
        (b"GGUF" + struct.pack("<I", 1), "version 1 is not supported"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + struct.pack("<Q", 99), "truncated GGUF header"),
        (b"GG", "truncated GGUF header: magic"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40), "corrupt GGUF header: 1099511627776 metadata keys"),
        # a key whose length is 2**62: refused before any allocation, naming the key's index
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62), "metadata key #0: a string of"),
        # a string value of 2**62 bytes, named by its key
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("general.name") + struct.pack("<IQ", 8, 1 << 62),
         "corrupt GGUF header: general.name: a string of 4611686018427387904 bytes"),
        # a string value longer than what is left of the file
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("general.name") + struct.pack("<IQ", 8, 1000) + b"x",
         "truncated GGUF header: general.name: a string of 1000 bytes needs 1000 bytes, 1 left"),
        # arrays of strings, of numbers and of arrays with a count of 2**60 items
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 60),
         "tokenizer.ggml.tokens: an array of 1152921504606846976 items"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 1 << 60),
         "tokenizer.ggml.scores: an array of 1152921504606846976 items"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("x.nested") + struct.pack("<IIQ", 9, 9, 1 << 60),
         "x.nested: an array of"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr("x.kind") + struct.pack("<I", 77), "x.kind: value type 77"),
    ],
)
def test_gguf_reader_rejects_bad_files(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(BadInput, match=message):
        gguf_header.read_metadata(path)


def test_gguf_reader_on_the_generated_model(tiny_model: Path) -> None:
    shape = gguf_header.model_shape(gguf_header.read_metadata(tiny_model), str(tiny_model))
    assert shape == SHAPE


def test_supervisor_and_memory_protection_in_a_unit() -> None:
    """auto runs the model as a transient unit where systemd and the helper are there; MemoryLow= is chosen
    only in a unit on cgroup v2; a unit may lock memory whatever this process's limit is."""

    def spec(wanted: str = "auto", supervisor: str = "auto", **kw: object) -> launch.LaunchSpec:
        policy = model_policy(keep_resident=wanted, supervisor=supervisor, memory_high_mib=512)
        return launch.build_spec(PROCESS, policy, load_preset("llama-server"), machine(**kw))

    child = spec()
    assert child.supervisor == "launch" and child.keep_resident == "none" and child.memory_low == 0
    assert any("memory_high_mib applies to a systemd unit only" in w for w in child.warnings)
    v2 = spec(systemd_helper=True, cgroup_v2=True, mem_total=16 << 30)
    need = v2.memory.need if v2.memory else 0
    assert v2.supervisor == "systemd" and v2.keep_resident == "cgroup" and v2.memory_low == need > 0
    assert v2.memory_high == 512 << 20 and not v2.settings.raise_memlock and v2.expected_denials == []
    v1 = spec(systemd_helper=True, cgroup_v2=False, mem_total=16 << 30)
    assert v1.keep_resident == "mlock" and v1.memory_low == 0  # 8 MiB memlock limit, but the unit raises it
    request = launch.unit_request(v1, "/work", {"HOME": "/home/u", "BAD NAME": "x", "OMP_NUM_THREADS": "9"})
    assert request["memlock"] == 2 * need and request["cpus"] == [1, 2, 3] and request["nice"] == 5
    assert request["argv"] == v1.argv and request["port"] == v1.port and request["memory_high"] == 512 << 20
    assert request["working_directory"] == "/work"
    assert request["environment"] == {"HOME": "/home/u", **v1.environment}  # the spec's value wins
    tiny_ram = launch.unit_request(spec(systemd_helper=True, mem_total=2 << 30), "/", {})
    assert tiny_ram["memlock"] == int((2 << 30) * 0.75)  # the helper's bound, not more
    on_v1 = spec("cgroup", systemd_helper=True)
    assert any("no effect here (MemoryLow= needs cgroup v2)" in w for w in on_v1.warnings)
    unprotected = spec("cgroup")
    assert unprotected.keep_resident == "none" and unprotected.own_swappiness is None
    assert any("a child of launch needs a cgroup v1 memory controller" in w for w in unprotected.warnings)
    own = spec(memcg_v1=True)  # a child on cgroup v1: its own memory cgroup with swappiness 0, through the helper
    assert own.keep_resident == "cgroup" and own.own_swappiness == 0 and own.memory_low == 0
    assert not own.settings.raise_memlock and "--mlock" not in own.argv
    fallback = launch.as_child(v2)
    assert fallback.supervisor == "launch" and fallback.keep_resident == "none" and fallback.memory_low == 0
    with pytest.raises(BadInput, match='supervisor = "systemd": needs systemd as PID 1'):
        spec(supervisor="systemd")


def test_a_unit_gets_no_more_than_the_helper_grants() -> None:
    strong = ProcessPlan(cpus=[1], threads=1, sched_policy="other", nice=-20, io_class="none", io_priority=0,
                         oom_score_adj=-1000, reasons=[])
    policy = model_policy(supervisor="systemd", keep_resident="cgroup", memory_high_mib=1 << 20)
    small = machine(systemd_helper=True, cgroup_v2=True, mem_total=1 << 30)
    unit = launch.build_spec(strong, policy, load_preset("llama-server"), small)
    assert unit.settings.nice == -10 and unit.settings.oom_score_adj == -900
    assert unit.memory_low == int((1 << 30) * 0.75) and unit.memory_high == 1 << 30
    joined = " ".join(unit.warnings)
    for needle in ("nice = -20 is below the root helper's floor", "oom_score_adj = -1000 is below",
                   "MemoryLow= is cut", "memory_high_mib is above MemTotal"):
        assert needle in joined, joined
    child = launch.build_spec(strong, model_policy(), load_preset("llama-server"), machine())
    assert child.settings.nice == -20  # a privileged launcher sets it itself; the helper path clamps it


def test_unit_lines_and_comments_follow_the_one_keep_resident_decision() -> None:
    """The persistent unit writes what the decision (the same one the dry-run prints) chose, and says what each
    memory line does on this kind of host: no MemoryLow= on cgroup v1, MemoryHigh= said to be ignored there."""
    template = resources.files("autoglm_tune.policies").joinpath("model.service.j2").read_text()
    policy = model_policy(supervisor="systemd", memory_high_mib=512)
    preset = load_preset("llama-cpp-python")

    v1 = launch.build_spec(PROCESS, policy, preset, machine(systemd_helper=True, memcg_v1=True, mem_total=16 << 30))
    text = launch.render_unit(v1, template)
    assert v1.keep_resident == "mlock" and "--use_mlock true" in text.replace('"', "")
    assert "MemoryLow=" not in text and "LimitMEMLOCK=infinity\n" in text
    assert f"# keep_resident mlock: {launch.keep_resident_how(v1)}\n" in text
    assert "# MemoryHigh= acts on cgroup v2 only: systemd ignores it on this host (cgroup v1)\n" in text

    v2 = launch.build_spec(PROCESS, policy, preset, machine(systemd_helper=True, cgroup_v2=True, mem_total=16 << 30))
    text = launch.render_unit(v2, template)
    assert v2.keep_resident == "cgroup" and "--use_mlock false" in text and "LimitMEMLOCK" not in text
    assert f"MemoryLow={v2.memory_low}\n" in text and f"# keep_resident cgroup: MemoryLow={v2.memory_low}" in text
    assert "(cgroup v2)\nMemoryHigh=" in text and "ignores it" not in text


def test_unit_runs_as_the_user_who_rendered_it_and_says_so_for_root() -> None:
    """`launch` runs the server as its caller; the boot unit rendered by that caller must too, not as root."""
    spec = launch.build_spec(ProcessPlan(cpus=[0], threads=1, sched_policy="other", nice=0, io_class="none",
                                         io_priority=4, oom_score_adj=0, reasons=[]),
                             model_policy(keep_resident="none"), load_preset("llama-server"), machine())
    template = resources.files("autoglm_tune.policies").joinpath("model.service.j2").read_text()
    assert "\nUser=alice\n" in launch.render_unit(spec, template, "alice")
    as_root = launch.render_unit(spec, template, None)
    assert "User=" not in as_root.replace("add User=", "") and "rendered by root: runs as root" in as_root


NEW_HELP = "--model F\n-t, --threads N\n--threads-batch N\n--ctx-size N\n--host H\n--port P\n-lm, --load-mode MODE\n"
OLD_HELP = "--model FNAME\n--threads N\n--threads-batch N\n--ctx-size N\n--host H\n--port P\n--mlock\n--no-mmap\n"


@pytest.mark.parametrize(
    ("help_text", "mmap", "mlock", "flags"),
    [
        (NEW_HELP, True, True, ["--load-mode", "mmap+mlock"]),
        (NEW_HELP, False, False, ["--load-mode", "none"]),
        (NEW_HELP, False, True, ["--load-mode", "mlock"]),
        (NEW_HELP, True, False, ["--load-mode", "mmap"]),
        (OLD_HELP, False, True, ["--mlock", "--no-mmap"]),
        (OLD_HELP, True, False, []),
    ],
)
def test_llama_server_flags_follow_what_the_build_lists(help_text: str, mmap: bool, mlock: bool,
                                                         flags: list[str]) -> None:
    listed = launch.help_flags(help_text)
    spec = launch.build_spec(
        PROCESS, model_policy(keep_resident="mlock" if mlock else "none", mmap=mmap), load_preset("llama-server"),
        machine(memlock_hard=None, program_flags=listed),
    )
    tail = spec.argv[spec.argv.index("--ctx-size") + 2:]
    assert tail == flags


def test_a_flag_the_build_does_not_list_is_refused_naming_it() -> None:
    listed = launch.help_flags(NEW_HELP)
    with pytest.raises(BadInput) as exc:
        launch.build_spec(PROCESS, model_policy(args=["--no-mmap"]), load_preset("llama-server"),
                          machine(program_flags=listed))
    assert "does not take --no-mmap" in str(exc.value) and "allowed:" in str(exc.value)
    assert "`llama-server --help` does not list it: this llama-server build" in str(exc.value)
    assert launch.help_flags("usage: server [-h]\n--port P\n") is None  # too few to judge a build by
    # another program's help (python3 as a stand-in server, a wrapper script) does not judge the preset's flags
    other = launch.help_flags("--check-hash-based-pycs M\n--help-env\n--help-xoptions\n--help-all\n--version\n")
    spec = launch.build_spec(PROCESS, model_policy(keep_resident="mlock"), load_preset("llama-server"),
                             machine(memlock_hard=None, program_flags=other))
    assert "--mlock" in spec.argv and "--load-mode" not in spec.argv
