"""Per layer: dense kernel or BSR, and which block shape, from the weight's block sparsity and the row count.

The thresholds are the break-even points measured for the BSR kernel against ONNX Runtime's dense GEMM
(reference/tvm-notes.md, section 3): with blocks that fill a vector register, BSR pays from ~50% block sparsity
when a tile has several rows to reuse each weight vector, from ~70% for a single row (GEMV, memory bound).
Narrower blocks waste vector lanes and need more sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtimes.tvm.kernels.bsr import BlockShape, block_density

CANDIDATE_BLOCKS = (BlockShape(16, 1), BlockShape(8, 8), BlockShape(8, 1), BlockShape(4, 4), BlockShape(4, 1))


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # "dense" | "bsr"
    block: BlockShape | None
    block_sparsity: float | None  # of the chosen block shape, or of the best candidate when dense was chosen
    reason: str


def choose_kernel(
    w_out_in: np.ndarray, rows: int, *, sparse: str, lanes: int, block: BlockShape | None, groups: int = 1
) -> KernelChoice:
    """`w_out_in` is the weight as [out, in] (ONNX order of the input axis); `rows` the GEMM's row count."""
    if sparse == "never":
        return KernelChoice("dense", None, None, "sparse=never")
    if groups != 1:
        return KernelChoice("dense", None, None, f"grouped conv (groups={groups}) has no BSR kernel")
    candidates = [block] if block is not None else list(CANDIDATE_BLOCKS)
    scored = []
    for shape in candidates:
        density = block_density(w_out_in, shape)
        scored.append((density * _lane_waste(shape, lanes), -shape.rows * shape.cols, shape, density))
    scored.sort(key=lambda item: item[:2])
    _, _, best, density = scored[0]
    sparsity = 1.0 - density
    if sparse == "always":
        return KernelChoice("bsr", best, sparsity, "sparse=always")
    needed = _break_even(best, rows, lanes)
    if sparsity >= needed:
        return KernelChoice("bsr", best, sparsity, f"block sparsity {sparsity:.2f} >= break-even {needed:.2f}")
    reason = f"best block {best}: sparsity {sparsity:.2f} < break-even {needed:.2f}"
    return KernelChoice("dense", None, sparsity, reason)


def _lane_waste(block: BlockShape, lanes: int) -> float:
    """Vector work per useful element: a 4-row block in an 8-lane register wastes half of it."""
    vectors = -(-block.rows // lanes)
    return vectors * lanes / block.rows


def _break_even(block: BlockShape, rows: int, lanes: int) -> float:
    """Block sparsity from which the BSR kernel beats the dense one."""
    full = block.rows >= lanes
    half = block.rows * 2 >= lanes
    if rows >= 8:
        return 0.5 if full else 0.7 if half else 0.8
    if rows >= 2:
        return 0.6 if full else 0.75 if half else 0.85
    return 0.7 if full else 0.8 if half else 0.9
