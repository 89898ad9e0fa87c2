"""RegMean (``regmean``, ``sparsegpt_regmean``): the solve against least squares and a plain
formula, singular systems, the nongram rule, trim-then-solve, the pre-pass, the cache."""

import json
import math
from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import TensorGroup
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.methods.solve import solve_right
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics
from mergekit_sparsegpt.trim.compensation import compensated_trim
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

install()

LINEAR = "model.layers.0.mlp.down_proj.weight"
ROWS, COLUMNS, SAMPLES = 5, 6, 40
WEIGHTS = {"a": 1.0, "b": 0.5}
F64 = torch.float64


def _inputs(seed: int, samples: int = SAMPLES, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """Calibration inputs X [samples, COLUMNS]: correlated columns of unequal scale."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(COLUMNS, dtype=F64) + 0.8 * torch.randn(
        COLUMNS, COLUMNS, generator=generator, dtype=F64
    )
    inputs = torch.randn(samples, COLUMNS, generator=generator, dtype=F64) @ mixing
    inputs[:, list(dead)] = 0
    return inputs


def _task(inputs: torch.Tensor, **keep: bool) -> TaskStatistics:
    """One task whose Hessian is the pre-pass's (2/n) X^T X of ``inputs``."""
    task = TaskStatistics.empty("model.layers")
    task.groups[LINEAR] = LINEAR
    hessian = (2 / len(inputs) * inputs.T @ inputs).float()
    task.statistics[LINEAR] = hessian_statistics(hessian, keep_hessian=True, **keep)
    task.samples[LINEAR] = len(inputs)
    task.linear_suffixes = frozenset({"mlp.down_proj.weight"})
    return task


def _context(inputs: dict[str, torch.Tensor], **keep: bool) -> MergeContext:
    tasks = {(model, f"{model}.txt"): _task(x, **keep) for model, x in inputs.items()}
    return MergeContext(hessian_inputs={}, tasks=tasks)


def _group(name: str = LINEAR, shape: tuple[int, ...] = (ROWS, COLUMNS)) -> TensorGroup:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=generator)
    tensors = [base] + [base + 0.1 * torch.randn(*shape, generator=generator) for _ in WEIGHTS]
    return TensorGroup.from_tensors(tensors, ids=["base", *WEIGHTS], base_index=0, name=name)


def _parameters(**overrides):
    parameters = {"weight": WEIGHTS, "calibration": {m: f"{m}.txt" for m in WEIGHTS}}
    return parameters | overrides


def _merge(method: str, context: MergeContext, group: TensorGroup, **parameters) -> torch.Tensor:
    with activated(context):
        (merged,) = merge_methods.get(method)([group], parameters=_parameters(**parameters))
    return merged


def _grams(context: MergeContext) -> dict[str, torch.Tensor]:
    return {
        model: task.statistics[LINEAR].hessian.to(F64) for (model, _), task in context.tasks.items()
    }


def _reference(base, task_vectors, grams, alpha, lam):
    """base + lam (sum_i w_i tau_i G~_i) (sum_i w_i G~_i)^-1, written out in float64."""
    numerator = torch.zeros(base.shape, dtype=F64)
    denominator = torch.zeros(COLUMNS, COLUMNS, dtype=F64)
    for model, tau in task_vectors.items():
        gram = grams[model]
        regularised = alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram))
        numerator += WEIGHTS[model] * tau.to(F64) @ regularised
        denominator += WEIGHTS[model] * regularised
    return base.to(F64) + lam * numerator @ torch.linalg.inv(denominator)


def _task_vectors(group: TensorGroup) -> dict[str, torch.Tensor]:
    return {entry.id: entry.tensor - group.base.tensor for entry in group.non_base}


