"""Argument checks of the public op: every bad input raises, naming the argument.

Two kinds of check:
- metadata (shapes, dtypes, devices, names): free, done on every call, also
  while torch.compile traces;
- values (box ranges, NaN scales, an all-masked text row): they read tensors,
  so on a GPU they synchronise with the device. CPU tensors are checked on every
  call; a GPU tensor once per tensor and version (a generation reuses the same
  boxes in every layer); none while a CUDA graph is being captured, where a sync
  is illegal. Under torch.compile they run inside the op, eagerly.

While torch.compile traces, an exception raised by a metadata check would reach the
caller as dynamo's "Observed exception" (with ``fullgraph=True``), its message lost.
So a traced call that fails a check puts :func:`refusal` in the graph instead: an op
that raises the same exception, with the same message, when the graph runs.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .regions import (Grid, check_grid, check_mode, check_replaces_text, check_subject_tokens, check_token_boxes,
                      refuse_non_real)

BACKENDS = ("auto", "triton", "torch", "reference")
_LOG2E = 1.4426950408889634
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BOX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


@dataclass
class Checked:
    """The op's arguments after the checks, in the one form every backend takes."""
    grid: Grid
    regions: object              # int64 boxes [B, S, 4] or bool coverage [B, S, h, w] on q's device
                                 # (batch stride 0 when shared), or a Routing
    subject_scale: torch.Tensor  # float32 [B, S] on q's device (float64 for float64 q; strides 0 when broadcast)
    softmax_scale: float
    replaces_text: Optional[torch.Tensor] = None   # bool [S] on q's device; None: every subject an image branch
    subject_tokens: Optional[torch.Tensor] = None  # int [S] on q's device; None: every subject all T keys


# ------------------------------------------------------------- refusals that survive tracing
_REFUSABLE = {cls.__name__: cls for cls in (TypeError, ValueError, RuntimeError)}


@torch.library.custom_op("anyms_kernels::refuse", mutates_args=())
def _refuse(like: torch.Tensor, kind: str, message: str) -> torch.Tensor:
    raise _REFUSABLE[kind](message)


@_refuse.register_fake
def _(like, kind, message):
    return torch.empty_like(like)


# Never dropped from a graph as unused: the raise is the point.
torch.fx.node.has_side_effect(torch.ops.anyms_kernels.refuse.default)


def refusal(like, exc: Exception) -> torch.Tensor:
    """For a traced call: the op output's stand-in, which raises ``exc`` (same type, same
    message) when the compiled graph runs. ``like``: the call's q when it is a tensor."""
    if not (isinstance(like, torch.Tensor) and like.dim() == 4):
        like = torch.empty(0, 0, 0, 0)
    # detached: nothing to differentiate (a q that requires grad is itself a refusal)
    return torch.ops.anyms_kernels.refuse(like.detach(), type(exc).__name__, _message(exc))


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _shape(t) -> str:
    """str(tuple(t.shape)), built one int at a time: torch.compile puts a message in its graph
    only when it is a constant string, and it cannot format a tuple of sizes that were dynamic
    (int() pins the failing call's sizes, which is what the message states)."""
    text = ""
    for d in t.shape:
        text += f", {int(d)}" if text else f"{int(d)}"
    return f"({text},)" if t.dim() == 1 else f"({text})"


