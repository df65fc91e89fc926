"""CALM with different tokenizers (`expert.tokenizer_check: align`): m_A reads the anchor's text with its own tokenizer.

The anchor m_B and the augmenting model m_A share no token ids, so they are aligned through
text. For anchor position t of a row, with real (non-padding) tokens b_0..b_t, the text so far is

    text_t = decode_B(b_0..b_t)    anchor special tokens (chat markers, BOS/EOS, padding) left out,
                                   no clean-up of spaces, a trailing U+FFFD (an unfinished UTF-8
                                   character) dropped,
    P_t    = tokenize_A(text_t)    m_A's ids, with the special tokens m_A's tokenizer adds (e.g. BOS),

and the cross-attention at anchor position t reads exactly m_A's hidden states on P_t, nothing
else. This is "causal in characters" made exact: what position t sees is a function of b_0..b_t
alone. Attending instead to the m_A tokens of the whole text whose character span ends by text_t's
last character would leak the future through m_A's segmentation, which depends on the characters
that follow (BPE splits 'Sh' and 'Shout' differently, and a token boundary at the end of text_t
says whether the next token continues the word); training with teacher forcing would learn from
that leak and generation, where the text always ends at t, would never see it.

One m_A forward serves every position of a row. Let X = P_last (the whole text) and L_t the length
of the longest common prefix of P_t and X. m_A is causal, so its states on P_t[:L_t] are its
states on X[:L_t]; only the tail P_t[L_t:] (typically the one or two tokens of an unfinished word)
needs states of its own. The row's m_A input is X followed by every distinct non-empty tail, each
tail with position ids L_t, L_t+1, ... and a 4-D attention mask under which a tail token sees
X[:L_t] and the tail up to itself: a tree of the sequences P_t. Each token and each anchor query
is described by a triple (a, lo, hi): it sees trunk tokens [0, a) and flat tokens [lo, hi); the
query of anchor position t gets the triple of P_t's last token, so it attends to exactly P_t.
An anchor position with P_t empty (no text yet, no BOS) attends to nothing: zero contribution.

Cost: m_A's input holds X plus the tails (about 1-3x the text's m_A tokens) under a dense mask,
and both tokenizers run once per anchor position (every prefix is decoded and re-tokenized: O(T^2)
characters per row, in the Rust tokenizers, which is why fast tokenizers are required). During
generation m_A keeps no KV cache: every step re-runs it on the whole text so far (slower than the
shared-tokenizer mode, which runs m_A once per new token). m_A must accept a custom 4-D float
attention mask (transformers' sdpa and eager attention do; flash-attention does not).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moetune.core.errors import RecipeError
from moetune.core.ui import plural
from moetune.models.load import load_tokenizer
from moetune.recipe import ModelConfig

Triple = tuple[int, int, int]   # (a, lo, hi): sees trunk tokens [0, a) and flat tokens [lo, hi)


def common_prefix(x: list[int], p: list[int]) -> int:
    """Length of the longest common prefix of two id lists (bisection over C-speed slice comparisons)."""
    n = min(len(x), len(p))
    if x[:n] == p[:n]:
        return n
    lo, hi = 0, n                                                      # x[:lo] == p[:lo], x[:hi] != p[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if x[:mid] == p[:mid] else (lo, mid)
    return lo


@dataclass
class Layout:
    """One row's m_A input: the trunk X, then the distinct tails, and what every token and query sees."""

    ids: list[int] = field(default_factory=list)       # (S,) trunk X, then the tails
    pos: list[int] = field(default_factory=list)       # (S,) position of each id in its own sequence P_t
    ctx: list[Triple] = field(default_factory=list)    # (S,) what each m_A token attends to
    query: list[Triple] = field(default_factory=list)  # (n,) what each anchor query attends to (all of P_t)


def build_layout(prefixes: list[list[int]]) -> Layout:
    """The tree of m_A sequences P_0..P_{n-1} over the trunk X = P_{n-1} (the text of the last anchor position).

    Trunk token i sees X[:i+1]: (i+1, 0, 0). A tail P_t[L_t:] is stored once (at flat index s),
    its j-th token sees X[:L_t] and the tail up to itself: (L_t, s, s+j+1), position L_t+j. Query t
    sees P_t whole: (L_t, s, s+len(tail)), or (len(P_t), 0, 0) when P_t is a prefix of X."""
    x = list(prefixes[-1]) if prefixes else []
    out = Layout(ids=list(x), pos=list(range(len(x))), ctx=[(i + 1, 0, 0) for i in range(len(x))])
    seen: dict[tuple[int, ...], Triple] = {}
    for p in prefixes:
        key = tuple(p)
        if key not in seen:
            n = common_prefix(x, p)
            tail, s = p[n:], len(out.ids)
            for j, tok in enumerate(tail):
                out.ids.append(tok)
                out.pos.append(n + j)
                out.ctx.append((n, s, s + j + 1))
            seen[key] = (n, s, s + len(tail)) if tail else (n, 0, 0)
        out.query.append(seen[key])
    return out


