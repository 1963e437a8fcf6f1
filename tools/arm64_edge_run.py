"""Steps 4-6 of tools/arm64_edge_run.sh: a real federation with a native and an arm64 edge client.

Run by tools/arm64_edge_run.sh with the host venv once the arm64 root is ready (its /proc, /sys and
/dev mounted). On the host: MNIST shards (`fedgen partition`) and a FedGen coordinator (`fedgen
serve`); one `fedgen-client` natively and one in the arm64 root under qemu-user, both through
tools/arm64_edge_probe.py (timers, onnxruntime counters) and /usr/bin/time -v, while this script
samples their VmHWM from the host. Then it reads the ledger and writes
benchmarks/results/arm64_run.json and arm64_run.md. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_VENV = Path(os.environ.get("HOST_VENV", REPO / ".venv"))
TOKEN = "arm64-run-enrollment-token"
IN_ROOT_ENV = ["/usr/bin/env", "-i", "HOME=/root", "LANG=C.UTF-8", "PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def say(msg: str) -> None:
    print(f"[arm64 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def in_root(root: Path, *cmd: str) -> list[str]:
    return ["chroot", str(root), *IN_ROOT_ENV, *cmd]


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# ------------------------------------------------------------------------------ measurements
IMPORT_SNIPPET = (
    "import time; t = time.perf_counter(); import fedgen.edge.cli; print(round(time.perf_counter() - t, 3))"
)
IMPORTTIME_TOP = (
    "torch",
    "onnxruntime",
    "grpc",
    "numpy",
    "google.protobuf",
    "pydantic",
    "zstandard",
    "fedgen.edge.cli",
)


def measure_imports(python: list[str], label: str, cwd: Path) -> dict:
    """Two fresh interpreters timing `import fedgen.edge.cli` (first is colder), then one -X importtime."""
    out: dict = {}
    for i in (1, 2):
        t = time.perf_counter()
        res = run([*python, "-c", IMPORT_SNIPPET], timeout=900, cwd=cwd)
        if res.returncode != 0:
            raise RuntimeError(f"{label}: import fedgen.edge.cli failed: {res.stderr[-2000:]}")
        out[f"import_s_run{i}"] = float(res.stdout.strip().splitlines()[-1])
        out[f"interpreter_wall_s_run{i}"] = round(time.perf_counter() - t, 3)
        say(
            f"   {label}: import fedgen.edge.cli run {i}: {out[f'import_s_run{i}']} s "
            f"(interpreter start to exit {out[f'interpreter_wall_s_run{i}']} s)"
        )
    res = run([*python, "-X", "importtime", "-c", "import fedgen.edge.cli"], timeout=900, cwd=cwd)
    cumul: dict[str, float] = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S.*)$", line)
        if m and m.group(3).strip() in IMPORTTIME_TOP and m.group(3).strip() not in cumul:
            cumul[m.group(3).strip()] = round(int(m.group(2)) / 1e6, 3)
    out["importtime_cumulative_s"] = cumul
    say(f"   {label}: -X importtime cumulative seconds: {cumul}")
    return out


class TreeSampler(threading.Thread):
    """Samples VmHWM / VmRSS of a process and its descendants from the host's /proc."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.max_hwm_kib = 0
        self.max_rss_kib = 0
        self.hwm_by_comm: dict[str, int] = {}
        self._stop = threading.Event()

    @staticmethod
    def _children() -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    kids.setdefault(ppid, []).append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        return kids

    def sample(self) -> None:
        kids = self._children()
        todo, rss_sum = [self.pid], 0
        while todo:
            pid = todo.pop()
            todo.extend(kids.get(pid, []))
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            hwm = int(fields.get("VmHWM", "0 kB").split()[0])
            rss = int(fields.get("VmRSS", "0 kB").split()[0])
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe")) if os.path.exists(f"/proc/{pid}/exe") else "?"
            name = f"{fields.get('Name', '?').strip()} (exe {exe})"
            self.hwm_by_comm[name] = max(self.hwm_by_comm.get(name, 0), hwm)
            self.max_hwm_kib = max(self.max_hwm_kib, hwm)
            rss_sum += rss
        self.max_rss_kib = max(self.max_rss_kib, rss_sum)

    def run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a process vanished mid-walk
                self.sample()
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()


