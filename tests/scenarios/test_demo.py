"""Unit tests of the tiny-model demo toolkit (corpus, tokenizer, training, scoring, configs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_sparsegpt.demo import build, corpus
from mergekit_sparsegpt.demo.build import EXPERTS, domain_windows
from mergekit_sparsegpt.demo.evaluate import format_scores, normalized_score
from mergekit_sparsegpt.demo.merges import merge_configs, run_mergekit, write_config
from mergekit_sparsegpt.demo.tiny import (
    greedy_complete,
    heldout_loss,
    new_model,
    save_model,
    tiny_llama_config,
    token_windows,
    torch_threads,
    train_causal_lm,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLES = [
    "def f(x):\n    return x + 1  # ünïcödé\n",
    "add 12+7=19\nadd 99+99=198\n",
    "The with statement is used to wrap the execution of a block.",
]


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny models run far faster on one thread when the machine is busy (tiny.torch_threads).
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = corpus.prose_texts("train")[:5] + corpus.arithmetic_texts("train")[:20]
    return train_tokenizer(texts, 300)


# ---------------------------------------------------------------- corpus


def test_corpus_splits_disjoint_and_nonempty() -> None:
    for domain, splits in corpus.sources().items():
        names = [set(splits[s]) for s in corpus.SPLITS]
        assert all(names), f"{domain}: an empty split"
        for i in range(3):
            for j in range(i + 1, 3):
                assert not names[i] & names[j], f"{domain}: splits share items"
        texts = [set(corpus.domain_texts(domain, s)) for s in corpus.SPLITS]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_corpus_uses_stdlib_files_and_pydoc_topics() -> None:
    files = corpus.code_files()
    assert len(files) >= 40 and list(files) == sorted(files)
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    code_names = {p.name for p in files}
    used = corpus.sources()["code"]
    assert set().union(*used.values()) == code_names
    assert corpus.code_texts("heldout")[0] == files[0].read_text(encoding="utf-8")
    assert all(name.startswith("topic:") for name in corpus.sources()["prose"]["train"])


def test_prose_falls_back_to_docstrings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import now raises
    docs = corpus._prose_documents.__wrapped__()
    assert len(docs) >= 10
    assert all(name.startswith("docstrings:") for name, _ in docs)
    # Docstring modules never overlap the code domain.
    assert not set(corpus.DOCSTRING_MODULES) & set(corpus.CODE_MODULES)


def test_arithmetic_deterministic_and_correct() -> None:
    first = {s: corpus.arithmetic_texts(s) for s in corpus.SPLITS}
    corpus._arith_pairs.cache_clear()
    assert {s: corpus.arithmetic_texts(s) for s in corpus.SPLITS} == first
    pattern = re.compile(r"add (\d+)\+(\d+)=(\d+)")
    for split, texts in first.items():
        lines = [line for text in texts for line in text.splitlines()]
        assert lines, split
        for line in lines:
            a, b, c = map(int, pattern.fullmatch(line).groups())
            assert a + b == c
    for prompt, answer in corpus.arithmetic_problems("heldout"):
        a, b = map(int, re.fullmatch(r"add (\d+)\+(\d+)=", prompt).groups())
        assert int(answer) == a + b
    assert corpus.arithmetic_line(123, 45) == "add 123+45=168"


def test_unknown_split_or_domain_raises() -> None:
    with pytest.raises(ValueError):
        corpus.domain_texts("code", "test")
    with pytest.raises(ValueError):
        corpus.domain_texts("poetry", "train")


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_deterministic_and_round_trips(small_tokenizer, tmp_path: Path) -> None:
    again = train_tokenizer(
        corpus.prose_texts("train")[:5] + corpus.arithmetic_texts("train")[:20], 300
    )
    assert small_tokenizer.get_vocab() == again.get_vocab()
    assert len(small_tokenizer) == 300
    assert small_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]
    small_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == again(text, add_special_tokens=False)["input_ids"]
        assert ids == reloaded(text, add_special_tokens=False)["input_ids"]
        assert small_tokenizer.decode(ids) == text
    # Digits are always single tokens, so arithmetic never depends on number merges.
    assert small_tokenizer.tokenize("=168")[-3:] == ["1", "6", "8"]


def test_token_windows(small_tokenizer) -> None:
    texts = corpus.arithmetic_texts("heldout")
    windows = token_windows(texts, small_tokenizer, 4, 16)
    assert windows.shape == (4, 16) and windows.dtype == torch.long
    assert windows[0, 0].item() == small_tokenizer.bos_token_id
    few = token_windows(["add 1+2=3"], small_tokenizer, 100, 4)
    assert 1 <= len(few) < 100
    with pytest.raises(ValueError):
        token_windows(["a"], small_tokenizer, 1, 64)


# ---------------------------------------------------------------- model, training, loss


def _random_model(vocab: int = 40):
    config = tiny_llama_config(vocab, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    return new_model(config, seed=3)


def test_heldout_loss_matches_manual_cross_entropy(small_tokenizer, tmp_path: Path) -> None:
    model = _random_model()
    windows = torch.randint(0, 40, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    manual = -log_probs.gather(-1, windows[:, 1:, None]).mean().item()
    # batch_size=2 leaves a ragged last batch: the mean must still be over all tokens.
    assert heldout_loss(model, windows, batch_size=2) == pytest.approx(manual, rel=1e-5)
    assert heldout_loss(model, windows) == pytest.approx(
        model(input_ids=windows, labels=windows).loss.item(), rel=1e-5
    )
    save_model(model, small_tokenizer, tmp_path / "m")
    assert heldout_loss(tmp_path / "m", windows) == pytest.approx(manual, rel=1e-5)


def test_train_causal_lm_is_deterministic_and_learns() -> None:
    windows = torch.arange(40).repeat(8, 1) % 40  # a trivially learnable sequence
    a, b = _random_model(), _random_model()
    losses_a = train_causal_lm(a, windows, steps=30, lr=1e-2, batch_size=4, seed=7)
    losses_b = train_causal_lm(b, windows, steps=30, lr=1e-2, batch_size=4, seed=7)
    assert losses_a == losses_b
    assert losses_a[-1] < losses_a[0] - 0.5
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_greedy_complete_batches_like_single_prompts(small_tokenizer) -> None:
    model = _random_model(len(small_tokenizer))
    prompts = ["add 1+2=", "add 10+20=", "add 3+4=", "add 99+1="]
    batched = greedy_complete(model, small_tokenizer, prompts, max_new_tokens=3)
    single = [greedy_complete(model, small_tokenizer, [p], max_new_tokens=3)[0] for p in prompts]
    assert batched == single and len(batched) == 4


# ---------------------------------------------------------------- the tiny_models fixture


def test_fixture_layout(tiny_models) -> None:
    assert set(tiny_models.experts) == set(tiny_models.calibration) == {"code", "arithmetic"}
    assert {p.suffix for p in tiny_models.calibration.values()} == {".txt", ".jsonl"}
    for path in [tiny_models.base, *tiny_models.experts.values()]:
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama"
    assert (tiny_models.tokenizer / "tokenizer.json").is_file()


def test_fixture_calibration_files_hold_enough_tokens(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.tokenizer)
    for name, path in tiny_models.calibration.items():
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines()]
            text = "\n".join(r["text"] for r in records)
        else:
            text = path.read_text(encoding="utf-8")
        assert len(tokenizer(text)["input_ids"]) >= 8 * 32 * 4, name


def test_fixture_experts_differ_from_base_everywhere(tiny_models) -> None:
    base = load_file(tiny_models.base / "model.safetensors")
    for name, path in tiny_models.experts.items():
        expert = load_file(path / "model.safetensors")
        assert expert.keys() == base.keys()
        for key, value in base.items():
            assert bool((expert[key] != value).all()), f"{name}: {key} has unchanged weights"


def test_fixture_experts_beat_base_on_own_domain(tiny_models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.tokenizer)
    for name, (domain, _) in EXPERTS.items():
        windows = domain_windows(domain, "heldout", tokenizer, 16, 32)
        base = heldout_loss(tiny_models.base, windows)
        assert heldout_loss(tiny_models.experts[name], windows) < base - 0.05, name


def test_merge_configs_share_densities_and_add_calibration(tiny_models) -> None:
    configs = dict(merge_configs(tiny_models, 8, 32))
    assert list(configs) == ["ties", "sparsegpt_ties", "regmean", "sparsegpt_regmean"]
    ties = configs["ties"]
    assert "parameters" not in ties
    for method, config in configs.items():
        assert config["merge_method"] == method
        assert config["base_model"] == str(tiny_models.base)
        if method == "ties":
            continue
        assert config["parameters"] == {"calibration_samples": 8, "calibration_seq_len": 32}
        for plain, calibrated in zip(ties["models"], config["models"], strict=True):
            assert plain["model"] == calibrated["model"]
            extra = dict(calibrated["parameters"])
            assert Path(extra.pop("calibration")).is_file()
            expected = dict(plain["parameters"])
            if method == "regmean":  # no trim: every entry of every task vector
                del expected["density"]
            assert extra == expected


def test_normalized_score_against_hand_computed_values() -> None:
    rows = {
        "base": {"code": 5.0, "arithmetic": 4.0, "prose": 3.0},
        "expert:code": {"code": 3.0, "arithmetic": 9.0, "prose": 9.0},
        "expert:arithmetic": {"code": 9.0, "arithmetic": 2.0, "prose": 9.0},
        "merge:ties": {"code": 4.0, "arithmetic": 3.0, "prose": 9.0},
        "merge:regmean": {"code": 3.5, "arithmetic": 2.5, "prose": 9.0},
    }
    domains = {"expert:code": "code", "expert:arithmetic": "arithmetic"}
    # ties: code (5-4)/(5-3) = 0.5, arithmetic (4-3)/(4-2) = 0.5; regmean 0.75 and 0.75.
    assert normalized_score(rows, "merge:ties", domains) == pytest.approx(0.5)
    assert normalized_score(rows, "merge:regmean", domains) == pytest.approx(0.75)
    assert normalized_score(rows, "expert:code", domains) == pytest.approx((1 + (4 - 9) / 2) / 2)
    table = format_scores(rows, domains, reference="merge:ties").splitlines()
    assert [line.split() for line in table[2:]] == [
        ["merge:ties", "0.500", "1.00x"],
        ["merge:regmean", "0.750", "1.50x"],
    ]


def test_stock_ties_merge_runs_through_mergekit_cli(tiny_models, tmp_path: Path) -> None:
    config = dict(merge_configs(tiny_models, 8, 32))["ties"]
    out = run_mergekit(write_config(config, tmp_path / "ties.yaml"), tmp_path / "merged")
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == load_file(tiny_models.base / "model.safetensors").keys()
    assert AutoTokenizer.from_pretrained(out)("add 1+2=3")["input_ids"]


def _readme_main_job() -> list[str]:
    """The demo command of README's first bash block, as the arguments after ``python``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    command = block.split("&&")[-1].split()
    assert command[:3] == ["python", "-m", "mergekit_sparsegpt.demo"], block
    return command[1:]


@pytest.mark.slow
def test_readme_main_job_from_another_directory(tmp_path: Path) -> None:
    """README's main job, as written (a relative --out), run from a directory of its own."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, *_readme_main_job()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "FAILED" not in output
    out = tmp_path / cmd[cmd.index("--out") + 1]
    for method, _ in merge_configs(build.Family(out, out, {}, {}, out), 1, 1):
        assert re.search(rf"^merge:{method} +\d", proc.stdout, re.M), method
        assert re.search(rf"^merge:{method} +-?\d+\.\d{{3}} +\d+\.\d\dx$", proc.stdout, re.M)
        assert (out / f"merge_{method}" / "model.safetensors").is_file()
