"""MoLe on the training side (methods.md §5): train a network on morphed data through a fixed Aug-Conv layer.

The data provider morphs samples with a secret key (optimizer/morph.py) and builds the Aug-Conv layer from the
developer's first convolution (pretrained on plain data): C_ac = M⁻¹ @ Toeplitz(conv), with the output channels
shuffled by a permutation only the provider knows. The developer trains everything after that layer, from scratch,
on morphed data only; the layer itself stays fixed (a buffer, not a parameter). The shuffle is what keeps the
developer from recovering M⁻¹ = C_ac @ pinv(Toeplitz(conv)); retraining the later layers is what makes the shuffle
harmless.

    key = key_for_conv(conv1, "input", (1, 8, 8), kind="uniform")
    model = nn.Sequential(AugConv.from_conv(conv1, key, permute=True), *rest_of_the_network)
    train on morph(images, key)

The same layer exported to ONNX is the MatMul + Reshape (+ Add) the `mole` pass writes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from optimizer.errors import UsageError
from optimizer.morph import ConvGeometry, MatrixKind, MorphKey, aug_conv_matrix, make_key

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class AugConv(nn.Module):
    """A fixed linear layer: morphed samples [N, D] -> the first convolution's output [N, C_out, *out_spatial].

    `matrix` [D, C_out · prod(out_spatial)] and `bias` [C_out] are buffers (saved, moved, exported; never
    trained). The product runs in the matrix's dtype (float64 for the paper's ill-conditioned uniform keys).
    """

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor | None, out_shape: tuple[int, ...]):
        super().__init__()
        if matrix.shape[1] != int(np.prod(out_shape)):
            raise UsageError(f"AugConv: matrix of {matrix.shape[1]} columns cannot be shaped {list(out_shape)}")
        self.register_buffer("matrix", matrix)
        self.register_buffer("bias", bias)
        self.out_shape = tuple(out_shape)

    @classmethod
    def from_conv(cls, conv: nn.Module, key: MorphKey, *, permute: bool = False, seed: int | None = None) -> AugConv:
        """The Aug-Conv of `conv` under `key`; permute shuffles the output channels (seed=None: OS entropy)."""
        geometry = conv_geometry(conv, key.sample_shape)
        matrix = aug_conv_matrix(key, geometry)
        cout, out_spatial = geometry.weight.shape[0], geometry.out_spatial
        bias = None if conv.bias is None else conv.bias.detach().cpu().numpy().astype(np.float64)
        if permute:
            order = np.random.default_rng(seed).permutation(cout)
            matrix = matrix.reshape(len(matrix), cout, -1)[:, order].reshape(len(matrix), -1)
            bias = None if bias is None else bias[order]
        dtype = torch.float64 if key.dtype == "float64" else torch.float32
        return cls(torch.as_tensor(matrix, dtype=dtype),
                   None if bias is None else torch.as_tensor(bias, dtype=torch.float32), (cout, *out_spatial))

    def forward(self, morphed: torch.Tensor) -> torch.Tensor:
        out = (morphed.to(self.matrix.dtype) @ self.matrix).to(torch.float32)
        out = out.reshape(-1, *self.out_shape)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *[1] * (len(self.out_shape) - 1))
        return out


def conv_geometry(conv: nn.Module, sample_shape: tuple[int, ...]) -> ConvGeometry:
    """The ConvGeometry of a torch Conv1d/2d/3d reading samples of `sample_shape` (C, *spatial)."""
    if not isinstance(conv, _CONVS):
        raise UsageError(f"Aug-Conv: {type(conv).__name__} is not a Conv1d/Conv2d/Conv3d")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UsageError(f"Aug-Conv: padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; "
                         "use explicit zero padding")
    if sample_shape[0] != conv.in_channels or len(sample_shape) - 1 != len(conv.kernel_size):
        raise UsageError(f"Aug-Conv: samples of shape {list(sample_shape)} do not fit {conv}")
    return ConvGeometry(weight=conv.weight.detach().cpu().numpy().astype(np.float64),
                        sample_shape=tuple(sample_shape), pads=tuple((p, p) for p in conv.padding),
                        strides=tuple(conv.stride), dilations=tuple(conv.dilation), group=conv.groups)


def key_for_conv(conv: nn.Module, input_name: str, sample_shape: tuple[int, ...], *, kind: MatrixKind = "orthogonal",
                 kappa: int = 1, seed: int | None = None) -> MorphKey:
    """A fresh key whose padding is `conv`'s, so that AugConv.from_conv(conv, key) applies."""
    geometry = conv_geometry(conv, sample_shape)
    return make_key(input_name, geometry.sample_shape, geometry.pads, kind=kind, kappa=kappa, seed=seed)
