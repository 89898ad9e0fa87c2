"""The pre-pass and the whole merge, in process, on tiny Llama models built by conftest."""

import gc
import json
import logging
import re
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergekit_sparsegpt.calibration.source import CalibrationError
from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.methods.context import activated
from mergekit_sparsegpt.methods.registry import plugin_method
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics
from mergekit_sparsegpt.prepass.plan import plan_tensors
from mergekit_sparsegpt.prepass.validate import validate_parameters
from mergekit_sparsegpt.statistics import entries, resumable
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics
from mergekit_sparsegpt.trim.metrics import REPORT_FILE

install()

DOWN = "model.layers.{}.mlp.down_proj.weight"


def _config(tiny_models, cache_dir: Path, method: str = "sparsegpt_ties", **shared) -> dict:
    return sparsegpt_config(
        tiny_models, method, **{"importance": "obs", **shared}, cache_dir=str(cache_dir)
    )


def _merge(config: dict, out: Path) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
    )


def _reference_ties(base, finetuned, statistics, density):
    """TIES on importance-trimmed task vectors, written out plainly (weights 1, normalize), its
    disjoint mean weighted by each model's input energy H_i[c, c] (``combine: energy``, the
    default)."""
    trimmed = []
    for tensor, stats in zip(finetuned, statistics, strict=True):
        tau = tensor - base
        scores = tau.square() / stats.inverse_diagonal.unsqueeze(0)
        k = max(1, int(density * tau.numel()))
        keep = torch.argsort(scores.flatten(), descending=True)[:k]
        mask = torch.zeros(tau.numel())
        mask[keep] = 1
        trimmed.append(tau * mask.reshape(tau.shape))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    energy = torch.stack([s.hessian_diagonal.expand_as(base) for s in statistics])
    energy = energy / energy.mean(0)  # relative to the models' mean, as the kernel scales it
    mixed = (stacked * agree * energy).sum(0)
    divisor = (agree * energy).sum(0)
    return base + mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def test_merge_loads_and_matches_reference(tiny_models, tmp_path):
    config = _config(tiny_models, tmp_path / "cache")
    _merge(config, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
    )
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(Path(tiny_models.base) / "model.safetensors")
    for layer in range(2):
        name = DOWN.format(layer)
        finetuned, statistics = [], []
        for (model, _calibration), task in sorted(context.tasks.items(), key=lambda kv: str(kv[0])):
            finetuned.append(load_file(Path(model.model.path) / "model.safetensors")[name])
            statistics.append(task.for_weight(name))
        expected = _reference_ties(base[name], finetuned, statistics, 0.3)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_second_merge_reuses_cache_without_forward_pass(tiny_models, tmp_path, monkeypatch):
    config = _config(tiny_models, tmp_path / "cache")
    _merge(config, tmp_path / "first")

    def no_forward(*args, **kwargs):
        raise AssertionError("the pre-pass ran again")

    monkeypatch.setattr(task_statistics, "compute_statistics", no_forward)
    for entry in config["models"]:
        entry["parameters"]["density"] = 0.7
        entry["parameters"]["weight"] = 0.5
    _merge(config, tmp_path / "second")
    assert (tmp_path / "second" / "model.safetensors").exists()


