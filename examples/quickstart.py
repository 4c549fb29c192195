"""Export a BLIP captioner and caption real photos with the torch-free runtime.

    python examples/quickstart.py                       # offline: a tiny random-weight BLIP
    python examples/quickstart.py --source hf:Salesforce/blip-image-captioning-base   # with network

Offline there are no real BLIP weights to be had, so the default builds a tiny random-weight BLIP
checkpoint from its config: the export, the checks and the runtime are the real ones, the captions
are noise. The photos are scikit-image's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="hf:NAME_OR_DIR of a BLIP captioning checkpoint")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgerun-quickstart")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.source
    if source is None:
        from edgerun.models.tiny import save_blip_caption

        source = f"hf:{save_blip_caption(args.workdir / 'tiny-blip', stop_bias=2.0)}"
    import cv2
    from skimage import data

    images = []
    for name in ("astronaut", "chelsea", "coffee"):
        path = args.workdir / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR))
        images.append(str(path))
    bundle = args.workdir / "bundle"
    cli = [sys.executable, "-m", "edgerun.cli"]
    subprocess.run([*cli, "export", source, "--task", "caption", "-o", str(bundle), "--overwrite"], check=True)
    subprocess.run([*cli, "info", str(bundle)], check=True)
    subprocess.run([*cli, "caption", str(bundle), *images, "--num-beams", "3", "--max-new-tokens", "12",
                    "--json"], check=True)


if __name__ == "__main__":
    main()
