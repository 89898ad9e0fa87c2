import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from mergekit_sparsegpt.capture import blocks
from mergekit_sparsegpt.capture.architecture import decoder_layers
from mergekit_sparsegpt.capture.blocks import (
    _ArgumentRecorder,
    _Block,
    _BlockRunner,
    capture_layer_hessians,
)
from mergekit_sparsegpt.capture.memory import activation_bytes
from mergekit_sparsegpt.capture.model import empty_model
from tests.norm_reference import perturb_vectors, reference_norm_energies


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
    return perturb_vectors(AutoModelForCausalLM.from_config(_config()).eval())


def _reference_hessians(model, windows):
    """Hooks on every linear of a full forward pass (the blocks' and the output head's),
    H = 2/n X^T X in float64, and every norm's channel energies (``tests/norm_reference``)."""
    inputs = {}
    handles = []
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers." in name or module is head):

            def hook(_module, args, name=name):
                inputs.setdefault(f"{name}.weight", []).append(
                    args[0].reshape(-1, args[0].shape[-1])
                )

            handles.append(module.register_forward_pre_hook(hook))
    energies = reference_norm_energies(model, lambda: model(input_ids=windows), len(windows))
    for handle in handles:
        handle.remove()
    rows = {name: torch.cat(chunks).double() for name, chunks in inputs.items()}
    return {name: 2 / len(windows) * x.T @ x for name, x in rows.items()} | energies


def test_layer_by_layer_equals_hooks_on_full_forward(full_model):
    windows = torch.randint(0, 97, (10, 16), generator=torch.Generator().manual_seed(1))
    state = full_model.state_dict()
    reference = _reference_hessians(full_model, windows)
    layers = list(
        capture_layer_hessians(empty_model(_config()), state.__getitem__, windows, batch_size=4)
    )
    assert len(layers) == 4  # the blocks, then the output head (tests/capture/test_head.py)
    assert layers[3].tensor_names() == ["model.norm.weight", "lm_head.weight"]
    for index, layer in enumerate(layers[:3]):
        prefix = f"model.layers.{index}"
        # q/k/v read one tensor, gate/up another: they share a Hessian.
        assert (
            layer.groups[f"{prefix}.self_attn.k_proj.weight"] == f"{prefix}.self_attn.q_proj.weight"
        )
        assert (
            layer.groups[f"{prefix}.self_attn.v_proj.weight"] == f"{prefix}.self_attn.q_proj.weight"
        )
        assert layer.groups[f"{prefix}.mlp.up_proj.weight"] == f"{prefix}.mlp.gate_proj.weight"
        assert len(layer.hessians) == 6  # q/k/v, o, gate/up, down; the two norms' energies
        assert layer.hessians[f"{prefix}.input_layernorm.weight"].shape == (32,)
        for weight_name, group in layer.groups.items():
            expected = reference[weight_name]
            actual = layer.hessians[group].double()
            torch.testing.assert_close(
                actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max()
            )
            assert layer.samples[group] == 10


def test_diagonal_capture_is_the_diagonal_of_the_whole_one(full_model):
    """``diagonal``: every linear input (the head's too) keeps diag H alone, marked estimated;
    the norms' energies are the same either way."""
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(4))
    state = full_model.state_dict()
    whole, diagonal = (
        list(capture_layer_hessians(empty_model(_config()), state.__getitem__, windows, **kw))
        for kw in ({"batch_size": 4}, {"batch_size": 4, "diagonal": True})
    )
    assert len(whole) == len(diagonal) == 4
    for full, small in zip(whole, diagonal, strict=True):
        assert (full.groups, full.samples) == (small.groups, small.samples)
        assert not full.estimated
        for group, hessian in full.hessians.items():
            if hessian.dim() == 1:  # a norm's
                assert torch.equal(small.hessians[group], hessian)
                assert group not in small.estimated
            else:
                assert group in small.estimated
                torch.testing.assert_close(
                    small.hessians[group], torch.diagonal(hessian), rtol=1e-5, atol=1e-5
                )
    assert "lm_head.weight" in diagonal[-1].estimated


