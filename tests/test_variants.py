"""The LoRA variants (issue #22, deliverable 8): rsLoRA, DoRA, PiSSA, OLoRA, LoRA+.

For each: a tiny run trains (the loss falls), merges (the merged model equals the adapter model) and
exports a stock PEFT adapter that `peft.PeftModel.from_pretrained` loads onto the ORIGINAL base with
moetune's logits; stock PEFT adapters of the variants import into moetune with PEFT's logits; the math
agrees with PEFT's own layers (logits and gradients); rsLoRA and LoRA+ also on HydraLoRA and MoLoRA.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_overrides
from moetune.adapters.inject import expert_layers, inject, trainable_parameters
from moetune.adapters.io import load_adapter, save_adapter
from moetune.commands.stages import run_recipe
from moetune.experts import config_class
from moetune.export.collapse import collapse_layers, install, save_collapsed
from moetune.export.merge import merge_into_base
from moetune.models import projection
from moetune.recipe import RecipeError, RouterConfig, load_recipe

torch.set_num_threads(1)
TOL = dict(atol=2e-5, rtol=1e-5)


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(5, vocab, (3, 11), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(model.config.vocab_size)).logits


def _randomise(model, scale: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


def _peft(path, adapter):
    from peft import PeftModel
    return PeftModel.from_pretrained(_base(path), adapter).eval()


def _stock_peft_adapter(path, tmp_path, **lora_kw):
    """A stock PEFT LoRA adapter (get_peft_model, randomised, save_pretrained) and its logits."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(_base(path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   **lora_kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", _logits(model)


# ------------------------------------------------------------------ every variant end to end

VARIANTS = {
    "rslora": ["expert.use_rslora=true", "expert.alpha=8"],
    "dora": ["expert.use_dora=true"],
    "pissa": ["expert.init=pissa"],
    "olora": ["expert.init=olora"],
    "loraplus": ["train.lora_plus_ratio=16"],
}
VARIANT_CARD = {"rslora": "rsLoRA (s = alpha / sqrt(r))", "dora": "DoRA", "pissa": "PiSSA init (saved as a rank-8 LoRA",
                "olora": "OLoRA init", "loraplus": "targets ['all-linear']"}  # LoRA+ is a train: setting
