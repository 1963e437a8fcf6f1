"""The distribution: one import name, floors that are true, the same names the code imports."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _floor(name: str, extra: str | None = None) -> Version:
    requirements = (
        PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    )
    for text in requirements:
        req = Requirement(text)
        if req.name == name:
            floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
            assert floors, f"{name} has no floor in pyproject"
            return floors[0]
    raise AssertionError(f"{name} is not a requirement{f' of [{extra}]' if extra else ''}")


def test_the_grpcio_floor_is_the_version_the_stubs_were_generated_with() -> None:
    """The committed _pb2_grpc modules refuse to import below their generator's version."""
    for stub in sorted((REPO / "proto" / "fedgen" / "v1").glob("*_pb2_grpc.py")):
        generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", stub.read_text())
        assert generated, stub.name
        assert _floor("grpcio") == Version(generated.group(1)), stub.name
    assert _floor("grpcio-tools", "dev") == _floor("grpcio")  # the generator that made them is pinned to it


def test_the_protobuf_floor_is_the_version_the_messages_were_generated_with() -> None:
    for module in sorted((REPO / "proto" / "fedgen" / "v1").glob("*_pb2.py")):
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
            r"\s*(\d+),",
            module.read_text(),
        )
        assert found, module.name
        assert _floor("protobuf") == Version(".".join(found.groups())), module.name


def test_the_build_backend_floor_reads_this_metadata() -> None:
    """A `license = "<SPDX expression>"` string needs setuptools 77 (PEP 639)."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert Version("77") in backend.specifier and Version("76.9") not in backend.specifier


@pytest.mark.integration
def test_the_wheel_installs_exactly_one_top_level_name(tmp_path: Path) -> None:
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("fedgen_edge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"fedgen"}, tops
    for expected in (
        "fedgen/coordinator/server.py",
        "fedgen/edge/cli.py",
        "fedgen/export/codec.py",
        "fedgen/core/models.py",
        "fedgen/v1/fleet_pb2.py",
        "fedgen/v1/fleet.proto",
        "fedgen/v1/fleet_pb2.pyi",
        "fedgen/core/datasets/mnist_subset/t10k-images-idx3-ubyte.gz",
    ):
        assert expected in names, expected
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert installed == {"fedgen"}, installed
    # The installed copy runs on its own: the edge client and the coordinator's config import from it.
    code = (
        "import fedgen, fedgen.edge.cli, fedgen.coordinator.config, fedgen.export.codec, fedgen.core.data; "
        "print(fedgen.__file__); print(fedgen.coordinator.config.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(Path(line).is_relative_to(target) for line in out.stdout.split()), out.stdout
