"""Train the toy world from scratch: first its VAE, then the U-Net, text encoder, image encoder and IP-Adapter.

    python -m anyms toy train --out runs/toy            # resumes from runs/toy/checkpoint.pt if present

Seeded and resumable: the batch of step ``n`` is drawn from ``numpy.random.default_rng([seed, n])``
and its noise from a torch generator seeded by ``(seed, n)``, so a run resumed from a checkpoint
draws the same data as one that never stopped. Every ``--checkpoint-every`` steps the state
(models, EMA, optimiser) is written to ``checkpoint.pt`` and the EMA weights are exported as a
loadable world to ``OUT/world`` (fp16 safetensors, see :func:`anyms.toy.models.save_world`).

What the U-Net sees (no layout training: boxes never appear in training):

- 45%: one object at a random place, its reference image in the IP-Adapter branch, and its
  caption ("red circle") or, 40% of those, an empty caption, so that the reference alone must
  carry colour and shape;
- 15%: a scene of 2-4 objects, its caption, and the reference of one of its objects;
- 30%: a scene of 1-4 objects with its caption and no reference (a zero image embedding);
- 10%: any scene with neither (classifier-free guidance).

Then a second stage of ``--multi-steps`` steps (the *multi-reference* stage) teaches the image
branch to bind each reference to its own object, which is what AnyMS's regional routing relies
on: it starts from the averaged (EMA) weights of the first stage with a fresh optimiser, and each
step draws one reference count k (1: 50%, 2: 30%, 3: 20%) for its whole batch:

- 70%: a scene of k objects (one object: the large size range) with the references of all k, in
  a shuffled order, as k x 4 image tokens in one attention (as diffusers gives several images of
  one adapter), and its caption or, 25% of those, an empty caption;
- 20%: a scene of 1-4 objects with its caption and no reference;
- 10%: neither.

No box is seen here either: every reference applies to the whole image, and the model must
learn from the pixels which of them each object is. (Scenes where a reference stands beside
unreferenced objects of other colours are left out of this stage: there, the image branch
says nothing about the colour at a place.)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import models, world

__all__ = ["TrainConfig", "train"]


@dataclass
class TrainConfig:
    steps: int = 1300             # U-Net steps
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.998
    vae_steps: int = 500
    vae_batch: int = 24
    vae_lr: float = 2e-3
    seed: int = 0
    checkpoint_every: int = 100
    min_snr_gamma: float = 5.0
    multi_steps: int = 900        # the multi-reference stage (see the module docstring)
    multi_lr: float = 3e-4
    multi_warmup: int = 30


# ------------------------------------------------------------------------- batches
def _to_tensor(images) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def vae_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    return _to_tensor([world.render_scene(world.sample_scene(rng, int(rng.integers(1, 5)))) for _ in range(n)])


def unet_batch(rng: np.random.Generator, n: int):
    """(images, captions, references or None) for one U-Net step; see the module docstring."""
    images, captions, references = [], [], []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            scene = world.sample_scene(rng, 1)
            reference = world.render_reference(scene[0], rng=rng)
            text = world.caption(scene) if rng.random() < 0.6 else ""
        elif r < 0.60:
            scene = world.sample_scene(rng, int(rng.integers(2, 5)))
            reference = world.render_reference(scene[int(rng.integers(len(scene)))], rng=rng)
            text = world.caption(scene)
        elif r < 0.90:
            scene = world.sample_scene(rng, int(rng.integers(1, 5)))
            reference, text = None, world.caption(scene)
        else:
            scene = world.sample_scene(rng, int(rng.integers(1, 5)))
            reference, text = None, ""
        images.append(world.render_scene(scene))
        captions.append(text)
        references.append(reference)
    return _to_tensor(images), captions, references


MULTI_COUNTS = (1, 2, 3)
MULTI_COUNT_P = (0.5, 0.3, 0.2)


def multi_batch(rng: np.random.Generator, n: int):
    """(images, captions, references) for one step of the multi-reference stage.

    ``references[i]`` is a list of k reference images (all samples of the batch share k) or
    None for no reference.
    """
    k = int(rng.choice(MULTI_COUNTS, p=MULTI_COUNT_P))
    images, captions, references = [], [], []
    for _ in range(n):
        r = rng.random()
        if r < 0.70:
            scene = world.sample_scene(rng, k)
            refs = [world.render_reference(scene[int(j)], rng=rng) for j in rng.permutation(k)]
            text = world.caption(scene) if rng.random() >= 0.25 else ""
        elif r < 0.90:
            scene = world.sample_scene(rng, int(rng.integers(1, 5)))
            refs, text = None, world.caption(scene)
        else:
            scene = world.sample_scene(rng, int(rng.integers(1, 5)))
            refs, text = None, ""
        images.append(world.render_scene(scene))
        captions.append(text)
        references.append(refs)
    return _to_tensor(images), captions, references


def _batch(cfg: "TrainConfig", step: int):
    """The batch of global step ``step``: the first stage's (as a list of one reference or None) or the second's."""
    rng = np.random.default_rng([cfg.seed, 3, step])
    if step >= cfg.steps:
        return multi_batch(rng, cfg.batch)
    images, captions, references = unet_batch(rng, cfg.batch)
    return images, captions, [None if r is None else [r] for r in references]


class _EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.modules = modules
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    def reset_to_average(self):
        """Load the averaged weights into the live ones (the shadow then equals them)."""
        for s, p in zip(self.shadow, self.params):
            p.data.copy_(s)

    def swap(self):
        """Exchange the live and the averaged weights (call twice to undo)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.data.copy_(s)
            s.copy_(tmp)


