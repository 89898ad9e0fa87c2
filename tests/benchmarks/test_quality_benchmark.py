"""Unit tests of the quality benchmark (benchmarks/quality): data, scoring, grid, report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.quality import grid, report, tasks
from benchmarks.quality.outliers import spread_input_channels
from benchmarks.quality.scoring import make_qa_set, qa_batch, qa_scores
from mergekit_sparsegpt.demo.build import Family
from mergekit_sparsegpt.demo.merges import MergeFailed
from mergekit_sparsegpt.demo.tiny import new_model, tiny_llama_config, train_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", ["add", "sort", "rev"])
def test_generated_splits_are_disjoint_and_deterministic(task: str) -> None:
    splits = {s: {p for p, _ in tasks.qa_problems(task, s)} for s in tasks.SPLITS}
    for i, first in enumerate(tasks.SPLITS):
        for second in tasks.SPLITS[i + 1 :]:
            assert not splits[first] & splits[second], (first, second)
    # Hessians and hyperparameter choice get equal shares of the corpus' calibration problems.
    assert len(splits["calibration"]) == len(splits["validation"]) > 0
    assert tasks.qa_problems(task, "heldout")[:3] == tasks.qa_problems(task, "heldout")[:3]


def test_text_domains_split_calibration_documents_into_disjoint_halves() -> None:
    prose = tasks.domains()["prose"]
    calibration, validation = prose.texts("calibration"), prose.texts("validation")
    assert calibration and validation and not set(calibration) & set(validation)
    assert set(prose.texts("heldout")).isdisjoint(calibration + validation)
    with pytest.raises(ValueError, match="unknown split"):
        prose.texts("test")


def test_each_task_has_its_own_prompt_form() -> None:
    words = {t: tasks.qa_problems(t, "train")[0][0].split()[0] for t in ("add", "sort", "rev")}
    assert words == {"add": "add", "sort": "sort", "rev": "rev"}
    prompt, answer = tasks.qa_problems("sort", "train")[0]
    assert answer == "".join(sorted(prompt[5:-1]))
    prompt, answer = tasks.qa_problems("rev", "train")[0]
    assert answer == prompt[4:-1][::-1]


def test_strip_troff_keeps_text_and_drops_markup() -> None:
    source = '.\\" comment\n.TH LS 1\n.SH BESCHREIBUNG\nListe \\fBalle\\fP Dateien\\-Namen\n.PP\n'
    assert tasks.strip_troff(source) == "BESCHREIBUNG\nListe alle Dateien-Namen"


def _tiny_model_and_tokenizer():
    tokenizer = train_tokenizer(tasks.qa_texts("sort", "train")[:50], 300)
    config = tiny_llama_config(len(tokenizer), hidden=32, layers=1, heads=2, kv_heads=1)
    return new_model(config, seed=0).eval(), tokenizer


def test_qa_set_scores_exactly_the_answer_tokens() -> None:
    _, tokenizer = _tiny_model_and_tokenizer()
    domain = tasks.domains()["sort"]
    qa = make_qa_set(tokenizer, domain, 5)
    for row, (_, answer) in enumerate(domain.problems("heldout")[:5]):
        assert tokenizer.decode(qa.targets[row][qa.mask[row]]) == answer + "\n"


@torch.no_grad()
def test_teacher_forced_exact_match_equals_greedy_decoding() -> None:
    """A reply equal to the model's own greedy continuation scores 1; one wrong token, 0."""
    model, _ = _tiny_model_and_tokenizer()
    contexts = [[1, 5 + i, 9, 7 + 2 * i] for i in range(6)]
    greedy = []
    for context in contexts:
        seq = torch.tensor([context])
        for _ in range(3):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
        greedy.append(seq[0, len(context) :].tolist())
    assert qa_scores(model, qa_batch(list(zip(contexts, greedy, strict=True))))[1] == 1.0
    wrong = [g[:2] + [(g[2] + 1) % 300] for g in greedy]
    assert qa_scores(model, qa_batch(list(zip(contexts, wrong, strict=True))))[1] == 0.0


def _family(n: int) -> Family:
    names = [f"e{i}" for i in range(n)]
    return Family(
        root=Path("/f"),
        base=Path("/f/base"),
        experts={e: Path(f"/f/{e}") for e in names},
        calibration={e: Path(f"/f/{e}.txt") for e in names},
        tokenizer=Path("/f/tok"),
    )


def test_plan_runs_density_free_methods_once_and_random_ones_per_seed() -> None:
    variants = {k: grid.VARIANTS[k] for k in ("task_arithmetic", "ties", "dare_ties")}
    jobs = grid.plan(variants, (0.1, 0.3))
    assert sum(j.variant == "task_arithmetic" for j in jobs) == 1
    assert sum(j.variant == "ties" for j in jobs) == 2
    assert sum(j.variant == "dare_ties" for j in jobs) == 2 * len(grid.SEEDS)
    assert len({j.slug for j in grid.plan(grid.VARIANTS, grid.DENSITIES)}) == len(
        grid.plan(grid.VARIANTS, grid.DENSITIES)
    )


