"""`autoglm-tune launch` with a real llama.cpp server (llama-cpp-python) on a tiny generated model:
the settings read back from /proc of the running server, readiness, a real completion, clean stop."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from launch_parts import cli_env, ioprio_of, launch, thread_view, write_policy
from support import CAP_SYS_RESOURCE, CLI, free_port, has_capability, processes_mentioning


def server_policy(tmp_path: Path, model: Path, llama_python: Path, **process: object) -> Path:
    cpu = max(os.sched_getaffinity(0))  # one CPU, not the first: proves the set was applied, not inherited
    return write_policy(
        tmp_path / "policy.toml",
        {
            "model": {
                "preset": "llama-cpp-python",
                "program": str(llama_python),
                "model_path": str(model),
                "context_size": 512,
                "port": free_port(),
                "ready_timeout_s": 120,
            },
            "process": {"cpus": [cpu], "threads": 2, **process},
        },
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The launcher's first stdout line (the ready event), or fail with its stderr."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        pytest.fail(f"launcher not ready after {timeout} s: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"launcher exited {proc.wait()}: {proc.communicate()[1]}")
    return line


def post_completion(url: str) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps({"prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return json.loads(response.read())


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_server_runs_with_the_planned_settings_and_answers(
    tmp_path: Path, tiny_model: Path, llama_python: Path, etc: Path
) -> None:
    # a HOST and a PORT in the user's environment, which llama-cpp-python prefers to --host and --port
    env = cli_env(etc) | {"HOST": "127.0.0.2", "PORT": str(free_port())}
    policy = server_policy(
        tmp_path,
        tiny_model,
        llama_python,
        sched_policy="batch",
        nice=5,
        io_class="best-effort",
        io_priority=6,
        oom_score_adj=300,
    )
    dry = launch("--policy", str(policy), "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["argv"][:3] == [str(llama_python), "-m", "llama_cpp.server"]
    assert planned["memory"]["verdict"] == "fits" and planned["memory"]["kv_cache_bytes"] == 4 * 2 * 128 * 512 * 2

    log = tmp_path / "model.log"
    proc = subprocess.Popen(
        [CLI, "launch", "--policy", str(policy), "--json", "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = json.loads(read_line(proc, 120))
        pid = ready["pid"]
        assert ready["event"] == "ready" and ready["url"] == planned["health_url"]
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in planned["argv"]]

        base = planned["health_url"].removesuffix("/v1/models")
        answer = post_completion(base + "/v1/completions")
        assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["text"]

        p = planned["process"]
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        assert len(tids) >= p["threads"]
        for tid in tids:  # every thread, including those made after exec, inherited the settings
            assert thread_view(pid, tid) == {"cpus": p["cpu_list"], "nice": 5, "policy": "batch"}, tid
        assert ioprio_of(pid) == ("best-effort", 6)
        assert Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "300"
        env_of_server = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=2" in env_of_server
        assert f"PORT={planned['health_url'].split(':')[2].split('/')[0]}".encode() in env_of_server
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert processes_mentioning(str(tiny_model)) == []
    assert not Path(f"/proc/{pid}").exists()
    assert "Application shutdown complete" in log.read_text()


def test_negative_oom_score_adj_is_a_warning_and_the_rest_applies(tmp_path: Path, etc: Path) -> None:
    """Without CAP_SYS_RESOURCE (even root on the CI VM) oom_score_adj < 0 fails with EACCES."""
    env = cli_env(etc)
    port = free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "health").write_text("ok")  # llama-server preset's health path, served by http.server
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not read by this server")
    policy = write_policy(
        tmp_path / "policy.toml",
        {
            "model": {"preset": "llama-server", "model_path": str(model), "port": port, "ready_timeout_s": 30},
            "process": {"nice": 7, "oom_score_adj": -500},
        },
    )
    cmd = ["python3", "-m", "http.server", "{{ port }}", "--bind", "127.0.0.1", "--directory", str(www)]
    proc = subprocess.Popen(
        [CLI, "launch", "--policy", str(policy), "--json", "--log", str(tmp_path / "log"), "--", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        pid = json.loads(read_line(proc, 30))["pid"]
        oom = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
        nice = thread_view(pid, pid)["nice"]
    finally:
        code, err = stop(proc, signal.SIGINT)  # as Ctrl-C on a terminal
    assert code == 0, err
    assert nice == 7
    if has_capability(CAP_SYS_RESOURCE):
        assert oom == -500 and "oom_score_adj" not in err
    else:
        assert oom == 0
        warning = [line for line in err.splitlines() if "oom_score_adj = -500 not set" in line]
        assert len(warning) == 1 and "CAP_SYS_RESOURCE" in warning[0] and "Permission denied" in warning[0], err
    assert processes_mentioning(str(www)) == []


def test_a_server_that_dies_is_reported_with_its_last_log_lines(tmp_path: Path, etc: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    policy = write_policy(tmp_path / "policy.toml", {"model": {"model_path": str(model), "port": free_port()}})
    script = "import sys; print('loading the model failed: out of cheese', flush=True); sys.exit(3)"
    t0 = time.monotonic()
    proc = launch(
        "--policy", str(policy), "--log", str(tmp_path / "log"), "--", "python3", "-c", script, env=cli_env(etc)
    )
    assert proc.returncode == 1
    assert "exited with status 3 before it was ready" in proc.stderr
    assert "out of cheese" in proc.stderr
    assert time.monotonic() - t0 < 20


def test_not_ready_in_time_stops_the_server(tmp_path: Path, etc: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    policy = write_policy(
        tmp_path / "policy.toml",
        {
            "model": {"model_path": str(model), "port": free_port(), "ready_timeout_s": 1},
        },
    )
    marker = str(tmp_path / "sleeper")
    sleeper = ["python3", "-c", "import time; time.sleep(60)", marker]
    proc = launch("--policy", str(policy), "--log", str(tmp_path / "log"), "--", *sleeper, env=cli_env(etc))
    assert proc.returncode == 1
    assert "not ready after 1 s" in proc.stderr and "ready_timeout_s" in proc.stderr
    assert processes_mentioning(marker) == []


def test_killing_the_launcher_takes_the_server_with_it(tmp_path: Path, etc: Path) -> None:
    """PR_SET_PDEATHSIG: even a SIGKILLed launcher leaves nothing running."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "health").write_text("ok")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    port = free_port()
    policy = write_policy(tmp_path / "policy.toml", {"model": {"model_path": str(model), "port": port}})
    cmd = ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(www)]
    proc = subprocess.Popen(
        [CLI, "launch", "--policy", str(policy), "--json", "--log", str(tmp_path / "log"), "--", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(etc),
    )
    pid = None
    try:
        pid = json.loads(read_line(proc, 30))["pid"]
        assert pid in processes_mentioning(str(www))
        proc.kill()
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 10
        while processes_mentioning(str(www)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(www)) == []
    finally:  # if the assertions failed: leave nothing running
        proc.kill()
        proc.communicate(timeout=10)
        if pid is not None and pid in processes_mentioning(str(www)):
            os.kill(pid, signal.SIGKILL)


def test_progress_on_a_terminal_and_ctrl_c(tmp_path: Path, etc: Path) -> None:
    """On a terminal: a progress line while waiting; Ctrl-C (SIGINT to the foreground group) stops the server."""
    import pty

    www = tmp_path / "www"
    www.mkdir()
    (www / "health").write_text("ok")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    port = free_port()
    policy = write_policy(
        tmp_path / "policy.toml", {"model": {"model_path": str(model), "port": port, "ready_timeout_s": 20}}
    )
    slow = f"sleep 1.5; exec python3 -m http.server {port} --bind 127.0.0.1 --directory {www}"
    argv = [CLI, "launch", "--policy", str(policy), "--log", str(tmp_path / "log"), "--", "sh", "-c", slow]
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the launcher on a new terminal
        os.execve(CLI, argv, cli_env(etc))
    out = b""
    try:
        deadline = time.monotonic() + 30
        while b"model ready" not in out and time.monotonic() < deadline:
            try:
                out += os.read(fd, 4096)  # blocks until the launcher writes
            except OSError:
                break
        assert b"model ready" in out, out
        os.write(fd, b"\x03")  # Ctrl-C
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert f"\rautoglm-tune: waiting for http://127.0.0.1:{port}/health" in text
    assert "\r\x1b[Kautoglm-tune: model ready" in text
    assert os.waitstatus_to_exitcode(status) == 0
    assert processes_mentioning(str(www)) == []


def test_llama_cpp_python_help_is_probed_and_a_flag_it_lacks_is_refused(
    tmp_path: Path, tiny_model: Path, llama_python: Path, etc: Path
) -> None:
    """The real `python -m llama_cpp.server --help` lists every flag the preset passes (underscored names too);
    a flag it does not list is exit 2, one line naming it, before anything starts."""
    from autoglm_tune.launch import probe_flags
    from autoglm_tune.presets import load_preset

    preset = load_preset("llama-cpp-python")
    assert preset.probe is not None
    listed = probe_flags(str(llama_python), args=preset.probe)
    assert listed is not None
    assert {t for t in preset.command if t.startswith("--")} <= listed

    policy = server_policy(tmp_path, tiny_model, llama_python)
    ok = launch("--policy", str(policy), "--dry-run", "--json", env=cli_env(etc))
    assert ok.returncode == 0, ok.stderr
    doc = tomllib.loads(policy.read_text())
    doc["model"]["args"] = ["--no_such_setting", "1"]
    bad = launch("--policy", str(write_policy(policy, doc)), "--dry-run", env=cli_env(etc))
    assert bad.returncode == 2 and bad.stdout == "", bad
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoglm-tune: error: [model] program: "), bad.stderr
    assert "does not take --no_such_setting" in lines[0]
    assert f"`{llama_python} -m llama_cpp.server --help` does not list it: this llama-cpp-python" in lines[0]
