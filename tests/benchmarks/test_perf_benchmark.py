"""The performance benchmark's pure pieces: FLOP and byte formulas, memory measurement, and a
smoke run of its quickest part."""

from __future__ import annotations

import dataclasses
import io
import json
import resource
import runpy
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from benchmarks.perf import formulas, projection
from benchmarks.perf.configs import calibration_settings, merge_config
from benchmarks.perf.measure import (
    MeasuredCommandFailed,
    MeasuredRun,
    counting_calls,
    python_command,
    run_measured,
)
from benchmarks.perf.merge import entry_data_bytes
from benchmarks.perf.models import Checkpoints, Sizes, expert_domains, prepare
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
    # Hessian groups per block: q/k/v 8, o 8, gate/up 8, down 16; and lm_head's, 8.
    hessians = 2 * 6 * (2 * (8**2 + 8**2 + 8**2 + 16**2) + 8**2)
    assert formulas.hessian_flops(HAND_SHAPE, tokens=6) == hessians == 11520
    bound = formulas.prepass_flop_bound_ratio(HAND_SHAPE, 6, 3)
    assert bound == pytest.approx((15936 + 11520) / 15936)
    # diag H alone: 2 x 6 x (2 x (8 + 8 + 8 + 16) + 8).
    assert formulas.diagonal_hessian_flops(HAND_SHAPE, tokens=6) == 2 * 6 * (2 * 40 + 8) == 1056
    diagonal = formulas.prepass_flop_bound_ratio(HAND_SHAPE, 6, 3, diagonal=True)
    assert diagonal == pytest.approx((15936 + 1056) / 15936)


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
    # The formula, plus the vectors below; then the head's Gram and vectors (d = 4096),
    # the 32000 token counts and the 65 norms' three vectors each.
    expected = (32 * (3 * 4096**2 + 11008**2) + 4096**2) * 4
    vectors = (32 * 3 * (3 * 4096 + 11008) + 3 * 4096 + 32000 + 65 * 3 * 4096) * 4
    shape = formulas.LLAMA2_7B
    assert formulas.cache_bytes_per_task(shape, hessians=True, factors=False) == expected + vectors
    assert formulas.cache_bytes_per_task(shape, hessians=False, factors=False) == vectors


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return prepare(tmp_path_factory.mktemp("perf_models"), TEST_SIZES, (2,), experts=False)


# hidden 32, 2 layers: a block's linears are 4 x 32 x 32 / 2 (k, v) ... = 9216 weights; the
# Hessian groups are 32, 32, 32 and 64 wide.
# 2 blocks; the head (hidden 32), the embedding of the 300-token vocabulary and the 5 norms.
TINY_LINEARS_FLOAT32 = (2 * (1024 + 512 + 512 + 1024 + 3 * 32 * 64) + 2 * 300 * 32 + 5 * 32) * 4
TINY_GRAMS = (2 * (3 * 32**2 + 64**2) + 32**2) * 4
# The linears' vectors, the token counts, and the norms' (three vectors each).
TINY_VECTORS = (2 * 3 * (3 * 32 + 64) + 3 * 32 + 300 + 5 * 3 * 32) * 4


@pytest.mark.parametrize(
    ("method", "keep", "expected"),
    [
        ("sparsegpt_ties", False, TINY_VECTORS),
        ("regmean", False, TINY_LINEARS_FLOAT32),  # one merged model's linears, float32
        ("sparsegpt_regmean", False, TINY_LINEARS_FLOAT32),
        ("regmean", True, TINY_GRAMS + TINY_VECTORS),  # the task's Grams
        ("sparsegpt_regmean", True, TINY_GRAMS + TINY_VECTORS),  # its factor derived from H
    ],
)
def test_cache_formula_matches_the_bytes_the_prepass_writes(
    tiny_checkpoints: Checkpoints, method: str, keep: bool, expected: int, tmp_path: Path
) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_sparsegpt.prepass.run import prepare_statistics

    parameters = {"weight": 1.0, "calibration": str(tiny_checkpoints.calibration_text)}
    if method != "regmean":
        parameters["density"] = 0.3
    settings = {
        **calibration_settings(4, 16, tmp_path),
        **({"keep_statistics": True} if keep else {}),
    }
    config = merge_config(
        method, tiny_checkpoints.base(2), {tiny_checkpoints.task_alias(2): parameters}, settings
    )
    prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(lazy_unpickle=True, quiet=True)
    )
    (entry,) = tmp_path.glob("*.safetensors")
    shape = formulas.LlamaShape(32, 64, 2, 4, 2, 300)
    recipe = HAND_RECIPES["regmean (merged)" if method == "regmean" else method]
    work = projection.Workload(1, 4, 16, output_bytes=4)
    assert projection.cache_bytes(recipe, shape, work, keep) == expected
    assert entry_data_bytes(entry) == expected


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
    assert len(written["data"]["seconds"]["whole"]) == 1  # the whole-H pre-pass beside it
    assert "pre-pass" in (tmp_path / "results.txt").read_text(encoding="utf-8")


