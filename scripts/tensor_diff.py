#!/usr/bin/env python
"""How far two safetensors files are apart, tensor by tensor: the numbers behind README's "equal to ... to
1.5e-8" claims (a run's router_init.safetensors against a cluster-heads file, an adapter against another).

    python scripts/tensor_diff.py A.safetensors B.safetensors [--json out.json]

Prints one line: how many tensors, the largest absolute difference over all of them and the tensor it is in,
and the largest relative one (max |a - b| / max |b| per tensor). Exits 1 when the files hold different names
or shapes (then no difference is defined), 0 otherwise: it reports, it does not judge.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """{'tensors', 'max_abs', 'max_abs_key', 'max_rel', 'max_rel_key', 'equal'} of two name -> tensor maps."""
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(f"the files hold different tensors ({len(only)} in only one, e.g. {only[0]})")
    out = {"tensors": len(a), "max_abs": 0.0, "max_abs_key": None, "max_rel": 0.0, "max_rel_key": None,
           "equal": 0}
    for k in sorted(a):
        x, y = a[k].double(), b[k].double()
        if x.shape != y.shape:
            raise ValueError(f"tensor {k}: shape {tuple(x.shape)} against {tuple(y.shape)}")
        d = float((x - y).abs().max()) if x.numel() else 0.0
        rel = d / max(float(y.abs().max()) if y.numel() else 0.0, 1e-30)
        out["equal"] += int(torch.equal(a[k], b[k]))
        if d > out["max_abs"] or out["max_abs_key"] is None:
            out["max_abs"], out["max_abs_key"] = d, k
        if rel > out["max_rel"] or out["max_rel_key"] is None:
            out["max_rel"], out["max_rel_key"] = rel, k
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    try:
        d = diff(load_file(str(args.a)), load_file(str(args.b)))
    except ValueError as e:
        print(f"{args.a} and {args.b} cannot be compared: {e}.", file=sys.stderr)
        return 1
    print(f"{d['tensors']} tensors, {d['equal']} bit for bit equal; max |a - b| {d['max_abs']:.3g} "
          f"({d['max_abs_key']}), max relative {d['max_rel']:.3g} ({d['max_rel_key']})")
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), **d}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
