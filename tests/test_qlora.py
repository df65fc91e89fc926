"""QLoRA: every expert type on a 4-bit (NF4/FP4) bitsandbytes base, on CPU through bitsandbytes' CPU
backend (and on CUDA where present): the 4-bit layers themselves, training, bit-identical --resume,
eval, export, merge with dequantisation, merge-lora into a 4-bit base, collapse, memory accounting
and the clear errors."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli, tiny_overrides
from moetune.core.errors import RecipeError
from moetune.models.load import load_model
from moetune.recipe import ModelConfig, load_recipe
from moetune.commands.stages import run_recipe

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _linears(model):
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit"]


def _ids(vocab: int):
    return torch.randint(5, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ the 4-bit base


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_base_on_cpu_computes_with_the_dequantised_weights(tiny_llama, quant):
    """Every projection but the head becomes a Linear4bit computing in float32 (model.dtype auto on CPU): its
    dequantised weight is near the original (blockwise absmax 4-bit error), and the 4-bit model's logits are
    the float model's with those dequantised weights put in. Double quantisation on by default, off on request."""
    from moetune.experts.base import dense_base_weight
    ref = load_model(ModelConfig(path=str(tiny_llama)), CPU)
    q = load_model(ModelConfig(path=str(tiny_llama), quantization=quant), CPU)
    layers = dict((n, m) for n, m in q.named_modules() if type(m).__name__ == "Linear4bit")
    assert len(layers) == 14 and all(m.compute_dtype == torch.float32 for m in layers.values())   # 2 blocks x 7
    assert all(m.weight.quant_state.quant_type == quant and m.weight.quant_state.nested for m in layers.values())
    assert type(q.lm_head).__name__ != "Linear4bit"
    ids = _ids(q.config.vocab_size)
    with torch.no_grad():
        for name, m in layers.items():
            w0, w = ref.get_submodule(name).weight, dense_base_weight(m)
            assert 0 < float((w - w0).norm() / w0.norm()) < 0.15, name
            ref.get_submodule(name).weight.copy_(w)
        torch.testing.assert_close(q(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    plain = load_model(ModelConfig(path=str(tiny_llama), quantization=quant, double_quantization=False), CPU)
    assert not any(m.weight.quant_state.nested for m in _linears(plain))


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
def test_dequantisation_matches_bitsandbytes_and_fixes_its_cpu_kernel(quant, double):
    """moetune's torch dequantisation equals bitsandbytes' CPU kernel where that kernel is right (rows of whole
    64-blocks) and is used where it is not (rows of 32 or 96: a straddling block's scale is misplaced there)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from moetune.models.quant import _dequantize_reference, dequantize
    g = torch.Generator().manual_seed(0)
    for rows, cols in ((7, 64), (33, 192), (3, 576), (64, 32), (7, 96)):
        x = torch.randn(rows, cols, generator=g)
        packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=quant, compress_statistics=double)
        ours = _dequantize_reference(packed, state)
        if cols % 64 == 0:
            torch.testing.assert_close(ours, bnbf.dequantize_4bit(packed, state), rtol=0, atol=1e-6)
        q = bnb.nn.Linear4bit(cols, rows, bias=False, quant_type=quant, compress_statistics=double)
        q.weight = bnb.nn.Params4bit(x.clone(), requires_grad=False, quant_type=quant, compress_statistics=double,
                                     module=q)
        q = q.to("cpu")                                                   # quantises
        assert q.weight.bnb_quantized
        for w in (ours, dequantize(q)):  # Gaussian weights: 4-bit absmax error ~0.09 (nf4), ~0.13 (fp4)
            assert float((w - x).norm() / x.norm()) < 0.15, (rows, cols)


def test_compute_dtype_follows_model_dtype(tiny_llama):
    q = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4", dtype="bfloat16"), CPU)
    assert all(m.compute_dtype == torch.bfloat16 for m in _linears(q))
    assert q.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert q(input_ids=_ids(q.config.vocab_size)).logits.dtype == torch.bfloat16


def test_base_passes_gradients_after_an_eval_forward(tiny_llama):
    """On AVX512-BF16 CPUs bitsandbytes would repack a Linear4bit in eval mode for a kernel without autograd;
    moetune turns that off, so after a no-grad forward (eval_before, generation) the base still passes
    gradients to its input: dL/dx = g dequant(W), the dense formula."""
    import bitsandbytes.functional as bnbf
    q = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4"), CPU)
    lin = q.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, lin.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = lin(x)
    x.requires_grad_(True)
    y = lin(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    w = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state)    # (d_out, d_in)
    torch.testing.assert_close(y.detach(), y0)
    torch.testing.assert_close(y.detach(), x.detach() @ w.t())
    torch.testing.assert_close(x.grad, g @ w)


def test_gpt2_conv1d_layers_quantise_too(tiny_gpt2):
    """GPT-2's Conv1D (weight stored (d_in, d_out)) becomes a Linear4bit of the transposed weight."""
    from moetune.experts.base import dense_base_weight
    q = load_model(ModelConfig(path=str(tiny_gpt2), quantization="nf4"), CPU)
    ref = load_model(ModelConfig(path=str(tiny_gpt2)), CPU)
    assert len(_linears(q)) == 8                                        # c_attn, c_proj, c_fc, mlp.c_proj x 2 blocks
    w0, w = dense_base_weight(ref.transformer.h[0].attn.c_attn), dense_base_weight(q.transformer.h[0].attn.c_attn)
    assert w.shape == w0.shape and float((w - w0).norm() / w0.norm()) < 0.15


# ------------------------------------------------------------------ every expert type: train, resume, eval, export

SHARED_TOKENIZER = ["expert.tokenizer_check=vocab"]  # tiny GPT-2 m_A: the same BPE vocabulary, another eos token
TYPES = {
    "lora": [],
    "hydralora": ["expert.type=hydralora", "expert.num_experts=3"],
    "molora-soft": ["expert.type=molora", "expert.num_experts=3"],
    "molora-top_k": ["expert.type=molora", "expert.num_experts=3", "router.type=top_k", "router.top_k=2"],
    "mov": ["expert.type=mov", "expert.num_experts=3", "train.lr=5e-2"],
    "mole": ["expert.type=mole", "expert.experts_from=per_domain", "expert.expert_max_steps=4",
             "expert.expert_lr=1e-2", "train.lr=5e-2"],
    "calm-both-4bit": ["expert.type=calm", "expert.num_compositions=2", *SHARED_TOKENIZER],
    "calm-4bit-anchor": ["expert.type=calm", "expert.num_compositions=2", "expert.augmenting_quantization=none",
                         *SHARED_TOKENIZER],
    "calm-4bit-augmenting": ["expert.type=calm", "expert.num_compositions=2", "expert.augmenting_quantization=nf4",
                             "model.quantization=none", *SHARED_TOKENIZER],
}


def _recipe(tiny_llama, tiny_gpt2, tiny_data, out, case, *extra):
    calm = [f"expert.augmenting_model={tiny_gpt2}"] if case.startswith("calm") else []
    return load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "model.quantization=nf4", *TYPES[case], *calm,
                                            "train.max_steps=6", "train.save_every=3", "stages=[train,eval,export]",
                                            *extra))


