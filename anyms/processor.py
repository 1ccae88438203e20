"""AnyMS as a diffusers attention processor for the U-Net's cross-attention layers.

    pipe.load_ip_adapter(...)                       # the subject features come from it
    layout = Layout(boxes, latent_hw=(h // 8, w // 8))      # or Layout(masks=[...], latent_hw=...)
    with anyms_attention(pipe, layout):
        image = pipe(prompt, ip_adapter_image=[[img_1, ..., img_S]]).images[0]

``AnyMSAttnProcessor`` subclasses diffusers' ``IPAdapterAttnProcessor2_0`` and keeps
its ``to_k_ip`` / ``to_v_ip`` and ``scale``. With a layout it runs the text branch and
one branch per subject image, each confined to its region (a box or a mask), in one
call of ``anyms_kernels.region_cross_attention``, handing it the layout's routing
(built once per layer grid and kept by the layout); without one it is its parent.

The subject images come from the loaded IP-Adapters: the U-Net hands the processor
``ip_hidden_states[a]`` of shape ``[B, S_a, T_a, C]`` for adapter ``a`` (diffusers'
multi-image path, the one ``ip_adapter_masks`` uses), holding the images of the layout's
subjects of that adapter (``Layout(adapters=...)``; default: every subject is adapter 0's,
image ``s`` belonging to region ``s``). Subjects of adapters with other token counts (4 and
16) go into the same single call of the op, each with its own count.

``apply_anyms`` converts, in place, the processors that ``load_ip_adapter``
installed, sharing their weight modules and their ``scale`` list (so
``set_ip_adapter_scale`` acts on both); ``remove_anyms`` puts the very same
original processor objects back. No global state, no patching. Those functions, the
subject scales and the op call are :mod:`anyms.branches`', shared with the FLUX processor.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from einops import rearrange

from .branches import (AnyMSBranches, anyms_attention, apply_anyms, attention_modules, check_layout,
                       remove_anyms, set_anyms_layout)
from .layout import Layout

__all__ = ["AnyMSAttnProcessor", "apply_anyms", "remove_anyms", "set_anyms_layout", "anyms_attention"]

# diffusers turns 0/1 attention masks into additive biases of 0 / -10000 (UNet2DConditionModel.forward).
# exp(-10000) is 0 in every float dtype, so a bias at or below this is exactly a masked key.
_MASKED_BIAS = -10000.0


class _EqualsItsParent(type):
    """The metaclass that makes ``AnyMSAttnProcessor == IPAdapterAttnProcessor2_0``; nothing else changes.

    diffusers' models let ``set_default_attn_processor()`` run only when
    ``proc.__class__ in CROSS_ATTENTION_PROCESSORS`` for every processor: an equality
    test on classes, which a subclass fails. An AnyMS processor is an IP-Adapter
    processor (same weights; without a layout, the same behaviour), so the reset must
    treat it as one (replace it like diffusers' own) rather than refuse with an error
    naming another layer's processor. ``type(p)``, ``isinstance``, hashing (identity),
    pickling and every diffusers object are untouched.
    """

    def __eq__(cls, other):
        return cls is other or other is IPAdapterAttnProcessor2_0

    def __ne__(cls, other):
        return not (cls is other or other is IPAdapterAttnProcessor2_0)

    __hash__ = type.__hash__


class AnyMSAttnProcessor(AnyMSBranches, IPAdapterAttnProcessor2_0, metaclass=_EqualsItsParent,
                         replaces=IPAdapterAttnProcessor2_0):
    r"""IP-Adapter cross-attention processor with AnyMS's layout-confined subject branches.

    Args (as ``IPAdapterAttnProcessor2_0``):
        hidden_size: the attention layer's width (``heads * head_dim``).
        cross_attention_dim: the width of the image embeddings fed to ``to_k_ip`` / ``to_v_ip``.
        num_tokens: image tokens per image, one entry per IP-Adapter.
        scale: the IP-Adapter scale, one per adapter: a float, or a list of one float per image.
        layout: an :class:`anyms.layout.Layout`, or None to behave exactly like the parent.
        backend: the ``anyms_kernels.region_cross_attention`` backend (``"auto"`` by default).

    With a layout, for one layer with queries ``Q`` (``N = h * w`` tokens):

        out = attn(Q, K_text, V_text) + Z_image,
        Z_image[t] = lambda_r * attn(q_t, K_r, V_r) for the subject r that owns t
                     ("overwrite", AnyMS), or the sum over every region covering t ("sum")

    with ``lambda_s = layout.scales[s] * self.scale[a]`` (so ``set_ip_adapter_scale``
    keeps working), keys ``K_s = to_k_ip[a](image tokens of s)``, ``a = layout.adapters[s]``.
    Softmax scale ``1/sqrt(D)``, as the parent's SDPA calls use. Text key masks
    (``attention_mask``) apply to the text branch only, as in the parent.

    Regional prompts (subjects of kind ``"prompt"`` / ``"both"`` in the layout): each adds a
    text-kind branch, keys ``attn.to_k`` / values ``attn.to_v`` of its text states
    (:meth:`Layout.set_prompt_states`), which replaces ``attn(Q, K_text, V_text)`` where it acts
    (same routing rule per kind), in the same op call as the image branches of every adapter,
    each branch with its own token count (:meth:`Layout.branch_tokens`). A layout whose
    subjects all have no image reads no image tokens (the pipelines then pass a placeholder
    embedding per adapter, which the U-Net's IP-Adapter input needs).

    Raises (with a layout): ``ValueError`` when the number of images per prompt differs
    from the layout's subjects with an image (of each adapter), when regional prompt states are
    missing or of another batch, when ``ip_adapter_masks`` is also passed, when a subject's
    adapter is not loaded, when the image embeddings are missing, or when
    ``attention_mask`` is not a key-padding mask the fused op can express.
    """

    def __init__(self, hidden_size, cross_attention_dim=None, num_tokens=(4,), scale=1.0,
                 layout: Optional[Layout] = None, backend: str = "auto"):
        super().__init__(hidden_size, cross_attention_dim=cross_attention_dim, num_tokens=num_tokens, scale=scale)
        self.layout = check_layout(layout)
        self.backend = backend
        # The processor this one replaced (see from_ip_adapter_processor); kept outside
        # _modules so that state_dict() and .to() see its shared weights only once.
        object.__setattr__(self, "_anyms_original", None)
        self._scale_cache = None

    @classmethod
    def from_ip_adapter_processor(cls, processor: IPAdapterAttnProcessor2_0,
                                  layout: Optional[Layout] = None) -> "AnyMSAttnProcessor":
        """A processor that shares ``processor``'s ``to_k_ip``/``to_v_ip`` modules and ``scale`` list.

        Nothing is copied or allocated: the weights, any accelerate offload hooks on the
        projection layers and later ``set_ip_adapter_scale`` calls are common to both.
        """
        if not isinstance(processor, IPAdapterAttnProcessor2_0):
            raise TypeError(f"processor must be an IPAdapterAttnProcessor2_0, got {type(processor).__name__}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.hidden_size = processor.hidden_size
        new.cross_attention_dim = processor.cross_attention_dim
        new.num_tokens = processor.num_tokens
        new.scale = processor.scale               # the same list object
        new.to_k_ip = processor.to_k_ip           # the same ModuleLists (registered as submodules)
        new.to_v_ip = processor.to_v_ip
        new.train(processor.training)
        new.layout = check_layout(layout)
        new.backend = "auto"
        new._scale_cache = None
        object.__setattr__(new, "_anyms_original", processor)
        return new

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ):
        layout = self.layout
        if layout is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=attention_mask, temb=temb, scale=scale,
                                    ip_adapter_masks=ip_adapter_masks)
        if ip_adapter_masks is not None:
            raise ValueError(
                "ip_adapter_masks cannot be combined with an AnyMS layout: the layout's regions are the masks "
                "(give masks to the Layout: Layout(masks=...)). "
                "Drop ip_adapter_masks, or clear the layout (set_anyms_layout(pipe, None)) to use diffusers' masks"
            )
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                "encoder_hidden_states must be the tuple (text_states, [image_states]) that the U-Net passes "
                "when an IP-Adapter is loaded and image embeddings are given; AnyMS needs the subject images "
                "(pass ip_adapter_image=[[img_1, ..., img_S]] or ip_adapter_image_embeds to the pipeline)"
            )
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, num_queries, _ = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        text_mask = _text_key_mask(attn, attention_mask, text_len, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        # Views, no copies: the op reads any strides and writes its output in q's layout.
        q = rearrange(query, "b n (h d) -> b h n d", h=heads)
        k_text = rearrange(key, "b l (h d) -> b h l d", h=heads)
        v_text = rearrange(value, "b l (h d) -> b h l d", h=heads)

        prompt_states = layout.prompt_states
        if prompt_states is not None and attn.norm_cross:     # as the global prompt's states
            prompt_states = attn.norm_encoder_hidden_states(prompt_states.flatten(0, 1)).unflatten(
                0, prompt_states.shape[:2])
        k_subj, v_subj, tokens = self._branches(layout, ip_hidden_states, batch_size, heads, q.dtype,
                                                attn.to_k, attn.to_v, prompt_states)

        # The layout's routing on this grid, built on the first call and kept by the layout.
        grid, routing = layout.routing(num_queries, q.device, self.layer_name, tokens)
        if input_ndim == 4 and grid != (height, width):
            raise ValueError(
                f"the layout's latent_hw {layout.latent_hw} gives a {grid[0]}x{grid[1]} grid for this layer, "
                f"but its hidden states are {height}x{width}: make the Layout with latent_hw = the latent being "
                f"denoised, (height // 8, width // 8), height first"
            )
        out = self._attend(layout, grid, routing, q, k_text, v_text, k_subj, v_subj, text_mask=text_mask)
        hidden_states = rearrange(out, "b h n d -> b n (h d)")   # free: out is laid out like q

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def original_processor(self) -> IPAdapterAttnProcessor2_0:
        """The processor this one replaced; for one made directly, a plain
        ``IPAdapterAttnProcessor2_0`` sharing its weights (what :func:`anyms.remove_anyms` installs)."""
        original = self._anyms_original
        if original is not None:
            return original
        plain = IPAdapterAttnProcessor2_0.__new__(IPAdapterAttnProcessor2_0)
        torch.nn.Module.__init__(plain)
        plain.hidden_size, plain.cross_attention_dim = self.hidden_size, self.cross_attention_dim
        plain.num_tokens, plain.scale = self.num_tokens, self.scale
        plain.to_k_ip, plain.to_v_ip = self.to_k_ip, self.to_v_ip
        plain.train(self.training)
        return plain

    @classmethod
    def _anyms_applied(cls, model) -> None:
        _install_latent_check(model)

    @classmethod
    def _anyms_removed(cls, model) -> None:
        _remove_latent_check(model)


def _text_key_mask(attn, attention_mask, text_len: int, batch_size: int) -> Optional[torch.Tensor]:
    """The parent's text ``attention_mask`` as the op's bool key-padding mask ``[B, L]``.

    The parent prepares it with ``attn.prepare_attention_mask`` into ``[B, heads, Q, L]``
    (Q = 1 or the number of queries) and hands it to SDPA: a bool mask (True = attend)
    or an additive bias. The op takes a mask shared by every head and query, so this
    accepts exactly the masks that are: bool, or biases of 0 (attend) and <= -10000 /
    -inf (masked, as diffusers writes them), and raises for anything else.
    """
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, text_len, batch_size)
    mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
    if mask.shape[-1] != text_len:
        raise ValueError(
            f"attention_mask covers {mask.shape[-1]} keys but the text has {text_len} tokens"
        )
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        soft = ~keep & ~(mask <= _MASKED_BIAS)
        if soft.any():
            raise ValueError(
                "attention_mask holds soft biases (values other than 0 and <= -10000): AnyMS's fused op "
                "takes only a key-padding mask of the text tokens"
            )
    flat = keep.reshape(batch_size, -1, text_len)
    shared = flat[:, :1]
    if not torch.equal(flat, shared.expand_as(flat)):
        raise ValueError(
            "attention_mask differs between heads or query tokens: AnyMS's fused op takes only a "
            "key-padding mask of the text tokens, one row per batch element"
        )
    return shared[:, 0].contiguous()


# ----------------------------------------------------------------------- the latent check
# U-Net -> the forward pre-hook that checks the latent against the layout (see below). Weak keys:
# nothing is written onto the user's model, and a dropped model drops its entry.
_LATENT_CHECKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _install_latent_check(unet) -> None:
    """A U-Net's cross-attention layers see ``[B, h*w, C]``: a layout made for (w, h), or for
    twice the latent, has the same token counts and would route the wrong tokens silently.
    The U-Net's ``sample`` shows the latent: check it against the layout once per forward."""
    if unet in _LATENT_CHECKS or type(unet).__name__ != "UNet2DConditionModel":
        return
    modules = [m for m in attention_modules(unet) if isinstance(m.processor, AnyMSAttnProcessor)]

    def check_latent(module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            return None
        for m in modules:
            layout = m.processor.layout if isinstance(m.processor, AnyMSAttnProcessor) else None
            if layout is not None:
                if tuple(sample.shape[-2:]) != tuple(layout.latent_hw):
                    h, w = sample.shape[-2:]
                    raise ValueError(
                        f"the layout's latent_hw {tuple(layout.latent_hw)} is not the latent being denoised, "
                        f"{h}x{w}: make the Layout with latent_hw=({h}, {w}) (image height // 8, width // 8)")
                return None
        return None

    _LATENT_CHECKS[unet] = unet.register_forward_pre_hook(check_latent, with_kwargs=True)


def _remove_latent_check(unet) -> None:
    handle = _LATENT_CHECKS.pop(unet, None)
    if handle is not None:
        handle.remove()
