"""The ``anyms`` command: ``anyms generate`` (real models, or ``--model tiny``) and ``anyms demo``.

    anyms demo
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:0.05,0.3,0.5,0.95 --subject cat.png:0.5,0.3,0.95,0.95:0.8 --out sofa.png
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:mask=dog_mask.png --subject cat.png:mask=cat_mask.png:0.8 --out sofa.png
    anyms generate --from sofa.png --seed 7 --out sofa-7.png      # again, from the PNG's record
    anyms generate --jobs jobs.jsonl --out-dir out/                # many (anyms.jobs)

Bad input (a malformed subject or layout file, a box outside [0, 1], an image or mask
that cannot be read, an empty mask, masks of another size than --height/--width, a
size the pipeline cannot make or above MAX_SIDE, an output that exists or cannot be
written, ...) prints one line naming the argument, without a traceback, and exits
with status 2, before any model loads. A model or adapter that cannot be loaded, or a
generation that runs out of memory, exits with status 1 (one line too).

Outputs are written atomically and never replaced without --overwrite; a PNG holds the
record of what made it (anyms.metadata). Before generating, the command prints the
estimated peak memory and names subjects that get no token at some U-Net level
(anyms.preflight).

The layout file's schema is ``LAYOUT_SCHEMA`` below (also in ``anyms generate --help``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from . import _EXTRAS
from .preflight import MAX_SIDE, MAX_STEPS

__all__ = ["main", "parse_subject", "read_layout_file", "layout_from_dict", "build_parser"]

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
# --model TINY_MODEL: the built-in tiny model of anyms.tiny (random weights, offline)
TINY_MODEL = "tiny"
# --model TOY_MODEL: the trained toy world shipped in anyms/toy/weights (offline)
TOY_MODEL = "toy"
DEFAULT_STEPS = 50

JOBS_SCHEMA = """\
jobs file (--jobs FILE.jsonl): one JSON object a line (blank lines are skipped), each a
layout file's object (above; paths relative to the jobs file), with optionally:
  "out": "cats/0001.png"      the image, relative to --out-dir (default NNNNN.png, the
                              job's index); PNG only
  "seed": 7                   default: --seed (0) + the job's index (0-based, blank lines
                              not counted), so a job's image never depends on the process
  "negative_prompt", "steps", "guidance", "height", "width"   default: the options'
