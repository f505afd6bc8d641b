"""One Decline type, always reported; one parse_options for passes and runtimes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.declines import Decline
from optimizer.errors import UsageError
from optimizer.options import parse_options
from passes import PassContext
from passes.cleanup import Cleanup


@dataclass(frozen=True)
class Demo:
    ratio: float = 0.5
    mode: Literal["fast", "exact"] = "fast"
    limit: int | None = None
    flag: bool = False
    pair: tuple[int, int] = field(default=(1, 1), metadata={"parse": lambda v: tuple(int(p) for p in v.split("/"))})


def test_parse_options_types_and_errors():
    parsed = parse_options(Demo, {"ratio": "0.25", "mode": "exact", "limit": "auto", "flag": "yes", "pair": "2/3"},
                           where="pass demo")
    assert parsed == Demo(0.25, "exact", None, True, (2, 3))
    assert parse_options(Demo, {"limit": "7"}, where="x").limit == 7
    for values, message in [
        ({"ratoi": 1}, "pass demo: unknown option 'ratoi'; options are: ratio, mode, limit, flag, pair"),
        ({"mode": "slow"}, "pass demo: option mode='slow' is not one of fast, exact"),
        ({"limit": "1.5"}, "pass demo: option limit='1.5' is not a valid int"),
        ({"flag": "maybe"}, "pass demo: option flag='maybe' is not a valid bool"),
        ({"pair": "2/x"}, "pass demo: option pair='2/x' is not a valid value"),
    ]:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            parse_options(Demo, values, where="pass demo")


def test_passes_and_runtimes_share_the_parser():
    from runtimes.reram.config import parse_options as reram_options
    from runtimes.tvm.options import parse_options as tvm_options

    assert tvm_options({"sparse": "never", "threads": "2", "block": "16x1"}).threads == 2
    assert reram_options({"adc_bits": "3/3/3/1", "fast_path": "off"}).adc_bits == (3, 3, 3, 1)
    with pytest.raises(UsageError, match="runtime tvm: option sparse='x' is not one of auto, always, never"):
        tvm_options({"sparse": "x"})
    with pytest.raises(UsageError, match="runtime reram: option sign='x' is not one of differential"):
        reram_options({"sign": "x"})
    with pytest.raises(UsageError, match="pass cleanup: option fold_batchnorm='x' is not a valid bool"):
        Cleanup.from_spec({"fold_batchnorm": "x"})


def test_cleanup_reports_every_batchnorm_it_cannot_fold():
    """A BatchNormalization reading a graph input has no producer to fold into: declined, with a code."""
    channels = 3
    params = [numpy_helper.from_array(np.full(channels, v, np.float32), n)
              for n, v in (("g", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))]
    graph = helper.make_graph([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn")],
                              "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = Cleanup().run(model, PassContext())
    assert report["batchnorm_left"] == 1
    assert report["declined"] == [Decline("bn", "BatchNormalization", "no-producer",
                                          "its input is a graph input, not a layer output").as_report()]
