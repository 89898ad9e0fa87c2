"""What a merge costs at the sizes people merge: disk, host RAM, GPU memory, FLOPs and minutes.

Pure arithmetic on a :class:`~benchmarks.perf.formulas.LlamaShape`, a :class:`Workload` (experts,
calibration windows, dtypes) and a :class:`Recipe` (method, ``hessian_source``, storage). The
``experts`` part checks the disk and host-RAM formulas against what it measures at a small size
and prints :func:`projection_rows` for the shapes below; ``python -m benchmarks.perf.projection``
prints the same as the Markdown table of docs/performance.md.

Every term is a function of its own, so that a change in what the pre-pass holds or computes is
made here, once.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.perf.formulas import (
    FLOAT32_BYTES,
    NORMS_PER_BLOCK,
    LlamaShape,
    block_linear_params,
    block_params,
    cache_bytes_per_task,
    factorisation_bytes,
    hessian_group_widths,
    model_params,
)
from benchmarks.perf.report import size

FLOAT64_BYTES = 8
BFLOAT16_BYTES = 2
ACTIVATION_BYTES = FLOAT32_BYTES  # every task's hidden states, kept on the host
GRAM_BYTES = FLOAT32_BYTES  # the captured Hessians (Grams) X^T X
SOLVE_BYTES = FLOAT64_BYTES  # RegMean's weighted sums of G~ and G~ tau^T
# RegMean++ (hessian_source: merged) runs each block once per input group (q/k/v, o, gate/up,
# down: that group's Grams, everything before it merged) and once more for the next block's
# inputs. Each group's pass stops where its inputs are taken, and the norms' units (two a
# block) stop at the norm: counted as whole passes of the linears' groups, an upper bound.
MERGED_SOURCE_PASSES = len(("qkv", "o", "gate_up", "down")) + 1
REGMEAN_METHODS = frozenset({"regmean", "sparsegpt_regmean"})
MERGED, FINETUNED, BASE = "merged", "finetuned", "base"


@dataclass(frozen=True)
class Workload:
    """One merge's calibration: ``experts`` tasks of ``samples`` windows of ``seq_len`` tokens."""

    experts: int
    samples: int
    seq_len: int
    batch: int = 8  # calibration_batch_size's default
    weight_bytes: int = BFLOAT16_BYTES  # the checkpoints' dtype, which the forward runs in
    output_bytes: int = BFLOAT16_BYTES  # the merged model's dtype

    @property
    def tokens_per_task(self) -> int:
        return self.samples * self.seq_len


@dataclass(frozen=True)
class Recipe:
    """A method at one setting of ``hessian_source`` (its pre-pass's shape)."""

    label: str
    method: str
    source: str
    compensate: bool = False  # the per-task factor U of H^-1 (sparsegpt_regmean's default)

    @property
    def solves_in_prepass(self) -> bool:
        return self.method in REGMEAN_METHODS

    @property
    def lockstep(self) -> bool:
        """Every task block by block at once (RegMean), or one task after another (TIES)."""
        return self.solves_in_prepass


RECIPES = (
    Recipe("regmean (merged)", "regmean", MERGED),
    Recipe("regmean (finetuned)", "regmean", FINETUNED),
    Recipe("sparsegpt_regmean", "sparsegpt_regmean", MERGED, compensate=True),
    Recipe("sparsegpt_ties", "sparsegpt_ties", BASE),
)


@dataclass(frozen=True)
class Accelerator:
    """Dense peak FLOP/s per precision and the fraction of it the pre-pass is assumed to get."""

    name: str
    bf16_flops: float  # tensor cores: the forward, in the checkpoints' bfloat16
    fp32_flops: float  # no TF32 (PyTorch's default): the float32 Gram accumulation
    fp64_flops: float  # tensor cores: RegMean's float64 solve
    utilisation: float
    memory_bytes: int


# NVIDIA's H100 SXM datasheet (dense, no sparsity); the H200 has the same compute and 141 GB.
H100 = Accelerator("H100 SXM", 989e12, 67e12, 67e12, utilisation=0.4, memory_bytes=80 * 2**30)
LLAMA31_8B = LlamaShape(
    hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256
)
LLAMA_70B = LlamaShape(
    hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256
)
SHAPES = {"Llama-3.1-8B": LLAMA31_8B, "70B": LLAMA_70B}
# 5 experts, the plugin's default 128 x 512 calibration tokens per task.
PROJECTED = Workload(experts=5, samples=128, seq_len=512)


