"""The runs of `autoglm-tune bench`: `Bench` reserves RAM, starts the desktop, the CPU hog and the server, sets
each configuration, measures and tears down; `bench` runs the whole schedule under a `Guard` and
`write_outputs` writes the results, the markdown and the plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import BadInput, TuneError
from .design import (
    CONFIGS_BY_NAME,
    HAND_NICE,
    MIB,
    RECIPE,
    RECIPE_LITERAL_POOL,
    RECIPE_POOL_MIB,
    SCENARIOS,
    Config,
    Options,
    RunKey,
    desktop_mib,
    policy_variant,
    scaled_pool_percent,
    schedule,
)
from .machine import (
    CGROUP_V1_MEMORY,
    Guard,
    Interrupted,
    emulated_watermarks,
    machine_info,
    memcpy_gbs,
    meminfo,
    memory_cgroup_of,
    physical_cores,
    read_settings,
    read_swaps,
    read_value,
    swap_latency,
    vm_counters,
    vmstat,
    write_value,
    zone_watermarks,
)
from .report import desktop_window, failed, mark_drift, markdown, primary, splice, summarize, token_stats

CGROUP_ROOT = Path("/sys/fs/cgroup")
HUGEPAGE_MIB = 2
WORKER = Path(__file__).with_name("worker.py")
LLAMA_VENV = Path(os.environ.get("AUTOGLM_LLAMA_VENV", "/opt/autoglm-llama-venv"))
VOCAB = Path(os.environ.get("AUTOGLM_LLAMA_CACHE", "/opt/llama-build")) / "vocab" / "ggml-vocab-llama-spm.gguf"
PROMPT_WORDS = 96  # about 128 tokens with the Llama SPM vocabulary
EOS_TOKEN = 2
SERVER_READY_S = 600.0


class BenchError(TuneError):
    """A run could not be set up, or a setting could not be restored: exit 1."""


def _post_stream(url: str, prompt: str, tokens: int, deadline_s: float) -> tuple[float, list[float], dict[str, Any]]:
    """Stream a greedy completion (EOS banned: always `tokens` tokens) through the OpenAI-style endpoint both
    servers have; the start, each token's arrival and the server's own timings when it sends them. Reading stops
    at `deadline_s`: a request that slow counts what had arrived by then."""
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
    extra: dict[str, Any] = {}
    started = time.monotonic()
    with opener.open(request, timeout=deadline_s) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "timings" in chunk:
                extra["server_timings"] = chunk["timings"]
            choices = chunk.get("choices") or [{}]
            if choices[0].get("finish_reason") is None and choices[0].get("text", "") != "":
                arrivals.append(time.monotonic())
            if time.monotonic() - started > deadline_s:
                extra["truncated"] = True
                break
    return started, arrivals, extra


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


PROCESS_FIGURES = ("rss_kib", "uss_kib", "swap_kib", "io_class", "io_priority", "sched_policy", "oom_score_adj")


def _server_process(pid: int) -> dict[str, Any]:
    """The server process as psutil reports it (`status`'s reader: CPU set, threads, nice, I/O class, RSS, USS,
    swap; locked memory from /proc); a BenchError when it is gone, which fails the run."""
    from ..model_status import read_process

    found = read_process(pid)
    if found is None:
        raise BenchError(f"the server (pid {pid}) is gone")
    return found


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
    def __init__(self, guard: Guard, opts: Options, model: Model, work: Path, policy: Path | None,
                 server_bin: Path | None, probe_model: Path | None) -> None:
        self.g = guard
        self.opts = opts
        self.model = model
        self.work = work
        self.policy = policy
        self.server_bin = server_bin
        self.probe_model = probe_model
        self.python = LLAMA_VENV / "bin" / "python"
        self.flags: frozenset[str] | None = None
        self.check_server_flags()
        self.total_mib = meminfo()["MemTotal"] // 1024
        self.count = 0
        self.base_policy: dict[str, Any] = {}
        if policy is not None:
            import tomllib

            with policy.open("rb") as fh:
                self.base_policy = tomllib.load(fh)
        text = "The quick brown fox jumps over the lazy dog near the river bank."
        self.prompt = " ".join(text.split()[i % 13] for i in range(PROMPT_WORDS))
        # about 4 words per 3 tokens with the Llama SPM vocabulary; the server's own count is recorded
        self.long_prompt = " ".join(text.split()[i % 13] for i in range(opts.prompt_tokens * 3 // 4))
        self.files = work / "desktop-files"
        if opts.file_mib:
            subprocess.run([str(self.python), str(WORKER), "files", str(self.files), str(opts.file_mib)], check=True)

    def check_server_flags(self) -> None:
        """The server's options, probed the way `launch` probes them (the preset's `probe` arguments: llama-server
        --help, python -m llama_cpp.server --help); then every command line the bench will start itself is
        checked against them, so that a build without one of its flags is refused before anything runs."""
        from ..launch import missing_flag, probe_flags, server_flags
        from ..presets import load_preset

        preset = load_preset(self.opts.server)
        program = str(self.server_bin) if self.opts.server == "llama-server" else str(self.python)
        if self.opts.server == "llama-server" and self.server_bin is None:
            return
        self.flags = server_flags(probe_flags(program, args=preset.probe or ("--help",)), preset)
        for name in self.opts.configs:
            config = CONFIGS_BY_NAME[name]
            if config.start != "launch":  # `autoglm-tune launch` probes and refuses on its own
                argv = self.server_argv(0, config)
                missing_flag(argv[argv.index(program):], self.flags, program, preset)

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
        """Take RAM away: MemTotal − hugetlb = --ram-mib, with the watermarks the emulated box would have.
        Returns the pages reserved; BenchError when the kernel could not find them all (fragmented or in use):
        the box would not be the one asked for."""
        want = max(0, (self.total_mib - self.opts.ram_mib) // HUGEPAGE_MIB)
        self.g.set("vm.nr_hugepages", str(want))
        got = int(read_value("/proc/sys/vm/nr_hugepages"))
        if got < want * 0.98:
            raise BenchError(
                f"could reserve only {got} of {want} hugetlb pages (fragmented or in use): the emulated RAM would be "
                f"{self.total_mib - got * HUGEPAGE_MIB} MiB instead of {self.opts.ram_mib}"
            )
        scale = int(self.g.settings.get("vm.watermark_scale_factor", "10"))
        for name, value in emulated_watermarks(self.opts.ram_mib, self.total_mib, scale).items():
            if name in self.g.paths:
                self.g.set(name, value)
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
        elif "memory" in read_value(CGROUP_ROOT / "cgroup.subtree_control").split():
            path, limit_file = CGROUP_ROOT / name, "memory.max"
        else:
            raise BenchError("--emulate cgroup: no cgroup memory controller here; allowed: --emulate hugetlb")
        path.mkdir()
        self.g.cgroups.append(path)
        if limit_mib is not None:
            write_value(path / limit_file, str(limit_mib * MIB))
        return path

    def desktop(self, mib: int, accesses: int, cg: Path | None) -> tuple[subprocess.Popen[str], list[int]]:
        files = str(self.files) if self.opts.file_mib else "-"
        proc = self.g.start(
            [str(self.python), str(WORKER), "desktop", str(mib), files, str(accesses)],
            cg, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        if not words or words[0] != "ready":
            raise BenchError(f"the desktop ({mib} MiB) did not start (exit {proc.wait()})")
        return proc, [int(w) for w in words[1:]]

    @staticmethod
    def desktop_counters(proc: subprocess.Popen[str]) -> dict[str, Any] | None:
        """The desktop's counters now (SIGUSR1, one JSON line back); None when it has died."""
        if proc.poll() is not None:
            return None
        assert proc.stdout is not None
        proc.send_signal(signal.SIGUSR1)
        line = proc.stdout.readline()
        return json.loads(line) if line else None

    def server_argv(self, port: int, config: Config) -> list[str]:
        """The server as a user starts it: its own defaults (threads too) but for the port and the context, which
        every configuration shares; hand-tune adds the one flag and the thread count a user would try."""
        threads = self.opts.threads or (physical_cores() if config.start in ("hand", "nice") else None)
        wrap = ["nice", "-n", str(HAND_NICE)] if config.start == "nice" else []
        if self.opts.server == "llama-server":
            argv = [*wrap, str(self.server_bin), "--model", str(self.model.path), "--host", "127.0.0.1",
                    "--port", str(port), "--ctx-size", str(self.opts.context)]
            argv += ["--threads", str(threads), "--threads-batch", str(threads)] if threads else []
            argv += ["--prio", "2"] if config.start == "hand" else []  # llama.cpp's "high": nice -10
            if self.opts.mmap:
                return argv
            return argv + (["--load-mode", "none"] if "--load-mode" in (self.flags or ()) else ["--no-mmap"])
        argv = [str(self.python), "-m", "llama_cpp.server", "--model", str(self.model.path), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(self.opts.context)]
        argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
        argv += [] if self.opts.mmap else ["--use_mmap", "false"]
        return (["nice", "-n", str(HAND_NICE)] if config.start in ("hand", "nice") else []) + argv

    def health_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/" + ("health" if self.opts.server == "llama-server" else "v1/models")

    def wait_ready(self, proc: subprocess.Popen[Any], port: int, log: Path) -> None:
        deadline = time.monotonic() + SERVER_READY_S
        while not _healthy(self.health_url(port)):
            if proc.poll() is not None:
                raise BenchError(f"the server exited with {proc.returncode} while loading (see {log})")
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready after {SERVER_READY_S:.0f} s (see {log})")
            time.sleep(0.1)

    def start_server(self, port: int, cg: Path | None, log: Path, config: Config) -> tuple[subprocess.Popen[Any], int]:
        env = dict(os.environ)
        if self.opts.threads or config.start in ("hand", "nice"):
            env["OMP_NUM_THREADS"] = str(self.opts.threads or physical_cores())
        with log.open("wb") as fh:
            proc = self.g.start(self.server_argv(port, config), cg, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.wait_ready(proc, port, log)
        return proc, proc.pid

    def policy_file(self, config: Config, port: int) -> Path:
        """--policy with the configuration's overrides and the bench's [model] section: what the plan and
        `autoglm-tune launch` read for this configuration."""
        import tomli_w

        doc = policy_variant(self.base_policy, config)
        server = {"preset": "llama-server", "program": str(self.server_bin)} if self.opts.server == "llama-server" \
            else {"preset": "llama-cpp-python", "program": str(self.python)}
        doc.setdefault("model", {}).update(
            {**server, "model_path": str(self.model.path), "context_size": self.opts.context, "host": "127.0.0.1",
             "port": port, "ready_timeout_s": int(SERVER_READY_S), "mmap": self.opts.mmap}
        )
        if self.opts.threads:
            doc.setdefault("process", {})["threads"] = self.opts.threads
        path = self.work / f"policy-{config.name}.toml"
        path.write_bytes(tomli_w.dumps(doc).encode())
        return path

    def launch(self, port: int, cg: Path | None, log: Path,
               config: Config) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
        """`autoglm-tune launch` with the planned CPU set, threads and memory protection; its JSON "ready" line
        (with the server's pid). What it decided is read back from the process: nice, CPUs, VmLck, memcg."""
        argv = [sys.executable, "-m", "autoglm_tune", "launch", "--policy", str(self.policy_file(config, port)),
                "--json", "--log", str(log)]
        proc = self.g.start(argv, cg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"autoglm-tune launch exited {proc.wait()}: {proc.stderr.read() if proc.stderr else ''}")
        return proc, json.loads(line)

    def apply_plan(self, capped: bool, config: Config, port: int) -> str | None:
        """The plan for this machine — with its RAM as emulated — applied through the root helper."""
        from .. import helper_client
        from ..collect import collect_facts
        from ..planner import make_plan
        from ..policy import load_policy

        facts = collect_facts(Path("/"))
        if capped:
            memory = dataclasses.replace(facts.memory, total_kib=self.opts.ram_mib * 1024)
            facts = dataclasses.replace(facts, memory=memory)
        plan = make_plan(facts, load_policy(self.policy_file(config, port))).to_dict()
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

    def set_recipe(self, capped: bool, literal: bool) -> None:
        # as meant: 512 MB of MemTotal (which on an emulated box includes the reservation)
        pool = RECIPE_LITERAL_POOL if literal else str(max(1, round(100 * RECIPE_POOL_MIB / self.total_mib)))
        self.g.set("zswap.max_pool_percent", pool)
        for name, value in RECIPE.items():
            self.g.set(name, value)

    def start_tuned(self, log: Path) -> subprocess.Popen[Any]:
        self.g.touched.update(self.g.paths)  # TuneD may write any of them; its own rollback is not relied on
        with log.open("wb") as fh:
            proc = self.g.start(["tuned", "--profile", "throughput-performance"], None, stdout=fh,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while read_value("/proc/sys/vm/dirty_ratio") != "40":  # throughput-performance's vm.dirty_ratio
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"TuneD did not apply throughput-performance (see {log})")
            time.sleep(0.5)
        return proc

    def probe(self) -> dict[str, Any]:
        """The calibration probe before a run: memory bandwidth, and a fixed tiny decode when llama-bench and the
        tiny model are here. A round whose probe drifts > 10 % from the bench's median is flagged."""
        out: dict[str, Any] = {"memcpy_gbs": memcpy_gbs()}
        bench_bin = self.server_bin.with_name("llama-bench") if self.server_bin else None
        if bench_bin and bench_bin.exists() and self.probe_model:
            done = subprocess.run([str(bench_bin), "-m", str(self.probe_model), "-p", "0", "-n", "32", "-r", "2",
                                   "-t", "1", "-o", "json"], capture_output=True, text=True, timeout=120)
            with contextlib.suppress(ValueError, KeyError, IndexError):
                out["tiny_tok_s"] = round(json.loads(done.stdout)[0]["avg_ts"], 1)
        return out

    def request(self, port: int, prompt: str, tokens: int) -> tuple[float, list[float], dict[str, Any]]:
        return _post_stream(f"http://127.0.0.1:{port}/v1/completions", prompt, tokens, self.opts.run_timeout_s)

    def run(self, key: RunKey, desktop_size: int) -> dict[str, Any]:
        """One measured run; every part it starts or sets is undone before it returns."""
        import http.client

        scenario = SCENARIOS[key.scenario]
        config = CONFIGS_BY_NAME[key.config]
        capped = scenario.capped and key.config != "limit"
        hog = scenario.hog and key.config != "limit"
        desktop_size = desktop_size if key.config != "limit" else 0
        result: dict[str, Any] = {**dataclasses.asdict(key), "value": None, "loadavg": os.getloadavg()[0]}
        started: list[subprocess.Popen[Any]] = []
        txid = None
        cg = None
        oom_before = vmstat("oom_kill")
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{key.scenario}-{key.round}-{key.config}.log"
        port = _free_port()
        try:
            result["probe"] = self.probe()
            if config.settings.startswith("recipe"):
                self.set_recipe(capped, config.settings == "recipe-literal")
            elif config.settings == "plan":
                txid = self.apply_plan(capped, config, port)
                result["txid"] = txid
            elif config.settings == "tuned":
                started.append(self.start_tuned(logs / f"tuned-{key.scenario}-{key.round}.log"))
            if capped and self.opts.emulate == "hugetlb":
                result["hugepages"] = self.reserve()
                result["watermarks"] = zone_watermarks()
            limit = self.opts.ram_mib if capped and self.opts.emulate == "cgroup" else None
            cg = self.cgroup(limit)
            if cg is not None and limit is not None:
                v1 = cg / "memory.limit_in_bytes"
                result["cgroup_limit_mib"] = int(read_value(v1 if v1.exists() else cg / "memory.max")) // MIB
            desk, desk_pids = self.desktop(desktop_size, scenario.accesses, cg) if desktop_size else (None, [])
            started += [desk] if desk else []
            hog_proc = None
            if hog:
                hog_proc = self.g.start([sys.executable, str(WORKER), "hog"], cg, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, text=True)
                started.append(hog_proc)
            if scenario.measure == "cold":
                os.sync()
                write_value("/proc/sys/vm/drop_caches", "3")
            t0 = time.monotonic()
            if config.start == "launch":
                server, ready = self.launch(port, cg, log, config)  # its line comes once the server is ready
                pid = ready["pid"]
            else:
                server, pid = self.start_server(port, cg, log, config)
            started.append(server)
            result["load_s"] = round(time.monotonic() - t0, 2)
            loaded = _server_process(pid)
            result["argv"], result["os_threads"] = loaded["command"], loaded["threads"]  # HTTP threads included
            result["nice"], result["cpus"] = loaded["nice"], loaded["cpus"]
            result["vm_locked_kib"] = loaded["locked_kib"]
            result["process"] = {k: loaded[k] for k in PROCESS_FIGURES}  # once loaded; "process_after": at the end
            result["memory_cgroup"], result["memcg_swappiness"] = memory_cgroup_of(pid)
            result["settings"] = read_settings(self.g.paths)  # as they were while it ran
            if scenario.idle_first:  # loaded and warmed, then left while the desktop works; another prompt
                self.request(port, "Hello there.", 8)  # afterwards, so that the server's prompt cache cannot help
                time.sleep(self.opts.idle_s)
            prompt = self.long_prompt if scenario.measure == "prompt" else self.prompt
            tokens = 8 if scenario.measure in ("prompt", "cold") else self.opts.tokens
            flt, counters0 = _majflt(pid), vm_counters()
            desk0 = self.desktop_counters(desk) if desk else None
            hog0 = self.hog_loops(hog_proc)
            t_begin = time.monotonic()
            begin, arrivals, extra = self.request(port, prompt, tokens)
            window = time.monotonic() - t_begin
            desk1 = self.desktop_counters(desk) if desk else None
            hog1 = self.hog_loops(hog_proc)
            counters1, after = vm_counters(), _majflt(pid)
            result |= token_stats(begin, arrivals) | extra
            result["window_s"] = round(window, 2)
            counters: dict[str, float | None] = {k: counters1[k] - counters0.get(k, 0) for k in counters1
                                                  if k != "oom_kill"}
            counters["majflt"] = after - flt if after is not None and flt is not None else None
            served = _server_process(pid)
            result["process_after"] = {k: served[k] for k in PROCESS_FIGURES}
            counters["model_swap_mib"] = served["swap_kib"] // 1024 if served["swap_kib"] is not None else None
            mem = meminfo()
            counters["swap_used_mib"] = (mem["SwapTotal"] - mem["SwapFree"]) // 1024
            counters["zswap_stored_mib"] = mem.get("Zswapped", 0) // 1024
            counters["zswap_ratio"] = round(mem["Zswapped"] / mem["Zswap"], 2) if mem.get("Zswap") else None
            if desk_pids:
                thp = [_proc_mib(p, "smaps_rollup", "AnonHugePages") for p in desk_pids]
                counters["desktop_thp_mib"] = sum(v for v in thp if v is not None)
            result["counters"] = counters
            if hog0 is not None and hog1 is not None:
                result["hog_loops_s"] = round((hog1 - hog0) / window, 1)
            if desk0 and desk1:
                result["desktop"] = desktop_window(desk0, desk1, window)
            result["desktop_alive"] = (desk1 is not None and result["desktop"]["alive"]) if desk else None
            result["oom_kills"] = vmstat("oom_kill") - oom_before
            result["value"] = primary(scenario, result)
        except (TuneError, OSError, ValueError, KeyError, http.client.HTTPException,
                subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
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

    @staticmethod
    def hog_loops(proc: subprocess.Popen[str] | None) -> int | None:
        """The CPU hog's own progress: its loop count (SIGUSR1, one line back)."""
        if proc is None or proc.poll() is not None:
            return None
        assert proc.stdout is not None
        proc.send_signal(signal.SIGUSR1)
        line = proc.stdout.readline()
        return int(line) if line.strip() else None


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
    from .. import gguf_header

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
    shape = gguf_header.model_shape(gguf_header.read_metadata(model), f"--model {model}")
    need = model.stat().st_size + shape.kv_cache_bytes(context)
    return Model(model, need // MIB)


GUEST_CACHE = Path(os.environ.get("AUTOGLM_GUEST_CACHE", "/var/cache/autoglm-tune-test"))


def find_llama_server(given: Path | None) -> Path:
    """--server-bin, else `llama-server` on PATH, else the newest host build of tests/guest/build-llama-server.sh."""
    import shutil

    if given is not None:
        if not (given.is_file() and os.access(given, os.X_OK)):
            raise BadInput(f"--server-bin {given}: not an executable file; allowed: the path of llama-server")
        return given
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    builds = sorted(GUEST_CACHE.glob("llama-server-host-*/llama-server"), key=lambda p: p.stat().st_mtime)
    if builds:
        return builds[-1]
    raise BadInput("--server llama-server: no llama-server found; allowed: --server-bin PATH, llama-server on PATH, "
                   "or build it with tests/guest/build-llama-server.sh host")


def bench(
    opts: Options, model: Model, work: Path, policy: Path | None, command: str, preliminary: str | None,
    notes: list[str], err: TextIO, server_bin: Path | None = None, probe_model: Path | None = None,
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
        "server": str(server_bin) if server_bin else None,
        "zoneinfo": zone_watermarks(),
        "notes": notes,
        "runs": runs,
        "interrupted": None,
        "error": None,
    }
    guard = Guard()
    problems: list[str] = []
    try:
        b = Bench(guard, opts, model, work, policy, server_bin, probe_model)
        keys = schedule(opts)
        progress(err, 0, len(keys), "starting")
        doc["swap_latency"] = swap_latency(work)
        # one swap file for every scenario and configuration: the plan then finds disk swap and plans none
        swap = b.make_swap(max(1024, 2 * opts.ram_mib))
        for i, key in enumerate(keys):
            scenario = SCENARIOS[key.scenario]
            size = desktop_mib(scenario, available_mib, model.need_mib, opts.desktop_mib)
            if str(swap) not in read_swaps():  # another process's clean-up turned it off: the box lost its swap
                subprocess.run(["swapon", str(swap)], check=True, capture_output=True)
            result = b.run(key, size)
            result["desktop_mib"] = size
            if str(swap) not in read_swaps():
                result["interfered"] = "another process turned the bench's swap file off during the run"
            runs.append(result)
            why = failed(result)
            tok = f"{result['value']:.3g}" + (f" (failed: {why})" if why else "") if result.get("value") else \
                f"failed: {why}"
            progress(err, i + 1, len(keys), f"{key.scenario} round {key.round + 1} {key.config}: {tok}")
        b.drop_swap(swap)
    except Interrupted as exc:
        doc["interrupted"] = exc.signum
        err.write(f"\nbench: interrupted by {exc}; restoring every setting\n")
    except BenchError as exc:  # outside a run (the swap file): the runs so far are still written out
        doc["error"] = str(exc)
    finally:
        problems = guard.restore()
    mark_drift(runs)
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
    if not any(r.get("value") for r in doc["runs"]):
        return
    plot = subprocess.run(
        [str(LLAMA_VENV / "bin" / "python"), str(WORKER), "plot", str(out / "results.json"), str(out)],
        capture_output=True, text=True,
    )
    if plot.returncode != 0:
        tail = plot.stderr.strip().splitlines()[-1:] or ["no output"]
        err.write(f"bench: no plot ({tail[0]}); {LLAMA_VENV}/bin/pip install matplotlib adds it\n")
