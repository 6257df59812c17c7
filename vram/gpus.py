"""Which NVIDIA GPUs this process's CUDA sees, and by which index.

NVML numbers every GPU of the machine, whatever ``CUDA_VISIBLE_DEVICES`` says; CUDA numbers
only the GPUs the variable lets through, in the order it lists them. The hardware probe
(presets/) and the memory sampler both read NVML through this one mapping, so "GPU 1" on the
hardware card, in the memory graph and in ``cuda:1`` is the same GPU.

    nvml.nvmlInit()
    for gpu in in_cuda_order(nvml_gpus(nvml)):
        gpu.cuda_index, gpu.nvml_index, gpu.handle     # handle: for NVML's per-device calls

``CUDA_VISIBLE_DEVICES`` is read as CUDA reads it: unset shows every GPU; an empty value hides
them all; entries are indices, UUIDs (``GPU-8f3c...``) or enough of a UUID's start to name one
GPU, or a MIG instance's UUID (``MIG-...``). The first entry that names no GPU (an index past
the last, an unknown or ambiguous UUID, ``-1``) ends the list, and a GPU named twice hides
every GPU, as in torch's own reading of the variable (``torch.cuda._parse_visible_devices``).
CUDA enumerates a single MIG instance per process, so a MIG entry ends the list after the
instance it names. Not read: the ``MIG-GPU-<uuid>/<gi>/<ci>`` form of drivers before R470
(it names no device here), and MIG mode on a GPU named by its index or GPU UUID (it is read
as the whole GPU).

This module knows nothing of pipelines, presets or the app.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

_INDEX = re.compile(r"[+-]?\d+")   # CUDA reads an entry as strtoul would: "1gpu2" is 1


@dataclass(frozen=True)
class NvmlGpu:
    """One GPU as NVML lists it, by the names a ``CUDA_VISIBLE_DEVICES`` entry may give it."""

    nvml_index: int
    uuid: str | None                   # "GPU-8f3c...", None where NVML cannot say
    mig_uuids: tuple[str, ...] = ()    # its MIG instances' UUIDs ("MIG-..."), where they were read


@dataclass(frozen=True)
class CudaDevice:
    """What CUDA device ``cuda_index`` is in NVML's list: a whole GPU, or one MIG instance on it."""

    cuda_index: int
    nvml_index: int
    mig: int | None = None             # its position in ``NvmlGpu.mig_uuids``; None: the whole GPU


def cuda_devices(gpus: Sequence[NvmlGpu], visible: str | None) -> tuple[CudaDevice, ...]:
    """The CUDA devices a process sees, in CUDA's order (position i is ``cuda:i``), given the
    machine's GPUs in NVML's order and the value of ``CUDA_VISIBLE_DEVICES`` (None: unset).

    CUDA's order, which an index in the variable counts in, is the one ``CUDA_DEVICE_ORDER``
    names. PCI_BUS_ID is NVML's order. FASTEST_FIRST (CUDA's default, so what unset means too)
    ranks the cards by CUDA's own estimate of their speed, which cannot be had without
    creating a CUDA context; it is taken as NVML's order too: on a machine of identical cards
    (the usual one with several GPUs) the ranking ties and CUDA falls back to the PCI order.
    With different cards, ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes these numbers CUDA's."""
    if visible is None:
        return tuple(CudaDevice(position, gpu.nvml_index) for position, gpu in enumerate(gpus))
    devices: list[CudaDevice] = []
    for entry in visible.split(","):
        device = _named(entry.strip(), gpus)
        if device is None:
            break
        nvml_index, mig = device
        if any(d.nvml_index == nvml_index for d in devices):  # a GPU (or one of its MIG instances) twice
            return ()
        devices.append(CudaDevice(len(devices), nvml_index, mig))
        if mig is not None:
            break
    return tuple(devices)


def _named(entry: str, gpus: Sequence[NvmlGpu]) -> tuple[int, int | None] | None:
    """(NVML index, MIG position or None) of the GPU ``entry`` names, None if it names none."""
    if entry.startswith("MIG-"):
        found = [(gpu.nvml_index, position) for gpu in gpus
                 for position, uuid in enumerate(gpu.mig_uuids) if uuid.startswith(entry)]
        return found[0] if len(found) == 1 else None
    if entry.startswith("GPU-"):
        found = [gpu.nvml_index for gpu in gpus if gpu.uuid is not None and gpu.uuid.startswith(entry)]
        return (found[0], None) if len(found) == 1 else None
    number = _INDEX.match(entry)
    if number is None or not 0 <= int(number.group()) < len(gpus):
        return None
    return gpus[int(number.group())].nvml_index, None


@dataclass(frozen=True)
class GpuHandle:
    """One GPU NVML lists, as this process sees it."""

    nvml_index: int
    cuda_index: int | None             # torch.device("cuda", cuda_index); None: CUDA_VISIBLE_DEVICES hides it
    uuid: str | None                   # "GPU-...", None where NVML cannot say
    handle: Any                        # for NVML's per-device calls (the MIG instance's, if CUDA sees one)
    mig_uuid: str | None = None        # the MIG instance CUDA sees on this GPU, if it sees one


def nvml_gpus(nvml) -> list[GpuHandle]:
    """Every GPU ``nvml`` (the ``pynvml`` module, or a fake) lists, in NVML's order, each with
    its CUDA index under this process's ``CUDA_VISIBLE_DEVICES``. NVML must be initialised.

    Raises what NVML raises for the count and the handles (the callers degrade on it); a UUID
    NVML cannot read is None, so only an entry naming that GPU by UUID misses it. MIG instances
    are looked up only when the variable names one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wants_mig = visible is not None and any(e.strip().startswith("MIG-") for e in visible.split(","))
    handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())]
    migs = [_mig_instances(nvml, handle) if wants_mig else [] for handle in handles]
    listed = [NvmlGpu(index, _uuid(nvml, handle), tuple(uuid for uuid, _ in instances))
              for index, (handle, instances) in enumerate(zip(handles, migs))]
    by_nvml = {device.nvml_index: device for device in cuda_devices(listed, visible)}
    gpus = []
    for gpu, handle, instances in zip(listed, handles, migs):
        device = by_nvml.get(gpu.nvml_index)
        mig_uuid = None
        if device is not None and device.mig is not None:
            mig_uuid, handle = instances[device.mig]
        gpus.append(GpuHandle(gpu.nvml_index, None if device is None else device.cuda_index, gpu.uuid, handle,
                              mig_uuid))
    return gpus


def in_cuda_order(gpus: Iterable[GpuHandle]) -> list[GpuHandle]:
    """The GPUs CUDA sees, by CUDA index; the hidden ones left out."""
    return sorted((gpu for gpu in gpus if gpu.cuda_index is not None), key=lambda gpu: gpu.cuda_index)


def _uuid(nvml, handle) -> str | None:
    try:
        uuid = nvml.nvmlDeviceGetUUID(handle)
    except Exception:  # an old driver, a fake without it: only UUID entries miss this GPU
        return None
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def _mig_instances(nvml, handle) -> list[tuple[str, Any]]:
    """(UUID, handle) of each MIG instance on the GPU ``handle``; none without MIG mode."""
    try:
        slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except Exception:  # NotSupported: a GPU without MIG
        return []
    instances = []
    for slot in range(slots):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except Exception:  # NotFound: an empty slot
            continue
        uuid = _uuid(nvml, mig)
        if uuid is not None:
            instances.append((uuid, mig))
    return instances