@pytest.mark.parametrize("diagonal", [False, True])
def test_only_passes_of_whole_hessians_map_large_allocations(full_model, monkeypatch, diagonal):
    """The fixed mmap threshold keeps a pass holding d x d matrices from fragmenting the heap;
    a pass of diagonals alone keeps glibc's defaults and their speed."""
    calls = []
    monkeypatch.setattr(blocks, "map_large_allocations", lambda: calls.append(1))
    windows = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(5))
    state = full_model.state_dict()
    model = empty_model(_config())
    list(capture_layer_hessians(model, state.__getitem__, windows, diagonal=diagonal))
    assert len(calls) == (0 if diagonal else 1)


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
    layer, _head = capture_layer_hessians(skeleton, state.__getitem__, torch.randint(0, 97, (2, 8)))
    assert layer.samples["model.layers.0.unused.weight"] == 0
    assert torch.equal(layer.hessians["model.layers.0.unused.weight"], torch.zeros(5, 5))


@pytest.mark.parametrize(
    "config",
    [_config(attention_dropout=0.5), _gemma2_config()],
    ids=["dropout", "sliding-and-global-layers"],
)
def test_capture_matches_eval_forward_for_dropout_and_per_layer_masks(config):
    torch.manual_seed(0)
    model = perturb_vectors(AutoModelForCausalLM.from_config(config).eval())
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(2))
    reference = _reference_hessians(model, windows)
    layers = capture_layer_hessians(
        empty_model(config), model.state_dict().__getitem__, windows, batch_size=4
    )
    captured = set()
    for layer in layers:
        for weight_name, group in layer.groups.items():
            captured.add(weight_name)
            expected = reference[weight_name]
            torch.testing.assert_close(
                layer.hessians[group].double(),
                expected,
                rtol=1e-4,
                atol=1e-5 * expected.abs().max(),
            )
    assert captured == set(reference)  # Gemma2's head is tied: its Hessian is captured too
    assert "lm_head.weight" in captured
    assert any(name.endswith("layernorm.weight") for name in captured)  # and every norm's


class _DeviceRecorder(torch.nn.Module):
    """A stand-in block on a stand-in compute device: records where each batch arrives and
    answers 2 x its input rows (from a host copy: a meta batch carries no values)."""

    def __init__(self, inputs: torch.Tensor, batch_size: int):
        super().__init__()
        self.inputs, self.batch_size = inputs.clone(), batch_size
        self.devices: list[torch.device] = []

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        start = len(self.devices) * self.batch_size
        self.devices.append(hidden_states.device)
        assert hidden_states.shape[1:] == self.inputs.shape[1:]
        return (2 * self.inputs[start : start + len(hidden_states)],)


def _runner(full_model, windows: dict, batch_size: int = 4) -> _BlockRunner:
    state = full_model.state_dict()
    return _BlockRunner(empty_model(_config()), state.__getitem__, windows, "cpu", batch_size)


