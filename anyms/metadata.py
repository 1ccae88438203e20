"""What made an image, stored in the image: the PNG text chunk ``anyms``.

``anyms generate`` writes, in every PNG it makes, one compressed international text
chunk (iTXt) named ``anyms`` holding a JSON record::

    {"format": 1, "anyms_version": "0.1.0",
     "versions": {"torch": "...", "diffusers": "...", "transformers": "..."},
     "prompt": "...", "negative_prompt": null,
     "layout": {"mode": "overwrite", "priority": "order", "subjects": [
         {"image": "dog.png", "image_sha256": "...", "box": [0.05, 0.3, 0.5, 0.95], "scale": 1.0},
         {"image": "cat.png", "image_sha256": "...", "mask": "cat_mask.png", "mask_sha256": "...",
          "scale": 0.8, "label": "cat", "start": 0.0, "end": 0.6, "schedule": "linear_down",
          "blocks": "style"},
         {"prompt": "a red woollen blanket", "box": [0.0, 0.7, 1.0, 1.0], "scale": 1.0}]},
     "seed": 0, "steps": 50, "guidance": 5.0, "height": 1024, "width": 1024,
     "model": {"arch": "sdxl", "model": "stabilityai/stable-diffusion-xl-base-1.0",
               "ip_adapter": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors",
               "image_encoder": null, "dtype": "float16", "max_memory": "8GB"},
     "device": "cuda",
     "upscale": {"scale": 2, "tile": 1024, "overlap": 256, "strength": 0.3}}

``layout`` is a layout file (``anyms generate --help``; a subject's ``start``, ``end`` and
``schedule`` are written only when not the defaults, 0, 1 and constant, its ``negative_image``
with its ``negative_image_sha256`` only when it has one; ``image`` and ``image_sha256`` only for a
subject with an image, ``prompt`` (its regional prompt) only for one with a prompt; ``blocks``, a
subject's when given, the layout's when given and not ``"all"``; ``adapter``, the subject's
IP-Adapter, only when not 0) whose paths are relative to
the image's folder, plus each file's SHA-256, so ``anyms generate --from image.png``
can make the image again and say when a subject or mask file has changed since.
With several IP-Adapters (``--ip-adapter`` given more than once), ``model.ip_adapter`` is the list of
them, in order (a subject's ``adapter`` indexes it), and ``model.image_encoder`` null or a list of one
encoder per adapter.
``model.max_memory`` (``--max-memory`` as given) is there only where it was given: ``--from``
plans again within it (the ``dtype`` it chose is kept). ``upscale`` is there only for an image
upscaled after its generation (``anyms generate --upscale``): its options as they ran; ``height``
and ``width`` are then the size generated, the image's size over the scale. ``guidance`` is null
where the pipeline's default was used. ``device`` is for the
record only (``--from`` uses the machine's). Also written: ``Software``.

:func:`read_record` checks a record against this schema (:func:`check_record`): every
key's type and range, no unknown keys, every required key present; a record that fails
is one line naming the file and the key (``--from 'x.png': its record's
"layout.subjects[0].scale" must be ...``).

No diffusers import at module level (the schema's vocabularies are read from their modules
when a record is checked).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from typing import Any, Dict, List, Optional

from .blocks import blocks_entry

__all__ = ["METADATA_KEY", "FORMAT", "file_sha256", "relative_path", "subject_hashes", "subject_entry", "build_record",
           "png_info", "read_record", "check_record", "record_layout", "differences"]

METADATA_KEY = "anyms"
FORMAT = 1
HASH_KEYS = ("image_sha256", "mask_sha256", "negative_image_sha256")
# The schema of format 1: the keys of each object, and which of them are required.
RECORD_KEYS = {"format", "anyms_version", "versions", "prompt", "negative_prompt", "layout", "seed", "steps",
               "guidance", "height", "width", "model", "device", "upscale"}
RECORD_OPTIONAL = {"device", "upscale"}
LAYOUT_KEYS = {"mode", "priority", "subjects", "blocks"}
LAYOUT_OPTIONAL = {"blocks"}
SUBJECT_KEYS = {"image", "image_sha256", "box", "mask", "mask_sha256", "scale", "label", "start", "end", "schedule",
                "negative_image", "negative_image_sha256", "blocks", "prompt", "adapter"}
MODEL_KEYS = {"arch", "model", "ip_adapter", "image_encoder", "dtype", "max_memory"}
MODEL_OPTIONAL = {"max_memory"}         # --max-memory as given, where it was
UPSCALE_KEYS = {"scale", "tile", "overlap", "strength"}


def model_adapters(model) -> Optional[int]:
    """The number of IP-Adapters a record's ``"model"`` names (a list: several), None where unknown."""
    if not isinstance(model, dict):
        return None
    value = model.get("ip_adapter")
    return len(value) if isinstance(value, list) else 1


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes (remembered while the file's size and time stay the same)."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_path(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` (forward slashes), or absolute where there is no relative path."""
    try:
        return os.path.relpath(os.path.abspath(path), folder).replace(os.sep, "/")
    except ValueError:   # another drive (Windows)
        return os.path.abspath(path)


def subject_hashes(subjects) -> List[Dict[str, str]]:
    """The SHA-256 of each subject's files (``{"image_sha256", "mask_sha256", "negative_image_sha256"}``,
    the mask's and the negative image's where it has one), taken when the job is checked: a file
    moved or changed later, while the model loads or generates, costs nothing, and the record
    names the bytes that were read. Raises ValueError naming ``subjects[i].image`` / ``.mask`` /
    ``.negative_image`` when a file cannot be read."""
    out = []
    for i, subject in enumerate(subjects):
        hashes = {}
        for key, path in (("image", subject.image), ("mask", subject.mask),
                          ("negative_image", subject.negative_image)):
            if path is None:
                continue
            try:
                hashes[f"{key}_sha256"] = file_sha256(os.fspath(path))
            except (OSError, TypeError) as e:
                raise ValueError(f"subjects[{i}].{key}: cannot read {path!r} ({getattr(e, 'strerror', None) or e})") \
                    from None
        out.append(hashes)
    return out


def subject_entry(subject, folder: str, hashes: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """A layout-file subject for ``subject`` (an :class:`anyms.Subject` with file paths), paths
    relative to ``folder``, with the files' SHA-256: ``hashes`` (from :func:`subject_hashes`),
    else read now."""
    if hashes is None:
        hashes = subject_hashes([subject])[0]
    entry: Dict[str, Any] = {}
    if subject.image is not None:
        entry.update(image=relative_path(subject.image, folder), image_sha256=hashes["image_sha256"])
    if getattr(subject, "prompt", None) is not None:
        entry["prompt"] = subject.prompt
    if subject.box is not None:
        entry["box"] = [float(v) for v in subject.box]
    if subject.mask is not None:
        entry["mask"] = relative_path(subject.mask, folder)
        entry["mask_sha256"] = hashes["mask_sha256"]
    entry["scale"] = float(subject.scale)
    if subject.label:
        entry["label"] = subject.label
    # the timing keys only where they are not the defaults: an untimed job's record is as before
    if float(subject.start) != 0.0:
        entry["start"] = float(subject.start)
    if float(subject.end) != 1.0:
        entry["end"] = float(subject.end)
    if subject.schedule != "constant":
        entry["schedule"] = subject.schedule
    if subject.negative_image is not None:
        entry["negative_image"] = relative_path(subject.negative_image, folder)
        entry["negative_image_sha256"] = hashes["negative_image_sha256"]
    blocks = getattr(subject, "blocks", None)
    if blocks is not None:          # "all" too: it overrides the layout's "blocks" for this subject
        entry["blocks"] = blocks_entry(blocks) or "all"
    if getattr(subject, "adapter", 0):      # adapter 0, the default, is left out: a one-adapter record is as before
        entry["adapter"] = int(subject.adapter)
    return entry


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_record(*, prompt: str, negative_prompt: Optional[str], subjects, mode: str, priority: str, seed: int,
                 steps: int, guidance: Optional[float], height: Optional[int], width: Optional[int],
                 model: Dict[str, Any], folder: str, device: Optional[str] = None,
                 hashes: Optional[List[Dict[str, str]]] = None, blocks=None,
                 upscale: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The record of one generation (see the module docstring); subject paths relative to ``folder``;
    ``hashes``: the subjects' files' SHA-256 taken when they were read (:func:`subject_hashes`),
    else read now; ``blocks``: the layout's default blocks (written when given and not "all");
    ``upscale``: the tiled upscale's options (``scale``, ``tile``, ``overlap``, ``strength``),
    written only for an upscaled image."""
    from . import __version__

    record = {
        "format": FORMAT,
        "anyms_version": __version__,
        "versions": versions(),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "layout": {"mode": mode, "priority": priority,
                   "subjects": [subject_entry(s, folder, None if hashes is None else hashes[i])
                                for i, s in enumerate(subjects)]},
        "seed": int(seed),
        "steps": int(steps),
        "guidance": None if guidance is None else float(guidance),
        "height": None if height is None else int(height),
        "width": None if width is None else int(width),
        "model": dict(model),
    }
    if device is not None:
        record["device"] = device
    if blocks_entry(blocks) is not None:
        record["layout"]["blocks"] = blocks_entry(blocks)
    if upscale is not None:
        record["upscale"] = dict(upscale)
    return record


def png_info(record: Dict[str, Any]):
    """A ``PngInfo`` holding ``record`` (compressed iTXt ``anyms``) and ``Software``."""
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    info = PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True), zip=True)
    info.add_text("Software", f"anyms-kernels {__version__}")
    return info


def read_record(path: str, what: str = "--from") -> Dict[str, Any]:
    """The record stored in the PNG at ``path``; raises ValueError naming ``what`` if there is none."""
    from PIL import Image, UnidentifiedImageError

    where = f"{what} {path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file")
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.load()                       # text chunks after the image data are read here
            text = dict(getattr(im, "text", {}) or {})
    except Image.DecompressionBombError as e:
        raise ValueError(f"{where} is too large to decode ({e})") from None
    except ValueError as e:             # Pillow's limit on a text chunk (PngImagePlugin.MAX_TEXT_CHUNK)
        raise ValueError(f"{where}: a text chunk is larger than Pillow reads ({e}): not a record anyms generate "
                         f"wrote") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{where}: cannot read it as an image ({e})") from None
    if fmt != "PNG":
        raise ValueError(f"{where} is a {fmt} file: only PNGs made by anyms generate hold what made them")
    raw = text.get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{where} holds no anyms record (a PNG made by anyms generate has an \"{METADATA_KEY}\" "
                         f"text chunk)")
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, a 5000-digit integer, nesting too deep
        raise ValueError(f"{where}: its anyms record is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("layout"), dict):
        raise ValueError(f"{where}: its anyms record is not an object with a \"layout\"")
    if record.get("format") != FORMAT:
        raise ValueError(f"{where}: anyms record format {_short(record.get('format'))}; this version reads format "
                         f"{FORMAT}")
    check_record(record, where)
    return record


def _short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a record may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_record(record: Dict[str, Any], where: str) -> None:
    """Check ``record`` against the schema of format 1 (the module docstring; what
    :func:`build_record` writes): no unknown key, every required key, each value's type and
    range. Raises ValueError starting with ``where`` and naming the key (dotted:
    ``layout.subjects[0].scale``)."""
    from anyms_kernels.regions import MODES

    from .loading import ARCHS, DTYPES, TINY_MODEL, TOY_MODEL
    from .pipeline import _check_box, _check_scale
    from .priority import PRIORITIES
    from .preflight import MAX_STEPS, check_image_size
    from .blocks import check_blocks
    from .timing import SCHEDULES, check_window

    def fail(key: str, must: str, value) -> None:
        raise ValueError(f"{where}: its record's \"{key}\" must be {must}, got {_short(value)}")

    def obj(value, key: str, allowed: set, optional: set = frozenset()) -> dict:
        named = f"its record's \"{key}\"" if key else "its record"
        if not isinstance(value, dict):
            fail(key, "an object", value)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"{where}: {named} holds unknown key(s) {_short(unknown)}; allowed: {sorted(allowed)}")
        missing = sorted(allowed - optional - set(value))
        if missing:
            raise ValueError(f"{where}: {named} lacks {missing}")
        return value

    def text(value, key: str, optional: bool = False, empty: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or (not value and not empty) or "\0" in value:
            fail(key, f"a {'' if empty else 'non-empty '}string without NUL" + (" or null" if optional else ""),
                 value)

    def choice(value, key: str, choices) -> None:
        if not isinstance(value, str) or value not in choices:
            fail(key, f"one of {list(choices)}", value)

    def integer(value, key: str, low: int, high: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            fail(key, f"an integer in [{low}, {high}]", value)

    def sha256(value, key: str) -> None:
        if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
            fail(key, "a SHA-256 (64 lowercase hex digits)", value)

    def checked(check, value, key: str) -> None:
        """One of the pipeline's own checks (the rule a subject's box or scale follows)."""
        try:
            check(value, key)
        except (ValueError, TypeError) as e:
            message = str(e)
            if message.startswith(key):
                message = f"\"{key}\"{message[len(key):]}"
            raise ValueError(f"{where}: its record's {message}") from None

    obj(record, "", RECORD_KEYS, RECORD_OPTIONAL)
    text(record["anyms_version"], "anyms_version")
    if not isinstance(record["versions"], dict):
        fail("versions", "an object", record["versions"])
    for name, version in record["versions"].items():
        plain = name.isascii() and name.replace("-", "_").replace(".", "_").isidentifier()
        text(version, f"versions.{name}" if plain else f"versions[{name!r}]")    # a key of any characters
    text(record["prompt"], "prompt")
    text(record["negative_prompt"], "negative_prompt", optional=True, empty=True)
    layout = obj(record["layout"], "layout", LAYOUT_KEYS, LAYOUT_OPTIONAL)
    if "blocks" in layout:
        checked(check_blocks, layout["blocks"], "layout.blocks")
    choice(layout["mode"], "layout.mode", MODES)
    choice(layout["priority"], "layout.priority", PRIORITIES)
    subjects = layout["subjects"]
    if not isinstance(subjects, list) or not subjects:
        fail("layout.subjects", "a non-empty list", subjects)
    for i, subject in enumerate(subjects):
        key = f"layout.subjects[{i}]"
        obj(subject, key, SUBJECT_KEYS, SUBJECT_KEYS)
        if "image" in subject or "image_sha256" in subject:
            text(subject.get("image"), f"{key}.image")
            sha256(subject.get("image_sha256"), f"{key}.image_sha256")
        elif "prompt" not in subject:
            raise ValueError(f"{where}: its record's \"{key}\" has neither an \"image\" nor a \"prompt\"")
        if "prompt" in subject:
            text(subject["prompt"], f"{key}.prompt")
        if "box" not in subject and "mask" not in subject:
            raise ValueError(f"{where}: its record's \"{key}\" has neither a \"box\" nor a \"mask\"")
        if "box" in subject:
            box = subject["box"]
            if not isinstance(box, list) or len(box) != 4 or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
                fail(f"{key}.box", "a list of 4 numbers [x0, y0, x1, y1]", box)
            checked(_check_box, box, f"{key}.box")
        if "mask" in subject or "mask_sha256" in subject:
            text(subject.get("mask"), f"{key}.mask")
            sha256(subject.get("mask_sha256"), f"{key}.mask_sha256")
        if "scale" in subject:
            if isinstance(subject["scale"], bool) or not isinstance(subject["scale"], (int, float)):
                fail(f"{key}.scale", "a number", subject["scale"])
            checked(_check_scale, subject["scale"], f"{key}.scale")
        if "label" in subject:
            text(subject["label"], f"{key}.label")
        for bound in ("start", "end"):
            if bound in subject and (isinstance(subject[bound], bool) or not isinstance(subject[bound], (int, float))):
                fail(f"{key}.{bound}", "a number in [0, 1]", subject[bound])
        try:
            check_window(subject.get("start", 0.0), subject.get("end", 1.0), key)
        except ValueError as e:
            message = str(e).replace(f"{key}.start", f"\"{key}.start\"").replace(f"{key}.end", f"\"{key}.end\"")
            raise ValueError(f"{where}: its record's {message}") from None
        if "schedule" in subject:
            choice(subject["schedule"], f"{key}.schedule", SCHEDULES)
        if "negative_image" in subject or "negative_image_sha256" in subject:
            text(subject.get("negative_image"), f"{key}.negative_image")
            sha256(subject.get("negative_image_sha256"), f"{key}.negative_image_sha256")
        if "blocks" in subject:
            checked(check_blocks, subject["blocks"], f"{key}.blocks")
        if "adapter" in subject:
            loaded = model_adapters(record.get("model"))
            integer(subject["adapter"], f"{key}.adapter", 0, (loaded or 1) - 1)
    integer(record["seed"], "seed", 0, 2 ** 64 - 1)
    integer(record["steps"], "steps", 1, MAX_STEPS)
    guidance = record["guidance"]
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        fail("guidance", "a finite number or null", guidance)
    for key in ("height", "width"):
        value = record[key]
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                fail(key, "an integer or null", value)
            checked(check_image_size, value, key)
    model = obj(record["model"], "model", MODEL_KEYS, MODEL_OPTIONAL)
    choice(model["arch"], "model.arch", ARCHS)
    text(model["model"], "model.model")
    for key in ("ip_adapter", "image_encoder"):
        value = model[key]
        if isinstance(value, list):           # several IP-Adapters: one entry per adapter
            if len(value) < 2:
                fail(f"model.{key}", "a string, null, or a list of one entry per IP-Adapter (two or more)", value)
            for i, entry in enumerate(value):
                text(entry, f"model.{key}[{i}]", optional=key == "image_encoder")
        else:
            text(value, f"model.{key}", optional=True)
        if model["model"] in (TINY_MODEL, TOY_MODEL) and value is not None:      # they bring their own
            fail(f"model.{key}", f"null with the {model['model']} model", value)
    if isinstance(model["image_encoder"], list) and (
            not isinstance(model["ip_adapter"], list) or len(model["image_encoder"]) != len(model["ip_adapter"])):
        fail("model.image_encoder", "a list with one entry per \"model.ip_adapter\" (or a string, or null)",
             model["image_encoder"])
    choice(model["dtype"], "model.dtype", DTYPES)
    if "max_memory" in model:
        from .sizes import SIZE_FORMS, parse_size

        try:
            parse_size(model["max_memory"], "model.max_memory")
        except ValueError:
            fail("model.max_memory", SIZE_FORMS, model["max_memory"])
    if "device" in record:
        text(record["device"], "device")
    if "upscale" in record:
        from .upscale_args import check_upscale_options

        upscale = obj(record["upscale"], "upscale", UPSCALE_KEYS)
        for key in ("tile", "overlap"):     # the record holds them as they ran
            if upscale[key] is None:
                fail(f"upscale.{key}", "an integer (pixels of the output)", upscale[key])
        try:
            check_upscale_options(upscale["scale"], upscale["tile"], upscale["overlap"], upscale["strength"],
                                  record["steps"], names={**{key: f"its record's \"upscale.{key}\"" for key in
                                                             UPSCALE_KEYS}, "num_inference_steps": "\"steps\""})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def record_layout(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record's layout as a layout file's dict (file hashes dropped), with its prompt."""
    layout = dict(record["layout"])
    subjects = layout.get("subjects")
    if isinstance(subjects, list):
        layout["subjects"] = [{k: v for k, v in s.items() if k not in HASH_KEYS} if isinstance(s, dict) else s
                              for s in subjects]
    layout["prompt"] = record.get("prompt")
    return layout


def differences(record: Dict[str, Any], expected: Dict[str, Any], prefix: str = "") -> List[str]:
    """The keys (dotted) where ``record`` differs from ``expected``; None in ``expected`` matches anything."""
    out = []
    for key, want in expected.items():
        if want is None:
            continue
        have = record.get(key) if isinstance(record, dict) else None
        if isinstance(want, dict) and isinstance(have, dict):
            out += differences(have, want, f"{prefix}{key}.")
        elif have != want:
            out.append(f"{prefix}{key}")
    return out
