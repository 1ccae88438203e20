"""The ``anyms`` command: ``anyms generate`` (real models) and ``anyms demo`` (offline, tiny model).

    anyms demo
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:0.05,0.3,0.5,0.95 --subject cat.png:0.5,0.3,0.95,0.95:0.8 --out sofa.png
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:mask=dog_mask.png --subject cat.png:mask=cat_mask.png:0.8 --out sofa.png

Bad input (a malformed subject or layout file, a box outside [0, 1], an image or mask
that cannot be read, an empty mask, masks of another size than --height/--width, a
size the pipeline cannot make, ...) prints one line naming the
argument, without a traceback, and exits with status 2. A model or adapter that
cannot be loaded exits with status 1.

The layout file's schema is ``LAYOUT_SCHEMA`` below (also in ``anyms generate --help``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "parse_subject", "read_layout_file", "build_parser"]

MODES = ("overwrite", "sum")
PRIORITIES = ("order", "smaller_on_top")
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_IP_ADAPTER = "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
DEFAULT_SD15_IP_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
DEFAULT_FLUX_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_FLUX_IP_ADAPTER = "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors"
DEFAULT_FLUX_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
ARCHS = ("sdxl", "sd15", "flux")
DTYPES = ("auto", "float32", "float16", "bfloat16")

LAYOUT_SCHEMA = """\
layout file (--layout FILE.json); image paths are relative to the file:
  {
    "prompt": "a dog and a cat on a sofa",    optional; the PROMPT argument wins
    "mode": "overwrite",                      optional; --mode wins
    "priority": "order",                      optional; --priority wins
    "subjects": [                             required, at least one
      {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95], "scale": 1.0, "label": "dog"},
      {"image": "cat.png", "mask": "cat_mask.png"}
    ]
  }
