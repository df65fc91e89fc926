"""Typed settings of every expert type (`expert:` in a recipe), torch-free: the recipe schema's part.

Decision: the recipe schema owns the expert settings; the expert registry depends on it, never
the reverse. Each `ExpertConfig` subclass lives here, with the recipe-level checks that need no
model (`check_recipe`), and `EXPERT_CONFIGS` maps each `expert.type` to it, so that loading,
validating and explaining a recipe (and `moetune --help`) never import torch. Their base class,
`ExpertConfig` (the shared fields and the hooks below), is in `moetune/recipe/expert_base.py`. The layers in
`moetune/experts/` (one file per paper) point back with `config_cls = <their config>`, and
`moetune.experts.REGISTRY` maps the same keys to the layers; tests/test_layers.py checks that the
two tables agree (same keys, `REGISTRY[t].config_cls is EXPERT_CONFIGS[t]`, and
`REGISTRY[t].mergeable == (t in MERGEABLE)`). A new expert type adds its config class and one
entry here, its layer file and one entry in the registry.

A settings class also states, as class attributes and methods, what its type does that the
torch-free code above the schema must know: whether it merges (`mergeable`), routes tokens
(`routed`), collapses to a stock adapter (`collapsible`), is saved as a stock PEFT adapter
(`stock_peft`), which key --mask-experts sets (`mask_key`), its lines in `validate` and the model
card, the error for merging it, and the experts it trains first (`per_domain_expert`). The
commands, exports and the CLI read these and never name a type (tests/test_type_hooks.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moetune.core.adapter_files import read_meta
from moetune.core.errors import RecipeError
from moetune.core.schema import opt
from moetune.core.ui import plural

from moetune.recipe.expert_base import GRANULARITIES, ExpertConfig, _error, lora_scale  # noqa: F401 (re-exported)


@dataclass
class LoRAConfig(ExpertConfig):
    """LoRA settings (`expert:` with type lora; Hu et al. 2021)."""

    use_dora: bool = False
    """DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): each output row of
    W' = W0 + s B A is split into a trained magnitude m (d_out,) and its direction, W' -> (m / n) W',
    n = ||W0 + s B A||_row (a constant in the backward pass). Costs a dense copy of each wrapped weight
    per forward (dequantised on a 4-bit base). Merges (diag(m/n)(W0 + s B A)) and exports as PEFT's
    `use_dora: true`."""
    init: str = opt("default", choices=("default", "pissa", "olora"))
    """How A and B start. 'default': A random (PEFT's kaiming-uniform), B = 0. 'pissa' (Meng et al. 2024,
    "PiSSA: Principal Singular Values and Singular Vectors Adaptation"): s B0 A0 is the rank-r SVD
    truncation of W0; 'olora' (Buyukakyuz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): B0 A0 is the
    first r columns/rows of W0's QR decomposition (PEFT's `init_lora_weights` values). Training is
    PiSSA's/OLoRA's, y = W_res x + s B A x with W_res = W0 - s B0 A0, computed on the unchanged base as
    W0 x + s (B A - B0 A0) x; the adapter is saved, merged and exported as the equivalent plain LoRA of
    rank 2r on the ORIGINAL base (A' = [A; A0], B' = [B, -B0]), which stock PEFT loads as is. Costs one
    SVD (QR) of every wrapped weight when the adapter is created."""

    mergeable = True
    stock_peft = True

    def variants(self) -> list[str]:
        out = super().variants() + (["DoRA"] if self.use_dora else [])
        if self.init != "default":
            paper = {"pissa": "PiSSA", "olora": "OLoRA"}[self.init]
            out.append(f"{paper} init (saved as a rank-{2 * self.rank} LoRA on the original base)")
        return out

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        if self.init != "default" and self.use_dora:
            raise _error(f"Recipe keys 'expert.init' ({self.init!r}) and 'expert.use_dora' (true) are both set; "
                         "moetune does not combine a principal-component init with DoRA's magnitude. Allowed: "
                         "expert.init=default with use_dora, or use_dora=false with pissa/olora.")

    def how_to_load(self, sub: str) -> str:
        return f"load the adapter with `peft.PeftModel.from_pretrained(base, '{sub}')` or `moetune eval`"

    @classmethod
    def stored_lora_scale(cls, expert: dict) -> float | None:
        if expert.get("use_dora") or expert.get("init", "default") != "default":  # m rescales W0 / B0 A0 subtracted
            return None
        return lora_scale(expert["alpha"], expert["rank"], bool(expert.get("use_rslora", False)))


@dataclass
class RoutedConfig(ExpertConfig):
    """Settings shared by the types that route each token to its own mix of N experts and collapse
    into a stock PEFT adapter at fixed gates (hydralora, molora, mov)."""

    num_experts: int = opt(4, min=1)
    """Number N of experts per wrapped projection (`moetune cluster-heads` can choose it from the data)."""

    routed = True
    collapsible = True
    budget_keys = ("rank", "num_experts")
    collapse_note: ClassVar[str] = "It writes a stock PEFT LoRA; then run `moetune merge-lora DIR --out MERGED`."
    """What the collapsed export is and how it folds into the base (the merge error's last sentence)."""

    def how_to_load(self, sub: str) -> str:
        return (f"a routed {self.type} adapter (safetensors + moetune.json): load with "
                f"`moetune.adapters.io.load_adapter(base, '{sub}')` or `moetune eval`; "
                "`moetune export --collapse mean` turns it into a stock PEFT adapter")

    def merge_refusal(self) -> RecipeError:
        return RecipeError(f"Expert type {self.type!r} routes every token to its own mix of experts, which does not "
                           "fold into the base weights, so 'merge' cannot run on it. First fix the gates at their "
                           f"validation average with `moetune export RUN_DIR --collapse mean --out DIR`. "
                           f"{self.collapse_note} DIR/collapse.json reports how close the collapsed adapter is to "
                           "the routed one.")


@dataclass
class HydraLoRAConfig(RoutedConfig):
    """HydraLoRA settings (`expert:` with type hydralora)."""

    num_experts: int = opt(3, min=1)
    """Number N of B heads sharing one A (the paper finds 2-4 typical)."""


@dataclass
class MoLoRAConfig(RoutedConfig):
    """MoLoRA settings (`expert:` with type molora)."""

    num_experts: int = opt(4, min=1)
    """Number N of LoRA experts, each of rank `rank` (the paper uses 10; more helps until saturation)."""


@dataclass
class MoVConfig(RoutedConfig):
    """MoV settings (`expert:` with type mov)."""

    collapse_note = ("It writes a stock PEFT IA3 adapter, which peft's `merge_and_unload()` folds into the base "
                     "(moetune's merge folds LoRA only).")
    scaled = False
    lora_plus = False
    budget_keys = ("num_experts",)
    auto_targets = (("k", "qkv"), ("v", "qkv"), ("down",))
    auto_input_scaled: ClassVar[tuple[tuple[str, ...], ...]] = (("down",),)
    """What `input_scaled_modules: auto` names: the FFN down projection, whose input is the intermediate."""

    target_modules: list[str] = opt(factory=lambda: ["auto"])
    """Which projections to wrap (same syntax as for LoRA). (IA)^3 places, what 'auto' picks for the
    model's architecture: attention keys and values and the FFN down projection (Llama-style k_proj,
    v_proj, down_proj; OPT k_proj, v_proj, fc2); where keys and values are one fused projection, that one
    (GPT-2 attn.c_attn and mlp.c_proj; GPT-NeoX query_key_value and dense_4h_to_h; Phi-3 qkv_proj and
    down_proj), which scales the queries too, as PEFT's IA3 does there."""
    num_experts: int = opt(4, min=1)
    """Number N of (IA)^3 vectors per wrapped projection (the paper uses 10-30)."""
    input_scaled_modules: list[str] = opt(factory=lambda: ["auto"])
    """Wrapped projections whose INPUT is scaled (the FFN intermediate activation); all other
    wrapped projections have their OUTPUT scaled (keys, values). Same name syntax as target_modules;
    'auto': the architecture's FFN down projection (down_proj, GPT-2 mlp.c_proj, NeoX dense_4h_to_h, OPT fc2)."""


@dataclass
class MoLEConfig(ExpertConfig):
    """MoLE settings (`expert:` with type mole). `rank`, `alpha`, `dropout` and `target_modules`
    are used only by `experts_from: per_domain`, for the domain LoRAs it trains; the gates read
    the experts' own ranks and scales."""

    experts: list[str] = opt(factory=list)
    """Directories of trained LoRA experts: moetune adapter directories (a run's adapter/) or stock
    PEFT LoRA directories; ranks may differ. Each must name the same base model as model.path (when
    it names one) and adapt only projections the model has. MoLE wraps every projection that any
    expert adapts. Filled in by `experts_from: per_domain`."""
    names: list[str] = opt(factory=list)
    """One name per expert, for --mask-experts and reports; empty: each directory's name (its
    parent's for a run's `adapter` directory)."""
    experts_from: str = opt("list", choices=("list", "per_domain"))
    """'list': the `experts` directories. 'per_domain': `moetune train` first trains one LoRA per
    value of the data's domain field (rank, alpha, dropout, target_modules above; expert_max_steps,
    expert_lr below; the rest of train:) into <output_dir>/experts/<domain>/adapter, then the gates."""
    granularity: str = opt("layer", choices=GRANULARITIES)
    """Which projections share one gate: 'matrix' (each projection), 'layer' (each attention or MLP
    sub-layer), 'block' (each transformer block), 'network' (one gate); see moetune/experts/mole.py."""
    temperature: float = opt(1.0, min=0, min_exclusive=True)
    """Softmax temperature tau of the gates, G = softmax(logits / tau) (router.temperature is unused)."""
    masked: list[str] = opt(factory=list)
    """Experts whose gate is fixed at 0, the others renormalised (set by --mask-experts at eval/export)."""
    expert_max_steps: int = opt(0, min=0)
    """per_domain: optimizer steps of each domain LoRA (0: train.max_steps / train.epochs)."""
    expert_lr: float | None = opt(None, min=0, min_exclusive=True)
    """per_domain: learning rate of the domain LoRAs (None: train.lr)."""

    routed = True
    mask_key = "masked"
    mixes_trained_loras = True
    path_keys = ("experts",)
    from_data = {"experts_from": "per_domain"}

    def how_to_load(self, sub: str) -> str:
        return (f"a MoLE adapter (gates + copies of its LoRA experts, safetensors + moetune.json): load with "
                f"`moetune.adapters.io.load_adapter(base, '{sub}')` or `moetune eval`; `moetune merge-lora --adapters "
                "--method mole --gates-from RUN_DIR` folds its experts at their mean gates into one stock PEFT LoRA")

    def merge_refusal(self) -> RecipeError:
        return RecipeError("Expert type 'mole' mixes frozen LoRAs with per-token gates, which do not fold into the "
                           "base weights, so 'merge' cannot run on it. Fix the gates at their mean over a split and "
                           "merge: `moetune merge-lora --adapters --method mole --gates-from RUN_DIR --out DIR` "
                           "(add --into-base for a full model).")

    def per_domain_expert(self) -> tuple[ExpertConfig, int, float | None] | None:
        """experts_from: per_domain: one LoRA per domain with this recipe's rank, alpha, dropout, target_modules
        and init_seed, trained for expert_max_steps at expert_lr (moetune/commands/domain_experts.py)."""
        if self.experts_from != "per_domain":
            return None
        lora = LoRAConfig(type="lora", rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules), init_seed=self.init_seed,
                          use_rslora=self.use_rslora)
        return lora, self.expert_max_steps, self.expert_lr

    def use_trained_experts(self, dirs: list[str], names: list[str]) -> None:
        self.experts, self.names = list(dirs), list(names)

    def over_trained_experts(self, dirs: list[str], names: list[str]) -> dict:
        out = dataclasses.asdict(self)
        out.update(experts_from="list", experts=list(dirs), names=list(names))
        return out

    def check_recipe(self, r) -> None:
        """Settings that contradict MoLE, and (when training) the expert directories themselves."""
        super().check_recipe(r)
        rt = r.router
        if rt.type != "soft":
            raise _error(f"Recipe key 'router.type' is {rt.type!r}, but MoLE gates are soft. Allowed: 'soft'.")
        if rt.temperature != 1.0:
            raise _error(f"Recipe key 'router.temperature' is {rt.temperature}; MoLE reads its temperature from "
                         "'expert.temperature'. Allowed: 1.0 (set expert.temperature instead).")
        if rt.init_centroids:
            raise _error("Recipe key 'router.init_centroids' is set, but MoLE gates start uniform. Allowed: null.")
        if rt.temperature_end is not None:
            raise _error(f"Recipe key 'router.temperature_end' is {rt.temperature_end}, but MoLE's gate has its own "
                         "constant temperature ('expert.temperature'). Allowed: null (router.level, "
                         "router.domain_loss_weight, router.lr_multiplier and router.weight_decay do apply).")
        if "merge" in r.stages:
            raise _error("Recipe stages include 'merge', but MoLE's per-token gates do not fold into the base. "
                         "Drop 'merge' and use `moetune merge-lora --adapters ... --method mole --gates-from RUN`.")
        if self.names and len(self.names) != len(self.experts):
            raise _error(f"Recipe key 'expert.names' has {plural(len(self.names), 'name')} for {plural(len(self.experts), 'expert')}. "
                         "Allowed: one name per entry of expert.experts, or an empty list.")
        if r.train.lora_plus_ratio != 1.0 and self.experts_from != "per_domain":
            raise _error(f"Recipe key 'train.lora_plus_ratio' is {r.train.lora_plus_ratio}, but MoLE trains only its "
                         "gates; LoRA+ acts on the LoRAs it trains with experts_from: per_domain. Allowed: 1, or "
                         "expert.experts_from=per_domain.")
        if self.experts_from == "per_domain":
            if self.experts:
                raise _error("Recipe key 'expert.experts' is set together with expert.experts_from='per_domain', "
                             "which trains the experts itself. Allowed: an empty list, or experts_from='list'.")
            return
        if "train" in r.stages:
            if not self.experts:
                raise _error("Recipe key 'expert.experts' is empty. Allowed: a list of trained LoRA adapter "
                             "directories, or expert.experts_from='per_domain' to train one per domain first.")
            for name, path, meta in check_experts(self):
                base = meta.get("base_model")
                if not same_base(base, r.model.path):
                    raise _error(f"MoLE expert {name!r} ({path}) was trained on base model {base!r}, "
                                 f"but model.path is {r.model.path!r}. Allowed: LoRAs of the same base model.")


