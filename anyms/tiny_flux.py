"""A tiny, randomly initialised FLUX.1-shaped pipeline, built offline in code, and its IP-Adapter.

    from diffusers import FluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline
    pipe = tiny_flux_pipeline(FluxPipeline, seed=0)
    image = pipe("a cat", ip_adapter_image=img, height=128, width=128, num_inference_steps=2).images[0]

THE WEIGHTS ARE RANDOM: the images are noise-like. The pipeline exists so that tests,
the offline demo and CI run the real code paths of diffusers and transformers (the real
``FluxTransformer2DModel``, ``AutoencoderKL``, ``CLIPTextModel`` with a real
``CLIPTokenizer``, ``T5EncoderModel`` with a real ``T5Tokenizer``,
``FlowMatchEulerDiscreteScheduler``, a CLIP image encoder) and an IP-Adapter written in
the XLabs checkpoint format and read by the real ``FluxPipeline.load_ip_adapter``.

Everything is deterministic from ``seed`` (each module under its own seeded RNG); the
caller's global RNG is left alone.

Shapes (FLUX.1-dev's structure at tiny widths):

- transformer: 2 double-stream and 2 single-stream blocks, 2 heads of head dim 128 (FLUX's
  own head dim, rotary axes 16/56/56), ``guidance_embeds=True`` (guidance-distilled, like
  FLUX.1-dev), joint attention dim 32, pooled projection dim 32, ``in_channels`` 16: 2x2
  patches of a 4-channel latent;
- VAE: four levels, so the latent is the image / 8 and a token is 16x16 pixels, as in
  FLUX; FLUX's scaling and shift factors, no quant convs;
- text: a CLIP text encoder (77 tokens, pooled output 32) and a T5 encoder (d_model 32,
  up to 512 tokens) with a small Unigram vocabulary;
- IP-Adapter: a 4-token image projection of the tiny CLIP image encoder's 32-d
  ``image_embeds``, and ``to_k_ip`` / ``to_v_ip`` (with biases) in every double block.

Default image: 128x128 (an 8x8 token grid); give ``height`` and ``width`` to the call,
since FluxPipeline's own default is 1024x1024.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Optional

import torch

from .tiny import (
    _diffusers_errors_only, _quiet_transformers_progress, _seeded, _text_config, _tiny_vae, tiny_image_encoder,
    tiny_image_processor, tiny_tokenizer,
)

__all__ = [
    "TINY_FLUX_IMAGE_SIZE",
    "XLABS_WEIGHT_NAME",
    "tiny_flux_components",
    "tiny_t5_tokenizer",
    "save_tiny_flux_ip_adapter",
    "tiny_flux_pipeline",
]

TINY_FLUX_IMAGE_SIZE = 128    # 8x8 tokens of 16x16 pixels
XLABS_WEIGHT_NAME = "ip_adapter_tiny_xlabs.safetensors"
_JOINT_DIM = 32               # T5 d_model = the transformer's joint_attention_dim = the IP tokens' width
_POOLED_DIM = 32              # the CLIP text encoder's pooled output (its hidden size)
_IP_TOKENS = 4                # tokens per image of the XLabs adapter


# ------------------------------------------------------------------------ tokenizer
def _t5_vocab():
    """A small SentencePiece-style Unigram vocabulary: T5's special tokens first, then pieces.

    Lower-case letters, digits and punctuation each alone and after the word marker
    ``▁``, plus a few whole words; anything else is ``<unk>``. Scores favour longer pieces.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(c, -5.0) for c in chars]
    pieces += [("\u2581" + c, -4.0) for c in chars]
    words = ["a", "an", "and", "the", "on", "in", "cat", "dog", "ball", "box", "cone", "sofa", "table", "red",
             "blue", "green"]
    seen = {p for p, _ in pieces}
    pieces += [("\u2581" + w, -1.0 - 0.1 * i) for i, w in enumerate(words) if "\u2581" + w not in seen]
    return pieces