Each subject needs "box" or "mask" (or both: the mask is the region, the box only
places the label in the layout picture). "box" is [x0, y0, x1, y1] normalised to
the image (x right, y down, x1 > x0, y1 > y0). "mask" is an image file (PNG: any
nonzero pixel is inside) of the generated image's size; without --height/--width
the image takes the masks' size. A token is in a region when its cell meets the
box or holds a mask pixel. "scale" (default 1.0) and "label" (default: the file
name) are optional. Later subjects are on top where regions overlap ("priority":
"smaller_on_top" puts smaller regions on top). No other keys are allowed.
"""

LAYOUT_KEYS = {"prompt", "mode", "priority", "subjects"}
SUBJECT_KEYS = {"image", "box", "mask", "scale", "label"}
SUBJECT_FORMS = "PATH:x0,y0,x1,y1[:scale] or PATH:mask=MASK.png[:scale]"


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class LoadError(Exception):
    """A model, adapter or image encoder that cannot be loaded: exit status 1."""


# --------------------------------------------------------------------- parsing
def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{what}: {text!r} is not a finite number")
    return value


def parse_subject(spec: str):
    """``PATH:x0,y0,x1,y1[:scale]`` or ``PATH:mask=MASK[:scale]`` -> :class:`anyms.Subject`
    (image and mask paths not read yet).

    Boxes are split from the right, so paths may hold colons (``C:\\img.png:0,0,1,1``);
    a mask starts at the last ``:mask=`` and ends at a last ``:number`` (the scale), so
    the mask path may hold colons too (``C:\\a.png:mask=C:\\m.png:0.8``).
    """
    from .pipeline import Subject

    what = f"--subject {spec!r}"
    at = spec.rfind(":mask=")
    if at >= 0:
        image, rest = spec[:at], spec[at + len(":mask="):]
        mask, scale = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and _is_number(tail):
            mask, scale = head, _number(tail, f"{what}: scale")
        if not image or not mask:
            raise UsageError(f"{what}: expected {SUBJECT_FORMS}")
        return Subject(image, None, scale, mask=mask)
    head, sep, tail = spec.rpartition(":")
    scale = 1.0
    if sep and "," not in tail:               # the last field is the scale
        scale = _number(tail, f"{what}: scale")
        head, sep, tail = head.rpartition(":")
    if not sep or not head:
        raise UsageError(f"{what}: expected {SUBJECT_FORMS}")
    fields = tail.split(",")
    if len(fields) != 4:
        raise UsageError(f"{what}: the box must be 4 numbers x0,y0,x1,y1, got {tail!r}")
    box = tuple(_number(f, f"{what}: box") for f in fields)
    return Subject(head, box, scale)


def read_layout_file(path: str) -> dict:
    """Read a layout file (schema in this module's docstring) -> ``{"prompt", "mode", "priority", "subjects"}``."""
    from .pipeline import Subject

    what = f"--layout {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what}: no such file") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: the top level must be an object with a \"subjects\" list")
    unknown = sorted(set(data) - LAYOUT_KEYS)
    if unknown:
        raise UsageError(f"{what}: unknown key(s) {unknown}; allowed: {sorted(LAYOUT_KEYS)}")
    for key in ("prompt", "mode", "priority"):
        if key in data and not isinstance(data[key], str):
            raise UsageError(f"{what}: \"{key}\" must be a string")
    items = data.get("subjects")
    if not isinstance(items, list) or not items:
        raise UsageError(f"{what}: \"subjects\" must be a non-empty list")
    folder = os.path.dirname(os.path.abspath(path))
    subjects = []
    for i, item in enumerate(items):
        where = f"{what}: subjects[{i}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where} must be an object with \"image\" and \"box\" or \"mask\"")
        unknown = sorted(set(item) - SUBJECT_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(SUBJECT_KEYS)}")
        if "image" not in item:
            raise UsageError(f"{where}: missing \"image\"")
        if "box" not in item and "mask" not in item:
            raise UsageError(f"{where}: missing \"box\" or \"mask\" (give one, or both)")
        if not isinstance(item["image"], str):
            raise UsageError(f"{where}.image must be a path string")
        box = item.get("box")
        if box is not None and (not isinstance(box, list) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise UsageError(f"{where}.box must be a list of 4 numbers [x0, y0, x1, y1], got {box!r}")
        mask = item.get("mask")
        if mask is not None and not isinstance(mask, str):
            raise UsageError(f"{where}.mask must be a path string (an image file), got {mask!r}")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise UsageError(f"{where}.scale must be a number, got {scale!r}")
        label = item.get("label")
        if label is not None and not isinstance(label, str):
            raise UsageError(f"{where}.label must be a string")
        subjects.append(Subject(os.path.join(folder, item["image"]), None if box is None else tuple(box),
                                float(scale), label, mask=None if mask is None else os.path.join(folder, mask)))
    return {"prompt": data.get("prompt"), "mode": data.get("mode"), "priority": data.get("priority"),
            "subjects": subjects}


def _check_size(args) -> None:
    # The rule of diffusers' check_inputs (height and width divisible by 8), checked
    # here so that a bad size is reported before the model is loaded.
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8, got {value}")


def _split_hub_spec(spec: str, what: str, need_file: bool):
    """``owner/repo[/subfolder...][/file]`` -> ``(repo, subfolder, file)``."""
    parts = [p for p in spec.replace("\\", "/").split("/") if p]
    if len(parts) < (3 if need_file else 2):
        form = "owner/repo/[subfolder/]weight_file" if need_file else "owner/repo[/subfolder]"
        raise UsageError(f"{what}: {spec!r} is neither a local path nor a Hub spec {form}")
    if need_file:
        return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    return "/".join(parts[:2]), "/".join(parts[2:]), None


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anyms", description="AnyMS: layout-guided multi-subject generation with IP-Adapter, on diffusers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser("generate", help="generate an image from a prompt and subjects with boxes",
                         description="Generate an image with subjects placed in boxes (AnyMS). Writes the image, "
                                     "the layout drawn over it (OUT stem + .layout.png) and the per-subject "
                                     "attention maps (OUT stem + .maps.png).",
                         epilog=LAYOUT_SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", nargs="?", help="the text prompt (or \"prompt\" in --layout)")
    gen.add_argument("--negative-prompt", default=None)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--subject", action="append", metavar="PATH:x0,y0,x1,y1[:scale]|PATH:mask=MASK.png[:scale]",
                     help="a subject image and its region: a normalised box, or a mask image of the output's "
                          "size (nonzero = inside; without --height/--width the output takes the masks' size). "
                          "Repeat; later ones on top")
    src.add_argument("--layout", metavar="FILE.json", help="a layout file (schema in the module docs)")
    gen.add_argument("--arch", choices=ARCHS, default=None,
                     help="the pipeline: SDXL, Stable Diffusion 1.5 or FLUX.1 (default: the one the model's "
                          "model_index.json names; sdxl without --model)")
    gen.add_argument("--model", default=None,
                     help=f"model id or local folder (default {DEFAULT_MODEL} for sdxl, {DEFAULT_FLUX_MODEL} for "
                          f"flux); its model_index.json picks the pipeline")
    gen.add_argument("--ip-adapter", default=None, metavar="SPEC",
                     help="IP-Adapter weights: a local file, or owner/repo/[subfolder/]file on the Hub "
                          f"(default {DEFAULT_IP_ADAPTER}; the 16-token "
                          "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors needs "
                          "--image-encoder h94/IP-Adapter/models/image_encoder)")
    gen.add_argument("--image-encoder", default=None, metavar="SPEC",
                     help="CLIP image encoder: a local folder or owner/repo[/subfolder] (default: the "
                          "image_encoder folder beside the IP-Adapter weights)")
    gen.add_argument("--height", type=int, default=None, help="image height (multiple of 8; default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width (multiple of 8; default: the model's)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the pipeline's, 5.0 for SDXL; <= 1 turns CFG off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, float32 elsewhere")
    gen.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    gen.add_argument("--mode", choices=MODES, default=None, help="overwrite (AnyMS, default) or sum (Eq. 7)")
    gen.add_argument("--priority", choices=PRIORITIES, default=None,
                     help="who is on top where boxes overlap: order (later on top, default) or smaller_on_top")
    gen.add_argument("--vae-tiling", action="store_true", help="decode the latent in tiles (large images)")
    gen.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                     help="CPU offload for limited GPU memory: model (whole models) or sequential (layers)")
    gen.add_argument("--out", default="anyms.png", help="output image path (default anyms.png)")

    demo = sub.add_parser("demo", help="run AnyMS offline on a built-in tiny model with RANDOM weights",
                          description="Run the whole AnyMS pipeline offline on a tiny randomly-initialised "
                                      "SDXL-shaped model. The weights are random, so the image is noise-like: "
                                      "the demo shows the pipeline, the layout and the per-subject maps, not "
                                      "image quality.")
    demo.add_argument("--out-dir", default="anyms-demo", help="where to write the files (default ./anyms-demo)")
    demo.add_argument("--mode", choices=MODES, default="overwrite")
    demo.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    demo.add_argument("--size", type=int, default=256, help="image side, multiple of 8 (default 256)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--arch", choices=("sdxl", "flux"), default="sdxl",
                      help="the tiny model: SDXL-shaped (default) or FLUX.1-shaped (size: a multiple of 16)")
    return parser


