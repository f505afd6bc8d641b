"""The one table of op handlers, keyed by ONNX op type (and by opset where an op's semantics changed).

Every handler is registered through `register_handler`, which checks it at that point: a Handler instance,
at least one op type, every op type a real ONNX operator, `propagate` implemented, no (op, opset) pair
registered twice. An op without a handler gets `UnsupportedHandler`: the channels reaching it are blocked with
a reason, and the analysis goes on.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from passes.graph.channels import ChannelState
from passes.graph.handler import Handler
from passes.graph.ops_elementwise import (
    BatchNormHandler,
    ElementwiseHandler,
    GroupNormHandler,
    GroupNormHandler_21,
    InstanceNormHandler,
    LayerNormHandler,
    SoftmaxHandler,
    UnaryHandler,
)
from passes.graph.ops_layout import (
    ConcatHandler,
    ExpandHandler,
    FlattenHandler,
    GatherHandler,
    ReshapeHandler,
    SliceHandler,
    SplitHandler,
    SqueezeHandler,
    TileHandler,
    TransposeHandler,
)
from passes.graph.ops_recurrent import GRUHandler, LSTMHandler, RNNHandler
from passes.graph.ops_spatial import PadHandler, PoolHandler, ReduceHandler, ResizeHandler, ShapeHandler, SizeHandler
from passes.graph.ops_weights import ConvHandler, ConvTransposeHandler, GemmHandler, MatMulHandler


class UnsupportedHandler(Handler):
    """Any op without a handler (or outside the default ONNX domain)."""

    def propagate(self, node: gs.Node, state: ChannelState) -> None:
        domain = f"{node.domain}::" if node.domain not in (None, "", "ai.onnx") else ""
        state.block_node(node, f"{domain}{node.op} is not supported by the channel analysis", code="unsupported-op")


UNSUPPORTED = UnsupportedHandler()
_TABLE: dict[str, dict[int, Handler]] = {}


def register_handler(handler: Handler) -> Handler:
    """Add a handler to the table (also the way to extend the analysis with a new op)."""
    if not isinstance(handler, Handler):
        raise TypeError(f"{handler!r} is not a Handler instance")
    if not handler.op_types:
        raise ValueError(f"{type(handler).__name__} declares no op_types")
    if type(handler).propagate is Handler.propagate:
        raise TypeError(f"{type(handler).__name__} does not implement propagate")
    for op_type in handler.op_types:
        if not onnx.defs.has(op_type):
            raise ValueError(f"{type(handler).__name__}: {op_type!r} is not an ONNX operator")
        variants = _TABLE.setdefault(op_type, {})
        if handler.since_version in variants:
            raise ValueError(
                f"{op_type} (since opset {handler.since_version}) already has a handler: "
                f"{type(variants[handler.since_version]).__name__}"
            )
        variants[handler.since_version] = handler
    return handler


def handler_for(node: gs.Node, opset: int) -> Handler:
    """The handler for a node: the variant with the highest `since_version` not above the model's opset."""
    if node.domain not in (None, "", "ai.onnx"):
        return UNSUPPORTED
    variants = _TABLE.get(node.op, {})
    eligible = [v for v in variants if v <= opset]
    return variants[max(eligible)] if eligible else UNSUPPORTED


def supported_ops() -> list[str]:
    return sorted(_TABLE)


for _handler in (
    ConvHandler(),
    ConvTransposeHandler(),
    GemmHandler(),
    MatMulHandler(),
    UnaryHandler(),
    ElementwiseHandler(),
    BatchNormHandler(),
    InstanceNormHandler(),
    GroupNormHandler(),
    GroupNormHandler_21(),
    LayerNormHandler(),
    SoftmaxHandler(),
    ConcatHandler(),
    SplitHandler(),
    SliceHandler(),
    GatherHandler(),
    TransposeHandler(),
    ReshapeHandler(),
    FlattenHandler(),
    SqueezeHandler(),
    ExpandHandler(),
    TileHandler(),
    PoolHandler(),
    PadHandler(),
    ResizeHandler(),
    ReduceHandler(),
    ShapeHandler(),
    SizeHandler(),
    LSTMHandler(),
    GRUHandler(),
    RNNHandler(),
):
    register_handler(_handler)