@pytest.mark.parametrize("case", list(TYPES))
def test_every_type_trains_resumes_evaluates_and_exports_on_a_4bit_base(case, tiny_llama, tiny_gpt2, tiny_data,
                                                                       tmp_path):
    """A 6-step run on the 4-bit base vs the same run stopped after 3 steps and resumed: bit-identical adapters;
    the held-out loss drops; eval scores the 4-bit adapter model; the export and its moetune.json say the
    base was 4-bit."""
    full = run_recipe(_recipe(tiny_llama, tiny_gpt2, tiny_data, tmp_path / "full", case))
    cut = run_recipe(_recipe(tiny_llama, tiny_gpt2, tiny_data, tmp_path / "cut", case, "train.stop_after=3"))
    assert cut["train"]["stopped"] and "after" not in cut
    resumed = run_recipe(_recipe(tiny_llama, tiny_gpt2, tiny_data, tmp_path / "cut", case), resume=True)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["after"]["loss"] == full["after"]["loss"]
    assert full["after"]["loss"] < full["before"]["loss"], (full["before"]["loss"], full["after"]["loss"])
    assert full["after"]["model"] == "adapter" and 0.0 <= full["after"]["exact_match"] <= 1.0
    meta = json.loads((tmp_path / "full" / "export" / "moetune.json").read_text())
    if case == "calm-4bit-augmenting":
        assert "base_quantization" not in meta and meta["expert"]["augmenting_quantization"] == "nf4"
    else:
        assert meta["base_quantization"] == {"quantization": "nf4", "double_quantization": True,
                                             "compute_dtype": "float32"}
    if case.startswith("calm"):
        from moetune.adapters.io import load_adapter
        model = load_model(ModelConfig(path=str(tiny_llama), quantization="none" if "augmenting" in case else "nf4"),
                           CPU)
        load_adapter(model, tmp_path / "full" / "export")
        assert (len(_linears(model.calm_runner.model)) > 0) == (case != "calm-4bit-anchor")


