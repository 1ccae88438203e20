"""The peak-memory estimate (anyms.preflight.estimate_peak_memory) against the measured peak,
on the full-size architectures with random weights.

    python benchmarks/bench_memory.py                       # SD 1.5 then SDXL, 512^2, 768^2, 1024^2
    python benchmarks/bench_memory.py --models sdxl --sizes 512 --threads 2
    python benchmarks/bench_memory.py --quick               # smoke run: tiny models, 64^2 and 128^2

What runs, per (model, size), in its own subprocess (one at a time, so that one measurement's
memory never overlaps another's): the U-Net and VAE built from the published configs
(stabilityai/stable-diffusion-xl-base-1.0 as in bench_pipeline.py; runwayml/stable-diffusion-v1-5
below) with RANDOM weights, in --dtype (bf16 by default), on the CPU; random IP-Adapter layers
(4 tokens, as bench_pipeline.py installs them) converted by anyms.apply_anyms for 5 subjects in
overwrite mode; then ONE denoising step of the U-Net on the classifier-free-guidance batch
(B = 2), then the VAE decode of the batch-1 latent, without and with VAE tiling. The text and
image encoders are NOT built: the step gets random prompt embeddings and random post-projection
image embeddings (an identity projection), so the weights counted are the U-Net's (with the
IP-Adapter's projections) and the VAE's, on both sides of the comparison.

Measured: the CPU allocator's peak running total (torch.profiler allocation events,
profile_memory=True, every allocation including those inside C++ kernels; the same method as
tests/anyms/test_preflight.py), above what was live before, separately for the step and for
each decode; the measured peak of the generation is the weights + the step's inputs + the
larger of those two. Estimated: estimate_peak_memory on a pipeline of these two components
(offload "none", cfg=True). Each row gives both totals, their ratio, and the activation terms
side by side (estimate.unet vs the step's peak, estimate.decode vs the decode's peak).

FLUX (``--models flux``): FLUX.1-dev's transformer is 12 B parameters (24 GB in bf16 for it
alone), and its T5-XXL encoder 4.8 B, more than this machine's memory. What runs is FLUX.1-dev's
architecture at its full width with fewer blocks: the transformer (width 3072 = 24 heads of 128,
joint attention dim 4096, pooled 768, guidance embedding, rotary axes 16/56/56) with
``--flux-blocks D S`` double- and single-stream blocks (default 2 and 4; FLUX.1 has 19 and 38),
XLabs-format IP-Adapter layers (a 4-token projection of 768-d image embeddings, ``to_k_ip`` /
``to_v_ip`` in every double block) converted by anyms.apply_anyms for the 5 subjects; T5-XXL's
encoder (d_model 4096, 64 heads, d_ff 10240, gated GELU) with ``--t5-layers`` layers (default 2
of 24); CLIP ViT-L/14's text encoder and image encoder and FLUX.1's VAE (16 latent channels, no
quant convs) whole. All built from the published configs with random weights. Measured, each as
above: the encoders (T5 over 512 tokens, CLIP text over 77, the image encoder on one 224^2
image: the largest of the three peaks), ONE transformer step on batch 1 (FLUX.1-dev is
guidance-distilled), the VAE decode untiled and tiled; the measured peak is the weights + the
step's inputs + the largest of those. Estimated: estimate_peak_memory on a pipeline of the same
five components. The activation peaks do not depend on the number of blocks (one block's
transients; the blocks run one after another), the weights are counted on both sides.

Rows go to benchmarks/results/memory_<cpu>_<commit>.csv (appended, one per measurement as it
ends); progress to --log (default: anyms_bench_memory.log in the temporary folder). --reestimate CSV
recomputes the estimated columns with the current estimate (no step runs; ``estimate_commit``
names the tree), --table CSV prints the Markdown table of docs/memory.md.

--fits runs nothing: from the estimate alone, the largest square side within 8/12/16/24 GiB for SDXL
in fp16 with its default IP-Adapter (text and image encoders included, from the published configs on
the meta device, as ``anyms generate --max-memory`` builds a model): a plain IP-Adapter (one image),
diffusers' masked IP-Adapter and AnyMS (3 subjects), each with offload none and model, VAE tiling off
and on. The three differ where the estimate says they do: the cross-attention layer's peak (the op's
peak over its output from the kernel benchmark's committed CSV, plus what the layer holds beside it:
``CROSS_ATTENTION_LIVE``) against the feed-forward's (21 values per token and channel), and diffusers'
image-size float32 masks, held through the steps.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _env import git_commit, machine_name  # noqa: E402
from bench_pipeline import (FIVE_BOXES, IP_TOKENS, QUICK_UNET_CONFIG, QUICK_VAE_CONFIG,  # noqa: E402
                            SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, _randomise, _tensor_bytes, build_unet, build_vae,
                            cpu_alloc_peak, install_ip_adapter, versions)

# runwayml/stable-diffusion-v1-5, unet/config.json (the keys that differ from diffusers' defaults).
SD15_UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=64,
)
# runwayml/stable-diffusion-v1-5, vae/config.json: SDXL's architecture, 512^2 tiles.
SD15_VAE_CONFIG = dict(SDXL_VAE_CONFIG, sample_size=512, scaling_factor=0.18215, force_upcast=True)
QUICK_SD15_UNET_CONFIG = dict(SD15_UNET_CONFIG, block_out_channels=[32, 64, 64, 64], attention_head_dim=2,
                              layers_per_block=1, norm_num_groups=8, cross_attention_dim=64)

# black-forest-labs/FLUX.1-dev: transformer/config.json (num_layers 19, num_single_layers 38: the
# block counts are --flux-blocks here), vae/config.json; google/t5-v1_1-xxl (text_encoder_2: the
# encoder, num_layers 24: --t5-layers here); openai/clip-vit-large-patch14 (text_encoder, and the
# image encoder of XLabs-AI/flux-ip-adapter).
FLUX_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                               pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE_CONFIG = dict(SDXL_VAE_CONFIG, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False)
T5_XXL_CONFIG = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False)
CLIP_L_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                          hidden_act="quick_gelu")
CLIP_L_VISION_CONFIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
FLUX_IP_TOKENS = 4         # XLabs-AI/flux-ip-adapter
# --quick: the same structures at tiny widths (head dim 128, as FLUX's rotary axes need)
QUICK_FLUX = dict(transformer=dict(FLUX_TRANSFORMER_CONFIG, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=32),
                  t5=dict(T5_XXL_CONFIG, d_model=64, d_kv=16, d_ff=128, num_heads=4),
                  clip=dict(CLIP_L_TEXT_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=32),
                  vision=dict(CLIP_L_VISION_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, projection_dim=32),
                  vae=dict(QUICK_VAE_CONFIG, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                           use_quant_conv=False, use_post_quant_conv=False))
FULL_FLUX = dict(transformer=FLUX_TRANSFORMER_CONFIG, t5=T5_XXL_CONFIG, clip=CLIP_L_TEXT_CONFIG,
                 vision=CLIP_L_VISION_CONFIG, vae=FLUX_VAE_CONFIG)
FLUX_TEXT_TOKENS = 512     # FluxPipeline's max_sequence_length

MODELS = {"sdxl": (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG), "sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG),
          "flux": None}
QUICK_MODELS = {"sdxl": (QUICK_UNET_CONFIG, QUICK_VAE_CONFIG), "sd15": (QUICK_SD15_UNET_CONFIG, QUICK_VAE_CONFIG)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
BATCH = 2
GIB = 1024 ** 3
FIELDS = ["model", "size", "vae_tiling", "dtype", "threads", "measured_bytes", "estimated_bytes", "ratio",
          "weights_bytes", "estimated_weights_bytes", "inputs_bytes", "step_peak_bytes", "estimated_unet_bytes",
          "decode_peak_bytes", "estimated_decode_bytes", "step_s", "decode_s", "method", "text_encoders",
          "cpu", "torch", "diffusers", "commit", "date", "architecture", "encode_peak_bytes",
          "estimated_encode_bytes"]


def step_inputs(unet, size: int, dtype: torch.dtype, seed: int = 2) -> dict:
    """The CFG batch's inputs, 5 subjects' post-projection image embeddings; SDXL's added
    conditioning where the U-Net has it."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    added = {"image_embeds": [rnd(BATCH, len(FIVE_BOXES), IP_TOKENS, cfg.cross_attention_dim)]}
    if cfg.addition_embed_type == "text_time":
        added["text_embeds"] = rnd(BATCH, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
        added["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * BATCH, dtype=dtype)
    return dict(sample=rnd(BATCH, cfg.in_channels, size // 8, size // 8), timestep=torch.tensor(500),
                encoder_hidden_states=rnd(BATCH, 77, cfg.cross_attention_dim), added_cond_kwargs=added)


def measure_one(model: str, size: int, dtype_name: str, threads: int, quick: bool) -> list:
    """One (model, size): the step once, the decode untiled and tiled. Returns the CSV rows."""
    from anyms.layout import Layout
    from anyms.preflight import estimate_peak_memory
    from anyms.processor import apply_anyms

    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    unet_config, vae_config = (QUICK_MODELS if quick else MODELS)[model]
    unet = build_unet(unet_config, "cpu", dtype)
    install_ip_adapter(unet)
    unet.to(dtype)
    apply_anyms(unet, Layout(FIVE_BOXES, (size // 8, size // 8), mode="overwrite"))
    vae = build_vae(vae_config, "cpu", dtype)
    kwargs = step_inputs(unet, size, dtype)
    weights = _tensor_bytes([t for m in (unet, vae) for t in list(m.parameters()) + list(m.buffers())])
    inputs = _tensor_bytes([kwargs["sample"], kwargs["encoder_hidden_states"]]
                           + [t for v in kwargs["added_cond_kwargs"].values()
                              for t in (v if isinstance(v, list) else [v])])
    gc.collect()
    t0 = time.perf_counter()
    with torch.no_grad():
        step_peak, out = cpu_alloc_peak(lambda: unet(**kwargs).sample)
    step_s = time.perf_counter() - t0
    latents = (out[:1] / vae.config.scaling_factor).contiguous()
    del out
    pipe = types.SimpleNamespace(unet=unet, vae=vae)     # no text or image encoders: not built here
    rows = []
    for tiled in (False, True):
        (vae.enable_tiling if tiled else vae.disable_tiling)()
        gc.collect()
        t0 = time.perf_counter()
        with torch.no_grad():
            decode_peak, image = cpu_alloc_peak(lambda: vae.decode(latents).sample)
        decode_s = time.perf_counter() - t0
        del image
        est = estimate_peak_memory(pipe, size, size, cfg=True, vae_tiling=tiled)
        measured = weights + inputs + max(step_peak, decode_peak)
        v = versions()
        rows.append(dict(
            model=model + ("-quick" if quick else ""), size=size, vae_tiling=tiled, dtype=dtype_name,
            threads=threads, measured_bytes=measured, estimated_bytes=est.total,
            ratio=round(est.total / measured, 4), weights_bytes=weights, estimated_weights_bytes=est.weights,
            inputs_bytes=inputs, step_peak_bytes=step_peak, estimated_unet_bytes=est.unet,
            decode_peak_bytes=decode_peak, estimated_decode_bytes=est.decode, step_s=round(step_s, 2),
            decode_s=round(decode_s, 2), method="weights+inputs + torch.profiler CPU allocator peak",
            text_encoders="not built (random prompt embeddings)", cpu=machine_name("cpu"), torch=v["torch"],
            diffusers=v["diffusers"], commit=git_commit(), date=_dt.datetime.utcnow().isoformat(timespec="seconds")))
    return rows

def measure_vae_encode(sizes, dtype_name: str, threads: int, quick: bool) -> list:
    """The VAE encode of one image (SD 1.5's VAE: SDXL's structure, 512 px tiles), untiled and tiled,
    per size: the CPU allocator's peak of ``vae.encode`` (the image made inside the measured call)
    against :func:`anyms.preflight.vae_encode_bytes`, the upscale pass's encode term."""
    from anyms.preflight import vae_encode_bytes

    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    vae = build_vae(QUICK_VAE_CONFIG if quick else SD15_VAE_CONFIG, "cpu", dtype)
    rows = []
    for size in sizes:
        for tiled in (False, True):
            (vae.enable_tiling if tiled else vae.disable_tiling)()
            gc.collect()
            t0 = time.perf_counter()
            with torch.no_grad():
                peak, _ = cpu_alloc_peak(lambda: vae.encode(torch.randn(1, 3, size, size).to(dtype)).latent_dist.mean)
            est = vae_encode_bytes(vae, (size, size), tiled, torch.empty((), dtype=dtype).element_size())
            rows.append(dict(size=size, vae_tiling=tiled, dtype=dtype_name, threads=threads, measured_bytes=peak,
                             estimated_bytes=est, ratio=round(est / peak, 4), seconds=round(time.perf_counter() - t0, 1),
                             cpu=machine_name("cpu"), commit=git_commit()))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _allocate(module, dtype):
    """``module`` (built on the meta device) allocated on the CPU in ``dtype``, uninitialised, but for
    CLIP's ``position_ids`` buffers (indices, which to_empty leaves as garbage)."""
    module = module.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return module


def _materialise(module, dtype, seed: int):
    module = _allocate(module, dtype)
    _randomise(module, seed)
    return module


def flux_components(dtype: torch.dtype, quick: bool, blocks=(2, 4), t5_layers: int = 2, materialise=True):
    """FLUX.1-dev's five components at full width (``quick``: tiny widths) with ``blocks`` (double,
    single) transformer blocks and ``t5_layers`` T5 layers, random weights (``materialise=False``:
    allocated, never written, for --reestimate); the transformer carries a random XLabs-format
    IP-Adapter. Returns a namespace with the pipeline's attribute names."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers import T5Config, T5EncoderModel

    cfg = QUICK_FLUX if quick else FULL_FLUX
    tcfg = dict(cfg["transformer"], num_layers=blocks[0], num_single_layers=blocks[1])
    width = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    vision = CLIPVisionConfig(**cfg["vision"])
    with torch.device("meta"):
        parts = dict(transformer=FluxTransformer2DModel(**tcfg), vae=AutoencoderKL(**cfg["vae"]),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["clip"])),
                     text_encoder_2=T5EncoderModel(T5Config(**dict(cfg["t5"], num_layers=t5_layers))),
                     image_encoder=CLIPVisionModelWithProjection(vision))
        proj = MultiIPAdapterImageProjection([ImageProjection(image_embed_dim=vision.projection_dim,
                                                              cross_attention_dim=tcfg["joint_attention_dim"],
                                                              num_image_text_embeds=FLUX_IP_TOKENS)])
        ip = {name: FluxIPAdapterAttnProcessor(width, tcfg["joint_attention_dim"], num_tokens=(FLUX_IP_TOKENS,),
                                               scale=1.0)
              for name in parts["transformer"].attn_processors if name.startswith("transformer_blocks.")}
    build = _materialise if materialise else (lambda m, d, seed: _allocate(m, d))
    out = {name: build(m, dtype, seed) for seed, (name, m) in enumerate(parts.items())}
    transformer = out["transformer"]
    # as FluxPipeline.load_ip_adapter lays it out: the projection, and one processor per double block
    transformer.encoder_hid_proj = build(proj, dtype, 7)
    transformer.register_to_config(encoder_hid_dim_type="ip_image_proj")
    procs = dict(transformer.attn_processors)
    procs.update({name: build(p, dtype, 8 + i) for i, (name, p) in enumerate(ip.items())})
    transformer.set_attn_processor(procs)
    return types.SimpleNamespace(**out)


def flux_step_inputs(transformer, size: int, dtype: torch.dtype, seed: int = 2) -> dict:
    """One step's inputs, batch 1, as FluxPipeline hands them to the transformer: packed latents,
    512 T5 tokens, the pooled CLIP embedding, the ids, the guidance, 5 subjects' image embeddings."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    h = w = size // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    image_dim = transformer.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
    return dict(hidden_states=rnd(1, h * w, cfg.in_channels), encoder_hidden_states=rnd(1, FLUX_TEXT_TOKENS,
                                                                                          cfg.joint_attention_dim),
                pooled_projections=rnd(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5], dtype=dtype),
                guidance=torch.tensor([3.5], dtype=dtype), img_ids=img_ids.reshape(-1, 3).to(dtype),
                txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3, dtype=dtype),
                joint_attention_kwargs={"ip_adapter_image_embeds": [rnd(1, len(FIVE_BOXES), image_dim)]})


def measure_flux(size: int, dtype_name: str, threads: int, quick: bool, blocks, t5_layers: int) -> list:
    """FLUX at ``size``: the encoders, one transformer step, the decode untiled and tiled. CSV rows."""
    from anyms.flux import flux_layout
    from anyms.preflight import estimate_peak_memory
    from anyms.processor import apply_anyms

    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    pipe = flux_components(dtype, quick, blocks, t5_layers)
    transformer, vae = pipe.transformer, pipe.vae
    layout = flux_layout(FIVE_BOXES, size, size)
    layout.prepare(torch.device("cpu"))
    apply_anyms(transformer, layout)
    modules = [transformer, vae, pipe.text_encoder, pipe.text_encoder_2, pipe.image_encoder]
    weights = _tensor_bytes([t for m in modules for t in list(m.parameters()) + list(m.buffers())])
    g = torch.Generator().manual_seed(5)
    t5_ids = torch.randint(0, pipe.text_encoder_2.config.vocab_size, (1, FLUX_TEXT_TOKENS), generator=g)
    clip_ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (1, 77), generator=g)
    pixels = torch.randn(1, 3, pipe.image_encoder.config.image_size, pipe.image_encoder.config.image_size,
                         generator=g).to(dtype)
    gc.collect()
    t0 = time.perf_counter()
    with torch.no_grad():
        encode_peak = max(cpu_alloc_peak(lambda: pipe.text_encoder_2(t5_ids)[0])[0],
                          cpu_alloc_peak(lambda: pipe.text_encoder(clip_ids, output_hidden_states=False))[0],
                          cpu_alloc_peak(lambda: pipe.image_encoder(pixels).image_embeds)[0])
    encode_s = time.perf_counter() - t0
    kwargs = flux_step_inputs(transformer, size, dtype)
    inputs = _tensor_bytes([t for k, v in kwargs.items() if k != "joint_attention_kwargs"
                            for t in ([v] if torch.is_tensor(v) else [])]
                           + kwargs["joint_attention_kwargs"]["ip_adapter_image_embeds"])
    gc.collect()
    t0 = time.perf_counter()
    with torch.no_grad():
        step_peak, out = cpu_alloc_peak(lambda: transformer(**kwargs).sample)
    step_s = time.perf_counter() - t0
    # FluxPipeline's unpacking and scaling, then the decode of the 16-channel latent
    h = w = size // 16
    latents = out.view(1, h, w, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, -1, 2 * h, 2 * w)
    latents = (latents / vae.config.scaling_factor + vae.config.shift_factor).contiguous()
    del out
    rows = []
    architecture = (f"FLUX.1-dev {'tiny widths' if quick else 'full width'}, {blocks[0]}+{blocks[1]} blocks, "
                    f"T5 {t5_layers} layers")
    for tiled in (False, True):
        (vae.enable_tiling if tiled else vae.disable_tiling)()
        gc.collect()
        t0 = time.perf_counter()
        with torch.no_grad():
            decode_peak, image = cpu_alloc_peak(lambda: vae.decode(latents).sample)
        decode_s = time.perf_counter() - t0
        del image
        est = estimate_peak_memory(pipe, size, size, vae_tiling=tiled)
        measured = weights + inputs + max(step_peak, decode_peak, encode_peak)
        v = versions()
        rows.append(dict(
            model="flux" + ("-quick" if quick else ""), size=size, vae_tiling=tiled, dtype=dtype_name,
            threads=threads, measured_bytes=measured, estimated_bytes=est.total,
            ratio=round(est.total / measured, 4), weights_bytes=weights, estimated_weights_bytes=est.weights,
            inputs_bytes=inputs, step_peak_bytes=step_peak, estimated_unet_bytes=est.unet,
            decode_peak_bytes=decode_peak, estimated_decode_bytes=est.decode, step_s=round(step_s, 2),
            decode_s=round(decode_s, 2), method="weights+inputs + torch.profiler CPU allocator peak",
            text_encoders=f"T5 {t5_layers} layers over {FLUX_TEXT_TOKENS} tokens, CLIP text, image encoder: "
                          f"{encode_s:.1f} s", cpu=machine_name("cpu"), torch=v["torch"],
            diffusers=v["diffusers"], commit=git_commit(), date=_dt.datetime.utcnow().isoformat(timespec="seconds"),
            architecture=architecture, encode_peak_bytes=encode_peak, estimated_encode_bytes=est.encode))
    return rows


def reestimate(path: str) -> None:
    """Recompute the estimated columns of a results CSV with this tree's estimate_peak_memory (a
    pure function of the configs, size and options: no step runs); the measured columns stay, and
    ``estimate_commit`` names the tree. The models are allocated uninitialised (never touched)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from anyms.preflight import estimate_peak_memory

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    pipes = {}
    for r in rows:
        key = (r["model"], r["dtype"], r.get("architecture"))
        if key not in pipes and r["model"].startswith("flux"):
            found = re.search(r"(\d+)\+(\d+) blocks, T5 (\d+) layers", r["architecture"])
            pipes[key] = flux_components(DTYPES[r["dtype"]], r["model"].endswith("-quick"),
                                         (int(found[1]), int(found[2])), int(found[3]), materialise=False)
        if key not in pipes:
            model, quick = r["model"].removesuffix("-quick"), r["model"].endswith("-quick")
            unet_config, vae_config = (QUICK_MODELS if quick else MODELS)[model]
            with torch.device("meta"):
                unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
            unet = unet.to(DTYPES[r["dtype"]]).to_empty(device="cpu")
            install_ip_adapter(unet)
            pipes[key] = types.SimpleNamespace(unet=unet.to(DTYPES[r["dtype"]]),
                                               vae=vae.to(DTYPES[r["dtype"]]).to_empty(device="cpu"))
        size, tiled = int(r["size"]), r["vae_tiling"] == "True"
        est = estimate_peak_memory(pipes[key], size, size, cfg=True, vae_tiling=tiled)
        r.update(estimated_bytes=est.total, ratio=round(est.total / int(r["measured_bytes"]), 4),
                 estimated_weights_bytes=est.weights, estimated_unet_bytes=est.unet,
                 estimated_decode_bytes=est.decode, estimate_commit=git_commit())
        if r.get("estimated_encode_bytes"):
            r["estimated_encode_bytes"] = est.encode
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + ["estimate_commit"])
        w.writeheader()
        w.writerows(rows)


def table(path: str) -> str:
    """The results CSV as a Markdown table."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    g = lambda x: f"{int(x) / GIB:.3f}"  # noqa: E731
    encoders = any(r.get("encode_peak_bytes") for r in rows)     # FLUX rows: the text encoders' term too
    step = "transformer step" if all(r["model"].startswith("flux") for r in rows) else "U-Net step"
    lines = ["| model | size | VAE tiling | measured GiB | estimated GiB | est / measured "
             f"| {step}: measured / est GiB | decode: measured / est GiB |"
             + (" encoders: measured / est GiB |" if encoders else "") + " weights GiB |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if encoders else "")]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']}^2 | {'on' if r['vae_tiling'] == 'True' else 'off'} | "
                     f"{g(r['measured_bytes'])} | {g(r['estimated_bytes'])} | {float(r['ratio']):.3f} | "
                     f"{g(r['step_peak_bytes'])} / {g(r['estimated_unet_bytes'])} | "
                     f"{g(r['decode_peak_bytes'])} / {g(r['estimated_decode_bytes'])} | "
                     + (f"{g(r['encode_peak_bytes'] or 0)} / {g(r['estimated_encode_bytes'] or 0)} | " if encoders
                        else "")
                     + f"{g(r['weights_bytes'])} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ --fits: the largest size in a budget
# stabilityai/stable-diffusion-xl-base-1.0's text encoders (text_encoder/config.json: CLIP ViT-L/14's;
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14's, with its projection), and the image encoder of the
# default adapter, h94/IP-Adapter/sdxl_models/image_encoder/config.json (OpenCLIP ViT-bigG/14's vision tower).
SDXL_TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                projection_dim=768)
SDXL_TEXT_ENCODER_2_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                  projection_dim=1280)
SDXL_IMAGE_ENCODER_CONFIG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                                 image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu")
# The op-level peaks (peak allocated during one call / its output; fp32, CPU, 64^2 grid, S = 2, 5, 32, T = 16)
# come from the kernel benchmark's committed run; the largest over its rows is taken.
OP_PEAKS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "region_attention_cpu_AMD-EPYC_2e1f2abebb_t1.csv")
# What a cross-attention layer holds beside the op, in values per token and channel: the transformer's input
# and its projection, the block's residual stream and its norm's output (four of the five the feed-forward's
# 21 count beside GEGLU), and the layer's query projection.
CROSS_ATTENTION_LIVE = 5
# diffusers' plain IP-Adapter processor (one image, no mask), from its code: at ``hidden_states + scale *
# ip_hidden_states`` the text branch's output, the image branch's, the scaled copy and the sum: 4 outputs.
PLAIN_OP_PEAK = 4.0
# diffusers' masked sum in float16: IPAdapterMaskProcessor.downsample makes the [B, N, C] mask in float32
# (the masks' dtype), two outputs' bytes, before ``.to(query.dtype)``: one output more than the fp32 op peak.
MASK_FP16_EXTRA = 1.0
FIT_SUBJECTS = 3
FIT_BUDGETS_GIB = (8, 12, 16, 24)
FIT_FIELDS = ["variant", "subjects", "offload", "vae_tiling", "budget_gib", "max_side", "estimated_bytes",
              "weights_bytes", "unet_bytes", "decode_bytes", "attention_values", "conditioning_bytes", "op_peak",
              "dtype", "cfg", "batch", "step", "status", "diffusers", "commit", "date"]


def sdxl_skeleton(dtype: torch.dtype):
    """SDXL with its default IP-Adapter (ip-adapter_sdxl, 4 tokens, the ViT-bigG image encoder) on the meta
    device, from the published configs: what ``anyms generate --max-memory`` builds from a model's files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from anyms.budget import skeleton_from_modules

    with torch.device("meta"):
        parts = dict(unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), vae=AutoencoderKL(**SDXL_VAE_CONFIG),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)),
                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
                     image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**SDXL_IMAGE_ENCODER_CONFIG)))
    return skeleton_from_modules(parts, dtype)


def op_peaks(path: str = OP_PEAKS_CSV) -> dict:
    """The largest ``peak_over_out`` of each peer in the kernel benchmark's CSV."""
    peaks: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("peak_over_out"):
                peaks[r["peer"]] = max(peaks.get(r["peer"], 0.0), float(r["peak_over_out"]))
    return peaks


def fit_variants(peaks: dict) -> dict:
    """Per variant: subjects, the cross-attention op's peak over its output, values per token and channel
    held at the layer, and the conditioning kept on the device (bytes, a function of the image side)."""
    return {
        "plain": dict(subjects=1, op_peak=PLAIN_OP_PEAK, masks=False),
        "masked": dict(subjects=FIT_SUBJECTS, op_peak=peaks["B0"] + MASK_FP16_EXTRA, masks=True),
        "anyms": dict(subjects=FIT_SUBJECTS, op_peak=peaks["ours"], masks=False),
    }


def fits(out: str, step: int = 64, sides=None) -> list:
    """The largest square side (a multiple of ``step``) whose estimated peak is within each budget: SDXL
    in float16 (its VAE decodes in float32, as diffusers upcasts it), CFG on, batch 1, per variant
    (``fit_variants``), offload none / model, VAE tiling off / on. A side counts only if every smaller one
    fits too. Rows to ``out`` (CSV); returns them."""
    import diffusers

    from anyms.preflight import MAX_SIDE, estimate_peak_memory

    dtype = torch.float16
    pipe = sdxl_skeleton(dtype)
    variants = fit_variants(op_peaks())
    sides = sides or range(step, MAX_SIDE + 1, step)
    rows = []
    for name, v in variants.items():
        attention_values = CROSS_ATTENTION_LIVE + v["op_peak"]
        for offload in ("none", "model"):
            for tiled in (False, True):
                totals = []
                for side in sides:
                    # diffusers' masks: one float32 image-size mask per subject, on the device through the steps
                    masks = v["subjects"] * side * side * 4 if v["masks"] else 0
                    est = estimate_peak_memory(pipe, side, side, cfg=True, offload=offload, vae_tiling=tiled,
                                               dtype=dtype, attention_values=attention_values,
                                               conditioning_bytes=masks)
                    totals.append((side, est, masks))
                for gib in FIT_BUDGETS_GIB:
                    best = None
                    for side, est, masks in totals:
                        if est.total > gib * GIB:
                            break
                        best = (side, est, masks)
                    side, est, masks = best if best else (0, None, 0)
                    rows.append(dict(
                        variant=name, subjects=v["subjects"], offload=offload, vae_tiling=tiled, budget_gib=gib,
                        max_side=side, estimated_bytes=est.total if est else "", weights_bytes=est.weights if est else "",
                        unet_bytes=est.unet if est else "", decode_bytes=est.decode if est else "",
                        attention_values=round(attention_values, 3), conditioning_bytes=masks,
                        op_peak=round(v["op_peak"], 3), dtype="float16", cfg=True, batch=1, step=step,
                        status="estimated, not yet measured on a GPU", diffusers=diffusers.__version__,
                        commit=git_commit(), date=_dt.datetime.utcnow().isoformat(timespec="seconds")))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIT_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return rows


def fits_table(rows: list, tiled: bool = True) -> str:
    """The rows of one VAE tiling setting as a Markdown table: a row per variant and offload, a column per
    budget (the largest side, ``-`` where not even the smallest fits)."""
    label = {"plain": "plain IP-Adapter (1 image)", "masked": f"diffusers' masked IP-Adapter (S={FIT_SUBJECTS})",
             "anyms": f"AnyMS (S={FIT_SUBJECTS})"}
    head = "| method | offload | " + " | ".join(f"{g} GiB" for g in FIT_BUDGETS_GIB) + " |"
    lines = [head, "|---|---|" + "---|" * len(FIT_BUDGETS_GIB)]
    for variant in label:
        for offload in ("none", "model"):
            cells = []
            for gib in FIT_BUDGETS_GIB:
                r = next(r for r in rows if r["variant"] == variant and r["offload"] == offload
                         and str(r["vae_tiling"]) == str(tiled) and int(r["budget_gib"]) == gib)
                cells.append(f"{r['max_side']}^2" if int(r["max_side"]) else "-")
            lines.append(f"| {label[variant]} | {offload} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log(path: str, line: str) -> None:
    stamp = _dt.datetime.utcnow().strftime("%H:%M:%S")
    with open(path, "a") as f:
        f.write(f"{stamp} {line}\n")
    print(f"{stamp} {line}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=sorted(MODELS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 768, 1024])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flux-blocks", nargs=2, type=int, default=[2, 4], metavar=("DOUBLE", "SINGLE"),
                    help="FLUX: the transformer's double- and single-stream blocks (FLUX.1: 19 38)")
    ap.add_argument("--t5-layers", type=int, default=2, help="FLUX: T5-XXL encoder layers (FLUX.1: 24)")
    ap.add_argument("--quick", action="store_true", help="tiny models of the same structure (smoke run)")
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/memory_<cpu>_<commit>.csv)")
    ap.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "anyms_bench_memory.log"))
    ap.add_argument("--reestimate", metavar="CSV", help="recompute a results CSV's estimated columns with this tree")
    ap.add_argument("--table", metavar="CSV", help="print a results CSV as a Markdown table")
    ap.add_argument("--fits", nargs="?", const="", default=None, metavar="CSV",
                    help="no measurement: the largest square side (multiples of 64) within 8/12/16/24 GiB by the "
                         "estimate, SDXL fp16, plain IP-Adapter / diffusers' masked IP-Adapter / AnyMS, offload "
                         "none / model, VAE tiling off / on; CSV (default benchmarks/results/fits_sdxl_fp16.csv), "
                         "then Markdown tables")
    ap.add_argument("--vae-encode", action="store_true",
                    help="measure only the VAE encode (the upscale pass's encode term) at --sizes, untiled and "
                         "tiled, against its estimate; prints one JSON row per measurement")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # MODEL:SIZE, the subprocess's job
    args = ap.parse_args(argv)
    if args.vae_encode:
        measure_vae_encode(args.sizes, args.dtype, args.threads, args.quick)
        return 0
    if args.fits is not None:
        out = args.fits or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fits_sdxl_fp16.csv")
        rows = fits(out)
        for tiled in (True, False):
            print(f"\nSDXL fp16, CFG, batch 1, VAE tiling {'on' if tiled else 'off'} (estimated, not yet measured on a "
                  f"GPU):\n")
            print(fits_table(rows, tiled))
        print(f"\nrows: {out}")
        return 0
    if args.reestimate:
        reestimate(args.reestimate)
    if args.table or args.reestimate:
        print(table(args.table or args.reestimate))
        return 0
    for s in args.sizes:
        if s <= 0 or s % 64:
            ap.error(f"--sizes: {s} is not a positive multiple of 64")
    if args.quick and args.sizes == [512, 768, 1024]:
        args.sizes = [64, 128]
    if args.one:
        model, size = args.one.split(":")
        if model == "flux":
            rows = measure_flux(int(size), args.dtype, args.threads, args.quick, args.flux_blocks, args.t5_layers)
        else:
            rows = measure_one(model, int(size), args.dtype, args.threads, args.quick)
        print(json.dumps(rows))
        return 0
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", machine_name("cpu")).strip("-")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"memory_{cpu}_{git_commit()}.csv")
    new = not os.path.exists(out)
    for model in args.models:
        for size in sorted(args.sizes):
            _log(args.log, f"start {model} {size}^2 {args.dtype} threads={args.threads}")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{model}:{size}", "--dtype", args.dtype,
                   "--threads", str(args.threads), "--flux-blocks", *map(str, args.flux_blocks),
                   "--t5-layers", str(args.t5_layers)] + (["--quick"] if args.quick else [])
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                _log(args.log, f"FAILED {model} {size}^2 (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
                continue
            rows = json.loads(proc.stdout.strip().splitlines()[-1])
            with open(out, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                    new = False
                w.writerows(rows)
            for r in rows:
                _log(args.log, f"{r['model']} {size}^2 tiling={r['vae_tiling']}: measured "
                               f"{r['measured_bytes'] / GIB:.3f} GiB, estimated {r['estimated_bytes'] / GIB:.3f} GiB, "
                               f"ratio {r['ratio']:.3f} (step {r['step_peak_bytes'] / GIB:.3f} vs est "
                               f"{r['estimated_unet_bytes'] / GIB:.3f}; decode {r['decode_peak_bytes'] / GIB:.3f} "
                               f"vs est {r['estimated_decode_bytes'] / GIB:.3f}; {r['step_s']} s + {r['decode_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
