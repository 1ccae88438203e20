"""One image to make (:class:`Job`): what it is, its checks, how it is read from a layout file or a
jobs file's line, made and saved. ``anyms generate`` makes one job, ``--jobs`` many (anyms.jobs)."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, List, Optional

from . import console
from .errors import GenerationError, UsageError
from .loading import Run, default_size
from .preflight import MAX_STEPS
from .priority import PRIORITIES
from .blocks import check_blocks
from .timing import check_schedule, check_window

__all__ = ["Job", "check_job", "read_layout_file", "layout_from_dict", "output_paths", "check_outputs",
           "apply_run_defaults", "generate_image", "image_record", "save_job", "write_pictures", "warn_unreached",
           "memory_report", "memory_images", "folder_lock", "check_blocks_on_model", "check_prompts_on_model",
           "parse_blocks",
           "upscale_from_dict", "upscale_from_args", "merge_upscale", "check_upscale", "upscale_geometry_before_loading",
           "upscale_image",
           "LAYOUT_SCHEMA", "JOBS_SCHEMA"]

MODES = ("overwrite", "sum")
DEFAULT_STEPS = 50

LAYOUT_SCHEMA = """\
layout file (--layout FILE.json); image paths are relative to the file:
  {
    "prompt": "a dog and a cat on a sofa",    optional; the PROMPT argument wins
    "mode": "overwrite",                      optional; --mode wins
    "priority": "order",                      optional; --priority wins
    "blocks": "all",                          optional; --blocks wins
    "upscale": {"scale": 2, "tile": 1024, "overlap": 256, "strength": 0.3},
                                              optional; the --upscale options win
    "subjects": [                             required, at least one
      {"image": "dog.png", "box": [0.05, 0.3, 0.5, 0.95], "scale": 1.0, "label": "dog"},
      {"image": "cat.png", "mask": "cat_mask.png",
       "start": 0.0, "end": 0.6, "schedule": "linear_down", "negative_image": "blur.png", "blocks": "style"},
      {"prompt": "a red woollen blanket", "box": [0.0, 0.7, 1.0, 1.0], "end": 0.8}
    ]
  }
