"""AnyMSAttnProcessor and its install/remove functions, on single diffusers Attention
layers and on tiny random U-Nets (anyms.tiny). CPU, fresh random inputs, never zeros."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from einops import rearrange

from anyms.layout import Layout
from anyms.processor import AnyMSAttnProcessor, anyms_attention, apply_anyms, remove_anyms, set_anyms_layout
from anyms_kernels.reference import region_cross_attention_reference
from anyms_kernels.regions import box_cover, coverage_count, rasterize_boxes

# Normalised boxes (x0, y0, x1, y1), ascending priority.
DISJOINT = [[0.0, 0.0, 0.4, 0.5], [0.5, 0.0, 1.0, 0.45], [0.1, 0.6, 0.9, 1.0]]
OVERLAP = [[0.0, 0.0, 0.6, 0.6], [0.4, 0.3, 1.0, 0.9], [0.2, 0.5, 0.7, 1.0]]
NESTED = [[0.1, 0.1, 0.9, 0.9], [0.3, 0.3, 0.6, 0.7], [0.4, 0.4, 0.5, 0.5]]
GRID = (13, 21)          # a layer grid that is neither square nor a power of two
FP32 = dict(atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------ helpers
def make_layer(heads=2, dim_head=64, cross_dim=48, num_tokens=4, seed=0, **attn_kwargs):
    """A diffusers Attention (cross-attention) with a random IPAdapterAttnProcessor2_0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attn = Attention(query_dim=heads * dim_head, cross_attention_dim=cross_dim, heads=heads,
                         dim_head=dim_head, **attn_kwargs)
        proc = IPAdapterAttnProcessor2_0(hidden_size=heads * dim_head, cross_attention_dim=cross_dim,
                                         num_tokens=(num_tokens,), scale=1.0)
    attn.set_processor(proc)
    return attn.eval(), proc


def make_inputs(attn, S, T=4, B=2, grid=GRID, L=77, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, grid[0] * grid[1], attn.query_dim, generator=g)
    text = torch.randn(B, L, attn.cross_attention_dim, generator=g)
    images = torch.randn(B, S, T, attn.cross_attention_dim, generator=g)
    return x.to(dtype), text.to(dtype), images.to(dtype)


def run(attn, proc, x, text, images, **kwargs):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(x, encoder_hidden_states=(text, [images]), **kwargs)


def binary_masks(boxes, grid):
    """``[1, S, h, w]`` masks of the boxes' tokens, exactly at the layer's resolution.

    diffusers resizes each mask bicubically to the layer's grid at every call
    (IPAdapterMaskProcessor.downsample). Made at the layer's own size, that resize is
    the identity (align_corners=False with scale 1 samples the source pixels exactly), so
    diffusers' masks are then exactly the binary token masks AnyMS's boxes make.
    """
    tok = rasterize_boxes(torch.tensor(boxes, dtype=torch.float64), grid)
    return torch.stack([box_cover(b, grid).reshape(grid).float() for b in tok.tolist()])[None]


def reference_layer(attn, proc, x, text, images, layout, grid, ip_scale=1.0):
    """The layer computed by hand in float64: projections, anyms_kernels' reference, to_out."""
    d = torch.float64
    with torch.no_grad():
        to = lambda m, t: F.linear(t.to(d), m.weight.to(d), None if m.bias is None else m.bias.to(d))  # noqa: E731
        H = attn.heads
        q = rearrange(to(attn.to_q, x), "b n (h d) -> b h n d", h=H)
        kt = rearrange(to(attn.to_k, text), "b l (h d) -> b h l d", h=H)
        vt = rearrange(to(attn.to_v, text), "b l (h d) -> b h l d", h=H)
        ks = rearrange(to(proc.to_k_ip[0], images), "b s t (h d) -> b h s t d", h=H)
        vs = rearrange(to(proc.to_v_ip[0], images), "b s t (h d) -> b h s t d", h=H)
        B, S = x.shape[0], images.shape[1]
        boxes = rasterize_boxes(layout.boxes, grid).expand(B, S, 4)
        scale = (layout.scales.to(d) * torch.as_tensor(ip_scale, dtype=d)).expand(B, S)
        z = region_cross_attention_reference(q, kt, vt, ks, vs, boxes, grid, mode=layout.mode, subject_scale=scale)
        return to(attn.to_out[0], rearrange(z, "b h n d -> b n (h d)"))


