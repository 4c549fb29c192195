"""Jetson power mode and tegrastats, for bench's JSON (None where they are absent).

`nvpmodel -q` prints the power mode ("NV Power Mode: MAXN" and its id on the next line);
`tegrastats --interval MS` prints one line per interval, e.g.

    RAM 2893/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,off,...] GR3D_FREQ 37%
    cpu@46.5C gpu@45.1C VDD_IN 4524mW/4524mW VDD_CPU_GPU_CV 483mW/483mW VDD_SOC 1410mW/1410mW

`TegraSampler` runs tegrastats beside a benchmark and summarises what it saw: peak RAM, GPU load
(GR3D_FREQ), mean power per rail and peak temperatures.
"""
from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import threading
from dataclasses import dataclass, field

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")
_TEMP = re.compile(r"\b([A-Za-z0-9_]+)@(-?\d+(?:\.\d+)?)C\b")


def parse_power_mode(text: str) -> dict | None:
    """`nvpmodel -q` output -> {"name": "MAXN", "id": 0}; None when it names no mode."""
    match = re.search(r"NV Power Mode:\s*(\S+)", text)
    if not match:
        return None
    ids = re.findall(r"^\s*(\d+)\s*$", text[match.end():], re.MULTILINE)
    return {"name": match.group(1), "id": int(ids[0]) if ids else None}


def power_mode() -> dict | None:
    if shutil.which("nvpmodel") is None:
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_power_mode(out.stdout)


def parse_line(line: str) -> dict:
    """One tegrastats line -> {"ram_used_mb", "ram_total_mb", "gpu_percent", "rails_mw", "temps_c"}."""
    out: dict = {"rails_mw": {}, "temps_c": {}}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _GPU.search(line):
        out["gpu_percent"] = int(m.group(1))
    for name, now, _avg in _RAIL.findall(line):
        out["rails_mw"][name] = int(now)
    for name, value in _TEMP.findall(line):
        if not re.fullmatch(r"\d+", name):  # "1%@729" is a CPU core, not a temperature
            out["temps_c"][name] = float(value)
    return out


def summarise(samples: list[dict]) -> dict:
    """What a run's tegrastats lines add up to."""
    if not samples:
        return {"samples": 0}
    ram = [s["ram_used_mb"] for s in samples if "ram_used_mb" in s]
    gpu = [s["gpu_percent"] for s in samples if "gpu_percent" in s]
    rails = sorted({k for s in samples for k in s["rails_mw"]})
    temps = sorted({k for s in samples for k in s["temps_c"]})
    return {
        "samples": len(samples),
        "ram_peak_mb": max(ram) if ram else None,
        "ram_total_mb": next((s["ram_total_mb"] for s in samples if "ram_total_mb" in s), None),
        "gpu_percent_mean": statistics.fmean(gpu) if gpu else None,
        "gpu_percent_max": max(gpu) if gpu else None,
        "power_mw_mean": {r: statistics.fmean(s["rails_mw"][r] for s in samples if r in s["rails_mw"]) for r in rails},
        "temperature_c_max": {t: max(s["temps_c"][t] for s in samples if t in s["temps_c"]) for t in temps},
    }


@dataclass
class TegraSampler:
    """tegrastats in the background; `stop()` returns the power mode and the summary."""

    interval_ms: int = 500
    samples: list = field(default_factory=list)
    _proc: subprocess.Popen | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, interval_ms: int = 500) -> TegraSampler | None:
        """A running sampler, or None where tegrastats is absent (not a Jetson)."""
        if shutil.which("tegrastats") is None:
            return None
        sampler = cls(interval_ms)
        try:
            sampler._proc = subprocess.Popen(["tegrastats", "--interval", str(interval_ms)], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return None
        sampler._thread = threading.Thread(target=sampler._read, daemon=True)
        sampler._thread.start()
        return sampler

    def _read(self) -> None:
        for line in self._proc.stdout:
            self.samples.append(parse_line(line))

    def stop(self) -> dict:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._thread.join(timeout=5)
        return {"power_mode": power_mode(), "interval_ms": self.interval_ms, "tegrastats": summarise(self.samples)}
