"""Command line: generate one job and print where it went and what it cost.

    python -m pipelines.generate --model z-image-turbo --preset disk --vram-limit 6 \\
        --prompt "a lighthouse at dawn" --out outputs/

Like app.py this is an entry point at the top of the stack, so it may use presets/.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from vram import VramLimitError

from .pipeline import Cancelled, Event, load_pipeline
from .registry import DEFAULT_MODEL, FAMILIES
from .request import GenerationRequest
from .sources import SOURCES, DownloadError, locate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"one of {', '.join(FAMILIES)}, or a local diffusers folder (default: {DEFAULT_MODEL}, "
                             "the built-in model: no download)")
    parser.add_argument("--preset", default="auto",
                        help="auto (the decision tree on this machine's numbers) or a preset name (presets/builtin/)")
    parser.add_argument("--vram-limit", type=float, help="GiB of VRAM the run may use (dynamic and disk presets)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", default="outputs", help="a folder, or a file name ending in .png/.mp4")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, help="video models: 4k+1 frames")
    parser.add_argument("--fps", type=int, help="video models")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--vae-slicing", action="store_true")
    parser.add_argument("--attention", default="auto",
                        help="attention backend: auto (the fastest installed that works here; native on the CPU), "
                             "native, or a diffusers backend (flash, _flash_3, sage, xformers, ...)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser's repeated blocks (the first run compiles: minutes on big models)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the denoiser's and the VAE's 2-D convolutions in the channels_last memory format")
    parser.add_argument("--cache", default="off",
                        help="a diffusers step cache: off, first_block[:threshold], mag[:threshold] (FLUX.1), "
                             "taylorseer[:interval]; FLUX.1, Qwen-Image and Wan only")
    parser.add_argument("--source", default="modelscope", choices=SOURCES)
    parser.add_argument("--models-dir", help="where downloads go (default: $LOWVRAM_MODELS_DIR or ./models)")
    parser.add_argument("--device", help="computation device (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", help="computation dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _print_event(event: Event) -> None:
    if event.kind == "phase_start":
        print(f"[{event.time:7.2f} s] {event.phase} ({event.component})", file=sys.stderr)
    elif event.kind == "step":
        print(f"[{event.time:7.2f} s]   step {event.step}/{event.total}", file=sys.stderr)


def _progress(name: str, done: int, total: int) -> None:
    if total and done >= total:
        print(f"downloaded {name} ({total / 2**20:.1f} MiB)", file=sys.stderr)


def _check_out(out: Path, family) -> None:
    suffix = ".mp4" if family.kind == "video" else ".png"
    if out.suffix and out.suffix.lower() != suffix:
        raise ValueError(f"--out: {out.name} should end in {suffix} for {family.title} (or name a folder)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from presets import preset_configs
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        steps=args.steps, guidance=args.guidance, seed=args.seed, batch=args.batch, frames=args.frames,
        fps=args.fps, vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing, attention=args.attention,
        compile=args.compile, channels_last=args.channels_last, cache=args.cache)
    try:
        _, family = locate(args.model, args.models_dir)
        request.resolved(family, None)  # bad settings fail before any loading
        _check_out(Path(args.out), family)
        if args.preset == "auto" and (args.device or args.dtype):
            raise ValueError("--device/--dtype choose a named preset's placement; with --preset auto the "
                             "decision tree chooses them")
        if args.preset == "auto":
            return _auto(args, request)
        configs = preset_configs(args.preset, vram_limit=args.vram_limit, device=args.device, dtype=args.dtype)
        started = time.perf_counter()
        with load_pipeline(args.model, configs, source=args.source, models_dir=args.models_dir,
                           progress=_progress) as pipe:
            print(f"loaded {pipe.family.title} from {pipe.folder} with preset {args.preset} "
                  f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            result = pipe.generate(request, on_event=_print_event)
            paths = result.save(args.out)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, DownloadError) as error:  # bad input, missing files, network
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, VramLimitError, getattr(torch, "OutOfMemoryError", MemoryError)) as error:
        first_line = (str(error).splitlines() or [""])[0]
        print(f"error: out of memory ({type(error).__name__}: {first_line}); try a more frugal --preset "
              f"or a lower --vram-limit", file=sys.stderr)
        return 3
    for path in paths:
        print(f"saved {path}")
    print(result.summary.describe())
    return 0


def _auto(args, request: GenerationRequest) -> int:
    """The decision tree picks the preset; an out-of-memory steps down once."""
    from presets.auto import run
    model = args.model
    outcome = run(model, request, vram_limit=args.vram_limit, source=args.source, models_dir=args.models_dir,
                  on_event=_print_event, on_message=lambda text: print(text, file=sys.stderr))
    print(outcome.decision.describe(), file=sys.stderr)
    for path in outcome.result.save(args.out):
        print(f"saved {path}")
    print(outcome.result.summary.describe())
    predicted = outcome.prediction.peak_ram_bytes / 2**30
    print(f"preset {outcome.outcome.preset}; predicted peak RAM {predicted:.2f} GiB "
          f"({outcome.errors['ram']:+.0%} measured vs predicted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