VARIANT_PEFT = {  # what adapter_config.json says
    "rslora": {"use_rslora": True, "use_dora": False, "init_lora_weights": True, "r": 4, "lora_alpha": 8},
    "dora": {"use_rslora": False, "use_dora": True, "init_lora_weights": True, "r": 4, "lora_alpha": 16},
    # PiSSA / OLoRA: the rank-2r LoRA on the original base, A' = [A; A0], B' = [B, -B0], lora_alpha doubled
    "pissa": {"use_rslora": False, "use_dora": False, "init_lora_weights": True, "r": 8, "lora_alpha": 32},
    "olora": {"use_rslora": False, "use_dora": False, "init_lora_weights": True, "r": 8, "lora_alpha": 32},
    "loraplus": {"use_rslora": False, "use_dora": False, "init_lora_weights": True, "r": 4, "lora_alpha": 16},
}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_merges_and_exports_for_stock_peft(variant, arch, request, tiny_data, tmp_path):
    path = request.getfixturevalue(arch)
    out = tmp_path / "run"
    summary = run_recipe(load_recipe(None, tiny_overrides(path, tiny_data, out, *VARIANTS[variant], "train.max_steps=5",
                                                          "stages=[train,merge,export]", "export.kind=both",
                                                          "train.eval_before=false")))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"split"' not in line]
    assert len(losses) == 5 and losses[-1] < losses[0], losses                   # it trains
    assert summary["merge"]["max_logit_diff"] < 1e-4                               # it merges
    cfg = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in VARIANT_PEFT[variant]} == VARIANT_PEFT[variant]
    from moetune.run.session import Run, model_with_adapter
    ours = _logits(model_with_adapter(Run(load_recipe(out / "recipe.yaml", [f"output_dir={out}"]))))
    torch.testing.assert_close(_logits(_peft(path, out / "export" / "adapter")), ours, **TOL)  # stock PEFT
    merged = AutoModelForCausalLM.from_pretrained(out / "export" / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), ours, atol=1e-4, rtol=1e-4)
    card = (out / "export" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card
    line = next(x for x in card.splitlines() if x.startswith("- Expert: lora"))
    assert VARIANT_CARD[variant] in line, line


# ------------------------------------------------------------------ rsLoRA


@pytest.mark.parametrize("etype", ["lora", "hydralora", "molora"])
def test_rslora_scale_is_alpha_over_sqrt_rank(etype, tiny_llama):
    kw = {} if etype == "lora" else {"num_experts": 2}
    plain = inject(_base(tiny_llama), config_class(etype)(type=etype, rank=4, alpha=8, **kw), RouterConfig())
    rs = inject(_base(tiny_llama), config_class(etype)(type=etype, rank=4, alpha=8, use_rslora=True, **kw),
                RouterConfig())
    for a, b in zip(plain.values(), rs.values()):
        assert a.scale == 2.0 and b.scale == 4.0                                   # 8 / 4 and 8 / sqrt(4)
        with torch.no_grad():
            b.load_state_dict(a.state_dict())
            b.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
            a.lora_B.copy_(b.lora_B)
            x = torch.randn(2, 3, a.d_in)
            torch.testing.assert_close(b.delta(x), 2 * a.delta(x))


def test_stock_peft_rslora_adapter_imports(tiny_llama, tmp_path):
    adapter, want = _stock_peft_adapter(tiny_llama, tmp_path, use_rslora=True)
    model = _base(tiny_llama)
    meta = load_adapter(model, adapter)
    assert meta["expert"]["use_rslora"] is True
    torch.testing.assert_close(_logits(model), want, **TOL)


@pytest.mark.parametrize("etype", ["hydralora", "molora"])
def test_rslora_on_routed_types_trains_and_collapses_to_stock_peft(etype, tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "run"
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, f"expert.type={etype}", "expert.use_rslora=true",
                                                "expert.num_experts=2", "train.max_steps=4", "stages=[train]",
                                                "train.eval_before=false")))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"split"' not in line]
    assert losses[-1] < losses[0]
    model = _base(tiny_llama)
    meta = load_adapter(model, out / "adapter")
    assert meta["expert"]["use_rslora"] is True
    routed = {n: m for n, m in expert_layers(model).items()}
    assert all(m.scale == 16.0 / 2 for m in routed.values())                      # alpha 16 / sqrt(rank 4)
    w = torch.tensor([0.3, 0.7]).expand(len(routed), 2)
    collapsed = collapse_layers(routed, w)
    install(model, collapsed)
    ours = _logits(model)
    info = save_collapsed(tmp_path / "c", model, collapsed, str(tiny_llama), {"mode": "mean"})
    assert info["scale"] == pytest.approx(8.0)                                    # the routed s, kept
    torch.testing.assert_close(_logits(_peft(tiny_llama, tmp_path / "c")), ours, **TOL)


def test_rslora_is_refused_where_there_is_no_low_rank_scale():
    with pytest.raises(RecipeError, match="expert.use_rslora' is true, but expert type 'mov'"):
        load_recipe(None, ["expert.type=mov", "expert.use_rslora=true"])


# ------------------------------------------------------------------ DoRA


def _peft_twin(path, model, **lora_kw):
    """A PEFT model with the same LoRA settings as moetune's injected `model` and its adapter tensors copied in."""
    from peft import LoraConfig, get_peft_model
    layers = expert_layers(model)
    cfg = next(iter(layers.values())).cfg
    twin = get_peft_model(_base(path), LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=sorted(layers),
                                                  fan_in_fan_out="gpt2" in str(path), **lora_kw))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            for local, v in layer.adapter_state().items():
                key = (f"base_model.model.{name}.{local}.default.weight" if local != "lora_magnitude_vector"
                       else f"base_model.model.{name}.lora_magnitude_vector.default.weight")
                params[key].copy_(v)
    return twin, params


