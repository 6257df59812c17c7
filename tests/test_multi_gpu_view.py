"""The machine view with several GPUs: NVML's numbering mapped onto CUDA's under
CUDA_VISIBLE_DEVICES (vram/gpus.py), the probe and the memory sampler reading every visible
GPU through that mapping, the memory graph's line and cap per GPU, and the hardware card."""

import os
import types

import pytest

from presets.probe import GPU, Hardware, probe
from ui import charts, present
from ui.handlers import AppHandlers, AppOptions
from vram.gpus import CudaDevice, NvmlGpu, cuda_devices, in_cuda_order, nvml_gpus
from vram.sampler import GpuSample, MemorySample, MemorySampler

G = 1024**3
UUIDS = ("GPU-8f3c0a11-0000-0000-0000-000000000000", "GPU-8f3d5b22-0000-0000-0000-000000000000",
         "GPU-1e2f7c33-0000-0000-0000-000000000000")
MIG_UUID = "MIG-5a6b7c8d-0000-0000-0000-000000000000"


class FakeNVML(types.SimpleNamespace):
    """pynvml's calls the probe and the sampler make, over GPUs of (name, total, used, this
    process's share) in NVML's order; the last GPU has one MIG instance (a 10 GiB slice)."""

    def __init__(self, devices):
        super().__init__(devices=list(devices), shut=False)

    def nvmlInit(self):
        self.shut = False

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.devices):
            raise RuntimeError("NVMLError_InvalidArgument")
        return ("gpu", index)

    def nvmlDeviceGetUUID(self, handle):
        return MIG_UUID if handle[0] == "mig" else UUIDS[handle[1]]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        if handle[1] != len(self.devices) - 1:
            raise RuntimeError("NVMLError_NotSupported")
        return 2

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        if slot != 0:
            raise RuntimeError("NVMLError_NotFound")   # an empty slot
        return ("mig", handle[1])

    def nvmlDeviceGetName(self, handle):
        name = self.devices[handle[1]][0]
        return (f"{name} MIG 1g.10gb" if handle[0] == "mig" else name).encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        _, total, used, _ = self.devices[handle[1]]
        if handle[0] == "mig":
            total, used = 10 * G, used // 8
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        mine = self.devices[handle[1]][3]
        return [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=mine),
                types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=G)]


def two_gpus():
    return FakeNVML([("RTX 4090", 24 * G, 6 * G, 5 * G), ("RTX 3090", 24 * G, 3 * G, 2 * G)])


def three_gpus():
    return FakeNVML([("RTX 4090", 24 * G, 6 * G, 5 * G), ("RTX 3090", 24 * G, 3 * G, 2 * G),
                     ("A100", 80 * G, 16 * G, 8 * G)])


@pytest.fixture
def visible(monkeypatch):
    """Sets CUDA_VISIBLE_DEVICES for the test (None: unset)."""
    def set_to(value):
        if value is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    set_to(None)
    return set_to


# -- the mapping ----------------------------------------------------------------------------

MACHINE = (NvmlGpu(0, UUIDS[0]), NvmlGpu(1, UUIDS[1]), NvmlGpu(2, UUIDS[2], (MIG_UUID,)))


@pytest.mark.parametrize("value, expected", [
    (None, [0, 1, 2]),                     # unset: every GPU, in NVML's order
    ("1,0", [1, 0]),                       # the listed ones, in the listed order
    (" 2 , 0", [2, 0]),
    ("", []),                              # empty: no GPU
    ("0,5", [0]),                          # an index past the last ends the list
    ("0,2,-1,1", [0, 2]),                  # so does a negative one (CUDA's own example)
    ("1,1", []),                           # a GPU named twice hides every GPU
    ("2gpu,1", [2, 1]),                    # an entry is read as strtoul reads it
    ("gpu0", []),
    (UUIDS[1], [1]),                       # a whole UUID
    ("GPU-1e2f,GPU-8f3c0", [2, 0]),        # enough of a UUID to name one GPU
    ("GPU-8f3,0", []),                     # a prefix of two UUIDs names none
    ("1,GPU-ffff,0", [1]),                 # an unknown UUID ends the list
    ("GPU-8f3d,0", [1, 0]),                # UUIDs and indices mixed
])
def test_cuda_numbers_the_gpus_the_variable_lists_in_its_order(value, expected):
    devices = cuda_devices(MACHINE, value)
    assert [d.nvml_index for d in devices] == expected
    assert [d.cuda_index for d in devices] == list(range(len(expected)))
    assert all(d.mig is None for d in devices)


