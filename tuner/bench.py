"""`autoglm-tune bench`: what tuning buys on this machine, measured with a real llama.cpp server.

Functional core (no I/O): the scenarios and configurations, the interleaved schedule of runs, the
desktop size per scenario, the per-token statistics of one run, the summary (medians, spread, ratios to
`limit` from the same round) and the markdown table.
Imperative shell: `Guard` records every setting before anything is touched and puts all of it back at
the end — also on Ctrl-C, SIGTERM or SIGHUP — and checks that it did; `Bench` reserves RAM, starts the
desktop, the CPU hog and the server, sets each configuration, measures and tears down.

Low-spec emulation (research kernel-and-platform.md §9): RAM is taken away from the whole kernel by a
hugetlb reservation (`vm.nr_hugepages`), so zswap's pool, the page cache and every process compete for
the same RAM as on a small box. On a cgroup v1 host each run's processes go into a fresh memory cgroup
(no limit) made after the configuration is set: v1 copies `vm.swappiness` into a cgroup when it is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .errors import BadInput, TuneError

MIB = 1 << 20
EMULATIONS = ("hugetlb", "cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
HUGEPAGE_MIB = 2
WORKER = Path(__file__).with_name("bench_worker.py")
LLAMA_VENV = Path(os.environ.get("AUTOGLM_LLAMA_VENV", "/opt/autoglm-llama-venv"))
VOCAB = Path(os.environ.get("AUTOGLM_LLAMA_CACHE", "/opt/llama-build")) / "vocab" / "ggml-vocab-llama-spm.gguf"
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
PROMPT_WORDS = 96  # about 128 tokens with the Llama SPM vocabulary
EOS_TOKEN = 2
SERVER_READY_S = 600.0


class BenchError(TuneError):
    """A run could not be set up, or a setting could not be restored: exit 1."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------
# functional core


@dataclass(frozen=True)
class Scenario:
    name: str
    capped: bool  # RAM taken away to --ram-mib
    demand: float | None  # (model + desktop) / available RAM; None: sized by `desktop_mib`
    rewrite_percent: int  # desktop pages rewritten per second
    hog: bool  # a busy loop on one core
    text: str


SCENARIOS = {
    "heavy": Scenario("heavy", True, 1.25, 10, False, "demand ≈ 125 % of available RAM, active desktop"),
    "mild": Scenario("mild", True, 1.10, 10, False, "demand ≈ 110 % of available RAM, active desktop"),
    "fits": Scenario(
        "fits", True, None, 0, False, "model + desktop/2 (lzo-rle ≈ 2:1) = 90 % of available RAM, idle desktop"
    ),
    "cpu": Scenario("cpu", False, None, 0, True, "no memory pressure, a busy loop on one core"),
}
CONFIGS = ("limit", "untuned", "recipe", "autoglm-tune", "tuned")
CONFIG_TEXT = {
    "limit": "no RAM cap, no CPU hog, settings as found: the best this hardware does",
    "untuned": "settings as found (kernel defaults on a fresh box), llama.cpp's default threads, no pinning",
    "recipe": "swappiness 20, vfs_cache_pressure 50, zswap on with a 50 % pool (of the emulated RAM)",
    "autoglm-tune": "the plan applied through the root helper, the model started by `autoglm-tune launch`",
    "tuned": "TuneD's throughput-performance profile",
}
RECIPE = {"vm.swappiness": "20", "vm.vfs_cache_pressure": "50", "zswap.enabled": "Y"}
RECIPE_POOL_PERCENT = 50


@dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...]
    configs: tuple[str, ...]
    rounds: int
    ram_mib: int
    emulate: str  # "hugetlb" (RAM taken from the whole kernel) or "cgroup" (a memory limit on the workload)
    desktop_mib: int | None
    tokens: int
    context: int
    threads: int | None


@dataclass(frozen=True)
class RunKey:
    scenario: str
    round: int
    config: str