def _grads(model, names) -> dict:
    model.eval()  # no GPT-2 attention/residual dropout: the same function on both sides
    x = _ids(model.config.vocab_size)
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    return {k: p.grad.clone() for k, p in names.items()}


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_dora_equals_peft_dora_in_logits_and_gradients(arch, request):
    """Same tensors in moetune's DoRA and PEFT's: same logits, same gradients of A, B and m (n detached in both)."""
    path = request.getfixturevalue(arch)
    model = _base(path)
    ref = _logits(model)
    layers = inject(model, config_class("lora")(type="lora", rank=4, alpha=8, use_dora=True))
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)             # fresh: m = n, B = 0
    _randomise(model)
    twin, params = _peft_twin(path, model, use_dora=True)
    twin.eval()
    torch.testing.assert_close(_logits(model), _logits(twin), **TOL)
    ours = {f"{n}.{k}": p for n, layer in layers.items() for k, p in layer.adapter_state().items()}
    mapping = {k: params[f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.default.weight"] for k in ours}
    g_ours, g_peft = _grads(model, ours), _grads(twin, mapping)
    for k in ours:
        torch.testing.assert_close(g_ours[k], g_peft[k], atol=1e-5, rtol=1e-4)
    layer = next(iter(layers.values()))                                          # the formula itself
    with torch.no_grad():
        x = torch.randn(2, 3, layer.d_in)
        w = projection.dense_weight(layer.base) + layer.scale * layer.lora_B @ layer.lora_A
        g = layer.lora_magnitude_vector / w.norm(dim=1)
        b = layer.base.bias if layer.base.bias is not None else 0
        torch.testing.assert_close(layer.eval()(x), (x @ w.t()) * g + b, **TOL)


def test_stock_peft_dora_adapter_imports(tiny_llama, tmp_path):
    adapter, want = _stock_peft_adapter(tiny_llama, tmp_path, use_dora=True)
    model = _base(tiny_llama)
    meta = load_adapter(model, adapter)
    assert meta["expert"]["use_dora"] is True
    torch.testing.assert_close(_logits(model), want, **TOL)
    torch.testing.assert_close(_logits(merge_into_base(model)), want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A tiny Llama whose widths are whole 64-blocks: bitsandbytes' own CPU dequantisation (which PEFT's DoRA
    calls for n) is right only there (see moetune/models/quant.py); moetune's dequantisation is right at any width."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig
    tok = build_tokenizer(chat=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=0))
    d = tmp_path_factory.mktemp("llama64")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_dora_on_a_4bit_base_trains_merges_and_loads_in_peft(llama64, tiny_data, tmp_path):
    """n comes from the dequantised W0 (the dispatch's dense weight): a fresh DoRA is the 4-bit base exactly; the
    trained adapter merges (dequantised) and stock PEFT loads it onto the same 4-bit base."""
    from moetune.models.load import load_model
    from moetune.recipe import ModelConfig
    tiny_llama = llama64
    cpu = torch.device("cpu")
    q = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4"), cpu)
    ref = _logits(q)
    inject(q, config_class("lora")(type="lora", rank=4, use_dora=True))
    torch.testing.assert_close(_logits(q), ref, rtol=0, atol=0)
    out = tmp_path / "run"
    summary = run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, "model.quantization=nf4",
                                                          "expert.use_dora=true", "merge.dequantize=true",
                                                          "train.max_steps=3", "stages=[train,merge]",
                                                          "train.eval_before=false")))
    assert summary["merge"]["max_logit_diff"] < 1e-3
    from peft import PeftModel
    base = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4"), cpu)
    ours = load_model(ModelConfig(path=str(tiny_llama), quantization="nf4"), cpu)
    load_adapter(ours, out / "adapter")
    peft = PeftModel.from_pretrained(base, out / "adapter").eval()
    torch.testing.assert_close(_logits(peft), _logits(ours), atol=1e-4, rtol=1e-4)


def test_dora_adapters_are_refused_where_a_plain_low_rank_delta_is_needed(tiny_llama, tmp_path):
    model = _base(tiny_llama)
    inject(model, config_class("lora")(type="lora", rank=2, use_dora=True))
    save_adapter(tmp_path / "d", model, config_class("lora")(type="lora", rank=2, use_dora=True), None, str(tiny_llama))
    from moetune.export.multimerge import read_lora
    with pytest.raises(RecipeError, match="merges LoRA adapters only"):
        read_lora(tmp_path / "d")
    with pytest.raises(RecipeError, match="not one plain LoRA pair per module"):
        inject(_base(tiny_llama), config_class("mole")(type="mole", experts=[str(tmp_path / "d")]), RouterConfig())


