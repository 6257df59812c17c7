"""What this machine has: NVIDIA GPUs (NVML and torch's view), RAM, and disk where models live.

GPUs are numbered as CUDA numbers them in this process (``GPU.index`` is the i of ``cuda:i``):
NVML lists every GPU of the machine, and ``CUDA_VISIBLE_DEVICES`` picks and orders the ones
CUDA sees (``vram.gpus`` reads it). The GPUs it hides stay on the card, in ``hidden_gpus``,
out of what the planner uses.

Every reading degrades instead of failing: no NVIDIA driver, no ``pynvml`` module, or NVML
raising gives ``gpus == []`` and a ``gpu_status`` that says why, never an exception.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from vram.gpus import GpuHandle, nvml_gpus

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    index: int | None                     # CUDA's index in this process; None: hidden by CUDA_VISIBLE_DEVICES
    name: str
    total_bytes: int
    free_bytes: int                       # NVML: free on the device, all processes counted
    process_bytes: int | None = None      # this process's use, when NVML reports it
    torch_free_bytes: int | None = None   # torch.cuda.mem_get_info, when CUDA torch is installed
    torch_reserved_bytes: int | None = None
    nvml_index: int | None = None         # NVML's index (every GPU of the machine); None: read through torch
    uuid: str | None = None               # "GPU-...", or "MIG-..." for the MIG instance CUDA sees


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPU, ...]
    gpu_status: str                       # "ok", or why there is no GPU reading
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int | None
    disk_path: str | None
    disk_read_bytes_per_s: float | None = None
    hidden_gpus: tuple[GPU, ...] = ()     # NVML's GPUs that CUDA_VISIBLE_DEVICES hides (index None)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def describe(self) -> str:
        lines = []
        if self.gpus:
            for gpu in self.gpus:
                mine = "" if gpu.process_bytes is None else f", this process {gpu.process_bytes / GIB:.1f} GiB"
                nvml = "" if gpu.nvml_index in (None, gpu.index) else f" (NVML GPU {gpu.nvml_index})"
                lines.append(f"GPU {gpu.index}: {gpu.name}{nvml}, {gpu.free_bytes / GIB:.1f} GiB free of "
                             f"{gpu.total_bytes / GIB:.1f} GiB{mine}")
        else:
            lines.append(f"no NVIDIA GPU ({self.gpu_status})")
        for gpu in self.hidden_gpus:
            lines.append(f"NVML GPU {gpu.nvml_index}: {gpu.name}, {gpu.total_bytes / GIB:.1f} GiB, "
                         f"hidden from this process by CUDA_VISIBLE_DEVICES")
        lines.append(f"RAM: {self.ram_available_bytes / GIB:.1f} GiB available of {self.ram_total_bytes / GIB:.1f} GiB")
        if self.disk_free_bytes is not None:
            speed = "" if self.disk_read_bytes_per_s is None else \
                f", reads at {self.disk_read_bytes_per_s / 2**20:.0f} MiB/s"
            lines.append(f"disk: {self.disk_free_bytes / GIB:.1f} GiB free at {self.disk_path}{speed}")
        return "\n".join(lines)


def probe(models_dir: str | os.PathLike | None = None, *, nvml=None, measure_read_speed_of: str | None = None) -> Hardware:
    """Read the machine. ``nvml`` replaces the ``pynvml`` module (tests pass a fake);
    ``measure_read_speed_of`` names a file to time a read of (at most 256 MiB)."""
    gpus, hidden, status = _gpus(nvml)
    if not gpus:
        gpus, status = _torch_gpus(status)
    memory = psutil.virtual_memory()
    disk_path = _existing_parent(Path(models_dir)) if models_dir is not None else Path.cwd()
    try:
        disk_free = shutil.disk_usage(disk_path).free
    except OSError:
        disk_free = None
    speed = _read_speed(Path(measure_read_speed_of)) if measure_read_speed_of else None
    return Hardware(gpus=tuple(gpus), gpu_status=status, ram_total_bytes=memory.total,
                    ram_available_bytes=memory.available, disk_free_bytes=disk_free, disk_path=str(disk_path),
                    disk_read_bytes_per_s=speed, hidden_gpus=tuple(hidden))


def _gpus(nvml) -> tuple[list[GPU], list[GPU], str]:
    """(the GPUs CUDA sees, by CUDA index; those it does not; status) as NVML reads them."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return [], [], "the nvidia-ml-py package is not installed"
    try:
        nvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], [], f"NVML unavailable: {type(error).__name__}: {error}"
    try:
        found = [_gpu(nvml, gpu) for gpu in nvml_gpus(nvml)]
    except Exception as error:
        return [], [], f"NVML failed: {type(error).__name__}: {error}"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    gpus = sorted((gpu for gpu in found if gpu.index is not None), key=lambda gpu: gpu.index)
    hidden = [gpu for gpu in found if gpu.index is None]
    if gpus:
        return gpus, hidden, "ok"
    if hidden:
        return [], hidden, (f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU "
                            f"NVML lists ({len(hidden)})")
    return [], [], "NVML found no devices"


def _torch_gpus(status: str) -> tuple[list[GPU], str]:
    """CUDA devices as torch sees them, when NVML cannot say (a container without the
    management library, say): enough for the tree, no per-process figures."""
    try:
        import torch
        if not torch.cuda.is_available():
            return [], status
        gpus = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            gpus.append(GPU(index, torch.cuda.get_device_name(index), total, free, None, free,
                            torch.cuda.memory_reserved(index)))
        return gpus, f"ok (from torch; {status})"
    except Exception:
        return [], status


def _gpu(nvml, gpu: GpuHandle) -> GPU:
    handle = gpu.handle
    name = nvml.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else str(name)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    process_bytes = None
    try:
        for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid():
                process_bytes = int(process.usedGpuMemory or 0)
    except Exception:  # not supported on every driver / in containers
        pass
    torch_free = torch_reserved = None
    index = gpu.cuda_index
    try:
        import torch
        if index is not None and torch.cuda.is_available() and index < torch.cuda.device_count():
            torch_free, _ = torch.cuda.mem_get_info(index)
            torch_reserved = torch.cuda.memory_reserved(index)
    except Exception:
        pass
    return GPU(index, name, int(memory.total), int(memory.free), process_bytes, torch_free, torch_reserved,
               gpu.nvml_index, gpu.mig_uuid or gpu.uuid)


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_speed(path: Path, limit: int = 256 * 2**20) -> float | None:
    """Bytes per second reading ``path`` (page cache included: a lower bound on cold reads'
    cost, an upper bound on their speed)."""
    try:
        with open(path, "rb", buffering=0) as handle:
            started, done = time.perf_counter(), 0
            while done < limit:
                chunk = handle.read(16 * 2**20)
                if not chunk:
                    break
                done += len(chunk)
        seconds = time.perf_counter() - started
        return done / seconds if done and seconds > 0 else None
    except OSError:
        return None
