"""Hypothesis fuzzing of the CLI (in-process, tiny models): every case ends with exit 0/1/2, one error line, no
traceback or internal error, no partial output, and the input's bytes unchanged. The long run is tests/fuzz_long.py."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_engine import COMMANDS, MUTATIONS, SEEDS, Case, Tally, run_case

CASES = 320

cases = st.builds(Case, seed_model=st.sampled_from(sorted(SEEDS)), mutation=st.sampled_from(sorted(MUTATIONS)),
                  seed=st.integers(0, 2**31 - 1), command=st.sampled_from(COMMANDS))


def test_fuzz_cli_tally(capsys):
    tally = Tally()

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def one(case):
        verdict = run_case(case)
        tally.add(verdict)
        assert not verdict.problems, (case, verdict.problems, verdict.stderr[-500:])

    one()
    with capsys.disabled():
        print(f"\n{tally.line()}")
    assert tally.cases >= 300
    assert all(tally.problems[kind] == 0 for kind in Tally.KINDS)
    assert set(tally.codes) <= {0, 1, 2} and len(tally.codes) == 3  # the cases reach success, failure and refusal