def parse_list(flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """"a,b" → ("a", "b"), each one of `allowed`; else BadInput naming the flag and the allowed values."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        what = f"unknown {', '.join(bad)}" if bad else "empty"
        raise BadInput(f"{flag} {value!r}: {what}; allowed: a comma-separated list of {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def schedule(opts: Options) -> list[RunKey]:
    """Scenario by scenario; within a scenario round by round, every configuration once per round, the order
    rotated each round so that no configuration always runs first after the set-up (research test-env §11)."""
    runs = []
    for scenario in opts.scenarios:
        for r in range(opts.rounds):
            k = r % len(opts.configs)
            runs += [RunKey(scenario, r, c) for c in opts.configs[k:] + opts.configs[:k]]
    return runs


def desktop_mib(scenario: Scenario, available_mib: int, model_mib: int, override: int | None) -> int:
    """The desktop's size: demand × available − model; for `fits` the size at which model + desktop/2 fills
    90 % of what is available (it fits only once the desktop is compressed); none under CPU contention."""
    if override is not None:
        return override
    if scenario.demand is not None:
        return max(0, round(scenario.demand * available_mib) - model_mib)
    if scenario.capped:
        return max(0, 2 * (round(0.9 * available_mib) - model_mib))
    return 0


def scaled_pool_percent(percent: int, ram_mib: int, total_mib: int) -> int:
    """zswap's max_pool_percent is a share of MemTotal, which includes the hugetlb reservation: scale it so
    that the pool may take `percent` of the emulated RAM (research §9)."""
    return max(1, min(100, round(percent * ram_mib / total_mib)))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def token_stats(started: float, arrivals: list[float]) -> dict[str, Any]:
    """TTFT, generation rate and per-token latency from the request start and each token's arrival time."""
    if not arrivals:
        return {"tokens": 0, "ttft_s": None, "tok_s": None, "p50_ms": None, "p99_ms": None}
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    span = arrivals[-1] - arrivals[0]
    return {
        "tokens": len(arrivals),
        "ttft_s": round(arrivals[0] - started, 4),
        "tok_s": round(len(gaps) / span, 3) if gaps and span > 0 else None,
        "p50_ms": round(percentile(gaps, 50), 2) if gaps else None,
        "p99_ms": round(percentile(gaps, 99), 2) if gaps else None,
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    import statistics

    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    import statistics

    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario and configuration: medians with min–max, and tok/s ÷ limit's from the same round."""
    limit = {(r["scenario"], r["round"]): r["tok_s"] for r in runs if r["config"] == "limit" and r.get("tok_s")}
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        for config in dict.fromkeys(r["config"] for r in runs if r["scenario"] == scenario):
            group = [r for r in runs if r["scenario"] == scenario and r["config"] == config]
            ok = [r for r in group if r.get("tok_s")]
            ratios = [r["tok_s"] / limit[(scenario, r["round"])] for r in ok if (scenario, r["round"]) in limit]
            out.append(
                {
                    "scenario": scenario,
                    "config": config,
                    "runs": len(group),
                    "failed": len(group) - len(ok),
                    "tok_s": _spread([r["tok_s"] for r in ok]),
                    "ratio_to_limit": _spread(ratios),
                    "ttft_s": _median(ok, "ttft_s"),
                    "p50_ms": _median(ok, "p50_ms"),
                    "p99_ms": _median(ok, "p99_ms"),
                    "majflt": _median(group, "majflt"),
                    "swap_used_mib": _median(group, "swap_used_mib"),
                    "zswap_stored_pages": _median(group, "zswap_stored_pages"),
                    "zswap_ratio": _median(group, "zswap_ratio"),
                    "oom_kills": sum(r.get("oom_kills") or 0 for r in group),
                }
            )
    return out


def cell(spread: dict[str, float | None], digits: int = 2) -> str:
    if spread["median"] is None:
        return "–"
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}–{spread['max']:.{digits}f}]"


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md: the machine, the command, the table; preliminary results say so at the top."""
    m = doc["machine"]
    lines = ["## Results", ""]
    if doc["preliminary"]:
        lines += [
            f"**Preliminary, noisy:** {doc['preliminary']}. Do not draw conclusions from these figures.",
            "",
        ]
    lines += [
        f"Produced {doc['time']} by `{doc['command']}`.",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_total_mib']} MiB RAM, kernel {m['kernel']}, "
        f"cgroup memory controller {m['cgroup_memory']}; model {doc['model']['name']} "
        f"({doc['model']['size_mib']} MiB), {doc['options']['tokens']} tokens generated after a ~128-token prompt, "
        f"context {doc['options']['context']}, weights not mmap'd (anonymous memory, so swap and zswap act on them).",
        "",
        "Emulated RAM: "
        + (EMULATION_TEXT[doc["emulation"]["how"]].format(**doc["emulation"]) if doc["emulation"] else "none"),
        "",
        "| scenario | config | runs (failed) | gen tok/s | ÷ limit | TTFT s | p50 ms | p99 ms | major faults "
        "| swap MiB | zswap pages (ratio) | OOM kills |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in doc["summary"]:
        pages, ratio = s["zswap_stored_pages"], s["zswap_ratio"]
        zswap = "–" if pages is None else f"{pages:.0f} ({_num(ratio, 1)})"
        lines.append(
            f"| {s['scenario']} | {s['config']} | {s['runs']} ({s['failed']}) | {cell(s['tok_s'], 1)} "
            f"| {cell(s['ratio_to_limit'])} | {_num(s['ttft_s'], 2)} | {_num(s['p50_ms'])} | {_num(s['p99_ms'])} "
            f"| {_num(s['majflt'])} | {_num(s['swap_used_mib'])} | {zswap} | {s['oom_kills']} |"
        )
    lines += ["", "Scenarios:", ""]
    lines += [f"- **{n}**: {SCENARIOS[n].text}" for n in doc["options"]["scenarios"]]
    lines += ["", "Configurations:", ""]
    lines += [f"- **{c}**: {CONFIG_TEXT[c]}" for c in doc["options"]["configs"]]
    lines += [f"- not run: {n}" for n in doc["notes"]]
    lines += [
        "",
        "Medians with [min–max] over rounds; ÷ limit is each run's tok/s divided by `limit`'s in the same round. "
        "Configurations run interleaved, round by round, in rotating order.",
        "",
    ]
    return "\n".join(lines)


EMULATION_TEXT = {
    "hugetlb": "{ram_mib} MiB, the rest of RAM reserved as hugetlb pages ({available_mib} MiB available at the start)",
    "cgroup": "a {ram_mib} MiB memory cgroup limit on the workload (fallback: on cgroup v1 the zswap pool is not "
    "charged to the limit, which flatters zswap; the rest of the machine is not under pressure)",
}
BEGIN, END = "<!-- bench results: begin (written by autoglm-tune bench --docs) -->", "<!-- bench results: end -->"


def splice(existing: str | None, results: str) -> str:
    """The docs file with `results` between the markers; the hand-written text around them is kept. A file
    without the markers (or none) becomes the results alone, between markers."""
    block = f"{BEGIN}\n{results.rstrip()}\n{END}\n"
    if existing is None or BEGIN not in existing or END not in existing:
        return block
    head, rest = existing.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1].lstrip("\n")


# ---------------------------------------------------------------------------------------------------
# imperative shell: the machine


def _read(path: str | Path) -> str:
    return Path(path).read_text().strip()


def _write(path: str | Path, value: str) -> None:
    Path(path).write_text(value)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (HugePages_* are counts)."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        out[name] = int(rest.split()[0])
    return out


def vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


def setting_paths() -> dict[str, str]:
    """Every setting a bench configuration may change (the helper's catalogue, hugetlb, and what TuneD's
    throughput-performance profile writes) → its file, for those this kernel has."""
    from autoglm_helper import catalogue

    paths = {name: f"/{knob.path}" for name, knob in catalogue.SCALAR_KNOBS.items()}
    paths |= {
        "vm.nr_hugepages": "/proc/sys/vm/nr_hugepages",
        "vm.dirty_ratio": "/proc/sys/vm/dirty_ratio",
        "vm.dirty_background_ratio": "/proc/sys/vm/dirty_background_ratio",
        "thp.enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
        "thp.defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
    }
    return {name: p for name, p in paths.items() if os.path.exists(p)}


def _selected(text: str) -> str:
    """ "always [madvise] never" → "madvise"; other values unchanged."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


