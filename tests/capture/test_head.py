"""The output head's Hessian against hooks on a full forward pass, across architectures."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
)

from mergekit_sparsegpt.capture.blocks import capture_layer_hessians
from mergekit_sparsegpt.capture.head import (
    embedding_weight_name,
    head_weight_name,
    ties_embeddings,
)
from mergekit_sparsegpt.capture.model import empty_model
from tests.norm_reference import reference_norm_energies

SIZES = {"vocab_size": 61, "num_attention_heads": 4}
CONFIGS = {
    "llama-untied": LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        **SIZES,
    ),
    "qwen2-tied-biased": Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **SIZES,
    ),
    "gpt2-tied": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=32),
    "gpt-neox": GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, **SIZES),
    "phi3": Phi3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, pad_token_id=0, **SIZES
    ),
}
FINAL_NORMS = {
    "llama-untied": "model.norm.weight",
    "qwen2-tied-biased": "model.norm.weight",
    "gpt2-tied": "transformer.ln_f.weight",
    "gpt-neox": "gpt_neox.final_layer_norm.weight",
    "phi3": "model.norm.weight",
}
ROLES = {
    "llama-untied": ("model.embed_tokens.weight", "lm_head.weight", False),
    "qwen2-tied-biased": ("model.embed_tokens.weight", "lm_head.weight", True),
    "gpt2-tied": ("transformer.wte.weight", "lm_head.weight", True),
    "gpt-neox": ("gpt_neox.embed_in.weight", "lm_head.weight", False),
    "phi3": ("model.embed_tokens.weight", "lm_head.weight", False),
}


def _head_reference(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(2/n) X^T X of the head's input in a full forward pass, in float64."""
    rows = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    inputs = torch.cat(rows).reshape(-1, rows[0].shape[-1]).double()
    return 2 / len(windows) * inputs.T @ inputs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_hessian_equals_the_full_forward_and_roles_are_found(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a final norm that is not the identity
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
    windows = torch.randint(0, 61, (5, 12), generator=torch.Generator().manual_seed(3))
    expected = _head_reference(model, windows)
    energies = reference_norm_energies(model, lambda: model(input_ids=windows), len(windows))
    skeleton = empty_model(config)
    state = model.state_dict()
    *_, head = capture_layer_hessians(
        skeleton, state.__getitem__, windows, batch_size=2, progress=False
    )
    embedding, head_name, tied = ROLES[name]
    assert (embedding_weight_name(skeleton), head_weight_name(skeleton)) == (embedding, head_name)
    assert ties_embeddings(skeleton) is tied
    norm = FINAL_NORMS[name]  # the final norm's channel energies come with the head's pass
    assert head.groups == {norm: norm, head_name: head_name}
    assert head.samples == {norm: 5, head_name: 5}
    torch.testing.assert_close(
        head.hessians[head_name].double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max()
    )
    torch.testing.assert_close(head.hessians[norm].double(), energies[norm], rtol=1e-4, atol=1e-4)
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # all released again
