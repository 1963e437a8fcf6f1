from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedgen.coordinator.config import ConfigError, load_config, parse_config


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


@pytest.mark.integration
def test_serve_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nclients_per_round = -4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedgen.coordinator", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "federation.clients_per_round" in proc.stderr


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coordinator.toml"


def test_example_config_is_valid() -> None:
    assert load_config(EXAMPLE).federation.rounds >= 1


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "coordinator.example:443"])
def test_published_tokens_are_refused_beyond_loopback(address: str) -> None:
    """The demo's default token and the example's placeholder are in the docs: never on the network."""
    with pytest.raises(ConfigError, match=r"auth\.enrollment_tokens: address .* published"):
        load_config(EXAMPLE, {"server": {"address": address}})
    with pytest.raises(ConfigError, match="fedgen-demo-token"):
        parse_config({"server": {"address": address}})
    ours = {"enrollment_tokens": ["a-secret-of-our-own"]}
    with pytest.raises(ConfigError, match=r"auth\.operator_token: .* anyone who reaches the port may pause or stop"):
        parse_config({"server": {"address": address}, "auth": ours})
    own = parse_config({"server": {"address": address}, "auth": {**ours, "operator_token": "an-operator-secret"}})
    assert own.server.address == address


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"federation": {"round_timeout_s": float("inf")}}, r"federation\.round_timeout_s: Input should be a finite"),
        ({"auth": {"credential_ttl_s": float("nan")}}, r"auth\.credential_ttl_s: Input should be a finite"),
        ({"server": {"address": "127.0.0.1:70000"}}, r"server\.address: expected host:port with a port in 0-65535"),
        ({"server": {"address": "127.0.0.1"}}, r"server\.address: expected host:port"),
        (
            {"server": {"chunk_bytes": 4 * 1024 * 1024, "max_message_bytes": 4 * 1024 * 1024}},
            r"server: chunk_bytes \(4194304\) plus 1024 bytes of framing must fit max_message_bytes",
        ),
        ({"auth": {"enrollment_tokens": [""]}}, r"auth: every enrollment token must be at least 8 characters"),
        ({"federation": {"clients_per_round": 10**9}}, r"federation\.clients_per_round: Input should be less than"),
    ],
)
def test_out_of_range_values_are_refused_at_load_naming_the_key(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_config(raw)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:50051", "127.8.0.1:1", "[::1]:50051", "localhost:50051", "unix:/run/fedgen.sock"]
)
def test_published_tokens_are_fine_on_loopback(address: str) -> None:
    assert parse_config({"server": {"address": address}}).server.address == address


def test_default_state_dir_is_outside_any_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert parse_config({}).state_path == tmp_path / "state" / "fedgen" / "coordinator"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert parse_config({}).state_path == Path.home() / ".local" / "state" / "fedgen" / "coordinator"
    assert parse_config({"state_dir": "~/fl"}).state_path == Path.home() / "fl"
