"""How a Reshape (or Flatten) carries a channel axis into its output.

Row-major reshapes keep element order, so the dims split into aligned blocks whose products match on both
sides (`[N, C, H, W] -> [N, C*H*W]`: blocks `[N]|[N]` and `[C, H, W]|[C*H*W]`). Inside the block holding the
channel axis we lay the atom ids out on the input dims, reshape them onto the output dims, and look at which
output axes the ids vary along:

- one axis: the channels now sit on it, possibly repeated (`C*H*W` features: each channel is a run of H*W);
- several axes (a channel shuffle `[N, C, H, W] -> [N, g, C/g, H, W]`, attention heads `[.., D] -> [.., H, Dh]`):
  the channels sit on the innermost one, and atoms that share an inner index are tied so that every removal
  keeps the block rectangular (the shuffle removes channel j of every group; heads lose the same dims).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from passes.graph.channels import Space
from passes.graph.ir import Dim


@dataclass
class Regrouped:
    """The output space and the atom columns that must be tied (each row of `ties` is one unit)."""

    space: Space
    ties: list[np.ndarray]


def _signature(dims: tuple[Dim, ...]) -> tuple[int, Counter] | None:
    product, symbols = 1, Counter()
    for d in dims:
        if isinstance(d, int):
            product *= d
        elif isinstance(d, str):
            symbols[d] += 1
        else:
            return None
    return product, symbols


def _block(in_dims: tuple[Dim, ...], out_dims: tuple[Dim, ...], axis: int) -> tuple[int, int, int, int] | str:
    """(in_lo, in_hi, out_lo, out_hi): the smallest aligned block of dims holding input `axis`, or why none."""
    for in_lo in range(axis, -1, -1):
        lo_sig = _signature(in_dims[:in_lo])
        out_lo = max((k for k in range(len(out_dims) + 1) if _signature(out_dims[:k]) == lo_sig), default=None)
        if lo_sig is None or out_lo is None:
            continue
        for in_hi in range(axis + 1, len(in_dims) + 1):
            hi_sig = _signature(in_dims[:in_hi])
            out_hi = next((k for k in range(out_lo + 1, len(out_dims) + 1) if _signature(out_dims[:k]) == hi_sig), None)
            if hi_sig is not None and out_hi is not None:
                return in_lo, in_hi, out_lo, out_hi
    return "the channel axis does not map onto a block of output dimensions"


def regroup(in_dims: tuple[Dim, ...], out_dims: tuple[Dim, ...], space: Space, find) -> Regrouped | str:
    """Map `space` (on `in_dims`) onto `out_dims`. `find` maps atom ids to union-find roots. Returns why on failure."""
    located = _block(in_dims, out_dims, space.axis)
    if isinstance(located, str):
        return located
    in_lo, in_hi, out_lo, out_hi = located
    block_in, block_out = in_dims[in_lo:in_hi], out_dims[out_lo:out_hi]
    if not all(isinstance(d, int) for d in block_in + block_out):
        return "the dimensions around the channel axis are not static"
    local = space.axis - in_lo
    layout = [1] * len(block_in)
    layout[local] = len(space)
    ids = np.broadcast_to(find(space.ids).reshape(layout), block_in).reshape(block_out)
    values = np.broadcast_to(space.values.reshape(layout), block_in).reshape(block_out)
    varying = [k for k in range(ids.ndim) if ids.shape[k] > 1 and np.any(np.diff(ids, axis=k) != 0)]
    inner = varying[-1] if varying else ids.ndim - 1
    # one representative per inner index: every other axis is either constant or tied below
    index = tuple(slice(None) if k == inner else 0 for k in range(ids.ndim))
    columns = np.moveaxis(ids, inner, 0).reshape(ids.shape[inner], -1)
    value_columns = np.moveaxis(values, inner, 0).reshape(ids.shape[inner], -1)
    same = np.all(value_columns == value_columns[:, :1], axis=1)
    new_values = np.where(same, value_columns[:, 0], np.nan)
    ties = [row for row in columns if len(varying) > 1 and np.any(row != row[0])]
    return Regrouped(Space(out_lo + inner, ids[index].copy(), new_values), ties)


def resolve_target(in_dims: tuple[Dim, ...], target: Sequence[int | Dim], allowzero: bool) -> tuple[Dim, ...] | str:
    """The output dims of Reshape(target) on `in_dims`: 0 copies the input dim, -1 takes what is left. Entries
    computed at run time come as the dim shape inference found for them (a symbol, or None if unknown)."""
    dims: list[Dim] = []
    for i, t in enumerate(target):
        if not isinstance(t, (int, np.integer)):
            dims.append(t)
            continue
        t = int(t)
        if t == 0 and not allowzero:
            if i >= len(in_dims):
                return "Reshape copies a dimension the input does not have"
            dims.append(in_dims[i])
        else:
            dims.append(t)
    if dims.count(-1) > 1:
        return "Reshape target has more than one -1"
    if -1 in dims:
        known = [d for d in dims if d != -1]
        in_sig, out_sig = _signature(in_dims), _signature(tuple(known))
        if in_sig is None or out_sig is None:
            return "Reshape infers a dimension from unknown dimensions"
        left = in_sig[1] - out_sig[1]
        if out_sig[1] - in_sig[1] or in_sig[0] % max(out_sig[0], 1):
            return "Reshape infers a dimension it cannot resolve statically"
        ratio = in_sig[0] // max(out_sig[0], 1)
        if not left:
            dims[dims.index(-1)] = ratio
        elif sum(left.values()) == 1 and ratio == 1:
            dims[dims.index(-1)] = next(iter(left))
        else:
            return "Reshape infers a dimension that mixes symbolic dimensions"
    return tuple(dims)
