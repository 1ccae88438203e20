"""Subject embeddings computed once per distinct image, reused across generations.

A diffusers pipeline encodes its IP-Adapter images once per call (the denoising
steps reuse them); a run of many layouts that share subject images would still
encode every image again in every call. :class:`SubjectEmbeddingCache` wraps one
pipeline's ``encode_image`` so that each distinct image (by its pixels) goes through
the image encoder once, alone, and every later call reuses its embedding:

    cache = SubjectEmbeddingCache()
    with cache.attached(pipe):
        for layout in layouts:
            pipe(prompt, subjects=layout, ...)
    print(cache.hits, cache.misses)

Each image is encoded on its own (batch 1), so its embedding does not depend on which
other images a call holds: a job's result is the same whatever ran before it, in
this process or another. The wrapper is an attribute of that one pipeline object,
removed on exit; the class is not patched. Two forms of ``encode_image`` are served:
the SD / SDXL one (``encode_image(image, device, num_images_per_prompt,
output_hidden_states)`` returning ``(embeds, negative_embeds)``; an AnyMS pipeline's takes
``adapter=``, the IP-Adapter whose image encoder encodes, and the cache keys on it) and FLUX's
(``encode_image(image, device, num_images_per_prompt)`` returning the embeddings alone);
pipelines with any other are left alone.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from typing import Optional

import torch

__all__ = ["SubjectEmbeddingCache", "image_key"]


def image_key(image) -> Optional[str]:
    """A key for a PIL image's content (mode, size, pixels); None for anything else."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        return None
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class SubjectEmbeddingCache:
    """Per-image IP-Adapter embeddings (and, for SD / SDXL, their unconditional twins), least recently
    used first out.

    Args:
        max_bytes: the most the cached tensors may hold (on their device); the least
            recently used entries go first. Default 256 MiB: 200 images of the 16-token
            "plus" adapter's 257 x 1280 hidden states in float16.

    Attributes:
        hits, misses: images served from the cache, and images encoded.
        encode_seconds: time spent in the image encoder for the misses.
    """

    def __init__(self, max_bytes: int = 256 * 1024 ** 2):
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.encode_seconds = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @staticmethod
    def form(pipe) -> Optional[str]:
        """``"unet"`` where ``pipe``'s ``encode_image`` is the SD / SDXL one, ``"flux"`` where it
        is FLUX's, None otherwise (a pipeline this cache leaves alone)."""
        from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        from .pipeline import AnyMSPipelineMixin

        method = getattr(type(pipe), "encode_image", None)
        if method is None:
            return None
        if method in (StableDiffusionPipeline.encode_image, StableDiffusionXLPipeline.encode_image,
                      AnyMSPipelineMixin.encode_image):
            return "unet"
        if method is FluxPipeline.encode_image:
            return "flux"
        return None

    @classmethod
    def supports(cls, pipe) -> bool:
        """Whether ``pipe``'s ``encode_image`` is one this cache wraps (see :meth:`form`)."""
        return cls.form(pipe) is not None

    @contextlib.contextmanager
    def attached(self, pipe):
        """Serve ``pipe.encode_image`` from this cache inside the block (a no-op for other pipelines)."""
        form = self.form(pipe)
        if form is None or "encode_image" in vars(pipe):
            yield self
            return
        original = pipe.encode_image            # the bound method

        if form == "flux":
            def encode_image(image, device, num_images_per_prompt):
                # FLUX's encoder gives the embeddings alone: one tensor per entry, no unconditional twin
                def one(images, dev, num, _hidden):
                    return (original(images, dev, num),)
                return self._encode(one, pipe, image, device, num_images_per_prompt, None)[0]
        else:
            def encode_image(image, device, num_images_per_prompt, output_hidden_states=None, adapter: int = 0):
                # an AnyMS pipeline encodes each IP-Adapter's subjects with that adapter's encoder
                def one(images, dev, num, hidden):
                    if adapter:
                        return original(images, dev, num, hidden, adapter=adapter)
                    return original(images, dev, num, hidden)
                return self._encode(one, pipe, image, device, num_images_per_prompt, output_hidden_states, adapter)

        pipe.encode_image = encode_image
        try:
            yield self
        finally:
            del pipe.encode_image

    def _encode(self, original, pipe, images, device, num_images_per_prompt, output_hidden_states, adapter: int = 0):
        import time

        items = images if isinstance(images, (list, tuple)) else [images]
        keys = [image_key(im) for im in items]
        if not items or any(k is None for k in keys):    # tensors, arrays: not ours to key
            return original(images, device, num_images_per_prompt, output_hidden_states)
        encoder = pipe.ip_adapter_image_encoder(adapter)[0] if hasattr(pipe, "ip_adapter_image_encoder") \
            else pipe.image_encoder
        dtype = next(encoder.parameters()).dtype
        parts = []
        for image, key in zip(items, keys):
            # the adapter too: adapters may have encoders of their own
            full_key = (key, int(adapter), bool(output_hidden_states), str(torch.device(device)), str(dtype))
            entry = self._entries.get(full_key)
            if entry is None:
                self.misses += 1
                t0 = time.perf_counter()
                entry = original([image], device, 1, output_hidden_states)
                self.encode_seconds += time.perf_counter() - t0
                self._put(full_key, entry)
            else:
                self.hits += 1
                self._entries.move_to_end(full_key)
            parts.append(entry)
        # each tensor of the entries (embeddings, and their unconditional twins where the form has them)
        return tuple(torch.cat(column).repeat_interleave(num_images_per_prompt, dim=0) for column in zip(*parts))

    def _put(self, key, entry) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if size > self.max_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old)