def _windows(samples: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 97, (samples, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("in_place", [True, False])
def test_batches_run_on_the_compute_device_while_the_activations_stay_on_the_host(
    full_model, in_place
):
    runner = _runner(full_model, {"a": _windows(10, 1)})
    runner.device = torch.device("meta")  # a compute device that is not the host
    hidden = runner.hidden["a"]
    original = hidden.clone()
    block = _DeviceRecorder(hidden, runner.batch_size)
    outputs = runner.run(_Block(0, "model.layers.0", block), "a", in_place=in_place)
    assert block.devices == [torch.device("meta")] * 3  # batches of 4, 4 and 2
    assert outputs.device == hidden.device == runner.hidden["a"].device == torch.device("cpu")
    torch.testing.assert_close(outputs, 2 * original, rtol=0, atol=0)
    assert (outputs is hidden) == in_place  # in place: the activations are held once
    assert torch.equal(runner.hidden["a"], outputs if in_place else original)


def test_recorded_hidden_states_go_to_the_host_as_each_batch_is_recorded():
    recorded, calls = [], []
    recorder = _ArgumentRecorder(
        torch.nn.Identity(), calls, last=False, hidden=recorded, host="meta"
    )
    batch = torch.randn(2, 3, 4)
    passed = recorder(batch, "mask", position=1)
    assert passed is batch  # the model goes on with it on the compute device
    assert [t.device for t in recorded] == [torch.device("meta")]
    assert recorded[0].shape == batch.shape and calls == [(("mask",), {"position": 1})]


def test_the_runner_keeps_every_task_on_the_host_and_says_how_much(full_model):
    runner = _runner(full_model, {"a": _windows(10, 1), "b": _windows(6, 2)})
    assert {task: h.device.type for task, h in runner.hidden.items()} == {"a": "cpu", "b": "cpu"}
    # [samples, seq_len, hidden_size] float32 activations per task.
    assert runner.activation_bytes == (10 + 6) * 16 * 32 * 4
    assert activation_bytes(10, 16, 32, torch.bfloat16) == 10 * 16 * 32 * 2
    # On the CPU nothing is copied: a block run in place writes into the same tensor.
    before = runner.hidden["a"]
    blocks = runner.blocks("layers", progress=False)
    assert runner.run(next(blocks), "a", in_place=True) is before
    blocks.close()


def test_resume_inputs_stay_on_the_host_and_are_overwritten_in_place(full_model):
    windows = _windows(6, 3)
    state = full_model.state_dict()
    skeleton = empty_model(_config())
    runs = list(capture_layer_hessians(skeleton, state.__getitem__, windows, batch_size=4))
    saved, outputs = [], []
    for _ in capture_layer_hessians(
        empty_model(_config()),
        state.__getitem__,
        windows,
        batch_size=4,
        block_done=lambda index, hidden: saved.append(hidden.clone()),
    ):
        pass
    resume = saved[0].clone()  # block 1's inputs
    resumed = list(
        capture_layer_hessians(
            empty_model(_config()),
            state.__getitem__,
            windows,
            batch_size=4,
            resume=(1, resume),
            block_done=lambda index, hidden: outputs.append(hidden),
        )
    )
    assert len(resumed) == 3 and all(hidden is resume for hidden in outputs)  # blocks 1, 2, head
    assert torch.equal(resume, saved[-1])  # the last block's outputs, written over the inputs
    for ours, theirs in zip(resumed, runs[1:], strict=True):
        assert all(torch.equal(ours.hessians[g], theirs.hessians[g]) for g in theirs.hessians)
    # Resumed past the last block (killed during the head's pass): only the head runs.
    (head,) = capture_layer_hessians(
        empty_model(_config()), state.__getitem__, windows, batch_size=4, resume=(3, saved[-1])
    )
    assert torch.equal(head.hessians["lm_head.weight"], runs[-1].hessians["lm_head.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_activations_stay_on_the_host_and_the_hessians_match_the_cpu(full_model):
    windows = {"a": _windows(10, 1)}
    state = full_model.state_dict()
    runner = _BlockRunner(empty_model(_config()), state.__getitem__, windows, "cuda", 4)
    assert runner.hidden["a"].device.type == "cpu"
    cpu = list(capture_layer_hessians(empty_model(_config()), state.__getitem__, windows["a"]))
    cuda = capture_layer_hessians(
        empty_model(_config()), state.__getitem__, windows["a"], device="cuda"
    )
    for ours, theirs in zip(cuda, cpu, strict=True):
        for group, expected in theirs.hessians.items():
            torch.testing.assert_close(ours.hessians[group].cpu(), expected, rtol=1e-3, atol=1e-4)
