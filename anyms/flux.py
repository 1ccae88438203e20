"""AnyMS on FLUX.1: subjects placed in boxes or masks by the IP-Adapter branch of a diffusion transformer.

    pipe = AnyMSFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    pipe.load_ip_adapter("XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path="openai/clip-vit-large-patch14")
    image = pipe("a dog and a cat on a sofa", subjects=[
        Subject("dog.png", box=(0.05, 0.3, 0.5, 0.95)), Subject("cat.png", mask="cat_mask.png")]).images[0]

FLUX's double-stream blocks run one joint attention over the text and image tokens.
diffusers' ``FluxIPAdapterAttnProcessor`` adds to the image tokens' output, after the
block's feed-forward, ``scale * attn(q_img, K_ip, V_ip)``: ``q_img`` the image queries
after their RMS norm (without rotary embedding), ``K_ip, V_ip`` the adapter's
projections of the image tokens, no output projection. AnyMS changes only that term:

    ip_out[t] = lambda_r * attn(q_t, K_r, V_r)      r: the last subject whose region covers t
                                                      ("overwrite"; "sum": every covering subject adds)
    ip_out[t] = 0                                     where no region covers t

computed by ``anyms_kernels.region_cross_attention`` without a text branch
(``k_text=None``). The joint attention and everything else in the block are left
exactly as they are. Tokens are 2x2 patches of the VAE latent, so every double block
sees one ``(H / 16) x (W / 16)`` grid; the :class:`~anyms.Layout` is made with
``patch=2`` (:func:`flux_layout`) and routes boxes and masks on it by the U-Net's rule
(a token is in a region when its cell meets the box or holds a mask pixel).

The S subject images are ONE IP-Adapter's S images: the transformer hands each
double-stream processor ``ip_hidden_states[0]`` of shape ``[B, S, T, C]``, image ``s``
belonging to region ``s`` (diffusers' own FLUX processor would put all ``S * T`` image
tokens in one softmax).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch
from diffusers import FluxPipeline
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from .auto_pipeline import register_auto_pipelines
from .layout import Layout
from .pipeline import (AnyMSPlan, Subject, _load_image, _one_call_at_a_time, chain_step_callback, prepare_subjects,
                       start_steps)
from .branches import AnyMSBranches, anyms_attention, check_layout, set_anyms_layout

try:  # the attention front door of diffusers >= 0.35; older versions call SDPA directly
    from diffusers.models.attention_dispatch import dispatch_attention_fn
except ImportError:  # pragma: no cover - older diffusers
    dispatch_attention_fn = None

__all__ = ["AnyMSFluxAttnProcessor", "AnyMSFluxPipeline", "FLUX_PATCH", "flux_latent_hw", "flux_layout"]

# FLUX packs the VAE latent into 2x2 patches: one token per 16x16 pixels of the image.
FLUX_PATCH = 2


def flux_latent_hw(height: int, width: int, vae_scale_factor: int = 8) -> Tuple[int, int]:
    """The ``(h, w)`` of the VAE latent FluxPipeline denoises for a ``height x width`` image.

    FluxPipeline rounds the image down to a multiple of ``2 * vae_scale_factor`` (16),
    so the latent holds whole 2x2 patches: ``2 * (height // 16)`` by ``2 * (width // 16)``.
    """
    step = FLUX_PATCH * vae_scale_factor
    if height < step or width < step:
        raise ValueError(f"a FLUX image must be at least {step}x{step} pixels, got {height}x{width}")
    return FLUX_PATCH * (int(height) // step), FLUX_PATCH * (int(width) // step)


def flux_layout(boxes=None, height: int = 1024, width: int = 1024, scales=1.0, mode: str = "overwrite",
                masks=None, vae_scale_factor: int = 8, windows=None, schedules=None, blocks=None,
                adapters=None, subject_tokens=None) -> Layout:
    """A :class:`~anyms.Layout` for a FLUX generation of ``height x width`` pixels.

    Its token grid is ``(height // 16) x (width // 16)``, the transformer's image tokens.
    ``boxes``, ``scales``, ``mode``, ``masks``, ``windows``, ``schedules``, ``blocks``, ``adapters``
    and ``subject_tokens`` are :class:`~anyms.Layout`'s; masks are at the image's resolution (``height x width``, a
    multiple of 16 on each side).
    """
    return Layout(boxes, flux_latent_hw(height, width, vae_scale_factor), scales=scales, mode=mode, masks=masks,
                  patch=FLUX_PATCH, windows=windows, schedules=schedules, blocks=blocks, adapters=adapters,
                  subject_tokens=subject_tokens)


# ---------------------------------------------------------------------- processor
# FLUX's text acts in its joint attention, which the AnyMS processor leaves as it is (it adds the routed
# IP-Adapter term): a regional prompt would need the joint attention's text tokens split by region.
FLUX_NO_PROMPTS = ("regional prompts act on SD 1.5 and SDXL's cross-attention; FLUX's text is in its joint "
                   "attention, which AnyMS does not route: leave prompt out on FLUX")


class AnyMSFluxAttnProcessor(AnyMSBranches, FluxIPAdapterAttnProcessor, replaces=FluxIPAdapterAttnProcessor):
    r"""FLUX IP-Adapter processor whose image branch is confined to each subject's region.

    Args (as ``FluxIPAdapterAttnProcessor``):
        hidden_size: the transformer's width (``heads * head_dim``, 3072 for FLUX.1).
        cross_attention_dim: the width of the projected image tokens (``joint_attention_dim``).
        num_tokens: image tokens per image, one entry per IP-Adapter (AnyMS uses one).
        scale: the IP-Adapter scale, one per adapter.
        layout: an :class:`anyms.layout.Layout` (:func:`flux_layout`), or None to behave
            exactly like the parent.
        backend: the ``anyms_kernels.region_cross_attention`` backend (``"auto"``).

    With a layout, in a double-stream block (``encoder_hidden_states`` given), the joint
    attention and its output projections are computed as the parent computes them, and
    the third output, the IP term added to the image tokens, is

        ip_out[t] = sum over the subjects s acting on t of lambda_s * attn(q_t, K_s, V_s)

    (one subject per token in ``overwrite`` mode, the covering ones in ``sum`` mode, none
    outside every region), ``lambda_s = layout.scales[s] * self.scale[0]``, softmax scale
    ``1 / sqrt(head_dim)``. Without ``encoder_hidden_states`` (a single-stream block) or
    without a layout it is the parent.

    The scale is the one ``set_ip_adapter_scale`` sets: FLUX's assigns a new list to each
    processor, so a processor made by :meth:`from_ip_adapter_processor` reads and writes
    the scale of the processor it replaced, and both always agree.

    Raises (with a layout): ``ValueError`` when the image embeddings are missing, hold
    another number of images than the layout has regions (of each adapter: the subject
    branches are :class:`~anyms.branches.AnyMSBranches`', shared with the U-Net), or when
    ``ip_adapter_masks`` is passed.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens=(4,), scale=1.0, device=None,
                 dtype=None, layout: Optional[Layout] = None, backend: str = "auto"):
        object.__setattr__(self, "_anyms_original", None)   # read by the scale property, set first
        super().__init__(hidden_size, cross_attention_dim, num_tokens=num_tokens, scale=scale, device=device,
                         dtype=dtype)
        self.layout = check_layout(layout)
        self.backend = backend
        self._scale_cache = None

    @classmethod
    def from_ip_adapter_processor(cls, processor: FluxIPAdapterAttnProcessor,
                                  layout: Optional[Layout] = None) -> "AnyMSFluxAttnProcessor":
        """A processor sharing ``processor``'s ``to_k_ip`` / ``to_v_ip`` modules and its scale.

        Nothing is copied or allocated. The attention backend diffusers may have set on
        ``processor`` (``set_attention_backend``) is kept for the joint attention.
        """
        if not isinstance(processor, FluxIPAdapterAttnProcessor) or isinstance(processor, cls):
            raise TypeError(f"processor must be a FluxIPAdapterAttnProcessor, got {type(processor).__name__}")
        new = cls.__new__(cls)
        object.__setattr__(new, "_anyms_original", processor)
        torch.nn.Module.__init__(new)
        new.hidden_size = processor.hidden_size
        new.cross_attention_dim = processor.cross_attention_dim
        new.to_k_ip = processor.to_k_ip            # the same ModuleLists (registered as submodules)
        new.to_v_ip = processor.to_v_ip
        for name in ("_attention_backend", "_parallel_config"):
            if name in processor.__dict__:
                setattr(new, name, processor.__dict__[name])
        new.train(processor.training)
        new.layout = check_layout(layout)
        new.backend = "auto"
        new._scale_cache = None
        return new

    @property
    def scale(self):
        original = self._anyms_original
        return self.__dict__["_own_scale"] if original is None else original.scale

    @scale.setter
    def scale(self, value):
        original = self._anyms_original
        if original is None:
            self.__dict__["_own_scale"] = value
        else:
            original.scale = value

    def original_processor(self) -> FluxIPAdapterAttnProcessor:
        """The processor this one replaced; for one made directly, a plain
        ``FluxIPAdapterAttnProcessor`` sharing its weights (what :func:`anyms.remove_anyms` installs)."""
        if self._anyms_original is not None:
            return self._anyms_original
        plain = FluxIPAdapterAttnProcessor.__new__(FluxIPAdapterAttnProcessor)
        torch.nn.Module.__init__(plain)
        plain.hidden_size, plain.cross_attention_dim = self.hidden_size, self.cross_attention_dim
        plain.scale = self.scale
        plain.to_k_ip, plain.to_v_ip = self.to_k_ip, self.to_v_ip
        plain.train(self.training)
        return plain

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ip_hidden_states: List[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ):
        layout = self.layout
        if layout is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    ip_hidden_states=ip_hidden_states, ip_adapter_masks=ip_adapter_masks)
        if ip_adapter_masks is not None:
            raise ValueError(
                "ip_adapter_masks cannot be combined with an AnyMS layout: the layout's regions are the masks "
                "(give masks to the Layout: flux_layout(masks=...))"
            )
        if ip_hidden_states is None:
            raise ValueError(
                "AnyMS needs the subject images, and this call has no IP-Adapter image embeddings: pass "
                "subjects=[...] to AnyMSFluxPipeline, or ip_adapter_image=[[img_1, ..., img_S]] to FluxPipeline"
            )
        if layout.has_prompts:
            raise ValueError(f"this layout has regional prompts: {FLUX_NO_PROMPTS}")
        batch_size = hidden_states.shape[0]
        k_subj, v_subj, _ = self._branches(layout, ip_hidden_states, batch_size, attn.heads)

        hidden_states, encoder_hidden_states, ip_query = self._joint(attn, hidden_states, encoder_hidden_states,
                                                                     attention_mask, image_rotary_emb)
        ip_attn_output = self._ip_term(ip_query, k_subj, v_subj, layout)
        return hidden_states, encoder_hidden_states, ip_attn_output.to(hidden_states.dtype)

    def _joint(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        """The joint attention over text and image tokens and its output projections, step by
        step as the parent computes them; also the image queries the IP term reads
        (``[B, N, H, D]``: RMS-normed, without rotary embedding)."""
        query, key, value, encoder_query, encoder_key, encoder_value = _qkv(attn, hidden_states,
                                                                           encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        ip_query = query
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
        encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        joint = self._joint_attention(query, key, value, attention_mask)
        joint = joint.flatten(2, 3).to(query.dtype)
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = joint.split_with_sizes([text_len, joint.shape[1] - text_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states, ip_query

    def _ip_term(self, ip_query, k_subj, v_subj, layout: Layout) -> torch.Tensor:
        """``[B, N, H * D]``: each image token's own subjects, in one fused call without a text branch."""
        batch_size, num_tokens, heads, head_dim = ip_query.shape
        if k_subj.dtype != ip_query.dtype:        # e.g. an image projection kept in float32
            k_subj, v_subj = k_subj.to(ip_query.dtype), v_subj.to(ip_query.dtype)
        grid, routing = layout.routing(num_tokens, ip_query.device, self.layer_name)
        out = self._attend(layout, grid, routing, ip_query.transpose(1, 2), None, None, k_subj, v_subj)
        # [B, H, N, D], laid out like ip_query: [B, N, H, D]
        return out.transpose(1, 2).reshape(batch_size, num_tokens, heads * head_dim)

    def _joint_attention(self, query, key, value, attention_mask):
        if dispatch_attention_fn is None:  # pragma: no cover - older diffusers
            out = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask)
            return out.transpose(1, 2)
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)


def _qkv(attn, hidden_states, encoder_hidden_states):
    """The six projections of a double-stream FluxAttention, fused (``fuse_projections``) or not."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        e_query, e_key, e_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        e_query = attn.add_q_proj(encoder_hidden_states)
        e_key = attn.add_k_proj(encoder_hidden_states)
        e_value = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, e_query, e_key, e_value


# ----------------------------------------------------------------------- pipeline
@dataclass
class _FluxCall:
    """One AnyMS call in flight: the plan, the markers the parent hands back, the embeddings."""

    plan: AnyMSPlan
    negative_images: Optional[List[Any]]          # None: diffusers' default, a black image for every subject
    true_cfg: bool
    positive: list = field(default_factory=list)  # identity markers passed as ip_adapter_image / negative_...
    negative: list = field(default_factory=list)
    embeds: Optional[torch.Tensor] = None         # [S, E], the subjects' image embeddings


class AnyMSFluxPipeline(FluxPipeline):
    """:class:`diffusers.FluxPipeline` with ``subjects=``: layout-guided multi-subject generation.

    After a call with subjects, ``anyms_last_plan`` holds its :class:`~anyms.pipeline.AnyMSPlan`
    (subjects in priority order and the :class:`~anyms.Layout` used), for the pictures.
    """

    _anyms_pending: Optional[_FluxCall] = None
    anyms_last_plan: Optional[AnyMSPlan] = None

    def __call__(self, prompt=None, *args, subjects: Optional[Sequence[Subject]] = None,
                 anyms_mode: Optional[str] = None, anyms_priority: Optional[str] = None, anyms_blocks=None,
                 **kwargs):
        """FluxPipeline's call, plus AnyMS's arguments.

        Args:
            subjects: :class:`~anyms.Subject` objects (image, box and/or mask, scale, label);
                later subjects are on top where regions overlap. Without them the call is
                exactly FluxPipeline's. Masks are at the image's size, a multiple of 16 on
                each side; ``height`` and ``width`` default to it.
            anyms_mode: ``"overwrite"`` (AnyMS, the default) or ``"sum"``.
            anyms_priority: ``"order"`` (the default) or ``"smaller_on_top"``.
            anyms_blocks: the double-stream blocks every subject without its own ``blocks``
                acts on: ``"all"`` (the default) or names / weights of ``transformer_blocks.N``
                (:mod:`anyms.blocks`; FLUX has no style / layout presets).
            negative_ip_adapter_image: with ``true_cfg_scale > 1`` and a negative prompt
                (diffusers' true CFG), the image each region takes in the unconditional
                pass: one image for every subject, or a list of S. Default, as diffusers: a
                black image. A subject's own ``negative_image`` does the same for that
                subject alone (the others keep the black image); it needs true CFG (a call
                without it refuses one), and cannot be combined with this argument.
            everything else: as FluxPipeline (FLUX.1-dev's guidance-distilled call, without
                CFG, unless ``true_cfg_scale`` and ``negative_prompt`` are given).
                ``ip_adapter_image``, ``ip_adapter_image_embeds`` and
                ``negative_ip_adapter_image_embeds`` cannot be given with ``subjects``.

        Each subject's image is encoded once per call, each image alone (batch 1), and the
        S embeddings reach the transformer as one adapter's S images.

        Raises:
            ValueError/TypeError before any model work, naming the argument: bad subjects
            (see :func:`anyms.pipeline.prepare_subjects`), no single IP-Adapter with its
            image encoder loaded, arguments that cannot go with subjects, a negative image
            list of another length than the subjects, a subject's ``negative_image`` without
            true CFG or together with ``negative_ip_adapter_image``, masks whose size is not a multiple
            of 16 or not the given height and width.
        """
        with _one_call_at_a_time(self, with_subjects=subjects is not None):
            return self._anyms_call(prompt, *args, subjects=subjects, anyms_mode=anyms_mode,
                                    anyms_priority=anyms_priority, anyms_blocks=anyms_blocks, **kwargs)

    def _anyms_call(self, prompt, *args, subjects, anyms_mode, anyms_priority, anyms_blocks=None, **kwargs):
        parent_call = super().__call__
        if subjects is None:
            for name, value in (("anyms_mode", anyms_mode), ("anyms_priority", anyms_priority),
                                ("anyms_blocks", anyms_blocks)):
                if value is not None:
                    raise ValueError(f"{name} was given without subjects; give subjects=[anyms.Subject(...)]")
            return parent_call(prompt, *args, **kwargs)
        bound = inspect.signature(parent_call).bind_partial(prompt, *args, **kwargs)
        arguments = dict(bound.arguments)
        for name in ("ip_adapter_image", "ip_adapter_image_embeds"):
            if arguments.get(name) is not None:
                raise ValueError(f"give either subjects or {name}, not both: the subjects' images are the "
                                 f"IP-Adapter images")
        if arguments.get("negative_ip_adapter_image_embeds") is not None:
            raise ValueError("negative_ip_adapter_image_embeds cannot be given with subjects: give "
                             "negative_ip_adapter_image (one image, or one per subject) instead")
        plan = prepare_subjects(subjects, anyms_mode or "overwrite", anyms_priority or "order", anyms_blocks)
        plan.refuse_prompts(FLUX_NO_PROMPTS)
        negatives = _negative_images(arguments.get("negative_ip_adapter_image"), plan)
        own = plan.negative_image_names()
        if own and negatives is not None:
            raise ValueError(f"{own[0]} was given, and negative_ip_adapter_image too: give the negative images "
                             f"either per subject or for the call, not both")
        if own:        # diffusers' default (a black image) for the subjects without one
            black = _black_image()
            negatives = [black if s.negative_image is None else s.negative_image for s in plan.subjects]
        self._anyms_check_adapter(plan)
        plan.resolve_blocks(self.transformer)
        if plan.mask_hw is not None:       # the masks fix the image size (checked before any model work)
            arguments["height"], arguments["width"] = plan.image_size(
                arguments.get("height"), arguments.get("width"), FLUX_PATCH * self.vae_scale_factor)
        has_negative = arguments.get("negative_prompt") is not None or (
            arguments.get("negative_prompt_embeds") is not None
            and arguments.get("negative_pooled_prompt_embeds") is not None)
        true_cfg = float(arguments.get("true_cfg_scale", 1.0)) > 1 and has_negative
        plan.require_guidance(true_cfg, "FLUX runs it only with true CFG: true_cfg_scale > 1 and a negative prompt")
        state = _FluxCall(plan, negatives, true_cfg)
        # Identity markers: prepare_ip_adapter_image_embeds (below) recognises them and
        # encodes the subjects' images itself, once.
        state.positive, state.negative = [plan.images], ["anyms negative images"]
        arguments["ip_adapter_image"], arguments["negative_ip_adapter_image"] = state.positive, state.negative
        if plan.timed:
            chain_step_callback(self, plan, arguments)

        # anyms_attention installs the AnyMS processors (layout None until check_inputs
        # sets it) and, on exit, puts back exactly the processors and layouts of before.
        with anyms_attention(self):
            self._anyms_pending = state
            try:
                return parent_call(**arguments)
            finally:
                self._anyms_pending = None

    def _anyms_check_adapter(self, plan: Optional[AnyMSPlan] = None) -> None:
        """One loaded IP-Adapter (FLUX's AnyMS pipeline takes every subject from it) and its image
        encoder; a subject of another adapter is refused, naming ``subjects[i].adapter``."""
        proj = getattr(self.transformer, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if not layers:
            raise ValueError("subjects need a loaded IP-Adapter: call pipe.load_ip_adapter(...) first")
        if len(layers) != 1:
            raise ValueError(f"AnyMSFluxPipeline takes its subjects from one IP-Adapter (several adapters in one "
                             f"call are for SD and SDXL), but {len(layers)} are loaded: unload_ip_adapter() and "
                             f"load one")
        for i, subject in zip(plan.order if plan else (), plan.subjects if plan else ()):
            if subject.adapter != 0:
                raise ValueError(f"subjects[{i}].adapter is {subject.adapter}: AnyMSFluxPipeline takes every subject "
                                 f"from its one IP-Adapter, 0 (several adapters in one call are for SD and SDXL)")
        if getattr(self, "image_encoder", None) is None or getattr(self, "feature_extractor", None) is None:
            raise ValueError("subjects need the IP-Adapter's image encoder and its feature extractor, and the "
                             "pipeline lacks one: load_ip_adapter(..., image_encoder_pretrained_model_name_or_path=...)"
                             ", or pass image_encoder= and feature_extractor=")

    def check_inputs(self, *args, **kwargs):
        """The parent's check; during an AnyMS call it also builds and sets the layout
        (the parent calls it first, with the height and width it settled on)."""
        super().check_inputs(*args, **kwargs)
        state = self._anyms_pending
        if state is not None:
            sizes = inspect.signature(super().check_inputs).bind(*args, **kwargs).arguments
            plan = state.plan
            plan.layout = flux_layout([list(s.box) for s in plan.subjects], int(sizes["height"]),
                                      int(sizes["width"]), vae_scale_factor=self.vae_scale_factor,
                                      **plan.layout_args())
            plan.layout.prepare(self._execution_device)   # the token grid's routing, before the loop
            set_anyms_layout(self, plan.layout)
            self.anyms_last_plan = plan

    def progress_bar(self, iterable=None, total=None):
        """The parent's; during an AnyMS call with timed subjects it first sets step 0
        (:func:`anyms.pipeline.start_steps`)."""
        if self._anyms_pending is not None:
            start_steps(self, self._anyms_pending.plan)
        return super().progress_bar(iterable, total)

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt):
        """The parent's, except for an AnyMS call's own images: the S subjects are encoded
        once, each image alone (so a subject's embedding does not depend on the other
        subjects of the call), and handed on as one adapter's ``[B, S, E]`` embeddings; the
        unconditional pass gets S negative images (encoded only with true CFG, when it runs)."""
        state = self._anyms_pending
        if state is None or ip_adapter_image_embeds is not None or not (
                ip_adapter_image is state.positive or ip_adapter_image is state.negative):
            return super().prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                           num_images_per_prompt)
        num = state.plan.layout.num_subjects
        if ip_adapter_image is state.positive:
            state.embeds = self._anyms_encode_each(state.plan.images, device)          # [S, E]
            embeds = state.embeds
        elif not state.true_cfg:
            # The parent prepares negative embeddings on every call but reads them only with
            # true CFG; without it, hand the subjects' embeddings on rather than encode a black image.
            embeds = state.embeds
        elif state.negative_images is None or len(state.negative_images) == 1:
            image = [_black_image()] if state.negative_images is None else state.negative_images
            embeds = self._anyms_encode_each(image, device).expand(num, -1)         # one image for every region
        else:
            embeds = self._anyms_encode_each(state.negative_images, device)
        return super().prepare_ip_adapter_image_embeds(None, [embeds[None]], device, num_images_per_prompt)

    def _anyms_encode_each(self, images, device):
        """``[len(images), E]``: each image through the encoder alone (batch 1), as the U-Net pipelines do;
        an image object listed twice (the default black negative) is encoded once."""
        done = {}
        for image in images:
            if id(image) not in done:
                done[id(image)] = self.encode_image([image], device, 1)
        return torch.cat([done[id(image)] for image in images])


# AutoPipelineFor*.from_pipe(pipe) takes it as a FluxPipeline (see anyms.auto_pipeline)
register_auto_pipelines(AnyMSFluxPipeline)


def _black_image():
    """diffusers' default negative IP-Adapter image (all zeros); its size does not change its embedding."""
    import numpy as np

    return np.zeros((64, 64, 3), dtype=np.uint8)


def _negative_images(images, plan: AnyMSPlan) -> Optional[List[Any]]:
    """``negative_ip_adapter_image`` as None, one image, or S images in the plan's priority order."""
    if images is None:
        return None
    num = len(plan.subjects)
    name = "negative_ip_adapter_image"
    if isinstance(images, (list, tuple)) and len(images) == 1 and isinstance(images[0], (list, tuple)):
        images = images[0]                  # diffusers' per-adapter nesting: [[img_1, ..., img_S]]
    if not isinstance(images, (list, tuple)):
        return [_load_image(images, name)]
    if len(images) not in (1, num):
        raise ValueError(f"{name} holds {len(images)} images for {num} subjects: give one image (every subject "
                         f"takes it) or one per subject")
    loaded = [_load_image(im, f"{name}[{i}]") for i, im in enumerate(images)]
    return loaded if len(loaded) == 1 else [loaded[i] for i in plan.order]
