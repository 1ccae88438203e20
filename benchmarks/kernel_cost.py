"""A static cost model of the fused region-attention kernel: its instruction count per
query tile, read from the compiled code, and the time it predicts on an A100 / H100 / H200.

    env -u TRITON_INTERPRET python benchmarks/kernel_cost.py [--tag after]   # this tree's kernel
    env -u TRITON_INTERPRET python benchmarks/kernel_cost.py --tree DIR --tag before

``--tree DIR`` analyses another checkout's ``anyms_kernels`` (e.g. a worktree of an older
commit: ``git worktree add /tmp/before 4ffb8c8``); the kernel generation is detected.
``--verbose`` prints the SASS-loop / if matches and a per-source-line profile.

No GPU is needed: every configuration is compiled with ``triton.compile(...,
target=GPUTarget("cuda", arch, 32))`` for sm_80 (A100) and sm_90 (H100/H200), and read
back with the ``nvdisasm`` / ``cuobjdump`` / ``ptxas`` that ship inside the triton package.
Writes ``benchmarks/results/kernel_cost_<tag>.csv``; the last line printed is the reference
shape's result, ``... predicted <ratio>x floor`` (predicted time over the HBM floor, sm_90).

Method (each step can be checked by hand; ``--dump DIR`` writes the annotated SASS)
-------------------------------------------------------------------------------------
1. Compile. The kernel generation's driver (``GENERATIONS`` below) compiles one cubin
   per (arch, mode, subject block) with the compile entry point in
   ``anyms_kernels/_compile.py``: the same constexprs, 16-byte divisibility and unit
   strides Triton's JIT specialises on for diffusers-shaped inputs, no text mask (what
   SDXL pipelines pass).
2. Disassemble. ``nvdisasm -c -gi`` prints every SASS instruction under its source
   location, with the inlining chain (``line 57 inlined at line 120``, one line per level,
   through triton's own ``tl.max`` / ``tl.sum`` helpers): Triton inlines every
   ``@triton.jit`` helper, and keeps the call site of each copy.
3. Basic blocks and loops. Leaders are the entry, branch targets and the instruction after
   a branch or EXIT. A backward branch (target at or before it) closes a loop spanning
   [target, branch]; Triton's structured control flow makes loops contiguous and nested.
4. Source constructs. The driver names, in the kernel's Python source, the loops and ifs
   that decide how often code runs (e.g. "the ``for`` in ``_attend`` inlined at the text
   call"), as a path of (function, AST node) pairs; ``ast`` gives their line ranges. An
   instruction belongs to a construct when its inlining chain passes through those line
   ranges, innermost first. Each SASS loop is matched to the deepest construct that owns
   at least half of its own instructions (those not in a nested loop); each declared
   ``if`` to the forward branch whose skipped range best covers the if-body's
   instructions (Jaccard, reported). Every construct with instructions must be matched.
5. Execution counts. Every conditional branch gets a probability: a loop's back edge
   (n-1)/n, or its exit 1/n, for n trips per entry (from the driver: text key steps
   ceil(L / BLOCK_L), subjects S, subject key steps ceil(T / BLOCK_T), ...); a matched
   ``if`` skips with 1 - (executions / entries); a forward branch that skips a loop is its
   zero-trip guard (never taken unless that loop has 0 trips); any other forward branch is
   assumed not taken (its code runs: an upper bound; listed under ``--verbose``). A
   predicated ``@P EXIT`` ends some threads, not the warp: it falls through. The
   expected visits of each block then solve f = entry + P^T f (a Markov chain; exact for
   these deterministic trip counts). Solved once per distinct tile parameters (e.g. the
   number of subjects acting on the tile), weighted by how many tiles have them.
6. Categories. A block inside a matched construct takes that construct's category
   (``text``, ``per_subject`` = every subject the loop visits, ``per_acting`` = each
   subject that acts on the tile); a block outside all of them runs once per tile and its
   instructions are ``text`` when their source lies in the text branch, else ``fixed``
   (so ``fixed`` also holds a loop's preheader, which runs once per tile that enters the
   loop: with per-tile subject lists it is a fractional amount).
   Per-subject numbers are category totals over all tiles divided by the subjects visited
   (or acting) over all tiles. Counts are warp-instructions issued by one warp, including
   predicated-off ones (``@!PT``: they still take an issue slot); a tile issues
   num_warps times that (no warp specialisation, and every branch is warp-uniform).
7. Time (``sass_timing``, whose docstring states the method). One warp of one program is
   walked through the blocks it executes (the frequencies of step 5, per tile class), issuing
   each instruction ``stall`` cycles after the last as its control word says, waiting where it
   names a scoreboard, a cp.async group or a wgmma group, with the stated latencies of the
   loads that set them: the query rows from HBM, everything else from L2 (``load_class``).
   The warps of the programs resident on the SM (registers and shared memory of the cubin)
   run in lockstep with it: they share its schedulers, pipes (tensor, MUFU, FP32, shared
   memory) and the SM's share of the chip's HBM and L2 bandwidth, so memory and compute
   overlap only where the code overlaps them (a load issued before independent work, a
   prefetch of the next tile). Waves: full waves at full residency, then the tail at its own;
   a wave ends when its traffic (its stores included) has moved. The predicted time is that;
   its ratio to the floor (Q + O bytes at the device-copy rate) is the figure reported. The
   largest of the separate bounds (HBM, L2, tensor, exp, issue) is kept in the CSV as
   ``lower_bound_us``: it is a lower bound, not a prediction. Validated on kernels with
   published GPU timings (``benchmarks/validation_kernels.py``; errors in docs/cost-model.md).

Hardware assumed (``DEVICES``): H100 SXM, 132 SMs at 1.755 GHz (a sustained clock
under load, below the 1.98 GHz maximum), 3.0 TB/s device copy (reads + writes), 4096
dense fp16 tensor FLOP per clock per SM (989 TF at 1.83 GHz); H200: the same SMs,
4.3 TB/s; A100 SXM (for the sm_80 cubin): 108 SMs at 1.41 GHz, 1.7 TB/s copy, 2048 FLOP
per clock per SM. MUFU: 16 results per clock per SM (sm_80, sm_90).

Acting subjects per tile. Generation 1 (one program per BLOCK_M consecutive row-major
tokens): a subject acts on a tile if its box (sum mode) or the tokens it owns (overwrite:
the last covering box) meet the tile; computed here from the boxes of
``benchmarks/bench_region_attention.py``'s layouts. Generation 2 sorts the tokens by
what acts on them (``anyms_kernels/routing.py``) and lists each tile's subjects: its driver
takes the per-tile counts from that routing (``--acting`` names another function).

Adding a kernel generation: write a ``Generation`` (detect, compile, constructs, trip
counts, acting counts) and add it to ``GENERATIONS``; the analysis itself is generic
(``analyse(cubin SASS, kernel source, constructs, tile parameters)``).
"""
from __future__ import annotations

import argparse
import ast
import csv
import importlib
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# ----------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Device:
    name: str
    arch: int
    sms: int
    clock_ghz: float
    copy_tb_s: float          # device-to-device copy rate, reads + writes
    tc_flop_per_clk_sm: int   # dense fp16/bf16 tensor FLOP per clock per SM
    mufu_per_clk_sm: int = 16
    schedulers: int = 4
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472     # bytes usable by programs (sm_90: 228 KiB)
    smem_reserved: int = 1024     # per program (the driver's reservation)
    max_warps: int = 64
    max_programs: int = 32
    # Stated, not measured here (calibrate against a GPU run): L2 hit bandwidth for the whole
    # chip, and the latency of one dependent global load served by HBM / by L2, in cycles.
    l2_tb_s: float = 5.5
    hbm_latency_clk: int = 700
    l2_latency_clk: int = 270


H100 = Device("H100", 90, 132, 1.755, 3.0, 4096)
H200 = Device("H200", 90, 132, 1.755, 4.3, 4096)
A100 = Device("A100", 80, 108, 1.41, 1.7, 2048, smem_per_sm=167936, l2_tb_s=4.0, hbm_latency_clk=550,
              l2_latency_clk=230)
DEVICES = {90: (H100, H200), 80: (A100,)}


def machine(dev: Device):
    """The device as the SASS walk sees it (``sass_timing.Machine``): the same stated figures."""
    from sass_timing import Latencies, Machine
    return Machine(dev.name, dev.arch, dev.sms, dev.clock_ghz, dev.copy_tb_s, dev.l2_tb_s, sm_bytes_per_clk=64.0,
                   tc_fma_per_clk_sm=dev.tc_flop_per_clk_sm // 2, fp32_per_clk_sm=128 if dev.arch >= 90 else 64,
                   lat=Latencies(hbm=dev.hbm_latency_clk, l2=dev.l2_latency_clk))


