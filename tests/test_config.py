from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_config, parse_config


def test_defaults_are_valid() -> None:
    cfg = parse_config({})
    assert cfg.federation.strategy == "fedgen"
    assert cfg.federation.required_clients == cfg.federation.clients_per_round


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"federation": {"rounds": 0}}, "federation.rounds"),
        ({"federation": {"strategy": "fedsgd"}}, "federation.strategy"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"server": {"max_message_bytes": 10}}, "server.max_message_bytes"),
        ({"federation": {"clients_per_round": 2, "min_completed": 5}}, "min_completed"),
        ({"auth": {"enrollment_tokens": ["short"]}}, "auth"),
        ({"federaton": {}}, "federaton"),
        ({"training": {"local_step": 3}}, "training.local_step"),
    ],
)
def test_bad_values_name_the_key(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(raw)


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('state_dir = "s"\n[federation]\nrounds = 3\nstrategy = "fedprox"\n')
    cfg = load_config(path, {"federation": {"rounds": 7}})
    assert (cfg.federation.rounds, cfg.federation.strategy, cfg.state_dir) == (7, "fedprox", "s")


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_serve_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nclients_per_round = -4\n")
    proc = subprocess.run([sys.executable, "-m", "coordinator", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "federation.clients_per_round" in proc.stderr


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "coordinator.toml"
    assert load_config(example).federation.rounds >= 1
