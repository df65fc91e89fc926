"""Default target modules per architecture: what `target_modules: auto` means on a given model.

An expert type states its default places as ROLES (its settings class's `auto_targets`; None: every
linear layer, 'all-linear'), and this table turns roles into module-name patterns for the model's
`config.model_type`, in the manner of PEFT's per-architecture defaults for LoRA and (IA)^3:

    q, k, v   attention query, key, value projections      qkv      the fused q/k/v projection
    o         attention output projection
    gate, up  FFN input projections                        gate_up  the fused gate/up projection
    down      FFN output projection (its INPUT is the FFN intermediate activation)

A type asks for a list of alternatives per place, the first one the architecture has wins: MoV's
keys are `("k", "qkv")`, i.e. the key projection, or the fused q/k/v one where keys are not separate
(GPT-2, GPT-NeoX, Phi-3; scaling it scales queries too, as PEFT's IA3 does there). An architecture
missing from the table gets, for each role, every pattern of the table's architectures that
matches one of its projections (an unknown Llama-like model finds q_proj ... down_proj), and a
clear RecipeError when a place matches nothing.
"""
from __future__ import annotations

from torch import nn

from moetune.core.errors import RecipeError
from moetune.models.projection import is_projection

ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")

_LLAMA = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
          "gate": ("gate_proj",), "up": ("up_proj",), "down": ("down_proj",)}
ARCHITECTURES: dict[str, dict[str, tuple[str, ...]]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                           "granite")},
    "phi3": {"qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_up_proj",),
             "down": ("mlp.down_proj",)},
    "gpt2": {"qkv": ("attn.c_attn",), "o": ("attn.c_proj",), "up": ("mlp.c_fc",), "down": ("mlp.c_proj",)},
    "gpt_neox": {"qkv": ("attention.query_key_value",), "o": ("attention.dense",), "up": ("mlp.dense_h_to_4h",),
                 "down": ("mlp.dense_4h_to_h",)},
    "opt": {"q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
            "o": ("self_attn.out_proj",), "up": ("fc1",), "down": ("fc2",)},
}
"""config.model_type -> role -> module-name patterns (dotted suffixes, as in `target_modules`)."""


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def forward_rank(name: str) -> int:
    """Where a projection runs within its block: the index of its role in ROLES, which lists the roles in
    forward order (attention q, k, v before its output, then the FFN), whatever order the model defines
    its modules in (Phi-3 defines o_proj before qkv_proj); len(ROLES) for a name of no known role."""
    ranks = [ROLES.index(role) for table in ARCHITECTURES.values() for role, pats in table.items()
             if any(_matches(name, p) for p in pats)]
    return min(ranks, default=len(ROLES))


def architecture_roles(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """role -> patterns for `model`: its row of ARCHITECTURES, or, for an architecture not in it, every
    known pattern of each role that names one of the model's projections."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    names = [n for n, m in model.named_modules() if is_projection(m)]
    found: dict[str, tuple[str, ...]] = {}
    for role in ROLES:
        pats = {p for table in ARCHITECTURES.values() for p in table.get(role, ())}
        hits = [p for p in pats if any(_matches(n, p) for n in names)]
        hits = tuple(sorted(p for p in hits if not any(p.endswith("." + q) for q in hits)))  # 'k_proj' covers 'self_attn.k_proj'
        if hits:
            found[role] = hits
    return found


def role_patterns(model: nn.Module, places: tuple[tuple[str, ...], ...], key: str = "expert.target_modules"
                  ) -> list[str]:
    """Module-name patterns for `places` (each a tuple of alternative roles, the first the model has wins)."""
    roles = architecture_roles(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    out: list[str] = []
    for alternatives in places:
        hit = next((roles[r] for r in alternatives if r in roles), None)
        if hit is None:
            raise RecipeError(f"Recipe key '{key}' is 'auto', but moetune knows no {' or '.join(alternatives)} "
                              f"projection of architecture {model_type!r} (known: {', '.join(sorted(ARCHITECTURES))}). "
                              "Allowed: the module names to wrap, e.g. target_modules: [k_proj, v_proj, down_proj].")
        out += [p for p in hit if p not in out]
    return out


def resolve_auto(patterns: list[str], model: nn.Module, places: tuple[tuple[str, ...], ...] | None,
                 key: str = "expert.target_modules") -> list[str]:
    """`patterns` with an 'auto' entry replaced by the type's default places on this architecture
    (`places` None: 'all-linear')."""
    if "auto" not in patterns:
        return list(patterns)
    auto = ["all-linear"] if places is None else role_patterns(model, places, key)
    rest = [p for p in patterns if p != "auto"]
    return rest + [p for p in auto if p not in rest]
