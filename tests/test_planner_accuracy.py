"""The planner's predicted peak RAM against the measured one, on the CPU, under each preset:
for a tiny pipeline and for one with a 1.2 GiB transformer. Measured, not mocked: each run is
a fresh process (tests/planner_worker.py) whose peak RSS comes from the kernel (VmHWM)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import families
from presets import list_presets

WORKER = Path(__file__).resolve().parent / "planner_worker.py"
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def big_flux(tmp_path_factory):
    return families.build_big_flux(tmp_path_factory.mktemp("big") / "flux")


def measure(folder: Path, preset: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(WORKER), str(folder), preset, "flux"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", list_presets()[:5])
def test_tiny_pipeline_peak_ram_is_predicted(tiny_family, preset):
    run = measure(tiny_family("flux"), preset)
    assert abs(run["predicted"] / run["measured"] - 1) <= TOLERANCE, run


@pytest.mark.parametrize("preset", list_presets()[:5])
def test_large_pipeline_peak_ram_is_predicted(big_flux, preset):
    run = measure(big_flux, preset)
    error = run["predicted"] / run["measured"] - 1
    if preset == "disk":
        # The planner predicts the bound the core keeps: the running group plus `prefetch`
        # staged ahead. When reads are slower than compute (here: bf16 files cast to float32
        # on 2 cores) the window is rarely full, so the measured peak may sit up to about one
        # block below the bound; it must never sit above it by more than the tolerance.
        assert -TOLERANCE <= error <= 0.40, run
    else:
        assert abs(error) <= TOLERANCE, run
    # Beyond the bound: above the baseline too, where the presets differ, within 10%.
    # Not for the disk tier: its measured share (250-330 MB) moves run to run with how full
    # the prefetch window and the heap get.
    if preset != "disk":
        above = (run["predicted"] - run["baseline"]) / (run["measured"] - run["baseline"]) - 1
        assert abs(above) <= 0.10, run
