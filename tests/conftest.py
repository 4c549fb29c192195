import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test; still run in CI")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped where no GPU is present)")


def pytest_collection_modifyitems(config, items):
    try:
        import onnxruntime as ort

        has_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Keep bundle-verification caches out of the user's home."""
    monkeypatch.setenv("EDGERUN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "edgerun-cache"))


@pytest.fixture(scope="session")
def blip_checkpoint(tmp_path_factory):
    """A tiny random BLIP captioner with peaky logits and a bias towards [SEP], so beams finish early."""
    from edgerun.models.tiny import save_blip_caption

    return save_blip_caption(tmp_path_factory.mktemp("ckpt") / "tiny-blip", init_std=0.5, stop_bias=2.5, seed=3)


@pytest.fixture(scope="session")
def blip_bundle(blip_checkpoint, tmp_path_factory):
    """The tiny BLIP exported once per test session."""
    from edgerun.export.pipeline import export

    out = tmp_path_factory.mktemp("bundles") / "tiny-blip-caption"
    return export(f"hf:{blip_checkpoint}", task="caption", output=out).path


@pytest.fixture(scope="session")
def blip_torch(blip_checkpoint):
    import torch
    from transformers import BlipForConditionalGeneration

    torch.set_num_threads(1)
    return BlipForConditionalGeneration.from_pretrained(blip_checkpoint).eval()


@pytest.fixture(scope="session")
def vqa_checkpoint(tmp_path_factory):
    from edgerun.models.tiny import save_blip_vqa

    return save_blip_vqa(tmp_path_factory.mktemp("ckpt") / "tiny-blip-vqa", init_std=0.15, stop_bias=2.0, seed=4)


@pytest.fixture(scope="session")
def vqa_bundle(vqa_checkpoint, tmp_path_factory):
    from edgerun.export.pipeline import export

    return export(f"hf:{vqa_checkpoint}", task="vqa", output=tmp_path_factory.mktemp("bundles") / "vqa").path


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """zoo:effnet-lite0-minilm exported once: (exporter with its torch reference, report, loaded model)."""
    from edgerun.models import zoo

    model = zoo.get_model("effnet-lite0-minilm")
    missing = zoo.missing_packages(model)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: {zoo.INSTALL}")
    import torch

    import edgerun
    from edgerun.export.zoo import ZooRetrievalExporter, write_bundle

    torch.set_num_threads(2)
    exporter = ZooRetrievalExporter(model, zoo.ZeroShotOptions())
    report = write_bundle(exporter, tmp_path_factory.mktemp("zoo") / "effnet-lite0-minilm")
    return exporter, report, edgerun.load(report.path, threads=2)


@pytest.fixture(scope="session")
def multi_bundle(tmp_path_factory):
    """A tiny built-in bundle serving caption, vqa and retrieval from one image encoder."""
    import torch

    from edgerun.export.builtin import export_checkpoint
    from edgerun.models.families import build_model, build_tokenizer, preprocess_config, save_checkpoint
    from edgerun.models.families.toydata import quick_fit, toy_dataset

    torch.set_num_threads(1)
    data = toy_dataset(12, size=40, seed=2)
    tok = build_tokenizer(data.texts())
    torch.manual_seed(0)
    model = build_model("tiny-vit-all", vocab_size=tok.vocab_size, answers=data.answer_set())
    quick_fit(model, data.batch(tok, preprocess_config(model), data.answer_set()), steps=15)
    folder = tmp_path_factory.mktemp("multi")
    ckpt = save_checkpoint(model, folder / "best.pt", tokenizer=tok)
    return export_checkpoint(f"ckpt:{ckpt}", "all", folder / "bundle").path


@pytest.fixture(scope="session")
def blip_int8_bundle(blip_bundle, tmp_path_factory):
    """The tiny BLIP calibrated to INT8 (onnxruntime and TensorRT variants), once per session."""
    import cv2
    import numpy as np

    from edgerun.calibration.pipeline import CalibrationOptions, calibrate

    images = tmp_path_factory.mktemp("int8-images")
    rng = np.random.default_rng(1)
    for i in range(6):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    out = tmp_path_factory.mktemp("int8") / "blip-int8"
    calibrate(blip_bundle, str(images), out, CalibrationOptions(method="minmax", samples=4, eval_samples=2,
                                                                decoder_samples=2))
    return out
