"""Model families for the structured-sparse tests and benchmark, built in PyTorch and exported to ONNX.

Each family knows its own channel groups in PyTorch terms (`zero_groups`): which layers produce a group's
channels, which normalizations carry them, and which layers consume them (with column offsets where a Concat
or statistics pooling moves them). The tests zero a fraction of every listed group through these lists, an
account of the architecture written independently of the ONNX analysis they check.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn


@dataclass
class Slot:
    """A layer and the offset of the group's channels in the axis it touches (columns shift after a Concat)."""

    module: nn.Module
    offset: int = 0
    repeat: tuple[int, ...] = (0,)  # the same channel again at these offsets (stats pooling: mean, std parts)
    weight: str = "weight"
    bias: str = "bias"

    def indices(self, channels: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.concatenate([channels + self.offset + extra for extra in self.repeat]))


@dataclass
class ChannelGroup:
    size: int
    producers: list[Slot]
    norms: list[Slot] = field(default_factory=list)
    consumers: list[Slot] = field(default_factory=list)

    @torch.no_grad()
    def zero(self, channels: np.ndarray) -> None:
        for slot in self.producers + self.norms:
            getattr(slot.module, slot.weight)[slot.indices(channels)] = 0
            if getattr(slot.module, slot.bias) is not None:
                getattr(slot.module, slot.bias)[slot.indices(channels)] = 0
        for slot in self.consumers:
            getattr(slot.module, slot.weight)[:, slot.indices(channels)] = 0


def zero_fraction(groups: list[ChannelGroup], fraction: float, seed: int) -> int:
    """Zero round(fraction * size) channels of every group (at least one); returns how many in total."""
    rng = np.random.default_rng(seed)
    total = 0
    for group in groups:
        count = max(1, round(fraction * group.size))
        group.zero(np.sort(rng.choice(group.size, size=count, replace=False)))
        total += count
    return total


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Trained-looking BatchNorm statistics, so folding and slicing them is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


# --- ResNet-18-like ---------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.down = None
        if stride != 1 or cin != cout:
            self.down, self.down_bn = _conv_bn(cin, cout, 1, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down_bn(self.down(x))))


class ResNetLike(nn.Module):
    """ResNet-18 layout: stem, four stages of `blocks` BasicBlocks, global pooling, a linear classifier."""

    def __init__(self, widths=(8, 16, 16, 32), blocks=(2, 2, 2, 2), classes: int = 10, imagenet_stem: bool = False):
        super().__init__()
        self.stem, self.stem_bn = _conv_bn(3, widths[0], 7 if imagenet_stem else 3, 2 if imagenet_stem else 1)
        self.pool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        stages, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else width, width, 2 if i and not j else 1)
                                          for j in range(count)]))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem_bn(self.stem(x))))
        return self.fc(self.stages(x).mean((2, 3)))

    def zero_groups(self) -> list[ChannelGroup]:
        groups = []
        stage_input = ChannelGroup(self.stem.out_channels, [Slot(self.stem)], [Slot(self.stem_bn)])
        for stage in self.stages:
            first = stage[0]
            if first.down is not None:
                stage_input.consumers += [Slot(first.conv1), Slot(first.down)]
                groups.append(stage_input)
                stream = ChannelGroup(first.conv2.out_channels, [Slot(first.down)], [Slot(first.down_bn)])
            else:
                stream = stage_input
            for block in stage:
                groups.append(ChannelGroup(block.conv1.out_channels, [Slot(block.conv1)], [Slot(block.bn1)],
                                           [Slot(block.conv2)]))
                stream.producers.append(Slot(block.conv2))
                stream.norms.append(Slot(block.bn2))
                if block is not first or first.down is None:
                    stream.consumers.append(Slot(block.conv1))
            stage_input = stream
        stage_input.consumers.append(Slot(self.fc))
        groups.append(stage_input)
        return groups


