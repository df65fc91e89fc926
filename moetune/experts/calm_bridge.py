"""CALM plumbing: the frozen augmenting model m_A, run once per anchor forward, in step with the anchor's cache.

Bansal et al. (2024), "LLM Augmented LLMs: Expanding Capabilities through Composition": m_A
runs once per input, without gradients, and only its hidden states at the composed layers are
kept. Here a forward pre-hook on the anchor's decoder stack (the module that holds the decoder blocks:
`anchor.base_model`, which both `anchor(...)` and the sliced-head loss call; OPT's `model.decoder`) runs m_A's decoder stack (its output head is never
run) on the same token ids, attention mask and position ids, and forward hooks on m_A's chosen
decoder layers keep their outputs:

    states[i] = H_A^i : (b, S, D_A)       for every composed augmenting layer i,
    allowed         : (b, T, S) bool    which of the S states each of the T new anchor queries may read,

(paper notation: m_A is the augmenting model, of width D_A; m_B the anchor; b the batch size),
where S is the number of positions seen so far and allowed[., t, s] = (s <= S-T+t) and s is not
padding: the cross-attention is causal. Without a cache S = T, the input length. When
the anchor is called with its KV cache (generation), m_A is called with its own KV cache on just
the new tokens, and the new states are appended, so the composition layers attend over the
prompt and every generated token while m_A runs once per token. The anchor's cache is found by
type (a transformers `Cache`, whatever the keyword), so the prompt may arrive in any number of
prefill calls. The two caches stay in step: a cached anchor call whose past length exceeds what m_A
has seen, or with another cache, is an error, never a silent recomputation; a cache cropped back
(assisted decoding) crops m_A's states too. Beam search, which reorders the anchor's cache, is not
supported (greedy and sampling are).

With `expert.tokenizer_check: align` the models need not share a tokenizer: a `calm_align.TextAligner`
turns the anchor's ids into text and m_A's own ids, m_A runs without a cache on the whole text so
far at every call, and `allowed` comes from the text alignment instead (see calm_align).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Cache, DynamicCache

from moetune.core.errors import RecipeError
from moetune.core.ui import plural
from moetune.experts.calm_align import TextAligner
from moetune.models.layers import decoder_layers
from moetune.models.load import DTYPES, load_config, load_model, load_tokenizer
from moetune.models.quant import quantization_of
from moetune.recipe import ModelConfig

# transformers (a heavy import) is imported inside the functions that use it, like moetune.models.load does.


def load_augmenting(path: str, anchor: nn.Module, quantization: str = "anchor") -> nn.Module:
    """Load m_A frozen, in eval mode, on the anchor's device, in the anchor's float (= compute) dtype,
    4-bit as `quantization` says ('anchor': as the anchor; 'none', 'nf4', 'fp4': so).

    A meta-device anchor (`moetune validate`) gets a meta-device m_A built from its config alone."""
    emb = anchor.get_input_embeddings().weight                  # float in every base: the compute dtype
    quant, double = quantization_of(anchor)
    if quantization != "anchor":  # m_A's own 4-bit setting (double quantisation as the anchor's, default on)
        quant = quantization
    dtype = next((k for k, v in DTYPES.items() if v == emb.dtype), "float32")
    cfg = ModelConfig(path=path, dtype=dtype, quantization=quant, double_quantization=double)
    if emb.device.type == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_config(cfg))
        return model.requires_grad_(False).eval()
    return load_model(cfg, emb.device)


def check_tokenizers(anchor_path: str, augmenting_path: str, mode: str, aug_vocab_rows: int) -> None:
    """RecipeError unless m_A reads the anchor's token ids as the same tokens.

    mode 'strict': same vocabulary (token -> id) and same special tokens; 'vocab': same vocabulary;
    'off': no comparison. Every mode needs m_A's embedding table to cover the anchor's ids."""
    tok_a = load_tokenizer(ModelConfig(path=anchor_path))
    how = ("CALM feeds the same token ids to both models, so by default they must share a tokenizer. "
           "Allowed: an augmenting model with the anchor's tokenizer; or expert.tokenizer_check=vocab "
           "(special tokens may differ) or off (you vouch that the ids mean the same tokens); or "
           "expert.tokenizer_check=align (different tokenizers: m_A reads the anchor's decoded text with its own "
           "tokenizer, aligned by characters; slower).")
    if len(tok_a) > aug_vocab_rows:
        raise RecipeError(f"Recipe key 'expert.augmenting_model' is {augmenting_path!r}, whose embedding table has "
                          f"{plural(aug_vocab_rows, 'row')}, fewer than the anchor tokenizer's {plural(len(tok_a), 'token')}. {how}")
    if mode == "off":
        return
    tok_b = load_tokenizer(ModelConfig(path=augmenting_path))
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    diff = ""
    if va != vb:
        only_a, only_b = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
        diff = (f"vocabularies differ ({len(va)} vs {plural(len(vb), 'token')}; only the anchor has {only_a[:3]}, only the "
                f"augmenting model has {only_b[:3]}, different ids for {moved[:3]})")
    elif mode == "strict":
        sa = {k: str(v) for k, v in tok_a.special_tokens_map.items()}
        sb = {k: str(v) for k, v in tok_b.special_tokens_map.items()}
        if sa != sb:
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            diff = "special tokens differ: " + ", ".join(f"{k} {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys)
    if diff:
        raise RecipeError(f"Recipe key 'expert.augmenting_model' is {augmenting_path!r}, whose tokenizer does not "
                          f"match the anchor's ({anchor_path!r}): {diff}. {how}")


class AugmentingRunner:
    """Holds m_A (not a submodule of the anchor: it never trains, never changes mode, is never saved)
    and the states of the current input; `pre_hook` runs before every call of the anchor's decoder stack.
    With an `aligner` (tokenizer_check align) m_A reads its own tokenization of the anchor's text."""

    def __init__(self, model: nn.Module, layers: list[int], aligner: TextAligner | None = None) -> None:
        self.model = model
        self.layers = sorted(set(layers))
        self.aligner = aligner
        self.states: dict[int, torch.Tensor] = {}   # augmenting layer -> (b, S, D_A)
        self.allowed: torch.Tensor | None = None    # (b, T, S) bool: what each new anchor query may read
        self.ids: torch.Tensor | None = None        # (b, S_B) every anchor id so far (align mode only)
        self.cache = None                           # m_A's KV cache while the anchor generates (shared mode)
        self.anchor_cache = None                    # the anchor cache object it is in step with
        self.length = 0                             # anchor positions seen (S_B; = S in shared mode)
        self.calls = 0                              # m_A forwards run (for tests and logs)
        self._new: dict[int, torch.Tensor] = {}
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.x
        _, blocks = decoder_layers(model)
        for i in self.layers:
            blocks[i].register_forward_hook(self._keeper(i))

    def _keeper(self, i: int):
        def hook(module, args, out):
            self._new[i] = out[0] if isinstance(out, tuple) else out  # (b, T, D_A)
        return hook

    def reset(self) -> None:
        self.states, self.allowed, self.ids, self.cache, self.anchor_cache, self.length = {}, None, None, None, None, 0

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs) on the anchor's decoder stack; leaves its inputs unchanged.

        Independent of how `generate` feeds the anchor: the cache is whichever argument is a transformers
        `Cache` (whatever its keyword: `past_key_values` in early 5.x, `cache` later), its past length
        comes from `get_seq_length()`, so a prompt fed in any number of prefill calls, then one token
        at a time, keeps m_A in step; a cache cropped back (assisted decoding) crops m_A's side too."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("CALM needs input_ids (not inputs_embeds): the augmenting model reads the same tokens.")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise RuntimeError("CALM needs a 2-D (batch, positions) attention mask; static/compiled caches that "
                               "pass 4-D masks are not supported.")
        past = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = past is not None or bool(getattr(module.config, "use_cache", False))
        past_len = past.get_seq_length() if past is not None else 0
        B, T = ids.shape
        if past_len == 0:  # a fresh input: forget the previous one
            self.reset()
            self.anchor_cache = past
            if use_cache and self.aligner is None:
                self.cache = DynamicCache(config=self.model.config)
        else:
            self._follow(past, past_len)
        S = past_len + T
        real = (mask.bool() if mask is not None
                else torch.ones(B, S, dtype=torch.bool, device=ids.device))   # (b, S)
        if real.shape != (B, S):
            raise RuntimeError(f"CALM: attention mask of shape {tuple(real.shape)} for {plural(T, 'new token')} after "
                               f"{past_len} cached ones; expected {(B, S)} (is the KV cache passed as a "
                               "transformers Cache?).")
        self._new = {}
        if self.aligner is not None:
            self._run_aligned(torch.cat([self.ids, ids], 1) if past_len else ids, real, T)
        else:
            with torch.no_grad():
                self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=kwargs.get("position_ids"),
                                      use_cache=bool(use_cache), **{self._cache_key: self.cache if use_cache else None})
            for i in self.layers:
                new = self._new[i].detach()                                  # (b, T, D_A)
                self.states[i] = torch.cat([self.states[i], new], 1) if past_len else new   # (b, S, D_A)
            # The T queries are the last T of the S positions: query t (position S-T+t) sees keys s <= S-T+t.
            pos_q = torch.arange(S - T, S, device=ids.device)                # (T,)
            causal = torch.arange(S, device=ids.device)[None, :] <= pos_q[:, None]   # (T, S)
            self.allowed = causal[None] & real[:, None, :]                   # (b, T, S)
        self.calls += 1
        self._new = {}
        self.length = S
        return None

    def _follow(self, past, past_len: int) -> None:
        """Check that m_A has followed the anchor's cache `past` (past_len > 0 positions); crop back to it if
        the anchor's cache was cropped. Anything else (another input in between, a reordered or foreign
        cache) is an error, never a silent recomputation."""
        held = self.ids if self.aligner is not None else self.cache
        same = self.anchor_cache is None or past is self.anchor_cache
        if held is None or not same or past_len > self.length:
            raise RuntimeError(f"CALM: the anchor was called with a KV cache of {past_len} positions, but the "
                               f"augmenting model has followed {self.length}; the two must advance together "
                               "(greedy or sampled generation; beam search reorders caches and is not supported).")
        self.anchor_cache = past
        if past_len < self.length:                                       # the anchor's cache was cropped
            if self.aligner is not None:
                self.ids = self.ids[:, :past_len]                            # (b, past_len)
            else:
                self.cache.crop(past_len - self.length)               # negative: drop that many (any 5.x)
                self.states = {i: s[:, :past_len] for i, s in self.states.items()}   # (b, past_len, D_A)
            self.length = past_len

    def _run_aligned(self, ids: torch.Tensor, real: torch.Tensor, T: int) -> None:
        """Align mode: m_A (no cache) on its tokenization of every new anchor prefix, in one tree-masked forward.

        ids, real: (b, S_B) all anchor ids so far and their padding mask. Sets states[i]: (b, S, D_A)
        over m_A's tree layout and allowed: (b, T, S) (calm_align.TextAligner.inputs)."""
        aug_ids, pos, see, allowed = self.aligner.inputs(ids, real, T)     # (b, S), (b, S), (b, S, S), (b, T, S)
        dtype = self.model.dtype
        mask = torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill(~see, torch.finfo(dtype).min)
        with torch.no_grad():
            self.model.base_model(input_ids=aug_ids, attention_mask=mask[:, None], position_ids=pos, use_cache=False)
        self.states = {i: self._new[i].detach() for i in self.layers}       # (b, S, D_A)
        self.allowed, self.ids = allowed, ids

    # ------------------------------------------------ rows that join and leave a batch (`moetune serve`)
    # The ExpertLayer.generation_state protocol: a state S = (states, m_A cache (keys, values) per layer,
    # anchor ids (align mode), length), every tensor laid out like the anchor's left-padded KV cache rows.

    def snapshot(self) -> tuple:
        """The current input's state, by reference."""
        kv = [(lay.keys, lay.values) for lay in self.cache.layers] if self.cache is not None else None
        return dict(self.states), kv, self.ids, self.length

    def restore(self, state: tuple, anchor_cache) -> None:
        """Make `state` current, in step with the anchor's KV cache object `anchor_cache`."""
        states, kv, ids, length = state
        self.states, self.ids, self.length = dict(states), ids, length
        self.cache = DynamicCache(ddp_cache_data=kv) if kv is not None else None
        self.anchor_cache, self.allowed = anchor_cache, None

    @staticmethod
    def select(state: tuple, idx: torch.Tensor) -> tuple:
        """Keep batch rows `idx`."""
        states, kv, ids, length = state
        return ({i: s[idx] for i, s in states.items()}, None if kv is None else [(k[idx], v[idx]) for k, v in kv],
                None if ids is None else ids[idx], length)

    @staticmethod
    def shift(state: tuple, n: int) -> tuple:
        """n > 0: n masked positions added on the left (zeros); n < 0: the -n leftmost positions dropped."""
        if n == 0:
            return state
        states, kv, ids, length = state

        def move(t: torch.Tensor, dim: int) -> torch.Tensor:             # (b, ..., S, ...) along dim
            if n < 0:
                return t.narrow(dim, -n, t.shape[dim] + n)
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([t.new_zeros(shape), t], dim)

        return ({i: move(s, 1) for i, s in states.items()},                     # (b, S, D_A)
                None if kv is None else [(move(k, 2), move(v, 2)) for k, v in kv],   # (b, H, S, d)
                None if ids is None else move(ids, 1), length + n)             # (b, S_B)

    @staticmethod
    def concat(parts: list[tuple]) -> tuple:
        """Rows of every state stacked (all of one length)."""
        if len({p[3] for p in parts}) != 1:
            raise RuntimeError("CALM: states of different lengths cannot be stacked; shift them first")
        states = {i: torch.cat([p[0][i] for p in parts]) for i in parts[0][0]}
        kv = None if parts[0][1] is None else [
            (torch.cat([p[1][j][0] for p in parts]), torch.cat([p[1][j][1] for p in parts]))
            for j in range(len(parts[0][1]))]
        ids = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
        return states, kv, ids, parts[0][3]
