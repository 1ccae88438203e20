"""One AnyMS pipeline, two threads: the second call fails clearly and changes nothing.

diffusers' pipelines are not reentrant (the scheduler's step index and the guidance
state belong to the pipeline: a plain StableDiffusionXLPipeline called from a second
thread mid-generation fails with an IndexError), and a ``subjects=`` call sets its
layout in the U-Net's attention processors. So an AnyMS pipeline runs one call at a
time and refuses a concurrent one, and a ``subjects=`` call refuses to share its U-Net
with another pipeline's call. Threads with pipelines of their own run concurrently.

The overlap is made certain, never left to timing: the first call stops in its
``callback_on_step_end`` until the main thread lets it go.
"""
from __future__ import annotations

import threading

import pytest
import torch

from anyms import Subject
from anyms.pipeline import AnyMSStableDiffusionXLPipeline
from anyms.processor import AnyMSAttnProcessor
from anyms.tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
WAIT = 120                      # seconds: a generous bound, so a bug fails the test instead of hanging it
LEFT, RIGHT = (0.0, 0.0, 0.6, 1.0), (0.4, 0.0, 1.0, 1.0)


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe("a cat and a dog", generator=torch.Generator().manual_seed(seed), output_type="latent",
                **kwargs).images


class Paused:
    """A call in a thread of its own that stops at its first step until ``release()``."""

    def __init__(self, pipe, **kwargs):
        self.inside, self.go = threading.Event(), threading.Event()
        self.result = self.error = None

        def hold(pipe_, step, timestep, tensors):
            if step == 0:
                self.inside.set()
                assert self.go.wait(WAIT), "the main thread never released the paused call"
            return tensors

        def target():
            try:
                self.result = run(pipe, callback_on_step_end=hold, **kwargs)
            except BaseException as e:      # reported by finish()
                self.error = e

        self.thread = threading.Thread(target=target, name="paused-call", daemon=True)
        self.thread.start()
        assert self.inside.wait(WAIT), f"the paused call never reached its first step: {self.error!r}"

    def finish(self):
        self.go.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def in_thread(fn):
    """``fn()`` in a second thread; returns its result, or the exception it raised."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["value"] = e

    thread = threading.Thread(target=target, name="second-call", daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the second call hung"
    return out["value"]


@pytest.fixture
def pipe():
    return tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0)


def test_a_second_call_while_one_runs_fails_clearly_and_changes_nothing(pipe, subject_images):
    a, b = subject_images[:2]
    first = dict(subjects=[Subject(a, LEFT), Subject(b, RIGHT)])
    second = dict(subjects=[Subject(b, LEFT), Subject(a, RIGHT)], anyms_mode="sum")
    expected_first, expected_second = run(pipe, **first), run(pipe, seed=1, **second)
    at_rest = dict(pipe.unet.attn_processors)

    paused = Paused(pipe, **first)
    during = dict(pipe.unet.attn_processors)
    plan = pipe.anyms_last_plan
    assert any(isinstance(p, AnyMSAttnProcessor) for p in during.values())
    for kwargs in (second, {}, dict(ip_adapter_image=a)):     # subjects, plain, plain IP-Adapter
        error = in_thread(lambda: run(pipe, seed=1, **kwargs))
        assert isinstance(error, RuntimeError), error
        assert "already running a call (thread 'paused-call')" in str(error)
        assert "one call at a time" in str(error)
        # nothing of the refused call is left: same processors, same layout, same plan
        now = dict(pipe.unet.attn_processors)
        assert all(now[k] is during[k] for k in during)
        assert pipe.anyms_last_plan is plan
        assert all(p.layout is plan.layout for p in now.values() if isinstance(p, AnyMSAttnProcessor))

    torch.testing.assert_close(paused.finish(), expected_first, rtol=0, atol=0)
    after = dict(pipe.unet.attn_processors)
    assert all(after[k] is at_rest[k] for k in at_rest)
    torch.testing.assert_close(run(pipe, seed=1, **second), expected_second, rtol=0, atol=0)


def test_a_subjects_call_does_not_share_its_unet(pipe, subject_images):
    """from_pipe shares the U-Net: a subjects= call and any other call on it exclude each other,
    plain calls of two pipelines (each with its own scheduler) do not."""
    a, b = subject_images[:2]
    other = AnyMSStableDiffusionXLPipeline.from_pipe(pipe, scheduler=pipe.scheduler.from_config(pipe.scheduler.config))
    assert other.unet is pipe.unet
    subjects = dict(subjects=[Subject(a, LEFT), Subject(b, RIGHT)])
    expected_subjects, expected_plain = run(pipe, **subjects), run(other, seed=1, ip_adapter_image=b)

    paused = Paused(pipe, **subjects)                       # a subjects= call holds the U-Net
    for kwargs in (subjects, dict(ip_adapter_image=b)):
        error = in_thread(lambda: run(other, seed=1, **kwargs))
        assert isinstance(error, RuntimeError), error
        assert "another pipeline is running a subjects= call on this" in str(error)
    torch.testing.assert_close(paused.finish(), expected_subjects, rtol=0, atol=0)

    paused = Paused(pipe, ip_adapter_image=b)               # a plain call shares it with plain calls
    got = in_thread(lambda: run(other, seed=1, ip_adapter_image=b))
    assert isinstance(got, torch.Tensor), got
    torch.testing.assert_close(got, expected_plain, rtol=0, atol=0)
    error = in_thread(lambda: run(other, **subjects))       # ... but not with a subjects= call
    assert isinstance(error, RuntimeError) and "another pipeline is running a call on this" in str(error)
    paused.finish()
    torch.testing.assert_close(run(other, **subjects), expected_subjects, rtol=0, atol=0)


def test_pipelines_of_their_own_run_concurrently(subject_images):
    """Two threads, two pipelines (same weights, no shared module), both mid-generation at
    once: each image equals its single-threaded result."""
    a, b = subject_images[:2]
    pipes = [tiny_pipeline(AnyMSStableDiffusionXLPipeline, kind="sdxl", seed=0) for _ in range(2)]
    calls = [dict(subjects=[Subject(a, LEFT), Subject(b, RIGHT)]),
             dict(subjects=[Subject(b, (0.1, 0.1, 0.9, 0.9), scale=0.7)], anyms_mode="sum", seed=1)]
    expected = [run(p, **c) for p, c in zip(pipes, calls)]
    both_inside = threading.Barrier(2, timeout=WAIT)

    def meet(pipe_, step, timestep, tensors):
        if step == 0:
            both_inside.wait()          # both calls are in their denoising loops now
        return tensors

    results = [None, None]

    def target(i):
        try:
            results[i] = run(pipes[i], callback_on_step_end=meet, **calls[i])
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    for got, want in zip(results, expected):
        assert isinstance(got, torch.Tensor), got
        torch.testing.assert_close(got, want, rtol=0, atol=0)