def parse_time_v(path: Path) -> dict:
    out: dict = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        key, _, val = line.strip().partition(": ")
        if key == "Maximum resident set size (kbytes)":
            out["time_v_max_rss_kib"] = int(val)
        elif key == "User time (seconds)":
            out["time_v_user_s"] = float(val)
        elif key == "System time (seconds)":
            out["time_v_sys_s"] = float(val)
        elif key.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in val.split(":")]
            secs = 0.0
            for p in parts:
                secs = secs * 60 + p
            out["time_v_elapsed_s"] = round(secs, 2)
        elif key == "Exit status":
            out["time_v_exit_status"] = int(val)
    return out


def kill_group(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is None:
        say(f"   stopping {name} (pid {proc.pid})")
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("/var/tmp/fedgen-arm64"))
    p.add_argument("--work", type=Path, default=Path("/var/tmp/fedgen-arm64-run"))
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=2700.0, help="the whole federation, bounded")
    p.add_argument("--pip-freeze", type=Path)
    p.add_argument("--diag-dir", type=Path, help="where arm64_edge_run.sh left ort-import-with{,out}-sys.txt")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    root: Path = args.root
    started = dt.datetime.now(dt.UTC)
    run_dir = args.work / f"run-{started:%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True)
    say(f"run folder {run_dir}")

    # ---- the arm64 root answers aarch64
    res = run(in_root(root, "/opt/venv/bin/python", "-c", "import platform; print(platform.machine())"), timeout=300)
    arm_machine = res.stdout.strip()
    say(f"   in the arm64 root: python -c 'import platform; print(platform.machine())' -> {arm_machine!r}")
    if arm_machine != "aarch64":
        say(f"   not aarch64: {res.stderr[-2000:]}")
        return 1
    uname_root = run(in_root(root, "uname", "-m"), timeout=120).stdout.strip()

    # ---- 4. shards
    shards = args.work / "shards"
    if (shards / "client-00.npz").exists() and (shards / "client-01.npz").exists():
        say(f"4. shards already in {shards} (skip)")
    else:
        say(
            f"4. fedgen partition --data-dir {args.mnist} --out {shards} --clients 2 --alpha 0.5 "
            "--samples-per-class 300"
        )
        res = run(
            [
                str(HOST_VENV / "bin" / "fedgen"),
                "partition",
                "--data-dir",
                str(args.mnist),
                "--out",
                str(shards),
                "--clients",
                "2",
                "--alpha",
                "0.5",
                "--samples-per-class",
                "300",
            ],
            timeout=600,
        )
        print(res.stdout, res.stderr, flush=True)
        if res.returncode != 0:
            return 1
    arm_run = root / "opt" / "fedgen-run"
    if arm_run.exists():
        shutil.rmtree(arm_run)
    arm_run.mkdir(parents=True)
    shutil.copy2(shards / "client-01.npz", arm_run / "client-01.npz")

    # ---- import times (before the federation, each in fresh interpreters)
    say("   import time of edge_client (fresh interpreters)")
    native_imports = measure_imports([str(HOST_VENV / "bin" / "python")], "native x86_64", run_dir)
    arm_imports = measure_imports(in_root(root, "/opt/venv/bin/python"), "arm64 (qemu)", run_dir)

    # ---- coordinator
    state_dir = run_dir / "state"
    cfg = run_dir / "coordinator.toml"
    cfg.write_text(f"""state_dir = "{state_dir}"

[server]
address = "127.0.0.1:0"
max_poll_wait_s = 20.0

[federation]
strategy = "fedgen"
rounds = {args.rounds}
clients_per_round = 2
min_clients = 2
min_completed = 2
round_timeout_s = 900.0
heartbeat_timeout_s = 120.0
seed = 0

[data]
test_data_dir = "{args.mnist}"

[auth]
enrollment_tokens = ["{TOKEN}"]
""")
    port_file = run_dir / "port"
    say(f"   fedgen serve --config {cfg} --port-file {port_file} --exit-when-finished")
    # Closed in the finally below, once every process that writes to them has ended.
    logs = {name: open(run_dir / f"{name}.log", "w") for name in ("coordinator", "native", "arm64")}  # noqa: SIM115
    coord = subprocess.Popen(
        [
            str(HOST_VENV / "bin" / "fedgen"),
            "serve",
            "--config",
            str(cfg),
            "--port-file",
            str(port_file),
            "--exit-when-finished",
            "--linger-s",
            "120",
        ],
        stdout=logs["coordinator"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=run_dir,
    )
    procs: dict[str, subprocess.Popen] = {"coordinator": coord}
    samplers: dict[str, TreeSampler] = {}
    t_fed = time.monotonic()
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if coord.poll() is not None or time.monotonic() > deadline:
                say("   coordinator did not start:\n" + (run_dir / "coordinator.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
        port = int(port_file.read_text())
        say(f"   coordinator on 127.0.0.1:{port}")

        # ---- 5. clients
        common = ["--coordinator", f"127.0.0.1:{port}", "--token", TOKEN, "--log-level", "INFO", "--threads", "1"]
        native_cmd = [
            "/usr/bin/time",
            "-v",
            "-o",
            str(run_dir / "native-time-v.txt"),
            str(HOST_VENV / "bin" / "python"),
            str(REPO / "tools" / "arm64_edge_probe.py"),
            "--report",
            str(run_dir / "native-probe.json"),
            "--",
            *common,
            "--data",
            str(shards / "client-00.npz"),
            "--client-id",
            "host-x86_64",
            "--cache-dir",
            str(run_dir / "native-cache"),
        ]
        arm_cmd = in_root(
            root,
            "/usr/bin/time",
            "-v",
            "-o",
            "/opt/fedgen-run/arm64-time-v.txt",
            "/opt/venv/bin/python",
            "/opt/fedgen-tools/arm64_edge_probe.py",
            "--report",
            "/opt/fedgen-run/arm64-probe.json",
            "--",
            *common,
            "--data",
            "/opt/fedgen-run/client-01.npz",
            "--client-id",
            "arm64-pi",
            "--cache-dir",
            "/opt/fedgen-run/cache",
        )
        for name, cmd in (("arm64", arm_cmd), ("native", native_cmd)):
            say(f"   starting {name} client: {' '.join(cmd)}")
            procs[name] = subprocess.Popen(
                cmd, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True, cwd=run_dir
            )
            samplers[name] = TreeSampler(procs[name].pid)
            samplers[name].start()

        # ---- wait, bounded, printing progress
        ledger = state_dir / "ledger.jsonl"
        seen = 0
        while True:
            if ledger.exists():
                rows = [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]
                for r in rows[seen:]:
                    per = ", ".join(
                        f"{c['client_id']} {c['outcome']} train {c['train_seconds']:.2f}s "
                        f"loss {c['metrics'].get('loss', float('nan')):.3f} "
                        f"reg {c['metrics'].get('regulariser', float('nan')):.3f}"
                        for c in r["clients"]
                    )
                    say(
                        f"   round {r['round']} committed in {r['round_seconds']:.1f}s, "
                        f"test accuracy {r['test_accuracy']:.3f}: {per}"
                    )
                seen = len(rows)
            if coord.poll() is not None:
                break
            for name in ("native", "arm64"):
                if procs[name].poll() not in (None, 0):
                    say(f"   {name} client exited with {procs[name].returncode}; see {run_dir / (name + '.log')}")
            if all(procs[n].poll() not in (None, 0) for n in ("native", "arm64")):
                break
            if time.monotonic() - t_fed > args.timeout_s:
                say(f"   federation still running after {args.timeout_s:.0f}s: giving up")
                break
            time.sleep(2)
        fed_wall = time.monotonic() - t_fed
        say(f"   coordinator exit code {coord.poll()} after {fed_wall:.1f}s")
        for name in ("native", "arm64"):
            try:
                procs[name].wait(timeout=180)
            except subprocess.TimeoutExpired:
                kill_group(procs[name], name)
            say(f"   {name} client exit code {procs[name].returncode}")
    finally:
        for name, proc in procs.items():
            kill_group(proc, name)
        for s in samplers.values():
            s.stop()
        for fh in logs.values():
            fh.close()

    # ---- 6. collect
    for name in ("arm64-probe.json", "arm64-time-v.txt"):
        if (arm_run / name).exists():
            shutil.copy2(arm_run / name, run_dir / name)
    ledger_rows = (
        [json.loads(x) for x in (state_dir / "ledger.jsonl").read_text().splitlines() if x.strip()]
        if (state_dir / "ledger.jsonl").exists()
        else []
    )
    probes = {}
    for name in ("native", "arm64"):
        path = run_dir / f"{name}-probe.json"
        probes[name] = json.loads(path.read_text()) if path.exists() else {}
    timev = {"native": parse_time_v(run_dir / "native-time-v.txt"), "arm64": parse_time_v(run_dir / "arm64-time-v.txt")}
    client_of = {"native": "host-x86_64", "arm64": "arm64-pi"}
    arch_of = {"native": platform.machine(), "arm64": probes["arm64"].get("machine", arm_machine)}
    imports = {"native": native_imports, "arm64": arm_imports}
    errors = {}
    for name in ("native", "arm64", "coordinator"):
        text = (run_dir / f"{name}.log").read_text(errors="replace")
        # Distinct lines (torch's own timestamps removed), with how often each came.
        counts: dict[str, int] = {}
        for ln in text.splitlines():
            if re.search(r"traceback|error|warning|can't|could not", ln, re.I):
                key = re.sub(r"^\[([WE])\d+ [\d:.]+ ", r"[\1 ", ln.strip())
                counts[key] = counts.get(key, 0) + 1
        errors[name] = [f"{k} (x{n})" if n > 1 else k for k, n in list(counts.items())[:20]]

    rows: list[dict] = []
    for r in ledger_rows:
        rows.append(
            {
                "kind": "round",
                "round": r["round"],
                "round_seconds": r["round_seconds"],
                "wait_seconds": r["wait_seconds"],
                "aggregate_seconds": r["aggregate_seconds"],
                "evaluate_seconds": r["evaluate_seconds"],
                "completed": r["completed"],
                "dropped": r["dropped"],
                "rejected": r["rejected"],
                "test_accuracy": r["test_accuracy"],
                "test_loss": r["test_loss"],
                "generator_seconds": r["extras"].get("generator_seconds"),
                "generator_onnx_bytes": r["extras"].get("generator_onnx_bytes"),
                "bytes_down": r["bytes_down"],
                "bytes_up": r["bytes_up"],
            }
        )
        for c in r["clients"]:
            name = next((n for n, cid in client_of.items() if cid == c["client_id"]), "?")
            wall = next((x["wall_s"] for x in probes.get(name, {}).get("rounds", []) if x["round"] == r["round"]), None)
            onnx_runs = next(
                (x["onnx_runs"] for x in probes.get(name, {}).get("rounds", []) if x["round"] == r["round"]), None
            )
            m = c["metrics"]
            rows.append(
                {
                    "kind": "client_round",
                    "round": r["round"],
                    "client_id": c["client_id"],
                    "arch": arch_of.get(name, "?"),
                    "outcome": c["outcome"],
                    "num_examples": c["num_examples"],
                    "train_seconds": round(c["train_seconds"], 3),
                    "client_wall_s": wall,
                    "loss": m.get("loss"),
                    "regulariser": m.get("regulariser"),
                    "accuracy": m.get("accuracy"),
                    "steps": m.get("steps"),
                    "onnx_generator_runs": onnx_runs,
                    "bytes_down": c["bytes_down"],
                    "bytes_up": c["bytes_up"],
                }
            )
    for name in ("native", "arm64"):
        pr, tv, sm = probes[name], timev[name], samplers.get(name)
        walls = [x["wall_s"] for x in pr.get("rounds", [])]
        trains = [c["train_seconds"] for r in ledger_rows for c in r["clients"] if c["client_id"] == client_of[name]]
        # Round 0 carries the first-call costs (allocator, oneDNN/kernels) and has no regulariser:
        # the steady state is rounds >= 1.
        walls1 = [x["wall_s"] for x in pr.get("rounds", []) if x["round"] >= 1]
        trains1 = [
            c["train_seconds"]
            for r in ledger_rows
            if r["round"] >= 1
            for c in r["clients"]
            if c["client_id"] == client_of[name]
        ]
        onnx = pr.get("onnx", {})
        rows.append(
            {
                "kind": "client_summary",
                "client_id": client_of[name],
                "arch": arch_of[name],
                "emulated": name == "arm64",
                "exit_code": pr.get("exit_code", procs[name].returncode if name in procs else None),
                "rounds_trained": len(walls),
                "mean_client_wall_s_per_round": round(sum(walls) / len(walls), 3) if walls else None,
                "mean_train_seconds": round(sum(trains) / len(trains), 3) if trains else None,
                "mean_client_wall_s_round1plus": round(sum(walls1) / len(walls1), 3) if walls1 else None,
                "mean_train_seconds_round1plus": round(sum(trains1) / len(trains1), 3) if trains1 else None,
                "round0_client_wall_s": next((x["wall_s"] for x in pr.get("rounds", []) if x["round"] == 0), None),
                "client_wall_s_total": pr.get("client_wall_s"),
                "import_edge_client_s_in_client": pr.get("import_edge_client_s"),
                "import_edge_client_s_run1": imports[name].get("import_s_run1"),
                "import_edge_client_s_run2": imports[name].get("import_s_run2"),
                "interpreter_wall_s_run2": imports[name].get("interpreter_wall_s_run2"),
                **{
                    f"importtime_{k.replace('.', '_')}_s": v
                    for k, v in imports[name].get("importtime_cumulative_s", {}).items()
                },
                "peak_rss_mib_time_v": round(tv["time_v_max_rss_kib"] / 1024, 1)
                if "time_v_max_rss_kib" in tv
                else None,
                "peak_rss_mib_ru_maxrss": round(pr["ru_maxrss_kib"] / 1024, 1) if pr.get("ru_maxrss_kib") else None,
                "peak_vmhwm_mib_host_sampled": round(sm.max_hwm_kib / 1024, 1) if sm else None,
                "rss_after_import_mib": round(pr["rss_after_import_kib"] / 1024, 1)
                if pr.get("rss_after_import_kib")
                else None,
                "cpu_user_s": tv.get("time_v_user_s"),
                "cpu_sys_s": tv.get("time_v_sys_s"),
                "process_elapsed_s": tv.get("time_v_elapsed_s"),
                "onnx_generator_loads": onnx.get("loads"),
                "onnx_generator_runs": onnx.get("runs"),
                "onnx_run_seconds": onnx.get("run_seconds"),
                "onnx_providers": ",".join(onnx.get("providers") or []),
                "onnx_latents_finite": onnx.get("finite"),
                "onnx_latent_abs_mean": onnx.get("latent_abs_mean"),
                "torch_cpu_capability": pr.get("torch_cpu_capability"),
                "torch_nnpack_available": pr.get("torch_nnpack_available"),
                **{f"version_{k}": v for k, v in pr.get("versions", {}).items()},
            }
        )

    # ---- checks: what worked
    arm_sum = next(r for r in rows if r["kind"] == "client_summary" and r["client_id"] == "arm64-pi")
    nat_sum = next(r for r in rows if r["kind"] == "client_summary" and r["client_id"] == "host-x86_64")
    arm_rounds = [r for r in rows if r["kind"] == "client_round" and r["client_id"] == "arm64-pi"]
    checks = {
        "arm64 root python platform.machine() == aarch64": arm_machine == "aarch64",
        "federation committed all rounds": len(ledger_rows) == args.rounds,
        "arm64 client completed every round": len(arm_rounds) == args.rounds
        and all(r["outcome"] == "completed" for r in arm_rounds),
        "arm64 client exited 0 after DONE": arm_sum["exit_code"] == 0,
        "native client exited 0 after DONE": nat_sum["exit_code"] == 0,
        "arm64 ONNX generator ran in onnxruntime (rounds >= 1)": bool(arm_sum["onnx_generator_runs"])
        and all((r["onnx_generator_runs"] or 0) > 0 for r in arm_rounds if r["round"] >= 1),
        "arm64 regulariser > 0 from round 1 on (ledger)": bool(arm_rounds)
        and all((r["regulariser"] or 0) > 0 for r in arm_rounds if r["round"] >= 1),
        "arm64 generator latents finite": bool(arm_sum["onnx_latents_finite"]),
    }
    for k, v in checks.items():
        say(f"   check: {k}: {'yes' if v else 'NO'}")

    freeze = args.pip_freeze.read_text().split() if args.pip_freeze and args.pip_freeze.exists() else []
    qemu = run(["qemu-aarch64-static", "--version"], timeout=30).stdout.splitlines()[0]
    binfmt = (
        Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").read_text().split("\n")
        if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
        else []
    )
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    machine = {
        "host": f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        "shared with other jobs",
        "host_python": platform.python_version(),
        "arm64": f"Debian bookworm arm64 root at {root} (debootstrap), chroot; uname -m in root: {uname_root}; "
        f"{qemu}, user-mode emulation via binfmt_misc ({', '.join(x for x in binfmt if x.startswith('flags'))})",
        "arm64_pip_freeze": [
            x for x in freeze if re.match(r"(?i)(torch|onnxruntime|grpcio|protobuf|numpy|pydantic|zstandard|fedgen)", x)
        ],
        "arm64_pydantic_absent": not any(x.lower().startswith("pydantic") for x in freeze),
        "run_dir": str(run_dir),
        "federation_wall_s": round(fed_wall, 1),
    }
    diag = {}
    setup: dict = {}
    if args.diag_dir:
        path = args.diag_dir / "setup-seconds.txt"
        if path.exists():
            setup = {k: int(v) for k, _, v in (ln.partition("=") for ln in path.read_text().split()) if v.isdigit()}
        for key, name in (("arm64_venv_mib", "arm64-venv-mib.txt"), ("arm64_root_mib", "arm64-root-mib.txt")):
            if (args.diag_dir / name).exists():
                setup[key] = int((args.diag_dir / name).read_text().strip())
        for key, name in (
            ("import_onnxruntime_with_host_sys", "ort-import-with-sys.txt"),
            ("import_onnxruntime_without_sys", "ort-import-without-sys.txt"),
        ):
            path = args.diag_dir / name
            diag[key] = (
                [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
                if path.exists()
                else None
            )
    machine["arm64_setup"] = setup  # seconds of each setup step when it last ran; venv / root sizes
    unpinned = {}
    if args.diag_dir and (args.diag_dir / "unpinned-torch.json").exists():
        rep = json.loads((args.diag_dir / "unpinned-torch.json").read_text())
        for item in rep.get("install", []):
            md = item.get("metadata", {})
            if md.get("name", "").lower() == "torch":
                reqs = [r for r in md.get("requires_dist", []) if "extra ==" not in r]
                unpinned = {
                    "version": md.get("version"),
                    "url": item.get("download_info", {}).get("url", ""),
                    "cuda_requirements": [r for r in reqs if re.search(r"cuda|nvidia|triton", r, re.I)],
                }
    machine["unpinned_pip_install_torch_on_aarch64"] = unpinned
    result = {
        "command": f"ROUNDS={args.rounds} bash tools/arm64_edge_run.sh  # as root",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine,
        "checks": checks,
        "diagnosis": diag,
        "log_warnings": errors,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "arm64_run.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "arm64_run.md").write_text(render_md(result, nat_sum, arm_sum))
    say(f"wrote {args.out / 'arm64_run.json'} and {args.out / 'arm64_run.md'} (logs in {run_dir})")
    return 0 if all(checks.values()) else 1


def _f(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_md(res: dict, nat: dict, arm: dict) -> str:
    m = res["machine"]
    lines = [
        "# FedGen edge client on arm64 (emulated) beside a native client",
        "",
        f"`{res['command']}` on {res['date']}. Host: {m['host']}. arm64: {m['arm64']}.",
        f"arm64 venv: {', '.join(m['arm64_pip_freeze'])}.",
        "",
        "One coordinator (host, FedGen, 2 clients per round) and two clients over loopback gRPC: `host-x86_64`",
        "natively and `arm64-pi` in the arm64 root under qemu-user. Shards from `fedgen partition --clients 2",
        "--alpha 0.5 --samples-per-class 300` on full MNIST. 20 local steps of batch 32 per round, 1 torch thread.",
        "",
        "Setup (seconds when each step last ran; sizes now): "
        + (", ".join(f"{k} {v}" for k, v in m.get("arm64_setup", {}).items()) or "-")
        + ".",
        "",
        "## Per round and client (coordinator's ledger; wall = the client's whole task: fetch, train, upload)",
        "",
        "| round | client | arch | outcome | train s | client wall s | loss | regulariser | ONNX runs | bytes down "
        "| bytes up | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    acc = {r["round"]: r["test_accuracy"] for r in res["rows"] if r["kind"] == "round"}
    for r in res["rows"]:
        if r["kind"] == "client_round":
            lines.append(
                f"| {r['round']} | {r['client_id']} | {r['arch']} | {r['outcome']} | {_f(r['train_seconds'])} | "
                f"{_f(r['client_wall_s'])} | {_f(r['loss'], 3)} | {_f(r['regulariser'], 3)} | "
                f"{_f(r['onnx_generator_runs'])} | {r['bytes_down']:,} | {r['bytes_up']:,} | "
                f"{_f(acc.get(r['round']), 3)} |"
            )
    lines += [
        "",
        "## Per client",
        "",
        "| | native x86_64 | arm64 (qemu-user) | arm64 / native |",
        "|---|---|---|---|",
    ]

    def ratio(a, b):
        return f"{a / b:.1f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"

    for key, label in (
        ("mean_train_seconds_round1plus", "mean train seconds per round, rounds >= 1 (ledger)"),
        ("mean_client_wall_s_round1plus", "mean client wall seconds per round, rounds >= 1"),
        ("round0_client_wall_s", "client wall seconds, round 0 (first call, no regulariser)"),
        ("mean_train_seconds", "mean train seconds per round, all rounds (ledger)"),
        ("mean_client_wall_s_per_round", "mean client wall seconds per round, all rounds"),
        ("import_edge_client_s_run1", "import fedgen.edge.cli, 1st fresh interpreter (s)"),
        ("import_edge_client_s_run2", "import fedgen.edge.cli, 2nd fresh interpreter (s)"),
        ("import_edge_client_s_in_client", "import fedgen.edge.cli inside the client run (s)"),
        ("importtime_torch_s", "  of which torch (-X importtime cumulative, s)"),
        ("importtime_onnxruntime_s", "  of which onnxruntime (s)"),
        ("importtime_grpc_s", "  of which grpc (s)"),
        ("peak_rss_mib_time_v", "peak RSS, /usr/bin/time -v (MiB)"),
        ("peak_vmhwm_mib_host_sampled", "peak VmHWM sampled from the host (MiB)"),
        ("rss_after_import_mib", "RSS right after the import (MiB)"),
        ("cpu_user_s", "CPU user seconds, whole process"),
        ("process_elapsed_s", "process elapsed seconds"),
        ("onnx_generator_runs", "onnxruntime generator runs"),
        ("onnx_run_seconds", "seconds inside onnxruntime"),
    ):
        nd = 4 if key == "onnx_run_seconds" else 2
        lines.append(
            f"| {label} | {_f(nat.get(key), nd)} | {_f(arm.get(key), nd)} | {ratio(arm.get(key), nat.get(key))} |"
        )
    lines += [
        f"| onnxruntime providers | {nat.get('onnx_providers')} | {arm.get('onnx_providers')} | |",
        f"| torch CPU capability | {nat.get('torch_cpu_capability')} | {arm.get('torch_cpu_capability')} | |",
        f"| torch NNPACK available | {nat.get('torch_nnpack_available')} | {arm.get('torch_nnpack_available')} | |",
        f"| torch / onnxruntime | {nat.get('version_torch')} / {nat.get('version_onnxruntime')} | "
        f"{arm.get('version_torch')} / {arm.get('version_onnxruntime')} | |",
        "",
        "## Checks",
        "",
    ]
    lines += [f"- {'yes' if v else 'NO'}: {k}" for k, v in res["checks"].items()]
    diag = res.get("diagnosis") or {}
    if diag.get("import_onnxruntime_with_host_sys"):
        lines += [
            "",
            "## What did not work as-is: onnxruntime with the host's /sys under qemu 7.2",
            "",
            "With the host's `/sys` bind-mounted into the root, `import onnxruntime` (1.32.0, aarch64) dies in the",
            "extension's static initialisation; qemu-user 7.2 shows the guest the host's x86 `/proc/cpuinfo`, and",
            "the cpuinfo library inside onnxruntime dereferences NULL while matching it with",
            "`/sys/devices/system/cpu` (last reads: `cpu1/cache/index2/shared_cpu_list`, then SIGSEGV at address 0):",
            "",
            "```",
            *diag["import_onnxruntime_with_host_sys"],
            "```",
            "",
            "So the script mounts no `/sys` in the root; onnxruntime then prints `cpuinfo_initialize failed` and runs.",
            "The same import also passes with `/sys` mounted when an ARM `/proc/cpuinfo` is bound over the host's",
            "one (checked by hand, not used for the figures). A real arm64 board has an ARM `/proc/cpuinfo`, so",
            "this is an artefact of the emulation, not of the client.",
            "",
            "Without `/sys`:",
            "",
            "```",
            *(diag.get("import_onnxruntime_without_sys") or ["-"]),
            "```",
        ]
    unp = m.get("unpinned_pip_install_torch_on_aarch64") or {}
    if unp:
        wheel = unp["url"].rsplit("/", 1)[-1]
        lines += [
            "",
            "## What an unpinned `pip install .` would take for torch on aarch64",
            "",
            f"With nothing installed first, pip resolves pyproject's torch range on aarch64 to torch {unp['version']}",
            f"(`{wheel}`)"
            + (
                ", a CUDA build, whose requirements pull in:"
                if unp["cuda_requirements"]
                else ", with no CUDA requirements."
            ),
            "",
            *[f"- `{r}`" for r in unp["cuda_requirements"]],
            "",
            "The run above pins the CPU wheel first (`pip install torch==2.9.1`), as a device install should.",
        ]
    warn = {k: v for k, v in res["log_warnings"].items() if v}
    if warn:
        lines += ["", "## Warnings and errors in the run's logs (distinct lines)", ""]
        for k, v in warn.items():
            lines += [f"- {k}: `{x.strip()[:200]}`" for x in v[:8]]
    lines += [
        "",
        "## Caveats",
        "",
        "- Emulated, not a Pi: qemu-user translates every aarch64 instruction on the x86_64 host, so the arm64",
        "  seconds measure the emulator on this (shared, 2-core) host, not a real Cortex-A CPU; they show the",
        "  client works on arm64 and bound its cost from above only loosely.",
        "- The arm64 peak RSS is that of the qemu-aarch64 process running the guest Python (the kernel's",
        "  accounting of the emulator: guest memory plus qemu's translation cache); a native arm64 process",
        "  would be somewhat smaller.",
        "- With no `/sys` in the root, the cpuinfo library finds no CPUs, so torch's NNPACK cannot initialise",
        "  either (`torch.backends.nnpack.is_available()` is False; with `/sys` and an ARM `/proc/cpuinfo` it is",
        "  True). The client turns oneDNN off, so on arm64 torch tries NNPACK for each convolution, falls back",
        "  to its plain kernel and prints `Could not initialize NNPACK! Reason: Out of memory.` each time",
        "  (counted above). A real board, whose /proc/cpuinfo is ARM's, would use NNPACK: another reason these",
        "  arm64 seconds are not a Pi's.",
        "- The native client's torch is the x86_64 2.13.0+cpu wheel; the arm64 root's is PyPI's aarch64 CPU",
        "  wheel, so the two differ in version as well as in architecture.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
