"""Shared fixtures of the anyms tests (append only: several files add fixtures here).

Tiny pipelines have RANDOM weights (anyms.tiny); they are cheap (well under a second
to build), so each test gets a fresh one and may change its processors freely.
"""
from __future__ import annotations

import pytest
import torch


# ------------------------------------------------------------------ processor tests
@pytest.fixture
def tiny_sdxl_pipe():
    """A tiny random SDXL pipeline with the 4-token IP-Adapter loaded by load_ip_adapter."""
    from diffusers import StableDiffusionXLPipeline

    from anyms.tiny import tiny_pipeline

    return tiny_pipeline(StableDiffusionXLPipeline, kind="sdxl", seed=0)


@pytest.fixture
def tiny_sd15_pipe():
    """A tiny random SD1.5 pipeline (head dims 40 / 80) with the 4-token IP-Adapter loaded."""
    from diffusers import StableDiffusionPipeline

    from anyms.tiny import tiny_pipeline

    return tiny_pipeline(StableDiffusionPipeline, kind="sd15", seed=0)


@pytest.fixture
def unet_inputs():
    """Factory: fresh random U-Net inputs for a tiny pipeline, with S subject images.

    ``unet_inputs(pipe, S, B=2, latent_hw=(13, 21), seed=0)`` returns kwargs of
    ``pipe.unet(**kwargs)``; ``image_embeds`` are pre-projection image embeddings
    ``[B, S, E]`` (or ``[B, S, tokens, E]`` for the "plus" adapter), as the pipeline
    passes them.
    """
    def make(pipe, S, B=2, latent_hw=(13, 21), seed=0):
        from diffusers.models.embeddings import ImageProjection

        g = torch.Generator().manual_seed(seed)
        unet = pipe.unet
        cfg = unet.config
        proj = unet.encoder_hid_proj.image_projection_layers[0]
        enc = pipe.image_encoder.config
        if isinstance(proj, ImageProjection):
            image_embeds = torch.randn(B, S, enc.projection_dim, generator=g)
        else:
            tokens = (enc.image_size // enc.patch_size) ** 2 + 1
            image_embeds = torch.randn(B, S, tokens, enc.hidden_size, generator=g)
        added = {"image_embeds": [image_embeds]}
        if cfg.addition_embed_type == "text_time":
            added["text_embeds"] = torch.randn(B, pipe.text_encoder_2.config.projection_dim, generator=g)
            added["time_ids"] = torch.randn(B, 6, generator=g).abs() * 512
        return dict(
            sample=torch.randn(B, cfg.in_channels, *latent_hw, generator=g),
            timestep=torch.tensor(500),
            encoder_hidden_states=torch.randn(B, 77, cfg.cross_attention_dim, generator=g),
            added_cond_kwargs=added,
        )

    return make


# ------------------------------------------------------------------ pipeline and CLI tests
@pytest.fixture(scope="session")
def subject_images():
    """Four distinct random RGB subject images (40x40, never constant)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1234)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture
def anyms_and_diffusers():
    """Factory: ``make(kind="sdxl"|"sd15", plus=False)`` -> (AnyMS pipeline, plain diffusers pipeline).

    Both are built by anyms.tiny from the same seed, so they hold identical random
    weights and IP-Adapters, but share no module: nothing one does can leak into the other.
    """
    def make(kind="sdxl", plus=False):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from anyms.pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline
        from anyms.tiny import tiny_pipeline

        ours, theirs = {"sdxl": (AnyMSStableDiffusionXLPipeline, StableDiffusionXLPipeline),
                        "sd15": (AnyMSStableDiffusionPipeline, StableDiffusionPipeline)}[kind]
        return (tiny_pipeline(ours, kind=kind, plus=plus, seed=0),
                tiny_pipeline(theirs, kind=kind, plus=plus, seed=0))

    return make


@pytest.fixture(scope="session")
def tiny_sdxl_on_disk(tmp_path_factory):
    """A tiny random SDXL pipeline saved with save_pretrained, and its IP-Adapter file.

    Returns ``(model_dir, ip_adapter_weight_path)``; the adapter's folder also holds
    ``image_encoder/``, which load_ip_adapter picks up, as with the published adapters.
    """
    from diffusers import StableDiffusionXLPipeline

    from anyms.tiny import save_tiny_ip_adapter, tiny_image_encoder, tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-sdxl")
    pipe = tiny_pipeline(StableDiffusionXLPipeline, kind="sdxl", seed=0, with_ip_adapter=False)
    pipe.save_pretrained(root / "model")
    weight = save_tiny_ip_adapter(root / "ip-adapter", pipe.unet, tiny_image_encoder(4))
    return str(root / "model"), str(root / "ip-adapter" / weight)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread. Tiny models only pay for thread synchronisation:
    measured 6x slower with 2 threads on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ markers
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of more than ~20 s (runs in CI too: make test selects every test)")


# ------------------------------------------------------------------ hostile image files
@pytest.fixture
def header_only_png():
    """Factory: ``make(path, width, height)`` writes a PNG whose header claims ``width x height``
    greyscale pixels and that holds no pixel data (a decompression bomb's header, without the
    bomb: whoever decodes it fails, whoever checks the header first refuses it). Returns ``str(path)``."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def make(path, width, height):
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
        return str(path)

    return make


@pytest.fixture
def images(tmp_path, subject_images):
    """Two subject images saved as PNG files in ``tmp_path``: their paths, for the CLI tests."""
    paths = []
    for i, img in enumerate(subject_images[:2]):
        paths.append(str(tmp_path / f"subject{i}.png"))
        img.save(paths[-1])
    return paths