def expert_names(cfg: MoLEConfig) -> list[str]:
    """The experts' names: `cfg.names`, or each directory's name (its parent's for '.../adapter')."""
    if cfg.names:
        return list(cfg.names)
    paths = [Path(p) for p in cfg.experts]
    return [p.parent.name if p.name == "adapter" and p.parent.name else p.name for p in paths]


def same_base(a: str | None, b: str | None) -> bool:
    """Whether two base-model names denote the same model: either is unknown, equal strings, the same
    local directory, or the same last path component ignoring case (a hub id and its local copy)."""
    if not a or not b or a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return pa.name.lower() == pb.name.lower()


def check_experts(cfg: MoLEConfig) -> list[tuple[str, str, dict]]:
    """(name, resolved directory, adapter metadata) of each MoLE expert, checked without loading
    tensors: distinct names, adapter directories, LoRA adapters only."""
    names = expert_names(cfg)
    if len(set(names)) != len(names):
        raise _error(f"MoLE expert names {names} repeat a name. Allowed: distinct names (set expert.names).")
    for name, path in zip(names, cfg.experts):
        if not (Path(path) / "adapter_model.safetensors").is_file():
            raise _error(f"MoLE expert {name!r}: {path} is not an adapter directory (no adapter_model.safetensors).")
    out = []
    for name, path in zip(names, cfg.experts):
        resolved = str(Path(path).resolve())
        meta = read_meta(resolved)
        etype = meta["expert"]["type"]
        if etype not in EXPERT_CONFIGS or EXPERT_CONFIGS[etype].stored_lora_scale(meta["expert"]) is None:
            raise _error(f"MoLE expert {name!r} ({resolved}) is a {etype!r} adapter whose tensors are not one plain "
                         "LoRA pair per module. Allowed: LoRA adapters (moetune runs of expert.type lora, or stock "
                         "PEFT LoRA directories).")
        out.append((name, resolved, meta))
    return out


