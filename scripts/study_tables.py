#!/usr/bin/env python
"""Put the committed studies' tables into README.md and benchmarks/RESULTS.md (`make study-tables`).

For each study NAME with benchmarks/results/studies/NAME/comparison.md (written by `moetune compare`, copied
there by `make study-NAME`), the text between the markers

    <!-- study:NAME -->          ...  <!-- /study:NAME -->           the whole comparison.md, title dropped
    <!-- study:NAME:results -->  ...  <!-- /study:NAME:results -->   its protocol line, results table and conclusions

is replaced, in every file that has them, its '## ' headings demoted to '#### ' (they sit inside a section).
The tables are the command's output, never edited by hand.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
STUDIES = ROOT / "benchmarks" / "results" / "studies"


def sections(md: str) -> dict[str, str]:
    """'' (before the first '## '), and each '## Title' -> its text, of a comparison.md."""
    out, key = {"": []}, ""
    for line in md.splitlines()[1:]:  # the '# Comparison ...' title dropped
        if line.startswith("## "):
            key = line[3:].strip()
            out[key] = []
        out[key].append(line)
    return {k: "\n".join(v).strip() for k, v in out.items()}


def demote(text: str) -> str:
    """comparison.md's '## ' headings as '#### ': inside README's and RESULTS.md's own sections they are
    sub-sub-headings, never new top-level sections of those documents."""
    return re.sub(r"^## ", "#### ", text, flags=re.M)


def blocks(md: str) -> dict[str, str]:
    s = sections(md)
    return {"": demote("\n".join(md.splitlines()[1:]).strip()),
            ":results": demote("\n\n".join(x for x in (s[""], s.get("Results", ""), s.get("Conclusions", "")) if x))}


def fill(text: str, name: str, kind: str, body: str) -> tuple[str, int]:
    tag = f"study:{name}{kind}"
    pattern = re.compile(rf"(<!-- {re.escape(tag)} -->\n).*?(\n<!-- /{re.escape(tag)} -->)", re.S)
    return pattern.subn(lambda m: m.group(1) + body + m.group(2), text)


def main() -> int:
    done = []
    for md in sorted(STUDIES.glob("*/comparison.md")):
        name = md.parent.name
        for kind, body in blocks(md.read_text()).items():
            for f in FILES:
                text, n = fill(f.read_text(), name, kind, body)
                if n:
                    f.write_text(text)
                    done.append(f"{f.relative_to(ROOT)}: study:{name}{kind}")
    print("\n".join(done) or f"no study results under {STUDIES.relative_to(ROOT)} (run `make studies` first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
