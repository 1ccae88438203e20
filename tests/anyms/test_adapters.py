"""Several IP-Adapters in one call: ``Subject(adapter=i)`` / ``Layout(adapters=..., subject_tokens=...)``.

Tiny random models (anyms.tiny): a 4-token adapter (adapter 0, the pipeline's image encoder) and
a 16-token "plus" adapter (adapter 1, an image encoder of its own with another hidden size, so
that encoding a subject with the wrong encoder fails rather than passing by chance).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

import anyms_kernels
from anyms import Layout, Subject
from anyms.processor import AnyMSAttnProcessor
from anyms_kernels.reference import region_cross_attention_reference
from anyms_kernels.regions import box_cover, rasterize_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (13, 21)
FP32 = dict(atol=2e-5, rtol=2e-5)
FULL = (0.0, 0.0, 1.0, 1.0)


def assert_close(actual, expected, atol, rtol, what=""):
    bad = ~torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    if bad.any():
        err = (actual.double() - expected.double()).abs().max().item()
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} elements mismatch (atol={atol}, rtol={rtol}), "
                    f"max abs error {err:.3g}, first at {bad.nonzero()[:3].tolist()}")


@pytest.fixture
def count_op_calls(monkeypatch):
    """Count the calls of the fused op (what the processors call, once per layer)."""
    calls = []
    original = anyms_kernels.region_cross_attention

    def counting(*args, **kwargs):
        calls.append(args[3].shape)           # k_subj [B, H, S, T, D]
        return original(*args, **kwargs)

    monkeypatch.setattr(anyms_kernels, "region_cross_attention", counting)
    return calls


# ------------------------------------------------------------------ one layer, two adapters
def two_adapter_layer(heads=3, dim_head=40, cross_dim=48, seed=0):
    """A cross-attention layer with diffusers' processor for two adapters: 4 and 16 tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attn = Attention(query_dim=heads * dim_head, cross_attention_dim=cross_dim, heads=heads, dim_head=dim_head)
        proc = IPAdapterAttnProcessor2_0(hidden_size=heads * dim_head, cross_attention_dim=cross_dim,
                                         num_tokens=(4, 16), scale=[0.8, 1.3])
    attn.set_processor(proc)
    return attn.eval(), proc


def layer_inputs(attn, counts, tokens=(4, 16), B=2, seed=1, dtype=torch.float64):
    """Hidden states, text and per-adapter image tokens ``[B, S_a, T_a, C]`` (``counts[a]`` images)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, GRID[0] * GRID[1], attn.query_dim, generator=g, dtype=dtype)
    text = torch.randn(B, 77, attn.cross_attention_dim, generator=g, dtype=dtype)
    images = [torch.randn(B, n, t, attn.cross_attention_dim, generator=g, dtype=dtype) for n, t in zip(counts, tokens)]
    return x, text, images


def linear64(module, t):
    return F.linear(t.double(), module.weight.double(), None if module.bias is None else module.bias.double())


def by_hand_keys(attn, proc, images, adapters):
    """``[B, H, S, Tmax, D]`` keys and values in the layout's order, each subject projected by its adapter."""
    H = attn.heads
    seen = [0] * len(images)
    ks, vs, counts = [], [], []
    for a in adapters:
        img = images[a][:, seen[a]]
        seen[a] += 1
        ks.append(linear64(proc.to_k_ip[a], img))
        vs.append(linear64(proc.to_v_ip[a], img))
        counts.append(img.shape[1])
    T = max(counts)
    pad = lambda t: F.pad(t, (0, 0, 0, T - t.shape[1]))          # noqa: E731  zeros, never read
    k = torch.stack([pad(t) for t in ks], 1).unflatten(-1, (H, -1)).permute(0, 3, 1, 2, 4)
    v = torch.stack([pad(t) for t in vs], 1).unflatten(-1, (H, -1)).permute(0, 3, 1, 2, 4)
    return k, v, counts


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_two_adapters_in_one_call_match_the_float64_reference_with_per_branch_tokens(mode, count_op_calls):
    attn, parent = two_adapter_layer()
    attn.double()
    boxes = [[0.05, 0.1, 0.55, 0.9], [0.4, 0.0, 0.95, 0.7], [0.6, 0.5, 1.0, 1.0]]
    adapters = [0, 1, 0]
    x, text, images = layer_inputs(attn, counts=(2, 1))
    layout = Layout(boxes, GRID, scales=[0.7, 1.1, 1.6], mode=mode, adapters=adapters, subject_tokens=[4, 16, 4])
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout)
    attn.set_processor(proc)
    with torch.no_grad():
        actual = attn(x, encoder_hidden_states=(text, images))
    assert len(count_op_calls) == 1 and tuple(count_op_calls[0])[2:4] == (3, 16)    # S=3, padded to T=16

    H = attn.heads
    q = linear64(attn.to_q, x).unflatten(-1, (H, -1)).transpose(1, 2)
    kt = linear64(attn.to_k, text).unflatten(-1, (H, -1)).transpose(1, 2)
    vt = linear64(attn.to_v, text).unflatten(-1, (H, -1)).transpose(1, 2)
    k, v, counts = by_hand_keys(attn, parent, images, adapters)
    assert counts == [4, 16, 4]
    # lambda_s in float32, the dtype the layout keeps scales in (1.3 is not 1.3 there)
    lambdas = (layout.scales * torch.tensor([parent.scale[a] for a in adapters], dtype=torch.float32)).double()
    with torch.no_grad():
        z = region_cross_attention_reference(
            q, kt, vt, k, v, rasterize_boxes(layout.boxes, GRID).expand(x.shape[0], 3, 4), GRID, mode=mode,
            subject_scale=lambdas.expand(x.shape[0], 3), subject_tokens=counts)
        expected = linear64(attn.to_out[0], z.transpose(1, 2).flatten(2))
    assert_close(actual, expected, atol=1e-10, rtol=1e-10, what=f"{mode}: two adapters vs the float64 reference")


