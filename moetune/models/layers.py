"""The decoder blocks of a Hugging Face causal LM: where they are, and which block a module belongs to.

Generic structure every model-wide feature needs (activation checkpointing and FSDP wrap each
block, CALM composes at chosen blocks, the routing report and logs group modules by block), so it
lives here, below all of them.
"""
from __future__ import annotations

import re

from torch import nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the decoder blocks of a HF causal LM (`model.layers`, GPT-2 `transformer.h`,
    OPT `model.decoder.layers`, ...)."""
    body = model.base_model
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    depth = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    lists = [m for m in body.children() if isinstance(m, nn.ModuleList)]
    if not lists:  # one level down (OPT: model.decoder.layers)
        lists = [m for c in body.children() for m in c.children() if isinstance(m, nn.ModuleList)]
    exact = [m for m in lists if len(m) == depth]
    if len(exact) != 1 and len(lists) != 1:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__}: {len(lists)} module lists "
                        f"in {type(body).__name__}, {len(exact)} of length num_hidden_layers={depth}")
    blocks = exact[0] if len(exact) == 1 else lists[0]
    name = next(n for n, m in model.named_modules() if m is blocks)
    return name, blocks


def layer_index(name: str) -> int | None:
    """The transformer block index in a module name ('model.layers.3.mlp.up_proj' -> 3), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None
