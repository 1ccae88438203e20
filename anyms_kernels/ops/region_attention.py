"""Region-masked multi-branch cross-attention: the op at the heart of AnyMS.

Every branch is tokens + region + scale, and of one of two kinds. For token t:

    out[t] = text(t) + sum over the image-kind subjects s that act on t of lambda_s * attn_s(q_t)
    text(t) = sum over the text-kind subjects s that act on t of lambda_s * attn_s(q_t)
              if some text-kind subject's region covers t, else attn(q_t, K_text, V_text)

where ``attn_s`` attends to subject s's first ``n_s`` keys, and a subject acts on t if its
region (a box or a mask) covers t and, in ``overwrite`` mode, no later subject of its kind
covers t (METHOD.md). Every branch has its own softmax. Without text-kind subjects this is
AnyMS's text branch plus its routed image branches.

This module holds the ``torch.library`` registration and the public function; the
Triton kernel and its launcher live in ``region_attention_triton``, the PyTorch
backend in ``region_attention_torch``, the routing they read in ``..routing``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import check_arguments, check_values, refusal
from ..reference import region_cross_attention_reference
from ..regions import Grid
from ..routing import Routing, region_cover
from . import _layout
from .region_attention_torch import region_attention_torch
from .region_attention_triton import (  # noqa: F401  (re-exported: tests and tools use these names)
    _AUTOTUNED, CONFIGS, TRITON_DTYPES, TRITON_HEAD_DIMS, KernelConfig, check_triton_supported, config_candidates,
    region_attention_triton, triton_runnable,
)


# ---------------------------------------------------------------------- registration
def _run(q, k_text, v_text, k_subj, v_subj, routing: Routing, subject_scale, text_mask, regions,
         mode: str, softmax_scale: float, backend: str) -> torch.Tensor:
    """(The subjects' kinds and token counts travel in the routing.)"""
    """The checked op on one backend. ``regions``: the checked boxes or coverage map (the
    reference's literal input), or None when the caller passed a Routing."""
    if backend == "triton":
        out = region_attention_triton(q, k_text, v_text, k_subj, v_subj, routing, subject_scale, text_mask,
                                      softmax_scale)
        # With a text branch the kernel's softmax over NaN scores is NaN on every row already.
        return out if k_text is not None and q.is_cuda else _keep_nan_queries(q, out)
    if backend == "torch":
        out = region_attention_torch(q, k_text, v_text, k_subj, v_subj, routing, subject_scale, text_mask,
                                     softmax_scale)
        return _keep_nan_queries(q, out)
    if regions is None:
        regions = routing.cover.view(routing.batch, routing.num_subjects, *routing.grid)
    regions = regions.expand(q.shape[0], *regions.shape[1:])
    res = region_cross_attention_reference(
        q, k_text, v_text, k_subj, v_subj, regions.cpu(), routing.grid, mode=mode,
        subject_scale=subject_scale, text_mask=text_mask, softmax_scale=softmax_scale,
        replaces_text=None if routing.replaces_text is None else routing.replaces_text.cpu(),
        subject_tokens=None if routing.subject_tokens is None else routing.subject_tokens.cpu())
    return _layout.empty_like_layout(q).copy_(res)


def _keep_nan_queries(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A query row holding NaN gives a NaN output row, as plain attention (and the reference) gives.

    Two paths lost it: CPU SDPA writes 0 for a NaN row when the text has few keys (7 of them,
    not 77), and without a text branch a token no subject acts on is written 0 whatever its
    query. On the CPU a NaN shows in q's sum (about 1% of the op's time at SDXL's 64x64 level),
    so the rows are looked for only then; on a GPU that test would sync with the device, so the
    rows are marked without it."""
    if q.numel() == 0:
        return out
    if q.device.type == "cpu":
        total = q.sum(dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        if torch.isfinite(total):
            return out
    return out.masked_fill_(torch.isnan(q).any(-1, keepdim=True), float("nan"))


def _region_cross_attention_impl(
    q: torch.Tensor, k_text: Optional[torch.Tensor], v_text: Optional[torch.Tensor],
    k_subj: torch.Tensor, v_subj: torch.Tensor,
    regions: torch.Tensor, subject_scale: torch.Tensor, text_mask: Optional[torch.Tensor],
    replaces_text: Optional[torch.Tensor], subject_tokens: Optional[torch.Tensor],
    grid_h: int, grid_w: int, mode: str, softmax_scale: float, backend: str, values_checked: bool,
    routing_parts: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The registered op: regions are int64 boxes [B,S,4] or a bool coverage map [B,S,h,w]
    (a Routing's cover when the caller passed one), subject_scale float32 [B,S], backend
    resolved; replaces_text bool [S] and subject_tokens int [S], or None (the Routing's, when
    the caller passed one). ``values_checked``: the eager public function already read the values.
    ``routing_parts``: with a Routing's cover, its other tensors (``Routing.parts``): the
    routing is then taken as it was built, not built again; empty: built here."""
    grid = (grid_h, grid_w)
    if routing_parts:
        routing = Routing.from_parts(regions.flatten(-2), routing_parts, grid, mode, replaces_text, subject_tokens)
        return _run(q, k_text, v_text, k_subj, v_subj, routing, subject_scale, text_mask, None, mode,
                    softmax_scale, backend)
    if not values_checked:      # traced by torch.compile: the checks run here, eagerly
        check_values(q, grid, regions, subject_scale, text_mask, subject_tokens, k_subj.shape[3])
    if subject_tokens is not None:
        subject_tokens = subject_tokens.to(torch.int32)     # the values are checked: 1..T
    with torch.inference_mode(False), torch.no_grad():
        cover = region_cover(regions, grid)
    routing = Routing(cover, grid, mode, replaces_text, subject_tokens)     # build_routing, less its host reads
    return _run(q, k_text, v_text, k_subj, v_subj, routing, subject_scale, text_mask, regions, mode, softmax_scale,
                backend)


# The registered op: what torch.compile, FakeTensor and other tracers see. Eager calls
# on plain tensors skip the dispatcher (about 20 us a call, 70 calls a U-Net step).
_region_cross_attention_op = torch.library.custom_op(
    "anyms_kernels::region_cross_attention", _region_cross_attention_impl, mutates_args=())


@_region_cross_attention_op.register_fake
def _(q, k_text, v_text, k_subj, v_subj, regions, subject_scale, text_mask, replaces_text, subject_tokens,
      grid_h, grid_w, mode, softmax_scale, backend, values_checked, routing_parts):
    return _layout.empty_like_layout(q)


# --------------------------------------------------------------------- public function
def _refuse_grad(**inputs) -> None:
    """The op is forward only, for every backend and compiled or not: no input may require grad.

    subject_scale included: the torch backend's ops would carry its gradient eagerly while the
    registered op (what torch.compile runs) and the Triton kernel have no backward, so accepting
    it would make one call differentiable or not depending on how it runs."""
    if not torch.is_grad_enabled():
        return
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"region_cross_attention is forward only (inference): {name} requires grad, and the op has no "
                "backward. Call it under torch.no_grad() / torch.inference_mode(), or detach the inputs")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' -> 'triton' on CUDA tensors, 'torch' elsewhere. Never falls back silently."""
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        check_triton_supported(q)
    return backend


def region_cross_attention(
    q: torch.Tensor,
    k_text: Optional[torch.Tensor],
    v_text: Optional[torch.Tensor],
    k_subj: torch.Tensor,
    v_subj: torch.Tensor,
    regions,
    grid: Grid,
    *,
    mode: str = "overwrite",
    subject_scale=1.0,
    text_mask: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    replaces_text=None,
    subject_tokens=None,
) -> torch.Tensor:
    """Text attention plus every subject's attention confined to its region, in one op.

    Every branch is tokens + region + scale. An image-kind subject (IP-Adapter image tokens)
    adds ``lambda_s * attn(q, K_s, V_s)`` where it acts; a text-kind subject (a regional
    prompt's text keys and values, ``replaces_text[s]``) puts ``lambda_s * attn(q, K_s, V_s)``
    in place of the global text branch where it acts (lambda_s = 1: replace; 0: no text
    there). Routing is per kind: in ``overwrite`` mode a token takes the last covering
    subject of each kind, in ``sum`` mode every covering subject of each kind adds; the
    global text branch acts exactly on the tokens no text-kind region covers. Per token::

        out = (text-kind subjects acting on it, if any region of that kind covers it,
               else attn(q, K_text, V_text)) + (image-kind subjects acting on it)

    Args:
        q: ``[B, H, N, D]`` queries, ``N == h * w`` tokens in row-major order. May be a
            strided view (e.g. the transpose of a ``[B, N, H, D]`` projection): it is
            not copied, and the output is laid out like it.
        k_text, v_text: ``[B, H, L, D]`` text keys and values, or both None: no text
            branch, the output is the routed subject branches only (FLUX's IP-Adapter path,
            where the joint attention is left as it is and the IP branch is added to it).
        k_subj, v_subj: ``[B, H, S, T, D]`` keys and values of S subjects (image or text
            tokens), T per subject at most (S may be 0); see ``subject_tokens``.
        regions: the subjects' regions on ``grid``, in ascending priority, one of
            - integer token boxes ``[S, 4]`` (shared by the batch) or ``[B, S, 4]``,
              half-open ``(x0, y0, x1, y1)`` (make them with :func:`rasterize_boxes`);
            - a bool coverage map ``[S, h, w]`` or ``[B, S, h, w]``, True where the
              subject's mask covers the token (make it with :func:`rasterize_masks`);
            - a :class:`~anyms_kernels.routing.Routing` from :func:`build_routing`, built
              once per layout and grid: the fast path for repeated calls (a generation's
              layers and steps), and the only one that builds nothing per call.
            Boxes and maps may be on q's device or the CPU.
        grid: ``(h, w)`` of this layer's token grid.
        mode: ``"overwrite"`` (AnyMS crop-and-merge: a token takes the last subject whose
            region covers it) or ``"sum"`` (every covering subject adds; the paper's Eq. 7).
        subject_scale: lambda_s, a float or a float tensor ``[S]`` / ``[B, S]``.
        text_mask: optional bool ``[B, L]`` key-padding mask of the text branch, True =
            attend; every row must keep at least one token.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        backend: ``"auto"`` (triton on CUDA tensors, torch elsewhere), ``"triton"``,
            ``"torch"`` or ``"reference"``.
        replaces_text: None (every subject is image-kind) or S bools, a sequence or a bool
            tensor ``[S]``: True for a text-kind subject (see above).
        subject_tokens: None (every subject has T keys) or S ints in ``1..T``, a sequence or
            an integer tensor ``[S]``: subject s attends to its first ``subject_tokens[s]`` keys;
            the rest of its T are padding, never read (e.g. a 4-token adapter beside a
            16-token one, or image subjects beside 77-token regional prompts).
        With a Routing, the kinds and counts are the Routing's (give them to
        :func:`build_routing`); passing them here too raises.

    Returns:
        ``[B, H, N, D]`` in q's dtype and memory layout. Forward only: inputs that
        require grad (subject_scale too) are refused, eager and compiled alike.

    Raises:
        ValueError: shapes that disagree, boxes outside the grid or inverted/empty,
            NaN scales, a fully masked text row, an unknown mode or backend, an
            unsupported head dim for Triton, inputs on different devices, a Routing
            for another grid, mode or number of subjects, ``replaces_text`` or
            ``subject_tokens`` not of length S, a token count outside 1..T (the message
            names it, e.g. ``subject_tokens[2]``), kinds or counts given beside a Routing.
        TypeError: mixed or unsupported dtypes, float boxes, a non-bool text mask,
            bfloat16 CPU tensors for the Triton interpreter.
        RuntimeError: ``backend="triton"`` where the kernel cannot run (says why);
            inputs that require grad (there is no backward).

    A query row holding NaN gives a NaN output row on every backend, with or without a
    text branch, as plain attention does; no other row is touched.

    A call compiled with ``torch.compile`` (``fullgraph=True`` too) raises the same errors,
    with the same messages, when the compiled call runs.

    Value checks (box ranges, NaN scales, an all-masked text row) read the tensors and
    are skipped while a CUDA graph is captured; for capture, pass a Routing, or boxes
    and scales on q's device.
    """
    try:
        checked = check_arguments(q, k_text, v_text, k_subj, v_subj, regions, grid, mode, subject_scale,
                                  text_mask, softmax_scale, backend, replaces_text, subject_tokens)
        _refuse_grad(q=q, k_text=k_text, v_text=v_text, k_subj=k_subj, v_subj=v_subj, subject_scale=subject_scale)
        backend = resolve_backend(backend, q)
    except (TypeError, ValueError, RuntimeError) as exc:
        if not torch.compiler.is_compiling():
            raise
        return refusal(q, exc)      # traced: raised when the graph runs, as the eager call raises it
    h, w = checked.grid
    values_checked = not torch.compiler.is_compiling()
    if values_checked:  # on the caller's own tensors, so device tensors are read once, not per call
        check_values(q, checked.grid, regions, subject_scale, text_mask, subject_tokens, k_subj.shape[3])
    eager = values_checked and type(q) is torch.Tensor   # no tracer to serve: skip the dispatcher
    routing_parts = ()
    if isinstance(checked.regions, Routing):
        if eager:
            return _run(q, k_text, v_text, k_subj, v_subj, checked.regions, checked.subject_scale, text_mask,
                        None, mode, checked.softmax_scale, backend)
        # Traced: the routing built once per layout enters the graph as its tensors, so the
        # graph builds nothing and serves every layout of the same shapes.
        regions = checked.regions.cover.view(checked.regions.batch, -1, h, w)
        routing_parts = checked.regions.parts()
    else:
        regions = checked.regions
    args = (q, k_text, v_text, k_subj, v_subj, regions, checked.subject_scale, text_mask,
            checked.replaces_text, checked.subject_tokens, h, w, mode, checked.softmax_scale, backend, values_checked, routing_parts)
    if eager:
        return _region_cross_attention_impl(*args)
    return torch.ops.anyms_kernels.region_cross_attention(*args)