def test_each_subject_in_its_region_attends_to_its_own_adapters_tokens_only():
    """Disjoint regions, worked by hand without the op: in subject s's region the layer is
    text + lambda_s * softmax(q K_s^T) V_s over s's own T_a keys (4 or 16), through to_out."""
    attn, parent = two_adapter_layer()
    attn.double()
    boxes = [[0.0, 0.0, 0.3, 1.0], [0.35, 0.0, 0.65, 1.0], [0.7, 0.0, 1.0, 1.0]]
    adapters = [1, 0, 1]
    x, text, images = layer_inputs(attn, counts=(1, 2), seed=3)
    layout = Layout(boxes, GRID, scales=[1.2, 0.6, 0.9], adapters=adapters, subject_tokens=[16, 4, 16])
    attn.set_processor(AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout))
    with torch.no_grad():
        actual = attn(x, encoder_hidden_states=(text, images))
        H = attn.heads
        q = linear64(attn.to_q, x).unflatten(-1, (H, -1)).transpose(1, 2)
        kt = linear64(attn.to_k, text).unflatten(-1, (H, -1)).transpose(1, 2)
        vt = linear64(attn.to_v, text).unflatten(-1, (H, -1)).transpose(1, 2)
        base = F.scaled_dot_product_attention(q, kt, vt)
        k, v, counts = by_hand_keys(attn, parent, images, adapters)
        tokens = rasterize_boxes(layout.boxes, GRID).tolist()
        for s, a in enumerate(adapters):
            own = F.scaled_dot_product_attention(q, k[:, :, s, :counts[s]], v[:, :, s, :counts[s]])
            lam = float(layout.scales[s] * torch.tensor(parent.scale[a], dtype=torch.float32))   # float32, as kept
            z = base + lam * own
            expected = linear64(attn.to_out[0], z.transpose(1, 2).flatten(2))
            inside = box_cover(tokens[s], GRID).reshape(-1)
            assert inside.any()
            assert_close(actual[:, inside], expected[:, inside], atol=1e-10, rtol=1e-10, what=f"subject {s}")


def test_layer_errors_name_the_adapter():
    attn, parent = two_adapter_layer()
    x, text, images = layer_inputs(attn, counts=(1, 1), dtype=torch.float32)

    def call(layout, embeds=images):
        attn.set_processor(AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout))
        with torch.no_grad():
            attn(x, encoder_hidden_states=(text, embeds))

    two = [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    with pytest.raises(ValueError, match=r"subject 1 uses IP-Adapter 2 \(adapters\[1\]\) but 2 are loaded"):
        call(Layout(two, GRID, adapters=[0, 2]))
    with pytest.raises(ValueError, match=r"IP-Adapters of \[4, 16\] image tokens: make the Layout with subject_tok"):
        call(Layout(two, GRID, adapters=[0, 1]))
    with pytest.raises(ValueError, match=r"gives subject 1 4 tokens \(subject_tokens\[1\]\) but its IP-Adapter 1 has 16"):
        call(Layout(two, GRID, adapters=[0, 1], subject_tokens=[4, 4]))
    with pytest.raises(ValueError, match=r"hold S=1 images per prompt but the layout has 2 subjects of IP-Adapter 0"):
        call(Layout(two, GRID, adapters=[0, 0]))
    with pytest.raises(ValueError, match=r"2 IP-Adapters are loaded but 1 image embeddings were passed"):
        call(Layout(two, GRID, adapters=[0, 0]), embeds=images[:1])
    for bad, message in ((-1, r"adapters\[0\] must be an int >= 0"), (True, r"adapters\[0\] must be an int"),
                         (1.0, r"adapters\[0\] must be an int")):
        with pytest.raises(ValueError, match=message):
            Layout(two, GRID, adapters=[bad, 0])
    with pytest.raises(ValueError, match=r"subject_tokens\[1\] must be an int >= 1"):
        Layout(two, GRID, subject_tokens=[4, 0])


# ------------------------------------------------------------------ several adapters and regional prompts
@pytest.mark.parametrize("mode", ["overwrite", "sum"])
def test_two_adapters_and_regional_prompts_in_one_call_match_the_float64_reference(mode, count_op_calls):
    """Image subjects of a 16-token and a 4-token adapter, a text-only region and a subject with
    both: ONE op call with five branches (the images of s0, s2, s3, then the prompts of s1, s3),
    each with its own token count (16, 4, 16, 77, 77), against the float64 reference."""
    attn, parent = two_adapter_layer()
    attn.double()
    boxes = [[0.0, 0.0, 0.6, 0.7], [0.2, 0.1, 0.8, 0.9], [0.5, 0.4, 1.0, 1.0], [0.1, 0.5, 0.7, 1.0]]
    kinds, adapters = ["image", "prompt", "image", "both"], [1, 0, 0, 1]
    x, text, images = layer_inputs(attn, counts=(1, 2))          # adapter 0: s2; adapter 1: s0, s3
    g = torch.Generator().manual_seed(7)
    states = torch.randn(x.shape[0], 2, 77, attn.cross_attention_dim, generator=g, dtype=torch.float64)
    layout = Layout(boxes, GRID, scales=[0.7, 1.0, 1.6, 1.2], mode=mode, kinds=kinds, adapters=adapters,
                    subject_tokens=[16, 4, 4, 16]).set_prompt_states(states)
    assert layout.adapter_subjects(0) == [2] and layout.adapter_subjects(1) == [0, 3]   # s1 has no image
    assert layout.branch_tokens(16, 77) == (16, 4, 16, 77, 77)
    attn.set_processor(AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout))
    with torch.no_grad():
        actual = attn(x, encoder_hidden_states=(text, images))
    assert len(count_op_calls) == 1 and tuple(count_op_calls[0])[2:4] == (5, 77)   # padded to the prompts' 77

    H, B = attn.heads, x.shape[0]
    heads = lambda t: t.unflatten(-1, (H, -1)).transpose(1, 2)     # noqa: E731  [B, L, H*D] -> [B, H, L, D]
    q, kt, vt = heads(linear64(attn.to_q, x)), heads(linear64(attn.to_k, text)), heads(linear64(attn.to_v, text))
    sources = [(parent.to_k_ip[1], parent.to_v_ip[1], images[1][:, 0]),      # s0's image
               (parent.to_k_ip[0], parent.to_v_ip[0], images[0][:, 0]),      # s2's
               (parent.to_k_ip[1], parent.to_v_ip[1], images[1][:, 1]),      # s3's
               (attn.to_k, attn.to_v, states[:, 0]),                          # s1's prompt
               (attn.to_k, attn.to_v, states[:, 1])]                          # s3's
    pad = lambda t: F.pad(t, (0, 0, 0, 77 - t.shape[2]))          # noqa: E731  zeros, never read
    k = torch.stack([pad(heads(linear64(tk, t))) for tk, _, t in sources], 2)
    v = torch.stack([pad(heads(linear64(tv, t))) for _, tv, t in sources], 2)
    counts = [t.shape[1] for _, _, t in sources]
    assert counts == [16, 4, 16, 77, 77]
    image_scales = layout.scales[[0, 2, 3]] * torch.tensor([parent.scale[1], parent.scale[0], parent.scale[1]],
                                                           dtype=torch.float32)      # float32, as kept
    lambdas = torch.cat([image_scales, torch.ones(2)]).double()
    regions = rasterize_boxes(torch.tensor(boxes, dtype=torch.float64)[[0, 2, 3, 1, 3]], GRID).expand(B, 5, 4)
    with torch.no_grad():
        z = region_cross_attention_reference(q, kt, vt, k, v, regions, GRID, mode=mode,
                                             subject_scale=lambdas.expand(B, 5), subject_tokens=counts,
                                             replaces_text=[False, False, False, True, True])
        expected = linear64(attn.to_out[0], z.transpose(1, 2).flatten(2))
    assert_close(actual, expected, atol=1e-10, rtol=1e-10, what=f"{mode}: two adapters and prompts vs the reference")