@pytest.mark.parametrize("spelling", ["relative", "symlink"])
def test_another_spelling_of_a_model_reuses_its_cache_entries(
    tiny_models, tmp_path, monkeypatch, spelling
):
    """Entries are keyed by where the model is, not by how the config writes it."""
    config = _config(tiny_models, tmp_path / "cache", hessian_source="finetuned")
    prepass.prepare_statistics(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    written = sorted((tmp_path / "cache").glob("*.safetensors"))
    for entry in config["models"]:
        path = Path(entry["model"])
        if spelling == "symlink":
            (tmp_path / f"link_{path.name}").symlink_to(path)
            entry["model"] = str(tmp_path / f"link_{path.name}")
        else:
            monkeypatch.chdir(path.parent)
            entry["model"] = f"./{path.name}"

    def no_forward(*args, **kwargs):
        raise AssertionError("the pre-pass ran again")

    monkeypatch.setattr(task_statistics, "compute_statistics", no_forward)
    prepass.prepare_statistics(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == written


def test_corrupt_cache_is_recomputed(tiny_models, tmp_path, caplog):
    config = _config(tiny_models, tmp_path / "cache")
    _merge(config, tmp_path / "first")
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        _merge(config, tmp_path / "second")
    assert "recomputing" in caplog.text
    first = load_file(tmp_path / "first" / "model.safetensors")
    second = load_file(tmp_path / "second" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert entries[0].read_bytes() != b"garbage"


def _set_first_model(config, **values):
    config["models"][0]["parameters"].update(values)


BAD_INPUTS = [
    (
        "missing file",
        lambda c: _set_first_model(c, calibration="./nope/missing.txt"),
        "file not found",
    ),
    ("short data", lambda c: c["parameters"].update(calibration_samples=100000), "gives only"),
    ("density", lambda c: _set_first_model(c, density=1.5), r"outside \[0, 1\]"),
    ("importance", lambda c: c["parameters"].update(importance="magnitude"), "Unknown importance"),
    (
        "no calibration",
        lambda c: c["models"][0]["parameters"].pop("calibration"),
        "has no 'calibration'",
    ),
    (
        "unknown key",
        lambda c: _set_first_model(c, calibraton="x.txt"),
        "Did you mean 'calibration'",
    ),
    ("source", lambda c: c["parameters"].update(hessian_source="mergd"), "hessian_source must be"),
    ("selection", lambda c: c["parameters"].update(selection="column"), "selection must be one"),
    ("sign source", lambda c: c["parameters"].update(sign_from="merged"), "sign_from must be one"),
    ("gradient", lambda c: c["parameters"].update(calibration_samples=[4, 8]), "one value"),
    ("samples", lambda c: c["parameters"].update(calibration_samples=0), "at least 1"),
    ("lambda", lambda c: c["parameters"].update({"lambda": float("nan")}), "lambda must be finite"),
    ("per-model setting", lambda c: _set_first_model(c, importance="obs"), "merge-wide setting"),
]


@pytest.mark.parametrize("label, damage, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_clear_error_and_no_output(tiny_models, tmp_path, label, damage, message):
    config = _config(tiny_models, tmp_path / "cache")
    damage(config)
    with pytest.raises((ValueError, CalibrationError), match=message):
        _merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_failure_during_merge_removes_partial_output(tiny_models, tmp_path, monkeypatch):
    from mergekit_sparsegpt.trim import trim

    calls = []

    def failing_after_a_few(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("interrupted")
        return original(*args, **kwargs)

    original = trim.importance_scores
    monkeypatch.setattr(trim, "importance_scores", failing_after_a_few)
    with pytest.raises(RuntimeError, match="interrupted"):
        _merge(_config(tiny_models, tmp_path / "cache"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, layer", [("finetuned", 1), ("base", 0)])
def test_slices_with_offsets_use_each_inputs_own_layer(tiny_models, tmp_path, source, layer):
    expert = str(tiny_models.experts[sorted(tiny_models.experts)[0]])
    calibration = str(tiny_models.calibration[sorted(tiny_models.experts)[0]])
    config = {
        "merge_method": "sparsegpt_ties",
        "base_model": str(tiny_models.base),
        "slices": [
            {
                "sources": [
                    {
                        "model": expert,
                        "layer_range": [1, 2],
                        "parameters": {"weight": 1.0, "density": 0.3, "calibration": calibration},
                    },
                    {"model": str(tiny_models.base), "layer_range": [0, 1]},
                ]
            }
        ],
        "parameters": {
            "calibration_samples": 8,
            "calibration_seq_len": 32,
            "importance": "obs",
            "hessian_source": source,
            "cache_dir": str(tmp_path / "cache"),
        },
        "dtype": "float32",
    }
    merge_config = MergeConfiguration.model_validate(config)
    context = prepass.prepare_statistics(merge_config, MergeOptions(quiet=True))
    (model,) = {key[0] for key in context.tasks}
    # The expert's layer 1 lands on output layer 0; the base's own layer 0 is what it replaces.
    assert context.hessian_inputs[DOWN.format(0)][model] == DOWN.format(layer)

    _merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")[DOWN.format(0)]
    base = load_file(Path(tiny_models.base) / "model.safetensors")[DOWN.format(0)]
    finetuned = load_file(Path(expert) / "model.safetensors")[DOWN.format(1)]
    (task,) = context.tasks.values()
    statistics = task.for_weight(DOWN.format(layer))
    expected = _reference_ties(base, [finetuned], [statistics], 0.3)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    wrong = _reference_ties(base, [finetuned], [task.for_weight(DOWN.format(1 - layer))], 0.3)
    assert not torch.allclose(wrong, expected)


def test_non_finite_activations_name_the_model(tiny_models, tmp_path):
    broken = tmp_path / "broken_expert"
    shutil.copytree(tiny_models.experts["code"], broken)
    weights = load_file(broken / "model.safetensors")
    weights[DOWN.format(0)][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    config = _config(tiny_models, tmp_path / "cache", hessian_source="finetuned")
    config["models"][0]["model"] = str(broken)
    config["models"][0]["parameters"]["calibration"] = str(tiny_models.calibration["code"])
    with pytest.raises(ValueError, match=f"Model {broken}.*non-finite"):
        _merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_is_a_clear_error(tiny_models, tmp_path):
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_models.experts["arithmetic"]) / name, bare / name)
    config = _config(tiny_models, tmp_path / "cache", hessian_source="finetuned")
    assert config["models"][0]["model"] == str(tiny_models.experts["arithmetic"])
    config["models"][0]["model"] = str(bare)  # in place of the model it copies
    with pytest.raises(ValueError, match=f"Could not load the tokenizer of model {bare}"):
        _merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compensated_merge_keeps_factors_and_serves_plain_merges(
    tiny_models, tmp_path, monkeypatch
):
    config = _config(tiny_models, tmp_path / "cache", compensate=True, importance="sparsegpt")
    _merge(config, tmp_path / "compensated")
    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
    )
    for task in context.tasks.values():
        factor = task.for_weight(DOWN.format(0)).cholesky_factor
        assert factor is not None and torch.equal(factor, factor.triu())

    def no_forward(*args, **kwargs):
        raise AssertionError("the pre-pass ran again")

    monkeypatch.setattr(task_statistics, "compute_statistics", no_forward)
    plain = _config(tiny_models, tmp_path / "cache", importance="sparsegpt")
    _merge(plain, tmp_path / "plain")
    compensated = load_file(tmp_path / "compensated" / "model.safetensors")[DOWN.format(0)]
    uncompensated = load_file(tmp_path / "plain" / "model.safetensors")[DOWN.format(0)]
    assert not torch.allclose(compensated, uncompensated)


def test_compensate_with_rescale_warns(tiny_models, tmp_path, caplog):
    config = _config(
        tiny_models, tmp_path / "cache", method="sparsegpt_dare", compensate=True, rescale=True
    )
    with caplog.at_level(logging.WARNING):
        prepass.prepare_statistics(
            MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
        )
    assert "scales them up again" in caplog.text


# --- whole matrices (RegMean, compensate): kept in the cache file and read per tensor ---

MATRIX_MERGES = {  # name -> (config, whole matrices per Hessian group)
    # keep_statistics: the per-task Grams, read at merge time (by default RegMean's pre-pass
    # caches the solved linears instead: tests/prepass/test_solving.py).
    "regmean": (
        lambda models, cache: regmean_config(models, cache_dir=str(cache), keep_statistics=True),
        1,
    ),
    "sparsegpt_regmean, compensate": (
        lambda models, cache: regmean_config(
            models, "sparsegpt_regmean", cache_dir=str(cache), compensate=True, keep_statistics=True
        ),
        1,  # H only: the re-fit's factor is derived from it
    ),
    "sparsegpt_ties, compensate": (
        lambda models, cache: _config(models, cache, compensate=True, importance="sparsegpt"),
        1,
    ),
}


def _tensors_reachable(root: object) -> list[torch.Tensor]:
    """Every tensor held by ``root`` through containers and this package's objects."""
    found, seen, pending = [], set(), [root]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            pending.extend(item)
        elif type(item).__module__.startswith("mergekit_sparsegpt"):
            pending.extend(vars(item).values())
    return found


def _eager(context):
    """``context`` as the pre-pass used to hold it: every task's whole matrices in memory, read
    with safetensors itself rather than through the lazy reader."""
    for key, task in context.tasks.items():
        with safe_open(task.matrices.path, "pt") as handle:
            metadata = handle.metadata()
        context.tasks[key] = TaskStatistics.from_tensors(load_file(task.matrices.path), metadata)
    return context


@pytest.mark.parametrize("merge", MATRIX_MERGES)
def test_lazy_reads_give_the_same_merge_as_matrices_in_memory(
    tiny_models, tmp_path, monkeypatch, merge
):
    make_config, per_group = MATRIX_MERGES[merge]
    config = make_config(tiny_models, tmp_path / "cache")
    _merge(config, tmp_path / "lazy")
    original = prepass.prepare_statistics
    eager_contexts = []

    def eager_prepass(*args, **kwargs):
        eager_contexts.append(_eager(original(*args, **kwargs)))
        return eager_contexts[-1]

    monkeypatch.setattr(prepass, "prepare_statistics", eager_prepass)
    _merge(config, tmp_path / "eager")
    (context,) = eager_contexts
    # The reference really held every whole matrix: 2 blocks of 4 groups and the head per task.
    matrices = sum(t.dim() == 2 for t in _tensors_reachable(context))
    assert matrices == len(context.tasks) * (2 * 4 + 1) * per_group
    lazy = load_file(tmp_path / "lazy" / "model.safetensors")
    eager = load_file(tmp_path / "eager" / "model.safetensors")
    assert lazy.keys() == eager.keys()
    assert all(torch.equal(lazy[name], eager[name]) for name in lazy)
    lazy_report = json.loads((tmp_path / "lazy" / REPORT_FILE).read_text())
    assert lazy_report == json.loads((tmp_path / "eager" / REPORT_FILE).read_text())


def _tracked(records: list[weakref.ref]) -> Callable[[torch.Tensor], int]:
    """Record a new matrix; return how many recorded matrices are alive, it included."""

    def track(matrix: torch.Tensor) -> int:
        gc.collect()
        records.append(weakref.ref(matrix))
        return sum(ref() is not None for ref in records)

    return track


@pytest.mark.parametrize("merge", MATRIX_MERGES)
def test_whole_matrices_in_memory_stay_bounded(tiny_models, tmp_path, monkeypatch, merge):
    make_config, per_group = MATRIX_MERGES[merge]
    config = MergeConfiguration.model_validate(make_config(tiny_models, tmp_path / "cache"))
    computed, read = [], []
    computed_alive, read_alive = [], []
    track_computed, track_read = _tracked(computed), _tracked(read)
    add, load = resumable.EntryWriter.add, entries.CachedMatrices._load

    def tracking_add(self, name, matrix):
        computed_alive.append(track_computed(matrix))
        add(self, name, matrix)

    def tracking_load(self, group):
        matrices = load(self, group)
        read_alive.extend(track_read(matrix) for matrix in matrices.values())
        return matrices

    monkeypatch.setattr(resumable.EntryWriter, "add", tracking_add)
    monkeypatch.setattr(entries.CachedMatrices, "_load", tracking_load)
    context = prepass.prepare_statistics(config, MergeOptions(quiet=True))
    tasks = len(context.tasks)
    block_groups = 4  # q/k/v, o, gate/up, down
    groups = 2 * block_groups + 1  # 2 blocks and the output head
    # The pre-pass: each matrix left memory once written (a factor U, computed per group) or
    # once its block was done (a kept H is the capture's own Gram, which lives as long as its
    # block's captured Hessians), and none came back.
    kept_grams = "regmean" in merge
    assert len(computed) == tasks * groups * per_group
    assert max(computed_alive) <= (block_groups if kept_grams else 1) * per_group
    gc.collect()
    assert not any(ref() for ref in computed) and not read
    assert [t.shape for t in _tensors_reachable(context) if t.dim() != 1] == []
    # The merge: every group is read once (q/k/v and gate/up share theirs), and each task
    # holds no more than its most recent groups.
    with activated(context):
        mergekit.merge.run_merge(config, str(tmp_path / "out"), MergeOptions(quiet=True))
    assert len(read) == tasks * groups * per_group
    assert max(read_alive) <= tasks * per_group * entries.RECENT_GROUPS < len(read)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
@pytest.mark.parametrize(
    "keep_statistics, names",
    [
        (True, r"Hessian statistics of model \S+ with calibration '\S+'"),
        # mergekit writes lm_head, then the embedding, then the blocks: the first read fails.
        (False, r"The solved linears of this merge, needed for (lm_head|model\.\S+)\.weight"),
    ],
)
def test_cache_entry_lost_during_the_merge_is_one_clear_error(
    tiny_models, tmp_path, monkeypatch, damage, keep_statistics, names
):
    config = regmean_config(
        tiny_models, cache_dir=str(tmp_path / "cache"), keep_statistics=keep_statistics
    )
    original = prepass.prepare_statistics

    def damaging_prepass(*args, **kwargs):
        context = original(*args, **kwargs)
        for path in (tmp_path / "cache").glob("*.safetensors"):
            if damage == "delete":
                path.unlink()
            else:
                path.write_bytes(path.read_bytes()[:-10])
        return context

    monkeypatch.setattr(prepass, "prepare_statistics", damaging_prepass)
    with pytest.raises(ValueError) as raised:
        _merge(config, tmp_path / "out")
    message = str(raised.value)
    assert re.search(names, message)
    assert re.search(re.escape(f"cache entry {tmp_path / 'cache'}/") + r"\w+\.safetensors", message)
    assert "Delete that cache entry and rerun the merge" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, compensates", [("sparsegpt_ties", False), ("sparsegpt_regmean", True)]
)
def test_default_compensation_per_method(tiny_models, tmp_path, method, compensates):
    """Measured defaults: re-fitting helps the RegMean solve, not sign election."""
    config = (
        regmean_config(tiny_models, method)
        if method == "sparsegpt_regmean"
        else _config(tiny_models, tmp_path / "cache", method=method)
    )
    planned = plan_tensors(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    settings = validate_parameters(planned, plugin_method(method))
    assert settings.keep_factors is compensates


@pytest.mark.parametrize("method", ["sparsegpt_ties", "regmean"])
def test_mergekit_memory_flags_give_the_same_merge(tiny_models, tmp_path, method):
    """--lazy-unpickle, --low-cpu-memory and --out-shard-size change how mergekit reads and
    writes, never what the plugin's kernels compute."""
    if method == "regmean":
        config = regmean_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    else:
        config = _config(tiny_models, tmp_path / "cache")
    outputs = {}
    for name, flags in (
        ("plain", {}),
        ("lazy", {"lazy_unpickle": True, "low_cpu_memory": True, "out_shard_size": 20_000}),
    ):
        out = tmp_path / name
        mergekit.merge.run_merge(
            MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **flags)
        )
        shards = sorted(out.glob("*.safetensors"))
        outputs[name] = {k: v for shard in shards for k, v in load_file(shard).items()}
        if name == "lazy":
            assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert set(outputs["plain"]) == set(outputs["lazy"])
    for key, value in outputs["plain"].items():
        assert torch.equal(outputs["lazy"][key], value), key