def assert_close(actual, expected, atol, rtol, what=""):
    bad = ~torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    if bad.any():
        err = (actual.double() - expected.double()).abs().max().item()
        first = bad.nonzero()[:3].tolist()
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} elements mismatch "
                    f"(atol={atol}, rtol={rtol}), max abs error {err:.3g}, first at {first}")


# ------------------------------------------------------------- one Attention layer
@pytest.mark.parametrize("boxes", [DISJOINT, OVERLAP, NESTED], ids=["disjoint", "overlap", "nested"])
@pytest.mark.parametrize("num_tokens,dim_head", [(4, 64), (16, 40)])
def test_sum_mode_equals_diffusers_ip_adapter_masks(boxes, num_tokens, dim_head):
    attn, parent = make_layer(dim_head=dim_head, num_tokens=num_tokens)
    x, text, images = make_inputs(attn, S=len(boxes), T=num_tokens)
    masks = binary_masks(boxes, GRID)
    # The premise: diffusers' per-layer resize leaves these masks exactly as they are.
    for s in range(len(boxes)):
        down = IPAdapterMaskProcessor.downsample(masks[:, s], 2, GRID[0] * GRID[1], attn.inner_dim)
        assert torch.equal(down[0, :, 0], masks[0, s].reshape(-1))
    parent.scale = [[0.5, 1.25, 0.75]]                   # diffusers' per-image scales
    expected = run(attn, parent, x, text, images, ip_adapter_masks=[masks])

    anyms = AnyMSAttnProcessor.from_ip_adapter_processor(parent)
    anyms.layout = Layout(boxes, GRID, scales=[0.5, 1.25, 0.75], mode="sum")
    parent.scale[0] = 1.0                                  # shared list: lambda_s from the layout alone
    actual = run(attn, anyms, x, text, images)
    assert_close(actual, expected, **FP32, what="sum mode vs IPAdapterAttnProcessor2_0 + masks")


@pytest.mark.parametrize("with_masks", [False, True])
def test_no_layout_is_bitwise_the_parent(with_masks):
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=3)
    kwargs = {"ip_adapter_masks": [binary_masks(OVERLAP, GRID)]} if with_masks else {}
    expected = run(attn, parent, x, text, images, **kwargs)
    actual = run(attn, AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout=None), x, text, images, **kwargs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("mode", ["overwrite", "sum"])
@pytest.mark.parametrize("boxes", [DISJOINT, OVERLAP, NESTED], ids=["disjoint", "overlap", "nested"])
def test_layer_matches_reference_in_float64(mode, boxes):
    attn, parent = make_layer(heads=3, dim_head=40)
    attn.double()
    x, text, images = make_inputs(attn, S=3, dtype=torch.float64)
    layout = Layout(boxes, GRID, scales=[0.7, 1.0, 1.6], mode=mode)
    actual = run(attn, AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout), x, text, images)
    expected = reference_layer(attn, parent, x, text, images, layout, GRID)
    assert_close(actual, expected, atol=1e-10, rtol=1e-10, what=f"{mode} vs float64 reference")


@pytest.mark.parametrize("boxes,overlapping", [(DISJOINT, False), (OVERLAP, True), (NESTED, True)],
                         ids=["disjoint", "overlap", "nested"])
def test_overwrite_and_sum_differ_exactly_on_overlaps(boxes, overlapping):
    attn, parent = make_layer()
    attn.double()
    x, text, images = make_inputs(attn, S=3, dtype=torch.float64)
    outs = {}
    for mode in ("overwrite", "sum"):
        proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(boxes, GRID, mode=mode))
        outs[mode] = run(attn, proc, x, text, images)
    diff = (outs["overwrite"] - outs["sum"]).abs().amax(dim=(0, 2))         # per token
    count = coverage_count(rasterize_boxes(torch.tensor(boxes), GRID), GRID)
    assert diff[count <= 1].max() < 1e-12, "tokens under at most one box must agree in both modes"
    if overlapping:
        assert (count >= 2).any()
        assert diff[count >= 2].min() > 1e-6, "every token under two or more boxes must differ"
    # Where they differ, "sum" adds the covered lower-priority subjects that "overwrite" drops (METHOD.md):
    # both equal the float64 reference of their own mode, so the difference is exactly that.
    for mode in ("overwrite", "sum"):
        expected = reference_layer(attn, parent, x, text, images, Layout(boxes, GRID, mode=mode), GRID)
        assert_close(outs[mode], expected, atol=1e-10, rtol=1e-10, what=mode)


