#!/usr/bin/env python
"""End-to-end GPU check: one Z-Image generation with random weights under every preset.

    PYTHONPATH=. .venv/bin/python bench/gpu_e2e.py                  # CUDA: 8-layer Z-Image DiT, 1024 px
    PYTHONPATH=. .venv/bin/python bench/gpu_e2e.py --layers 30      # the published depth (12.3 GB)
    PYTHONPATH=. .venv/bin/python bench/gpu_e2e.py --cpu-dry-run    # tiny sizes on vram's stand-in accelerator
    PYTHONPATH=. .venv/bin/python bench/gpu_e2e.py --cpu-dry-run --dry-device cpu   # tiny sizes, plain CPU

The pipeline folder is the tiny Z-Image family of tests/families.py (tokenizer, scheduler,
folder layout) with its three weighted components rewritten at other sizes and given seeded
random bf16 weights (generated on the GPU when there is one), written once under --out-dir:

* transformer   ZImageTransformer2DModel at its published layout (dim 3840, 30 heads, FFN
                10240, caption features 2560, 2 + 2 refiner layers) with --layers main layers
                (8 by default: 4.4 GB of bf16 instead of 12.3 GB, so that a row takes seconds),
                in 2 GiB shards as the real checkpoint ships;
* text_encoder  Qwen3 at Qwen3-4B's width (hidden 2560, the transformer's caption input) with
                2 layers and the tiny tokenizer's vocabulary;
* vae           AutoencoderKL with Z-Image's 16 latent channels and 8x downscale (4 levels) but
                narrow (8-16 channels), so decoding costs little next to the transformer.

Each row runs in a fresh process (bench/_common.py ``run_worker``): ``load_pipeline(folder,
preset_configs(preset, vram_limit=cap))``, then one generation (--steps steps, guidance 0 as
Z-Image-Turbo, seed 0). The rows are every preset in presets/ (``list_presets``); those that
manage layers under a cap (``uses_vram_limit``) run once per cap in --limits, given as a
percentage of the pipeline's weight bytes in the computation dtype.

Reported per row: the cap (GiB); the peak of torch.cuda.max_memory_reserved over the run
(read at every pipeline event, and the core's own per-forward reports; the CUDA context is
not included); whether it stayed within the cap; seconds per denoising step (the median
interval between step ends, so the first step's schedule learning and onloading are left
out) and its ratio to the basic row; the core's synchronous copies and pinning failures
(``vram.get_manager().counters`` since the process started: loading included); the largest
absolute difference of the image from the basic row's.

Exit status 1 when a row fails, a cap is passed, or a row computing in the basic row's dtype
gives a different image (the core promises bit-identical results); the fp8 row's difference
is reported, not judged. Tables and logs go to $OUT when it is set (the device tool returns
what is written there), else bench/out/; the model and the images stay under --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _setup import HERE, ROOT  # noqa: E402  (first: offline hubs, quiet libraries, paths)

import torch  # noqa: E402

from _common import (GIB, MARKER, emit, machine_info, md_table, random_tensor, run_worker, serve_worker,  # noqa: E402
                     written_once)

PROMPT = "a red circle on a blue background"
SHARD_BYTES = 2 * GIB
REFERENCE = "basic"

# Config overrides of the tiny family's components (tests/families.py). Z-Image's published
# transformer: Tongyi-MAI/Z-Image-Turbo transformer/config.json.
ZIMAGE_TRANSFORMER = dict(dim=3840, n_heads=30, n_kv_heads=30, n_refiner_layers=2, cap_feat_dim=2560,
                          axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])
QWEN3_4B_WIDTH = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, num_hidden_layers=2, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 1000000.0})
NARROW_VAE = dict(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4)
# The dry run's: small, but with blocks large next to the fixed-size groups (t_embedder is
# 256 -> 1024 -> 256 at any width), so that caps of 25% of the weights can hold a block.
DRY_TRANSFORMER = dict(ZIMAGE_TRANSFORMER, dim=256, n_heads=4, n_kv_heads=4, n_refiner_layers=1, cap_feat_dim=64,
                       axes_dims=[16, 24, 24])
DRY_TEXT_ENCODER = dict(QWEN3_4B_WIDTH, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                        num_key_value_heads=2, head_dim=32, num_hidden_layers=1)


def component_sizes(layers: int, dry_run: bool) -> dict[str, dict]:
    transformer = dict(DRY_TRANSFORMER if dry_run else ZIMAGE_TRANSFORMER, n_layers=layers)
    return {"transformer": transformer, "text_encoder": DRY_TEXT_ENCODER if dry_run else QWEN3_4B_WIDTH,
            "vae": NARROW_VAE}


# ==========================================================================================
# The pipeline folder
# ==========================================================================================

def _component_class(folder: Path, name: str):
    import importlib
    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    return library, getattr(importlib.import_module(library), class_name)


def rewrite_component(folder: Path, name: str, overrides: dict, generator: torch.Generator) -> int:
    """Give component ``name`` of a pipeline folder a config with ``overrides`` and random bf16
    weights for it (built on the meta device and written one tensor at a time, in shards of
    at most SHARD_BYTES with an index when there are several). Returns its parameter count."""
    from safetensors.torch import save_file
    sub = folder / name
    config = json.loads((sub / "config.json").read_text())
    config.update(overrides)
    library, cls = _component_class(folder, name)
    if library == "diffusers":
        with torch.device("meta"):
            model = cls.from_config(config)
        model.save_config(sub)
        prefix = "diffusion_pytorch_model"
    else:
        config.pop("layer_types", None)  # one entry per layer: rebuilt for the new depth
        model_config = cls.config_class.from_dict(config)
        with torch.device("meta"):
            model = cls(model_config)
        model_config.save_pretrained(sub)
        prefix = "model"
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    del model
    for old in sub.glob("*.safetensors*"):
        old.unlink()

    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards):
        file = (f"{prefix}.safetensors" if len(shards) == 1 else
                f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({key: random_tensor(key, shapes[key], generator) for key in keys}, str(sub / file),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    if len(shards) > 1:
        total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (sub / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(torch.Size(s).numel() for s in shapes.values())


def build_folder(out_dir: Path, layers: int, seed: int, dry_run: bool, use_cuda: bool) -> tuple[Path, dict]:
    """The pipeline folder (written once per size, seed and generator device) and its marker
    data: {"params": {component: count}, ...}."""
    from families import build_family
    sizes = component_sizes(layers, dry_run)
    tag = f"zimage-L{layers}-d{sizes['transformer']['dim']}-seed{seed}-{'cuda' if use_cuda else 'cpu'}"
    params: dict[str, int] = {}

    def write(tmp: Path) -> None:
        build_family("z-image", tmp, seed=seed)
        generator = torch.Generator(device="cuda" if use_cuda else "cpu").manual_seed(seed)
        for name, overrides in sizes.items():
            params[name] = rewrite_component(tmp, name, overrides, generator)
        if use_cuda:
            torch.cuda.empty_cache()

    folder = written_once(out_dir / tag, write, {"sizes": sizes, "seed": seed, "params": params})
    return folder, json.loads((folder / MARKER).read_text())


# ==========================================================================================
# Worker: one preset (and cap) in this fresh process
# ==========================================================================================

def worker(args) -> None:
    import dataclasses

    import numpy as np

    import vram
    from pipelines import load_pipeline
    from presets import preset_configs

    is_cuda = not args.cpu_dry_run
    cap = float(args.cap_gib) if args.cap_gib else None
    result: dict = {"preset": args.preset, "cap_gib": cap}
    standin = None
    if is_cuda:
        configs = preset_configs(args.preset, vram_limit=cap)  # the presets' own choice: this GPU, bf16
    elif args.dry_device == "standin":
        from vram import standin
        configs = preset_configs(args.preset, vram_limit=cap, device="standin", dtype=torch.float32)
    else:
        configs = preset_configs(args.preset, vram_limit=cap, device="cpu", dtype=torch.float32)
    started = time.perf_counter()
    pipe = load_pipeline(Path(args.folder), configs)
    result["load_s"] = time.perf_counter() - started

    peak = {"reserved": 0}
    step_ends: list[float] = []

    def on_event(event) -> None:
        if is_cuda:
            # Read at every event, not only at the end: torch keeps one peak per process, and a
            # run measuring its own may reset it.
            peak["reserved"] = max(peak["reserved"], torch.cuda.max_memory_reserved())
        if event.kind == "step":
            step_ends.append(event.time)

    try:
        started = time.perf_counter()
        out = pipe.generate(prompt=PROMPT, width=args.resolution, height=args.resolution, steps=args.steps,
                            guidance=0.0, seed=0, on_event=on_event)
        result["generate_s"] = time.perf_counter() - started
        if is_cuda:
            peak["reserved"] = max(peak["reserved"], torch.cuda.max_memory_reserved())
        summary = out.summary
        intervals = [b - a for a, b in zip(step_ends, step_ends[1:])]
        result.update(
            steps=len(step_ends), step_ends=step_ends,
            s_per_step=statistics.median(intervals) if intervals else summary.seconds_per_step,
            first_step_s=step_ends[0] if step_ends else None,
            peak_reserved=(max(peak["reserved"], summary.peak_vram_bytes or 0) if is_cuda else
                           max(standin.engine().peak, summary.peak_vram_bytes or 0) if standin else None),
            core_within_cap=summary.within_cap, summary=summary.as_dict(),
            counters=dataclasses.asdict(vram.get_manager().counters),
            configs=pipe.describe_configs())
        reports = [r for r in vram.get_manager().reports if r.peak_reserved_bytes is not None]
        if reports:
            result["worst_report"] = max(reports, key=lambda r: r.peak_reserved_bytes).describe()
        image = np.asarray(out.images, dtype=np.float32)
        result["finite"] = bool(np.isfinite(image).all())
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, image)
    finally:
        pipe.close()
    emit(result)


# ==========================================================================================
# Parent
# ==========================================================================================

def row_list(limits: list[float], only: list[str]) -> list[tuple[str, float | None]]:
    """(preset, cap as % of the weights or None): basic first, as the reference."""
    from presets import list_presets, load_preset
    names = [n for n in list_presets() if not only or n in only]
    if REFERENCE in names:
        names.remove(REFERENCE)
    names.insert(0, REFERENCE)
    rows = []
    for name in names:
        if load_preset(name).uses_vram_limit:
            rows += [(name, pct) for pct in limits]
        else:
            rows.append((name, None))
    return rows


def gib(nbytes: float | None) -> str:
    """GiB with two decimals, more for the dry run's tiny figures."""
    if nbytes is None:
        return "-"
    value = nbytes / GIB
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


