"""The engine device guard's decisions and messages."""
import pytest

from edgerun.errors import BundleError
from edgerun.runtime.guard import DeviceInfo, EngineMismatchError, decide, engine_for, refusal

ENTRY = {"module": "vision", "onnx_module": "vision@tensorrt", "file": "engines/vision.int8.1234abcd.engine",
         "precision": "int8", "trt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
         "onnx_sha256": "a" * 64, "profiles": []}
ORIN = DeviceInfo("10.3.0.30", "Orin", "8.7")


def test_a_matching_engine_is_used():
    assert decide(ENTRY, ORIN, "a" * 64, rebuild=False).action == "use"


@pytest.mark.parametrize("device, sha, words", [
    (DeviceInfo("8.6.2", "Orin", "8.7"), "a" * 64, "built with TensorRT 10.3.0, this machine has 8.6.2"),
    (DeviceInfo("10.3.0", "NVIDIA H100", "9.0"), "a" * 64, "compute capability 8.7, this GPU has 9.0"),
    (DeviceInfo("10.3.0", "NVIDIA A10", "8.7"), "a" * 64, "built on Orin, this GPU is NVIDIA A10"),
    (ORIN, "b" * 64, "changed since"),
])
def test_mismatches_are_refused_with_the_reason_or_rebuilt_on_request(device, sha, words):
    refused = decide(ENTRY, device, sha, rebuild=False)
    assert refused.action == "refuse" and any(words in r for r in refused.reasons)
    assert decide(ENTRY, device, sha, rebuild=True).action == "rebuild"
    err = refusal(ENTRY, device, refused.reasons, "blip-int8")
    assert isinstance(err, EngineMismatchError)
    assert "built for TensorRT 10.3.0 on Orin (compute capability 8.7)" in str(err)
    assert f"this machine has {device.describe()}" in str(err) and "--rebuild" in str(err)


def test_versions_are_parsed_not_string_compared():
    entry = {**ENTRY, "trt_version": "10.10.0"}
    assert decide(entry, DeviceInfo("10.10.0.5", "Orin", "8.7"), None, False).action == "use"
    assert decide(entry, DeviceInfo("10.1.0", "Orin", "8.7"), None, False).action == "refuse"


def test_an_incomplete_entry_is_a_bundle_error():
    with pytest.raises(BundleError, match="lacks"):
        decide({"module": "vision", "file": "x.engine"}, ORIN, None, False)


def test_engine_for_takes_the_last_entry_of_a_module():
    entries = ({**ENTRY, "file": "old.engine"}, {**ENTRY, "module": "decoder"}, {**ENTRY, "file": "new.engine"})
    assert engine_for(entries, "vision")["file"] == "new.engine" and engine_for(entries, "cross_kv") is None