def test_merge_config_weights_density_and_calibration() -> None:
    calibration = grid.Calibration(32, 64, Path("/cache"))
    family = _family(4)
    ours = grid.merge_config(grid.VARIANTS["sparsegpt_ties[obs,base]"], 0.2, family, calibration)
    model = ours["models"][0]["parameters"]
    assert model == {"weight": 0.25, "density": 0.2, "calibration": "/f/e0.txt"}
    assert ours["parameters"] == {
        "importance": "obs",
        "hessian_source": "base",
        "calibration_samples": 32,
        "calibration_seq_len": 64,
        "cache_dir": "/cache",
    }
    pinned = grid.merge_config(grid.VARIANTS["sparsegpt_ties[obs]"], 0.2, family, calibration)
    assert pinned["parameters"]["hessian_source"] == "finetuned"
    stock = grid.merge_config(grid.VARIANTS["task_arithmetic"], None, family, calibration)
    assert stock["models"][0]["parameters"] == {"weight": 0.25}
    assert "parameters" not in stock


def test_unknown_parameter_is_recognised_and_summarised() -> None:
    error = MergeFailed(
        "mergekit-yaml exited 1:\nValueError: Unknown parameter 'compensate' in parameters for"
        " sparsegpt_ties. Known parameters: density, weight."
    )
    assert grid.is_unknown_parameter(error)
    assert grid._unknown_parameter_line(str(error)) == (
        "Unknown parameter 'compensate' in parameters for sparsegpt_ties."
    )
    assert not grid.is_unknown_parameter(MergeFailed("out of memory"))


def _row(variant: str, density: float | None, seed: int, score: float) -> dict:
    return {
        "variant": variant,
        "density": density,
        "seed": seed,
        "score": score,
        "gain_code": score,
        "loss_prose": 3.0,
        "sort_acc": 0.5,
    }


def test_table_reports_spread_and_says_when_ours_is_worse() -> None:
    rows = [
        _row("ties", 0.1, 0, 0.50),
        _row("dare_ties", 0.1, 0, 0.40),
        _row("dare_ties", 0.1, 1, 0.44),
        _row("sparsegpt_ties[wanda]", 0.1, 0, 0.45),
        _row("task_arithmetic", None, 0, 0.30),
    ]
    table = report.cells(rows, "prose")
    text = report.format_table(table, ["task_arithmetic", "ties", "dare_ties"], (0.1,), "score")
    assert "0.420±0.028" in text and "0.300" in text
    (line,) = report.comparison(table, (0.1,))
    assert "WORSE than ties: sparsegpt_ties[wanda]" in line


def test_validation_score_uses_the_validation_references() -> None:
    result = {
        "variant": "ties",
        "method": "ties",
        "density": 0.1,
        "seed": 0,
        "scores": {"prose": 3.0, "code": 2.0},
        "validation_scores": {"prose": 3.0, "code": 3.0},
        "merge_s": 1.0,
        "eval_s": 1.0,
    }
    validation = {"base": {"code": 4.0}, "code": {"code": 2.0}}
    (row,) = report.run_rows([result], {"code": 3.0}, {"code": {"code": 1.0}}, validation)
    assert row["score"] == pytest.approx((3.0 - 2.0) / (3.0 - 1.0))
    assert row["validation_score"] == pytest.approx((4.0 - 3.0) / (4.0 - 2.0))


def test_each_method_is_scored_at_its_setting_best_on_validation() -> None:
    # (variant, density, seed, held-out score, validation score)
    runs = [
        ("ties", 0.1, 0, 0.50, 0.30),
        ("ties", 0.3, 0, 0.55, 0.20),
        ("ties[lambda=0.75]", 0.1, 0, 0.40, 0.25),
        ("dare_ties", 0.1, 0, 0.40, 0.50),
        ("dare_ties", 0.1, 1, 0.44, 0.10),  # mean validation 0.30
        ("dare_ties", 0.3, 0, 0.30, 0.35),
        ("dare_ties", 0.3, 1, 0.32, 0.35),
    ]
    rows = [{**_row(v, d, seed, h), "validation_score": val} for v, d, seed, h, val in runs]
    table = report.cells(rows, "prose")
    method_of = {"ties": "ties", "ties[lambda=0.75]": "ties", "dare_ties": "dare_ties"}
    chosen = {r["method"]: r for r in report.chosen_on_validation(table, method_of)}
    # The plain rule: per method, the setting with the highest mean validation score over seeds.
    for method in ("ties", "dare_ties"):
        settings: dict[tuple, list[tuple[float, float]]] = {}
        for v, d, _, h, val in runs:
            if method_of[v] == method:
                settings.setdefault((v, d), []).append((h, val))
        best = max(settings, key=lambda k: sum(val for _, val in settings[k]) / len(settings[k]))
        heldout = sum(h for h, _ in settings[best]) / len(settings[best])
        assert (chosen[method]["chosen"], chosen[method]["density"]) == best
        assert chosen[method]["heldout_score"] == pytest.approx(heldout)
        assert chosen[method]["candidates"] == len(settings)
    assert chosen["ties"]["best_heldout"] == pytest.approx(0.55)  # not the one chosen
    assert "dare_ties" in report.format_chosen(list(chosen.values()))


