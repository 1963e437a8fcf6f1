"""Bad input at the command line, as real processes: each is exit status 2 and a message that names
the thing and what was expected (a task that does not import, a shard that does not fit the task,
a warm start that does not fit, a state folder of another task, a round that was never committed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import toml_dumps
from fedgen.coordinator.server import build_federation
from fedgen.core.data import Dataset, save_shard
from fedgen.core.models import state_to_numpy
from fedgen.core.task import prepare
from fedgen.export.model_export import model_to_torch

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=180, check=False)


def _serve(tmp_path: Path, raw: dict[str, object]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(toml_dumps({"state_dir": str(tmp_path / "state"), "server": {"address": "127.0.0.1:0"}, **raw}))
    return _run(BIN / "fedgen", "serve", "--config", config, "--exit-when-finished")


def test_serve_refuses_a_task_that_does_not_import(tmp_path: Path) -> None:
    done = _serve(tmp_path, {"task": {"name": "acme_models.vision:Detector"}})
    assert done.returncode == 2
    assert "task 'acme_models.vision:Detector': cannot import 'acme_models.vision'" in done.stderr


def test_serve_refuses_a_warm_start_that_does_not_fit(tmp_path: Path) -> None:
    (tmp_path / "cifar.pt").write_bytes(model_to_torch(state_to_numpy(prepare("cifar10").model())))
    done = _serve(tmp_path, {"task": {"name": "mnist", "warm_start": str(tmp_path / "cifar.pt")}})
    assert done.returncode == 2
    assert "cifar.pt for task mnist 1" in done.stderr and "keys differ" in done.stderr
    assert not (tmp_path / "state" / "state.sqlite3").exists()  # refused before anything was written


def test_serve_refuses_a_state_folder_of_another_task_and_export_names_missing_rounds(
    tmp_path: Path, fashion_dir: Path
) -> None:
    async def create() -> None:
        fed = await build_federation(parse_config({"state_dir": str(tmp_path / "state")}))
        await fed.close()

    asyncio.run(create())  # an MNIST federation, no round committed yet
    done = _serve(tmp_path, {"task": {"name": "fashion-mnist"}, "data": {"test_data_dir": str(fashion_dir)}})
    assert done.returncode == 2
    assert "holds a federation of task mnist 1" in done.stderr and "configured for fashion-mnist 1" in done.stderr

    out = tmp_path / "m.onnx"
    done = _run(BIN / "fedgen", "export", "--state-dir", tmp_path / "state", "--round", "4", "--out", out)
    assert done.returncode == 2 and "round 4 is not committed: no round is committed yet" in done.stderr
    done = _run(BIN / "fedgen", "export", "--state-dir", tmp_path / "state", "--best", "--out", out)
    assert done.returncode == 2 and "no committed round has been evaluated" in done.stderr
    done = _run(BIN / "fedgen", "export", "--state-dir", tmp_path / "nowhere", "--out", out)
    assert done.returncode == 2 and "holds no federation" in done.stderr
    done = _run(BIN / "fedgen", "export", "--state-dir", tmp_path / "state", "--out", out)  # the initial model
    assert done.returncode == 0 and '"round": null' in done.stdout and out.stat().st_size > 100_000


def test_a_client_whose_data_does_not_fit_its_task_exits_2(tmp_path: Path) -> None:
    windows = Dataset(np.zeros((8, 9, 128), np.float32), np.zeros(8, np.int64), "har")
    save_shard(tmp_path / "har.npz", windows)
    client = [BIN / "fedgen-client", "--coordinator", "127.0.0.1:1", "--token", "t", "--data", tmp_path / "har.npz"]
    done = _run(*client, "--task", "mnist")
    assert done.returncode == 2
    assert "examples are float32 [8, 9, 128], task 'mnist' expects uint8 [N, 28, 28]" in done.stderr
    labels = Dataset(np.zeros((8, 9, 128), np.float32), np.full(8, 7, np.int64), "har")
    save_shard(tmp_path / "har.npz", labels)
    done = _run(*client, "--task", "har")
    assert done.returncode == 2 and "labels span 7..7, task 'har' has classes 0..5" in done.stderr
    done = _run(*client, "--task", "har_plugin:Missing")
    assert done.returncode == 2 and "cannot import 'har_plugin'" in done.stderr


def test_partition_names_what_the_task_could_not_read(tmp_path: Path) -> None:
    done = _run(BIN / "fedgen", "partition", "--task", "cifar10", "--data-dir", tmp_path, "--out", tmp_path / "s")
    assert done.returncode == 2 and "missing CIFAR-10 binary file(s)" in done.stderr


def test_serve_refuses_a_state_folder_another_coordinator_holds(tmp_path: Path) -> None:
    """Two coordinators on one state folder would both commit rounds: the second one is refused, and
    says who holds it; once the first closes, the folder is free again."""

    async def hold_and_try() -> subprocess.CompletedProcess[str]:
        fed = await build_federation(parse_config({"state_dir": str(tmp_path / "state")}))
        try:
            return await asyncio.to_thread(_serve, tmp_path, {})
        finally:
            await fed.close()

    done = asyncio.run(hold_and_try())
    assert done.returncode == 2
    assert f"state_dir {tmp_path / 'state'} is in use by another coordinator (pid " in done.stderr
    assert "stop that one, or give this one another state_dir" in done.stderr

    async def reopen() -> None:
        await (await build_federation(parse_config({"state_dir": str(tmp_path / "state")}))).close()

    asyncio.run(reopen())


def test_serve_names_an_unusable_state_folder_in_one_line(tmp_path: Path) -> None:
    """A corrupt SQLite file or a state_dir that cannot be a folder: exit 2, one line, no traceback."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.sqlite3").write_bytes(b"not a database, " * 400)
    done = _serve(tmp_path, {})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("fedgen serve: ")
    assert "state.sqlite3 is not a usable SQLite database" in done.stderr

    (tmp_path / "blocker").write_text("a file where the state folder's parent should be")
    config = tmp_path / "c2.toml"
    config.write_text(toml_dumps({"state_dir": str(tmp_path / "blocker" / "state")}))
    done = _run(BIN / "fedgen", "serve", "--config", config, "--exit-when-finished")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot use state_dir {tmp_path / 'blocker' / 'state'}: Not a directory" in done.stderr