@pytest.mark.parametrize("value, expected", [
    (MIG_UUID, (CudaDevice(0, 2, 0),)),             # a MIG instance is a CUDA device of its own
    ("MIG-5a6b", (CudaDevice(0, 2, 0),)),
    (f"{MIG_UUID},0", (CudaDevice(0, 2, 0),)),      # CUDA enumerates one MIG instance: the list ends
    (f"1,{MIG_UUID}", (CudaDevice(0, 1), CudaDevice(1, 2, 0))),
    ("MIG-0000", ()),                               # no such instance
    (f"MIG-GPU-{UUIDS[2][4:]}/1/0", ()),            # the form of drivers before R470 is not read
])
def test_a_mig_entry_names_a_mig_instance(value, expected):
    assert cuda_devices(MACHINE, value) == expected


def test_nvml_gpus_keeps_the_hidden_ones_and_reads_a_mig_instance_through_its_handle(visible):
    visible("2,0")
    gpus = nvml_gpus(three_gpus())
    assert [(g.nvml_index, g.cuda_index, g.uuid) for g in gpus] == [(0, 1, UUIDS[0]), (1, None, UUIDS[1]),
                                                                   (2, 0, UUIDS[2])]
    assert [g.nvml_index for g in in_cuda_order(gpus)] == [2, 0]
    visible(f"{MIG_UUID}")
    mig = in_cuda_order(nvml_gpus(three_gpus()))
    assert [(g.nvml_index, g.cuda_index, g.mig_uuid, g.handle) for g in mig] == [(2, 0, MIG_UUID, ("mig", 2))]


class WithoutUUIDs(FakeNVML):
    def nvmlDeviceGetUUID(self, handle):
        raise RuntimeError("NVMLError_NotSupported")


def test_without_uuids_from_nvml_indices_still_map_and_uuid_entries_name_nothing(visible):
    nvml = WithoutUUIDs(two_gpus().devices)
    visible("1")
    assert [(g.nvml_index, g.cuda_index, g.uuid) for g in nvml_gpus(nvml)] == [(0, None, None), (1, 0, None)]
    visible(UUIDS[1])
    assert in_cuda_order(nvml_gpus(nvml)) == []


# -- the probe ------------------------------------------------------------------------------

def test_the_probe_reads_two_gpus_by_cuda_index(visible):
    hardware = probe(nvml=two_gpus())
    assert [(g.index, g.nvml_index, g.name, g.uuid) for g in hardware.gpus] == [
        (0, 0, "RTX 4090", UUIDS[0]), (1, 1, "RTX 3090", UUIDS[1])]
    assert [g.free_bytes for g in hardware.gpus] == [18 * G, 21 * G] and hardware.hidden_gpus == ()
    assert hardware.gpus[1].process_bytes == 2 * G and hardware.gpu_status == "ok"
    assert "GPU 1: RTX 3090, 21.0 GiB free of 24.0 GiB, this process 2.0 GiB" in hardware.describe()

    visible("1,0")
    swapped = probe(nvml=two_gpus())
    assert [(g.index, g.nvml_index, g.name) for g in swapped.gpus] == [(0, 1, "RTX 3090"), (1, 0, "RTX 4090")]
    assert "GPU 0: RTX 3090 (NVML GPU 1), 21.0 GiB free" in swapped.describe()


