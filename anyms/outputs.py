"""Output files that lose nothing: checked before any model loads, written atomically, never clobbered.

- :func:`prepare_output_folder` runs before the model loads: it makes the folder an
  output goes to and proves it writable (it creates and deletes a probe file), so a
  file standing where a folder should be, or a read-only folder, fails at once and not
  after minutes of generation.
- :func:`atomic_save` writes an image to a temporary file beside its target, flushes
  it to disk and only then gives it its name, so a crash, a full disk or Ctrl-C leaves
  either the old file or the new one, never half of one. Without ``overwrite`` the name
  is taken with a hard link, which fails if the name exists (even if another process
  made it a moment ago): an existing image is never replaced. A write that fails (a full
  disk, an I/O error) raises :class:`WriteError`, one line naming the file, and leaves
  nothing under the final name.

No diffusers import here.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
from typing import Dict, Iterable, List, Optional

__all__ = ["FORMATS", "OutputError", "WriteError", "image_format", "prepare_output_folder", "atomic_save",
           "atomic_write_text", "existing", "TEMPORARY_EXTRA", "remove_stale_temporaries"]

# file extension -> the Pillow format that writes it
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

# A file NAME is written first as ".NAME.XXXXXXXX.tmp" beside it (XXXXXXXX: mkstemp's 8 random
# characters); a folder is proved writable with ".anyms-write-test-XXXXXXXX", removed at once.
_TEMPORARY = ".{name}.{random}.tmp"
_PROBE_PREFIX = ".anyms-write-test-"
_RANDOM = "[a-z0-9_]{8}"             # tempfile's alphabet, 8 characters
# how much longer a temporary name is than its file's name
TEMPORARY_EXTRA = len(_TEMPORARY.format(name="", random="12345678"))


class OutputError(Exception):
    """An output that cannot be written, or that exists and may not be replaced."""


class WriteError(OutputError):
    """A write that failed on the way (a full disk, an I/O error): nothing was left under the
    final name, and any older file there is untouched."""


def image_format(path: str) -> str:
    """The Pillow format for ``path``'s extension; raises OutputError for any other."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise OutputError(f"{path!r} must end in .png, .jpg, .jpeg or .webp")
    return FORMATS[ext]


def prepare_output_folder(path: str, what: str) -> str:
    """Make the folder of the output file ``path`` and check that a file can be created in it.

    ``what`` names the argument in the errors (``--out``). Returns the folder's absolute
    path. Raises :class:`OutputError` when a part of the folder's path is a file, when
    the folder cannot be made, or when nothing can be written in it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    # The nearest part of the path that exists must be a folder.
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputError(f"{what} {path!r}: {probe!r} is a file, not a folder, so nothing can be written under it")
    if os.path.isdir(path):
        raise OutputError(f"{what} {path!r} is a folder: name an image file")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{what} {path!r}: cannot write in {folder!r} ({e.strerror or e})") from None
    return folder


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the finished temporary file ``tmp`` the name ``path`` (same folder), atomically."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)          # atomic, and fails if the name exists
    except FileExistsError:
        raise
    except OSError:                 # a filesystem without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _write_atomically(path: str, overwrite: bool, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    prefix, suffix = _TEMPORARY.format(name=base, random="\0").split("\0")
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as e:
        raise WriteError(f"cannot write {path!r}: {e.strerror or e}; nothing was written under that name") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())    # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except FileExistsError:
        kept = _keep_aside(tmp, path)
        raise OutputError(f"{path!r} appeared while this ran: it was not replaced, and the new file is "
                          f"{kept!r}") from None
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path!r}: {e.strerror or e}; nothing was written under that "
                             f"name") from None
        raise


def _umask() -> int:
    """The process's umask (read by setting it, and set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _keep_aside(tmp: str, path: str) -> str:
    """Give ``tmp`` the first free name ``stem-N.ext`` beside ``path`` (nothing is lost); return it."""
    stem, ext = os.path.splitext(path)
    for n in range(1, 10000):
        candidate = f"{stem}-{n}{ext}"
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        except OSError:
            if os.path.lexists(candidate):
                continue
            os.replace(tmp, candidate)
            return candidate
        os.unlink(tmp)
        return candidate
    return tmp


def atomic_save(image, path: str, *, overwrite: bool = False, pnginfo=None) -> None:
    """Save the PIL ``image`` to ``path`` atomically (format from the extension).

    ``pnginfo`` (a ``PIL.PngImagePlugin.PngInfo``) adds text chunks to a PNG and is
    ignored for other formats. Without ``overwrite`` an existing ``path`` is left as
    it is and :class:`OutputError` is raised, naming where the new image was kept instead
    (``stem-N.ext`` beside it). A failed write leaves nothing behind.
    """
    fmt = image_format(path)
    kwargs = {"pnginfo": pnginfo} if (fmt == "PNG" and pnginfo is not None) else {}
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    _write_atomically(path, overwrite, lambda f: image.save(f, format=fmt, **kwargs))


def atomic_write_text(path: str, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (for manifests)."""
    _write_atomically(path, overwrite, lambda f: f.write(text.encode("utf-8")))


def existing(paths) -> Optional[str]:
    """The first of ``paths`` that exists (file or anything else), or None."""
    for p in paths:
        if os.path.lexists(p):
            return p
    return None


def remove_stale_temporaries(paths: Iterable[str]) -> List[str]:
    """Remove the temporary files that a stopped writer of ``paths`` left beside them; returns
    what was removed. Only regular files with exactly those names go: anything else, links
    included, is left alone (the folders' write probes too: they live for microseconds, and
    another run's probe may be alive). Call it only while no other process may be writing these
    files (anyms.lock)."""
    wanted: Dict[str, set] = {}
    for path in paths:
        folder, name = os.path.split(os.path.abspath(path))
        wanted.setdefault(folder, set()).add(name)
    removed = []
    for folder, names in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue                    # not made yet
        for entry in entries:
            found = re.fullmatch(r"\.(.+)\.(" + _RANDOM + r")\.tmp", entry)
            if found is None or found.group(1) not in names:
                continue
            path = os.path.join(folder, entry)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed
