"""`edge-run engine build` and `edge-run validate --target tensorrt` from the command line."""
import shutil

from click.testing import CliRunner

from edgerun.cli import cli, main


def test_engine_build_without_tensorrt_names_the_extra(blip_bundle, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    try:
        main(["engine", "build", str(blip_bundle), "--fp16", "--workspace", "1024", "--profiles", "past=16,64"])
    except SystemExit as exc:
        assert exc.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'edge-run[trt]'" in err and "Traceback" not in err


def test_engine_build_help_lists_the_options():
    out = CliRunner().invoke(cli, ["engine", "build", "--help"]).output
    for option in ("--fp16", "--int8", "--workspace", "--profiles", "--rebuild", "--calibration-from"):
        assert option in out


def test_engine_build_with_a_fake_tensorrt(blip_bundle, tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from trt_fakes import FakeCudart, fake_tensorrt

    from edgerun.runtime import trt as trt_module

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    monkeypatch.setattr(trt_module, "import_cudart", lambda: FakeCudart(b"Orin"))
    path = tmp_path / "b"
    shutil.copytree(blip_bundle, path)
    args = ["engine", "build", str(path), "--workspace", "256", "--timing-cache", str(tmp_path / "t")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "TensorRT 10.3.0 (tensors API) on Orin" in result.output and "built in" in result.output
    assert "up to date" in CliRunner().invoke(cli, args).output


def test_validate_target_tensorrt(blip_bundle, tmp_path):
    ok = CliRunner().invoke(cli, ["validate", str(blip_bundle), "--target", "tensorrt", "--trt-version", "10.3"])
    assert ok.exit_code == 0 and "TensorRT 10.3 (--trt-version): vision, cross_kv, decoder: OK" in ok.output
    bad = CliRunner().invoke(cli, ["validate", str(blip_bundle), "--target", "tensorrt", "--trt-version", "7.0"])
    assert bad.exit_code != 0 and "older than edge-run supports" in str(bad.exception)