def row_key(preset: str, pct: float | None) -> str:
    return preset if pct is None else f"{preset}-{pct:g}pct"


def judge(results: dict[str, dict], reference_dtype: str) -> list[str]:
    """What failed: rows that did not run, caps passed, images unlike the basic row's."""
    problems = []
    for key, r in results.items():
        if "error" in r:
            problems.append(f"{key}: did not run ({r['error']})")
            continue
        if not r.get("finite", True):
            problems.append(f"{key}: the image holds NaN or inf")
        if r.get("cap_gib") is not None and r.get("peak_reserved") is not None \
                and r["peak_reserved"] > r["cap_gib"] * GIB:
            problems.append(f"{key}: peak reserved {r['peak_reserved'] / GIB:.2f} GiB above the cap "
                            f"{r['cap_gib']:.2f} GiB")
        dtypes = {value for config in r.get("configs", {}).values() for field, value in config.items()
                  if field.endswith("_dtype")}
        same_dtype = dtypes <= {reference_dtype, "disk"}
        if key != REFERENCE and same_dtype and r.get("max_abs_diff") not in (None, 0.0):
            problems.append(f"{key}: image differs from basic by {r['max_abs_diff']:.3g} (same dtype: should be 0)")
    return problems


def render(results: dict[str, dict], rows, info: dict, about: dict, args, weight_bytes: int) -> str:
    base = results.get(REFERENCE, {}).get("s_per_step")
    headers = ["preset", "cap (GiB)", "peak reserved (GiB)", "within cap", "s/step", "s/step / basic",
               "sync copies", "pin failures", "max abs diff vs basic", "notes"]
    table = []
    for preset, pct in rows:
        key = row_key(preset, pct)
        r = results[key]
        label = preset if pct is None else f"{preset} ({pct:g}% of weights)"
        if "error" in r:
            table.append([label, "-", "-", "-", "-", "-", "-", "-", "-", f"did not run: {r['error']}"])
            continue
        cap, peak = r.get("cap_gib"), r.get("peak_reserved")
        within = "-" if cap is None or peak is None else ("yes" if peak <= cap * GIB else "NO")
        counters = r.get("counters", {})
        notes = [f"load {r['load_s']:.1f} s, generation {r['generate_s']:.1f} s (first step ends at "
                 f"{r['first_step_s']:.2f} s)", f"peak RAM {r['summary']['peak_ram_bytes'] / GIB:.2f} GiB",
                 f"{counters.get('bytes_to_device', 0) / GIB:.2f} GiB to device, "
                 f"{counters.get('bytes_read_from_disk', 0) / GIB:.2f} GiB from disk"]
        if r.get("core_within_cap") is not None:
            notes.append(f"core's verdict: {'within cap' if r['core_within_cap'] else 'ABOVE CAP'}")
        if not r.get("finite", True):
            notes.append("image not finite")
        diff = r.get("max_abs_diff")
        table.append([label, "-" if cap is None else gib(cap * GIB), gib(peak),
                      within, f"{r['s_per_step']:.3f}", "-" if not base else f"{r['s_per_step'] / base:.2f}",
                      str(counters.get("sync_copies", "-")), str(counters.get("pin_failures", "-")),
                      "reference" if key == REFERENCE else ("-" if diff is None else f"{diff:.3g}"), "; ".join(notes)])
    params = about["params"]

    def count(n: int) -> str:
        return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    lines = [f"Date: {info['date']}",
             f"Machine: {info['gpu']}; {info['cpu_count']} CPUs, {info['ram_gib']:.1f} GiB RAM, torch {info['torch']}",
             f"Code: commit {info.get('commit') or 'unknown'}",
             f"Pipeline: ZImagePipeline, random weights; transformer {about['sizes']['transformer']['n_layers']} "
             f"main layers at dim {about['sizes']['transformer']['dim']} ({count(params['transformer'])} parameters), "
             f"text encoder {count(params['text_encoder'])}, VAE {count(params['vae'])}; "
             f"{gib(weight_bytes)} GiB of weights in the computation dtype",
             f"Job: {args.resolution}x{args.resolution} px, {args.steps} steps, guidance 0, seed 0; "
             f"s/step is the median interval between step ends (step 1 left out)",
             "Peak reserved: " + ("torch.cuda.max_memory_reserved over the generation (CUDA context not included)"
                                  if not args.cpu_dry_run else
                                  "the stand-in allocator's peak over the process (the weights it holds; "
                                  "activations are plain CPU tensors it cannot see)" if args.dry_device == "standin"
                                  else "not measured on the CPU"),
             "", md_table(headers, table)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="transformer main layers (default 8; 6 dry run)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default 1024; 64 dry run)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--limits", default="25,50", help="caps, percent of the pipeline's weight bytes")
    parser.add_argument("--presets", default="", help="comma-separated subset of presets (basic always runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row (default 120; 60 dry run)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run: rows that would start later are reported as not run")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "e2e"), help="model folder and images")
    parser.add_argument("--report-dir", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"),
                        help="where gpu_e2e.md and gpu_e2e.json go (default $OUT, else bench/out)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny sizes on the CPU, every row: checks the script, measures nothing useful")
    parser.add_argument("--dry-device", choices=("cpu", "standin"), default="standin",
                        help="what the dry run computes on: the CPU, or the stand-in accelerator of vram/standin.py "
                             "(the accelerator's code paths: copies through a simulated engine, a capped allocator)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve_worker(worker, args)

    use_cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not use_cuda and not args.cpu_dry_run:
        print(f"gpu_e2e.py: CUDA is not available here (torch {torch.__version__}); nothing was run. "
              f"--cpu-dry-run checks the script on the CPU with tiny sizes.")
        return 1
    args.layers = args.layers if args.layers is not None else (6 if args.cpu_dry_run else 8)
    args.resolution = args.resolution or (64 if args.cpu_dry_run else 1024)
    args.timeout = args.timeout or (60.0 if args.cpu_dry_run else 120.0)
    limits = [float(v) for v in args.limits.split(",") if v]
    rows = row_list(limits, [p for p in args.presets.split(",") if p])

    out_dir, report_dir = Path(args.out_dir), Path(args.report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if use_cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / GIB:.1f} GiB, CUDA {torch.version.cuda}"
    else:
        where = "the stand-in accelerator" if args.dry_device == "standin" else "the CPU"
        info["gpu"] = f"none (CPU dry run computing on {where}: not a measurement)"
    print(f"# end-to-end GPU check ({info['date']})\nmachine: {info['gpu']}; torch {info['torch']}", flush=True)

    started = time.perf_counter()
    folder, about = build_folder(out_dir, args.layers, args.seed, args.cpu_dry_run, use_cuda)
    dtype_bytes = 2 if use_cuda else 4   # bf16 on CUDA, float32 on the CPU (presets' default_compute)
    weight_bytes = sum(about["params"].values()) * dtype_bytes
    print(f"pipeline folder {folder} ({gib(weight_bytes)} GiB of weights, ready in "
          f"{time.perf_counter() - started:.0f} s); {len(rows)} rows", flush=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), str(ROOT / "tests")] +
                                        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    images = out_dir / "images"
    results: dict[str, dict] = {}
    problems: list[str] = []
    for preset, pct in rows:
        key = row_key(preset, pct)
        left = args.budget_s - (time.perf_counter() - started) if args.budget_s else args.timeout
        if left < 15:
            results[key] = {"error": f"not run: the {args.budget_s:.0f} s budget was spent"}
            print(f"  {key}: {results[key]['error']}", flush=True)
            continue
        cap = None if pct is None else pct / 100 * weight_bytes / GIB
        worker_args = ["--worker", "generate", "--preset", preset, "--folder", str(folder),
                       "--output", str(images / f"{key}.npy"), "--resolution", str(args.resolution),
                       "--steps", str(args.steps)] + (["--cap-gib", repr(cap)] if cap is not None else []) + \
                      (["--cpu-dry-run", "--dry-device", args.dry_device] if args.cpu_dry_run else [])
        (images / f"{key}.npy").unlink(missing_ok=True)
        t0 = time.perf_counter()
        result = run_worker(sys.executable, Path(__file__), worker_args, min(args.timeout, left), env)
        results[key] = result
        took = time.perf_counter() - t0
        if "error" in result:
            print(f"  {key}: did not run: {result['error']} ({took:.0f} s)", flush=True)
            if result.get("stderr"):
                print("    " + "\n    ".join(result["stderr"].strip().splitlines()[-15:]), flush=True)
        else:
            print(f"  {key}: {result['s_per_step']:.3f} s/step, peak reserved {gib(result.get('peak_reserved'))} GiB "
                  f"({took:.0f} s)", flush=True)
        compare(results, images)
        # Written after every row: a run cut short still leaves the rows it finished.
        problems = write_report(results, rows, info, about, args, weight_bytes, use_cuda, report_dir)
    print("\n" + (report_dir / "gpu_e2e.md").read_text(), flush=True)
    return 1 if problems else 0