# ------------------------------------------------------------------ PiSSA and OLoRA


@pytest.mark.parametrize("init,arch", [("pissa", "tiny_llama"), ("pissa", "tiny_gpt2"), ("olora", "tiny_llama")])
def test_principal_init_equals_peft_in_factors_logits_and_gradients(init, arch, request):
    """moetune keeps W0 and subtracts s B0 A0; PEFT replaces W0 by W_res = W0 - s B0 A0. Same factors, the same
    function (fresh: exactly the base for moetune), the same gradients. (PEFT's OLoRA ignores fan_in_fan_out,
    so it is compared on Llama only; moetune's works on GPT-2's Conv1D too, see the end-to-end test.)"""
    from peft import LoraConfig, get_peft_model
    path = request.getfixturevalue(arch)
    model = _base(path)
    ref = _logits(model)
    layers = inject(model, config_class("lora")(type="lora", rank=4, alpha=8, init=init))
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)             # exactly the base when fresh
    twin = get_peft_model(_base(path), LoraConfig(r=4, lora_alpha=8, target_modules=sorted(layers),
                                                  init_lora_weights=init, fan_in_fan_out=arch == "tiny_gpt2"))
    params = dict(twin.named_parameters())
    for name, layer in layers.items():
        for local in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, local), params[f"base_model.model.{name}.{local}.default.weight"],
                                       atol=1e-5, rtol=1e-5)
    if init == "pissa":                                                          # s B0 A0 = the rank-r SVD truncation
        layer = next(iter(layers.values()))
        u, sv, vh = torch.linalg.svd(projection.dense_weight(layer.base), full_matrices=False)
        torch.testing.assert_close(layer.scale * layer.lora_B0 @ layer.lora_A0, u[:, :4] * sv[:4] @ vh[:4],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(twin.eval()), ref, atol=1e-4, rtol=1e-4)  # PEFT: W_res + s B0 A0 ~ W0
    _randomise(model)
    with torch.no_grad():
        for name, layer in layers.items():
            for local in ("lora_A", "lora_B"):
                params[f"base_model.model.{name}.{local}.default.weight"].copy_(getattr(layer, local))
    torch.testing.assert_close(_logits(model), _logits(twin), atol=1e-4, rtol=1e-4)
    ours = {f"{n}.{k}": p for n, layer in layers.items() for k, p in layer.adapter_state().items()}
    mapping = {k: params[f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.default.weight"] for k in ours}
    g_ours, g_peft = _grads(model, ours), _grads(twin, mapping)
    for k in ours:
        torch.testing.assert_close(g_ours[k], g_peft[k], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_saves_the_rank_2r_form_and_stock_pissa_adapters_import(init, tiny_llama, tmp_path):
    model = _base(tiny_llama)
    cfg = config_class("lora")(type="lora", rank=4, alpha=8, init=init, use_rslora=True)
    inject(model, cfg)
    _randomise(model)
    ours = _logits(model)
    save_adapter(tmp_path / "a", model, cfg, None, str(tiny_llama))
    meta = json.loads((tmp_path / "a" / "moetune.json").read_text())
    assert (meta["expert"]["rank"], meta["expert"]["init"]) == (8, "default")
    assert meta["expert"]["alpha"] == pytest.approx(8 * math.sqrt(2))             # rsLoRA: s = alpha / sqrt(r) kept
    assert meta["expert"]["converted_from"] == {"init": init, "rank": 4, "alpha": 8}
    torch.testing.assert_close(_logits(_peft(tiny_llama, tmp_path / "a")), ours, **TOL)   # onto the ORIGINAL base
    again = _base(tiny_llama)
    load_adapter(again, tmp_path / "a")                                          # a plain rank-8 LoRA: no SVD
    torch.testing.assert_close(_logits(again), ours, **TOL)
    torch.testing.assert_close(_logits(merge_into_base(again)), ours, atol=1e-4, rtol=1e-4)
    # A stock PEFT adapter saved WITHOUT the conversion (init_lora_weights: 'pissa'/'olora', trained against
    # W_res): moetune recomputes A0, B0 from the base at load, as PEFT does.
    adapter, want = _stock_peft_adapter(tiny_llama, tmp_path, init_lora_weights=init)
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] == init
    imported = _base(tiny_llama)
    assert load_adapter(imported, adapter)["expert"]["init"] == init
    torch.testing.assert_close(_logits(imported), want, atol=1e-4, rtol=1e-4)


def test_principal_init_refusals(tiny_llama):
    with pytest.raises(RecipeError, match="'expert.init' \\('pissa'\\) and 'expert.use_dora'"):
        load_recipe(None, ["expert.init=pissa", "expert.use_dora=true"])
    with pytest.raises(RecipeError, match="'expert.rank' is 64, more than"):
        inject(_base(tiny_llama), config_class("lora")(type="lora", rank=64, init="pissa"))


@pytest.mark.parametrize("variant", ["expert.init=pissa", "expert.use_dora=true"])
def test_validate_counts_the_variants_on_the_meta_device(variant, tiny_llama, tiny_data, tmp_path):
    from moetune.commands.validate import estimate
    plain = estimate(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "r", "stages=[train]")))
    est = estimate(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "r", variant, "stages=[train]")))
    d_out = sum(m.out_features for n, m in _base(tiny_llama).named_modules()
                if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert est["trainable"] - plain["trainable"] == (0 if "init" in variant else d_out)   # DoRA's m: one per row


# ------------------------------------------------------------------ LoRA+


def _lr_by_param(model, recipe) -> dict[int, float]:
    from moetune.train.loop import param_groups
    groups = param_groups(model, trainable_parameters(model), recipe)
    if not isinstance(groups[0], dict):
        return {id(p): recipe.train.lr for p in groups}
    return {id(p): g.get("lr", recipe.train.lr) for g in groups for p in g["params"]}


@pytest.mark.parametrize("etype", ["lora", "hydralora", "molora"])
def test_lora_plus_puts_the_b_matrices_in_a_faster_group(etype, tiny_llama):
    rc = load_recipe(None, [f"expert.type={etype}", "train.lr=1e-3", "train.lora_plus_ratio=16",
                            "router.lr_multiplier=2"])
    model = _base(tiny_llama)
    layers = inject(model, rc.expert, rc.router)
    lr = _lr_by_param(model, rc)
    for layer in layers.values():
        assert lr[id(layer.lora_B)] == pytest.approx(16e-3) and lr[id(layer.lora_A)] == pytest.approx(1e-3)
        if etype != "lora":
            assert lr[id(layer.router.weight)] == pytest.approx(2e-3)           # the router keeps its own group
    plain = load_recipe(None, [f"expert.type={etype}", "train.lr=1e-3"])
    assert set(_lr_by_param(model, plain).values()) == {1e-3}


@pytest.mark.parametrize("etype", ["lora", "hydralora"])
def test_lora_plus_first_sgd_step_moves_b_ratio_times_further(etype, tiny_llama, tiny_data, tmp_path):
    """Step 1 from B = 0: A gets no gradient (dL/dA = s B^T ...), B moves by -lr * ratio * g. With plain SGD and a
    constant schedule the B tensors of a ratio-16 run are exactly 16 times those of a ratio-1 run."""
    from safetensors.torch import load_file
    states = {}
    for ratio in (1, 16):
        out = tmp_path / f"r{ratio}"
        run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, out, f"expert.type={etype}",
                                                    "expert.num_experts=2", f"train.lora_plus_ratio={ratio}",
                                                    "train.optimizer=sgd", "train.momentum=0", "train.scheduler=constant",
                                                    "train.max_grad_norm=0", "train.max_steps=1", "stages=[train]",
                                                    "train.eval_before=false") if etype != "lora" else
                                   tiny_overrides(tiny_llama, tiny_data, out, f"train.lora_plus_ratio={ratio}",
                                                  "train.optimizer=sgd", "train.momentum=0", "train.scheduler=constant",
                                                  "train.max_grad_norm=0", "train.max_steps=1", "stages=[train]",
                                                  "train.eval_before=false")))
        states[ratio] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b_keys = [k for k in states[1] if "lora_B" in k]
    assert b_keys and all(states[1][k].abs().max() > 0 for k in b_keys)
    for k, v in states[1].items():
        want = 16 * v if "lora_B" in k else v
        torch.testing.assert_close(states[16][k], want, rtol=1e-6, atol=0)


