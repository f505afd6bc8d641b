"""Which parameters make up a layer's channel groups, and fixed zero masks for threshold-then-finetune.

A `Layer` is a Linear/ConvNd weight (output-first) plus the per-filter parameters that belong to each output
channel: the layer's bias and, when one follows, the BatchNorm's γ and β. For
Conv2d(1, 4) -> BatchNorm2d(4) -> ReLU, filter 2's group is {conv.weight[2], conv.bias[2], bn.weight[2], bn.bias[2]};
zeroing all four makes channel 2 exactly zero after the BatchNorm (eval mode), which is what the
`structured-sparse` pass's `criterion=zero` removes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from optimizer.errors import UsageError

PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# channel-wise ops a filter's output may pass through before its BatchNorm (the channel keeps its identity)
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)
_CHANNELWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, torch.tanh, torch.sigmoid, F.dropout,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
}
_CHANNELWISE_METHODS = {"relu", "tanh", "sigmoid"}


@dataclass
class Layer:
    """A prunable layer: `module` (Linear/ConvNd) named `name`, and the BatchNorm that its output feeds, if any."""

    name: str
    module: nn.Module
    norm_name: str | None = None
    norm: nn.Module | None = None

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def attached_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the per-filter parameters that join filter groups: bias, BatchNorm γ and β."""
        out = []
        if getattr(self.module, "bias", None) is not None:
            out.append((f"{self.name}.bias", self.module.bias))
        if self.norm is not None and self.norm.affine:
            out += [(f"{self.norm_name}.weight", self.norm.weight), (f"{self.norm_name}.bias", self.norm.bias)]
        return out

    def attached(self) -> torch.Tensor | None:
        """The attached parameters as columns of an [out, k] tensor, or None."""
        params = [p for _, p in self.attached_parameters()]
        return torch.stack(params, dim=1) if params else None

    def describe(self) -> dict:
        return {
            "weight": f"{self.name}.weight",
            "shape": list(self.weight.shape),
            "filter_axis": 0,
            "channel_axis": 1,
            "attached": [name for name, _ in self.attached_parameters()],
            "batchnorm": self.norm_name,
        }


def select_layers(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] = PRUNABLE,
    name: str | None = None,
    norms: dict[str, str] | None = None,
) -> list[Layer]:
    """The layers of `model` of one of `types` whose name matches the regex `name` (re.search), in model order."""
    try:
        pattern = re.compile(name) if name else None
    except re.error as e:
        raise UsageError(f"layer name regex {name!r} is invalid ({e})") from None
    modules = dict(model.named_modules())
    norms = norms or {}
    layers = []
    for module_name, module in modules.items():
        if not isinstance(module, types) or (pattern and not pattern.search(module_name)):
            continue
        if not isinstance(module, PRUNABLE):
            raise UsageError(f"layer {module_name}: {type(module).__name__} is not an output-first Linear/ConvNd")
        norm_name = norms.get(module_name)
        layers.append(Layer(module_name, module, norm_name, modules[norm_name] if norm_name else None))
    return layers


def batchnorm_map(model: nn.Module, batchnorm: str | dict | None = "auto") -> dict[str, str]:
    """{layer name: name of the BatchNorm its output feeds}: traced ("auto"), given (dict) or none (None)."""
    if batchnorm is None:
        return {}
    modules = dict(model.named_modules())
    if isinstance(batchnorm, dict):
        for layer, norm in batchnorm.items():
            if not isinstance(modules.get(layer), PRUNABLE) or not isinstance(modules.get(norm), _BATCHNORMS):
                raise UsageError(f"batchnorm={{{layer!r}: {norm!r}}}: expected a Linear/ConvNd and a BatchNorm name")
        return dict(batchnorm)
    if batchnorm != "auto":
        raise UsageError(f"batchnorm={batchnorm!r}: use 'auto', a dict {{layer: batchnorm}} or None")
    if not any(isinstance(m, _BATCHNORMS) for m in modules.values()):
        return {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError) on dynamic code
        raise UsageError(
            f"cannot trace {type(model).__name__} with torch.fx to find the BatchNorm after each layer "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass batchnorm={{layer: bn}} or None"
        ) from None
    found = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), PRUNABLE):
            norm = _following_batchnorm(node, modules)
            if norm is not None and modules[norm].num_features == modules[node.target].weight.shape[0]:
                found[node.target] = norm
    return found


