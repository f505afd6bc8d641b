"""Sparsity regularizers (methods.md §1, §4, §8) and `SparsityRegularizer`, which attaches them to a model.

Every function takes one weight tensor laid out output-first (Linear [out, in], ConvNd [out, in, *kernel]) and
returns a scalar tensor that autograd differentiates:

    l1(w)                   Σ|w|
    group_lasso(w, dim)     Σ_g ||w_g||₂ over the groups indexed by `dim` (SSL, Wen et al. 2016)
    hoyer(w)                ||w||₁ / ||w||₂
    hoyer_square(w)         ||w||₁² / ||w||₂²                               (DeepHoyer HS)
    group_hoyer_square(w)   Σ_terms (Σ_g ||w_g||₂)² / ||w||₂²               (DeepHoyer Group-HS, shared denominator)
    bitslice_l1(w)          Σ over elements and cell slices of the slice value  (bit-slice L1, straight-through)

Groups (`dim`): "filter" (= 0) gives one group per output filter or neuron; "channel" (= 1) one group per input
channel across every filter and kernel position, which for a Conv1d/TDNN layer is an input neuron across all
time offsets; "shape" (= every axis but 0) one group per (in, *kernel) fibre across filters. Any int or tuple of
ints names the axes that index the groups; the norm runs over the remaining axes. Toy example, w of shape [2, 3]:
group_lasso(w, "filter") = ||w[0, :]|| + ||w[1, :]||, group_lasso(w, "channel") = Σ_j ||w[:, j]||.

`attached` ([out, k], optional) adds per-filter parameters to each filter's group: the layer's bias and the
γ, β of a BatchNorm that follows it. Without them a BatchNorm makes the filter's scale free and the filter
group can shrink without the channel ever turning off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from optimizer import quant
from optimizer.errors import UsageError
from optimizer.training.masks import PRUNABLE, Layer, Masks, batchnorm_map, select_layers, threshold_masks

GroupSpec = int | tuple[int, ...] | Literal["filter", "channel", "shape"]
Kind = Literal["l1", "hoyer", "hoyer_square", "group_lasso", "group_hoyer_square", "bitslice_l1"]
KINDS: tuple[str, ...] = ("l1", "hoyer", "hoyer_square", "group_lasso", "group_hoyer_square", "bitslice_l1")
GROUP_KINDS: tuple[str, ...] = ("group_lasso", "group_hoyer_square")


def group_axes(ndim: int, dim: GroupSpec) -> tuple[int, ...]:
    """The axes that index the groups of an `ndim`-dimensional weight, from a group spec."""
    if dim == "filter":
        axes: tuple[int, ...] = (0,)
    elif dim == "channel":
        axes = (1,)
    elif dim == "shape":
        axes = tuple(range(1, ndim))
    elif isinstance(dim, int):
        axes = (dim,)
    elif isinstance(dim, tuple) and all(isinstance(a, int) for a in dim):
        axes = dim
    else:
        raise UsageError(f"group spec {dim!r} is not 'filter', 'channel', 'shape', an axis or a tuple of axes")
    normalized = tuple(sorted({a % ndim for a in axes})) if ndim else ()
    if not normalized or any(not -ndim <= a < ndim for a in axes):
        raise UsageError(f"group spec {dim!r} does not fit a weight with {ndim} dimensions")
    return normalized


def group_norms(w: torch.Tensor, dim: GroupSpec, attached: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of every group; the result has the shape of the group axes (e.g. [out] for "filter")."""
    axes = group_axes(w.ndim, dim)
    reduce = tuple(a for a in range(w.ndim) if a not in axes)
    squares = (w * w).sum(dim=reduce) if reduce else w * w
    if attached is not None:
        if axes != (0,):
            raise UsageError(f"attached parameters belong to filter groups, not to group spec {dim!r}")
        squares = squares + (attached * attached).sum(dim=1)
    # sqrt'(0) is infinite; groups that are exactly zero get the zero subgradient, as torch.linalg.vector_norm does
    safe = torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where(squares > 0, safe.sqrt(), torch.zeros_like(squares))


