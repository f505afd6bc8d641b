"""The long CLI fuzz run (not in CI): `python -m tests.fuzz_long --cases 5000 [--seed 0]`.

Draws cases uniformly over seed models x mutations x commands with fresh mutation seeds, runs each in-process
(tests/fuzz_engine.py), prints progress every 500 cases and the tally at the end, plus one example per kind of
problem found. Exit status 1 when any case broke a promise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.fuzz_engine import COMMANDS, MUTATIONS, SEEDS, Case, Tally, run_case

    rng = np.random.default_rng(args.seed)
    models, mutations = sorted(SEEDS), sorted(MUTATIONS)
    tally = Tally()
    started = time.perf_counter()
    for index in range(args.cases):
        case = Case(models[rng.integers(len(models))], mutations[rng.integers(len(mutations))],
                    int(rng.integers(2**31 - 1)), COMMANDS[rng.integers(len(COMMANDS))])
        tally.add(run_case(case))
        if (index + 1) % 500 == 0:
            print(f"{index + 1} cases, {time.perf_counter() - started:.0f} s: {tally.line()}", flush=True)
    print(tally.line())
    print(f"{args.cases} cases in {time.perf_counter() - started:.0f} s (seed {args.seed})")
    for kind, verdict in tally.examples.items():
        print(f"example of {kind}: {verdict.case} exit {verdict.code}: {verdict.stderr.strip()[-300:]}")
    return 1 if sum(tally.problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
