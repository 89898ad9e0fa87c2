"""``hessian_source: merged`` (RegMean++): against a plain sequential reference, the cache, and
what it refuses."""

import os
import subprocess
import sys
from pathlib import Path

import mergekit.merge
import pytest
import torch
import yaml
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_sparsegpt.calibration.source import CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows
from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import merged_source as merged_statistics
from mergekit_sparsegpt.prepass import run as prepass
from tests.norm_reference import textbook_normalized

install()

F64 = torch.float64
# A Llama block's linears grouped by shared input, in forward order.
# Each block's units in forward order; a norm's scale is merged before the linears reading it.
STAGES = ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
STAGES += (("self_attn.o_proj",), "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
STAGES += (("mlp.down_proj",),)


def _run(config: dict, out: Path) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
    )


def _windows(tiny_models, name: str, config: dict) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    path = str(tiny_models.calibration[name])
    texts = read_calibration_texts(CalibrationSource(path), name)
    shared = config["parameters"]
    return calibration_windows(
        texts, tokenizer, shared["calibration_samples"], shared["calibration_seq_len"], name, path
    )


@torch.no_grad()
def _input_rows(model, windows: torch.Tensor, module_name: str) -> torch.Tensor:
    """Every token's input row of one module: a hook on a whole-model forward."""
    rows = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).to(F64))
    )
    try:
        model(input_ids=windows)
    finally:
        handle.remove()
    return torch.cat(rows)


def _input_gram(model, windows: torch.Tensor, module_name: str) -> torch.Tensor:
    """sum x x^T of one module's input over every token."""
    inputs = _input_rows(model, windows, module_name)
    return inputs.T @ inputs


@torch.no_grad()
def _regmean_plus_reference(
    tiny_models, config: dict, nongram_scale: float
) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """RegMean++ written plainly: whole models in memory; every linear and norm, in forward
    order, solved on every task's inputs *in the model merged so far*. Returns the merged
    weights and, per linear weight, every task's Gram matrix of its inputs."""
    names = sorted(tiny_models.experts)
    base = AutoModelForCausalLM.from_pretrained(tiny_models.base, dtype=torch.float32).eval()
    experts = [
        AutoModelForCausalLM.from_pretrained(tiny_models.experts[n], dtype=torch.float32)
        for n in names
    ]
    windows = [_windows(tiny_models, n, config) for n in names]
    merged = AutoModelForCausalLM.from_pretrained(tiny_models.base, dtype=torch.float32).eval()
    base_params = dict(base.named_parameters())
    expert_params = [dict(e.named_parameters()) for e in experts]
    for name, param in merged.named_parameters():
        tau_sum = sum(p[name] - base_params[name] for p in expert_params)
        param.copy_(base_params[name] + nongram_scale * tau_sum)  # all but biases replaced below
    embedding = "model.embed_tokens.weight"
    merged.get_parameter(embedding).copy_(
        _count_rule(base_params[embedding], [p[embedding] for p in expert_params], windows)
    )
    all_grams = {}

    def solve(module: str) -> None:
        grams = [_input_gram(merged, w, module) for w in windows]
        weight = f"{module}.weight"
        all_grams[weight] = grams
        numerator = sum(
            (p[weight] - base_params[weight]).to(F64) @ g
            for p, g in zip(expert_params, grams, strict=True)
        )
        delta = numerator @ torch.linalg.inv(sum(grams))
        merged.get_parameter(weight).copy_(base_params[weight] + delta)

    def solve_norm(module: str) -> None:
        """Per channel, each task weighted by its energy sum_t x_hat^2 in the merged model."""
        inputs = [_input_rows(merged, w, module) for w in windows]
        energies = [
            textbook_normalized(merged.get_submodule(module), x).square().sum(0) for x in inputs
        ]
        weight = f"{module}.weight"
        result = base_params[weight].clone().to(F64)
        for channel in range(len(result)):
            total = sum(float(e[channel]) for e in energies)
            for p, e in zip(expert_params, energies, strict=True):
                tau = float(p[weight][channel] - base_params[weight][channel])
                result[channel] += float(e[channel]) / total * tau
        merged.get_parameter(weight).copy_(result)

    for layer in range(base.config.num_hidden_layers):
        for stage in STAGES:
            if isinstance(stage, str):
                solve_norm(f"model.layers.{layer}.{stage}")
            for linear in stage if isinstance(stage, tuple) else ():
                solve(f"model.layers.{layer}.{linear}")
    solve_norm("model.norm")
    solve("lm_head")  # last: its input is the merged final norm's output
    weights = {name: p.detach().clone() for name, p in merged.named_parameters()}
    return weights, all_grams


def _count_rule(
    base: torch.Tensor, experts: list[torch.Tensor], windows: list[torch.Tensor]
) -> torch.Tensor:
    """Each embedding row: the experts' task vectors weighted by their count of that token in
    their own windows, plus the smoothing 0.5, counted in a loop."""
    result = base.clone()
    counts = [[0] * len(base) for _ in experts]
    for expert_counts, task_windows in zip(counts, windows, strict=True):
        for token in task_windows.flatten().tolist():
            expert_counts[token] += 1
    for token in range(len(base)):
        row_weights = [c[token] + 0.5 for c in counts]
        for weight, expert in zip(row_weights, experts, strict=True):
            result[token] += weight / sum(row_weights) * (expert[token] - base[token])
    return result


def _output_norm(difference: torch.Tensor, grams: list[torch.Tensor]) -> float:
    """sqrt(sum_i ||X_i D^T||^2) from the Gram matrices G_i = X_i^T X_i."""
    d = difference.to(F64)
    return sum(torch.trace(d @ g @ d.T) for g in grams).sqrt().item()


