"""Which blocks of the denoiser a subject's image branch acts on (the InstantStyle idea).

InstantStyle (Wang et al., 2024) found that SDXL's IP-Adapter carries an image's style
through one attention block of the U-Net's decoder and its layout through one of the
encoder, and that feeding the image to those blocks only gives the style (or the layout)
without the rest. diffusers exposes it as ``set_ip_adapter_scale`` with a dict (one scale
per attention block). AnyMS gives each subject its own choice:

- ``"all"`` (the default): every IP-Adapter layer, as without this option;
- a preset (below), mapped to the model's blocks when the model is known;
- a list of block names: dotted prefixes of the model's attention layers, as diffusers
  names them (``"up_blocks.0.attentions.1"``, ``"mid_block"``, ``"down_blocks.2"``,
  ``"transformer_blocks.7"``), weight 1 each;
- a dict ``{block name: weight}``: the subject's scale is multiplied, at a layer, by the
  weight of the longest listed name the layer's name starts with.

At a layer no listed name covers (or whose weight is 0) the subject is absent from the
routing: not computed there, exactly as a subject with scale 0.

Presets, by the U-Net's structure (the encoder's and decoder's cross-attention blocks
of lowest resolution, where InstantStyle put layout and style):

=================  ======================================  ====================================
preset             rule                                    SDXL / SD 1.5 / toy world
=================  ======================================  ====================================
``style``          the middle attention (index n // 2) of  ``up_blocks.0.attentions.1`` /
                   the first up block with attentions      ``up_blocks.1.attentions.1`` /
                                                           ``up_blocks.0.attentions.1``
``layout``         the last attention of the last down     ``down_blocks.2.attentions.1`` /
                   block with attentions                   ``down_blocks.2.attentions.1`` /
                                                           ``down_blocks.1.attentions.0``
``style_and_layout``  both                                 both
``all``            every IP-Adapter layer                  every one
=================  ======================================  ====================================

SDXL's two are InstantStyle's own (diffusers' docs: ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``
for style, ``{"down": {"block_2": [0.0, 1.0]}}`` added for layout). SD 1.5's are the same
rule on its U-Net (its lowest-resolution decoder block with attentions is ``up_blocks.1``,
``up_blocks.0`` having none). FLUX: diffusers' FLUX IP-Adapter loader gives IP-Adapter
processors to the 19 double-stream blocks only (``transformer_blocks.0`` ...
``transformer_blocks.18``; the single-stream blocks keep their plain processors), and no
style / layout split of them is established: FLUX takes ``"all"`` and block names, and the
presets ``style`` / ``layout`` are refused there.

No torch, no diffusers: names and numbers only.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ["PRESETS", "BlockWeights", "check_blocks", "resolve_blocks", "layer_weight", "model_blocks",
           "preset_blocks", "blocks_entry"]

PRESETS = ("all", "style", "layout", "style_and_layout")

# A checked selection: None (every layer) or ((block name, weight), ...), names sorted.
BlockWeights = Optional[Tuple[Tuple[str, float], ...]]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_HOW = (f"a preset ({', '.join(repr(p) for p in PRESETS)}), a non-empty list of block names "
        f"(e.g. \"up_blocks.0.attentions.1\") or an object {{block name: weight}}")


def check_blocks(value, name: str) -> Union[None, str, Tuple[Tuple[str, float], ...]]:
    """A block selection's syntax, without a model: None or ``"all"`` -> None, another preset
    -> its name, a list or dict -> ``((block name, weight), ...)`` sorted by name.

    Raises ValueError naming ``name``: an unknown preset, an empty list or dict, a name that
    is not a dotted identifier (``down_blocks.2.attentions.1``), a name given twice, a weight
    that is not a finite number.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"{name} must be {_HOW}; {value!r} is not a preset")
        return None if value == "all" else value
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(block, 1.0) for block in value]
    else:
        raise ValueError(f"{name} must be {_HOW}, got {value!r}")
    if not items:
        raise ValueError(f"{name} is empty: name at least one block (or leave it out: every block)")
    out: Dict[str, float] = {}
    for block, weight in items:
        if not isinstance(block, str) or not _NAME.fullmatch(block):
            raise ValueError(f"{name}: {block!r} is not a block name (dotted, e.g. \"up_blocks.0.attentions.1\")")
        if block in out:
            raise ValueError(f"{name}: {block!r} is given twice")
        if isinstance(weight, (bool, str, bytes)) or not isinstance(weight, (int, float)) \
                or not math.isfinite(float(weight)):
            raise ValueError(f"{name}[{block!r}] must be a finite number (the block's weight), got {weight!r}")
        out[block] = float(weight)
    return tuple(sorted(out.items()))