# ------------------------------------------------------------------ merge, merge-lora, collapse


def test_merge_dequantizes_and_reports_the_logit_difference(tiny_llama, tiny_data, tmp_path):
    """merge.dequantize: the merged model is a plain float checkpoint (no Linear4bit, no quantization_config,
    including projections the adapter does not touch) that reproduces the 4-bit adapter model: the reported
    max |logit diff| is small and matches a fresh measurement of the saved model."""
    from transformers import AutoModelForCausalLM

    from moetune.data.rows import collate
    from moetune.run.session import Run, model_with_adapter
    out = tmp_path / "run"
    r = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "model.quantization=fp4", "merge.dequantize=true",
                                         "expert.target_modules=[q_proj,v_proj]", "train.lr=1e-2",
                                         "stages=[train,merge,eval]"))
    s = run_recipe(r)
    assert s["merge"]["dequantized"] and 0 <= s["merge"]["max_logit_diff"] < 1e-3
    assert s["after"]["model"] == "merged"
    cfg = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not _linears(merged) and type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    run = Run(r)
    ref = model_with_adapter(run)
    b = collate(run.held_out()[:8], run.tokenizer.pad_token_id)
    with torch.no_grad():
        la = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lb = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    diff = float((la - lb).abs()[b["attention_mask"].bool()].max())
    assert diff == pytest.approx(s["merge"]["max_logit_diff"], abs=1e-6)


def test_merge_lora_base_on_a_4bit_base(tiny_llama, tiny_data, tmp_path, monkeypatch):
    """`merge-lora ADAPTER --base M` of an adapter trained on a 4-bit base merges into that base loaded in
    4 bit and dequantised (recorded in MOETUNE_MERGE.txt); model.quantization=none merges into the float
    base instead; a 4-bit base without merge.dequantize is refused with exit 2."""
    from moetune.adapters.io import load_adapter
    out = tmp_path / "run"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "model.quantization=nf4", "train.lr=1e-2",
                                                "stages=[train]")))
    monkeypatch.chdir(tmp_path)                      # the probe batch reads data/default/validation.jsonl
    (tmp_path / "data" / "default").mkdir(parents=True)
    shutil.copy(tiny_data["validation"], tmp_path / "data" / "default" / "validation.jsonl")
    assert cli(monkeypatch, "merge-lora", out / "adapter", "--base", tiny_llama, "--out", tmp_path / "m4") in (0, None)
    note = (tmp_path / "m4" / "MOETUNE_MERGE.txt").read_text()
    assert "4-bit base dequantised" in note
    assert cli(monkeypatch, "merge-lora", out / "adapter", "--base", tiny_llama, "--out", tmp_path / "mf",
               "model.quantization=none") in (0, None)
    assert "dequantised" not in (tmp_path / "mf" / "MOETUNE_MERGE.txt").read_text()
    from transformers import AutoModelForCausalLM
    m4 = AutoModelForCausalLM.from_pretrained(tmp_path / "m4").eval()
    mf = AutoModelForCausalLM.from_pretrained(tmp_path / "mf").eval()
    q = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4"), CPU)
    load_adapter(q, out / "adapter")
    ids = _ids(q.config.vocab_size)
    with torch.no_grad():
        lq, l4, lf = (m(input_ids=ids).logits for m in (q, m4, mf))
    assert float((lq - l4).abs().max()) < 1e-3 < float((lq - lf).abs().max())  # the 4-bit merge is the trained model
    code = cli(monkeypatch, "merge-lora", out / "adapter", "--base", tiny_llama, "--out", tmp_path / "bad",
               "merge.dequantize=false")
    assert code == 2 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("etype", ["hydralora", "molora", "mov"])
