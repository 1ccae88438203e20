"""Time one compiled kernel from its SASS: a warp's dependent chain, with the warps of the
programs resident on an SM sharing its schedulers, pipes and its share of the memory system.

Used by ``benchmarks/kernel_cost.py`` (the region-attention kernel) and by its validation on
kernels with published GPU timings (``benchmarks/validation_kernels.py``).

What it reads from the SASS
---------------------------
Every Volta-and-later instruction carries a control word (bits 105-125 of its 128-bit
encoding; ``nvdisasm -hex`` prints it as the second 64-bit word): the **stall count** (cycles
before the warp's next instruction may issue), the **write scoreboard** a variable-latency
instruction sets, the **read scoreboard** a store sets until its registers are read, and the
**wait mask** of scoreboards an instruction waits on. The walk issues one warp's instructions
in program order: each waits for the scoreboards it names, then the next issues ``stall``
cycles later. Fixed-latency dependencies are in the stall counts (the compiler wrote them);
variable-latency ones are resolved with the **stated** latencies of ``Latencies`` below (loads
from HBM or L2, shared memory, MUFU, shuffles, ...): those figures are assumptions, not read
from the code.

Overlap
-------
Only where the code makes it:
- inside a warp, a load is in flight from its issue until the first instruction that waits on
  its scoreboard (or its ``DEPBAR`` / ``WARPGROUP.DEPBAR``): a prefetch issued before a compute
  block overlaps it, a load followed by its use does not;
- between warps and programs resident on one SM (occupancy from the cubin's registers and
  shared memory): they run in **lockstep** (identical programs started together stay
  together), so they share each scheduler (an instruction of a warp issues at most every
  ``m`` cycles, m = resident warps per scheduler, times its pipe's cycles per warp-instruction),
  the tensor and MUFU pipes, shared memory, and the SM's share of L2 and HBM bandwidth: every
  global access of the walked warp stands for the same access of all resident warps, queued
  behind the SM's earlier traffic (a bandwidth server with the SM's share of the chip rate),
  and then takes its latency. Lockstep is pessimistic: it allows no overlap between one
  program's loads and another's compute unless the code staggers them.
Waves: programs / (resident programs per SM x SMs); full waves at full residency, then the
tail at its own residency, the last wave's stores drained at the end. The stores of one wave
delay the loads of the next (the server carries over).

Loops: a loop body is walked twice, the second time with the scoreboards the first left
pending (so a prefetch of the next iteration is seen), and costs first + (trips - 1) x second.
Blocks run a fractional number of times per tile (an ``if`` taken by some tiles) advance the
clock by that fraction of their duration.

Not modelled: bank conflicts, L2 misses of data assumed resident (see the callers'
``load_class``), DRAM page effects, clock throttling, launch overhead, instruction cache.
"""
from __future__ import annotations

import math
import re
import subprocess
import tempfile
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple


# --------------------------------------------------------------------------- control words
@dataclass(frozen=True)
class Ctrl:
    stall: int
    yld: int
    wbar: int      # 7: none
    rbar: int      # 7: none
    wait: int      # bit mask of scoreboards 0-5


_HEX = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+.*?/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")
_HEX2 = re.compile(r"^\s*/\*\s*0x([0-9a-f]{16})\s*\*/\s*$")


def decode_control(hi: int) -> Ctrl:
    """The control word of a 128-bit instruction from its high 64 bits."""
    c = hi >> 41
    return Ctrl(stall=c & 0xF, yld=(c >> 4) & 1, wbar=(c >> 5) & 7, rbar=(c >> 8) & 7, wait=(c >> 11) & 0x3F)