def check_arguments(q, k_text, v_text, k_subj, v_subj, regions, grid, mode, subject_scale,
                    text_mask, softmax_scale, backend, replaces_text=None, subject_tokens=None) -> Checked:
    check_mode(mode)
    check_backend(backend)
    grid = check_grid(grid)
    if (k_text is None) != (v_text is None):
        raise ValueError("k_text and v_text must both be tensors, or both None (no text branch)")
    named = dict(q=q, k_text=k_text, v_text=v_text, k_subj=k_subj, v_subj=v_subj)
    if k_text is None:
        del named["k_text"], named["v_text"]
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got shape {_shape(q)}")
    B, H, N, D = q.shape
    for name, t in named.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share one device")
    h, w = grid
    if N != h * w:
        raise ValueError(f"q has N={int(N)} tokens but grid {h}x{w} has {h * w}: N must equal h*w")
    if D < 1:
        raise ValueError(f"q has head dim D={int(D)}; it must be at least 1")
    L = 0
    if k_text is not None:
        for name in ("k_text", "v_text"):
            t = named[name]
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
                raise ValueError(f"{name} must be [B={int(B)}, H={int(H)}, L, D={int(D)}], got shape {_shape(t)}")
        if k_text.shape != v_text.shape:
            raise ValueError(f"k_text {_shape(k_text)} and v_text {_shape(v_text)} must have the same shape")
        L = k_text.shape[2]
        if L < 1:
            raise ValueError("k_text must hold at least one text token (L >= 1)")
    for name in ("k_subj", "v_subj"):
        t = named[name]
        if t.dim() != 5 or t.shape[0] != B or t.shape[1] != H or t.shape[4] != D:
            raise ValueError(f"{name} must be [B={int(B)}, H={int(H)}, S, T, D={int(D)}], got shape {_shape(t)}")
    if k_subj.shape != v_subj.shape:
        raise ValueError(f"k_subj {_shape(k_subj)} and v_subj {_shape(v_subj)} must have the same shape")
    S, T = k_subj.shape[2], k_subj.shape[3]
    if S > 0 and T < 1:
        raise ValueError("k_subj must hold at least one token per subject (T >= 1)")

    regions = _check_regions(regions, B, S, grid, mode, q.device)
    if isinstance(regions, torch.Tensor):
        kinds = check_replaces_text(replaces_text, S, q.device)
        # values: lists here, tensors in check_values (a tensor's read is a device sync)
        counts, _ = check_subject_tokens(subject_tokens, S, T, q.device, read_values=False)
    else:                               # a Routing carries its subjects' kinds and counts
        for name, given in (("replaces_text", replaces_text), ("subject_tokens", subject_tokens)):
            if given is not None:
                raise ValueError(f"{name} is given with a Routing: pass it to build_routing, whose Routing "
                                 "carries the subjects' kinds and token counts")
        if regions.max_subject_tokens is not None and regions.max_subject_tokens > T:
            raise ValueError(f"regions is a Routing with subject_tokens up to {regions.max_subject_tokens} but "
                             f"k_subj has T={int(T)} tokens per subject")
        kinds, counts = regions.replaces_text, regions.subject_tokens
    # float32 feeds the kernel; a float64 oracle keeps float64 scales.
    scale_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scales = _check_subject_scale(subject_scale, B, S, q.device, scale_dtype)
    if text_mask is not None and k_text is None:
        raise ValueError("text_mask is given but k_text is None: there is no text branch to mask")
    if text_mask is not None:
        if not isinstance(text_mask, torch.Tensor):
            raise TypeError(f"text_mask must be a bool tensor [B, L] or None, got {type(text_mask).__name__}")
        if text_mask.dtype != torch.bool:
            raise TypeError(f"text_mask must be a bool tensor (True = attend), got {text_mask.dtype}")
        if tuple(text_mask.shape) != (B, L):
            raise ValueError(f"text_mask must be [B={int(B)}, L={int(L)}], got shape {_shape(text_mask)}")
        if text_mask.device != q.device:
            raise ValueError(f"text_mask is on {text_mask.device} but q is on {q.device}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite positive float, got {softmax_scale}")
    # The kernels compute logits as float32 (q.k) * (softmax_scale * log2(e)): that factor must be a
    # finite float32, or every logit is infinite.
    if not math.isfinite(float(torch.tensor(softmax_scale * _LOG2E, dtype=torch.float32))):
        raise ValueError(f"softmax_scale={softmax_scale} overflows float32, in which the kernels scale the logits")
    return Checked(grid, regions, scales, softmax_scale, kinds, counts)


