"""benchmarks/kernel_cost.py: the static cost model of the compiled kernel.

The method (basic blocks, loops, matching to source constructs, execution counts,
categories) is checked on a hand-written SASS listing whose counts are worked out below;
then the script runs once on this tree's kernel, compiled for sm_90 without a GPU, in a
fresh process without TRITON_INTERPRET (the suite sets it; the interpreter cannot compile).
"""
from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_cost.py")


def _load():
    spec = importlib.util.spec_from_file_location("kernel_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernel_cost"] = mod
    spec.loader.exec_module(mod)
    return mod


kc = _load()

SOURCE = '''\
def helper(x):
    for j in range(0, n):
        x = x + 1
    return x

def kern(S):
    a = 0
    a = helper(a)
    for s in range(0, S):
        if s > 0:
            a = helper(a)
    return a
'''

# (address, instruction, source chain innermost first); labels on their own lines.
LISTING = [
    (0x00, "MOV R1, R2", (7,)),
    (0x10, "@!P0 BRA `(.L_x_0)", (2, 8)),            # zero-trip guard of the text loop
    ".L_x_1",
    (0x20, "IADD3 R1, R1, 0x1, RZ", (3, 8)),
    (0x30, "MUFU.EX2 R1, R1", (3, 8)),
    (0x40, "@P1 BRA `(.L_x_1)", (2, 8)),             # text loop back edge
    ".L_x_0",
    (0x50, "FMUL R1, R1, R1", (4, 8)),               # text branch, after its loop
    ".L_x_3",
    (0x60, "ISETP.GE.AND P2, PT, R1, 0x1, PT", (10,)),
    (0x70, "@!P2 BRA `(.L_x_2)", (10,)),              # the if: skips its body
    (0x80, "MOV R3, RZ", (11,)),
    ".L_x_4",
    (0x90, "HMMA.16816.F32 R4, R8, R12, R4", (3, 11)),
    (0xa0, "@P3 BRA `(.L_x_4)", (2, 11)),            # subject key loop back edge
    (0xb0, "FADD R1, R1, R4", (4, 11)),
    ".L_x_2",
    (0xc0, "IADD3 R5, R5, 0x1, RZ", (9,)),
    (0xd0, "@P4 BRA `(.L_x_3)", (9,)),               # subject loop back edge
    (0xe0, "EXIT", (12,)),
    ".L_x_5",
    (0xf0, "BRA `(.L_x_5)", ()),                      # unreachable padding
]


def _sass(path: str, listing=LISTING) -> str:
    out = []
    for item in listing:
        if isinstance(item, str):
            out.append(item + ":")
            continue
        addr, text, chain = item
        for k, line in enumerate(chain):
            tail = f' inlined at "{path}", line {chain[k + 1]}' if k + 1 < len(chain) else ""
            out.append(f'\t//## File "{path}", line {line}{tail}')
        out.append(f"        /*{addr:04x}*/                   {text} ;")
    return "\n".join(out) + "\n"


def _constructs():
    C = kc.Construct
    keys = ("helper", ("for", 0, "for j"))
    return [
        C("text_call", "label", [("kern", ("call", 0, "helper"))], "text"),
        C("text_keys", "loop", [keys, ("kern", ("call", 0, "helper"))], "text"),
        C("subjects", "loop", [("kern", ("for", 0, "for s"))], "per_subject"),
        C("acting", "if", [("kern", ("if", 0, "if s > 0"))], "per_acting", parent="subjects"),
        C("subject_keys", "loop", [keys, ("kern", ("call", 1, "helper"))], "per_acting", parent="acting"),
    ]


