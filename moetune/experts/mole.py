"""MoLE (Wu, Huang, Wei, ICLR 2024, "Mixture of LoRA Experts").

N LoRAs trained beforehand (one per task or domain) stay frozen; only the gates train
("hierarchical weight control"). At one wrapped projection, with E_i(x) = s_i B_i A_i x the
output of LoRA i (s_i = alpha_i / r_i its own scale), and j the gated place the projection
belongs to:

    e      = [E_1(x); ...; E_N(x)]                                   (..., N*d_out)
    G^j(x) = softmax((W_g^j LayerNorm(e) + b^j) / tau)               (..., N)
    y      = W0 x + sum_i G^j_i(x) E_i(x)

The experts are stacked once, zero-padded to the largest rank r of the module (padding adds
nothing) with each scale folded into B: A (N, r, d_in), B (N, d_out, r) = s_i [B_i, 0]. One
forward computes every expert at once (einsums batched over N, no loop
over adapters). Neither the gate nor the mix forms the N expert outputs: both work on the
low-rank activations h_n = A_n x (`MoLEGate` expands LayerNorm algebraically), so a MoLE
projection costs about one LoRA of rank sum_n r_n plus a gate of O(N^2 r) per token.
LayerNorm has no affine parameters: W_g and b follow it, which an affine would only duplicate.

Initial state: W_g = 0 and b = 0, so every gate is 1/N and a fresh MoLE is the plain average
of its LoRAs, y = W0 x + (1/N) sum_i E_i(x) (a linear merge with weights 1/N); with one
expert it is exactly that LoRA. (docs/METHODS.md does not fix the initial gate; uniform is the
state the balance loss prefers.)

Granularity (`expert.granularity`): which projections share one gated place j. The names
follow the paper's NLP backbone (Flan-T5), where a `block` holds several `layer`s
(self-attention, feed-forward) and each layer several weight matrices:
  - matrix:  one gate per wrapped projection ('...layers.3.self_attn.q_proj');
  - layer:   one per sub-layer, i.e. per parent module of the projections ('...layers.3.self_attn',
             '...layers.3.mlp'; GPT-2: '...h.3.attn', '...h.3.mlp');
  - block:   one per transformer block ('...layers.3', GPT-2 '...h.3');
  - network: one gate for the whole model.
Projections of one place have different output sizes (q vs k vs down_proj), so one W_g cannot
read all of them; and they run one after another, so a gate built from all of them would not
exist when the first one needs it. A shared place therefore computes G^j once per forward at
its FIRST projection in forward order (q_proj, gate_proj, GPT-2 c_attn, Phi-3 qkv_proj, ...: block
index, then `models.targets.forward_rank`, not the order a model defines its modules in), from that
projection's expert outputs, and the others reuse that very tensor (same autograd graph): one
W_g^j per place, one gate per token per place, gradients from every projection of the place.

Balance (docs/METHODS.md): q_i = mean gate of expert i over real tokens AND gated places,
L_balance = -log prod_i q_i (`routing.mole_balance`), added once per forward with weight
alpha = `router.balance_weight` when `router.balance_loss: mole`; it is a function of the
gate probabilities, so its gradient reaches W_g (tested). Masking (`expert.masked`,
`--mask-experts`): a masked expert's logit is set to -inf, so its gate is 0 and the others
are renormalised, G_i / sum_(kept) G_k.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moetune.core.adapter_files import WEIGHTS, read_adapter
from moetune.core.errors import RecipeError
from moetune.core.recompute import recomputing
from moetune.experts.base import ExpertLayer, compute_input
from moetune.experts.balance import load_sums
from moetune.experts.routing import Router, forward_mask, router_losses
from moetune.models.layers import layer_index
from moetune.models.projection import dims as base_dims
from moetune.models.projection import is_projection
from moetune.models.targets import forward_rank
from moetune.recipe.experts import EXPERT_CONFIGS, MoLEConfig, check_experts, expert_names

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "moetune.json")


def _error(msg: str) -> Exception:
    return RecipeError(msg)


@dataclass(frozen=True)
class Expert:
    """One frozen LoRA: its name, directory, scale s = alpha / r, base model and tensors
    ('<module>.lora_A' (r, d_in), '<module>.lora_B' (d_out, r))."""

    name: str
    path: str
    scale: float
    base_model: str | None
    state: dict

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.state})


@lru_cache(maxsize=2)
def _load(key: tuple) -> tuple[Expert, ...]:
    out = []
    for name, path, _stamp in key:
        meta, state = read_adapter(path)
        e = meta["expert"]  # a plain LoRA pair per module (check_experts): s from its settings class
        out.append(Expert(name, path, EXPERT_CONFIGS[e["type"]].stored_lora_scale(e), meta.get("base_model"), state))
    return tuple(out)


def load_experts(cfg: MoLEConfig) -> tuple[Expert, ...]:
    """Read the experts of `cfg` (checked by `check_experts`; cached while their files are unchanged)."""
    key = []
    for name, path, _meta in check_experts(cfg):
        st = (Path(path) / WEIGHTS).stat()
        key.append((name, path, (st.st_mtime_ns, st.st_size)))  # path: resolved
    return _load(tuple(key))


def stack_experts(experts, module: str, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, r, d_in), B (N, d_out, r) for one module: r the largest expert rank there, each zero-padded,
    s_i folded into B_i; an expert that does not adapt `module` contributes zeros."""
    ranks = [e.state[f"{module}.lora_A"].shape[0] if f"{module}.lora_A" in e.state else 0 for e in experts]
    r = max(ranks)
    a = torch.zeros(len(experts), r, d_in)                               # (N, r, d_in)
    b = torch.zeros(len(experts), d_out, r)                              # (N, d_out, r)
    for i, (e, ri) in enumerate(zip(experts, ranks)):
        if ri == 0:
            continue
        ai, bi = e.state[f"{module}.lora_A"], e.state[f"{module}.lora_B"]
        if tuple(ai.shape) != (ri, d_in) or tuple(bi.shape) != (d_out, ri):
            raise _error(f"MoLE expert {e.name!r} ({e.path}): {module} has lora_A {tuple(ai.shape)} and lora_B "
                         f"{tuple(bi.shape)}, but this model's projection maps {d_in} -> {d_out}. Allowed: LoRAs "
                         "trained on this base model.")
        a[i, :ri] = ai.float()
        b[i, :, :ri] = bi.float() * e.scale
    return a, b


