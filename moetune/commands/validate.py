"""`moetune validate`: check a recipe and its data without loading weights.

The model is built on PyTorch's meta device from its config alone, the experts are
injected there, and parameters are counted exactly. The memory estimate is rough:
frozen weights (a 4-bit base's linears as bitsandbytes stores them: `quant.layer_bytes`, about
4.13 bits per weight with double quantisation; the rest in model.dtype) + adapter weights,
gradients and AdamW moments + activations
(about 34 bytes x tokens x hidden size per layer in 16 bit, after Korthikanti et al.
2022, doubled for float32; with train.gradient_checkpointing, 2 bytes per block input plus one
block's 34).
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from moetune.adapters.inject import count_parameters, inject
from moetune.core.ui import console, plural, table
from moetune.data.sources import check_rows, iter_sources
from moetune.experts import REGISTRY
from moetune.models.load import attn_implementation, base_dtype, load_config, pick_device
from moetune.models.quant import check_backend, check_quantizable, frozen_bytes
from moetune.recipe import Recipe
from moetune.train.precision import compute_precision


def estimate(recipe: Recipe) -> dict:
    config = load_config(recipe.model, log=console.print)
    attn_implementation(recipe.model, pick_device(recipe.model))  # an attention kernel that cannot run: RecipeError
    if recipe.model.quantization != "none":  # bitsandbytes missing, no kernel here, an already quantised model
        check_backend(recipe.model.quantization, pick_device(recipe.model))
        check_quantizable(recipe.model, recipe.model.path, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        expert = recipe.expert
        first = expert.per_domain_expert()   # MoLE's per_domain experts are not trained yet:
        if first is not None:                # count one domain LoRA instead
            expert = first[0]
        inject(model, expert, recipe.router, seed=recipe.train.seed)
    trainable, total = count_parameters(model)
    dtype_bytes = torch.empty((), dtype=base_dtype(recipe.model, pick_device(recipe.model))).element_size()
    frozen = frozen_bytes(model, recipe.model, dtype_bytes)          # 4-bit linears exactly as bitsandbytes stores them
    extra = REGISTRY[expert.type].extra_frozen_bytes(model, expert, recipe.model, dtype_bytes)
    if extra:                                                        # CALM: the augmenting model is frozen weights too
        frozen = {k: frozen[k] + extra[k] for k in frozen}
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    rows = recipe.train.batch_size * (1 if recipe.train.objective == "sft" else 2)  # dpo/orpo: chosen + rejected rows
    tokens = rows * recipe.data.max_length
    act_bytes = 34 * tokens * hidden * layers * (2 if compute_precision(recipe) == "fp32" else 1)
    if getattr(recipe.train, "gradient_checkpointing", False):  # each block keeps its input; one block's full set
        act_bytes = act_bytes // 34 * 2 // max(layers, 1) * layers + act_bytes // max(layers, 1)
    mem = {"frozen_weights": frozen["quantized"] + frozen["float"], "adapter_train_state": trainable * 16,
           "activations": act_bytes}
    return {"trainable": trainable, "total": total, "memory": mem, "model_type": config.model_type,
            "layers": layers, "hidden": hidden, "frozen_4bit_bytes": frozen["quantized"]}


def check_data(recipe: Recipe) -> dict[str, int]:
    """Read every data source named by the recipe and check each row's shape (no tokenizer): rows per
    recipe key ('train', 'mix[i]', 'validation', 'test'), bad rows skipped (data.skip_bad_rows) not counted."""
    counts = {}
    for part in iter_sources(recipe.data, ("train", "validation", "test")):
        rows, bad = check_rows(part)
        counts[part.key] = rows - bad
    return counts


def report(recipe: Recipe) -> dict:
    counts = check_data(recipe)
    est = estimate(recipe)
    gib = 1024 ** 3
    rows = [["model", f"{recipe.model.path} ({est['model_type']}, {plural(est['layers'], 'layer')}, hidden {est['hidden']})"],
            ["expert", recipe.expert.describe()],
            ["trainable parameters", f"{est['trainable']:,} ({100 * est['trainable'] / est['total']:.3f}% of {est['total']:,})"],
            *[[f"data.{k}", plural(n, "row")] for k, n in counts.items()],
            *[[f"memory: {k}", f"{v / gib:.2f} GiB"] for k, v in est["memory"].items()],
            ["memory: total (rough)", f"{sum(est['memory'].values()) / gib:.2f} GiB"],
            ["stages", ", ".join(recipe.stages)]]
    console.print(table("recipe OK", ["", "value"], rows))
    return {**est, "data": counts}
