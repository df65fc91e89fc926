"""Drive a CALM-composed model by hand with a KV cache: the prompt split into several prefill calls, then
one token per call, as any version of `generate` may feed it (shared by test_calm and test_calm_align)."""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache in the installed transformers ('cache', formerly 'past_key_values')."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cuts(prompt_len: int, parts: int, new: int) -> list[int]:
    """Call boundaries: the prompt in `parts` near-equal prefill chunks, then `new` single tokens."""
    prefill = [round(k * prompt_len / parts) for k in range(parts + 1)]
    return prefill + [prompt_len + j for j in range(1, new + 1)]


def cached_logits(model, ids: torch.Tensor, mask: torch.Tensor, bounds: list[int]):
    """(logits (b, L, V) of every call concatenated, the cache): one model call per [a, b) of `bounds`,
    each with the mask so far and the positions of its tokens, sharing one DynamicCache."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                           # (b, L) left padding respected
    cache = DynamicCache(config=model.config)
    key = cache_keyword(model)
    out = []
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            out.append(model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                             use_cache=True, **{key: cache}).logits)   # (b, b-a, V)
    return torch.cat(out, 1), cache


def reference_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """No-cache forward over the whole sequence: (b, L, V)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def check_prefill_splits(model, ids: torch.Tensor, mask: torch.Tensor, new: int = 3) -> None:
    """Prompt (b, P) in 1, 2 and 3 prefill calls, then `new` more tokens one by one: the logits at every real
    position equal the no-cache forward's (float64, up to rounding); a cache cropped back to the prompt and fed
    the new tokens in one call gives them again."""
    P = ids.shape[1]
    g = torch.Generator().manual_seed(7)
    extra = torch.randint(5, model.config.vocab_size, (ids.shape[0], new), generator=g)       # (b, new)
    full_ids, full_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
    ref = reference_logits(model, full_ids, full_mask)                 # (b, P+new, V)
    real = full_mask.bool()                                            # (b, P+new)
    for parts in (1, 2, 3):
        got, cache = cached_logits(model, full_ids, full_mask, cuts(P, parts, new))
        assert got.shape == ref.shape
        torch.testing.assert_close(got[real], ref[real], atol=1e-10, rtol=1e-10)
    cache.crop(-new)                                                   # back to the prompt, as assisted decoding does
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        again = model(input_ids=extra, attention_mask=full_mask, position_ids=pos[:, P:], use_cache=True,
                      **{cache_keyword(model): cache}).logits          # (b, new, V)
    torch.testing.assert_close(again, ref[:, P:], atol=1e-10, rtol=1e-10)
