#!/usr/bin/env python
"""Converted copies (``python -m pipelines.convert``) against their source, on the disk tier.

    PYTHONPATH=. .venv/bin/python bench/convert_cpu.py              # the tables
    PYTHONPATH=. .venv/bin/python bench/convert_cpu.py --markdown

One run, on a FLUX.1-layout checkpoint with random weights (tests/families.py
``build_big_flux``: a 1.2 GiB bf16 transformer in 300 MB shards, tiny text encoders and VAE),
written once under --scratch:

1. Converting it, each in a fresh process: a bf16 copy (same bytes, block-ordered) and a
   scaled fp8 e4m3 copy. Seconds, peak RSS above the process's baseline, against the
   source's size.
2. Generating with each under the ``disk`` preset (bf16 compute on this CPU, every group
   streamed from the files: vram_limit=0), each in a fresh process after its files were
   read once into the page cache: bytes read from disk and preadv calls per denoising step
   (the core's counters, a whole generation over its steps: the tiny text encoders and VAE
   add little), and seconds per step. The page cache is warm, so "read" means
   copied out of RAM here; from a cold disk the time would follow the bytes.

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_name, _value)

from _common import (GIB, MIB, Memory, describe_machine, emit, machine_info, md_table, run_worker,  # noqa: E402
                     serve_worker, warm_page_cache)
from pipelines_cpu import text_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def worker_convert(args) -> None:
    from pipelines.convert import convert

    memory = Memory()
    memory.reset()
    baseline = memory.hwm()
    started = time.perf_counter()
    report = convert(args.source, args.dest, dtype=args.dtype)
    seconds = time.perf_counter() - started
    emit({"seconds": seconds, "peak_rss_above": memory.hwm() - baseline,
          "written": report.bytes_written, "shards": {n: c.shards for n, c in report.components.items()},
          "aligned": {n: c.aligned_fraction for n, c in report.components.items()}})


def worker_generate(args) -> None:
    import vram
    from pipelines import load_pipeline
    from presets import preset_configs

    with load_pipeline(args.source, preset_configs("disk", vram_limit=0)) as pipe:
        pipe.generate(prompt="a red circle", width=128, height=128, steps=1, guidance=3.5, seed=0)  # warm-up
        counters = vram.get_manager().counters
        read0, calls0 = counters.bytes_read_from_disk, counters.preadv_calls
        started = time.perf_counter()
        pipe.generate(prompt="a red circle", width=128, height=128, steps=STEPS, guidance=3.5, seed=0)
        seconds = time.perf_counter() - started
    emit({"bytes_per_gen": counters.bytes_read_from_disk - read0, "preadv_per_gen": counters.preadv_calls - calls0,
          "seconds": seconds})


def build(scratch: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from families import build_big_flux

    source = scratch / "flux-big-bf16"
    if not (source / "model_index.json").is_file():
        build_big_flux(source)
    return source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--scratch", default="/tmp/lowvram-bench-convert", help="where the checkpoints are written")
    parser.add_argument("--repeats", type=int, default=2, help="generations per folder (the median is shown)")
    parser.add_argument("--worker", choices=("convert", "generate"))
    parser.add_argument("--source")
    parser.add_argument("--dest")
    parser.add_argument("--dtype")
    args = parser.parse_args()
    if args.worker == "convert":
        return serve_worker(worker_convert, args)
    if args.worker == "generate":
        return serve_worker(worker_generate, args)

    import shutil

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    source = build(scratch)
    show = md_table if args.markdown else text_table
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    source_bytes = folder_bytes(source)
    print(describe_machine(machine_info()))
    print(f"\nsource: {source} ({source_bytes / GIB:.2f} GiB of .safetensors, bf16)")

    folders = {"source (bf16)": source}
    rows = []
    for label, dtype in (("bf16 copy", "bfloat16"), ("fp8 e4m3 copy (scaled)", "float8_e4m3fn")):
        dest = scratch / f"flux-big-{dtype}"
        shutil.rmtree(dest, ignore_errors=True)
        got = run_worker(sys.executable, Path(__file__), ["--worker", "convert", "--source", str(source),
                                                          "--dest", str(dest), "--dtype", dtype], 1800, env)
        if "error" in got:
            rows.append([label, "error: " + got["error"], "", "", "", ""])
            continue
        folders[label] = dest
        rows.append([label, f"{got['seconds']:.1f}", f"{source_bytes / GIB / got['seconds']:.2f}",
                     f"{got['peak_rss_above'] / MIB:.0f}", f"{got['peak_rss_above'] / source_bytes:.3f}",
                     f"{folder_bytes(dest) / source_bytes:.3f}"])
    print("\nConverting (a fresh process each)")
    print(show(["copy", "seconds", "GiB/s of source", "peak RSS above baseline (MiB)", "peak RSS / source",
                "size / source"], rows))

    rows, base = [], None
    for label, folder in folders.items():
        runs = []
        for _ in range(args.repeats):
            warm_page_cache_folder(folder)
            got = run_worker(sys.executable, Path(__file__), ["--worker", "generate", "--source", str(folder)], 1800, env)
            if "error" in got:
                break
            runs.append(got)
        if not runs:
            rows.append([label, "error: " + got["error"], "", "", "", ""])
            continue
        read = runs[0]["bytes_per_gen"] / STEPS
        calls = runs[0]["preadv_per_gen"] / STEPS
        seconds = statistics.median(r["seconds"] for r in runs) / STEPS
        base = base or (read, seconds)
        rows.append([label, f"{read / MIB:.0f}", f"{read / base[0]:.3f}", f"{calls:.0f}", f"{seconds:.2f}",
                     f"{seconds / base[1]:.2f}"])
    print(f"\nThe disk tier, per denoising step ({STEPS} steps of a 128x128 image, warm page cache; "
          f"median of {args.repeats} runs)")
    print(show(["folder", "MiB read / step", "read / source", "preadv / step", "s / step", "time / source"], rows))
    return 0


def warm_page_cache_folder(folder: Path) -> None:
    for path in sorted(folder.rglob("*.safetensors")):
        warm_page_cache(path)


if __name__ == "__main__":
    sys.exit(main())
