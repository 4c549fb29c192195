import json
import shutil
import subprocess
import sys

import pytest


def run(*args, env_dir=None):
    return subprocess.run([sys.executable, "-m", "edgerun.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import cv2
    from skimage import data

    path = tmp_path_factory.mktemp("cli") / "coffee.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))
    return path


def test_caption_prints_one_line_per_image(blip_bundle, image):
    out = run("caption", blip_bundle, image, image, "--num-beams", "2", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{image}: ")


def test_caption_json_lines(blip_bundle, image):
    import edgerun

    out = run("caption", blip_bundle, image, "--num-beams", "3", "--max-new-tokens", "6", "--json",
              "--early-stopping", "never", "--length-penalty", "0.5")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    want = edgerun.load(blip_bundle).caption(image, num_beams=3, max_new_tokens=6, early_stopping="never",
                                             length_penalty=0.5)
    assert rec["token_ids"] == want.token_ids and rec["text"] == want.text
    assert rec["score"] == pytest.approx(want.score)
    assert rec["timings_ms"]["total"] > 0 and rec["timings_ms"]["vision"] > 0


def test_info_and_validate(blip_bundle):
    out = run("info", blip_bundle)
    assert out.returncode == 0, out.stderr
    assert "caption: vision -> cross_kv -> decoder" in out.stdout
    assert "past_key: float32[past, 2, rows, 4, 8]" in out.stdout
    import onnxruntime

    assert f"providers {', '.join(onnxruntime.get_available_providers())}" in out.stdout
    out = run("validate", blip_bundle)
    assert out.returncode == 0 and "OK" in out.stdout


def test_validate_reports_a_corrupted_file(blip_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(blip_bundle, copy)
    with open(copy / "vision.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    out = run("validate", copy)
    assert out.returncode == 1
    assert "vision.onnx" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, match", [
    (["caption", "{bundle}", "{missing}"], "nope.jpg"),
    (["caption", "{bundle}", "{image}", "--num-beams", "0"], "num_beams must be >= 1, got 0"),
    (["caption", "{bundle}", "{image}", "--max-new-tokens", "-1"], "max_new_tokens must be >= 1, got -1"),
    (["caption", "{missing}", "{image}"], "nope.jpg"),
    (["export", "hf:{missing}", "--task", "caption", "-o", "{out}"], "could not fetch"),
    (["export", "hf:{bundle}", "--task", "nope", "-o", "{out}"], "unknown task 'nope'"),
])
def test_user_mistakes_are_one_line_on_stderr(blip_bundle, image, tmp_path, args, match):
    fill = {"bundle": blip_bundle, "image": image, "missing": tmp_path / "nope.jpg", "out": tmp_path / "o"}
    out = run(*[a.format(**fill) for a in args])
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], out.stderr


def test_export_cli_writes_a_bundle(blip_checkpoint, tmp_path):
    out = run("export", f"hf:{blip_checkpoint}", "--task", "caption", "-o", tmp_path / "b")
    assert out.returncode == 0, out.stderr
    assert "decoder" in out.stdout and "max abs diff" in out.stdout
    assert (tmp_path / "b" / "manifest.json").is_file()
    assert "checking every graph against torch" in out.stderr  # progress goes to stderr


def test_the_command_runs_its_sessions_on_one_shared_pool_unless_told_not_to(monkeypatch):
    import os

    from edgerun import cli

    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.delenv("EDGERUN_ORT_SHARED_POOL", raising=False)
    cli.entry()
    assert os.environ["EDGERUN_ORT_SHARED_POOL"] == "1"  # the command owns its process
    monkeypatch.setenv("EDGERUN_ORT_SHARED_POOL", "0")
    cli.entry()
    assert os.environ["EDGERUN_ORT_SHARED_POOL"] == "0"  # the user's choice stands


def test_the_command_entry_point_is_the_pool_sharing_one():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "edge-run"]
    assert script.value == "edgerun.cli:entry"
