"""The small interfaces in front of CUDA, exercised on the CPU with fakes."""

import threading

import torch

import vram
from vram import transfer
from vram.config import Placement
from models import Stack, stack_files


class FakeStream:
    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


class FakeTensor:
    def __init__(self):
        self.recorded = []

    def record_stream(self, stream):
        self.recorded.append(stream)


def test_staged_orders_the_compute_stream_after_the_copy(monkeypatch):
    stream = FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    tensor, event = FakeTensor(), object()
    staged = transfer.Staged(tensor, event, side_stream=True)
    assert staged.ready_for(torch.device("cuda", 0)) is tensor
    assert stream.waited == [event]            # the compute stream waits on the copy's event
    assert tensor.recorded == [stream]         # and the allocator learns who uses the memory
    staged.ready_for(torch.device("cuda", 0))  # a kept copy: nothing more to wait for
    assert stream.waited == [event] and tensor.recorded == [stream]


def test_cpu_mover_converts_without_events():
    mover = transfer.Mover(torch.device("cpu"))
    moved = vram.get_manager().counters.bytes_to_device
    source = torch.randn(4, 4)
    same = mover.convert(source, Placement(torch.device("cpu"), torch.float32))
    assert same.tensor is source and same.event is None
    cast = mover.convert(source, Placement(torch.device("cpu"), torch.bfloat16))
    assert cast.tensor.dtype == torch.bfloat16 and cast.event is None
    assert vram.get_manager().counters.bytes_to_device == moved  # nothing crossed to an accelerator


def test_pinning_without_cuda_declines_cleanly():
    if torch.cuda.is_available():
        return
    assert transfer.pin_in_place(torch.randn(1024)) is False
    transfer.trim_heap()  # harmless anywhere


def test_disk_reads_run_on_the_reader_thread(tmp_path, monkeypatch):
    plain, path = stack_files(tmp_path)
    with vram.empty_weights():
        model = Stack()
    vram.enable_vram_management(model, {"offload_device": "disk", "offload_dtype": "disk",
                                        "onload_device": "disk", "onload_dtype": "disk",
                                        "computation_device": "cpu", "computation_dtype": torch.float32},
                                weights=path)
    source = vram.managed(model).source
    threads = []
    original = source.read_info

    def spy(info, **kwargs):
        threads.append(threading.current_thread().name)
        return original(info, **kwargs)

    monkeypatch.setattr(source, "read_info", spy)
    x = torch.randn(2, 256)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), plain(x))
    # After the first forward taught the order, reads happen ahead, in the background.
    assert sum(name.startswith("vram-reader") for name in threads) > len(threads) // 2
