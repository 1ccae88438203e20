"""``anyms demo`` on the toy world: three subjects in their regions, with the layout and routing pictures."""
from __future__ import annotations

import os
import time

__all__ = ["DEMO_SUBJECTS", "toy_demo"]

# (colour, shape, box or None for the mask below); later ones on top.
DEMO_SUBJECTS = (("red", "circle", (0.04, 0.06, 0.48, 0.5)),
                 ("blue", "cross", (0.52, 0.08, 0.96, 0.52)),
                 ("green", "triangle", None))
_TRIANGLE = ((0.5, 0.5), (0.8, 0.97), (0.2, 0.97))   # the green triangle's region: a triangular mask


def toy_demo(args, write_pictures) -> int:
    """Write image.png, layout.png, routing.png and the subject references into ``args.out_dir``."""
    import torch

    from ..cli import triangle_mask
    from ..pipeline import Subject
    from . import DEFAULT_GUIDANCE, WEIGHTS_DIR, prompt_for, reference, toy_pipeline

    os.makedirs(args.out_dir, exist_ok=True)
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
        for colour, shape, box in DEMO_SUBJECTS:
            path = os.path.join(args.out_dir, f"subject_{colour}_{shape}.png")
            reference(colour, shape).save(path)
            mask = None
            if box is None:
                mask = os.path.join(args.out_dir, f"mask_{colour}_{shape}.png")
                triangle_mask(args.size, *_TRIANGLE).save(mask)
            subjects.append(Subject(path, box, 1.0, f"{colour} {shape}", mask=mask))
        prompt = prompt_for((c, s) for c, s, _ in DEMO_SUBJECTS)
        t1 = time.perf_counter()
        image = pipe(prompt, subjects=subjects, anyms_mode=args.mode, height=args.size, width=args.size,
                     num_inference_steps=args.steps, guidance_scale=DEFAULT_GUIDANCE,
                     generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    paths = tuple(os.path.join(args.out_dir, name) for name in ("image.png", "layout.png", "routing.png"))
    write_pictures(pipe, image, paths)
    print(f"prompt: {prompt!r}; {len(subjects)} subjects (2 boxes, 1 mask), {args.mode} mode, "
          f"{args.size}x{args.size}, {args.steps} steps")
    print(f"loaded the toy world in {t1 - t0:.1f} s, generated in {t2 - t1:.1f} s")
    print(f"image:                   {os.path.abspath(paths[0])}")
    print(f"layout overlay:          {os.path.abspath(paths[1])}")
    print(f"routing (per level):     {os.path.abspath(paths[2])}")
    print(f"subject images, mask:    {os.path.abspath(args.out_dir)}/subject_*.png, mask_*.png")
    return 0
