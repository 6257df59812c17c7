#!/usr/bin/env python
"""GPU benchmark of the vram core: seconds per forward and peak VRAM against vram_limit.

    PYTHONPATH=. .venv/bin/python bench/core_gpu.py                    # Z-Image transformer, 1024 px
    PYTHONPATH=. .venv/bin/python bench/core_gpu.py --quick            # 6 layers, 512 px, fewer forwards
    PYTHONPATH=. .venv/bin/python bench/core_gpu.py --model synthetic --size-gib 12
    PYTHONPATH=. .venv/bin/python bench/core_gpu.py --cpu-dry-run      # code-path check on a CPU, tiny model

Without CUDA it prints a message and exits 0 (``--cpu-dry-run`` runs every row on the CPU
with a tiny model instead: a check that the script works, not a measurement).

The model is diffusers' ``ZImageTransformer2DModel`` at its published config (dim 3840, 30
layers, about 6.2 B parameters, 12.3 GB in bf16) with seeded random weights, or the synthetic
MLP stack of bench/_common.py at --size-gib. The weights are written once as .safetensors
under --out-dir and every row loads them from there. Each row runs in a fresh process:

* plain          the model on the GPU, no management
* vram resident  every tier on cuda/bf16
* vram limit X%  offload/onload cpu/bf16, preparing/computation cuda/bf16, vram_limit = X% of
                 the weight bytes (25% and 50% by default)
* vram disk      offload/onload "disk", preparing/computation cuda/bf16, vram_limit = 25%
* diffusers      group offloading cpu->cuda, block_level and leaf_level, use_stream=True
* DiffSynth      its AutoWrapped* layers with the same 8-key config and vram_limit (when
                 diffsynth is importable by --diffsynth-python)

Reported per row: median seconds per forward (after warm-up, CUDA-synchronized), the ratio to
plain, torch's peak reserved and allocated bytes during the forwards
(torch.cuda.max_memory_reserved/allocated), this process's peak GPU memory as NVML sees it
(context and library workspaces included; sampled every 10 ms, needs pynvml), the vram_limit,
whether the peak stayed within it, the host RSS peak, and the largest difference from the
plain model's output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from _common import (serve_worker, GIB, Memory, blocks_for_size, build_synthetic, emit, machine_info,  # noqa: E402
                     make_weights, md_table, proc_status, run_worker, warm_page_cache)

BF16 = torch.bfloat16
ZIMAGE_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                     n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                     cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                     axes_lens=[1024, 512, 512])
ZIMAGE_TINY = dict(ZIMAGE_CONFIG, dim=256, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                   cap_feat_dim=64, axes_dims=[16, 24, 24])


def row_specs(limits: list[float]) -> list[tuple[str, str]]:
    rows = [("plain", "plain model on the GPU"), ("vram_resident", "vram: all resident (cuda/bf16)")]
    for pct in limits:
        rows.append((f"vram_limit{pct:g}", f"vram: layer offload cpu->cuda, vram_limit {pct:g}% of weights"))
    rows += [
        ("vram_disk", f"vram: disk tier, vram_limit {limits[0]:g}% of weights"),
        ("diffusers_block", "diffusers group offload cpu->cuda, block_level, use_stream"),
        ("diffusers_leaf", "diffusers group offload cpu->cuda, leaf_level, use_stream"),
    ]
    for pct in limits:
        rows.append((f"diffsynth_limit{pct:g}", f"DiffSynth cpu->cuda, vram_limit {pct:g}% of weights"))
    rows.append(("diffsynth_disk", f"DiffSynth disk offload, vram_limit {limits[0]:g}% of weights"))
    return rows


# ==========================================================================================
# The model and its inputs
# ==========================================================================================

def model_spec(args) -> dict:
    if args.model == "synthetic":
        hidden = args.hidden
        blocks = args.blocks or blocks_for_size(args.size_gib, hidden, args.mlp_ratio)
        return {"kind": "synthetic", "hidden": hidden, "blocks": blocks, "mlp_ratio": args.mlp_ratio,
                "tokens": args.tokens}
    config = dict(ZIMAGE_TINY if args.cpu_dry_run else ZIMAGE_CONFIG)
    if args.layers is not None:
        config["n_layers"] = args.layers
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return {"kind": "zimage", "config": config, "resolution": args.resolution, "cap_len": args.cap_len}


def build_model(spec: dict, empty: str):
    """The model without weights: ``empty`` is 'vram' (vram.empty_weights), 'diffsynth'
    (its skip_model_initialization) or 'meta' (torch's meta device)."""
    def construct():
        if spec["kind"] == "synthetic":
            return build_synthetic(spec, "cpu")
        from diffusers import ZImageTransformer2DModel
        config = {k: tuple(v) if k in ("all_patch_size", "all_f_patch_size") else v for k, v in spec["config"].items()}
        return ZImageTransformer2DModel(**config)
    if empty == "vram":
        import vram
        with vram.empty_weights():
            return construct()
    if empty == "diffsynth":
        # Meta parameters in bf16, the dtype the weights will have: diffusers' Z-Image reads
        # `t_embedder.mlp[0].weight.dtype` to cast its input, and DiffSynth's disk mode leaves
        # that weight on the meta device between forwards.
        from diffsynth.core.vram.initialization import skip_model_initialization
        default = torch.get_default_dtype()
        torch.set_default_dtype(BF16)
        try:
            with skip_model_initialization():
                return construct()
        finally:
            torch.set_default_dtype(default)
    with torch.device("meta"):
        return construct()


def make_inputs(spec: dict, device: torch.device, seed: int = 1234):
    generator = torch.Generator().manual_seed(seed)
    if spec["kind"] == "synthetic":
        x = torch.randn(1, spec["tokens"], spec["hidden"], generator=generator).to(device=device, dtype=BF16)
        return (x,), {}
    side = spec["resolution"] // 8  # VAE latent
    latent = torch.randn(spec["config"]["in_channels"], 1, side, side, generator=generator)
    cap = torch.randn(spec["cap_len"], spec["config"]["cap_feat_dim"], generator=generator)
    t = torch.tensor([0.5])
    return ([latent.to(device=device, dtype=BF16)], t.to(device), [cap.to(device=device, dtype=BF16)]), \
        {"return_dict": False}


def first_tensor(out) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


# ==========================================================================================
# GPU memory as NVML sees it
# ==========================================================================================

class Nvml:
    """This process's GPU memory from NVML (context included), sampled in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.ok = False
        self.error = ""
        self.process_peak = 0
        self.device_peak = 0
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml
            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            if visible.isdigit():
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible))
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(visible)
            self.pynvml = pynvml
            self.ok = True
        except Exception as error:  # noqa: BLE001 - no pynvml, no driver, no permission
            self.error = f"{type(error).__name__}: {error}"

    def device_used(self) -> int:
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used) if self.ok else 0

    def process_used(self) -> int | None:
        if not self.ok:
            return None
        try:
            for proc in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        except Exception:  # noqa: BLE001
            return None
        return None

    def reset(self) -> None:
        self.process_peak = self.process_used() or 0
        self.device_peak = self.device_used()

    def _sample(self) -> None:
        used = self.process_used()
        if used is not None and used > self.process_peak:
            self.process_peak = used
        device = self.device_used()
        if device > self.device_peak:
            self.device_peak = device

    def start(self) -> None:
        if not self.ok:
            return

        def loop():
            while not self._stop.wait(self.interval):
                self._sample()

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()


# ==========================================================================================
# Worker
# ==========================================================================================

def import_diffsynth_layers():
    """(layers module, DiskMap); ModuleNotFoundError when diffsynth is not installed."""
    from core_cpu import import_diffsynth_vram  # same fallback as the CPU benchmark
    layers, disk_map, _note = import_diffsynth_vram()
    return layers, disk_map


def limit_gib(mode: str, weight_bytes: int, limits: list[float]) -> float | None:
    if mode.startswith(("vram_limit", "diffsynth_limit")):
        return float(mode.rsplit("limit", 1)[1]) / 100 * weight_bytes / GIB
    if mode in ("vram_disk", "diffsynth_disk"):
        return limits[0] / 100 * weight_bytes / GIB
    return None


def worker(args) -> None:
    mode = args.worker
    spec = json.loads(args.spec)
    limits = [float(v) for v in args.limits.split(",")]
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    is_cuda = device.type == "cuda"
    weights = Path(args.weights)
    weight_bytes = int(args.weight_bytes)
    cap = limit_gib(mode, weight_bytes, limits)
    result: dict = {"mode": mode, "torch": torch.__version__, "vram_limit_gib": cap}
    notes: list[str] = []

    nvml = Nvml() if is_cuda else None
    before_context = nvml.device_used() if nvml and nvml.ok else None
    if is_cuda:
        torch.cuda.set_device(0)
        a = torch.randn(256, 256, device=device, dtype=BF16)
        (a @ a).sum().item()  # context, cuBLAS handle
        del a
        torch.cuda.synchronize()
        if before_context is not None:
            result["context_bytes"] = nvml.device_used() - before_context
    args_in, kwargs_in = make_inputs(spec, device)

    ds_layers = DiskMap = None
    if mode.startswith("diffsynth"):
        try:
            ds_layers, DiskMap = import_diffsynth_layers()
        except ModuleNotFoundError:
            emit({"mode": mode, "error": "not installed (pip install diffsynth)"})
            return
    empty = "vram" if mode.startswith("vram") else "diffsynth" if mode.startswith("diffsynth") else "meta"
    if empty == "meta" and spec["kind"] == "zimage":
        empty = "vram"  # keeps any buffers real; only the construction is borrowed
    model = build_model(spec, empty)
    model.eval()

    host = Memory()
    base = proc_status()
    host.reset()
    started = time.perf_counter()

    # ---- setup ----------------------------------------------------------------------------
    def load_state(target_device):
        from safetensors.torch import load_file
        state = load_file(str(weights), device=str(target_device))
        model.load_state_dict(state, assign=True, strict=True)
        del state

    if mode == "plain":
        load_state(device)
        model.to(device)
    elif mode.startswith("vram"):
        import vram
        dev = str(device)
        if mode == "vram_resident":
            config = dict(offload_dtype=BF16, offload_device=dev, onload_dtype=BF16, onload_device=dev,
                          preparing_dtype=BF16, preparing_device=dev, computation_dtype=BF16, computation_device=dev)
        elif mode == "vram_disk":
            config = dict(offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk",
                          preparing_dtype=BF16, preparing_device=dev, computation_dtype=BF16, computation_device=dev)
        else:
            config = dict(offload_dtype=BF16, offload_device="cpu", onload_dtype=BF16, onload_device="cpu",
                          preparing_dtype=BF16, preparing_device=dev, computation_dtype=BF16, computation_device=dev)
        vram.enable_vram_management(model, config, vram_limit=cap, weights=str(weights))
        vram.onload(model)
    elif mode.startswith("diffusers"):
        from diffusers.hooks import apply_group_offloading
        load_state("cpu")
        level = "block_level" if mode == "diffusers_block" else "leaf_level"
        apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"), offload_type=level,
                               num_blocks_per_group=1 if level == "block_level" else None,
                               use_stream=is_cuda)
        if not is_cuda:
            notes.append("use_stream=False on the CPU")
    elif mode.startswith("diffsynth"):
        dev = str(device)
        if mode == "diffsynth_disk":
            config = dict(offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk",
                          preparing_dtype=BF16, preparing_device=dev, computation_dtype=BF16, computation_device=dev)
            disk_map = DiskMap(str(weights), "cpu")
        else:
            config = dict(offload_dtype=BF16, offload_device="cpu", onload_dtype=BF16, onload_device="cpu",
                          preparing_dtype=BF16, preparing_device=dev, computation_dtype=BF16, computation_device=dev)
            disk_map = None
            load_state("cpu")  # what DiffSynth's load_model does for a non-disk offload
        module_map = {torch.nn.Linear: ds_layers.AutoWrappedLinear}
        for module in model.modules():  # every other class that holds weights itself (norms)
            if module is not model and not isinstance(module, torch.nn.Linear) \
                    and any(True for _ in module.parameters(recurse=False)):
                module_map.setdefault(type(module), ds_layers.AutoWrappedModule)
        ds_cap = cap
        if not is_cuda and cap is not None:
            ds_cap = None  # DiffSynth reads free memory from torch.<device>.mem_get_info, absent for the CPU
            notes.append("vram_limit not passed to DiffSynth on the CPU")
        model = ds_layers.enable_vram_management(model, module_map, vram_config=config, vram_limit=ds_cap,
                                                 disk_map=disk_map)
        # Parameters held directly by unwrapped modules (Z-Image's pad tokens on the root)
        # are not managed by DiffSynth; its pipelines keep them on the computation device.
        moved = 0
        covered = {id(inner) for wrapper in model.modules() if isinstance(wrapper, ds_layers.AutoTorchModule)
                   for inner in wrapper.modules()}
        for module in model.modules():
            if id(module) in covered:
                continue
            for name, param in list(module._parameters.items()):
                if param is not None and param.device != device and not param.is_meta:
                    module._parameters[name] = torch.nn.Parameter(param.data.to(device=device, dtype=BF16),
                                                                  requires_grad=False)
                    moved += 1
        if moved:
            notes.append(f"{moved} unwrapped parameter(s) put on {device} by hand")
        for module in model.modules():
            if isinstance(module, ds_layers.AutoTorchModule):
                module.onload()
    if is_cuda:
        torch.cuda.synchronize()
    result["setup_s"] = time.perf_counter() - started
    result["setup_host_peak"] = host.hwm() - base["VmRSS"]

    # ---- forwards ---------------------------------------------------------------------
    sync = torch.cuda.synchronize if is_cuda else None
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        nvml.reset()
        nvml.start()
    host.reset()
    warm, times = [], []
    peaks = {"reserved": 0, "allocated": 0}
    out = None
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            if mode.startswith("vram") and i == args.warmup:
                import vram
                vram.get_manager().reset_counters()
            t0 = time.perf_counter()
            out = model(*args_in, **kwargs_in)
            if sync:
                sync()
            (warm if i < args.warmup else times).append(time.perf_counter() - t0)
            if is_cuda:
                # Read after every forward: the vram core resets torch's peak statistics at the
                # start of each top-level forward of a managed model.
                peaks["reserved"] = max(peaks["reserved"], torch.cuda.max_memory_reserved())
                peaks["allocated"] = max(peaks["allocated"], torch.cuda.max_memory_allocated())
    if is_cuda:
        nvml.stop()
        result.update(peak_reserved=peaks["reserved"], peak_allocated=peaks["allocated"],
                      nvml_ok=nvml.ok, nvml_error=nvml.error,
                      nvml_process_peak=nvml.process_peak or None,
                      nvml_device_peak_delta=(nvml.device_peak - before_context) if before_context is not None else None)
    result.update(times=times, warmup_times=warm, median_s=statistics.median(times),
                  host_peak=host.hwm() - base["VmRSS"])
    if mode.startswith("vram"):
        import vram
        report = vram.last_report()
        result["vram_report"] = report.describe() if report else None
        result["vram_within_cap"] = report.within_cap if report else None
        result["counters"] = vram.stats()["counters"]
    tensor = first_tensor(out)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({"out": tensor.detach().float().cpu().contiguous()}, str(out_path))
    result["notes"] = notes
    emit(result)


# ==========================================================================================
# Parent
# ==========================================================================================

def generate_weights(spec: dict, path: Path, seed: int, use_cuda: bool) -> tuple[Path, int]:
    model = build_model(spec, "meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weight_bytes = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    tag = json.dumps(spec, sort_keys=True) + f"-seed{seed}-bf16-v1"
    if use_cuda:
        # Random numbers on the GPU (seconds instead of minutes for billions of values).
        from safetensors import safe_open
        from safetensors.torch import save_file
        reuse = False
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    reuse = (handle.metadata() or {}).get("bench_tag") == tag
            except Exception:  # noqa: BLE001
                reuse = False
        if not reuse:
            import math
            generator = torch.Generator(device="cuda").manual_seed(seed)
            state = {}
            for key, shape in shapes.items():
                sample = torch.randn(shape, generator=generator, device="cuda", dtype=torch.float32)
                if len(shape) >= 2:
                    sample.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
                elif "norm" in key and key.endswith("weight"):
                    sample.mul_(0.1).add_(1.0)
                else:
                    sample.mul_(0.02)
                state[key] = sample.to(BF16).cpu()
                del sample
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp), metadata={"bench_tag": tag})
            del state
            os.replace(tmp, path)
            torch.cuda.empty_cache()
    else:
        make_weights(path, shapes, seed, tag)
    return path, weight_bytes


def gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("zimage", "synthetic"), default="zimage")
    parser.add_argument("--layers", type=int, default=None, help="Z-Image main layers (default 30; 6 with --quick)")
    parser.add_argument("--resolution", type=int, default=None, help="Z-Image image side in pixels (default 1024; 512 quick)")
    parser.add_argument("--cap-len", type=int, default=256, help="Z-Image caption tokens")
    parser.add_argument("--size-gib", type=float, default=12.0, help="synthetic model: bf16 weight bytes")
    parser.add_argument("--hidden", type=int, default=3840, help="synthetic model: hidden size")
    parser.add_argument("--mlp-ratio", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=4096, help="synthetic model: sequence length")
    parser.add_argument("--limits", default="25,50", help="vram_limit rows, percent of the weight bytes")
    parser.add_argument("--quick", action="store_true",
                        help="smaller Z-Image (6 layers, 512 px), fewer forwards: a few minutes at most on an H200")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (3 quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated subset of the rows' modes")
    parser.add_argument("--skip", default="", help="comma-separated modes to leave out")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "gpu"))
    parser.add_argument("--diffsynth-python", default=sys.executable)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per row (default 900; 120 quick)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every row on the CPU with a tiny model: checks the script, measures nothing useful")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--weight-bytes", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        return serve_worker(worker, args)

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("core_gpu.py: CUDA is not available here (torch "
              f"{torch.__version__}, torch.cuda.is_available() is False); this benchmark measures GPU "
              "memory and time and needs a CUDA device. Nothing was run. (--cpu-dry-run checks the "
              "script on the CPU with a tiny model.)")
        return 0

    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if args.layers is None and args.quick and args.model == "zimage":
        args.layers = 6
    args.timeout = args.timeout or (120.0 if args.quick else 900.0)
    args.resolution = args.resolution or (512 if args.quick or args.cpu_dry_run else 1024)
    if args.cpu_dry_run:
        args.cap_len = min(args.cap_len, 32)
        args.resolution = min(args.resolution, 256)
        if args.model == "synthetic":
            args.size_gib, args.hidden, args.tokens = min(args.size_gib, 0.05), min(args.hidden, 512), min(args.tokens, 64)
    limits = [float(v) for v in args.limits.split(",") if v]
    rows = row_specs(limits)
    modes = [m for m in (args.only.split(",") if args.only else [m for m, _ in rows]) if m]
    skip = {m for m in args.skip.split(",") if m}
    known = {m for m, _ in rows}
    unknown = [m for m in modes + sorted(skip) if m not in known]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {sorted(known)}")
    modes = [m for m in modes if m not in skip]

    spec = model_spec(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if torch.cuda.is_available() and not args.cpu_dry_run:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / GIB:.1f} GiB, CUDA {torch.version.cuda}"
    else:
        info["gpu"] = "none (CPU dry run: not a measurement)"
    print(f"# vram core GPU benchmark ({info['date']})", flush=True)
    print(f"machine: {info['gpu']}; {info['cpu_count']} CPUs, {info['ram_gib']:.1f} GiB RAM, torch {info['torch']}",
          flush=True)

    name = ("zimage-" + f"L{spec['config']['n_layers']}-d{spec['config']['dim']}" if spec["kind"] == "zimage"
            else f"synthetic-h{spec['hidden']}-b{spec['blocks']}-r{spec['mlp_ratio']}")
    t0 = time.perf_counter()
    weights, weight_bytes = generate_weights(spec, out_dir / f"{name}-s{args.seed}.safetensors", args.seed,
                                             use_cuda=torch.cuda.is_available() and not args.cpu_dry_run)
    print(f"model: {name}, {weight_bytes / GIB:.2f} GiB of bf16 weights ({weights}, ready in "
          f"{time.perf_counter() - t0:.0f} s); {warmup} warm-up + {repeats} timed forwards per row", flush=True)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    outputs = out_dir / "outputs"
    shutil.rmtree(outputs, ignore_errors=True)
    results: dict[str, dict] = {}
    common = ["--spec", json.dumps(spec), "--weights", str(weights), "--weight-bytes", str(weight_bytes),
              "--limits", ",".join(f"{v:g}" for v in limits), "--warmup", str(warmup), "--repeats", str(repeats)]
    if args.cpu_dry_run:
        common.append("--cpu-dry-run")
    for mode in modes:
        warm_page_cache(weights)
        python = args.diffsynth_python if mode.startswith("diffsynth") else sys.executable
        started = time.perf_counter()
        result = run_worker(python, Path(__file__), ["--worker", mode, "--output", str(outputs / f"{mode}.safetensors")]
                            + common, args.timeout, env)
        results[mode] = result
        took = time.perf_counter() - started
        if "error" in result:
            print(f"  {mode}: could not run: {result['error']} ({took:.0f} s)", flush=True)
        else:
            print(f"  {mode}: {result['median_s']:.3f} s/forward, peak reserved {gib(result.get('peak_reserved'))} GiB "
                  f"({took:.0f} s)", flush=True)

    from safetensors.torch import load_file
    reference = None
    if (outputs / "plain.safetensors").is_file():
        reference = load_file(str(outputs / "plain.safetensors"))["out"]
    for mode, result in results.items():
        path = outputs / f"{mode}.safetensors"
        if reference is not None and "error" not in result and path.is_file():
            out = load_file(str(path))["out"]
            result["max_abs_err"] = (out - reference).abs().max().item()

    report = render(results, rows, info, spec, name, weight_bytes, warmup, repeats)
    print()
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "spec": spec, "weight_bytes": weight_bytes,
                                               "results": results}, indent=1))
    return 0


def render(results, rows, info, spec, name, weight_bytes, warmup, repeats) -> str:
    plain_s = results.get("plain", {}).get("median_s")
    headers = ["config", "s/forward", "ratio vs plain", "vram_limit (GiB)", "peak reserved (GiB)",
               "peak allocated (GiB)", "NVML process peak (GiB)", "peak <= vram_limit", "host RSS peak (GiB)", "notes"]
    table = []
    for mode, label in rows:
        if mode not in results:
            continue
        r = results[mode]
        if "error" in r:
            table.append([label, "-", "-", "-", "-", "-", "-", "-", "-", f"could not run: {r['error']}"])
            continue
        cap = r.get("vram_limit_gib")
        ratio = r["median_s"] / plain_s if plain_s else None
        verdict = "-"
        if cap is not None and r.get("peak_reserved") is not None:
            verdict = "yes" if r["peak_reserved"] <= cap * GIB else "NO"
            nv = r.get("nvml_process_peak")
            if nv:
                verdict += f" (NVML incl. context: {'yes' if nv <= cap * GIB else 'no'})"
        notes = list(r.get("notes", []))
        if "max_abs_err" in r and mode != "plain":
            notes.append("output identical to plain" if r["max_abs_err"] == 0 else
                         f"max abs err vs plain {r['max_abs_err']:.3g}")
        if r.get("vram_report"):
            notes.append(f"core: {r['vram_report']}")
        c = r.get("counters")
        if c:
            n = max(1, len(r["times"]))
            notes.append(f"per forward {c.get('bytes_to_device', 0) / n / GIB:.2f} GiB to device, "
                         f"{c.get('bytes_read_from_disk', 0) / n / GIB:.2f} GiB from disk, wait "
                         f"{c.get('transfer_wait_s', 0) / n:.3f} s, evictions {c.get('evictions', 0) / n:.0f}")
        if r.get("context_bytes"):
            notes.append(f"CUDA context {r['context_bytes'] / GIB:.2f} GiB")
        if r.get("nvml_ok") is False:
            notes.append(f"no NVML ({r.get('nvml_error')})")
        table.append([label, f"{r['median_s']:.3f}", "-" if ratio is None else f"{ratio:.3f}",
                      "-" if cap is None else f"{cap:.2f}", gib(r.get("peak_reserved")), gib(r.get("peak_allocated")),
                      gib(r.get("nvml_process_peak")) if r.get("nvml_process_peak") else
                      ("-" if r.get("nvml_device_peak_delta") is None else
                       f"~{r['nvml_device_peak_delta'] / GIB:.2f} (device-wide delta)"), verdict, gib(r.get("host_peak")), "; ".join(notes)])
    if spec["kind"] == "zimage":
        what = (f"diffusers ZImageTransformer2DModel ({name}), {spec['resolution']} px "
                f"({(spec['resolution'] // 16) ** 2} image tokens), {spec['cap_len']} caption tokens")
    else:
        what = f"synthetic stack ({name}), 1x{spec['tokens']} tokens"
    lines = [f"Date: {info['date']}",
             f"Machine: {info['gpu']}; {info['cpu_count']} CPUs, {info['ram_gib']:.1f} GiB RAM, torch {info['torch']}",
             f"Code: commit {info.get('commit') or 'unknown'}",
             f"Model: {what}; {weight_bytes / GIB:.2f} GiB of bf16 weights; median of {repeats} forwards after "
             f"{warmup} warm-up",
             "", md_table(headers, table)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