# -------------------------------------------------------------------- commands
def _resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def _output_paths(out: str):
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UsageError(f"--out must end in .png, .jpg, .jpeg or .webp, got {out!r}")
    return out, f"{stem}.layout.png", f"{stem}.maps.png"


def _write_pictures(pipe, image, paths) -> None:
    from .visualize import cross_attention_grids, draw_layout, subject_maps

    plan = pipe.anyms_last_plan
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
    image.save(paths[0])
    draw_layout(image, plan.subjects).save(paths[1])
    if plan.layout.token_grid is not None:    # a transformer (FLUX): one grid, every double-stream block
        grids = {plan.layout.token_grid: pipe.transformer.config.num_layers}
    else:
        grids = cross_attention_grids(pipe.unet, plan.layout.latent_hw)
    subject_maps(plan.layout, grids, labels=plan.labels, image=image).save(paths[2])


def _resolve_sources(args) -> dict:
    """Where the model, the IP-Adapter and the image encoder come from, and the pipeline's
    family (``arch``: from --arch, or the model's model_index.json). No model is loaded."""
    arch = _arch_of(args)
    model = args.model or {"sdxl": DEFAULT_MODEL, "flux": DEFAULT_FLUX_MODEL}.get(arch)
    if model is None:
        raise UsageError("--model is required with --arch sd15 (an SD 1.5 model id or local folder)")
    ip_spec = args.ip_adapter or {"sdxl": DEFAULT_IP_ADAPTER, "sd15": DEFAULT_SD15_IP_ADAPTER,
                                  "flux": DEFAULT_FLUX_IP_ADAPTER}[arch]
    if os.path.isdir(ip_spec):
        raise UsageError(f"--ip-adapter {ip_spec!r} is a folder: name the weight file inside it")
    if os.path.isfile(ip_spec):
        ip = (os.path.dirname(os.path.abspath(ip_spec)), "", os.path.basename(ip_spec))
    else:
        ip = _split_hub_spec(ip_spec, "--ip-adapter", need_file=True)
    encoder = None
    if args.image_encoder:
        if os.path.isdir(args.image_encoder):
            encoder = (args.image_encoder, "")
        else:
            encoder = _split_hub_spec(args.image_encoder, "--image-encoder", need_file=False)[:2]
    return {"model": model, "ip_adapter": ip, "image_encoder": encoder, "arch": arch}


