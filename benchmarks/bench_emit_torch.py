"""Emitted torch module vs the original: forward time (eager, CPU) and emission time.

    python benchmarks/bench_emit_torch.py

Prints a markdown table: per model and batch size, the original's and the emitted
module's median forward time and their ratio; then the time to emit a ResNet50-sized
graph (a hand-built ResNet50: torchvision is not a dependency).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import interop
from interop.emit import to_torch


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


def median_time(function, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            function(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    models = {
        "mlp": (MLP().eval(), lambda b: torch.randn(b, 256), 200),
        "transformer_encoder": (
            nn.TransformerEncoderLayer(256, 8, 1024, batch_first=True).eval(),
            lambda b: torch.randn(b, 64, 256),
            30,
        ),
        "resnet50 (112x112)": (ResNet50().eval(), lambda b: torch.randn(b, 3, 112, 112), 5),
    }
    print("| model | batch | original ms | emitted ms | ratio |")
    print("|---|---|---|---|---|")
    graphs = {}
    for name, (model, make_input, repeats) in models.items():
        graph = interop.trace(model, (make_input(2),))
        graphs[name] = graph
        emitted = to_torch(graph).eval()
        for batch in (1, 32):
            x = make_input(batch)
            original_time = median_time(model, x, repeats)
            emitted_time = median_time(emitted, x, repeats)
            print(
                f"| {name} | {batch} | {original_time * 1e3:.2f} | {emitted_time * 1e3:.2f} | {emitted_time / original_time:.2f} |"
            )
    graph = graphs["resnet50 (112x112)"]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        to_torch(graph)
        times.append(time.perf_counter() - start)
    nodes = len(list(graph.model.graph))
    print(
        f"\nEmission of ResNet50 ({nodes} nodes, {graph.count_params() / 1e6:.1f}M parameters): "
        f"median {statistics.median(times):.2f} s over 3 runs"
    )


if __name__ == "__main__":
    main()
