"""Extract intermediate features of a traced model with `Graph.submodel`.

Like ``keras.Model(inputs, layer.output)`` for a subclassed PyTorch model: pick layers
by path, get a new graph that computes only what they need, and run it.

    python examples/extract_features.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import interop


class Encoder(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())
            for c_in, c_out in [(3, width), (width, 2 * width), (2 * width, 4 * width)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, 5)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(self.pool(x).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the .onnx file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = Encoder().eval()
    images = torch.randn(2, 3, 32, 32)
    graph = interop.trace(model, (images,))
    graph.summary(depth=2)

    # one output per requested layer, named after its path: a feature pyramid
    pyramid = graph.submodel(outputs=["stages.0", "stages.1", "stages.2"])
    print(pyramid)
    features = pyramid.run(images, as_dict=True)
    for name, array in features.items():
        print(f"{name}: {array.shape}")

    # check against the activations PyTorch computes, captured with forward hooks
    captured = {}
    for index, stage in enumerate(model.stages):
        stage.register_forward_hook(
            lambda _m, _i, out, key=f"stages.{index}": captured.update({key: out})
        )
    with torch.no_grad():
        model(images)
    for name, array in features.items():
        error = float(np.abs(array - captured[name].numpy()).max())
        print(f"{name}: max |onnxruntime - torch| = {error:.2e}")
        if error > 1e-4:
            raise SystemExit(f"{name} disagrees with PyTorch")

    print("saved:", pyramid.save(args.out / "encoder_features.onnx"))


if __name__ == "__main__":
    main()