def _arch_of(args) -> str:
    """--arch, checked against the family that --model's model_index.json names (read, not loaded)."""
    if not args.model:
        return args.arch or "sdxl"
    named = _model_arch(args.model)
    if named is None:
        if args.arch is None:
            raise UsageError(f"--model {args.model!r}: its model_index.json names no pipeline of {ARCHS}; "
                             f"give --arch")
        return args.arch
    if args.arch is not None and args.arch != named:
        raise UsageError(f"--arch {args.arch} but the model {args.model!r} is a {named} pipeline "
                         f"(its model_index.json): drop --arch or give another --model")
    return named


def _model_arch(model: str):
    """``"flux"``, ``"sdxl"``, ``"sd15"`` or None, from the ``_class_name`` of the model's model_index.json."""
    if os.path.isdir(model):
        path = os.path.join(model, "model_index.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot load the model {model!r}: no readable model_index.json, not a diffusers "
                            f"pipeline folder ({type(e).__name__}: {e})") from None
    else:
        from diffusers import DiffusionPipeline

        try:
            config = DiffusionPipeline.load_config(model)
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot load the model {model!r}: {type(e).__name__}: {e}") from None
    name = str(config.get("_class_name", "")) if isinstance(config, dict) else ""
    if "Flux" in name:
        return "flux"
    if "StableDiffusionXL" in name:
        return "sdxl"
    if name.startswith("StableDiffusion") or name.startswith("AnyMSStableDiffusion"):
        return "sd15"
    return None


def _check_flux_size(height, width) -> None:
    # FluxPipeline packs the latent 2x2: sides that are not multiples of 16 would be cut down
    # (moving the boxes' edges and breaking masks of the given size).
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % 16:
            raise UsageError(f"--{name} must be a multiple of 16 for FLUX (it packs the latent 2x2), got {value}")


