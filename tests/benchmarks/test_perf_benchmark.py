"""The performance benchmark's pure pieces: FLOP and byte formulas, memory measurement, and a
smoke run of its quickest part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.perf import formulas
from benchmarks.perf.configs import calibration_settings, merge_config
from benchmarks.perf.measure import (
    MeasuredCommandFailed,
    counting_calls,
    python_command,
    run_measured,
)
from benchmarks.perf.merge import entry_data_bytes, keeps_matrices
from benchmarks.perf.models import Checkpoints, Sizes, prepare
from benchmarks.perf.report import MISS, PASS, PartResult

MIB = 2**20
# hidden 8, 2 heads of 4 (1 KV head), intermediate 16, 2 layers, vocabulary 10.
HAND_SHAPE = formulas.LlamaShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10)
TEST_SIZES = Sizes(
    name="test",
    hidden=32,
    intermediate=64,
    heads=4,
    kv_heads=2,
    vocab=300,
    depths=(2,),
    shard_size="100KB",
    calibration_samples=4,
    calibration_seq_len=16,
    merge_calibration_samples=4,
)


def test_forward_and_hessian_flops_match_a_hand_count() -> None:
    # Per block: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate, up 8x16 each + down 16x8 = 576 weights;
    # lm_head 10x8 = 80. 6 tokens in windows of 3.
    linear = 2 * 576 + 80
    attention_per_block = 4 * 6 * 3 * 8
    forward = 2 * 6 * linear + 2 * attention_per_block
    assert forward == 15936
    assert formulas.forward_flops(HAND_SHAPE, tokens=6, seq_len=3) == forward
    assert formulas.forward_flops(HAND_SHAPE, 6, 3, causal_halving=True) == forward - 576
    # Hessian groups per block: q/k/v 8, o 8, gate/up 8, down 16.
    hessians = 2 * 6 * 2 * (8**2 + 8**2 + 8**2 + 16**2)
    assert formulas.hessian_flops(HAND_SHAPE, tokens=6) == hessians == 10752
    bound = formulas.prepass_flop_bound_ratio(HAND_SHAPE, 6, 3)
    assert bound == pytest.approx((15936 + 10752) / 15936)


def test_working_set_terms_match_a_hand_count() -> None:
    # Widest Hessian group: down_proj, 16 columns; 3 float32 16 x 16 matrices.
    assert formulas.factorisation_bytes(HAND_SHAPE) == 3 * 16 * 16 * 4
    # Batch 2, windows of 3: scores + softmax 2 x 2 x 2 heads x 3 x 3 = 72 floats; gate, up and
    # product 3 x 2 x 3 x 16 = 288 floats: the larger is what one batch adds.
    assert formulas.batch_temporary_bytes(HAND_SHAPE, batch=2, seq_len=3) == 288 * 4
    assert formulas.batch_temporary_bytes(HAND_SHAPE, batch=2, seq_len=30) == 2 * 2 * 2 * 900 * 4


def test_parameter_counts_match_the_transformers_model() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = formulas.LlamaShape.from_config(config)
    assert shape == HAND_SHAPE
    linears = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    )
    assert linears == shape.layers * formulas.block_linear_params(shape)
    assert sum(p.numel() for p in model.parameters()) == formulas.model_params(shape)


def test_llama2_7b_whole_hessians_per_task() -> None:
    expected = 32 * (3 * 4096**2 + 11008**2) * 4  # the formula, plus the vectors below
    vectors = 32 * 3 * (3 * 4096 + 11008) * 4
    shape = formulas.LLAMA2_7B
    assert formulas.cache_bytes_per_task(shape, hessians=True, factors=False) == expected + vectors
    assert formulas.cache_bytes_per_task(shape, hessians=False, factors=False) == vectors


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return prepare(tmp_path_factory.mktemp("perf_models"), TEST_SIZES, (2,), experts=False)


@pytest.mark.parametrize("method", ["sparsegpt_ties", "regmean", "sparsegpt_regmean"])
def test_cache_formula_matches_the_bytes_the_prepass_writes(
    tiny_checkpoints: Checkpoints, method: str, tmp_path: Path
) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_sparsegpt.prepass.run import prepare_statistics

    parameters = {"weight": 1.0, "calibration": str(tiny_checkpoints.calibration_text)}
    if method != "regmean":
        parameters["density"] = 0.3
    settings = calibration_settings(4, 16, tmp_path)
    config = merge_config(
        method, tiny_checkpoints.base(2), {tiny_checkpoints.task_alias(2): parameters}, settings
    )
    prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(lazy_unpickle=True, quiet=True)
    )
    (entry,) = tmp_path.glob("*.safetensors")
    shape = formulas.LlamaShape(32, 64, 2, 4, 2, 300)
    hessians, factors = keeps_matrices(method)
    assert (hessians, factors) == {
        "sparsegpt_ties": (False, False),
        "regmean": (True, False),
        "sparsegpt_regmean": (True, True),
    }[method]
    assert entry_data_bytes(entry) == formulas.cache_bytes_per_task(shape, hessians, factors)


def test_child_peak_memory_covers_what_it_allocates() -> None:
    allocate = "import time, numpy; a = numpy.ones(200 * 2**20 // 8); time.sleep(0.3)"
    measured = run_measured(python_command("-c", allocate))
    assert 200 * MIB <= measured.peak_rss_bytes < 400 * MIB
    assert measured.peak_anonymous_bytes >= 190 * MIB  # sampled, so a little may be missed
    assert measured.wall_s >= 0.3


def test_child_peak_memory_excludes_the_parents() -> None:
    # Spawned directly, a child's ru_maxrss would include this process's high-water mark.
    ballast = torch.ones(300 * MIB // 4)
    measured = run_measured(python_command("-c", "pass"))
    assert measured.peak_rss_bytes < 100 * MIB
    del ballast


def test_a_failing_child_is_reported_with_its_output() -> None:
    failing = "import sys; print('the reason'); sys.exit(3)"
    with pytest.raises(MeasuredCommandFailed, match="the reason"):
        run_measured(python_command("-c", failing))


def test_counting_calls_counts_and_restores() -> None:
    original = formulas.LlamaShape
    with counting_calls(formulas, "LlamaShape") as counter:
        formulas.LlamaShape(1, 1, 1, 1, 1, 1)
        formulas.LlamaShape(1, 1, 1, 1, 1, 1)
    assert counter.calls == 2
    assert formulas.LlamaShape is original


def test_rows_get_verdicts_from_their_targets() -> None:
    result = PartResult("part", "title")
    result.add("a", "1 s", "ref", 1.0, at_most=1.0)
    result.add("b", "1 s", "ref", 0.5, below=0.4)
    result.add("c", "1 s", "ref", 0.5)
    assert [row.verdict for row in result.rows] == [PASS, MISS, ""]


def test_quick_calibration_part_runs(tmp_path: Path) -> None:
    from benchmarks.perf.__main__ import main

    assert main(["--quick", "--only", "calibration", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "calibration.json").read_text(encoding="utf-8"))
    assert {row["verdict"] for row in written["rows"]} <= {PASS, MISS, ""}
    assert len(written["data"]["seconds"]["cached"]) == 1
    assert "pre-pass" in (tmp_path / "results.txt").read_text(encoding="utf-8")
