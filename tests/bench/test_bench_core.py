"""The bench's functional core: schedule, sizes, statistics, summary and table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from autoglm_tune import policy
from autoglm_tune.bench import cli as bench_cli
from autoglm_tune.bench import design, machine, report, runner, stats
from autoglm_tune.errors import BadInput


def opts(**kw: object) -> design.Options:
    base = {"scenarios": ("heavy", "cpu"), "configs": ("limit", "untuned", "hand-tune"), "rounds": 3,
            "ram_mib": 4096, "emulate": "hugetlb", "desktop_mib": None, "tokens": 8, "context": 512, "threads": None}
    return design.Options(**(base | kw))  # type: ignore[arg-type]


def test_schedule_interleaves_every_config_once_per_round_in_rotating_order() -> None:
    runs = design.schedule(opts())
    assert len(runs) == 2 * 3 * 3
    heavy = [r for r in runs if r.scenario == "heavy"]
    assert [r.config for r in heavy] == ["limit", "untuned", "hand-tune", "untuned", "hand-tune", "limit",
                                         "hand-tune", "limit", "untuned"]
    assert [r.round for r in heavy] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert runs[:9] == heavy  # scenario by scenario


def test_desktop_sizes_follow_the_scenarios() -> None:
    s = design.SCENARIOS
    assert design.desktop_mib(s["heavy"], 3000, 700, None) == 3750 - 700
    assert design.desktop_mib(s["mild"], 3000, 700, None) == 3300 - 700
    fits = design.desktop_mib(s["fits"], 3000, 700, None)
    assert 700 + fits / 2 == pytest.approx(0.9 * 3000) and 700 + fits > 3000  # fits only once compressed
    assert design.desktop_mib(s["cpu"], 3000, 700, None) == 0
    assert design.desktop_mib(s["heavy"], 3000, 700, 64) == 64


def test_pool_percent_is_scaled_to_the_emulated_ram() -> None:
    assert design.scaled_pool_percent(50, 4096, 24576) == 8
    assert design.scaled_pool_percent(1, 1024, 24576) == 1
    assert design.scaled_pool_percent(50, 24576, 24576) == 50


def test_token_stats_from_arrival_times() -> None:
    stats = report.token_stats(10.0, [10.5, 10.6, 10.7, 11.0])
    assert stats["tokens"] == 4 and stats["ttft_s"] == 0.5
    assert stats["tok_s"] == pytest.approx(3 / 0.5, rel=1e-3)
    assert stats["p50_ms"] == pytest.approx(100, abs=0.01) and stats["p99_ms"] == pytest.approx(300, abs=0.01)
    assert stats["gaps_ms"] == [100.0, 100.0, 300.0]
    assert report.token_stats(1.0, [])["tok_s"] is None


def run(scenario: str, rnd: int, config: str, value: float | None, **kw: object) -> dict[str, object]:
    return {"scenario": scenario, "round": rnd, "config": config, "value": value, "tok_s": value, "oom_kills": 0,
            **kw}


def test_summary_ratios_are_paired_by_round_with_an_interval() -> None:
    runs = []
    for rnd, (limit, untuned, auto) in enumerate([(10.0, 2.0, 5.0), (20.0, 8.0, 16.0), (12.0, 4.0, 9.0)]):
        runs += [run("heavy", rnd, "limit", limit), run("heavy", rnd, "untuned", untuned),
                 run("heavy", rnd, "autoglm-tune", auto)]
    runs.append(run("heavy", 3, "untuned", 1.0, oom_kills=1))  # a failure: counted, not in the ratios
    summary = report.summarize(runs)
    rows = {r["config"]: r for r in summary["rows"]}
    vs = rows["autoglm-tune"]["vs"]["untuned"]
    # per-round ratios 2.5, 2, 2.25: geometric mean 2.241, t(2) interval on the logs
    assert vs["n"] == 3 and vs["ratio"] == pytest.approx(2.241, abs=0.001)
    assert vs["low"] == pytest.approx(1.698, abs=0.002) and vs["high"] == pytest.approx(2.957, abs=0.002)
    assert rows["untuned"]["failed"]["count"] == 1 and rows["untuned"]["runs"] == 4
    assert rows["untuned"]["oom_rate"]["k"] == 1 and rows["untuned"]["value"]["median"] == 4.0
    assert rows["untuned"]["collapse_rate"]["k"] == 3  # 2 of 10, 8 of 20, 4 of 12: all below half the limit
    heavy = next(t for t in summary["targets"] if t["versus"] == "untuned" and t["what"] == "value")
    assert heavy["target"] == 2.0 and heavy["holds"] is False  # the estimate clears 2, its lower bound does not


def test_a_target_holds_only_when_the_lower_bound_clears_it() -> None:
    runs = []
    for rnd, ratio in enumerate([3.0, 3.1, 2.9, 3.05, 2.95]):
        runs += [run("heavy", rnd, "untuned", 1.0), run("heavy", rnd, "autoglm-tune", ratio)]
    target = next(t for t in report.summarize(runs)["targets"] if t["versus"] == "untuned" and t["what"] == "value")
    assert target["holds"] is True and target["interval"]["low"] >= 2.0
    one = [run("heavy", 0, "untuned", 1.0), run("heavy", 0, "autoglm-tune", 9.0)]
    assert next(t for t in report.summarize(one)["targets"] if t["what"] == "value")["holds"] is None


def test_t_quantiles_and_wilson_intervals() -> None:
    assert stats.t975(1) == 12.706 and stats.t975(19) == 2.093 and stats.t975(35) == 2.042
    assert stats.t975(10_000) == pytest.approx(1.96, abs=0.001)
    zero = stats.wilson(0, 5)
    assert zero["rate"] == 0 and zero["low"] == 0 and zero["high"] == pytest.approx(0.434, abs=0.001)
    assert stats.wilson(0, 20)["high"] == pytest.approx(0.161, abs=0.001)
    assert stats.paired_ratio([(2.0, 1.0)]) == {"n": 1, "ratio": 2.0, "low": None, "high": None}
    assert stats.histogram_percentile([90, 9, 1], 99, 1.0) == 2.0 and stats.histogram_percentile([0], 99, 1) is None


def test_t_quantiles_at_any_level_match_the_table_and_published_values() -> None:
    """t_quantile (calibrate's corrected looks) agrees with the 95 % table row by row and with published
    99 % and 99.9 % two-sided values."""
    for df, value in stats._T975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(value, abs=0.0006), df
    assert stats.t_quantile(0.995, 2) == pytest.approx(9.925, abs=0.001)
    assert stats.t_quantile(0.995, 10) == pytest.approx(3.169, abs=0.001)
    assert stats.t_quantile(0.9995, 5) == pytest.approx(6.869, abs=0.001)
    assert stats.t_cdf(-stats.t_quantile(0.9, 7), 7) == pytest.approx(0.1, abs=1e-9)
    wide = stats.paired_ratio([(2.0, 1.0), (2.2, 1.0), (1.9, 1.0)], 0.99)
    narrow = stats.paired_ratio([(2.0, 1.0), (2.2, 1.0), (1.9, 1.0)])
    assert wide["low"] < narrow["low"] < narrow["ratio"] == wide["ratio"] < narrow["high"] < wide["high"]
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_the_parallel_memcpy_probe_uses_every_cpu_and_leaves_no_child() -> None:
    """One pinned copier per CPU, all at once (calibrate's bandwidth limit); none left behind, and a copier
    that cannot start (a CPU this machine lacks) is one TuneError, not a wait for ever."""
    import os

    import psutil
    from autoglm_tune.errors import TuneError

    def children() -> set[int]:  # the suite's other children (a bus, a helper) are there before and after
        return {c.pid for c in psutil.Process().children()}

    cpus = os.sched_getaffinity(0)
    before = children()
    assert machine.memcpy_gbs_on(cpus, 64, 1) > 0
    assert children() == before
    with pytest.raises(TuneError, match="memcpy probe failed to start"):
        machine.memcpy_gbs_on({*cpus, 4095}, 64, 1)
    assert children() == before


def test_primary_figure_and_failures_per_scenario() -> None:
    s = design.SCENARIOS
    assert report.primary(s["heavy"], {"tok_s": 3.0}) == 3.0
    assert report.primary(s["cold"], {"ttft_s": 1.0, "load_s": 3.0}) == 0.25  # from the start to the first token
    assert report.primary(s["prompt"], {"ttft_s": 2.0, "load_s": 30.0}) == 0.5
    assert report.failed({"value": 1.0, "oom_kills": 1}) == "1 OOM kill(s)"
    assert report.failed({"value": 1.0, "oom_kills": 0, "desktop_alive": False}) == "the desktop died"
    assert report.failed({"value": None, "error": "timeout"}) == "timeout"
    assert report.failed({"value": 1.0, "oom_kills": 0, "desktop_alive": True}) is None
    assert report.failed({"value": 1.0, "interfered": "swap turned off"}) == "swap turned off"


def test_desktop_window_is_the_difference_of_two_snapshots() -> None:
    before = {"ops": 100, "frames": 10, "hist": [5, 5, 0, 0], "alive": [True, True]}
    after = {"ops": 700, "frames": 110, "hist": [80, 25, 0, 5], "alive": [True, True]}
    w = report.desktop_window(before, after, 2.0)
    assert w["ops_s"] == 300.0 and w["frames"] == 100 and w["frame_p99_ms"] == 4.0
    assert w["hist"] == {"0": 75, "1": 20, "3": 5} and w["alive"] is True
    assert report.desktop_window(before, {**after, "alive": [True, False]}, 2.0)["alive"] is False


def test_policy_variants_override_the_users_policy_without_changing_it() -> None:
    base = {"process": {"nice": -5, "threads": 2}, "vm": {"swappiness": 30}}
    variant = design.policy_variant(base, design.CONFIGS_BY_NAME["no-nice"])
    assert variant == {"process": {"nice": 0, "threads": 2}, "vm": {"swappiness": 30}}
    assert base["process"]["nice"] == -5
    assert design.policy_variant({}, design.CONFIGS_BY_NAME["zswap-on"]) == {"zswap": {"enabled": True}}
    assert design.policy_variant(base, design.CONFIGS_BY_NAME["kernel-only"]) == base
    for config in design.CONFIG_LIST:  # every override is a key the policy schema knows
        for section, key, _ in config.overrides:
            assert key in policy.SCHEMA[section], (config.name, section, key)


def test_emulated_watermarks_follow_the_kernels_formula() -> None:
    marks = machine.emulated_watermarks(8192, 24576, 10)
    assert marks == {"vm.min_free_kbytes": str(math.isqrt(8192 * 1024 * 16)), "vm.watermark_scale_factor": "3"}
    assert machine.emulated_watermarks(256, 24576, 10)["vm.watermark_scale_factor"] == "1"


def test_hand_tune_adds_one_flag_and_the_thread_count() -> None:
    b = object.__new__(runner.Bench)
    b.opts, b.server_bin, b.python = opts(server="llama-server"), Path("/x/llama-server"), Path("/v/python")
    b.model, b.flags = runner.Model(Path("/m.gguf"), 100), frozenset({"--load-mode"})
    plain = b.server_argv(8080, design.CONFIGS_BY_NAME["untuned"])
    hand = b.server_argv(8080, design.CONFIGS_BY_NAME["hand-tune"])
    assert "--threads" not in plain and "--prio" not in plain and "--no-mmap" not in plain  # the server's defaults
    cores = str(machine.physical_cores())
    assert hand == [*plain, "--threads", cores, "--threads-batch", cores, "--prio", "2"]
    nice = b.server_argv(8080, design.CONFIGS_BY_NAME["hand-nice"])
    assert nice == ["nice", "-n", "-10", *plain, "--threads", cores, "--threads-batch", cores]  # no real-time threads
    b.opts = opts(server="llama-server", mmap=False)
    assert b.server_argv(8080, design.CONFIGS_BY_NAME["untuned"])[-2:] == ["--load-mode", "none"]
    b.opts = opts(server="llama-cpp-python", mmap=False)
    hand = b.server_argv(8080, design.CONFIGS_BY_NAME["hand-tune"])
    assert hand[:3] == ["nice", "-n", "-10"] and hand[-2:] == ["--use_mmap", "false"]


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [("--scenario", "heavy,nope", ("heavy", "mild")), ("--config", "", ("limit",))],
)
def test_bad_lists_name_the_flag_and_the_allowed_values(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(BadInput) as exc:
        design.parse_list(flag, value, allowed)
    text = str(exc.value)
    assert text.startswith(flag) and "allowed:" in text and all(a in text for a in allowed) and "\n" not in text


def test_markdown_names_machine_command_targets_and_preliminary() -> None:
    runs = [run("cpu", r, c, t * (1 + r / 10)) for r in range(3) for c, t in (("untuned", 5.0), ("autoglm-tune", 9.0))]
    runs += [run("heavy", 0, "autoglm-tune", 1.0), run("heavy", 0, "untuned", 0.4, oom_kills=2)]
    doc = {
        "preliminary": "shared machine", "time": "2026-11-26 15:00 UTC", "command": "autoglm-tune bench --rounds 1",
        "machine": {"cpu": "Test CPU", "cpus": 2, "mem_total_mib": 4096, "kernel": "6.1", "cgroup_memory": "v2"},
        "model": {"name": "m.gguf", "size_mib": 10},
        "options": {"tokens": 8, "context": 512, "scenarios": ["cpu", "heavy"], "configs": ["untuned", "autoglm-tune"],
                    "server": "llama-server", "mmap": True},
        "emulation": None, "notes": ["tuned: not installed"], "summary": report.summarize(runs),
    }
    text = report.markdown(doc)
    assert "**Preliminary, noisy:** shared machine" in text
    assert "`autoglm-tune bench --rounds 1`" in text and "Test CPU, 2 CPUs, 4096 MiB" in text
    assert "| autoglm-tune | 3 (0) | 9.90 [9.00–10.80] | 1.80 [1.80–1.80] |" in text
    assert "| untuned | 1 (1) |" in text and "| 1/1 [" in text  # the OOM-killed run is a failure, with its rate
    assert "| heavy | autoglm-tune ÷ untuned | ≥ 2.0 | – | undecided (too few rounds) |" in text
    assert "not run: tuned: not installed" in text


def test_the_command_lists_the_names_the_bench_defines() -> None:
    assert tuple(design.SCENARIOS) == bench_cli.SCENARIO_NAMES
    assert bench_cli.CONFIG_NAMES == design.CONFIGS
    assert set(bench_cli.CONFIG_NAMES) == set(design.CONFIG_TEXT)


def test_docs_keep_their_hand_written_text_around_the_results() -> None:
    first = report.splice(None, "## Results\nold\n")
    assert first.startswith(report.BEGIN) and "old" in first
    doc = "# Benchmarks\n\nmethod\n\n" + first + "\n## How to run\ncommand\n"
    again = report.splice(doc, "## Results\nnew\n")
    assert again == f"# Benchmarks\n\nmethod\n\n{report.BEGIN}\n## Results\nnew\n{report.END}\n## How to run\ncommand\n"


def test_restore_puts_back_its_own_values_and_leaves_another_process_s_alone(tmp_path: Path) -> None:
    """Real Guard, settings redirected to files: what the bench wrote is restored; a value someone else wrote
    since is left alone and reported, not clobbered (a machine shared with other jobs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    guard = machine.Guard()
    try:
        for f in (a, b):
            f.write_text("1")
        guard.paths = {"x.a": str(a), "x.b": str(b)}
        guard.settings = {"x.a": "1", "x.b": "1"}
        guard.set("x.a", "5")
        guard.set("x.b", "5")
        b.write_text("7")  # another process
    finally:
        guard.swaps = machine.read_swaps()
        problems = guard.restore()
    assert a.read_text() == "1" and b.read_text() == "7"
    assert problems == [] and guard.notes == ["x.b was changed by another process during the bench (to 7); left alone"]


def test_what_a_tuner_the_bench_started_wrote_is_restored(tmp_path: Path) -> None:
    """TuneD writes vm.swappiness itself: once it has stopped, its value is the bench's to undo (before this was
    adopted, a swappiness of 10 stayed for every later run of every configuration)."""
    a = tmp_path / "a"
    a.write_text("60")
    guard = machine.Guard()
    try:
        guard.paths = {"vm.swappiness": str(a)}
        guard.settings = {"vm.swappiness": "60"}
        guard.set("vm.swappiness", "20")  # an earlier configuration (recipe)
        guard.reset_settings()
        guard.touched.update(guard.paths)  # start_tuned
        a.write_text("10")  # TuneD's throughput-performance
        guard.adopt_live()
        guard.reset_settings()
        assert a.read_text() == "60"
    finally:
        guard.swaps = machine.read_swaps()
        problems = guard.restore()
    assert problems == [] and guard.notes == []
