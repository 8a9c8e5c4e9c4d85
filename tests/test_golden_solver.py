"""
DPM-Solver++ against the official solver (LuChengTHU/dpm-solver at 8acf2bb):
the cases of tests/golden/solver_cases.json drawn by
tests/golden/make_solver_cases.py, through the scripts: the npz within the
stated tolerance of tests/golden/README, and the float samples before the
uint8 cast equal to the official ones up to float rounding (atol 1e-5). The
two visible solver cases of cases.json (uint8 only) are here too.
"""

import os

import pytest

from golden_cases import (
    CASES,
    SOLVER_CASES,
    check_golden_case,
    golden_path,
)

SOLVER_GOLDEN = sorted(SOLVER_CASES) + sorted(n for n in CASES if "dpmpp" in n)


@pytest.mark.parametrize("name", SOLVER_GOLDEN)
def test_golden_case(name, tmp_path):
    check_golden_case(name, tmp_path)


def test_solver_cases_cover_orders_steps_and_guidance():
    """What the official solver's cases exercise (besides the two golden ones)."""
    flags = {name: case["sample_flags"] + " " + case["sag_flags"] for name, case in SOLVER_CASES.items()}
    for name, case in SOLVER_CASES.items():
        assert "--sampler dpmsolver++" in flags[name] and "timestep_respacing" not in case["model_flags"]
        assert os.path.isfile(golden_path(case["expected"]))
    text = " | ".join(flags.values())
    for needed in ("--solver_order 1", "--solver_order 3", "--skip_type logSNR", "--solver_steps 12",
                   "--solver_steps 7", "--classifier_guidance True"):
        assert needed in text, needed
