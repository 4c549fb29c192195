import json
import shutil

import pytest
from click.testing import CliRunner

from edgerun.cli_bench import bench, format_report
from edgerun.errors import EdgeRunError, OptionError
from edgerun.runtime import roofline
from edgerun.runtime.bench import BenchOptions, check_baseline, load_baseline, plot, run_bench, write_json

QUICK = {"runs": 3, "warmup": 1, "num_beams": 2, "new_tokens": 4, "threads": 1}
CAPTION_STAGES = {"preprocess", "vision", "cross_kv", "decoder_first", "decoder_per_token",
                  "kv_cache", "beam_bookkeeping", "postprocess"}


@pytest.fixture(scope="module", autouse=True)
def _small_peaks(tmp_path_factory):
    """Peaks of small matrices, cached in a temporary dir: the method is tested, not the numbers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGERUN_CACHE_DIR", str(tmp_path_factory.mktemp("bench-cache")))
        mp.setattr(roofline, "MATMUL_DIM", 256)
        mp.setattr(roofline, "GEMV_DIM", 512)
        mp.setattr(roofline, "REPEATS", 2)
        yield


@pytest.fixture(scope="module")
def report(blip_bundle):
    """The tiny BLIP benched against itself: one report for the checks below."""
    return run_bench(blip_bundle, BenchOptions(compare=str(blip_bundle), **QUICK))


def test_json_has_every_field(report, tmp_path, blip_bundle):
    data = json.loads(write_json(report, tmp_path / "bench.json").read_text())
    assert data["format"] == "edgerun-bench" and data["task"] == "caption"
    machine = {"cpu", "cores", "onnxruntime", "tensorrt", "gpu", "providers", "load_average"}
    assert machine <= set(data["machine"])
    peaks = data["peaks"]["cpu"]
    assert peaks["matmul_flops_per_s"] > 0 and peaks["gemv_bytes_per_s"] > 0
    main = data["runs"][0]
    assert main["role"] == "main" and main["backend"] == "cpu"
    assert set(main["stages"]) == CAPTION_STAGES
    for stats in [*main["stages"].values(), main["end_to_end"]]:
        assert set(stats) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms"}
    assert len(main["end_to_end"]["samples_ms"]) == QUICK["runs"]
    assert main["throughput"]["images_per_s"] > 0 and main["throughput"]["tokens_per_s"] > 0
    cold = main["cold_start"]
    assert {"process_start_s", "imports_s", "load_s", "first_result_s"} <= set(cold)
    assert cold["total_s"] == pytest.approx(sum(v for k, v in cold.items() if k != "total_s"))
    assert main["peak_rss_bytes"] > 10e6 and main["disk_bytes"] > 0
    assert main["provenance"]["source"].startswith("hf:") and main["decoder_calls"] == QUICK["new_tokens"]
    roof = main["roofline"]
    assert roof["vision"]["bound"] == "compute" and roof["vision"]["work"] > 0
    assert roof["decoder_per_token"]["bound"] == "memory" and 0 < roof["decoder_per_token"]["fraction"]
    assert len(main["outputs"]["captions"][0]["token_ids"]) == 1 + QUICK["new_tokens"]  # [DEC] + fixed length


def test_compare_with_itself_agrees_fully(report):
    (comp,) = report.comparisons
    assert comp.agreement == {"inputs": 1, "identical": 1, "fraction": 1.0}
    assert comp.ratios["disk"] == 1.0 and comp.ratios["end_to_end"] > 0
    text = format_report(report)
    assert "identical token ids for 1 of 1 input(s)" in text and "decoder per token" in text


def test_plot_is_a_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    path = plot(report, tmp_path / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[0] > 100


def test_baseline_flags_an_injected_slowdown(report, blip_bundle, tmp_path):
    saved = report.to_dict()
    saved["runs"][0]["stages"]["vision"]["p50_ms"] /= 20  # the baseline had a 20x faster vision encoder
    (tmp_path / "old.json").write_text(json.dumps(saved))
    args = [str(blip_bundle), "--baseline", str(tmp_path / "old.json"), "--json", str(tmp_path / "new.json")]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 1, result.output
    assert any("vision" in line and "REGRESSED" in line for line in result.output.splitlines())
    assert "cpu:vision" in json.loads((tmp_path / "new.json").read_text())["baseline"]["regressed"]
    # the same run against itself, with a generous tolerance: nothing regressed
    same = check_baseline(load_baseline(tmp_path / "new.json"), report.runs, BenchOptions(tolerance=100), "x")
    assert same.changes and not same.regressed


def test_compare_torch_runs_generate_in_its_own_process(blip_bundle):
    pytest.importorskip("transformers")
    got = run_bench(blip_bundle, BenchOptions(compare="torch", **{**QUICK, "runs": 2}))
    torch_run = got.runs[-1]
    assert torch_run.role == "torch"
    assert {"vision", "decoder_first", "decoder_per_token"} <= set(torch_run.stages)
    assert got.comparisons[0].agreement["fraction"] == 1.0  # the same token ids as generate()
    assert got.comparisons[0].ratios["end_to_end"] > 0


def test_vqa_and_retrieval(vqa_bundle, tmp_path_factory):
    from edgerun.export.pipeline import export
    from edgerun.models.tiny_retrieval import save_clip

    vqa = run_bench(vqa_bundle, BenchOptions(**{**QUICK, "runs": 2}))
    assert "question_encoder" in vqa.runs[0].stages and vqa.runs[0].throughput["tokens_per_s"] > 0
    root = tmp_path_factory.mktemp("bench-clip")
    clip = export(f"hf:{save_clip(root / 'ckpt')}", task="retrieval", output=root / "bundle").path
    got = run_bench(clip, BenchOptions(compare=str(clip), runs=2, warmup=0, batch=2))
    run = got.runs[0]
    assert {"preprocess", "tokenize", "postprocess"} <= set(run.stages) and set(run.throughput) == {
        "images_per_s", "texts_per_s"}
    assert all(r.bound == "compute" and r.work > 0 for r in run.roofline.values()) and run.roofline
    for key in ("image_embeds", "text_embeds"):
        assert got.comparisons[0].agreement[key]["cosine_min"] > 0.99999


@pytest.mark.parametrize("options, message", [
    ({"runs": 0}, "runs must be an integer >= 1, got 0"),
    ({"backend": "tpu"}, "unknown backend 'tpu'; valid: cpu, cuda, ort-trt, all"),
    ({"task": "ocr"}, "unknown task 'ocr'; valid: caption, vqa, retrieval"),
    ({"tolerance": -1}, "tolerance is a fraction >= 0"),
    ({"plot_path": "out.jpg"}, "give a .png path"),
    ({"compare": "no/such/bundle"}, "compare takes 'torch' or a second bundle directory"),
])
def test_bad_options_say_what_is_valid(options, message):
    with pytest.raises(EdgeRunError, match=message):
        BenchOptions(**options)


def test_bundle_mismatches_are_refused_before_timing(blip_bundle, tmp_path):
    with pytest.raises(OptionError, match="does not serve retrieval; it serves: caption"):
        run_bench(blip_bundle, BenchOptions(task="retrieval"))
    copy = shutil.copytree(blip_bundle, tmp_path / "copied")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["provenance"] = {"source": "builtin:tiny-captioner"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OptionError, match="--compare torch needs a bundle exported from a Hugging Face"):
        run_bench(copy, BenchOptions(compare="torch"))
    result = CliRunner().invoke(bench, [str(blip_bundle), "--runs", "0"])
    assert isinstance(result.exception, OptionError) and "runs must be" in str(result.exception)
    if not _installed("CUDAExecutionProvider"):
        with pytest.raises(OptionError, match="backend 'cuda' is not installed here; installed: cpu"):
            run_bench(blip_bundle, BenchOptions(backend="cuda"))


def _installed(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()