def l1(w: torch.Tensor) -> torch.Tensor:
    return w.abs().sum()


def group_lasso(w: torch.Tensor, dim: GroupSpec, attached: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_g ||w_g||₂ over the groups indexed by `dim` (see the module docstring)."""
    return group_norms(w, dim, attached).sum()


def hoyer(w: torch.Tensor) -> torch.Tensor:
    """||w||₁ / ||w||₂; 0 for an all-zero tensor (DeepHoyer regularizes only tensors with Σ|w| > 0)."""
    squares = (w * w).sum()
    safe = torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where(squares > 0, w.abs().sum() / safe.sqrt(), torch.zeros_like(squares))


def hoyer_square(w: torch.Tensor) -> torch.Tensor:
    """||w||₁² / ||w||₂²: scale invariant, gradient shrinks |w_i| < ||w||₂²/||w||₁ and grows larger ones."""
    squares = (w * w).sum()
    safe = torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where(squares > 0, w.abs().sum() ** 2 / safe, torch.zeros_like(squares))


def group_hoyer_square(
    w: torch.Tensor, dims: Sequence[GroupSpec] = ("filter", "channel"), attached: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_d (Σ_g ||w_g||₂)² / ||w||₂² with one denominator shared by every group term (DeepHoyer cifar_group.py).

    The default is the official CIFAR/MNIST-CNN form, filter-wise plus channel-wise terms; for a Linear weight
    that is rows plus columns. `attached` joins the filter groups and the denominator.
    """
    filter_terms = [group_axes(w.ndim, d) == (0,) for d in dims]
    squares = (w * w).sum()
    if attached is not None and any(filter_terms):
        squares = squares + (attached * attached).sum()
    terms = zip(dims, filter_terms, strict=True)
    numerator = sum(group_norms(w, d, attached if is_filter else None).sum() ** 2 for d, is_filter in terms)
    safe = torch.where(squares > 0, squares, torch.ones_like(squares))
    return torch.where(squares > 0, numerator / safe, torch.zeros_like(squares))


def magnitude_slices(
    w: torch.Tensor | np.ndarray, bits: int = 8, cell_bits: int = 2, *, magnitude_bits: int | None = None
) -> tuple[np.ndarray, int]:
    """Cell slices of the dynamic fixed-point magnitude |q|, least significant first: shape (S, *w.shape).

    Default (magnitude_bits None): the format the `quantize` and `bit-slice` passes use by default
    (optimizer.quant): `bits`-bit signed symmetric codes q with a per-tensor fractional length fl from max|w|,
    stored as sign plus a (bits-1)-bit magnitude split into S = ceil((bits-1)/cell_bits) slices.
    magnitude_bits=m: the bit-slice L1 authors' format (quant.magnitude_digits): scale exponent
    s = ceil(log2 max|w|), step 2^(s-m), |q| = round(|w| / step) <= 2^m, S = ceil(m / cell_bits) slices; the
    edge |q| = 2^m puts 2^(m - c(S-1)) in the top slice, as their code does. Returns the slices and fl (the
    step is 2^-fl).
    """
    values = w.detach().cpu().double().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)
    if magnitude_bits is not None:
        exponent = quant.magnitude_exponent(np.abs(values).max(initial=0.0))
        codes = quant.quantize_magnitude(values, magnitude_bits, exponent, deploy=False)
        return quant.magnitude_digits(codes, magnitude_bits, cell_bits), quant.magnitude_frac_length(
            exponent, magnitude_bits)
    fl = quant.frac_length(np.abs(values).max(initial=0.0), bits)
    codes = quant.quantize_dfp(values, bits, fl)
    slices, _ = quant.split_slices(codes, bits, cell_bits, "differential")
    # differential planes hold w⁺ and w⁻, one of which is zero per element: their sum is the magnitude's slice
    return slices.sum(axis=1), fl


