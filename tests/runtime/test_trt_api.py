"""Which TensorRT API the code calls, by version (fake `tensorrt` modules with each version's names)."""
import pytest
from trt_fakes import fake_tensorrt

from edgerun.errors import OptionError
from edgerun.runtime.trtapi import BindingsApi, StrongApi, TensorApi, api, api_for_version, parse_version


@pytest.mark.parametrize("version, cls", [("8.5.2.2", BindingsApi), ("8.6.1", BindingsApi), ("10.0.1", TensorApi),
                                          ("10.3.0.30", TensorApi), ("10.13.0", TensorApi), ("11.0.0", StrongApi)])
def test_api_by_version(version, cls):
    chosen = api(fake_tensorrt(version))
    assert type(chosen) is cls
    assert chosen.precision_flags == (cls is not StrongApi) and chosen.calibrators == (cls is not StrongApi)


def test_old_and_bad_versions_are_refused():
    with pytest.raises(OptionError, match="older than edge-run supports"):
        api_for_version("8.4.3")
    with pytest.raises(OptionError, match="not a TensorRT version"):
        parse_version("ten")
    assert parse_version("10.10.0") > parse_version("10.9.0")  # '10.10' < '10.9' as strings


class _Config:
    def __init__(self):
        self.flags = []

    def set_flag(self, flag):
        self.flags.append(flag.name)


@pytest.mark.parametrize("version, network_flags, precision", [
    ("8.6.1", 1 << 0, ["FP16", "INT8"]),  # EXPLICIT_BATCH
    ("10.3.0", 0, ["FP16", "INT8"]),
    ("11.0.0", 1 << 5, []),  # STRONGLY_TYPED, no precision flags
])
def test_network_and_precision_flags(version, network_flags, precision):
    trt = fake_tensorrt(version)
    chosen = api(trt)
    chosen.create_network(trt.Builder(None))
    assert trt.calls[-1] == ("create_network", network_flags)
    config = _Config()
    chosen.set_precision(config, fp16=True, int8=True)
    assert config.flags == precision