def block_matrices(shape: LlamaShape) -> tuple[tuple[int, int], ...]:
    """(out, in) of one block's linears: q, k, v, o, gate, up, down."""
    h, m = shape.hidden, shape.intermediate
    return (
        (shape.attention_dim, h),
        (shape.kv_dim, h),
        (shape.kv_dim, h),
        (h, shape.attention_dim),
        (m, h),
        (m, h),
        (h, m),
    )


def merged_linears_bytes(shape: LlamaShape, output_bytes: int) -> int:
    """Default RegMean storage: one entry per merge, every decoder linear's merged weight, the
    output head's, the token embedding's and the norms' scales, in the output dtype, whatever
    the number of experts."""
    norms = (NORMS_PER_BLOCK * shape.layers + 1) * shape.hidden
    linears = shape.layers * block_linear_params(shape) + 2 * shape.vocab * shape.hidden
    return (linears + norms) * output_bytes


def kept_statistics_bytes(shape: LlamaShape, experts: int, factors: bool = False) -> int:
    """``keep_statistics: true``: per task, every input group's float32 Gram (plus ``factors``:
    the Cholesky factor U of H^-1 beside it) and three vectors of its width."""
    return experts * cache_bytes_per_task(shape, hessians=True, factors=factors)


def cache_bytes(recipe: Recipe, shape: LlamaShape, work: Workload, keep: bool = False) -> int:
    """Tensor data the pre-pass leaves in the cache (safetensors headers come on top).

    RegMean's methods: the merged linears, or with ``keep`` every task's Grams (their factor is
    derived from H, not stored). TIES methods: per task the vectors, plus U with ``compensate``.
    """
    if recipe.solves_in_prepass:
        if keep:
            return kept_statistics_bytes(shape, work.experts)
        return merged_linears_bytes(shape, work.output_bytes)
    per_task = cache_bytes_per_task(shape, hessians=False, factors=recipe.compensate)
    return work.experts * per_task


def models_read(recipe: Recipe, experts: int) -> int:
    """Models with a decoder block in memory at once: each expert (finetuned); the base
    (base); the base plus the experts' blocks it merges (merged). TIES: one model at a time."""
    if not recipe.lockstep:
        return 1
    return {FINETUNED: experts, BASE: 1, MERGED: 1 + experts}[recipe.source]


def tasks_held(recipe: Recipe, experts: int) -> int:
    """Tasks whose activations and block Grams are held at once."""
    return experts if recipe.lockstep else 1


def solve_bytes(shape: LlamaShape) -> int:
    """The largest matrix's float64 solve: lhs [in, in] with its ridged copy and Cholesky
    factor, the right-hand side and the solution [out, in]."""
    return SOLVE_BYTES * max(3 * d * d + 2 * out * d for out, d in block_matrices(shape))


def merge_input_bytes(shape: LlamaShape, experts: int) -> int:
    """The kernel's inputs for the largest matrix, in float32: the base's and every expert's
    weight, and every task vector."""
    return FLOAT32_BYTES * (2 * experts + 1) * max(out * d for out, d in block_matrices(shape))


def prepass_host_terms(recipe: Recipe, shape: LlamaShape, work: Workload) -> dict[str, int]:
    """Host RAM of the pre-pass's block stage, by term: the blocks being read, every held task's
    activations, the held tasks' Grams of one block, and the solve with the kernel's inputs
    (TIES: the widest group's factorisation instead). Interpreter and libraries, and one batch's
    temporaries, come on top (the ``experts`` part measures the former and adds
    ``formulas.batch_temporary_bytes``); the embedding stage before it is
    ``embedding_stage_bytes``."""
    tasks = tasks_held(recipe, work.experts)
    gram = GRAM_BYTES * sum(width**2 for width in hessian_group_widths(shape))
    terms = {
        "blocks": models_read(recipe, work.experts) * block_params(shape) * work.weight_bytes,
        "activations": tasks * work.tokens_per_task * shape.hidden * ACTIVATION_BYTES,
        "block_grams": tasks * gram,
    }
    if not recipe.solves_in_prepass:
        return {**terms, "factorisation": factorisation_bytes(shape)}
    return {**terms, "solve": solve_bytes(shape), "merge_inputs": merge_input_bytes(shape, tasks)}


