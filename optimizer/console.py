"""Terminal rendering (rich): the same facts as the JSON reports, as tables."""

from __future__ import annotations

import dataclasses

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

# markup off: node and tensor names come from the model, and a name such as "[/x]" must print, not crash rich
console = Console(highlight=False, soft_wrap=False, width=140, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # a warning stays one line


def _num(value, fmt: str = ",") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and fmt == ",":
        return f"{value:,.0f}"
    return format(value, fmt)


def progress_printer():
    def on_pass(name: str, index: int, total: int) -> None:
        err_console.print(f"[{index + 1}/{total}] running {name}…", style="dim")

    return on_pass


def print_pipeline_report(report: dict) -> None:
    table = Table(title="passes", title_justify="left")
    for column in ("pass", "contract", "seconds", "max abs err", "max rel err", "cosine", "top-1 agree"):
        table.add_column(column, justify="left" if column in ("pass", "contract") else "right")
    for entry in report["passes"]:
        v = entry["verify"]
        table.add_row(entry["name"], entry["contract"], f"{entry['seconds']:.3f}", f"{v['max_abs_err']:.2e}",
                      f"{v['max_rel_err']:.2e}", f"{v['cosine']:.6f}",
                      "-" if v["top1_agreement"] is None else f"{v['top1_agreement']:.4f}")
    console.print(table)
    for entry in report["passes"]:
        summary = _scalar_details(entry["details"])
        if summary:
            console.print(Text.assemble((entry["name"], "bold"), f": {summary}"))
        if isinstance(entry["details"].get("groups"), list):
            print_groups(entry["name"], entry["details"]["groups"])
    stats = Table(title="model", title_justify="left")
    for column in ("", "params", "MACs", "bytes", "nodes", "weight sparsity"):
        stats.add_column(column, justify="right")
    before, after = report["input"], report["output"]
    for label, s in (("input", before), ("output", after)):
        stats.add_row(label, _num(s["params"]), _num(s["macs"]), _num(s["bytes"]), _num(s["nodes"]),
                      f"{s['weight_sparsity']:.3f}")
    stats.add_row("output/input", *[
        f"{after[k] / before[k]:.3f}" if before[k] and after[k] is not None else "-"
        for k in ("params", "macs", "bytes", "nodes")
    ], "")
    console.print(stats)
    for label, s in (("input", before), ("output", after)):
        if s.get("macs_note"):
            console.print(f"{label} MACs {s['macs_note']}")
    if "eval" in report:
        e = report["eval"]
        console.print(f"top-1 accuracy: input {e['input']:.4f} → output {e['output']:.4f} "
                      f"({(e['output'] - e['input']) * 100:+.2f} pt)")
    if "gate" in report:
        console.print(gate_line(report["gate"]))
    for warning in report.get("warnings", []):
        err_console.print(Text.assemble(("warning:", "yellow"), f" {warning}"))


GROUP_ROWS = 20  # longer group tables are folded: the rows that changed or declined first, then a count


def print_groups(pass_name: str, groups: list[dict], limit: int = GROUP_ROWS) -> None:
    """The per-group table of structured-sparse: pruned / unchanged / declined, channels, members, reason."""
    if not groups:
        return
    order = {"pruned": 0, "declined": 1}
    shown = sorted(groups, key=lambda g: order.get(g.get("status"), 2))[:limit]
    table = Table(title=f"{pass_name}: channel groups", title_justify="left")
    for column in ("group", "status", "channels", "members", "note"):
        table.add_column(column)
    for group in shown:
        members = group.get("members", [])
        nodes = sorted({m["node"] or m["tensor"] for m in members})
        listed = ", ".join(nodes[:4]) + (f" (+{len(nodes) - 4})" if len(nodes) > 4 else "")
        table.add_row(group.get("name", "?"), group.get("status", "?"),
                      f"{group.get('channels_before', '?')} → {group.get('channels_after', '?')}", listed,
                      group.get("reason", ""))
    console.print(table)
    if len(groups) > len(shown):
        rest = groups_by_status(groups, exclude=shown)
        console.print(f"… and {len(groups) - len(shown)} more groups ({rest}); --report has all of them", style="dim")


def groups_by_status(groups: list[dict], exclude: list[dict] = ()) -> str:
    counts: dict[str, int] = {}
    for group in groups:
        if not any(group is e for e in exclude):
            counts[group.get("status", "?")] = counts.get(group.get("status", "?"), 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def print_runtime_summary(runtime: str, described: dict) -> None:
    """After `run`: the figures a runtime reports besides outputs (reram: energy, latency, area, ADC activity)."""
    if runtime != "reram" or not described:
        return
    energy = described["energy_pj"]
    parts = [f"energy {energy['total'] / 1e6:.6g} uJ"]
    if described.get("adc_energy_share") is not None:
        parts.append(f"ADC share {described['adc_energy_share']:.1%}")
    if described.get("pj_per_mac") is not None:
        parts.append(f"{described['pj_per_mac']:.4g} pJ/MAC")
    parts.append(f"latency {described['latency_ns'] / 1e3:.6g} us")
    console.print("reram cost (this run, ISAAC-derived cost model): " + ", ".join(parts))
    console.print(f"reram hardware: area {described['area_mm2']:.4g} mm2, {described['arrays']} crossbar arrays, "
                  f"{described['macs']:,} MACs on crossbars")
    conversions = described["adc_conversions"]
    console.print(f"ADC: {conversions:,} conversions, {described['saturated_conversions']:,} saturated "
                  f"({described['saturation_rate']:.4%})"
                  + (f"; top-1 accuracy {described['accuracy']:.4f}" if described.get("accuracy") is not None else ""))
    layers = described.get("layers", [])
    if layers:
        table = Table(title="reram layers", title_justify="left")
        for column in ("layer", "op", "k x m", "arrays", "ADC bits", "energy uJ", "latency us", "saturated"):
            table.add_column(column, justify="left" if column in ("layer", "op") else "right")
        for row in layers[:GROUP_ROWS]:
            table.add_row(row["name"], row["op"], f"{row['k']}x{row['m']}", str(row["arrays"]),
                          "/".join(map(str, row["adc_bits"])), f"{row['energy_pj']['total'] / 1e6:.4g}",
                          f"{row['latency_ns'] / 1e3:.4g}", f"{row['saturation_rate']:.3%}")
        console.print(table)
        if len(layers) > GROUP_ROWS:
            console.print(f"… and {len(layers) - GROUP_ROWS} more layers; --report has all of them", style="dim")
    declined = described.get("digital", {}).get("declined", [])
    for d in declined[:5]:
        console.print(f"digital (not on crossbars): {d['node']} ({d['op']}): {d['reason']}", style="dim")


def gate_line(gate: dict) -> str:
    """`speed gate (ort, 1 thread, batch 1): 1.84x (2.1 ms -> 1.14 ms); structured-sparse 1.84x`."""
    passes = "; ".join(f"{p['name']} {p['ratio']:.2f}x" for p in gate["passes"]) or "no pass claims a speedup"
    return (f"speed gate ({gate['runtime']}, {gate['threads']} thread(s), batch {gate['batch']}): "
            f"{gate['ratio']:.2f}x ({gate['before_ms']:.4g} ms -> {gate['after_ms']:.4g} ms); {passes}")


def _scalar_details(details: dict) -> str:
    """The pass's one-number facts (counts, ratios); per-layer lists stay in the JSON report."""
    parts = []
    for key, value in details.items():
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            parts.append(f"{key}={value}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
    return ", ".join(parts)


def print_passes() -> None:
    from optimizer.options import describe_type
    from passes import all_passes
    from passes.base import option_fields

    for name, cls in all_passes().items():
        table = Table(title=f"{name} ({cls.contract}) — {cls.summary}", title_justify="left", show_edge=False)
        table.add_column("option")
        table.add_column("type")
        table.add_column("default")
        table.add_column("help")
        for f, tp in option_fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            table.add_row(f.name, describe_type(tp), repr(default), f.metadata.get("help", ""))
        console.print(table)
        console.print()


def print_inspect(facts: dict) -> None:
    s = facts["stats"]
    macs = f"MACs {s['macs_note']}" if s["macs"] is None else f"{s['macs']:,} MACs"
    if s["macs"] is not None and s.get("macs_note"):
        macs += f" ({s['macs_note']})"
    console.print(f"{facts['model']}: {s['params']:,} params, {macs}, {s['bytes']:,} bytes, "
                  f"{s['nodes']} nodes, weight sparsity {s['weight_sparsity']:.3f}")
    table = Table(title="layers", title_justify="left")
    for column in ("node", "op", "weight shape", "params", "MACs", "sparsity", "zero out-ch"):
        table.add_column(column, justify="left" if column in ("node", "op", "weight shape") else "right")
    for r in facts["layers"]:
        shape = "x".join(map(str, r["weight_shape"])) if r["weight"] else "(activations)"
        macs = _num(r["macs"]) if r["macs"] is not None else "unknown"
        table.add_row(r["node"], r["op"], shape, _num(r["params"]), macs,
                      f"{r['sparsity']:.3f}", f"{r['zero_channels']}/{r['channels']}")
    console.print(table)
    if "activations" in facts:
        act = Table(title="activations (measured on --calibration)", title_justify="left")
        rows = facts["activations"]
        columns = [k for k in rows[0] if k not in ("shape",)] if rows else []
        for column in columns:
            act.add_column(column)
        for r in rows:
            act.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns])
        console.print(act)


def print_bench(results: dict) -> None:
    rows = results["results"]
    threads = {r["threads"] for r in rows}
    table = Table(title=f"bench (threads fixed at {', '.join(map(str, sorted(threads)))})", title_justify="left")
    for column in ("model", "runtime", "batch", "median ms", "p90 ms", "load RSS +MB", "time ratio", "speedup"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["runtime"], "-", "failed", "-", "-", "-", "-")
            continue
        table.add_row(r["model"], r["runtime"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}",
                      f"{r['rss_delta_mb']:.1f}", f"{r['ratio']:.3f}", f"{1 / r['ratio']:.2f}x" if r["ratio"] else "-")
    console.print(table)
    console.print("time ratio = median / first working row's median; speedup = its inverse; "
                  f"load RSS +MB = {results.get('memory', 'memory')}", style="dim")
    for r in rows:
        if "error" in r:
            err_console.print(Text.assemble(("failed:", "red"), f" {r['model']} on {r['runtime']}: {r['error']}"))


def print_compare(result: dict) -> None:
    for key, value in result.items():
        click.echo(f"{key:16s} {value if value is None or isinstance(value, list) else f'{value:.6g}'}")
