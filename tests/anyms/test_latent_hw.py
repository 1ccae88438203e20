"""Layouts built by hand: a latent_hw that is not the latent being denoised fails naming latent_hw
(a token count no level has, a layer that shows its grid, or the U-Net's own sample)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_layout_for_another_latent_names_latent_hw(tiny_sdxl_pipe, unet_inputs):
    from anyms import Layout, anyms_attention

    pipe = tiny_sdxl_pipe
    kwargs = unet_inputs(pipe, S=2, latent_hw=(13, 21))
    boxes = [[0, 0, 0.6, 1], [0.4, 0, 1, 1]]
    for wrong in ((16, 16), (13, 20), (20, 13)):        # another size, a non-square slip, both
        with anyms_attention(pipe, Layout(boxes, wrong)):
            with pytest.raises(ValueError, match=rf"latent_hw \({wrong[0]}, {wrong[1]}\)"):
                with torch.no_grad():
                    pipe.unet(**kwargs)


def test_swapped_height_and_width_name_latent_hw_where_the_layer_shows_its_grid(tiny_sdxl_pipe):
    """A layer that receives its hidden states as [B, C, h, w] shows its grid: a layout made with
    (w, h) fails there, naming latent_hw."""
    from anyms import Layout
    from anyms.processor import AnyMSAttnProcessor

    pipe = tiny_sdxl_pipe
    name, parent = next((n, p) for n, p in pipe.unet.attn_processors.items() if ".attn2." in n)
    attn = pipe.unet.get_submodule(name[: -len(".processor")])
    proc = AnyMSAttnProcessor.from_ip_adapter_processor(parent, Layout([[0, 0, 0.5, 1], [0.5, 0, 1, 1]], (21, 13)))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, attn.to_q.in_features, 13, 21, generator=g)
    text = torch.randn(1, 77, attn.to_k.in_features, generator=g)
    images = torch.randn(1, 2, 4, attn.to_k.in_features, generator=g)
    with pytest.raises(ValueError, match=r"latent_hw \(21, 13\) gives a 21x13 grid .* hidden states are 13x21"):
        with torch.no_grad():
            proc(attn, hidden, encoder_hidden_states=(text, [images]))


@pytest.mark.parametrize("wrong", [(21, 13), (26, 42)], ids=["swapped", "twice-the-latent"])
def test_a_latent_hw_with_the_same_token_counts_inside_a_unet(tiny_sdxl_pipe, unet_inputs, wrong):
    from anyms import Layout, anyms_attention

    pipe = tiny_sdxl_pipe
    kwargs = unet_inputs(pipe, S=2, latent_hw=(13, 21))
    with anyms_attention(pipe, Layout([[0, 0, 0.6, 1], [0.4, 0, 1, 1]], wrong)):
        with pytest.raises(ValueError, match="latent_hw"):
            with torch.no_grad():
                pipe.unet(**kwargs)


def test_the_latent_check_leaves_with_remove_anyms(tiny_sdxl_pipe, unet_inputs):
    from anyms import Layout, apply_anyms, remove_anyms
    from anyms.processor import _LATENT_CHECKS

    pipe = tiny_sdxl_pipe
    apply_anyms(pipe, Layout([[0, 0, 1, 1]], (21, 13)))
    assert pipe.unet in _LATENT_CHECKS
    remove_anyms(pipe)
    assert pipe.unet not in _LATENT_CHECKS and not pipe.unet._forward_pre_hooks