def _trim_entry(overlap: float) -> dict:
    return {
        "input_energy_cv": 0.2,
        "magnitude_overlap": overlap,
        "relative_output_error": 0.1,
        "magnitude_relative_output_error": 0.2,
        "norm_ratio": 0.5,
        "error_estimate": "diagonal",
    }


def test_trim_report_is_averaged_per_tensor_type_over_layers_and_experts() -> None:
    merge_report = {
        "tensors": {
            "model.layers.0.mlp.down_proj.weight": {
                "path": "importance",
                "models": {"a": _trim_entry(0.9), "b": _trim_entry(0.7)},
            },
            "model.layers.1.mlp.down_proj.weight": {
                "path": "importance",
                "models": {"a": _trim_entry(0.2)},
            },
            "model.layers.0.self_attn.q_proj.weight": {
                "path": "importance",
                "models": {"a": _trim_entry(1.0)},
            },
            "model.embed_tokens.weight": {"path": "fallback", "models": {}},
        }
    }
    summary = report.trim_by_tensor_type(merge_report)
    assert list(summary) == ["mlp.down_proj", "self_attn.q_proj"]
    assert summary["mlp.down_proj"]["magnitude_overlap"] == pytest.approx(0.6)
    assert summary["self_attn.q_proj"]["norm_ratio"] == pytest.approx(0.5)

    results = [{"variant": "v", "density": 0.1, "seed": s, "trim_by_type": summary} for s in (0, 1)]
    rows = report.trim_rows(results)
    assert len(rows) == 2  # one seed's trim only: it does not depend on the seed
    text = report.format_trim_table(rows, "v")
    assert "mlp.down_proj" in text and "0.60" in text


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    """Smoke run with tiny sizes: builds, merges through mergekit-yaml, writes every output."""
    cmd = [sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(tmp_path)]
    cmd += ["--variants", "ties,sparsegpt_ties[wanda]", "--densities", "0.3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: quick models fail checks
    for name in ("runs.csv", "table.csv", "table.txt", "sources.json", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "results").glob("*.json"))) == 3
    trim = (tmp_path / "trim_by_tensor_type.csv").read_text(encoding="utf-8")
    assert "mlp.down_proj" in trim and "sparsegpt_ties[wanda]" in trim
    # A rerun finds every result on disk and merges nothing.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert not re.search(r"merge +[0-9.]+s +eval", again.stdout), again.stdout


def test_channel_spread_preserves_the_function_and_moves_weight_scale() -> None:
    model = new_model(tiny_llama_config(50, hidden=32, heads=4, kv_heads=2, intermediate=48), 0)
    model.eval()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(tokens).logits
    spread_input_channels(model, sigma=1.0, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        key = f"model.layers.1.{name}.weight"
        column_ratio = (after[key] / before[key])[0]  # per input column for q / o / down
        assert not torch.allclose(after[key], before[key]), key
        if name != "mlp.up_proj":
            torch.testing.assert_close(
                after[key] / before[key], column_ratio.expand_as(after[key]), rtol=1e-5, atol=0
            )


def test_family_spread_pairs_each_variant_with_ties_of_the_same_family(tmp_path: Path) -> None:
    from benchmarks.quality import families

    tables = {
        "a": [("ties", "0.1", 0.50), ("v", "0.1", 0.55), ("task_arithmetic", "", 0.4)],
        "b": [("ties", "0.1", 0.20), ("v", "0.1", 0.15)],
    }
    outs = []
    for name, rows in tables.items():
        out = tmp_path / name
        out.mkdir()
        lines = ["variant,density,score_mean"] + [f"{v},{d},{s}" for v, d, s in rows]
        (out / "table.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        outs.append(families.read_scores(out))
    differences = families.paired_differences(outs, "ties")
    assert list(differences) == [("v", "0.1")]  # no ties row for the density-free one
    assert differences[("v", "0.1")] == pytest.approx([0.05, -0.05])
    text = families.format_differences(differences, "ties", 2)
    assert "+0.000±0.071 [1/2]" in text


def test_family_spread_of_the_settings_chosen_on_validation(tmp_path: Path) -> None:
    from benchmarks.quality import families

    chosen = {
        "a": [("ties", "ties", "0.3", 0.50), ("regmean", "regmean[lambda=0.8]", "", 0.60)],
        "b": [("ties", "ties", "0.5", 0.20), ("regmean", "regmean", "", 0.15)],
    }
    read = []
    for name, rows in chosen.items():
        out = tmp_path / name
        out.mkdir()
        lines = ["method,chosen,density,heldout_score"] + [",".join(map(str, r)) for r in rows]
        (out / "chosen_on_validation.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        read.append(families.read_chosen(out))
    assert read[0]["regmean"] == ("regmean[lambda=0.8] d=-", 0.60)
    text = families.format_chosen_differences(read, "ties")
    # regmean minus ties per family: +0.10 and -0.05
    assert "+0.025±0.106 [1/2]" in text and "regmean[lambda=0.8] d=-; regmean d=-" in text
    assert families.read_chosen(tmp_path) is None
