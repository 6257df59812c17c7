"""Train the built-in tiny model from nothing, on this machine's CPU, and write it.

    python -m pipelines.tiny.train                     # writes pipelines/tiny/model/
    python -m pipelines.tiny.train --out /tmp/tiny --quick

The model is a Stable Diffusion XL pipeline in miniature (diffusers' own classes, the real
folder layout): two CLIP text encoders with a word-level tokenizer built here, a UNet on
16x16x4 latents with cross-attention and SDXL's size conditioning, and an 8x autoencoder
(diffusers' AutoencoderTiny),
so 128x128 images. It learns the synthetic world of ``shapes.py``.

Stages, all seeded (same seed, same machine and thread count: the same files):
1. the autoencoder, on freshly drawn images: reconstruction, three latent channels pulled
   toward the image shrunk 8x, a little noise on the latents;
2. a fixed data set of drawn scenes encoded once into latents; the latent scale is set so
   they have unit variance, as SDXL's ``scaling_factor`` does;
3. the UNet and both text encoders together, v-prediction on a zero-terminal-SNR schedule
   (a flat background is a very low-frequency image; with the usual schedule the model
   cannot choose its mean colour), the loss weighted toward the shape (else it learns the
   backgrounds only), 10% of captions dropped to zeros for classifier-free
   guidance (SDXL's pipeline encodes an empty negative prompt as zeros), and an
   exponential moving average of the weights, which is what gets saved;
4. the adherence on the held-out combinations, printed attribute by attribute.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

log = logging.getLogger("pipelines.tiny.train")

MODEL_DIR = Path(__file__).parent / "model"
MAX_LENGTH = 32      # caption tokens; the longest caption is 14


@dataclass
class Settings:
    seed: int = 0
    threads: int = 2
    vae_steps: int = 1200
    vae_batch: int = 8
    vae_lr: float = 2e-3
    scenes: int = 20_000          # drawn and encoded once for the denoiser's training
    steps: int = 4500
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    shape_weight: float = 10.0    # extra loss weight where the shape is (see _shape_weights)
    stop_after: int | None = None  # end the denoiser's schedule of `steps` early, after this many
    ema_decay: float = 0.999
    guidance: float = 4.0         # the default, used for the printed adherence
    inference_steps: int = 20

    @classmethod
    def quick(cls) -> "Settings":
        """Minutes instead of most of an hour: for trying the script, not for shipping."""
        return cls(vae_steps=200, scenes=2000, steps=400, warmup=50)

    @classmethod
    def smoke(cls) -> "Settings":
        """Seconds: every stage runs, nothing is learned (for tests of the script itself)."""
        return cls(vae_steps=2, vae_batch=2, scenes=64, steps=2, batch=4, warmup=1)


# -- tokenizer and components ---------------------------------------------------------------------

def _vocabulary_words() -> list[str]:
    words = {"a", "on", "background", ",", "the", "an", "of", "with", "and", "in", "at", "middle", "corner"}
    words |= set(shapes.SHAPES) | set(shapes.SIZES) | set(shapes.COLOURS)
    words |= {w for p in shapes.POSITIONS for w in p.split()}
    return sorted(words)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table), in CLIP's order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _apply_merges(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """BPE: merge the adjacent pair with the earliest merge until none applies."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in rank]
        if not pairs:
            return pieces
        _, i = min(pairs)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]


