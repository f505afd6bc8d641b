"""Channel-dependency analysis over ONNX graphs, shared by the passes that change channel counts.

    analysis = analyze(model)                   # spaces, ties, blocks, groups (groups.py)
    scores = unit_scores(analysis, "l1")        # importance per unit (importance.py)
    decisions = choose(analysis, ...)           # which units go (selection.py)
    model, notes = apply_removal(analysis, removed_roots(decisions))   # slice every member (prune.py)

Per-op knowledge lives in one handler class per op kind, all in the table of `handlers.py`.

`qdq.py` is the other shared piece: the QuantizeLinear/DequantizeLinear surgery of the quantize and bit-slice passes.
"""

from passes.graph.groups import Analysis, Group, analyze
from passes.graph.handlers import handler_for, register_handler, supported_ops
from passes.graph.prune import apply_removal

__all__ = ["Analysis", "Group", "analyze", "apply_removal", "handler_for", "register_handler", "supported_ops"]