def test_cfg_batch_halves_share_the_layout_and_do_not_mix():
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=3, B=2)
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(OVERLAP, GRID))
    both = run(attn, proc, x, text, images)
    for b in range(2):
        alone = run(attn, proc, x[b:b + 1], text[b:b + 1], images[b:b + 1])
        assert_close(both[b:b + 1], alone, **FP32, what=f"batch row {b} run alone")


def test_per_subject_scales_and_the_processor_scale_multiply():
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=3)
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(OVERLAP, GRID, scales=[0.0, 0.5, 2.0]))
    parent.scale[0] = 0.8                                  # what set_ip_adapter_scale writes
    actual = run(attn, proc, x, text, images)
    expected = reference_layer(attn, parent, x, text, images, proc.layout, GRID, ip_scale=0.8)
    assert_close(actual, expected, **FP32, what="lambda_s = layout scale * ip scale")
    # A per-image list in the IP-Adapter scale acts per subject too.
    parent.scale[0] = [1.0, 0.25, 3.0]
    actual = run(attn, proc, x, text, images)
    expected = reference_layer(attn, parent, x, text, images, proc.layout, GRID, ip_scale=[1.0, 0.25, 3.0])
    assert_close(actual, expected, **FP32, what="per-image ip scale list")


def test_text_key_mask_as_diffusers_passes_it():
    """UNet2DConditionModel turns encoder_attention_mask into 0/-10000 biases [B, 1, L]; the
    text branch must see the same mask as the parent's SDPA (sum mode with masks = parent)."""
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=3)
    keep = torch.ones(2, 77, dtype=torch.bool)
    keep[0, 40:] = False
    keep[1, 5:20] = False
    bias = ((1 - keep.float()) * -10000.0).unsqueeze(1)
    masks = binary_masks(OVERLAP, GRID)
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(OVERLAP, GRID, mode="sum"))
    for mask in (bias, keep):                              # additive bias and bool [B, L]
        expected = run(attn, parent, x, text, images, attention_mask=mask, ip_adapter_masks=[masks])
        actual = run(attn, proc, x, text, images, attention_mask=mask)
        assert_close(actual, expected, **FP32, what=f"text mask {mask.dtype}")
    unmasked = run(attn, proc, x, text, images)
    assert not torch.allclose(unmasked, actual), "the mask must change the result"