# The projection on HAND_SHAPE, 3 experts of 2 windows of 4 tokens, batch 1, bfloat16. Per
# block: linears 576 weights (above) + 2 norms of 8 = 592; Grams of the groups (widths 8, 8, 8,
# 16): 64 + 64 + 64 + 256 = 448 floats; (out, in) of q, k, v, o, gate, up, down: (8, 8),
# (4, 8), (4, 8), (8, 8), (16, 8), (16, 8), (8, 16).
HAND_WORK = projection.Workload(experts=3, samples=2, seq_len=4, batch=1)
HAND_RECIPES = {recipe.label: recipe for recipe in projection.RECIPES}


def test_projected_disk_matches_a_hand_count() -> None:
    merged = HAND_RECIPES["regmean (merged)"]
    # 2 layers x 576 merged weights, the head and embedding (10 x 8 each), the 5 norms' scales
    # (8 each), x 2 bytes, whatever the number of experts.
    norms = 5 * 8
    assert projection.cache_bytes(merged, HAND_SHAPE, HAND_WORK) == (2 * 576 + 2 * 80 + norms) * 2
    # keep_statistics: per task and layer 448 Gram floats + 3 x (8 + 8 + 8 + 16) vector floats;
    # per task the head's Gram and vectors (64 + 3 x 8), 10 token counts and the norms' vectors.
    head_and_tokens = 64 + 3 * 8 + 10 + 3 * norms
    kept = 3 * (2 * 568 + head_and_tokens) * 4
    assert projection.cache_bytes(merged, HAND_SHAPE, HAND_WORK, keep=True) == kept
    # sparsegpt_ties: the vectors only, per task.
    ties = HAND_RECIPES["sparsegpt_ties"]
    vectors = 2 * 120 + 3 * 8 + 10 + 3 * norms
    assert projection.cache_bytes(ties, HAND_SHAPE, HAND_WORK) == 3 * vectors * 4


def test_projected_memory_matches_a_hand_count() -> None:
    merged = HAND_RECIPES["regmean (merged)"]
    # Blocks of the base and the 3 experts (592 x 2 bytes each); 3 tasks x 8 tokens x 8 float32
    # activations; 3 tasks' Grams of a block; down_proj's float64 solve, 3 x 16 x 16 (lhs, its
    # ridged copy, its factor) + 2 x 8 x 16 (rhs, solution); the kernel's float32 inputs for
    # the largest matrix (128 weights): 4 models' and 3 task vectors.
    host = {
        "blocks": 4 * 1184,
        "activations": 768,
        "block_grams": 3 * 1792,
        "solve": 8 * (3 * 256 + 2 * 128),
        "merge_inputs": 4 * 7 * 128,
    }
    assert projection.prepass_host_terms(merged, HAND_SHAPE, HAND_WORK) == host
    # Before the blocks, RegMean++ merges the embedding (10 x 8): 4 models' and 3 task vectors
    # in float32, the merged value and the model's copy. Here the block stage is larger.
    assert projection.embedding_stage_bytes(merged, HAND_SHAPE, HAND_WORK) == 4 * 9 * 80
    assert projection.prepass_host_bytes(merged, HAND_SHAPE, HAND_WORK) == sum(host.values())
    assert (
        projection.prepass_host_bytes(merged, HAND_SHAPE, HAND_WORK, extra=5)
        == sum(host.values()) + 5
    )
    wide = dataclasses.replace(HAND_SHAPE, vocab=1000)  # now the embedding stage is
    assert projection.prepass_host_bytes(merged, wide, HAND_WORK) == 4 * 9 * 8000
    # The GPU holds one batch (1 x 4 tokens x (8 + 16) bfloat16 values), not the activations.
    gpu = projection.prepass_gpu_terms(merged, HAND_SHAPE, HAND_WORK)
    assert sum(gpu.values()) == 4736 + 192 + 5376 + 8192 + 3584
    # The host then holds the activations and the larger of the embedding stage and the blocks.
    assert projection.accelerator_host_bytes(merged, HAND_SHAPE, HAND_WORK) == 768 + 4736
    assert projection.accelerator_host_bytes(merged, wide, HAND_WORK) == 768 + 4 * 9 * 8000
    finetuned = HAND_RECIPES["regmean (finetuned)"]  # the 3 experts' blocks only
    assert sum(projection.prepass_host_terms(finetuned, HAND_SHAPE, HAND_WORK).values()) == 21472
    # Each expert's embedding read and copied into the model, one at a time (bfloat16).
    assert projection.embedding_stage_bytes(finetuned, HAND_SHAPE, HAND_WORK) == 2 * 80 * 2
    # sparsegpt_ties: one task at a time through the base; the down group's factorisation.
    ties = projection.prepass_host_terms(HAND_RECIPES["sparsegpt_ties"], HAND_SHAPE, HAND_WORK)
    assert ties == {"blocks": 1184, "activations": 256, "block_grams": 1792, "factorisation": 3072}