def read_settings(paths: dict[str, str]) -> dict[str, str]:
    return {name: _selected(_read(p)) for name, p in paths.items()}


def read_swaps() -> dict[str, int]:
    """Active swap areas → priority."""
    out = {}
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        fields = line.split()
        out[fields[0]] = int(fields[4])
    return out


class Guard:
    """Records every setting first; `restore` stops what the bench started, rolls back its helper transactions,
    removes its swap file and cgroups and writes back every setting it touched — compare-and-set: a value
    another process wrote since is left alone and noted — and returns what is still not back (empty: all
    restored). Signals raise Interrupted, so that the code unwinds through its finally blocks; from the first
    signal on, further ones are ignored."""

    def __init__(self) -> None:
        self.paths = setting_paths()
        self.settings = read_settings(self.paths)
        self.swaps = read_swaps()
        self.procs: list[subprocess.Popen[Any]] = []
        self.cgroups: list[Path] = []
        self.files: list[Path] = []
        self.txids: list[str] = []
        self.touched: set[str] = set()  # settings the bench (or what it ran) may have changed
        self.expected: dict[str, str] = {}  # what the bench (or the helper for it) wrote there
        self.foreign: dict[str, str] = {}  # touched settings another process changed since: left alone
        self.notes: list[str] = []
        self.previous: dict[int, Any] = {}  # read by _raise, which may run while the next line runs
        self.previous = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _raise(self, signum: int, _frame: object) -> None:
        for s in self.previous:  # one signal is enough: the rest of the way is clean-up
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    def set(self, name: str, value: str) -> None:
        self.touched.add(name)
        self.expected[name] = value
        _write(self.paths[name], value)

    def applied(self, changes: list[dict[str, Any]]) -> None:
        """Settings the helper wrote for the bench (its report's subject and read-back value)."""
        for c in changes:
            if c["subject"] in self.paths:
                self.touched.add(c["subject"])
                new = c["new"]
                self.expected[c["subject"]] = ("Y" if new else "N") if isinstance(new, bool) else str(new)

    def start(self, argv: list[str], cgroup: Path | None, **kwargs: Any) -> subprocess.Popen[Any]:
        """A child in its own process group (killed as a group), in `cgroup` before it allocates anything."""
        procs_file = str(cgroup / "cgroup.procs") if cgroup else None

        def enter() -> None:
            if procs_file:
                with open(procs_file, "w") as fh:
                    fh.write("0")

        proc = subprocess.Popen(argv, process_group=0, preexec_fn=enter, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
        from .launch import stop_group

        stop_group(proc, grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def adopt_live(self) -> None:
        """The live values are what the bench wrote: after a tuner the bench started (TuneD) has stopped, its
        writes are the bench's to undo, not another process's to leave alone."""
        self.expected.update(read_settings(self.paths))

    def rollback(self, txid: str) -> None:
        """Through the helper; when it refuses (another process changed a value since: drift), the settings are
        put back knob by knob by `reset_settings`, which leaves the other process's values alone."""
        from . import helper_client

        self.txids.remove(txid)
        try:
            helper_client.rollback(txid, False, False)
        except TuneError as exc:
            self.notes.append(f"helper rollback of {txid} refused ({exc}); restored knob by knob instead")

    def reset_settings(self) -> None:
        """Every touched setting back where it differs: hugetlb pages first (they free RAM for the rest), zswap
        off last. Settings the bench did not touch are left alone: others may change them on a shared machine."""
        for name in sorted(self.touched, key=lambda n: (n != "vm.nr_hugepages", n == "zswap.enabled")):
            with contextlib.suppress(OSError):
                live = _selected(_read(self.paths[name]))
                if live == self.settings[name]:
                    continue
                if name in self.expected and live != self.expected[name]:
                    self.foreign[name] = live
                    continue
                _write(self.paths[name], self.settings[name])

    def remove_cgroup(self, cg: Path) -> None:
        """rmdir (children first: launch gives the model a memory cgroup of its own inside the run's), retried
        while the last task is still on its way out (EBUSY)."""
        for _ in range(50):
            try:
                for child in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    child.rmdir()
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if not cg.exists() and cg in self.cgroups:
            self.cgroups.remove(cg)

    def restore(self) -> list[str]:
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)
        problems = []
        for proc in list(self.procs):
            self.stop(proc, grace=10.0)
        for txid in list(self.txids):
            self.rollback(txid)
        for path in self.files:
            if str(path) in read_swaps():
                subprocess.run(["swapoff", str(path)], check=False, capture_output=True)
        # priorities the helper changed and could not roll back; areas others added or removed meanwhile are theirs
        for area, priority in self.swaps.items():
            if read_swaps().get(area, priority) != priority:
                subprocess.run(["swapoff", area], check=False, capture_output=True)
                prio = ["-p", str(priority)] if priority >= 0 else []
                subprocess.run(["swapon", *prio, area], check=False, capture_output=True)
        self.reset_settings()
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for cg in list(self.cgroups):
            self.remove_cgroup(cg)
        now = read_settings(self.paths)
        was = self.settings
        problems += [
            f"{n} is {now[n]}, was {was[n]}" for n in sorted(self.touched) if now[n] != was[n] and n not in self.foreign
        ]
        self.notes += [
            f"{n} was changed by another process during the bench (to {v}); left alone" for n, v in self.foreign.items()
        ]
        swaps = read_swaps()
        problems += [f"swap area {a} has priority {swaps[a]}, had {p}" for a, p in self.swaps.items()
                     if swaps.get(a, p) != p]
        problems += [f"swap file {p} is still active" for p in self.files if str(p) in swaps]
        problems += [f"{p} is still there" for p in [*self.files, *self.cgroups] if p.exists()]
        problems += [f"process {p.pid} still runs" for p in self.procs if p.poll() is None]
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return problems


def memory_cgroup_of(pid: int) -> tuple[str | None, int | None]:
    """The process's cgroup v1 memory cgroup and that cgroup's swappiness (None on cgroup v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            knob = Path(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.swappiness")
            return path, int(knob.read_text()) if knob.exists() else None
    return None, None


def physical_cores() -> int:
    """What llama.cpp's default -t would be: distinct thread_siblings masks (research §4.1)."""
    cpus = sorted(os.sched_getaffinity(0))
    siblings = set()
    for c in cpus:
        try:
            siblings.add(_read(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings"))
        except OSError:
            siblings.add(str(c))
    return max(1, len(siblings))


def machine_info() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )
    cgroup = "v1" if (CGROUP_V1_MEMORY / "cgroup.procs").exists() else "v2"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_mib": meminfo()["MemTotal"] // 1024,
        "kernel": os.uname().release,
        "cgroup_memory": cgroup,
        "hostname": os.uname().nodename,
    }


# ---------------------------------------------------------------------------------------------------
# imperative shell: one run


def _post_stream(url: str, prompt: str, tokens: int, timeout: float) -> tuple[float, list[float]]:
    """Stream a greedy completion (EOS banned: always `tokens` tokens); the start and each chunk's arrival."""
    import urllib.request

    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(EOS_TOKEN): -100},
    }
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    arrivals = []
    started = time.monotonic()
    with opener.open(request, timeout=timeout) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            if json.loads(data)["choices"][0].get("finish_reason") is None:  # the last chunk carries no token
                arrivals.append(time.monotonic())
    return started, arrivals


