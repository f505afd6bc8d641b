"""Figures as PNG bytes (matplotlib, imported lazily): passes hand them to the pipeline as artifacts.

    content = slice_sparsity_png(layers, cell_bits=2, sign="differential")
    content[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from optimizer.errors import UsageError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str | Path) -> Path:
    """The `--plot` path, checked before any work: a .png name in a folder that exists (else UsageError).

        check_plot_path("sweep.png")  # -> Path("sweep.png")
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: the plot is written as PNG; name a .png file")
    if not path.resolve().parent.is_dir():
        raise UsageError(f"--plot {path}: directory {path.parent} does not exist")
    return path


def png_bytes(figure, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=dpi)
    finally:
        _pyplot().close(figure)
    return buffer.getvalue()


def slice_sparsity_png(layers: list[dict], *, cell_bits: int, sign: str) -> bytes:
    """Grouped bars: one group per bit-slice layer row, one bar per slice (LSB first); rows as the pass reports them
    (`node`, `weight`, `slices`, `slice_sparsity`)."""
    plt = _pyplot()
    width = max(layer["slices"] for layer in layers)
    positions = np.arange(len(layers))
    bar = 0.8 / width
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(layers) + 2), 4.0))
    for s in range(width):
        values = [layer["slice_sparsity"][s] if s < layer["slices"] else 0.0 for layer in layers]
        axes.bar(positions + (s - (width - 1) / 2) * bar, values, bar, label=f"slice {s}")
    axes.set_xticks(positions, [layer["node"] or layer["weight"] for layer in layers], rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("slice sparsity (fraction of zero digits)")
    axes.set_title(f"bit-slice sparsity: {cell_bits}-bit cells, {sign} sign (slice 0 = LSB)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return png_bytes(figure)
