"""Tiny, randomly initialised SDXL- and SD1.5-shaped pipelines, built offline in code.

    from diffusers import StableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline
    pipe = tiny_pipeline(StableDiffusionXLPipeline, kind="sdxl", plus=False, seed=0)
    image = pipe("a cat", ip_adapter_image=[[img_a, img_b]], num_inference_steps=2).images[0]

THE WEIGHTS ARE RANDOM. These pipelines produce noise-like images; they exist so
that tests, the offline demo and CI can run the real code paths of diffusers and
transformers (the real ``UNet2DConditionModel``, ``AutoencoderKL``, two CLIP text
encoders with a real ``CLIPTokenizer``, a CLIP image encoder, a real scheduler, and
IP-Adapter weights read by the real ``pipe.load_ip_adapter``) on a machine that
cannot download weights. Use real checkpoints (``from_pretrained``) for images.

Everything is deterministic from ``seed``: each module is initialised under its own
seeded RNG (``torch.random.fork_rng``), so building a tiny pipeline never changes the
caller's global RNG state.

Shapes (defaults):

- SDXL-shaped: U-Net levels ``DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D``
  with 32/64/128 channels, head dim 64 at every cross-attention layer (like SDXL),
  ``addition_embed_type="text_time"``, two text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``, 77 tokens), cross-attention dim 64, an
  ``EulerDiscreteScheduler`` with the SDXL defaults.
- SD1.5-shaped: ``CrossAttnDownBlock2D, DownBlock2D`` with 40/80 channels, head dims 40
  and 80 (SD 1.5's are 40/80/160), one text encoder, a ``PNDMScheduler`` as in SD 1.5.
- Both: an ``AutoencoderKL`` with four levels, so the latent is the image / 8 like the
  real models; default image 128x128 (latent 16x16); a CLIP vision encoder of 32x32
  images; IP-Adapter weights in the original checkpoint format (4-token ``ImageProjection``
  or 16-token "plus" resampler).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
from typing import Dict, Optional

import torch

__all__ = [
    "TINY_IMAGE_SIZE",
    "tiny_sdxl_components",
    "tiny_sd15_components",
    "save_tiny_ip_adapter",
    "tiny_pipeline",
    "tiny_tokenizer",
]

# The default image side of the tiny pipelines (latent side 16, the VAE scales by 8).
TINY_IMAGE_SIZE = 128
# the tiny VAE's and U-Nets' channels per level (their level counts are what anyms.upscale_args reads)
TINY_VAE_BLOCKS = (16, 16, 32, 32)
TINY_UNET_BLOCKS = {"sdxl": (32, 64, 128), "sd15": (40, 80)}
_TEXT_HIDDEN = 32          # hidden size of each tiny CLIP text encoder
_TEXT_PROJECTION = 32      # projection dim of the second SDXL text encoder (pooled embeds)
_VISION_IMAGE_SIZE = 32    # the tiny CLIP image encoder's input side
_VISION_HIDDEN = 32        # its hidden size (the "plus" adapter reads hidden_states[-2])
_VISION_PROJECTION = 32    # its image_embeds size (the base adapter reads these)
_PLUS_TOKENS = 16          # image tokens of the "plus" adapter (the base adapter has 4)


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_transformers_progress():
    """Hide transformers' per-file progress bars while the tiny weights are written and read."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


# A few merges so that common letters pair up, as a real BPE vocabulary would; any
# other text still tokenizes, one byte-level character per token.
_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o n", "i n", "e r", "a t</w>", "c at</w>", "d o", "do g</w>"]