# ------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def two_adapter_pipe():
    """A tiny SDXL AnyMS pipeline with adapter 0 (4 tokens, pipe.image_encoder, hidden 32) and
    adapter 1 (16-token "plus", an encoder of its own, hidden 48), loaded by the list form."""
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    return tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=[False, True], seed=0)


def generate(pipe, subjects=None, steps=2, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe("a cat", subjects=subjects, num_inference_steps=steps, output_type="pt", **kwargs).images


def test_the_list_form_loads_each_adapter_with_its_encoder(two_adapter_pipe):
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    pipe = two_adapter_pipe
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    assert [type(layer) for layer in layers] == [ImageProjection, IPAdapterPlusImageProjection]
    assert pipe.ip_adapter_image_encoder(0)[0] is pipe.image_encoder
    assert pipe.image_encoder.config.hidden_size == 32
    assert pipe.ip_adapter_image_encoder(1)[0].config.hidden_size == 48
    procs = [p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert procs and all(list(p.num_tokens) == [4, 16] and len(p.to_k_ip) == 2 for p in procs)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_one_adapter_in_the_list_form_is_todays_single_adapter_call(kind, subject_images):
    """The same weights loaded by the list form (one entry) and by the plain form: the same
    operations, so the same bits."""
    from anyms.pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    cls = AnyMSStableDiffusionXLPipeline if kind == "sdxl" else AnyMSStableDiffusionPipeline
    single = tiny_pipeline(cls, kind=kind, plus=False, seed=0)
    listed = tiny_pipeline(cls, kind=kind, plus=[False], seed=0)
    subjects = [Subject(subject_images[0], box=(0.0, 0.1, 0.6, 0.9), scale=0.8),
                Subject(subject_images[1], box=(0.4, 0.0, 1.0, 1.0), adapter=0, negative_image=subject_images[2])]
    assert torch.equal(generate(listed, subjects, height=64, width=64),
                       generate(single, subjects, height=64, width=64))


def test_two_adapters_in_one_pipeline_call_one_op_call_per_layer(two_adapter_pipe, subject_images, count_op_calls):
    from anyms.branches import adapter_layers

    pipe = two_adapter_pipe
    subjects = [Subject(subject_images[0], box=(0.0, 0.0, 0.6, 1.0)),
                Subject(subject_images[1], box=(0.4, 0.2, 1.0, 0.8), adapter=1),
                Subject(subject_images[2], box=(0.1, 0.5, 0.5, 1.0), adapter=0)]
    forwards = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        both = generate(pipe, subjects, height=64, width=64)
    finally:
        handle.remove()
    layout = pipe.anyms_last_plan.layout
    assert layout.adapters == (0, 1, 0) and layout.subject_tokens == (4, 16, 4)
    # with classifier-free guidance the U-Net runs once a step on the doubled batch
    assert len(count_op_calls) == len(adapter_layers(pipe)) * len(forwards) > 0
    assert all(tuple(shape)[2:4] == (3, 16) for shape in count_op_calls)
    # adapter 1's subject changes the image, and a plain 4-token-only call differs
    alone = generate(pipe, [subjects[0], subjects[2]], height=64, width=64)
    assert (both - alone).abs().max() > 1e-4


def test_two_adapters_and_a_regional_prompt_in_one_pipeline_call(two_adapter_pipe, subject_images, count_op_calls):
    """The pipeline: each layer's one op call holds both adapters' images and the prompt
    (branches 4, 16, 77 tokens); a call with prompts only hands every adapter a placeholder."""
    from anyms.branches import adapter_layers

    pipe = two_adapter_pipe
    subjects = [Subject(subject_images[0], box=(0.0, 0.0, 0.6, 1.0)),
                Subject(subject_images[1], box=(0.4, 0.2, 1.0, 0.8), adapter=1),
                Subject(prompt="a red woollen blanket", box=(0.0, 0.7, 1.0, 1.0))]
    with_prompt = generate(pipe, subjects, height=64, width=64)
    layout = pipe.anyms_last_plan.layout
    assert layout.kinds == ("image", "image", "prompt") and layout.branch_tokens(16, 77) == (4, 16, 77)
    calls = len(count_op_calls)
    assert calls == 2 * len(adapter_layers(pipe))             # two steps, one call per layer each
    assert all(tuple(shape)[2:4] == (3, 77) for shape in count_op_calls)
    without = generate(pipe, subjects[:2], height=64, width=64)
    assert (with_prompt - without).abs().max() > 1e-4
    only = generate(pipe, subjects[2:], height=64, width=64)  # no image: placeholders for both adapters
    assert all(tuple(shape)[2:4] == (1, 77) for shape in count_op_calls[2 * calls:])
    assert torch.isfinite(only).all()


def test_only_the_adapters_of_subject_images_need_an_image_encoder(subject_images):
    """Adapter 0 without any encoder: a call whose images are adapter 1's, with a text-only region
    (whose subject has no adapter), runs; an image of adapter 0 is refused by name."""
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=[False, True], seed=0)
    pipe.register_modules(image_encoder=None)
    assert pipe.ip_adapter_image_encoder(0)[0] is None and pipe.ip_adapter_image_encoder(1)[0] is not None
    subjects = [Subject(subject_images[1], box=(0.4, 0.2, 1.0, 0.8), adapter=1),
                Subject(prompt="a red woollen blanket", box=(0.0, 0.7, 1.0, 1.0))]
    assert torch.isfinite(generate(pipe, subjects, height=64, width=64)).all()
    with pytest.raises(ValueError, match=r"subjects need the IP-Adapter 0's image encoder"):
        generate(pipe, [Subject(subject_images[0], box=FULL), *subjects], height=64, width=64)


def _encode(encoder, extractor, image, hidden):
    pixels = extractor([image], return_tensors="pt").pixel_values
    with torch.no_grad():
        if hidden:
            return (encoder(pixels, output_hidden_states=True).hidden_states[-2],
                    encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2])
        positive = encoder(pixels).image_embeds
        return positive, torch.zeros_like(positive)


