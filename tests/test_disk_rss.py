"""The disk tier keeps resident RAM bounded by the prefetch window, not the model size."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models import Stack, save_weights

WIDTH, DEPTH = 4096, 16  # 16 x 64 MiB fp32 Linear weights: 1 GiB
LAYER_BYTES = WIDTH * WIDTH * 4
OVERHEAD = 300 * 2**20   # allocator slack, thread stacks, the input and output

CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path[:0] = [{root!r}, {tests!r}]
    import vram
    from models import Stack
    torch.set_num_threads(2)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with vram.empty_weights():
        model = Stack(width={width}, depth={depth})
    config = {{"offload_device": "disk", "offload_dtype": "disk", "onload_device": "disk", "onload_dtype": "disk",
              "preparing_device": "cpu", "preparing_dtype": torch.float32,
              "computation_device": "cpu", "computation_dtype": torch.float32, "prefetch": {prefetch}}}
    vram.enable_vram_management(model, config, weights={weights!r})
    x = torch.randn(4, {width}, generator=torch.Generator().manual_seed(0))
    baseline = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    with torch.no_grad():
        first = model(x)
        second = model(x)
    peak = status("VmHWM")
    torch.save({{"first": first, "second": second}}, {out!r})
    print(json.dumps({{"baseline": baseline, "peak": peak,
                      "read": vram.stats()["counters"]["bytes_read_from_disk"]}}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [2])
def test_disk_tier_rss_stays_within_the_window(tmp_path, prefetch):
    torch.manual_seed(0)
    plain = Stack(width=WIDTH, depth=DEPTH).eval()
    weights = save_weights(plain, tmp_path / "weights")
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(x)
    del plain
    weight_bytes = weights.stat().st_size
    assert weight_bytes >= 2**30

    out = tmp_path / "out.pt"
    code = CHILD.format(root=str(Path(__file__).parents[1]), tests=str(Path(__file__).parent), width=WIDTH,
                        depth=DEPTH, prefetch=prefetch, weights=str(weights), out=str(out))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    above = measured["peak"] - measured["baseline"]
    window = (prefetch + 1) * LAYER_BYTES
    print(f"peak RSS above baseline {above / 2**20:.0f} MiB; window {window / 2**20:.0f} MiB; "
          f"weights {weight_bytes / 2**20:.0f} MiB")
    assert above <= window + OVERHEAD, (above, window)
    assert measured["read"] >= 2 * weight_bytes * 0.99  # both forwards read from disk, nothing kept
    outputs = torch.load(out)
    assert torch.equal(outputs["first"], expected)
    assert torch.equal(outputs["second"], expected)