def _load_pipeline(args, sources: dict, device, dtype):
    from safetensors import SafetensorError

    from .pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline

    arch = sources.get("arch", args.arch or "sdxl")
    if arch == "flux":
        from .flux import AnyMSFluxPipeline as cls
    else:
        cls = AnyMSStableDiffusionXLPipeline if arch == "sdxl" else AnyMSStableDiffusionPipeline
    # What a missing, malformed or mismatched checkpoint raises while loading.
    load_errors = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
    kwargs = {"torch_dtype": dtype}
    if sources["image_encoder"]:
        from diffusers.utils import is_transformers_version
        from transformers import CLIPVisionModelWithProjection

        source, subfolder = sources["image_encoder"]
        # transformers renamed torch_dtype to dtype in 4.56 (diffusers' loader makes the same choice)
        dtype_kwarg = {"dtype" if is_transformers_version(">=", "4.56.0") else "torch_dtype": dtype}
        try:
            kwargs["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
                source, subfolder=subfolder or None, **dtype_kwarg)
        except load_errors as e:
            raise LoadError(f"cannot load the image encoder {args.image_encoder!r}: {type(e).__name__}: {e}") from None
    try:
        pipe = cls.from_pretrained(sources["model"], **kwargs)
    except load_errors as e:
        raise LoadError(f"cannot load the model {sources['model']!r}: {type(e).__name__}: {e}") from None
    source, subfolder, weight = sources["ip_adapter"]
    ip_kwargs = {}
    if arch == "flux" and getattr(pipe, "image_encoder", None) is None:
        # FLUX's loader reads the image encoder from a path of its own (not beside the weights): the
        # image_encoder folder beside a local adapter, else the CLIP ViT-L/14 of the XLabs adapters.
        local = os.path.join(source, subfolder, "image_encoder")
        ip_kwargs = {"image_encoder_pretrained_model_name_or_path":
                     local if os.path.isdir(local) else DEFAULT_FLUX_IMAGE_ENCODER, "image_encoder_dtype": dtype}
    try:
        pipe.load_ip_adapter(source, subfolder=subfolder, weight_name=weight, **ip_kwargs)
    except load_errors as e:
        raise LoadError(f"cannot load the IP-Adapter {'/'.join(p for p in (source, subfolder, weight) if p)!r}: "
                        f"{type(e).__name__}: {e}") from None
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def cmd_generate(args) -> int:
    import torch

    from .pipeline import prepare_subjects

    # 1. Everything about the input, before any model is loaded.
    if args.layout:
        layout = read_layout_file(args.layout)
        subjects = layout["subjects"]
        prompt = args.prompt if args.prompt is not None else layout["prompt"]
        mode = args.mode or layout["mode"] or "overwrite"
        priority = args.priority or layout["priority"] or "order"
    else:
        subjects = [parse_subject(spec) for spec in args.subject]
        prompt, mode, priority = args.prompt, args.mode or "overwrite", args.priority or "order"
    if not prompt:
        raise UsageError("a prompt is required: give PROMPT or \"prompt\" in --layout")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    _check_size(args)
    paths = _output_paths(args.out)
    try:
        # reads the images and masks, checks boxes, masks, mode and priority, and the masks' size
        plan = prepare_subjects(subjects, mode, priority)
        height, width = plan.image_size(args.height, args.width)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    if args.offload != "none" and device.type == "cpu":
        raise UsageError(f"--offload {args.offload} moves models between the CPU and an accelerator; "
                         f"with --device {device} there is nothing to offload")
    sources = _resolve_sources(args)
    if sources["arch"] == "flux":
        _check_flux_size(height, width)

    # 2. The model.
    t0 = time.perf_counter()
    pipe = _load_pipeline(args, sources, device, dtype)
    print(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    # 3. Generation, with diffusers' progress bar.
    call = dict(subjects=subjects, anyms_mode=mode, anyms_priority=priority, negative_prompt=args.negative_prompt,
                height=height, width=width, num_inference_steps=args.steps,
                generator=torch.Generator("cpu").manual_seed(args.seed))
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    t0 = time.perf_counter()
    image = pipe(prompt, **call).images[0]
    seconds = time.perf_counter() - t0
    _write_pictures(pipe, image, paths)
    print(f"generated {image.width}x{image.height} in {seconds:.1f} s ({mode} mode, {len(subjects)} subjects)")
    print(f"image:   {os.path.abspath(paths[0])}")
    print(f"layout:  {os.path.abspath(paths[1])}")
    print(f"maps:    {os.path.abspath(paths[2])}")
    return 0


def demo_subject_images(size: int = 96):
    """Three simple, recognisable subject images drawn in code (a ball, a box, a cone)."""
    from PIL import Image, ImageDraw

    def canvas():
        im = Image.new("RGB", (size, size), (235, 235, 225))
        return im, ImageDraw.Draw(im)

    m = size // 8
    ball, d = canvas()
    d.ellipse([m, m, size - m, size - m], fill=(210, 40, 40))
    box, d = canvas()
    d.rectangle([m, 2 * m, size - m, size - m], fill=(40, 80, 210))
    cone, d = canvas()
    d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=(40, 170, 60))
    return [("red ball", ball), ("blue box", box), ("green cone", cone)]