def test_full_image_subjects_in_sum_mode_equal_diffusers_with_both_adapters(two_adapter_pipe, subject_images):
    """diffusers' own multi-adapter processor adds scale_a * attn(q, K_a, V_a) for every adapter
    everywhere; one full-image subject per adapter in sum mode is that. diffusers gets the
    embeddings made by each adapter's encoder by hand (its pipeline holds one encoder)."""
    from anyms.processor import AnyMSAttnProcessor as Ours

    pipe = two_adapter_pipe
    pipe.set_ip_adapter_scale([0.7, 1.2])
    try:
        embeds = []
        for adapter, hidden in ((0, False), (1, True)):
            encoder, extractor = pipe.ip_adapter_image_encoder(adapter)
            positive, negative = _encode(encoder, extractor, subject_images[adapter], hidden)
            embeds.append(torch.cat([negative, positive])[:, None])
        theirs = generate(pipe, ip_adapter_image_embeds=embeds, height=64, width=64)
        assert not any(isinstance(p, Ours) for p in pipe.unet.attn_processors.values())
        ours = generate(pipe, [Subject(subject_images[0], box=FULL), Subject(subject_images[1], box=FULL, adapter=1)],
                        anyms_mode="sum", height=64, width=64)
        swapped = generate(pipe, [Subject(subject_images[0], box=FULL, adapter=1),
                                  Subject(subject_images[1], box=FULL)], anyms_mode="sum", height=64, width=64)
    finally:
        pipe.set_ip_adapter_scale([1.0, 1.0])
    assert_close(ours, theirs, atol=1e-5, rtol=1e-5, what="sum mode, full images vs diffusers' two adapters")
    assert (swapped - theirs).abs().max() > 1e-3          # the adapter of each subject matters


def test_an_adapter_without_subjects_is_not_read(two_adapter_pipe, subject_images):
    """Subjects of adapter 1 only: adapter 0 gets a placeholder the processors never read, so
    the image is the same whatever adapter 0's projections hold."""
    pipe = two_adapter_pipe
    subjects = [Subject(subject_images[1], box=(0.2, 0.2, 0.9, 0.9), adapter=1)]
    first = generate(pipe, subjects, height=64, width=64)
    weights = [p.to_k_ip[0].weight for p in pipe.unet.attn_processors.values()
               if isinstance(p, IPAdapterAttnProcessor2_0)]
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w in weights:
                w.mul_(3.0)
        again = generate(pipe, subjects, height=64, width=64)
    finally:
        with torch.no_grad():
            for w, old in zip(weights, saved):
                w.copy_(old)
    assert torch.equal(first, again)


@pytest.mark.parametrize("adapter,message", [
    (2, r"subjects\[1\]\.adapter is 2, no loaded IP-Adapter: 2 IP-Adapters are loaded, 0 \.\. 1"),
    (-1, r"subjects\[1\]\.adapter is -1, no loaded IP-Adapter"),
    (1.0, r"subjects\[1\]\.adapter must be an int, the index of a loaded IP-Adapter, got 1\.0"),
    (True, r"subjects\[1\]\.adapter must be an int, the index of a loaded IP-Adapter, got True"),
    ("1", r"subjects\[1\]\.adapter must be an int"),
])
def test_a_bad_adapter_is_named_before_any_model_work(two_adapter_pipe, subject_images, adapter, message,
                                                      monkeypatch):
    pipe = two_adapter_pipe

    def no_model_work(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe.unet, "forward", no_model_work)
    monkeypatch.setattr(pipe.image_encoder, "forward", no_model_work)
    monkeypatch.setattr(pipe.text_encoder, "forward", no_model_work)
    subjects = [Subject(subject_images[0], box=FULL), Subject(subject_images[1], box=FULL, adapter=adapter)]
    with pytest.raises(ValueError, match=message):
        generate(pipe, subjects)


def test_a_single_adapter_pipeline_refuses_adapter_one(subject_images, tiny_sdxl_pipe):
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)
    with pytest.raises(ValueError, match=r"subjects\[0\]\.adapter is 1, no loaded IP-Adapter: 1 IP-Adapter is "
                                         r"loaded, 0 \.\. 0"):
        generate(pipe, [Subject(subject_images[0], box=FULL, adapter=1)])


def test_set_ip_adapter_image_encoder_checks_the_index_and_unload_drops_it(subject_images):
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_image_encoder, tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=[False, True], seed=0)
    with pytest.raises(ValueError, match=r"adapter is 2, no loaded IP-Adapter: 2 IP-Adapters are loaded"):
        pipe.set_ip_adapter_image_encoder(2, tiny_image_encoder(1))
    pipe.set_ip_adapter_image_encoder(1, None)           # adapter 1 falls back to pipe.image_encoder (hidden 32)
    with pytest.raises(RuntimeError):                    # its resampler reads 48 features: the encoder matters
        generate(pipe, [Subject(subject_images[0], box=FULL, adapter=1)], steps=1)
    pipe.unload_ip_adapter()
    assert pipe._anyms_image_encoders is None


