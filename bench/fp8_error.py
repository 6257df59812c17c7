#!/usr/bin/env python
"""How much fp8 storage costs in precision: a plain cast against the core's scaled fp8.

    PYTHONPATH=. .venv/bin/python bench/fp8_error.py              # every table
    PYTHONPATH=. .venv/bin/python bench/fp8_error.py --markdown   # as markdown

Three tables, each measured in this one run:

1. Synthetic weights: a seeded 4096x4096 normal tensor at std 0.02 and 0.005, stored as e4m3
   and e5m2 and read back. The relative L2 error ||w - w'|| / ||w|| of a plain cast, of the
   core's rule (one power-of-two scale per tensor, vram/casting.py), of an exact per-tensor
   scale (amax / fp8 max, not a power of two) and of a power-of-two scale per output channel.
2. Real layouts: every tensor the casting rule stores in fp8 in the built-in model (trained),
   in the tiny test families (random, diffusers' initialisation) and in FLUX.1's layer shapes
   at 1536 wide (torch's default initialisation: a large model's spread), pooled per model:
   the same relative error over all of them.
3. The built-in model's images: ``fp8_offload`` against ``basic`` (float32), plainly cast
   (``vram.casting.plain_fp8()``) and scaled, over a few prompts: PSNR and the largest pixel
   difference.

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import describe_machine, machine_info, md_table  # noqa: E402
from pipelines_cpu import text_table  # noqa: E402

from vram.casting import FP8_MAX, cast, fp8_scale, plain_fp8  # noqa: E402

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PROMPTS = ("a large yellow star on a purple background, top right", "a small red circle on a blue background, left",
           "a large white square on a black background, center", "a small green cross on an orange background, bottom")


def round_trip(w: torch.Tensor, dtype: torch.dtype, how: str) -> torch.Tensor:
    """``w`` stored as ``dtype`` and read back, scaled as ``how`` says."""
    if how == "plain":
        return w.to(dtype).float()
    if how == "tensor":   # the core's rule
        scale = fp8_scale(w, dtype)
        return cast(cast(w, dtype, 1.0 / scale), torch.float32, scale)
    if how == "exact":
        scale = float(w.abs().max()) / FP8_MAX[dtype]
        return (w / scale).to(dtype).float() * scale
    if how == "channel":
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-30)
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX[dtype])))
        return (w / scale).to(dtype).float() * scale
    raise ValueError(how)


def relative_error(pairs) -> float:
    """sqrt(sum ||w - w'||^2 / sum ||w||^2) over (w, w') pairs."""
    num = den = 0.0
    for w, back in pairs:
        num += float((w - back).double().pow(2).sum())
        den += float(w.double().pow(2).sum())
    return math.sqrt(num / den) if den else 0.0


def synthetic_rows() -> list[list]:
    rows = []
    for std in (0.02, 0.005):
        w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * std
        for dtype in FP8:
            errors = [relative_error([(w, round_trip(w, dtype, how))]) for how in ("plain", "tensor", "exact", "channel")]
            rows.append([f"normal std {std}", str(dtype).removeprefix("torch.float8_")]
                        + [f"{100 * e:.2f}%" for e in errors])
    return rows


def _cast_tensors(folder: Path) -> list[tuple[str, torch.Tensor]]:
    """(component, tensor) for every weight the casting rule stores in fp8, in a diffusers folder."""
    from pipelines.loading import build_model, keep_fp32_for, read_model_index, resolve_class
    from vram.casting import model_rule
    import vram

    index = read_model_index(folder)
    out = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or not (folder / name).is_dir():
            continue
        files = sorted((folder / name).glob("*.safetensors"))
        if not files:
            continue
        cls = resolve_class(entry[0], entry[1], name)
        with vram.empty_weights():
            model = build_model(cls, folder / name, torch.float32)
        keep = keep_fp32_for(model, torch.float8_e4m3fn)
        source = vram.WeightSource(files)
        modules = dict(model.named_modules())
        for key in source:
            module_name, _, _ = key.rpartition(".")
            module = modules.get(module_name)
            if module is None or not source.info(key).dtype.is_floating_point:
                continue
            if model_rule(model, module, module_name, key, keep) is None:
                out.append((name, source.read(key).float()))
        source.close()
    return out


def layout_rows() -> list[list]:
    from pipelines.tiny import MODEL_DIR

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from families import FAMILIES, build_family

    folders = [("tiny-shapes (trained)", Path(MODEL_DIR))]
    scratch = tempfile.TemporaryDirectory()
    for family in FAMILIES:
        folders.append((f"{family} (random)", build_family(family, Path(scratch.name) / family)))
    # A realistic spread: FLUX.1's layer shapes at 1536 wide with torch's default
    # initialisation (std 1/sqrt(3 fan_in): 0.015 for 1536 inputs, 0.007 for 6144).
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    wide = FluxTransformer2DModel(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=12,
                                  joint_attention_dim=1536, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    wide_tensors = [p.detach() for n, p in wide.named_parameters() if p.dim() > 1 and "norm" not in n]
    rows = []
    for label, folder in folders + [("FLUX.1 layout, 1536 wide (default init)", None)]:
        tensors = wide_tensors if folder is None else [t for _, t in _cast_tensors(folder)]
        stds = torch.tensor([float(t.std()) for t in tensors if t.numel() > 1])
        for dtype in FP8:
            errors = [relative_error([(t, round_trip(t, dtype, how)) for t in tensors])
                      for how in ("plain", "tensor", "channel")]
            rows.append([label, len(tensors), f"{float(stds.median()):.4f}", str(dtype).removeprefix("torch.float8_")]
                        + [f"{100 * e:.2f}%" for e in errors])
    scratch.cleanup()
    return rows


def image_rows() -> list[list]:
    from pipelines import DEFAULT_MODEL, load_pipeline
    from presets import preset_configs

    def images(preset: str, plain: bool) -> list[np.ndarray]:
        if plain:
            with plain_fp8():
                pipe = load_pipeline(DEFAULT_MODEL, preset_configs(preset, vram_limit=0))
        else:
            pipe = load_pipeline(DEFAULT_MODEL, preset_configs(preset, vram_limit=0))
        with pipe:
            # Images come as floats in [0, 1]: compare the 8-bit pixels a PNG holds.
            return [np.round(np.clip(pipe.generate(prompt=p, seed=0).images[0], 0, 1) * 255) for p in PROMPTS]

    reference = images("basic", False)
    rows = []
    for label, plain in (("plain cast", True), ("scaled (the core)", False)):
        got = images("fp8_offload", plain)
        mse = [float(((a - b) ** 2).mean()) for a, b in zip(got, reference)]
        psnr = [10 * math.log10(255 ** 2 / m) if m else float("inf") for m in mse]
        worst = max(float(np.abs(a - b).max()) for a, b in zip(got, reference))
        rows.append([label, len(PROMPTS), f"{np.mean(psnr):.1f} dB", f"{min(psnr):.1f} dB", f"{worst:.0f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args()
    show = md_table if args.markdown else text_table
    print(describe_machine(machine_info()))
    print("\nSynthetic weights: relative L2 error after the round trip")
    print(show(["weights", "fp8", "plain cast", "scaled (core: 2^k per tensor)", "exact per tensor",
                "2^k per channel"], synthetic_rows()))
    print("\nReal layouts: relative L2 error over every tensor stored in fp8")
    print(show(["model", "tensors", "median std", "fp8", "plain cast", "scaled (core)", "2^k per channel"],
               layout_rows()))
    print("\nThe built-in model's images, fp8_offload (e4m3) against basic (float32)")
    print(show(["fp8 storage", "images", "mean PSNR", "worst PSNR", "max pixel diff"], image_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
