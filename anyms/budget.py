"""``anyms generate --max-memory SIZE``: a memory budget, the pipeline's architecture without its
weights, and the plan that fits the budget, chosen before any weights load.

- :func:`parse_size` reads ``8GB``, ``12GiB``, ``8000MB``, ... (strictly: a number and one of
  ``SIZE_UNITS``).
- :func:`skeleton_pipeline` builds the run's U-Net, VAE, text and image encoders and the
  IP-Adapter's layers on the meta device, from the model's configs (its ``model_index.json``
  and each component's config) and the adapter's safetensors header: every parameter's shape
  and dtype, no weights read, no memory taken.
- :func:`plan_memory` runs :func:`anyms.preflight.fit_memory` (the validated estimate; the
  pipeline-level API) on that skeleton for the run's largest image, within the options the
  command line fixed (``--dtype``, ``--offload``, ``--vae-tiling`` are constraints), and returns
  the run with the plan applied, or refuses (UsageError, exit 2) with the smallest budget that
  would fit.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
from typing import Dict, Optional, Sequence, Tuple

from .errors import LoadError, UsageError
from .sizes import SIZE_UNITS, parse_size

__all__ = ["parse_size", "SIZE_UNITS", "skeleton_pipeline", "skeleton_from_modules", "plan_memory"]

GIB = 1024 ** 3


# ------------------------------------------------------------------ the skeleton
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _meta_tensors(shapes: Dict[str, Tuple[Tuple[int, ...], str]]):
    """A module holding one meta parameter per ``name -> (shape, dtype)``, each in a child of its own
    (the layers a sequential offload moves one at a time are single weights here, as in the adapter)."""
    import torch

    root = torch.nn.Module()
    for i, (shape, dtype) in enumerate(shapes.values()):
        leaf = torch.nn.Module()
        leaf.weight = torch.nn.Parameter(torch.empty(shape, dtype=getattr(torch, dtype), device="meta"),
                                         requires_grad=False)
        root.add_module(str(i), leaf)
    return root


def _header_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` of a safetensors file, from its header (no tensor read)."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            out[key] = (tuple(piece.get_shape()), _DTYPES.get(piece.get_dtype(), "float32"))
    return out


def _adapter_shapes(ip: tuple, offline: bool) -> Optional[Dict[str, Tuple[Tuple[int, ...], str]]]:
    """The tensors of the IP-Adapter ``ip`` (``(source, subfolder, weight)``) from its safetensors
    header: a local file, the Hugging Face cache, or (online) the Hub's header range. None for a
    weight file that is not safetensors."""
    source, subfolder, weight = ip
    if not weight.endswith(".safetensors"):
        return None
    local = os.path.join(source, subfolder, weight)
    if os.path.isfile(local):
        return _header_shapes(local)
    filename = "/".join(p for p in (subfolder, weight) if p)
    from huggingface_hub import get_safetensors_metadata, try_to_load_from_cache

    cached = try_to_load_from_cache(source, filename)
    if isinstance(cached, str):
        return _header_shapes(cached)
    if offline:
        raise LoadError(f"cannot read the IP-Adapter {source}/{filename!r} for --max-memory: it is not in the "
                        f"Hugging Face cache and the Hub cannot be reached")
    try:
        meta = get_safetensors_metadata(source, filename)
    except Exception as e:       # any failure of the header request: not found, refused, no network
        raise LoadError(f"cannot read the IP-Adapter {source}/{filename!r}'s header for --max-memory: "
                        f"{type(e).__name__}: {e}") from None
    return {name: (tuple(info.shape), _DTYPES.get(info.dtype, "float32"))
            for file in meta.files_metadata.values() for name, info in file.tensors.items()}


def _structural_adapter_shapes(unet, image_encoder) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """The 4-token IP-Adapter's tensors as ``load_ip_adapter`` lays them out on ``unet``: a key and a
    value projection beside every cross-attention layer's, and an ``ImageProjection``. For an adapter
    whose file has no readable header (the tiny model's is made in memory; a pickled .bin)."""
    import torch
    from diffusers.models.embeddings import ImageProjection

    cross = unet.config.cross_attention_dim
    shapes = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            for which in ("to_k_ip", "to_v_ip"):
                shapes[f"{name}.{which}"] = ((module.to_k.out_features, cross), "float32")
    with torch.device("meta"):
        proj = ImageProjection(image_embed_dim=image_encoder.config.projection_dim, cross_attention_dim=cross,
                               num_image_text_embeds=4)
    for key, value in proj.state_dict().items():
        shapes[f"image_proj.{key}"] = (tuple(value.shape), "float32")
    return shapes


def _meta_component(library: str, class_name: str, model: str, subfolder: str, offline: bool):
    """One component on the meta device, from its config (``model/subfolder/config.json``)."""
    import importlib

    import torch

    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise LoadError(f"cannot estimate the model {model!r}: its {subfolder} is a {library}.{class_name}, which "
                        f"this {library} does not have")
    try:
        if library == "diffusers":
            config = cls.load_config(model, subfolder=subfolder, local_files_only=offline)
            with torch.device("meta"):
                return cls.from_config(config)
        config = cls.config_class.from_pretrained(model, subfolder=subfolder or "", local_files_only=offline)
        with torch.device("meta"):
            return cls(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"cannot read the config of {model!r}'s {subfolder or 'model'} for --max-memory: "
                        f"{type(e).__name__}: {e}") from None


COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")


def skeleton_pipeline(sources: dict, dtype, offline: bool = False):
    """The run's pipeline on the meta device, in ``dtype``: ``unet`` (with the IP-Adapter's layers),
    ``vae``, ``text_encoder``, ``text_encoder_2``, ``image_encoder``, ``vae_scale_factor`` and
    ``default_sample_size``, what :func:`anyms.preflight.fit_memory` and
    :func:`anyms.loading.default_size` read. ``sources``: :attr:`anyms.loading.Run.sources` (an
    SD 1.5 or SDXL model). Reads configs and the adapter's header; no weights."""
    from .loading import TINY_MODEL

    parts: Dict[str, object] = {}
    own: Dict[int, object] = {}            # adapter -> the image encoder of its own (several adapters)
    if sources["model"] == TINY_MODEL:
        from accelerate import init_empty_weights

        from .tiny import tiny_sd15_components, tiny_sdxl_components

        with init_empty_weights():          # parameters on the meta device; the scheduler's tensors are real
            built = (tiny_sdxl_components if sources["arch"] == "sdxl" else tiny_sd15_components)(0)
        parts = {name: built.get(name) for name in COMPONENTS}
        adapter = None
    else:
        from diffusers import DiffusionPipeline

        model = sources["model"]
        try:
            index = DiffusionPipeline.load_config(model, local_files_only=offline)
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot read the model {model!r}'s model_index.json for --max-memory: "
                            f"{type(e).__name__}: {e}") from None
        for name in COMPONENTS:
            entry = index.get(name)
            if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] and entry[1]:
                parts[name] = _meta_component(entry[0], entry[1], model, name, offline)
        adapters = sources.get("ip_adapters") or [sources["ip_adapter"]]
        encoders = sources.get("image_encoders") or [sources.get("image_encoder")]
        if encoders[0]:
            source, subfolder = encoders[0]
            parts["image_encoder"] = _meta_component("transformers", "CLIPVisionModelWithProjection", source,
                                                     subfolder, offline)
        elif parts.get("image_encoder") is None:
            # load_ip_adapter's default: the image_encoder folder beside the adapter's weights
            source, subfolder, _ = sources["ip_adapter"]
            parts["image_encoder"] = _meta_component("transformers", "CLIPVisionModelWithProjection", source,
                                                     "/".join(p for p in (subfolder, "image_encoder") if p), offline)
        # several adapters: each one's tensors, and the encoder of its own where it has another
        adapter = [_adapter_shapes(ip, offline) for ip in adapters]
        first = _encoder_source(adapters[0], encoders[0])
        for i in range(1, len(adapters)):
            source, subfolder = _encoder_source(adapters[i], encoders[i])
            if (source, subfolder) != first:
                own[i] = _meta_component("transformers", "CLIPVisionModelWithProjection", source, subfolder, offline)
    if parts.get("unet") is None or parts.get("vae") is None:
        raise LoadError(f"cannot estimate the model {sources['model']!r} for --max-memory: its model_index.json "
                        f"names no unet or no vae")
    return skeleton_from_modules(parts, dtype, adapter, own)


