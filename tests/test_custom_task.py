"""examples/custom_task, run as its README says: install the package, draw the data, partition,
serve, four clients over real gRPC, export the best round as ONNX and run it without torch.

The package is pip-installed into a folder of its own (``--target``) that the processes get on
``PYTHONPATH``, so the task is found through its entry point exactly as after ``pip install .``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_task"
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("custom-task")
    site = work / "site"
    install = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(EXAMPLE),
        ],
        work,
        dict(os.environ),
    )
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    for name in ("coordinator.toml", "make_data.py", "predict.py"):
        (work / name).write_bytes((EXAMPLE / name).read_bytes())
    return work, env


def test_the_readme_walkthrough_federates_exports_and_predicts(walkthrough: tuple[Path, dict[str, str]]) -> None:
    work, env = walkthrough
    made = _run([sys.executable, "make_data.py", "--out", "vib-data"], work, env)
    assert made.returncode == 0, made.stderr
    part = _run(
        [
            str(BIN / "fedgen"),
            "partition",
            "--task",
            "vibration",
            "--data-dir",
            "vib-data",
            "--clients",
            "4",
            "--alpha",
            "0.5",
            "--out",
            "vib-shards",
        ],
        work,
        env,
    )
    assert part.returncode == 0, part.stderr
    assert "wrote 4 shards" in part.stdout

    # `fedgen serve --config coordinator.toml`, on a free port rather than the README's 50051.
    serve = subprocess.Popen(
        [
            str(BIN / "fedgen"),
            "serve",
            "--config",
            "coordinator.toml",
            "--exit-when-finished",
            "--address",
            "127.0.0.1:0",
            "--port-file",
            "port",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "serve.log", "wb"),  # noqa: SIM115
    )
    try:
        deadline = time.monotonic() + 120
        while not (work / "port").is_file() or not (work / "port").read_text():
            assert serve.poll() is None, (work / "serve.log").read_text()
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.1)
        address = f"127.0.0.1:{(work / 'port').read_text()}"
        clients = [
            subprocess.Popen(
                [
                    str(BIN / "fedgen-client"),
                    "--coordinator",
                    address,
                    "--token",
                    "fedgen-demo-token",
                    "--task",
                    "vibration",
                    "--data",
                    f"vib-shards/client-0{k}.npz",
                    "--client-id",
                    f"device-{k}",
                    "--log-level",
                    "WARNING",
                ],
                cwd=work,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for k in range(4)
        ]
        assert [c.wait(timeout=600) for c in clients] == [0, 0, 0, 0]
        assert serve.wait(timeout=120) == 0, (work / "serve.log").read_text()[-2000:]
    finally:
        serve.kill()

    rows = [json.loads(line) for line in (work / "vib-state" / "ledger.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(15))
    assert all(r["completed"] >= 3 for r in rows)
    assert max(r["test_accuracy"] for r in rows) > 0.8  # four classes: chance is 0.25
    assert rows[-1]["extras"]["generator_qualified_labels"] == 4  # FedGen's generator saw every label

    export = _run(
        [
            str(BIN / "fedgen"),
            "export",
            "--state-dir",
            "vib-state",
            "--best",
            "--format",
            "onnx",
            "--out",
            "vibration.onnx",
        ],
        work,
        env,
    )
    assert export.returncode == 0, export.stderr
    described = json.loads(export.stdout)
    best = max(rows, key=lambda r: (r["test_accuracy"], -r["round"]))
    assert described["round"] == best["round"] and described["test_accuracy"] == best["test_accuracy"]

    predicted = _run([sys.executable, "predict.py", "vibration.onnx", "vib-data/test.npz"], work, env)
    assert predicted.returncode == 0, predicted.stderr
    # onnxruntime on the raw windows (preprocessing inside the file) agrees with the coordinator's evaluation.
    assert f"round {best['round']}: accuracy {best['test_accuracy']:.2%} on 1000" in predicted.stdout