def control_codes(cubin: bytes, nvdisasm: str) -> Dict[int, Ctrl]:
    """address -> control word of every instruction of the cubin's kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([nvdisasm, "-hex", "-c", path], capture_output=True, text=True, check=True).stdout
    out: Dict[int, Ctrl] = {}
    pending: Optional[int] = None
    for line in text.splitlines():
        m = _HEX.match(line)
        if m:
            pending = int(m.group(1), 16)
            continue
        m = _HEX2.match(line)
        if m and pending is not None:
            out[pending] = decode_control(int(m.group(1), 16))
            pending = None
    return out


# ---------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Latencies:
    """Stated latencies in cycles (not measured here): from issue to the data being usable."""
    hbm: int = 700           # a global load served by HBM (an L2 miss)
    l2: int = 270            # a global load that hits in L2
    shared: int = 30         # LDS / LDSM
    mufu: int = 18
    shfl: int = 24
    s2r: int = 20
    ldc: int = 12
    tensor: int = 24         # HMMA / HGMMA pipeline depth beyond their issue cycles
    barrier: int = 24        # BAR.SYNC with every warp arriving together
    store_read: int = 20     # a store's registers read (its read scoreboard)
    other: int = 20          # any other variable-latency instruction


@dataclass(frozen=True)
class Machine:
    name: str
    arch: int
    sms: int
    clock_ghz: float
    hbm_tb_s: float                 # sustained device copy rate (reads + writes)
    l2_tb_s: float                  # L2 hit bandwidth, whole chip
    sm_bytes_per_clk: float         # what one SM can move to or from L2 per cycle
    tc_fma_per_clk_sm: int          # dense fp16 tensor FMA per cycle per SM
    fp32_per_clk_sm: int            # FP32 lanes per SM
    lat: Latencies = field(default_factory=Latencies)
    schedulers: int = 4
    mufu_per_clk_sm: int = 16
    smem_bytes_per_clk: int = 128


# ---------------------------------------------------------------------------- the walk
_WIDTH = re.compile(r"\.(128|64|32|U8|S8|U16|S16)\b")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"HMMA\.(\d+)")
_DEPBAR = re.compile(r"DEPBAR\.LE\s+SB(\d),\s*(0x[0-9a-f]+|\d+)")
_WGDEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+|\d+)")


def access_bytes(text: str) -> int:
    """Bytes one warp's global / shared access moves (32 lanes x its width)."""
    m = _WIDTH.search(text)
    width = {"128": 16, "64": 8, "32": 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[m.group(1)] if m else 4
    return 32 * width


class Server:
    """A bandwidth: requests queue behind each other at ``rate`` bytes per cycle."""

    def __init__(self, rate: float):
        self.rate = rate
        self.free = 0.0
        self.bytes = 0.0

    def request(self, t: float, nbytes: float) -> float:
        start = max(t, self.free)
        self.free = start + nbytes / self.rate
        self.bytes += nbytes
        return self.free


@dataclass
class WalkState:
    t: float = 0.0
    ready: Dict[int, float] = field(default_factory=dict)     # scoreboard -> cycle its producer is done
    groups: List[float] = field(default_factory=list)          # committed cp.async groups' completion
    open_group: float = 0.0
    wgmma: float = 0.0                                         # outstanding wgmma completion
    pipes: Dict[str, float] = field(default_factory=dict)      # pipe -> cycle it is free
    waits: Dict[str, float] = field(default_factory=dict)      # cycles spent waiting, by producer kind
    sb_kind: Dict[int, str] = field(default_factory=dict)

    def shift(self, dt: float) -> None:
        self.t += dt
        self.ready = {k: v + dt for k, v in self.ready.items()}
        self.groups = [g + dt for g in self.groups]
        self.open_group += dt
        self.wgmma += dt
        self.pipes = {k: v + dt for k, v in self.pipes.items()}


@dataclass
class Timing:
    cycles: float                 # one program, issue of its first instruction to its last
    issued: float                 # warp-instructions one warp issues
    waits: Dict[str, float]       # cycles the walked warp waited, by what it waited on
    hbm_bytes: float              # bytes the SM moved through each server during the program
    l2_bytes: float


class Walker:
    """One warp's walk through the program's blocks at a given residency."""

    def __init__(self, an, freq: List[float], trips: Dict[str, float], ctrl: Dict[int, Ctrl], mach: Machine,
                 warps_per_sm: int, warps_per_program: int, active_sms: int, load_class: Callable,
                 servers: Optional[Dict[str, Server]] = None):
        self.an, self.freq, self.trips, self.ctrl, self.m = an, freq, trips, ctrl, mach
        self.conc = warps_per_sm                                   # warps issuing the same instruction
        self.per_sched = max(1.0, warps_per_sm / mach.schedulers)
        self.warps_per_program = warps_per_program
        self.load_class = load_class
        clk = mach.clock_ghz * 1e9
        share = lambda tb: min(mach.sm_bytes_per_clk, tb * 1e12 / clk / max(1, active_sms))
        self.servers = servers or {"hbm": Server(share(mach.hbm_tb_s)), "l2": Server(share(mach.l2_tb_s))}
        self.loop_at = {}
        for lp in an.loops:
            if lp.head not in self.loop_at or lp.latch > self.loop_at[lp.head].latch:
                self.loop_at[lp.head] = lp
        self.issued = 0.0

    # ------------------------------------------------------------------ pipes
    def _pipe(self, st: WalkState, name: str, t: float, cycles_per_warp: float, share_sm: bool,
              blocking: bool = True) -> float:
        """Occupy a pipe for all resident warps' copies of this instruction; returns when it is done.
        Per-scheduler pipes serve per_sched warps, SM-wide ones all resident warps. A blocking
        pipe holds the warp's issue until it accepts the instruction (a busy pipe throttles issue);
        wgmma is queued asynchronously instead."""
        n = self.conc if share_sm else self.per_sched
        start = max(t, st.pipes.get(name, 0.0))
        if blocking and start > st.t:
            self._wait(st, start, "pipe_" + name)
        st.pipes[name] = start + cycles_per_warp * n
        return st.pipes[name]

    def _wait(self, st: WalkState, until: float, kind: str) -> None:
        if until > st.t:
            st.waits[kind] = st.waits.get(kind, 0.0) + (until - st.t)
            st.t = until

    def step(self, st: WalkState, ins, weight: float) -> None:
        t0 = st.t
        c = self.ctrl.get(ins.addr, Ctrl(1, 0, 7, 7, 0))
        op = ins.opcode
        base = op.split(".")[0]
        text = ins.text
        lat = self.m.lat
        # waits: scoreboards, cp.async groups, wgmma groups, barriers
        for sb in range(6):
            if c.wait >> sb & 1 and sb in st.ready:
                self._wait(st, st.ready[sb], st.sb_kind.get(sb, "other"))
        if base == "DEPBAR":
            m = _DEPBAR.search(text)
            keep = int(m.group(2), 0) if m else 0
            while len(st.groups) > keep:
                self._wait(st, st.groups.pop(0), "async_copy")
        if op.startswith("WARPGROUP.DEPBAR"):
            self._wait(st, st.wgmma, "tensor")
        if base == "BAR":
            st.t += lat.barrier
            st.waits["barrier"] = st.waits.get("barrier", 0.0) + lat.barrier
        t = st.t
        interval = float(max(1, c.stall))
        done: Optional[float] = None
        kind = "other"
        if base in ("LDG", "LDGSTS"):
            cls = self.load_class(ins)
            nbytes = access_bytes(text) * self.conc
            done = self.servers[cls].request(t, nbytes) + (lat.hbm if cls == "hbm" else lat.l2)
            kind = cls
            if base == "LDGSTS":
                st.open_group = max(st.open_group, done)
                done = None
        elif base == "LDGDEPBAR":
            st.groups.append(st.open_group)
            st.open_group = 0.0
        elif base in ("STG", "RED", "ATOMG"):
            self.servers["hbm"].request(t, access_bytes(text) * self.conc)
        elif base in ("LDS", "LDSM", "STS"):
            nbytes = access_bytes(text) * (4 if "x4" in text.lower() else 1)
            done = self._pipe(st, "smem", t, nbytes / self.m.smem_bytes_per_clk, True) + lat.shared
            kind = "shared"
        elif base == "HGMMA":
            mm, nn, kk = map(int, _HGMMA.search(text).groups())
            # one warpgroup's mxnxk on the SM's tensor cores; each of its 4 warps issues it: a quarter each
            cyc = mm * nn * kk / self.m.tc_fma_per_clk_sm / 4
            st.wgmma = self._pipe(st, "tensor", t, cyc, True, blocking=False) + lat.tensor
        elif base == "HMMA":
            m = _HMMA.search(text)
            shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}.get(m.group(1) if m else "", (16, 8, 16))
            cyc = shape[0] * shape[1] * shape[2] / (self.m.tc_fma_per_clk_sm / self.m.schedulers)
            done = self._pipe(st, "tensor", t, cyc, False) + lat.tensor
            kind = "tensor"
            interval = max(interval, 2.0)
        elif base == "MUFU":
            cyc = 32 / (self.m.mufu_per_clk_sm / self.m.schedulers)
            done = self._pipe(st, "mufu", t, cyc, False) + lat.mufu
            kind = "mufu"
        elif base == "SHFL":
            done, kind = t + lat.shfl, "shfl"
        elif base == "S2R" or base == "CS2R" and "SR_" in text:
            done, kind = t + lat.s2r, "s2r"
        elif base in ("LDC", "ULDC"):
            done, kind = t + lat.ldc, "ldc"
        elif base in ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "HFMA2", "HADD2", "HMUL2"):
            cyc = 32 / (self.m.fp32_per_clk_sm / self.m.schedulers)
            self._pipe(st, "fp32", t, cyc, False)
        else:
            if base not in ("BRA", "EXIT", "NOP", "BAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE",
                            "WARPSYNC", "BSSY", "BSYNC"):
                interval = max(interval, self.per_sched)     # one issue slot per resident warp on the scheduler
        t = max(t, st.t)                  # a busy pipe may have held the issue
        if c.wbar != 7 and done is not None:
            st.ready[c.wbar], st.sb_kind[c.wbar] = done, kind
        elif c.wbar != 7:
            st.ready[c.wbar], st.sb_kind[c.wbar] = t + lat.other, "other"
        if c.rbar != 7:
            st.ready[c.rbar], st.sb_kind[c.rbar] = t + lat.store_read, "store_read"
        st.t = t + max(interval, self.per_sched)
        self.issued += weight
        if weight != 1.0:                 # a block run by a fraction of the tiles
            st.shift((weight - 1.0) * (st.t - t0))

    # ------------------------------------------------------------------ blocks and loops
    def walk(self, st: WalkState, lo: int, hi: int, ctx: float, skip_loop=None) -> None:
        k = lo
        blocks = self.an.blocks
        while k <= hi:
            lp = self.loop_at.get(k)
            if lp is not None and lp is not skip_loop and lp.latch <= hi and self.an.live[k]:
                self.loop(st, lp, ctx)
                k = lp.latch + 1
                continue
            f = self.freq[k]
            if f > 0 and self.an.live[k]:
                w = f / ctx if ctx > 0 else 0.0
                for ins in blocks[k].instrs:
                    self.step(st, ins, w)
            k += 1

    def loop(self, st: WalkState, lp, ctx: float) -> None:
        fh = self.freq[lp.head]
        if fh <= 0:
            return
        trips = max(1.0, float(self.trips.get(lp.construct, 1.0)))
        entries = fh / trips
        t0 = st.t
        issued0 = self.issued
        self.walk(st, lp.head, lp.latch, fh, skip_loop=lp)
        d1, t1 = st.t - t0, st.t
        i1 = self.issued - issued0
        if trips > 1:
            self.walk(st, lp.head, lp.latch, fh, skip_loop=lp)
        d2 = st.t - t1
        i2 = self.issued - issued0 - i1
        scale = entries / ctx if ctx > 0 else 0.0
        total = scale * (d1 + (trips - 1) * d2)
        st.shift(t0 + total - st.t)
        self.issued = issued0 + scale * (i1 + (trips - 1) * i2)

    def program(self, start: float = 0.0) -> Tuple[float, WalkState]:
        st = WalkState(t=start)
        self.walk(st, 0, len(self.an.blocks) - 1, self.freq[0] or 1.0)
        return st.t, st