def test_four_d_hidden_states_norms_residual_and_rescale():
    attn, parent = make_layer(heads=2, dim_head=32, residual_connection=True, rescale_output_factor=2.0,
                              norm_num_groups=8, spatial_norm_dim=6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, attn.query_dim, *GRID, generator=g)
    temb = torch.randn(2, 6, 5, 7, generator=g)
    text = torch.randn(2, 77, attn.cross_attention_dim, generator=g)
    images = torch.randn(2, 3, 4, attn.cross_attention_dim, generator=g)
    masks = binary_masks(OVERLAP, GRID)
    expected = run(attn, parent, x, text, images, temb=temb, ip_adapter_masks=[masks])
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(OVERLAP, GRID, mode="sum"))
    actual = run(attn, proc, x, text, images, temb=temb)
    assert actual.shape == x.shape
    assert_close(actual, expected, **FP32, what="4-D input with group/spatial norm, residual, rescale")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    """Self-calibrating: AnyMS's error against float64 is at most 2x diffusers' own in that dtype."""
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=3)
    masks = binary_masks(OVERLAP, GRID)
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(OVERLAP, GRID, mode="sum"))
    attn.double()
    ref = run(attn, parent, x.double(), text.double(), images.double(), ip_adapter_masks=[masks.double()])
    attn.to(dtype)
    try:
        theirs = run(attn, parent, x.to(dtype), text.to(dtype), images.to(dtype), ip_adapter_masks=[masks])
    except RuntimeError as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch cannot run diffusers' processor in {dtype} on CPU: {exc}")
    ours = run(attn, proc, x.to(dtype), text.to(dtype), images.to(dtype))
    assert ours.dtype == dtype and not torch.isnan(ours).any()
    err = (ours.double() - ref).abs().max().item()
    base = (theirs.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, f"{dtype}: error {err:.3g} vs diffusers' {base:.3g}"


def test_layer_errors_name_the_argument():
    attn, parent = make_layer()
    x, text, images = make_inputs(attn, S=3)
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout(OVERLAP[:2], GRID))
    with pytest.raises(ValueError, match=r"S=3 images.*2 regions"):
        run(attn, proc, x, text, images)
    proc.layout = Layout(OVERLAP, GRID)
    with pytest.raises(ValueError, match="ip_adapter_masks"):
        run(attn, proc, x, text, images, ip_adapter_masks=[binary_masks(OVERLAP, GRID)])
    attn.set_processor(proc)
    with pytest.raises(ValueError, match="encoder_hidden_states must be the tuple"):
        attn(x, encoder_hidden_states=text)
    soft = torch.full((2, 1, 77), -1.0)
    with pytest.raises(ValueError, match="attention_mask holds soft biases"):
        run(attn, proc, x, text, images, attention_mask=soft)
    with pytest.raises(ValueError, match="latent"):     # a layout made for another latent size
        proc.layout = Layout(OVERLAP, (16, 16))
        run(attn, proc, x, text, images)
    with pytest.raises(TypeError, match="layout must be an anyms.layout.Layout"):
        AnyMSAttnProcessor.from_ip_adapter_processor(parent, layout=[[0, 0, 1, 1]])


# ------------------------------------------------------------- whole (tiny) U-Nets
def _unet(pipe, kwargs):
    with torch.no_grad():
        return pipe.unet(**kwargs).sample


def test_apply_remove_round_trip_restores_processors_and_output(tiny_sdxl_pipe, unet_inputs):
    pipe = tiny_sdxl_pipe
    kwargs = unet_inputs(pipe, S=3)
    before = dict(pipe.unet.attn_processors)
    keys = set(pipe.unet.state_dict())
    out_before = _unet(pipe, kwargs)

    unet = apply_anyms(pipe, Layout(OVERLAP, (13, 21)))
    assert unet is pipe.unet
    converted = {k: p for k, p in unet.attn_processors.items() if isinstance(p, AnyMSAttnProcessor)}
    ip_names = {k for k, p in before.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
    assert set(converted) == ip_names and ip_names
    for name, proc in converted.items():                  # shared modules, not copies
        assert proc.to_k_ip is before[name].to_k_ip and proc.to_v_ip is before[name].to_v_ip
        assert proc.scale is before[name].scale
    assert set(unet.state_dict()) == keys, "no weight may be registered twice or renamed"
    out_anyms = _unet(pipe, kwargs)
    assert not torch.allclose(out_anyms, out_before)
    assert apply_anyms(pipe, Layout(OVERLAP, (13, 21))) is unet                      # idempotent
    assert all(unet.attn_processors[k] is p for k, p in converted.items())

    remove_anyms(pipe)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(_unet(pipe, kwargs), out_before)
    remove_anyms(pipe)                                     # nothing left to remove: a no-op
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)


def test_context_manager_restores_and_keeps_prior_layout(tiny_sdxl_pipe, unet_inputs):
    pipe = tiny_sdxl_pipe
    before = dict(pipe.unet.attn_processors)
    with anyms_attention(pipe, Layout(DISJOINT, (13, 21))) as unet:
        assert all(isinstance(p, AnyMSAttnProcessor) for k, p in unet.attn_processors.items() if k in before
                   and isinstance(before[k], IPAdapterAttnProcessor2_0))
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)
    # Already applied with a layout: the block's layout is temporary, the AnyMS processors stay.
    first = Layout(OVERLAP, (13, 21))
    apply_anyms(pipe, first)
    applied = dict(pipe.unet.attn_processors)
    with anyms_attention(pipe, Layout(DISJOINT, (13, 21))):
        pass
    assert all(pipe.unet.attn_processors[k] is applied[k] for k in applied)
    assert {p.layout for p in applied.values() if isinstance(p, AnyMSAttnProcessor)} == {first}


