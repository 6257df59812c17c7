"""The built-in tiny model: a miniature Stable Diffusion XL pipeline trained here, on a CPU,
to draw one coloured shape on a coloured background where the caption says.

    from pipelines import load_pipeline
    with load_pipeline("tiny-shapes", presets.preset_configs("basic")) as pipe:
        pipe.generate(prompt="a large yellow star on a purple background, top right").save("out/")

Its files (``model/``, about 18 MB of .safetensors) ship with the project and go through the
same registry and loader as every downloaded family. ``shapes.py`` is its world (captions,
drawing, judging an image by its pixels); ``train.py`` makes the model from nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..registry import CONVERTED_SUFFIX, DEFAULT_MODEL, Component, Family, register

MODEL_DIR = Path(__file__).parent / "model"

FAMILY = Family(
    key=DEFAULT_MODEL, title="Built-in tiny model (shapes, 128 px)", pipeline_class="StableDiffusionXLPipeline",
    components=(Component("text_encoder", "text_encoding", 142_912, 64),
                Component("text_encoder_2", "text_encoding", 147_008, 64),
                Component("unet", "denoising", 4_260_068, 128),
                Component("vae", "vae_decoding", 71_559)),
    defaults={"steps": 20, "guidance": 4.0, "width": 128, "height": 128},
    size_multiple=8, max_side=512, bundled=MODEL_DIR,
    description="Trained here on drawn shapes; no download, runs on a CPU. Prompts like "
                "'a small red circle on a blue background, top left' (6 shapes, 8 colours, 9 places).",
)

register(FAMILY)

# The same model stored in scaled fp8 e4m3 (pipelines/convert.py), made from the shipped
# files into the models directory the first time it loads: a converted copy to try anywhere.
FP8_VARIANT = replace(
    FAMILY, key=DEFAULT_MODEL + CONVERTED_SUFFIX, title="Built-in tiny model, fp8 e4m3", bundled=None,
    converted_from=DEFAULT_MODEL, converted_dtype="float8_e4m3fn",
    description="The built-in model converted here to scaled fp8 on first use (a second, into the models "
                "directory): its text encoders and UNet at half the bytes. Same prompts.")
register(FP8_VARIANT)
