"""The AnyMS pipelines against the contracts of diffusers' own fast pipeline tests.

Our tests, not diffusers' (nothing vendored): each one follows a test of
``tests/pipelines/test_pipelines_common.py`` (``PipelineTesterMixin``,
``IPAdapterTesterMixin``) with ``pipeline_class`` set to an AnyMS pipeline, and also
runs it with ``subjects=``: the call signature, CFG, ``num_images_per_prompt``, the
step-end callbacks, save and load (``DiffusionPipeline`` and ``AutoPipeline`` too),
``set_default_attn_processor``, attention slicing, and ``torch.compile(fullgraph=True)``
over a ``subjects=`` call. Tiny random models (anyms.tiny), CPU, 2 steps.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline, StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
)
from diffusers.loaders import IPAdapterMixin
from diffusers.models.attention_processor import (
    AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0, SlicedAttnProcessor,
)

from anyms import Subject
from anyms.layout import Layout
from anyms.pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline
from anyms.processor import AnyMSAttnProcessor, apply_anyms, remove_anyms
from anyms.tiny import save_tiny_ip_adapter, tiny_image_encoder, tiny_image_processor, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
LEFT, RIGHT = (0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0)
PAIRS = {"sdxl": (AnyMSStableDiffusionXLPipeline, StableDiffusionXLPipeline),
         "sd15": (AnyMSStableDiffusionPipeline, StableDiffusionPipeline)}
# diffusers' tests/pipelines/pipeline_params.py: TEXT_TO_IMAGE_PARAMS, and PipelineTesterMixin's
# required_optional_params (always optional, with defaults).
TEXT_TO_IMAGE_PARAMS = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds",
                        "negative_prompt_embeds", "cross_attention_kwargs"}
REQUIRED_OPTIONAL_PARAMS = {"num_inference_steps", "num_images_per_prompt", "generator", "latents",
                            "output_type", "return_dict"}
# float32 CPU; attention slicing computes the other layers' attention head by head (diffusers'
# test allows 1e-3 on images; on 2-step latents the measured difference is below 1e-5).
SLICING_TOL = dict(rtol=1e-4, atol=1e-4)


def run(pipe, prompt="a cat and a dog", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def subjects(subject_images):
    return [Subject(subject_images[0], LEFT), Subject(subject_images[1], RIGHT, scale=0.8)]


# ------------------------------------------------------------------------ signature
@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_call_signature_is_the_parents_plus_anyms_keywords(kind):
    ours, parent = PAIRS[kind]
    mine = list(inspect.signature(ours.__call__).parameters.values())
    theirs = list(inspect.signature(parent.__call__).parameters.values())
    # the parent's parameters, in order, same kinds and defaults; then ours, keyword-only; then **kwargs
    assert [(p.name, p.kind, p.default) for p in mine[:len(theirs) - 1]] == \
           [(p.name, p.kind, p.default) for p in theirs[:-1]]
    assert [(p.name, p.kind, p.default) for p in mine[len(theirs) - 1:-1]] == \
           [(n, inspect.Parameter.KEYWORD_ONLY, None) for n in ("subjects", "anyms_mode", "anyms_priority", "anyms_blocks")]
    assert theirs[-1].kind is mine[-1].kind is inspect.Parameter.VAR_KEYWORD
    # PipelineTesterMixin.test_pipeline_call_signature, IPAdapterTesterMixin.test_pipeline_signature
    names = {p.name for p in mine} - {"self", "kwargs"}
    optional = {p.name for p in mine if p.default is not inspect.Parameter.empty}
    assert TEXT_TO_IMAGE_PARAMS <= names and REQUIRED_OPTIONAL_PARAMS <= optional
    assert {"ip_adapter_image", "ip_adapter_image_embeds", "callback_on_step_end",
            "callback_on_step_end_tensor_inputs"} <= names
    assert issubclass(ours, IPAdapterMixin)


def test_arguments_bind_as_in_the_parent(anyms_and_diffusers, subjects):
    ours, theirs = anyms_and_diffusers()
    # positional arguments after the prompt (prompt_2, height) reach the parent as such
    image = subjects[0].image
    got = ours("a cat", "a dog", 64, ip_adapter_image=image, num_inference_steps=STEPS, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    want = theirs("a cat", "a dog", 64, ip_adapter_image=image, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    assert got.shape[-2] == 8
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with_subjects = ours("a cat", "a dog", 64, subjects=[Subject(image, (0, 0, 1, 1))], num_inference_steps=STEPS,
                         output_type="latent", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(with_subjects, want, rtol=1e-6, atol=1e-5)
    with pytest.raises(TypeError, match="multiple values for argument 'height'"):
        ours("a cat", "a dog", 64, height=64, subjects=subjects)


# ------------------------------------------------------------------ CFG and batches
@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_cfg(anyms_and_diffusers, subjects, kind):
    """PipelineTesterMixin.test_cfg and IPAdapterTesterMixin.test_ip_adapter_cfg, with subjects."""
    ours, _ = anyms_and_diffusers(kind)
    no_cfg = run(ours, subjects=subjects, guidance_scale=1.0)
    cfg = run(ours, subjects=subjects, guidance_scale=7.5)
    assert cfg.shape == no_cfg.shape
    assert (cfg - no_cfg).abs().max() > 1e-3


def test_num_images_per_prompt(anyms_and_diffusers, subjects):
    """PipelineTesterMixin.test_num_images_per_prompt, with subjects: batch sizes 1 and 2."""
    ours, _ = anyms_and_diffusers()
    for batch_size in (1, 2):
        for per_prompt in (1, 2):
            out = run(ours, ["a cat"] * batch_size, subjects=subjects, num_images_per_prompt=per_prompt)
            assert out.shape[0] == batch_size * per_prompt


# ---------------------------------------------------------------------- callbacks
@pytest.mark.parametrize("with_subjects", [True, False], ids=["subjects", "plain"])
def test_callback_inputs(anyms_and_diffusers, subjects, with_subjects):
    """PipelineTesterMixin.test_callback_inputs: a subset, all of _callback_tensor_inputs, and a
    callback that changes the latents (zeros at the last step give a zero output)."""
    ours, _ = anyms_and_diffusers()
    extra = dict(subjects=subjects) if with_subjects else dict(ip_adapter_image=subjects[0].image)
    allowed = ours._callback_tensor_inputs
    seen = []

    def subset(pipe, i, t, tensors):
        assert set(tensors) <= set(allowed)
        seen.append(set(tensors))
        return tensors

    def every(pipe, i, t, tensors):
        assert set(tensors) == set(allowed)
        return tensors

    def zero_last(pipe, i, t, tensors):
        if i == pipe.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    run(ours, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"], **extra)
    assert seen == [{"latents"}] * STEPS
    run(ours, callback_on_step_end=every, callback_on_step_end_tensor_inputs=allowed, **extra)
    out = run(ours, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=allowed, **extra)
    assert out.abs().sum() == 0


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_callback_cfg(anyms_and_diffusers, subjects, kind):
    """PipelineTesterMixin.test_callback_cfg: the callback raises the guidance scale every step."""
    ours, _ = anyms_and_diffusers(kind)

    def raise_guidance(pipe, i, t, tensors):
        pipe._guidance_scale += 1.0
        return tensors

    run(ours, subjects=subjects, guidance_scale=2.0, callback_on_step_end=raise_guidance,
        callback_on_step_end_tensor_inputs=ours._callback_tensor_inputs)
    assert ours.guidance_scale == 2.0 + ours.num_timesteps


# ------------------------------------------------------------------ save and load
def test_save_pretrained_loads_in_diffusers_and_as_anyms(tmp_path, subject_images, subjects):
    """PipelineTesterMixin.test_save_load_local, and the folder in DiffusionPipeline / AutoPipeline."""
    ours = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0, with_ip_adapter=False)
    expected = run(ours)
    ours.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"     # AnyMS adds no weights, no config

    for loader, cls in ((DiffusionPipeline, StableDiffusionXLPipeline),
                        (AutoPipelineForText2Image, StableDiffusionXLPipeline),
                        (AnyMSStableDiffusionXLPipeline, AnyMSStableDiffusionXLPipeline)):
        loaded = loader.from_pretrained(tmp_path / "model")
        assert type(loaded) is cls, loader
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0, msg=lambda m: f"{loader}: {m}")
    assert type(AutoPipelineForImage2Image.from_pretrained(tmp_path / "model")) is StableDiffusionXLImg2ImgPipeline

    # the AnyMS pipeline loaded from the folder takes subjects like the one that wrote it
    weight = save_tiny_ip_adapter(tmp_path / "adapter", ours.unet, tiny_image_encoder(4))
    for pipe in (ours, loaded):
        pipe.register_modules(feature_extractor=tiny_image_processor())
        pipe.load_ip_adapter(str(tmp_path / "adapter"), subfolder="", weight_name=weight)
    torch.testing.assert_close(run(loaded, subjects=subjects), run(ours, subjects=subjects), rtol=0, atol=0)
    # a second save from an AnyMS pipeline that ran subjects= writes the same folder kind
    loaded.unload_ip_adapter()
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"] == \
           "StableDiffusionXLPipeline"


def test_sd15_folder_names_its_parent(tmp_path):
    ours = tiny_pipeline(AnyMSStableDiffusionPipeline, kind="sd15", seed=0, with_ip_adapter=False)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert type(AutoPipelineForText2Image.from_pretrained(tmp_path)) is StableDiffusionPipeline


# ------------------------------------------------------------- attention processors
def test_set_default_attn_processor_after_apply_anyms(anyms_and_diffusers, subjects):
    """PipelineTesterMixin resets every component with set_default_attn_processor(): with AnyMS
    processors installed it resets them as it resets diffusers' IP-Adapter processors."""
    ours, theirs = anyms_and_diffusers()
    apply_anyms(ours, Layout([list(LEFT)], (16, 16)))
    assert any(isinstance(p, AnyMSAttnProcessor) for p in ours.unet.attn_processors.values())
    ours.unet.set_default_attn_processor()
    theirs.unet.set_default_attn_processor()
    assert {type(p) for p in ours.unet.attn_processors.values()} == \
           {type(p) for p in theirs.unet.attn_processors.values()} == {AttnProcessor}
    remove_anyms(ours)                        # nothing of AnyMS is left: a no-op
    assert {type(p) for p in ours.unet.attn_processors.values()} == {AttnProcessor}
    # the adapter's processors are gone (as in diffusers): subjects= says so, before any model work
    with pytest.raises(ValueError, match="no attention processor of the U-Net holds its to_k_ip"):
        run(ours, subjects=subjects)