def test_full_box_equals_plain_ip_adapter_in_pipeline_with_cfg(tiny_sdxl_pipe):
    """One subject whose box is the whole image is plain IP-Adapter, through the real
    pipeline with classifier-free guidance (both halves of the batch share the layout)."""
    from PIL import Image

    pipe = tiny_sdxl_pipe
    g = torch.Generator().manual_seed(5)
    image = Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy())

    def generate():
        return pipe("a cat", ip_adapter_image=[[image]], num_inference_steps=2, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    plain = generate()
    with anyms_attention(pipe, Layout([[0.0, 0.0, 1.0, 1.0]], (16, 16))):
        full = generate()
    with anyms_attention(pipe, Layout([[0.0, 0.0, 0.5, 0.5]], (16, 16))):
        quarter = generate()
    assert_close(full, plain, atol=1e-5, rtol=1e-5, what="full-image box vs plain IP-Adapter")
    assert not torch.allclose(quarter, plain, atol=1e-4)


def test_sd15_head_dims(tiny_sd15_pipe, unet_inputs):
    """SD 1.5's head dims (40, 80): disjoint boxes give the same U-Net output in both modes."""
    pipe = tiny_sd15_pipe
    kwargs = unet_inputs(pipe, S=3, latent_hw=(12, 10))
    outs = [_unet(pipe, kwargs)]
    for mode in ("overwrite", "sum"):
        with anyms_attention(pipe, Layout(DISJOINT, (12, 10), mode=mode)):
            outs.append(_unet(pipe, kwargs))
    assert_close(outs[1], outs[2], **FP32, what="disjoint boxes, overwrite vs sum")
    assert not torch.allclose(outs[0], outs[1])


def test_set_ip_adapter_scale_is_honoured(tiny_sdxl_pipe, unet_inputs):
    pipe = tiny_sdxl_pipe
    kwargs = unet_inputs(pipe, S=3)
    apply_anyms(pipe, Layout(OVERLAP, (13, 21), scales=0.5))
    pipe.set_ip_adapter_scale(1.0)
    half_by_layout = _unet(pipe, kwargs)
    set_anyms_layout(pipe, Layout(OVERLAP, (13, 21), scales=1.0))
    pipe.set_ip_adapter_scale(0.5)
    half_by_pipe = _unet(pipe, kwargs)
    assert_close(half_by_pipe, half_by_layout, **FP32, what="set_ip_adapter_scale(0.5) vs layout scale 0.5")
    pipe.set_ip_adapter_scale(0.0)
    no_subjects = _unet(pipe, kwargs)
    assert not torch.allclose(no_subjects, half_by_pipe)
    # The original processors share the scale list: after removal they keep what the user set.
    originals = remove_anyms(pipe).attn_processors
    assert {p.scale[0] for p in originals.values() if isinstance(p, IPAdapterAttnProcessor2_0)} == {0.0}


def test_unload_ip_adapter_removes_anyms_too(tiny_sdxl_pipe, unet_inputs):
    pipe = tiny_sdxl_pipe
    apply_anyms(pipe, Layout(OVERLAP, (13, 21)))
    pipe.unload_ip_adapter()
    procs = pipe.unet.attn_processors.values()
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in procs)
    assert all(isinstance(p, AttnProcessor2_0) for p in procs)
    remove_anyms(pipe)                                     # nothing to restore: must not resurrect
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    with pytest.raises(ValueError, match=r"load_ip_adapter"):
        apply_anyms(pipe)


