"""Shared fixtures: tiny randomly initialised Llama / GPT-2 models with a tiny BPE tokenizer.

Everything is built in seconds, offline, in a temp dir; no test downloads anything.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
WORDS = "red green blue cat dog sun moon one two three four five six seven eight nine zero".split()


def make_rows(n: int, seed: int) -> list[dict]:
    """Two learnable toy domains: copy a word in capitals, and add two digits."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            w = rng.choice(WORDS)
            rows.append({"instruction": f"Shout {w}", "response": w.upper(), "domain": "shout"})
        else:
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            rows.append({"instruction": f"Add {a} and {b}", "response": str(a + b), "domain": "add"})
    return rows


def build_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    corpus = [f"{r['instruction']} {r['response']}" for r in make_rows(200, 0)]
    corpus += ["### Instruction:\n", "### Response:\n", "system user assistant\n", " ".join(WORDS).upper()]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHATML
    return fast


def build_model(arch: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0, bos_token_id=0, eos_token_id=2)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                         bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny(path: Path, arch: str) -> Path:
    tok = build_tokenizer(chat=(arch == "llama"))
    model = build_model(arch, len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenised datasets of the whole test session go to a temp dir, not ~/.cache/moetune."""
    import os
    path = tmp_path_factory.mktemp("data_cache")
    old = os.environ.get("MOETUNE_DATA_CACHE")
    os.environ["MOETUNE_DATA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MOETUNE_DATA_CACHE", None)
    else:
        os.environ["MOETUNE_DATA_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-data")
    return {"train": write_jsonl(d / "train.jsonl", make_rows(64, 1)),
            "validation": write_jsonl(d / "validation.jsonl", make_rows(16, 2)),
            "test": write_jsonl(d / "test.jsonl", make_rows(16, 3))}


def tiny_overrides(model_dir: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Overrides that turn the default recipe into a seconds-long run on a tiny model."""
    return [f"model.path={model_dir}", f"data.train={data['train']}", f"data.validation={data['validation']}",
            f"data.test={data['test']}", f"output_dir={out}", "model.device=cpu", "expert.rank=4",
            "train.batch_size=4", "train.max_steps=6", "train.lr=5e-3", "train.log_every=1",
            "eval.batch_size=8", "eval.max_new_tokens=4", *extra]


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH (and `extra` set), for a subprocess that
    runs `moetune` or a benchmark script from the working tree."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
            **extra}


def train_default(args: list[str], port: int | None = None) -> str:
    """`moetune train recipes/default.yaml ARGS`: on 2 CPU processes through torchrun (gloo) at master `port`,
    or with port None in this process on 1 thread, as each torchrun worker runs (OMP_NUM_THREADS=1), which
    spares the reference run of an equality test a Python start. Returns what the run printed, stdout and
    stderr together, either way."""
    if port is None:
        from moetune.commands.stages import run_recipe
        from moetune.recipe import load_recipe
        threads, printed = torch.get_num_threads(), io.StringIO()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                run_recipe(load_recipe(ROOT / "recipes" / "default.yaml", args))
        finally:
            torch.set_num_threads(threads)
        return printed.getvalue()
    proc = subprocess.run([*TORCHRUN, "--master_port", str(port), "-m", "moetune", "train", "recipes/default.yaml",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=repo_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def cli(monkeypatch, *args) -> int:
    """Run `moetune ARGS` in-process (argv patched); its exit code (0 or None: success)."""
    from moetune.cli import main
    monkeypatch.setattr(sys, "argv", ["moetune", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def randomise_routed(model) -> None:
    """Non-trivial experts and a decisive router in every routed layer, so mixing errors would show."""
    from moetune.adapters.inject import expert_layers
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in expert_layers(model).values():
            for name, p in layer.adapter_state().items():
                noise = torch.randn(p.shape, generator=g)
                p.copy_({"router.weight": noise, "ia3_l": 1 + 0.3 * noise}.get(name, 0.2 * noise))
