"""The committed stubs are exactly what the pinned generators make from the .proto sources."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_generated_stubs_match_proto_sources(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "tools" / "gen_protos.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
    committed = REPO / "proto" / "fedgen" / "v1"
    fresh = tmp_path / "fedgen" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "protoc generated nothing"
    _, mismatch, errors = filecmp.cmpfiles(committed, fresh, generated, shallow=False)
    assert not mismatch and not errors, f"stale generated files (run tools/gen_protos.py): {mismatch + errors}"
    stale = sorted(p.name for p in committed.glob("*_pb2*") if p.name not in generated)
    assert not stale, f"generated files with no .proto source: {stale}"


def test_every_rpc_is_documented() -> None:
    """Comments in the .proto files are the public documentation of the contract."""
    for proto in (REPO / "proto" / "fedgen" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("rpc "):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} rpc without a comment"
