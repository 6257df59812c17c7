"""Tiny, seeded, randomly initialised diffusers pipelines saved in each family's real folder layout.

``build_family(name, folder)`` writes exactly what ``pipeline.save_pretrained(folder, safe_serialization=True)``
writes for the family's pipeline class (``model_index.json``, ``scheduler/``, ``tokenizer*/``,
``text_encoder*/``, ``transformer/`` or ``unet/``, ``vae/``), with one or more components re-saved as
sharded ``*.safetensors`` plus ``*.safetensors.index.json``, as the real checkpoints ship. The same seed
gives byte-identical files. ``tiny_call_kwargs(name)`` gives the arguments of a fast, valid run.

Nothing is downloaded: the configs are small versions of those in diffusers' own pipeline tests, and every
tokenizer is built here from a tiny hand-made vocabulary (see the ``_*_tokenizer`` functions), so the
folders load with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import pathlib
import string

import torch

FAMILIES = ("qwen-image", "z-image", "flux", "wan", "sdxl")

# Words given a token of their own (the rest is spelled with byte or character tokens). The Qwen system prompt
# words make Qwen-Image's fixed template prefix exactly 34 tokens long, as with the real tokenizer, so the
# pipeline's `prompt_template_encode_start_idx = 34` drops exactly the template.
_QWEN_TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color",
                        " shape", " size", " texture", " quantity", " text", " spatial", " relationships", " of",
                        " objects", " and", " background")
_COMMON_WORDS = ("a", "red", "circle", "on", "blue", "background", "photo", "of", "the", "cat", "dog", "and",
                 "with", "in", "bad", "quality", "green", "square")

# Qwen2 / Qwen2.5-VL / Qwen3 added tokens, in the real tokenizers' order: special ones, then Qwen3's plain ones.
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                 "<|file_sep|>")
_QWEN_PLAIN_ADDED = ("<tool_response>", "</tool_response>", "<think>", "</think>")

# Qwen3's chat template cut down to what Z-Image uses: plain messages and the generation prompt
# (`enable_thinking=False` adds the empty think block, as in the real template).
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _round_up(n: int, multiple: int = 64) -> int:
    """Text encoders get a vocabulary padded past the tokenizer's, as the real ones (Qwen's 152064 > 151665)."""
    return -(-n // multiple) * multiple


# -- tokenizers -----------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (used by byte-level BPE: Qwen, CLIP), in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items(), key=lambda item: (item[0] not in printable, ord(item[1]))))


def _byte_level(text: str) -> str:
    table = _bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _chain_merges(words, suffix: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """BPE merges gluing each word left to right ("r"+"e", "re"+"d</w>"), and the tokens they create."""
    tokens, merges = [], []
    for word in words:
        symbols = list(word)
        symbols[-1] += suffix
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
                tokens.append(left + right)
            left += right
    return tokens, merges


def _qwen_tokenizer(chat_template: str | None = None):
    """A ``Qwen2Tokenizer`` (byte-level BPE, Qwen's pre-tokenizer) over a 429-token vocabulary.

    Vocabulary: the 256 byte symbols (so any text tokenizes, nothing is unknown), chain merges for the Qwen-Image
    template words and a few common words, then the Qwen special tokens (``<|im_start|>``, ``<|vision_start|>``,
    ...) registered as added tokens, as in the real ``tokenizer.json``. The template words make Qwen-Image's
    system prompt prefix 34 tokens, as with the real tokenizer. `chat_template` is saved as ``chat_template.jinja``.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = list(_bytes_to_unicode().values())
    words = [_byte_level(w) for w in (*_QWEN_TEMPLATE_WORDS, *(" " + w for w in _COMMON_WORDS))]
    merged, merges = _chain_merges(words)
    vocab = {token: i for i, token in enumerate([*alphabet, *merged, *_QWEN_SPECIAL, *_QWEN_PLAIN_ADDED])}
    # <|endoftext|> is already unk/eos/pad; tokens already in `vocab` keep their ids when added
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768, chat_template=chat_template)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True)
                                                                for t in _QWEN_SPECIAL[1:]]})
    tokenizer.add_tokens([AddedToken(t, special=False) for t in _QWEN_PLAIN_ADDED])
    return tokenizer