def test_collapse_of_a_routed_adapter_on_a_4bit_base(etype, tiny_llama, tiny_data, tmp_path):
    """`export --collapse mean` on a 4-bit run: stock PEFT files and collapse.json with the fidelity (KL,
    routed vs collapsed loss) measured on the 4-bit base; the collapsed adapter on the 4-bit base
    reproduces the reported collapsed loss."""
    from moetune.export.collapse import export_collapsed
    from moetune.run.session import Run
    out = tmp_path / "run"
    extra = ["expert.num_experts=3"] + (["train.lr=5e-2"] if etype == "mov" else ["train.lr=1e-2"])
    r = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "model.quantization=nf4", f"expert.type={etype}",
                                         *extra, "stages=[train]", "eval.generation=false"))
    run_recipe(r)
    res = export_collapsed(Run(r), "mean")
    fid = res["adapters"]["mean"]["fidelity"]
    assert fid["kl"] >= 0 and fid["tokens"] > 0 and abs(fid["loss_change"]) < 1.0
    coll = tmp_path / "run" / "collapsed-mean"
    cfg = json.loads((coll / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("IA3" if etype == "mov" else "LORA")
    assert json.loads((coll / "collapse.json").read_text())["adapters"]["mean"]["fidelity"]["kl"] == fid["kl"]
    if etype == "hydralora":   # moetune reloads the stock LoRA on the 4-bit base: the same collapsed loss
        from moetune.eval.evaluate import loss_by_domain
        from moetune.run.session import model_with_adapter
        run = Run(r)
        model = model_with_adapter(run, coll)
        assert _linears(model)
        loss = loss_by_domain(model, run.splits("validation")["validation"], run.tokenizer.pad_token_id, 8, CPU)
        assert loss["loss"] == pytest.approx(fid["collapsed"]["loss"], abs=1e-5)


# ------------------------------------------------------------------ memory accounting


def test_validate_counts_the_4bit_bytes_bitsandbytes_holds(tiny_llama, tiny_data, tmp_path):
    """validate's frozen-weight estimate (meta device, no weights) equals the bytes the loaded 4-bit model
    holds (codes, scales, code books; the rest in float32) within 1%; the 4-bit linears take <= 0.35x
    their bfloat16 bytes (here the per-layer code books weigh more: 64-wide layers)."""
    from moetune.models.quant import loaded_bytes
    from moetune.commands.validate import estimate
    for double in (True, False):
        r = load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path, "model.quantization=nf4",
                                             f"model.double_quantization={double}", "stages=[train]"))
        est = estimate(r)
        got = loaded_bytes(load_model(r.model, CPU))
        assert est["frozen_4bit_bytes"] == got["quantized"]
        assert est["memory"]["frozen_weights"] == pytest.approx(got["quantized"] + got["float"], rel=0.01)


# ------------------------------------------------------------------ clear errors (exit 2, one paragraph)


def _train_err(monkeypatch, capsys, tiny_llama, tiny_data, tmp_path, *extra) -> str:
    code = cli(monkeypatch, "train", "recipes/default.yaml",
               *tiny_overrides(tiny_llama, tiny_data, tmp_path / "run", "stages=[train]", *extra))
    out = capsys.readouterr()
    assert code == 2 and "Traceback" not in out.out + out.err
    return " ".join((out.out + out.err).split())