@pytest.mark.parametrize("bad", ["weights", "encoder"])
def test_a_failed_load_leaves_the_adapters_and_their_encoders_as_they_were(subject_images, tmp_path, bad):
    """A list-form load_ip_adapter that fails (a missing weight file, a missing encoder folder)
    leaves the pipeline as before the call: the loaded adapters keep their own encoders (adapter 1
    does not fall back to adapter 0's, which its resampler cannot read)."""
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=[False, True], seed=0,
                         ip_adapter_folder=str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    before = {i: pipe.ip_adapter_image_encoder(i)[0] for i in (0, 1)}
    subjects = [Subject(subject_images[0], box=(0, 0, 0.5, 1)), Subject(subject_images[1], box=(0.5, 0, 1, 1),
                                                                         adapter=1)]
    expected = generate(pipe, subjects, steps=1)
    names = sorted(f for d in ("adapter0", "adapter1") for f in os.listdir(tmp_path / d) if f.endswith(".safetensors"))
    weights = ["nope.safetensors", "nope.safetensors"] if bad == "weights" else names
    folders = ["image_encoder", "image_encoder"] if bad == "weights" else ["image_encoder", "no_such_encoder"]
    with pytest.raises(OSError):
        pipe.load_ip_adapter(str(tmp_path), subfolder=["adapter0", "adapter1"], weight_name=weights,
                             image_encoder_folder=folders)
    assert {i: pipe.ip_adapter_image_encoder(i)[0] for i in (0, 1)} == before
    assert before[1] is not before[0]
    torch.testing.assert_close(generate(pipe, subjects, steps=1), expected,
                               atol=0, rtol=0)


def test_loading_over_loaded_adapters_keeps_the_pipeline_s_encoder_as_documented(tmp_path):
    """As diffusers does, load_ip_adapter reads adapter 0's encoder only into a pipeline without one:
    a second list-form load naming another folder for adapter 0 keeps ``pipe.image_encoder`` (the
    docstring says so); after unload_ip_adapter() the named folder is read."""
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", plus=[False, True], seed=0,
                         ip_adapter_folder=str(tmp_path))
    names = [next(f for f in os.listdir(tmp_path / d) if f.endswith(".safetensors")) for d in ("adapter0", "adapter1")]
    kept = pipe.image_encoder
    assert kept.config.hidden_size == 32
    # adapter 0's folder: adapter 1's encoder (hidden 48), for both
    again = dict(subfolder=["adapter0", "adapter1"], weight_name=names,
                 image_encoder_folder=["adapter1/image_encoder", "adapter1/image_encoder"])
    pipe.load_ip_adapter(str(tmp_path), **again)
    assert pipe.image_encoder is kept and pipe.ip_adapter_image_encoder(1)[0] is kept
    assert "unload_ip_adapter" in type(pipe).load_ip_adapter.__doc__
    pipe.unload_ip_adapter()
    pipe.load_ip_adapter(str(tmp_path), **again)
    assert pipe.image_encoder.config.hidden_size == 48


def test_the_embedding_cache_keys_on_the_adapter(two_adapter_pipe, subject_images):
    from anyms.embeddings import SubjectEmbeddingCache

    pipe = two_adapter_pipe
    subjects = [Subject(subject_images[0], box=(0, 0, 0.5, 1)), Subject(subject_images[0], box=(0.5, 0, 1, 1),
                                                                          adapter=1)]
    plain = generate(pipe, subjects, height=64, width=64)
    cache = SubjectEmbeddingCache()
    with cache.attached(pipe):
        cached = generate(pipe, subjects, height=64, width=64)
        again = generate(pipe, subjects, height=64, width=64)
    # one image, two adapters: two entries (each adapter's encoder), served on the second call
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    assert torch.equal(cached, plain) and torch.equal(again, plain)


def test_flux_refuses_a_second_adapter_by_name(subject_images):
    from anyms.flux import AnyMSFluxPipeline
    from anyms.tiny_flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(AnyMSFluxPipeline, seed=0)
    with pytest.raises(ValueError, match=r"subjects\[1\]\.adapter is 1: AnyMSFluxPipeline takes every subject from "
                                         r"its one IP-Adapter"):
        pipe("a cat", subjects=[Subject(subject_images[0], box=FULL), Subject(subject_images[1], box=FULL, adapter=1)],
             num_inference_steps=1, height=64, width=64)


# ------------------------------------------------------------------ the command line, the record, --from, --jobs
@pytest.fixture(scope="module")
def two_adapters_on_disk(tmp_path_factory):
    """A tiny SDXL model folder and two adapter files beside their own image encoders: a 4-token
    one (encoder hidden 32) and a 16-token "plus" one (hidden 48), as load_ip_adapter finds them."""
    from diffusers import StableDiffusionXLPipeline

    from anyms.tiny import save_tiny_ip_adapter, tiny_image_encoder, tiny_pipeline

    root = tmp_path_factory.mktemp("two-adapters")
    pipe = tiny_pipeline(StableDiffusionXLPipeline, kind="sdxl", seed=0, with_ip_adapter=False)
    pipe.save_pretrained(root / "model")
    plain = save_tiny_ip_adapter(root / "plain", pipe.unet, tiny_image_encoder(4), seed=5)
    plus = save_tiny_ip_adapter(root / "plus", pipe.unet, tiny_image_encoder(14, 48), plus=True, seed=15)
    return str(root / "model"), str(root / "plain" / plain), str(root / "plus" / plus)


def _cli(argv, capsys):
    from anyms import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _record(path):
    import json

    from PIL import Image

    return json.loads(Image.open(path).text["anyms"])


def _generate_with_two_adapters(on_disk, subject_images, tmp_path, capsys, name, subject_args):
    """``anyms generate`` on the tiny model with both adapters of ``on_disk`` and ``subject_args``
    (``{s0}`` / ``{s1}``: two subject images written to ``tmp_path``); the image's path."""
    model, plain, plus = on_disk
    paths = {}
    for i, img in enumerate(subject_images[:2]):
        img.save(tmp_path / f"s{i}.png")
        paths[f"s{i}"] = str(tmp_path / f"s{i}.png")
    out = tmp_path / name
    code, _, err = _cli(["generate", "a cat and a dog", "--model", model, "--ip-adapter", plain, "--ip-adapter", plus,
                         *(a.format(**paths) for a in subject_args),
                         "--height", "64", "--width", "64", "--steps", "2", "--device", "cpu", "--seed", "3",
                         "--no-pictures", "--out", str(out)], capsys)
    assert code == 0, err
    return out


