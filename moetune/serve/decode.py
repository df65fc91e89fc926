"""Choosing each row's next token, and turning a row's tokens into text with OpenAI's stop sequences.

Sampling follows the OpenAI API's documented options: `temperature` 0 is greedy (argmax, the
evaluation's and `moetune generate`'s decoding); otherwise the logits are divided by the temperature,
`top_p` keeps the smallest set of most likely tokens whose probability reaches top_p (nucleus
sampling, Holtzman et al., 2020), and the token is drawn from the renormalised softmax. Each request
draws from its own generator, seeded by `seed` when given, so a seeded request gives the same tokens
whatever batch it shares.
"""
from __future__ import annotations

import os

import torch


def new_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (V,) with every token outside the top_p nucleus set to 0 (the most likely token always kept)."""
    if top_p >= 1.0:
        return probs
    p, idx = probs.sort(descending=True)                              # (V,), (V,)
    before = p.cumsum(0) - p                                          # mass of the tokens ranked above
    p = p.masked_fill(before >= top_p, 0.0)
    p[0] = p[0].clamp_min(torch.finfo(p.dtype).tiny)
    return torch.zeros_like(probs).scatter(0, idx, p)


def choose(logits: torch.Tensor, rows: list) -> list[int]:
    """Next token per row (a serve Job) from logits (B, V): argmax for temperature 0, else a draw from the row's
    generator."""
    greedy = logits.argmax(-1).tolist()                               # (B,)
    out = []
    for i, r in enumerate(rows):
        if r.req.temperature <= 0:
            out.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float() / r.req.temperature, -1)   # (V,)
        probs = nucleus(probs, r.req.top_p)
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=r.generator)))
    return out


class TextStream:
    """Incremental detokenisation of one row with stop sequences.

    `push(token)` returns (text that may be sent now, stopped). Text is held back while it ends in an
    incomplete UTF-8 sequence, or in a proper prefix of a stop sequence (it may still become one). When
    a stop sequence appears the text ends before it, as the OpenAI API documents ("the returned text will
    not contain the stop sequence")."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0                                                 # characters handed out
        self.stopped = False

    def _hold(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        cut = min((j for j in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if j >= 0),
                  default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            out = text[self.sent:cut]
            self.sent = cut
            return out, True
        self.text = text
        safe = len(text) - self._hold(text)
        out = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def rest(self) -> str:
        """Text not yet handed out, at the end of generation (held-back characters included)."""
        if not self.stopped:
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