def test_already_quantised_checkpoint_is_a_clear_error(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    """A checkpoint quantised by another method (FP8 here): bitsandbytes cannot quantise its linear layers."""
    fp8 = tmp_path / "fp8"
    shutil.copytree(tiny_llama, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(ROOT)
    msg = _train_err(monkeypatch, capsys, fp8, tiny_data, tmp_path, "model.quantization=nf4")
    assert "'model.quantization'" in msg and "already quantised (fp8)" in msg and "cannot quantise" in msg
    code = cli(monkeypatch, "validate", "recipes/default.yaml",
               *tiny_overrides(fp8, tiny_data, tmp_path / "v", "model.quantization=nf4", "stages=[train]"))
    out = capsys.readouterr()
    assert code == 2 and "already quantised (fp8)" in " ".join((out.out + out.err).split())


def test_model_without_torch_linears_is_a_clear_error(tiny_llama, tmp_path):
    """A remote-code model whose projections are its own module class: bitsandbytes quantises nothing, and
    moetune says so instead of training a float model as if it were 4-bit."""
    code = tmp_path / "own"
    shutil.copytree(tiny_llama, code)
    (code / "modeling_own.py").write_text(
        "import torch\nfrom torch import nn\nfrom transformers import LlamaForCausalLM\n\n\n"
        "class OwnLinear(nn.Module):\n"
        "    def __init__(self, lin):\n"
        "        super().__init__()\n"
        "        self.weight = lin.weight\n"
        "        self.bias = lin.bias\n\n"
        "    def forward(self, x):\n"
        "        return nn.functional.linear(x, self.weight, self.bias)\n\n\n"
        "class OwnForCausalLM(LlamaForCausalLM):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        for name, m in list(self.model.named_modules()):\n"
        "            if type(m) is nn.Linear:\n"
        "                parent, _, child = name.rpartition('.')\n"
        "                setattr(self.model.get_submodule(parent), child, OwnLinear(m))\n")
    cfg = json.loads((code / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    (code / "config.json").write_text(json.dumps(cfg))
    float_model = load_model(ModelConfig(path=str(code), trust_remote_code=True), CPU)   # loads as a float model
    assert type(float_model.model.layers[0].mlp.up_proj).__name__ == "OwnLinear"
    with pytest.raises(RecipeError, match="quantised none of the layers.*OwnLinear.*model.quantization=none"):
        load_model(ModelConfig(path=str(code), trust_remote_code=True, quantization="nf4"), CPU)


def test_backend_without_the_4bit_type_is_a_clear_error(tiny_llama, tiny_data, tmp_path, monkeypatch, capsys):
    """A bitsandbytes backend that lacks the kernel (as bitsandbytes reports it: NotImplementedError) and a
    missing bitsandbytes: one paragraph naming model.quantization, exit 2, for train and validate."""
    import bitsandbytes.functional as bnbf

    from moetune.models import quant

    def missing(*a, **k):
        raise NotImplementedError("no kernel for quantize_4bit with quant_type fp4 on this device")
    monkeypatch.setattr(bnbf, "quantize_4bit", missing)
    monkeypatch.setattr(quant, "_BACKEND_OK", set())
    monkeypatch.chdir(ROOT)
    msg = _train_err(monkeypatch, capsys, tiny_llama, tiny_data, tmp_path, "model.quantization=fp4")
    assert "'model.quantization' is 'fp4'" in msg and "cannot run on cpu" in msg and "NotImplementedError" in msg
    assert "model.quantization=none" in msg
    code = cli(monkeypatch, "validate", "recipes/default.yaml",
               *tiny_overrides(tiny_llama, tiny_data, tmp_path / "v", "model.quantization=fp4", "stages=[train]"))
    out = capsys.readouterr()
    assert code == 2 and "cannot run on cpu" in " ".join((out.out + out.err).split())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)                      # not installed: ImportError
    msg = _train_err(monkeypatch, capsys, tiny_llama, tiny_data, tmp_path, "model.quantization=nf4")
    assert "needs bitsandbytes" in msg and "make setup" in msg


# ------------------------------------------------------------------ CUDA (runs where a GPU is present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA half of QLoRA needs a CUDA GPU")
def test_cuda_qlora_computes_in_bfloat16_and_trains_merges(tiny_llama, tiny_data, tmp_path):
    """On CUDA, model.dtype auto computes a 4-bit base in bfloat16 on this process's GPU; a LoRA trains,
    resumes bit-identically and merges with dequantisation."""
    q = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4", device="cuda"))
    assert all(m.compute_dtype == torch.bfloat16 and m.weight.device.type == "cuda" for m in _linears(q))
    base = ["model.device=cuda", "model.quantization=nf4", "merge.dequantize=true", "train.lr=1e-2",
            "train.max_steps=6", "train.save_every=3", "eval.generation=false"]
    s = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "a", *base,
                                                    "stages=[train,merge,eval]")))
    assert s["after"]["loss"] < s["before"]["loss"]
    assert s["merge"]["dequantized"] and s["merge"]["max_logit_diff"] < 0.5
    cut = tiny_overrides(tiny_llama, tiny_data, tmp_path / "b", *base, "stages=[train,merge,eval]")
    run_recipe(load_recipe(None, [*cut, "train.stop_after=3"]))
    run_recipe(load_recipe(None, cut), resume=True)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the one real run: recipes/qlora.yaml on SmolLM2