def test_two_adapters_from_the_command_line_record_and_from_round_trip(two_adapters_on_disk, subject_images,
                                                                       tmp_path, capsys):
    from PIL import Image

    model, plain, plus = two_adapters_on_disk
    out = _generate_with_two_adapters(two_adapters_on_disk, subject_images, tmp_path, capsys, "two.png",
                                      ["--subject", "{s0}:0,0,0.6,1",
                                       "--subject", "{s1}:0.4,0,1,1:0.8:adapter=1,end=0.5"])
    rec = _record(out)
    assert rec["model"]["ip_adapter"] == [plain, plus] and rec["model"]["image_encoder"] is None
    subjects = rec["layout"]["subjects"]
    assert "adapter" not in subjects[0] and subjects[1]["adapter"] == 1 and subjects[1]["end"] == 0.5

    again = tmp_path / "again.png"
    code, _, err = _cli(["generate", "--from", str(out), "--device", "cpu", "--no-pictures", "--out", str(again)],
                        capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert _record(again)["model"] == rec["model"] and _record(again)["layout"]["subjects"][1]["adapter"] == 1

    # the same subjects through the pipeline API with the same adapters: the same image
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline

    pipe = AnyMSStableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter([os.path.dirname(plain), os.path.dirname(plus)], subfolder="",
                         weight_name=[os.path.basename(plain), os.path.basename(plus)],
                         image_encoder_folder=["image_encoder", "image_encoder"])
    assert pipe.ip_adapter_image_encoder(1)[0].config.hidden_size == 48
    image = pipe("a cat and a dog", subjects=[
        Subject(str(tmp_path / "s0.png"), box=(0, 0, 0.6, 1)),
        Subject(str(tmp_path / "s1.png"), box=(0.4, 0, 1, 1), scale=0.8, adapter=1, end=0.5)],
        height=64, width=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(out)))


