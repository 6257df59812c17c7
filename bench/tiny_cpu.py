#!/usr/bin/env python
"""CPU benchmark of the built-in tiny model: seconds per 128x128 image at its default settings.

    PYTHONPATH=. .venv/bin/python bench/tiny_cpu.py              # every preset, 5 images each
    PYTHONPATH=. .venv/bin/python bench/tiny_cpu.py --markdown   # the table as markdown

One process, one row per way of running it: diffusers' own ``StableDiffusionXLPipeline``
(``from_pretrained`` on the shipped folder, float32) as the reference, then
``pipelines.load_pipeline("tiny-shapes", preset_configs(preset, vram_limit=0))`` for every
preset (the layer-level presets stream every layer: the slowest way). Per row: load seconds,
one warm-up image, then --repeats timed images of different prompts (default steps and
guidance: 20 Euler steps, classifier-free guidance), the median seconds per image and per
step, and the ratio to the reference's median. The issue's bar is at most 5 s per image.

Other processes on the CPUs slow every row; each row waits (at most --max-wait s) for a
quiet moment, and the "other cores" column says how busy the machine was while it was timed.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from _common import CpuShare, describe_machine, machine_info, md_table  # noqa: E402
from pipelines_cpu import noise, text_table, wait_for_quiet  # noqa: E402

PROMPTS = ("a large yellow star on a purple background, top right", "a small red circle on a blue background, left",
           "a large white square on a black background, center", "a small green cross on an orange background, bottom",
           "a large blue triangle on a yellow background, bottom left", "a small purple diamond on a white background, top")


def time_images(generate, repeats: int) -> tuple[float, list[float], dict]:
    """(warm-up seconds, timed seconds per image, CPU share during the timed images)."""
    started = time.perf_counter()
    generate(PROMPTS[0])
    warm = time.perf_counter() - started
    share, timed = CpuShare(), []
    share.start()
    for i in range(repeats):
        started = time.perf_counter()
        generate(PROMPTS[(i + 1) % len(PROMPTS)])
        timed.append(time.perf_counter() - started)
    return warm, timed, share.stop()


def reference_row(repeats: int) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from pipelines.tiny import FAMILY, MODEL_DIR

    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - started
    d = FAMILY.defaults
    warm, timed, share = time_images(
        lambda prompt: pipe(prompt, num_inference_steps=d["steps"], guidance_scale=d["guidance"],
                            generator=torch.Generator().manual_seed(0)), repeats)
    return {"load": load, "warm": warm, "timed": timed, "share": share}


def preset_row(preset: str, repeats: int) -> dict:
    from pipelines import DEFAULT_MODEL, load_pipeline
    from presets import preset_configs

    started = time.perf_counter()
    pipe = load_pipeline(DEFAULT_MODEL, preset_configs(preset, vram_limit=0))
    load = time.perf_counter() - started
    with pipe:
        warm, timed, share = time_images(lambda prompt: pipe.generate(prompt=prompt, seed=0), repeats)
    return {"load": load, "warm": warm, "timed": timed, "share": share}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed images per row (default 5)")
    parser.add_argument("--presets", nargs="*", help="presets to run (default: all)")
    parser.add_argument("--max-wait", type=float, default=60, help="longest wait for a quiet CPU per row, s")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()

    from pipelines.tiny import FAMILY
    from presets import list_presets

    steps = FAMILY.defaults["steps"]
    rows = {}
    for label in ["diffusers (reference)", *(args.presets or list_presets())]:
        wait_for_quiet(0.3, args.max_wait)
        rows[label] = reference_row(args.repeats) if label.startswith("diffusers") else preset_row(label, args.repeats)
        print(f"  {label}: {statistics.median(rows[label]['timed']):.3f} s/image", flush=True)
    reference = statistics.median(rows["diffusers (reference)"]["timed"])
    headers = ["run", "load s", "first image s", "s/image (median)", "s/step", "vs diffusers", "other cores"]
    table = []
    for label, row in rows.items():
        median = statistics.median(row["timed"])
        table.append([label, f"{row['load']:.2f}", f"{row['warm']:.2f}", f"{median:.3f}", f"{median / steps:.4f}",
                      f"{median / reference:.2f}x", f"{noise({'cpu_share': row['share']}):.2f}"])
    print(f"\nThe built-in tiny model, {FAMILY.defaults['width']}x{FAMILY.defaults['height']}, {steps} steps, "
          f"guidance {FAMILY.defaults['guidance']}; {args.repeats} images per row.")
    print(describe_machine(machine_info()))
    print(md_table(headers, table) if args.markdown else text_table(headers, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
