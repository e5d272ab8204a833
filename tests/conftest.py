"""Shared fixtures: the real slides in ../shared (skipped when absent) and a tiny synthetic cohort."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wsi"
CLI = str(Path(sys.executable).parent / "wsi-study")


@pytest.fixture(scope="session")
def shared():
    "The folder of real slides shipped beside the repository on developer and CI machines."
    if not SHARED.is_dir():
        pytest.skip("../shared/data/wsi is absent (a user's fresh clone); real-slide tests skipped")
    return SHARED


def run_cli(*args, cwd=None, timeout=600):
    "Run the installed `wsi-study` console script; returns the CompletedProcess (text)."
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    "A 4-patient synthetic cohort with 1024-px slides (seconds to make), plus the real CMU slide."
    from wsi_study.synthetic import make_demo_cohort
    out = tmp_path_factory.mktemp("tiny")
    return make_demo_cohort(out, patients=4, size=1024, seed=1, progress=False,
                            real_slides=[ROOT / "data" / "wsi" / "cmu_small_region.svs"])
