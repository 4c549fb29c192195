"""Would fine-tuning under INT8 fake quantization lift EfficientNet-Lite0's top-1 agreement? A
feasibility check, not a calibrate feature (it needs torch and CPU hours).

    python benchmarks/int8_zoo_finetune.py ZOO INT8 [--start int8|nearest] [--steps 200] [--lr 5e-6]

ZOO: the float zoo bundle (`edge-run export zoo:effnet-lite0-minilm --task retrieval`); INT8: its
calibrated twin. The classifier is EfficientNet-Lite0 in torch with its batch norms folded into the
convolutions, as the ONNX export folds them. Each quantized convolution reads its input through
fake quantization with INT8's own activation scale and zero point (uint8, per tensor, fixed) and
its weights through per-channel symmetric int8 (straight-through rounding): a simulation of the
cpu variant. `--start int8` takes INT8's weights (its rounded codes times their scales) and biases
(bias-corrected) and keeps its weight scales; `nearest` starts from the float weights.
The photos the installed packages ship are split in two: the student is trained on random crops of
one half to match the float model's logits (KL divergence at temperature 2), and evaluated on
1,200 crops of the other half (top-1 agreement and logits relative error against float).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from int8_zoo import photo_images, variant_files


def _key(node_name: str) -> str:
    """'/classifier/_blocks.3/_expand_conv/Conv' -> '_blocks.3._expand_conv' (the torch module)."""
    return node_name.replace("/classifier/", "").replace("/Conv", "").replace("/", ".")


def fold_batch_norms(net) -> None:
    import torch

    def fold(conv, bn):
        s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = torch.nn.Parameter(conv.weight.detach() * s.reshape(-1, 1, 1, 1))
        conv.bias = torch.nn.Parameter((bias - bn.running_mean) * s + bn.bias.detach())

    fold(net._conv_stem, net._bn0)
    net._bn0 = torch.nn.Identity()
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            fold(block._expand_conv, block._bn0)
            block._bn0 = torch.nn.Identity()
        fold(block._depthwise_conv, block._bn1)
        block._bn1 = torch.nn.Identity()
        fold(block._project_conv, block._bn2)
        block._bn2 = torch.nn.Identity()
    fold(net._conv_head, net._bn1)
    net._bn1 = torch.nn.Identity()


def int8_layers(path: Path) -> dict[str, dict]:
    """Per quantized convolution of the INT8 graph: activation scale / zero point, dequantized
    weights, weight scales and bias."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        act, weight = made.get(node.input[0]), made.get(node.input[1])
        if act is None or weight is None or act.op_type != "DequantizeLinear":
            continue
        scales = arrays[weight.input[1]].astype(np.float32).reshape(-1, 1, 1, 1)
        out[_key(node.name)] = {"act": (float(arrays[act.input[1]]), int(arrays[act.input[2]])),
                                "weight": arrays[weight.input[0]].astype(np.float32) * scales,
                                "scales": scales, "bias": arrays[node.input[2]].astype(np.float32)}
    return out


def student_of(net, layers: dict, start: str):
    import torch

    class Round(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.round(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    def fake_act(x, scale, zero):
        return (torch.clamp(Round.apply(x / scale) + zero, 0, 255) - zero) * scale

    def fake_weight(w, scales):
        if scales is None:
            scales = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127
        return torch.clamp(Round.apply(w / scales), -127, 127) * scales

    student = copy.deepcopy(net)
    for name, module in student.named_modules():
        layer = layers.get(name)
        if layer is None:
            continue
        scales = None
        if start == "int8":
            module.weight = torch.nn.Parameter(torch.from_numpy(layer["weight"]))
            module.bias = torch.nn.Parameter(torch.from_numpy(layer["bias"]))
            scales = torch.from_numpy(layer["scales"])
        scale, zero = layer["act"]

        def forward(x, m=module, scales=scales, scale=scale, zero=zero):
            x = m.static_padding(fake_act(x, scale, zero))  # zero padding quantizes to exactly zero
            return torch.nn.functional.conv2d(x, fake_weight(m.weight, scales), m.bias, m.stride, m.padding,
                                              m.dilation, m.groups)
        module.forward = forward
    return student


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("float_bundle", type=Path)
    ap.add_argument("int8_bundle", type=Path)
    ap.add_argument("--start", choices=("int8", "nearest"), default="int8")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)

    import torch

    import edgerun
    from edgerun.calibration.sources import view
    from edgerun.models.zoo import load_classifier

    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = load_classifier()
    fold_batch_norms(net)
    layers = int8_layers(variant_files(args.int8_bundle)["cpu"]["image_embed"])
    student = student_of(net, layers, args.start)
    model = edgerun.load(args.float_bundle, threads=2)
    photos = photo_images()
    train, held_out = photos[0::2], photos[1::2]

    def crops(images, rng, n):
        return torch.from_numpy(model.pixel_values([view(images[rng.integers(len(images))], rng) for _ in range(n)]))

    seeded = np.random.default_rng(7)
    evaluation = [crops(held_out, seeded, 50) for _ in range(24)]

    def agreement() -> str:
        same, errors = 0, []
        with torch.no_grad():
            for x in evaluation:
                want, got = net(x), student(x)
                same += int((want.argmax(1) == got.argmax(1)).sum())
                errors.append(float(((got - want) ** 2).sum() / (want ** 2).sum()))
        return (f"top-1 agreement {same / (len(evaluation) * 50):.4f}, "
                f"logits relative error {np.sqrt(np.mean(errors)):.4f}")

    print(f"{len(layers)} quantized convolutions, start {args.start}; {len(train)} photos to train on, "
          f"{len(held_out)} held out (1,200 crops)")
    print(f"before: {agreement()}", flush=True)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    rng, start = np.random.default_rng(11), time.perf_counter()
    for step in range(1, args.steps + 1):
        x = crops(train, rng, args.batch)
        with torch.no_grad():
            want = net(x)
        got = student(x)
        loss = torch.nn.functional.kl_div(torch.log_softmax(got / 2, 1), torch.softmax(want / 2, 1),
                                          reduction="batchmean") * 4
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}, {agreement()} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
