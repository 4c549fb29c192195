"""edge-run demo, in a reduced setting: its steps run on the cached bundle, and a failing step names itself."""
import shutil

import pytest

from edgerun import demo as demo_mod
from edgerun.errors import EdgeRunError


def test_demo_steps_run_on_the_cached_bundle(tmp_path, monkeypatch, zoo_export):
    pytest.importorskip("easy_vqa", reason="pip install 'edge-run[train]'")
    _, report, _ = zoo_export
    shutil.copytree(report.path, tmp_path / "zoo-effnet-lite0-minilm")
    from edgerun.export import pipeline

    real_export, exported = pipeline.export, []

    def export(source, **kw):
        exported.append(source.split(":")[0])
        return real_export(source, **kw)

    monkeypatch.setattr(pipeline, "export", export)
    monkeypatch.setattr(demo_mod, "QUERIES", ("a cat", "a cup of coffee"))
    monkeypatch.setattr(demo_mod, "EASYVQA_LIMIT", 40)  # a reduced setting: 40 images per split,
    monkeypatch.setattr(demo_mod, "EASYVQA_EPOCHS", 1)  # one epoch, a short test slice
    monkeypatch.setattr(demo_mod, "TEST_SLICE", 30)
    lines = []
    demo_mod.run_demo(root=tmp_path, say=lines.append)
    text = "\n".join(lines)
    assert exported == ["ckpt"] and "cached:" in text  # the zoo bundle came from the cache; easy-vqa was built
    assert "VQA accuracy on 30 test questions" in text and "  Q: " in text
    assert "answer from the encoding" in text
    assert "chelsea" in text.split("'a cat'")[1].splitlines()[0]  # the cat photo is the top hit
    assert "coffee" in text.split("'a cup of coffee'")[1].splitlines()[0].split(",")[0]
    assert "median ms" in text and "demo finished" in text


def test_rebuild_exports_again(tmp_path, monkeypatch):
    (tmp_path / "zoo-effnet-lite0-minilm").mkdir()
    (tmp_path / "zoo-effnet-lite0-minilm" / "manifest.json").write_text("{}")
    exported = []

    def export(source, output, **kw):
        exported.append(source)
        raise EdgeRunError("stop here")

    monkeypatch.setattr("edgerun.export.pipeline.export", export)
    with pytest.raises(EdgeRunError, match="stop here"):
        demo_mod.run_demo(root=tmp_path, rebuild=True, say=lambda s: None)
    assert exported == ["zoo:effnet-lite0-minilm"]


def test_a_failing_step_says_which_and_why(tmp_path, monkeypatch):
    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(demo_mod.Demo, "zoo_bundle", broken)
    with pytest.raises(EdgeRunError, match=r"demo step 1 \(zoo retrieval bundle\) failed: OSError: disk full"):
        demo_mod.run_demo(root=tmp_path, say=lambda s: None)