def query_load_class(source_lines: Sequence[str]) -> str:
    """Where a global load of the kernel is served: the query tile (read once per layer) from HBM,
    everything else (routing tables, text and subject K/V re-read by every (batch, head) tile,
    scales) from L2."""
    return "hbm" if any(re.search(r"\btl\.load\(\s*Q\b|_load_query", ln) for ln in source_lines) else "l2"


def programs_per_sm(dev: Device, registers: int, shared: int, num_warps: int) -> Tuple[int, str]:
    """Resident programs per SM and the resource that limits them."""
    per_warp = math.ceil(registers * 32 / 256) * 256          # allocation unit: 256 registers per warp
    by_regs = (dev.regs_per_sm // per_warp) // num_warps if per_warp else dev.max_programs
    by_smem = dev.smem_per_sm // (shared + dev.smem_reserved)
    by_warps = dev.max_warps // num_warps
    limits = {"registers": by_regs, "shared": by_smem, "warps": by_warps, "max": dev.max_programs}
    which = min(limits, key=limits.get)
    return limits[which], which


# ------------------------------------------------------------------------ SASS parsing
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+|[A-Za-z_][\w.$]*):\s*$")
_LOC = re.compile(r'"([^"]+)", line (\d+)')
_PRED = re.compile(r"^(@!?U?P[T0-9])\s+")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Instr:
    addr: int
    text: str
    opcode: str
    pred: Optional[str]
    target: Optional[str]               # branch target label
    chain: Tuple[Tuple[str, int], ...]  # source locations, innermost first (the inlining chain)


def nvidia_tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton package ({path})")
    return path


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvidia_tool("nvdisasm"), "-c", "-gi", path], capture_output=True, text=True,
                              check=True).stdout


def parse_sass(text: str) -> Tuple[List[Instr], Dict[str, int]]:
    """Instructions of the (single) kernel function, and label -> address."""
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    chain: Tuple[Tuple[str, int], ...] = ()
    new_group = True
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//##"):
            # A group of consecutive lines is one location: "A inlined at B", "B inlined at C", "C".
            locs = tuple((f, int(n)) for f, n in _LOC.findall(s))
            if new_group:
                chain, new_group = locs, False
            elif locs and chain and locs[0] == chain[-1]:
                chain = chain[:-1] + locs
            elif locs and locs[0] not in chain:
                chain = chain + locs
            continue
        m = _LABEL.match(s)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        new_group = True
        addr, body = int(m.group(1), 16), m.group(2)
        pm = _PRED.match(body)
        pred = pm.group(1) if pm else None
        rest = body[pm.end():] if pm else body
        opcode = rest.split()[0].rstrip(";") if rest.split() else ""
        tm = _TARGET.search(rest)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(Instr(addr, body, opcode, pred, tm.group(1) if tm else None, chain))
    for lab in pending:                 # a label after the last instruction
        labels[lab] = (instrs[-1].addr + 16) if instrs else 0
    return instrs, labels


def is_branch(i: Instr) -> bool:
    return i.opcode.split(".")[0] in ("BRA", "JMP", "BRX", "JMX", "CALL", "RET")


# ---------------------------------------------------------------------------- the CFG
@dataclass
class Block:
    index: int
    start: int
    instrs: List[Instr]
    succ: List[Tuple[int, str]] = field(default_factory=list)   # (block index, "taken" | "fall")

    @property
    def end(self) -> int:
        return self.instrs[-1].addr

    @property
    def term(self) -> Instr:
        return self.instrs[-1]


def build_cfg(instrs: List[Instr], labels: Dict[str, int]) -> List[Block]:
    for i in instrs:
        op = i.opcode.split(".")[0]
        # CALL.REL.NOINC pushes no return address: ptxas uses it as a jump (a pipelined loop's exit)
        if op in ("BRX", "JMX", "RET") or (op == "CALL" and ".NOINC" not in i.opcode):
            raise NotImplementedError(f"indirect branch / call in the kernel: {i.text!r} (not modelled)")
    leaders = {instrs[0].addr} | {labels[i.target] for i in instrs if i.target}
    for a, b in zip(instrs, instrs[1:]):
        if is_branch(a) or a.opcode == "EXIT":
            leaders.add(b.addr)
    blocks: List[Block] = []
    for i in instrs:
        if i.addr in leaders or not blocks:
            blocks.append(Block(len(blocks), i.addr, []))
        blocks[-1].instrs.append(i)
    at = {b.start: b.index for b in blocks}
    for b in blocks:
        t = b.term
        nxt = b.index + 1 if b.index + 1 < len(blocks) else None
        if is_branch(t):
            b.succ.append((at[labels[t.target]], "taken"))
            if t.pred is not None and nxt is not None:
                b.succ.append((nxt, "fall"))
        elif t.opcode == "EXIT" and t.pred is None:
            pass
        elif nxt is not None:
            b.succ.append((nxt, "fall"))
    return blocks


def reachable(blocks: List[Block]) -> List[bool]:
    seen = [False] * len(blocks)
    stack = [0]
    while stack:
        k = stack.pop()
        if seen[k]:
            continue
        seen[k] = True
        stack.extend(s for s, _ in blocks[k].succ)
    return seen


@dataclass
class Loop:
    head: int      # block index of the target
    latch: int     # block index holding the backward branch
    parent: Optional[int] = None
    construct: Optional[str] = None

    def contains(self, k: int) -> bool:
        return self.head <= k <= self.latch


def find_loops(blocks: List[Block], live: List[bool]) -> List[Loop]:
    """One loop per live backward branch; parent = the smallest other loop around it."""
    loops = [Loop(s, b.index) for b in blocks if live[b.index]
             for s, kind in b.succ if kind == "taken" and s <= b.index]
    loops.sort(key=lambda lp: (lp.head, -lp.latch))
    for i, lp in enumerate(loops):
        around = [j for j, o in enumerate(loops) if j != i and o.contains(lp.head) and o.contains(lp.latch)]
        crossing = [o for o in loops if o.contains(lp.head) != o.contains(lp.latch)]
        if crossing:
            raise NotImplementedError("overlapping, non-nested SASS loops: not modelled")
        if around:
            lp.parent = min(around, key=lambda j: loops[j].latch - loops[j].head)
    return loops


# ------------------------------------------------------------------ source constructs
@dataclass
class Construct:
    """A loop or an if of the kernel source that decides how often code runs.

    ``path``: innermost first, (function name, selector) pairs; a selector is
    ``("for" | "if" | "call" | "def", ordinal, text)``: the ordinal-th such node of the
    function (source order) whose first line contains ``text``. ``kind`` "loop" and "if"
    constructs are matched to SASS; "label" constructs only name source (e.g. the text
    branch's code outside its loop)."""
    name: str
    kind: str                     # "loop" | "if" | "label"
    path: Sequence[Tuple[str, Tuple[str, int, str]]]
    category: str                 # fixed | text | per_subject | per_acting
    parent: Optional[str] = None  # enclosing construct (loops / ifs)


