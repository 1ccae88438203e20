"""What the U-Net and the FLUX processors share: subject branches routed by a layout.

An AnyMS processor (:class:`anyms.processor.AnyMSAttnProcessor` for the U-Net,
:class:`anyms.flux.AnyMSFluxAttnProcessor` for FLUX's double-stream blocks) replaces one
diffusers IP-Adapter processor, keeps its ``to_k_ip`` / ``to_v_ip`` and scale, and adds a
:class:`~anyms.Layout`. This module owns what both do with it, so neither imports the other:

- :class:`AnyMSBranches`, the base they share: the layout they carry, the subject scales
  ``lambda_s``, the checks of the subject images against the layout, the image branches and
  the regional prompts' text branches joined into one set of keys and values
  (:meth:`AnyMSBranches._branches`), and the one call of
  ``anyms_kernels.region_cross_attention`` per layer, with the layout's routing;
- installing them: :func:`apply_anyms`, :func:`set_anyms_layout`, :func:`remove_anyms`,
  :func:`anyms_attention`. Each AnyMS processor class names the diffusers class it
  replaces (``class P(AnyMSBranches, Parent, replaces=Parent)``), so the conversions are
  known once the module defining it is imported (``import anyms`` names find both).

No global state beyond that table and no patching.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch

import anyms_kernels

from .layout import Layout

__all__ = ["AnyMSBranches", "apply_anyms", "remove_anyms", "set_anyms_layout", "anyms_attention", "adapter_layers"]

# diffusers IP-Adapter processor class -> the AnyMS processor class that replaces it
_ANYMS_FOR: Dict[type, type] = {}

# where the AnyMS processor of a diffusers class is defined, for the error when it is not imported
_DEFINED_IN = {"IPAdapterAttnProcessor2_0": "anyms.processor", "FluxIPAdapterAttnProcessor": "anyms.flux"}


def check_layout(layout):
    if layout is not None and not isinstance(layout, Layout):
        raise TypeError(f"layout must be an anyms.layout.Layout or None, got {type(layout).__name__}")
    return layout


class AnyMSBranches:
    """The base of the AnyMS processors (put it first in the bases).

    A subclass declares the diffusers processor it replaces: ``replaces=Parent``. It has
    ``layout`` (a :class:`~anyms.Layout` or None), ``backend``, ``scale`` (the adapter's),
    ``_anyms_original`` (the processor it replaced, or None) and ``_scale_cache``, and
    implements :meth:`original_processor`.
    """

    layout: Optional[Layout]
    backend: str
    # the attention module's name in the model (``up_blocks.0.attentions.1.transformer_blocks.0.attn2``),
    # set by apply_anyms: which of the layout's subjects act here (Layout(blocks=...))
    layer_name: Optional[str] = None

    def __init_subclass__(cls, replaces: Optional[type] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if replaces is not None:
            _ANYMS_FOR[replaces] = cls

    def original_processor(self):
        """The processor this one replaced (what :func:`remove_anyms` puts back)."""
        raise NotImplementedError

    @classmethod
    def _anyms_applied(cls, model) -> None:
        """Called by :func:`apply_anyms` on the model it converted (e.g. to add a check)."""

    @classmethod
    def _anyms_removed(cls, model) -> None:
        """Called by :func:`remove_anyms`: undo what :meth:`_anyms_applied` added."""

    def _branches(self, layout: Layout, ip_hidden_states, batch_size: int, heads: int,
                  dtype: Optional[torch.dtype] = None, to_k=None, to_v=None, prompt_states=None):
        """``(k_subj, v_subj, tokens)``: the keys and values ``[B, H, branches, T, D]`` the op takes
        (in ``dtype``, if given) and ``tokens`` = ``(image tokens, prompt tokens)`` for
        :meth:`Layout.routing` (None where that kind has no branch), which turns them into each
        branch's count (:meth:`Layout.branch_tokens`).

        The branches, in the layout's order (:attr:`Layout.image_subjects`, then
        :attr:`Layout.prompt_subjects`): each image branch from its subject's IP-Adapter ``a``
        (``ip_hidden_states[a]``, ``[B, S_a, T_a, C]`` or ``[B, T_a, C]`` for one image, holds the
        images of :meth:`Layout.adapter_subjects` ``(a)``, projected by ``to_k_ip[a]`` /
        ``to_v_ip[a]``); each regional prompt's from ``prompt_states`` (``[B, P, L, C]``, the
        layout's as this layer sees them; None: ``layout.prompt_states``) through the layer's
        ``to_k`` / ``to_v``. One source of branches: its projections, as they are. Several
        (adapters of 4 and 16 tokens, prompts of 77): each in its slots, zero-padded to the
        longest count T; the op reads a branch's first ``count`` keys only (the routing carries
        the counts when they differ), so the padding is never read. Adapters without subjects
        are not projected. A layout whose subjects all have prompts only reads no image tokens
        (the pipelines pass a placeholder embedding the U-Net's IP-Adapter input needs).
        """
        parts = []             # (branch slots, keys [B, n, T, H * D], values), one per source
        image_tokens = prompt_tokens = None
        if layout.num_image_subjects or not layout.has_prompts:
            parts = self._image_parts(ip_hidden_states, layout, batch_size)
            image_tokens = max(k.shape[2] for _, k, _ in parts)
        if layout.has_prompts:
            states = layout.prompt_states if prompt_states is None else prompt_states
            if states is None:
                raise ValueError("the layout has regional prompts but no prompt states: call "
                                 "layout.set_prompt_states([B, P, L, C]) before the forward (the pipelines do)")
            if states.shape[0] != batch_size:
                raise ValueError(
                    f"the regional prompt states have batch {states.shape[0]} but the hidden states have "
                    f"{batch_size}; with classifier-free guidance both must hold the unconditional and "
                    "conditional halves")
            first = layout.num_image_subjects
            parts.append((list(range(first, first + states.shape[1])), to_k(states), to_v(states)))
            prompt_tokens = states.shape[2]
        if dtype is not None:             # e.g. an image projection kept in float32
            parts = [(slots, k.to(dtype), v.to(dtype)) for slots, k, v in parts]
        if len(parts) == 1:               # one source: its branches are the layout's, in order
            _, k_subj, v_subj = parts[0]
        else:
            longest = max(k.shape[2] for _, k, _ in parts)
            k0 = parts[0][1]
            shape = (batch_size, layout.num_branches, longest, k0.shape[-1])
            k_subj, v_subj = k0.new_zeros(shape), k0.new_zeros(shape)
            for slots, k, v in parts:
                k_subj[:, slots, :k.shape[2]] = k.to(k_subj.dtype)
                v_subj[:, slots, :v.shape[2]] = v.to(v_subj.dtype)
        # [B, branches, T, H * D] -> [B, H, branches, T, D]: views
        k_subj = k_subj.unflatten(-1, (heads, -1)).permute(0, 3, 1, 2, 4)
        v_subj = v_subj.unflatten(-1, (heads, -1)).permute(0, 3, 1, 2, 4)
        return k_subj, v_subj, (image_tokens, prompt_tokens)

    def _image_parts(self, ip_hidden_states, layout: Layout, batch_size: int):
        """The image branches: per IP-Adapter its subjects' branch slots and its projections
        ``[B, S_a, T_a, H * D]`` (:meth:`_branches`), after checking the embeddings against the layout."""
        loaded = len(self.to_k_ip)
        if len(ip_hidden_states) != loaded:
            raise ValueError(f"{loaded} IP-Adapters are loaded but {len(ip_hidden_states)} image embeddings were "
                             f"passed: give one per adapter")
        parts, counts = [], set()
        for adapter in layout.used_adapters or (0,):      # no subject: adapter 0's (empty) images
            if adapter >= loaded:
                s = layout.adapter_subjects(adapter)[0]
                raise ValueError(f"the layout's subject {s} uses IP-Adapter {adapter} (adapters[{s}]) but "
                                 f"{loaded} {'is' if loaded == 1 else 'are'} loaded (0 .. {loaded - 1})")
            images = ip_hidden_states[adapter]
            if images.dim() == 3:                 # [B, T, C]: one image per prompt
                images = images.unsqueeze(1)
            where = f"ip_hidden_states[{adapter}]"
            if images.dim() != 4 or images.shape[0] != batch_size:
                raise ValueError(
                    f"{where} must be [B, S, T, C] with B = {batch_size} (with classifier-free guidance, the "
                    f"unconditional and conditional halves), got shape {tuple(images.shape)}")
            subjects = layout.adapter_subjects(adapter)
            if images.shape[1] != len(subjects):
                if loaded > 1:
                    what = f"subjects of IP-Adapter {adapter}"
                elif layout.has_prompts:
                    what = "subjects with an image"
                else:
                    what = "regions (boxes or masks)"
                raise ValueError(
                    f"the IP-Adapter image embeddings ({where}) hold S={images.shape[1]} images per prompt but the "
                    f"layout has {len(subjects)} {what}: give exactly one subject image per such region")
            if layout.subject_tokens is not None:
                for s in subjects:
                    if layout.subject_tokens[s] != images.shape[2]:
                        raise ValueError(
                            f"the layout gives subject {s} {layout.subject_tokens[s]} tokens (subject_tokens[{s}]) "
                            f"but its IP-Adapter {adapter} has {images.shape[2]}")
            counts.add(images.shape[2])
            slots = [layout.image_subjects.index(s) for s in subjects]
            parts.append((slots, self.to_k_ip[adapter](images), self.to_v_ip[adapter](images)))
        if len(counts) > 1 and layout.subject_tokens is None:
            raise ValueError(
                f"the layout's subjects use IP-Adapters of {sorted(counts)} image tokens: make the Layout "
                f"with subject_tokens= (each subject's count), so that each attends to its own tokens only")
        return parts

    def _attend(self, layout: Layout, grid, routing, q, k_text, v_text, k_subj, v_subj,
                text_mask=None) -> torch.Tensor:
        """One call of the op: the text branch (``k_text`` None: none) and every subject's
        branch confined to its region by the layout's ``routing`` on ``grid``; ``[B, H, N, D]``
        laid out like ``q``. Softmax scale ``1 / sqrt(D)``, as diffusers' SDPA calls."""
        return anyms_kernels.region_cross_attention(
            q, k_text, v_text, k_subj, v_subj, routing, grid, mode=layout.mode,
            subject_scale=self._subject_scale(layout, q.device), text_mask=text_mask,
            softmax_scale=1.0 / math.sqrt(q.shape[-1]), backend=self.backend,
        )

    def _subject_scale(self, layout: Layout, device) -> torch.Tensor:
        """lambda_s per branch: for an image branch (layout.scales[s] at this step and layer) * (the
        scale of subject s's adapter, ``self.scale[layout.adapters[s]]``, or its entry for that
        image when the adapter's scale is a list); for a regional prompt's, the layout's (1 or 0:
        the adapters' scales are the images'). Cached (eagerly) while neither changes."""
        key = self._adapter_scales(layout)
        factor = torch.tensor(key, dtype=torch.float32)
        if layout.has_prompts:
            factor = torch.cat([factor.expand(layout.num_image_subjects),
                                torch.ones(len(layout.prompt_subjects), dtype=torch.float32)])
        if torch.compiler.is_compiling():
            # traced, the product is part of the graph and reads the layout's scale tensor, whose
            # values set_step rewrites in place: no cache (reading or writing one would guard on
            # the step and retrace at the next one)
            return layout.subject_scale(device, self.layer_name) * factor.to(device)
        cache = self._scale_cache
        if (cache is not None and cache[0] is layout and cache[1] == device and cache[2] == key
                and cache[3] == layout.version and cache[5] == self.layer_name):
            return cache[4]
        scale = layout.subject_scale(device, self.layer_name) * factor.to(device)
        self._scale_cache = (layout, device, key, layout.version, scale, self.layer_name)
        return scale

    def _adapter_scales(self, layout: Layout):
        """Each image branch's IP-Adapter scale (``set_ip_adapter_scale``'s): one float when every
        subject with an image takes the same single scale, else a tuple, one per image branch."""
        used = layout.used_adapters or (0,)
        if len(used) == 1 and not isinstance(self.scale[used[0]], (list, tuple)):
            return float(self.scale[used[0]])
        values = []
        for adapter in used:
            ip_scale = self.scale[adapter]
            subjects = layout.adapter_subjects(adapter)
            if isinstance(ip_scale, (list, tuple)):
                if len(ip_scale) != len(subjects):
                    raise ValueError(
                        f"the IP-Adapter scale of adapter {adapter} has {len(ip_scale)} per-image values but the "
                        f"layout has {len(subjects)} subjects of it (set_ip_adapter_scale)")
                values.extend(zip(subjects, (float(v) for v in ip_scale)))
            else:
                values.extend((s, float(ip_scale)) for s in subjects)
        return tuple(v for _, v in sorted(values))


# ----------------------------------------------------------------------- install
def _model_of(pipe_or_unet):
    """The denoiser whose processors AnyMS converts: the argument itself, a pipeline's .unet,
    or a FLUX pipeline's .transformer."""
    if hasattr(pipe_or_unet, "attn_processors") and hasattr(pipe_or_unet, "set_attn_processor"):
        return pipe_or_unet
    for name in ("unet", "transformer"):
        model = getattr(pipe_or_unet, name, None)
        if model is not None and hasattr(model, "attn_processors"):
            return model
    raise TypeError(
        f"pipe_or_unet must be a diffusers pipeline with a .unet or a .transformer, a UNet2DConditionModel or a "
        f"FluxTransformer2DModel, got {type(pipe_or_unet).__name__}"
    )


def attention_modules(model) -> Iterator[torch.nn.Module]:
    """Every attention module of the model that carries a processor (as ``model.attn_processors`` sees)."""
    for _, module in named_attention_modules(model):
        yield module


def named_attention_modules(model) -> Iterator[Tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every attention module of the model that carries a processor, named as
    in the model (``down_blocks.2.attentions.1.transformer_blocks.0.attn2``, also under torch.compile)."""
    model = getattr(model, "_orig_mod", model)              # torch.compile's wrapper: the module it wraps
    for name, module in model.named_modules():
        if hasattr(module, "get_processor") and hasattr(module, "set_processor") and hasattr(module, "processor"):
            yield name, module


def adapter_layers(pipe_or_unet) -> List[str]:
    """The names of the attention modules whose processor is an IP-Adapter's (or AnyMS's): the
    layers a subject's ``blocks`` choose among (``up_blocks.0.attentions.1.transformer_blocks.0.attn2``,
    FLUX's ``transformer_blocks.7.attn``)."""
    model = _model_of(pipe_or_unet)
    return [name for name, module in named_attention_modules(model)
            if isinstance(module.processor, AnyMSBranches) or type(module.processor) in _ANYMS_FOR]


def apply_anyms(pipe_or_unet, layout: Optional[Layout] = None):
    """Convert the model's IP-Adapter processors into AnyMS processors, in place.

    Each IP-Adapter processor that ``load_ip_adapter`` installed (``IPAdapterAttnProcessor2_0``
    in a U-Net, ``FluxIPAdapterAttnProcessor`` in a FLUX transformer) is replaced by its
    AnyMS subclass sharing its ``to_k_ip``/``to_v_ip`` modules and scale; the original
    object is kept for :func:`remove_anyms`. Idempotent: processors that are already
    AnyMS stay as they are. Every AnyMS processor's layout is set to ``layout`` (None:
    they behave like plain IP-Adapter until :func:`set_anyms_layout`), and its
    ``layer_name`` to its attention module's name (what a layout's ``blocks`` select).

    Returns the U-Net (or transformer). Raises ``ValueError`` if no IP-Adapter is loaded,
    ``TypeError`` for an argument of the wrong type.
    """
    model = _model_of(pipe_or_unet)
    check_layout(layout)
    layers = adapter_layers(model)
    if layout is not None and layers:     # its block names checked before any processor takes it
        layout.bind_layers(layers)
    found = False
    unknown = set()
    for name, module in named_attention_modules(model):
        proc = module.processor
        if isinstance(proc, AnyMSBranches):
            proc.layout = layout
            proc.layer_name = name
            found = True
        elif type(proc) in _ANYMS_FOR:
            module.set_processor(_ANYMS_FOR[type(proc)].from_ip_adapter_processor(proc, layout))
            module.processor.layer_name = name
            found = True
        elif type(proc).__name__ in _DEFINED_IN:
            unknown.add(type(proc).__name__)
    if not found:
        if unknown:
            name = sorted(unknown)[0]
            raise ValueError(f"pipe_or_unet's IP-Adapter processors are {name}, whose AnyMS processor is defined in "
                             f"{_DEFINED_IN[name]}: import it first (anyms.apply_anyms does)")
        raise ValueError(
            "pipe_or_unet has no IP-Adapter attention processors: load an IP-Adapter first with "
            "pipe.load_ip_adapter(...)"
        )
    for cls in set(_ANYMS_FOR.values()):
        cls._anyms_applied(model)
    return model


def set_anyms_layout(pipe_or_unet, layout: Optional[Layout]):
    """Set (or clear, with None) the layout of every AnyMS processor of the model; returns the model."""
    model = _model_of(pipe_or_unet)
    check_layout(layout)
    procs = [m.processor for m in attention_modules(model) if isinstance(m.processor, AnyMSBranches)]
    if not procs:
        raise ValueError("pipe_or_unet has no AnyMS processors: call apply_anyms(pipe_or_unet) first")
    if layout is not None:        # before any processor takes it: a layout naming no layer changes nothing
        layout.bind_layers([p.layer_name for p in procs if p.layer_name is not None])
    for proc in procs:
        proc.layout = layout
    return model


def remove_anyms(pipe_or_unet):
    """Put back the processors :func:`apply_anyms` replaced (the same objects); returns the model.

    An AnyMS processor made directly (not by ``apply_anyms``) becomes a plain diffusers
    IP-Adapter processor sharing its weights. No AnyMS processor: nothing to do.
    """
    model = _model_of(pipe_or_unet)
    for module in attention_modules(model):
        proc = module.processor
        if isinstance(proc, AnyMSBranches):
            module.set_processor(proc.original_processor())
    for cls in set(_ANYMS_FOR.values()):
        cls._anyms_removed(model)
    return model


@contextlib.contextmanager
def anyms_attention(pipe_or_unet, layout: Optional[Layout] = None):
    """``with anyms_attention(pipe, layout): ...`` applies AnyMS and, on exit, restores exactly
    the processors (and AnyMS layouts) that were there before; yields the U-Net (or transformer)."""
    model = _model_of(pipe_or_unet)
    before: List[Tuple[torch.nn.Module, object, Optional[Layout]]] = [
        (m, m.processor, getattr(m.processor, "layout", None)) for m in attention_modules(model)
    ]
    apply_anyms(model, layout)
    try:
        yield model
    finally:
        for module, proc, old_layout in before:
            current = module.processor
            if current is proc:
                if isinstance(proc, AnyMSBranches):
                    proc.layout = old_layout
            elif isinstance(current, AnyMSBranches) and current._anyms_original is proc:
                module.set_processor(proc)
            # anything else was changed inside the block (e.g. unload_ip_adapter): leave it
