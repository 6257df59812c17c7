"""A model split over several devices (``device_map``), run on simulated ones: two and three
stand-in accelerators, each with its own copy engine, allocator, cap, ledger and report.

What must hold: the output equals the single-device run bit for bit; no device's ledger (or
allocator) passes its cap; activations cross only where the map puts a boundary, each tensor
once per forward; a missing wait on a crossing is a wrong answer.
"""

import copy

import pytest
import torch

import vram
from models import cfg, save_weights
from test_groups import flux, flux_inputs, forward, one_compute_thread, qwen_image, qwen_inputs  # noqa: F401
from vram import standin
from vram.config import standin_device

FP32 = torch.float32
S0, S1, S2 = "standin", "standin:1", "standin:2"
RAM = cfg(("cpu", FP32), ("standin", FP32), ("standin", FP32))            # weights in RAM, streamed
RESIDENT = cfg(("standin", FP32), ("standin", FP32), ("standin", FP32))   # weights on the devices
DISK = cfg(("disk", "disk"), ("standin", FP32), ("standin", FP32))


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x, temb):
        return x + self.lin(self.norm(x)) * temb


class Net(torch.nn.Module):
    """An embedding, six blocks that all take the timestep embedding, an output layer."""

    _repeated_blocks = ["Block"]

    def __init__(self, width: int = 64):
        super().__init__()
        self.t_embed = torch.nn.Linear(1, width)
        self.embed = torch.nn.Linear(width, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(6))
        self.out = torch.nn.Linear(width, width)

    def forward(self, x, t):
        temb = self.t_embed(t)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, temb=temb)
        return self.out(x)


def net_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 64, generator=g), torch.rand(2, 1, 1, generator=g)


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    torch.manual_seed(0)
    plain = Net().eval()
    with torch.no_grad():
        expected = plain(*net_inputs())
    return plain, save_weights(plain, tmp_path_factory.mktemp("net")), expected


def managed_net(files, config, **kwargs):
    with vram.empty_weights():
        model = Net()
    return vram.enable_vram_management(model.eval(), config, weights=files, **kwargs)


def moves():
    counters = vram.get_manager().counters
    return counters.activation_moves, counters.activation_bytes


SECOND_HALF = {"blocks.3": S1, "blocks.4": S1, "blocks.5": S1}


@pytest.mark.parametrize("config", [RESIDENT, RAM, DISK], ids=["resident", "ram", "disk"])
def test_a_split_net_computes_what_one_device_computes(net_files, config):
    plain, files, expected = net_files
    limit = 0 if config is DISK else None
    model = managed_net(files, config, device_map=SECOND_HALF, vram_limit=limit)
    record = vram.managed(model)
    assert [p.budget_key for p in record.parts] == [S0, S1]
    assert {g.name: g.device for g in record.groups}["blocks.4"] == standin_device(1)
    x, t = net_inputs()
    for _ in range(2):
        before = moves()
        with torch.no_grad():
            got = model(x, t)
        assert torch.equal(got, expected)
        # Across at blocks.3 (x and the timestep embedding, once for the three blocks), back
        # at the output layer (x): three tensors, every forward.
        moved, nbytes = (a - b for a, b in zip(moves(), before))
        assert moved == 3 and nbytes == (2 * x.numel() + 2 * 64) * 4
    # Each device has its own report, and its own share of the weights.
    reports = vram.get_manager().reports[-2:]
    assert [r.device for r in reports] == [S0, S1] and reports[1].model == record.name + "@" + S1
    if config is RESIDENT:
        held = record.resident_bytes()
        block = sum(p.numel() * 4 for p in plain.blocks[0].parameters())
        assert held[S1] == 3 * block and held[S0] > 3 * block
    vram.release(model)
    assert vram.get_manager().models() == [] and not [e for e in standin.engines() if e.live_buffers]


def test_the_output_comes_back_when_the_last_group_computes_elsewhere(net_files):
    _, files, expected = net_files
    model = managed_net(files, RAM, device_map={"blocks.5": S1, "out": S1})
    before = moves()
    with torch.no_grad():
        assert torch.equal(model(*net_inputs()), expected)
    assert moves()[0] - before[0] == 3  # x and temb across, the output back
    vram.release(model)


def test_a_model_on_another_device_takes_and_returns_at_its_io_device(net_files):
    """A pipeline's component placed on a second GPU: its inputs come from the pipeline's
    execution device and its output goes back there."""
    _, files, expected = net_files
    on_second = cfg(("cpu", FP32), (S1, FP32), (S1, FP32))
    model = managed_net(files, on_second, io_device=S0)
    assert [p.budget_key for p in vram.managed(model).parts] == [S1]
    before = moves()
    with torch.no_grad():
        assert torch.equal(model(*net_inputs()), expected)
    assert moves()[0] - before[0] == 3  # t and x across, the output back
    vram.release(model)
    with pytest.raises(ValueError, match="io_device: 'cpu' is not a device of the model's kind"):
        managed_net(files, on_second, io_device="cpu")