def triangle_mask(size: int, *corners):
    """A ``size x size`` mask image (mode "L", 255 inside) of the triangle with normalised ``corners``."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon([(x * size, y * size) for x, y in corners], fill=255)
    return im


def cmd_demo(args) -> int:
    import torch

    # The tiny model's matrices are too small for threads to help: on 2 busy cores, two
    # threads made the demo 40x slower (synchronisation), so it runs on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args) -> int:
    import torch

    from .pipeline import AnyMSStableDiffusionXLPipeline, Subject
    from .tiny import tiny_pipeline

    flux = getattr(args, "arch", "sdxl") == "flux"
    if args.size < 8 or args.size % 8:
        raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
    if flux and args.size % 16:
        raise UsageError(f"--size must be a multiple of 16 for FLUX (it packs the latent 2x2), got {args.size}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    print(f"anyms demo: a tiny {'FLUX.1' if flux else 'SDXL'}-shaped model built in code, with RANDOM weights "
          f"(nothing is downloaded).")
    print("The image is therefore noise-like: the demo shows that the whole AnyMS pipeline runs, and what the")
    print("layout and the per-subject routing look like, not image quality. Use `anyms generate` with real weights.")
    t0 = time.perf_counter()
    if flux:
        from .flux import AnyMSFluxPipeline
        from .tiny_flux import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(AnyMSFluxPipeline, seed=args.seed)
    else:
        pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=False, seed=args.seed)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    # Two boxes and a mask: the cone's region is a triangle (its mask file is written beside
    # the subjects), overlapping both boxes; later subjects are on top.
    boxes = [(0.05, 0.35, 0.55, 0.95), (0.4, 0.1, 0.95, 0.7), None]
    subjects = []
    for (label, image), box in zip(demo_subject_images(), boxes):
        path = os.path.join(out_dir, f"subject_{label.replace(' ', '_')}.png")
        image.save(path)
        mask = None
        if box is None:
            mask = os.path.join(out_dir, f"mask_{label.replace(' ', '_')}.png")
            triangle_mask(args.size, (0.45, 0.4), (0.68, 0.92), (0.22, 0.92)).save(mask)
        subjects.append(Subject(path, box, 1.0, label, mask=mask))
    prompt = "a red ball, a blue box and a green cone on a table"
    t1 = time.perf_counter()
    image = pipe(prompt, subjects=subjects, anyms_mode=args.mode, height=args.size, width=args.size,
                 num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    t2 = time.perf_counter()
    paths = tuple(os.path.join(out_dir, name) for name in ("image.png", "layout.png", "maps.png"))
    _write_pictures(pipe, image, paths)
    print(f"prompt: {prompt!r}; {len(subjects)} subjects (2 boxes, 1 mask), {args.mode} mode, {args.size}x{args.size}, "
          f"{args.steps} steps")
    print(f"built the tiny model in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s")
    print(f"image (random weights):  {os.path.abspath(paths[0])}")
    print(f"layout overlay:          {os.path.abspath(paths[1])}")
    print(f"per-subject maps:        {os.path.abspath(paths[2])}")
    print(f"subject images, mask:    {os.path.abspath(out_dir)}/subject_*.png, mask_*.png")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``anyms`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"generate": cmd_generate, "demo": cmd_demo}[args.command]
    try:
        return command(args)
    except UsageError as e:
        print(f"anyms {args.command}: error: {e}", file=sys.stderr)
        return 2
    except LoadError as e:
        print(f"anyms {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
