"""Kernels with published GPU timings, to validate the SASS timing model (``sass_timing``).

    env -u TRITON_INTERPRET python benchmarks/validation_kernels.py

- ``_attn_fwd``: the forward pass of Triton's fused-attention tutorial (FlashAttention-2:
  one program per BLOCK_M queries of one (batch, head), an online softmax over BLOCK_N key
  blocks), written with plain pointers as the tutorial's pointer version was. Published: the
  tutorial's own table (https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html),
  batch 4, 32 heads, D=64, fp16, forward, non-causal: 141.4 TFLOPS at N_CTX=1024, 166.6 at
  16384. The page does not name its GPU; the figures fit an A100 (53% of its 312 TFLOPS), far
  under what the same kernel does on an H100, so they are compared with the A100 model.
- ``_copy``: a plain copy, one BLOCK of elements per program, at a size (1 GiB each way) where
  launch and tail do not matter. Published: the device-copy rates the model itself assumes
  (docs/PERFORMANCE.md): this checks that the walk adds no latency a bandwidth-bound kernel
  hides, not the rates.

Prints each kernel's predicted and published figure and the model's error.
"""
from __future__ import annotations

import os
import sys

import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))


@triton.jit
def _attn_fwd(Q, K, V, Out, sm_scale, stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
              stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om, H, N_CTX: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :])
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    for start_n in range(0, N_CTX, BLOCK_N):
        k = tl.load(k_base + (start_n + offs_n)[None, :] * stride_kn + offs_d[:, None])
        qk = tl.dot(q, k)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        l_ij = tl.sum(p, 1)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + l_ij
        acc = acc * alpha[:, None]
        v = tl.load(v_base + (start_n + offs_n)[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(tl.float16), v, acc)
        m_i = m_ij
    acc = tl.fdiv(acc, l_i[:, None])       # the tutorial's acc / l_i, without the IEEE slow-path call
    tl.store(Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(Out.dtype.element_ty))


@triton.jit
def _copy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


# The tutorial's published forward figures (fp16, non-causal, batch 4, 32 heads, D=64).
ATTENTION_PUBLISHED_TFLOPS = {1024: 141.4, 16384: 166.6}
ATTENTION_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)   # the tutorial's A100 choice
COPY_CONFIG = dict(BLOCK=4096, num_warps=4)


def _compile(kernel, signature, constexprs, arch, num_warps, num_stages=3, div16=()):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                 num_stages=num_stages))


def compile_attention(arch: int, n_ctx: int):
    sig = {n: "i32" for n in _attn_fwd.arg_names}
    sig.update(Q="*fp16", K="*fp16", V="*fp16", Out="*fp16", sm_scale="fp32", HEAD_DIM="constexpr",
               BLOCK_M="constexpr", BLOCK_N="constexpr", N_CTX="constexpr")
    c = ATTENTION_CONFIG
    return _compile(_attn_fwd, sig, dict(HEAD_DIM=64, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], N_CTX=n_ctx), arch,
                    c["num_warps"], c["num_stages"],
                    div16=[n for n in _attn_fwd.arg_names if n.startswith("stride") or n in ("Q", "K", "V", "Out")])


def compile_copy(arch: int):
    return _compile(_copy, {"X": "*fp16", "Y": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                    dict(BLOCK=COPY_CONFIG["BLOCK"]), arch, COPY_CONFIG["num_warps"], div16=("X", "Y", "n"))


def validate(verbose: bool = False):
    """[(kernel, device, shape, predicted, published, unit, error)] and prints them."""
    sys.path.insert(0, HERE)
    import kernel_cost as kc
    from sass_timing import control_codes, kernel_time

    rows = []
    nvd = kc.nvidia_tool("nvdisasm")

    def study(ck, source, constructs, trips, load_class):
        sass = kc.disassemble(ck.asm["cubin"])
        an = kc.analyse(sass, source, constructs)
        freq = kc.frequencies(an, trips, {})
        ctrl = control_codes(ck.asm["cubin"], nvd)
        comp = kc.Compiled(ck.asm["cubin"], ck.asm["ptx"], int(ck.metadata.shared), ck.metadata.num_warps, 0, source)
        res = kc.resources(comp, ck.metadata.target.arch)
        lc = lambda ins: load_class([an.source.lines[f - 1] for f in an.source.frames(ins.chain)])
        return an, freq, ctrl, res, comp, lc

    src = os.path.abspath(__file__)
    # fused attention, A100
    loop = kc.Construct("keys", "loop", [("_attn_fwd", ("for", 0, "for start_n"))], "text")
    for n_ctx, published in ATTENTION_PUBLISHED_TFLOPS.items():
        ck = compile_attention(80, n_ctx)
        trips = {"keys": n_ctx // ATTENTION_CONFIG["BLOCK_N"]}
        # Q from HBM; K/V: each (batch, head)'s keys are read by its N_CTX / BLOCK_M programs, which
        # run together (program_id(0) varies fastest): the first read misses, the rest hit L2.
        an, freq, ctrl, res, comp, lc = study(ck, src, [loop], trips,
                                              lambda lines: "hbm" if any("tl.load(Q" in ln for ln in lines) else "l2")
        dev = kc.A100
        progs, _ = kc.programs_per_sm(dev, res["registers"], comp.shared, comp.num_warps)
        programs = (n_ctx // ATTENTION_CONFIG["BLOCK_M"]) * 4 * 32
        kt = kernel_time([(1.0, an, freq, trips, ctrl, lc)], kc.machine(dev), programs, max(1, progs), comp.num_warps)
        flops = 4 * 4 * 32 * n_ctx * n_ctx * 64
        tflops = flops / (kt.us * 1e-6) / 1e12
        rows.append(("fused attention fwd (tutorial)", "A100", f"B=4 H=32 N_CTX={n_ctx} D=64 fp16", round(tflops, 1),
                     published, "TFLOPS", round(tflops / published - 1, 3),
                     f"regs={res['registers']} progs/SM={progs} prog={kt.program_cycles:.0f}clk waves={kt.waves:.2f}"))
    # copy, every modelled device
    ck80, ck90 = compile_copy(80), compile_copy(90)
    for dev in (kc.A100, kc.H100, kc.H200):
        ck = ck90 if dev.arch == 90 else ck80
        an, freq, ctrl, res, comp, lc = study(ck, src, [], {}, lambda lines: "hbm")
        progs, _ = kc.programs_per_sm(dev, res["registers"], comp.shared, comp.num_warps)
        n = 1 << 29                         # fp16 elements: 1 GiB read, 1 GiB written
        programs = n // COPY_CONFIG["BLOCK"]
        kt = kernel_time([(1.0, an, freq, {}, ctrl, lc)], kc.machine(dev), programs, max(1, progs), comp.num_warps)
        rate = 2 * n * 2 / (kt.us * 1e-6) / 1e12
        rows.append(("copy", dev.name, "1 GiB fp16", round(rate, 3), dev.copy_tb_s, "TB/s",
                     round(rate / dev.copy_tb_s - 1, 3),
                     f"regs={res['registers']} progs/SM={progs} prog={kt.program_cycles:.0f}clk waves={kt.waves:.1f}"))
    for r in rows:
        print(f"{r[0]:32s} {r[1]:5s} {r[2]:28s} predicted {r[3]:>8} {r[5]}, published {r[4]:>7}: "
              f"error {r[6]:+.1%}  ({r[7]})")
    return rows


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    validate()