def _healthy(url: str) -> bool:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):  # URLError is an OSError
        return False


def _majflt(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[9])
    except (OSError, IndexError, ValueError):
        return None


def _proc_mib(pid: int, file: str, field: str) -> int | None:
    """A "Field:  N kB" line of /proc/PID/FILE in MiB; None when the process or the field is gone."""
    try:
        text = Path(f"/proc/{pid}/{file}").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) // 1024 for line in text.splitlines() if line.startswith(f"{field}:")), None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Model:
    path: Path
    need_mib: int  # file + KV cache at the bench's context


class Bench:
    def __init__(self, guard: Guard, opts: Options, model: Model, work: Path, policy: Path | None) -> None:
        self.g = guard
        self.opts = opts
        self.model = model
        self.work = work
        self.policy = policy
        self.python = LLAMA_VENV / "bin" / "python"
        self.total_mib = meminfo()["MemTotal"] // 1024
        self.count = 0
        text = "The quick brown fox jumps over the lazy dog near the river bank."
        self.prompt = " ".join(text.split()[i % 13] for i in range(PROMPT_WORDS))

    # -- scenario-wide parts --------------------------------------------------------------------

    def make_swap(self, size_mib: int) -> Path:
        """A swap file at the default (negative) priority, as a distribution installs it."""
        path = self.work / "bench.swap"
        self.g.files.append(path)
        for argv in (["fallocate", "-l", f"{size_mib}M", str(path)], ["mkswap", str(path)], ["swapon", str(path)]):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"--work {self.work}: {' '.join(argv[:1])} failed ({done.stderr.strip()}); allowed: "
                                 "a directory on ext4 or xfs with room for the swap file")
            path.chmod(0o600)
        return path

    def drop_swap(self, path: Path) -> None:
        """swapoff (unless something else already did: a shared machine's test clean-up may) and delete."""
        if str(path) in read_swaps():
            done = subprocess.run(["swapoff", str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"swapoff {path} failed: {done.stderr.strip()}")
        path.unlink()
        self.g.files.remove(path)

    # -- per-run parts -----------------------------------------------------------------------------

    def reserve(self) -> int:
        """Take RAM away: MemTotal − hugetlb = --ram-mib. Returns the pages reserved; BenchError when the kernel
        could not find them all (fragmented or in use): the box would not be the one asked for."""
        want = max(0, (self.total_mib - self.opts.ram_mib) // HUGEPAGE_MIB)
        self.g.set("vm.nr_hugepages", str(want))
        got = int(_read("/proc/sys/vm/nr_hugepages"))
        if got < want * 0.98:
            raise BenchError(
                f"could reserve only {got} of {want} hugetlb pages (fragmented or in use): the emulated RAM would be "
                f"{self.total_mib - got * HUGEPAGE_MIB} MiB instead of {self.opts.ram_mib}"
            )
        return got

    def cgroup(self, limit_mib: int | None) -> Path | None:
        """A fresh memory cgroup for the run's processes: on v1 always (it copies the swappiness set just now),
        on v2 only for --emulate cgroup; with `limit_mib`, their memory limit (memory.limit_in_bytes on v1,
        memory.max on v2)."""
        self.count += 1
        name = f"autoglm-bench-{os.getpid()}-{self.count}"
        if (CGROUP_V1_MEMORY / "cgroup.procs").exists():
            path, limit_file = CGROUP_V1_MEMORY / name, "memory.limit_in_bytes"
        elif limit_mib is None:
            return None
        elif "memory" in _read(CGROUP_ROOT / "cgroup.subtree_control").split():
            path, limit_file = CGROUP_ROOT / name, "memory.max"
        else:
            raise BenchError("--emulate cgroup: no cgroup memory controller here; allowed: --emulate hugetlb")
        path.mkdir()
        self.g.cgroups.append(path)
        if limit_mib is not None:
            _write(path / limit_file, str(limit_mib * MIB))
        return path

    def desktop(self, mib: int, rewrite: int, cg: Path | None) -> subprocess.Popen[str]:
        proc = self.g.start(
            [str(self.python), str(WORKER), "desktop", str(mib), str(rewrite)],
            cg, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise BenchError(f"the desktop working set ({mib} MiB) did not start (exit {proc.wait()})")
        return proc

    def server_argv(self, port: int, threads: int) -> list[str]:
        return [
            str(self.python), "-m", "llama_cpp.server", "--model", str(self.model.path),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(self.opts.context), "--use_mmap", "false", "--use_mlock", "false",
        ]

    def start_server(self, port: int, cg: Path | None, log: Path) -> tuple[subprocess.Popen[Any], int]:
        threads = self.opts.threads or physical_cores()
        with log.open("wb") as fh:
            proc = self.g.start(
                self.server_argv(port, threads), cg, stdout=fh, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
        deadline = time.monotonic() + SERVER_READY_S
        while not _healthy(f"http://127.0.0.1:{port}/v1/models"):
            if proc.poll() is not None:
                raise BenchError(f"the server exited with {proc.returncode} while loading (see {log})")
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready after {SERVER_READY_S:.0f} s (see {log})")
            time.sleep(0.25)
        return proc, proc.pid

    def launch_policy(self, port: int) -> Path:
        """The user's --policy (if any) with the bench's [model] section: what `autoglm-tune launch` reads."""
        import tomllib

        import tomli_w

        doc: dict[str, Any] = {}
        if self.policy is not None:
            with self.policy.open("rb") as fh:
                doc = tomllib.load(fh)
        doc.setdefault("model", {}).update(
            {
                "preset": "llama-cpp-python",
                "program": str(self.python),
                "model_path": str(self.model.path),
                "context_size": self.opts.context,
                "host": "127.0.0.1",
                "port": port,
                "ready_timeout_s": int(SERVER_READY_S),
                "mmap": False,
            }
        )
        if self.opts.threads:
            doc.setdefault("process", {})["threads"] = self.opts.threads
        path = self.work / "launch-policy.toml"
        path.write_bytes(tomli_w.dumps(doc).encode())
        return path

    def launch(self, port: int, cg: Path | None, log: Path) -> tuple[subprocess.Popen[Any], int]:
        """`autoglm-tune launch` with the planned CPU set, threads and memory protection; the server's pid."""
        argv = [sys.executable, "-m", "autoglm_tune", "launch", "--policy", str(self.launch_policy(port)), "--json",
                "--log", str(log)]
        proc = self.g.start(argv, cg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"autoglm-tune launch exited {proc.wait()}: {proc.stderr.read() if proc.stderr else ''}")
        return proc, json.loads(line)["pid"]

    def apply_plan(self, capped: bool) -> str | None:
        """The plan for this machine — with its RAM as emulated — applied through the root helper."""
        from . import helper_client
        from .collect import collect_facts
        from .planner import make_plan
        from .policy import load_policy

        facts = collect_facts(Path("/"))
        if capped:
            memory = dataclasses.replace(facts.memory, total_kib=self.opts.ram_mib * 1024)
            facts = dataclasses.replace(facts, memory=memory)
        plan = make_plan(facts, load_policy(self.policy)).to_dict()
        # units: the helper cannot apply them yet; swap.file: the bench's own swap file stands in for it (a
        # plan wants one only when something else turned that off, and a refused rollback would leave it)
        changes = [c for c in plan["changes"] if c["knob"] not in ("unit", "swap.file")]
        for c in changes:
            if c["knob"] == "zswap.max_pool_percent" and capped:
                c["target"] = scaled_pool_percent(c["target"], self.opts.ram_mib, self.total_mib)
        if not changes:
            return None
        report = helper_client.apply({**plan, "changes": changes}, False, False)
        if report["result"] != "committed":
            return None
        self.g.applied(report["changes"])
        self.g.txids.append(report["txid"])
        return report["txid"]

    def set_recipe(self, capped: bool) -> None:
        ram = self.opts.ram_mib if capped else self.total_mib
        self.g.set("zswap.max_pool_percent", str(scaled_pool_percent(RECIPE_POOL_PERCENT, ram, self.total_mib)))
        for name, value in RECIPE.items():
            self.g.set(name, value)

    def start_tuned(self, log: Path) -> subprocess.Popen[Any]:
        self.g.touched.update(self.g.paths)  # TuneD may write any of them; its own rollback is not relied on
        with log.open("wb") as fh:
            proc = self.g.start(["tuned", "--profile", "throughput-performance"], None, stdout=fh,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while _read("/proc/sys/vm/dirty_ratio") != "40":  # throughput-performance's vm.dirty_ratio
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"TuneD did not apply throughput-performance (see {log})")
            time.sleep(0.5)
        return proc

    def run(self, key: RunKey, desktop_size: int) -> dict[str, Any]:
        """One measured run; every part it starts or sets is undone before it returns."""
        import http.client

        scenario = SCENARIOS[key.scenario]
        capped = scenario.capped and key.config != "limit"
        hog = scenario.hog and key.config != "limit"
        result: dict[str, Any] = {**dataclasses.asdict(key), "ok": False, "loadavg": os.getloadavg()[0]}
        started: list[subprocess.Popen[Any]] = []
        txid = None
        cg = None
        oom_before = vmstat("oom_kill")
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{key.scenario}-{key.round}-{key.config}.log"
        try:
            if key.config == "recipe":
                self.set_recipe(capped)
            elif key.config == "autoglm-tune":
                txid = self.apply_plan(capped)
                result["txid"] = txid
            elif key.config == "tuned":
                started.append(self.start_tuned(logs / f"tuned-{key.scenario}-{key.round}.log"))
            if capped and self.opts.emulate == "hugetlb":
                result["hugepages"] = self.reserve()
            limit = self.opts.ram_mib if capped and self.opts.emulate == "cgroup" else None
            cg = self.cgroup(limit)
            if cg is not None and limit is not None:
                v1 = cg / "memory.limit_in_bytes"
                result["cgroup_limit_mib"] = int(_read(v1 if v1.exists() else cg / "memory.max")) // MIB
            desk = self.desktop(desktop_size, scenario.rewrite_percent, cg) if desktop_size else None
            started += [desk] if desk else []
            if hog:
                started.append(self.g.start([sys.executable, str(WORKER), "hog"], cg))
            port = _free_port()
            t0 = time.monotonic()
            if key.config == "autoglm-tune":
                server, pid = self.launch(port, cg, log)
            else:
                server, pid = self.start_server(port, cg, log)
            started.append(server)
            result["load_s"] = round(time.monotonic() - t0, 2)
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            environ = dict(
                e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e
            )
            result["threads"] = int(environ.get(b"OMP_NUM_THREADS", b"0"))
            result["cpus"] = status["Cpus_allowed_list"].strip()
            result["vm_locked_kib"] = int(status["VmLck"].split()[0])
            result["memory_cgroup"], result["memcg_swappiness"] = memory_cgroup_of(pid)
            result["settings"] = read_settings(self.g.paths)  # as they were while it ran
            flt = _majflt(pid)
            begin, arrivals = _post_stream(
                f"http://127.0.0.1:{port}/v1/completions", self.prompt, self.opts.tokens, SERVER_READY_S
            )
            after = _majflt(pid)
            result["model_swap_mib"] = _proc_mib(pid, "status", "VmSwap")  # its own pages in swap: was it protected?
            result |= token_stats(begin, arrivals)
            result["majflt"] = after - flt if after is not None and flt is not None else None
            mem = meminfo()
            result["swap_used_mib"] = (mem["SwapTotal"] - mem["SwapFree"]) // 1024
            result["zswap_stored_pages"] = mem.get("Zswapped", 0) // 4
            result["zswap_ratio"] = round(mem["Zswapped"] / mem["Zswap"], 2) if mem.get("Zswap") else None
            result["desktop_alive"] = desk.poll() is None if desk else None
            if desk and result["desktop_alive"]:
                result["desktop_thp_mib"] = _proc_mib(desk.pid, "smaps_rollup", "AnonHugePages")
            result["oom_kills"] = vmstat("oom_kill") - oom_before
            result["ok"] = result["tok_s"] is not None
        except (TuneError, OSError, ValueError, http.client.HTTPException, subprocess.CalledProcessError) as exc:
            result["error"] = str(exc)
            result["oom_kills"] = vmstat("oom_kill") - oom_before
        finally:
            for proc in reversed(started):
                self.g.stop(proc)
            if key.config == "tuned":
                self.g.adopt_live()
            if txid is not None:
                self.g.rollback(txid)
            self.g.reset_settings()
            if cg is not None:
                self.g.remove_cgroup(cg)
        return result


# ---------------------------------------------------------------------------------------------------
# imperative shell: the whole bench


def progress(err: TextIO, done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    if err.isatty():
        err.write(f"\r\033[K[{bar}] {done}/{total} {label}")
        if done == total:
            err.write("\n")
    else:
        err.write(f"bench: [{bar}] {done}/{total} {label}\n")
    err.flush()


def prepare_model(model: Path | None, size: str, work: Path, context: int) -> Model:
    from . import gguf

    if model is None:
        model = work / "models" / f"llama-{size}-q4_0.gguf"
        if not model.exists():
            if not VOCAB.exists():
                raise BadInput(f"--model-size {size}: the tokenizer {VOCAB} is missing; allowed: run "
                               "tests/setup-llama.sh first, or --model PATH")
            model.parent.mkdir(parents=True, exist_ok=True)
            tmp = model.with_suffix(".tmp")
            subprocess.run([str(LLAMA_VENV / "bin" / "python"), str(WORKER), "model", size, str(VOCAB), str(tmp)],
                           check=True)
            tmp.rename(model)
    elif not model.is_file():
        raise BadInput(f"--model {model}: no such file; allowed: the path of a GGUF model file")
    shape = gguf.model_shape(gguf.read_metadata(model), f"--model {model}")
    need = model.stat().st_size + shape.kv_cache_bytes(context)
    return Model(model, need // MIB)


def check_options(opts: Options, total_mib: int, used_mib: int) -> None:
    if opts.rounds < 1:
        raise BadInput(f"--rounds {opts.rounds}: allowed: an integer ≥ 1")
    if opts.tokens < 2:
        raise BadInput(f"--tokens {opts.tokens}: allowed: an integer ≥ 2")
    if not 256 <= opts.context <= 1048576:
        raise BadInput(f"--context {opts.context}: allowed: an integer 256–1048576")
    if opts.threads is not None and opts.threads < 1:
        raise BadInput(f"--threads {opts.threads}: allowed: an integer ≥ 1")
    if opts.desktop_mib is not None and opts.desktop_mib < 0:
        raise BadInput(f"--desktop-mib {opts.desktop_mib}: allowed: an integer ≥ 0")
    if any(SCENARIOS[s].capped for s in opts.scenarios) and not used_mib + 256 <= opts.ram_mib <= total_mib:
        raise BadInput(
            f"--ram-mib {opts.ram_mib}: allowed: an integer {used_mib + 256}–{total_mib} (this machine's RAM; "
            f"{used_mib} MiB are in use now)"
        )


def bench(
    opts: Options, model: Model, work: Path, policy: Path | None, command: str, preliminary: str | None,
    notes: list[str], err: TextIO,
) -> tuple[dict[str, Any], list[str]]:
    """All runs; returns the results document and what could not be restored (empty when all was)."""
    mem = meminfo()
    in_use = (mem["MemTotal"] - mem["MemAvailable"]) // 1024
    available_mib = opts.ram_mib - (in_use if opts.emulate == "hugetlb" else 0)
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "command": command,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preliminary": preliminary,
        "machine": machine_info(),
        "model": {"name": model.path.name, "path": str(model.path), "size_mib": model.path.stat().st_size // MIB,
                  "need_mib": model.need_mib},
        "options": dataclasses.asdict(opts),
        "emulation": {"how": opts.emulate, "ram_mib": opts.ram_mib, "available_mib": available_mib}
        if any(SCENARIOS[s].capped for s in opts.scenarios) else None,
        "notes": notes,
        "runs": runs,
        "interrupted": None,
        "error": None,
    }
    guard = Guard()
    problems: list[str] = []
    try:
        b = Bench(guard, opts, model, work, policy)
        keys = schedule(opts)
        progress(err, 0, len(keys), "starting")
        # one swap file for every scenario and configuration: the plan then finds disk swap and plans none
        swap = b.make_swap(max(1024, 2 * opts.ram_mib))
        for i, key in enumerate(keys):
            scenario = SCENARIOS[key.scenario]
            size = desktop_mib(scenario, available_mib, model.need_mib, opts.desktop_mib)
            result = b.run(key, size)
            result["desktop_mib"] = size
            runs.append(result)
            tok = f"{result['tok_s']:.1f} tok/s" if result.get("tok_s") else result.get("error", "failed")
            progress(err, i + 1, len(keys), f"{key.scenario} round {key.round + 1} {key.config}: {tok}")
        b.drop_swap(swap)
    except Interrupted as exc:
        doc["interrupted"] = exc.signum
        err.write(f"\nbench: interrupted by {exc}; restoring every setting\n")
    except BenchError as exc:  # outside a run (the swap file): the runs so far are still written out
        doc["error"] = str(exc)
    finally:
        problems = guard.restore()
    doc["summary"] = summarize(runs)
    doc["restored"] = {"settings": sorted(guard.touched), "swaps": guard.swaps, "problems": problems,
                       "notes": guard.notes}
    for note in guard.notes:
        err.write(f"bench: warning: {note}\n")
    return doc, problems


def write_outputs(doc: dict[str, Any], out: Path, docs: Path | None, err: TextIO) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (out / "BENCHMARKS.md").write_text(text)
    if docs is not None:
        docs.write_text(splice(docs.read_text() if docs.exists() else None, text))
    if not any(r.get("tok_s") for r in doc["runs"]):
        return
    plot = subprocess.run(
        [str(LLAMA_VENV / "bin" / "python"), str(WORKER), "plot", str(out / "results.json"), str(out / "bench.png")],
        capture_output=True, text=True,
    )
    if plot.returncode != 0:
        tail = plot.stderr.strip().splitlines()[-1:] or ["no output"]
        err.write(f"bench: no plot ({tail[0]}); {LLAMA_VENV}/bin/pip install matplotlib adds it\n")