The model and its options (--model, --dtype, ...) are the command line's, for every job.
A job whose image exists and records this very job (a PNG's anyms record) is done and
skipped, so a stopped run resumes; an existing image made from anything else is refused
(--overwrite replaces it). DIR/manifest.jsonl lists every job in file order: its status
(done; skipped: done before; failed, with its error), seconds and process. Under
`accelerate launch` (one process per GPU, or torchrun/gloo on CPUs) each process makes
its share of the jobs, and the images are the ones one process would make.
"""
JOB_KEYS = {"out", "seed", "negative_prompt", "steps", "guidance", "height", "width"}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class LoadError(Exception):
    """A model, adapter or image encoder that cannot be loaded: exit status 1."""


class GenerationError(Exception):
    """A generation that failed on a good input (out of memory): exit status 1."""


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
    return layout_from_dict(data, what, os.path.dirname(os.path.abspath(path)))


def layout_from_dict(data, what: str, folder: str, extra_keys=(), extra_subject_keys=()) -> dict:
    """Check a layout file's object (``data``, already parsed) -> ``{"prompt", "mode", "priority",
    "subjects"}`` plus its ``extra_keys`` that are present. Image and mask paths are relative
    to ``folder``; errors start with ``what`` (the file, or a jobs file's line)."""
    from .pipeline import Subject

    if not isinstance(data, dict):
        raise UsageError(f"{what}: the top level must be an object with a \"subjects\" list")
    allowed = LAYOUT_KEYS | set(extra_keys)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(f"{what}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("prompt", "mode", "priority"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise UsageError(f"{what}: \"{key}\" must be a string")
    items = data.get("subjects")
    if not isinstance(items, list) or not items:
        raise UsageError(f"{what}: \"subjects\" must be a non-empty list")
    subject_keys = SUBJECT_KEYS | set(extra_subject_keys)
    subjects = []
    for i, item in enumerate(items):
        where = f"{what}: subjects[{i}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where} must be an object with \"image\" and \"box\" or \"mask\"")
        unknown = sorted(set(item) - subject_keys)
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
    out = {"prompt": data.get("prompt"), "mode": data.get("mode"), "priority": data.get("priority"),
           "subjects": subjects}
    out.update({key: data[key] for key in extra_keys if key in data})
    return out


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
class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``anyms generate: error: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anyms", description="AnyMS: layout-guided multi-subject generation with IP-Adapter, on diffusers.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"anyms {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser("generate", help="generate an image from a prompt and subjects with boxes",
                         description="Generate an image with subjects placed in boxes or masks (AnyMS). Writes the "
                                     "image (a PNG records what made it, for --from), the layout drawn over it "
                                     "(OUT stem + .layout.png) and the routing: where each subject's branch acts, "
                                     "per U-Net level (OUT stem + .routing.png). Nothing existing is replaced "
                                     "without --overwrite. --jobs makes many images (resumable; under accelerate "
                                     "launch, across processes).",
                         epilog=LAYOUT_SCHEMA + "\n" + JOBS_SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", nargs="?", help="the text prompt (or \"prompt\" in --layout)")
    gen.add_argument("--negative-prompt", default=None)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--subject", action="append", metavar="PATH:x0,y0,x1,y1[:scale]|PATH:mask=MASK.png[:scale]",
                     help="a subject image and its region: a normalised box, or a mask image of the output's "
                          "size (nonzero = inside; without --height/--width the output takes the masks' size). "
                          "Repeat; later ones on top")
    src.add_argument("--layout", metavar="FILE.json", help="a layout file (schema below)")
    src.add_argument("--from", dest="from_image", metavar="IMAGE.png",
                     help="make again the image a PNG from anyms generate records (its prompt, layout, seed, steps, "
                          "guidance, size, model, adapter, dtype); options given here override the record")
    src.add_argument("--jobs", metavar="JOBS.jsonl",
                     help="many images, one layout a line (schema below); resumable, with a manifest; under "
                          "`accelerate launch` the jobs are split across the processes")
    gen.add_argument("--arch", choices=ARCHS, default=None,
                     help="the pipeline: SDXL, Stable Diffusion 1.5 or FLUX.1 (default: the one the model's "
                          "model_index.json names; sdxl without --model)")
    gen.add_argument("--model", default=None,
                     help=f"model id or local folder (default {DEFAULT_MODEL} for sdxl, {DEFAULT_FLUX_MODEL} for "
                          f"flux); its model_index.json picks the pipeline. \"{TOY_MODEL}\": the trained toy world "
                          f"(64x64 coloured shapes on grey, offline; see anyms.toy). \"{TINY_MODEL}\": the built-in "
                          f"tiny model with RANDOM weights (offline, noise-like images: to try the command)")
    gen.add_argument("--ip-adapter", default=None, metavar="SPEC",
                     help="IP-Adapter weights: a local file, or owner/repo/[subfolder/]file on the Hub "
                          f"(default {DEFAULT_IP_ADAPTER}; the 16-token "
                          "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors needs "
                          "--image-encoder h94/IP-Adapter/models/image_encoder)")
    gen.add_argument("--image-encoder", default=None, metavar="SPEC",
                     help="CLIP image encoder: a local folder or owner/repo[/subfolder] (default: the "
                          "image_encoder folder beside the IP-Adapter weights)")
    gen.add_argument("--height", type=int, default=None,
                     help=f"image height (multiple of 8, at most {MAX_SIDE}; default: the model's)")
    gen.add_argument("--width", type=int, default=None,
                     help=f"image width (multiple of 8, at most {MAX_SIDE}; default: the model's)")
    gen.add_argument("--steps", type=int, default=None, help=f"denoising steps (default 50, at most {MAX_STEPS})")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (default: the pipeline's, 5.0 for SDXL; <= 1 turns CFG off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="the generator's seed (default 0; with --jobs, a job's \"seed\", else this + the job's "
                          "index)")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="auto (default): float16 on CUDA, float32 elsewhere")
    gen.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    gen.add_argument("--mode", choices=MODES, default=None, help="overwrite (AnyMS, default) or sum (Eq. 7)")
    gen.add_argument("--priority", choices=PRIORITIES, default=None,
                     help="who is on top where boxes overlap: order (later on top, default) or smaller_on_top")
    gen.add_argument("--vae-tiling", action="store_true", help="decode the latent in tiles (large images)")
    gen.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                     help="CPU offload for limited GPU memory: model (whole models) or sequential (layers)")
    gen.add_argument("--out", default=None, help="output image path (default anyms.png; .png records what made it)")
    gen.add_argument("--out-dir", default=None, metavar="DIR",
                     help="with --jobs: the folder of the images and manifest.jsonl (default: JOBS's name + -out, "
                          "beside it)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace existing outputs (default: refuse; with --jobs, outputs already made from "
                          "the same job are skipped)")
    gen.add_argument("--pictures", action=argparse.BooleanOptionalAction, default=None,
                     help="also write the .layout.png and .routing.png pictures (default: yes; with --jobs, no)")

    demo = sub.add_parser("demo", help="run AnyMS offline on the trained toy world (or a tiny random model)",
                          description="Run the whole AnyMS pipeline offline. By default on the trained toy world "
                                      "(coloured shapes on grey, 64x64): each subject appears in its region. "
                                      "--model tiny: a tiny randomly-initialised SDXL- or FLUX.1-shaped model, "
                                      "whose image is noise-like (it shows the pipeline, the layout and the "
                                      "per-subject maps, not image quality).")
    demo.add_argument("--out-dir", default="anyms-demo", help="where to write the files (default ./anyms-demo)")
    demo.add_argument("--model", choices=(TOY_MODEL, TINY_MODEL), default=None,
                      help=f"{TOY_MODEL} (default) or {TINY_MODEL} (random weights; the default with --arch)")
    demo.add_argument("--mode", choices=MODES, default="overwrite")
    demo.add_argument("--steps", type=int, default=None, help="denoising steps (default 20 toy, 8 tiny)")
    demo.add_argument("--size", type=int, default=None,
                      help="image side, multiple of 8 (default 64 toy, its trained size; 256 tiny)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--arch", choices=("sdxl", "flux"), default=None,
                      help="the tiny model: SDXL-shaped (default) or FLUX.1-shaped (size: a multiple of 16)")
    # The toy world's own commands (train, export, evaluate) are anyms/toy/cli.py's; main() hands them over.
    sub.add_parser("toy", help="the toy world: train, export, evaluate (anyms toy --help)", add_help=False)
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


