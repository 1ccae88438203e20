"""AnyMS on diffusers: layout-guided multi-subject generation with IP-Adapter.

    import anyms
    pipe = anyms.AnyMSStableDiffusionXLPipeline.from_pretrained(...)
    pipe.load_ip_adapter(...)
    image = pipe(prompt, subjects=[anyms.Subject(img, box=(x0, y0, x1, y1)),
                                   anyms.Subject(img2, mask=mask_png), ...]).images[0]

FLUX.1 (XLabs IP-Adapter format): ``anyms.AnyMSFluxPipeline``, called the same way.

The names below are imported on first use, so ``import anyms`` is quick and imports
neither diffusers nor anything that touches a GPU.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "AnyMSAttnProcessor": "processor",
    "apply_anyms": "branches",
    "remove_anyms": "branches",
    "set_anyms_layout": "branches",
    "anyms_attention": "branches",
    "adapter_layers": "branches",
    "Layout": "layout",
    "Subject": "pipeline",
    "AnyMSStableDiffusionXLPipeline": "pipeline",
    "AnyMSStableDiffusionPipeline": "pipeline",
    "AnyMSFluxAttnProcessor": "flux",
    "AnyMSFluxPipeline": "flux",
    "flux_layout": "flux",
    "draw_layout": "visualize",
    "subject_maps": "visualize",
    "tiled_upscale": "upscale",
}

__all__ = list(_EXPORTS) + ["__version__"]

# the modules whose AnyMS processors the install functions of "branches" convert to (the U-Net's, FLUX's):
# imported with those functions, so that anyms.apply_anyms takes a U-Net and a FLUX transformer alike
_PROCESSOR_MODULES = ("processor", "flux")

# optional dependencies -> the extra that brings them
_EXTRAS = {"diffusers": "diffusers", "transformers": "diffusers", "accelerate": "diffusers", "einops": "diffusers",
           "safetensors": "diffusers", "PIL": "diffusers", "huggingface_hub": "diffusers", "tqdm": "diffusers",
           "matplotlib": "viz"}


def __getattr__(name: str):
    if name in _EXPORTS:
        modules = (_PROCESSOR_MODULES if _EXPORTS[name] == "branches" else ()) + (_EXPORTS[name],)
        try:
            for module_name in modules:
                module = importlib.import_module(f".{module_name}", __name__)
        except ModuleNotFoundError as e:        # a base install, without the extras
            top = (e.name or "").split(".")[0]
            if top not in _EXTRAS:
                raise
            raise ModuleNotFoundError(f"anyms.{name} needs {top}, which is not installed: pip install "
                                      f"'anyms-kernels[{_EXTRAS[top]}]'", name=e.name) from None
        value = getattr(module, name)
        globals()[name] = value   # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from .layout import Layout
    from .flux import AnyMSFluxAttnProcessor, AnyMSFluxPipeline, flux_layout
    from .pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline, Subject
    from .branches import adapter_layers, anyms_attention, apply_anyms, remove_anyms, set_anyms_layout
    from .processor import AnyMSAttnProcessor
    from .upscale import tiled_upscale
    from .visualize import draw_layout, subject_maps
