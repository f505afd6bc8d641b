"""`optimize compare`: max abs/rel error, cosine and top-1 agreement between two models' outputs (ONNX Runtime)."""

from __future__ import annotations

import click

from optimizer.commands.common import NON_NEGATIVE, POSITIVE, debug_option


@click.command("compare")
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz of inputs (default: seeded random)")
@click.option("--batch", type=POSITIVE, default=32, show_default=True, help="samples of random inputs")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@debug_option
def command(model_a, model_b, calibration, batch, seed, debug):
    """Max abs/rel error, cosine and top-1 agreement between two models' outputs (ONNX Runtime)."""
    from optimizer.console import print_compare
    from optimizer.data import load_npz, random_inputs, split_labels
    from optimizer.model import load_model
    from optimizer.verify import class_score_outputs, compare, run_ort

    a, b = load_model(model_a), load_model(model_b)
    feeds = split_labels(load_npz(calibration, a))[0] if calibration else random_inputs(a, batch, seed)
    result = compare(run_ort(a, feeds), run_ort(b, feeds), class_score_outputs(a))
    if "failure" in result:
        from optimizer.errors import VerificationError

        raise VerificationError(f"compare: {result['failure']}")
    print_compare(result)