def test_set_default_attn_processor_after_a_subjects_call(anyms_and_diffusers, subjects):
    ours, _ = anyms_and_diffusers()
    run(ours, subjects=subjects)
    ours.unet.set_default_attn_processor()
    assert {type(p) for p in ours.unet.attn_processors.values()} == {AttnProcessor}


def test_the_class_equality_is_only_with_the_parent():
    """The processor class equals IPAdapterAttnProcessor2_0 for diffusers' `in` test, nothing else."""
    assert AnyMSAttnProcessor == IPAdapterAttnProcessor2_0 and IPAdapterAttnProcessor2_0 == AnyMSAttnProcessor
    assert not AnyMSAttnProcessor != IPAdapterAttnProcessor2_0
    assert AnyMSAttnProcessor != AttnProcessor2_0 and AnyMSAttnProcessor != AttnProcessor
    assert AnyMSAttnProcessor is not IPAdapterAttnProcessor2_0
    assert hash(AnyMSAttnProcessor) != hash(IPAdapterAttnProcessor2_0)
    assert {AnyMSAttnProcessor: 1}.get(IPAdapterAttnProcessor2_0) is None


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_attention_slicing_keeps_the_ip_adapter(anyms_and_diffusers, subject_images, subjects, kind):
    """PipelineTesterMixin.test_attention_slicing_forward_pass, with subjects and with a plain
    IP-Adapter image: slicing does not change the result. (diffusers' own slicing replaces the
    adapter's processors: its ip_adapter_image call then fails.)"""
    ours, _ = anyms_and_diffusers(kind)
    want_subjects = run(ours, subjects=subjects)
    want_plain = run(ours, ip_adapter_image=subject_images[0])
    for size in (1, "max"):                       # the tiny U-Nets have 1-2 heads a layer
        ours.enable_attention_slicing(slice_size=size)
        procs = ours.unet.attn_processors
        assert {type(p) for n, p in procs.items() if "attn1" in n} == {SlicedAttnProcessor}
        assert {type(p) for n, p in procs.items() if "attn2" in n} == {IPAdapterAttnProcessor2_0}
        torch.testing.assert_close(run(ours, subjects=subjects), want_subjects, **SLICING_TOL)
        torch.testing.assert_close(run(ours, ip_adapter_image=subject_images[0]), want_plain, **SLICING_TOL)
    ours.disable_attention_slicing()
    procs = ours.unet.attn_processors
    assert {type(p) for n, p in procs.items() if "attn1" in n} == {AttnProcessor2_0}
    assert {type(p) for n, p in procs.items() if "attn2" in n} == {IPAdapterAttnProcessor2_0}
    torch.testing.assert_close(run(ours, subjects=subjects), want_subjects, rtol=1e-6, atol=1e-6)