def test_merge_equals_a_plain_sequential_regmean_plus_plus(tiny_models, tmp_path):
    config = regmean_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    config["parameters"]["hessian_source"] = "merged"
    config["parameters"]["norm_rule"] = "energy"  # the norms' solve, merged before their readers
    _run(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected, grams = _regmean_plus_reference(tiny_models, config, nongram_scale=0.2)
    base = load_file(Path(tiny_models.base) / "model.safetensors")
    assert set(merged) == set(expected)
    for name, value in expected.items():
        if name not in grams:  # embedding, norms: their rules, checked entry by entry
            torch.testing.assert_close(merged[name], value, msg=name)
            continue
        # Some Gram matrices are ill-conditioned (o_proj's: ~1e7), so float32 accumulation moves
        # the weights along directions the inputs barely use: compare what the inputs see. The
        # worst linear is off by 1.15e-3 of its task vector's effect (layer 1's o_proj).
        error = _output_norm(merged[name] - value, grams[name])
        assert error <= 2e-3 * _output_norm(value - base[name], grams[name]), name

    # The check tells the two apart: ordinary RegMean (each expert's own inputs) is far off.
    plain = dict(config, parameters={**config["parameters"], "hessian_source": "finetuned"})
    _run(plain, tmp_path / "plain")
    ordinary = load_file(tmp_path / "plain" / "model.safetensors")
    for name in grams:
        error = _output_norm(ordinary[name] - expected[name], grams[name])
        assert error > 1e-2 * _output_norm(expected[name] - base[name], grams[name]), name


def test_cached_rerun_captures_nothing_and_another_parameter_recomputes(
    tiny_models, tmp_path, monkeypatch
):
    calls = []
    original = merged_statistics.capture_merged_hessians

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(merged_statistics, "capture_merged_hessians", counting)
    config = regmean_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    config["parameters"]["hessian_source"] = "merged"
    _run(config, tmp_path / "first")
    _run(config, tmp_path / "second")
    assert len(calls) == 1
    first = load_file(tmp_path / "first" / "model.safetensors")
    second = load_file(tmp_path / "second" / "model.safetensors")
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)
    # The merged model, hence every task's inputs, depends on nongram_scale: a new entry.
    config["parameters"]["nongram_scale"] = 0.1
    _run(config, tmp_path / "third")
    assert len(calls) == 2


def test_sparsegpt_regmean_runs_with_merged_hessians(tiny_models, tmp_path):
    config = regmean_config(tiny_models, "sparsegpt_regmean", cache_dir=str(tmp_path / "c"))
    config["parameters"]["hessian_source"] = "merged"
    config["parameters"]["norm_rule"] = "energy"  # the norms' solve, merged before their readers
    _run(config, tmp_path / "out")
    logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(
        input_ids=torch.tensor([[1, 2, 3, 4]])
    ).logits
    assert torch.isfinite(logits).all()


def test_merged_source_is_refused_for_the_trimming_methods(tiny_models, tmp_path):
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    config["parameters"]["hessian_source"] = "merged"
    with pytest.raises(ValueError, match="RegMean\\+\\+.*not sparsegpt_ties"):
        prepass.prepare_statistics(
            MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
        )
    assert not (tmp_path / "cache").exists()


def test_merged_source_is_refused_under_layer_offsets(tiny_models, tmp_path):
    expert = str(tiny_models.experts[sorted(tiny_models.experts)[0]])
    calibration = str(tiny_models.calibration[sorted(tiny_models.experts)[0]])
    config = {
        "merge_method": "regmean",
        "base_model": str(tiny_models.base),
        "slices": [
            {
                "sources": [
                    {"model": str(tiny_models.base), "layer_range": [0, 1]},
                    {
                        "model": expert,
                        "layer_range": [1, 2],
                        "parameters": {"weight": 1.0, "calibration": calibration},
                    },
                ]
            }
        ],
        "parameters": {
            "calibration_samples": 8,
            "calibration_seq_len": 32,
            "hessian_source": "merged",
        },
        "dtype": "float32",
    }
    with pytest.raises(ValueError, match="slices with layer offsets"):
        prepass.prepare_statistics(
            MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
        )


# A calibrate run that, once in its joint pass (holding the entries' locks), waits for the file
# argv[2] to exist before it goes on.
_HELD_CALIBRATE = """
import os, sys, time
from mergekit_sparsegpt.prepass import merged_source as merged_statistics
original = merged_statistics.capture_merged_hessians
def held(*args, **kwargs):
    print("COMPUTING", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    return original(*args, **kwargs)
merged_statistics.capture_merged_hessians = held
from mergekit_sparsegpt.integration.cli import main
main(["calibrate", sys.argv[1]])
"""


def test_two_runs_sharing_a_cache_compute_the_merged_statistics_once(tiny_models, tmp_path):
    # Every task's entry (keep_statistics), all computed by one process under their locks.
    config = regmean_config(
        tiny_models, hessian_source="merged", cache_dir=str(tmp_path / "c"), keep_statistics=True
    )
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    command = [sys.executable, "-c", _HELD_CALIBRATE, str(config_path), str(go)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    first = subprocess.Popen(command, env=env, **pipes)
    assert first.stdout.readline().strip() == "COMPUTING"  # it holds the locks now
    second = subprocess.Popen(command, env=env, **pipes)
    waited = []
    for line in second.stderr:
        waited.append(line)
        if "Waiting for" in line:
            break
    go.touch()
    first_out, first_err = first.communicate(timeout=600)
    second_out, second_err = second.communicate(timeout=600)
    second_err = "".join(waited) + second_err
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 0, second_err[-3000:]
    assert "another process is computing RegMean++ statistics" in second_err
    assert "COMPUTING" not in second_out
    assert second_err.count("(merged model) from cache") == 2
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "c").glob("*.lock"))