def test_lora_plus_is_refused_where_there_are_no_b_matrices():
    with pytest.raises(RecipeError, match="'train.lora_plus_ratio' is 16.0, but expert type 'mov' trains no B"):
        load_recipe(None, ["expert.type=mov", "train.lora_plus_ratio=16"])


@pytest.mark.parametrize("variant", [["expert.init=pissa"], ["expert.use_dora=true", "train.lora_plus_ratio=4"]])
def test_variant_resumes_to_the_uninterrupted_adapter(variant, tiny_llama, tiny_data, tmp_path):
    """A stop and --resume gives the uninterrupted run's adapter (PiSSA: A0, B0 recomputed from the same base;
    DoRA's magnitude and LoRA+'s param groups restored with the optimizer)."""
    from safetensors.torch import load_file
    common = (*variant, "train.max_steps=4", "train.save_every=2", "stages=[train]", "train.eval_before=false")
    run_recipe(load_recipe(None, tiny_overrides(tiny_llama, tiny_data, tmp_path / "full", *common)))
    split = tiny_overrides(tiny_llama, tiny_data, tmp_path / "split", *common)
    assert run_recipe(load_recipe(None, [*split, "train.stop_after=2"]))["train"]["stopped"]
    run_recipe(load_recipe(None, split), resume=True)
    full, resumed = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (tmp_path / "full",
                                                                                           tmp_path / "split"))
    assert set(full) == set(resumed)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-5)


