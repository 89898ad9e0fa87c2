"""Lockstep capture: every task's Hessians of one block at a time, each task through its own
model, against hooks on each model's plain full forward pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mergekit_sparsegpt.capture.architecture import decoder_layers
from mergekit_sparsegpt.capture.lockstep import ForwardModel, capture_lockstep_hessians
from mergekit_sparsegpt.capture.model import empty_model
from tests.norm_reference import perturb_vectors, reference_norm_energies


def _config(layers: int = 3) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _model(seed: int, layers: int = 3):
    torch.manual_seed(seed)
    return perturb_vectors(AutoModelForCausalLM.from_config(_config(layers)).eval())


def _reference(model, windows) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of every decoder linear's and the head's input, by hooks on the whole
    model's forward, and every norm's channel energies."""
    inputs = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.setdefault(f"{name}.weight", []).append(
                args[0].reshape(-1, args[0].shape[-1]).double()
            )
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (".layers." in name or name == "lm_head")
    ]
    energies = reference_norm_energies(model, lambda: model(input_ids=windows), len(windows))
    for handle in handles:
        handle.remove()
    grams = {n: 2 / len(windows) * torch.cat(x).T @ torch.cat(x) for n, x in inputs.items()}
    return grams | energies


def _windows(seed: int, samples: int) -> torch.Tensor:
    return torch.randint(0, 97, (samples, 12), generator=torch.Generator().manual_seed(seed))


def test_every_task_through_its_own_model_equals_its_full_forward():
    models = {"a": _model(1), "b": _model(2)}
    windows = {("a", "x"): _windows(3, 6), ("a", "y"): _windows(4, 6), ("b", "x"): _windows(5, 6)}
    skeletons, resident = [], []
    forward = []
    for name, model in models.items():
        state = model.state_dict()
        skeleton = empty_model(_config())
        skeletons.append(skeleton)
        tasks = {key: w for key, w in windows.items() if key[0] == name}
        forward.append(ForwardModel(skeleton, state.__getitem__, tasks))
    seen = []

    def block_done(index, hessians):
        # At most one block of all models is materialised at any time, and none here.
        resident.append(
            sum(
                any(p.device.type != "meta" for p in layer.parameters())
                for skeleton in skeletons
                for layer in decoder_layers(skeleton)[1]
            )
        )
        seen.append((index, hessians))

    capture_lockstep_hessians(forward, block_done, batch_size=4, progress=False)
    assert [index for index, _ in seen] == [0, 1, 2, 3]  # the blocks, then the head
    assert resident == [0, 0, 0, 0]
    references = {key: _reference(models[key[0]], w) for key, w in windows.items()}
    for index, hessians in seen:
        assert set(hessians) == set(windows)
        for key, layer in hessians.items():
            prefixes = (f"model.layers.{index}.",) if index < 3 else ("model.norm.", "lm_head.")
            assert {name.startswith(prefixes) for name in layer.groups} == {True}
            assert len([name for name in layer.groups if "norm" in name]) == (2 if index < 3 else 1)
            for weight, group in layer.groups.items():
                expected = references[key][weight]
                torch.testing.assert_close(
                    layer.hessians[group].double(),
                    expected,
                    rtol=1e-4,
                    atol=1e-5 * expected.abs().max(),
                )


def test_models_of_different_depths_are_refused():
    forward = [
        ForwardModel(empty_model(_config(depth)), _model(depth, depth).state_dict().__getitem__,
                     {depth: _windows(depth, 2)})
        for depth in (2, 3)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="different depths"):
        capture_lockstep_hessians(forward, lambda index, hessians: None, progress=False)
