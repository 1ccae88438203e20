"""``anyms demo``: the whole AnyMS pipeline offline, on the trained toy world (default) or on a tiny
model built in code with random weights (``--model tiny`` or ``--arch``)."""
from __future__ import annotations

import contextlib
import os
import time

from .errors import UsageError
from .job import check_outputs, folder_lock, write_pictures

__all__ = ["cmd_demo", "demo_subject_images", "triangle_mask", "check_demo_args", "demo_outputs"]


def demo_subject_images(size: int = 96):
    """Three simple, recognisable subject images drawn in code (a ball, a box, a cone)."""
    from PIL import Image, ImageDraw

    def canvas():
        im = Image.new("RGB", (size, size), (235, 235, 225))
        return im, ImageDraw.Draw(im)

    m = size // 8
    ball, d = canvas()
    d.ellipse([m, m, size - m, size - m], fill=(210, 40, 40))
    box, d = canvas()
    d.rectangle([m, 2 * m, size - m, size - m], fill=(40, 80, 210))
    cone, d = canvas()
    d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=(40, 170, 60))
    return [("red ball", ball), ("blue box", box), ("green cone", cone)]


def triangle_mask(size: int, *corners):
    """A ``size x size`` mask image (mode "L", 255 inside) of the triangle with normalised ``corners``."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).polygon([(x * size, y * size) for x, y in corners], fill=255)
    return im


def cmd_demo(args) -> int:
    import torch

    # The tiny model's matrices are too small for threads to help: on 2 busy cores, two
    # threads made the demo 40x slower (synchronisation), so it runs on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args) -> int:
    model = getattr(args, "model", None)
    arch = getattr(args, "arch", None)
    if model == "toy" and arch is not None:
        raise UsageError(f"--arch {arch}: the toy world is one model; --arch picks the --model tiny shape")
    with contextlib.ExitStack() as held:        # the output folder's lock, once taken, until the files are written
        if model == "toy" or (model is None and arch is None):
            args.steps = 20 if args.steps is None else args.steps
            args.size = 64 if args.size is None else args.size
            check_demo_args(args, flux=False)
            return _toy_demo(args, held)
        args.arch = arch or "sdxl"
        args.steps = 8 if args.steps is None else args.steps
        args.size = 256 if args.size is None else args.size
        return _tiny_demo(args, held)


def check_demo_args(args, flux: bool) -> None:
    if args.size < 8 or args.size % 8:
        raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
    if flux and args.size % 16:
        raise UsageError(f"--size must be a multiple of 16 for FLUX (it packs the latent 2x2), got {args.size}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")


def demo_outputs(out_dir: str, subject_names, mask_name: str, overwrite: bool, held: contextlib.ExitStack):
    """The demo's files (image, layout and routing pictures; subject and mask paths), checked like
    generate's before any model is built: the folder made and proven writable, nothing replaced
    without --overwrite. The folder's lock (one writer per folder, as ``anyms generate``'s) is
    taken into ``held`` and checked again under it: the caller holds it until its files are written."""
    subject_paths = [os.path.join(out_dir, f"subject_{name}.png") for name in subject_names]
    mask_path = os.path.join(out_dir, f"mask_{mask_name}.png")
    paths = tuple(os.path.join(out_dir, name) for name in ("image.png", "layout.png", "routing.png"))
    every = [*paths, *subject_paths, mask_path]
    check_outputs(every, overwrite, what="--out-dir")          # makes the folder, which holds the lock
    held.enter_context(folder_lock(every, "--out-dir"))
    check_outputs(every, overwrite, what="--out-dir")          # again, now that no other run writes there
    return paths, subject_paths, mask_path


def _tiny_demo(args, held: contextlib.ExitStack) -> int:
    import torch

    from .outputs import OutputError, atomic_save
    from .pipeline import AnyMSStableDiffusionXLPipeline, Subject
    from .tiny import tiny_pipeline

    flux = args.arch == "flux"
    check_demo_args(args, flux)
    out_dir = args.out_dir
    overwrite = getattr(args, "overwrite", False)
    drawn = demo_subject_images()
    paths, subject_paths, mask_path = demo_outputs(out_dir, [label.replace(" ", "_") for label, _ in drawn],
                                                   drawn[2][0].replace(" ", "_"), overwrite, held)
    print(f"anyms demo: a tiny {'FLUX.1' if flux else 'SDXL'}-shaped model built in code, with RANDOM weights "
          f"(nothing is downloaded).")
    print("The image is therefore noise-like: the demo shows that the whole AnyMS pipeline runs, and what the")
    print("layout and the per-subject routing look like, not image quality. Use `anyms generate` with real weights.")
    t0 = time.perf_counter()
    if flux:
        from .flux import AnyMSFluxPipeline
        from .tiny_flux import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(AnyMSFluxPipeline, seed=args.seed)
    else:
        pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=False, seed=args.seed)
    pipe.set_progress_bar_config(disable=False, desc="denoising")
    # Two boxes and a mask: the cone's region is a triangle (its mask file is written beside
    # the subjects), overlapping both boxes; later subjects are on top.
    boxes = [(0.05, 0.35, 0.55, 0.95), (0.4, 0.1, 0.95, 0.7), None]
    subjects = []
    try:
        for (label, image), box, path in zip(drawn, boxes, subject_paths):
            atomic_save(image, path, overwrite=overwrite)
            mask = None
            if box is None:
                mask = mask_path
                atomic_save(triangle_mask(args.size, (0.45, 0.4), (0.68, 0.92), (0.22, 0.92)), mask,
                            overwrite=overwrite)
            subjects.append(Subject(path, box, 1.0, label, mask=mask))
    except OutputError as e:
        raise UsageError(str(e)) from None
    prompt = "a red ball, a blue box and a green cone on a table"
    t1 = time.perf_counter()
    image = pipe(prompt, subjects=subjects, anyms_mode=args.mode, height=args.size, width=args.size,
                 num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
    t2 = time.perf_counter()
    write_pictures(pipe, image, paths, overwrite=overwrite)
    print(f"prompt: {prompt!r}; {len(subjects)} subjects (2 boxes, 1 mask), {args.mode} mode, {args.size}x{args.size}, "
          f"{args.steps} steps")
    print(f"built the tiny model in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s")
    print(f"image (random weights):  {os.path.abspath(paths[0])}")
    print(f"layout overlay:          {os.path.abspath(paths[1])}")
    print(f"routing (per level):     {os.path.abspath(paths[2])}")
    print(f"subject images, mask:    {os.path.abspath(out_dir)}/subject_*.png, mask_*.png")
    return 0


# (colour, shape, box or None for the mask below); later ones on top.
TOY_DEMO_SUBJECTS = (("red", "circle", (0.04, 0.06, 0.48, 0.5)),
                     ("blue", "cross", (0.52, 0.08, 0.96, 0.52)),
                     ("green", "triangle", None))
_TOY_TRIANGLE = ((0.5, 0.5), (0.8, 0.97), (0.2, 0.97))   # the green triangle's region: a triangular mask


def _toy_demo(args, held: contextlib.ExitStack) -> int:
    """Write image.png, layout.png, routing.png and the subject references into ``args.out_dir``,
    replacing nothing without ``args.overwrite`` (checked before the model loads)."""
    import torch

    from .outputs import OutputError, atomic_save
    from .pipeline import Subject
    from .toy import DEFAULT_GUIDANCE, WEIGHTS_DIR, prompt_for, reference, toy_pipeline

    overwrite = getattr(args, "overwrite", False)
    mask_name = next(f"{c}_{s}" for c, s, box in TOY_DEMO_SUBJECTS if box is None)
    paths, subject_paths, mask_path = demo_outputs(args.out_dir, [f"{c}_{s}" for c, s, _ in TOY_DEMO_SUBJECTS],
                                                   mask_name, overwrite, held)
    print("anyms demo: the toy world, a small model trained here on coloured shapes on grey (shipped with anyms, "
          "nothing is downloaded).")
    print("Each subject is a reference image (the shape centred on grey); AnyMS puts it in its box or mask.")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # the models are too small for threads to help
    try:
        pipe = toy_pipeline(WEIGHTS_DIR)
        pipe.set_progress_bar_config(disable=False, desc="denoising")
        subjects = []
        try:
            for (colour, shape, box), path in zip(TOY_DEMO_SUBJECTS, subject_paths):
                atomic_save(reference(colour, shape), path, overwrite=overwrite)
                mask = None
                if box is None:
                    mask = mask_path
                    atomic_save(triangle_mask(args.size, *_TOY_TRIANGLE), mask, overwrite=overwrite)
                subjects.append(Subject(path, box, 1.0, f"{colour} {shape}", mask=mask))
        except OutputError as e:
            raise UsageError(str(e)) from None
        prompt = prompt_for((c, s) for c, s, _ in TOY_DEMO_SUBJECTS)
        t1 = time.perf_counter()
        image = pipe(prompt, subjects=subjects, anyms_mode=args.mode, height=args.size, width=args.size,
                     num_inference_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                     generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    write_pictures(pipe, image, paths, overwrite=overwrite)
    print(f"prompt: {prompt!r}; {len(subjects)} subjects (2 boxes, 1 mask), {args.mode} mode, "
          f"{args.size}x{args.size}, {args.steps} steps")
    print(f"loaded the toy world in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s")
    print(f"image:                   {os.path.abspath(paths[0])}")
    print(f"layout overlay:          {os.path.abspath(paths[1])}")
    print(f"routing (per level):     {os.path.abspath(paths[2])}")
    print(f"subject images, mask:    {os.path.abspath(args.out_dir)}/subject_*.png, mask_*.png")
    return 0