def build_tokenizer():
    """A ``CLIPTokenizer`` whose vocabulary holds every word of the captions whole (plus all
    256 byte symbols, so any text still tokenizes). BPE needs merges to reach a whole word:
    each word gets the merges that glue it left to right."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    tokens, merges = [*symbols, *(s + "</w>" for s in symbols)], []
    for word in _vocabulary_words():
        # Glue what BPE leaves of the word with the merges so far, left to right; merges
        # added for an earlier word can split a later one differently, hence from its pieces.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            tokens.append(pieces[0] + pieces[1])
            pieces[:2] = [pieces[0] + pieces[1]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def build_components(seed: int) -> dict:
    """Freshly initialised components of the tiny SDXL pipeline (diffusers/transformers classes)."""
    from diffusers import AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids

    def text_config(hidden: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_attention_heads=4, num_hidden_layers=layers, max_position_embeddings=MAX_LENGTH,
                              projection_dim=hidden, hidden_act="gelu", bos_token_id=ids("<|startoftext|>"),
                              eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"))

    torch.manual_seed(seed)
    # SDXL reads the second-to-last hidden state of both encoders, and the pooled projection
    # of the second: its last layer only feeds the pooled vector.
    text_encoder = CLIPTextModel(text_config(64, 3))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(64, 3))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 1), use_linear_projection=True,
        cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=6 * 16 + 64)
    # diffusers' tiny autoencoder (TAESD's design): no normalisation layers. AutoencoderKL's
    # GroupNorm reduces a flat colour to the signs of channel differences, and this world
    # is flat colours; it learned in hours what this one learns in minutes.
    vae = AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return {"tokenizer": tokenizer, "tokenizer_2": build_tokenizer(), "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "unet": unet, "vae": vae, "scheduler": scheduler}


# -- the steps of training ------------------------------------------------------------------------

def _images(scenes_: list[shapes.Scene], rng: random.Random) -> torch.Tensor:
    """Drawn scenes as a (n, 3, H, W) tensor in [-1, 1], the VAE's input range."""
    arrays = np.stack([np.asarray(shapes.render(s, rng), dtype=np.float32) for s in scenes_])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, settings: Settings, pool: list[shapes.Scene]) -> None:
    rng = random.Random(settings.seed + 1)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()
    started = time.perf_counter()
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.vae_steps, 50, settings.vae_lr)
        images = _images(rng.choices(pool, k=settings.vae_batch), rng)
        latents = vae.encode(images).latents
        # Three latent channels are pulled toward the image shrunk 8x (a thumbnail), so the
        # decoder has something meaningful to learn from at once; the fourth is free. A
        # little noise on the latents keeps the decoder robust to the denoiser's errors.
        thumbnail = F.avg_pool2d(images, 8)
        noisy = latents + 0.05 * torch.randn(latents.shape, generator=generator)
        reconstruction = vae.decode(noisy).sample
        loss = F.l1_loss(reconstruction, images) + 0.5 * F.mse_loss(reconstruction, images) \
            + F.mse_loss(latents[:, :3], thumbnail)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == settings.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f (%.0f s)", step + 1, settings.vae_steps, loss.item(),
                     time.perf_counter() - started)
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, settings: Settings, pool: list[shapes.Scene]) -> tuple[torch.Tensor, list[str]]:
    """The denoiser's data set: drawn scenes as (unscaled) latents, and their captions."""
    rng = random.Random(settings.seed + 2)
    chosen = rng.choices(pool, k=settings.scenes)
    latents = []
    for start in range(0, len(chosen), 64):
        latents.append(vae.encode(_images(chosen[start:start + 64], rng)).latents)
    return torch.cat(latents), [shapes.caption(s) for s in chosen]