_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "multi_steps")


def _lr(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine down to a tenth, in each stage."""
    if step >= cfg.steps:
        s = step - cfg.steps
        if s < cfg.multi_warmup:
            return cfg.multi_lr * (s + 1) / cfg.multi_warmup
        t = (s - cfg.multi_warmup) / max(1, cfg.multi_steps - cfg.multi_warmup)
        return cfg.multi_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
    return cfg.lr * _lr_factor(step, cfg)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -------------------------------------------------------------------------- stages
def train_vae(vae, cfg: TrainConfig, log) -> float:
    """Train the VAE on the world's images; returns the latent scaling factor (1 / latent std)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        rng = np.random.default_rng([cfg.seed, 1, step])
        x = vae_batch(rng, cfg.vae_batch)
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / cfg.vae_steps))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
            recon = vae.decode(z).sample
        rec = F.mse_loss(recon.float(), x) + 0.5 * F.l1_loss(recon.float(), x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} rec {rec.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        x = vae_batch(np.random.default_rng([cfg.seed, 2]), 128)
        z = vae.encode(x).latent_dist.mean
        err = F.mse_loss(vae.decode(z).sample, x).item()
    scale = float(1.0 / z.std())
    log(f"vae done: held-out reconstruction MSE {err:.5f}, latent std {z.std().item():.3f}")
    return scale


def train(out_dir: str, cfg: Optional[TrainConfig] = None, log=print, progress: bool = True) -> str:
    """Train (or resume) a world in ``out_dir``; return the exported world folder ``out_dir/world``."""
    cfg = cfg or TrainConfig()
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    world_dir = os.path.join(out_dir, "world")

    torch.manual_seed(cfg.seed)
    vae, unet = models.build_vae(), models.build_unet()
    text_encoder, image_encoder = models.build_text_encoder(), models.build_image_encoder()
    models.install_ip_adapter(unet, seed=cfg.seed)
    tokenizer, processor = models.build_tokenizer(), models.build_image_processor()
    trained = [unet, text_encoder, image_encoder]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = _EMA(trained, cfg.ema_decay)
    start = 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        # --steps and --checkpoint-every may change on resume (to extend or shorten a run: the
        # learning-rate schedule follows the new total); any other option must be the same.
        fixed = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}
        saved = {k: v for k, v in state["config"].items() if k not in _RESUMABLE_CHANGES}
        if saved != fixed:
            diff = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {v})" for k, v in fixed.items()
                             if saved.get(k) != v)
            raise ValueError(f"--out: {ckpt_path} was written with other options: {diff}; "
                             f"use another --out or the same options")
        if state["step"] > state["config"]["steps"] and cfg.steps != state["config"]["steps"]:
            # the first stage is over: its length is where the second stage's schedule starts
            raise ValueError(f"--out: {ckpt_path} is in the multi-reference stage (step {state['step']}); "
                             f"--steps must stay {state['config']['steps']} (now {cfg.steps})")
        vae.load_state_dict(state["vae"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])   # (config attributes do not save)
        for m, sd in zip(trained, state["models"]):
            m.load_state_dict(sd)
        opt.load_state_dict(state["opt"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        start = state["step"]
        log(f"resumed from {ckpt_path} at step {start}")
    else:
        vae.register_to_config(scaling_factor=train_vae(vae, cfg, log))
        _checkpoint(ckpt_path, cfg, vae, trained, opt, ema, 0)
    vae.eval().requires_grad_(False)
    sched = models.build_train_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)

    total = cfg.steps + cfg.multi_steps
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc="toy world", dynamic_ncols=True)
    t0 = time.time()
    for m in trained:
        m.train()
    for step in range(start, total):
        if step == cfg.steps and step > 0:
            # the multi-reference stage starts from the first stage's average, with a fresh optimiser
            ema.reset_to_average()
            opt = torch.optim.AdamW(params, lr=cfg.multi_lr, betas=(0.9, 0.99), weight_decay=0.0)
            log(f"step {step}: multi-reference stage ({cfg.multi_steps} steps)")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        images, captions, references = _batch(cfg, step)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        ids = tokenizer(captions, padding="max_length", max_length=models.MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        with_ref = [i for i, r in enumerate(references) if r is not None]
        count = max([len(references[i]) for i in with_ref], default=1)
        if any(len(references[i]) != count for i in with_ref):
            raise AssertionError("every sample of a batch has the same number of references")
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text = text_encoder(ids).last_hidden_state
            # B x count x D: a sample's references become count x 4 tokens of one attention
            embeds = torch.zeros(cfg.batch, count, models.IMAGE_EMBED_DIM, dtype=torch.bfloat16)
            if with_ref:
                pixels = processor([im for i in with_ref for im in references[i]], return_tensors="pt").pixel_values
                encoded = image_encoder(pixels).image_embeds.to(torch.bfloat16)
                embeds = embeds.index_put((torch.tensor(with_ref),), encoded.reshape(len(with_ref), count, -1))
            pred = unet(noisy, t, encoder_hidden_states=text,
                        added_cond_kwargs={"image_embeds": [embeds]}).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0:
            log(f"step {step}/{total} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({time.time() - t0:.0f} s)")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done in (cfg.steps, total):
            _checkpoint(ckpt_path, cfg, vae, trained, opt, ema, done)
            _export(world_dir, vae, unet, text_encoder, image_encoder, ema)
            log(f"checkpoint at step {done}: {ckpt_path}, world exported to {world_dir}")
    if bar is not None:
        bar.close()
    if start >= total and not os.path.isdir(world_dir):
        _export(world_dir, vae, unet, text_encoder, image_encoder, ema)
    return world_dir


def _checkpoint(path, cfg, vae, trained, opt, ema, step):
    _atomic_save({"config": asdict(cfg), "step": step, "vae": vae.state_dict(),
                  "scaling_factor": vae.config.scaling_factor,
                  "models": [m.state_dict() for m in trained], "opt": opt.state_dict(),
                  "ema": [s.clone() for s in ema.shadow]}, path)


def _export(world_dir, vae, unet, text_encoder, image_encoder, ema):
    """Write the EMA weights as a loadable world (into a new folder, then swapped in)."""
    import shutil

    tmp = world_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ema.swap()
    try:
        models.save_world(tmp, vae=vae, unet=unet, text_encoder=text_encoder, image_encoder=image_encoder)
    finally:
        ema.swap()
    old = world_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(world_dir):
        os.replace(world_dir, old)
    os.replace(tmp, world_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_world_into(folder: str, vae, unet, text_encoder, image_encoder) -> float:
    """Load a world folder's weights (as :func:`models.save_world` writes them) into training models, in
    float32; ``unet`` carries an installed IP-Adapter. Returns the VAE's latent scaling factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    def state(cls, sub):
        return {k: v.float() for k, v in cls.from_pretrained(os.path.join(folder, sub)).state_dict().items()}

    loaded_vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"))
    vae.load_state_dict({k: v.float() for k, v in loaded_vae.state_dict().items()})
    missing, unexpected = unet.load_state_dict(state(UNet2DConditionModel, "unet"), strict=False)
    if unexpected or any("_ip" not in k and not k.startswith("encoder_hid_proj") for k in missing):
        raise ValueError(f"{folder}: its U-Net does not match the toy architecture")
    text_encoder.load_state_dict(state(CLIPTextModel, "text_encoder"))
    image_encoder.load_state_dict(state(CLIPVisionModelWithProjection, "image_encoder"))
    ip = load_file(os.path.join(folder, models.IP_SUBFOLDER, models.IP_WEIGHT_NAME))
    mine = models.ip_adapter_state_dict(unet)
    if set(ip) != set(mine):
        raise ValueError(f"{folder}: its IP-Adapter keys do not match the toy architecture")
    with torch.no_grad():
        for key, value in mine.items():
            value.copy_(ip[key].float())       # views of the live parameters
    return float(loaded_vae.config.scaling_factor)


def start_from_world(folder: str, out_dir: str, cfg: TrainConfig) -> str:
    """Write ``out_dir/checkpoint.pt`` at the end of the first stage (step ``cfg.steps``) from a world
    folder's weights (e.g. the shipped ones), so that ``train(out_dir, cfg)`` runs the second stage.

    The second stage starts from the averaged weights with a fresh optimiser, which is exactly what
    a world folder holds; only the fp16 rounding of the saved weights differs from a run from scratch.
    """
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(ckpt_path):
        raise ValueError(f"--out: {ckpt_path} exists; --init-from starts a new run")
    vae, unet = models.build_vae(), models.build_unet()
    text_encoder, image_encoder = models.build_text_encoder(), models.build_image_encoder()
    models.install_ip_adapter(unet, seed=cfg.seed)
    scale = load_world_into(folder, vae, unet, text_encoder, image_encoder)
    vae.register_to_config(scaling_factor=scale)
    trained = [unet, text_encoder, image_encoder]
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    os.makedirs(out_dir, exist_ok=True)
    _checkpoint(ckpt_path, cfg, vae, trained, opt, _EMA(trained, cfg.ema_decay), cfg.steps)
    return ckpt_path


def export_checkpoint(checkpoint: str, folder: str) -> None:
    """Write the EMA weights of ``checkpoint`` (a ``checkpoint.pt`` of :func:`train`) as a world folder."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    vae, unet = models.build_vae(), models.build_unet()
    text_encoder, image_encoder = models.build_text_encoder(), models.build_image_encoder()
    models.install_ip_adapter(unet)
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    trained = [unet, text_encoder, image_encoder]
    for m, sd in zip(trained, state["models"]):
        m.load_state_dict(sd)
    ema = _EMA(trained, 0.0)
    for s, v in zip(ema.shadow, state["ema"]):
        s.copy_(v)
    _export(folder, vae, unet, text_encoder, image_encoder, ema)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="anyms toy train")
    p.add_argument("--out", required=True)
    for f, v in asdict(TrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    train(a.out, cfg, progress=False, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