def test_counts_of_a_hand_written_listing(tmp_path):
    src = tmp_path / "kernel.py"
    src.write_text(SOURCE)
    an = kc.analyse(_sass(str(src)), str(src), _constructs())
    assert {n: an.blocks[an.loops[i].head].start for n, i in an.loop_of.items()} == {
        "text_keys": 0x20, "subjects": 0x60, "subject_keys": 0x90}
    assert an.blocks[an.if_of["acting"][0]].term.addr == 0x70 and an.if_of["acting"][1] == 1.0
    # 3 text key steps, 4 subjects of which 2 act, 2 key steps per acting subject
    freq = kc.frequencies(an, {"text_keys": 3, "subjects": 4, "subject_keys": 2}, {"acting": 0.5})
    by_start = {b.start: round(f, 9) for b, f in zip(an.blocks, freq)}
    assert by_start == {0x00: 1, 0x20: 3, 0x50: 1, 0x60: 4, 0x80: 2, 0x90: 4, 0xb0: 2, 0xc0: 4, 0xe0: 1, 0xf0: 0}
    tc = kc.tile_cost(an, freq)
    # fixed: MOV + EXIT; text: the guard (its source is the text call) + 3 x 3 + FMUL;
    # per subject: 4 x (2 + 2); per acting: 2 x MOV + 4 x 2 + 2 x FADD
    assert tc.instr == pytest.approx({"fixed": 2, "text": 11, "per_subject": 16, "per_acting": 12})
    assert tc.mufu == 3 and tc.flops_per_warp == 4 * 2 * 16 * 8 * 16
    # a loop with no trips: its zero-trip guard is taken
    freq0 = kc.frequencies(an, {"text_keys": 0, "subjects": 4, "subject_keys": 2}, {"acting": 0.5})
    assert round(freq0[[b.start for b in an.blocks].index(0x20)], 9) == 0


NESTED_SOURCE = '''\
def kern(T, S):
    a = 0
    for t in range(0, T):
        for s in range(0, S):
            a = a + 1
        a = a * 2
    return a
'''

# A tile loop whose body holds a subject loop; each loop has its zero-trip guard.
NESTED_LISTING = [
    (0x00, "MOV R1, RZ", (2,)),
    (0x10, "@!P0 BRA `(.L_x_0)", (3,)),              # zero-trip guard of the tile loop: skips both loops
    ".L_x_1",
    (0x20, "ISETP.GE.AND P1, PT, R2, 0x1, PT", (4,)),
    (0x30, "@!P1 BRA `(.L_x_2)", (4,)),              # zero-trip guard of the subject loop
    ".L_x_3",
    (0x40, "IADD3 R1, R1, 0x1, RZ", (5,)),
    (0x50, "@P2 BRA `(.L_x_3)", (4,)),               # subject loop back edge
    ".L_x_2",
    (0x60, "FMUL R1, R1, 2", (6,)),
    (0x70, "FMUL R1, R1, 2", (6,)),
    (0x80, "FMUL R1, R1, 2", (6,)),
    (0x90, "FMUL R1, R1, 2", (6,)),
    (0xa0, "@P3 BRA `(.L_x_1)", (3,)),               # tile loop back edge
    ".L_x_0",
    (0xb0, "EXIT", (7,)),
]


def test_a_tile_with_no_subjects_still_runs_the_tile_loop(tmp_path):
    """The guard in front of a loop nest is taken only when the outer loop has no trips: tiles
    that no subject acts on (the subject loop's zero trips) still run their tile's work."""
    src = tmp_path / "kernel.py"
    src.write_text(NESTED_SOURCE)
    C = kc.Construct
    an = kc.analyse(_sass(str(src), NESTED_LISTING), str(src),
                    [C("tiles", "loop", [("kern", ("for", 0, "for t"))], "fixed"),
                     C("subjects", "loop", [("kern", ("for", 0, "for s"))], "per_acting", parent="tiles")])
    starts = [b.start for b in an.blocks]
    for subjects, per_tile in ((0, 0), (2, 2)):
        freq = kc.frequencies(an, {"tiles": 3, "subjects": subjects}, {})
        by_start = {a: round(f, 9) for a, f in zip(starts, freq)}
        assert by_start[0x20] == 3 and by_start[0x60] == 3, by_start
        assert by_start[0x40] == 3 * per_tile and by_start[0xb0] == 1, by_start
    freq = kc.frequencies(an, {"tiles": 0, "subjects": 2}, {})
    assert round(freq[starts.index(0x20)], 9) == 0 and round(freq[starts.index(0x40)], 9) == 0


