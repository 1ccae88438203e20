"""diffusers' AutoPipeline classes take AnyMS pipelines, as they take the pipelines these extend.

    pipe = AnyMSStableDiffusionXLPipeline.from_pretrained(...)
    plain = AutoPipelineForText2Image.from_pipe(pipe)       # a StableDiffusionXLPipeline, same modules
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)    # a StableDiffusionXLImg2ImgPipeline

``AutoPipelineFor*.from_pipe`` finds the task's pipeline by the *name* of the given
pipeline's class, in the lists of ``diffusers.pipelines.auto_pipeline``: no hook, no
class attribute, no subclass test. So the only way for it to know an AnyMS class is to
be told. :func:`register_auto_pipelines` tells it, as the model of the parent class:
it appends ONE table of its own, ``{model name: AnyMS class}`` (e.g.
``{"stable-diffusion-xl": AnyMSStableDiffusionXLPipeline}``), to the list of tables
that diffusers searches by class name (``SUPPORTED_TASKS_MAPPINGS``). The table comes
last, so no diffusers name resolves differently; diffusers' own mappings are not
touched; :func:`unregister_auto_pipelines` takes the table out again.

This touches a private diffusers list, so it is guarded: only from diffusers 0.32 (the
oldest this package supports, and checked on 0.42), only if the list has the expected
form, and only if diffusers' look-up then finds the class; otherwise nothing is left
changed and a warning says why (``from_pipe`` then raises diffusers' own error, as it
did before). :mod:`anyms.pipeline` and :mod:`anyms.flux` register their classes when
they are imported.
"""
from __future__ import annotations

import re
import threading
import warnings
from typing import Dict, Optional

__all__ = ["register_auto_pipelines", "unregister_auto_pipelines", "registered_auto_pipelines"]

_MIN_DIFFUSERS = "0.32.0"

# The one table appended to diffusers' list: model name -> AnyMS pipeline class.
_TABLE: Dict[str, type] = {}
_LOCK = threading.Lock()


def _auto_module():
    """diffusers' auto_pipeline module, or None (with the reason) where the registration cannot be trusted."""
    import diffusers

    if _release(diffusers.__version__) < _release(_MIN_DIFFUSERS):
        return None, f"diffusers {diffusers.__version__} is older than {_MIN_DIFFUSERS}"
    from diffusers.pipelines import auto_pipeline

    tables = getattr(auto_pipeline, "SUPPORTED_TASKS_MAPPINGS", None)
    text2image = getattr(auto_pipeline, "AUTO_TEXT2IMAGE_PIPELINES_MAPPING", None)
    if not isinstance(tables, list) or not isinstance(text2image, dict) or not callable(
            getattr(auto_pipeline, "_get_model", None)):
        return None, f"diffusers {diffusers.__version__}'s auto_pipeline has another form than expected"
    return auto_pipeline, None


def _release(version: str) -> tuple:
    """``"0.36.0.dev0"`` -> ``(0, 36, 0)``: the release numbers, compared as numbers (a dev build of
    a release counts as that release)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _model_name(auto_pipeline, parent: type) -> Optional[str]:
    """The auto-pipeline model name whose text-to-image pipeline is ``parent`` (e.g. "stable-diffusion-xl")."""
    for name, cls in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
        if cls is parent:
            return name
    return None


def register_auto_pipelines(*classes: type) -> Dict[str, type]:
    """Let ``AutoPipelineFor{Text2Image,Image2Image,Inpainting}.from_pipe`` take these AnyMS
    pipeline classes, each as the diffusers pipeline it extends (its first base that
    ``AutoPipelineForText2Image`` knows). Idempotent; returns the registered table.

    A class whose parent diffusers does not list, or a diffusers whose look-up has another
    form, is not registered: a warning names it and nothing is changed for it.
    """
    auto_pipeline, why = _auto_module()
    with _LOCK:
        if auto_pipeline is None:
            warnings.warn(f"AutoPipeline.from_pipe will not take AnyMS pipelines: {why}", stacklevel=2)
            return dict(_TABLE)
        for cls in classes:
            parent = next((base for base in cls.__mro__[1:] if _model_name(auto_pipeline, base)), None)
            if parent is None:
                warnings.warn(f"AutoPipeline.from_pipe will not take {cls.__name__}: diffusers lists none of its "
                              f"bases", stacklevel=2)
                continue
            name = _model_name(auto_pipeline, parent)
            _TABLE[name] = cls
            if not any(table is _TABLE for table in auto_pipeline.SUPPORTED_TASKS_MAPPINGS):
                auto_pipeline.SUPPORTED_TASKS_MAPPINGS.append(_TABLE)
            if auto_pipeline._get_model(cls.__name__) != name:   # the look-up works otherwise now: undo it all
                _TABLE.clear()
                _detach(auto_pipeline)
                warnings.warn(f"AutoPipeline.from_pipe will not take {cls.__name__}: this diffusers does not "
                              f"find pipelines by class name in SUPPORTED_TASKS_MAPPINGS", stacklevel=2)
                break
        return dict(_TABLE)


def unregister_auto_pipelines() -> None:
    """Take AnyMS's table out of diffusers' list again (``from_pipe`` then refuses AnyMS pipelines,
    as before any registration). Importing :mod:`anyms.pipeline` or :mod:`anyms.flux` anew
    does not register again; :func:`register_auto_pipelines` does."""
    auto_pipeline, _ = _auto_module()
    with _LOCK:
        _TABLE.clear()
        if auto_pipeline is not None:
            _detach(auto_pipeline)


def registered_auto_pipelines() -> Dict[str, type]:
    """A copy of the table diffusers searches now (empty when none is registered)."""
    auto_pipeline, _ = _auto_module()
    if auto_pipeline is None or not any(t is _TABLE for t in auto_pipeline.SUPPORTED_TASKS_MAPPINGS):
        return {}
    return dict(_TABLE)


def _detach(auto_pipeline) -> None:
    auto_pipeline.SUPPORTED_TASKS_MAPPINGS[:] = [t for t in auto_pipeline.SUPPORTED_TASKS_MAPPINGS if t is not _TABLE]

