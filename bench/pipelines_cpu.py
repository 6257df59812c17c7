#!/usr/bin/env python
"""CPU benchmark of pipelines/ and presets/: loading a big checkpoint, and tiny generations.

    PYTHONPATH=. .venv/bin/python bench/pipelines_cpu.py              # ~1.2 GiB checkpoint, all families
    PYTHONPATH=. .venv/bin/python bench/pipelines_cpu.py --quick      # ~0.2 GiB, flux only: a smoke run
    PYTHONPATH=. .venv/bin/python bench/pipelines_cpu.py --markdown   # the tables as markdown

Two tables, measured in one run; every row runs in its own fresh interpreter (so its peak
memory is its own), and nothing is asserted:

1. Loading. A sharded synthetic diffusers checkpoint (a ``FluxTransformer2DModel`` scaled to
   --size-gib of bf16 weights, seeded random values, ``save_pretrained(max_shard_size="300MB")``)
   is written once under --out-dir and reused. Each row loads it once: diffusers'
   ``from_pretrained(torch_dtype=bfloat16)`` as the reference (it memory-maps the shards, so
   it reads nothing yet; a second row also reads one element per page of every weight, as a
   first forward would), then for each preset ``pipelines.loading.load_component`` with the
   denoiser's config of ``preset_configs(preset, vram_limit=0, dtype="bfloat16")``. Before
   the timed load, each worker loads the tiny FLUX transformer of tests/families.py the same
   way and drops it, so imports and first-call set-up are not charged. Every shard is read
   once before each row, so the page cache is warm and the disk's speed does not count. Per
   row: load seconds and their ratio to from_pretrained's; peak RSS above the worker's
   baseline (VmHWM, reset through /proc/self/clear_refs), file pages mapped from the shards
   included, and that peak over the checkpoint's bytes; the RSS still held after loading; the
   bytes read through read()/pread() during the load (``rchar`` of /proc/self/io; reads of a
   memory-mapped file do not show there, the sampled anonymous-memory peak in the notes tells
   mapped pages from owned memory).

2. Generation. Each family of tests/families.py is written once as a tiny folder under
   --out-dir. Per (family, preset) a worker runs ``pipelines.load_pipeline(folder,
   preset_configs(preset, vram_limit=0))`` (float32 on the CPU), one warm-up ``generate`` and
   then --repeats timed ones (the median is shown); the reference row is diffusers' own
   pipeline, ``from_pretrained(folder, torch_dtype=float32)``, called with the same arguments
   (``tiny_call_kwargs``). The tiny models take milliseconds per forward, so these figures are
   the fixed cost per generation of the phase switching, hooks and layer management, not of
   the arithmetic.

The machine may be shared: each row starts once other processes have left the CPUs quiet
for a moment (at most --max-wait s of waiting), their CPU use during the timed part is
measured (/proc/stat), and a row that shared the CPUs with more than --noise-cores busy cores
anyway is run again (--retries), the quieter run kept; the notes column shows what remained.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _setup import ROOT  # noqa: E402  (first: offline hubs, quiet libraries, paths)

import torch  # noqa: E402

from _common import (GIB, MARKER, CpuShare, Memory, describe_machine, emit, machine_info, md_table,  # noqa: E402
                     proc_status, random_state_dict, run_worker, serve_worker, warm_page_cache, written_once)

REFERENCE = "diffusers"          # the reference row's name in both tables
TOUCHED = "diffusers+touch"      # from_pretrained, then one read of every weight page
CHECKPOINT_CLASS = ["diffusers", "FluxTransformer2DModel"]
COMPONENT = "transformer"        # the checkpoint's subfolder, loaded as the denoiser
QUICK_FAMILIES = ("flux",)


# ==========================================================================================
# The synthetic checkpoint
# ==========================================================================================

def flux_config(size_gib: float) -> dict:
    """A FluxTransformer2DModel config whose bf16 weights are at least ``size_gib`` (and at most
    ~35% more): the widest of a few widths, with twice as many single as double blocks."""
    from diffusers import FluxTransformer2DModel
    fallback = None
    for heads in (12, 8, 4):
        for double in range(1, 64):
            config = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=2 * double,
                          attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096,
                          pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
            with torch.device("meta"):
                size = sum(p.numel() * 2 for p in FluxTransformer2DModel(**config).state_dict().values())
            if size >= size_gib * GIB:
                if size <= 1.35 * size_gib * GIB:
                    return config
                fallback = fallback or config
                break
    return fallback


def build_checkpoint(out_dir: Path, size_gib: float, seed: int) -> Path:
    """The pipeline-like folder holding ``transformer/`` (config, shards, index), written once.

    The model is built on the meta device, given seeded random bf16 weights one tensor at a
    time, and saved; peak memory is about the weights once plus one shard."""
    from diffusers import FluxTransformer2DModel
    config = flux_config(size_gib)

    def write(tmp: Path) -> None:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict(random_state_dict(shapes, seed, torch.bfloat16), assign=True, strict=True)
        model.save_pretrained(tmp / COMPONENT, max_shard_size="300MB")

    name = (f"flux-h{config['num_attention_heads'] * 128}-d{config['num_layers']}"
            f"-s{config['num_single_layers']}-seed{seed}-bf16")
    return written_once(out_dir / name, write, {"config": config, "seed": seed})


def shard_files(folder: Path) -> list[Path]:
    return sorted((folder / COMPONENT).glob("*.safetensors"))


def build_tiny(out_dir: Path, name: str) -> Path:
    """The tiny folder of family ``name`` (tests/families.py, seed 0), written once."""
    from families import build_family
    return written_once(out_dir / "tiny" / name, lambda tmp: build_family(name, tmp, seed=0),
                        {"family": name, "seed": 0})


# ==========================================================================================
# Workers: one row in this (fresh) process
# ==========================================================================================

def proc_io() -> dict[str, int]:
    """rchar (bytes asked of read()-like calls, page cache included) and read_bytes (bytes
    fetched from storage) of this process; empty where /proc/self/io is unreadable."""
    try:
        with open("/proc/self/io") as handle:
            return {k: int(v) for k, v in (line.split(":") for line in handle)}
    except OSError:
        return {}


def touch_every_page(model: torch.nn.Module) -> None:
    """Read one element per 4 KiB of every weight: memory-mapped weights are faulted in, as
    by a first forward, without computing anything."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        flat = tensor.detach().reshape(-1)
        flat[::max(1, 4096 // flat.element_size())].float().sum().item()


def load_worker(args) -> None:
    """Table 1: load the checkpoint once, with from_pretrained or a preset's config.

    The same loader first loads the tiny FLUX transformer (``--warm-folder``, same class and
    code path) and drops it, so lazy imports and first-call set-up are not charged to the row."""
    folder, warm_folder = Path(args.folder), Path(args.warm_folder)
    result: dict = {"mode": args.worker, "config": args.config}
    if args.config in (REFERENCE, TOUCHED):
        from diffusers import FluxTransformer2DModel

        def load(where: Path) -> torch.nn.Module:
            return FluxTransformer2DModel.from_pretrained(where, subfolder=COMPONENT, torch_dtype=torch.bfloat16)

        def drop(model: torch.nn.Module) -> None:
            """Nothing to do: the caller's reference is the last one."""
    else:
        import vram
        from pipelines.loading import config_for, load_component
        from pipelines.registry import Component
        from presets import preset_configs
        config = config_for(preset_configs(args.config, vram_limit=0, dtype="bfloat16"),
                            Component(COMPONENT, "denoising"))
        result["offload_tier"] = str(config.offload)

        def load(where: Path) -> torch.nn.Module:
            return load_component(where, COMPONENT, "denoising", CHECKPOINT_CLASS, config).module

        drop = vram.release
    drop(load(warm_folder))
    gc.collect()
    if args.config not in (REFERENCE, TOUCHED):
        vram.get_manager().reset_counters()

    memory = Memory()
    base, io0 = proc_status(), proc_io()
    memory.reset()
    memory.start_sampler()
    share = CpuShare()
    share.start()
    started = time.perf_counter()
    model = load(folder)
    if args.config == TOUCHED:
        touch_every_page(model)
    result["load_s"] = time.perf_counter() - started
    result["cpu_share"] = share.stop()
    memory.stop_sampler()
    io1, end = proc_io(), proc_status()
    result.update(
        peak_rss=memory.hwm() - base["VmRSS"], peak_anon=memory.anon_peak - base["RssAnon"],
        held_rss=end["VmRSS"] - base["VmRSS"], held_file=end["RssFile"] - base["RssFile"],
        rchar=io1.get("rchar", 0) - io0.get("rchar", 0), read_bytes=io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        peak_reset_ok=memory.reset_ok,
    )
    if args.config not in (REFERENCE, TOUCHED):
        result["resident_bytes"] = vram.managed(model).resident_bytes()
        result["bytes_read_from_disk"] = vram.stats()["counters"]["bytes_read_from_disk"]
    drop(model)
    emit(result)


def generate_worker(args) -> None:
    """Table 2: load one tiny family, one warm-up generation, then ``repeats`` timed ones."""
    import diffusers
    from families import tiny_call_kwargs
    from test_pipelines import PROMPT, request_for  # the tests' mapping of tiny_call_kwargs onto a request
    folder = Path(args.folder)
    started = time.perf_counter()
    if args.config == REFERENCE:
        pipeline_class = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
        pipe = pipeline_class.from_pretrained(folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        kwargs = tiny_call_kwargs(args.family)

        def run():
            pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
    else:
        from pipelines import load_pipeline
        from presets import preset_configs
        pipe = load_pipeline(folder, preset_configs(args.config, vram_limit=0))
        request, extra = request_for(args.family)

        def run():
            pipe.generate(request, pipeline_kwargs=extra)
    load_s = time.perf_counter() - started

    warm, times, shares = [], [], []
    share = CpuShare()
    for i in range(1 + args.repeats):
        share.start()
        t0 = time.perf_counter()
        run()
        (warm if i == 0 else times).append(time.perf_counter() - t0)
        if i:
            shares.append(share.stop())
    emit({"mode": args.worker, "config": args.config, "family": args.family, "load_s": load_s,
          "warmup_s": warm[0], "times": times, "median_s": statistics.median(times),
          "cpu_share": {k: statistics.mean(s.get(k, 0.0) for s in shares) for k in ("other_cores", "steal_cores")}})


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    {"load": load_worker, "generate": generate_worker}[args.worker](args)


# ==========================================================================================
# Parent: build the inputs, run the rows, print the tables
# ==========================================================================================

def noise(result: dict) -> float:
    """Average cores busy with other processes (or other guests) while the row was timed."""
    share = result.get("cpu_share") or {}
    return share.get("other_cores", 0.0) + share.get("steal_cores", 0.0)


def wait_for_quiet(max_cores: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for half a second in which other processes used at most
    ``max_cores`` cores; the seconds waited."""
    started = time.perf_counter()
    share = CpuShare()
    while time.perf_counter() - started < max_wait:
        share.start()
        time.sleep(0.5)
        if noise(share.stop()) <= max_cores:
            break
    return time.perf_counter() - started


def run_row(label: str, worker_args: list[str], args, env: dict, before=None) -> dict:
    """One row in fresh processes, started when the CPUs are quiet; rerun (up to --retries)
    when other processes were busy during its timed part anyway."""
    attempts = []
    for _ in range(1 + max(0, args.retries)):
        if before is not None:
            before()
        waited = wait_for_quiet(args.noise_cores, args.max_wait)
        if waited > 5:
            print(f"  (waited {waited:.0f} s for other processes to quieten)", flush=True)
        started = time.perf_counter()
        result = run_worker(sys.executable, Path(__file__), worker_args, args.timeout, env)
        took = time.perf_counter() - started
        attempts.append(result)
        if "error" in result:
            print(f"  {label}: could not run: {result['error']} ({took:.0f} s)", flush=True)
            break
        seconds = result.get("median_s", result.get("load_s"))
        print(f"  {label}: {seconds:.3f} s, other processes {noise(result):.2f} cores ({took:.0f} s)", flush=True)
        if noise(result) <= args.noise_cores:
            break
    ok = [r for r in attempts if "error" not in r]
    result = min(ok, key=noise) if ok else attempts[-1]
    result["attempts"] = len(attempts)
    return result


def mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f}"


def load_table(results: dict[str, dict], checkpoint_bytes: int) -> tuple[list[str], list[list[str]]]:
    headers = ["loader", "load s", "time vs from_pretrained", "peak RSS above baseline (MB)", "peak RSS / checkpoint",
               "RSS held after load (MB)", "read()/pread() bytes (MB)", "notes"]
    ref_s = results.get(REFERENCE, {}).get("load_s")
    rows = []
    for config, r in results.items():
        label = {REFERENCE: "diffusers from_pretrained(torch_dtype=bf16)",
                 TOUCHED: "same, then every weight page read once"}.get(config, f"preset {config}")
        if "error" in r:
            rows.append([label, "-", "-", "-", "-", "-", "-", f"could not run: {r['error']}"])
            continue
        notes = ["lazy: the shards are memory-mapped, no weight is read yet"] if config == REFERENCE else []
        if "offload_tier" in r:
            held = sum(r.get("resident_bytes", {}).values())
            notes.append(f"offload tier {r['offload_tier']}, the core holds {held / 1e6:,.0f} MB")
            if "float8" in r["offload_tier"]:
                share = 2 * (1 - held / checkpoint_bytes)  # held = fp8 share / 2 + the rest
                notes.append(f"so ~{share:.0%} of the bytes are stored in fp8: layers named like norms (FLUX's "
                             f"AdaLayerNorm modulation Linears) keep bf16, as in diffusers' layerwise casting")
        if abs(r["peak_rss"] - r["peak_anon"]) > 100e6:
            notes.append(f"anonymous-memory peak ~{r['peak_anon'] / 1e6:,.0f} MB (sampled); the rest is file pages "
                         f"mapped from the shards")
        if r["held_file"] > 100e6:
            notes.append(f"{r['held_file'] / 1e6:,.0f} MB of the held RSS is mapped file pages")
        if noise(r) > 0.1:
            notes.append(f"other processes used {noise(r):.2f} cores")
        if not r.get("peak_reset_ok", True):
            notes.append("VmHWM could not be reset: the peak includes the whole process")
        ratio = f"{r['load_s'] / ref_s:.2f}" if ref_s else "-"
        rows.append([label, f"{r['load_s']:.2f}", ratio, mb(r["peak_rss"]), f"{r['peak_rss'] / checkpoint_bytes:.3f}",
                     mb(r["held_rss"]), mb(r["rchar"]), "; ".join(notes)])
    return headers, rows


def generate_table(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    headers = ["family", "pipeline", "s/generation (median)", "ratio vs diffusers", "first (warm-up) s", "load s",
               "notes"]
    rows = []
    for family, by_config in results.items():
        ref = by_config.get(REFERENCE, {}).get("median_s")
        for config, r in by_config.items():
            label = "diffusers from_pretrained (fp32)" if config == REFERENCE else f"preset {config}"
            if "error" in r:
                rows.append([family, label, "-", "-", "-", "-", f"could not run: {r['error']}"])
                continue
            notes = [f"other processes used {noise(r):.2f} cores"] if noise(r) > 0.1 else []
            ratio = f"{r['median_s'] / ref:.2f}" if ref else "-"
            rows.append([family, label, f"{r['median_s']:.3f}", ratio, f"{r['warmup_s']:.3f}", f"{r['load_s']:.2f}",
                         "; ".join(notes)])
    return headers, rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to width; the last column (notes) is left ragged."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true",
        help="smoke run: 0.2 GiB checkpoint, flux only, 3 timed generations, no reruns")
    add("--size-gib", type=float, help="bf16 weight bytes of the synthetic checkpoint (default 1.15; quick 0.2)")
    add("--families", help="comma-separated families of tests/families.py (default all; quick flux)")
    add("--presets", help="comma-separated presets (default all)")
    add("--repeats", type=int, help="timed generations per row (default 10; quick 3)")
    add("--only", choices=("load", "generate"), help="run one of the two tables")
    add("--threads", type=int, help="torch threads in every row (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed of the synthetic checkpoint's weights")
    add("--out-dir", default=str(ROOT / "bench" / "out"), help="where the folders are built (git-ignored)")
    add("--timeout", type=float, default=420.0, help="seconds a row may take")
    add("--retries", type=int, help="extra runs of a row that other processes disturbed (default 1; quick 0)")
    add("--noise-cores", type=float, default=0.25,
        help="busy cores of other processes above which a row waits to start, or is run again")
    add("--max-wait", type=float, help="longest wait for other processes to quieten, s (default 120; quick 5)")
    add("--markdown", nargs="?", const="-", metavar="FILE",
        help="tables as markdown; with FILE, the report is also written there")
    add("--json", help="all results, as JSON, to this file")
    for hidden in ("--worker", "--config", "--folder", "--family", "--warm-folder"):  # set by the parent
        add(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return args
    from families import FAMILIES
    from presets import list_presets
    args.size_gib = args.size_gib if args.size_gib is not None else (0.2 if args.quick else 1.15)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    args.max_wait = args.max_wait if args.max_wait is not None else (5.0 if args.quick else 120.0)
    args.retries = args.retries if args.retries is not None else (0 if args.quick else 1)
    args.families = args.families.split(",") if args.families else list(QUICK_FAMILIES if args.quick else FAMILIES)
    args.presets = args.presets.split(",") if args.presets else list_presets()
    unknown = [f for f in args.families if f not in FAMILIES] + [p for p in args.presets if p not in list_presets()]
    if unknown:
        parser.error(f"unknown family or preset {unknown}; families {FAMILIES}, presets {list_presets()}")
    return args


def measure_loading(args, out_dir: Path, env: dict, common: list[str], render) -> tuple[str, dict]:
    """Table 1 (see the module's docstring): its section of the report, and the raw results."""
    t0 = time.perf_counter()
    warm_folder = build_tiny(out_dir, "flux")
    folder = build_checkpoint(out_dir, args.size_gib, args.seed)
    shards = shard_files(folder)
    checkpoint_bytes = sum(p.stat().st_size for p in shards)
    config = json.loads((folder / MARKER).read_text())["config"]
    print(f"\n## Loading {folder.name}: {checkpoint_bytes / GIB:.3f} GiB in {len(shards)} shards "
          f"(ready in {time.perf_counter() - t0:.1f} s)", flush=True)

    def warm():
        for shard in shards:
            warm_page_cache(shard)

    results = {}
    for name in [REFERENCE, TOUCHED] + args.presets:
        results[name] = run_row(name, ["--worker", "load", "--config", name, "--folder", str(folder),
                                       "--warm-folder", str(warm_folder)] + common, args, env, before=warm)
    text = "\n".join([
        f"## Loading a {checkpoint_bytes / GIB:.2f} GiB sharded bf16 checkpoint", "",
        f"FluxTransformer2DModel (hidden {config['num_attention_heads'] * 128}, {config['num_layers']} double + "
        f"{config['num_single_layers']} single blocks), {checkpoint_bytes / 1e6:,.0f} MB in {len(shards)} shards of "
        f"<= 300 MB with an index, seeded random weights. One fresh process per row; page cache warmed before each "
        f"row (every shard read once), so disk speed does not count. Presets: load_component with the denoiser "
        f"config of preset_configs(preset, vram_limit=0, dtype=bfloat16); no forward. Each worker first loads the "
        f"tiny FLUX transformer the same way (imports and first-call set-up are not charged). Peak RSS: VmHWM above "
        f"the baseline taken after that; file pages mapped from the shards count (from_pretrained memory-maps the "
        f"shards, so its pages come in when first used: the second row reads each page once). read()/pread() "
        f"bytes: rchar of /proc/self/io during the load (memory-mapped reads are not counted there).", "",
        render(*load_table(results, checkpoint_bytes))])
    return text, {"checkpoint": {"folder": str(folder), "bytes": checkpoint_bytes, "config": config},
                  "load": results}


def measure_generation(args, out_dir: Path, env: dict, common: list[str], render) -> tuple[str, dict]:
    """Table 2 (see the module's docstring): its section of the report, and the raw results."""
    print("\n## Tiny generations", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for family in args.families:
        folder = build_tiny(out_dir, family)
        results[family] = {
            name: run_row(f"{family} / {name}", ["--worker", "generate", "--config", name, "--family", family,
                                                  "--folder", str(folder)] + common, args, env)
            for name in [REFERENCE] + args.presets}
    text = "\n".join([
        "## Tiny-model generation on the CPU", "",
        f"Tiny seeded folders of tests/families.py. One fresh process per (family, pipeline): load, one warm-up "
        f"generation, then the median of {args.repeats} generations (float32; presets with vram_limit=0, so the "
        f"layer-level presets stream every layer). Reference: diffusers' own pipeline "
        f"from_pretrained(torch_dtype=float32) with the same arguments (tiny_call_kwargs). The models are tiny: this "
        f"measures the per-generation overhead, not the arithmetic.", "",
        render(*generate_table(results))])
    return text, {"generate": results}


def main() -> int:
    started = time.perf_counter()
    args = parse_args()
    if args.worker:
        return serve_worker(worker, args)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"# pipelines CPU benchmark, {info['date']}\nmachine: {describe_machine(info)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    common = ["--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
    render = md_table if args.markdown else text_table
    parts = [f"Date: {info['date']}\nMachine: {describe_machine(info)}\nCode: commit {info.get('commit') or 'unknown'}"]
    dump: dict = {"machine": info}
    for table, measure in (("load", measure_loading), ("generate", measure_generation)):
        if args.only in (None, table):
            text, raw = measure(args, out_dir, env, common, render)
            parts.append(text)
            dump.update(raw)
    report = "\n\n".join(parts) + f"\n\nTotal benchmark time {time.perf_counter() - started:.0f} s.\n"
    print("\n" + report)
    if args.markdown not in (None, "-"):
        Path(args.markdown).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
