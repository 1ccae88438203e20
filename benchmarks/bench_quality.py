"""Layout control measured on the trained toy world: does each subject land in its box, and nowhere else?

    python benchmarks/bench_quality.py                 # the full run (about 15-30 min on 2 busy cores)
    python benchmarks/bench_quality.py --quick         # a smoke run (a minute or two)
    python benchmarks/bench_quality.py --world runs/toy/world   # another trained world
    python benchmarks/bench_quality.py --upscale 4 --layouts 3  # do subjects keep their boxes after a tiled upscale?

Random layouts of 2-4 subjects of distinct colours, in three sets (``disjoint`` boxes,
``partial`` overlaps of 5-30% of the smaller box, ``large_overlap``: a box covering 40-70% of
another), each generated with several seeds in five modes on the same weights, prompt
("red circle and blue cross ...") and seeds:

    overwrite        AnyMS (crop and merge): each token takes its top subject's image branch
    sum              AnyMS's ablation (Eq. 7): every subject over all queries, masked and summed
    diffusers_masks  diffusers' own multi-image IP-Adapter with ip_adapter_masks (the real code path)
    everywhere       every subject over the whole image (the IP-Adapter without any layout)
    text_only        the prompt alone (IP-Adapter scale 0)

and a subject-scale sweep of overwrite. Per box (see anyms/toy/evaluate.py): owner (its
region's dominant colour is its subject's), presence (the subject's colour covers >= 20% of
its region), shape (a classifier trained on the generator names the shape; boxes no other box
touches; its clean accuracy is reported), similarity to the reference (cosine in the world's
image encoder); per image: leakage (palette-coloured pixels outside every box).

``--upscale 2|4``: another run. Each layout is generated in overwrite mode at the world's size
(64 px), then upscaled by :func:`anyms.tiled_upscale` (tiles of ``--upscale-tile`` px of the
output, default the native 64, overlapping by a quarter of it, ``--upscale-strength``, the same steps
and seed) twice: with the layout's subjects
(each routed to its region in every tile) and, as the control, with the same subjects at scale 0
(their branches add nothing: the prompt alone re-draws the tiles). The metrics are taken on the
native image (before) and on each upscaled image averaged back to 64 px (after: Pillow's box
filter, an exact mean of each scale x scale block), since the metrics' regions and colour classes
are the world's 64 px ones.

Writes to --out-dir (default benchmarks/results): quality_<machine>_<commit>.csv (one row per
box), ..._summary.csv (mean per mode and set), ..._summary.txt (the table and conditions),
..._grid.png (samples: one row per layout, one column per mode) and ..._bars.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anyms.toy import DEFAULT_GUIDANCE  # noqa: E402  (torch-free: the world's defaults and paths)
from benchmarks._env import git_commit, machine_name  # noqa: E402

METRICS = ("owner", "presence", "shape", "leakage", "similarity")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:40]


CSV_FIELDS = ["mode", "scale", "kind", "layout", "seed", "subject", "colour", "shape_name", "owner", "presence",
              "shape", "similarity", "leakage", "region_pixels"]


def write_rows(path: str, rows) -> None:
    """One CSV row per box (the modes' run and the upscale's share the columns)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=None, help="a world folder (default: the shipped weights)")
    p.add_argument("--layouts", type=int, default=8, help="layouts per set (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per layout (default 0 1 2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"default {DEFAULT_GUIDANCE:g}: the toy world's own (anyms.toy.DEFAULT_GUIDANCE)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0],
                   help="the overwrite subject-scale sweep (on the disjoint and partial sets)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--quick", action="store_true", help="2 layouts per set, 1 seed, 8 steps, scales 1 and 2")
    p.add_argument("--upscale", type=int, choices=(2, 4), default=None,
                   help="measure a tiled upscale instead of the modes (see above)")
    p.add_argument("--upscale-strength", type=float, default=0.3, help="the upscale's img2img strength (default 0.3)")
    p.add_argument("--upscale-tile", type=int, default=None,
                   help="the tile's side in pixels of the output (default the world's 64; overlap a quarter of it)")
    args = p.parse_args(argv)
    if args.quick:
        args.layouts, args.seeds, args.steps, args.scales = 2, [0], 8, [1.0, 2.0]
    for name in ("layouts", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(not s >= 0 for s in args.scales):
        p.error(f"--scales must be >= 0, got {args.scales}")
    if args.world is not None and not os.path.isfile(os.path.join(args.world, "model_index.json")):
        p.error(f"--world: no model_index.json in {args.world!r}")
    return args


def summarize(rows, leak_rows):
    """Mean of each metric over the rows (shape over the rows where it was judged)."""
    out = {"boxes": len(rows)}
    for m in ("owner", "presence", "similarity"):
        out[m] = float(np.mean([r[m] for r in rows])) if rows else float("nan")
    shapes = [r["shape"] for r in rows if r["shape"] != ""]
    out["shape"] = float(np.mean(shapes)) if shapes else float("nan")
    out["leakage"] = float(np.mean([r["leakage"] for r in leak_rows])) if leak_rows else float("nan")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from anyms.toy import WEIGHTS_DIR, toy_pipeline
    from anyms.toy import evaluate as ev

    t_start = time.time()
    world = args.world or WEIGHTS_DIR
    pipe = toy_pipeline(world)
    classifier, clean = ev.train_shape_classifier(seed=0, steps=100 if args.quick else 300)
    encoder = ev.image_encoder_fn(pipe)
    rng = np.random.default_rng([0, 21])
    layouts = [lay for kind in ev.LAYOUT_KINDS for lay in ev.sample_layouts(rng, args.layouts, kind)]
    if args.upscale:
        return upscale_run(args, pipe, layouts, classifier, clean, encoder, world, t_start)

    rows, images = [], {}       # rows: one per box; images[(mode, scale, layout index)] = first seed's image

    def run(mode, scale, li, layout):
        ims = ev.generate(pipe, layout, mode, seeds=args.seeds, steps=args.steps, guidance=args.guidance, scale=scale)
        images[(mode, scale, li)] = ims[0]
        for seed, im in zip(args.seeds, ims):
            for r in ev.box_metrics(im, layout, classifier, encoder):
                r.update(mode=mode, scale=scale, kind=layout.kind, layout=li, seed=seed,
                         shape="" if r["shape"] is None else int(r["shape"]),
                         owner=int(r["owner"]), present=int(r["present"]))
                r["presence"] = r.pop("present")
                rows.append(r)

    for li, layout in enumerate(layouts):
        for mode in ev.MODES:
            run(mode, 1.0, li, layout)
        if layout.kind != "large_overlap":
            for scale in args.scales:
                if scale != 1.0:
                    run("overwrite", scale, li, layout)
        print(f"layout {li + 1}/{len(layouts)} ({layout.kind}) done, {time.time() - t_start:.0f} s", flush=True)

    machine = machine_name("cpu")
    commit = git_commit()
    stem = os.path.join(args.out_dir, f"quality{'_quick' if args.quick else ''}_{_slug(machine)}_{commit}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_rows(stem + ".csv", rows)

    def select(mode, scale=1.0, kinds=ev.LAYOUT_KINDS):
        sel = [r for r in rows if r["mode"] == mode and r["scale"] == scale and r["kind"] in kinds]
        per_image = {(r["layout"], r["seed"]): r for r in sel}      # leakage is per image
        return summarize(sel, list(per_image.values()))

    table = []
    for mode in ev.MODES:
        for kinds, label in ((ev.LAYOUT_KINDS, "all"),) + tuple(((k,), k) for k in ev.LAYOUT_KINDS):
            table.append(dict(mode=mode, scale=1.0, set=label, **select(mode, 1.0, kinds)))
    for scale in args.scales:
        table.append(dict(mode="overwrite", scale=scale, set="disjoint+partial",
                          **select("overwrite", scale, ("disjoint", "partial"))))
    with open(stem + "_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mode", "scale", "set", "boxes", *METRICS])
        w.writeheader()
        w.writerows(table)

    elapsed = time.time() - t_start
    lines = [f"toy-world layout quality: {world}",
             f"machine {machine}, torch threads {args.threads}, commit {commit}, {args.steps} steps, guidance "
             f"{args.guidance}, seeds {args.seeds}, {args.layouts} layouts per set, {elapsed / 60:.1f} min",
             f"shape classifier accuracy on clean generator data: {clean:.3f} (chance 0.25)",
             "", "| mode | scale | set | boxes | " + " | ".join(METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for t in table:
        lines.append(f"| {t['mode']} | {t['scale']:g} | {t['set']} | {t['boxes']} | "
                     + " | ".join(f"{t[m]:.3f}" for m in METRICS) + " |")
    text = "\n".join(lines)
    with open(stem + "_summary.txt", "w") as f:
        f.write(text + "\n")
    print(text)
    _grid(images, layouts, stem + "_grid.png", pipe)
    _bars(table, stem + "_bars.png", ev.MODES)
    print(f"wrote {stem}.csv, _summary.csv, _summary.txt, _grid.png, _bars.png")
    return 0


UPSCALE_VARIANTS = ("before", "upscaled", "upscaled_text_only")


def upscale_run(args, pipe, layouts, classifier, clean, encoder, world_folder, t_start) -> int:
    """The --upscale run (module docstring): the metrics before and after the tiled upscale."""
    from PIL import Image

    import anyms
    from anyms.toy import reference
    from anyms.toy import evaluate as ev
    from anyms.toy import world

    size = world.IMAGE_SIZE
    tile = args.upscale_tile or size
    overlap = tile // 4
    rows, samples = [], []

    def measure(variant, image, li, layout, seed):
        for r in ev.box_metrics(image, layout, classifier, encoder):
            r.update(mode=variant, scale=args.upscale, kind=layout.kind, layout=li, seed=seed,
                     shape="" if r["shape"] is None else int(r["shape"]), owner=int(r["owner"]),
                     present=int(r["present"]))
            r["presence"] = r.pop("present")
            rows.append(r)

    for li, layout in enumerate(layouts):
        natives = ev.generate(pipe, layout, "overwrite", seeds=args.seeds, steps=args.steps, guidance=args.guidance)
        refs = [reference(s.colour, s.shape) for s in layout.subjects]
        for seed, native in zip(args.seeds, natives):
            measure("before", native, li, layout, seed)
            row = [native]
            for variant, subject_scale in (("upscaled", 1.0), ("upscaled_text_only", 0.0)):
                subjects = [anyms.Subject(r, box=s.box, scale=subject_scale) for r, s in zip(refs, layout.subjects)]
                big = anyms.tiled_upscale(pipe, Image.fromarray(native), layout.prompt, subjects=subjects,
                                          scale=args.upscale, tile=tile, overlap=overlap,
                                          strength=args.upscale_strength, num_inference_steps=args.steps,
                                          guidance_scale=args.guidance, seed=seed).images[0]
                assert big.size == (size * args.upscale, size * args.upscale)
                measure(variant, np.asarray(big.resize((size, size), Image.BOX)), li, layout, seed)
                row.append(np.asarray(big))
            if seed == args.seeds[0]:
                samples.append((li, row))
        print(f"layout {li + 1}/{len(layouts)} ({layout.kind}) done, {time.time() - t_start:.0f} s", flush=True)

    machine = machine_name("cpu")
    commit = git_commit()
    strength = "" if args.upscale_strength == 0.3 else f"_s{args.upscale_strength:g}"
    strength += "" if tile == size else f"_t{tile}"
    stem = os.path.join(args.out_dir, f"quality_upscale{args.upscale}{strength}{'_quick' if args.quick else ''}_"
                                      f"{_slug(machine)}_{commit}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_rows(stem + ".csv", rows)
    table = []
    for variant in UPSCALE_VARIANTS:
        for kinds, label in ((ev.LAYOUT_KINDS, "all"),) + tuple(((k,), k) for k in ev.LAYOUT_KINDS):
            sel = [r for r in rows if r["mode"] == variant and r["kind"] in kinds]
            per_image = {(r["layout"], r["seed"]): r for r in sel}
            table.append(dict(variant=variant, set=label, **summarize(sel, list(per_image.values()))))
    # how often a box's owner verdict is the same before and after (the same native image)
    before = {(r["layout"], r["seed"], r["subject"]): r["owner"] for r in rows if r["mode"] == "before"}
    kept = {v: float(np.mean([r["owner"] == before[(r["layout"], r["seed"], r["subject"])]
                              for r in rows if r["mode"] == v])) for v in UPSCALE_VARIANTS[1:]}
    elapsed = time.time() - t_start
    lines = [f"toy-world layout quality after a {args.upscale}x tiled upscale: {world_folder}",
             f"machine {machine}, torch threads {args.threads}, commit {commit}, {args.steps} steps, guidance "
             f"{args.guidance}, seeds {args.seeds}, {args.layouts} layouts per set, upscale strength "
             f"{args.upscale_strength}, tile {tile} px, overlap {overlap} px (of the output), {elapsed / 60:.1f} min",
             f"shape classifier accuracy on clean generator data: {clean:.3f} (chance 0.25)",
             "after: the upscaled image averaged back to the world's 64 px (box filter)",
             "", "| image | set | boxes | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for t in table:
        lines.append(f"| {t['variant']} | {t['set']} | {t['boxes']} | " + " | ".join(f"{t[m]:.3f}" for m in METRICS)
                     + " |")
    lines += ["", "owner verdict unchanged from before (per box): "
              + ", ".join(f"{v} {kept[v]:.3f}" for v in kept)]
    text = "\n".join(lines)
    with open(stem + "_summary.txt", "w") as f:
        f.write(text + "\n")
    print(text)
    _upscale_grid(samples, layouts, stem + "_grid.png", args.upscale)
    print(f"wrote {stem}.csv, _summary.txt, _grid.png")
    return 0


def _upscale_grid(samples, layouts, path, scale, per_kind: int = 2):
    """One row per layout (``per_kind`` of each set): before (nearest-neighbour), upscaled, text-only control."""
    from PIL import Image, ImageDraw

    from anyms.toy import evaluate as ev
    from anyms.toy import world

    picked = []
    for kind in ev.LAYOUT_KINDS:
        picked += [s for s in samples if layouts[s[0]].kind == kind][:per_kind]
    side = world.IMAGE_SIZE * scale
    pad, head = 4, 14
    canvas = Image.new("RGB", (3 * (side + pad) + pad, len(picked) * (side + pad) + pad + head), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(UPSCALE_VARIANTS):
        draw.text((pad + c * (side + pad), 1), name, fill="black")
    for r, (li, row) in enumerate(picked):
        for c, im in enumerate(row):
            im = Image.fromarray(im).resize((side, side), Image.NEAREST)
            d = ImageDraw.Draw(im)
            for s in layouts[li].subjects:
                x0, y0, x1, y1 = (v * side for v in s.box)
                d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=world.PALETTE[s.colour], width=1)
            canvas.paste(im, (pad + c * (side + pad), head + pad + r * (side + pad)))
    canvas.save(path)


def _grid(images, layouts, path, pipe, per_kind: int = 2, zoom: int = 3):
    """One row per layout (``per_kind`` of each set), one column per mode; the boxes drawn on each image."""
    from PIL import Image, ImageDraw

    from anyms.toy import evaluate as ev
    from anyms.toy import world

    picked = []
    for kind in ev.LAYOUT_KINDS:
        picked += [i for i, lay in enumerate(layouts) if lay.kind == kind][:per_kind]
    side = world.IMAGE_SIZE * zoom
    pad, head = 4, 14
    canvas = Image.new("RGB", (len(ev.MODES) * (side + pad) + pad, len(picked) * (side + pad) + pad + head), "white")
    draw = ImageDraw.Draw(canvas)
    for c, mode in enumerate(ev.MODES):
        draw.text((pad + c * (side + pad), 1), mode, fill="black")
    for r, li in enumerate(picked):
        for c, mode in enumerate(ev.MODES):
            im = Image.fromarray(images[(mode, 1.0, li)]).resize((side, side), Image.NEAREST)
            d = ImageDraw.Draw(im)
            for s in layouts[li].subjects:
                x0, y0, x1, y1 = (v * side for v in s.box)
                d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=world.PALETTE[s.colour], width=1)
            canvas.paste(im, (pad + c * (side + pad), head + pad + r * (side + pad)))
    canvas.save(path)


def _bars(table, path, modes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {t["mode"]: t for t in table if t["set"] == "all"}
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ax.bar(np.arange(len(METRICS)) + i * width, [rows[mode][m] for m in METRICS], width, label=mode)
    ax.set_xticks(np.arange(len(METRICS)) + 0.4 - width / 2)
    ax.set_xticklabels(METRICS)
    ax.set_ylim(0, 1)
    ax.set_title("toy world: layout control per mode (all layouts, scale 1)")
    ax.legend(fontsize=7, ncol=len(modes))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