Each subject needs "image" or "prompt" (or both), and "box" or "mask" (or both: the mask is the region, the box only
places the label in the layout picture). "box" is [x0, y0, x1, y1] normalised to
the image (x right, y down, x1 > x0, y1 > y0). "mask" is an image file (PNG: any
nonzero pixel is inside) of the generated image's size; without --height/--width
the image takes the masks' size. A token is in a region when its cell meets the
box or holds a mask pixel. "scale" (default 1.0) and "label" (default: the file
name) are optional. Later subjects are on top where regions overlap ("priority":
"smaller_on_top" puts smaller regions on top). "start" and "end" (defaults 0 and 1)
are fractions of the denoising steps: step i of N acts when start <= i/N and
(i+1)/N <= end (diffusers' ControlNet rule), 0 <= start <= end <= 1. "schedule"
(default "constant"; "linear_up", "linear_down", "ease_in", "ease_out") shapes the
scale over that window, with p the step's progress in it: 1, p, 1 - p, p^2,
1 - (1 - p)^2. Outside its window (or at scale 0) a subject is absent: the subject
under it takes its tokens. "negative_image" (a path) is what the subject's branch
sees in classifier-free guidance's unconditional pass instead of diffusers' default,
so guidance pushes its region away from that image; it needs guidance (--guidance
above 1, SD and SDXL only: FLUX runs here without CFG) and is refused otherwise.
"blocks" (a subject's, else the top level's; default "all") picks the model blocks
its image acts on: a preset ("all", "style", "layout", "style_and_layout"; FLUX:
"all" only), a list of block names ["up_blocks.0.attentions.1"] or an object
{"block name": weight}; elsewhere the subject is absent. "adapter" (default 0) is the
IP-Adapter that encodes and projects the subject's image: the index of an --ip-adapter
option, in order (several --ip-adapter load several; SD and SDXL; not with "upscale"). "prompt"
(SD 1.5 and SDXL) is a regional prompt: inside the region its text replaces the prompt's text
in every cross-attention layer (overwrite: the last region with a prompt; sum: each adds),
within "start".."end", at weight 1; "scale", "schedule", "blocks", "negative_image" and
"adapter" are the image's (a subject with a prompt and no image leaves them out). Subjects of
several adapters and regional prompts act together, in one call. At most 77 CLIP tokens,
counted with the model's tokenizer once it is loaded, before any denoising. Guidance's
unconditional pass sees the negative prompt there; on SDXL the pooled text embedding stays
the prompt's. Not with "upscale". "upscale" (optional) makes the
image at its size, then upscales it ("scale" 2 or 4 times, required) with an img2img
pass over overlapping tiles in which every subject acts in its region only: "tile" and
"overlap" are pixels of the output (defaults: the model's native side and a quarter of
it, multiples of the U-Net's unit), "strength" in (0, 1] how far the tiles are noised
again (default 0.3); null: no upscale. No other keys are allowed.
"""

LAYOUT_KEYS = {"prompt", "mode", "priority", "subjects", "blocks", "upscale"}
SUBJECT_KEYS = {"image", "box", "mask", "scale", "label", "start", "end", "schedule", "negative_image", "blocks",
                "prompt", "adapter"}

JOBS_SCHEMA = """\
jobs file (--jobs FILE.jsonl): one JSON object a line (blank lines are skipped), each a
layout file's object (above; paths relative to the jobs file), with optionally:
  "out": "cats/0001.png"      the image, relative to --out-dir (default NNNNN.png, the
                              job's index); PNG only
  "seed": 7                   default: --seed (0) + the job's index (0-based, blank lines
                              not counted), so a job's image never depends on the process
  "negative_prompt", "steps", "guidance", "height", "width"   default: the options'
  "upscale": {...}            default: the --upscale options (its keys win); null: none
The model and its options (--model, --dtype, ...) are the command line's, for every job.
A job whose image exists and records this very job (a PNG's anyms record) is done and
skipped, so a stopped run resumes; an existing image made from anything else is refused
(--overwrite replaces it). One run writes in DIR at a time: it holds DIR/.anyms.lock (its
PID and host) while it runs, and another run on DIR refuses (exit 2); a lock left by a run
that was killed is taken over, and the temporary files it left are removed.
DIR/manifest.jsonl lists every job in file order: its status (done; skipped: done before;
failed, with its error), seconds and process. Under `accelerate launch` (one process per GPU)
or `torchrun --nproc-per-node N` (CPUs: gloo) each process makes its share of the jobs, and
the images are the ones one process would make.
"""
JOB_KEYS = {"out", "seed", "negative_prompt", "steps", "guidance", "height", "width"}


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
    blocks: Any = None              # the blocks of subjects without their own (anyms.blocks); None: all
    out: str = "anyms.png"
    where: str = ""                 # "" on the command line, "--jobs FILE:LINE" for a job
    index: int = 0
    plan: Any = None                # the checked subjects (check_job)
    hashes: Any = None              # the SHA-256 of the subjects' files, taken as check_job read them
    upscale: Optional[dict] = None  # {"scale", "tile", "overlap", "strength"} (None: the model's default), or none
    upscale_names: Optional[dict] = None    # how errors name each of those (where it came from)

    def name(self, key: str) -> str:
        """How errors name ``key``: ``--steps`` on the command line, ``--jobs f.jsonl:3: "steps"`` in a job."""
        return f'{self.where}: "{key}"' if self.where else f"--{key.replace('_', '-')}"

    def error(self, message: str) -> UsageError:
        return UsageError(f"{self.where}: {message}" if self.where else message)


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
    except (ValueError, RecursionError) as e:   # an integer of 5000 digits, arrays nested 100000 deep
        raise UsageError(f"{what}: not valid JSON ({e})") from None
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
    try:
        check_blocks(data.get("blocks"), '"blocks"')
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    items = data.get("subjects")
    if not isinstance(items, list) or not items:
        raise UsageError(f"{what}: \"subjects\" must be a non-empty list")
    subject_keys = SUBJECT_KEYS | set(extra_subject_keys)
    subjects = []
    for i, item in enumerate(items):
        where = f"{what}: subjects[{i}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where} must be an object with \"image\" or \"prompt\", and \"box\" or \"mask\"")
        unknown = sorted(set(item) - subject_keys)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(SUBJECT_KEYS)}")
        if "image" not in item and "prompt" not in item:
            raise UsageError(f"{where}: missing \"image\" or \"prompt\" (give one, or both)")
        if "box" not in item and "mask" not in item:
            raise UsageError(f"{where}: missing \"box\" or \"mask\" (give one, or both)")
        if "image" in item and not isinstance(item["image"], str):
            raise UsageError(f"{where}.image must be a path string")
        prompt = item.get("prompt")
        if "prompt" in item and (not isinstance(prompt, str) or not prompt.strip()):
            raise UsageError(f"{where}.prompt must be a non-empty string (a regional prompt), got {prompt!r}")
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
        adapter = item.get("adapter", 0)
        if isinstance(adapter, bool) or not isinstance(adapter, int) or adapter < 0:
            raise UsageError(f"{where}.adapter must be the index of a loaded IP-Adapter (0, 1, ...: the "
                             f"--ip-adapter options in order), got {adapter!r}")
        negative = item.get("negative_image")
        if negative is not None and not isinstance(negative, str):
            raise UsageError(f"{where}.negative_image must be a path string (an image file), got {negative!r}")
        try:      # a JSON number only: a string "0.5" is refused as check_window refuses it
            start, end = check_window(item.get("start", 0.0), item.get("end", 1.0), f"subjects[{i}]")
            schedule = check_schedule(item.get("schedule", "constant"), f"subjects[{i}].schedule")
            check_blocks(item.get("blocks"), f"subjects[{i}].blocks")
        except ValueError as e:
            raise UsageError(f"{what}: {e}") from None
        image = os.path.join(folder, item["image"]) if "image" in item else None
        subjects.append(Subject(image, None if box is None else tuple(box),
                                float(scale), label, mask=None if mask is None else os.path.join(folder, mask),
                                start=start, end=end, schedule=schedule, blocks=item.get("blocks"),
                                negative_image=None if negative is None else os.path.join(folder, negative),
                                prompt=prompt, adapter=adapter))
    out = {"prompt": data.get("prompt"), "mode": data.get("mode"), "priority": data.get("priority"),
           "subjects": subjects, "blocks": data.get("blocks")}
    if "upscale" in data:
        out["upscale"] = upscale_from_dict(data["upscale"], what)
    out.update({key: data[key] for key in extra_keys if key in data})
    return out


def parse_blocks(text: str):
    """``--blocks``: a preset name, or block names (dotted) separated by commas -> a preset or a list.
    A bare word is a preset's name: an unknown one is refused here, before any model loads."""
    from .blocks import PRESETS

    if text in PRESETS or ("." not in text and "," not in text):
        value = text
    else:
        value = [name.strip() for name in text.split(",")]
    try:
        check_blocks(value, "--blocks")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return value


# ------------------------------------------------------------------ upscaling
# the command line's name of each upscale option (the layout file's and the record's: "upscale.KEY")
UPSCALE_OPTIONS = {"scale": "--upscale", "tile": "--upscale-tile", "overlap": "--upscale-overlap",
                   "strength": "--upscale-strength"}


def _upscale_checked(values: dict, names: dict, steps=None, steps_name: str = "--steps", geometry=None) -> dict:
    """``values`` (the options given) checked by :func:`anyms.upscale_args.check_upscale_options`,
    errors naming each option by ``names``; returns all four, the defaults the geometry gives
    filled in (None where it is not known)."""
    from .upscale_args import DEFAULT_STRENGTH, check_upscale_options

    try:
        scale, tile, overlap, strength = check_upscale_options(
            values["scale"], values.get("tile"), values.get("overlap"), values.get("strength", DEFAULT_STRENGTH),
            steps, geometry=geometry, names={**names, "num_inference_steps": steps_name})
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {"scale": scale, "tile": tile, "overlap": overlap, "strength": strength}


def upscale_from_dict(value, what: str):
    """A layout file's (or a jobs line's, or a record's) ``"upscale"`` -> ``(values, names)``: the
    options it gives and how errors name them (``WHAT: upscale.tile``); None for null."""
    from .upscale_args import OPTIONS

    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError(f"{what}: upscale must be an object {{\"scale\": 2 or 4, \"tile\", \"overlap\", "
                         f"\"strength\"}} or null, got {value!r}")
    unknown = sorted(set(value) - set(OPTIONS))
    if unknown:
        raise UsageError(f"{what}: upscale: unknown key(s) {unknown}; allowed: {list(OPTIONS)}")
    if "scale" not in value:
        raise UsageError(f"{what}: upscale.scale is required (2 or 4)")
    names = {key: f"{what}: upscale.{key}" for key in OPTIONS}
    values = {key: value[key] for key in OPTIONS if value.get(key) is not None}
    _upscale_checked(values, names)
    return values, names


def upscale_from_args(args):
    """The --upscale options given on the command line -> ``(values, names)``, or None."""
    values = {key: getattr(args, "upscale" if key == "scale" else f"upscale_{key}", None) for key in UPSCALE_OPTIONS}
    values = {key: value for key, value in values.items() if value is not None}
    return (values, dict(UPSCALE_OPTIONS)) if values else None


def merge_upscale(base, over, where: str = ""):
    """``over``'s options over ``base``'s (each ``(values, names)`` or None) -> ``(values, names)``
    or None, checked without a model. Options without ``"scale"`` anywhere are refused."""
    if base is None and over is None:
        return None
    values, names = {}, dict(UPSCALE_OPTIONS)
    for part in (base, over):
        if part is not None:
            values.update(part[0])
            names.update({key: part[1][key] for key in part[1] if key in part[0] or key not in values})
    if "scale" not in values:
        given = next(names[key] for key in values)
        raise UsageError(f"{where + ': ' if where else ''}{given} goes with --upscale 2|4 (or \"upscale\" in the "
                         f"layout)")
    checked = _upscale_checked(values, names)      # the strength's default filled in: known without a model
    return {key: value for key, value in checked.items() if value is not None}, names


def upscale_geometry_before_loading(run: Run):
    """The U-Net geometry of the run's model, read without loading it: the tiny model's, a local
    folder's configs, else the standard one of its family (every SDXL or SD 1.5 checkpoint shares
    its family's U-Net and VAE shapes); None where not known. The loaded model is checked again."""
    from .loading import TINY_MODEL
    from .upscale_args import ARCH_GEOMETRY, UNetGeometry, geometry_of_folder

    model = run.sources["model"]
    if run.arch not in ARCH_GEOMETRY:                # FLUX: no U-Net (refused by check_job)
        return None
    if model == TINY_MODEL:
        from .tiny import TINY_IMAGE_SIZE, TINY_UNET_BLOCKS, TINY_VAE_BLOCKS

        factor = 2 ** (len(TINY_VAE_BLOCKS) - 1)
        return UNetGeometry(factor, len(TINY_UNET_BLOCKS[run.arch]), TINY_IMAGE_SIZE // factor)
    if isinstance(model, str) and os.path.isdir(model):
        return geometry_of_folder(model)
    return ARCH_GEOMETRY.get(run.arch)


def check_upscale(job: Job, geometry) -> Optional[dict]:
    """``job``'s upscale options checked against a U-Net ``geometry`` (None: the rules that need
    none) and its steps, and with a geometry the output's sides (the job's size, else the
    model's native one, times the scale). Returns the options, the defaults the geometry gives
    filled in."""
    from .preflight import check_image_size

    if job.upscale is None:
        return None
    names = job.upscale_names or UPSCALE_OPTIONS
    resolved = _upscale_checked(job.upscale, names, job.steps, '"steps"' if job.where else "--steps", geometry)
    if geometry is not None:
        scale = resolved["scale"]
        for key in ("height", "width"):
            side = getattr(job, key) or geometry.native
            try:
                check_image_size(side * scale, f"{names['scale']} {scale}: the output's {key}", geometry.unit)
            except ValueError as e:
                raise UsageError(f"{e} (the {key} {side} times {scale}; a multiple of {geometry.unit}, the U-Net's "
                                 f"unit)") from None
    return resolved


def _integer(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise UsageError(f"{name} must be {'at least ' + str(low) if high is None else f'in [{low}, {high}]'}, "
                         f"got {value}")
    return value


def check_job(job: Job, arch: str = "sdxl", upscale_geometry=None, num_adapters: Optional[int] = None) -> Job:
    """Check everything about ``job`` that needs no model (reads its images and masks); fills
    ``job.plan`` and, with masks, ``job.height``/``job.width``. Raises UsageError naming the argument.
    ``upscale_geometry``: the model's U-Net geometry where known before loading
    (:func:`upscale_geometry_before_loading`), for the upscale options' rules that need it.
    ``num_adapters``: the IP-Adapters the run loads (its --ip-adapter options), where known, for
    the subjects' ``adapter``."""
    import math as _math

    from .metadata import subject_hashes
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
    if job.upscale is not None:
        if flux:
            raise UsageError(f"{(job.upscale_names or UPSCALE_OPTIONS)['scale']}: tiled upscaling runs a U-Net "
                             f"(SDXL, SD 1.5); FLUX is not supported")
        if num_adapters is not None and num_adapters > 1:
            # refused now, not after the first pass has run (tiled_upscale refuses a pipeline with several)
            name = (job.upscale_names or UPSCALE_OPTIONS)["scale"]
            name = name if not job.where or name.startswith(job.where) else f"{job.where}: {name}"
            raise UsageError(f"{name}: tiled upscaling takes its subjects from one IP-Adapter, but {num_adapters} "
                             f"--ip-adapter are given; give one --ip-adapter, or leave out the upscale")
        check_upscale(job, None)
    if flux:
        for key in ("height", "width"):
            value = getattr(job, key)
            if value is not None and value % 16:
                raise UsageError(f"{job.name(key)} must be a multiple of 16 for FLUX (it packs the latent 2x2), "
                                 f"got {value}")
    try:
        check_blocks(job.blocks, job.name("blocks"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        # reads the images and masks, checks boxes, masks, mode and priority, and the masks' size
        job.plan = prepare_subjects(job.subjects, job.mode, job.priority, job.blocks)
        check_adapters(job, arch, num_adapters)
        job.height, job.width = job.plan.image_size(job.height, job.width, 16 if flux else 8)
        # None: the pipeline's default guidance, above 1 for SD and SDXL
        if flux:
            from .flux import FLUX_NO_PROMPTS

            job.plan.refuse_prompts(FLUX_NO_PROMPTS)
            job.plan.require_guidance(False, "FLUX runs here without classifier-free guidance")
        if job.upscale is None and job.guidance is not None:
            job.plan.require_guidance(job.guidance > 1, f"guidance {job.guidance:g} <= 1")
        job.hashes = subject_hashes(job.subjects)     # the record's, whatever happens to the files later
    except (ValueError, TypeError) as e:
        raise job.error(str(e)) from None
    if job.upscale is not None:
        try:
            job.plan.refuse_prompts("tiled upscaling does not take regional prompts; leave out the upscale or "
                                    "the prompt")
        except ValueError as e:      # the upscale's name says where it came from (--jobs FILE:LINE: ...)
            raise UsageError(f"{(job.upscale_names or UPSCALE_OPTIONS)['scale']}: {e}") from None
    if job.upscale is not None and upscale_geometry is not None:
        check_upscale(job, upscale_geometry)
    return job


def apply_run_defaults(job: Job, run: Run) -> Job:
    """The model's own defaults where ``job`` leaves an option unset (:attr:`Run.default_guidance`),
    before the job is checked; returns ``job``."""
    if job.guidance is None:
        job.guidance = run.default_guidance
    return job


def check_adapters(job: Job, arch: str, num_adapters: Optional[int]) -> None:
    """Every subject's ``adapter`` names an IP-Adapter the run loads (``num_adapters``, None: not
    known before loading); FLUX and tiled upscaling take adapter 0 only. ValueError naming
    ``subjects[i].adapter``."""
    from .pipeline import _check_adapter_index

    for i, subject in enumerate(job.subjects):
        name = f"subjects[{i}].adapter"
        if subject.adapter and arch == "flux":
            raise ValueError(f"{name} is {subject.adapter}: FLUX takes every subject from its one IP-Adapter, 0")
        if subject.adapter and job.upscale is not None:
            raise ValueError(f"{name} is {subject.adapter}: tiled upscaling takes every subject from IP-Adapter 0")
        _check_adapter_index(subject.adapter, name, num_adapters)


def output_paths(out: str, pictures: bool = True):
    """``(image, layout picture, routing picture)`` paths for ``--out`` (pictures None without ``pictures``)."""
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UsageError(f"--out must end in .png, .jpg, .jpeg or .webp, got {out!r}")
    if not pictures:
        return out, None, None
    return out, f"{stem}.layout.png", f"{stem}.routing.png"


def check_outputs(paths, overwrite: bool, what: str = "--out") -> None:
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


@contextlib.contextmanager
def folder_lock(paths, option: str = "--out"):
    """Hold the lock of the folder ``paths`` are written in (anyms.lock: one run writes in a folder at
    a time; a --jobs run there, another image's or a demo's, refuses, naming the holder; the
    refusal names ``option``). While it is taken, the temporary files a stopped writer of these
    paths left are removed. The folder must exist (:func:`check_outputs` makes it)."""
    from .lock import FolderBusy, FolderLock, launch_name
    from .outputs import remove_stale_temporaries

    paths = [p for p in paths if p]
    folder = os.path.dirname(os.path.abspath(paths[0]))
    lock = FolderLock(folder, launch_name(1), prepare=lambda: remove_stale_temporaries(paths), option=option)
    try:
        lock.acquire()
    except FolderBusy as e:
        raise UsageError(f"{option}: {e}") from None
    try:
        yield lock
    finally:
        lock.release()


def job_layout(pipe, job: Job, height: int, width: int):
    """The :class:`~anyms.Layout` the pipeline will build for ``job`` at ``height x width``."""
    plan = job.plan.resolve_blocks(pipe)
    if getattr(pipe, "unet", None) is None:           # FLUX
        from .flux import flux_layout

        return flux_layout([list(s.box) for s in plan.subjects], height, width,
                           vae_scale_factor=pipe.vae_scale_factor, **plan.layout_args())
    return plan.make_layout((height // pipe.vae_scale_factor, width // pipe.vae_scale_factor))


def _routing_grids(pipe, layout):
    """``{grid: [layer names]}`` of the layers AnyMS acts on, for ``layout`` (U-Net levels, or
    FLUX's one grid): the names say which subjects' blocks select each layer."""
    from .visualize import cross_attention_layers

    if layout.token_grid is not None:    # a transformer (FLUX): one grid, the IP-Adapter's double-stream blocks
        from .branches import adapter_layers

        return {layout.token_grid: adapter_layers(pipe)}
    return cross_attention_layers(pipe.unet, layout.latent_hw)


def _loop_steps(pipe, steps: int) -> int:
    """The length of the denoising loop of ``steps`` inference steps, ``pipe.num_timesteps`` once
    it runs (a window's steps are counted on it): the scheduler's timesteps for ``steps`` (PNDM
    runs one more), on a copy; FLUX's loop has ``steps``."""
    import copy

    if getattr(pipe, "unet", None) is None:
        return steps
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps, device="cpu")
    return len(scheduler.timesteps)


def check_blocks_on_model(pipe, job: Job) -> None:
    """The job's block names and presets against the loaded model (:func:`anyms.blocks.resolve_blocks`):
    a name with no IP-Adapter layer there, or a preset the model has no blocks for, is a UsageError
    naming ``subjects[i].blocks`` (or ``--blocks`` / the job's ``"blocks"``). Names only: no model work."""
    from .blocks import resolve_blocks
    from .branches import adapter_layers

    layers = adapter_layers(pipe)
    if job.blocks is not None and any(s.blocks is None for s in job.subjects):
        try:
            resolve_blocks(job.blocks, layers, job.name("blocks"))
        except ValueError as e:
            raise UsageError(str(e)) from None
    for i, subject in enumerate(job.subjects):
        if subject.blocks is not None:
            try:
                resolve_blocks(subject.blocks, layers, f"subjects[{i}].blocks")
            except ValueError as e:
                raise job.error(str(e)) from None


def check_prompts_on_model(pipe, job: Job) -> None:
    """Each regional prompt of ``job`` against the loaded pipeline's tokenizers (at most 77 CLIP
    tokens): a UsageError naming ``subjects[i].prompt``, after loading and before any denoising
    (the tokenizer loads with the model). Tokenizers only: no model work."""
    from .regional_prompts import check_prompt_lengths, prompt_tokenizers

    try:
        check_prompt_lengths(job.subjects, prompt_tokenizers(pipe))
    except ValueError as e:
        raise job.error(str(e)) from None


def warn_unreached(pipe, job: Job, warn=None) -> List[str]:
    """Warn, one line per subject, where a subject acts nowhere (scale 0, a window holding no step,
    blocks selecting no layer) or gets no token at some level; returns the lines."""
    from .preflight import idle_subjects, unreached_message, unreached_subjects

    height, width = job.height or default_size(pipe)[0], job.width or default_size(pipe)[1]
    layout = job_layout(pipe, job, height, width)
    names = [f"subjects[{i}]" for i in job.plan.order]
    grids = _routing_grids(pipe, layout)
    steps = _loop_steps(pipe, job.steps) if layout.timed else None
    lines = unreached_message(unreached_subjects(layout, grids, steps), job.plan.labels, names,
                              idle=idle_subjects(layout, grids, steps), kinds=layout.kinds)
    for line in lines:
        (warn or console.warn)(f"{job.where}: {line}" if job.where else line)
    return lines


def memory_images(pipe, jobs) -> List[tuple]:
    """The distinct images of ``jobs`` as the memory estimate takes them: ``(height, width, cfg,
    upscale)``, the size with ``pipe``'s default filled in, CFG where the guidance is above 1,
    ``upscale`` the job's ``(scale, tile, overlap)`` with the model's defaults (or None). ``pipe``
    may be the meta-device skeleton (anyms.budget) or the loaded pipeline."""
    out = []
    for job in jobs:
        height, width = job.height or default_size(pipe)[0], job.width or default_size(pipe)[1]
        up = None
        if job.upscale is not None and getattr(pipe, "unet", None) is not None:
            from .upscale_args import geometry_of_pipe

            resolved = check_upscale(job, geometry_of_pipe(pipe))
            up = (resolved["scale"], resolved["tile"], resolved["overlap"])
        image = (height, width, job.guidance is None or job.guidance > 1, up)
        if image not in out:
            out.append(image)
    return out


def memory_report(pipe, run: Run, jobs, log=None, warn=None):
    """Print the estimated peak memory of the largest of ``jobs``' images (its upscale pass
    included); warn if it is above what the device has free."""
    from .preflight import GIB, device_memory, estimate_peak_memory

    images = memory_images(pipe, jobs)
    est, (height, width, _, up) = max(
        ((estimate_peak_memory(pipe, h, w, cfg=cfg, offload=run.offload, vae_tiling=run.vae_tiling, dtype=run.dtype,
                               upscale=up), (h, w, cfg, up)) for h, w, cfg, up in images), key=lambda p: p[0].total)
    what = f"{width}x{height}" + (f" upscaled {up[0]}x" if up else "")
    largest = ", the largest job" if len(images) > 1 else ""
    (log or console.info)(f"estimated peak memory, {what} on {run.device}{largest}: {est.describe()}")
    memory = device_memory(run.device)
    if memory is not None and est.total > memory[0]:
        hints = [h for h, on in (("--vae-tiling", not run.vae_tiling), ("--offload model", run.offload == "none"
                                 and run.device.type == "cuda"), ("a smaller size", True),
                                 ("a smaller --upscale-tile", up is not None)) if on]
        (warn or console.warn)(f"the estimate is above the {memory[0] / GIB:.1f} GiB free on {run.device}: "
                               f"expect to run out of memory ({', '.join(hints)} need less)")
    return est


def generate_image(pipe, job: Job, run: Run):
    """Make ``job``'s image; out of memory is a GenerationError naming the size."""
    import torch

    call = dict(subjects=job.subjects, anyms_mode=job.mode, anyms_priority=job.priority,
                anyms_blocks=job.blocks,
                negative_prompt=job.negative_prompt, height=job.height, width=job.width,
                num_inference_steps=job.steps, generator=torch.Generator("cpu").manual_seed(job.seed))
    if job.guidance is not None:
        call["guidance_scale"] = job.guidance
    if job.upscale is not None:         # the defaults of the loaded model, checked before it generates
        from .upscale_args import geometry_of_pipe

        job.upscale = check_upscale(job, geometry_of_pipe(pipe))
    try:
        image = pipe(job.prompt, **call).images[0]
        if job.upscale is not None:
            image = upscale_image(pipe, image, job)
        return image
    except torch.OutOfMemoryError:
        raise GenerationError(
            f"{job.where + ': ' if job.where else ''}out of memory on {run.device} making "
            f"{job.width or 'default'}x{job.height or 'default'}: try --vae-tiling, --offload model or a smaller "
            f"size") from None


def upscale_image(pipe, image, job: Job):
    """``image`` (the job's native-size generation) upscaled by the job's resolved options: the
    tiled img2img pass with the job's subjects, prompt, steps, guidance and seed."""
    from .upscale import tiled_upscale

    up = job.upscale
    extra = {} if job.guidance is None else {"guidance_scale": job.guidance}
    bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**bar, "desc": "upscaling"})     # the img2img pass takes the pipe's bar
    try:
        return tiled_upscale(pipe, image, job.prompt, subjects=job.subjects, scale=up["scale"], tile=up["tile"],
                             overlap=up["overlap"], strength=up["strength"], num_inference_steps=job.steps,
                             seed=job.seed, anyms_mode=job.mode, anyms_priority=job.priority,
                             anyms_blocks=job.blocks, negative_prompt=job.negative_prompt, **extra).images[0]
    finally:
        pipe.set_progress_bar_config(**bar)


def image_record(pipe, job: Job, run: Run, image=None) -> dict:
    """The record stored in ``job``'s PNG (see :mod:`anyms.metadata`); without ``image``, what is known
    before generating (height, width and guidance None where the model's defaults will apply)."""
    from .metadata import build_record

    guidance = job.guidance
    if image is not None and guidance is None:
        guidance = getattr(pipe, "guidance_scale", None)     # the pipeline's default, as it ran
    upscale = None
    if job.upscale is not None:         # the options as they ran (before: None where the model's default)
        upscale = {key: job.upscale.get(key) for key in UPSCALE_OPTIONS}
    scale = upscale["scale"] if upscale is not None else 1
    record = build_record(
        prompt=job.prompt, negative_prompt=job.negative_prompt, subjects=job.subjects, mode=job.mode,
        priority=job.priority, blocks=job.blocks, seed=job.seed, steps=job.steps, guidance=guidance,
        # the size generated (an upscaled image's is its size over the scale)
        height=image.height // scale if image is not None else job.height,
        width=image.width // scale if image is not None else job.width,
        model=run.model_record(), folder=os.path.dirname(os.path.abspath(job.out)),
        device=str(run.device) if image is not None else None, hashes=job.hashes, upscale=upscale)
    return record


def save_job(pipe, image, job: Job, run: Run, paths, warn=None, overwrite_pictures: Optional[bool] = None) -> None:
    """Write ``job``'s pictures and image (PNG: with its record), atomically, replacing nothing without --overwrite."""
    from .metadata import png_info

    info = png_info(image_record(pipe, job, run, image)) if paths[0].lower().endswith(".png") else None
    write_pictures(pipe, image, paths, overwrite=run.overwrite, pnginfo=info, warn=warn,
                    overwrite_pictures=overwrite_pictures)


def write_pictures(pipe, image, paths, *, overwrite: bool = True, pnginfo=None, warn=None,
                    overwrite_pictures: Optional[bool] = None) -> None:
    """Write, each atomically, the layout and routing pictures where ``paths`` names them, then
    the image (with ``pnginfo``'s text chunks): an image on disk means its pictures are there
    too. Nothing existing is replaced without ``overwrite`` (``overwrite_pictures`` for the
    pictures; default the same)."""
    from .outputs import OutputError, WriteError, atomic_save
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
                (warn or console.warn)(f"no routing picture: {e.name} is not installed "
                                       f"(pip install 'anyms-kernels[viz]')")
            else:
                atomic_save(picture, paths[2], overwrite=keep)
        atomic_save(image, paths[0], overwrite=overwrite, pnginfo=pnginfo)
    except WriteError as e:             # a full disk: the input was good
        raise GenerationError(str(e)) from None
    except OutputError as e:
        raise UsageError(str(e)) from None