class Source:
    """Line ranges of functions and nodes of the kernel's Python file."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        # Frames are matched on the file's last three path parts: Triton's compile cache may
        # return a cubin built from an identical file elsewhere (another worktree), whose line
        # table names that file.
        self.key = self.file_key(path)
        with open(path) as f:
            self.text = f.read()
        self.lines = self.text.splitlines()
        self.tree = ast.parse(self.text)
        self.funcs: Dict[str, ast.FunctionDef] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef):
                self.funcs.setdefault(node.name, node)

    @staticmethod
    def file_key(path: str) -> Tuple[str, ...]:
        return tuple(os.path.normpath(path).split(os.sep)[-3:])

    def frames(self, chain: Tuple[Tuple[str, int], ...]) -> List[int]:
        """The chain's lines that lie in this file, innermost first."""
        return [ln for f, ln in chain if self.file_key(f) == self.key]

    def function_at(self, line: int) -> Optional[str]:
        best = None
        for name, fn in self.funcs.items():
            if fn.lineno <= line <= fn.end_lineno and (best is None or fn.lineno > self.funcs[best].lineno):
                best = name
        return best

    def node_range(self, func: str, selector: Tuple[str, int, str]) -> Tuple[int, int]:
        kind, ordinal, text = selector
        fn = self.funcs.get(func)
        if fn is None:
            raise KeyError(f"no function {func!r} in {self.path}")
        if kind == "def":
            return fn.lineno, fn.end_lineno
        types = {"for": ast.For, "if": ast.If, "else": ast.If, "call": ast.Call}[kind]
        nodes = [n for n in ast.walk(fn) if isinstance(n, types)]
        if kind == "call":
            nodes = [n for n in nodes if isinstance(n.func, ast.Name) and n.func.id == text]
        else:
            nodes = [n for n in nodes if text in self.lines[n.lineno - 1]]
        nodes.sort(key=lambda n: (n.lineno, n.col_offset))
        if ordinal >= len(nodes):
            raise KeyError(f"{func}: no {kind} #{ordinal} matching {text!r} in {self.path}")
        n = nodes[ordinal]
        if kind == "if":            # the body only: the test runs before the branch that skips it
            return n.body[0].lineno, max(x.end_lineno for x in n.body)
        if kind == "else":          # the else branch only
            if not n.orelse:
                raise KeyError(f"{func}: if #{ordinal} matching {text!r} has no else")
            return n.orelse[0].lineno, max(x.end_lineno for x in n.orelse)
        return n.lineno, n.end_lineno

    def matches(self, chain: Tuple[Tuple[str, int], ...], ranges: Sequence[Tuple[str, int, int]]) -> bool:
        """True when the chain (innermost first) passes, in order, through every (function, first, last)."""
        frames = self.frames(chain)
        k = 0
        for func, lo, hi in ranges:
            while k < len(frames) and not (lo <= frames[k] <= hi and self.function_at(frames[k]) == func):
                k += 1
            if k == len(frames):
                return False
            k += 1
        return True


# ------------------------------------------------------------------------ the analysis
@dataclass
class Analysis:
    blocks: List[Block]
    live: List[bool]
    loops: List[Loop]
    loop_of: Dict[str, int]                  # construct -> loop index
    if_of: Dict[str, Tuple[int, float]]      # construct -> (branch block, jaccard)
    member: Dict[str, set]                   # construct -> instruction addresses (source)
    constructs: Dict[str, Construct]
    source: Source
    notes: List[str]

    def region_of(self, k: int) -> Optional[str]:
        """The innermost matched construct whose SASS region holds block k."""
        best, size = None, None
        for name, li in self.loop_of.items():
            lp = self.loops[li]
            if lp.contains(k) and (size is None or lp.latch - lp.head < size):
                best, size = name, lp.latch - lp.head
        for name, (bi, _) in self.if_of.items():
            lo, hi = bi + 1, self._if_end(bi)
            if lo <= k < hi and (size is None or hi - lo - 1 < size):
                best, size = name, hi - lo - 1
        return best

    def _if_end(self, bi: int) -> int:
        return next(s for s, kind in self.blocks[bi].succ if kind == "taken")


def analyse(sass: str, source_path: str, constructs: Sequence[Construct]) -> Analysis:
    instrs, labels = parse_sass(sass)
    blocks = build_cfg(instrs, labels)
    live = reachable(blocks)
    loops = find_loops(blocks, live)
    src = Source(source_path)
    cons = {c.name: c for c in constructs}
    member = {}
    for c in constructs:
        ranges = [(func, *src.node_range(func, sel)) for func, sel in c.path]
        member[c.name] = {i.addr for b in blocks if live[b.index] for i in b.instrs if src.matches(i.chain, ranges)}
    notes: List[str] = []

    def depth(name):
        d, c = 0, cons[name]
        while c.parent:
            d, c = d + 1, cons[c.parent]
        return d

    # loops: the deepest loop construct owning at least half of the loop's own instructions
    loop_of: Dict[str, int] = {}
    for li, lp in enumerate(loops):
        nested = [x for x in loops if x is not lp and lp.contains(x.head) and lp.contains(x.latch)]
        own = [i.addr for k in range(lp.head, lp.latch + 1)
               if not any(x.contains(k) for x in nested) for i in blocks[k].instrs]
        scores = {c.name: sum(a in member[c.name] for a in own) / max(1, len(own))
                  for c in constructs if c.kind == "loop"}
        ok = [n for n, s in scores.items() if s >= 0.5]
        if not ok:
            raise RuntimeError(f"SASS loop at {blocks[lp.head].start:#x}-{blocks[lp.latch].end:#x} matches no "
                               f"declared loop (scores {scores}): declare it in the generation's constructs")
        name = max(ok, key=lambda n: (depth(n), scores[n]))
        if name in loop_of:
            raise RuntimeError(f"construct {name!r} matches two SASS loops (unrolled or versioned?)")
        lp.construct = name
        loop_of[name] = li
        notes.append(f"loop {blocks[lp.head].start:#06x}-{blocks[lp.latch].end:#06x} ({len(own)} own instrs) "
                     f"-> {name} ({scores[name]:.0%} of its instructions)")
    # ifs: the forward conditional branch, inside the parent's loop, whose skipped range best covers the body
    if_of: Dict[str, Tuple[int, float]] = {}
    at = {b.start: b.index for b in blocks}
    for c in constructs:
        if c.kind != "if" or not member[c.name]:
            continue
        plp = loops[loop_of[c.parent]] if c.parent in loop_of else None
        best = None
        for b in blocks:
            t = b.term
            if not (live[b.index] and is_branch(t) and t.pred and labels[t.target] > t.addr):
                continue
            end = at[labels[t.target]]
            if plp is not None and not (plp.contains(b.index) and plp.contains(end - 1) and end <= plp.latch):
                continue
            skipped = {i.addr for k in range(b.index + 1, end) for i in blocks[k].instrs}
            body = member[c.name] if plp is None else {
                a for a in member[c.name] if blocks[plp.head].start <= a <= blocks[plp.latch].end}
            jac = len(skipped & body) / max(1, len(skipped | body))
            if best is None or jac > best[1]:
                best = (b.index, jac)
        if best is None or best[1] < 0.5:
            raise RuntimeError(f"if {c.name!r}: no forward branch skips its body (best {best})")
        if_of[c.name] = best
        notes.append(f"if {blocks[best[0]].term.addr:#06x} {blocks[best[0]].term.text!r} -> {c.name} "
                     f"(Jaccard {best[1]:.2f} of skipped range vs body)")
    for c in constructs:
        if c.kind == "loop" and member[c.name] and c.name not in loop_of:
            own = len(member[c.name])
            notes.append(f"WARNING: loop construct {c.name!r} has {own} instructions but no SASS loop "
                         "(fully unrolled, or its body is all prologue): its code is counted once per entry")
    return Analysis(blocks, live, loops, loop_of, if_of, member, cons, src, notes)


