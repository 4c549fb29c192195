"""The opt-in process-wide thread pool (each case in a fresh interpreter: the pool is per process)."""
import subprocess
import sys

SCRIPT = r"""
import sys, numpy as np, edgerun
from edgerun.runtime import onnxrt
model = edgerun.load(sys.argv[1], threads=2)
a = model.caption(np.full((40, 50, 3), 120, np.uint8), num_beams=2, max_new_tokens=5)
print("shared", onnxrt._shared_pool_threads)
# a session made afterwards for another purpose (calibration, roofline) must still load
import onnxruntime as ort
ort.InferenceSession(str(model.bundle.file(model.bundle.module("cross_kv").file)),
                     onnxrt.session_options(1), providers=["CPUExecutionProvider"])
print("tokens", a.token_ids)
"""


def _run(bundle, env_value):
    import os

    env = dict(os.environ, EDGERUN_ORT_SHARED_POOL=env_value)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle)], check=False, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def test_shared_pool_is_opt_in_and_gives_the_same_tokens(blip_bundle):
    off, on = _run(blip_bundle, "0"), _run(blip_bundle, "1")
    assert off["shared"] == "None"
    assert on["shared"] == "2"
    assert on["tokens"] == off["tokens"]