def visible(triples: torch.Tensor, size: int) -> torch.Tensor:
    """(..., 3) long (a, lo, hi) -> (..., size) bool: key k is visible iff k < a or lo <= k < hi."""
    k = torch.arange(size, device=triples.device)                      # (size,)
    a, lo, hi = triples.unbind(-1)                                     # (...,) each
    return (k < a[..., None]) | ((k >= lo[..., None]) & (k < hi[..., None]))


def prefix_texts(tok, ids: list[int], ends: list[int]) -> list[str]:
    """text_t for t in ends: decode(ids[:t+1]) without special tokens or space clean-up, trailing U+FFFD dropped."""
    texts = tok.batch_decode([ids[:t + 1] for t in ends], skip_special_tokens=True,
                             clean_up_tokenization_spaces=False)
    return [s.rstrip("\ufffd") for s in texts]


def load_aligner(anchor_path: str, augmenting_path: str, aug_vocab_rows: int) -> "TextAligner":
    """Both tokenizers, checked: fast (Rust) tokenizers, and m_A's ids fit its embedding table."""
    tok_b = load_tokenizer(ModelConfig(path=anchor_path))
    tok_a = load_tokenizer(ModelConfig(path=augmenting_path))
    for key, path, tok in (("model.path", anchor_path, tok_b), ("expert.augmenting_model", augmenting_path, tok_a)):
        if not getattr(tok, "is_fast", False):
            raise RecipeError(f"Recipe key '{key}' is {path!r}, whose tokenizer ({type(tok).__name__}) is a slow "
                              "Python tokenizer; expert.tokenizer_check=align decodes and re-tokenizes the text of "
                              "every anchor position, which needs a fast (Rust, `tokenizers`) tokenizer. Allowed: a "
                              "model directory with a tokenizer.json, or a shared tokenizer (tokenizer_check=strict).")
    if len(tok_a) > aug_vocab_rows:
        raise RecipeError(f"Recipe key 'expert.augmenting_model' is {augmenting_path!r}, whose embedding table has "
                          f"{plural(aug_vocab_rows, 'row')}, fewer than its tokenizer's {plural(len(tok_a), 'token')}.")
    return TextAligner(tok_b, tok_a)


class TextAligner:
    """Turns the anchor's ids into m_A's inputs (tree layout, see the module docstring), batched over rows."""

    def __init__(self, tok_b, tok_a) -> None:
        self.tok_b, self.tok_a = tok_b, tok_a
        self.pad_id = tok_a.pad_token_id if tok_a.pad_token_id is not None else 0

    def prefixes(self, ids: list[int], ends: list[int]) -> list[list[int]]:
        """[P_t for t in ends]: m_A's ids of the text of ids[:t+1] (each distinct text tokenized once)."""
        texts = prefix_texts(self.tok_b, ids, ends)
        uniq = list(dict.fromkeys(texts))
        enc = dict(zip(uniq, self.tok_a(uniq, add_special_tokens=True)["input_ids"]))
        return [list(enc[s]) for s in texts]

    def inputs(self, ids: torch.Tensor, real: torch.Tensor, T: int):
        """m_A's batch for the last T anchor positions.

        ids, real: (b, S_B) every anchor id so far and its padding mask (True: real). Returns
        aug_ids, pos: (b, S) long; see: (b, S, S) bool, m_A's attention mask (query, key);
        allowed: (b, T, S) bool, what each of the T anchor queries may attend to (all False for padding)."""
        b, s_b = ids.shape
        rows = []
        for r in range(b):
            cols = real[r].nonzero().flatten().tolist()                 # real columns, in order
            toks = ids[r, cols].tolist()
            new = [(j, c - (s_b - T)) for j, c in enumerate(cols) if c >= s_b - T]   # (index among real, query)
            layout = build_layout(self.prefixes(toks, [j for j, _ in new]) if new else [])
            rows.append((layout, [q for _, q in new]))
        S = max(1, max(len(lay.ids) for lay, _ in rows))
        aug_ids = torch.full((b, S), self.pad_id, dtype=torch.long)
        pos = torch.zeros(b, S, dtype=torch.long)
        k = torch.arange(S)
        ctx = torch.stack([torch.zeros_like(k), k, k + 1], -1).repeat(b, 1, 1)   # (b, S, 3): padding sees itself
        query = torch.zeros(b, T, 3, dtype=torch.long)                  # padding queries: (0, 0, 0), nothing
        for r, (lay, qs) in enumerate(rows):
            n = len(lay.ids)
            if n:
                aug_ids[r, :n] = torch.tensor(lay.ids)
                pos[r, :n] = torch.tensor(lay.pos)
                ctx[r, :n] = torch.tensor(lay.ctx)
            if qs:
                query[r, qs] = torch.tensor(lay.query)
        dev = ids.device
        return (aug_ids.to(dev), pos.to(dev), visible(ctx.to(dev), S),     # (b, S), (b, S), (b, S, S)
                visible(query.to(dev), S))                              # (b, T, S)