@pytest.mark.slow
def test_qlora_recipe_on_smollm2(tmp_path):
    """recipes/qlora.yaml as shipped (NF4, double quantisation, float32 compute on CPU), shortened: the 4-bit
    linears of SmolLM2-135M take <= 0.35x their bfloat16 bytes (0.258x: 4.127 bits per weight), training
    lowers the held-out loss, the merged (dequantised) model matches the 4-bit adapter model, and stock
    transformers + PEFT load the export on the dequantised base."""
    import subprocess

    from moetune.models.quant import loaded_bytes
    q = load_model(load_recipe(ROOT / "recipes" / "qlora.yaml").model, CPU)
    lin = _linears(q)
    assert len(lin) == 210 and loaded_bytes(q)["quantized"] <= 0.35 * 2 * sum(m.in_features * m.out_features
                                                                              for m in lin)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moetune", "train", "recipes/qlora.yaml", f"output_dir={out}",
                           "train.max_steps=6", "train.batch_size=2", "train.warmup_steps=0", "train.eval_every=0",
                           "train.save_every=3", "eval.max_examples=16", "eval.max_new_tokens=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["model"] == "merged" and s["after"]["loss"] < s["before"]["loss"] - 0.3
    assert s["merge"]["dequantized"] and s["merge"]["max_logit_diff"] < 1e-3
    meta = json.loads((out / "export" / "moetune.json").read_text())
    assert meta["base_quantization"] == {"quantization": "nf4", "double_quantization": True,
                                         "compute_dtype": "float32"}
    # the export card's snippet, run as written without moetune: stock bitsandbytes loads the 4-bit base (in the
    # compute dtype: the snippet turns off bitsandbytes' bfloat16-only CPU inference kernel, which alone moves these
    # logits by ~3), PEFT the adapter: the merged (dequantised) model's logits
    from test_stock_export import _run_snippet, _snippet
    code = _snippet((out / "export" / "README.md").read_text())
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4'" in code and "import moetune" not in code
    ids = [[1, 9, 13, 17, 21, 25, 29]]
    got = _run_snippet(code, tmp_path, ids)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_bitsandbytes_kernel_notice_is_silenced_for_every_run():
    """bitsandbytes, imported for every run (transformers' scheduler import pulls in peft, which imports it), logs
    on AVX512-BF16 CPUs that an optional fused-kernel package is missing: the CLI silences that line (moetune
    never uses the kernel), QLoRA or not. One process: a filter placed before moetune's sees what bitsandbytes
    logs (the line itself on such a CPU), and nothing of it reaches stderr."""
    import subprocess
    code = ("import logging\nfrom moetune.core.ui import quiet_library_notices\nseen = []\n"
            "class See(logging.Filter):\n    def filter(self, r):\n        seen.append(r.getMessage())\n        return True\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').addFilter(See())\n"
            "quiet_library_notices()\nimport bitsandbytes\n"
            "print(any('gemm_4bit_forward' in m for m in seen))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "gemm_4bit_forward" not in res.stderr, res.stderr
    cpuinfo = Path("/proc/cpuinfo")
    if "avx512_bf16" in (cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""):
        assert res.stdout.strip() == "True"                     # the notice was logged here, and filtered
