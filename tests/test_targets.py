"""Default targets per architecture (issue #22, deliverable 7): with the recipe's default target_modules
('all-linear' for the low-rank types, 'auto' for MoV), every expert type injects into, and runs a
forward of, tiny random models of Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, GPT-NeoX and OPT built
from transformers configs (no hub). A fresh adapter leaves the logits exactly as they were (MoLE: it
equals its one LoRA expert), and MoV wraps the (IA)^3 places of each architecture."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from conftest import build_tokenizer
from moetune.adapters.inject import expert_layers, inject
from moetune.adapters.io import save_adapter
from moetune.experts import REGISTRY
from moetune.models.targets import ARCHITECTURES, architecture_roles, resolve_auto
from moetune.recipe import RecipeError, RouterConfig
from moetune.recipe.experts import EXPERT_CONFIGS

torch.set_num_threads(1)

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=2)
CONFIGS = {
    "llama": lambda v: T.LlamaConfig(vocab_size=v, num_key_value_heads=2, **_COMMON),
    "mistral": lambda v: T.MistralConfig(vocab_size=v, num_key_value_heads=2, **_COMMON),
    "qwen2": lambda v: T.Qwen2Config(vocab_size=v, num_key_value_heads=2, **_COMMON),
    "gemma": lambda v: T.GemmaConfig(vocab_size=v, num_key_value_heads=2, head_dim=8, **_COMMON),
    "phi3": lambda v: T.Phi3Config(vocab_size=v, num_key_value_heads=2, **_COMMON),
    "gpt2": lambda v: T.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                   eos_token_id=2),
    "gpt_neox": lambda v: T.GPTNeoXConfig(vocab_size=v, **_COMMON),
    "opt": lambda v: T.OPTConfig(vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0,
                                 eos_token_id=2),
}
# (IA)^3 places that `target_modules: auto` picks: (leaf names wrapped, leaf names whose INPUT is scaled)
MOV_PLACES = {
    "llama": ({"k_proj", "v_proj", "down_proj"}, {"down_proj"}),
    "phi3": ({"qkv_proj", "down_proj"}, {"down_proj"}),
    "gpt2": ({"attn.c_attn", "mlp.c_proj"}, {"mlp.c_proj"}),
    "gpt_neox": ({"query_key_value", "dense_4h_to_h"}, {"dense_4h_to_h"}),
    "opt": ({"k_proj", "v_proj", "fc2"}, {"fc2"}),
}
for _t in ("mistral", "qwen2", "gemma"):
    MOV_PLACES[_t] = MOV_PLACES["llama"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, str]:
    """A saved tiny random model (and the tests' tokenizer) per architecture."""
    tok = build_tokenizer(chat=False)
    out = {}
    for arch, make in CONFIGS.items():
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(make(len(tok)))
        d = tmp_path_factory.mktemp(arch)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = str(d)
    return out


def _load(path):
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(model) -> torch.Tensor:
    return torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _leaf(name: str, wanted: set[str]) -> str:
    return next(w for w in wanted if name == w or name.endswith("." + w))


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("etype", ["lora", "hydralora", "molora", "mov"])
def test_every_type_injects_with_default_targets_and_a_fresh_adapter_is_a_no_op(etype, arch, arch_dirs):
    model = _load(arch_dirs[arch])
    x = _ids(model)
    ref = model(x).logits
    cfg = EXPERT_CONFIGS[etype](type=etype, num_experts=3) if etype != "lora" else EXPERT_CONFIGS[etype]()
    layers = inject(model, cfg, RouterConfig())
    assert layers and all(type(m) is REGISTRY[etype] for m in layers.values())
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    if etype == "mov":
        wrapped, inputs = MOV_PLACES[arch]
        per_block = {_leaf(n, wrapped) for n in layers}
        assert per_block == wrapped and len(layers) == 2 * len(wrapped)      # every place of both blocks
        assert {_leaf(n, wrapped) for n, m in layers.items() if m.scale_input} == inputs
        assert cfg.target_modules == ["auto"]                                # the recipe's settings untouched
    else:                                                                    # all-linear: every projection but the head
        n_proj = sum(1 for n, m in _load(arch_dirs[arch]).named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") - 1
        assert len(layers) == n_proj


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_mole_and_calm_on_every_architecture(arch, arch_dirs, tmp_path):
    path = arch_dirs[arch]
    # MoLE over one LoRA expert (default targets) equals that LoRA: its single gate is 1.
    lora_model = _load(path)
    inject(lora_model, EXPERT_CONFIGS["lora"](type="lora", rank=2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in expert_layers(lora_model).values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    save_adapter(tmp_path / "e", lora_model, EXPERT_CONFIGS["lora"](type="lora", rank=2), None, path)
    x = _ids(lora_model)
    want = lora_model(x).logits
    mole = _load(path)
    inject(mole, EXPERT_CONFIGS["mole"](type="mole", experts=[str(tmp_path / "e")]), RouterConfig())
    torch.testing.assert_close(mole(x).logits, want, rtol=1e-5, atol=1e-5)
    assert (want - _load(path)(x).logits).abs().max() > 1e-3                 # the expert does act
    # CALM: the anchor composed with a copy of itself; W_O = 0, so a fresh composition is the anchor.
    anchor = _load(path)
    ref = anchor(x).logits
    layers = inject(anchor, EXPERT_CONFIGS["calm"](type="calm", augmenting_model=path, num_compositions=2,
                                                  num_heads=2))
    assert len(layers) == 2
    torch.testing.assert_close(anchor(x).logits, ref, rtol=0, atol=0)
    with torch.no_grad():
        for layer in layers.values():
            layer.w_o.weight.normal_(0, 0.5, generator=g)
    assert (anchor(x).logits - ref).abs().max() > 1e-3                       # the composition acts


def test_table_rows_name_real_modules(arch_dirs):
    """Every pattern of the table names a projection of its architecture's tiny model."""
    for arch in CONFIGS:
        model = _load(arch_dirs[arch])
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
        for role, pats in ARCHITECTURES[model.config.model_type].items():
            for p in pats:
                assert any(n == p or n.endswith("." + p) for n in names), (arch, role, p)


def test_unknown_architecture_falls_back_to_known_names_and_errors_clearly(arch_dirs):
    model = _load(arch_dirs["llama"])
    model.config.model_type = "mystery"                                      # Llama's module names, unknown type
    roles = architecture_roles(model)
    assert roles["k"] == ("k_proj",) and roles["down"] == ("down_proj",) and "qkv" not in roles
    assert resolve_auto(["auto"], model, (("k", "qkv"), ("down",))) == ["k_proj", "down_proj"]
    assert resolve_auto(["q_proj", "auto"], model, None) == ["q_proj", "all-linear"]
    with pytest.raises(RecipeError, match=r"'expert.target_modules' is 'auto', but moetune knows no gate_up"):
        resolve_auto(["auto"], model, (("gate_up",),))


def test_mov_recipe_defaults_to_auto_and_explicit_names_still_win(arch_dirs):
    from moetune.recipe import load_recipe
    rc = load_recipe(None, ["expert.type=mov"])
    assert rc.expert.target_modules == ["auto"] and rc.expert.input_scaled_modules == ["auto"]
    model = _load(arch_dirs["gpt2"])
    layers = inject(model, EXPERT_CONFIGS["mov"](type="mov", target_modules=["c_attn"], input_scaled_modules=["auto"]),
                    RouterConfig())
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert not any(m.scale_input for m in layers.values())
