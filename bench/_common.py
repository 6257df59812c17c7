"""Shared pieces of the core benchmarks (bench/core_cpu.py, bench/core_gpu.py).

* ``SyntheticStack``: an attention-free transformer-like stack (LayerNorm + Linear token mix,
  LayerNorm + MLP), residual, so outputs stay finite however deep it is.
* ``make_weights``: seeded random weights for a model, saved once as .safetensors and reused.
* ``Memory``: resident-set numbers of this process from /proc (peak reset, VmHWM, a sampler).
* ``run_worker``: run one configuration in a fresh interpreter and read back its JSON result.

This module imports only torch and safetensors at top level so that a worker can run in
another virtual environment (e.g. one with DiffSynth-Studio installed).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

MIB = 1024**2
GIB = 1024**3
RESULT_PREFIX = "BENCH-RESULT "


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------

class MixMLPBlock(torch.nn.Module):
    """x + mix(norm1(x)), then x + fc2(gelu(fc1(norm2(x)))). No attention, no buffers."""

    def __init__(self, hidden: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.norm2 = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, hidden * mlp_ratio)
        self.fc2 = torch.nn.Linear(hidden * mlp_ratio, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SyntheticStack(torch.nn.Module):
    def __init__(self, hidden: int = 2048, blocks: int = 19, mlp_ratio: int = 3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MixMLPBlock(hidden, mlp_ratio) for _ in range(blocks))
        self.norm_out = torch.nn.LayerNorm(hidden)
        self.proj_out = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm_out(x))


def block_params(hidden: int, mlp_ratio: int) -> int:
    f = hidden * mlp_ratio
    return (hidden * hidden + hidden) + (hidden * f + f) + (f * hidden + hidden) + 4 * hidden


def blocks_for_size(size_gib: float, hidden: int, mlp_ratio: int, dtype_bytes: int = 2) -> int:
    """Blocks needed for the weights (bf16) to reach ``size_gib``."""
    head = hidden * hidden + 3 * hidden
    need = size_gib * GIB / dtype_bytes - head
    return max(1, math.ceil(need / block_params(hidden, mlp_ratio)))


def build_synthetic(spec: dict, device: str | torch.device = "meta") -> SyntheticStack:
    with torch.device(device):
        return SyntheticStack(spec["hidden"], spec["blocks"], spec["mlp_ratio"])


# ------------------------------------------------------------------------------------------
# Weights on disk
# ------------------------------------------------------------------------------------------

def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int, dtype=torch.bfloat16):
    """Seeded random weights: Linear weights ~ N(0, 1/fan_in), LayerNorm weights ~ 1,
    biases small. Generated one tensor at a time in float32, stored in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return {key: random_tensor(key, shape, generator, dtype) for key, shape in shapes.items()}


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """One tensor of ``random_state_dict``, drawn in float32 on the generator's device (a CUDA
    generator makes billions of values in seconds) and returned on the CPU in ``dtype``."""
    sample = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        sample.mul_(1.0 / math.sqrt(fan_in))
    elif "norm" in key and key.endswith("weight"):
        sample.mul_(0.1).add_(1.0)
    else:
        sample.mul_(0.02)
    return sample.to(dtype).cpu()


def make_weights(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, tag: str,
                 dtype=torch.bfloat16) -> Path:
    """Write the weights to ``path`` unless a file with the same tag is already there."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("bench_tag") == tag:
                    return path
        except Exception:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(shapes, seed, dtype)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"bench_tag": tag})
    del state
    os.replace(tmp, path)
    return path


MARKER = "bench_complete.json"   # written last into a finished folder: its presence means "reuse"


def written_once(folder: Path, write, about: dict) -> Path:
    """``folder``, made by ``write(tmp)`` in a sibling temporary folder and renamed into place
    unless a finished one is already there."""
    if (folder / MARKER).is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    (tmp / MARKER).write_text(json.dumps(about))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def warm_page_cache(path: Path, chunk: int = 64 * MIB) -> float:
    """Read a file once so later reads come from the page cache; seconds taken."""
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(chunk):
            pass
    return time.perf_counter() - started


def read_bandwidth(path: Path, chunk: int = 64 * MIB, repeats: int = 3) -> float:
    """Bytes/s of one thread copying the (page-cached) file into a reused, already touched
    buffer with preadv: the disk tier's limit when its reads come from the page cache."""
    import os
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    size = path.stat().st_size
    best = 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(repeats):
            started, offset = time.perf_counter(), 0
            while offset < size:
                got = os.preadv(fd, [view[:min(chunk, size - offset)]], offset)
                if got <= 0:
                    break
                offset += got
            best = max(best, offset / (time.perf_counter() - started))
    finally:
        os.close(fd)
    return best


