"""Paired differences between two methods' held-out results, with bootstrap intervals, and their wording.

`moetune compare` trains every method at the same seeds and scores each run on the same held-out
examples (eval.json's `per_example`), so results pair up by (seed, example). For a method m against the
reference r, with X[s, i] the per-example result of the run at seed s on example i:

    difference of exact match   d = mean_{s,i} (X_m[s,i] - X_r[s,i])          X: 1 correct, 0 not
    difference of loss          d = sum L_m / sum T_m - sum L_r / sum T_r     L: loss summed over an example's
                                                                              target tokens, T: their number

The 95% interval is a two-level (seeds, then examples) paired percentile bootstrap (Efron & Tibshirani
1993, ch. 13; resampling both levels as for hierarchical data, Davison & Hinkley 1997, sec. 3.8): each of
B resamples draws S seeds with replacement and, independently, n examples with replacement,

    seeds    = rng.integers(0, S, size=(B, S))
    examples = rng.integers(0, n, size=(B, n))          rng = numpy.random.default_rng(seed)
    d_b      = the statistic on the rows seeds[b] x the columns examples[b] (sums weighted by the counts)

and the interval is numpy.percentile(d_b, [2.5, 97.5]). Every method is resampled with the same draws, so
its differences are paired by seed and example. A per-domain difference resamples that domain's examples
(`rng` seeded with [seed, 1 + domain index]). With one seed the interval covers the test examples only, not
the seed-to-seed variation; the wording says so.

`conclusion` words a difference so that it never claims more than its interval: a winner only when the
whole interval is on one side of 0, else "no difference detectable at this budget".
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
CHUNK = 500  # resamples per block: (CHUNK, n) weights at a time


def draws(n_seeds: int, n_examples: int, resamples: int = RESAMPLES, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    """(seeds (B, S), examples (B, n)) resampling indices, drawn in that order (the module docstring)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_seeds, size=(resamples, n_seeds)), rng.integers(0, n_examples, size=(resamples, n_examples))


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    """How often each of `size` indices occurs in each row of idx (B, k) -> (B, size)."""
    out = np.zeros((idx.shape[0], size))
    np.add.at(out, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), idx.ravel()), 1.0)
    return out


def resampled_sums(x: np.ndarray, seeds: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """sum over the resampled rows and columns of x (S, n), for every resample: (B,)."""
    out = np.empty(seeds.shape[0])
    for a in range(0, seeds.shape[0], CHUNK):
        ws = _counts(seeds[a:a + CHUNK], x.shape[0])            # (b, S)
        we = _counts(examples[a:a + CHUNK], x.shape[1])         # (b, n)
        out[a:a + CHUNK] = ((ws @ x) * we).sum(1)               # (b,)
    return out


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap values."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def mean_difference(x: np.ndarray, ref: np.ndarray, seeds: np.ndarray, examples: np.ndarray) -> dict:
    """Paired difference of means (exact match): x, ref (S, n) per seed and example."""
    d = np.asarray(x, float) - np.asarray(ref, float)
    lo, hi = interval(resampled_sums(d, seeds, examples) / d.size)
    return {"difference": float(d.mean()), "low": lo, "high": hi, "seeds": d.shape[0], "examples": d.shape[1]}


def ratio_difference(num: np.ndarray, den: np.ndarray, ref_num: np.ndarray, ref_den: np.ndarray,
                     seeds: np.ndarray, examples: np.ndarray) -> dict:
    """Paired difference of ratios of sums (token-weighted loss): sum num / sum den - the same of ref."""
    def ratio(a, b):
        return resampled_sums(np.asarray(a, float), seeds, examples) / np.maximum(
            resampled_sums(np.asarray(b, float), seeds, examples), 1e-12)
    lo, hi = interval(ratio(num, den) - ratio(ref_num, ref_den))
    point = float(np.sum(num) / max(np.sum(den), 1e-12) - np.sum(ref_num) / max(np.sum(ref_den), 1e-12))
    return {"difference": point, "low": lo, "high": hi, "seeds": np.shape(num)[0], "examples": np.shape(num)[1]}


def mean_interval(x: np.ndarray, seeds: np.ndarray, examples: np.ndarray) -> tuple[float, float]:
    """The bootstrap interval of one method's own mean (its exact match, for the plot)."""
    x = np.asarray(x, float)
    return interval(resampled_sums(x, seeds, examples) / x.size)


def _num(v: float, signed: bool) -> str:
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def conclusion(name: str, ref: str, diff: dict, metric: str = "EM", higher_is_better: bool = True,
               note: str = "") -> str:
    """One plain sentence on `name` (`note` appended to it) against `ref` that claims no more than the
    interval: '<A> beats <B> by d EM [lo, hi]' (for a lower-is-better metric: '<A> has a lower <metric> than
    <B> by d [lo, hi]') when the whole interval favours A, else 'no difference detectable at this budget'."""
    d, lo, hi = diff["difference"], diff["low"], diff["high"]
    caveat = (" (1 seed: the interval covers the test examples, not the variation between seeds)"
              if diff.get("seeds", 2) < 2 else "")
    favours_name = lo > 0 if higher_is_better else hi < 0
    favours_ref = hi < 0 if higher_is_better else lo > 0
    if not (favours_name or favours_ref):
        return (f"no difference detectable at this budget between {name}{note} and {ref}: {_num(d, True)} "
                f"{metric} [{_num(lo, True)}, {_num(hi, True)}]{caveat}")
    winner, loser = (f"{name}{note}", ref) if favours_name else (ref, f"{name}{note}")
    a, b = sorted((abs(lo), abs(hi)))
    if higher_is_better:
        return f"{winner} beats {loser} by {abs(d):.3f} {metric} [{a:.3f}, {b:.3f}]{caveat}"
    return f"{winner} has a lower {metric} than {loser} by {abs(d):.3f} [{a:.3f}, {b:.3f}]{caveat}"
