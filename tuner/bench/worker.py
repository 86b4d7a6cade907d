"""The parts of `autoglm-tune bench` that run outside the tuner: a file run by a Python interpreter
(the llama venv's for `model` and `plot`, which need gguf, numpy and matplotlib). Imports no autoglm_tune.

    worker.py model PRESET VOCAB.gguf OUT.gguf   random-weight llama GGUF, Q4_0, the vocab's tokenizer
    worker.py desktop MIB FILES_DIR ACCESSES     a desktop: 3 processes, MIB of compressible heap with a Zipf
                                                 hot set, ACCESSES page reads/writes per 16 ms frame, a
                                                 file cache in FILES_DIR ("-": none); prints "ready PIDS",
                                                 and its counters as JSON on SIGUSR1
    worker.py files DIR MIB                      the desktop's file cache (16 MiB files)
    worker.py hog                                a busy loop on one core
    worker.py plot RESULTS.json OUT_DIR          bench-SCENARIO.png: ratios to untuned, 95 % intervals

Models (research test-environment.md §9): Q4_0 blocks are written directly (an fp16 scale and 16 bytes of
random nibbles per 32 weights), norms are F32 ones; the same preset and seed give the same bytes. Random
quantised weights compress like real ones (~1.04:1), so zswap sees what it would see with a real model.
The desktop (research kernel-and-platform.md §9): JSON-like text, ≈3:1 by zlib, ≈2:1 by lzo-rle, never
same-filled; a Zipf-ranked hot set takes most reads and writes and the cold majority ages, as a real
desktop's does; its progress (page accesses per second) and its 16 ms frame times are recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from typing import Any

# name → (n_embd, layers, n_ff, heads, kv heads, context length)
PRESETS = {
    "tiny": (256, 4, 768, 4, 2, 2048),
    "1.1b": (2048, 22, 5632, 32, 4, 2048),  # TinyLlama-1.1B shapes
    "3b": (3072, 28, 8192, 24, 8, 4096),  # Llama-3.2-3B shapes with a 32k vocabulary
    # GLM-4-9B's (AutoGLM-Phone-9B's language model) shapes with a 32k vocabulary: ≈ 8.4 B weights, 4.4 GiB Q4_0
    "9b": (4096, 40, 13696, 32, 2, 8192),
}
N_VOCAB = 32000
SEED = 1234
PAGE = 4096
MIB = 1 << 20


def copy_tokenizer(w: Any, vocab_path: str) -> None:
    import gguf
    from gguf import GGUFValueType

    reader = gguf.GGUFReader(vocab_path)
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                value: Any = [bytes(f.parts[i]) for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(name, value, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            w.add_key_value(name, bytes(f.parts[f.data[0]]).decode(), vtype)
        else:
            w.add_key_value(name, f.parts[f.data[0]].tolist()[0], vtype)


def tensor_specs(n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int) -> list[tuple[str, tuple, bool]]:
    """(name, shape as (rows, columns) or (n,), is_norm)."""
    out: list[tuple[str, tuple, bool]] = [("token_embd.weight", (N_VOCAB, n_embd), False)]
    kv = n_embd // n_head * n_head_kv
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (n_embd,), True),
            (b + "attn_q.weight", (n_embd, n_embd), False),
            (b + "attn_k.weight", (kv, n_embd), False),
            (b + "attn_v.weight", (kv, n_embd), False),
            (b + "attn_output.weight", (n_embd, n_embd), False),
            (b + "ffn_norm.weight", (n_embd,), True),
            (b + "ffn_gate.weight", (n_ff, n_embd), False),
            (b + "ffn_up.weight", (n_ff, n_embd), False),
            (b + "ffn_down.weight", (n_embd, n_ff), False),
        ]
    return [*out, ("output_norm.weight", (n_embd,), True), ("output.weight", (N_VOCAB, n_embd), False)]


def make_model(preset: str, vocab_path: str, out: str) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType

    n_embd, n_layer, n_ff, n_head, n_head_kv, n_ctx = PRESETS[preset]
    w = gguf.GGUFWriter(out, "llama")
    copy_tokenizer(w, vocab_path)
    w.add_vocab_size(N_VOCAB)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    specs = tensor_specs(n_embd, n_layer, n_ff, n_head, n_head_kv)
    for name, shape, norm in specs:
        if norm:
            w.add_tensor_info(name, shape, np.float32, shape[0] * 4, raw_dtype=GGMLQuantizationType.F32)
        else:
            rows, cols = shape
            w.add_tensor_info(
                name, (rows, cols // 32 * 18), np.uint8, rows * cols // 32 * 18, raw_dtype=GGMLQuantizationType.Q4_0
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for idx, (_, shape, norm) in enumerate(specs):
        if norm:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        rng = np.random.default_rng([SEED, idx])
        rows, cols = shape
        blocks = rows * cols // 32
        data = np.empty((blocks, 18), dtype=np.uint8)
        data[:, :2] = np.full(blocks, 0.02 / 4.6, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
        data[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
        w.write_tensor_data(data.reshape(rows, cols // 32 * 18))
    w.close()


def desktop_template(rng: random.Random) -> bytes:
    """One MiB of JSON-like records: a browser's or editor's heap, compressible but not trivially."""
    words = ["alpha", "window", "tab", "session", "cache", "render", "layout", "font", "image", "event"]
    lines = []
    size = 0
    while size < MIB:
        record = {
            "id": rng.randrange(10**9),
            "kind": rng.choice(words),
            "title": " ".join(rng.choice(words) for _ in range(rng.randrange(2, 6))),
            "hash": f"{rng.getrandbits(64):016x}",
            "score": round(rng.random(), 4),
            "tags": [rng.choice(words) for _ in range(rng.randrange(1, 4))],
        }
        line = json.dumps(record).encode() + b"\n"
        lines.append(line)
        size += len(line)
    return b"".join(lines)[:MIB]


def no_huge_pages() -> None:
    """Keep this process's memory in 4 KiB pages, as a browser's or editor's heap is on a `madvise` THP system.
    numpy madvises large arrays for huge pages; with 10 % of the pages rewritten at random every second, every
    2 MiB page is then referenced every second, none of the desktop ever ages, and reclaim finds nothing to take
    but the model's memory (docs/BENCHMARKS.md, "The desktop's page size")."""
    import ctypes

    pr_set_thp_disable = 41  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_thp_disable, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