def _output_paths(out: str, pictures: bool = True):
    """``(image, layout picture, routing picture)`` paths for ``--out`` (pictures None without ``pictures``)."""
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UsageError(f"--out must end in .png, .jpg, .jpeg or .webp, got {out!r}")
    if not pictures:
        return out, None, None
    return out, f"{stem}.layout.png", f"{stem}.routing.png"


def _check_outputs(paths, overwrite: bool, what: str = "--out") -> None:
    """Before any model loads: the folders exist (made) and take files, and nothing would be replaced."""
    from .outputs import OutputError, existing, prepare_output_folder

    paths = [p for p in paths if p]
    try:
        for path in paths:
            prepare_output_folder(path, what)
    except OutputError as e:
        raise UsageError(str(e)) from None
    if not overwrite:
        taken = existing(paths)
        if taken is not None:
            raise UsageError(f"{what}: {taken!r} exists; give --overwrite to replace it, or another {what}")


def _routing_grids(pipe, layout):
    """``{grid: layers}`` of the layers AnyMS acts on, for ``layout`` (U-Net levels, or FLUX's one grid)."""
    from .visualize import cross_attention_grids

    if layout.token_grid is not None:    # a transformer (FLUX): one grid, every double-stream block
        return {layout.token_grid: pipe.transformer.config.num_layers}
    return cross_attention_grids(pipe.unet, layout.latent_hw)


def _write_pictures(pipe, image, paths, *, overwrite: bool = True, pnginfo=None, warn=None,
                    overwrite_pictures: Optional[bool] = None) -> None:
    """Write, each atomically, the layout and routing pictures where ``paths`` names them, then
    the image (with ``pnginfo``'s text chunks): an image on disk means its pictures are there
    too. Nothing existing is replaced without ``overwrite`` (``overwrite_pictures`` for the
    pictures; default the same)."""
    from .outputs import OutputError, atomic_save
    from .visualize import draw_layout

    plan = pipe.anyms_last_plan
    keep = overwrite if overwrite_pictures is None else overwrite_pictures
    for path in paths:
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        if paths[1]:
            atomic_save(draw_layout(image, plan.subjects), paths[1], overwrite=keep)
        if paths[2]:
            try:
                from .visualize import subject_maps

                picture = subject_maps(plan.layout, _routing_grids(pipe, plan.layout), labels=plan.labels, image=image)
            except ModuleNotFoundError as e:       # matplotlib is the viz extra's
                (warn or _warn)(f"no routing picture: {e.name} is not installed (pip install 'anyms-kernels[viz]')")
            else:
                atomic_save(picture, paths[2], overwrite=keep)
        atomic_save(image, paths[0], overwrite=overwrite, pnginfo=pnginfo)
    except OutputError as e:
        raise UsageError(str(e)) from None


