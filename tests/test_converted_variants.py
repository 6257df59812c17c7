"""Converted registry variants ("tiny-shapes-fp8"): made from the original on first use, then
loaded like any download; and how converted copies show in the app's model list."""

import json

import numpy as np
import pytest

from pipelines import FAMILIES, ModelFilesError, load_pipeline, resolve_model
from pipelines.convert import convert
from pipelines.tiny import FP8_VARIANT, MODEL_DIR
from presets import preset_configs
from presets.session import Session

PROMPT = "a large yellow star on a purple background, top right"


def draw(pipe):
    with pipe:
        return pipe.generate(prompt=PROMPT, seed=0, steps=4).images[0]


def test_the_variant_is_made_on_first_use_and_draws_what_the_original_draws(tmp_path):
    assert FP8_VARIANT.key in FAMILIES and FP8_VARIANT.converted_from == "tiny-shapes"
    folder = tmp_path / FP8_VARIANT.key
    with pytest.raises(ModelFilesError, match="python -m pipelines.convert tiny-shapes"):
        resolve_model(FP8_VARIANT.key, source="local", models_dir=tmp_path)
    fp8 = preset_configs("fp8_offload")
    heard = []
    image = draw(load_pipeline(FP8_VARIANT.key, fp8, models_dir=tmp_path, progress=lambda *call: heard.append(call)))
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source_name"] == "tiny-shapes" and record["dtype"] == "float8_e4m3fn"
    assert {name for name, _, _ in heard} == {"converting text_encoder", "converting text_encoder_2",
                                              "converting unet"}
    assert np.array_equal(image, draw(load_pipeline("tiny-shapes", fp8)))
    # Once made, it is only loaded.
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    heard.clear()
    again = draw(load_pipeline(FP8_VARIANT.key, fp8, models_dir=tmp_path, progress=lambda *call: heard.append(call)))
    assert np.array_equal(again, image) and not heard
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_the_model_list_says_what_a_converted_copy_is(tmp_path):
    session = Session(models_dir=tmp_path)
    variant = session.resolve_model(FP8_VARIANT.key)
    assert variant.label.endswith("(made from tiny-shapes on first use)") and variant.conversion is None
    convert(MODEL_DIR, tmp_path / "my-shapes-bf16", dtype="bfloat16")
    local = session.resolve_model("my-shapes-bf16")
    assert local.conversion == "Built-in tiny model (shapes, 128 px), bf16, 4 shards"
    assert local.label == "my-shapes-bf16 (local folder, Built-in tiny model (shapes, 128 px), bf16, 4 shards)"
    assert "my-shapes-bf16" in [c.name for c in session.models()]
    assert session.resolve_model("tiny-shapes").conversion is None