def program_timing(an, freq, trips, ctrl, mach: Machine, programs_per_sm: int, warps: int, active_sms: int,
                   load_class: Callable) -> Timing:
    w = Walker(an, freq, trips, ctrl, mach, programs_per_sm * warps, warps, active_sms, load_class)
    end, st = w.program()
    # a wave is over when its traffic has moved, its stores included
    cycles = max(end, *(s.free for s in w.servers.values()))
    return Timing(cycles, w.issued, dict(st.waits), w.servers["hbm"].bytes / programs_per_sm,
                  w.servers["l2"].bytes / programs_per_sm)


@dataclass
class KernelTime:
    us: float
    waves: float
    full_waves: int
    tail_programs_per_sm: int
    program_cycles: float          # one program at full residency (mean over tile classes)
    tail_cycles: float
    waits: Dict[str, float]


def kernel_time(classes, mach: Machine, programs: int, resident: int, warps: int) -> KernelTime:
    """Waves of lockstep programs. ``classes``: [(weight, an, freq, trips, ctrl, load_class)] with
    weights summing to 1 (the tile classes' shares of the programs). A wave's time is the weighted
    mean of its classes' program times at that wave's residency."""
    slots = resident * mach.sms
    full, rest = divmod(programs, slots)
    tail_per_sm = math.ceil(rest / mach.sms) if rest else 0
    tail_sms = min(mach.sms, rest)

    def wave(per_sm: int, sms: int) -> Tuple[float, Dict[str, float]]:
        cyc, waits = 0.0, {}
        for weight, an, freq, trips, ctrl, load_class in classes:
            tm = program_timing(an, freq, trips, ctrl, mach, per_sm, warps, sms, load_class)
            cyc += weight * tm.cycles
            for k, v in tm.waits.items():
                waits[k] = waits.get(k, 0.0) + weight * v
        return cyc, waits

    full_cyc, waits = wave(resident, mach.sms) if full else (0.0, {})
    tail_cyc, tail_waits = wave(tail_per_sm, tail_sms) if rest else (0.0, {})
    total = full * full_cyc + tail_cyc
    return KernelTime(us=total / (mach.clock_ghz * 1e3), waves=programs / slots, full_waves=full,
                      tail_programs_per_sm=tail_per_sm, program_cycles=full_cyc or tail_cyc,
                      tail_cycles=tail_cyc, waits=waits if full else tail_waits)