def test_bad_adapters_on_the_command_line_exit_2_before_loading(two_adapters_on_disk, subject_images, tmp_path,
                                                               capsys, monkeypatch):
    import json

    from anyms import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the adapters were checked")

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    model, plain, plus = two_adapters_on_disk
    subject_images[0].save(tmp_path / "s0.png")
    s0 = str(tmp_path / "s0.png")
    two = ["--model", model, "--ip-adapter", plain, "--ip-adapter", plus, "--device", "cpu", "--steps", "1"]
    (tmp_path / "layout.json").write_text(json.dumps({"prompt": "a", "subjects": [
        {"image": "s0.png", "box": [0, 0, 1, 1]}, {"image": "s0.png", "box": [0, 0, 1, 1], "adapter": True}]}))
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a", "subjects": [
        {"image": "s0.png", "box": [0, 0, 1, 1], "adapter": 2}]}) + "\n")
    cases = [
        (["a", "--subject", f"{s0}:0,0,1,1:adapter=2", *two],
         r"subjects\[0\]\.adapter is 2, no loaded IP-Adapter: 2 IP-Adapters are loaded, 0 \.\. 1"),
        (["a", "--subject", f"{s0}:0,0,1,1:adapter=1", "--model", "tiny", "--device", "cpu"],
         r"subjects\[0\]\.adapter is 1, no loaded IP-Adapter: 1 IP-Adapter is loaded"),
        (["a", "--subject", f"{s0}:0,0,1,1:adapter=-1", *two], r"--subject\[0\]\.adapter must be the index of a "
                                                               r"loaded IP-Adapter .* got '-1'"),
        (["a", "--subject", f"{s0}:0,0,1,1:adapter=x", *two], r"--subject\[0\]\.adapter must be the index"),
        (["--layout", str(tmp_path / "layout.json"), *two], r"subjects\[1\]\.adapter must be the index of a loaded "
                                                             r"IP-Adapter .* got True"),
        (["--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "o"), *two],
         r"jobs\.jsonl:1: subjects\[0\]\.adapter is 2, no loaded IP-Adapter"),
        (["a", "--subject", f"{s0}:0,0,1,1", *two, "--image-encoder", str(tmp_path)],
         r"--image-encoder is given 1 times for 2 --ip-adapter"),
        (["a", "--subject", f"{s0}:0,0,1,1:adapter=1", *two, "--upscale", "2", "--steps", "8"],
         r"error: --upscale: tiled upscaling takes its subjects from one IP-Adapter, but 2 --ip-adapter are given"),
    ]
    for argv, message in cases:
        code, _, err = _cli(["generate", *argv, "--out", str(tmp_path / "x.png")]
                            if "--jobs" not in argv else ["generate", *argv], capsys)
        assert code == 2 and err.count("\n") == 1 and re.search(message, err), (argv, err)
    assert not (tmp_path / "x.png").exists()


def test_two_adapters_and_a_region_record_and_from_round_trip(two_adapters_on_disk, subject_images, tmp_path,
                                                              capsys):
    """Both adapters' subjects and a regional prompt from the command line: the record keeps the
    adapter list, each image subject's adapter and the text-only region (no adapter, no image),
    and --from makes the same bytes."""
    from PIL import Image

    _, plain, plus = two_adapters_on_disk
    out = _generate_with_two_adapters(two_adapters_on_disk, subject_images, tmp_path, capsys, "mixed.png",
                                      ["--subject", "{s0}:0,0,0.6,1", "--subject", "{s1}:0.4,0,1,1:adapter=1",
                                       "--region", "a red woollen blanket@0,0.7,1,1:end=0.5"])
    rec = _record(out)
    subjects = rec["layout"]["subjects"]
    assert rec["model"]["ip_adapter"] == [plain, plus]
    assert "adapter" not in subjects[0] and subjects[1]["adapter"] == 1
    assert subjects[2]["prompt"] == "a red woollen blanket" and "adapter" not in subjects[2] \
        and "image" not in subjects[2] and subjects[2]["end"] == 0.5
    again = tmp_path / "again.png"
    code, _, err = _cli(["generate", "--from", str(out), "--device", "cpu", "--no-pictures", "--out", str(again)],
                        capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert _record(again)["layout"]["subjects"] == subjects


@pytest.mark.parametrize("argv, message", [
    (["--region", "a dog@0,0,1,1:adapter=1"], r"--region\[0\] .*a regional prompt has no adapter"),
    (["--region", "a dog@0,0,1,1:start=0.1,adapter=1"], r"--region\[0\] .*a regional prompt has no adapter"),
])
def test_a_region_takes_no_adapter_on_the_command_line(argv, message, capsys):
    code, _, err = _cli(["generate", "a cat", "--model", "tiny", "--out", "x.png", *argv], capsys)
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_a_record_whose_adapter_is_not_loaded_is_refused_by_its_schema():
    from anyms.metadata import check_record

    model = {"arch": "sdxl", "model": "m", "ip_adapter": ["a.safetensors", "b.safetensors"], "image_encoder": None,
             "dtype": "float32"}
    record = {"format": 1, "anyms_version": "0", "versions": {}, "prompt": "a", "negative_prompt": None,
              "layout": {"mode": "overwrite", "priority": "order", "subjects": [
                  {"image": "s.png", "image_sha256": "0" * 64, "box": [0, 0, 1, 1], "adapter": 2}]},
              "seed": 0, "steps": 1, "guidance": None, "height": None, "width": None, "model": model}
    with pytest.raises(ValueError, match=r"\"layout\.subjects\[0\]\.adapter\" must be an integer in \[0, 1\], got 2"):
        check_record(record, "--from 'x.png'")
    record["layout"]["subjects"][0]["adapter"] = 1
    check_record(record, "--from 'x.png'")
    model["image_encoder"] = ["e0", "e1", "e2"]
    with pytest.raises(ValueError, match=r"\"model\.image_encoder\" must be a list with one entry per"):
        check_record(record, "--from 'x.png'")


def test_the_memory_estimate_counts_every_adapter_and_its_own_encoder(two_adapters_on_disk):
    """The meta-device pipeline of a run with two --ip-adapter (configs and safetensors headers
    only) estimates as the loaded one, which holds both adapters' layers and adapter 1's encoder."""
    from anyms import cli, loading
    from anyms.budget import skeleton_pipeline
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline
    from anyms.preflight import _module_bytes, estimate_peak_memory

    model, plain, plus = two_adapters_on_disk
    args = cli.build_parser().parse_args(["generate", "a", "--subject", "s.png:0,0,1,1", "--model", model,
                                          "--ip-adapter", plain, "--ip-adapter", plus])
    sources = loading._resolve_sources(args)
    loaded = AnyMSStableDiffusionXLPipeline.from_pretrained(model)
    loaded.load_ip_adapter([os.path.dirname(plain), os.path.dirname(plus)], subfolder="",
                           weight_name=[os.path.basename(plain), os.path.basename(plus)],
                           image_encoder_folder=["image_encoder", "image_encoder"])
    skeleton = skeleton_pipeline(sources, torch.float32)
    assert set(skeleton.adapter_image_encoders) == {1}
    for offload in ("none", "model", "sequential"):
        kw = dict(cfg=True, offload=offload, dtype=torch.float32)
        assert estimate_peak_memory(skeleton, 64, 64, **kw) == estimate_peak_memory(loaded, 64, 64, **kw), offload
    with_own = estimate_peak_memory(loaded, 64, 64, cfg=True)
    encoder = loaded.ip_adapter_image_encoder(1)[0]
    loaded.set_ip_adapter_image_encoder(1, None)
    assert with_own.weights - estimate_peak_memory(loaded, 64, 64, cfg=True).weights == _module_bytes(encoder, None) > 0


def test_from_pipe_keeps_the_adapters_own_encoders(two_adapter_pipe):
    from anyms.pipeline import AnyMSStableDiffusionXLPipeline

    again = AnyMSStableDiffusionXLPipeline.from_pipe(two_adapter_pipe)
    assert again.ip_adapter_image_encoder(1)[0] is two_adapter_pipe.ip_adapter_image_encoder(1)[0]
    assert again.ip_adapter_image_encoder(0)[0] is two_adapter_pipe.image_encoder


def test_jobs_with_two_adapters_make_the_images_generate_makes(two_adapters_on_disk, subject_images, tmp_path,
                                                               capsys):
    """--jobs (its embedding cache serving one image to both adapters' encoders) and a single
    generate make the same bytes; each job's record keeps its subjects' adapters."""
    import json

    from PIL import Image

    model, plain, plus = two_adapters_on_disk
    subject_images[0].save(tmp_path / "s0.png")
    subject_images[1].save(tmp_path / "s1.png")
    jobs = [{"prompt": "a cat", "seed": 4, "subjects": [{"image": "s0.png", "box": [0, 0, 0.6, 1]},
                                                        {"image": "s0.png", "box": [0.4, 0, 1, 1], "adapter": 1}]},
            {"prompt": "a dog", "seed": 4, "subjects": [{"image": "s1.png", "box": [0, 0, 1, 1], "adapter": 1}]}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    common = ["--model", model, "--ip-adapter", plain, "--ip-adapter", plus, "--height", "64", "--width", "64",
              "--steps", "2", "--device", "cpu", "--no-pictures"]
    code, out, err = _cli(["generate", "--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir", str(tmp_path / "o"),
                           *common], capsys)
    assert code == 0, err
    # s0 once per adapter (two encoders), s1 for adapter 1: three embeddings, none shared across adapters
    assert "subject embeddings: 3 encoded, 0 reused" in out + err, out + err
    single = tmp_path / "single.png"
    code, _, err = _cli(["generate", "a cat", "--seed", "4", "--subject", f"{tmp_path / 's0.png'}:0,0,0.6,1",
                         "--subject", f"{tmp_path / 's0.png'}:0.4,0,1,1:adapter=1", "--out", str(single), *common],
                        capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "00000.png")), np.asarray(Image.open(single)))
    assert [s.get("adapter", 0) for s in _record(tmp_path / "o" / "00001.png")["layout"]["subjects"]] == [1]


# ------------------------------------------------------------------ FLUX's processor shares the branches
def test_flux_processor_two_adapters_full_images_in_sum_mode_equal_diffusers():
    """FLUX's AnyMS processor takes its subject branches from the same code as the U-Net's: one
    full-image subject per adapter (4 and 16 tokens) in sum mode is diffusers' FLUX processor with
    both adapters; regions confine each adapter's term, and one op call makes the IP term."""
    from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxIPAdapterAttnProcessor,
                                                                FluxPosEmbed)

    from anyms.flux import AnyMSFluxAttnProcessor, flux_layout

    heads, head_dim, joint, grid, B, L = 2, 64, 32, (5, 7), 2, 9
    dim = heads * head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attn = FluxAttention(query_dim=dim, added_kv_proj_dim=dim, dim_head=head_dim, heads=heads, out_dim=dim,
                             context_pre_only=False, bias=True, eps=1e-6)
        parent = FluxIPAdapterAttnProcessor(hidden_size=dim, cross_attention_dim=joint, num_tokens=(4, 16),
                                            scale=[0.7, 1.2])
        for p in list(attn.parameters()) + list(parent.parameters()):
            torch.nn.init.normal_(p, 0.0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
    attn.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, grid[0] * grid[1], dim, generator=g)
    text = torch.randn(B, L, dim, generator=g)
    images = [torch.randn(B, 1, 4, joint, generator=g), torch.randn(B, 1, 16, joint, generator=g)]
    ids = torch.zeros(grid[0], grid[1], 3)
    ids[..., 1] += torch.arange(grid[0])[:, None]
    ids[..., 2] += torch.arange(grid[1])[None, :]
    rope = FluxPosEmbed(10000, [8, 28, 28])(torch.cat([torch.zeros(L, 3), ids.reshape(-1, 3)]))

    def run(proc, embeds):
        attn.set_processor(proc)
        with torch.no_grad():
            return attn(x, encoder_hidden_states=text, image_rotary_emb=rope, ip_hidden_states=embeds)[2]

    theirs = run(parent, [im[:, 0] for im in images])         # diffusers: [B, T, C] per adapter
    h, w = 16 * grid[0], 16 * grid[1]
    full = flux_layout([list(FULL)] * 2, h, w, mode="sum", adapters=[0, 1], subject_tokens=[4, 16])
    ours = run(AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, full), images)
    assert_close(ours, theirs, atol=2e-5, rtol=1e-5, what="FLUX: sum of full-image subjects vs diffusers")
    # left half adapter 1's subject, right half adapter 0's: each side is that adapter's term alone
    halves = flux_layout([[0.5, 0, 1, 1], [0, 0, 0.5, 1]], h, w, adapters=[0, 1], subject_tokens=[4, 16])
    split = run(AnyMSFluxAttnProcessor.from_ip_adapter_processor(parent, halves), images)
    cover = halves.coverage(grid).flatten(1)
    for s, a in ((0, 0), (1, 1)):
        # that adapter's one subject over the whole image (the other adapter passes no image: not read)
        embeds = [images[a] if i == a else images[i][:, :0] for i in range(2)]
        term = run(AnyMSFluxAttnProcessor.from_ip_adapter_processor(
            parent, flux_layout([list(FULL)], h, w, adapters=[a])), embeds)
        only = cover[s] & ~cover[1 - s]
        assert only.any()
        assert_close(split[:, only], term[:, only], atol=2e-5, rtol=1e-5, what=f"FLUX: subject {s} in its half")