def _encoder_source(ip: tuple, encoder: Optional[tuple]) -> tuple:
    """``(source, subfolder)`` of an adapter's image encoder: --image-encoder's, else the folder beside
    its weights (load_ip_adapter's default)."""
    if encoder:
        return tuple(encoder)
    return ip[0], "/".join(p for p in (ip[1], "image_encoder") if p)


def skeleton_from_modules(parts: Dict[str, object], dtype, adapter=None, adapter_encoders=None):
    """The pipeline :func:`skeleton_pipeline` returns, from its components (meta-device modules by
    name, ``COMPONENTS``; ``unet`` and ``vae`` required) and the IP-Adapter's tensors (``name ->
    (shape, dtype)``; default: the 4-token adapter's, laid out on ``unet``), in ``dtype``. Several
    adapters: ``adapter`` a list of one such entry (or None) per adapter, and ``adapter_encoders``
    ``{adapter: meta-device image encoder}`` of those with an encoder of their own (what the
    pipeline's ``adapter_image_encoders`` holds)."""
    unet, vae = parts["unet"], parts["vae"]
    adapters = adapter if isinstance(adapter, list) else [adapter]
    tensors = {}
    for i, shapes in enumerate(adapters):
        if shapes is None:
            shapes = _structural_adapter_shapes(unet, parts["image_encoder"])
        tensors.update({(f"{i}.{k}" if len(adapters) > 1 else k): v for k, v in shapes.items()})
    # the adapters' layers belong to the U-Net (its processors and encoder_hid_proj)
    unet.add_module("ip_adapter", _meta_tensors(tensors))
    encoders = dict(adapter_encoders or {})
    for module in list(parts.values()) + list(encoders.values()):
        if module is not None:
            module.to(dtype)
    return types.SimpleNamespace(**{name: parts.get(name) for name in COMPONENTS}, adapter_image_encoders=encoders,
                                 vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
                                 default_sample_size=unet.config.sample_size)