def _least_squares(inputs: dict[str, torch.Tensor], group: TensorGroup) -> torch.Tensor:
    """argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2, by lstsq on the stacked system.

    Solved for the task vector W - W_base, so where the system is rank-deficient the
    minimum-norm answer (gelsd) leaves the base weight unchanged along the unseen directions.
    """
    taus = _task_vectors(group)
    design = torch.cat([math.sqrt(WEIGHTS[m]) * x for m, x in inputs.items()])
    targets = torch.cat([math.sqrt(WEIGHTS[m]) * x @ taus[m].to(F64).T for m, x in inputs.items()])
    solution = torch.linalg.lstsq(design, targets, driver="gelsd").solution.T
    return group.base.tensor.to(F64) + solution


def test_alpha_one_is_least_squares_on_the_stacked_inputs():
    inputs = {"a": _inputs(1), "b": _inputs(2)}
    context, group = _context(inputs), _group()
    merged = _merge("regmean", context, group, alpha=1.0)
    expected = _least_squares(inputs, group)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-4, atol=1e-5)
    # A plain weighted average is far from it, so the comparison can fail.
    average = sum(WEIGHTS[e.id] * e.tensor for e in group.non_base) / sum(WEIGHTS.values())
    assert not torch.allclose(average.to(F64), expected, atol=1e-3)
    assert context.report[LINEAR]["solve"] == {"path": "cholesky", "damping": 0.0}
    assert context.usage[("regmean", "tensors")] == 1


@pytest.mark.parametrize("alpha, lam", [(0.0, 1.0), (0.5, 0.7), (0.9, 1.0)])
def test_regularised_solve_equals_the_plain_formula(alpha, lam):
    context, group = _context({"a": _inputs(1), "b": _inputs(2)}), _group()
    merged = _merge("regmean", context, group, alpha=alpha, **{"lambda": lam})
    expected = _reference(group.base.tensor, _task_vectors(group), _grams(context), alpha, lam)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_a_per_column_hessian_weighted_average():
    context, group = _context({"a": _inputs(3), "b": _inputs(4)}), _group()
    merged = _merge("regmean", context, group, alpha=0.0)
    grams, taus = _grams(context), _task_vectors(group)
    expected = group.base.tensor.to(F64).clone()
    for column in range(COLUMNS):
        shares = {m: WEIGHTS[m] * grams[m][column, column] for m in taus}
        total = sum(shares.values())
        expected[:, column] += sum(shares[m] * taus[m][:, column] for m in taus) / total
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-6)


def test_column_dead_in_every_model_is_damped_and_keeps_the_base():
    inputs = {"a": _inputs(1, dead=(5,)), "b": _inputs(2, dead=(5,))}
    context, group = _context(inputs), _group()
    merged = _merge("regmean", context, group, alpha=1.0)
    assert context.report[LINEAR]["solve"]["path"] == "damped"
    assert torch.isfinite(merged).all()
    # No input reaches column 5: no evidence to move it, so the base value stays, exactly.
    assert torch.equal(merged[:, 5], group.base.tensor[:, 5])
    live = {m: x[:, :5] for m, x in inputs.items()}
    sliced = TensorGroup.from_tensors(
        [e.tensor[:, :5] for e in group.entries], ids=[e.id for e in group.entries], base_index=0
    )
    torch.testing.assert_close(
        merged[:, :5].to(F64), _least_squares(live, sliced), rtol=1e-3, atol=1e-4
    )


def test_fewer_samples_than_columns_is_handled_and_fits_the_calibration_outputs():
    inputs = {"a": _inputs(1, samples=2), "b": _inputs(2, samples=2)}  # rank 4 of 6
    context, group = _context(inputs), _group()
    merged = _merge("regmean", context, group, alpha=1.0)
    assert context.report[LINEAR]["solve"]["path"] in ("damped", "pinv")
    assert torch.isfinite(merged).all()
    # Close to the minimum-norm least-squares task vector, not to an arbitrary solution.
    torch.testing.assert_close(merged.to(F64), _least_squares(inputs, group), rtol=1e-2, atol=1e-3)


