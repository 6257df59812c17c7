"""Tiny models built offline from small configs, with the inputs and the call that runs them.

Each ``Case`` builds the same weights for a given seed, so a plain model and a managed one
built from the same seed (or from the plain model's saved files) must compute the same thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file, save_model


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.dtype], Any]
    run: Callable[[torch.nn.Module, Any], torch.Tensor]

    def make(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()


# -- a transformers text encoder (T5: tied embeddings, `wo` kept in fp32, the wo.weight.dtype check)
def _t5():
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config)


def _t5_inputs(dtype):
    return torch.tensor([[5, 9, 3, 17, 1, 0]])


def _t5_run(model, ids):
    return model(input_ids=ids).last_hidden_state


# -- GPT-2: transformers' Conv1D leaves and an lm_head tied to the token embedding
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _gpt2_run(model, ids):
    return model(input_ids=ids).logits


# -- a diffusers DiT: Z-Image (its t_embedder reads self.mlp[0].weight.dtype)
def _zimage():
    from diffusers import ZImageTransformer2DModel
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                    axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])


def _zimage_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(4, 1, 8, 8, generator=g, dtype=dtype)]
    cap = [torch.randn(6, 16, generator=g, dtype=dtype)]
    return x, torch.tensor([0.3], dtype=dtype), cap


def _zimage_run(model, inputs):
    x, t, cap = inputs
    return model(x, t, cap, return_dict=False)[0][0]


# -- Wan: Conv3d patch embedding, a loose parameter (scale_shift_table), fp32-kept modules
def _wan():
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def _wan_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(1, 4, 2, 8, 8, generator=g, dtype=dtype), torch.tensor([500]),
            torch.randn(1, 5, 16, generator=g, dtype=dtype))


def _wan_run(model, inputs):
    hidden, t, text = inputs
    return model(hidden, t, text, return_dict=False)[0]


# -- a diffusers VAE (Conv2d, GroupNorm, attention), run through encode and decode
def _vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                         norm_num_groups=4, layers_per_block=1)


def _vae_inputs(dtype):
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)


def _vae_run(model, image):
    latent = model.encode(image).latent_dist.mode()
    return model.decode(latent).sample


# -- a custom model: every leaf kind, loose parameters, a shared (tied) weight
class Zoo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.conv1 = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv3d(2, 4, 3, padding=1)
        self.deconv = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.group = torch.nn.GroupNorm(2, 4)
        self.rms = torch.nn.RMSNorm(8)
        self.norm = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.gain = torch.nn.Parameter(torch.randn(8))  # loose parameters of the parent
        self.register_buffer("offset", torch.linspace(0, 1, 8))

    def forward(self, ids, volume):
        h = self.embed(ids)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = self.proj(self.rms(self.norm(h))) * self.gain + self.offset
        logits = self.head(h)
        v = self.group(self.conv3(volume))
        image = self.deconv(v.mean(2))
        return torch.cat([logits.flatten(), image.flatten()])


def _zoo_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    return torch.tensor([[1, 4, 7, 19]]), torch.randn(1, 2, 3, 4, 4, generator=g, dtype=dtype)


def _zoo_run(model, inputs):
    return model(*inputs)


CASES = {
    "t5": Case("t5", _t5, _t5_inputs, _t5_run),
    "gpt2": Case("gpt2", _gpt2, _t5_inputs, _gpt2_run),
    "zimage": Case("zimage", _zimage, _zimage_inputs, _zimage_run),
    "wan": Case("wan", _wan, _wan_inputs, _wan_run),
    "vae": Case("vae", _vae, _vae_inputs, _vae_run),
    "zoo": Case("zoo", Zoo, _zoo_inputs, _zoo_run),
}


def cfg(offload, preparing, computation=("cpu", torch.float32), onload=None, **extras) -> dict:
    """An 8-key vram config from (device, dtype) pairs; onload defaults to offload."""
    onload = onload or offload
    out = {"offload_device": offload[0], "offload_dtype": offload[1],
           "onload_device": onload[0], "onload_dtype": onload[1],
           "preparing_device": preparing[0], "preparing_dtype": preparing[1],
           "computation_device": computation[0], "computation_dtype": computation[1]}
    out.update(extras)
    return out


def save_weights(model: torch.nn.Module, folder: Path, shards: int = 1) -> Path:
    """Save a model's weights as .safetensors (sharded with an index when shards > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        path = folder / "model.safetensors"
        save_model(model, str(path))
        return path
    state = {}
    seen = set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen and value.numel():
            continue  # tied: one name is enough, the core finds the others
        seen.add(value.data_ptr())
        state[key] = value.detach().contiguous().clone()
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


class Stack(torch.nn.Module):
    """A plain stack of Linear + LayerNorm blocks: predictable layer sizes for budget tests."""

    def __init__(self, width: int = 256, depth: int = 8, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(width, width, dtype=dtype),
                                                              torch.nn.LayerNorm(width, dtype=dtype))
                                          for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


def stack_files(folder: Path, seed: int = 0, **kwargs) -> tuple[Stack, Path]:
    torch.manual_seed(seed)
    model = Stack(**kwargs).eval()
    return model, save_weights(model, folder)
