"""Inspect a subclassed PyTorch model as if it were a symbolic one.

Traces a small residual CNN, prints its summary with connectivity, draws it, cuts an
intermediate-feature sub-model, saves and reloads it, runs it on ONNX Runtime and
checks the numerics against PyTorch.

    python examples/inspect_torch_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import interop


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return torch.relu(x + self.drop(self.bn(self.conv(x))))


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(3)])
        self.head = nn.Linear(channels, classes)

    def forward(self, images):
        features = self.blocks(torch.relu(self.stem(images)))
        return self.head(features.mean(dim=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for the plot and model file"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = SmallResNet().eval()
    images = torch.randn(2, 3, 32, 32)

    graph = interop.trace(model, (images,))  # dynamic batch by default
    print(graph)
    graph.summary(depth=2)
    print("layer blocks.1:", graph.layer("blocks.1"))
    for suffix in ("svg", "png"):  # system Graphviz if installed, else the pip graphviz-pure
        print("plot:", graph.plot(args.out / f"small_resnet.{suffix}", depth=2))

    features = graph.submodel(outputs=["blocks.2"])  # intermediate activations as a new graph
    print("features:", features.run(images).shape)

    path = graph.save(args.out / "small_resnet.onnx")
    reloaded = interop.load(path)
    batch = torch.randn(8, 3, 32, 32)  # another batch size than the example's
    print("logits:", reloaded.run(batch).shape)
    report = interop.verify(model, reloaded, (batch,))
    print(report)
    if not report.ok:
        raise SystemExit("ONNX Runtime and PyTorch disagree")


if __name__ == "__main__":
    main()