def compare(results: dict[str, dict], images: Path) -> None:
    """Each finished row's largest absolute difference from the basic row's image."""
    import numpy as np
    reference = images / f"{REFERENCE}.npy"
    if not reference.is_file():
        return
    base = np.load(reference)
    for key, result in results.items():
        path = images / f"{key}.npy"
        if "error" not in result and "max_abs_diff" not in result and path.is_file():
            image = np.load(path)
            result["max_abs_diff"] = float(np.abs(image - base).max()) if image.shape == base.shape else float("inf")


def write_report(results, rows, info, about, args, weight_bytes, use_cuda, report_dir: Path) -> list[str]:
    """gpu_e2e.md (the table and the verdict on the rows run so far) and gpu_e2e.json; the
    problems found."""
    done = [(preset, pct) for preset, pct in rows if row_key(preset, pct) in results]
    report = render(results, done, info, about, args, weight_bytes)
    problems = judge(results, "bfloat16" if use_cuda else "float32")
    missing = len(rows) - len(done)
    if missing:
        problems.append(f"{missing} row(s) not run yet")
    verdict = ("All rows ran; every cap held; every row in the basic row's dtype gave its image bit for bit."
               if not problems else "FAILED:\n" + "\n".join(f"- {p}" for p in problems))
    (report_dir / "gpu_e2e.md").write_text(report + "\n\n" + verdict + "\n")
    (report_dir / "gpu_e2e.json").write_text(json.dumps({"machine": info, "pipeline": about, "args": vars(args),
                                                         "weight_bytes": weight_bytes, "results": results},
                                                        indent=1, default=str))
    return problems

if __name__ == "__main__":
    sys.exit(main())
