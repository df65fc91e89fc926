"""4-bit bases (QLoRA) through bitsandbytes, on CPU and CUDA (`model.quantization: nf4 | fp4`).

Dettmers et al. (2023), "QLoRA: Efficient Finetuning of Quantized LLMs". Every linear layer of the
frozen base but the output head becomes a bitsandbytes `Linear4bit`: its weight W (d_out, d_in) is
stored as 4-bit codes q, two per byte, in blocks of 64 weights that share one absmax scale c_b,

    W_i ~ c_b * code[q_i],       b = the block of i,  code = the 16 NF4 (or FP4) values in [-1, 1],

and is dequantised to the compute dtype (`model.dtype`, see `models.base_dtype`) in every forward:
y = x dequant(W)^T + b. The adapters add their float32 delta on top and are the only trainable
tensors. Double quantisation (`model.double_quantization`) stores the scales c_b in 8 bit as well
(blocks of 256 with one float32 scale each): 4 + 8/64 + 32/(64*256) = 4.127 bits per weight
instead of 4 + 32/64 = 4.5.

On CPU, bitsandbytes' CPU backend dequantises with its C kernels and multiplies with torch. On a
CPU with AVX512-BF16 a Linear4bit in eval mode would, at its first call without gradients, repack
its weight in place for a fused bfloat16 kernel that ignores the compute dtype and has no autograd
formula, so a later training forward through that layer would get no gradient into its input;
`prepare_4bit` turns that path off (tests/test_qlora.py checks the gradients). bitsandbytes 0.50's
CPU dequantisation kernel is also wrong for weights whose rows are not whole blocks of 64
(in_features % 64 != 0, e.g. 32 or 96): those layers dequantise in torch ops here (`dequantize`).
Real models' widths are multiples of 64 (SmolLM2: 576 and 1536) and take bitsandbytes' kernel.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from moetune.core.errors import RecipeError
from moetune.core.ui import quiet_library_notices
from moetune.recipe import ModelConfig

# bitsandbytes and transformers (heavy imports) are imported inside the functions that use them.

BLOCK, BLOCK2 = 64, 256   # weights per absmax scale; scales per second-level scale (double quantisation)
_BACKEND_OK: set[tuple[str, str]] = set()


def import_bnb():
    """The bitsandbytes module, or a RecipeError saying how to install it."""
    quiet_library_notices()
    try:
        import bitsandbytes
    except ImportError as e:
        raise RecipeError(f"Recipe key 'model.quantization' needs bitsandbytes, which does not import here ({e}). "
                          "It is one of moetune's dependencies: run `make setup` (or `pip install "
                          "'bitsandbytes>=0.50,<1'`). Allowed without it: model.quantization=none.") from None
    return bitsandbytes


def check_backend(quant: str, device: torch.device) -> None:
    """RecipeError unless bitsandbytes quantises and dequantises `quant` ('nf4'/'fp4') on `device`:
    a round trip of 128 values in [-1, 1] must come back within one 4-bit step."""
    key = (quant, str(device))
    if key in _BACKEND_OK:
        return
    bnb = import_bnb()
    import bitsandbytes.functional as bnbf
    x = torch.linspace(-1, 1, 2 * BLOCK)
    try:
        packed, state = bnbf.quantize_4bit(x.to(device), blocksize=BLOCK, quant_type=quant)
        err = float((bnbf.dequantize_4bit(packed, state).float().cpu() - x).abs().max())
        problem = None if err < 0.35 else f"a round trip of values in [-1, 1] comes back off by {err:.2f}"
    except Exception as e:  # bitsandbytes raises NotImplementedError, RuntimeError, ... for a missing kernel
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no kernel'}"
    if problem:
        raise RecipeError(f"Recipe key 'model.quantization' is {quant!r}, which bitsandbytes "
                          f"{getattr(bnb, '__version__', '?')} cannot run on {device} here ({problem}). Its 4-bit "
                          "kernels run on CPU and CUDA (`python -m bitsandbytes` shows what this install supports). "
                          "Allowed: model.quantization=none (a float base), or the other 4-bit type (nf4 or fp4) if "
                          "this backend has it" + (", or model.device=cpu." if device.type != "cpu" else "."))
    _BACKEND_OK.add(key)


def bnb_config(cfg: ModelConfig, device: torch.device, compute_dtype: torch.dtype, for_fsdp: bool = False):
    """transformers' BitsAndBytesConfig for `cfg` on `device` (after `check_backend`). for_fsdp: the packed
    codes are stored as bfloat16 (`bnb_4bit_quant_storage`) so FSDP can shard them like float weights."""
    from transformers import BitsAndBytesConfig
    check_backend(cfg.quantization, device)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization, bnb_4bit_use_double_quant=cfg.double_quantization,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.bfloat16 if for_fsdp else torch.uint8)


def check_quantizable(cfg: ModelConfig, path: str, config=None) -> None:
    """RecipeError for a checkpoint whose linear layers bitsandbytes cannot quantise: one already quantised
    by another method (FP8, GPTQ, AWQ, ...: its weights are not floats), or by bitsandbytes differently.
    config: the model's transformers config when the caller has it (else read from `path`)."""
    if config is None:
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        except (OSError, ValueError):
            return  # from_pretrained reports a missing or unreadable model itself
    q = getattr(config, "quantization_config", None)
    if q is None:
        return
    q = q if isinstance(q, dict) else q.to_dict()
    method = str(q.get("quant_method", "unknown")).lower()
    stored = str(q.get("bnb_4bit_quant_type", "fp4")) if q.get("load_in_4bit") else None
    if method in ("bitsandbytes", "bitsandbytes_4bit") and stored == cfg.quantization:
        return  # a checkpoint saved in 4 bit by bitsandbytes with this type: it loads as is
    what = (f"already quantised with bitsandbytes ({'4-bit ' + stored if stored else '8-bit'})"
            if method.startswith("bitsandbytes") else f"already quantised ({method}): its linear weights are not floats")
    raise RecipeError(f"Recipe key 'model.quantization' is {cfg.quantization!r}, but the model at {path} is {what}, "
                      "so bitsandbytes cannot quantise its linear layers to 4 bit. Allowed: the float (unquantised) "
                      "checkpoint of this model with model.quantization nf4 or fp4"
                      + (f"; or model.quantization={stored} for this one" if stored else "") + ".")