@pytest.mark.parametrize("two", [False, True], ids=["one-adapter", "two-adapters"])
@pytest.mark.parametrize("max_memory", [False, True], ids=["load", "max-memory"])
def test_a_local_image_encoder_folder_loads_and_estimates(two_adapters_on_disk, subject_images, tmp_path, capsys,
                                                          two, max_memory):
    """--image-encoder naming a local folder (no subfolder inside it): the run loads that encoder
    (and --max-memory reads its config) rather than failing on the missing subfolder."""
    model, plain, plus = two_adapters_on_disk
    subject_images[0].save(tmp_path / "s0.png")
    encoders = [os.path.join(os.path.dirname(plain), "image_encoder")]
    adapters = ["--ip-adapter", plain]
    if two:
        encoders.append(os.path.join(os.path.dirname(plus), "image_encoder"))
        adapters += ["--ip-adapter", plus]
    out = tmp_path / "enc.png"
    code, _, err = _cli(["generate", "a cat", "--model", model, *adapters,
                         *[a for e in encoders for a in ("--image-encoder", e)],
                         "--subject", f"{tmp_path / 's0.png'}:0,0,1,1" + (":adapter=1" if two else ""),
                         *(["--max-memory", "64GB"] if max_memory else []),
                         "--height", "64", "--width", "64", "--steps", "1", "--device", "cpu", "--no-pictures",
                         "--out", str(out)], capsys)
    assert code == 0, err
    assert _record(out)["model"]["image_encoder"] == (encoders if two else encoders[0])


def test_an_upscale_with_two_adapters_is_refused_before_loading(two_adapters_on_disk, subject_images, tmp_path,
                                                                capsys, monkeypatch):
    """Tiled upscaling takes one IP-Adapter: with two --ip-adapter an upscale from the options, a
    layout file or a jobs line exits 2 in one line naming both, before any model loads and with
    nothing written (not after the first generation, losing its image)."""
    import json

    from anyms import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the upscale was checked")

    monkeypatch.setattr(loading, "_load_pipeline", no_loading)
    model, plain, plus = two_adapters_on_disk
    subject_images[0].save(tmp_path / "s0.png")
    s0 = str(tmp_path / "s0.png")
    two = ["--model", model, "--ip-adapter", plain, "--ip-adapter", plus, "--device", "cpu", "--steps", "8",
           "--height", "64", "--width", "64"]
    subject = {"image": "s0.png", "box": [0, 0, 1, 1]}
    (tmp_path / "layout.json").write_text(json.dumps({"prompt": "a", "subjects": [subject], "upscale": {"scale": 2}}))
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a", "subjects": [subject]}) + "\n" + json.dumps(
        {"prompt": "a", "subjects": [subject], "upscale": {"scale": 2}}) + "\n")
    out_dir = tmp_path / "o"
    cases = [
        (["a", "--subject", f"{s0}:0,0,1,1", *two, "--upscale", "2", "--out", str(tmp_path / "x.png")],
         r"error: --upscale: tiled upscaling takes its subjects from one IP-Adapter, but 2 --ip-adapter are given"),
        (["--layout", str(tmp_path / "layout.json"), *two, "--out", str(tmp_path / "x.png")],
         r"error: --layout .*layout\.json'?: upscale\.scale: tiled upscaling takes its subjects from one IP-Adapter, "
         r"but 2 --ip-adapter"),
        (["--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir", str(out_dir), *two],
         r"error: --jobs .*jobs\.jsonl:2: upscale\.scale: tiled upscaling takes its subjects from one IP-Adapter, but 2 "
         r"--ip-adapter"),
    ]
    for argv, message in cases:
        code, _, err = _cli(["generate", *argv], capsys)
        assert code == 2 and err.count("\n") == 1 and re.search(message, err), (argv, err)
    assert not (tmp_path / "x.png").exists() and not any(out_dir.glob("*.png"))