def frequencies(an: Analysis, trips: Dict[str, float], runs: Dict[str, float],
                notes: Optional[List[str]] = None) -> List[float]:
    """Expected executions of each block per tile.

    ``trips``: loop construct -> iterations per entry; ``runs``: if construct -> fraction
    of its entries in which the body runs."""
    import numpy as np

    blocks, loops = an.blocks, an.loops
    n = len(blocks)
    by_latch = {lp.latch: lp for lp in loops}
    prob: Dict[int, float] = {}            # block -> probability of its conditional branch being taken
    for k, b in enumerate(blocks):
        t = b.term
        if not (an.live[k] and is_branch(t) and t.pred):
            continue
        target = next(s for s, kind in b.succ if kind == "taken")
        if target <= k:                                                     # a loop's back edge
            lp = by_latch[k]
            tr = trips[lp.construct]
            prob[k] = 0.0 if tr <= 1 else (tr - 1) / tr
            continue
        if_name = next((nm for nm, (bi, _) in an.if_of.items() if bi == k), None)
        if if_name is not None:
            prob[k] = 1.0 - runs[if_name]
            continue
        exits = [lp for lp in loops if lp.contains(k) and not lp.contains(target)]
        if exits:                                                           # a loop exit
            lp = min(exits, key=lambda x: x.latch - x.head)
            if any(kind == "taken" and blocks[lp.latch].term.pred for _, kind in blocks[lp.latch].succ):
                raise NotImplementedError(f"loop {lp.construct}: exits both at {t.addr:#x} and at its "
                                          "conditional back edge")
            tr = trips[lp.construct]
            prob[k] = 1.0 if tr <= 0 else 1.0 / tr
            continue
        skipped = [lp for lp in loops if k < lp.head < target and lp.construct]
        # The guard skips the outermost of them: a loop nested in another (a tile's subject
        # loop inside the tile loop) may run zero times while the loop around it runs.
        skipped = [lp for lp in skipped if not any(o is not lp and o.head <= lp.head and lp.latch <= o.latch
                                                   for o in skipped)]
        if skipped:                                                         # a zero-trip guard
            prob[k] = 1.0 if any(trips[lp.construct] <= 0 for lp in skipped) else 0.0
            continue
        prob[k] = 0.0
        if notes is not None:
            size = sum(len(blocks[j].instrs) for j in range(k + 1, target))
            notes.append(f"assumed not taken: {t.addr:#06x} {t.text!r} (skips {size} instructions)")
    # A predicated EXIT inside a loop whose back edge is unconditional is that loop's exit:
    # the warp leaves once per entry (ptxas ends a persistent loop so). Elsewhere it only ends
    # threads that have no work and the warp falls through.
    leave: Dict[int, float] = {}
    for k, b in enumerate(blocks):
        t = b.term
        if an.live[k] and t.opcode == "EXIT" and t.pred is not None:
            around = [lp for lp in loops if lp.contains(k) and blocks[lp.latch].term.pred is None]
            if around:
                lp = min(around, key=lambda x: x.latch - x.head)
                tr = trips[lp.construct]
                leave[k] = 1.0 if tr <= 1 else 1.0 / tr
    P = np.zeros((n, n))
    for k, b in enumerate(blocks):
        if not an.live[k]:
            continue
        for s, kind in b.succ:
            if k in leave:
                P[k, s] += 1.0 - leave[k]
            elif k in prob:
                P[k, s] += prob[k] if kind == "taken" else 1.0 - prob[k]
            else:
                P[k, s] += 1.0
    # Loops with trips < 1 per entry (fractional averages) are handled by their guards; a
    # back edge with probability 1 would make the system singular.
    e = np.zeros(n)
    e[0] = 1.0
    f = np.linalg.solve(np.eye(n) - P.T, e)
    return [round(max(0.0, float(x)), 9) for x in f]


_HMMA = re.compile(r"HMMA\.(\d+)")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def mma_flops(i: Instr) -> float:
    """Tensor FLOPs of one warp's instruction (a wgmma is issued by each of its 4 warps)."""
    m = _HGMMA.search(i.text)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c / 4
    m = _HMMA.search(i.text)
    if m and m.group(1) in _HMMA_SHAPES:
        a, b, c = _HMMA_SHAPES[m.group(1)]
        return 2 * a * b * c
    return 0.0


@dataclass
class TileCost:
    """Per-warp warp-instructions per tile, by category, and the units they divide by."""
    instr: Dict[str, float]
    mufu: float
    flops_per_warp: float
    opcodes: Counter
    lines: Counter        # (category, source line) -> warp-instructions
    barriers: float       # CTA barriers (BAR.SYNC) a warp passes per tile


def source_of(an: Analysis, i: Instr) -> str:
    """'line < call-site line < ...' in the kernel file, with the source text of the innermost line."""
    frames = an.source.frames(i.chain)
    if not frames:
        return "(no kernel line)"
    text = an.source.lines[frames[0] - 1].strip()
    return " < ".join(map(str, frames)) + "  " + text[:60]


def tile_cost(an: Analysis, freq: List[float]) -> TileCost:
    instr: Dict[str, float] = defaultdict(float)
    ops: Counter = Counter()
    lines: Counter = Counter()
    mufu = flops = bars = 0.0
    labels = [c for c in an.constructs.values() if c.kind == "label"]
    for k, b in enumerate(an.blocks):
        if freq[k] == 0:
            continue
        region = an.region_of(k)
        cat = an.constructs[region].category if region else None
        for i in b.instrs:
            c = cat
            if c is None:
                c = next((x.category for x in labels if i.addr in an.member[x.name]), "fixed")
            instr[c] += freq[k]
            ops[i.opcode] += freq[k]
            lines[(c, source_of(an, i))] += freq[k]
            if i.opcode.startswith("MUFU"):
                mufu += freq[k]
            if i.opcode.startswith("BAR.SYNC") or i.opcode == "BAR":
                bars += freq[k]
            flops += freq[k] * mma_flops(i)
    return TileCost(dict(instr), mufu, flops, ops, lines, bars)