def _tiny_vocab() -> Dict[str, int]:
    vocab: Dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch + "</w>"] = len(vocab)
    for merge in _MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_tokenizer():
    """A real ``CLIPTokenizer`` over a tiny byte-level vocabulary (77 tokens per prompt).

    The vocabulary and merges are written to a temporary folder and read back with
    ``CLIPTokenizer.from_pretrained``, the path real checkpoints take.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="anyms-tiny-tokenizer-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(_tiny_vocab(), f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _vocab_size() -> int:
    return len(_tiny_vocab())


# ------------------------------------------------------------------------ encoders
def _text_config(projection_dim: Optional[int] = None):
    from transformers import CLIPTextConfig

    vocab = _tiny_vocab()
    kwargs = dict(
        vocab_size=len(vocab), hidden_size=_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def tiny_image_encoder(seed: int = 0, hidden_size: int = _VISION_HIDDEN):
    """A random ``CLIPVisionModelWithProjection`` of 32x32 images (hidden ``hidden_size``, default 32,
    projection 32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=64, projection_dim=_VISION_PROJECTION,
        num_hidden_layers=2, num_attention_heads=2, image_size=_VISION_IMAGE_SIZE, patch_size=8,
    )
    with _seeded(seed):
        return CLIPVisionModelWithProjection(config).eval()


def tiny_image_processor(size: int = _VISION_IMAGE_SIZE):
    """The CLIP image processor for the tiny image encoder (resize and crop to ``size``)."""
    try:  # transformers >= 5 without torchvision: the PIL backend, imported directly (no warning)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ---------------------------------------------------------------------- components
def _tiny_vae(seed: int, sample_size: int = TINY_IMAGE_SIZE, **config):
    """A 4-level (8x) random VAE; ``config`` adds a model family's own fields (FLUX's scaling)."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=TINY_VAE_BLOCKS, layers_per_block=1, norm_num_groups=8,
            sample_size=sample_size, **config,
        ).eval()


def tiny_sdxl_unet(seed: int = 0):
    """An SDXL-shaped random U-Net: 3 levels, head dim 64, ``text_time`` added conditioning."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=TINY_UNET_BLOCKS["sdxl"],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            # diffusers reads attention_head_dim as the number of heads here (as SDXL's
            # config does): 64 / 1 and 128 / 2 give head dim 64, like SDXL's 640 / 10, 1280 / 20.
            attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=2 * _TEXT_HIDDEN, norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + _TEXT_PROJECTION,
        ).eval()


def tiny_sd15_unet(seed: int = 0):
    """An SD1.5-shaped random U-Net: 2 levels, head dims 40 and 80 (SD 1.5's own)."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=TINY_UNET_BLOCKS["sd15"],
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=1, cross_attention_dim=_TEXT_HIDDEN, norm_num_groups=8,
        ).eval()


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # stabilityai/stable-diffusion-xl-base-1.0's scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        steps_offset=1, timestep_spacing="leading",
    )


def _sd15_scheduler():
    from diffusers import PNDMScheduler

    # runwayml/stable-diffusion-v1-5's scheduler config.
    return PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )


def tiny_sdxl_components(seed: int = 0, with_image_encoder: bool = True) -> dict:
    """Constructor kwargs of ``StableDiffusionXLPipeline`` (or a subclass), random weights.

    Args:
        seed: every module is initialised deterministically from it.
        with_image_encoder: include the tiny CLIP image encoder and its processor
            (``image_encoder``, ``feature_extractor``); else both are None, as after
            ``from_pretrained`` of an SDXL checkpoint, and ``load_ip_adapter`` loads
            the encoder from the adapter's folder.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_text_config()).eval()
    with _seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(_TEXT_PROJECTION)).eval()
    return dict(
        vae=_tiny_vae(seed + 1),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=_sdxl_scheduler(),
        image_encoder=tiny_image_encoder(seed + 4) if with_image_encoder else None,
        feature_extractor=tiny_image_processor() if with_image_encoder else None,
    )