# The desktop's processes: (name, share of its anonymous memory, reads its file cache). A browser, an editor
# and a chat client: several processes, as reclaim sees a desktop, each with its own hot and cold pages.
DESKTOP_PROCESSES = (("browser", 0.5, True), ("editor", 0.3, False), ("chat", 0.2, True))
FRAME_S = 0.016  # one frame at 62.5 Hz: the probe a user feels as a stutter when it runs late
HIST_BINS = 1000  # frame times in 1 ms bins; the last bin holds everything from 999 ms up
ZIPF_S = 1.0  # access rank exponent: the top 1 % of pages take ~2/3 of the accesses, the top 10 % ~5/6
READ_SHARE = 0.7  # of page accesses; the rest rewrite a word in the page
FILE_CHUNK = 64 * 1024  # one file-cache read


def make_files(directory: str, mib: int) -> None:
    """The desktop's file working set (a browser cache): 16 MiB files, written once and reused."""
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(SEED)
    for i in range(max(1, mib // 16)):
        path = os.path.join(directory, f"cache-{i:03d}.bin")
        if os.path.exists(path) and os.path.getsize(path) == 16 * MIB:
            continue
        with open(path + ".tmp", "wb") as fh:
            for _ in range(16):
                fh.write(rng.randbytes(MIB))
        os.rename(path + ".tmp", path)


class _Counters:
    """Per-process counters in memory shared with the leader: ops, frames, file reads, then the histogram."""

    FIELDS = 3

    def __init__(self, processes: int) -> None:
        import mmap

        import numpy as np

        self.width = self.FIELDS + HIST_BINS
        self._map = mmap.mmap(-1, 8 * self.width * processes)
        self.array = np.frombuffer(self._map, dtype=np.int64).reshape(processes, self.width)

    def snapshot(self, alive: list[bool], pids: list[int]) -> dict[str, Any]:
        total = self.array.sum(axis=0)
        return {
            "ops": int(total[0]), "frames": int(total[1]), "file_reads": int(total[2]),
            "hist": [int(v) for v in total[self.FIELDS:]], "alive": alive, "pids": pids,
        }


def _desktop_process(
    index: int, mib: int, files: list[str], accesses: int, counters: Any, ready_fd: int
) -> None:
    """One desktop process: every 16 ms a frame touches `accesses` pages chosen by a Zipf rank (reads and
    writes) and, in processes with a file cache, reads a 64 KiB chunk; the frame's time counts from the tick it
    was due, so a late wake-up (CPU contention) and a stall on a swapped-out page (memory) both show."""
    no_huge_pages()
    import numpy as np

    rng = np.random.default_rng([SEED, index])
    template = np.frombuffer(desktop_template(random.Random(SEED + index)), dtype=np.uint8)
    words = np.tile(template, max(1, mib)).view(np.uint64)
    pages = len(words) * 8 // PAGE
    step = PAGE // 8
    words[::step] = np.arange(pages, dtype=np.uint64)  # a counter in every page: no two pages alike
    weights = 1.0 / np.arange(1, pages + 1) ** ZIPF_S
    cdf = np.cumsum(weights / weights.sum())
    order = rng.permutation(pages)  # the hot pages are scattered through the heap, not in one run
    chunks = [(path, offset) for path in files for offset in range(0, 16 * MIB, FILE_CHUNK)]
    chunk_cdf = None
    if chunks:
        cw = 1.0 / np.arange(1, len(chunks) + 1) ** ZIPF_S
        chunk_cdf = np.cumsum(cw / cw.sum())
    fds = {path: os.open(path, os.O_RDONLY) for path in files}
    for path in files:  # warm: the cache is in memory when the session starts, as a browser's would be
        fd = fds[path]
        while os.read(fd, 1 << 20):
            pass
    row = counters.array[index]
    reads = int(accesses * READ_SHARE)
    stamp = 0
    sink = 0
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    due = time.monotonic()
    while True:
        stamp += 1
        idx = order[np.minimum(np.searchsorted(cdf, rng.random(accesses)), pages - 1)]
        sink += int(words[idx[:reads] * step + 2].sum() & 1)
        words[idx[reads:] * step + 1] = stamp
        if chunk_cdf is not None and stamp % 4 == 0:
            path, offset = chunks[min(int(np.searchsorted(chunk_cdf, rng.random())), len(chunks) - 1)]
            os.pread(fds[path], FILE_CHUNK, offset)
            row[2] += 1
        now = time.monotonic()
        row[0] += accesses
        row[1] += 1
        row[3 + min(HIST_BINS - 1, int((now - due) * 1000))] += 1
        due += FRAME_S
        if due < now:  # a frame so late that the next ticks already passed: start again from now
            due = now
        time.sleep(max(0.0, due - time.monotonic()))


def desktop(mib: int, files_dir: str, accesses: int) -> None:
    """The leader: forks the desktop's processes, prints "ready PID..." once they all have their memory, and
    on SIGUSR1 a JSON line with the summed counters (the bench reads it before and after a measurement)."""
    import ctypes

    files = sorted(os.path.join(files_dir, f) for f in os.listdir(files_dir)) if files_dir != "-" else []
    counters = _Counters(len(DESKTOP_PROCESSES))
    pids = []
    for index, (_name, share, reads_files) in enumerate(DESKTOP_PROCESSES):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: gone with the leader
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            try:
                _desktop_process(index, round(mib * share), files if reads_files else [], accesses, counters, w)
            finally:
                os._exit(0)
        os.close(w)
        if os.read(r, 1) != b"r":
            sys.exit(f"desktop process {index} exited while filling its memory")
        os.close(r)
        pids.append(pid)

    def alive() -> list[bool]:
        out = []
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            out.append(done == 0)
        return out

    def report(*_: object) -> None:
        print(json.dumps(counters.snapshot(alive(), pids)), flush=True)

    def stop(*_: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGUSR1, report)
    signal.signal(signal.SIGTERM, stop)
    print("ready " + " ".join(map(str, pids)), flush=True)
    while True:
        signal.pause()


def hog() -> None:
    """A busy loop on one core; on SIGUSR1 it prints how many loops it has done (its own progress)."""
    blocks = 0

    def report(*_: object) -> None:
        print(blocks * 10000, flush=True)

    signal.signal(signal.SIGUSR1, report)
    while True:
        for _ in range(10000):
            pass
        blocks += 1


def plot(results_path: str, out_dir: str) -> None:
    """One PNG per scenario: each configuration's ratio to untuned (geometric mean of the per-round ratios) with
    its 95 % interval, and a line at 1; configurations with too few rounds for an interval are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as fh:
        rows = json.load(fh)["summary"]["rows"]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        group = [r for r in rows if r["scenario"] == scenario]
        fig, ax = plt.subplots(figsize=(2 + 0.9 * len(group), 4))
        for i, r in enumerate(group):
            iv = {"ratio": 1.0, "low": 1.0, "high": 1.0} if r["config"] == "untuned" else r["vs"].get("untuned") or {}
            if iv.get("ratio") is None:
                continue
            if iv.get("low") is None:
                ax.bar(i, iv["ratio"], 0.6, fill=False)
            else:
                ax.bar(i, iv["ratio"], 0.6, yerr=[[iv["ratio"] - iv["low"]], [iv["high"] - iv["ratio"]]], capsize=4)
            if r["failed"]["count"]:
                ax.annotate(f"{r['failed']['count']} failed", (i, iv["ratio"]), ha="center", va="bottom",
                            fontsize="x-small", color="red")
        ax.set_xticks(range(len(group)), [r["config"] for r in group], rotation=35, ha="right")
        ax.set_ylabel("÷ untuned, same round (95 % interval)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"autoglm-tune bench: {scenario}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"bench-{scenario}.png"), dpi=100)
        plt.close(fig)


def main(argv: list[str]) -> None:
    # Stopped by SIGTERM from the bench: exit quietly (no traceback in the logs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    command, args = argv[0], argv[1:]
    if command == "model":
        make_model(args[0], args[1], args[2])
    elif command == "desktop":
        desktop(int(args[0]), args[1], int(args[2]))
    elif command == "files":
        make_files(args[0], int(args[1]))
    elif command == "hog":
        hog()
    elif command == "plot":
        plot(args[0], args[1])
    else:
        sys.exit(f"worker.py: unknown command {command!r}; allowed: model, desktop, hog, plot")


if __name__ == "__main__":
    # Run as a file, this directory comes first on sys.path: its modules (stats.py, cli.py, …) must not hide
    # top-level modules of those names from gguf, numpy or matplotlib.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main(sys.argv[1:])