def annotate(an: Analysis, freq: List[float]) -> str:
    """The SASS, one line per instruction: executions per tile, category region, source chain."""
    out = []
    for k, b in enumerate(an.blocks):
        region = an.region_of(k) or "-"
        out.append(f"# block {k} @{b.start:#06x} x{freq[k]:.3g} region={region} succ={b.succ}")
        for i in b.instrs:
            src = " < ".join(map(str, an.source.frames(i.chain)))
            out.append(f"  {i.addr:#06x}  {i.text:<60s} // {src}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ kernel generations
@dataclass
class Case:
    arch: int
    mode: str            # overwrite | sum
    layout: str          # disjoint | overlap
    S: int
    T: int
    grid: Tuple[int, int] = (64, 64)
    B: int = 2
    H: int = 10
    D: int = 64
    L: int = 77          # text keys; 0: no text branch (FLUX's IP path, k_text=None)
    dtype: str = "float16"
    active: Optional[int] = None   # subjects active (the first ones, in priority order); None: all S

    @property
    def N(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Compiled:
    cubin: bytes
    ptx: str
    shared: int
    num_warps: int
    block_m: int
    source: str          # the kernel's source file
    extra: Dict[str, object] = field(default_factory=dict)


class Generation:
    """What the generic analysis needs to know about one kernel generation."""
    name = "?"

    def detect(self) -> bool: ...

    def compile_key(self, case: Case) -> tuple: ...

    def compile(self, case: Case) -> Compiled: ...

    def constructs(self, case: Case, comp: Compiled) -> List[Construct]: ...

    def tile_params(self, case: Case, comp: Compiled) -> List[Tuple[Dict[str, float], int]]:
        """[(parameters of a tile, number of such tiles)] for one (batch, head)."""

    def trips(self, case: Case, comp: Compiled, p: Dict[str, float]) -> Tuple[Dict[str, float], Dict[str, float]]:
        """(loop trips per entry, if run fractions) for tiles with parameters p."""

    def units(self, p: Dict[str, float]) -> Dict[str, float]:
        """How many of each per-X category unit a tile with parameters p has."""
        return {"per_subject": p.get("visited", 0.0), "per_acting": p.get("acting", 0.0)}

    def programs(self, case: Case, comp: Compiled, tiles_per_bh: int) -> int:
        """Programs launched: one per query tile and (batch, head) unless the generation says otherwise."""
        return tiles_per_bh * case.B * case.H

    def tiles_per_program(self, case: Case, comp: Compiled, tiles_per_bh: int) -> float:
        return 1.0

    def text_stagings(self, case: Case, comp: Compiled, tiles_per_program: float) -> float:
        """Times one program loads the whole text K/V (once per tile unless the generation reuses it)."""
        return tiles_per_program if case.L else 0.0

    def load_class(self, source_lines: Sequence[str]) -> str:
        return query_load_class(source_lines)


def _torch_dtype(name: str):
    import torch
    return getattr(torch, name)


def _bench():
    """benchmarks/bench_region_attention.py: its layouts and its k-of-S routing, not copies of them."""
    sys.path.insert(0, HERE)
    try:
        import bench_region_attention as bra
    finally:
        sys.path.remove(HERE)
    return bra


def layout_boxes(layout: str, S: int, grid: Tuple[int, int]):
    """The benchmark's layouts (benchmarks/bench_region_attention.py), not a copy of them."""
    return _bench().LAYOUTS[layout](S, grid)


def case_routing(case: Case):
    """The routing the op gets for ``case``: its layout's boxes, and with ``case.active`` only the
    first ``active`` subjects in it (the others cover no token, as anyms.Layout routes a subject
    inactive at a step)."""
    import torch
    from anyms_kernels.routing import build_routing
    tok = torch.tensor(layout_boxes(case.layout, case.S, case.grid), dtype=torch.int32)
    if case.active is None:
        return build_routing(tok, case.grid, case.mode)
    return _bench().active_routing(tok, case.grid, case.mode, case.active)


def rowmajor_acting(boxes, grid, mode: str, block_m: int) -> List[int]:
    """Subjects acting on each tile of block_m consecutive row-major tokens (generation 1's tiles)."""
    h, w = grid
    n = h * w
    owner = [-1] * n
    cover = [[False] * n for _ in boxes]
    for s, (x0, y0, x1, y1) in enumerate(boxes):
        for y in range(y0, y1):
            for x in range(x0, x1):
                cover[s][y * w + x] = True
                owner[y * w + x] = s
    acting = []
    for t0 in range(0, n, block_m):
        toks = range(t0, min(n, t0 + block_m))
        if mode == "overwrite":
            acting.append(len({owner[t] for t in toks} - {-1}))
        else:
            acting.append(sum(any(cover[s][t] for t in toks) for s in range(len(boxes))))
    return acting


class Gen1(Generation):
    """The first kernel: one program per BLOCK_M row-major tokens; ``_attend`` (an online
    softmax loop over key blocks) serves the text branch and every subject; the subject loop
    visits all S subjects and runs ``_attend`` for those with a token in the tile; in
    overwrite mode a first loop over S computes each token's owner from all boxes."""
    name = "gen1"

    def _mod(self):
        return importlib.import_module("anyms_kernels.ops.region_attention")

    def detect(self) -> bool:
        try:
            ra = self._mod()
        except ImportError:
            return False
        return hasattr(ra, "_attend") and hasattr(ra, "_block_t")

    def _config(self, case):
        return self._mod().config_candidates(case.D, _torch_dtype(case.dtype))[0]

    def compile_key(self, case):
        return (case.arch, case.mode, case.D, case.dtype, self._mod()._block_t(case.T, _torch_dtype(case.dtype)))

    def compile(self, case):
        from anyms_kernels._compile import compile_kernel
        ra = self._mod()
        cfg = self._config(case)
        block_t = ra._block_t(case.T, _torch_dtype(case.dtype))
        ck = compile_kernel(case.D, _torch_dtype(case.dtype), cfg, arch=case.arch, overwrite=case.mode == "overwrite",
                            has_text_mask=False, block_t=block_t)
        return Compiled(ck.asm["cubin"], ck.asm["ptx"], int(ck.metadata.shared), cfg.num_warps, cfg.block_m,
                        ra.__file__, dict(block_l=cfg.block_l, block_t=block_t))

    def constructs(self, case, comp):
        fwd, att = "_region_attention_fwd", "_attend"
        keys = (att, ("for", 0, "for start in range"))
        return [
            Construct("text_call", "label", [(fwd, ("call", 0, att))], "text"),
            Construct("text_keys", "loop", [keys, (fwd, ("call", 0, att))], "text"),
            Construct("owner", "loop", [(fwd, ("for", 0, "for s in range(0, S)"))], "per_subject"),
            Construct("subjects", "loop", [(fwd, ("for", 1, "for s in range(0, S)"))], "per_subject"),
            Construct("acting", "if", [(fwd, ("if", 0, "tl.max(acts"))], "per_acting", parent="subjects"),
            Construct("subject_keys", "loop", [keys, (fwd, ("call", 1, att))], "per_acting", parent="acting"),
        ]

    def tile_params(self, case, comp):
        if case.active is not None:
            raise SystemExit("the first kernel visits every subject on every tile: it has no active set")
        boxes = layout_boxes(case.layout, case.S, case.grid)
        hist = Counter(rowmajor_acting(boxes, case.grid, case.mode, comp.block_m))
        return [({"acting": a, "visited": case.S}, n) for a, n in sorted(hist.items())]

    def trips(self, case, comp, p):
        trips = {"text_keys": math.ceil(case.L / comp.extra["block_l"]), "owner": case.S, "subjects": case.S,
                 "subject_keys": math.ceil(case.T / comp.extra["block_t"])}
        return trips, {"acting": p["acting"] / case.S if case.S else 0.0}

    def units(self, p):
        return {"per_subject": p["visited"], "per_acting": p["acting"]}


class Gen2(Generation):
    """The second kernel (commit 158e313): routing built once per layout (anyms_kernels/routing.py),
    the tile's tokens taken in routing order through a permutation, the text branch in one or two
    static key blocks (``_text_branch``; an online loop, ``_attend_online``, only for long text or
    wide heads), and a loop in the main kernel over the subjects listed as acting on the tile,
    each in one static block (``_subject_branch``; ``_attend_online`` for long subject sequences).

    Acting subjects per tile: the routing's per-tile counts, ``Routing.tiles(block_m)[0]``, or
    ``--acting module:function`` (boxes, grid, mode, block_m) -> counts. The analysis stops on
    any SASS loop it cannot match to these constructs: update them here if the kernel changes."""
    name = "gen2"
    acting_fn: Optional[str] = None

    def _mod(self):
        return importlib.import_module("anyms_kernels.ops.region_attention_triton")

    def detect(self) -> bool:
        try:
            rt = self._mod()
        except ImportError:
            return False
        return hasattr(rt, "_text_branch") and hasattr(rt, "_subject_branch")

    def _config(self, case):
        return self._mod().config_candidates(case.D, _torch_dtype(case.dtype))[0]

    def compile_key(self, case):
        return (case.arch, case.mode, case.D, case.dtype, case.L, case.T)

    def compile(self, case):
        from anyms_kernels._compile import compile_kernel
        cfg = self._config(case)
        want = dict(arch=case.arch, overwrite=case.mode == "overwrite", has_text_mask=False,
                    text_len=case.L or 16, has_text=case.L > 0, subject_tokens=case.T)
        params = inspect.signature(compile_kernel).parameters
        ck = compile_kernel(case.D, _torch_dtype(case.dtype), cfg, **{k: v for k, v in want.items() if k in params})
        return Compiled(ck.asm["cubin"], ck.asm["ptx"], int(ck.metadata.shared), cfg.num_warps, cfg.block_m,
                        self._mod().__file__)

    def constructs(self, case, comp):
        """The loop over the tile's subjects; the online loop of ``_attend_online`` at each call
        (text outside the subject loop, a long subject inside it); the text branch's code outside
        loops: the calls of ``_text_branch``, ``_load_keys`` and ``_attend_online`` before the loop."""
        fwd = "_region_attention_fwd"
        src = Source(comp.source)
        loop = (fwd, ("for", 0, "for "))
        lo, hi = src.node_range(*loop)
        out = [Construct("subjects", "loop", [loop], "per_acting")]
        out += self.helper_calls(src, fwd, (lo, hi), ("_text_branch", "_load_text_keys", "_load_keys", "_attend_online"),
                                 text_parent=None)
        return out

    @staticmethod
    def helper_calls(src, fwd, subject_lines, helpers, text_parent):
        """The constructs of the helpers' calls in ``fwd``: a call outside the subject loop (lines
        ``subject_lines``) is text-branch code; ``_attend_online`` is a loop, counted per acting
        subject inside the subject loop and per text step outside it (under ``text_parent``)."""
        lo, hi = subject_lines
        out = []
        for helper in helpers:
            if helper not in src.funcs:
                continue
            calls = sorted(n.lineno for n in ast.walk(src.funcs[fwd]) if isinstance(n, ast.Call)
                           and isinstance(n.func, ast.Name) and n.func.id == helper)
            for k, line in enumerate(calls):
                inside = lo <= line <= hi
                if not inside:
                    out.append(Construct(f"text{helper}{k}", "label", [(fwd, ("call", k, helper))], "text"))
                if helper == "_attend_online":
                    out.append(Construct(f"{'subject' if inside else 'text'}_online{k}", "loop",
                                         [(helper, ("for", 0, "for ")), (fwd, ("call", k, helper))],
                                         "per_acting" if inside else "text",
                                         parent="subjects" if inside else text_parent))
        return out

    def tile_params(self, case, comp):
        counts = self.acting_counts(case, comp.block_m)
        return [({"acting": a}, n) for a, n in sorted(Counter(counts).items())]

    def acting_counts(self, case, block_m) -> List[int]:
        boxes = layout_boxes(case.layout, case.S, case.grid)
        if self.acting_fn:
            if case.active is not None:
                raise SystemExit("--acting gives counts for every subject active: it cannot go with --active-of")
            mod, fn = self.acting_fn.split(":")
            return [int(x) for x in getattr(importlib.import_module(mod), fn)(boxes, case.grid, case.mode, block_m)]
        return [int(x) for x in case_routing(case).tiles(block_m)[0].reshape(-1).tolist()]

    def trips(self, case, comp, p):
        rt = self._mod()
        text_step = rt.online_text_block(case.D) if hasattr(rt, "online_text_block") else getattr(rt, "ONLINE_L", 32)
        subject_step = rt.subject_block(case.T)
        trips = {"subjects": p["acting"]}
        for k in range(8):
            trips[f"text_online{k}"] = math.ceil(case.L / text_step)
            trips[f"subject_online{k}"] = math.ceil(case.T / subject_step)
        return trips, {}

    def units(self, p):
        return {"per_subject": 0.0, "per_acting": p["acting"]}


class Gen3(Gen2):
    """The third kernel: ``programs_per_head`` programs per (batch, head), each running the tiles
    first, first + G, ... of it in a loop (``for tile``): the text K/V staged once per program
    before the loop, the next tile's query rows and the indices of the tile after prefetched
    at the top of each iteration, the tile's routing loaded before its text branch."""
    name = "gen3"
    device = None            # the Device whose SM count sets the programs (set per device by run_case)

    def detect(self) -> bool:
        try:
            rt = self._mod()
        except ImportError:
            return False
        return hasattr(rt, "programs_per_head")

    resident = None          # programs per SM the cubin allows on that device (set by run_case)

    def programs_per_head(self, case, comp, tiles_per_bh) -> int:
        """What the launcher picks: the device's SMs x the resident programs its cubin allows."""
        rt = self._mod()
        dev = self.device or DEVICES[case.arch][0]
        return rt.programs_per_head(tiles_per_bh, case.B * case.H, dev.sms * (self.resident or 1))

    def programs(self, case, comp, tiles_per_bh):
        return self.programs_per_head(case, comp, tiles_per_bh) * case.B * case.H

    def tiles_per_program(self, case, comp, tiles_per_bh) -> float:
        """The most tiles a program runs: the wave ends with the program that runs the most."""
        return math.ceil(tiles_per_bh / self.programs_per_head(case, comp, tiles_per_bh))

    def text_stagings(self, case, comp, tiles_per_program):
        return 1.0 if case.L else 0.0

    def constructs(self, case, comp):
        fwd = "_region_attention_fwd"
        src = Source(comp.source)
        tiles = (fwd, ("for", 0, "for tile"))
        subj = (fwd, ("for", 0, "for j"))
        lo, hi = src.node_range(*subj)
        out = [Construct("tiles", "loop", [tiles], "fixed"),
               Construct("subjects", "loop", [subj], "per_acting", parent="tiles")]
        if any("if j + 1 < count:" in ln for ln in src.lines):
            # the next subject's loads, issued while subject j computes: for all but the tile's last
            out.append(Construct("next_subject", "if", [(fwd, ("if", 0, "if j + 1 < count:"))], "per_acting",
                                 parent="subjects"))
        out += self.helper_calls(src, fwd, (lo, hi), ("_text_branch", "_load_text_keys", "_attend_online"),
                                 text_parent="tiles")
        return out

    def trips(self, case, comp, p):
        trips, runs = super().trips(case, comp, p)
        trips["tiles"] = p["tiles_per_program"]
        runs["next_subject"] = (p["acting"] - 1) / p["acting"] if p["acting"] > 0 else 0.0
        return trips, runs

    def tile_params(self, case, comp):
        counts = self.acting_counts(case, comp.block_m)
        tpp = self.tiles_per_program(case, comp, len(counts))
        return [({"acting": a, "tiles_per_program": tpp}, n) for a, n in sorted(Counter(counts).items())]

    def units(self, p):
        return {"per_subject": 0.0, "per_acting": p["acting"] * p["tiles_per_program"]}


class Gen4(Gen3):
    """The fourth kernel: a program runs ``tiles_per_program`` tiles of all (batch, head)s' tiles
    in a row, so the wave's programs run the same number of tiles whatever the number of heads.
    Its tiles of one (batch, head) are a segment (``for bh``), which stages that one's text keys;
    the tile loop (``for g``) runs inside it, the prefetch of the next tile's query rows, indices
    and routing crossing from one segment into the next."""
    name = "gen4"

    def detect(self) -> bool:
        try:
            rt = self._mod()
        except ImportError:
            return False
        return hasattr(rt, "tiles_per_program") and hasattr(rt, "_following")

    def _split(self, case, tiles_per_bh) -> Tuple[int, int]:
        """What the launcher picks: (tiles a program runs, programs per (batch, head) or 0)."""
        dev, rt = self.device or DEVICES[case.arch][0], self._mod()
        return rt.split_tiles(tiles_per_bh, case.B * case.H, dev.sms * (self.resident or 1),
                              rt.prefetch_text(case.D, _torch_dtype(case.dtype)))

    def programs(self, case, comp, tiles_per_bh):
        per, per_head = self._split(case, tiles_per_bh)
        return per_head * case.B * case.H if per_head else math.ceil(tiles_per_bh * case.B * case.H / per)

    def tiles_per_program(self, case, comp, tiles_per_bh) -> float:
        return self._split(case, tiles_per_bh)[0]

    def segments(self, case, tiles_per_bh) -> Tuple[int, int]:
        """(the most segments a program runs, segments of all programs together)."""
        per, per_head = self._split(case, tiles_per_bh)
        if per_head:
            return 1, per_head * case.B * case.H
        total = tiles_per_bh * case.B * case.H
        counts = [(min(total, g + per) - 1) // tiles_per_bh - g // tiles_per_bh + 1 for g in range(0, total, per)]
        return max(counts), sum(counts)

    def text_stagings(self, case, comp, tiles_per_program):
        if not case.L:
            return 0.0
        n = math.ceil(case.N / comp.block_m)
        return self.segments(case, n)[1] / self.programs(case, comp, n)

    def constructs(self, case, comp):
        fwd = "_region_attention_fwd"
        src = Source(comp.source)
        subj = (fwd, ("for", 0, "for j"))
        lo, hi = src.node_range(*subj)
        out = [Construct("segments", "loop", [(fwd, ("for", 0, "for bh"))], "fixed"),
               Construct("tiles", "loop", [(fwd, ("for", 0, "for g"))], "fixed", parent="segments"),
               Construct("subjects", "loop", [subj], "per_acting", parent="tiles")]
        out += self.helper_calls(src, fwd, (lo, hi), ("_text_branch", "_load_text_keys", "_attend_online"),
                                 text_parent="tiles")
        return out

    def trips(self, case, comp, p):
        trips, runs = super().trips(case, comp, p)
        # The wave ends with its slowest program: one that runs the most tiles in the most
        # segments (two when any run crosses into another (batch, head)).
        worst = self.segments(case, math.ceil(case.N / comp.block_m))[0]
        trips["segments"] = worst
        trips["tiles"] = p["tiles_per_program"] / worst
        return trips, runs


GENERATIONS: Dict[str, Generation] = {"gen4": Gen4(), "gen3": Gen3(), "gen2": Gen2(), "gen1": Gen1()}


# ----------------------------------------------------------------------------- driver
def resources(comp: Compiled, arch: int) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(comp.cubin)
        out = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    spills = -1
    try:
        from anyms_kernels._compile import _ptxas_spills
        st, ld = _ptxas_spills(comp.ptx, arch)
        spills = -1 if st < 0 else st + ld
    except Exception:
        pass
    return dict(registers=int(fields["REG"]), stack=int(fields.get("STACK", 0)), spill_bytes=spills)


def model_time(dev: Device, case: Case, programs: int, instr_tile: float, mufu_tile: float, flops_tile: float,
               hbm_bytes: float) -> Dict[str, float]:
    """The four bounds in microseconds; per-SM work is ceil(programs / SMs) mean tiles."""
    per_sm = math.ceil(programs / dev.sms)
    clk = dev.clock_ghz * 1e3            # cycles per microsecond
    t = {
        "hbm": hbm_bytes / (dev.copy_tb_s * 1e6),
        "tensor": per_sm * flops_tile / (dev.tc_flop_per_clk_sm * clk),
        "exp": per_sm * mufu_tile * 32 / (dev.mufu_per_clk_sm * clk),
        "issue": per_sm * instr_tile / (dev.schedulers * clk),
    }
    return t


def run_case(gen: Generation, case: Case, comp: Compiled, an: Analysis, res: Dict[str, int], verbose: bool,
             meta: Dict[str, str], ctrl=None) -> List[dict]:
    rows = []
    for dev in DEVICES[case.arch]:
        gen.device = dev
        rows += _run_case_on(gen, case, comp, an, res, verbose and dev is DEVICES[case.arch][0], meta, ctrl, dev)
    gen.device = None
    return rows


def _run_case_on(gen, case, comp, an, res, verbose, meta, ctrl, dev) -> List[dict]:
    from sass_timing import kernel_time
    gen.resident = programs_per_sm(dev, res["registers"], comp.shared, comp.num_warps)[0]
    tiles = gen.tile_params(case, comp)
    ntiles = sum(n for _, n in tiles)
    tot: Dict[str, float] = defaultdict(float)
    units: Dict[str, float] = defaultdict(float)
    mufu = flops = bars = 0.0
    lines: Counter = Counter()
    notes: List[str] = []
    classes = []
    load_class = lambda ins: gen.load_class([an.source.lines[f - 1] for f in an.source.frames(ins.chain)])
    for p, n in tiles:
        trips, runs = gen.trips(case, comp, p)
        freq = frequencies(an, trips, runs, notes if verbose else None)
        classes.append((n / ntiles, an, freq, trips, ctrl, load_class))
        tc = tile_cost(an, freq)
        for k, v in tc.instr.items():
            tot[k] += n * v
        for k, v in gen.units(p).items():
            units[k] += n * v
        for k, v in tc.lines.items():
            lines[k] += n * v
        mufu += n * tc.mufu
        flops += n * tc.flops_per_warp
        bars += n * tc.barriers
    if verbose:
        for line in an.notes + sorted(set(notes)):
            print("   ", line)
        unit = {"fixed": ntiles, "text": ntiles, "per_subject": units["per_subject"] or 1,
                "per_acting": units["per_acting"] or 1}
        print("    warp-instructions per unit (tile, subject visited, acting subject), by source line:")
        for (cat, where), v in sorted(lines.items(), key=lambda kv: (kv[0][0], -kv[1])):
            if v / unit[cat] >= 4:
                print(f"      {cat:11s} {v / unit[cat]:7.1f}  {where}")
    warps = comp.num_warps
    per_warp = {k: tot.get(k, 0.0) / ntiles for k in ("fixed", "text")}
    per_subject = tot.get("per_subject", 0.0) / units["per_subject"] if units["per_subject"] else 0.0
    per_acting = tot.get("per_acting", 0.0) / units["per_acting"] if units["per_acting"] else float("nan")
    # Frequencies are per program: per tile, divide by the tiles a program runs (1 before v3).
    tpp = gen.tiles_per_program(case, comp, ntiles)
    tot = {k: v / tpp for k, v in tot.items()}
    units = {k: v / tpp for k, v in units.items()}
    per_warp = {k: tot.get(k, 0.0) / ntiles for k in ("fixed", "text")}
    per_subject = tot.get("per_subject", 0.0) / units["per_subject"] if units.get("per_subject") else 0.0
    per_acting = tot.get("per_acting", 0.0) / units["per_acting"] if units.get("per_acting") else float("nan")
    mufu, flops, bars = mufu / tpp, flops / tpp, bars / tpp
    instr_warp = sum(tot.values()) / ntiles
    tile_programs = ntiles * case.B * case.H          # query tiles in the launch
    programs = gen.programs(case, comp, ntiles)        # programs launched (several tiles each, for v3)
    tiles_per_program = tile_programs / programs
    esz = {"float16": 2, "bfloat16": 2, "float32": 4}[case.dtype]
    qo = 2 * case.B * case.H * case.N * case.D * esz
    kv = 2 * case.B * case.H * (case.L + case.S * case.T) * case.D * esz
    rows = []
    for dev in (dev,):
        t = model_time(dev, case, tile_programs, instr_warp * warps, mufu / ntiles * warps, flops / ntiles * warps,
                       qo + kv)
        floor = qo / (dev.copy_tb_s * 1e6)
        progs, limit = programs_per_sm(dev, res["registers"], comp.shared, warps)
        # L2 traffic: every tile loads its Q, every program the text K/V it stages (once per
        # program: v3 programs run several tiles of one (batch, head)), each acting subject's
        # K/V, and every tile stores its O.
        l2_bytes = (qo + programs * gen.text_stagings(case, comp, tiles_per_program) * 2 * case.L * case.D * esz
                    + 2 * units["per_acting"] * case.B * case.H * case.T * case.D * esz)
        t["l2"] = l2_bytes / (dev.l2_tb_s * 1e6)
        # The honest time: the SASS walk at the cubin's residency, over waves (sass_timing).
        kt = kernel_time(classes, machine(dev), programs, max(1, progs), warps)
        waits = ";".join(f"{k}={v:.0f}" for k, v in sorted(kt.waits.items(), key=lambda kv: -kv[1]) if v >= 1)
        bound = max(t, key=t.get)
        rows.append(dict(
            meta, generation=gen.name, device=dev.name, arch=f"sm_{case.arch}", mode=case.mode, layout=case.layout,
            S=case.S, active=case.S if case.active is None else case.active, T=case.T, L=case.L,
            grid=f"{case.grid[0]}x{case.grid[1]}", B=case.B, H=case.H, D=case.D,
            dtype=case.dtype, block_m=comp.block_m, num_warps=warps, registers=res["registers"],
            spill_bytes=res["spill_bytes"], shared_bytes=comp.shared, programs_per_sm=progs, programs_limit=limit,
            programs=programs, tiles_per_program=round(tiles_per_program, 3),
            acting_per_tile=round(units["per_acting"] / ntiles, 4),
            acting_per_covered_tile=round(units["per_acting"] / max(1, sum(n for p, n in tiles if p["acting"] > 0)), 4),
            subjects_visited_per_tile=round(units["per_subject"] / ntiles, 4),
            fixed_per_warp=round(per_warp["fixed"], 1), text_per_warp=round(per_warp["text"], 1),
            per_subject_per_warp=round(per_subject, 1), per_acting_per_warp=round(per_acting, 1),
            instr_per_warp=round(instr_warp, 1), instr_per_tile=round(instr_warp * warps, 1),
            mufu_per_tile=round(mufu / ntiles * warps, 1), barriers_per_tile=round(bars / ntiles, 1),
            tensor_flop_per_tile=round(flops / ntiles * warps),
            hbm_bytes=qo + kv, floor_bytes=qo,
            t_hbm_us=round(t["hbm"], 3), t_tensor_us=round(t["tensor"], 3), t_exp_us=round(t["exp"], 3),
            t_issue_us=round(t["issue"], 3), t_l2_us=round(t["l2"], 3), l2_bytes=round(l2_bytes),
            lower_bound_us=round(t[bound], 3), lower_bound=bound,
            waves=round(kt.waves, 3), full_waves=kt.full_waves, tail_programs_per_sm=kt.tail_programs_per_sm,
            program_cycles=round(kt.program_cycles), tail_cycles=round(kt.tail_cycles), waits_cycles=waits,
            predicted_us=round(kt.us, 3), floor_us=round(floor, 3), ratio=round(kt.us / floor, 3),
        ))
    return rows


def reference_cases(archs=(90, 80), quick=False, modes=("overwrite", "sum"),
                    layouts=("disjoint", "overlap")) -> List[Case]:
    """SDXL's 64x64 layer (fp16, D=64, B=2, H=10, L=77) with the benchmark's layouts: S = 2, 5, 32
    subjects over the same 75% of the grid, T = 16 and 4 tokens per subject."""
    cases = []
    for arch in archs:
        for mode in modes:
            for layout in layouts:
                for S in (5,) if quick else (2, 5, 32):
                    for T in (16,) if quick else (16, 4):
                        cases.append(Case(arch, mode, layout, S, T))
    return cases


def sdxl_level_cases(archs=(90, 80), quick=False, modes=("overwrite", "sum"),
                     layouts=("disjoint", "overlap")) -> List[Case]:
    """Every SDXL cross-attention level, S = 5, T = 4 and 16: at 1024^2 64x64 x 10 heads (the
    reference shape) and 32x32 x 20 heads; at 2048^2 128x128 x 10 heads and 64x64 x 20 heads."""
    levels = [((64, 64), 10), ((32, 32), 20), ((128, 128), 10), ((64, 64), 20)]
    return [Case(arch, mode, layout, 5, T, grid=grid, H=H)
            for (grid, H) in (levels[:2] if quick else levels) for arch in archs for mode in modes
            for layout in layouts for T in ((16,) if quick else (16, 4))]


def flux_cases(archs=(90, 80), quick=False, modes=("overwrite", "sum"),
               layouts=("disjoint", "overlap")) -> List[Case]:
    """FLUX.1's IP path at 1024^2: the packed 64x64 token grid, 24 heads of 128, bf16, one image
    (guidance-distilled: no CFG batch), no text branch (k_text=None); S = 2, 5, 10; T = 4 and 16."""
    return [Case(arch, mode, layout, S, T, B=1, H=24, D=128, L=0, dtype="bfloat16")
            for arch in archs for mode in modes for layout in layouts
            for S in ((5,) if quick else (2, 5, 10)) for T in ((4,) if quick else (4, 16))]


ACTIVE_COUNTS = (0, 1, 2, 4, 8)


def active_cases(archs=(90, 80), S: int = 8, counts=ACTIVE_COUNTS) -> List[Case]:
    """The reference shape (64x64, fp16, D=64, B=2, H=10, L=77, T=16, disjoint, overwrite) with S
    subjects of which the first k are active, for each k in ``counts``."""
    return [Case(arch, "overwrite", "disjoint", S, 16, active=k) for arch in archs for k in counts]


def active_table(rows: List[dict]) -> List[str]:
    """Per device: each k's acting subjects per tile and predicted time, over all S active and over
    none, beside k / S."""
    lines = []
    for dev in dict.fromkeys(r["device"] for r in rows):
        mine = sorted((r for r in rows if r["device"] == dev), key=lambda r: r["active"])
        t0, tS, S = mine[0]["predicted_us"], mine[-1]["predicted_us"], mine[-1]["S"]
        lines.append(f"{dev} ({mine[0]['arch']}): k of S={S} active, 64x64 fp16 D=64 B=2 H=10 L=77 T=16 disjoint "
                     f"overwrite")
        lines.append("    k  acting/tile  predicted us  / k=S  (t_k - t_0) / (t_S - t_0)  k / S")
        for r in mine:
            part = (r["predicted_us"] - t0) / (tS - t0) if tS != t0 else float("nan")
            lines.append(f"  {r['active']:3d}  {r['acting_per_tile']:11.4f}  {r['predicted_us']:12.3f}  "
                         f"{r['predicted_us'] / tS:5.2f}  {part:25.2f}  {r['active'] / S:5.2f}")
    return lines


def git_commit(tree: str) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=tree, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "anyms_kernels"],
                               cwd=tree, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=ROOT, help="repository tree whose anyms_kernels is analysed (default: this one)")
    ap.add_argument("--generation", choices=["auto", *GENERATIONS], default="auto")
    ap.add_argument("--tag", default=None, help="CSV name: kernel_cost_<tag>.csv (default: the generation)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--quick", action="store_true", help="S=5, T=16 only")
    ap.add_argument("--shape", choices=["sdxl", "levels", "flux"], default="sdxl",
                    help="sdxl: the 64x64 SDXL layer (the reference); levels: every SDXL cross-attention "
                         "level at 1024^2 and 2048^2, S=5; flux: FLUX.1's IP path, no text branch "
                         "(second-generation kernel only)")
    ap.add_argument("--modes", default="overwrite,sum")
    ap.add_argument("--layouts", default="disjoint,overlap")
    ap.add_argument("--acting", default=None, help="gen2: module:function(boxes, grid, mode, block_m) -> per-tile "
                                                   "acting-subject counts (default: the routing's acting_per_tile)")
    ap.add_argument("--dump", default=None, help="write each cubin's annotated SASS into this folder")
    ap.add_argument("--verbose", action="store_true", help="print the loop / if matches and assumed branches")
    ap.add_argument("--active-of", type=int, metavar="S", default=None,
                    help="the reference shape with k of S subjects active (the others absent from the routing), "
                         f"k in --active (default {' '.join(map(str, ACTIVE_COUNTS))}, those <= S)")
    ap.add_argument("--active", type=int, nargs="+", metavar="K", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU (env -u TRITON_INTERPRET ...)")
    tree = os.path.realpath(args.tree)
    sys.path.insert(0, tree)
    import anyms_kernels
    if not os.path.realpath(anyms_kernels.__file__).startswith(tree + os.sep):
        sys.exit(f"anyms_kernels was imported from {anyms_kernels.__file__}, not from --tree {tree}")
    if args.generation == "auto":
        found = [g for g in GENERATIONS.values() if g.detect()]
        if not found:
            sys.exit("no known kernel generation in " + tree)
        gen = found[0]
    else:
        gen = GENERATIONS[args.generation]
    if args.acting:
        gen.acting_fn = args.acting
    import triton
    meta = dict(commit=git_commit(tree), triton=triton.__version__)
    print(f"{gen.name} kernel at {meta['commit']} ({anyms_kernels.__file__}), triton {triton.__version__}", flush=True)
    cache: Dict[tuple, Tuple[Compiled, Analysis, Dict[str, int]]] = {}
    rows: List[dict] = []
    seen: set = set()
    archs = tuple(int(a) for a in args.archs.split(","))
    make_cases = {"flux": flux_cases, "levels": sdxl_level_cases}.get(args.shape, reference_cases)
    if args.active_of is not None:
        counts = sorted(set(args.active or [k for k in ACTIVE_COUNTS if k <= args.active_of]))
        if not counts or counts[0] < 0 or counts[-1] > args.active_of:
            sys.exit(f"--active: every k must be in [0, {args.active_of}], got {args.active}")
        cases = active_cases(archs, args.active_of, counts)
    else:
        cases = make_cases(archs, args.quick, args.modes.split(","), args.layouts.split(","))
    for case in cases:
        key = gen.compile_key(case)
        if key not in cache:
            comp = gen.compile(case)
            sass = disassemble(comp.cubin)
            an = analyse(sass, comp.source, gen.constructs(case, comp))
            from sass_timing import control_codes
            cache[key] = (comp, an, resources(comp, case.arch), control_codes(comp.cubin, nvidia_tool("nvdisasm")))
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                tag = "_".join(map(str, key))
                trips, runs = gen.trips(case, comp, gen.tile_params(case, comp)[-1][0])
                with open(os.path.join(args.dump, f"{gen.name}_{tag}.sass.txt"), "w") as f:
                    f.write(annotate(an, frequencies(an, trips, runs)))
            if args.verbose:
                print(f"  compiled {key}:")
        comp, an, res, ctrl = cache[key]
        for r in run_case(gen, case, comp, an, res, args.verbose and key not in seen, meta, ctrl):
            rows.append(r)
            print(f"{r['device']:4s} {r['arch']} {r['mode']:9s} {r['layout']:8s} S={r['S']:<2} k={r['active']:<2} T={r['T']:<2} "
                  f"regs={r['registers']} progs/SM={r['programs_per_sm']} A/tile={r['acting_per_tile']:<6} "
                  f"fixed={r['fixed_per_warp']:<6} text={r['text_per_warp']:<6} subj={r['per_subject_per_warp']:<5} "
                  f"act={r['per_acting_per_warp']:<6} instr/warp={r['instr_per_warp']:<7} "
                  f"bound={r['lower_bound_us']}({r['lower_bound']}) waves={r['waves']} prog={r['program_cycles']}clk "
                  f"waits[{r['waits_cycles']}] -> {r['predicted_us']} us {r['ratio']}x floor", flush=True)
        seen.add(key)
    os.makedirs(args.out, exist_ok=True)
    default_tag = gen.name if args.active_of is None else f"{gen.name}_active_of_{args.active_of}"
    path = os.path.join(args.out, f"kernel_cost_{args.tag or default_tag}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", os.path.relpath(path))
    if args.active_of is not None:
        print("\n".join(active_table(rows)))
        return
    ref = [r for r in rows if r["device"] == "H100" and r["mode"] == "overwrite" and r["S"] == 5
           and r["grid"] == "64x64" and r["H"] == 10]
    # Flat in S (same covered area): overwrite S=32 over S=2 <= 1.1x; sum with overlapping boxes <= 1.3x.
    for mode, layouts, target in (("overwrite", ("disjoint", "overlap"), 1.1), ("sum", ("overlap",), 1.3)):
        s2 = {(r["layout"], r["T"]): r for r in rows if r["device"] == "H100" and r["mode"] == mode and r["S"] == 2}
        for r in rows:
            if r["device"] == "H100" and r["mode"] == mode and r["S"] == 32 and r["layout"] in layouts:
                base = s2.get((r["layout"], r["T"]))
                if base:
                    print(f"{mode} S=32 / S=2 [{r['layout']} T={r['T']}]: "
                          f"{r['predicted_us'] / base['predicted_us']:.2f}x (target <= {target}x)")
    if ref:
        worst = max(ref, key=lambda r: r["ratio"])
        print(f"reference: sm_90 H100 {worst['dtype']} D={worst['D']} B={worst['B']} H={worst['H']} {worst['grid']} "
              f"L={worst['L']} S=5 overwrite, worst of disjoint/overlap x T=16/4 ({worst['layout']}, T={worst['T']}, "
              f"{worst['predicted_us']} us vs {worst['floor_us']} us): "
              f"predicted {worst['ratio']:.2f}x floor")


if __name__ == "__main__":
    main()