def _resolve_sources(args) -> dict:
    """Where the model, the IP-Adapter and the image encoder come from, and the pipeline's
    family (``arch``: from --arch, or the model's model_index.json). No model is loaded.
    ``"spec"`` is what an image's record keeps: local paths made absolute, Hub specs as given."""
    if args.model == TOY_MODEL:
        return _toy_sources(args)
    if args.model == TINY_MODEL:
        for option in ("ip_adapter", "image_encoder"):
            if getattr(args, option):
                raise UsageError(f"--{option.replace('_', '-')}: --model {TINY_MODEL} brings its own random IP-Adapter "
                                 f"and image encoder; leave --{option.replace('_', '-')} out")
        arch = args.arch or "sdxl"
        return {"model": TINY_MODEL, "ip_adapter": None, "image_encoder": None, "arch": arch,
                "spec": {"arch": arch, "model": TINY_MODEL, "ip_adapter": None, "image_encoder": None}}
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

    def spec(value):
        return os.path.abspath(value) if value and os.path.exists(value) else value

    return {"model": model, "ip_adapter": ip, "image_encoder": encoder, "arch": arch,
            "spec": {"arch": arch, "model": spec(model), "ip_adapter": spec(ip_spec),
                     "image_encoder": spec(args.image_encoder)}}


def _toy_sources(args) -> dict:
    """The shipped toy world: an SD 1.5-style folder and its IP-Adapter, loaded like any local model."""
    from .toy import WEIGHTS_DIR
    from .toy.models import IP_SUBFOLDER, IP_WEIGHT_NAME

    for option in ("ip_adapter", "image_encoder"):
        if getattr(args, option):
            raise UsageError(f"--{option.replace('_', '-')}: --model {TOY_MODEL} brings its own IP-Adapter and "
                             f"image encoder; leave --{option.replace('_', '-')} out")
    if args.arch not in (None, "sd15"):
        raise UsageError(f"--arch {args.arch}: --model {TOY_MODEL} is an SD 1.5-style pipeline; drop --arch")
    return {"model": WEIGHTS_DIR, "ip_adapter": (WEIGHTS_DIR, IP_SUBFOLDER, IP_WEIGHT_NAME), "image_encoder": None,
            "arch": "sd15", "spec": {"arch": "sd15", "model": TOY_MODEL, "ip_adapter": None, "image_encoder": None}}


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
    if sources["model"] == TINY_MODEL:
        return _place(args, _tiny_pipeline(cls, arch), device, dtype)
    # What a missing, malformed or mismatched checkpoint raises while loading.
    load_errors = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
    kwargs = {_diffusers_dtype_kwarg(): dtype}
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
    return _place(args, pipe, device, dtype)


def _diffusers_dtype_kwarg() -> str:
    """diffusers >= 0.40 takes ``dtype=`` in from_pretrained and deprecates ``torch_dtype=``."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.40.0") else "torch_dtype"


def _tiny_pipeline(cls, arch: str):
    """The built-in tiny model of ``arch`` (random weights, deterministic, offline)."""
    if arch == "flux":
        from .tiny_flux import tiny_flux_pipeline

        return tiny_flux_pipeline(cls, seed=0)
    from .tiny import tiny_pipeline

    return tiny_pipeline(cls, kind=arch, plus=False, seed=0)


def _place(args, pipe, device, dtype):
    """VAE tiling, then the pipeline on its device and dtype (or CPU offload)."""
    if pipe.dtype != dtype:
        pipe.to(dtype=dtype)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# ------------------------------------------------------------------- one image
@dataclass
class Job:
    """One image to make: everything but the model. ``anyms generate`` makes one, ``--jobs`` many."""

    prompt: Optional[str]
    subjects: list
    mode: str = "overwrite"
    priority: str = "order"
    seed: int = 0
    steps: int = DEFAULT_STEPS
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    negative_prompt: Optional[str] = None
    out: str = "anyms.png"
    where: str = ""                 # "" on the command line, "--jobs FILE:LINE" for a job
    index: int = 0
    plan: Any = None                # the checked subjects (check_job)

    def name(self, key: str) -> str:
        """How errors name ``key``: ``--steps`` on the command line, ``--jobs f.jsonl:3: "steps"`` in a job."""
        return f'{self.where}: "{key}"' if self.where else f"--{key.replace('_', '-')}"

    def error(self, message: str) -> UsageError:
        return UsageError(f"{self.where}: {message}" if self.where else message)


@dataclass
class Run:
    """What every image of one command shares: the model and where it runs."""

    sources: dict
    device: Any
    dtype: Any
    offload: str = "none"
    vae_tiling: bool = False
    overwrite: bool = False
    pictures: bool = True

    @property
    def arch(self) -> str:
        return self.sources["arch"]

    def model_record(self) -> dict:
        """The ``"model"`` entry of an image's record."""
        return dict(self.sources["spec"], dtype=str(self.dtype).replace("torch.", ""))


