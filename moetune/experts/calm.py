"""CALM (Bansal et al., 2024, "LLM Augmented LLMs: Expanding Capabilities through Composition").

Two frozen causal LMs: the anchor m_B (the recipe's `model`, width D_B, N_B layers, whose head
makes the output) and the augmenting model m_A (`expert.augmenting_model`, width D_A, N_A layers).
n layers are chosen in each, every N_A/n-th and every N_B/n-th (0-based l_k = (k+1)·N/n - 1,
k = 0..n-1), or listed explicitly. After the k-th chosen anchor layer j_k, before the next one:

    H_B^{j_k} <- H_B^{j_k} + W_O CrossAttn(Q = H_B^{j_k} W_Q,  K = f_proj(H_A^{i_k}) W_K,  V = f_proj(H_A^{i_k}) W_V)

with f_proj: D_A -> D_B (linear, or a 2-layer MLP) and multi-head attention. Only f_proj, W_Q,
W_K, W_V, W_O (and two RMSNorm gains) train, one set per composition. Implementation choices
beyond the paper:
- the attention is causal (query position t sees augmenting positions <= t), so training with
  teacher forcing cannot read the future through m_A, and padding keys are masked;
- W_O starts at zero, so a fresh composed model computes exactly the anchor's logits;
- `norm`: H_B and f_proj(H_A) are RMS-normalised before the query and key/value maps, since
  the residual streams of pretrained models have large, layer-dependent scales;
- `tokenizer_check: align` lets the two models have different tokenizers: m_A reads the anchor's
  decoded text with its own tokenizer, and anchor position t attends to exactly m_A's states on the
  text of anchor tokens <= t (`calm_align`), which keeps the attention causal in characters.

moetune wires it like any other expert type: each composed anchor decoder layer is replaced by
a `CALMLayer` (an `ExpertLayer` whose `base` is the whole decoder block), so the training loop,
evaluation, checkpoints and adapter files are shared; m_A runs in `calm_bridge.AugmentingRunner`
through a forward pre-hook on the anchor's decoder stack. Anchor layers below the first
composition see no trainable parameter, so autograd records nothing there. Not mergeable (the
composition is computation, not a weight delta). `rank`, `alpha` and `target_modules` are unused;
`dropout` drops the composition output during training.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moetune.core.errors import RecipeError
from moetune.experts.base import ExpertLayer, compute_input
from moetune.experts.calm_align import load_aligner
from moetune.experts.calm_bridge import AugmentingRunner, check_tokenizers, load_augmenting
from moetune.models.layers import decoder_layers
from moetune.models.projection import dims, is_projection
from moetune.models.quant import frozen_bytes
from moetune.recipe.experts import CALMConfig


def evenly_spaced(depth: int, n: int) -> list[int]:
    """Every depth/n-th layer, 0-based: (k+1)*depth//n - 1 for k = 0..n-1 (the last layer is always included)."""
    return [(k + 1) * depth // n - 1 for k in range(n)]


def composition_pairs(cfg: CALMConfig, n_anchor: int, n_aug: int) -> list[tuple[int, int]]:
    """[(anchor layer j_k, augmenting layer i_k)] for the recipe, checked against the two depths."""
    if cfg.anchor_layers:
        pairs = list(zip(cfg.anchor_layers, cfg.augmenting_layers))
        for key, idx, depth in (("anchor_layers", cfg.anchor_layers, n_anchor),
                                ("augmenting_layers", cfg.augmenting_layers, n_aug)):
            bad = [i for i in idx if not 0 <= i < depth]
            if bad:
                raise RecipeError(f"Recipe key 'expert.{key}' has {bad}, outside the model's layers. Allowed: 0..{depth - 1}.")
        return pairs
    n = cfg.num_compositions
    if n > min(n_anchor, n_aug):
        raise RecipeError(f"Recipe key 'expert.num_compositions' is {n}, more than the layers of the anchor ({n_anchor}) "
                          f"or the augmenting model ({n_aug}). Allowed: 1..{min(n_anchor, n_aug)}.")
    return list(zip(evenly_spaced(n_anchor, n), evenly_spaced(n_aug, n)))


def block_width(block: nn.Module) -> int:
    """Residual width of a decoder block: the input size of its first projection (q_proj, GPT-2 c_attn)."""
    first = next((m for m in block.modules() if is_projection(m)), None)
    if first is None:
        raise TypeError(f"cannot find the width of decoder block {type(block).__name__}: no linear projection in it")
    return dims(first)[0]


class GainNorm(nn.RMSNorm):
    """RMSNorm computed in its gain's dtype. Under bf16 autocast the input arrives in bf16 while the gain is the
    float32 master; torch's fused kernel needs equal dtypes (it otherwise falls back, with a warning), and a
    norm is float32 work under autocast anyway (its output feeds W_Q / W_K, which autocast runs in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # (..., D_B) -> (..., D_B)
        return super().forward(x.to(self.weight.dtype))


class CALMLayer(ExpertLayer):
    """One frozen anchor decoder block followed by a trainable cross-attention over m_A's states."""

    config_cls = CALMConfig

    def __init__(self, base: nn.Module, cfg: CALMConfig, runner: AugmentingRunner, aug_layer: int, d_aug: int,
                 name: str = "") -> None:
        super().__init__(base, cfg, None, name)
        d = self.d_out                                                   # D_B
        self.runner = runner                                             # plain object: m_A is no submodule
        self.aug_layer = aug_layer
        self.heads = cfg.num_heads
        if cfg.head_dim is None and d % cfg.num_heads:
            raise RecipeError(f"Recipe key 'expert.num_heads' is {cfg.num_heads}, which does not divide the anchor "
                              f"width {d}. Allowed: a divisor of {d}, or set expert.head_dim.")
        self.head_dim = cfg.head_dim or d // cfg.num_heads
        inner = self.heads * self.head_dim
        self.proj = (nn.Linear(d_aug, d) if cfg.projection == "linear" else
                     nn.Sequential(nn.Linear(d_aug, d), nn.GELU(), nn.Linear(d, d)))   # f_proj: D_A -> D_B
        self.q_norm = GainNorm(d, eps=1e-6) if cfg.norm else nn.Identity()
        self.kv_norm = GainNorm(d, eps=1e-6) if cfg.norm else nn.Identity()
        self.w_q = nn.Linear(d, inner, bias=False)                       # (H·d_h, D_B)
        self.w_k = nn.Linear(d, inner, bias=False)
        self.w_v = nn.Linear(d, inner, bias=False)
        self.w_o = nn.Linear(inner, d, bias=False)                       # (D_B, H·d_h)
        nn.init.zeros_(self.w_o.weight)                                  # fresh: the anchor exactly
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def dims(self, base: nn.Module) -> tuple[int, int]:
        """(D_B, D_B): a decoder block maps the residual stream to itself."""
        d = block_width(base)
        return d, d

    def delta(self, h: torch.Tensor) -> torch.Tensor:                   # (b, T, D_B) -> (b, T, D_B)
        """W_O CrossAttn(H_B W_Q, f_proj(H_A) W_K, f_proj(H_A) W_V), query t reading the keys runner.allowed[:, t].

        allowed (from the runner) is causal and padding-masked over positions with a shared tokenizer,
        the text alignment in align mode. A query with no allowed key adds exactly zero."""
        a = self.runner.states[self.aug_layer]                           # (b, S, D_A)
        allowed = self.runner.allowed                                    # (b, T, S) bool
        b, T, _ = h.shape
        S = a.shape[1]
        x = compute_input(h, self.w_q.weight)
        kv = self.kv_norm(self.proj(compute_input(a, self.w_q.weight)))  # (b, S, D_B)
        q = self.w_q(self.q_norm(x)).view(b, T, self.heads, self.head_dim).transpose(1, 2)   # (b, H, T, d_h)
        k = self.w_k(kv).view(b, S, self.heads, self.head_dim).transpose(1, 2)               # (b, H, S, d_h)
        v = self.w_v(kv).view(b, S, self.heads, self.head_dim).transpose(1, 2)               # (b, H, S, d_h)
        empty = ~allowed.any(-1, keepdim=True)                           # (b, T, 1): queries with no key
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=(allowed | empty)[:, None])    # (b, H, T, d_h)
        o = o.transpose(1, 2).reshape(b, T, -1).masked_fill(empty, 0.0)  # (b, T, H·d_h)
        return self.drop(self.w_o(o))                                    # (b, T, D_B)

    def forward(self, *args, **kwargs):
        """The anchor block, then H_B <- H_B + delta(H_B); other outputs of the block pass through."""
        out = self.base(*args, **kwargs)
        if self.adapter_off:                                             # the anchor alone (m_A still runs)
            return out
        h = out[0] if isinstance(out, tuple) else out                    # (b, T, D_B)
        h = h + self.delta(h).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    @classmethod
    def inject_model(cls, model: nn.Module, cfg: CALMConfig) -> dict[str, "CALMLayer"]:
        """Load m_A, check (or, in align mode, load) the tokenizers, wrap the composed anchor blocks, hook m_A on."""
        if getattr(model, "calm_runner", None) is not None:
            raise RecipeError("This model already carries a CALM composition; load a fresh anchor.")
        aug = load_augmenting(cfg.augmenting_model, model, cfg.augmenting_quantization)
        device = next(model.parameters()).device
        aligner = None
        if device.type != "meta":                                        # meta (validate): nothing runs
            rows = aug.get_input_embeddings().num_embeddings
            if cfg.tokenizer_check == "align":
                aligner = load_aligner(model.name_or_path, cfg.augmenting_model, rows)
            else:
                check_tokenizers(model.name_or_path, cfg.augmenting_model, cfg.tokenizer_check, rows)
        prefix, blocks = decoder_layers(model)
        _, aug_blocks = decoder_layers(aug)
        pairs = composition_pairs(cfg, len(blocks), len(aug_blocks))
        runner = AugmentingRunner(aug, [i for _, i in pairs], aligner)
        d_aug = block_width(aug_blocks[0])                               # D_A
        layers: dict[str, CALMLayer] = {}
        for j, i in pairs:
            layer = cls(blocks[j], cfg, runner, i, d_aug, name=f"{prefix}.{j}")
            layer.to(device)                                             # composition tensors stay float32
            blocks[j] = layer
            layers[layer.name] = layer
        stack = model.get_submodule(prefix.rpartition(".")[0])          # the module that runs the blocks:
        stack.register_forward_pre_hook(runner.pre_hook, with_kwargs=True)  # base_model; OPT: model.decoder
        model.calm_runner = runner                                       # plain attribute, not a submodule
        return layers

    @classmethod
    def generation_state(cls, model: nn.Module) -> AugmentingRunner | None:
        """The runner: m_A's states and KV cache follow the anchor's cache rows (its snapshot/restore/select/shift/concat)."""
        return getattr(model, "calm_runner", None)

    @classmethod
    def extra_frozen_bytes(cls, model: nn.Module, cfg: CALMConfig, model_cfg, dtype_bytes: int) -> dict | None:
        """m_A's frozen weights, 4-bit as `augmenting_quantization` says (the anchor's setting for 'anchor')."""
        runner = getattr(model, "calm_runner", None)
        if runner is None:
            return None
        aq = cfg.augmenting_quantization
        quant = model_cfg.quantization if aq == "anchor" else aq
        return frozen_bytes(runner.model, dataclasses.replace(model_cfg, quantization=quant), dtype_bytes)
