"""When the device is willing to train: small pluggable probes, asked before every poll.

A probe returns None when the device may train, or a short reason why not ("on battery (38%)").
The client sends the answer with every PollTask and Heartbeat (DeviceState); the coordinator
samples only ready clients and its ledger says who was skipped and why.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

Probe = Callable[[], "str | None"]


def on_mains_power(power_supply: Path = Path("/sys/class/power_supply")) -> str | None:
    """Ready when on mains power: no battery, or a mains/USB supply online (Linux sysfs)."""
    if not power_supply.is_dir():
        return None  # nothing to tell: a board without power-supply reporting is on mains
    batteries, external_online = [], False
    for dev in sorted(power_supply.iterdir()):
        kind = _read(dev / "type")
        if kind == "Battery":
            batteries.append(dev)
        elif kind in ("Mains", "USB", "USB_C", "USB_PD") and _read(dev / "online") == "1":
            external_online = True
    if not batteries or external_online:
        return None
    capacity = _read(batteries[0] / "capacity")
    return f"on battery ({capacity}%)" if capacity else "on battery"


def command_probe(command: str, timeout_s: float = 5.0) -> Probe:
    """A probe from any program: exit status 0 = ready; otherwise the first line it printed (or its
    exit status) is the reason. E.g. a script asking NetworkManager whether the link is metered."""
    argv = shlex.split(command)

    def probe() -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"readiness probe failed: {err}"
        if done.returncode == 0:
            return None
        first = (done.stdout.strip().splitlines() or [""])[0]
        return first[:200] or f"readiness probe exited {done.returncode}"

    return probe


def combine(probes: Sequence[Probe]) -> Probe:
    """Ready when every probe is; otherwise the first reason."""

    def probe() -> str | None:
        for p in probes:
            reason = p()
            if reason is not None:
                return reason
        return None

    return probe


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