def tiny_sd15_components(seed: int = 0, with_image_encoder: bool = True) -> dict:
    """Constructor kwargs of ``StableDiffusionPipeline`` (or a subclass), random weights, no safety checker."""
    from transformers import CLIPTextModel

    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_text_config()).eval()
    return dict(
        vae=_tiny_vae(seed + 1),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=tiny_sd15_unet(seed),
        scheduler=_sd15_scheduler(),
        safety_checker=None,
        # SD 1.5's feature_extractor also serves its safety checker; the IP-Adapter's
        # image encoder needs one of its own size.
        feature_extractor=tiny_image_processor(),
        image_encoder=tiny_image_encoder(seed + 4) if with_image_encoder else None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------------- IP-Adapter
def _image_proj_state_dict(image_encoder, cross_attention_dim: int, plus: bool, seed: int) -> dict:
    """A random image projection, in the original IP-Adapter checkpoint's key layout.

    The module is built from diffusers' own class (``ImageProjection`` or
    ``IPAdapterPlusImageProjection``) and its keys are renamed to the checkpoint names
    that ``UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers`` maps back.
    """
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    if not plus:
        with _seeded(seed):
            proj = ImageProjection(image_embed_dim=image_encoder.config.projection_dim,
                                   cross_attention_dim=cross_attention_dim, num_image_text_embeds=4)
        # checkpoint: proj.{weight,bias} (-> image_embeds.*), norm.{weight,bias}
        return {k.replace("image_embeds", "proj"): v for k, v in proj.state_dict().items()}

    # The loader builds the resampler with depth 4 and dim_head 64 and infers
    # heads = to_q.out_features // 64, so hidden dims of 64 make one head.
    with _seeded(seed):
        proj = IPAdapterPlusImageProjection(embed_dims=image_encoder.config.hidden_size,
                                            output_dims=cross_attention_dim, hidden_dims=64, depth=4,
                                            dim_head=64, heads=1, num_queries=_PLUS_TOKENS)
    out = {}
    for key, value in proj.state_dict().items():
        parts = key.split(".")
        if parts[0] != "layers":       # latents, proj_in, proj_out, norm_out keep their names
            out[key] = value
            continue
        i, rest = parts[1], ".".join(parts[2:])
        if rest.startswith("ln0."):
            out[f"layers.{i}.0.norm1.{rest[4:]}"] = value
        elif rest.startswith("ln1."):
            out[f"layers.{i}.0.norm2.{rest[4:]}"] = value
        elif rest == "attn.to_q.weight":
            out[f"layers.{i}.0.to_q.weight"] = value
        elif rest == "attn.to_k.weight":     # the checkpoint fuses k and v into to_kv
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([value, proj.state_dict()[key.replace("to_k", "to_v")]])
        elif rest == "attn.to_v.weight":
            continue
        elif rest == "attn.to_out.0.weight":
            out[f"layers.{i}.0.to_out.weight"] = value
        elif rest.startswith("ff.0."):
            out[f"layers.{i}.1.0.{rest[5:]}"] = value
        elif rest == "ff.1.net.0.proj.weight":
            out[f"layers.{i}.1.1.weight"] = value
        elif rest == "ff.1.net.2.weight":
            out[f"layers.{i}.1.3.weight"] = value
        else:  # pragma: no cover - a diffusers version with a different resampler
            raise RuntimeError(f"tiny IP-Adapter: unexpected resampler key {key!r}; diffusers changed its layout")
    return out


def save_tiny_ip_adapter(folder, unet, image_encoder, plus: bool = False, seed: int = 0) -> str:
    """Write random IP-Adapter weights for ``unet`` to ``folder``; return the weight name.

    The file holds ``image_proj.*`` (4-token ``ImageProjection`` or, with ``plus=True``,
    the 16-token resampler) and ``ip_adapter.{k}.to_k_ip.weight`` / ``to_v_ip.weight``
    for each cross-attention layer in ``unet.attn_processors`` order (k = 1, 3, 5, ...),
    the layout of the published IP-Adapter checkpoints. ``image_encoder`` is saved to
    ``folder/image_encoder`` so that ``pipe.load_ip_adapter(folder, subfolder="",
    weight_name=...)`` finds it when the pipeline has none. Weights are random.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    cross_dim = unet.config.cross_attention_dim
    if not isinstance(cross_dim, int):
        raise ValueError(f"unet: tiny IP-Adapters need one cross_attention_dim, got {cross_dim!r}")
    tensors = {f"image_proj.{k}": v for k, v in
               _image_proj_state_dict(image_encoder, cross_dim, plus, seed).items()}
    gen = torch.Generator().manual_seed(seed + 1)
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        out_features, in_features = attn.to_k.weight.shape[0], cross_dim
        for which in ("to_k_ip", "to_v_ip"):
            w = torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5
            tensors[f"ip_adapter.{key_id}.{which}.weight"] = w.to(attn.to_k.weight.dtype)
        key_id += 2
    weight_name = "ip-adapter-plus_tiny.safetensors" if plus else "ip-adapter_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, weight_name))
    image_encoder.save_pretrained(os.path.join(folder, "image_encoder"))
    return weight_name


def tiny_pipeline(pipeline_cls, kind: str = "sdxl", plus: bool = False, seed: int = 0,
                  with_ip_adapter: bool = True, ip_adapter_folder: Optional[str] = None):
    """A pipeline of ``pipeline_cls`` with tiny random components (weights are random).

    Args:
        pipeline_cls: ``StableDiffusionXLPipeline`` (``kind="sdxl"``),
            ``StableDiffusionPipeline`` (``kind="sd15"``) or a subclass of either.
        kind: ``"sdxl"`` or ``"sd15"``.
        plus: load the 16-token "plus" IP-Adapter instead of the 4-token one; a list of bools
            loads one adapter per entry with the list form of ``load_ip_adapter`` (adapter ``i``
            from ``folder/adapter{i}``), each with an image encoder of its own: adapter 0's
            becomes ``pipe.image_encoder``, adapter ``i >= 1``'s (hidden size ``32 + 16 i``, so that
            a wrong pairing fails) the adapter's own (``pipe.ip_adapter_image_encoder(i)``); the
            list form needs an AnyMS pipeline class.
        seed: all weights are deterministic functions of it.
        with_ip_adapter: write random IP-Adapter weights (and the image encoder) to a
            folder and load them with the real ``pipe.load_ip_adapter``; without it the
            pipeline has no IP-Adapter and no image encoder, like a fresh checkpoint.
        ip_adapter_folder: where to write the adapter (kept); default a temporary folder,
            deleted once the weights are loaded.
    """
    if kind not in ("sdxl", "sd15"):
        raise ValueError(f"kind must be 'sdxl' or 'sd15', got {kind!r}")
    build = tiny_sdxl_components if kind == "sdxl" else tiny_sd15_components
    components = build(seed)
    image_encoder = components["image_encoder"]
    components["image_encoder"] = None   # load_ip_adapter loads it from the adapter's folder
    if kind == "sdxl":
        components["feature_extractor"] = None
        if "add_watermarker" in inspect.signature(pipeline_cls.__init__).parameters:
            components["add_watermarker"] = False   # no invisible-watermark dependency
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    if not with_ip_adapter:
        return pipe
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_transformers_progress())
        folder = ip_adapter_folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="anyms-tiny-ipa-"))
        several = isinstance(plus, (list, tuple))
        if several:
            subfolders, weights = [], []
            for i, kind_plus in enumerate(plus):
                encoder = image_encoder if i == 0 else tiny_image_encoder(seed + 4 + 10 * i, _VISION_HIDDEN + 16 * i)
                subfolders.append(f"adapter{i}")
                weights.append(save_tiny_ip_adapter(os.path.join(folder, subfolders[-1]), pipe.unet, encoder,
                                                    plus=bool(kind_plus), seed=seed + 5 + 10 * i))
        else:
            weight_name = save_tiny_ip_adapter(folder, pipe.unet, image_encoder, plus=plus, seed=seed + 5)
        if kind == "sdxl":
            # Give the pipeline the processor of the tiny encoder's size up front
            # (load_ip_adapter would make an equivalent one, with a warning where torchvision is missing).
            pipe.register_modules(feature_extractor=tiny_image_processor())
        # load_ip_adapter draws from the global RNG (the resampler's latents are made
        # with torch.randn before the saved ones replace them): keep the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]), _diffusers_errors_only():
            if several:
                pipe.load_ip_adapter(folder, subfolder=subfolders, weight_name=weights,
                                     image_encoder_folder=["image_encoder"] * len(weights))
            else:
                pipe.load_ip_adapter(folder, subfolder="", weight_name=weight_name)
    return pipe


@contextlib.contextmanager
def _diffusers_errors_only():
    """load_ip_adapter warns that the U-Net has no modules to keep in float32 ('[]') when it
    casts the adapter's layers: true of every model and nothing a demo user can act on."""
    from diffusers.utils import logging as df_logging

    level = df_logging.get_verbosity()
    df_logging.set_verbosity_error()
    try:
        yield
    finally:
        df_logging.set_verbosity(level)
