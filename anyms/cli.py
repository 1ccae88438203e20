"""The ``anyms`` command: ``anyms generate`` (real models, or ``--model tiny``) and ``anyms demo``.

    anyms demo
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:0.05,0.3,0.5,0.95 --subject cat.png:0.5,0.3,0.95,0.95:0.8 --out sofa.png
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:mask=dog_mask.png --subject cat.png:mask=cat_mask.png:0.8 --out sofa.png
    anyms generate "a dog and a cat on a sofa" \\
        --subject dog.png:0.05,0.3,0.5,0.95:end=0.6 --subject cat.png:0.5,0.3,0.95,0.95:0.8:start=0.2,schedule=ease_in
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

This module parses the command line and prints; what a job is, its checks, how it is made and
saved are anyms.job's (the layout file's schema: ``anyms.job.LAYOUT_SCHEMA``, also in ``anyms
generate --help``), the model and its loading anyms.loading's, the demo anyms.demo's.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Optional, Sequence, Tuple

from . import _EXTRAS, console
from .console import emit, one_line
from .demo import cmd_demo
from .errors import GenerationError, LoadError, UsageError
from .job import (
    DEFAULT_STEPS, JOBS_SCHEMA, LAYOUT_SCHEMA, MODES, PRIORITIES, Job, apply_run_defaults, check_blocks_on_model,
    check_job, check_outputs, check_prompts_on_model, folder_lock, generate_image, parse_blocks,
    layout_from_dict, memory_report, merge_upscale, output_paths, read_layout_file, save_job, upscale_from_args,
    upscale_from_dict, upscale_geometry_before_loading, warn_unreached,
)
from .loading import (
    ARCHS, DEFAULT_IP_ADAPTER, DEFAULT_FLUX_MODEL, DEFAULT_MODEL, DTYPES, TINY_MODEL, TOY_MODEL, load_for_run,
    run_from_args, threads_for,
)
from .budget import plan_memory
from .sizes import size_argument
from .preflight import MAX_SIDE, MAX_STEPS
from .toy import DEFAULT_GUIDANCE as TOY_GUIDANCE

__all__ = ["main", "parse_subject", "parse_region", "build_parser"]
SUBJECT_FORMS = "PATH:x0,y0,x1,y1[:scale] or PATH:mask=MASK.png[:scale], each with an optional last field " \
                "start=S,end=E,schedule=NAME,adapter=I"
# the last field: the subject's window, schedule and IP-Adapter, the layout file's keys (any of them)
TIMING_KEYS = ("start", "end", "schedule", "adapter")
REGION_FORMS = "TEXT@x0,y0,x1,y1 or TEXT@mask=MASK.png, each with an optional last field start=S,end=E"
# a regional prompt's: its window only (no scale, schedule nor IP-Adapter: those are an image's)
REGION_TIMING_KEYS = ("start", "end")


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


def _split_timing(spec: str, index: Optional[int], option: str = "--subject", keys=TIMING_KEYS):
    """``(spec without its last field, {"start", "end", "schedule"[, "adapter"]})``: the last ``:``-field
    holds them when it reads ``word=...`` (``start=0.2,end=0.8,schedule=ease_in,adapter=1``, any of
    ``keys``, in any order); errors name ``--subject[i].KEY`` (``option``'s)."""
    import re

    from .timing import check_schedule, check_window

    head, sep, tail = spec.rpartition(":")
    first = tail.split(",")[0].partition("=")
    if not sep or not first[1] or first[0] == "mask" or not re.fullmatch(r"[A-Za-z_]+", first[0]):
        return spec, {}
    name = option if index is None else f"{option}[{index}]"
    values = {}
    for item in tail.split(","):
        key, eq, value = item.partition("=")
        if key in TIMING_KEYS and key not in keys and eq:
            raise UsageError(f"{name} {spec!r}: a regional prompt has no {key} (it replaces the text at weight 1, "
                             f"and {key} is an image's); the timing field is start=S,end=E")
        if key not in keys or not eq:
            forms = {"start": "start=S", "end": "end=E", "schedule": "schedule=NAME", "adapter": "adapter=I"}
            raise UsageError(f"{name} {spec!r}: unknown timing field {item!r}; the last field is "
                             f"{','.join(forms[k] for k in keys)} (any of them)")
        if key in values:
            raise UsageError(f"{name} {spec!r}: {key} is given twice")
        if key == "adapter":
            if not re.fullmatch(r"[0-9]+", value.strip()):
                raise UsageError(f"{name}.adapter must be the index of a loaded IP-Adapter (0, 1, ...: the "
                                 f"--ip-adapter options in order), got {value!r}")
            values[key] = int(value)
            continue
        values[key] = value if key == "schedule" else _number(value, f"{name}.{key}")
    try:
        start, end = check_window(values.get("start", 0.0), values.get("end", 1.0), name)
        schedule = check_schedule(values.get("schedule", "constant"), f"{name}.schedule")
    except ValueError as e:
        raise UsageError(str(e)) from None
    extra = {"adapter": values["adapter"]} if "adapter" in values else {}
    return head, dict(start=start, end=end, schedule=schedule, **extra)


def parse_subject(spec: str, index: Optional[int] = None):
    """``PATH:x0,y0,x1,y1[:scale][:TIMING]`` or ``PATH:mask=MASK[:scale][:TIMING]`` ->
    :class:`anyms.Subject` (image and mask paths not read yet). ``TIMING`` is
    ``start=S,end=E,schedule=NAME,adapter=I`` (any of them: the layout file's keys). ``index``: the
    subject's place among the ``--subject`` options, for the errors (``subjects[1].scale``,
    ``--subject[1].end``).

    Boxes are split from the right, so paths may hold colons (``C:\\img.png:0,0,1,1``);
    a mask starts at the last ``:mask=`` and ends at a last ``:number`` (the scale), so
    the mask path may hold colons too (``C:\\a.png:mask=C:\\m.png:0.8``).
    """
    import dataclasses

    region, timing = _split_timing(spec, index)
    return dataclasses.replace(_parse_region(region, spec, index), **timing)


def parse_region(spec: str, index: Optional[int] = None):
    """``TEXT@x0,y0,x1,y1[:TIMING]`` or ``TEXT@mask=MASK[:TIMING]`` -> a text-only
    :class:`anyms.Subject` (a regional prompt; the mask not read yet). ``TIMING`` is
    ``start=S,end=E`` (a regional prompt has no scale, schedule nor adapter: an image's). ``index``: the region's
    place among the ``--region`` options, for the errors; the subjects' checks name it by its
    place among the subjects, after every ``--subject`` (``subjects[2].prompt``). The region is
    split at the last ``@``, so the text may hold any character, ``@`` too."""
    from .pipeline import Subject

    name = "--region" if index is None else f"--region[{index}]"
    text, at, where = spec.rpartition("@")
    if not at or not text or not where:
        raise UsageError(f"{name} {spec!r}: expected {REGION_FORMS}")
    where, timing = _split_timing(where, index, "--region", REGION_TIMING_KEYS)
    timing.pop("schedule", None)    # the default, "constant": a prompt-only subject's
    if where.startswith("mask="):
        mask = where[len("mask="):]
        if not mask:
            raise UsageError(f"{name} {spec!r}: expected {REGION_FORMS}")
        return Subject(None, None, mask=mask, prompt=text, **timing)
    fields = where.split(",")
    if len(fields) != 4:
        raise UsageError(f"{name} {spec!r}: the box must be 4 numbers x0,y0,x1,y1, got {where!r}")
    box = tuple(_number(f, f"{name} {spec!r}: box") for f in fields)
    return Subject(None, box, prompt=text, **timing)


def _parse_region(spec: str, full: str, index: Optional[int]):
    """``PATH:x0,y0,x1,y1[:scale]`` or ``PATH:mask=MASK[:scale]`` -> :class:`anyms.Subject`;
    errors quote ``full``, the whole ``--subject`` value."""
    from .pipeline import Subject

    what = f"--subject {full!r}"
    scale_name = f"{what}: {'scale' if index is None else f'subjects[{index}].scale'}"
    at = spec.rfind(":mask=")
    if at >= 0:
        image, rest = spec[:at], spec[at + len(":mask="):]
        mask, scale = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and _is_number(tail):
            mask, scale = head, _number(tail, scale_name)
        if not image or not mask:
            raise UsageError(f"{what}: expected {SUBJECT_FORMS}")
        return Subject(image, None, scale, mask=mask)
    head, sep, tail = spec.rpartition(":")
    scale = 1.0
    if sep and "," not in tail:               # the last field is the scale
        scale = _number(tail, scale_name)
        head, sep, tail = head.rpartition(":")
    if not sep or not head:
        raise UsageError(f"{what}: expected {SUBJECT_FORMS}")
    fields = tail.split(",")
    if len(fields) != 4:
        raise UsageError(f"{what}: the box must be 4 numbers x0,y0,x1,y1, got {tail!r}")
    box = tuple(_number(f, f"{what}: box") for f in fields)
    return Subject(head, box, scale)


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``anyms generate: error: ...``), exit status 2."""

    # option destinations of which one at least must be given (argparse's groups cannot say "--subject
    # and/or --region, or one of the others"); None: no such rule
    one_required: Optional[Tuple[str, ...]] = None

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.one_required and not any(getattr(namespace, dest, None) for dest in self.one_required):
            options = " ".join(f"--{dest.replace('_image', '').replace('_', '-')}" for dest in self.one_required)
            self.error(f"one of the arguments {options} is required")
        return namespace, extras


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
    src = gen.add_mutually_exclusive_group()      # one of them, or --region alone (one_required)
    gen.one_required = ("subject", "region", "layout", "from_image", "jobs")
    src.add_argument("--subject", action="append",
                     metavar="PATH:x0,y0,x1,y1[:scale][:TIMING]|PATH:mask=MASK.png[:scale][:TIMING]",
                     help="a subject image and its region: a normalised box, or a mask image of the output's "
                          "size (nonzero = inside; without --height/--width the output takes the masks' size). "
                          "TIMING, optional: start=S,end=E,schedule=NAME (any of them; the layout file's "
                          "\"start\", \"end\", \"schedule\"), e.g. dog.png:0,0,0.5,1:0.8:end=0.6,schedule=ease_out. "
                          "Repeat; later ones on top")
    gen.add_argument("--region", action="append", metavar="TEXT@x0,y0,x1,y1[:TIMING]|TEXT@mask=MASK.png[:TIMING]",
                     help="a regional prompt (SD 1.5, SDXL): inside the box or mask its TEXT replaces the prompt's "
                          "text; TIMING, optional: start=S,end=E. Alone or beside --subject (a subject with an image "
                          "and a prompt: \"prompt\" in --layout). Repeat; later ones on top of earlier ones")
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
    gen.add_argument("--ip-adapter", action="append", default=None, metavar="SPEC",
                     help="IP-Adapter weights: a local file, or owner/repo/[subfolder/]file on the Hub "
                          f"(default {DEFAULT_IP_ADAPTER}; the 16-token "
                          "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors needs "
                          "--image-encoder h94/IP-Adapter/models/image_encoder). Repeat it to load several "
                          "(SD, SDXL): a subject's adapter=I (\"adapter\" in a layout) picks the I-th, from 0")
    gen.add_argument("--image-encoder", action="append", default=None, metavar="SPEC",
                     help="CLIP image encoder: a local folder or owner/repo[/subfolder] (default: the "
                          "image_encoder folder beside the IP-Adapter weights); with several --ip-adapter, "
                          "one per adapter, in the same order")
    gen.add_argument("--height", type=int, default=None,
                     help=f"image height (multiple of 8, at most {MAX_SIDE}; default: the model's)")
    gen.add_argument("--width", type=int, default=None,
                     help=f"image width (multiple of 8, at most {MAX_SIDE}; default: the model's)")
    gen.add_argument("--steps", type=int, default=None, help=f"denoising steps (default 50, at most {MAX_STEPS})")
    gen.add_argument("--guidance", type=float, default=None,
                     help=f"classifier-free guidance scale (default: the model's, {TOY_GUIDANCE:g} for --model "
                          f"{TOY_MODEL}, else the pipeline's: 5.0 for SDXL, 7.5 for SD 1.5; <= 1 turns CFG off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="the generator's seed (default 0; with --jobs, a job's \"seed\", else this + the job's "
                          "index)")
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="auto (default): float16 on CUDA, float32 elsewhere")
    gen.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    gen.add_argument("--mode", choices=MODES, default=None, help="overwrite (AnyMS, default) or sum (Eq. 7)")
    gen.add_argument("--blocks", default=None, metavar="PRESET",
                     help="the model blocks every subject's image acts on (a subject's own \"blocks\" in --layout "
                          "wins): all (default), style, layout or style_and_layout (anyms.blocks; FLUX: all), "
                          "or dotted block names, comma-separated (up_blocks.0.attentions.1,down_blocks.2)")
    gen.add_argument("--priority", choices=PRIORITIES, default=None,
                     help="who is on top where boxes overlap: order (later on top, default) or smaller_on_top")
    gen.add_argument("--upscale", type=int, default=None, metavar="2|4",
                     help="after generating, upscale the image 2 or 4 times with an img2img pass over overlapping "
                          "tiles, each subject acting in its region only in every tile (SDXL, SD 1.5; the output "
                          "is the upscaled image)")
    gen.add_argument("--upscale-tile", type=int, default=None, metavar="PIXELS",
                     help="the tile's side in pixels of the output (default: the model's native side, 1024 for "
                          "SDXL; a multiple of the U-Net's unit: 32 for SDXL, 64 for SD 1.5)")
    gen.add_argument("--upscale-overlap", type=int, default=None, metavar="PIXELS",
                     help="pixels neighbouring tiles share (default a quarter of the tile; a multiple of the unit, "
                          "smaller than the tile)")
    gen.add_argument("--upscale-strength", type=float, default=None, metavar="S",
                     help="how far the upscaled image is noised again, in (0, 1] (default 0.3)")
    gen.add_argument("--vae-tiling", action="store_true", help="decode the latent in tiles (large images)")
    gen.add_argument("--offload", choices=("none", "model", "sequential"), default=None,
                     help="CPU offload for limited GPU memory: model (whole models) or sequential (layers) "
                          "(default none, or what --max-memory chooses)")
    gen.add_argument("--max-memory", type=size_argument, default=None, metavar="SIZE",
                     help="a budget of device memory (8GB, 12GiB, 8000MB): chooses, before loading, the dtype "
                          "(float16 on CUDA, bfloat16 on CPUs), VAE tiling and offload that make the largest image "
                          "fit by the estimate, says which in one line, or refuses with the smallest budget that "
                          "would fit; --dtype, --offload and --vae-tiling given with it are kept (docs/memory.md)")
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
                                      "(coloured shapes on grey, 64x64). --model tiny: a tiny randomly-initialised "
                                      "SDXL- or FLUX.1-shaped model, whose image is noise-like (it shows the "
                                      "pipeline, the layout and the per-subject maps, not image quality).")
    demo.add_argument("--out-dir", default="anyms-demo", help="where to write the files (default ./anyms-demo)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the files of an earlier demo in --out-dir (default: refuse)")
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
def _job_from_args(args) -> Job:
    """The one image of the command line: from --subject, --layout or --from."""
    record = None
    upscale = None                      # the layout's or the record's "upscale": (values, names)
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
        upscale = upscale_from_dict(record.get("upscale"), f"--from {args.from_image!r}")
    elif args.layout:
        layout = read_layout_file(args.layout)
        upscale = layout.get("upscale")
    else:
        subjects = [parse_subject(spec, i) for i, spec in enumerate(args.subject or ())]
        subjects += [parse_region(spec, j) for j, spec in enumerate(args.region or ())]
        layout = {"prompt": None, "mode": None, "priority": None, "subjects": subjects}
    upscale = merge_upscale(upscale, upscale_from_args(args))          # the options win
    return Job(prompt=args.prompt if args.prompt is not None else layout["prompt"],
               subjects=layout["subjects"], mode=args.mode or layout["mode"] or "overwrite",
               blocks=parse_blocks(args.blocks) if args.blocks is not None else layout.get("blocks"),
               priority=args.priority or layout["priority"] or "order",
               seed=args.seed if args.seed is not None else 0,
               steps=args.steps if args.steps is not None else DEFAULT_STEPS, guidance=args.guidance,
               height=args.height, width=args.width, negative_prompt=args.negative_prompt,
               out=args.out or "anyms.png", upscale=upscale and upscale[0], upscale_names=upscale and upscale[1])


def _record_defaults(args, record: dict) -> None:
    """--from: the record's values for every option not given on the command line."""
    model = record.get("model") or {}
    for option, value in (("negative_prompt", record.get("negative_prompt")), ("seed", record.get("seed")),
                          ("steps", record.get("steps")), ("guidance", record.get("guidance")),
                          ("height", record.get("height")), ("width", record.get("width")),
                          ("mode", record["layout"].get("mode")), ("priority", record["layout"].get("priority")),
                          ("dtype", model.get("dtype")), ("max_memory", model.get("max_memory"))):
        if getattr(args, option) is None and value is not None:
            setattr(args, option, value)
    if args.model is None and model.get("model"):
        args.model = model["model"]
        # the record's adapter and encoder go with the record's model only
        for option in ("ip_adapter", "image_encoder", "arch"):
            if getattr(args, option) is None and model.get(option):
                setattr(args, option, model[option])


