"""What `make bench` compares, at equal total rank R (default 16) and N experts (default 4):

    moetune_lora   LoRA rank R                                  adapter R*(d_in + d_out)
    peft_lora      PEFT's LoRA rank R                           same
    hydralora      one shared A of rank R/N + N B heads of rank R/N (soft router);
                   the heads' B together have R columns          (R/N)*d_in + R*d_out + N*d_in
    molora_soft    N LoRA experts of rank R/N, soft router       R*(d_in + d_out) + N*d_in
    molora_top2    the same with top-2 routing                   R*(d_in + d_out) + N*d_in
    mov            N (IA)^3 vectors (no rank), soft router       N*d + N*d_in  (d: scaled side)
    mole           N frozen LoRAs of rank R/N (random, written     gates only: per gated place
                   to disk like trained ones), MoLE gates per      (N*d_out + 1)*N, d_out that of
                   sub-layer ('layer' granularity, the recipe's)    the place's first projection
    loop_<method>  the loop-over-experts reference of <method> (benchmarks/reference_loop.py)

(the N*d_in terms are the routers W_g). Every alpha is 2 * rank, so s = 2 throughout. On
whole models every method wraps the same projections (all linear layers; MoV too, with its
usual input scaling of down_proj), so ratios compare the same set of wrapped layers.
Also builds the models: the built-in SmolLM2-135M-Instruct (or any `model.path`), and
randomly initialised Qwen2-0.5B- and Llama-3-8B-shaped models from transformers configs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moetune.experts import REGISTRY, ExpertConfig, ExpertLayer, config_class
from moetune.recipe import RouterConfig

ROUTED = ("hydralora", "molora_soft", "molora_top2", "mov")
LABELS = {"frozen_base": "frozen base only (no adapter)", "moetune_lora": "moetune LoRA", "peft_lora": "PEFT LoRA",
          "hydralora": "HydraLoRA", "molora_soft": "MoLoRA soft", "molora_top2": "MoLoRA top-2", "mov": "MoV",
          "mole": "MoLE (layer gates)"}


def label(key: str) -> str:
    return f"loop ref. {LABELS[key[5:]]}" if key.startswith("loop_") else LABELS[key]


@dataclass
class Method:
    key: str
    expert: ExpertConfig
    router: RouterConfig | None


def methods(total_rank: int, n: int, targets: list[str]) -> dict[str, Method]:
    """moetune_lora and the routed methods at total rank `total_rank` with `n` experts."""
    if total_rank % n:
        raise SystemExit(f"--rank {total_rank} must be divisible by the number of experts {n}")
    r = total_rank // n
    soft, top2 = RouterConfig(type="soft"), RouterConfig(type="top_k", top_k=2)

    def cfg(etype: str, rank: int, **kw) -> ExpertConfig:
        return config_class(etype)(type=etype, rank=rank, alpha=2.0 * rank, target_modules=list(targets), **kw)
    out = [Method("moetune_lora", cfg("lora", total_rank), None),
           Method("hydralora", cfg("hydralora", r, num_experts=n), soft),
           Method("molora_soft", cfg("molora", r, num_experts=n), soft),
           Method("molora_top2", cfg("molora", r, num_experts=n), top2),
           Method("mov", cfg("mov", r, num_experts=n), soft)]
    return {m.key: m for m in out}


def describe(total_rank: int, n: int) -> dict[str, str]:
    """One line per method for the results file."""
    r = total_rank // n
    return {"moetune_lora": f"LoRA rank {total_rank}", "peft_lora": f"PEFT LoRA rank {total_rank}",
            "hydralora": f"shared A rank {r} + {n} B heads of rank {r} ({n * r} B columns in all), soft router",
            "molora_soft": f"{n} LoRA experts of rank {r} (total rank {n * r}), soft router",
            "molora_top2": f"{n} LoRA experts of rank {r} (total rank {n * r}), top-2 router (renormalised)",
            "mov": f"{n} (IA)^3 vectors, soft router",
            "mole": f"{n} frozen LoRAs of rank {r} (total rank {n * r}), trainable MoLE gates per sub-layer, "
                    "balance loss 'mole' (0.01)",
            "loop_*": "same function, one nn.Linear / vector per expert and a Python loop (reference_loop.py)"}


def write_lora_experts(model: nn.Module, total_rank: int, n: int, targets: list[str], out) -> list[str]:
    """N LoRA adapters of rank total_rank / n on `model`, random non-zero B, saved like trained ones
    (moetune/PEFT files under out/expert<i>): MoLE's frozen experts. `model` is left unchanged."""
    from pathlib import Path
    from moetune.adapters.inject import inject
    from moetune.adapters.io import save_adapter
    r = total_rank // n
    cfg = config_class("lora")(type="lora", rank=r, alpha=2.0 * r, target_modules=list(targets))
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        layers = inject(model, cfg, None)
        for layer in layers.values():
            randomise(layer, seed=100 + i)
        dirs.append(str(save_adapter(Path(out) / f"expert{i}", model, cfg, None, "bench")))
        uninstall(model, layers)
    return dirs


