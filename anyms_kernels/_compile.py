"""Compile the region-attention kernel for a GPU this machine does not have.

``triton.compile`` with an explicit ``GPUTarget`` needs no driver: it proves the
kernel's configurations compile for real chips (sm_80, sm_90) and lets us read
their registers, spills and shared memory from the cubin, with the ptxas and
cuobjdump that ship inside the triton package.

This leans on Triton's compiler entry points (``ASTSource``, ``GPUTarget``,
``CompiledKernel.asm``), which are public but not promised stable; the
version guard and tests/kernels/test_compile.py watch them.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator

import torch

from ._triton import HAS_TRITON, TRITON_VERSION, triton, triton_unavailable_reason

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Runtime scalars of the kernel; every other UPPER-case parameter is a constexpr.
_SCALAR_ARGS = ("H", "N")
_POINTERS = {"ORDER": "*i32", "OWNER": "*i32", "TEXT_OWNER": "*i32", "COVER": "*u8", "TILE_COUNT": "*i32",
             "TILE_SUBJECTS": "*i32", "SCALES": "*fp32", "SUBJ_TOKENS": "*i32", "TEXT_MASK": "*i8"}
# What Triton's JIT specialises on a real launch with diffusers-shaped inputs: unit
# strides become constants, and pointers and row strides are multiples of 16 bytes
# / elements. The report must describe the code that actually runs.
_UNIT_STRIDES = ("stride_qd", "stride_ktd", "stride_vtd", "stride_ksd", "stride_vsd", "stride_od", "stride_ml")
_DIV16 = ("Q", "KT", "VT", "KS", "VS", "OUT", "ORDER", "OWNER", "TEXT_OWNER", "COVER", "TILE_COUNT", "TILE_SUBJECTS",
          "SUBJ_TOKENS",
          "stride_qb", "stride_qn", "stride_ktb", "stride_ktl", "stride_vtb", "stride_vtl", "stride_ksb",
          "stride_kss", "stride_kst", "stride_vsb", "stride_vss", "stride_vst", "stride_ob", "stride_on",
          "stride_rb", "stride_cb", "stride_cs", "N")


@dataclass
class ResourceUsage:
    arch: int
    dtype: str
    head_dim: int
    overwrite: bool
    block_m: int
    text_len: int
    block_t: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int       # stack frame: Triton kernels have none unless registers spill
    spill_stores: int      # bytes, from ptxas -v (-1 when ptxas could not be run)
    spill_loads: int
    shared_bytes: int      # Triton's shared-memory allocation for one program
    text_subjects: bool = False   # compiled for text-kind subjects (HAS_TEXT_SUBJECTS)
    subject_counts: bool = False  # compiled for per-subject token counts (HAS_SUBJ_TOKENS)
    int32_offsets: bool = True    # compiled with 32-bit address math (OFFSETS_32: 16-bit heads up to 64)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0


def _nvidia_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton package ({path})")
    return path


def compile_kernel(head_dim: int, dtype: torch.dtype, config, *, arch: int = 90, overwrite: bool = True,
                   has_text_mask: bool = False, text_len: int = 77, subject_tokens: int = 16, vec: int = None,
                   has_text: bool = True, text_subjects: bool = False, subject_counts: bool = False,
                   int32_offsets: bool = True):
    """Compile ``_region_attention_fwd`` for ``sm_<arch>`` without a GPU; returns the CompiledKernel.

    ``vec``: the alignment hint the launcher would pass (default: 16 bytes, what
    diffusers' layouts give for the supported head dims). ``subject_tokens``: T, the longest
    subject; ``text_subjects`` / ``subject_counts``: compile the variants for text-kind subjects
    and for per-subject token counts; ``int32_offsets``: the launcher's choice for inputs whose
    offsets fit int32 (every SDXL and FLUX layer), else the 64-bit address math."""
    reason = triton_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .ops import region_attention_triton as rt

    kernel = rt._region_attention_fwd
    if type(kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernel was defined under TRITON_INTERPRET=1; compile it in a process without it")
    ty = _TL_DTYPES[dtype]
    signature: Dict[str, str] = {}
    for name in kernel.arg_names:
        if name in ("Q", "KT", "VT", "KS", "VS", "OUT"):
            signature[name] = "*" + ty
        elif name in _POINTERS:
            signature[name] = _POINTERS[name]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif (name.isupper() and name not in _SCALAR_ARGS) or name in _UNIT_STRIDES:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    text_a, text_b = rt.text_blocks(text_len, head_dim)
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=rt.block_d(head_dim), BLOCK_M=config.block_m, HAS_TEXT=has_text,
        TEXT_LEN=text_len,
        TEXT_A=text_a, TEXT_B=text_b, ONLINE_L=rt.online_text_block(head_dim),
        PREFETCH_TEXT=rt.prefetch_text(head_dim, dtype), SUBJ_LEN=subject_tokens,
        BLOCK_T=rt.subject_block(subject_tokens), OVERWRITE=overwrite, HAS_TEXT_MASK=has_text_mask,
        HAS_TEXT_SUBJECTS=text_subjects, HAS_SUBJ_TOKENS=subject_counts,
        SUBJ_LOOP_STAGES=rt.subject_loop_stages(head_dim, subject_counts),
        VEC=vec or 16 // torch.empty((), dtype=dtype).element_size(),
        OFFSETS_32=int32_offsets and rt.prefetch_text(head_dim, dtype),   # the launcher's rule (int32_offsets)
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    constexprs.update({name: 1 for name in _UNIT_STRIDES})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in _DIV16}
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def _ptxas_spills(ptx: str, arch: int):
    """(spill store bytes, spill load bytes) from ptxas -v, or (-1, -1) if ptxas cannot run."""
    target = re.search(r"\.target\s+(sm_\w+)", ptx)
    try:
        tool = _nvidia_tool("ptxas-blackwell" if arch >= 90 else "ptxas")
    except FileNotFoundError:
        try:
            tool = _nvidia_tool("ptxas")
        except FileNotFoundError:
            return -1, -1
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch_flag = target.group(1) if target else f"sm_{arch}"
        r = subprocess.run([tool, f"-arch={arch_flag}", "-v", src, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stdout + r.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def resource_usage(head_dim: int, dtype: torch.dtype, config, *, arch: int = 90, overwrite: bool = True,
                   text_len: int = 77, subject_tokens: int = 16, text_subjects: bool = False,
                   subject_counts: bool = False, int32_offsets: bool = True) -> ResourceUsage:
    """Registers, stack, spills and shared memory of one configuration, read from its cubin."""
    from .ops import region_attention_triton as rt

    ck = compile_kernel(head_dim, dtype, config, arch=arch, overwrite=overwrite, text_len=text_len,
                        subject_tokens=subject_tokens, text_subjects=text_subjects, subject_counts=subject_counts,
                        int32_offsets=int32_offsets)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        out = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    stores, loads = _ptxas_spills(ck.asm["ptx"], arch)
    return ResourceUsage(
        arch=arch, dtype=_TL_DTYPES[dtype], head_dim=head_dim, overwrite=overwrite,
        block_m=config.block_m, text_len=text_len, block_t=subject_tokens, num_warps=config.num_warps,
        num_stages=config.num_stages, registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]),
        spill_stores=stores, spill_loads=loads, shared_bytes=int(ck.metadata.shared),
        text_subjects=text_subjects, subject_counts=subject_counts,
        int32_offsets=int32_offsets and rt.prefetch_text(head_dim, dtype),
    )


def default_configurations(archs=(80, 90)) -> Iterator[tuple]:
    """(arch, head_dim, dtype, config) for the heuristic's choice of every supported case."""
    from .ops.region_attention import TRITON_DTYPES, TRITON_HEAD_DIMS, config_candidates

    for arch in archs:
        for dtype in TRITON_DTYPES:
            for head_dim in TRITON_HEAD_DIMS:
                yield arch, head_dim, dtype, config_candidates(head_dim, dtype)[0]


__all__ = ["ResourceUsage", "compile_kernel", "resource_usage", "default_configurations", "TRITON_VERSION",
           "HAS_TRITON"]
