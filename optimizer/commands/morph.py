"""`optimize morph`: morph samples with a MoLe KEY: the data provider's side."""

from __future__ import annotations

import click

from optimizer.commands.common import check_paths, debug_option
from optimizer.errors import UsageError


@click.command("morph")
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False), help=".npz of samples")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False), help=".npz to write")
@debug_option
def command(key, input_path, output_path, debug):
    """Morph samples with a MoLe KEY (written by `--pass mole:key_out=KEY`): the data provider's side.

    The key's input array becomes `<input>_morphed`; other arrays (labels) are copied unchanged.
    """
    from optimizer.data import load_npz
    from optimizer.io_json import write_npz
    from optimizer.morph import load_key, morph
    from passes.mole import morphed_name

    check_paths(reads=[("the key", key), ("--input", input_path)], writes=[("--output", output_path)])
    secret = load_key(key)
    data = load_npz(input_path)
    if secret.input_name not in data:
        raise UsageError(f"{input_path}: has no array {secret.input_name!r}, the input {key} morphs "
                         f"(file has: {', '.join(data) or 'nothing'})")
    arrays = {name: value for name, value in data.items() if name != secret.input_name}
    arrays[morphed_name(secret.input_name)] = morph(data[secret.input_name], secret)
    write_npz(output_path, arrays)
    click.echo(f"wrote {output_path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))
