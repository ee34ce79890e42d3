"""Emitted torch module vs the original (and onnx2torch): forward time and emission time.

    python benchmarks/bench_emit_torch.py [--threads N] [--no-write]

Per model and batch size the original module, the emitted module and, when onnx2torch is
installed, onnx2torch's module of the same ONNX file run interleaved in one process (one
forward of each per round, so load from other processes hits all alike); the table gives
median forward times, the median per-round ratio and its 25-75% range. Then the time to
emit a ResNet50-sized graph (a hand-built ResNet50: torchvision is not a dependency).
Writes the table to docs/performance.md (section "emit-torch").
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

import interop
from interop.emit import to_torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's resnet50 layout: 3-4-6-3 bottlenecks, 25.6M parameters."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, stages = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * 4
            layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10)
        )

    def forward(self, x):
        return self.net(x)


def load_onnx2torch():
    """onnx2torch's convert, or None. It imports torchvision for its NMS / RoiAlign converters
    only; the CPU torch here has no matching torchvision wheel, so when torchvision is missing
    those two names come from a module that raises when called (the benchmarked models use neither op)."""
    if importlib.util.find_spec("onnx2torch") is None:
        return None
    vision = None
    if importlib.util.find_spec("torchvision") is None:
        vision = types.ModuleType("torchvision")
        vision.ops = types.ModuleType("torchvision.ops")

        def unavailable(*args, **kwargs):
            raise NotImplementedError("torchvision is not installed")

        vision.ops.nms = vision.ops.roi_align = unavailable
        sys.modules.setdefault("torchvision", vision)
        sys.modules.setdefault("torchvision.ops", vision.ops)
    from onnx2torch import convert

    for name in ("torchvision.ops", "torchvision") if vision is not None else ():
        if sys.modules.get(name) in (vision.ops, vision):  # torch.onnx probes for it too
            del sys.modules[name]
    return convert


def onnx2torch_module(convert, graph):
    """onnx2torch's module of the graph's ONNX file, or the reason it has none.

    onnx2torch 1.5 converts opsets up to 17 or so while torch's exporter writes opset 18+:
    the file is first taken down to opset 17 with onnx's version converter when possible."""
    import onnx.version_converter

    proto = graph.to_proto()
    try:
        return convert(proto).eval(), ""
    except Exception as first:  # noqa: BLE001  (reported in the table)
        try:
            return convert(onnx.version_converter.convert_version(proto, 17)).eval(), ""
        except Exception:  # noqa: BLE001
            return None, f"fails: {str(first)[:90]}"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def interleaved(modules: list, x: torch.Tensor, rounds: int) -> list[list[float]]:
    """Seconds per forward of each module, one forward of each per round."""
    times: list[list[float]] = [[] for _ in modules]
    with torch.no_grad():
        for module in modules:
            for _ in range(3):
                module(x)
        for _ in range(rounds):
            for module, row in zip(modules, times):
                start = time.perf_counter()
                module(x)
                row.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the round counts")
    parser.add_argument("--no-write", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    convert = load_onnx2torch()
    models = {
        "mlp": (MLP().eval(), lambda b: torch.randn(b, 256), {1: 400, 32: 300}),
        "transformer_encoder": (
            nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True).eval(),
            lambda b: torch.randn(b, 64, 256),
            {1: 100, 32: 20},
        ),
        "resnet50 (112x112)": (
            ResNet50().eval(),
            lambda b: torch.randn(b, 3, 112, 112),
            {1: 15, 32: 5},
        ),
    }
    headers = ["model", "batch", "original ms", "emitted ms", "emitted / original (IQR)"]
    headers += ["onnx2torch ms", "emitted / onnx2torch (IQR)"]
    rows, graphs = [], {}
    for name, (model, make_input, rounds) in models.items():
        graph = interop.trace(model, (make_input(2),))
        graphs[name] = graph
        emitted = to_torch(graph).eval()
        competitor, note = None, "not installed"
        if convert is not None:
            competitor, note = onnx2torch_module(convert, graph)
        for batch in (1, 32):
            x = make_input(batch)
            modules = [model, emitted] + ([competitor] if competitor is not None else [])
            try:
                times = interleaved(modules, x, max(3, int(rounds[batch] * options.scale)))
            except Exception as error:  # noqa: BLE001  (onnx2torch on a dynamic-shape graph)
                modules = modules[:2]
                note = f"fails at run: {type(error).__name__}"
                times = interleaved(modules, x, max(3, int(rounds[batch] * options.scale)))
            ratio = quartiles([e / o for o, e in zip(times[0], times[1])])
            row = [name, str(batch), f"{statistics.median(times[0]) * 1e3:.2f}"]
            row += [f"{statistics.median(times[1]) * 1e3:.2f}", _ratio(ratio)]
            if len(times) > 2:
                versus = quartiles([e / c for e, c in zip(times[1], times[2])])
                row += [f"{statistics.median(times[2]) * 1e3:.2f}", _ratio(versus)]
            else:
                row += [note, "-"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    graph = graphs["resnet50 (112x112)"]
    emission = []
    for _ in range(3):
        start = time.perf_counter()
        to_torch(graph)
        emission.append(time.perf_counter() - start)
    nodes = len(list(graph.model.graph))
    summary = (
        f"Emission of ResNet50 ({nodes} nodes, {graph.count_params() / 1e6:.1f}M parameters): "
        f"median {statistics.median(emission):.2f} s over 3 runs (target < 2 s)."
    )
    markdown = "\n".join(
        [
            "### Emitted torch module vs original and onnx2torch (benchmarks/bench_emit_torch.py)",
            "",
            f"CPU eager, torch {torch.__version__}, {options.threads} thread(s) for every module, "
            f"{report.machine()}; interleaved rounds, medians; ratios are medians of per-round "
            "ratios with their 25-75% range. Targets: emitted/original <= 1.10, "
            "emitted/onnx2torch <= 1.",
            "",
            report.table(headers, rows),
            "",
            summary,
        ]
    )
    print(markdown)
    if not options.no_write:
        report.write_section("emit-torch", markdown)


def _ratio(quartile: tuple[float, float, float]) -> str:
    low, mid, high = quartile
    return f"{mid:.2f} ({low:.2f}-{high:.2f})"


if __name__ == "__main__":
    main()
