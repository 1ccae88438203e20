"""The toy world's models, in diffusers / transformers formats, and the folder they are saved in.

Architecture (about 3.7 M parameters in all, 7.5 MB in fp16):

- images 64x64 RGB; an ``AutoencoderKL`` with three levels (the latent is the image / 4:
  16x16x4), trained on the world's images;
- a ``UNet2DConditionModel`` (SD 1.5 layout) on the 16x16 latent: cross-attention at
  16x16 and 8x8 (the AnyMS routing grids; a box of a third of the image keeps 5 and 2-3
  tokens across), cross-attention dim 64;
- a 2-layer ``CLIPTextModel`` with a real ``CLIPTokenizer`` over a word-level vocabulary
  (the colour and shape names and "and": ``vocab.json`` / ``merges.txt`` as in real CLIP);
- a 2-layer ``CLIPVisionModelWithProjection`` of 32x32 images (the reference is resized by
  the pipeline's ``CLIPImageProcessor``), diffusers' ``ImageProjection`` (4 tokens) and one
  ``to_k_ip`` / ``to_v_ip`` pair per cross-attention layer: an IP-Adapter in the original
  checkpoint layout (``image_proj.*``, ``ip_adapter.{1,3,5,...}.*``), loaded by the real
  ``pipe.load_ip_adapter``.

The image projection has no biases (they are held at zero): a zero image embedding,
which diffusers uses as the negative image of classifier-free guidance and which training
uses for "no reference", gives zero image tokens and so an image branch of exactly zero,
the value AnyMS gives every token outside all boxes.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from . import world

__all__ = [
    "VOCABULARY", "MAX_TOKENS", "CROSS_DIM", "IP_WEIGHT_NAME", "IP_SUBFOLDER",
    "build_tokenizer", "build_text_encoder", "build_image_encoder", "build_image_processor",
    "build_vae", "build_unet", "build_train_scheduler", "build_scheduler", "install_ip_adapter",
    "ip_adapter_state_dict", "save_world",
]

# Words the tokenizer knows as single tokens; anything else is the unknown token.
VOCABULARY: List[str] = list(world.COLOURS) + list(world.SHAPES) + ["and", "a", "on", "grey"]
MAX_TOKENS = 16          # prompt length in tokens (4 objects: 11 words + start and end)
CROSS_DIM = 64           # text hidden size = cross-attention dim
IMAGE_EMBED_DIM = 64     # the image encoder's projection (image_embeds) size
IP_TOKENS = 4            # image tokens per reference (ImageProjection)
IP_SUBFOLDER = "ip_adapter"
IP_WEIGHT_NAME = "ip-adapter_toy.safetensors"
LATENT_SCALE = 4         # image side / latent side


# ----------------------------------------------------------------------- tokenizer
def _bpe(parts: List[str], ranks: Dict[str, int]) -> List[str]:
    """CLIP's BPE on one word: merge the adjacent pair of lowest rank until none is known."""
    while len(parts) > 1:
        pairs = [(ranks.get(f"{a} {b}"), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        known = [p for p in pairs if p[0] is not None]
        if not known:
            break
        i = min(known)[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def _vocab_and_merges():
    """A CLIP BPE vocabulary in which every word of VOCABULARY is one token.

    CLIP's BPE starts from characters (the last one marked ``</w>``) and applies merges in
    rank order. Each word is run through the merges so far and gets new ones (of higher
    rank, so no earlier word changes) that join what is left, left to right.
    """
    vocab: Dict[str, int] = {}
    ranks: Dict[str, int] = {}
    for c in sorted({c for w in VOCABULARY for c in w}):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in VOCABULARY:
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks[f"{parts[0]} {parts[1]}"] = len(ranks)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, list(ranks)


def write_tokenizer_files(folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's formats) to ``folder``."""
    vocab, merges = _vocab_and_merges()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tokenizer():
    """The world's ``CLIPTokenizer`` (MAX_TOKENS tokens per prompt), read from its written files."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="anyms-toy-tokenizer-") as folder:
        write_tokenizer_files(folder)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


# ------------------------------------------------------------------------ encoders
def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _vocab_and_merges()
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=2 * CROSS_DIM, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))


def build_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, projection_dim=IMAGE_EMBED_DIM, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8, hidden_act="gelu"))


def build_image_processor():
    from ..tiny import tiny_image_processor

    return tiny_image_processor(32)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8,
        sample_size=world.IMAGE_SIZE, mid_block_add_attention=False)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // LATENT_SCALE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # diffusers reads attention_head_dim as the number of heads: head dim 32 at both levels
        attention_head_dim=(2, 3), cross_attention_dim=CROSS_DIM, norm_num_groups=16)


_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_SCHEDULE, prediction_type="epsilon")


def build_scheduler():
    """The sampler saved with the world: DPM-Solver++ (2M), good at 20 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**_SCHEDULE, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")


# ---------------------------------------------------------------------- IP-Adapter
def _cross_attention_layers(unet) -> List[str]:
    """Names of the U-Net's cross-attention modules, in ``attn_processors`` order."""
    return [name[: -len(".processor")] for name in unet.attn_processors if not name.endswith("attn1.processor")]


def _fresh_ip_adapter_state_dict(unet, seed: int) -> Dict[str, torch.Tensor]:
    from diffusers.models.embeddings import ImageProjection

    gen = torch.Generator().manual_seed(seed)
    proj = ImageProjection(image_embed_dim=IMAGE_EMBED_DIM, cross_attention_dim=CROSS_DIM,
                           num_image_text_embeds=IP_TOKENS)
    state = {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in proj.state_dict().items()}
    state["image_proj.proj.bias"].zero_()
    state["image_proj.norm.bias"].zero_()
    key_id = 1
    for name in _cross_attention_layers(unet):
        attn = unet.get_submodule(name)
        for which in ("to_k_ip", "to_v_ip"):
            w = torch.randn(attn.to_k.weight.shape[0], CROSS_DIM, generator=gen) * CROSS_DIM ** -0.5
            state[f"ip_adapter.{key_id}.{which}.weight"] = w
        key_id += 2
    return state


def install_ip_adapter(unet, seed: int = 0) -> None:
    """Give ``unet`` a freshly initialised IP-Adapter through diffusers' own loader.

    Installs ``IPAdapterAttnProcessor2_0`` on every cross-attention layer and the image
    projection (``unet.encoder_hid_proj``), exactly as ``pipe.load_ip_adapter`` does, and
    holds the projection's biases at zero (see the module docstring).
    """
    flat = _fresh_ip_adapter_state_dict(unet, seed)
    nested = {"image_proj": {}, "ip_adapter": {}}   # the split load_ip_adapter makes of a checkpoint
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        nested[group][rest] = value
    unet._load_ip_adapter_weights([nested])
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    for bias in (proj.image_embeds.bias, proj.norm.bias):
        bias.data.zero_()
        bias.requires_grad_(False)


def ip_adapter_state_dict(unet) -> Dict[str, torch.Tensor]:
    """The U-Net's IP-Adapter in the original checkpoint layout (what ``load_ip_adapter`` reads)."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    out = {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in proj.state_dict().items()}
    key_id = 1
    for name in _cross_attention_layers(unet):
        processor = unet.attn_processors[name + ".processor"]
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_world(folder: str, *, vae, unet, text_encoder, image_encoder, dtype=torch.float16) -> None:
    """Save the world as a diffusers SD 1.5-style pipeline folder plus its IP-Adapter.

    ``folder`` then loads as ``AnyMSStableDiffusionPipeline.from_pretrained(folder)`` and
    ``pipe.load_ip_adapter(folder, subfolder=IP_SUBFOLDER, weight_name=IP_WEIGHT_NAME)``.
    ``unet`` carries its IP-Adapter (installed by :func:`install_ip_adapter`); the saved U-Net
    is the plain one, as a base model on the Hub is.
    """
    import copy

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    ip_state = {k: v.to(dtype) for k, v in ip_adapter_state_dict(unet).items()}
    plain_unet = build_unet()
    plain_unet.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if "_ip" not in k and not k.startswith("encoder_hid_proj")},
        strict=True)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder), tokenizer=build_tokenizer(),
        unet=plain_unet, scheduler=build_scheduler(), safety_checker=None,
        feature_extractor=build_image_processor(), image_encoder=copy.deepcopy(image_encoder),
        requires_safety_checker=False)
    pipe.to(dtype)
    os.makedirs(folder, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The files hold fp16 weights (half the size). transformers loads a model in the dtype its
    # config names, diffusers in float32: name float32 so that a plain from_pretrained gives one dtype.
    for name in ("text_encoder", "image_encoder"):
        path = os.path.join(folder, name, "config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["dtype"] = "float32"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    # transformers 5 saves only tokenizer.json; CLIP's own vocab.json / merges.txt go beside it
    write_tokenizer_files(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, IP_SUBFOLDER), exist_ok=True)
    save_file(ip_state, os.path.join(folder, IP_SUBFOLDER, IP_WEIGHT_NAME))