# ------------------------------------------------------------------------------------------
# Process memory (Linux /proc)
# ------------------------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in bytes (0 if unknown)."""
    out = dict.fromkeys(("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"), 0)
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in out:
                    out[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class Memory:
    """The peak resident set of this process since a reset, from the kernel's VmHWM.

    ``reset()`` writes 5 to /proc/self/clear_refs, which sets VmHWM to the current RSS.
    A background sampler also records the peak of RssAnon (anonymous memory only: the
    kernel keeps no high-water mark for it, so this is sampled every ``interval`` s and may
    miss short spikes); it tells memory the process owns from file pages it merely maps.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.reset_ok = True
        self.anon_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.reset_ok = False
        self.anon_peak = proc_status()["RssAnon"]

    def hwm(self) -> int:
        return proc_status()["VmHWM"]

    def start_sampler(self) -> None:
        if self._thread is not None:
            return

        def loop():
            while not self._stop.wait(self.interval):
                anon = proc_status()["RssAnon"]
                if anon > self.anon_peak:
                    self.anon_peak = anon

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop_sampler(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        anon = proc_status()["RssAnon"]
        if anon > self.anon_peak:
            self.anon_peak = anon


class CpuShare:
    """How much CPU other processes used while this one ran (noisy neighbours bias timings).

    From /proc/stat (all CPUs: busy and steal jiffies) and /proc/self/stat (this process,
    all threads). ``other_cores``: average number of cores busy with other work;
    ``steal_cores``: average cores the hypervisor gave to other guests.
    """

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = None

    @staticmethod
    def _system() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return user + nice + system + irq + softirq, steal

    @staticmethod
    def _self() -> int:
        with open("/proc/self/stat") as handle:
            rest = handle.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime of all threads

    def start(self) -> None:
        try:
            self._start = (time.perf_counter(), *self._system(), self._self())
        except (OSError, ValueError, IndexError):
            self._start = None

    def stop(self) -> dict:
        if self._start is None:
            return {}
        try:
            now = (time.perf_counter(), *self._system(), self._self())
        except (OSError, ValueError, IndexError):
            return {}
        wall = max(1e-9, now[0] - self._start[0])
        busy = (now[1] - self._start[1]) / self.hz
        steal = (now[2] - self._start[2]) / self.hz
        mine = (now[3] - self._start[3]) / self.hz
        return {"self_cores": mine / wall, "other_cores": max(0.0, busy - mine) / wall, "steal_cores": steal / wall}


# ------------------------------------------------------------------------------------------
# Timing and workers
# ------------------------------------------------------------------------------------------

def time_forwards(fn, warmup: int, repeats: int, sync=None) -> tuple[list[float], list[float], object]:
    """Run ``fn`` warmup + repeats times; (warm-up seconds, timed seconds, last output)."""
    warm, timed, out = [], [], None
    for i in range(warmup + repeats):
        started = time.perf_counter()
        out = fn()
        if sync is not None:
            sync()
        (warm if i < warmup else timed).append(time.perf_counter() - started)
    return warm, timed, out


def emit(result: dict) -> None:
    """The worker's answer: one JSON line on stdout."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(python: str, script: Path, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``python script --worker ...`` in a fresh process; its result dict, or
    {"error": ...} with the reason it gave none."""
    cmd = [python, str(script)] + args
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        return {"error": f"timed out after {timeout:.0f} s", "stderr": (error.stderr or "")[-4000:]
                if isinstance(error.stderr, str) else ""}
    except OSError as error:
        return {"error": f"could not start {python}: {error}"}
    wall = time.perf_counter() - started
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result.setdefault("wall_s", wall)
            result["stderr_tail"] = proc.stderr[-2000:]
            return result
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()
    reason = last_error_line(tail) or f"exit code {proc.returncode}, no result"
    return {"error": reason, "stderr": (proc.stderr or "")[-4000:], "returncode": proc.returncode}


def last_error_line(lines: list[str]) -> str:
    """The most telling line of a traceback: the last one that looks like 'SomeError: ...'."""
    for line in reversed(lines):
        stripped = line.strip()
        if not stripped:
            continue
        head = stripped.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt")) or head.startswith("Killed"):
            return stripped
    return lines[-1].strip() if lines else ""


def machine_info() -> dict:
    mem_total = 0
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = ""
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "vram"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (vram/ has uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "commit": commit,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "ram_gib": mem_total / GIB,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def describe_machine(info: dict) -> str:
    """One line from ``machine_info()``."""
    return (f"{info['cpu_count']} CPUs ({info['cpu_model']}), {info['ram_gib']:.1f} GiB RAM, torch {info['torch']} "
            f"({info['torch_threads']} threads), Python {info['python']}, {info['platform']}")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |")
    return "\n".join(lines)


def serve_worker(worker, args) -> int:
    """Run one benchmark row in this (child) process; an error becomes a result line with
    its reason, so the parent can print it in the table."""
    import traceback
    try:
        worker(args)
    except BaseException as error:  # reported to the parent
        traceback.print_exc()
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__
        emit({"mode": args.worker, "error": reason})
    return 0