def test_linear_that_never_ran_takes_the_pseudo_inverse_and_keeps_the_base():
    zeros = torch.zeros(SAMPLES, COLUMNS, dtype=F64)
    context, group = _context({"a": zeros, "b": zeros}), _group()
    merged = _merge("regmean", context, group, alpha=0.9)
    assert context.report[LINEAR]["solve"]["path"] == "pinv"
    assert torch.equal(merged, group.base.tensor)


def test_indefinite_system_falls_back_to_the_pseudo_inverse():
    generator = torch.Generator().manual_seed(5)
    lhs = -torch.eye(4, dtype=F64) * 3 + 0.1 * torch.ones(4, 4, dtype=F64)
    rhs = torch.randn(2, 4, generator=generator, dtype=F64)
    solve = solve_right(rhs, lhs)
    assert solve.path == "pinv"
    torch.testing.assert_close(solve.delta @ lhs, rhs)


def _trimmed(tau, stats, density, importance):
    """Top-k of tau^2 x column weight, written out: wanda H_cc, obs 1 / [H^-1]_cc."""
    column = (
        stats.hessian_diagonal if importance == "wanda" else stats.inverse_diagonal.reciprocal()
    )
    scores = (tau.float().square() * column).flatten().tolist()
    k = max(1, int(density * tau.numel()))
    keep = sorted(range(tau.numel()), key=lambda i: (-scores[i], i))[:k]
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[keep] = True
    return mask.reshape(tau.shape)


@pytest.mark.parametrize("importance", ["wanda", "obs"])
@pytest.mark.parametrize("compensate", [False, True])
def test_sparsegpt_regmean_is_trim_then_solve(importance, compensate):
    context = _context({"a": _inputs(1), "b": _inputs(2)}, keep_factor=compensate)
    group = _group()
    density = {"a": 0.4, "b": 0.6}
    options = {"importance": importance, "selection": "tensor", "compensate": compensate}
    merged = _merge("sparsegpt_regmean", context, group, alpha=0.8, density=density, **options)
    trimmed = {}
    for model, tau in _task_vectors(group).items():
        stats = context.tasks[(model, f"{model}.txt")].statistics[LINEAR]
        mask = _trimmed(tau, stats, density[model], importance)
        trimmed[model] = (
            compensated_trim(tau, stats.upper_factor(), mask) if compensate else tau * mask
        )
    expected = _reference(group.base.tensor, trimmed, _grams(context), 0.8, 1.0)
    torch.testing.assert_close(merged.to(F64), expected, rtol=1e-5, atol=1e-6)
    untrimmed = _reference(group.base.tensor, _task_vectors(group), _grams(context), 0.8, 1.0)
    assert not torch.allclose(expected, untrimmed, atol=1e-3)
    assert set(context.report[LINEAR]["models"]) == {"a", "b"}  # trim report entries


@pytest.mark.parametrize("method", ["regmean", "sparsegpt_regmean"])
@pytest.mark.parametrize(
    "name, shape",
    [("model.embed_tokens.weight", (9, 4)), ("model.layers.0.input_layernorm.weight", (5,))],
)
def test_tensors_without_hessian_get_scaled_task_arithmetic_bit_for_bit(method, name, shape):
    context, group = _context({"a": _inputs(1), "b": _inputs(2)}), _group(name, shape)
    merged = _merge(method, context, group, nongram_scale=0.15, **{"lambda": 3.0})
    base = group.base.tensor
    summed = torch.stack([(e.tensor - base) * WEIGHTS[e.id] for e in group.non_base]).sum(0)
    assert torch.equal(merged, base + summed * 0.15)  # lambda does not apply
    (stock,) = merge_methods.get("task_arithmetic")(
        [group], parameters={"weight": WEIGHTS, "lambda": 0.15}
    )
    assert torch.equal(merged, stock)
    assert context.usage[("fallback", "tensors")] == 1
    kind = "other matrix" if len(shape) == 2 else "norm or scale"  # no roles in this context
    assert context.report[name] == {"path": "fallback", "kind": kind, "models": {}}