def _following_batchnorm(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op == "call_module" and isinstance(modules.get(node.target), _BATCHNORMS):
            return node.target
        channelwise = (
            (node.op == "call_module" and isinstance(modules.get(node.target), _CHANNELWISE_MODULES))
            or (node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS)
            or (node.op == "call_method" and node.target in _CHANNELWISE_METHODS)
        )
        if not channelwise:
            return None
    return None


@dataclass
class Masks:
    """Fixed 0/1 masks over parameters. `apply()` zeros the masked entries; `attach()` also zeros their gradients.

    The trainer calls `apply()` after every optimizer step, so momentum and weight decay cannot revive a weight.
    """

    entries: list[tuple[str, nn.Parameter, torch.Tensor]] = field(default_factory=list)
    _hooks: list = field(default_factory=list, repr=False)

    def apply(self) -> Masks:
        with torch.no_grad():
            for _, param, mask in self.entries:
                param.mul_(mask)
        return self

    def attach(self) -> Masks:
        self.detach()
        for _, param, mask in self.entries:
            self._hooks.append(param.register_hook(lambda grad, mask=mask: grad * mask))
        return self.apply()

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def zero_fraction(self) -> float:
        total = sum(mask.numel() for _, _, mask in self.entries)
        return sum(int((mask == 0).sum()) for _, _, mask in self.entries) / total if total else 0.0


def threshold_masks(
    layers: Iterable[Layer],
    *,
    threshold: float | None = None,
    std_ratio: float | None = None,
    groups: Sequence[str] = ("element",),
    zero_dead_channels: bool = True,
) -> Masks:
    """Masks that zero small weights or whole groups (DeepHoyer's prune step, SSL's group threshold).

    threshold: absolute. std_ratio: relative to each layer's scale, which makes the rule scale invariant (a
    BatchNorm after a layer lets the layer's scale drift freely): elements |w| < std_ratio · std(weight)
    (DeepHoyer's MNIST rule); groups with RMS < std_ratio · the RMS of all the entries of that kind of group
    in the layer. Give exactly one of the two.
    groups: "element" zeros small weights; "filter" zeros filter groups (weight row plus attached bias and
    BatchNorm γ, β) by their RMS; "channel" zeros input channels (across filters and kernel positions) by RMS.
    zero_dead_channels: a filter whose weights all end up zero also gets its attached parameters zeroed, so the
    channel outputs exactly zero and `structured-sparse:criterion=zero` can remove it.
    """
    if (threshold is None) == (std_ratio is None):
        raise UsageError("give exactly one of threshold (absolute) or std_ratio (times each layer's weight std)")
    unknown = set(groups) - {"element", "filter", "channel"}
    if unknown:
        raise UsageError(f"threshold groups {sorted(unknown)} unknown; use element, filter, channel")
    masks = Masks()
    with torch.no_grad():
        for layer in layers:
            w = layer.weight
            keep = torch.ones_like(w, dtype=torch.bool)
            filter_keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            if "element" in groups:
                keep &= w.abs() >= (threshold if threshold is not None else std_ratio * float(w.std()))
            if "filter" in groups:
                attached = layer.attached()
                squares = (w * w).flatten(1).sum(1) + (0 if attached is None else (attached * attached).sum(1))
                mean_squares = squares / (w[0].numel() + (0 if attached is None else attached.shape[1]))
                filter_keep = mean_squares.sqrt() >= _group_threshold(mean_squares, threshold, std_ratio)
                keep &= filter_keep.view(-1, *[1] * (w.ndim - 1))
            if "channel" in groups and w.ndim > 1:
                mean_squares = (w * w).transpose(0, 1).flatten(1).mean(1)
                channel_keep = mean_squares.sqrt() >= _group_threshold(mean_squares, threshold, std_ratio)
                keep &= channel_keep.view(1, -1, *[1] * (w.ndim - 2))
            masks.entries.append((f"{layer.name}.weight", w, keep.to(w.dtype)))
            if zero_dead_channels:
                filter_keep = filter_keep & keep.flatten(1).any(1)
            if zero_dead_channels or "filter" in groups:
                for name, param in layer.attached_parameters():
                    masks.entries.append((name, param, filter_keep.to(param.dtype)))
    return masks.apply()


def _group_threshold(mean_squares: torch.Tensor, threshold: float | None, std_ratio: float | None) -> float:
    return threshold if threshold is not None else std_ratio * float(mean_squares.mean().sqrt())


def zero_filters(weight: torch.Tensor) -> int:
    """Output filters (rows) whose weights are all zero."""
    return int((weight.detach().flatten(1) == 0).all(1).sum())


def zero_input_channels(weight: torch.Tensor, block: int = 1) -> int:
    """Input channels whose weights are zero across every filter and kernel position.

    block: consecutive input columns that form one channel (a Linear after Flatten: spatial size of the channel).
    """
    columns = (weight.detach().transpose(0, 1).flatten(1) == 0).all(1)
    if columns.numel() % block:
        raise UsageError(f"{columns.numel()} input columns do not split into channels of {block}")
    return int(columns.view(-1, block).all(1).sum())
