"""Small real PyTorch models used across the tests (random weights, no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.drop(self.bn2(self.conv2(y)))
        return torch.relu(x + y)


class ResNetish(nn.Module):
    """A subclassed CNN with residual blocks, BatchNorm and dropout."""

    def __init__(self, channels: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.ModuleList([ResidualBlock(channels) for _ in range(2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(torch.flatten(self.pool(x), 1))


class TextLSTM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, 3)

    def forward(self, tokens):
        seq, _ = self.lstm(self.embed(tokens))
        return self.out(seq[:, -1])


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        y, weights = self.attn(x, x, x)
        return self.norm(x + y), weights


class Encoder(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=32, batch_first=True, dropout=0.1
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


class TwoTower(nn.Module):
    """Two inputs, two outputs (a tuple)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
        self.tabular = nn.Linear(6, 8)
        self.fuse = nn.Linear(4 * 3 * 3 + 8, 4)

    def forward(self, image, meta):
        a = self.image(image)
        b = torch.tanh(self.tabular(meta))
        fused = self.fuse(torch.cat([a, b], dim=1))
        return fused, b


class DictHead(nn.Module):
    """Returns a dict: names become the graph's output names."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 16))
        self.cls = nn.Linear(16, 3)
        self.reg = nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.cls(h), "score": torch.sigmoid(self.reg(h)), "hidden": h}


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine weights."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return module


def cases():
    """(name, module, example inputs) for every model of the suite."""
    torch.manual_seed(0)
    return [
        ("resnetish", randomize_batchnorm(ResNetish()).eval(), (torch.randn(2, 3, 16, 16),)),
        ("encoder", Encoder().eval(), (torch.randn(2, 7, 16),)),
        ("lstm", TextLSTM().eval(), (torch.randint(0, 50, (2, 9)),)),
        ("attention", Attention().eval(), (torch.randn(2, 5, 16),)),
        ("two_tower", TwoTower().eval(), (torch.randn(2, 3, 8, 8), torch.randn(2, 6))),
        ("dict_head", DictHead().eval(), (torch.randn(2, 10),)),
    ]