def _clip_tokenizer():
    """A ``CLIPTokenizer`` (byte-level BPE with CLIP's ``</w>`` word ends, lower-casing) over 567 tokens.

    Vocabulary laid out like CLIP's: 256 byte symbols, the same with ``</w>``, chain merges for a few common
    words, then ``<|startoftext|>`` and ``<|endoftext|>`` last. ``model_max_length`` is 77 as in the real
    tokenizers (the pipelines pad to it and the text encoders have 77 positions).
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    merged, merges = _chain_merges(_COMMON_WORDS, suffix="</w>")
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *merged, "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    """A ``T5Tokenizer`` (Unigram, ``▁`` word marker, ``</s>`` appended) over 141 pieces.

    Pieces: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's fixed ids), ``▁``, every printable ASCII character,
    ``▁`` + each lower-case letter, and ``▁word`` pieces for a few common words (scored above single characters
    so they win). Characters outside ASCII become ``<unk>``, as out-of-vocabulary pieces do in the real
    sentencepiece model. No sentinel (``<extra_id_*>``) tokens: the pipelines never use them.
    """
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -10.0) for c in chars]
    pieces += [("▁" + c, -9.0) for c in string.ascii_lowercase]
    pieces += [("▁" + w, -5.0) for w in _COMMON_WORDS if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# -- components, one function per family (configs shrunk from diffusers' pipeline tests) ----------------------

def _qwen_image_components(seed: int) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    torch.manual_seed(seed)
    special = {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
               "pad_token_id": ids("<|endoftext|>")}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": _round_up(len(tokenizer)), **special,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                       "fullatt_block_indexes": [1]},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"), **special)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Qwen/Qwen-Image's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                time_shift_type="exponential", use_dynamic_shifting=True)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def _z_image_components(seed: int) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _qwen_tokenizer(chat_template=_QWEN3_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # these two are created with torch.empty: without this the files hold stale memory
        transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=_round_up(len(tokenizer)), max_position_embeddings=512,
                                          bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                                          pad_token_id=ids("<|endoftext|>"))).eval()
    # Tongyi-MAI/Z-Image-Turbo's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}


def _flux_components(seed: int) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=_round_up(len(tokenizer_2)), d_model=32, d_kv=8, d_ff=37,
                                             num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                             dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                             is_encoder_decoder=False)).eval()
    # black-forest-labs/FLUX.1-dev's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    return {"scheduler": scheduler, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "transformer": transformer, "vae": vae,
            "image_encoder": None, "feature_extractor": None}


def _wan_components(seed: int) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=_round_up(len(tokenizer)), d_model=32, d_kv=8, d_ff=37,
                                               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                               dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                               is_encoder_decoder=False)).eval()
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers' scheduler: UniPC on flow-matching sigmas
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def _sdxl_components(seed: int) -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled
                                cross_attention_dim=64, norm_num_groups=4)  # 32 + 32 hidden states
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.13025)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer)).eval()
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2)).eval()
    # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000,
                                       interpolation_type="linear", prediction_type="epsilon")
    return {"unet": unet, "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "image_encoder": None,
            "feature_extractor": None}


def _clip_text_config(tokenizer):
    from transformers import CLIPTextConfig

    ids = tokenizer.convert_tokens_to_ids
    return CLIPTextConfig(vocab_size=_round_up(len(tokenizer)), hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                          hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=ids("<|startoftext|>"),
                          eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"))


# name -> (diffusers pipeline class, components builder, {component: max shard size} saved sharded)
_FAMILIES = {
    "qwen-image": ("QwenImagePipeline", _qwen_image_components, {"transformer": "250KB"}),
    "z-image": ("ZImagePipeline", _z_image_components, {"transformer": "600KB"}),
    "flux": ("FluxPipeline", _flux_components, {"transformer": "100KB", "text_encoder_2": "40KB"}),
    "wan": ("WanPipeline", _wan_components, {"transformer": "50KB"}),
    "sdxl": ("StableDiffusionXLPipeline", _sdxl_components, {"unet": "150KB"}),
}


def _save(pipeline, folder: pathlib.Path, sharded: dict[str, str]) -> pathlib.Path:
    """``pipeline.save_pretrained(folder, safe_serialization=True)``, then each component named in `sharded`
    (name -> max shard size) re-saved by its own ``save_pretrained(max_shard_size=...)``: several
    ``*.safetensors`` plus a ``*.safetensors.index.json``, as large real checkpoints ship. (The pipeline's own
    ``max_shard_size`` would apply one size to every component.)"""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name, max_shard_size in sharded.items():
        for old in (folder / name).glob("*.safetensors*"):
            old.unlink()
        getattr(pipeline, name).save_pretrained(folder / name, max_shard_size=max_shard_size)
    return folder


def build_family(name: str, folder: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny pipeline for `name` into `folder` (created), return folder."""
    import diffusers

    if name not in _FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    pipeline_name, components, sharded = _FAMILIES[name]
    pipeline = getattr(diffusers, pipeline_name)(**components(seed))
    return _save(pipeline, pathlib.Path(folder), sharded)