def quantization_of(model: nn.Module) -> tuple[str, bool]:
    """('none' | 'nf4' | 'fp4', double quantisation): how `models.load_model` loaded this model."""
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return "none", True
    q = q if isinstance(q, dict) else q.to_dict()
    if not q.get("load_in_4bit"):
        return "none", True
    return str(q.get("bnb_4bit_quant_type", "nf4")), bool(q.get("bnb_4bit_use_double_quant", False))


def describe(model: nn.Module) -> dict | None:
    """How a 4-bit base was loaded, for adapters' moetune.json (`base_quantization`); None for a float base."""
    quant, double = quantization_of(model)
    if quant == "none":
        return None
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return {"quantization": quant, "double_quantization": double, "compute_dtype": dtype}


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def prepare_4bit(model: nn.Module, cfg: ModelConfig, path: str) -> None:
    """After a 4-bit load: RecipeError if bitsandbytes quantised no linear layer (e.g. a remote-code model
    whose projections are its own module classes, not nn.Linear); else turn off the CPU repacking path
    (module docstring) on every Linear4bit, so every forward dequantises to the compute dtype with autograd."""
    layers = [m for m in model.modules() if is_4bit(m)]
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if getattr(getattr(m, "weight", None), "ndim", 0) == 2
                        and m is not model.get_output_embeddings() and m is not model.get_input_embeddings()})
        raise RecipeError(f"Recipe key 'model.quantization' is {cfg.quantization!r}, but bitsandbytes quantised none "
                          f"of the layers of {path}: it replaces torch nn.Linear (and GPT-2 Conv1D) layers only, and "
                          f"this model computes with {', '.join(kinds) or 'no 2-d weight'}. Allowed: "
                          "model.quantization=none (a float base).")
    for m in layers:
        m.support_avx512bf16_for_cpu = False
        if m.weight.device.type == "cpu" and m.in_features % m.weight.quant_state.blocksize:
            m.forward = types.MethodType(_forward_dequantized, m)


def _dequantize_reference(packed: torch.Tensor, state) -> torch.Tensor:
    """dequant(W) in plain torch ops: W_i = c_b code[q_i], (d_out, d_in) float32. packed: the codes, two per
    byte, high nibble first (any storage dtype); state: bitsandbytes' QuantState (absmax c_b per block of
    `blocksize` weights of the flattened W, 8-bit with a second-level scale when nested)."""
    import bitsandbytes.functional as bnbf
    codes = packed.reshape(-1).view(torch.uint8)                          # (ceil(n/2),)
    n = state.shape[0] * state.shape[1]
    q = torch.stack((codes >> 4, codes & 0xF), -1).reshape(-1)[:n].long()  # (n,) 4-bit indices
    absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested
              else state.absmax).float()                                  # (blocks,)
    blocks = absmax.numel()
    w = nn.functional.pad(state.code.float()[q], (0, blocks * state.blocksize - n))  # (blocks * blocksize,)
    return (w.view(blocks, state.blocksize) * absmax[:, None]).reshape(-1)[:n].view(*state.shape)


