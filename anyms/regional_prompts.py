"""Regional prompts: a subject's own text, acting in its region in place of the global prompt's.

A :class:`~anyms.Subject` with ``prompt="..."`` adds a text-kind branch to the one op call of
every cross-attention layer: its keys and values are the layer's own ``to_k`` / ``to_v`` of the
prompt's text states, and where it acts it replaces the global prompt's text branch
(``anyms_kernels.region_cross_attention(..., replaces_text=...)``; the routing per kind is the
layout's, :class:`~anyms.Layout` ``kinds``). This module holds what the pipelines do for them:

- :func:`check_regional_prompt`: a subject's prompt and the fields a prompt-only subject must
  leave at their defaults, before any model work;
- :func:`check_prompt_lengths`: each prompt against the pipeline's tokenizers (no model work);
- :func:`encode_regional_prompts`: the prompts' text states, for both halves of
  classifier-free guidance, with the pipeline's own ``encode_prompt``.

A call without any subject image still hands the U-Net a placeholder image embedding per
loaded adapter (its IP-Adapter input needs one; the processors read no image then): the
pipelines' ``prepare_ip_adapter_image_embeds``.

Classifier-free guidance: in the unconditional half a region with a prompt sees the global
negative prompt's states (its text branch then computes the same attention as the global text
branch there, to rounding), so a regional prompt changes the unconditional pass only where, in
``sum`` mode, regions with prompts overlap (there each adds, in both halves). Making the branch
inactive in that half instead would need a routing per batch row, which the fused op runs row
by row.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["check_regional_prompt", "check_prompt_lengths", "encode_regional_prompts", "prompt_tokenizers"]


def check_regional_prompt(subject, name: str, scale: float, schedule: str) -> str:
    """``subject.prompt`` checked (a non-empty string); for a subject without an image, its
    ``scale`` (checked), ``schedule``, ``blocks``, ``negative_image`` and ``adapter`` must be the defaults: they are
    the image branch's, and a prompt replaces the text at weight 1. ValueError / TypeError naming
    ``{name}.prompt`` (or the field)."""
    prompt = subject.prompt
    if not isinstance(prompt, str):
        raise TypeError(f"{name}.prompt must be a string (a regional prompt), got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{name}.prompt is empty: give the region's text, or leave prompt out")
    if subject.image is None:
        why = ("is the image branch's, and this subject has a prompt and no image (its prompt replaces the "
               "text at weight 1, within start..end)")
        if scale != 1.0:
            raise ValueError(f"{name}.scale {why}: leave scale at 1")
        if schedule != "constant":
            raise ValueError(f"{name}.schedule {why}: leave schedule out")
        if subject.blocks is not None:
            raise ValueError(f"{name}.blocks {why}: leave blocks out (the prompt acts at every layer)")
        if subject.negative_image is not None:
            raise ValueError(f"{name}.negative_image {why}: leave negative_image out")
        if subject.adapter != 0:
            raise ValueError(f"{name}.adapter {why}: leave adapter out (the IP-Adapter takes images only)")
    return prompt


def prompt_tokenizers(pipe) -> list:
    """The pipeline's CLIP tokenizers (``tokenizer``, and SDXL's ``tokenizer_2``) that exist."""
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def check_prompt_lengths(subjects: Sequence, tokenizers: Sequence) -> None:
    """Each regional prompt of ``subjects`` (the user's list, whose indices the errors name) fits
    every tokenizer: at most its ``model_max_length`` tokens with the start and end tokens (77 for
    CLIP). diffusers cuts a longer global prompt with a warning; a regional prompt cut short would
    miss words silently, so it is refused. ValueError naming ``subjects[i].prompt``. Tokenizers
    only: no model work."""
    for i, subject in enumerate(subjects):
        prompt = getattr(subject, "prompt", None)
        if not isinstance(prompt, str):
            continue
        for tokenizer in tokenizers:
            count = len(tokenizer(prompt).input_ids)
            limit = tokenizer.model_max_length
            if count > limit:
                raise ValueError(f"subjects[{i}].prompt is {count} tokens long with its start and end tokens, above "
                                 f"the text encoder's {limit}: shorten it (a regional prompt is never cut)")


def encode_regional_prompts(encode_prompt, prompts: List[str], arguments: dict, prompt_embeds: torch.Tensor,
                            negative_prompt_embeds: Optional[torch.Tensor], guided: bool) -> torch.Tensor:
    """The text states ``[B, P, L, C]`` of the ``P`` regional ``prompts`` for the batch the U-Net runs.

    ``encode_prompt`` is the parent pipeline's (SD's or SDXL's), run on each prompt alone, without
    guidance, with the call's ``device``, ``lora_scale`` and ``clip_skip`` (``arguments``, the
    parent's encode_prompt arguments): the operations that encode a global prompt, so a region
    whose prompt is the global one gets the same states, bit for bit. On SDXL that is both text
    encoders' hidden states concatenated; the pooled embedding is not used. ``prompt_embeds`` and
    ``negative_prompt_embeds`` are the call's (``[B, L, C]``, B = prompts x images per prompt):
    each regional prompt is repeated over that batch, and with ``guided`` the unconditional rows
    (first, as the pipelines concatenate them) hold the global negative prompt's states.
    """
    states = []
    for prompt in prompts:
        out = encode_prompt(prompt=prompt, device=arguments.get("device"), num_images_per_prompt=1,
                            do_classifier_free_guidance=False, lora_scale=arguments.get("lora_scale"),
                            clip_skip=arguments.get("clip_skip"))
        states.append(out[0])                                            # [1, L, C]
    cond = torch.cat(states).to(prompt_embeds.dtype)                     # [P, L, C]
    batch = prompt_embeds.shape[0]
    cond = cond.unsqueeze(0).expand(batch, -1, -1, -1)
    if not guided:
        return cond.contiguous()
    if negative_prompt_embeds is None or negative_prompt_embeds.shape[1] != cond.shape[2]:
        got = None if negative_prompt_embeds is None else tuple(negative_prompt_embeds.shape)
        raise ValueError(f"regional prompts need negative prompt embeddings of {cond.shape[2]} tokens (the regions "
                         f"see the negative prompt in the unconditional pass), got {got}")
    uncond = negative_prompt_embeds.to(cond.dtype).unsqueeze(1).expand(-1, len(prompts), -1, -1)
    return torch.cat([uncond, cond])