def test_each_device_keeps_to_its_own_cap(net_files):
    """Per-device caps: each device's ledger and allocator stay under its own, the smaller
    one streams while the larger one keeps."""
    plain, files, expected = net_files
    block = sum(p.numel() * 4 for p in plain.blocks[0].parameters())
    limits = {S0: 2.5 * block / 2**30, S1: 8 * block / 2**30}
    model = managed_net(files, RAM, device_map=SECOND_HALF, vram_limit=limits)
    record = vram.managed(model)
    assert [p.cap_bytes for p in record.parts] == [int(limits[S0] * 2**30), int(limits[S1] * 2**30)]
    assert standin.engine(standin_device(1)).cap == int(limits[S1] * 2**30)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(*net_inputs()), expected)
    for report in vram.get_manager().reports[-6:]:
        assert report.within_cap and report.peak_ledger_bytes <= report.cap_bytes, report.describe()
    assert vram.get_manager().peak_bytes(S0) <= record.parts[0].cap_bytes
    assert vram.get_manager().peak_bytes(S1) <= record.parts[1].cap_bytes
    # The roomy device kept its three blocks; the tight one could not keep its four groups.
    kept = {part.budget_key: part.kept_bytes for part in record.parts}
    assert kept[S1] == 3 * block and kept[S0] < 4 * block
    summary = record.summary()["devices"]
    assert summary[S1]["groups"] == 3 and summary[S0]["groups"] == 6
    vram.release(model)


def test_three_devices(net_files):
    _, files, expected = net_files
    model = managed_net(files, RAM, device_map={"blocks.2": S1, "blocks.3": S1, "blocks.4": S2, "blocks.5": S2})
    before = moves()
    with torch.no_grad():
        assert torch.equal(model(*net_inputs()), expected)
    # x and temb to standin:1, both again to standin:2 (temb from its original), x home.
    assert moves()[0] - before[0] == 5
    assert [p.budget_key for p in vram.managed(model).parts] == [S0, S1, S2]
    vram.release(model)


def test_a_crossing_that_is_not_waited_for_computes_nan(net_files, monkeypatch):
    _, files, expected = net_files
    model = managed_net(files, RESIDENT, device_map=SECOND_HALF)  # weights landed (and waited for) here
    with standin.configured(latency=0.5):  # a crossing lands half a second after it is issued
        monkeypatch.setattr(standin.StandIn, "wait", lambda self, event: None)
        with torch.no_grad():
            got = model(*net_inputs())
        assert torch.isnan(got).any()
        monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(*net_inputs()), expected)
    vram.release(model)


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_full_depth_layouts_split_at_a_block_boundary(tmp_path, family):
    """FLUX.1 (double blocks on one device, single blocks on another) and Qwen-Image (its 60
    blocks halved), at tiny width: the same output as the plain model; moves only at the two
    boundaries (the same count every forward)."""
    make, inputs = (flux, flux_inputs) if family == "flux" else (qwen_image, qwen_inputs)
    torch.manual_seed(0)
    plain = make().eval()
    expected = forward(copy.deepcopy(plain), inputs(FP32))
    files = save_weights(plain, tmp_path)
    with vram.empty_weights():
        model = make().eval()
    split = ({"single_transformer_blocks": S1} if family == "flux"
             else {f"transformer_blocks.{i}": S1 for i in range(30, 60)})
    vram.enable_vram_management(model, RAM, weights=files, device_map=split, vram_limit=0)
    counts = []
    for _ in range(2):
        before = moves()[0]
        assert torch.equal(forward(model, inputs(FP32)), expected)
        counts.append(moves()[0] - before)
    assert counts[0] == counts[1] and 2 <= counts[0] <= 8, counts
    vram.release(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map={"blocks.9": S1}), "'blocks.9' name"),
    (dict(device_map={"blocks.3": "cpu"}), "not an accelerator of the model's kind"),
    (dict(device_map={"blocks.3": "disk"}), "not an accelerator"),
    (dict(device_map={}), "must map module names to devices"),
    (dict(vram_limit={S0: 1.0}), "needs a device_map"),
    (dict(device_map=SECOND_HALF, vram_limit={S2: 1.0}), "standin:2 run"),
    (dict(device_map=SECOND_HALF, vram_limit={S1: -1.0}), "must be GiB >= 0"),
    (dict(device_map={"blocks.3": "standin:99"}), "there are stand-ins 0 to"),
])
def test_bad_maps_are_named(net_files, kwargs, message):
    _, files, _ = net_files
    with pytest.raises(ValueError, match=message):
        managed_net(files, RAM, **kwargs)
    assert vram.get_manager().models() == []


def test_a_model_on_the_cpu_cannot_be_split(net_files):
    _, files, _ = net_files
    with pytest.raises(ValueError, match="computes on the CPU"):
        managed_net(files, cfg(("cpu", FP32), ("cpu", FP32)), device_map=SECOND_HALF)


def test_the_loader_spreads_a_components_blocks_in_runs():
    from pipelines.loading import split_map
    with vram.empty_weights():
        model = flux()
    device_map = split_map(model, "block", [(S0, 10), (S1, 0)])
    blocks = [name for name, _ in model.named_modules() if name.count(".") == 1 and "blocks." in name]
    assert list(device_map) == blocks and len(blocks) == 57
    assert set(device_map[b] for b in blocks[:10]) == {S0} and set(device_map[b] for b in blocks[10:]) == {S1}
    with pytest.raises(ValueError, match="a count of blocks is a whole number"):
        split_map(model, "block", [(S0, -1), (S1, 0)])
