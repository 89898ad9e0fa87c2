import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from mergekit_sparsegpt.capture.architecture import decoder_layers
from mergekit_sparsegpt.capture.blocks import capture_layer_hessians
from mergekit_sparsegpt.capture.model import empty_model


def _config(layers: int = 3, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


def _gemma2_config() -> Gemma2Config:
    # Alternating sliding-window and global layers: each block gets its own attention mask.
    return Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config()).eval()


def _reference_hessians(model, windows):
    """Hooks on every linear of a full forward pass, H = 2/n X^T X in float64."""
    inputs = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:

            def hook(_module, args, name=name):
                inputs.setdefault(f"{name}.weight", []).append(
                    args[0].reshape(-1, args[0].shape[-1])
                )

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    rows = {name: torch.cat(chunks).double() for name, chunks in inputs.items()}
    return {name: 2 / len(windows) * x.T @ x for name, x in rows.items()}


def test_layer_by_layer_equals_hooks_on_full_forward(full_model):
    windows = torch.randint(0, 97, (10, 16), generator=torch.Generator().manual_seed(1))
    state = full_model.state_dict()
    reference = _reference_hessians(full_model, windows)
    layers = list(
        capture_layer_hessians(empty_model(_config()), state.__getitem__, windows, batch_size=4)
    )
    assert len(layers) == 3
    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}"
        # q/k/v read one tensor, gate/up another: they share a Hessian.
        assert (
            layer.groups[f"{prefix}.self_attn.k_proj.weight"] == f"{prefix}.self_attn.q_proj.weight"
        )
        assert (
            layer.groups[f"{prefix}.self_attn.v_proj.weight"] == f"{prefix}.self_attn.q_proj.weight"
        )
        assert layer.groups[f"{prefix}.mlp.up_proj.weight"] == f"{prefix}.mlp.gate_proj.weight"
        assert len(layer.hessians) == 4
        for weight_name, group in layer.groups.items():
            expected = reference[weight_name]
            actual = layer.hessians[group].double()
            torch.testing.assert_close(
                actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max()
            )
            assert layer.samples[group] == 10


def test_only_one_block_is_materialised_at_a_time(full_model):
    state = full_model.state_dict()
    skeleton = empty_model(_config())
    prefix, layers = decoder_layers(skeleton)
    resident_blocks = []

    def load(name):
        resident = {
            index
            for index, layer in enumerate(layers)
            if any(p.device.type != "meta" for p in layer.parameters())
        }
        resident_blocks.append(resident)
        return state[name]

    windows = torch.randint(0, 97, (4, 8))
    for _ in capture_layer_hessians(skeleton, load, windows):
        pass
    assert prefix == "model.layers"
    assert max(len(blocks) for blocks in resident_blocks) <= 1
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_linear_that_never_runs_gets_an_empty_hessian(full_model):
    state = full_model.state_dict()
    skeleton = empty_model(_config(layers=1))
    # An extra linear inside the block that the forward pass never calls (like an unrouted expert).
    skeleton.model.layers[0].unused = torch.nn.Linear(5, 2, device="meta")
    state = {
        **state,
        "model.layers.0.unused.weight": torch.ones(2, 5),
        "model.layers.0.unused.bias": torch.zeros(2),
    }
    (layer,) = capture_layer_hessians(skeleton, state.__getitem__, torch.randint(0, 97, (2, 8)))
    assert layer.samples["model.layers.0.unused.weight"] == 0
    assert torch.equal(layer.hessians["model.layers.0.unused.weight"], torch.zeros(5, 5))


@pytest.mark.parametrize(
    "config",
    [_config(attention_dropout=0.5), _gemma2_config()],
    ids=["dropout", "sliding-and-global-layers"],
)
def test_capture_matches_eval_forward_for_dropout_and_per_layer_masks(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(2))
    reference = _reference_hessians(model, windows)
    layers = capture_layer_hessians(
        empty_model(config), model.state_dict().__getitem__, windows, batch_size=4
    )
    for layer in layers:
        for weight_name, group in layer.groups.items():
            expected = reference[weight_name]
            torch.testing.assert_close(
                layer.hessians[group].double(),
                expected,
                rtol=1e-4,
                atol=1e-5 * expected.abs().max(),
            )