def _check_record_files(record: dict, subjects, source: str) -> None:
    """--from: warn when a subject, mask or negative image file differs from the one that made the image."""
    from .metadata import file_sha256

    for i, (entry, subject) in enumerate(zip(record["layout"].get("subjects", []), subjects)):
        for key, path in (("image", subject.image), ("mask", subject.mask), ("negative_image", subject.negative_image)):
            want = entry.get(f"{key}_sha256") if isinstance(entry, dict) else None
            if path is None or want is None or not os.path.isfile(path):
                continue
            if file_sha256(path) != want:
                console.warn(f"--from {source!r}: subjects[{i}].{key} {path!r} has changed since the image was "
                             f"made (SHA-256 differs): the new image will differ")


@contextlib.contextmanager
def _naming_the_record(args):
    """--from: a refusal of what its record gave (its subjects and files, its model's sources)
    names the file as well."""
    try:
        yield
    except UsageError as e:
        if not args.from_image or str(e).startswith("--from "):
            raise
        raise UsageError(f"--from {args.from_image!r}: {e}") from None


def cmd_generate(args) -> int:
    sources = [option for option, given in (("--subject", args.subject), ("--layout", args.layout),
                                            ("--from", args.from_image), ("--jobs", args.jobs)) if given]
    if args.region and sources and sources[0] != "--subject":
        raise UsageError(f"--region goes with --subject or alone, not with {sources[0]} (in a layout file, give a "
                         f"subject a \"prompt\")")
    if args.jobs:
        from .jobs import run_jobs

        return run_jobs(args)
    for option in ("out_dir",):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option.replace('_', '-')} goes with --jobs (one image: --out)")

    # 1. Everything about the input and the outputs, before any model is loaded.
    job = _job_from_args(args)
    with _naming_the_record(args):
        run = run_from_args(args)
        check_job(apply_run_defaults(job, run), run.arch, upscale_geometry_before_loading(run),
                  num_adapters=run.num_adapters)
    paths = output_paths(job.out, run.pictures)
    check_outputs(paths, run.overwrite)         # makes the folder, which holds the lock
    # One writer per folder, as --jobs: held from before the model loads until the files are written.
    with folder_lock(paths):
        check_outputs(paths, run.overwrite)     # again, now that no other run writes there
        if args.max_memory is not None:         # reads configs only: refuses before any weights load
            run = plan_memory(args, run, [job])
        return _generate_one(args, job, run, paths)