def tiny_call_kwargs(name: str) -> dict:
    """Generation kwargs for a fast, valid tiny run: height, width, num_inference_steps (2), guidance arguments
    that make the pipeline run its guidance path, max_sequence_length where the pipeline has one,
    output_type="np"."""
    common = {"num_inference_steps": 2, "output_type": "np"}
    kwargs = {
        # true CFG: a negative prompt and true_cfg_scale > 1 (guidance_scale is for guidance-distilled models)
        "qwen-image": {"height": 32, "width": 32, "true_cfg_scale": 2.0, "negative_prompt": "bad quality",
                       "max_sequence_length": 16},
        "z-image": {"height": 32, "width": 32, "guidance_scale": 3.0, "negative_prompt": "bad quality",
                    "max_sequence_length": 32},
        # FLUX.1-dev style: guidance is an embedding (guidance_embeds=True), one pass per step
        "flux": {"height": 32, "width": 32, "guidance_scale": 3.5, "max_sequence_length": 16},
        # 5 frames (4k + 1): two latent frames with the 4x temporal VAE
        "wan": {"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 5.0, "negative_prompt": "bad quality",
                "max_sequence_length": 16},
        "sdxl": {"height": 32, "width": 32, "guidance_scale": 5.0, "negative_prompt": "bad quality"},
    }
    if name not in kwargs:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    return {**common, **kwargs[name]}


def build_big_flux(folder: pathlib.Path, *, hidden: int = 1536, double: int = 4, single: int = 8,
                   seed: int = 0) -> pathlib.Path:
    """The tiny FLUX pipeline with its transformer swapped for a large one (the defaults give
    1.2 GiB of bf16, in 300 MB shards): a real-sized checkpoint with tiny text encoders and
    VAE, for measuring memory. Built on the meta device and written one tensor at a time, so
    building needs no more RAM than one shard."""
    import json

    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    build_family("flux", folder, seed=seed)
    transformer = folder / "transformer"
    config = json.loads((transformer / "config.json").read_text())
    heads = hidden // 128
    config.update(num_attention_heads=heads, attention_head_dim=128, num_layers=double, num_single_layers=single,
                  axes_dims_rope=[16, 56, 56])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    for old in transformer.glob("*.safetensors*"):
        old.unlink()
    (transformer / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush():
        name = f"diffusion_pytorch_model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(transformer / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update(dict.fromkeys(shard, name))

    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * (0.02 if len(shape) > 1 else 0.0)).to(torch.bfloat16)
        if key.endswith("norm.weight") or key.endswith("norm_q.weight") or key.endswith("norm_k.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        shard[key] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= 300 * 2**20:
            flush()
            shard, shard_bytes = {}, 0
    if shard:
        flush()
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