def test_accelerate_offload_hooks_survive(tiny_sdxl_pipe, unet_inputs):
    """Sequential CPU offload puts every weight on the meta device and loads it in a hook at
    each module's forward; AnyMS must run through those hooks (shared to_k_ip modules)."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    pipe = tiny_sdxl_pipe
    kwargs = unet_inputs(pipe, S=3)
    layout = Layout(NESTED, (13, 21))
    with anyms_attention(pipe, layout):
        expected = _unet(pipe, kwargs)
    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    some_ip = next(p for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0))
    assert some_ip.to_k_ip[0].weight.device.type == "meta"
    with anyms_attention(pipe, layout):                    # applied after the hooks, as a pipeline does
        actual = _unet(pipe, kwargs)
    assert_close(actual, expected, **FP32, what="with sequential-offload hooks")
    remove_hook_from_module(pipe.unet, recurse=True)


def test_install_errors_name_the_argument(tiny_sdxl_pipe, unet_inputs):
    from diffusers import StableDiffusionXLPipeline

    from anyms.tiny import tiny_pipeline

    bare = tiny_pipeline(StableDiffusionXLPipeline, with_ip_adapter=False)
    with pytest.raises(ValueError, match=r"load an IP-Adapter first with pipe\.load_ip_adapter"):
        apply_anyms(bare)
    with pytest.raises(TypeError, match="pipe_or_unet"):
        apply_anyms(object())
    with pytest.raises(ValueError, match="apply_anyms"):
        set_anyms_layout(tiny_sdxl_pipe, None)
    with pytest.raises(TypeError, match="layout"):
        apply_anyms(tiny_sdxl_pipe, layout="boxes")
    apply_anyms(tiny_sdxl_pipe, Layout(OVERLAP[:2], (13, 21)))
    with pytest.raises(ValueError, match=r"S=3 images per prompt but the layout has 2 regions"):
        _unet(tiny_sdxl_pipe, unet_inputs(tiny_sdxl_pipe, S=3))


def test_plus_adapter_sixteen_tokens(unet_inputs):
    """The 16-token "plus" adapter: disjoint boxes agree in both modes, a layout changes the output."""
    from diffusers import StableDiffusionXLPipeline

    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(StableDiffusionXLPipeline, plus=True, seed=2)
    kwargs = unet_inputs(pipe, S=3)
    plain = _unet(pipe, kwargs)
    outs = {}
    for mode in ("overwrite", "sum"):
        with anyms_attention(pipe, Layout(DISJOINT, (13, 21), mode=mode)):
            outs[mode] = _unet(pipe, kwargs)
    assert_close(outs["overwrite"], outs["sum"], **FP32, what="plus adapter, disjoint boxes")
    assert not torch.allclose(outs["overwrite"], plain)


# ------------------------------------------------------------------------ structure
def _imports_of(module: str) -> set:
    """The anyms modules that anyms/<module>.py imports, at any depth of its code (functions too)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "anyms"
    names = {p.stem for p in root.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse((root / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anyms."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("anyms."))
    return found & names


def _reachable(module: str) -> set:
    seen, todo = set(), [module]
    while todo:
        for dep in _imports_of(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_unet_and_flux_processors_share_a_layer_and_do_not_import_each_other():
    assert "flux" not in _reachable("processor")         # no circle: the U-Net's side never reaches FLUX's
    assert "processor" not in _imports_of("flux")        # (FLUX's pipeline reaches it through anyms.pipeline's Subject)
    assert {"processor", "flux", "pipeline"}.isdisjoint(_reachable("branches"))
    assert "branches" in _imports_of("processor") and "branches" in _imports_of("flux")


def test_the_top_level_install_functions_know_both_processors():
    """``anyms.apply_anyms`` converts U-Net and FLUX processors whatever was imported before;
    ``anyms.branches.apply_anyms`` alone names the module to import for a FLUX transformer."""
    import subprocess
    import sys

    code = (
        "import sys, anyms\n"
        "from anyms.tiny_flux import tiny_flux_pipeline\n"
        "pipe = tiny_flux_pipeline()\n"
        "from anyms.branches import apply_anyms\n"
        "assert 'anyms.flux' not in sys.modules\n"
        "try:\n"
        "    apply_anyms(pipe)\n"
        "except ValueError as e:\n"
        "    print('ERROR', e)\n"
        "anyms.apply_anyms(pipe)\n"
        "print(sorted({type(p).__name__ for p in pipe.transformer.attn_processors.values()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("ERROR pipe_or_unet's IP-Adapter processors are FluxIPAdapterAttnProcessor, whose AnyMS processor is "
            "defined in anyms.flux: import it first") in out.stdout
    assert "AnyMSFluxAttnProcessor" in out.stdout.splitlines()[-1]