def test_the_probe_keeps_hidden_gpus_out_of_what_the_planner_uses(visible):
    visible("2,0")
    hardware = probe(nvml=three_gpus())
    assert [(g.index, g.nvml_index) for g in hardware.gpus] == [(0, 2), (1, 0)]
    assert [(g.index, g.nvml_index, g.name) for g in hardware.hidden_gpus] == [(None, 1, "RTX 3090")]
    assert "NVML GPU 1: RTX 3090, 24.0 GiB, hidden from this process by CUDA_VISIBLE_DEVICES" in hardware.describe()

    visible("")
    none = probe(nvml=three_gpus())
    assert none.gpus == () and len(none.hidden_gpus) == 3 and not none.has_gpu
    assert "CUDA_VISIBLE_DEVICES=''" in none.gpu_status and "hides every GPU" in none.gpu_status


def test_the_probe_reads_the_mig_instance_cuda_sees(visible):
    visible(MIG_UUID)
    hardware = probe(nvml=three_gpus())
    (gpu,) = hardware.gpus
    assert (gpu.index, gpu.nvml_index, gpu.name, gpu.uuid) == (0, 2, "A100 MIG 1g.10gb", MIG_UUID)
    assert gpu.total_bytes == 10 * G and gpu.free_bytes == 8 * G   # the slice's, not the card's 80 GiB
    assert [g.nvml_index for g in hardware.hidden_gpus] == [0, 1]


# -- the sampler ----------------------------------------------------------------------------

def test_the_sampler_reads_every_visible_gpu(visible):
    nvml = two_gpus()
    sampler = MemorySampler(nvml=nvml)
    assert sampler.has_nvml and sampler.nvml_status == "ok" and sampler.device_total_bytes == 24 * G
    reading = sampler.sample()
    assert [(g.cuda_index, g.device_used_bytes, g.process_device_bytes) for g in reading.gpus] == [
        (0, 6 * G, 5 * G), (1, 3 * G, 2 * G)]
    # The sample's own GPU fields stay the sampled device's (GPU 0 by default).
    assert (reading.device_used_bytes, reading.process_device_bytes) == (6 * G, 5 * G)
    assert reading.gpu(1).device_used_bytes == 3 * G and reading.gpu(2) is None
    nvml.devices[1] = ("RTX 3090", 24 * G, 9 * G, 7 * G)
    assert sampler.sample().gpu(1).process_device_bytes == 7 * G
    sampler.stop()
    assert nvml.shut and not sampler.has_nvml


def test_the_sampler_numbers_gpus_as_cuda_does(visible):
    visible("1,0")
    sampler = MemorySampler(nvml=two_gpus(), device=1)
    reading = sampler.sample()
    assert [(g.cuda_index, g.device_used_bytes) for g in reading.gpus] == [(0, 3 * G), (1, 6 * G)]
    assert reading.device_used_bytes == 6 * G          # cuda:1 is NVML's GPU 0 here
    sampler.stop()

    visible("")
    hidden = MemorySampler(nvml=two_gpus())
    assert not hidden.has_nvml and "no GPU is visible to CUDA" in hidden.nvml_status
    assert hidden.sample().gpus == ()


def test_the_sampler_reads_torch_on_every_cuda_device(visible, monkeypatch):
    import torch
    allocated, reserved = {0: G, 1: 3 * G}, {0: 2 * G, 1: 4 * G}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated.__getitem__)
    monkeypatch.setattr(torch.cuda, "memory_reserved", reserved.__getitem__)
    sampler = MemorySampler(nvml=False)
    reading = sampler.sample()
    assert [(g.cuda_index, g.torch_allocated_bytes, g.torch_reserved_bytes, g.device_used_bytes)
            for g in reading.gpus] == [(0, G, 2 * G, None), (1, 3 * G, 4 * G, None)]
    assert (reading.torch_allocated_bytes, reading.torch_reserved_bytes) == (G, 2 * G)


# -- the memory graph -----------------------------------------------------------------------

def gpu_sample(t, *gpus):
    first = gpus[0]
    return MemorySample(t, G, 4 * G, first.torch_allocated_bytes, first.torch_reserved_bytes,
                        first.device_used_bytes, first.process_device_bytes, tuple(gpus))


def datasets_with(spec, column):
    return [rows for rows in spec["datasets"].values() if rows and column in rows[0]]