def blocks_entry(value):
    """A checked selection as a layout file writes it (JSON): None for every block (``"all"``
    too: the key is left out), a preset's name, a list of names, or ``{name: weight}``."""
    check_blocks(value, "blocks")
    if value is None or value == "all":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return [str(v) for v in value]


def _covers(block: str, layer: str) -> bool:
    return layer == block or layer.startswith(block + ".")


def layer_weight(blocks: BlockWeights, layer: str) -> float:
    """The factor of a subject's scale at ``layer`` (an attention module's name): 1 for every
    layer without a selection; else the weight of the longest selected name covering the layer,
    0 where none does."""
    if blocks is None:
        return 1.0
    best, weight = -1, 0.0
    for block, w in blocks:
        if len(block) > best and _covers(block, layer):
            best, weight = len(block), w
    return weight


def model_blocks(layers: Iterable[str]) -> List[str]:
    """The blocks of ``layers`` (IP-Adapter attention layers' names) a selection names most
    often: ``down_blocks.2.attentions.1`` for a U-Net's, ``transformer_blocks.7`` for FLUX's."""
    out = []
    for layer in layers:
        parts = layer.split(".")
        if "attentions" in parts:
            at = parts.index("attentions")
            block = ".".join(parts[:at + 2])
        else:
            block = ".".join(parts[:2])
        if block not in out:
            out.append(block)
    return out


def preset_blocks(preset: str, layers: Sequence[str]) -> List[str]:
    """The block names ``preset`` stands for in the model whose IP-Adapter layers are ``layers``
    (the rule in this module's docstring). ValueError when the model has no such block (FLUX)."""
    if preset == "all":
        return []
    attentions: Dict[Tuple[str, int], List[int]] = {}
    for block in model_blocks(layers):
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", block)
        if m:
            attentions.setdefault((m.group(1), int(m.group(2))), []).append(int(m.group(3)))
    out = []
    if preset in ("style", "style_and_layout"):
        ups = sorted(i for kind, i in attentions if kind == "up")
        if not ups:
            raise ValueError(f"the preset {preset!r} needs a U-Net decoder block with attentions (up_blocks.N), "
                             f"and this model has none: give block names{_example(layers)}")
        n = sorted(attentions[("up", ups[0])])
        out.append(f"up_blocks.{ups[0]}.attentions.{n[len(n) // 2]}")
    if preset in ("layout", "style_and_layout"):
        downs = sorted(i for kind, i in attentions if kind == "down")
        if not downs:
            raise ValueError(f"the preset {preset!r} needs a U-Net encoder block with attentions (down_blocks.N), "
                             f"and this model has none: give block names{_example(layers)}")
        n = sorted(attentions[("down", downs[-1])])
        out.append(f"down_blocks.{downs[-1]}.attentions.{n[-1]}")
    return out


def _example(layers) -> str:
    blocks = model_blocks(layers)
    return f" (its blocks: {blocks[0]} ... {blocks[-1]})" if blocks else ""


def resolve_blocks(value, layers: Sequence[str], name: str) -> BlockWeights:
    """A selection (anything :func:`check_blocks` takes) for the model whose IP-Adapter layers are
    ``layers``: None for every layer, else ``((block name, weight), ...)``.

    Raises ValueError naming ``name`` for bad syntax, a preset the model has no blocks for, or a
    name that covers none of ``layers`` (the message lists the model's blocks).
    """
    checked = check_blocks(value, name)
    if checked is None:
        return None
    if isinstance(checked, str):
        try:
            return tuple((block, 1.0) for block in preset_blocks(checked, layers))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for block, _ in checked:
        if not any(_covers(block, layer) for layer in layers):
            known = model_blocks(layers)
            shown = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")
            raise ValueError(f"{name}: the model has no IP-Adapter layer in block {block!r}; its blocks are {shown}")
    return checked