def test_statistics_without_the_whole_hessian_are_a_clear_error():
    task = _task(_inputs(1))
    task.statistics[LINEAR] = hessian_statistics(task.statistics[LINEAR].hessian)
    context = _context({"b": _inputs(2)})
    context.tasks[("a", "a.txt")] = task
    with pytest.raises(ValueError, match=f"{LINEAR} of model a: RegMean needs the whole Hessian"):
        _merge("regmean", context, _group())


def test_parameters_and_defaults():
    specs = {
        method: {p.name: p for p in merge_methods.get(method).spec.parameters}
        for method in ("regmean", "sparsegpt_regmean")
    }
    for method, spec in specs.items():
        defaults = {name: spec[name].default for name in ("weight", "alpha", "lambda")}
        assert defaults == {"weight": 1.0, "alpha": 1.0, "lambda": 1.0}, method
        assert spec["nongram_scale"].default == 0.2
        assert {"calibration", "cache_dir", "dampening"} <= set(spec)
        assert not {"rescale", "normalize", "sign_from", "int8_mask"} & set(spec)
    assert not {"density", "importance", "selection", "compensate"} & set(specs["regmean"])
    assert {"density", "importance", "selection", "compensate"} <= set(specs["sparsegpt_regmean"])


# --- through mergekit's run_merge, on the tiny models of conftest ---

DOWN = "model.layers.{}.mlp.down_proj.weight"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def _run(config: dict, out: Path) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
    )


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


def test_merge_matches_reference_and_reports_each_path(tiny_models, tmp_path):
    # keep_statistics: the context then holds each task's Grams, which the reference reads
    # (the default's solved linears give the same merge: tests/prepass/test_solving.py).
    config = regmean_config(
        tiny_models,
        cache_dir=str(tmp_path / "cache"),
        alpha=0.7,
        keep_statistics=True,
        norm_rule="energy",  # the default (mean) is checked in tests/scenarios
    )
    _run(config, tmp_path / "out")
    logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(
        input_ids=torch.tensor([[1, 2, 3, 4]])
    ).logits
    assert torch.isfinite(logits).all()

    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
    )
    merged, base = _weights(tmp_path / "out"), _weights(tiny_models.base)
    finetuned = {str(model): _weights(model.model.path) for model, _ in context.tasks}
    name = DOWN.format(1)
    taus, grams = {}, {}
    for (model, _), task in context.tasks.items():
        taus[str(model)] = finetuned[str(model)][name] - base[name]
        grams[str(model)] = task.for_weight(name).hessian.to(F64)
    numerator = sum(
        tau.to(F64) @ (0.7 * g + 0.3 * torch.diag(torch.diag(g)))
        for tau, g in zip(taus.values(), grams.values(), strict=True)
    )
    denominator = sum(0.7 * g + 0.3 * torch.diag(torch.diag(g)) for g in grams.values())
    expected = base[name].to(F64) + numerator @ torch.linalg.inv(denominator)
    torch.testing.assert_close(merged[name].to(F64), expected, rtol=1e-4, atol=1e-5)
    # The embedding: per row, each task weighted by its count of that token (+ 0.5), in loops.
    counts = {str(model): task.token_counts for (model, _), task in context.tasks.items()}
    expected_embedding = base[EMBED].clone().to(F64)
    for token in range(len(expected_embedding)):
        row_weights = {m: float(counts[m][token]) + 0.5 for m in finetuned}
        total = sum(row_weights.values())
        for m, weight in row_weights.items():
            tau = (finetuned[m][EMBED][token] - base[EMBED][token]).to(F64)
            expected_embedding[token] += weight / total * tau
    torch.testing.assert_close(merged[EMBED].to(F64), expected_embedding, rtol=1e-5, atol=1e-6)
    assert any(float(c.max()) > 0 for c in counts.values())
    # The head: a linear like the others, its Gram taken on the final norm's output.
    head_taus = [finetuned[m][HEAD] - base[HEAD] for m in finetuned]
    head_grams = [task.for_weight(HEAD).hessian.to(F64) for task in context.tasks.values()]
    solution = torch.linalg.lstsq(
        sum(0.7 * g + 0.3 * torch.diag(torch.diag(g)) for g in head_grams),
        sum(
            (0.7 * g + 0.3 * torch.diag(torch.diag(g))) @ tau.to(F64).T
            for tau, g in zip(head_taus, head_grams, strict=True)
        ),
    ).solution.T
    torch.testing.assert_close(
        merged[HEAD].to(F64), base[HEAD].to(F64) + solution, rtol=1e-4, atol=1e-5
    )

    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())["tensors"]
    assert set(report) == set(merged)
    assert report[name]["path"] == "regmean"
    assert report[name]["solve"]["path"] in ("cholesky", "damped", "pinv")
    assert report[name]["kind"] == "decoder linear"
    assert (report[EMBED]["path"], report[EMBED]["kind"]) == ("tokens", "token embedding")
    assert (report[HEAD]["path"], report[HEAD]["kind"]) == ("regmean", "output head")
    # Every norm: per channel, each task weighted by its energy of that channel, in loops.
    norms, differs = [n for n in merged if n.endswith("norm.weight")], []
    assert "model.norm.weight" in norms and "model.layers.1.input_layernorm.weight" in norms
    for norm in norms:
        energies = {
            str(m): t.for_weight(norm).hessian_diagonal for (m, _), t in context.tasks.items()
        }
        expected_norm = base[norm].clone().to(F64)
        for channel in range(len(expected_norm)):
            total = sum(float(e[channel]) for e in energies.values())
            for m, energy in energies.items():
                tau = float(finetuned[m][norm][channel] - base[norm][channel])
                expected_norm[channel] += float(energy[channel]) / total * tau
        torch.testing.assert_close(merged[norm].to(F64), expected_norm, rtol=1e-5, atol=1e-6)
        assert (report[norm]["path"], report[norm]["kind"]) == ("norm", "norm or scale")
        assert report[norm]["rule"] == "energy"
        plain_mean = base[norm].to(F64) + sum(
            (finetuned[m][norm] - base[norm]).to(F64) for m in finetuned
        ) / len(finetuned)
        differs.append(not torch.allclose(expected_norm, plain_mean, rtol=1e-4, atol=1e-5))
    assert any(differs)  # the energies weigh the tasks differently than a plain mean


