"""``from_pipe`` between AnyMS pipelines, their diffusers parents and diffusers' AutoPipeline classes.

Tiny random pipelines (anyms.tiny, anyms.tiny_flux), 2 steps, latents compared.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image,
                       FluxImg2ImgPipeline, FluxPipeline, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.pipelines import auto_pipeline
from PIL import Image

from anyms import Subject, auto_pipeline as anyms_auto
from anyms.flux import AnyMSFluxPipeline
from anyms.pipeline import AnyMSStableDiffusionPipeline, AnyMSStableDiffusionXLPipeline
from anyms.tiny import tiny_pipeline
from anyms.tiny_flux import tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {
    "sdxl": (AnyMSStableDiffusionXLPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline,
             StableDiffusionXLInpaintPipeline),
    "sd15": (AnyMSStableDiffusionPipeline, StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
             StableDiffusionInpaintPipeline),
    "flux": (AnyMSFluxPipeline, FluxPipeline, FluxImg2ImgPipeline, None),
}


def make(kind, cls):
    return tiny_flux_pipeline(cls, seed=0) if kind == "flux" else tiny_pipeline(cls, kind=kind, seed=0)


def run(pipe, kind, **kwargs):
    size = dict(height=128, width=128) if kind == "flux" else {}
    return pipe("a cat and a dog", num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **size, **kwargs).images


def images():
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture
def restore_registration():
    """Tests that unregister put the registration back as the imports left it."""
    yield
    anyms_auto.register_auto_pipelines(AnyMSStableDiffusionXLPipeline, AnyMSStableDiffusionPipeline,
                                       AnyMSFluxPipeline)


@pytest.mark.parametrize("kind", ["sdxl", "sd15", "flux"])
def test_auto_pipelines_take_an_anyms_pipeline_as_its_parent(kind):
    ours_cls, parent, img2img, inpaint = KINDS[kind]
    ours = make(kind, ours_cls)
    t2i = AutoPipelineForText2Image.from_pipe(ours)
    assert type(t2i) is parent
    denoiser = "transformer" if kind == "flux" else "unet"
    assert getattr(t2i, denoiser) is getattr(ours, denoiser)          # modules shared, not copied
    assert t2i.image_encoder is ours.image_encoder
    assert type(AutoPipelineForImage2Image.from_pipe(ours)) is img2img
    if inpaint is not None:
        assert type(AutoPipelineForInpainting.from_pipe(ours)) is inpaint


@pytest.mark.parametrize("kind", ["sdxl", "sd15", "flux"])
def test_from_pipe_from_a_plain_pipeline_to_anyms_and_back(kind):
    """``AnyMS...Pipeline.from_pipe(plain)`` takes subjects; ``Parent.from_pipe(anyms)`` is plain
    diffusers again, sharing the modules (the AnyMS call left no AnyMS processor behind)."""
    ours_cls, parent, _, _ = KINDS[kind]
    plain = make(kind, parent)
    dog, cat = images()
    expected_plain = run(plain, kind, ip_adapter_image=dog)

    ours = ours_cls.from_pipe(plain)
    assert type(ours) is ours_cls
    subjects = [Subject(dog, (0.0, 0.0, 0.5, 1.0)), Subject(cat, (0.5, 0.0, 1.0, 1.0))]
    with_subjects = run(ours, kind, subjects=subjects)
    assert (with_subjects - expected_plain).abs().max() > 1e-3     # the layout acted

    back = parent.from_pipe(ours)
    assert type(back) is parent
    if kind != "flux":
        assert all(type(p) is IPAdapterAttnProcessor2_0 for name, p in back.unet.attn_processors.items()
                   if "attn2" in name)
    # same modules, same operations: the same bytes as the first plain call
    torch.testing.assert_close(run(back, kind, ip_adapter_image=dog), expected_plain, rtol=0, atol=0)
    auto = AutoPipelineForText2Image.from_pipe(ours)
    torch.testing.assert_close(run(auto, kind, ip_adapter_image=dog), expected_plain, rtol=0, atol=0)


def test_the_registration_is_one_table_appended_and_reversible(restore_registration):
    tables = auto_pipeline.SUPPORTED_TASKS_MAPPINGS
    ours = [t for t in tables if any(isinstance(c, type) and c.__module__.startswith("anyms.") for c in t.values())]
    assert len(ours) == 1 and ours[0] is tables[-1]                  # last: no diffusers name shadowed
    assert anyms_auto.registered_auto_pipelines() == {
        "stable-diffusion-xl": AnyMSStableDiffusionXLPipeline, "stable-diffusion": AnyMSStableDiffusionPipeline,
        "flux": AnyMSFluxPipeline}
    diffusers_tables = [dict(t) for t in tables[:-1]]

    anyms_auto.unregister_auto_pipelines()
    assert [dict(t) for t in auto_pipeline.SUPPORTED_TASKS_MAPPINGS] == diffusers_tables   # diffusers' own, intact
    assert anyms_auto.registered_auto_pipelines() == {}
    pipe = tiny_pipeline(AnyMSStableDiffusionPipeline, kind="sd15", seed=0, with_ip_adapter=False)
    with pytest.raises(ValueError, match="can't find a pipeline linked to AnyMSStableDiffusionPipeline"):
        AutoPipelineForText2Image.from_pipe(pipe)

    anyms_auto.register_auto_pipelines(AnyMSStableDiffusionPipeline)
    anyms_auto.register_auto_pipelines(AnyMSStableDiffusionPipeline)          # idempotent
    assert sum(t is tables[-1] for t in auto_pipeline.SUPPORTED_TASKS_MAPPINGS) == 1
    assert type(AutoPipelineForText2Image.from_pipe(pipe)) is StableDiffusionPipeline


def test_the_registration_is_guarded(restore_registration, monkeypatch):
    """Where diffusers is too old, or no longer finds pipelines by class name, nothing is changed
    and a warning says so."""
    anyms_auto.unregister_auto_pipelines()
    before = list(auto_pipeline.SUPPORTED_TASKS_MAPPINGS)

    import diffusers
    monkeypatch.setattr(diffusers, "__version__", "0.31.0")
    with pytest.warns(UserWarning, match="older than 0.32.0"):
        anyms_auto.register_auto_pipelines(AnyMSStableDiffusionXLPipeline)
    assert auto_pipeline.SUPPORTED_TASKS_MAPPINGS == before
    monkeypatch.undo()

    monkeypatch.setattr(auto_pipeline, "_get_model", lambda name: None)
    with pytest.warns(UserWarning, match="does not find pipelines by class name"):
        anyms_auto.register_auto_pipelines(AnyMSStableDiffusionXLPipeline)
    assert auto_pipeline.SUPPORTED_TASKS_MAPPINGS == before
    assert anyms_auto.registered_auto_pipelines() == {}

    class NotAPipeline:
        pass

    monkeypatch.undo()
    with pytest.warns(UserWarning, match="will not take NotAPipeline"):
        anyms_auto.register_auto_pipelines(NotAPipeline)
    assert auto_pipeline.SUPPORTED_TASKS_MAPPINGS == before


def test_versions_compare_as_numbers():
    release = anyms_auto._release
    assert release("0.42.1") == (0, 42, 1) and release("0.36.0.dev0") == (0, 36, 0)
    assert release("0.100.0") > release("0.32.0") > release("0.9.9")       # not as strings
    assert release("1.0.0rc1") == (1, 0, 0) and release("0.42.1+cu124") == (0, 42, 1)