def embedding_stage_bytes(recipe: Recipe, shape: LlamaShape, work: Workload) -> int:
    """Host RAM of the stage before the first block, which runs the embedding. RegMean++ first
    merges the embedding with the method's kernel, as mergekit's merge does: every model's
    embedding and every task vector in float32, the merged value, and the model's copy of it.
    Otherwise each model's embedding is read, and copied into the model, one model at a time."""
    embedding = shape.vocab * shape.hidden
    if recipe.lockstep and recipe.source == MERGED:
        return FLOAT32_BYTES * (2 * work.experts + 3) * embedding
    return 2 * embedding * work.weight_bytes


def prepass_host_bytes(recipe: Recipe, shape: LlamaShape, work: Workload, extra: int = 0) -> int:
    """The pre-pass's host RAM: the larger of its embedding stage and its block stage (with
    ``extra`` on top of the latter: one batch's temporaries); the two never coexist."""
    block_stage = sum(prepass_host_terms(recipe, shape, work).values()) + extra
    return max(block_stage, embedding_stage_bytes(recipe, shape, work))


def accelerator_host_bytes(recipe: Recipe, shape: LlamaShape, work: Workload) -> int:
    """Host RAM of a pre-pass on an accelerator: every held task's activations, which stay on
    the host, and the larger of the embedding stage and the blocks being read (each read on
    the host, then moved to the accelerator, where the Grams and the solve are)."""
    terms = prepass_host_terms(recipe, shape, work)
    return terms["activations"] + max(terms["blocks"], embedding_stage_bytes(recipe, shape, work))


def prepass_gpu_terms(recipe: Recipe, shape: LlamaShape, work: Workload) -> dict[str, int]:
    """GPU memory of the pre-pass, by term: the blocks being read, one batch (hidden states and
    the MLP's intermediate, in the forward dtype), the held tasks' Grams of one block, and the
    solve's sums or the factorisation (they run where the Grams are). The activations stay on
    the host and move batch by batch."""
    host = prepass_host_terms(recipe, shape, work)
    batch_values = work.batch * work.seq_len * (shape.hidden + shape.intermediate)
    return {**host, "activations": 0, "batch": batch_values * work.weight_bytes}


def forward_passes(recipe: Recipe) -> int:
    """How often every task's tokens run through each block."""
    return MERGED_SOURCE_PASSES if recipe.source == MERGED else 1


def forward_flops(shape: LlamaShape, work: Workload, passes: int = 1) -> float:
    """2 x the blocks' linear weights per token and pass, over every task's tokens. Attention
    scores (about 2 % at 8B and 512 tokens), norms and lm_head (the pre-pass stops after the
    last block) are left out."""
    linear = shape.layers * block_linear_params(shape)
    return 2.0 * linear * work.experts * work.tokens_per_task * passes


def gram_flops(shape: LlamaShape, work: Workload) -> float:
    """2 x tokens x d^2 per input group, layer and task."""
    per_layer = sum(width**2 for width in hessian_group_widths(shape))
    return 2.0 * work.tokens_per_task * per_layer * shape.layers * work.experts


def solve_flops(shape: LlamaShape, experts: int) -> float:
    """Per matrix: the Cholesky of the summed G~ (d^3 / 3), the right-hand side's product and
    triangular solves (2 x out x d^2), and each task's G~ tau^T (2 x out x d^2)."""
    per_layer = sum(
        d**3 / 3 + 2.0 * out * d**2 + experts * 2.0 * out * d**2 for out, d in block_matrices(shape)
    )
    return per_layer * shape.layers


def factor_flops(recipe: Recipe, shape: LlamaShape, experts: int) -> float:
    """Per task: each input group factorised (Cholesky of H, H^-1 from it, Cholesky of H^-1: d^3
    together; TIES methods), and with ``compensate`` the column-by-column re-fit of every
    matrix (2 x out x d^2)."""
    groups = sum(width**3 for width in hessian_group_widths(shape)) if not recipe.lockstep else 0
    refit = sum(2.0 * out * d**2 for out, d in block_matrices(shape)) if recipe.compensate else 0
    return experts * shape.layers * (groups + refit)


