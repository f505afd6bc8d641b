"""Sculpt core: model IO, the verified pass pipeline, reports and the `optimize` CLI.

Importing this package stays light (no torch, no tvm); heavy modules load when a command needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["optimize", "__version__"]


def optimize(model_or_path, passes, **kwargs):
    """Run passes on a model (ModelProto or path) and return (ModelProto, report). See optimizer.pipeline.optimize."""
    from optimizer.pipeline import optimize as run_pipeline

    return run_pipeline(model_or_path, passes, **kwargs)
