"""AnyMS pipelines against plain diffusers, on tiny random pipelines (anyms.tiny). CPU, 2 steps.

Latents are compared (output_type="latent"): they carry the whole denoising loop
without the VAE's rounding to 8-bit images, so a tolerance can be tight.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anyms import Subject
from anyms.pipeline import AnyMSStableDiffusionXLPipeline, prepare_subjects
from anyms.processor import AnyMSAttnProcessor, apply_anyms
from anyms.layout import Layout

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
FULL = (0.0, 0.0, 1.0, 1.0)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
BIG, SMALL = (0.0, 0.0, 0.75, 0.75), (0.25, 0.25, 1.0, 1.0)  # "SMALL" overlaps BIG, and is a bit smaller
SMALLER = (0.25, 0.25, 0.9, 0.9)
# float32 CPU, 2 denoising steps: AnyMS's one fused op against diffusers' separate SDPA
# calls. Measured difference: 0 (the torch backend makes the same SDPA calls); the
# bound leaves room for a backend that sums in another order, and no more.
TOL = dict(rtol=1e-6, atol=1e-5)
# sum mode with the subjects reordered adds the same terms in another order: float32
# reassociation, amplified by 2 steps of 11 layers (measured 1.1e-5 on latents of size ~9).
REORDER_TOL = dict(rtol=1e-5, atol=1e-4)


def run(pipe, prompt="a cat and a dog", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "latent")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def assert_differs(a, b, min_diff=1e-3):
    diff = (a - b).abs().max().item()
    assert diff > min_diff, f"expected different results, max |diff| = {diff}"


def processors(pipe):
    return dict(pipe.unet.attn_processors)


# ----------------------------------------------------------------- equal to diffusers
@pytest.mark.parametrize("kind,plus", [("sdxl", False), ("sdxl", True), ("sd15", False)],
                         ids=["sdxl-4tok", "sdxl-16tok", "sd15"])
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_full_box_equals_diffusers_ip_adapter(anyms_and_diffusers, subject_images, kind, plus, guidance):
    ours, theirs = anyms_and_diffusers(kind, plus)
    img = subject_images[0]
    expected = run(theirs, ip_adapter_image=img, guidance_scale=guidance)
    for mode in ("overwrite", "sum"):
        got = run(ours, subjects=[Subject(img, FULL)], anyms_mode=mode, guidance_scale=guidance)
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{mode}: {m}")
    # the layout acts: another subject image gives another result
    assert_differs(run(ours, subjects=[Subject(subject_images[1], FULL)], guidance_scale=guidance), expected)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_each_subject_image_is_encoded_alone(anyms_and_diffusers, subject_images, kind):
    """A subject's embedding does not depend on the other subjects of the call: a batch of S
    images can differ in the last bits from S batches of one on some CPUs, and the embedding
    cache of ``--jobs`` encodes one image at a time, so the pipeline does too."""
    from anyms.embeddings import SubjectEmbeddingCache

    ours, _ = anyms_and_diffusers(kind)
    seen = []
    handle = ours.image_encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    subjects = [Subject(im, box) for im, box in zip(subject_images[:3], (LEFT, RIGHT, SMALLER))]
    try:
        plain = run(ours, subjects=subjects, num_images_per_prompt=2)
        assert seen == [1, 1, 1]
        seen.clear()
        cache = SubjectEmbeddingCache()
        with cache.attached(ours):
            cached = run(ours, subjects=subjects, num_images_per_prompt=2)
        assert seen == [1, 1, 1] and cache.misses == 3
    finally:
        handle.remove()
    assert torch.equal(plain, cached)           # the same operations: the same bits, on any CPU


def test_batch_and_images_per_prompt_equal_diffusers(anyms_and_diffusers, subject_images):
    ours, theirs = anyms_and_diffusers()
    prompts = ["a cat", "a dog"]
    expected = run(theirs, prompts, ip_adapter_image=subject_images[0], num_images_per_prompt=2)
    got = run(ours, prompts, subjects=[Subject(subject_images[0], FULL)], num_images_per_prompt=2)
    assert got.shape[0] == 4
    torch.testing.assert_close(got, expected, **TOL)


def test_from_pipe_of_a_diffusers_pipeline(anyms_and_diffusers, subject_images):
    _, theirs = anyms_and_diffusers()
    expected = run(theirs, ip_adapter_image=subject_images[0])
    ours = AnyMSStableDiffusionXLPipeline.from_pipe(theirs)
    got = run(ours, subjects=[Subject(subject_images[0], FULL)])
    torch.testing.assert_close(got, expected, **TOL)


def test_subject_scale_equals_diffusers_ip_adapter_scale(anyms_and_diffusers, subject_images):
    ours, theirs = anyms_and_diffusers()
    img = subject_images[0]
    for scale in (0.0, 0.6):
        theirs.set_ip_adapter_scale(scale)
        expected = run(theirs, ip_adapter_image=img)
        torch.testing.assert_close(run(ours, subjects=[Subject(img, FULL, scale=scale)]), expected, **TOL)
    # a subject's scale multiplies the adapter's (set_ip_adapter_scale keeps working)
    ours.set_ip_adapter_scale(0.5)
    theirs.set_ip_adapter_scale(0.5 * 0.6)
    torch.testing.assert_close(run(ours, subjects=[Subject(img, FULL, scale=0.6)]),
                               run(theirs, ip_adapter_image=img), **TOL)


# ------------------------------------------------------------------------- layouts
def test_disjoint_boxes_same_in_both_modes(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    a, b = subject_images[:2]
    subjects = [Subject(a, LEFT), Subject(b, RIGHT)]
    overwrite = run(ours, subjects=subjects, anyms_mode="overwrite")
    torch.testing.assert_close(run(ours, subjects=subjects, anyms_mode="sum"), overwrite, **TOL)
    # the boxes route the images: swapping the images between the boxes changes the result
    assert_differs(run(ours, subjects=[Subject(b, LEFT), Subject(a, RIGHT)]), overwrite)


def test_overlapping_boxes_overwrite_is_ordered_sum_is_not(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    a, b = subject_images[:2]
    ab = [Subject(a, BIG), Subject(b, SMALL)]
    ba = [Subject(b, SMALL), Subject(a, BIG)]
    over_ab = run(ours, subjects=ab, anyms_mode="overwrite")
    sum_ab = run(ours, subjects=ab, anyms_mode="sum")
    assert_differs(over_ab, sum_ab)                                        # overlaps add up in sum mode only
    assert_differs(over_ab, run(ours, subjects=ba, anyms_mode="overwrite"))  # later on top
    torch.testing.assert_close(run(ours, subjects=ba, anyms_mode="sum"), sum_ab, **REORDER_TOL)  # sum ignores order


def test_smaller_on_top_priority(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    a, b = subject_images[:2]
    small_first = [Subject(b, SMALLER), Subject(a, BIG)]
    got = run(ours, subjects=small_first, anyms_priority="smaller_on_top")
    assert ours.anyms_last_plan.order == [1, 0]
    assert ours.anyms_last_plan.layout.boxes.tolist() == [list(BIG), list(SMALLER)]
    torch.testing.assert_close(got, run(ours, subjects=[Subject(a, BIG), Subject(b, SMALLER)]), **TOL)
    assert_differs(got, run(ours, subjects=small_first))


def test_zero_scale_subject_is_like_no_box(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    a, b = subject_images[:2]
    alone = run(ours, subjects=[Subject(b, RIGHT)])
    torch.testing.assert_close(run(ours, subjects=[Subject(a, LEFT, scale=0.0), Subject(b, RIGHT)]), alone, **TOL)
    assert_differs(run(ours, subjects=[Subject(a, LEFT, scale=0.5), Subject(b, RIGHT)]), alone)


def test_many_subjects_and_an_odd_size(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    boxes = [(0.0, 0.0, 0.3, 0.4), (0.2, 0.1, 0.7, 0.5), (0.6, 0.0, 1.0, 0.6), (0.0, 0.5, 0.5, 1.0),
             (0.4, 0.4, 0.9, 0.95), (0.45, 0.45, 0.55, 0.55), (0.8, 0.7, 1.0, 1.0)]
    subjects = [Subject(subject_images[i % 4], box, scale=0.5 + 0.1 * i) for i, box in enumerate(boxes)]
    out = run(ours, subjects=subjects, height=72, width=104)   # latent 9x13: grids 5x7 and 3x4
    assert out.shape[-2:] == (9, 13) and torch.isfinite(out).all()
    assert ours.anyms_last_plan.layout.latent_hw == (9, 13)


def test_sd15_subjects_route(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers("sd15")
    a, b = subject_images[:2]
    over = run(ours, subjects=[Subject(a, BIG), Subject(b, SMALL)], guidance_scale=7.5)
    assert_differs(over, run(ours, subjects=[Subject(a, BIG), Subject(b, SMALL)], anyms_mode="sum",
                             guidance_scale=7.5))


# ------------------------------------------------------------------ restore afterwards
def test_plain_call_after_subjects_call_is_diffusers(anyms_and_diffusers, subject_images):
    ours, theirs = anyms_and_diffusers()
    before = processors(ours)
    run(ours, subjects=[Subject(subject_images[0], BIG), Subject(subject_images[1], SMALL)])
    after = processors(ours)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    two = [subject_images[0], subject_images[1]]
    torch.testing.assert_close(run(ours, ip_adapter_image=[two]), run(theirs, ip_adapter_image=[two]), **TOL)


def test_restored_after_a_failing_call(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    before = processors(ours)
    with pytest.raises(ValueError, match="divisible by 8"):
        run(ours, subjects=[Subject(subject_images[0], FULL)], height=100)
    after = processors(ours)
    assert all(after[k] is before[k] for k in before)


def test_a_layout_the_user_applied_is_kept(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    user_layout = Layout([list(LEFT)], (16, 16))
    apply_anyms(ours, user_layout)
    procs = processors(ours)
    run(ours, subjects=[Subject(subject_images[0], RIGHT)])
    anyms_procs = [p for p in processors(ours).values() if isinstance(p, AnyMSAttnProcessor)]
    assert anyms_procs and all(p.layout is user_layout for p in anyms_procs)
    assert all(processors(ours)[k] is procs[k] for k in procs)


# ------------------------------------------------------------------------ bad input
def _guard(pipe):
    """Record every forward of a model of the pipeline: bad input must raise before any."""
    calls = []
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
    return calls


@pytest.fixture
def bad_files(tmp_path, subject_images):
    subject_images[0].save(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp_path


def _bad_cases(files, img):
    ok = Subject(img, FULL)
    return [
        (dict(subjects=[Subject(img, (0.0, 0.0, 1.2, 1.0))]), ValueError, r"subjects\[0\]\.box must lie inside \[0, 1\]"),
        (dict(subjects=[ok, Subject(img, (0.6, 0.0, 0.4, 1.0))]), ValueError, r"subjects\[1\]\.box .*inverted"),
        (dict(subjects=[Subject(img, (0.0, 0.0, 1.0, float("nan")))]), ValueError, r"subjects\[0\]\.box holds NaN"),
        (dict(subjects=[Subject(img, (0.0, 0.0, 1.0))]), ValueError, r"subjects\[0\]\.box must be 4 numbers"),
        (dict(subjects=[Subject(img, (0, 0, 0.5, 1, 0.5, 0, 1, 1))]), ValueError, r"subjects\[0\]\.box must be 4 numbers"),
        (dict(subjects=[Subject(img, [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])]), ValueError, r"subjects\[0\]\.box must be 4"),
        (dict(subjects=[Subject(img, FULL, scale=float("inf"))]), ValueError, r"subjects\[0\]\.scale"),
        # finite as a Python float, inf in float32 (where the layout keeps scales)
        (dict(subjects=[ok, Subject(img, FULL, scale=1e39)]), ValueError, r"subjects\[1\]\.scale must be a finite"),
        (dict(subjects=[Subject(img, FULL, scale=-1e39)]), ValueError, r"subjects\[0\]\.scale must be a finite"),
        (dict(subjects=[Subject(img, FULL, scale=np.float64("nan"))]), ValueError, r"subjects\[0\]\.scale"),
        (dict(subjects=[Subject(img, FULL, scale=10 ** 400)]), ValueError, r"subjects\[0\]\.scale"),
        (dict(subjects=[Subject(files / "missing.png", FULL)]), ValueError, r"subjects\[0\]\.image: no image file"),
        (dict(subjects=[ok, Subject(files / "text.png", FULL)]), ValueError, r"subjects\[1\]\.image: cannot read"),
        (dict(subjects=[Subject(str(files / "truncated.png"), FULL)]), ValueError, r"subjects\[0\]\.image: cannot read"),
        (dict(subjects=[Subject(np.zeros((4, 4, 2), np.uint8), FULL)]), ValueError, r"subjects\[0\]\.image: an array"),
        (dict(subjects=[Subject(42, FULL)]), TypeError, r"subjects\[0\]\.image must be"),
        (dict(subjects=[]), ValueError, "subjects is empty"),
        (dict(subjects=ok), TypeError, "subjects must be a list"),
        (dict(subjects=[(img, FULL)]), TypeError, r"subjects\[0\] must be an anyms.Subject"),
        (dict(subjects=[ok], anyms_mode="add"), ValueError, "anyms_mode must be one of"),
        (dict(subjects=[ok], anyms_priority="largest"), ValueError, "anyms_priority must be one of"),
        (dict(anyms_mode="sum"), ValueError, "anyms_mode was given without subjects"),
        (dict(subjects=[ok], ip_adapter_image=img), ValueError, "either subjects or ip_adapter_image"),
        (dict(subjects=[ok], ip_adapter_image_embeds=[torch.randn(2, 1, 32)]), ValueError,
         "either subjects or ip_adapter_image_embeds"),
        (dict(subjects=[ok], height=100), ValueError, "divisible by 8"),
        (dict(subjects=[ok], width=36), ValueError, "divisible by 8"),
    ]


def test_bad_input_raises_before_model_work(anyms_and_diffusers, subject_images, bad_files):
    ours, _ = anyms_and_diffusers()
    calls = _guard(ours)
    before = processors(ours)
    for kwargs, error, message in _bad_cases(bad_files, subject_images[0]):
        with pytest.raises(error, match=message):
            ours("a cat", num_inference_steps=STEPS, output_type="latent", **kwargs)
        assert calls == [], f"{kwargs}: model work ran before the error: {calls}"
        after = processors(ours)
        assert all(after[k] is before[k] for k in before), kwargs
    # the guard does see model work
    run(ours, subjects=[Subject(subject_images[0], FULL)])
    assert "unet" in calls and "image_encoder" in calls


def test_subjects_without_ip_adapter_raise_before_model_work(subject_images):
    from anyms.tiny import tiny_pipeline

    pipe = tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", with_ip_adapter=False)
    calls = _guard(pipe)
    with pytest.raises(ValueError, match=r"subjects need a loaded IP-Adapter.*load_ip_adapter"):
        pipe("a cat", subjects=[Subject(subject_images[0], FULL)], num_inference_steps=STEPS)
    assert calls == []
    # without subjects it is the parent pipeline
    assert run(pipe).shape[-2:] == (16, 16)


def test_unloaded_adapter_raises(anyms_and_diffusers, subject_images):
    ours, _ = anyms_and_diffusers()
    ours.unload_ip_adapter()
    with pytest.raises(ValueError, match="subjects need a loaded IP-Adapter"):
        ours("a cat", subjects=[Subject(subject_images[0], FULL)], num_inference_steps=STEPS)


def test_prepare_subjects_labels_and_images(bad_files, subject_images):
    arr = np.asarray(subject_images[1], dtype=np.float32) / 255
    plan = prepare_subjects([Subject(bad_files / "good.png", LEFT), Subject(arr, RIGHT, label="dog")])
    assert plan.labels == ["good", "dog"]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in plan.images)
    np.testing.assert_array_equal(np.asarray(plan.images[1]), np.asarray(subject_images[1]))


def test_model_cpu_offload_hooks_keep_the_result(anyms_and_diffusers, subject_images):
    # accelerate's offload hooks wrap the models; on a CPU-only machine they move
    # nothing, but the AnyMS processors must still be installed, run and be removed
    # under them. (The memory effect is measured on a GPU, by the benchmark.)
    ours, theirs = anyms_and_diffusers()
    subjects = [Subject(subject_images[0], BIG), Subject(subject_images[1], SMALL)]
    expected = run(ours, subjects=subjects)
    ours.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(run(ours, subjects=subjects), expected, **TOL)
    assert not any(isinstance(p, AnyMSAttnProcessor) for p in processors(ours).values())


def test_a_scale_is_accepted_exactly_when_float32_holds_it(subject_images):
    from anyms.pipeline import prepare_subjects

    img = subject_images[0]
    largest = float(np.finfo(np.float32).max)
    assert prepare_subjects([Subject(img, FULL, scale=largest)]).subjects[0].scale == largest
    assert prepare_subjects([Subject(img, FULL, scale=-largest)]).subjects[0].scale == -largest
    for bad in (1e39, largest * 1.001, float("-inf"), "1.0", None):
        with pytest.raises(ValueError, match=r"^subjects\[0\]\.scale must be a finite number"):
            prepare_subjects([Subject(img, FULL, scale=bad)])