def _check_regions(regions, B, S, grid, mode, device):
    """Token boxes, a bool coverage map, or a Routing; the first two in the op's one form."""
    from .routing import Routing

    if isinstance(regions, Routing):
        h, w = grid
        if regions.grid != grid:
            raise ValueError(f"regions is a Routing for grid {regions.grid} but the call's grid is {grid}")
        if regions.mode != mode:
            raise ValueError(f"regions is a Routing built for mode={regions.mode!r} but the call has mode={mode!r}")
        if regions.num_subjects != S:
            raise ValueError(f"regions is a Routing of {regions.num_subjects} subjects but k_subj has S={int(S)}")
        if regions.batch not in (1, B):
            raise ValueError(f"regions is a Routing of batch {regions.batch} but q has B={int(B)}")
        if regions.device != device:
            raise ValueError(f"regions is a Routing on {regions.device} but q is on {device}: build it on q's device")
        return regions
    if isinstance(regions, torch.Tensor) and regions.dtype == torch.bool:
        h, w = grid
        if regions.device != device and regions.device.type != "cpu":
            raise ValueError(f"regions is on {regions.device} but q is on {device}: pass it on q's device or the CPU")
        if regions.dim() == 3 and regions.shape == (S, h, w):
            regions = regions.unsqueeze(0)
        elif not (regions.dim() == 4 and regions.shape[1:] == (S, h, w) and regions.shape[0] in (1, B)):
            raise ValueError(
                f"regions as a coverage map must be bool [S={int(S)}, h={h}, w={w}] or [B={int(B)}, S, h, w] on "
                f"the call's grid (make it with anyms_kernels.rasterize_masks), got shape {_shape(regions)}")
        return regions.to(device)
    return _check_boxes(regions, B, S, device)


def _check_boxes(boxes, B, S, device) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        try:
            refuse_non_real(boxes, "boxes")
            boxes = torch.as_tensor(boxes)     # its own dtype: floats must not be truncated to ints
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"regions must be int token boxes [S, 4] / [B, S, 4], a bool coverage map or a Routing: "
                            f"{_message(exc)}") from None
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4).to(torch.int64)
    if boxes.is_floating_point() or boxes.dtype not in BOX_DTYPES:
        raise TypeError(
            f"boxes must be an integer tensor of token boxes, got {boxes.dtype}; "
            "turn normalised boxes into token boxes with anyms_kernels.rasterize_boxes(boxes, grid)"
        )
    if boxes.device != device and boxes.device.type != "cpu":
        raise ValueError(f"boxes is on {boxes.device} but q is on {device}: pass them on q's device or the CPU")
    if boxes.dim() == 2 and boxes.shape == (S, 4):
        boxes = boxes.unsqueeze(0).expand(B, S, 4)
    elif boxes.dim() == 3 and boxes.shape[1:] == (S, 4) and boxes.shape[0] in (1, B):
        boxes = boxes.expand(B, S, 4)
    else:
        raise ValueError(
            f"boxes must be [S={int(S)}, 4] or [B={int(B)}, S={int(S)}, 4] (one box per subject of k_subj), "
            f"got shape {_shape(boxes)}"
        )
    # to(...) copies only when needed; expanded batch stays stride 0. int64, never narrower: the
    # value checks (eager, or inside the op under torch.compile) must see the caller's numbers,
    # and an int32 cast would turn 2**32 + 2 into a valid 2.
    return boxes.to(device=device, dtype=torch.int64)


