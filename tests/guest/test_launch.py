"""The model through `launch` on the guest: with supervisor "auto" the helper starts llama.cpp's own
llama-server (built for the guest by build-llama-server.sh) as a transient unit run as the user, with
MemoryLow= and CPUWeight= on its cgroup v2 directory, CPUAffinity= and Nice= read back from /proc; a real
completion; then the rendered `launch --unit` installed, enabled and started by systemd at boot after
autoglm-tune.service."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from guest import Guest, Installed, figure

PORT = 8080
UNIT = f"autoglm-model-1000-{PORT}.service"  # alice is uid 1000
POLICY = f"""\
[model]
preset = "llama-server"
model_path = "/home/alice/models/tiny.gguf"
context_size = 256
port = {PORT}
ready_timeout_s = 900
"""
COMPLETION = (
    "import json, urllib.request; "
    f"r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:{PORT}/completion', "
    "data=json.dumps({'prompt': 'Hello', 'n_predict': 4}).encode(), "
    "headers={'Content-Type': 'application/json'}), timeout=300); "
    "print(json.dumps({'status': r.status, 'body': json.load(r)}))"
)


def prepare(g: Guest, llama_server: Path, tiny_gguf: Path) -> None:
    """llama-server on PATH, the model in alice's home, her launch policy; and, as README says for a user who is
    not in an active local session (SSH here), the example polkit rule with alice in the autoglm group."""
    g.ssh("groupadd --system autoglm && usermod -aG autoglm alice && install -m 0644 "
          "/home/alice/autoglm-tune/systemd/polkit/50-autoglm-tune.rules /etc/polkit-1/rules.d/")
    g.close_ssh()
    g.put_file(llama_server, "/usr/local/bin/llama-server", mode="0755")
    g.ssh("mkdir -p ~/models", user="alice")
    g.put_file(tiny_gguf, "/home/alice/models/tiny.gguf", user="alice")
    g.put(POLICY.encode(), "/home/alice/launch.toml", user="alice")


def completion(g: Guest) -> dict:
    answer = json.loads(g.ssh(f'python3 -c "{COMPLETION}"', user="alice", timeout=400).stdout)
    assert answer["status"] == 200 and isinstance(answer["body"]["content"], str), answer
    return answer


def unit_properties(g: Guest, unit: str, *names: str) -> dict[str, str]:
    out = g.ssh(f"systemctl show {unit} " + " ".join(f"-p {n}" for n in names)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_launch_auto_runs_the_model_as_a_transient_unit_with_its_settings_read_back(
        installed: Installed, guest_from: Callable[..., Guest], llama_server: Path, tiny_gguf: Path) -> None:
    g = guest_from(installed.snapshot)
    prepare(g, llama_server, tiny_gguf)
    dry = json.loads(g.ssh("autoglm-tune launch --policy ~/launch.toml --dry-run --json", user="alice").stdout)
    launcher = g.ssh("cd ~; setsid nohup autoglm-tune launch --policy ~/launch.toml --json >launch.out "
                     "2>launch.err </dev/null & echo $!", user="alice").stdout.strip()
    ready = g.ssh("for i in $(seq 900); do grep -q '\"url\"' ~/launch.out && exit 0; "
                  "kill -0 " + launcher + " 2>/dev/null || exit 1; sleep 1; done; exit 1", user="alice",
                  check=False, timeout=960)
    out = g.ssh("cat ~/launch.out ~/launch.err; tail -20 ~/.local/state/autoglm-tune/model.log", user="alice",
                check=False).stdout
    assert ready.returncode == 0, out

    props = unit_properties(g, UNIT, "User", "MainPID", "MemoryLow", "ControlGroup", "ActiveState", "Nice")
    assert props["ActiveState"] == "active" and props["User"] in ("alice", "1000"), (props, out)  # run as alice
    pid = props["MainPID"]
    assert g.ssh(f"stat -c %U /proc/{pid}").stdout.strip() == "alice"
    memory_low = g.ssh(f"cat /sys/fs/cgroup{props['ControlGroup']}/memory.low").stdout.strip()
    # the kernel keeps memory.low in whole pages
    assert int(memory_low) > 0 and int(memory_low) == int(props["MemoryLow"]) // 4096 * 4096, (memory_low, props)
    assert dry["keep_resident"] == "cgroup", dry
    cpus = g.ssh(f"grep Cpus_allowed_list /proc/{pid}/status").stdout.split()[-1]
    planned = dry["process"]["cpus"]
    assert cpus == (f"{planned[0]}-{planned[-1]}" if len(planned) > 1 else str(planned[0])), (cpus, planned)
    nice = g.ssh(f"ps -o ni= -p {pid}").stdout.strip()
    assert int(nice) == dry["process"]["nice"] == int(props["Nice"]), (nice, dry["process"])
    # Nice weighs only inside the unit's own cgroup; against alice's session scope and user@1000.service, sibling
    # cgroups in user-1000.slice, the unit's CPUWeight= carries nice -10 (CFS's 9548 against 1024, on systemd's 100).
    weight = g.ssh(f"cat /sys/fs/cgroup{props['ControlGroup']}/cpu.weight").stdout.strip()
    assert dry["process"]["nice"] == -10 and weight == "932", (weight, dry["process"])
    figure("guest scheduler: kernel.sched_autogroup_enabled "
           + g.ssh("cat /proc/sys/kernel/sched_autogroup_enabled").stdout.strip()
           + "; controllers under user-1000.slice: "
           + g.ssh("cat /sys/fs/cgroup/user.slice/user-1000.slice/cgroup.subtree_control").stdout.strip())
    completion(g)

    g.ssh(f"kill -TERM {launcher}", user="alice")
    gone = g.ssh(f"for i in $(seq 60); do systemctl is-active --quiet {UNIT} || exit 0; sleep 1; done; exit 1",
                 check=False, timeout=90)
    assert gone.returncode == 0, g.journal(UNIT)


def test_the_rendered_model_unit_starts_at_boot_after_autoglm_tune(
        installed: Installed, guest_from: Callable[..., Guest], llama_server: Path, tiny_gguf: Path) -> None:
    g = guest_from(installed.snapshot)
    prepare(g, llama_server, tiny_gguf)
    g.ssh("autoglm-tune launch --unit --policy ~/launch.toml -o ~/autoglm-model.service", user="alice")
    g.ssh("sudo install -m 0644 ~/autoglm-model.service /etc/systemd/system/autoglm-model.service && "
          "sudo systemctl daemon-reload && sudo systemctl enable autoglm-model.service autoglm-tune.service",
          user="alice")
    t0 = time.monotonic()
    g.reboot()
    figure(f"real reboot (systemctl reboot to ssh and boot finished): {time.monotonic() - t0:.0f} s")
    ready = g.ssh(f"for i in $(seq 600); do python3 -c \"import urllib.request; urllib.request.urlopen("
                  f"'http://127.0.0.1:{PORT}/health', timeout=5)\" 2>/dev/null && exit 0; sleep 1; done; exit 1",
                  check=False, timeout=700)
    assert ready.returncode == 0, g.journal("autoglm-model.service")
    model = unit_properties(g, "autoglm-model.service", "ActiveState", "User", "After",
                            "ExecMainStartTimestampMonotonic", "CPUWeight")
    tune = unit_properties(g, "autoglm-tune.service", "ActiveState", "ExecMainExitTimestampMonotonic")
    assert model["ActiveState"] == "active" and tune["ActiveState"] == "active", (model, tune)
    assert "autoglm-tune.service" in model["After"].split()
    assert int(tune["ExecMainExitTimestampMonotonic"]) <= int(model["ExecMainStartTimestampMonotonic"])
    assert model["User"] == "alice"  # rendered by alice: it runs as alice, not as root
    assert model["CPUWeight"] == "932"  # the plan's nice -10, carried across cgroups as in the transient unit
    completion(g)