def bitslice_l1(
    w: torch.Tensor, bits: int = 8, cell_bits: int = 2, *, magnitude_bits: int | None = None
) -> torch.Tensor:
    """Σ of all magnitude slice values of the DFP-quantized w (methods.md §4), with the paper's gradient.

    Value: the exact slice sum. Gradient (straight-through round and floor, higher slices detached, as in the
    official code): ∂/∂w = sign(w) · 2^fl · Σ_s [slice_s ≠ 0] · 2^(-cell_bits·s), slice 0 being the least
    significant. A slice that is already zero contributes nothing, so this is not a rescaled L1. The scale
    2^fl is treated as a constant. magnitude_bits=8 is the authors' format (see magnitude_slices):

    >>> bitslice_l1(torch.tensor([0.5, 0.3, -0.1]), magnitude_bits=8)   # |q| = 256, 154, 51
    tensor(17.)                             # slices MSB..LSB: 4,0,0,0 + 2,1,2,2 + 0,3,0,3
    """
    slices, fl = magnitude_slices(w, bits, cell_bits, magnitude_bits=magnitude_bits)
    weights = np.exp2(-cell_bits * np.arange(slices.shape[0], dtype=np.float64))
    factor = np.tensordot(weights, (slices != 0).astype(np.float64), axes=1) * np.exp2(fl)
    surrogate = w.abs() * torch.as_tensor(factor, dtype=w.dtype, device=w.device)
    value = torch.as_tensor(float(slices.sum()), dtype=w.dtype, device=w.device)
    return value + (surrogate - surrogate.detach()).sum()


@dataclass(frozen=True)
class Term:
    """One regularizer on a selection of layers, with its own weight.

    kind: which regularizer (see KINDS). weight: its multiplier in the loss.
    layers: module types to select (default Linear and Conv1d/2d/3d). name: regex searched in module names.
    groups: group specs for the group kinds (default filter-wise and channel-wise).
    per_weight: divide each layer's value by its number of weights (the bit-slice and L1 papers' scaling).
    bits, cell_bits, magnitude_bits: the DFP format of bitslice_l1 (magnitude_bits=8: the authors' format).
    """

    kind: Kind
    weight: float
    layers: tuple[type[nn.Module], ...] = PRUNABLE
    name: str | None = None
    groups: tuple[GroupSpec, ...] = ("filter", "channel")
    per_weight: bool = False
    bits: int = 8
    cell_bits: int = 2
    magnitude_bits: int | None = None
    selected: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> dict:
        out = {"kind": self.kind, "weight": self.weight, "layers": list(self.selected), "per_weight": self.per_weight}
        if self.kind in GROUP_KINDS:
            out["groups"] = [list(g) if isinstance(g, tuple) else g for g in self.groups]
        if self.kind == "bitslice_l1":
            out.update(bits=self.bits, cell_bits=self.cell_bits, magnitude_bits=self.magnitude_bits)
        return out