def _message(exc: Exception) -> str:
    """str(exc), in a form torch.compile can trace into a new message (it cannot call str on
    an exception whose message it built itself)."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _check_subject_scale(subject_scale, B, S, device, dtype) -> torch.Tensor:
    if isinstance(subject_scale, bool):
        raise TypeError("subject_scale must be a float or a tensor [S] / [B, S], got a bool")
    if isinstance(subject_scale, (int, float)):
        if not math.isfinite(subject_scale) or not math.isfinite(float(torch.tensor(subject_scale, dtype=dtype))):
            what = "NaN" if math.isnan(subject_scale) else "not finite"
            raise ValueError(f"subject_scale is {what} in {str(dtype).replace('torch.', '')}, in which the "
                             f"kernels compute: got {subject_scale}")
        return torch.full((1, 1), float(subject_scale), dtype=dtype, device=device).expand(B, S)
    if not isinstance(subject_scale, torch.Tensor):
        raise TypeError(f"subject_scale must be a float or a tensor [S] / [B, S], got {type(subject_scale).__name__}")
    if not subject_scale.is_floating_point():
        raise TypeError(f"subject_scale must be a floating-point tensor, got {subject_scale.dtype}")
    if subject_scale.device != device and subject_scale.device.type != "cpu":
        raise ValueError(f"subject_scale is on {subject_scale.device} but q is on {device}")
    shape = tuple(subject_scale.shape)
    if shape == (S,):
        subject_scale = subject_scale.unsqueeze(0)
    elif not (len(shape) == 2 and shape[1] == S and shape[0] in (1, B)):
        raise ValueError(f"subject_scale must be a float, [S={int(S)}] or [B={int(B)}, S={int(S)}], "
                         f"got shape {_shape(subject_scale)}")
    return subject_scale.expand(B, S).to(device=device, dtype=dtype)


def _check_box_values(boxes, grid):
    check_token_boxes(boxes, grid, "boxes")


def _check_scale_values(scale, grid):
    # In the units the kernels compute in: a float64 1e300 is finite but overflows float32.
    units = scale if scale.dtype == torch.float64 and grid == ("float64",) else scale.to(torch.float32)
    if scale.numel() and not torch.isfinite(units).all():
        raise ValueError("subject_scale holds NaN or inf, or values that overflow float32 (the kernels' units)")


def _check_count_values(counts, what):
    check_subject_tokens(counts, counts.shape[0], what[1])


def _check_mask_values(text_mask, grid):
    keeps = text_mask.any(dim=1)
    if not keeps.all():
        row = int((~keeps).nonzero()[0, 0])
        raise ValueError(f"text_mask masks every text token of batch row {row}: keep at least one per row")


# Device tensors whose values passed, so that a generation's 70 layers x N steps pay one
# device sync per boxes/scales tensor rather than one per call. Keyed by id, holding a
# weak reference (a dead tensor drops its entry, so a new tensor at a reused id is never
# taken for it) and the version counter (an in-place change invalidates the entry).
_CHECKED_ON_DEVICE: Dict[int, Tuple[weakref.ref, int, tuple]] = {}


def _check_once(t: torch.Tensor, what: tuple, check: Callable) -> None:
    if t.device.type == "cpu":
        check(t, what)                      # free: no device to wait for
        return
    if t.is_inference():
        # Inference tensors have no version counter, so an in-place change could not be
        # seen: check them on every call (a device sync; a Routing or a Layout avoids it).
        check(t, what)
        return
    entry = _CHECKED_ON_DEVICE.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == t._version and entry[2] == what:
        return
    check(t, what)
    key = id(t)
    _CHECKED_ON_DEVICE[key] = (weakref.ref(t, lambda _ref: _CHECKED_ON_DEVICE.pop(key, None)), t._version, what)


def check_values(q, grid: Grid, regions, subject_scale, text_mask: Optional[torch.Tensor], subject_tokens=None,
                 max_tokens: int = 0) -> None:
    """The checks that read tensor values (see the module docstring).

    Pass the tensors as the caller gave them (not per-call views of them), so that a
    device tensor that already passed is recognised and not read again.
    """
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if isinstance(regions, torch.Tensor):
        if regions.dtype != torch.bool:             # coverage maps and Routings have no bad values
            _check_once(regions, tuple(grid), _check_box_values)
    elif not hasattr(regions, "cover"):
        check_token_boxes(torch.as_tensor(regions), grid, "boxes")
    if isinstance(subject_scale, torch.Tensor):
        _check_once(subject_scale, ("float64",) if q.dtype == torch.float64 else (), _check_scale_values)
    if text_mask is not None:
        _check_once(text_mask, (), _check_mask_values)
    if isinstance(subject_tokens, torch.Tensor):     # a sequence was read by check_arguments
        _check_once(subject_tokens, ("tokens", int(max_tokens)), _check_count_values)
