"""LoRA on the encoders: add_lora needs no encoder-specific code, untrained adapters (B = 0) are the
identity, base checkpoints load into adapted encoders, and merged outputs equal unmerged ones."""

import pytest
import torch
from test_models import ENCODERS, PARITY_ATOL, max_diff, tiny_encoder

from lowrank import LoRAConfig, add_lora, merge_lora, unmerge_lora

LORA = LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v", "o"))


@pytest.mark.parametrize("name", ENCODERS)
def test_untrained_adapters_change_nothing(name):
    model, x = tiny_encoder(name)
    base_keys = set(model.state_dict())
    with torch.no_grad():
        before = model(x)
        add_lora(model, LORA)
        after = model(x)
    added = set(model.state_dict()) - base_keys
    assert base_keys <= set(model.state_dict())  # weights keep their keys: checkpoints still load
    assert added and all("lora_" in k and (".attn.qkv." in k or ".attn.proj." in k) for k in added)
    assert max_diff(after[0], before[0]) <= PARITY_ATOL
    assert max_diff(after[1], before[1]) <= PARITY_ATOL


@pytest.mark.parametrize("name", ENCODERS)
def test_base_checkpoint_loads_into_adapted_encoder(name, tmp_path):
    model, x = tiny_encoder(name)
    model.save_pretrained(tmp_path)
    adapted = type(model).from_pretrained(tmp_path)
    add_lora(adapted, LORA)
    adapted.load_state_dict(type(model).from_pretrained(tmp_path).state_dict())  # strict; lora_ keys missing
    with torch.no_grad():
        assert max_diff(adapted(x)[0], model(x)[0]) <= PARITY_ATOL


@pytest.mark.parametrize("name", ENCODERS)
def test_trained_adapters_merge_unmerge_and_export(name, tmp_path):
    model, x = tiny_encoder(name)
    with torch.no_grad():
        base, _ = model(x)
    add_lora(model, LORA)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    hidden, feature = model(x)
    (hidden.square().mean() + feature.square().mean()).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        unmerged, _ = model(x)
        merge_lora(model)
        merged, _ = model(x)
        model.save_pretrained(tmp_path)  # merged weights; adapter tensors are left out
        exported, _ = type(model).from_pretrained(tmp_path)(x)
        unmerge_lora(model)
        restored, _ = model(x)
    assert max_diff(unmerged, base) > 1e-4  # the step moved the adapters
    assert max_diff(merged, unmerged) <= PARITY_ATOL
    assert max_diff(exported, merged) <= PARITY_ATOL
    assert max_diff(restored, unmerged) <= PARITY_ATOL