def prepass_flops(recipe: Recipe, shape: LlamaShape, work: Workload) -> dict[str, float]:
    """The pre-pass's FLOPs by precision: bf16 (forward), fp32 (Grams; TIES factorisations),
    fp64 (RegMean's solve and re-fit)."""
    factor = factor_flops(recipe, shape, work.experts)
    solve = solve_flops(shape, work.experts) if recipe.solves_in_prepass else 0.0
    return {
        "bf16": forward_flops(shape, work, forward_passes(recipe)),
        "fp32": gram_flops(shape, work) + (0.0 if recipe.lockstep else factor),
        "fp64": solve + (factor if recipe.lockstep else 0.0),
    }


def minutes(flops: dict[str, float], accelerator: Accelerator) -> float:
    """Minutes on one accelerator: each precision's FLOPs at its peak x the utilisation."""
    peaks = {
        "bf16": accelerator.bf16_flops,
        "fp32": accelerator.fp32_flops,
        "fp64": accelerator.fp64_flops,
    }
    seconds = sum(flops[k] / (peaks[k] * accelerator.utilisation) for k in flops)
    return seconds / 60


@dataclass(frozen=True)
class Projection:
    """One recipe's costs for one shape and workload."""

    model: str
    recipe: str
    disk_bytes: int
    disk_kept_bytes: int  # RegMean's with keep_statistics: true; TIES: the same as disk_bytes
    host_bytes: int
    gpu_bytes: int
    flops: float
    minutes: float
    model_bytes: int  # the merged model in the output dtype: the disk reference
    forward_minutes: float  # one plain forward pass of every task's tokens: the time reference


def project(
    model: str,
    shape: LlamaShape,
    recipe: Recipe,
    work: Workload = PROJECTED,
    accelerator: Accelerator = H100,
) -> Projection:
    flops = prepass_flops(recipe, shape, work)
    plain = {"bf16": forward_flops(shape, work)}
    return Projection(
        model=model,
        recipe=recipe.label,
        disk_bytes=cache_bytes(recipe, shape, work),
        disk_kept_bytes=cache_bytes(recipe, shape, work, keep=True),
        host_bytes=accelerator_host_bytes(recipe, shape, work),
        gpu_bytes=sum(prepass_gpu_terms(recipe, shape, work).values()),
        flops=sum(flops.values()),
        minutes=minutes(flops, accelerator),
        model_bytes=model_params(shape) * work.output_bytes,
        forward_minutes=minutes(plain, accelerator),
    )


def projections(work: Workload = PROJECTED, accelerator: Accelerator = H100) -> list[Projection]:
    return [
        project(model, shape, recipe, work, accelerator)
        for model, shape in SHAPES.items()
        for recipe in RECIPES
    ]


def assumptions(work: Workload = PROJECTED, accelerator: Accelerator = H100) -> str:
    return (
        f"{work.experts} experts, {work.samples} x {work.seq_len} calibration tokens per task, "
        f"batch {work.batch}, bfloat16 checkpoints and output; one {accelerator.name} (the "
        f"H200 computes as fast) at "
        f"{accelerator.utilisation:.0%} of its dense peaks: {accelerator.bf16_flops / 1e12:g} "
        f"TFLOP/s bf16 (forward), {accelerator.fp32_flops / 1e12:g} fp32 (Grams, no TF32), "
        f"{accelerator.fp64_flops / 1e12:g} fp64 (solve); GPU memory against its "
        f"{size(accelerator.memory_bytes)}"
    )


def markdown_table(work: Workload = PROJECTED, accelerator: Accelerator = H100) -> str:
    """The projection as docs/performance.md shows it."""
    lines = [
        "| model | method | disk | disk, `keep_statistics` | host RAM | GPU memory | FLOPs "
        "| minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in projections(work, accelerator):
        lines.append(
            f"| {p.model} | `{p.recipe}` | {size(p.disk_bytes)} | {size(p.disk_kept_bytes)} "
            f"| {size(p.host_bytes)} | {size(p.gpu_bytes)} | {p.flops:.2e} | {p.minutes:.1f} |"
        )
    return "\n".join(lines) + f"\n\n{assumptions(work, accelerator)}."


if __name__ == "__main__":
    print(markdown_table())