def forward_order(name: str) -> tuple[int, int]:
    """Sort key of a projection name in forward order: its block index, then its rank within the block."""
    return layer_index(name) or 0, forward_rank(name)


def place_of(name: str, granularity: str) -> str:
    """The gated place of a projection: itself, its parent, its block ('...layers.3') or the network."""
    if granularity == "matrix":
        return name
    if granularity == "layer":
        return name.rpartition(".")[0]
    if granularity == "block":
        m = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", name)
        return m.group(1) if m else ""
    return ""


class MoLEGate(Router):
    """G = softmax((W_g LayerNorm(e) + b) / tau) over the N experts; W_g: (N, N*d_out) and b start at 0.

    A `Router` subclass, so the routing report and its forward hooks see MoLE like any routed type.

    Computed from the experts' low-rank activations h_n = A_n x (N, r) without forming e (N*d_out
    values per token): with e_n = B_n h_n (B_n scaled, (d_out, r)) and D = N*d_out,
        W_g e          = sum_n (W_g^(n) B_n) h_n        W_g^(n): the columns of W_g reading e_n
        mean(e)        = sum_n u_n . h_n,               u_n = (1/D) 1^T B_n            (r,)
        mean(e^2)      = sum_n h_n^T (B_n^T B_n) h_n / D                               (r x r Gram)
        W_g LN(e)      = (W_g e - mean(e) W_g 1) / sqrt(var(e) + eps)
    which is LayerNorm's formula expanded (eps = 1e-5 as F.layer_norm): O(N^2 r + N r^2) per token
    instead of O(N^2 d_out), and the mixed output needs no e either (see MoLELayer.delta)."""

    def __init__(self, d_out: int, num_experts: int, temperature: float, cfg=None) -> None:
        with torch.random.fork_rng(devices=[]):                          # Router draws a random init; ours is 0
            super().__init__(num_experts * d_out, num_experts, cfg)      # W_g: (N, N*d_out)
        nn.init.zeros_(self.weight)
        self.bias = nn.Parameter(torch.zeros(num_experts))               # (N,)
        self.temperature = temperature
        self.eps = 1e-5
        self.register_buffer("keep", torch.ones(num_experts, dtype=torch.bool), persistent=False)

    def forward(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (..., N, r), (N, d_out, r) -> (..., N)
        """Gates (..., N). With router.level 'sequence' the logits are pooled over each prompt
        (`Router.pool`); with router.domain_loss_weight the supervision's gates are
        recomputed from the detached h (the experts are frozen: that loss trains W_g and b only)."""
        with torch.autocast(h.device.type, enabled=False):
            h, b = h.float(), b.float()
            logits = self.pool(self.logits(h, b))                        # (..., N)
            probs = torch.softmax(logits.masked_fill(~self.keep, float("-inf")) / self.temperature, -1)
            sup = self.supervision_probs(lambda: self.logits(h.detach(), b).masked_fill(~self.keep, -1e9)) \
                if self.training and self.cfg.domain_loss_weight > 0 else None
        if not recomputing():  # see recompute.py: keep the original forward's gates
            self._last = (logits, probs, probs)
            self._sup = sup
            self._mask = forward_mask(probs)
        return probs

    def logits(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (..., N, r) float, (N, d_out, r) -> (..., N)
        """(W_g LayerNorm(e) + b) per token, by the expansion in the class docstring."""
        n, d_out, _ = b.shape
        w = self.weight.float().view(n, n, d_out)                        # (N_gate, N, d_out): W_g by expert block
        m = torch.einsum("kno,nor->knr", w, b)                           # (N_gate, N, r): W_g^(n) B_n
        we = torch.einsum("...nr,knr->...k", h, m)                       # (..., N_gate): W_g e
        u = b.sum(1) / (n * d_out)                                       # (N, r)
        mean = torch.einsum("...nr,nr->...", h, u)                       # (...,): mean(e)
        gram = torch.einsum("nor,nos->nrs", b, b)                        # (N, r, r): B_n^T B_n
        sq = torch.einsum("...nr,nrs,...ns->...", h, gram, h) / (n * d_out)  # (...,): mean(e^2)
        inv = torch.rsqrt((sq - mean.square()).clamp_min(0) + self.eps)  # (...,)
        return (we - mean.unsqueeze(-1) * w.sum((1, 2))) * inv.unsqueeze(-1) + self.bias.float()  # (..., N)


class MoLELayer(ExpertLayer):
    """N frozen LoRA experts around one projection, mixed by the gate of its place."""

    config_cls = MoLEConfig

    def __init__(self, base: nn.Module, cfg: MoLEConfig, router=None, name: str = "") -> None:
        super().__init__(base, cfg, router, name)
        experts = load_experts(cfg)
        self.expert_names = [e.name for e in experts]
        a, b = stack_experts(experts, name, self.d_in, self.d_out)
        self.register_buffer("expert_A", a, persistent=False)           # (N, r, d_in), frozen
        self.register_buffer("expert_B", b, persistent=False)           # (N, d_out, r), frozen, scaled
        self.place = place_of(name, cfg.granularity)
        self._leader: tuple[MoLELayer, ...] = (self,)  # a tuple: a plain reference, not a submodule
        self._places: tuple[MoLELayer, ...] = ()       # set on the first place: every place, for the balance loss
        self._gate: torch.Tensor | None = None
        self.router = MoLEGate(self.d_out, len(experts), cfg.temperature, router)

    @classmethod
    def target_names(cls, model: nn.Module, cfg: MoLEConfig) -> list[str]:
        """Every projection some expert adapts, in model order; an expert adapting a module the model
        lacks (or one that is not a linear projection) is a RecipeError naming both."""
        experts = load_experts(cfg)
        if not experts:
            raise _error("Recipe key 'expert.experts' is empty: MoLE needs trained LoRA adapters (with "
                         "experts_from: per_domain, `moetune train` trains them before the gates).")
        present = {n for n, m in model.named_modules() if is_projection(m)}
        for e in experts:
            missing = [m for m in e.modules if m not in present]
            if missing:
                raise _error(f"MoLE expert {e.name!r} ({e.path}, base {e.base_model!r}) adapts {len(missing)} "
                             f"module(s) that this model has no linear projection for, e.g. {missing[:3]}. "
                             "Allowed: LoRAs trained on this base model.")
        wanted = {m for e in experts for m in e.modules}
        return [n for n, m in model.named_modules() if n in wanted and is_projection(m)]

    @classmethod
    def after_inject(cls, layers: dict[str, ExpertLayer]) -> None:
        """Group the layers by gated place; the first layer of a place keeps its gate, the others drop
        theirs and read the first one's; the first place computes the balance loss over all places."""
        groups: dict[str, list[MoLELayer]] = {}
        for layer in sorted(layers.values(), key=lambda m: forward_order(m.name)):
            groups.setdefault(layer.place, []).append(layer)
        leaders = []
        for members in groups.values():
            for m in members[1:]:
                del m.router
                m._leader = (members[0],)
            leaders.append(members[0])
        if leaders:
            leaders[0]._places = tuple(leaders)
            cfg = leaders[0].cfg
            if cfg.masked:
                set_mask(leaders, list(cfg.masked))

    def expert_hidden(self, x: torch.Tensor) -> torch.Tensor:           # (..., d_in) -> (..., N, r)
        """h_n = A_n x for every expert n at once (one einsum over the stacked A)."""
        return torch.einsum("...d,nrd->...nr", compute_input(x, self.expert_A), self.expert_A)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:          # (..., d_in) -> (..., N, d_out)
        """E_n(x) = s_n B_n A_n x for every expert n (reports and tests; the forward never forms it)."""
        return torch.einsum("...nr,nor->...no", self.expert_hidden(x), self.expert_B)

    def gates(self, h: torch.Tensor) -> torch.Tensor:                   # (..., N, r) -> (..., N)
        lead = self._leader[0]
        if lead is self:
            self._gate = self.router(h, self.expert_B)
            return self._gate
        w = lead._gate
        if w is None or w.shape[:-1] != h.shape[:-2]:
            raise RuntimeError(f"{self.name}: the gate of its place ({lead.name}) did not run first in this forward")
        return w

    def delta(self, x: torch.Tensor) -> torch.Tensor:                   # (..., d_in) -> (..., d_out)
        """sum_n G_n B_n h_n as ONE matmul of rank N*r: the gates scale the h_n, B is stacked."""
        h = self.expert_hidden(x)                                        # (..., N, r)
        w = self.gates(h)                                                # (..., N)
        return torch.einsum("...nr,nor->...o", h * w.unsqueeze(-1).to(h.dtype), self.expert_B)  # (..., d_out)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(logits (P, ..., N), probs (P, ..., N), mask (P, ...) or None) of every place's last forward, on the
        first place only (None elsewhere): the balance loss and z-loss count tokens AND places."""
        if not self._places or any(p.router._last is None for p in self._places):
            return None
        logits = torch.stack([p.router._last[0] for p in self._places])     # (P, ..., N)
        probs = torch.stack([p.router._last[1] for p in self._places])      # (P, ..., N)
        masks = [p.router._mask for p in self._places]
        mask = None if any(m is None for m in masks) else torch.stack(masks)  # (P, ...): real tokens only
        return logits, probs, mask

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """On the first place only: alpha * balance over the gates of every place (real tokens and places);
        the domain loss per place, summed as `Router.aux_losses` sums over layers."""
        got = self._stacked()
        if got is None:
            return {}
        sups = [p.router._sup for p in self._places if p.router._sup is not None]
        return router_losses(self.router.cfg, *got, sups)

    def balance_sums(self):
        got = self._stacked()
        return None if got is None else (self.router.cfg, load_sums(got[0], got[1], 1, got[2]))

    def routing_stats(self) -> dict | None:
        return self._leader[0].router.stats()

    @classmethod
    def parameters_over_experts(cls, model: nn.Module, cfg: MoLEConfig, router, targets: list[str], n: int) -> int:
        """The gates over n experts adapting `targets`: one `MoLEGate` per gated place, sized by the output of the
        place's first projection in forward order (as `after_inject` picks it)."""
        leaders: dict[str, str] = {}
        for name in sorted(targets, key=forward_order):
            leaders.setdefault(place_of(name, cfg.granularity), name)
        with torch.device("meta"):
            return sum(p.numel() for name in leaders.values()
                       for p in MoLEGate(base_dims(model.get_submodule(name))[1], n, cfg.temperature, router).parameters())

    @classmethod
    def export_config(cls, cfg: MoLEConfig, out_dir: Path) -> dict:
        """Copy each expert's adapter files to out_dir/experts/<i>_<name>/, so the saved MoLE is
        self-contained, and record those relative paths."""
        names, rel = expert_names(cfg), []
        for i, (name, path) in enumerate(zip(names, cfg.experts)):
            sub = f"experts/{i}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
            (out_dir / sub).mkdir(parents=True)
            for f in ADAPTER_FILES:
                if (Path(path) / f).is_file():
                    shutil.copy2(Path(path) / f, out_dir / sub / f)
            rel.append(sub)
        return {**dataclasses.asdict(cfg), "experts": rel, "names": names, "experts_from": "list"}

    @classmethod
    def import_config(cls, cfg: MoLEConfig, adapter_dir: Path) -> MoLEConfig:
        cfg.experts = [p if Path(p).is_absolute() else str(adapter_dir / p) for p in cfg.experts]
        return cfg

    @classmethod
    def set_mask(cls, layers, names: list[str]) -> None:
        set_mask(layers, names)

    @classmethod
    def write_mask(cls, adapter_dir: Path, names: list[str]) -> None:
        write_mask(adapter_dir, names)

    @classmethod
    def lora_mixture(cls, layers: dict[str, ExpertLayer], place_gates: dict[str, torch.Tensor]
                     ) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
        """Each wrapped module gets the mean gate of its gated place (the place's first layer names it)."""
        mole = {n: m for n, m in layers.items() if isinstance(m, MoLELayer)}
        first = next(iter(mole.values()))
        weights = {n: place_gates[m._leader[0].name] for n, m in mole.items()}
        return list(first.cfg.experts), expert_names(first.cfg), weights


def set_mask(layers, names: list[str]) -> None:
    """Fix the gates of the experts named in `names` at 0 on every MoLE layer of `layers` (the others
    renormalise); an empty list unmasks. Unknown names, or masking every expert, are RecipeErrors."""
    layers = [m for m in layers if isinstance(m, MoLELayer)]
    if not layers:
        raise _error("--mask-experts applies to MoLE adapters (expert.type mole); this adapter has no MoLE layer.")
    known = layers[0].expert_names
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _error(f"Cannot mask expert(s) {unknown}: not experts of this MoLE. Allowed: {', '.join(known)}.")
    keep = torch.tensor([n not in names for n in known])
    if not keep.any():
        raise _error(f"Cannot mask every expert ({', '.join(known)}): at least one must keep its gate.")
    for m in layers:
        if m._leader[0] is m:
            m.router.keep.copy_(keep)


def write_mask(adapter_dir: str | Path, names: list[str]) -> None:
    """Record `names` as masked in a saved MoLE adapter's moetune.json (checked against its experts)."""
    path = Path(adapter_dir) / "moetune.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    expert = meta.get("expert", {})
    if expert.get("type") != "mole":
        raise _error(f"--mask-experts applies to MoLE adapters; {adapter_dir} holds a {expert.get('type')!r} adapter.")
    known = expert.get("names") or []
    unknown = [n for n in names if n not in known]
    if unknown or set(names) >= set(known):
        raise _error(f"Cannot mask {names}: " + (f"{unknown} are not experts of this MoLE" if unknown else
                     "at least one expert must keep its gate") + f". Experts: {', '.join(known)}.")
    expert["masked"] = list(names)
    path.write_text(json.dumps(meta, indent=2))