def test_the_gpu_chart_draws_one_line_per_gpu_and_each_ones_cap():
    samples = [gpu_sample(i * 0.2, GpuSample(0, G, 2 * G, 5 * G, 3 * G + i), GpuSample(1, G, 2 * G, None, None))
               for i in range(5)]
    spec = charts.gpu_chart(samples, 0.0, charts.Marks(vram_limit_bytes=6 * G, predicted_vram_bytes=5 * G)).to_dict()
    (curves,) = datasets_with(spec, "series")
    # GPU 1 has no NVML reading: its line is torch's reserved bytes, and says so.
    assert {row["series"] for row in curves} == {"GPU 0, this process (NVML)", "GPU 1, torch reserved"}
    assert [row["GiB"] for row in curves if row["series"].startswith("GPU 1")] == [2.0] * 5
    assert all(row["device_used_gib"] == 5.0 for row in curves if row["series"].startswith("GPU 0"))
    (lines,) = datasets_with(spec, "line")
    assert [row["text"] for row in lines] == ["vram_limit 6.00 GiB (GPU 0, 1)", "predicted peak 5.00 GiB"]

    per_gpu = charts.gpu_chart(samples, 0.0, charts.Marks(vram_limit_bytes={0: 6 * G, 1: 4 * G})).to_dict()
    (lines,) = datasets_with(per_gpu, "line")
    assert [row["text"] for row in lines] == ["vram_limit 6.00 GiB (GPU 0)", "vram_limit 4.00 GiB (GPU 1)"]


def test_with_one_gpu_the_chart_is_the_one_it_was():
    readings = [GpuSample(0, G, 2 * G + i, 5 * G, 3 * G) for i in range(5)]
    with_gpus = [gpu_sample(i * 0.2, reading) for i, reading in enumerate(readings)]
    without = [MemorySample(s.time, s.rss_bytes, s.ram_used_bytes, s.torch_allocated_bytes, s.torch_reserved_bytes,
                            s.device_used_bytes, s.process_device_bytes) for s in with_gpus]
    marks = charts.Marks(vram_limit_bytes=6 * G, predicted_vram_bytes=5 * G)
    assert charts.gpu_chart(with_gpus, 0.0, marks).to_dict() == charts.gpu_chart(without, 0.0, marks).to_dict()
    by_index = charts.Marks(vram_limit_bytes={0: 6 * G}, predicted_vram_bytes=5 * G)
    assert charts.gpu_chart(with_gpus, 0.0, by_index).to_dict() == charts.gpu_chart(without, 0.0, marks).to_dict()


def test_the_memory_panel_draws_two_gpus_from_the_sampler(tmp_path, visible):
    handlers = AppHandlers(AppOptions(outputs=tmp_path), session=types.SimpleNamespace(),
                           sampler=MemorySampler(nvml=two_gpus()))
    for _ in range(3):
        handlers.sampler.sample()
    update, _, status = handlers.watch()
    (curves,) = datasets_with(update["value"].to_dict(), "series")
    assert {row["series"] for row in curves} == {"GPU 0, this process (NVML)", "GPU 1, this process (NVML)"}
    assert status == "GPU queue: idle"
    handlers.sampler.stop()


# -- the hardware card ----------------------------------------------------------------------

def test_the_hardware_card_lists_every_gpu(visible):
    visible("2,1")
    card = present.hardware_card(probe(nvml=three_gpus()), "ok")
    assert "- GPU 0: A100 (NVML GPU 2), 64.0 GiB free of 80.0 GiB, this process 8.0 GiB" in card
    assert "- GPU 1: RTX 3090, 21.0 GiB free of 24.0 GiB" in card
    assert "- NVML GPU 0: RTX 4090, 24.0 GiB, hidden from this process by CUDA_VISIBLE_DEVICES" in card
    plain = Hardware((GPU(0, "RTX 4070", 12 * G, 11 * G), GPU(1, "RTX 3060", 12 * G, 10 * G)), "ok",
                     64 * G, 60 * G, None, None)
    assert present.hardware_card(plain, "ok").splitlines()[1:3] == [
        "- GPU 0: RTX 4070, 11.0 GiB free of 12.0 GiB", "- GPU 1: RTX 3060, 10.0 GiB free of 12.0 GiB"]
