"""Wrap a model's target projections with expert layers; collect their losses and state.

Trainable parameters are found from the module structure (the wrapped layers' own
parameters), never by matching parameter names.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from moetune.experts import REGISTRY, ExpertLayer
from moetune.experts.routing import Router, init_routers
from moetune.recipe.experts import ExpertConfig


def inject(model: nn.Module, expert: ExpertConfig, router=None, seed: int = 0) -> dict[str, ExpertLayer]:
    """Freeze `model`, replace every target projection by an expert layer; return name -> layer."""
    model.requires_grad_(False)
    cls = REGISTRY[expert.type]
    expert = cls.for_model(model, expert)  # 'auto' targets resolved for this architecture
    whole_model = getattr(cls, "inject_model", None)  # types that pick their own modules (CALM: decoder blocks)
    names = [] if whole_model else cls.target_names(model, expert)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(expert.init_seed if expert.init_seed is not None else seed)
    layers: dict[str, ExpertLayer] = whole_model(model, expert) if whole_model else {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = cls(base, expert, router, name=name)
        layer.to(base.weight.device)  # adapter tensors stay float32; the base keeps its own dtype
        setattr(parent, child, layer)
        layers[name] = layer
    torch.random.set_rng_state(gen_state)
    cls.after_inject(layers)  # types whose layers share state (MoLE's shared gates) link them here
    if router is not None and getattr(router, "init_centroids", None):
        init_routers(layers, router.init_centroids, router.init_std)  # routers of layers with input dim d start from the centroids
    for layer in layers.values():
        for p in layer.adapter_state().values():
            p.requires_grad_(True)
    return layers


def target_layer_names(model: nn.Module, expert: ExpertConfig) -> list[str]:
    """The projections `inject` would wrap with `expert` (none for types that pick whole blocks, e.g. CALM)."""
    cls = REGISTRY[expert.type]
    if getattr(cls, "inject_model", None):
        return []
    return cls.target_names(model, cls.for_model(model, expert))


def expert_layers(model: nn.Module) -> dict[str, ExpertLayer]:
    """name -> expert layer, for a model that was injected (also through DDP wrappers)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLayer)}


def mask_experts(model: nn.Module, names: list[str]) -> None:
    """--mask-experts: fix the gates of the experts named `names` at 0 (the others renormalised), through the
    `set_mask` hook of the model's expert type (a RecipeError for a type whose experts cannot be masked)."""
    layers = expert_layers(model)
    cls = type(next(iter(layers.values()))) if layers else ExpertLayer
    cls.set_mask(list(layers.values()), list(names))


def routed_layers(model: nn.Module) -> dict[str, ExpertLayer]:
    """name -> expert layer, for the layers that route tokens through a `Router` (model order)."""
    return {n: m for n, m in expert_layers(model).items() if isinstance(getattr(m, "router", None), Router)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in expert_layers(model).values() for p in layer.adapter_state().values()]


def lora_plus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters LoRA+ trains faster (every layer's `lora_plus_parameters`: the B matrices), each once."""
    seen, out = set(), []
    for layer in expert_layers(model).values():
        for p in layer.lora_plus_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum each named auxiliary loss over all expert layers (already weighted)."""
    total: dict[str, torch.Tensor] = {}
    for layer in expert_layers(model).values():
        for k, v in layer.aux_losses().items():
            total[k] = total[k] + v if k in total else v
    return total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, keyed '<module name>.<local name>' (detached, CPU, contiguous)."""
    return {f"{n}.{k}": v.detach().cpu().contiguous()
            for n, layer in expert_layers(model).items() for k, v in layer.adapter_state().items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors saved by `adapter_state_dict` back; every key must match exactly."""
    params = {f"{n}.{k}": v for n, layer in expert_layers(model).items() for k, v in layer.adapter_state().items()}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != state[k].shape:
                raise ValueError(f"adapter tensor {k} has shape {tuple(state[k].shape)}, model wants {tuple(p.shape)}")
            p.copy_(state[k].to(p.device, p.dtype))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable adapter parameters, all parameters)."""
    trainable = sum(p.numel() for p in trainable_parameters(model))
    return trainable, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ reference models (preference tuning)

@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside the block every expert layer of `model` computes its base module alone (`ExpertLayer.adapter_off`),
    so the model is its frozen base: DPO's reference model without a second copy of the weights."""
    layers = list(expert_layers(model).values())
    before = [layer.adapter_off for layer in layers]
    for layer in layers:
        layer.adapter_off = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.adapter_off = was


class AdapterCopy:
    """A frozen copy of a model's adapter tensors: `with copy.swapped():` the model computes with them (each
    adapter parameter copied in; its own values copied back after, also on an exception). Taken from the live
    parameters (`of_model`: the same layout, sharded or not, as the run's), or from a saved adapter's
    tensors (`of_state`)."""

    def __init__(self, params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.params, self.values = params, values

    @classmethod
    def of_model(cls, model: nn.Module) -> "AdapterCopy":
        params = trainable_parameters(model)
        with torch.no_grad():
            return cls(params, [p.detach().clone() for p in params])

    @classmethod
    def of_state(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> "AdapterCopy":
        """The tensors of `state` (keyed as `adapter_state_dict`), which must fit `model`'s adapter exactly."""
        params = {f"{n}.{k}": v for n, layer in expert_layers(model).items() for k, v in layer.adapter_state().items()}
        if set(params) != set(state) or any(params[k].shape != state[k].shape for k in params):
            raise ValueError(f"the reference adapter does not fit this model's adapter "
                             f"(missing {sorted(set(params) - set(state))[:3]}, unexpected {sorted(set(state) - set(params))[:3]})")
        return cls(list(params.values()), [state[k].to(params[k].device, params[k].dtype) for k in params])

    @contextmanager
    def swapped(self) -> Iterator[None]:
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, own):
                    p.copy_(v)
