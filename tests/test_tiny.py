"""The built-in tiny model: its world, its training script, its files, and what it draws."""

import random

import numpy as np
import pytest
import torch

import diffusers
from pipelines import DEFAULT_MODEL, get_family, load_pipeline
from pipelines.loading import family_of_folder
from pipelines.sources import locate, resolve_model
from pipelines.tiny import FAMILY, MODEL_DIR, shapes, train
from presets import list_presets, preset_configs

pytestmark = pytest.mark.standin  # each test runs on the CPU and on the stand-in accelerator

# The pipeline equivalence runs 4 steps (the default 20 would only repeat them).
STEPS = 4
PROMPT = "a large yellow star on a purple background, top right"
# fp8 storage of the trained model: the largest pixel difference (at the shape's edges;
# measured 0.084 scaled, 0.064 with a plain cast: its weights are wide, median std 0.05, where
# scaling buys nothing) and the mean one (measured 0.0017 scaled, about 0.002 plain), images in
# [0, 1].
FP8_MAX_DIFFERENCE = 0.1
FP8_MEAN_DIFFERENCE = 0.005
ADHERENCE_BAR = 0.8


# -- the synthetic world -----------------------------------------------------------------------

def test_the_judge_reads_back_every_attribute_of_drawn_scenes():
    """The judge's own check, on jittered drawings: every attribute, the shape and size too."""
    rng = random.Random(0)
    scenes = shapes.training_scenes()
    for scene in rng.sample(scenes, 600):
        seen = shapes.judge(shapes.render(scene, rng))
        assert all(seen.matches(scene).values()) and seen.right(scene), (scene, seen)
        assert seen.triple == scene.triple


def test_each_outline_fits_itself_best_and_a_blob_is_no_shape():
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            scene = shapes.Scene(shape, size, "white", "black", "center")
            seen = shapes.judge(shapes.render(scene))
            assert (seen.shape, seen.size) == (shape, size) and seen.fit > 0.85, seen
    empty = shapes.judge(np.zeros((128, 128, 3), np.uint8))
    assert empty.shape is None and empty.colour is None
    assert not empty.right(shapes.example_scene())


def test_held_out_scenes_cover_every_shape_and_size_evenly():
    scenes = shapes.held_out_scenes()
    assert len(scenes) == 2 * len(shapes.held_out())
    assert {s.triple for s in scenes} == set(shapes.held_out())
    pairs = [(s.shape, s.size) for s in scenes]
    assert len(set(pairs)) == len(shapes.SHAPES) * len(shapes.SIZES)
    assert len({pairs.count(p) for p in pairs}) == 1  # every pair equally often


def test_the_adherence_table_counts_each_attribute():
    scene = shapes.Scene("star", "large", "red", "blue", "top")
    right = shapes.judge(shapes.render(scene))
    wrong = shapes.Judgement("red", "blue", "top", "circle", "small")
    table = shapes.adherence_table([scene, scene], [right, wrong])
    assert table == {"shape": 0.5, "colour": 1.0, "background": 1.0, "position": 1.0, "size": 0.5, "all four": 0.5}


def test_captions_round_trip_and_bad_ones_are_refused():
    for scene in shapes.training_scenes()[::97]:
        assert shapes.parse(shapes.caption(scene)) == scene
    with pytest.raises(ValueError, match="not a caption"):
        shapes.parse("a photo of a cat")
    with pytest.raises(ValueError, match="unknown"):
        shapes.parse("a small teal circle on a blue background, top left")


def test_held_out_combinations_are_never_trained_on_and_cover_the_world():
    held = shapes.held_out()
    assert len(held) >= 20 and len(set(held)) == len(held)
    assert not {s.triple for s in shapes.training_scenes()} & set(held)
    assert {c for c, _, _ in held} == set(shapes.COLOURS) == {b for _, b, _ in held}
    assert {p for _, _, p in held} == set(shapes.POSITIONS)
    assert len(set(shapes.SHAPES)) >= 5 and len(shapes.COLOURS) >= 8


def test_every_caption_word_is_one_token():
    tokenizer = train.build_tokenizer()
    for word in train._vocabulary_words():
        assert len(tokenizer.tokenize(word)) == 1, word
    ids = tokenizer("Héllo, wörld!").input_ids  # any text still tokenizes
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


# -- the training script -----------------------------------------------------------------------

def test_training_is_seeded_and_writes_a_loadable_pipeline(tmp_path):
    first = train.train(tmp_path / "a", train.Settings.smoke())
    second = train.train(tmp_path / "b", train.Settings.smoke())
    weights = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert [p.parent.name for p in weights] == ["text_encoder", "text_encoder_2", "unet", "vae"]
    for path in weights:
        assert (first / path).read_bytes() == (second / path).read_bytes(), path
    family = family_of_folder(first)  # a copy elsewhere is an ordinary SDXL folder
    assert family.key == "sdxl"
    with load_pipeline(first, preset_configs("basic")) as pipe:
        result = pipe.generate(prompt=PROMPT, steps=2, width=128, height=128, seed=0)
    assert result.images.shape == (1, 128, 128, 3)


# -- the shipped model -------------------------------------------------------------------------

def test_the_shipped_model_is_the_default_and_small():
    assert DEFAULT_MODEL == FAMILY.key and get_family(DEFAULT_MODEL) is FAMILY
    assert locate(DEFAULT_MODEL) == (MODEL_DIR, FAMILY)
    assert resolve_model(DEFAULT_MODEL, source="huggingface") == (MODEL_DIR, FAMILY)  # never downloaded
    assert family_of_folder(MODEL_DIR) is FAMILY
    weights = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert weights <= 40 * 2**20
    assert FAMILY.defaults["width"] >= 128 and FAMILY.defaults["height"] >= 128


@pytest.fixture(scope="module")
def plain_image():
    """diffusers' own pipeline on the shipped files (weights copied out of the memory map, as
    in test_pipelines.reference, so kernels see aligned tensors like the core's)."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for param in component.parameters():
                param.data = param.data.clone()
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=FAMILY.defaults["guidance"], output_type="np",
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images, np.float32)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_draws_what_the_plain_pipeline_draws(plain_image, preset):
    with load_pipeline(DEFAULT_MODEL, preset_configs(preset, vram_limit=0)) as pipe:
        result = pipe.generate(prompt=PROMPT, steps=STEPS, seed=0)
    assert result.images.shape == plain_image.shape == (1, 128, 128, 3)
    if preset.startswith("fp8"):
        difference = np.abs(result.images - plain_image)
        assert difference.max() <= FP8_MAX_DIFFERENCE and difference.mean() <= FP8_MEAN_DIFFERENCE
        assert shapes.judge(result.images[0]).triple == shapes.judge(plain_image[0]).triple
    else:
        assert np.array_equal(result.images, plain_image)


def test_prompt_adherence_on_held_out_combinations():
    """For every held-out (colour, background, position), the image drawn at the default
    settings shows them, judged by pixel statistics, in at least 80% of the captions."""
    scenes = train.held_out_scenes()
    assert len(scenes) >= 20
    misses = []
    with load_pipeline(DEFAULT_MODEL, preset_configs("basic")) as pipe:
        for scene in scenes:
            image = pipe.generate(prompt=shapes.caption(scene), seed=0).images[0]
            seen = shapes.judge(image)
            if seen.triple != scene.triple:
                misses.append((shapes.caption(scene), seen.triple))
    adherence = 1 - len(misses) / len(scenes)
    assert adherence >= ADHERENCE_BAR, f"adherence {adherence:.0%}; missed: {misses}"