class SparsityRegularizer:
    """Attach regularizer terms to a model; calling it returns Σ_terms weight · Σ_layers R(layer).

    >>> reg = SparsityRegularizer(model, [Term("group_lasso", 1e-3, name=r"^features"), Term("l1", 1e-5)])
    >>> loss = F.cross_entropy(model(x), y) + reg()

    batchnorm: "auto" finds, by tracing the model with torch.fx, the BatchNorm fed by each layer (directly or
    through ReLU / pooling / dropout); a dict {layer name: batchnorm name} gives it explicitly; None ignores
    BatchNorm. The BatchNorm's γ, β and the layer's bias join the filter groups (see the module docstring).
    """

    def __init__(self, model: nn.Module, terms: Term | Sequence[Term], *, batchnorm: str | dict | None = "auto"):
        self.model = model
        terms = [terms] if isinstance(terms, Term) else list(terms)
        if not terms:
            raise UsageError("SparsityRegularizer needs at least one Term")
        needs_structure = any(t.kind in GROUP_KINDS for t in terms)
        norms = batchnorm_map(model, batchnorm) if needs_structure else {}
        self.layers: dict[str, Layer] = {}
        self.terms: list[Term] = []
        for term in terms:
            if term.kind not in KINDS:
                raise UsageError(f"unknown regularizer {term.kind!r}; choose one of {', '.join(KINDS)}")
            chosen = select_layers(model, term.layers, term.name, norms)
            if not chosen:
                raise UsageError(
                    f"regularizer {term.kind}: no layer of type {'/'.join(t.__name__ for t in term.layers)}"
                    + (f" matches name {term.name!r}" if term.name else "")
                )
            for layer in chosen:
                _check_term(term, layer)
                self.layers.setdefault(layer.name, layer)
            self.terms.append(dataclasses.replace(term, selected=tuple(layer.name for layer in chosen)))

    def __call__(self) -> torch.Tensor:
        return sum(value for _, _, value in self.penalties())

    def penalties(self) -> list[tuple[Term, str, torch.Tensor]]:
        """(term, layer name, weighted value) for every term and selected layer."""
        out = []
        for term in self.terms:
            for name in term.selected:
                layer = self.layers[name]
                value = _layer_value(term, layer)
                if term.per_weight:
                    value = value / layer.weight.numel()
                out.append((term, name, term.weight * value))
        return out

    def threshold_masks(self, *, threshold: float | None = None, std_ratio: float | None = None) -> Masks:
        """masks.threshold_masks applied to each layer over what its terms regularize: whole filters and input
        channels where a group term names "filter" or "channel", single weights under an elementwise term.

        A layer whose only group term covers its input channels keeps its filters (e.g. a layer whose outputs
        are a graph output). Shape-wise and custom axis groups have no threshold rule and are not masked.
        """
        wanted: dict[str, list[str]] = {}
        for term in self.terms:
            groups = [g for g in term.groups if g in ("filter", "channel")] if term.kind in GROUP_KINDS else ["element"]
            for name in term.selected:
                wanted.setdefault(name, [])
                wanted[name] += [g for g in groups if g not in wanted[name]]
        masks = Masks()
        for name, groups in wanted.items():
            if groups:
                masks.entries += threshold_masks([self.layers[name]], threshold=threshold, std_ratio=std_ratio,
                                                 groups=groups).entries
        return masks

    def describe(self) -> dict:
        """JSON-able: the terms, and for each selected layer its parameters and group structure."""
        return {
            "terms": [t.describe() for t in self.terms],
            "layers": {name: layer.describe() for name, layer in self.layers.items()},
        }


def _check_term(term: Term, layer: Layer) -> None:
    if term.kind in GROUP_KINDS:
        if not term.groups:
            raise UsageError(f"regularizer {term.kind}: groups is empty; use e.g. ('filter', 'channel')")
        for spec in term.groups:
            group_axes(layer.weight.ndim, spec)
    if term.kind == "bitslice_l1" and not (2 <= term.bits <= 16 and 1 <= term.cell_bits < term.bits):
        raise UsageError(f"bitslice_l1: bits={term.bits}, cell_bits={term.cell_bits}; need 2 <= bits <= 16 and "
                         "1 <= cell_bits < bits")
    if term.kind == "bitslice_l1" and term.magnitude_bits is not None and not 1 <= term.cell_bits <= \
            term.magnitude_bits <= 15:
        raise UsageError(f"bitslice_l1: magnitude_bits={term.magnitude_bits}, cell_bits={term.cell_bits}; need "
                         "1 <= cell_bits <= magnitude_bits <= 15")


def _layer_value(term: Term, layer: Layer) -> torch.Tensor:
    w = layer.weight
    if term.kind == "l1":
        return l1(w)
    if term.kind == "hoyer":
        return hoyer(w)
    if term.kind == "hoyer_square":
        return hoyer_square(w)
    if term.kind == "bitslice_l1":
        return bitslice_l1(w, term.bits, term.cell_bits, magnitude_bits=term.magnitude_bits)
    attached = layer.attached()
    if term.kind == "group_lasso":
        return sum(group_lasso(w, g, attached if group_axes(w.ndim, g) == (0,) else None) for g in term.groups)
    return group_hoyer_square(w, term.groups, attached)
