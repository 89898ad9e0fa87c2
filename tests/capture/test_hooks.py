"""The capture path on ``meta`` tensors: a tensor it creates without ``device=`` lands on the CPU,
and torch refuses to mix it with a meta one, so a GPU-only device bug fails here on CPU."""

import pytest
import torch
from transformers import LlamaConfig

from mergekit_sparsegpt.capture import hooks
from mergekit_sparsegpt.capture.accumulate import HessianAccumulator
from mergekit_sparsegpt.capture.architecture import decoder_layers
from mergekit_sparsegpt.capture.hooks import HessianHooks
from mergekit_sparsegpt.capture.model import empty_model


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def test_meta_catches_a_tensor_on_another_device():
    meta = torch.empty(3, 2, device="meta")
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(2, 2).addmm_(meta.t(), meta)


def test_accumulator_stays_on_its_device():
    accumulator = HessianAccumulator(4, "meta")
    accumulator.add_batch(torch.empty(2, 5, 4, device="meta"))
    accumulator.add_batch(torch.empty(7, 4, device="meta"), sequences=2)
    assert accumulator.hessian.device.type == "meta"
    assert accumulator.samples == 4


def test_hooks_on_a_meta_block_keep_every_hessian_on_its_device(monkeypatch):
    # Meta tensors hold no values to check: the finiteness check reads them.
    monkeypatch.setattr(hooks, "check_finite_activations", lambda *_args, **_kwargs: None)
    prefix, layers = decoder_layers(empty_model(_config()))
    block = layers[0]
    # Never called by the forward pass: its all-zero Hessian is created by ``result``.
    block.unused = torch.nn.Linear(5, 2, device="meta")
    hidden = torch.empty(2, 8, 32, device="meta")
    rotary = (torch.empty(2, 8, 8, device="meta"), torch.empty(2, 8, 8, device="meta"))
    with HessianHooks(block, f"{prefix}.0", "meta") as hessian_hooks, torch.no_grad():
        block(hidden, attention_mask=None, position_embeddings=rotary)
    result = hessian_hooks.result()
    assert len(result.hessians) == 7  # 4 linear inputs, 2 norms' energies, the unused linear
    assert {hessian.device.type for hessian in result.hessians.values()} == {"meta"}
    assert result.hessians["model.layers.0.post_attention_layernorm.weight"].shape == (32,)
    assert result.hessians["model.layers.0.mlp.down_proj.weight"].shape == (48, 48)
    assert result.samples["model.layers.0.self_attn.q_proj.weight"] == 2
    assert result.samples["model.layers.0.unused.weight"] == 0
