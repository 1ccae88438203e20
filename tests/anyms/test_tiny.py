"""anyms.tiny: tiny random pipelines built offline, IP-Adapters read by the real load_ip_adapter."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
from safetensors import safe_open

from anyms.tiny import save_tiny_ip_adapter, tiny_pipeline, tiny_sdxl_components, tiny_tokenizer


@pytest.mark.parametrize("kind,cls", [("sdxl", StableDiffusionXLPipeline), ("sd15", StableDiffusionPipeline)])
@pytest.mark.parametrize("plus", [False, True])
def test_ip_adapter_loads_through_load_ip_adapter(kind, cls, plus):
    pipe = tiny_pipeline(cls, kind=kind, plus=plus, seed=3)
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterPlusImageProjection if plus else ImageProjection)
    procs = [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert procs and all(p.num_tokens == [16 if plus else 4] for p in procs)
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    # Same seed, same weights; the caller's RNG is left alone.
    state = torch.random.get_rng_state()
    again = tiny_pipeline(cls, kind=kind, plus=plus, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(pipe.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    other = tiny_pipeline(cls, kind=kind, plus=plus, seed=4)
    assert not torch.equal(next(iter(other.unet.parameters())), next(iter(pipe.unet.parameters())))


@pytest.mark.parametrize("plus", [False, True])
def test_saved_weights_are_what_the_unet_holds(tmp_path, plus):
    comps = tiny_sdxl_components(seed=1)
    name = save_tiny_ip_adapter(tmp_path, comps["unet"], comps["image_encoder"], plus=plus, seed=2)
    pipe = StableDiffusionXLPipeline(**comps, add_watermarker=False)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=name)
    with safe_open(str(tmp_path / name), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    # The "plus" resampler brings attention modules of its own (under encoder_hid_proj): not the U-Net's.
    cross = [n for n in pipe.unet.attn_processors
             if not n.endswith("attn1.processor") and not n.startswith("encoder_hid_proj")]
    for i, n in enumerate(cross):
        proc = pipe.unet.attn_processors[n]
        assert torch.equal(proc.to_k_ip[0].weight, saved[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(proc.to_v_ip[0].weight, saved[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    key = "latents" if plus else "image_embeds.weight"
    ckpt = "image_proj.latents" if plus else "image_proj.proj.weight"
    assert torch.equal(proj.state_dict()[key], saved[ckpt])


def test_tokenizer_and_generation_end_to_end():
    tok = tiny_tokenizer()
    ids = tok("a cat and a dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.decode(tok("the cat").input_ids, skip_special_tokens=True) == "the cat"
    pipe = tiny_pipeline(StableDiffusionXLPipeline)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 40, 56, generator=g) for _ in range(2)]
    out = pipe("a cat", ip_adapter_image=[images], num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all() and out.std() > 0