# ------------------------------------------------------------------ the plan
def _size_up(size: int) -> str:
    """``size`` bytes as a --max-memory value that fits it: rounded up to 0.1 GiB, or to a MiB below 1 GiB."""
    if size < GIB:
        return f"{math.ceil(size / 1024 ** 2)}MiB"
    return f"{math.ceil(size / GIB * 10) / 10:.1f}GiB"


def _image_words(plan, article: bool = True) -> str:
    """The image a plan's estimate is of: ``a 1024x1024 generation`` (``1024x1024``), and where its
    upscale pass sets the peak, ``... generation whose --upscale 2 pass to 2048x2048 sets the peak``."""
    height, width, _, upscale = plan.image
    text = f"a {width}x{height} generation" if article else f"{width}x{height}"
    up = plan.estimate.upscale
    if upscale is None or up is None:
        return text
    if up.total >= plan.estimate.generation:
        return f"{text} {'whose' if article else 'with its'} --upscale {up.scale} pass to {up.size[1]}x{up.size[0]}" \
               f"{' sets the peak' if article else ''}"
    return f"{text} (and its --upscale {up.scale} pass)"


def plan_memory(args, run, jobs: Sequence, log=None):
    """The run with the plan of ``args.max_memory`` applied (dtype, offload, VAE tiling, and the
    budget for the record), for the largest of ``jobs``' images (one plan for the whole run: its
    model loads once); prints the choice in one line. Refuses (UsageError naming --max-memory)
    where nothing fits, before any weights load."""
    import torch

    from . import console
    from .job import memory_images
    from .preflight import OFFLOADS, MemoryBudgetError, fit_memory

    budget = parse_size(args.max_memory)
    if run.arch == "flux":
        raise UsageError("--max-memory: the memory estimate models the U-Net pipelines (SD 1.5, SDXL), not FLUX; "
                         "leave --max-memory out (and choose --offload yourself)")
    hub = run.sources.get("hub")
    if hub is not None:
        for what, repo, filename in run.sources["needs"]:
            hub.require(what, repo, filename)
    skeleton = skeleton_pipeline(run.sources, run.dtype, offline=hub is not None and hub.known_offline())
    images = memory_images(skeleton, jobs)          # each distinct image, its upscale pass included
    (height, width, cfg, upscale), more = images[0], images[1:]
    # the options given on the command line are constraints
    fixed = []
    dtype = None
    if args.dtype not in (None, "auto"):
        dtype = run.dtype
        fixed.append(f"--dtype {args.dtype}")
    if args.offload is not None:
        offloads = (args.offload,)
        fixed.append(f"--offload {args.offload}")
    else:      # on a CPU there is nothing to offload to
        offloads = OFFLOADS if run.device.type == "cuda" else ("none",)
    if args.vae_tiling:
        fixed.append("--vae-tiling")
    half = torch.float16 if run.device.type == "cuda" else torch.bfloat16
    try:
        plan = fit_memory(skeleton, height, width, budget, cfg=cfg, upscale=upscale, half_dtype=half, dtype=dtype,
                          offloads=offloads, vae_tiling=True if args.vae_tiling else None, images=more)
    except MemoryBudgetError as e:
        least = e.smallest
        within = f" within {', '.join(fixed)}" if fixed else ""
        weights = (f"; the weights alone take {least.estimate.weights / GIB:.2f} GiB on the device even so"
                   if budget < least.estimate.weights else "")
        smaller = "a smaller size"
        if least.estimate.upscale is not None and least.estimate.upscale.total >= least.estimate.generation:
            smaller = "a smaller size, --upscale or --upscale-tile"
        raise UsageError(f"--max-memory {args.max_memory}: {_image_words(least)} on {run.device} needs an estimated "
                         f"{least.estimate.total / GIB:.2f} GiB at the least ({least.options()}{within})"
                         f"{weights}; give --max-memory {_size_up(least.estimate.total)} or more, or {smaller}"
                         ) from None
    (log or console.info)(f"--max-memory {args.max_memory}: {plan.options()} (estimated peak "
                          f"{plan.estimate.total / GIB:.2f} GiB for {_image_words(plan, article=False)}"
                          f"{', the largest job' if len(images) > 1 else ''})")
    return dataclasses.replace(run, dtype=plan.dtype, offload=plan.offload, vae_tiling=plan.vae_tiling,
                               max_memory=args.max_memory)