def test_explain_documents_the_variants():
    from moetune.recipe import explain
    text = explain()
    for key, doc in [("expert.use_rslora = False", "rsLoRA (Kalajdzievski 2023"),
                     ("expert.use_dora = False", "DoRA (Liu et al. 2024"),
                     ("expert.init = 'default'  [one of 'default', 'pissa', 'olora']", "'pissa' (Meng et al. 2024"),
                     ("train.lora_plus_ratio = 1.0", "LoRA+ (Hayou, Ghosh, Yu 2024")]:
        assert key in text and doc in text.split(key, 1)[1].splitlines()[1], key


# ------------------------------------------------------------------ CUDA (runs where a GPU is present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA half of the variants needs a CUDA GPU")
@pytest.mark.parametrize("variant", [["expert.use_dora=true", "train.lora_plus_ratio=4"],
                                     ["expert.init=pissa", "expert.use_rslora=true"]])
def test_cuda_variants_on_a_4bit_base_train_merge_and_load_in_peft(variant, llama64, tiny_data, tmp_path):
    """On CUDA (bitsandbytes' CUDA kernels, bfloat16 compute): DoRA's n from the dequantised 4-bit W0 and PiSSA's
    SVD of it; each trains, merges (dequantised) and stock PEFT loads the adapter onto the same 4-bit base."""
    from peft import PeftModel
    from moetune.models.load import load_model
    from moetune.recipe import ModelConfig
    out = tmp_path / "run"
    s = run_recipe(load_recipe(None, tiny_overrides(llama64, tiny_data, out, *variant, "model.device=cuda",
                                                    "model.quantization=nf4", "merge.dequantize=true", "train.lr=1e-2",
                                                    "train.max_steps=6", "stages=[train,merge]",
                                                    "train.eval_before=false")))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"split"' not in line]
    assert losses[-1] < losses[0] and s["merge"]["max_logit_diff"] < 0.5
    cuda = torch.device("cuda")
    ours = load_model(ModelConfig(path=str(llama64), quantization="nf4", device="cuda"), cuda)
    load_adapter(ours, out / "adapter")
    peft = PeftModel.from_pretrained(load_model(ModelConfig(path=str(llama64), quantization="nf4", device="cuda"), cuda),
                                     out / "adapter").eval()
    ids = _ids(ours.config.vocab_size).to(cuda)
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits.float(), ours(ids).logits.float(), atol=5e-2, rtol=5e-2)
