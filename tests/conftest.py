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