def test_hardware_model():
    assert kc.programs_per_sm(kc.H100, 128, 32768, 8) == (2, "registers")
    assert kc.programs_per_sm(kc.A100, 163, 24576, 8) == (1, "registers")
    case = kc.Case(90, "overwrite", "disjoint", 5, 16)
    qo = 2 * case.B * case.H * case.N * case.D * 2
    assert abs(qo / 1e6 - 20.97) < 0.01
    t = kc.model_time(kc.H100, case, 640, 8 * 1000, 8 * 10, 1e6, qo)
    assert abs(t["hbm"] - 6.99) < 0.01                                # the 7 us floor
    assert abs(t["issue"] - 5 * 8000 / (4 * 1755)) < 1e-9              # ceil(640 / 132) = 5 tiles per SM


def test_the_fourth_kernel_counts_what_the_launcher_splits():
    """Programs, tiles each and segments (runs of one (batch, head)) as the launcher splits the
    tiles: 64x64 at 10 heads on an H100 (one program per SM) runs across heads, 5 tiles each,
    and the wave's slowest program stages text keys twice; 32x32 at 20 heads stays within heads."""
    from types import SimpleNamespace
    gen = kc.Gen4()
    gen.device, gen.resident = kc.H100, 1
    comp = SimpleNamespace(block_m=128)
    case = kc.Case(90, "overwrite", "disjoint", 5, 16)                 # 32 tiles of 128 per (batch, head)
    assert (gen.programs(case, comp, 32), gen.tiles_per_program(case, comp, 32)) == (128, 5)
    # 640 tiles in runs of 5: the 19 (batch, head) starts at 32 k (k = 1..19) that are not a multiple of 5
    # fall inside a run, except k = 5, 10, 15 (160, 320, 480 are multiples of 5)
    assert gen.segments(case, 32) == (2, 128 + 16)
    assert gen.text_stagings(case, comp, 5.0) == pytest.approx(144 / 128)
    trips, _ = gen.trips(case, comp, {"acting": 1, "tiles_per_program": 5})
    assert (trips["segments"], trips["tiles"]) == (2, 2.5)
    small = kc.Case(90, "overwrite", "disjoint", 5, 16, grid=(32, 32), H=20)   # 8 tiles, 40 (batch, head)s
    assert (gen.programs(small, comp, 8), gen.tiles_per_program(small, comp, 8)) == (120, 3)
    assert gen.segments(small, 8) == (1, 120)
    gen.device = None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_script_on_this_trees_kernel(tmp_path):
    """One configuration (sm_90, overwrite, disjoint, S=5, T=16), end to end."""
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("nvdisasm", "cuobjdump")):
        pytest.skip("the triton package ships no nvdisasm / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--archs", "90", "--modes", "overwrite", "--layouts",
                        "disjoint", "--out", str(tmp_path), "--tag", "test"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    ratio = float(re.search(r"predicted (\d+\.\d+)x floor$", last).group(1))
    rows = list(csv.DictReader(open(tmp_path / "kernel_cost_test.csv")))
    assert {row["device"] for row in rows} == {"H100", "H200"}
    h100 = next(row for row in rows if row["device"] == "H100")
    assert float(h100["ratio"]) == pytest.approx(ratio, abs=0.01) and ratio >= 1.0
    parts = (float(h100["fixed_per_warp"]) + float(h100["text_per_warp"])
             + float(h100["subjects_visited_per_tile"]) * float(h100["per_subject_per_warp"])
             + float(h100["acting_per_tile"]) * float(h100["per_acting_per_warp"]))
    assert parts == pytest.approx(float(h100["instr_per_warp"]), rel=1e-3)
    assert float(h100["text_per_warp"]) > 0 and float(h100["per_acting_per_warp"]) > 0
    assert int(h100["registers"]) > 0 and int(h100["programs_per_sm"]) >= 1


def test_the_gpu_sweep_reads_the_models_prediction_for_each_level():
    """benchmarks/bench_region_attention.py prints the written-down prediction beside each GPU time."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_region_attention as bench
    rows = list(csv.DictReader(open(os.path.join(ROOT, "benchmarks", "results", "kernel_cost_levels.csv"))))
    for grid, H in (((64, 64), 10), ((32, 32), 20), ((128, 128), 10), ((64, 64), 20)):
        case = bench.Case(grid, 5, 16, "overlap", torch.float16, "cuda", H=H)
        want = next(float(r["predicted_us"]) for r in rows if r["device"] == "H200" and r["mode"] == "sum"
                    and r["grid"] == f"{grid[0]}x{grid[1]}" and int(r["H"]) == H and r["T"] == "16"
                    and r["layout"] == "overlap")
        assert bench.model_prediction(case, "sum", "NVIDIA H200") == want
    case = bench.Case((64, 64), 5, 16, "overlap", torch.bfloat16, "cuda")
    assert bench.model_prediction(case, "sum", "NVIDIA H200") is None          # predicted for fp16 only
    assert bench.model_prediction(bench.Case((64, 64), 5, 16, "overlap", torch.float16, "cuda"), "sum",
                                  "NVIDIA RTX 4090") is None                  # no model of that GPU


# ------------------------------------------------------------------ the SASS timing walk
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sass_timing as st  # noqa: E402


def test_control_words_are_decoded():
    # LDC R16, c[0x0][0x2ec] sets scoreboard 1 and stalls 1; IABS R4, R16 waits on it, then stalls 7
    # (two instructions of an sm_90 cubin of the kernel, as nvdisasm -hex prints them).
    assert st.decode_control(0x000E620000000800) == st.Ctrl(stall=1, yld=1, wbar=1, rbar=7, wait=0)
    assert st.decode_control(0x002FCE0000000000) == st.Ctrl(stall=7, yld=0, wbar=7, rbar=7, wait=0b10)


def _walk(tmp_path, listing, ctrl, warps_per_sm=4, trips=None, constructs=()):
    src = tmp_path / "k.py"
    src.write_text("def kern():\n    q = load()\n    x = 1\n    return q\n")
    text = "\n".join(f'\t//## File "{src}", line {line}\n        /*{a:04x}*/  {t} ;' for a, t, line in listing)
    an = kc.analyse(text + "\n", str(src), list(constructs))
    freq = kc.frequencies(an, trips or {}, {})
    mach = kc.machine(kc.H100)
    w = st.Walker(an, freq, trips or {}, ctrl, mach, warps_per_sm, 4, mach.sms, lambda ins: "hbm")
    return w.program()[0], mach


def test_a_load_and_its_use_do_not_overlap_a_prefetch_does(tmp_path):
    C = st.Ctrl
    # load (scoreboard 0), 100 independent instructions, then the use waiting on it
    body = [(0x10 * (k + 1), "FADD R2, R2, R2", 3) for k in range(100)]
    listing = [(0x0, "LDG.E.128 R4, desc[UR4][R8.64]", 2)] + body + [(0x10 * 101, "FADD R3, R4, R4", 3),
                                                                      (0x10 * 102, "EXIT", 4)]
    ctrl = {0x0: C(1, 0, 0, 7, 0), 0x10 * 101: C(1, 0, 7, 7, 1), 0x10 * 102: C(1, 0, 7, 7, 0)}
    ctrl.update({a: C(1, 0, 7, 7, 0) for a, _, _ in body})
    prefetched, mach = _walk(tmp_path, listing, ctrl, warps_per_sm=4)
    # the same instructions with the use first: the warp waits the whole latency, then issues the rest
    serial = [(0x0, "LDG.E.128 R4, desc[UR4][R8.64]", 2), (0x10, "FADD R3, R4, R4", 3)] + \
        [(0x10 * (k + 2), "FADD R2, R2, R2", 3) for k in range(100)] + [(0x10 * 102, "EXIT", 4)]
    ctrl2 = {a: C(1, 0, 7, 7, 0) for a, _, _ in serial}
    ctrl2[0x0], ctrl2[0x10] = C(1, 0, 0, 7, 0), C(1, 0, 7, 7, 1)
    waited, _ = _walk(tmp_path, serial, ctrl2, warps_per_sm=4)
    # the latency after the SM's share of HBM moves the 4 warps' 512 bytes each
    lat = mach.lat.hbm + 4 * 512 / (mach.hbm_tb_s * 1e12 / (mach.clock_ghz * 1e9) / mach.sms)
    assert waited == pytest.approx(lat + 1 + 1 + 100 + 1, abs=2)        # latency, then every instruction
    assert prefetched == pytest.approx(lat + 1 + 1, abs=2)              # the 100 issue under the load
    # 32 resident warps: 8 per scheduler, so each instruction of the walked warp issues 8 cycles apart
    crowded, _ = _walk(tmp_path, serial, ctrl2, warps_per_sm=32)
    assert crowded > lat + 8 * 100


def test_the_gpu_sweep_times_every_launch_configuration_of_the_table():
    """On CUDA at S=5, T=16 the sweep adds one peer per configuration of the kernel's table
    (the configurations sm_80 and sm_90 launch); each computes the op (checked here under the
    interpreter on a tiny CPU case against the float64 reference)."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_region_attention as bench
    from anyms_kernels.ops import region_attention_triton as rt
    cuda = bench.Case((64, 64), 5, 16, "overlap", torch.float16, "cuda")
    assert set(bench.config_peers(cuda)) == {f"ours_cfg{c.block_m}x{c.num_warps}"
                                             for c in rt.config_candidates(64, torch.float16)}
    assert bench.config_peers(bench.Case((64, 64), 2, 16, "overlap", torch.float16, "cuda")) == {}
    assert bench.config_peers(bench.Case((64, 64), 5, 16, "overlap", torch.float32, "cpu")) == {}
    if rt.triton_runnable(torch.empty(0)):
        pytest.skip("the Triton kernel cannot run here")
    tiny = bench.Case((6, 7), 5, 16, "overlap", torch.float32, "cpu", B=1, H=2, D=32, L=9)
    x = bench.make_inputs(tiny)
    ref = bench.reference_outputs(tiny, x)["overwrite"]
    for name, maker in bench.config_peers(bench.Case(**{**tiny.__dict__, "device": "cuda"})).items():
        out = maker(tiny, x)()
        assert (out.double() - ref).abs().max() < 1e-4, name


# ------------------------------------------------------------------ k of S subjects active
def _bench_module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_region_attention as bench
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return bench


def test_the_routing_with_k_active_lists_and_reads_only_those_k_subjects():
    """k of S=8 subjects active (the others absent from the routing, as anyms.Layout routes a subject
    inactive at a step): every tile lists only active subjects, every active one is listed, the op
    reads nothing of the others (NaN in their keys and values stays out of the output, which is the
    float64 reference over the k alone), and the cost model's per-tile acting counts, read from
    that routing, grow with k."""
    import torch

    bench = _bench_module()
    case = bench.Case((16, 16), 8, 4, "disjoint", torch.float32, "cpu", B=1, H=2, D=16, L=7)
    x = bench.make_inputs(case)
    acting = []
    for k in bench.ACTIVE_COUNTS:
        routing = bench.active_routing(x["tok"], case.grid, "overwrite", k)
        for block_m in (16, 64):
            count, subjects = routing.tiles(block_m)
            listed = {int(s) for i in range(count.shape[1]) for s in subjects[0, i, :int(count[0, i])]}
            assert listed == set(range(k)), (k, block_m, listed)
        assert int(routing.owner.max()) < k if k else bool((routing.owner == -1).all())
        assert bench.check_active(case, x, k) < 1e-5, k
        model_case = kc.Case(90, "overwrite", "disjoint", 8, 16, active=k)
        acting.append(sum(kc.GENERATIONS["gen3"].acting_counts(model_case, 64)))
    assert acting[0] == 0 and all(a < b for a, b in zip(acting, acting[1:])), acting


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_cost_models_prediction_grows_with_the_active_subjects(tmp_path):
    """--active-of 8 at the reference shape (sm_90): the predicted time rises with k, strictly, and
    the acting subjects per tile are k times one subject's (each covers the same number of tiles)."""
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, t)) for t in ("nvdisasm", "cuobjdump")):
        pytest.skip("the triton package ships no nvdisasm / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, SCRIPT, "--active-of", "8", "--archs", "90", "--out", str(tmp_path),
                        "--tag", "test"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "k of S=8 active" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "kernel_cost_test.csv")))
    for device in ("H100", "H200"):
        mine = sorted((row for row in rows if row["device"] == device), key=lambda row: int(row["active"]))
        assert [int(row["active"]) for row in mine] == [0, 1, 2, 4, 8]
        times = [float(row["predicted_us"]) for row in mine]
        assert all(a < b for a, b in zip(times, times[1:])), (device, times)
        acting = [float(row["acting_per_tile"]) for row in mine]
        assert acting[0] == 0 and acting == pytest.approx([k * acting[1] for k in (0, 1, 2, 4, 8)], rel=1e-3)