def mole_method(experts: list[str], granularity: str = "layer") -> Method:
    """MoLE over the given frozen LoRA directories, gates per `granularity`, balance loss on."""
    cfg = config_class("mole")(type="mole", experts=list(experts), granularity=granularity)
    return Method("mole", cfg, RouterConfig(balance_loss="mole", balance_weight=0.01))


def make_layer(m: Method, base: nn.Module, name: str = "mlp.up_proj", seed: int = 0) -> ExpertLayer:
    """A moetune layer around `base` (shared, frozen), adapter on base's device."""
    torch.manual_seed(seed)
    layer = REGISTRY[m.expert.type](base, m.expert, m.router, name=name)
    return layer.to(base.weight.device)


def randomise(layer: ExpertLayer, seed: int = 1) -> None:
    """Small non-zero adapter weights (B heads, vectors), so the reference check compares something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in layer.adapter_state().items():
            if key.startswith("lora_B") or key == "ia3_l":
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device))


# ---------------------------------------------------------------- models

SHAPES = {
    # Qwen2-0.5B: 24 layers, hidden 896, 14 heads (2 KV heads), tied embeddings.
    "qwen2-0.5b-shape": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                        tie_word_embeddings=True)),
    # Llama-3-8B: 32 layers, hidden 4096, 32 heads (8 KV heads), untied embeddings.
    "llama-8b-shape": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=8192, rope_theta=5e5, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)),
}
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def shaped_config(name: str, tiny: bool, layers: int | None):
    """transformers config of a shaped model; tiny shrinks widths (FFN keeps its ratio) for a CPU check."""
    from transformers import AutoConfig
    arch, kw = SHAPES[name]
    kw = dict(kw)
    if tiny:
        ratio = kw["intermediate_size"] / kw["hidden_size"]
        kw.update(TINY, intermediate_size=int(TINY["hidden_size"] * ratio))
    if layers:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(arch, **kw)


def build_model(name: str, device: torch.device, tiny: bool = False, layers: int | None = None, seed: int = 0):
    """(frozen model in eval mode, dtype of its weights). Shaped models: random init in bf16 on `device`."""
    torch.manual_seed(seed)
    if name in SHAPES:
        from transformers import AutoModelForCausalLM
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(shaped_config(name, tiny, layers), dtype=torch.bfloat16)
    else:
        from moetune.models.load import load_model
        from moetune.recipe import ModelConfig
        model = load_model(ModelConfig(path=name, device=device.type), device, log=lambda *a: None)
    model.requires_grad_(False)
    model.eval()
    return model, next(model.parameters()).dtype


def shared_copy(model: nn.Module) -> nn.Module:
    """A second module tree over the same weight tensors (for PEFT, which rewires modules in place):
    no second copy of the base weights in memory."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def install(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put `layers` (name -> module wrapping that projection) into `model`."""
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def uninstall(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put the frozen base projections of `layers` back."""
    install(model, {name: layer.base for name, layer in layers.items()})