@dataclass
class CALMConfig(ExpertConfig):
    """CALM settings (`expert:` with type calm; `model:` is the anchor)."""

    target_modules: list[str] = opt(factory=list)
    """Unused by calm: the composition points are set by num_compositions or anchor_layers."""
    scaled = False
    lora_plus = False
    path_keys = ("augmenting_model",)
    budget_keys = ()
    augmenting_model: str = ""
    """The augmenting model m_A (frozen): local model directory, hub id or built-in name. It is loaded
    on the anchor's device in the anchor's (compute) dtype, 4-bit as set by augmenting_quantization, and
    must share the anchor's tokenizer, unless tokenizer_check is align."""
    augmenting_quantization: str = opt("anchor", choices=("anchor", "none", "nf4", "fp4"))
    """4-bit loading of m_A with bitsandbytes: 'anchor' as the anchor (model.quantization and
    model.double_quantization); 'none' a float m_A beside a 4-bit anchor; 'nf4'/'fp4' a 4-bit m_A
    (e.g. beside a float anchor: m_A is frozen, so it may be quantised whatever the anchor is)."""
    num_compositions: int = opt(4, min=1)
    """n: compose after every N_B/n-th anchor layer with every N_A/n-th augmenting layer
    (0-based (k+1)*N/n - 1, k = 0..n-1). Ignored when anchor_layers is set."""
    anchor_layers: list[int] = opt(factory=list)
    """Explicit 0-based anchor decoder layers after which a composition is added (empty: from num_compositions)."""
    augmenting_layers: list[int] = opt(factory=list)
    """Explicit 0-based augmenting layers, one per entry of anchor_layers, whose outputs are attended to."""
    num_heads: int = opt(4, min=1)
    """Attention heads of each cross-attention."""
    head_dim: int | None = opt(None, min=1)
    """Width of each head (None: anchor hidden size / num_heads, which must divide)."""
    projection: str = opt("linear", choices=("linear", "mlp"))
    """f_proj: D_A -> D_B. 'linear': one affine map (the paper); 'mlp': affine, GELU, affine (hidden D_B)."""
    norm: bool = True
    """RMS-normalise the anchor states before W_Q and the projected augmenting states before W_K, W_V
    (learnable gains, start at 1; not in the paper)."""
    tokenizer_check: str = opt("strict", choices=("strict", "vocab", "off", "align"))
    """How the two tokenizers relate. Shared tokenizer (m_A reads the anchor's token ids): 'strict' same
    vocabulary and special tokens; 'vocab' same token -> id map; 'off' no check (you vouch that the ids
    mean the same tokens). 'align': the tokenizers may differ (both must be fast tokenizers); m_A reads
    the anchor's text with its own tokenizer (from augmenting_model's directory). For each anchor
    position t, text_t = the anchor's decoding of its real tokens <= t, leaving out the anchor's
    special tokens (chat markers, BOS/EOS) and a trailing unfinished UTF-8 character; the cross-attention
    at t reads exactly m_A's states on m_A's tokenization of text_t (with the special tokens m_A's
    tokenizer adds, e.g. its BOS), so it is causal in characters and later text cannot change it. One
    m_A forward per batch covers all positions (a tree-masked input); generation re-runs m_A on the
    whole text at every step (no m_A cache), so align mode is slower than a shared tokenizer."""

    def describe(self) -> str:
        return f"calm with {self.augmenting_model}"

    def card_line(self) -> str:
        return (f"calm, augmenting model `{self.augmenting_model}`, {self.num_heads}-head cross-attention "
                f"({plural(len(self.anchor_layers) or self.num_compositions, 'composition')})")

    def how_to_load(self, sub: str) -> str:
        return (f"the CALM composition layers (safetensors + moetune.json naming the anchor and the augmenting "
                f"model): `moetune.adapters.io.load_adapter(anchor, '{sub}')` loads the augmenting model too; or `moetune eval`")

    def merge_refusal(self) -> RecipeError:
        return RecipeError("Expert type 'calm' composes the anchor with a second model through cross-attention "
                           "layers, which add computation rather than a weight delta, so 'merge' cannot run on it "
                           "(and export.kind must be 'adapter'). Allowed: stages without 'merge', e.g. "
                           "stages=[train,eval,export]; eval scores the composed model and export writes the "
                           "composition adapter (safetensors + moetune.json naming both models).")

    def check_recipe(self, recipe) -> None:
        """Recipe-level checks that need no model (called by recipe._check_semantics)."""
        super().check_recipe(recipe)
        if not self.augmenting_model:
            raise RecipeError("Recipe key 'expert.augmenting_model' is empty; expert type 'calm' composes the anchor "
                              "(model.path) with a second model. Allowed: a local model directory, hub id or built-in name.")
        if bool(self.anchor_layers) != bool(self.augmenting_layers) or len(self.anchor_layers) != len(self.augmenting_layers):
            raise RecipeError(f"Recipe keys 'expert.anchor_layers' {list(self.anchor_layers)} and "
                              f"'expert.augmenting_layers' {list(self.augmenting_layers)} must be given together, "
                              "with one augmenting layer per anchor layer. Allowed: two lists of equal length, or "
                              "both empty (layers from expert.num_compositions).")
        if len(set(self.anchor_layers)) != len(self.anchor_layers):
            raise RecipeError(f"Recipe key 'expert.anchor_layers' repeats a layer: {list(self.anchor_layers)}. "
                              "Allowed: distinct layer indices.")
        if recipe.data.packing:
            raise RecipeError("Recipe key 'data.packing' is true, but expert type 'calm' runs a second model on the "
                              "same tokens with its own masks, which packing does not support. Allowed: false.")


EXPERT_CONFIGS: dict[str, type[ExpertConfig]] = {
    "lora": LoRAConfig,
    "hydralora": HydraLoRAConfig,
    "molora": MoLoRAConfig,
    "mov": MoVConfig,
    "mole": MoLEConfig,
    "calm": CALMConfig,
}
"""expert.type -> its settings class (the keys of `moetune.experts.REGISTRY`, in the same order)."""

MERGEABLE = frozenset(t for t, c in EXPERT_CONFIGS.items() if c.mergeable)
"""Expert types whose adapter folds into the base weights (their layer's `mergeable`)."""
