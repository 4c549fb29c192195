import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edgerun.calibration.pipeline import AccuracyDropError
from edgerun.cli_calibrate import calibrate
from edgerun.errors import InputError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    for i in range(8):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return folder


def _run(*args):
    return CliRunner().invoke(calibrate, [str(a) for a in args])


def test_calibrate_writes_a_bundle_and_prints_the_table(blip_bundle, images, tmp_path):
    result = _run(blip_bundle, "--data", images, "-o", tmp_path / "out", "--method", "minmax", "--samples", 4,
                  "--eval-samples", 4, "--decoder-samples", 2, "--keep-float", "*fc1*")
    assert result.exit_code == 0, result.output
    assert "exact_caption_agreement" in result.stdout and "logits_cosine" in result.stdout
    assert "minmax, 4 samples" in result.stdout
    assert "statistics: 4/4 images" in result.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_max_drop_exceeded_fails_without_a_bundle(blip_bundle, images, tmp_path):
    result = _run(blip_bundle, "--data", images, "-o", tmp_path / "out", "--samples", 4, "--eval-samples", 4,
                  "--decoder-samples", 0, "--max-drop", 0)
    assert result.exit_code != 0
    assert isinstance(result.exception, AccuracyDropError)
    assert not (tmp_path / "out").exists()


def test_no_readable_images(blip_bundle, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    result = _run(blip_bundle, "--data", tmp_path, "-o", tmp_path / "out")
    assert isinstance(result.exception, InputError)
    assert "no readable images" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_usage_mistakes(blip_bundle, images, tmp_path):
    result = _run(blip_bundle, "--data", images, "-o", tmp_path / "out", "--method", "kl")
    assert result.exit_code == 2 and "entropy" in result.output
    result = _run(blip_bundle, "--data", images, "-o", tmp_path / "out", "--auto")
    assert "auto requires max_drop" in str(result.exception)


def test_gate_names_the_metrics_max_drop_judges(blip_bundle, images, tmp_path):
    common = [blip_bundle, "--data", images, "--samples", 4, "--eval-samples", 4, "--decoder-samples", 0,
              "--max-drop", 0]
    result = _run(*common, "-o", tmp_path / "out", "--gate", "logits_cos*")  # the logits are never identical
    assert isinstance(result.exception, AccuracyDropError) and "logits_cosine" in str(result.exception)
    assert "exact_caption_agreement" not in str(result.exception)
    result = _run(*common, "-o", tmp_path / "out", "--gate", "recall@5")
    assert "names no metric of this bundle" in str(result.exception) and "logits_cosine" in str(result.exception)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,scheme", [([], "blockwise"), (["--int8-head"], "blockwise"),
                                         (["--int8-head", "--decoder-int8", "dynamic"], "dynamic")])
def test_int8_head_quantizes_the_tied_lm_head_of_the_cpu_variant(blip_bundle, images, tmp_path, flag, scheme):
    import json

    import onnx

    import edgerun
    from edgerun.export.simplify import tied_head_weight

    out = tmp_path / "int8-head"
    result = CliRunner().invoke(calibrate, [str(blip_bundle), "--data", str(images), "-o", str(out),
                                            "--samples", "4", "--eval-samples", "2", *flag])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    head_flag = "--int8-head" in flag
    assert manifest["quantization"]["int8_head"] is head_flag
    assert manifest["quantization"]["decoder_int8"] == scheme
    entry = manifest["modules"]["decoder"]
    assert entry["extra"].get("requires") == ({"onnxruntime": "1.23"} if scheme == "blockwise" else None)
    cpu = onnx.load(str(out / entry["file"]), load_external_data=False).graph
    source = onnx.load(str(blip_bundle / "decoder.onnx"), load_external_data=False).graph
    assert tied_head_weight(source) == 1  # the exported head reads the table through a Reshape
    gathered = {n.input[0] for n in source.node if n.op_type == "Gather"}
    head = next(n.input[1] for n in source.node if n.op_type == "Gemm" and n.input[1] in gathered)  # tied table
    tables = {i.name: i.data_type for i in cpu.initializer}
    assert (head in tables) is not head_flag  # float, or gone in favour of one int8 copy
    table, dtype, gather, matmul = ((f"{head}_q8", onnx.TensorProto.UINT8, "GatherBlockQuantized", "MatMulNBits")
                                    if scheme == "blockwise" else
                                    (f"{head}_quantized", onnx.TensorProto.INT8, "Gather", "MatMulInteger"))
    assert (tables.get(table) == dtype) is head_flag
    readers = {n.op_type for n in cpu.node if table in n.input}
    assert readers == ({gather, matmul} if head_flag else set())  # the head and the embedding: one table
    assert any(n.op_type == matmul for n in cpu.node)  # the other layers, whatever the head does
    caption = edgerun.load(out).caption(np.full((32, 32, 3), 90, np.uint8), num_beams=2, max_new_tokens=4)
    assert len(caption.token_ids) >= 2


def test_auto_prints_its_search(blip_bundle, images, tmp_path):
    """A --max-drop that the all-INT8 bundle meets: one probe, nothing kept float by --auto."""
    result = _run(blip_bundle, "--data", images, "-o", tmp_path / "out", "--samples", 4, "--eval-samples", 4,
                  "--decoder-samples", 2, "--auto", "--max-drop", 1.0)
    assert result.exit_code == 0, result.output
    assert "auto: 0 of " in result.stdout and "kept float after 1 probes (0)" in result.stdout


def test_variants_cpu_writes_no_tensorrt_files(blip_bundle, images, tmp_path):
    import json

    result = _run(blip_bundle, "--data", images, "-o", tmp_path / "cpu", "--samples", 4, "--eval-samples", 2,
                  "--variants", "cpu")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cpu" / "manifest.json").read_text())
    assert manifest["quantization"]["variants"] == ["cpu"]
    # the decoder's CPU graph runs GroupQueryAttention; onnxruntime's CUDA provider gets the standard one
    # (and one image with 3 beams gets them as its cross-attention heads: edgerun.export.beam_heads)
    assert [m for m in manifest["modules"] if "@" in m] == ["decoder@cuda", "decoder@cpu-beams3"]
    assert not [f for f in manifest["files"] if "tensorrt" in f or f.endswith(".cache")]
    assert {m["precision"] for m in manifest["modules"].values()} == {"int8"}
    bad = _run(blip_bundle, "--data", images, "-o", tmp_path / "trt", "--variants", "tensorrt")
    assert bad.exit_code != 0 and "variants must include cpu" in str(bad.exception)
    assert not (tmp_path / "trt").exists()


def test_a_hard_linked_bundle_copy_is_refused_with_the_fix(blip_bundle, images, tmp_path):
    import os
    import shutil

    from edgerun.errors import BundleError

    own = shutil.copytree(blip_bundle, tmp_path / "own")  # links to the shared fixture would break other tests
    copy = tmp_path / "linked"
    copy.mkdir()
    for f in own.iterdir():
        if f.is_file():
            os.link(f, copy / f.name)  # what `cp -al` makes: onnx will not read weights through such files
    result = _run(copy, "--data", images, "-o", tmp_path / "out", "--samples", 2, "--eval-samples", 2,
                  "--decoder-samples", 0)
    assert result.exit_code != 0 and isinstance(result.exception, BundleError), result.output
    assert "several hard links" in str(result.exception) and "cp -r" in str(result.exception)
    assert not (tmp_path / "out").exists()
