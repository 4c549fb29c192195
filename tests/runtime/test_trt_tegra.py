"""tegrastats and nvpmodel parsing for bench's JSON (lines written in their documented format)."""
from edgerun.runtime import tegra

LINE = ("RAM 2893/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,off,3%@729] GR3D_FREQ 37% "
        "cpu@46.5C gpu@45.1C VDD_IN 4524mW/4400mW VDD_CPU_GPU_CV 483mW/480mW VDD_SOC 1410mW/1400mW")


def test_a_tegrastats_line():
    s = tegra.parse_line(LINE)
    assert (s["ram_used_mb"], s["ram_total_mb"], s["gpu_percent"]) == (2893, 7620, 37)
    assert s["rails_mw"] == {"VDD_IN": 4524, "VDD_CPU_GPU_CV": 483, "VDD_SOC": 1410}
    assert s["temps_c"] == {"cpu": 46.5, "gpu": 45.1}


def test_summary_of_several_lines():
    lines = [LINE, LINE.replace("GR3D_FREQ 37%", "GR3D_FREQ 99%").replace("RAM 2893", "RAM 3001")]
    out = tegra.summarise([tegra.parse_line(x) for x in lines])
    assert out["samples"] == 2 and out["ram_peak_mb"] == 3001 and out["gpu_percent_max"] == 99
    assert out["gpu_percent_mean"] == 68 and out["power_mw_mean"]["VDD_IN"] == 4524
    assert tegra.summarise([]) == {"samples": 0}


def test_power_mode():
    assert tegra.parse_power_mode("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert tegra.parse_power_mode("NV Power Mode: 15W\n2") == {"name": "15W", "id": 2}
    assert tegra.parse_power_mode("nvpmodel: command not found") is None


def test_absent_off_a_jetson(monkeypatch):
    monkeypatch.setattr(tegra.shutil, "which", lambda name: None)
    assert tegra.TegraSampler.start() is None and tegra.power_mode() is None