def _integer(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise UsageError(f"{name} must be {'at least ' + str(low) if high is None else f'in [{low}, {high}]'}, "
                         f"got {value}")
    return value


def check_job(job: Job, arch: str = "sdxl") -> Job:
    """Check everything about ``job`` that needs no model (reads its images and masks); fills
    ``job.plan`` and, with masks, ``job.height``/``job.width``. Raises UsageError naming the argument."""
    import math as _math

    from .preflight import check_image_size
    from .pipeline import prepare_subjects

    if not job.prompt:
        raise job.error("a prompt is required: give PROMPT or \"prompt\" in --layout" if not job.where
                        else "a prompt is required: give \"prompt\"")
    if not isinstance(job.prompt, str):
        raise UsageError(f"{job.name('prompt')} must be a string")
    if job.negative_prompt is not None and not isinstance(job.negative_prompt, str):
        raise UsageError(f"{job.name('negative_prompt')} must be a string")
    for key, choices in (("mode", MODES), ("priority", PRIORITIES)):
        if getattr(job, key) not in choices:
            raise UsageError(f"{job.name(key)} must be one of {list(choices)}, got {getattr(job, key)!r}")
    if type(job.steps) is int and job.steps < 1 and not job.where:
        raise UsageError(f"--steps must be at least 1, got {job.steps}")
    _integer(job.steps, job.name("steps"), 1, MAX_STEPS)
    _integer(job.seed, job.name("seed"), 0, 2 ** 64 - 1)
    if job.guidance is not None and (isinstance(job.guidance, bool) or not isinstance(job.guidance, (int, float))
                                     or not _math.isfinite(job.guidance)):
        raise UsageError(f"{job.name('guidance')} must be a finite number, got {job.guidance!r}")
    for key in ("height", "width"):
        value = getattr(job, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UsageError(f"{job.name(key)} must be an integer, got {value!r}")
        try:
            check_image_size(value, job.name(key))
        except ValueError as e:
            raise UsageError(str(e)) from None
    flux = arch == "flux"
    if flux:
        for key in ("height", "width"):
            value = getattr(job, key)
            if value is not None and value % 16:
                raise UsageError(f"{job.name(key)} must be a multiple of 16 for FLUX (it packs the latent 2x2), "
                                 f"got {value}")
    try:
        # reads the images and masks, checks boxes, masks, mode and priority, and the masks' size
        job.plan = prepare_subjects(job.subjects, job.mode, job.priority)
        job.height, job.width = job.plan.image_size(job.height, job.width, 16 if flux else 8)
    except (ValueError, TypeError) as e:
        raise job.error(str(e)) from None
    return job


def _job_from_args(args) -> Job:
    """The one image of the command line: from --subject, --layout or --from."""
    record = None
    if args.from_image:
        from .metadata import read_record, record_layout

        try:
            record = read_record(args.from_image)
        except ValueError as e:
            raise UsageError(str(e)) from None
        layout = layout_from_dict(record_layout(record), f"--from {args.from_image!r}",
                                  os.path.dirname(os.path.abspath(args.from_image)))
        _check_record_files(record, layout["subjects"], args.from_image)
        _record_defaults(args, record)
    elif args.layout:
        layout = read_layout_file(args.layout)
    else:
        layout = {"prompt": None, "mode": None, "priority": None,
                  "subjects": [parse_subject(spec) for spec in args.subject]}
    return Job(prompt=args.prompt if args.prompt is not None else layout["prompt"],
               subjects=layout["subjects"], mode=args.mode or layout["mode"] or "overwrite",
               priority=args.priority or layout["priority"] or "order",
               seed=args.seed if args.seed is not None else 0,
               steps=args.steps if args.steps is not None else DEFAULT_STEPS, guidance=args.guidance,
               height=args.height, width=args.width, negative_prompt=args.negative_prompt,
               out=args.out or "anyms.png")


def _record_defaults(args, record: dict) -> None:
    """--from: the record's values for every option not given on the command line."""
    model = record.get("model") or {}
    for option, value in (("negative_prompt", record.get("negative_prompt")), ("seed", record.get("seed")),
                          ("steps", record.get("steps")), ("guidance", record.get("guidance")),
                          ("height", record.get("height")), ("width", record.get("width")),
                          ("mode", record["layout"].get("mode")), ("priority", record["layout"].get("priority")),
                          ("dtype", model.get("dtype"))):
        if getattr(args, option) is None and value is not None:
            setattr(args, option, value)
    if args.model is None and model.get("model"):
        args.model = model["model"]
        # the record's adapter and encoder go with the record's model only
        for option in ("ip_adapter", "image_encoder", "arch"):
            if getattr(args, option) is None and model.get(option):
                setattr(args, option, model[option])
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--from {args.from_image!r}: its record's dtype {args.dtype!r} is none of {DTYPES}")


def _check_record_files(record: dict, subjects, source: str) -> None:
    """--from: warn when a subject or mask file differs from the one that made the image."""
    from .metadata import file_sha256

    for i, (entry, subject) in enumerate(zip(record["layout"].get("subjects", []), subjects)):
        for key, path in (("image", subject.image), ("mask", subject.mask)):
            want = entry.get(f"{key}_sha256") if isinstance(entry, dict) else None
            if path is None or want is None or not os.path.isfile(path):
                continue
            if file_sha256(path) != want:
                _warn(f"--from {source!r}: subjects[{i}].{key} {path!r} has changed since the image was made "
                      f"(SHA-256 differs): the new image will differ")


def _run_from_args(args, device=None) -> Run:
    """The model and options every image of this command shares (nothing loaded)."""
    device, dtype = _resolve_device_dtype(device or args.device, args.dtype or "auto")
    if args.offload != "none" and device.type == "cpu":
        raise UsageError(f"--offload {args.offload} moves models between the CPU and an accelerator; "
                         f"with --device {device} there is nothing to offload")
    sources = _resolve_sources(args)
    pictures = args.pictures if args.pictures is not None else not args.jobs
    return Run(sources, device, dtype, args.offload, args.vae_tiling, args.overwrite, pictures)


def load_for_run(args, run: Run, log=None):
    """Load the run's pipeline quietly (no per-file progress bars), reporting the time."""
    t0 = time.perf_counter()
    with _loading_quietly():
        pipe = _load_pipeline(args, run.sources, run.device, run.dtype)
    if run.sources["model"] == TINY_MODEL:
        (log or _info)(f"--model {TINY_MODEL}: the built-in tiny {run.arch} model, with RANDOM weights: the images "
                       f"are noise-like (it shows the command works, not image quality)")
    (log or _status)(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.1f} s")
    return pipe


def default_size(pipe) -> Tuple[int, int]:
    """The pipeline's default ``(height, width)`` (what it makes when given neither)."""
    f = pipe.vae_scale_factor
    sample = getattr(pipe, "default_sample_size", None)
    if not sample:
        sample = pipe.unet.config.sample_size
    sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
    return int(sample[0]) * f, int(sample[1]) * f


def job_layout(pipe, job: Job, height: int, width: int):
    """The :class:`~anyms.Layout` the pipeline will build for ``job`` at ``height x width``."""
    plan = job.plan
    if getattr(pipe, "unet", None) is None:           # FLUX
        from .flux import flux_layout

        masks = [s.mask for s in plan.subjects]
        return flux_layout([list(s.box) for s in plan.subjects], height, width,
                           scales=[s.scale for s in plan.subjects], mode=plan.mode,
                           masks=masks if any(m is not None for m in masks) else None,
                           vae_scale_factor=pipe.vae_scale_factor)
    return plan.make_layout((height // pipe.vae_scale_factor, width // pipe.vae_scale_factor))


def warn_unreached(pipe, job: Job, warn=None) -> List[str]:
    """Warn, one line per subject, where a subject gets no token at some level; returns the lines."""
    from .preflight import unreached_message, unreached_subjects

    height, width = job.height or default_size(pipe)[0], job.width or default_size(pipe)[1]
    layout = job_layout(pipe, job, height, width)
    names = [f"subjects[{i}]" for i in job.plan.order]
    lines = unreached_message(unreached_subjects(layout, _routing_grids(pipe, layout)), job.plan.labels, names)
    for line in lines:
        (warn or _warn)(f"{job.where}: {line}" if job.where else line)
    return lines


def memory_report(pipe, run: Run, height: int, width: int, cfg: bool, log=None, warn=None):
    """Print the estimated peak memory of one image; warn if it is above what the device has free."""
    from .preflight import GIB, device_memory, estimate_peak_memory

    if getattr(pipe, "unet", None) is None:          # the estimate models U-Nets (SD, SDXL) only
        return None
    est = estimate_peak_memory(pipe, height, width, cfg=cfg, offload=run.offload, vae_tiling=run.vae_tiling,
                               dtype=run.dtype)
    (log or _info)(f"estimated peak memory, {width}x{height} on {run.device}: {est.describe()}")
    memory = device_memory(run.device)
    if memory is not None and est.total > memory[0]:
        hints = [h for h, on in (("--vae-tiling", not run.vae_tiling), ("--offload model", run.offload == "none"
                                 and run.device.type == "cuda"), ("a smaller size", True)) if on]
        (warn or _warn)(f"the estimate is above the {memory[0] / GIB:.1f} GiB free on {run.device}: expect to run "
                        f"out of memory ({', '.join(hints)} need less)")
    return est


def generate_image(pipe, job: Job, run: Run):
    """Make ``job``'s image; out of memory is a GenerationError naming the size."""
    import torch

    call = dict(subjects=job.subjects, anyms_mode=job.mode, anyms_priority=job.priority,
                negative_prompt=job.negative_prompt, height=job.height, width=job.width,
                num_inference_steps=job.steps, generator=torch.Generator("cpu").manual_seed(job.seed))
    if job.guidance is not None:
        call["guidance_scale"] = job.guidance
    try:
        return pipe(job.prompt, **call).images[0]
    except torch.OutOfMemoryError:
        raise GenerationError(
            f"{job.where + ': ' if job.where else ''}out of memory on {run.device} making "
            f"{job.width or 'default'}x{job.height or 'default'}: try --vae-tiling, --offload model or a smaller "
            f"size") from None


def image_record(pipe, job: Job, run: Run, image=None) -> dict:
    """The record stored in ``job``'s PNG (see :mod:`anyms.metadata`); without ``image``, what is known
    before generating (height, width and guidance None where the model's defaults will apply)."""
    from .metadata import build_record

    guidance = job.guidance
    if image is not None and guidance is None:
        guidance = getattr(pipe, "guidance_scale", None)     # the pipeline's default, as it ran
    record = build_record(
        prompt=job.prompt, negative_prompt=job.negative_prompt, subjects=job.subjects, mode=job.mode,
        priority=job.priority, seed=job.seed, steps=job.steps, guidance=guidance,
        height=image.height if image is not None else job.height,
        width=image.width if image is not None else job.width,
        model=run.model_record(), folder=os.path.dirname(os.path.abspath(job.out)),
        device=str(run.device) if image is not None else None)
    return record


def save_job(pipe, image, job: Job, run: Run, paths, warn=None, overwrite_pictures: Optional[bool] = None) -> None:
    """Write ``job``'s pictures and image (PNG: with its record), atomically, replacing nothing without --overwrite."""
    from .metadata import png_info

    info = png_info(image_record(pipe, job, run, image)) if paths[0].lower().endswith(".png") else None
    _write_pictures(pipe, image, paths, overwrite=run.overwrite, pnginfo=info, warn=warn,
                    overwrite_pictures=overwrite_pictures)


def cmd_generate(args) -> int:
    if args.jobs:
        from .jobs import run_jobs

        return run_jobs(args)
    for option in ("out_dir",):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option.replace('_', '-')} goes with --jobs (one image: --out)")

    # 1. Everything about the input and the outputs, before any model is loaded.
    job = _job_from_args(args)
    run = _run_from_args(args)
    check_job(job, run.arch)
    paths = _output_paths(job.out, run.pictures)
    _check_outputs(paths, run.overwrite)

    # 2. The model, and what this generation will take.
    with _threads_for(run):
        pipe = load_for_run(args, run)
        height, width = job.height or default_size(pipe)[0], job.width or default_size(pipe)[1]
        memory_report(pipe, run, height, width, cfg=job.guidance is None or job.guidance > 1)
        warn_unreached(pipe, job)

        # 3. Generation, with diffusers' progress bar.
        pipe.set_progress_bar_config(disable=False, desc="denoising")
        t0 = time.perf_counter()
        image = generate_image(pipe, job, run)
        seconds = time.perf_counter() - t0
    save_job(pipe, image, job, run, paths)
    n = len(job.subjects)
    print(f"generated {image.width}x{image.height} in {seconds:.1f} s ({job.mode} mode, {n} subject{'s' * (n != 1)}, "
          f"seed {job.seed})")
    for label, path in zip(("image:  ", "layout: ", "routing:"), paths):
        if path:
            print(f"{label} {os.path.abspath(path)}")
    return 0


@contextlib.contextmanager
def _threads_for(run: Run):
    """The tiny model and the toy world on a CPU run on one thread: their matrices are too small for
    threads to help (on 2 busy cores, two threads made the tiny model 40x slower), as in the demo."""
    import torch

    if run.sources["spec"]["model"] not in (TINY_MODEL, TOY_MODEL) or run.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    if args.model == TOY_MODEL and args.arch is not None:
        raise UsageError(f"--arch {args.arch}: the toy world is one model; --arch picks the --model {TINY_MODEL} shape")
    if args.model == TOY_MODEL or (args.model is None and args.arch is None):
        from .toy.demo import toy_demo

        args.steps = 20 if args.steps is None else args.steps
        args.size = 64 if args.size is None else args.size
        _check_demo_args(args, flux=False)
        return toy_demo(args, _write_pictures)
    args.arch = args.arch or "sdxl"
    args.steps = 8 if args.steps is None else args.steps
    args.size = 256 if args.size is None else args.size
    return _tiny_demo(args)


def _check_demo_args(args, flux: bool) -> None:
    if args.size < 8 or args.size % 8:
        raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
    if flux and args.size % 16:
        raise UsageError(f"--size must be a multiple of 16 for FLUX (it packs the latent 2x2), got {args.size}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")


def _tiny_demo(args) -> int:
    import torch

    from .pipeline import AnyMSStableDiffusionXLPipeline, Subject
    from .tiny import tiny_pipeline

    flux = args.arch == "flux"
    _check_demo_args(args, flux)
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
    paths = tuple(os.path.join(out_dir, name) for name in ("image.png", "layout.png", "routing.png"))
    _write_pictures(pipe, image, paths)
    print(f"prompt: {prompt!r}; {len(subjects)} subjects (2 boxes, 1 mask), {args.mode} mode, {args.size}x{args.size}, "
          f"{args.steps} steps")
    print(f"built the tiny model in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s")
    print(f"image (random weights):  {os.path.abspath(paths[0])}")
    print(f"layout overlay:          {os.path.abspath(paths[1])}")
    print(f"routing (per level):     {os.path.abspath(paths[2])}")
    print(f"subject images, mask:    {os.path.abspath(out_dir)}/subject_*.png, mask_*.png")
    return 0


# ------------------------------------------------------------------- stderr
# The optional dependencies, and the extra of anyms-kernels that brings each.
EXTRAS = _EXTRAS

# Library log lines that say nothing a user can act on, dropped while a command runs:
# (logger, text). transformers falls back to its PIL image processors without torchvision,
# correctly; diffusers warns on every dtype cast that no module needs float32 ("[]").
QUIET_LOG_LINES = (("transformers.utils.import_utils", "requires torchvision"),
                   ("diffusers.models.modeling_utils", "should be kept in float32: []"))


def _one_line(message) -> str:
    """``message`` on one line (library errors may hold newlines)."""
    import re

    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def _emit(line: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)          # above a progress bar, if one is running
    except ImportError:
        print(line, file=sys.stderr)


def _info(message: str) -> None:
    print(message, flush=True)


def _status(message: str) -> None:
    """Progress (model loaded, ...): stderr, beside the progress bars."""
    print(message, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    _emit(f"anyms generate: warning: {_one_line(message)}")


class _DropLines:
    """A logging filter that drops records whose message contains ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        try:
            return self.text not in record.getMessage()
        except Exception:   # a record that cannot be formatted: let logging report it
            return True


@contextlib.contextmanager
def _quiet_stderr():
    """While a command runs: library log lines in QUIET_LOG_LINES are dropped, and Python
    warnings print as one line (``anyms: warning: Category: message``). Restored on exit."""
    import logging
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = _one_line(str(message).split("\n")[0])
        _emit(f"anyms: warning: {category.__name__}: {text}")

    filters = [(logging.getLogger(name), _DropLines(text)) for name, text in QUIET_LOG_LINES]
    with warnings.catch_warnings():
        warnings.showwarning = show
        for logger, f in filters:
            logger.addFilter(f)
        try:
            yield
        finally:
            for logger, f in filters:
                logger.removeFilter(f)


@contextlib.contextmanager
def _loading_quietly():
    """No per-file progress bars from diffusers and transformers while a model loads."""
    restore = []
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = __import__(module, fromlist=["disable_progress_bar"])
        except ImportError:
            continue
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            restore.append(lib.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()


def _is_main_process() -> bool:
    """False in the other processes of a distributed launch (torchrun / accelerate set RANK)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``anyms`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["toy"]:
        from .toy.cli import main as toy_main

        return toy_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"generate": cmd_generate, "demo": cmd_demo}[args.command]
    # under a distributed launch every process checks the same input: one of them reports it
    report = _is_main_process() or not getattr(args, "jobs", None)

    def error(message: str, status: int) -> int:
        if report:
            print(f"anyms {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return status

    with _quiet_stderr():
        try:
            return command(args)
        except UsageError as e:
            return error(str(e), 2)
        except (LoadError, GenerationError) as e:
            return error(str(e), 1)
        except KeyboardInterrupt:
            # the files of a run are written atomically: an interrupted write leaves nothing
            return error("interrupted (Ctrl-C): every image written so far is complete", 130)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            return error(f"this needs {top}, which is not installed: pip install 'anyms-kernels[{EXTRAS[top]}]'", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