def test_a_replaced_adapter_processor_is_named_not_a_missing_adapter(anyms_and_diffusers, subjects):
    """The U-Net's own set_attention_slice replaces the adapter's processors: the error says so."""
    ours, _ = anyms_and_diffusers()
    calls = []
    ours.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    ours.unet.set_attention_slice(1)
    with pytest.raises(ValueError, match=r"an IP-Adapter is loaded .* are SlicedAttnProcessor;.* Load the adapter"):
        run(ours, subjects=subjects)
    assert calls == []


# ------------------------------------------------------------------ torch.compile
def test_the_denoising_loop_only_reads_the_layout(anyms_and_diffusers, subjects):
    """The call builds the routing of every U-Net level when it makes the layout; the U-Net's
    layers look it up and build nothing (what a fullgraph compile needs)."""
    ours, _ = anyms_and_diffusers()
    built = []

    def at_step(pipe, i, t, tensors):
        layout = pipe.anyms_last_plan.layout
        built.append(({(g, d) for g, d, _ in layout._routing}, set(layout._scale_cache)))
        return tensors

    run(ours, subjects=subjects, height=72, width=104, callback_on_step_end=at_step)   # latent 9x13
    layout = ours.anyms_last_plan.layout
    cpu = torch.device("cpu")
    grids = {((9, 13), cpu), ((5, 7), cpu), ((3, 4), cpu)}    # the tiny SDXL U-Net's three levels
    assert built == [(grids, {cpu})] * STEPS
    assert {(g, d) for g, d, _ in layout._routing} == grids


