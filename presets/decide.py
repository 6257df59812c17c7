"""Command line: this machine's numbers, the decision tree for a model and job, and the
planner's predicted peaks under every preset.

    python -m presets.decide --model flux.1-dev --width 1024 --height 1024
"""

from __future__ import annotations

import argparse
import sys

from pipelines import DEFAULT_MODEL, GenerationRequest
from pipelines.sources import locate
from vram import monitor
from vram.config import parse_vram_limit

from .auto import job_of
from .footprint import footprint
from .placement import PlacementError, plan_placement
from .planner import GIB, Calibration
from .probe import probe
from .tree import decide


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m presets.decide", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a registry key or a local diffusers folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guidance", type=float, help="above 1 with a CFG model: two passes per step")
    parser.add_argument("--vram-limit", type=float, help="GiB; default: free VRAM minus 0.5 GiB")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--models-dir", help="where downloaded models are (sizes come from their headers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        folder, family = locate(args.model, args.models_dir)
        request = GenerationRequest(prompt="plan", width=args.width, height=args.height, frames=args.frames,
                                    batch=args.batch, guidance=args.guidance, vae_tiling=args.vae_tiling).resolved(family)
        vram_limit = parse_vram_limit(args.vram_limit)
        job = job_of(family, request)
        sizes = footprint(family, folder)
        hardware = probe(folder)
        decision = decide(hardware, family, sizes, job, baseline_ram=monitor.current_rss(), vram_limit=vram_limit,
                          calibration=Calibration())
    except ValueError as error:  # an unknown model, a bad setting, a broken preset file
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(hardware.describe())
    print()
    print(decision.describe())
    print()
    print(f"{'preset':<12} {'peak VRAM':>10} {'peak RAM':>10}")
    for name, p in decision.predictions.items():
        vram_text = "-" if p.peak_vram_bytes is None else f"{p.peak_vram_bytes / GIB:.1f} GiB"
        print(f"{name:<12} {vram_text:>10} {p.peak_ram_bytes / GIB:>6.1f} GiB")
    if len(hardware.gpus) > 1 and decision.preset == "basic":
        # The tree weighs multi_gpu only when basic does not fit one GPU (its explanation then
        # has the placement or why not); here, what holding the model over all of them takes.
        print()
        try:
            placement = plan_placement(family, sizes, job, hardware.gpus, vram_limit=vram_limit)
        except PlacementError as error:
            print(f"over {len(hardware.gpus)} GPUs (not needed: basic fits one): {error}")
        else:
            print(f"over {len(hardware.gpus)} GPUs (not needed: basic fits one):")
            print("\n".join(f"  {line}" for line in placement.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