def _generate_one(args, job, run, paths) -> int:
    """Steps 2 and 3 of one image (the input and outputs checked, the folder held)."""
    # 2. The model, and what this generation will take.
    with threads_for(run):
        pipe = load_for_run(args, run)
        with _naming_the_record(args):
            check_blocks_on_model(pipe, job)
            check_prompts_on_model(pipe, job)
        memory_report(pipe, run, [job])
        warn_unreached(pipe, job)

        # 3. Generation, with diffusers' progress bar.
        pipe.set_progress_bar_config(disable=False, desc="denoising")
        t0 = time.perf_counter()
        image = generate_image(pipe, job, run)
        seconds = time.perf_counter() - t0
    save_job(pipe, image, job, run, paths)
    n = len(job.subjects)
    upscaled = f", upscaled {job.upscale['scale']}x" if job.upscale else ""
    print(f"generated {image.width}x{image.height} in {seconds:.1f} s ({job.mode} mode, {n} subject{'s' * (n != 1)}, "
          f"seed {job.seed}{upscaled})")
    for label, path in zip(("image:  ", "layout: ", "routing:"), paths):
        if path:
            print(f"{label} {os.path.abspath(path)}")
    return 0


# ------------------------------------------------------------------- stderr
# The optional dependencies, and the extra of anyms-kernels that brings each.
EXTRAS = _EXTRAS

# Library log lines that say nothing a user can act on, dropped while a command runs:
# (logger, text). transformers falls back to its PIL image processors without torchvision,
# correctly; diffusers warns on every dtype cast that no module needs float32 ("[]").
QUIET_LOG_LINES = (("transformers.utils.import_utils", "requires torchvision"),
                   ("diffusers.models.modeling_utils", "should be kept in float32: []"))


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
        text = one_line(str(message).split("\n")[0])
        emit(f"anyms: warning: {category.__name__}: {text}")

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


def _is_main_process() -> bool:
    """False in the other processes of a distributed launch (torchrun, accelerate, mpirun)."""
    from .jobs import process_rank

    return process_rank() == 0


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
            print(f"anyms {args.command}: error: {one_line(message)}", file=sys.stderr)
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
