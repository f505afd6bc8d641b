"""Dynamic fixed-point quantization-aware training: fake-quant modules with straight-through gradients.

The numbers come from optimizer.quant, the implementation the `quantize` pass uses, so a QAT model and a
`quantize`d one share their grids: weights are b-bit signed symmetric codes (±(2^(b-1) - 1)) with fl from max|w|
per tensor or per output channel; activations are 8-bit with fl from a running max and QuantizeLinear's
saturation (uint8 0..255, int8 -128..127); biases are int32 on the accumulator grid 2^-(fl_in + fl_w), so the
integer products and sums are exact in float32 in torch and in ONNX Runtime alike. Rounding is half to even.
The forward value is computed by optimizer.quant on the detached tensor; the gradient passes straight through
inside the range and is zero where the value saturates.

`prepare_qat(model, magnitude_bits=8)` uses the bit-slice L1 authors' weight format instead
(MagnitudeWeightQuantizer: sign plus an 8-bit magnitude, scale exponent s = ceil(log2 max|w|), step 2^(s-8));
its export holds int16 codes (see export.py).

`prepare_qat(model)` swaps Linear/Conv1d/Conv2d for QuantLinear/QuantConv1d/QuantConv2d sharing their
parameters; `optimizer.training.export` writes the QDQ form the `quantize` pass writes: int8 weight and int32
bias initializers -> DequantizeLinear, and QuantizeLinear -> DequantizeLinear on every layer input.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from optimizer import quant
from optimizer.errors import UsageError

BIAS_BITS = 32
Granularity = Literal["tensor", "channel"]


def fake_quantize_ste(x: torch.Tensor, bits: int, fl: int | np.ndarray, signed: bool = True) -> torch.Tensor:
    """optimizer.quant.fake_quantize_dfp(x) in the forward pass; identity gradient inside the range, 0 outside.

    `fl` is an int or an array that broadcasts against x (one fractional length per output channel).
    """
    values = quant.fake_quantize_dfp(x.detach().cpu().numpy(), bits, fl, signed)
    step = torch.as_tensor(np.exp2(-np.asarray(fl, dtype=np.float64)), dtype=x.dtype, device=x.device)
    lo = -quant.qmax(bits, signed) if signed else 0
    clamped = torch.clamp(x, lo * step, quant.qmax(bits, signed) * step)
    return clamped + (torch.as_tensor(values, dtype=x.dtype, device=x.device) - clamped).detach()


def exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


class WeightQuantizer(nn.Module):
    """Signed b-bit DFP weights, fl from the current max|w| (per tensor, or per output channel on axis 0)."""

    def __init__(self, bits: int = 8, granularity: Granularity = "tensor"):
        super().__init__()
        if not 2 <= bits <= 8:
            raise UsageError(f"weight bits={bits}: QAT exports int8 weights, use 2..8 bits")
        if granularity not in ("tensor", "channel"):
            raise UsageError(f"granularity={granularity!r}: use 'tensor' or 'channel'")
        self.bits, self.granularity = bits, granularity

    def frac_length(self, w: torch.Tensor) -> int | np.ndarray:
        """An int per tensor, or an array shaped [out, 1, ...] that broadcasts against w."""
        magnitude = w.detach().abs()
        if self.granularity == "tensor":
            return quant.frac_length(float(magnitude.max()), self.bits)
        per_channel = magnitude.flatten(1).max(1).values.double().cpu().numpy()
        return quant.frac_length(per_channel, self.bits).reshape(-1, *[1] * (w.ndim - 1))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fl = self.frac_length(w)
        if not exporting():
            return fake_quantize_ste(w, self.bits, fl)
        # fl fits max|w| into ±qmax, so the codes never reach -128 and ONNX's int8 range gives the same numbers
        if self.granularity == "tensor":
            return torch.fake_quantize_per_tensor_affine(w, 2.0**-fl, 0, -128, 127)
        scales = torch.as_tensor(np.exp2(-fl.reshape(-1)), dtype=torch.float32)
        zero_points = torch.zeros(scales.shape, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scales, zero_points, 0, -128, 127)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}"


class MagnitudeWeightQuantizer(nn.Module):
    """The bit-slice L1 authors' weights (nics_fix_pt FIX_AUTO, methods.md §4): sign plus a `magnitude_bits`-bit
    magnitude, exponent s = ceil(log2 max|w|) from the current weights (per tensor, or per output channel),
    value clamp(round(w / 2^(s-m)) · 2^(s-m), -2^s, 2^s) with a straight-through round.

    Training keeps their edge value 2^s (code 2^m, which needs an extra bit); the deployed grid
    (`deployed(w)`, what export writes as int16 codes) saturates it at 2^m - 1 so that every magnitude fits
    m / cell_bits crossbar cells. Only weights within half a step of 2^s differ. `bits` is the signed width
    of the deployed codes, m + 1, the width the `bit-slice` pass and the reram runtime slice them as.
    """

    def __init__(self, magnitude_bits: int = 8, granularity: Granularity = "tensor"):
        super().__init__()
        if not 2 <= magnitude_bits <= 14:
            raise UsageError(f"magnitude_bits={magnitude_bits}: sign-magnitude weights export as int16, use 2..14")
        if granularity not in ("tensor", "channel"):
            raise UsageError(f"granularity={granularity!r}: use 'tensor' or 'channel'")
        self.magnitude_bits, self.granularity = magnitude_bits, granularity
        self.bits = magnitude_bits + 1

    def exponent(self, w: torch.Tensor) -> int | np.ndarray:
        magnitude = w.detach().abs()
        if self.granularity == "tensor":
            return quant.magnitude_exponent(float(magnitude.max()))
        per_channel = magnitude.flatten(1).max(1).values.double().cpu().numpy()
        return quant.magnitude_exponent(per_channel).reshape(-1, *[1] * (w.ndim - 1))

    def frac_length(self, w: torch.Tensor) -> int | np.ndarray:
        return quant.magnitude_frac_length(self.exponent(w), self.magnitude_bits)

    def codes(self, w: torch.Tensor, deploy: bool = True) -> np.ndarray:
        return quant.quantize_magnitude(w.detach().cpu().double().numpy(), self.magnitude_bits, self.exponent(w),
                                        deploy=deploy)

    def deployed(self, w: torch.Tensor) -> torch.Tensor:
        values = self.codes(w) * np.exp2(-np.asarray(self.frac_length(w), dtype=np.float64))
        return torch.as_tensor(values, dtype=w.dtype, device=w.device)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if exporting():
            return w  # export_mode() has put the deployed values in the weight itself
        fl = np.asarray(self.frac_length(w), dtype=np.float64)
        up = torch.as_tensor(np.exp2(fl), dtype=w.dtype, device=w.device)
        down = torch.as_tensor(np.exp2(-fl), dtype=w.dtype, device=w.device)
        limit = float(1 << self.magnitude_bits)
        # power-of-two scaling is exact and torch.round rounds half to even like quant.quantize_magnitude
        values = torch.clamp(torch.round(w.detach() * up), -limit, limit) * down
        return w + (values - w).detach()

    def extra_repr(self) -> str:
        return f"magnitude_bits={self.magnitude_bits}, granularity={self.granularity}"


class ActivationQuantizer(nn.Module):
    """8-bit DFP activations as QuantizeLinear computes them (optimizer.quant.dfp_activation_roundtrip, the
    `quantize` pass's grid): zero point 0, scale 2^-fl, uint8 (0..255) or int8 (saturating at -128..127).

    fl comes from a running max|x| (exponential moving average, updated in training mode) and the quantize
    pass's rule (the finest fl that fits the max into 127, or 255 unsigned). signed: True / False, or None to
    decide from data: signed once a negative value has been seen in training. In eval mode and in the exported
    model the last fl is frozen; a quantizer that never saw data refuses to run.
    """

    bits = 8

    def __init__(self, signed: bool | None = None, momentum: float = 0.1):
        super().__init__()
        self.signed_option, self.momentum = signed, momentum
        self.register_buffer("running_max", torch.tensor(-1.0))
        self.register_buffer("seen_negative", torch.tensor(False))

    @property
    def signed(self) -> bool:
        return self.signed_option if self.signed_option is not None else bool(self.seen_negative)

    @property
    def calibrated(self) -> bool:
        return float(self.running_max) >= 0

    def frac_length(self) -> int:
        if not self.calibrated:
            raise UsageError("an ActivationQuantizer has seen no data; run a few training batches first")
        return quant.frac_length(float(self.running_max), self.bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not exporting():
            self._observe(x.detach())
        fl = self.frac_length()
        lo, hi = (-128, 127) if self.signed else (0, 255)
        if exporting():
            return torch.fake_quantize_per_tensor_affine(x, 2.0**-fl, 0, lo, hi)
        values = quant.dfp_activation_roundtrip(x.detach().cpu().numpy(), fl, self.signed)
        clamped = torch.clamp(x, lo * 2.0**-fl, hi * 2.0**-fl)
        return clamped + (torch.as_tensor(values, dtype=x.dtype, device=x.device) - clamped).detach()

    def _observe(self, x: torch.Tensor) -> None:
        batch_max = float(x.abs().max()) if x.numel() else 0.0
        if not self.calibrated:
            self.running_max.fill_(batch_max)
        else:
            self.running_max.mul_(1 - self.momentum).add_(self.momentum * batch_max)
        if self.signed_option is None and x.numel() and float(x.min()) < 0:
            self.seen_negative.fill_(True)

    def extra_repr(self) -> str:
        signed = "auto" if self.signed_option is None else self.signed_option
        return f"signed={signed}, momentum={self.momentum}"


class _QuantizedLayer:
    """Mixin: quantized input, weight and bias for a Linear/ConvNd subclass."""

    input_quant: ActivationQuantizer
    weight_quant: WeightQuantizer | MagnitudeWeightQuantizer

    def _setup_quantizers(self, weight_bits: int, granularity: Granularity, magnitude_bits: int | None = None) -> None:
        self.input_quant = ActivationQuantizer()
        self.weight_quant = WeightQuantizer(weight_bits, granularity) if magnitude_bits is None else \
            MagnitudeWeightQuantizer(magnitude_bits, granularity)

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        xq = self.input_quant(x)
        wq = self.weight_quant(self.weight)
        if self.bias is None or exporting():
            # export_mode() has already put the bias on its grid (see there)
            return xq, wq, self.bias
        return xq, wq, fake_quantize_ste(self.bias, BIAS_BITS, self.bias_frac_length())

    def bias_frac_length(self) -> int | np.ndarray:
        """The accumulator grid: fl_in + fl_w (per output channel for per-channel weights)."""
        fl_w = self.weight_quant.frac_length(self.weight)
        return self.input_quant.frac_length() + (fl_w.reshape(-1) if isinstance(fl_w, np.ndarray) else fl_w)

    def quantization_info(self) -> dict:
        fl_w = self.weight_quant.frac_length(self.weight)
        magnitude = isinstance(self.weight_quant, MagnitudeWeightQuantizer)
        extra = {"weight_format": "sign-magnitude", "magnitude_bits": self.weight_quant.magnitude_bits,
                 "weight_saturated": int(np.count_nonzero(np.abs(self.weight_quant.codes(self.weight, deploy=False))
                                                          >> self.weight_quant.magnitude_bits))} if magnitude else {}
        return extra | {
            "weight_bits": self.weight_quant.bits,
            "weight_granularity": self.weight_quant.granularity,
            "weight_frac_length": np.asarray(fl_w).reshape(-1).tolist() if isinstance(fl_w, np.ndarray) else fl_w,
            "input_bits": self.input_quant.bits,
            "input_signed": self.input_quant.signed,
            "input_frac_length": self.input_quant.frac_length(),
            "bias_bits": BIAS_BITS if self.bias is not None else None,
            "bias_frac_length": None if self.bias is None else np.asarray(self.bias_frac_length()).tolist(),
        }


class QuantLinear(_QuantizedLayer, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, *, weight_bits=8,
                 granularity: Granularity = "tensor", magnitude_bits: int | None = None):
        super().__init__(in_features, out_features, bias)
        self._setup_quantizers(weight_bits, granularity, magnitude_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self.quantized_operands(x))


class QuantConv1d(_QuantizedLayer, nn.Conv1d):
    def __init__(self, *args, weight_bits=8, granularity: Granularity = "tensor", magnitude_bits=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers(weight_bits, granularity, magnitude_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(*self.quantized_operands(x))


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    def __init__(self, *args, weight_bits=8, granularity: Granularity = "tensor", magnitude_bits=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_quantizers(weight_bits, granularity, magnitude_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(*self.quantized_operands(x))


_QUANTIZED = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def prepare_qat(model: nn.Module, *, weight_bits: int = 8, granularity: Granularity = "tensor",
                magnitude_bits: int | None = None) -> nn.Module:
    """Replace every Linear/Conv1d/Conv2d (not already quantized) by its quantized twin, in place.

    magnitude_bits=8: the bit-slice L1 authors' weight format (MagnitudeWeightQuantizer) instead of `weight_bits`
    symmetric DFP. Example: prepare_qat(nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10)),
    magnitude_bits=8).

    The new layers share the original Parameter objects, so an optimizer built before still trains them.
    Run some training batches (train mode) before evaluating or exporting: that calibrates the input ranges.
    """
    replacements = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            twin = _QUANTIZED.get(type(child))
            if twin is not None:
                replacements.append((parent, child_name, _quantized_twin(twin, child, weight_bits, granularity,
                                                                         magnitude_bits)))
    if not replacements:
        raise UsageError(f"prepare_qat: {type(model).__name__} has no Linear/Conv1d/Conv2d layer to quantize")
    for parent, child_name, twin in replacements:
        setattr(parent, child_name, twin)
    return model


def _quantized_twin(cls, layer: nn.Module, weight_bits: int, granularity: Granularity, magnitude_bits: int | None):
    formats = {"weight_bits": weight_bits, "granularity": granularity, "magnitude_bits": magnitude_bits}
    if isinstance(layer, nn.Linear):
        twin = cls(layer.in_features, layer.out_features, layer.bias is not None, **formats)
    else:
        twin = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                   padding_mode=layer.padding_mode, **formats)
    twin.weight = layer.weight
    twin.bias = layer.bias
    return twin.to(layer.weight.device).train(layer.training)


def quantized_layers(model: nn.Module) -> dict[str, _QuantizedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _QuantizedLayer)}


@contextmanager
def export_mode(model: nn.Module):
    """While exporting: biases hold their on-grid values (restored afterwards), so the bias initializer keeps its
    name and needs no extra node; so do sign-magnitude weights (their deployed grid), which export.py turns into
    int16 codes. Yields {layer name: quantization_info()} for the model's metadata."""
    layers = quantized_layers(model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    info = {}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                info[name] = layer.quantization_info()
                bias = None if layer.bias is None else fake_quantize_ste(layer.bias, BIAS_BITS,
                                                                         layer.bias_frac_length())
                if isinstance(layer.weight_quant, MagnitudeWeightQuantizer):
                    saved.append((layer.weight, layer.weight.detach().clone()))
                    layer.weight.copy_(layer.weight_quant.deployed(layer.weight))
                if bias is not None:
                    saved.append((layer.bias, layer.bias.detach().clone()))
                    layer.bias.copy_(bias)
        yield info
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)