def test_prepare_builds_every_level():
    layout = Layout([list(LEFT), list(RIGHT)], (9, 13))
    assert layout.prepare("cpu", levels=4) is layout
    assert set(g for g, _, _ in layout._routing) == {(9, 13), (5, 7), (3, 4), (2, 2)}
    with pytest.raises(ValueError, match="levels must be a positive int"):
        layout.prepare("cpu", levels=0)


@pytest.mark.slow
def test_compiled_unet_fullgraph_over_subjects_calls(anyms_and_diffusers, subject_images, monkeypatch):
    """torch.compile(pipe.unet, fullgraph=True) over subjects= calls: no graph break, the eager
    result, and one graph for two layouts (new boxes, scales, processors: no recompile; the mode,
    the number of subjects and the image size are part of the graph). aot_eager traces the op's
    fake implementation too; about 20 s on 2 cores. The compiled U-Net builds no routing: the
    calls build as many as eager calls do (each layout's levels, before the U-Net runs)."""
    from anyms_kernels import routing as routing_module

    ours, _ = anyms_and_diffusers()
    a, b = subject_images[:2]
    first = [Subject(a, LEFT), Subject(b, RIGHT)]
    second = [Subject(b, (0.1, 0.2, 0.5, 0.9)), Subject(a, (0.3, 0.0, 1.0, 0.7), scale=0.5)]
    builds = []
    real_sort = routing_module._sort_tokens
    monkeypatch.setattr(routing_module, "_sort_tokens", lambda *a: (builds.append(1), real_sort(*a))[1])
    want = [run(ours, subjects=first), run(ours, subjects=second, anyms_priority="smaller_on_top")]
    eager_builds, builds[:] = len(builds), []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_unet = ours.unet
    ours.unet = torch.compile(eager_unet, fullgraph=True, backend="aot_eager")
    try:
        got = [run(ours, subjects=first), run(ours, subjects=second, anyms_priority="smaller_on_top")]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        ours.unet = eager_unet
        torch._dynamo.reset()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert graphs == 1
    assert len(builds) == eager_builds == 6      # two layouts, three U-Net levels each
