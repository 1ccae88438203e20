"""What made an image, stored in the image: the PNG text chunk ``anyms``.

``anyms generate`` writes, in every PNG it makes, one compressed international text
chunk (iTXt) named ``anyms`` holding a JSON record::

    {"format": 1, "anyms_version": "0.1.0",
     "versions": {"torch": "...", "diffusers": "...", "transformers": "..."},
     "prompt": "...", "negative_prompt": null,
     "layout": {"mode": "overwrite", "priority": "order", "subjects": [
         {"image": "dog.png", "image_sha256": "...", "box": [0.05, 0.3, 0.5, 0.95], "scale": 1.0},
         {"image": "cat.png", "image_sha256": "...", "mask": "cat_mask.png", "mask_sha256": "...",
          "scale": 0.8, "label": "cat"}]},
     "seed": 0, "steps": 50, "guidance": 5.0, "height": 1024, "width": 1024,
     "model": {"arch": "sdxl", "model": "stabilityai/stable-diffusion-xl-base-1.0",
               "ip_adapter": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors",
               "image_encoder": null, "dtype": "float16"},
     "device": "cuda"}

``layout`` is a layout file (``anyms generate --help``) whose paths are relative to
the image's folder, plus each file's SHA-256, so ``anyms generate --from image.png``
can make the image again and say when a subject or mask file has changed since.
``guidance`` is null where the pipeline's default was used. ``device`` is for the
record only (``--from`` uses the machine's). Also written: ``Software``.

No diffusers import here.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

__all__ = ["METADATA_KEY", "FORMAT", "file_sha256", "relative_path", "subject_entry", "build_record", "png_info",
           "read_record", "record_layout", "differences"]

METADATA_KEY = "anyms"
FORMAT = 1
HASH_KEYS = ("image_sha256", "mask_sha256")


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


def subject_entry(subject, folder: str) -> Dict[str, Any]:
    """A layout-file subject for ``subject`` (an :class:`anyms.Subject` with file paths), paths
    relative to ``folder``, with the files' SHA-256."""
    entry: Dict[str, Any] = {"image": relative_path(subject.image, folder),
                             "image_sha256": file_sha256(subject.image)}
    if subject.box is not None:
        entry["box"] = [float(v) for v in subject.box]
    if subject.mask is not None:
        entry["mask"] = relative_path(subject.mask, folder)
        entry["mask_sha256"] = file_sha256(subject.mask)
    entry["scale"] = float(subject.scale)
    if subject.label:
        entry["label"] = subject.label
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
                 model: Dict[str, Any], folder: str, device: Optional[str] = None) -> Dict[str, Any]:
    """The record of one generation (see the module docstring); subject paths relative to ``folder``."""
    from . import __version__

    record = {
        "format": FORMAT,
        "anyms_version": __version__,
        "versions": versions(),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "layout": {"mode": mode, "priority": priority,
                   "subjects": [subject_entry(s, folder) for s in subjects]},
        "seed": int(seed),
        "steps": int(steps),
        "guidance": None if guidance is None else float(guidance),
        "height": None if height is None else int(height),
        "width": None if width is None else int(width),
        "model": dict(model),
    }
    if device is not None:
        record["device"] = device
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
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: its anyms record is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("layout"), dict):
        raise ValueError(f"{where}: its anyms record is not an object with a \"layout\"")
    if record.get("format") != FORMAT:
        raise ValueError(f"{where}: anyms record format {record.get('format')!r}; this version reads format {FORMAT}")
    return record


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
