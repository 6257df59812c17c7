#!/usr/bin/env python
"""What the built-in tiny model draws, attribute by attribute, and where shapes are lost.

    python bench/tiny_adherence.py                 # 48 held-out scenes x 2 seeds, ~2 minutes
    python bench/tiny_adherence.py --seeds 3 --markdown

Three rows, each judged by ``pipelines.tiny.shapes.judge`` (shape by the best-fitting of the
six outlines, colour, background, position, and the size), with the share right on each
attribute and on all four (shape, colour, background, position):

- **drawn**: scenes drawn by ``shapes.render`` (the judge's own check: it should be 100%);
- **autoencoder**: the same drawn scenes through the shipped VAE, encoded and decoded: what
  the latent space can hold at all, whatever the denoiser does;
- **model**: the model through this project's loader (``basic``), asked for every held-out
  scene (``shapes.held_out_scenes``: combinations of colour, background and position never
  trained on, each at two shapes and sizes) with ``--seeds`` seeds each, default settings.

Nothing is asserted; the test (tests/test_tiny.py) holds the bars.
"""

from __future__ import annotations

import argparse
import random
import time

import _setup  # noqa: F401  (hubs offline, libraries quiet, the project importable)
import numpy as np
import torch

from _common import describe_machine, machine_info, md_table


def drawn(count: int, seed: int):
    from pipelines.tiny import shapes

    rng = random.Random(seed)
    scenes = rng.sample(shapes.training_scenes(), count)
    return scenes, [shapes.render(scene, rng) for scene in scenes]


def through_autoencoder(images) -> list[np.ndarray]:
    from diffusers import AutoencoderTiny

    from pipelines.tiny import MODEL_DIR

    vae = AutoencoderTiny.from_pretrained(MODEL_DIR / "vae").eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            batch = np.stack([np.asarray(i, np.float32) for i in images[start:start + 32]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2) / 127.5 - 1
            y = vae.decode(vae.encode(x).latents).sample.clamp(-1, 1)
            out.extend(((y + 1) * 127.5).permute(0, 2, 3, 1).numpy())
    return out


def generated(seeds: int):
    from pipelines import DEFAULT_MODEL, load_pipeline
    from pipelines.tiny import shapes
    from presets import preset_configs

    scenes, images = [], []
    with load_pipeline(DEFAULT_MODEL, preset_configs("basic")) as pipe:
        for scene in shapes.held_out_scenes():
            for seed in range(seeds):
                scenes.append(scene)
                images.append(pipe.generate(prompt=shapes.caption(scene), seed=seed).images[0])
    return scenes, images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out scene (default 2)")
    parser.add_argument("--drawn", type=int, default=480, help="drawn scenes for the first two rows (default 480)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()
    from pipelines.tiny import shapes

    rows = []
    scenes, images = drawn(args.drawn, seed=7)
    for name, batch_scenes, make in (("drawn", scenes, lambda: images),
                                     ("autoencoder", scenes, lambda: through_autoencoder(images)),
                                     ("model", None, lambda: generated(args.seeds))):
        started = time.perf_counter()
        made = make()
        if batch_scenes is None:
            batch_scenes, made = made
        table = shapes.adherence_table(batch_scenes, [shapes.judge(image) for image in made])
        rows.append([name, str(len(batch_scenes)), *(f"{table[k]:.0%}" for k in
                                                     ("shape", "colour", "background", "position", "all four",
                                                      "size")), f"{time.perf_counter() - started:.0f}"])
    headers = ["images", "count", "shape", "colour", "background", "position", "all four", "size", "s"]
    print(describe_machine(machine_info()))
    if args.markdown:
        print(md_table(headers, rows))
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        for line in (headers, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