# --- MobileNetV2-like with squeeze-excitation -------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand, self.bn_e = _conv_bn(cin, hidden, 1)
        self.dw, self.bn_d = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, max(2, hidden // 4))
        self.project, self.bn_p = _conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = nn.functional.relu6(self.bn_e(self.expand(x)))
        h = self.se(nn.functional.relu6(self.bn_d(self.dw(h))))
        out = self.bn_p(self.project(h))
        return out + x if self.residual else out


class MobileNetLike(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem, self.stem_bn = _conv_bn(3, 8, 3, 2)
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 16, 2, 3),
                                    InvertedResidual(16, 16, 1, 3))
        self.head, self.head_bn = _conv_bn(16, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.blocks(nn.functional.relu6(self.stem_bn(self.stem(x))))
        return self.fc(nn.functional.relu6(self.head_bn(self.head(x))).mean((2, 3)))

    def zero_groups(self) -> list[ChannelGroup]:
        b0, b1, b2 = self.blocks
        groups = [
            ChannelGroup(8, [Slot(self.stem), Slot(b0.project)], [Slot(self.stem_bn), Slot(b0.bn_p)],
                         [Slot(b0.expand), Slot(b1.expand)]),
            ChannelGroup(16, [Slot(b1.project), Slot(b2.project)], [Slot(b1.bn_p), Slot(b2.bn_p)],
                         [Slot(b2.expand), Slot(self.head)]),
            ChannelGroup(32, [Slot(self.head)], [Slot(self.head_bn)], [Slot(self.fc)]),
        ]
        for block in self.blocks:
            hidden = block.expand.out_channels
            groups.append(ChannelGroup(hidden, [Slot(block.expand), Slot(block.dw), Slot(block.se.fc2)],
                                       [Slot(block.bn_e), Slot(block.bn_d)], [Slot(block.se.fc1), Slot(block.project)]))
            groups.append(ChannelGroup(block.se.fc1.out_channels, [Slot(block.se.fc1)], [], [Slot(block.se.fc2)]))
        return groups


# --- DenseNet / Inception-like (Concat) -------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1, self.bn2 = _conv_bn(cin, 4 * growth, 1)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return torch.cat([x, out], 1)


class DenseInceptionLike(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1, self.layer2 = DenseLayer(8, 4), DenseLayer(12, 4)
        self.trans_bn = nn.BatchNorm2d(16)
        self.trans = nn.Conv2d(16, 8, 1, bias=False)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2a, self.b2b = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, 1, 1)
        self.b3 = nn.Conv2d(8, 4, 1)
        self.final_bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = nn.functional.avg_pool2d(self.trans(torch.relu(self.trans_bn(x))), 2)
        branches = [torch.relu(self.b1(x)), torch.relu(self.b2b(torch.relu(self.b2a(x)))),
                    torch.relu(self.b3(nn.functional.max_pool2d(x, 3, 1, 1)))]
        x = torch.relu(self.final_bn(torch.cat(branches, 1)))
        return self.fc(x.mean((2, 3)))

    def zero_groups(self) -> list[ChannelGroup]:
        l1, l2 = self.layer1, self.layer2
        return [
            ChannelGroup(8, [Slot(self.stem)], [Slot(l1.bn1), Slot(l2.bn1), Slot(self.trans_bn)],
                         [Slot(l1.conv1), Slot(l2.conv1), Slot(self.trans)]),
            ChannelGroup(4, [Slot(l1.conv2)], [Slot(l2.bn1, 8), Slot(self.trans_bn, 8)],
                         [Slot(l2.conv1, 8), Slot(self.trans, 8)]),
            ChannelGroup(4, [Slot(l2.conv2)], [Slot(self.trans_bn, 12)], [Slot(self.trans, 12)]),
            ChannelGroup(16, [Slot(l1.conv1)], [Slot(l1.bn2)], [Slot(l1.conv2)]),
            ChannelGroup(16, [Slot(l2.conv1)], [Slot(l2.bn2)], [Slot(l2.conv2)]),
            ChannelGroup(8, [Slot(self.trans)], [], [Slot(self.b1), Slot(self.b2a), Slot(self.b3)]),
            ChannelGroup(4, [Slot(self.b1)], [Slot(self.final_bn, 0)], [Slot(self.fc, 0)]),
            ChannelGroup(4, [Slot(self.b2a)], [], [Slot(self.b2b)]),
            ChannelGroup(4, [Slot(self.b2b)], [Slot(self.final_bn, 4)], [Slot(self.fc, 4)]),
            ChannelGroup(4, [Slot(self.b3)], [Slot(self.final_bn, 8)], [Slot(self.fc, 8)]),
        ]


# --- ShuffleNet-like (channel shuffle) --------------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleBranch(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 1)
        self.dw, self.bn2 = _conv_bn(cout, cout, 3, stride, groups=cout)
        self.conv2, self.bn3 = _conv_bn(cout, cout, 1)

    def forward(self, x):
        return torch.relu(self.bn3(self.conv2(self.bn2(self.dw(torch.relu(self.bn1(self.conv1(x))))))))


class ShuffleUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.branch = ShuffleBranch(channels // 2, channels // 2, 1)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class ShuffleDown(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.dw, self.dw_bn = _conv_bn(cin, cin, 3, 2, groups=cin)
        self.pw, self.pw_bn = _conv_bn(cin, cout // 2, 1)
        self.branch = ShuffleBranch(cin, cout // 2, 2)

    def forward(self, x):
        left = torch.relu(self.pw_bn(self.pw(self.dw_bn(self.dw(x)))))
        return channel_shuffle(torch.cat([left, self.branch(x)], 1), 2)


class ShuffleNetLike(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem, self.stem_bn = _conv_bn(3, 16, 3)
        self.unit1, self.down, self.unit2 = ShuffleUnit(16), ShuffleDown(16, 32), ShuffleUnit(32)
        self.head, self.head_bn = _conv_bn(32, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.unit2(self.down(self.unit1(torch.relu(self.stem_bn(self.stem(x))))))
        return self.fc(torch.relu(self.head_bn(self.head(x))).mean((2, 3)))

    def zero_groups(self) -> list[ChannelGroup]:
        groups = [ChannelGroup(8, [Slot(self.stem, 8)], [Slot(self.stem_bn, 8)], [Slot(self.unit1.branch.conv1)]),
                  ChannelGroup(32, [Slot(self.head)], [Slot(self.head_bn)], [Slot(self.fc)])]
        for branch in (self.unit1.branch, self.down.branch, self.unit2.branch):
            size = branch.conv1.out_channels
            groups.append(ChannelGroup(size, [Slot(branch.conv1), Slot(branch.dw)],
                                       [Slot(branch.bn1), Slot(branch.bn2)], [Slot(branch.conv2)]))
        return groups


# --- TDNN x-vector (Conv1d with dilation, statistics pooling) ---------------------------------------------

class XVector(nn.Module):
    def __init__(self, features: int = 8, channels: int = 16, embedding: int = 8, classes: int = 5):
        super().__init__()
        specs = [(features, channels, 5, 1), (channels, channels, 3, 2), (channels, channels, 3, 3),
                 (channels, channels, 1, 1), (channels, 3 * channels, 1, 1)]
        self.frames = nn.ModuleList(nn.Conv1d(i, o, k, dilation=d) for i, o, k, d in specs)
        self.frame_bns = nn.ModuleList(nn.BatchNorm1d(o) for _, o, _, _ in specs)
        self.segment6, self.bn6 = nn.Linear(6 * channels, embedding), nn.BatchNorm1d(embedding)
        self.segment7, self.bn7 = nn.Linear(embedding, embedding), nn.BatchNorm1d(embedding)
        self.out = nn.Linear(embedding, classes)

    def forward(self, x):
        for conv, bn in zip(self.frames, self.frame_bns, strict=True):
            x = bn(torch.relu(conv(x)))
        stats = torch.cat([x.mean(2), x.std(2)], 1)
        x = self.bn6(torch.relu(self.segment6(stats)))
        return self.out(self.bn7(torch.relu(self.segment7(x))))

    def zero_groups(self) -> list[ChannelGroup]:
        groups = []
        for i, (conv, bn) in enumerate(zip(self.frames, self.frame_bns, strict=True)):
            if i + 1 < len(self.frames):
                consumers = [Slot(self.frames[i + 1])]
            else:
                consumers = [Slot(self.segment6, 0, (0, conv.out_channels))]  # mean and std columns
            groups.append(ChannelGroup(conv.out_channels, [Slot(conv)], [Slot(bn)], consumers))
        groups.append(ChannelGroup(self.segment6.out_features, [Slot(self.segment6)], [Slot(self.bn6)],
                                   [Slot(self.segment7)]))
        groups.append(ChannelGroup(self.segment7.out_features, [Slot(self.segment7)], [Slot(self.bn7)],
                                   [Slot(self.out)]))
        return groups


# --- 2-layer transformer encoder --------------------------------------------------------------------------

class TinyTransformer(nn.Module):
    def __init__(self, features: int = 8, width: int = 16, heads: int = 2, ff: int = 32, classes: int = 5):
        super().__init__()
        self.proj = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        for copy in self.encoder.layers:  # TransformerEncoder deep-copies one layer: give each its own weights
            copy.self_attn._reset_parameters()
            copy.linear1.reset_parameters()
            copy.linear2.reset_parameters()
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(1))

    def zero_groups(self) -> list[ChannelGroup]:
        groups = []
        for layer in self.encoder.layers:
            groups.append(ChannelGroup(layer.linear1.out_features, [Slot(layer.linear1)], [], [Slot(layer.linear2)]))
            # head dim j: rows j of q, k and v in every head, and the matching out_proj columns
            attn = layer.self_attn
            dim, heads = attn.head_dim, attn.num_heads
            rows = tuple(part * attn.embed_dim + h * dim for part in range(3) for h in range(heads))
            groups.append(ChannelGroup(dim, [Slot(attn, 0, rows, "in_proj_weight", "in_proj_bias")], [],
                                       [Slot(attn.out_proj, 0, tuple(h * dim for h in range(heads)))]))
        return groups


@dataclass
class Family:
    name: str
    build: type[nn.Module]
    input_shape: tuple[int, ...]
    residual: bool = False


FAMILIES = [
    Family("resnet", ResNetLike, (1, 3, 32, 32), residual=True),
    Family("mobilenet", MobileNetLike, (1, 3, 32, 32), residual=True),
    Family("dense_inception", DenseInceptionLike, (1, 3, 16, 16)),
    Family("shufflenet", ShuffleNetLike, (1, 3, 16, 16)),
    Family("xvector", XVector, (1, 8, 40)),
    Family("transformer", TinyTransformer, (1, 12, 8)),
]


def build(family: Family, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = family.build(**kwargs)
    _randomize_norms(model, seed)
    return model.eval()


def export(model: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """TorchScript-based export at opset 17 (fast and deterministic), one static batch."""
    torch.set_num_threads(1)
    buffer = io.BytesIO()
    # with gradients on, nn.TransformerEncoderLayer takes its decomposed path instead of the fused kernel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(model, (torch.zeros(input_shape),), buffer, opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["output"])
    return onnx.load_from_string(buffer.getvalue())


def sample_input(input_shape: tuple[int, ...], seed: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)}