def test_cache_entry_with_hessians_serves_a_trim_only_merge_but_not_the_reverse(
    tiny_models, tmp_path, monkeypatch
):
    computed = []
    original = task_statistics.compute_statistics

    def counting(*args, **kwargs):
        computed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(task_statistics, "compute_statistics", counting)
    cache = str(tmp_path / "cache")
    # Same forward models as RegMean's default, so only what is kept differs.
    _run(
        sparsegpt_config(tiny_models, cache_dir=cache, hessian_source="finetuned"),
        tmp_path / "ties_first",
    )
    assert len(computed) == 2
    _run(regmean_config(tiny_models, cache_dir=cache, keep_statistics=True), tmp_path / "regmean")
    assert len(computed) == 4  # the ties entries lack the Hessians
    other = str(tmp_path / "cache2")
    kept = regmean_config(tiny_models, "sparsegpt_regmean", cache_dir=other, keep_statistics=True)
    _run(kept, tmp_path / "sr")
    assert len(computed) == 6
    _run(
        sparsegpt_config(tiny_models, cache_dir=other, hessian_source="finetuned"),
        tmp_path / "ties_second",
    )
    assert len(computed) == 6  # served by the entries holding Hessians
    # The first read diag H accumulated alone, the second the whole H's diagonal: equal up to
    # float rounding (the kept entries: tests/prepass/test_prepass_task_statistics.py).
    first, second = _weights(tmp_path / "ties_first"), _weights(tmp_path / "ties_second")
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=1e-4, atol=1e-6, msg=name)
