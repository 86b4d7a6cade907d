"""The bench's functional core: schedule, sizes, statistics, summary and table."""

from __future__ import annotations

from pathlib import Path

import pytest
from autoglm_tune import bench, bench_cli
from autoglm_tune.errors import BadInput


def opts(**kw: object) -> bench.Options:
    base = {"scenarios": ("heavy", "cpu"), "configs": ("limit", "untuned", "recipe"), "rounds": 3, "ram_mib": 4096,
            "emulate": "hugetlb",
            "desktop_mib": None, "tokens": 8, "context": 512, "threads": None}
    return bench.Options(**(base | kw))  # type: ignore[arg-type]


def test_schedule_interleaves_every_config_once_per_round_in_rotating_order() -> None:
    runs = bench.schedule(opts())
    assert len(runs) == 2 * 3 * 3
    heavy = [r for r in runs if r.scenario == "heavy"]
    assert [r.config for r in heavy] == ["limit", "untuned", "recipe", "untuned", "recipe", "limit",
                                         "recipe", "limit", "untuned"]
    assert [r.round for r in heavy] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert runs[:9] == heavy  # scenario by scenario


def test_desktop_sizes_follow_the_scenarios() -> None:
    s = bench.SCENARIOS
    assert bench.desktop_mib(s["heavy"], 3000, 700, None) == 3750 - 700
    assert bench.desktop_mib(s["mild"], 3000, 700, None) == 3300 - 700
    fits = bench.desktop_mib(s["fits"], 3000, 700, None)
    assert 700 + fits / 2 == pytest.approx(0.9 * 3000) and 700 + fits > 3000  # fits only once compressed
    assert bench.desktop_mib(s["cpu"], 3000, 700, None) == 0
    assert bench.desktop_mib(s["heavy"], 3000, 700, 64) == 64


def test_pool_percent_is_scaled_to_the_emulated_ram() -> None:
    assert bench.scaled_pool_percent(50, 4096, 24576) == 8
    assert bench.scaled_pool_percent(1, 1024, 24576) == 1
    assert bench.scaled_pool_percent(50, 24576, 24576) == 50


def test_token_stats_from_arrival_times() -> None:
    stats = bench.token_stats(10.0, [10.5, 10.6, 10.7, 11.0])
    assert stats["tokens"] == 4 and stats["ttft_s"] == 0.5
    assert stats["tok_s"] == pytest.approx(3 / 0.5, rel=1e-3)
    assert stats["p50_ms"] == pytest.approx(100, abs=0.01) and stats["p99_ms"] == pytest.approx(300, abs=0.01)
    assert bench.token_stats(1.0, [])["tok_s"] is None


def test_summary_ratios_come_from_the_same_round() -> None:
    runs = [
        {"scenario": "heavy", "round": 0, "config": "limit", "tok_s": 10.0, "oom_kills": 0},
        {"scenario": "heavy", "round": 0, "config": "untuned", "tok_s": 2.0, "oom_kills": 1},
        {"scenario": "heavy", "round": 1, "config": "limit", "tok_s": 20.0, "oom_kills": 0},
        {"scenario": "heavy", "round": 1, "config": "untuned", "tok_s": 8.0, "oom_kills": 0},
        {"scenario": "heavy", "round": 2, "config": "untuned", "tok_s": None, "error": "died", "oom_kills": 1},
    ]
    summary = {s["config"]: s for s in bench.summarize(runs)}
    untuned = summary["untuned"]
    assert untuned["ratio_to_limit"] == {"median": 0.3, "min": 0.2, "max": 0.4}
    assert untuned["tok_s"]["median"] == 5.0 and untuned["runs"] == 3 and untuned["failed"] == 1
    assert untuned["oom_kills"] == 2
    assert summary["limit"]["ratio_to_limit"]["median"] == 1.0


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [("--scenario", "heavy,nope", ("heavy", "mild")), ("--config", "", ("limit",))],
)
def test_bad_lists_name_the_flag_and_the_allowed_values(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(BadInput) as exc:
        bench.parse_list(flag, value, allowed)
    text = str(exc.value)
    assert text.startswith(flag) and "allowed:" in text and all(a in text for a in allowed) and "\n" not in text


def test_markdown_names_machine_command_and_preliminary() -> None:
    runs = [{"scenario": "cpu", "round": 0, "config": c, "tok_s": t, "oom_kills": 0}
            for c, t in (("limit", 10.0), ("untuned", 5.0))]
    doc = {
        "preliminary": "shared machine", "time": "2026-11-26 15:00 UTC", "command": "autoglm-tune bench --rounds 1",
        "machine": {"cpu": "Test CPU", "cpus": 2, "mem_total_mib": 4096, "kernel": "6.1", "cgroup_memory": "v2"},
        "model": {"name": "m.gguf", "size_mib": 10}, "options": {"tokens": 8, "context": 512, "scenarios": ["cpu"],
                                                                 "configs": ["limit", "untuned"]},
        "emulation": None, "notes": ["tuned: not installed"], "summary": bench.summarize(runs),
    }
    text = bench.markdown(doc)
    assert "**Preliminary, noisy:** shared machine" in text
    assert "`autoglm-tune bench --rounds 1`" in text and "Test CPU, 2 CPUs, 4096 MiB" in text
    assert "| cpu | untuned | 1 (0) | 5.0 [5.0–5.0] | 0.50 [0.50–0.50] |" in text
    assert "not run: tuned: not installed" in text


def test_the_command_lists_the_names_the_bench_defines() -> None:
    assert tuple(bench.SCENARIOS) == bench_cli.SCENARIO_NAMES
    assert bench_cli.CONFIG_NAMES == bench.CONFIGS
    assert set(bench_cli.CONFIG_NAMES) == set(bench.CONFIG_TEXT)


def test_docs_keep_their_hand_written_text_around_the_results() -> None:
    first = bench.splice(None, "## Results\nold\n")
    assert first.startswith(bench.BEGIN) and "old" in first
    doc = "# Benchmarks\n\nmethod\n\n" + first + "\n## How to run\ncommand\n"
    again = bench.splice(doc, "## Results\nnew\n")
    assert again == f"# Benchmarks\n\nmethod\n\n{bench.BEGIN}\n## Results\nnew\n{bench.END}\n## How to run\ncommand\n"


def test_restore_puts_back_its_own_values_and_leaves_another_process_s_alone(tmp_path: Path) -> None:
    """Real Guard, settings redirected to files: what the bench wrote is restored; a value someone else wrote
    since is left alone and reported, not clobbered (a machine shared with other jobs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    guard = bench.Guard()
    try:
        for f in (a, b):
            f.write_text("1")
        guard.paths = {"x.a": str(a), "x.b": str(b)}
        guard.settings = {"x.a": "1", "x.b": "1"}
        guard.set("x.a", "5")
        guard.set("x.b", "5")
        b.write_text("7")  # another process
    finally:
        guard.swaps = bench.read_swaps()
        problems = guard.restore()
    assert a.read_text() == "1" and b.read_text() == "7"
    assert problems == [] and guard.notes == ["x.b was changed by another process during the bench (to 7); left alone"]


def test_what_a_tuner_the_bench_started_wrote_is_restored(tmp_path: Path) -> None:
    """TuneD writes vm.swappiness itself: once it has stopped, its value is the bench's to undo (before this was
    adopted, a swappiness of 10 stayed for every later run of every configuration)."""
    a = tmp_path / "a"
    a.write_text("60")
    guard = bench.Guard()
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
        guard.swaps = bench.read_swaps()
        problems = guard.restore()
    assert problems == [] and guard.notes == []