def dequantize(module: nn.Module) -> torch.Tensor:
    """dequant(W) of a Linear4bit, (d_out, d_in) float32. On CPU a weight whose rows are not whole blocks
    (in_features % 64 != 0) is dequantised in torch ops: bitsandbytes 0.50's CPU kernel misplaces the scales
    of blocks that straddle rows (its pure-torch fallback is right, and so is CUDA)."""
    return _dequantize(module.weight.data, module.weight.quant_state)


def _dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    if packed.device.type == "cpu" and state.shape[-1] % state.blocksize:
        return _dequantize_reference(packed, state)
    return bnbf.dequantize_4bit(packed, state).float()


class _DequantizedLinear(torch.autograd.Function):
    """y = x dequant(W)^T for a frozen 4-bit W: the backward dequantises the packed codes again (dL/dx =
    g dequant(W)) instead of keeping every layer's dense weight alive until the backward (as bitsandbytes'
    own MatMul4Bit does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        ctx.save_for_backward(packed)
        ctx.state = state
        return x @ _dequantize(packed, state).to(x.dtype).t()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # (..., d_out) -> (..., d_in)
        (packed,) = ctx.saved_tensors
        return g @ _dequantize(packed, ctx.state).to(g.dtype), None, None


def _forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
    """Linear4bit.forward for the CPU layers `dequantize` handles itself: y = x dequant(W)^T + b in the
    compute dtype, differentiable in x (what bitsandbytes' CPU path computes, with the right scales)."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    fix_4bit_weight_quant_state_from_module(self)                          # FSDP may have swapped the parameter
    dtype = self.compute_dtype or x.dtype
    y = _DequantizedLinear.apply(x.to(dtype), self.weight.data, self.weight.quant_state)
    if self.bias is not None:
        y = y + self.bias.to(dtype)
    return y.to(x.dtype)


# ------------------------------------------------------------------ bytes (validate, benchmarks, tests)

def bits_per_weight(double_quant: bool) -> float:
    """Storage of one 4-bit weight with its share of the scales: 4.127 bits (double quantisation) or 4.5."""
    return 4 + (8 / BLOCK + 32 / (BLOCK * BLOCK2) if double_quant else 32 / BLOCK)


def layer_bytes(n: int, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one 4-bit weight of n entries: packed codes ceil(n/2), one absmax per
    block of 64 (uint8 with double quantisation, plus one float32 per 256 blocks and the 256-entry
    float32 code book of the 8-bit scales; else float32) and the 16-entry float32 4-bit code book."""
    blocks = -(-n // BLOCK)
    scales = blocks + 4 * -(-blocks // BLOCK2) + 4 * 256 if double_quant else 4 * blocks
    return -(-n // 2) + scales + 4 * 16


def quantizable(model: nn.Module) -> list[nn.Module]:
    """The modules transformers' bitsandbytes integration turns into Linear4bit: nn.Linear and Conv1D layers
    of the base, except the output head (kept in the compute dtype)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if m is not head and (type(m) is nn.Linear or type(m).__name__ == "Conv1D")]


def frozen_bytes(model: nn.Module, cfg: ModelConfig, dtype_bytes: int) -> dict[str, float]:
    """Bytes of `model`'s frozen parameters (a float model, e.g. on the meta device, before or after
    injection) once loaded with `cfg`: {'quantized': the 4-bit linears, 'float': everything else}."""
    if cfg.quantization == "none":
        return {"quantized": 0.0, "float": float(sum(p.numel() for p in model.parameters()
                                                     if not p.requires_grad) * dtype_bytes)}
    weights = {id(m.weight) for m in quantizable(model) if not m.weight.requires_grad}
    seen, quantized, other = set(), 0.0, 0.0
    for p in model.parameters():
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in weights:
            quantized += layer_bytes(p.numel(), cfg.double_quantization)
        else:
            other += p.numel() * dtype_bytes
    return {"quantized": quantized, "float": other}


def loaded_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a loaded model holds in its parameters and buffers, 4-bit quantisation state included
    (packed codes, absmax scales, second-level scales and code books): {'quantized': the Linear4bit
    layers' weights, 'float': everything else}."""
    quantized, seen = 0, set()
    for m in model.modules():
        if is_4bit(m):
            w = m.weight
            seen.add(id(w))
            quantized += w.numel() * w.element_size()
            qs = w.quant_state
            for t in (qs.absmax, qs.code, *((qs.state2.absmax, qs.state2.code) if qs.nested else ())):
                quantized += t.numel() * t.element_size()
    other = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            other += t.numel() * t.element_size()
    return {"quantized": quantized, "float": other}
