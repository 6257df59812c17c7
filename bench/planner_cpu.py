"""The planner's predicted peak RAM against the measured one, per preset, on this CPU.

Two pipelines: the tiny FLUX of tests/families.py, and the same with a 1.2 GiB bf16
transformer (``families.build_big_flux``). Each row is a fresh process
(tests/planner_worker.py): imports first, then the baseline RSS, then one load + generation
under the preset (vram_limit 0, float32 on the CPU); the peak is the kernel's VmHWM.

    python bench/planner_cpu.py [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import describe_machine, machine_info, md_table  # noqa: E402

OUT = ROOT / "bench" / "out" / "planner"
MIB = 2**20


def measure(folder: Path, preset: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOWVRAM_CALIBRATION": str(OUT / "calibration.json")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "planner_worker.py"), str(folder), preset, "flux"],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    import families
    from presets import list_presets
    OUT.mkdir(parents=True, exist_ok=True)
    folders = {"tiny FLUX (1 MB)": OUT / "tiny" / "flux", "FLUX, 1.2 GiB transformer": OUT / "big" / "flux"}
    if not (folders["tiny FLUX (1 MB)"] / "model_index.json").exists():
        families.build_family("flux", folders["tiny FLUX (1 MB)"])
    if not (folders["FLUX, 1.2 GiB transformer"] / "model_index.json").exists():
        families.build_big_flux(folders["FLUX, 1.2 GiB transformer"])
    rows = []
    for label, folder in folders.items():
        for preset in list_presets()[:5]:
            run = measure(folder, preset)
            above_p, above_m = run["predicted"] - run["baseline"], run["measured"] - run["baseline"]
            rows.append([label, preset, f"{run['baseline'] / MIB:,.0f}", f"{run['measured'] / MIB:,.0f}",
                         f"{run['predicted'] / MIB:,.0f}", f"{run['predicted'] / run['measured'] - 1:+.1%}",
                         f"{above_m / MIB:,.0f}", f"{above_p / MIB:,.0f}", f"{above_p / above_m - 1:+.1%}"])
    headers = ["pipeline", "preset", "baseline MB", "measured peak MB", "predicted peak MB", "error",
               "measured above baseline MB", "predicted above baseline MB", "error above baseline"]
    info = machine_info()
    print(f"Date: {info['date']}\nMachine: {describe_machine(info)}\nCode: commit {info.get('commit') or 'unknown'}\n")
    if args.markdown:
        print(md_table(headers, rows))
    else:
        for row in [headers] + rows:
            print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