def test_projected_flops_and_minutes_match_a_hand_count() -> None:
    merged = HAND_RECIPES["regmean (merged)"]
    flops = projection.prepass_flops(merged, HAND_SHAPE, HAND_WORK)
    # Forward: 2 x 1152 weights x 24 tokens x 5 passes. Grams: 2 x 8 tokens x 448 x 2 layers x
    # 3 tasks. Solve per layer: sum of d^3 / 3 + 2 out d^2 x (1 + 3 tasks) over the 7 matrices.
    solve_per_layer = (6 * 8**3 + 16**3) / 3 + 8 * (8 * 64 * 2 + 4 * 64 * 2 + 16 * 64 * 2 + 8 * 256)
    assert flops == {
        "bf16": 276480,
        "fp32": 43008,
        "fp64": pytest.approx(2 * solve_per_layer),
    }
    accelerator = projection.Accelerator("hand", 1e3, 1e2, 10, utilisation=0.5, memory_bytes=1)
    expected = (276480 / 500 + 43008 / 50 + 2 * solve_per_layer / 5) / 60
    assert projection.minutes(flops, accelerator) == pytest.approx(expected)
    # compensate adds each task's re-fit, 2 out d^2 per matrix and layer, in float64.
    sparse = projection.prepass_flops(HAND_RECIPES["sparsegpt_regmean"], HAND_SHAPE, HAND_WORK)
    assert sparse["fp64"] - flops["fp64"] == pytest.approx(3 * 2 * 11264)
    # sparsegpt_ties: one pass per task; each task factorises its groups (d^3 each), float32.
    ties = projection.prepass_flops(HAND_RECIPES["sparsegpt_ties"], HAND_SHAPE, HAND_WORK)
    assert ties == {"bf16": 55296, "fp32": 43008 + 3 * 2 * (3 * 512 + 4096), "fp64": 0}


def test_llama_8b_projection_is_flat_in_the_experts() -> None:
    merged = HAND_RECIPES["regmean (merged)"]
    shape = projection.LLAMA31_8B
    two, five = (projection.Workload(n, 128, 512) for n in (2, 5))
    # 32 layers x (4096 x (4096 + 2 x 1024) + 4096^2 + 3 x 4096 x 14336) bfloat16 weights, the
    # head and embedding, 128256 x 4096 each, and 65 norms of 4096.
    linears = (32 * (4096 * 6144 + 4096**2 + 3 * 4096 * 14336) + 2 * 128256 * 4096) * 2
    linears += 65 * 4096 * 2
    assert projection.cache_bytes(merged, shape, five) == linears == 16_060_522_496
    assert projection.cache_bytes(merged, shape, two) == linears
    grams = 32 * 4 * (3 * 4096**2 + 14336**2)  # the "about 33 GB per task"
    assert projection.cache_bytes(merged, shape, five, keep=True) > 5 * grams > 160 * 10**9


def test_more_experts_take_turns_over_the_domains() -> None:
    assert expert_domains(5) == {
        "prose": "prose",
        "code": "code",
        "prose_2": "prose",
        "code_2": "code",
        "prose_3": "prose",
    }


def test_rows_near_one_pass_within_the_tolerance() -> None:
    result = PartResult("part", "title")
    result.add("a", "", "", 1.019, near=0.02)
    result.add("b", "", "", 0.97, near=0.02)
    assert [row.verdict for row in result.rows] == [PASS, MISS]


def _in_process(command: list[str], env: object = None, timeout_s: float = 0) -> MeasuredRun:
    """``run_measured`` without the subprocess: ``python -m MODULE ARGS`` run in this
    interpreter (each start-up costs ~9 s here, and the part starts 19)."""
    start, stderr = time.perf_counter(), io.StringIO()
    assert command[1] == "-m", command
    with patch.object(sys, "argv", [command[2], *command[3:]]), redirect_stderr(stderr):
        with pytest.raises(SystemExit) as exited:
            runpy.run_module(command[2], run_name="__main__", alter_sys=True)
    assert exited.value.code in (0, None), stderr.getvalue()[-2000:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MeasuredRun(time.perf_counter() - start, peak, {}, "", stderr.getvalue())


def test_quick_experts_part_has_every_method_at_both_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.perf import experts
    from benchmarks.perf.__main__ import main
    from benchmarks.perf.experts_summary import METHODS

    monkeypatch.setattr(experts, "run_measured", _in_process)
    assert main(["--quick", "--only", "experts", "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "experts.json").read_text(encoding="utf-8"))
    metrics = [row["metric"] for row in written["rows"]]
    for method in METHODS:
        for count in experts.EXPERT_COUNTS:
            label = f"{method.label}, {count} experts"
            assert f"merge wall (warm cache), {label}" in metrics
            assert f"output data, {label}" in metrics
            if method.calibrated:
                assert f"pre-pass wall, {label}" in metrics
                assert f"cache data, {label}" in metrics
    assert set(written["data"]["counts"]) == {"2", "5"}
    for row in written["rows"]:
        if row["metric"].startswith("output data"):
            assert row["verdict"] == PASS  # every merge wrote one float32 model
    assert len(written["data"]["projection"]) == 2 * len(projection.RECIPES)
