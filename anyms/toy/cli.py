"""``anyms toy``: train, export and evaluate the toy world.

    anyms toy train --out runs/toy [--steps 1300] [--multi-steps 900] [--seed 0] [--threads 1]   # resumable
    anyms toy train --out runs/more --init-from anyms/toy/weights   # only the multi-reference stage
    anyms toy export --checkpoint runs/toy/checkpoint.pt --out my_world
    anyms toy evaluate [--world FOLDER] [--layouts 10] [--seeds 0 1] [--steps 20]

Bad options are one line on stderr and exit status 2, before any model work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = _Parser(prog="anyms toy", description="The toy world: flat coloured shapes on grey, trained here.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train = sub.add_parser("train", help="train a world from scratch (resumable: run again to continue)")
    train.add_argument("--out", required=True, help="the run's folder: checkpoint.pt and the exported world/")
    for name, value in asdict(TrainConfig()).items():
        train.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                           help=f"(default {value})")
    train.add_argument("--init-from", default=None, metavar="WORLD",
                       help="start a new run at the multi-reference stage from a world folder's weights "
                            "(e.g. the shipped ones), skipping the first stage")
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are small)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="a progress bar (default on; off: one log line every 10 steps)")

    export = sub.add_parser("export", help="write a checkpoint's averaged (EMA) weights as a loadable world folder")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True, help="a new folder (an existing one is refused)")

    ev = sub.add_parser("evaluate", help="owner / presence / shape / leakage on random layouts (AnyMS overwrite)")
    ev.add_argument("--world", default=None, help="a world folder (default: the shipped weights)")
    ev.add_argument("--layouts", type=int, default=10, help="layouts per kind (default 10)")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--mode", default="overwrite", choices=("overwrite", "sum"))
    ev.add_argument("--threads", type=int, default=1)
    return parser


def _usage(message: str) -> int:
    print(f"anyms toy: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.command == "train":
        from .train import TrainConfig, train

        cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
        for name in ("steps", "batch", "vae_steps", "vae_batch", "checkpoint_every", "threads"):
            value = getattr(args, name, None)
            if value is None:
                value = getattr(cfg, name)
            if value < 1 and not (name == "vae_steps" and value == 0):
                return _usage(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if cfg.multi_steps < 0 or cfg.multi_warmup < 0:
            return _usage("--multi-steps and --multi-warmup must be at least 0")
        if args.init_from is not None:
            if not os.path.isfile(os.path.join(args.init_from, "model_index.json")):
                return _usage(f"--init-from: no model_index.json in {args.init_from!r}")
            if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
                return _usage(f"--init-from: {args.out!r} already holds a checkpoint.pt; give a new --out")
        for name in ("lr", "vae_lr", "multi_lr"):
            if not getattr(cfg, name) > 0:
                return _usage(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
        if not 0 <= cfg.ema_decay < 1:
            return _usage(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
        torch.set_num_threads(args.threads)
        log = (lambda m: None) if args.progress else (lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
        try:
            if args.init_from is not None:
                from .train import start_from_world

                start_from_world(args.init_from, args.out, cfg)
            folder = train(args.out, cfg, log=log, progress=args.progress)
        except ValueError as e:   # a checkpoint written with other options
            return _usage(str(e))
        print(f"world: {os.path.abspath(folder)}")
        return 0
    if args.command == "export":
        from .train import export_checkpoint

        if not os.path.isfile(args.checkpoint):
            return _usage(f"--checkpoint: no file at {args.checkpoint!r}")
        if os.path.exists(args.out):
            return _usage(f"--out: {args.out!r} exists; give a new folder")
        export_checkpoint(args.checkpoint, args.out)
        print(f"world: {os.path.abspath(args.out)}")
        return 0
    # evaluate
    for name in ("layouts", "steps", "threads"):
        if getattr(args, name) < 1:
            return _usage(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.world is not None and not os.path.isfile(os.path.join(args.world, "model_index.json")):
        return _usage(f"--world: no model_index.json in {args.world!r}")
    torch.set_num_threads(args.threads)
    from .evaluate import summarize_layouts

    summary = summarize_layouts(args.world, layouts=args.layouts, seeds=args.seeds, steps=args.steps, mode=args.mode)
    for key, value in summary.items():
        print(f"{key:>12}: {value:.3f}" if isinstance(value, float) else f"{key:>12}: {value}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