def tiny_t5_tokenizer():
    """A real ``T5Tokenizer`` (transformers' tokenizers-backed class) over a tiny Unigram vocabulary."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------- components
def _tiny_flux_vae(seed: int):
    # black-forest-labs/FLUX.1-dev, vae/config.json: its scaling, shift and no quant convs
    return _tiny_vae(seed, TINY_FLUX_IMAGE_SIZE, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2):
    """A FLUX.1-shaped random transformer: head dim 128, 2 heads, guidance embedding."""
    from diffusers import FluxTransformer2DModel

    with _seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=128, num_attention_heads=2, joint_attention_dim=_JOINT_DIM,
            pooled_projection_dim=_POOLED_DIM, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        ).eval()


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def tiny_flux_components(seed: int = 0, with_image_encoder: bool = True) -> dict:
    """Constructor kwargs of ``FluxPipeline`` (or a subclass), random weights.

    ``with_image_encoder``: include the tiny CLIP image encoder and its processor; else
    both are None, as after ``from_pretrained`` of a FLUX checkpoint.
    """
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    vocab = _t5_vocab()
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(_text_config()).eval()
    with _seeded(seed + 3):
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(vocab), d_model=_JOINT_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )).eval()
    return dict(
        scheduler=_flux_scheduler(),
        vae=_tiny_flux_vae(seed + 1),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=tiny_flux_transformer(seed),
        image_encoder=tiny_image_encoder(seed + 4) if with_image_encoder else None,
        feature_extractor=tiny_image_processor() if with_image_encoder else None,
    )


# ---------------------------------------------------------------------- IP-Adapter
def xlabs_state_dict(transformer, image_encoder, seed: int = 0) -> dict:
    """Random FLUX IP-Adapter weights for ``transformer``, in the XLabs checkpoint's key layout.

    ``ip_adapter_proj_model.{proj,norm}.{weight,bias}``: a 4-token projection of the image
    encoder's ``image_embeds`` (diffusers' ``ImageProjection``, its ``image_embeds`` layer
    renamed ``proj``), and for each double-stream block ``i``
    ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}``:
    ``joint_attention_dim -> inner_dim`` linear maps. This is the layout of
    XLabs-AI/flux-ip-adapter that ``FluxIPAdapterMixin.load_ip_adapter`` reads.
    """
    from diffusers.models.embeddings import ImageProjection

    cfg = transformer.config
    cross_dim, inner = cfg.joint_attention_dim, cfg.num_attention_heads * cfg.attention_head_dim
    with _seeded(seed):
        proj = ImageProjection(image_embed_dim=image_encoder.config.projection_dim, cross_attention_dim=cross_dim,
                               num_image_text_embeds=_IP_TOKENS)
    tensors = {f"ip_adapter_proj_model.{k.replace('image_embeds', 'proj')}": v for k, v in proj.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(cfg.num_layers):
        for which in ("k", "v"):
            key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{which}_proj"
            tensors[f"{key}.weight"] = torch.randn(inner, cross_dim, generator=gen) * cross_dim ** -0.5
            tensors[f"{key}.bias"] = torch.randn(inner, generator=gen) * 0.01
    return {k: v.contiguous() for k, v in tensors.items()}


def save_tiny_flux_ip_adapter(folder, transformer, image_encoder, seed: int = 0) -> str:
    """Write random XLabs-format IP-Adapter weights for ``transformer`` to ``folder``; return the weight name.

    ``image_encoder`` is saved to ``folder/image_encoder``: give that folder to
    ``load_ip_adapter(..., image_encoder_pretrained_model_name_or_path=...)`` (FLUX's loader
    does not look beside the weights by itself).
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(xlabs_state_dict(transformer, image_encoder, seed), os.path.join(folder, XLABS_WEIGHT_NAME))
    image_encoder.save_pretrained(os.path.join(folder, "image_encoder"))
    return XLABS_WEIGHT_NAME


def load_tiny_flux_ip_adapter(pipe, folder, weight_name: str = XLABS_WEIGHT_NAME) -> None:
    """``pipe.load_ip_adapter`` on a folder written by :func:`save_tiny_flux_ip_adapter`, in float32,
    with the image encoder saved beside the weights (when the pipeline has none)."""
    if getattr(pipe, "feature_extractor", None) is None:
        # the processor of the tiny encoder's size, up front (diffusers would make an
        # equivalent CLIPImageProcessor, with a warning where torchvision is missing)
        pipe.register_modules(feature_extractor=tiny_image_processor())
    with torch.random.fork_rng(devices=[]), _diffusers_errors_only():
        pipe.load_ip_adapter(os.fspath(folder), weight_name=weight_name,
                             image_encoder_pretrained_model_name_or_path=os.path.join(os.fspath(folder),
                                                                                      "image_encoder"),
                             image_encoder_dtype=pipe.transformer.dtype)


def tiny_flux_pipeline(pipeline_cls=None, seed: int = 0, with_ip_adapter: bool = True,
                       ip_adapter_folder: Optional[str] = None):
    """A pipeline of ``pipeline_cls`` (``FluxPipeline`` or a subclass, default FluxPipeline)
    with tiny random components. THE WEIGHTS ARE RANDOM.

    Args:
        seed: all weights are deterministic functions of it.
        with_ip_adapter: write random XLabs-format IP-Adapter weights and the image
            encoder to a folder and load them with the real ``pipe.load_ip_adapter``;
            without it the pipeline has no adapter and no image encoder, like a fresh checkpoint.
        ip_adapter_folder: where to write the adapter (kept); default a temporary folder,
            deleted once the weights are loaded.
    """
    if pipeline_cls is None:
        from diffusers import FluxPipeline as pipeline_cls
    components = tiny_flux_components(seed)
    image_encoder = components["image_encoder"]
    components["image_encoder"] = components["feature_extractor"] = None   # load_ip_adapter loads them
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    if not with_ip_adapter:
        return pipe
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_transformers_progress())
        folder = ip_adapter_folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="anyms-tiny-flux-ipa-"))
        weight_name = save_tiny_flux_ip_adapter(folder, pipe.transformer, image_encoder, seed=seed + 5)
        load_tiny_flux_ip_adapter(pipe, folder, weight_name)
    return pipe