def encode_text(components: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusionXLPipeline.encode_prompt`` computes (no clip skip): both encoders'
    second-to-last hidden states side by side, and the second encoder's pooled projection."""
    states, pooled = [], None
    for tokenizer, encoder in ((components["tokenizer"], components["text_encoder"]),
                               (components["tokenizer_2"], components["text_encoder_2"])):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]
        states.append(output.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def _time_ids(batch: int) -> torch.Tensor:
    # SDXL's size conditioning at the native size: original size, crop corner, target size.
    return torch.tensor([[shapes.SIZE, shapes.SIZE, 0, 0, shapes.SIZE, shapes.SIZE]], dtype=torch.float32).repeat(
        batch, 1)


def _shape_weights(x0: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """Per latent pixel loss weights, averaging 1 per image: ``1 + shape_weight`` where the
    latent differs from the image's background (its median), else 1. The shape covers a few
    percent of the image; unweighted, the background's error drowns where the shape is and
    what colour, and the model learns backgrounds only."""
    background = x0.flatten(2).median(dim=2).values[:, :, None, None]
    # The first three channels are the thumbnail (see train_vae); the free fourth has edge effects.
    shape = ((x0 - background)[:, :3].abs().amax(dim=1, keepdim=True) > 0.3).float()
    weights = 1 + shape_weight * shape
    return weights / weights.mean(dim=(2, 3), keepdim=True)


def train_denoiser(components: dict, latents: torch.Tensor, captions: list[str], settings: Settings,
                   deadline: float | None = None):
    """Trains the UNet and both text encoders; returns their moving averages (what is saved)."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(components["scheduler"].config)
    trained = [components["unet"], components["text_encoder"], components["text_encoder_2"]]
    averages = [copy.deepcopy(m).requires_grad_(False) for m in trained]
    parameters = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(settings.seed + 3)
    rng = random.Random(settings.seed + 3)
    for m in trained:
        m.train()
    started = time.perf_counter()
    running = None
    for step in range(settings.steps):
        if settings.stop_after is not None and step >= settings.stop_after:
            break
        if deadline is not None and time.perf_counter() > deadline:
            log.warning("time is up after %d of %d steps; writing what there is", step, settings.steps)
            settings.stop_after = step  # recorded in training.json: --stop-after repeats this run
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, settings.warmup, settings.lr)
        index = torch.randint(0, len(latents), (settings.batch,), generator=generator)
        x0 = latents[index] * components["vae"].config.scaling_factor
        text, pooled = encode_text(components, [captions[i] for i in index.tolist()])
        keep = torch.tensor([rng.random() >= settings.caption_dropout for _ in range(settings.batch)])
        text = text * keep[:, None, None]
        pooled = pooled * keep[:, None]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (settings.batch,), generator=generator)
        noisy = noise_schedule.add_noise(x0, noise, t)
        target = noise_schedule.get_velocity(x0, noise, t)
        prediction = components["unet"](noisy, t, encoder_hidden_states=text,
                                        added_cond_kwargs={"text_embeds": pooled,
                                                           "time_ids": _time_ids(settings.batch)}).sample
        loss = (_shape_weights(x0, settings.shape_weight) * (prediction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, model in zip(averages, trained):
                for a, p in zip(average.parameters(), model.parameters()):
                    a.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == settings.steps - 1:
            log.info("denoiser step %d/%d loss %.4f (%.0f s)", step + 1, settings.steps, running,
                     time.perf_counter() - started)
    return averages


def write(components: dict, out: Path, settings: Settings) -> Path:
    from diffusers import StableDiffusionXLPipeline

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        components[name].eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(asdict(settings), indent=1) + "\n")
    return out


def adherence(folder: Path, settings: Settings, *, seeds: int = 1) -> dict[str, float]:
    """The held-out check: diffusers' pipeline on ``folder`` asked for every held-out scene
    (``shapes.held_out_scenes``: each held-out colour, background and position at two shapes
    and sizes) with ``seeds`` seeds each; the share right on each attribute and on all four
    (``shapes.adherence_table``)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    scenes, judgements = [], []
    for scene in shapes.held_out_scenes():
        for seed in range(seeds):
            image = pipe(shapes.caption(scene), num_inference_steps=settings.inference_steps,
                         guidance_scale=settings.guidance, generator=torch.Generator().manual_seed(seed)).images[0]
            scenes.append(scene)
            judgements.append(shapes.judge(image))
            log.info("%-60s -> %s %s", shapes.caption(scene), judgements[-1].shape, judgements[-1].triple)
    return shapes.adherence_table(scenes, judgements)


def held_out_scenes() -> list[shapes.Scene]:
    """One scene per held-out combination, shape and size chosen by a fixed rule."""
    return [shapes.Scene(shapes.SHAPES[i % len(shapes.SHAPES)], list(shapes.SIZES)[i % 2], c, b, p)
            for i, (c, b, p) in enumerate(shapes.held_out())]


def load_components(folder: Path) -> dict:
    """A written model's components, to train further (``--resume``)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    return {name: pipe.components[name] for name in
            ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")}


def train(out: Path, settings: Settings, *, resume: Path | None = None, minutes: float | None = None) -> Path:
    """Train (from nothing, or the denoiser further from the model in ``resume``, its
    autoencoder kept) and write the model to ``out``. ``minutes`` bounds the denoiser's
    training (the learning-rate schedule keeps its planned length)."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    pool = shapes.training_scenes()
    started = time.perf_counter()
    if resume is None:
        components = build_components(settings.seed)
        train_vae(components["vae"], settings, pool)
    else:
        components = load_components(resume)
    latents, captions = encode_scenes(components["vae"], settings, pool)
    if resume is None:
        components["vae"].register_to_config(scaling_factor=float(1.0 / latents.std()))
    log.info("latents: %s, scaling factor %.4f (%.0f s)", tuple(latents.shape),
             components["vae"].config.scaling_factor, time.perf_counter() - started)
    deadline = started + 60 * minutes if minutes is not None else None
    unet, text_encoder, text_encoder_2 = train_denoiser(components, latents, captions, settings, deadline)
    components.update(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    write(components, out, settings)
    log.info("wrote %s (%.0f s in all)", out, time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help=f"where to write the model (default {MODEL_DIR})")
    parser.add_argument("--quick", action="store_true", help="a few minutes of training, to try the script")
    parser.add_argument("--smoke", action="store_true", help="seconds: runs every stage, learns nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-check", action="store_true", help="do not measure adherence afterwards")
    parser.add_argument("--resume", type=Path, help="train the denoiser of this written model further")
    parser.add_argument("--steps", type=int, help="denoiser steps (default 4500)")
    parser.add_argument("--max-minutes", type=float, help="stop the denoiser's training after this long in all")
    parser.add_argument("--stop-after", type=int, help="stop the denoiser's schedule after this many steps")
    parser.add_argument("--shape-weight", type=float, help="extra loss weight where the shape is (default 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    settings = Settings.smoke() if args.smoke else Settings.quick() if args.quick else Settings()
    settings.seed, settings.threads = args.seed, args.threads
    if args.steps is not None:
        settings.steps = args.steps
    settings.stop_after = args.stop_after
    if args.shape_weight is not None:
        settings.shape_weight = args.shape_weight
    folder = train(args.out, settings, resume=args.resume, minutes=args.max_minutes)
    if not args.skip_check:
        table = adherence(folder, settings)
        print("held-out adherence: " + ", ".join(f"{name} {share:.0%}" for name, share in table.items()))


if __name__ == "__main__":
    main()
