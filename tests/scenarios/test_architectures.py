"""Architecture matrix: Hessians, merges and refusals across the model families we support.

Each family is a tiny random model built here from a transformers config (no download): a base
and two perturbed copies, saved with a tokenizer. For each one, the pre-pass's Hessians must equal
those of hooks on a full forward of the real model, both merges must run through mergekit's own
``run_merge`` and load, and every linear must have been merged with its Hessian. Also here: the
kernels on GPT-2's [in, out] and fused-expert layouts, an expert no token reaches, refusal of
architectures the pre-pass does not understand, and float16 / bfloat16 checkpoints.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mergekit.merge
import mergekit.merge_methods
import pytest
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import TensorGroup
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from statistics_helpers import never_ran
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from mergekit_sparsegpt.calibration.source import CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows
from mergekit_sparsegpt.capture.accumulate import TensorLayout
from mergekit_sparsegpt.capture.architecture import check_supported
from mergekit_sparsegpt.capture.blocks import capture_layer_hessians
from mergekit_sparsegpt.capture.head import (
    embedding_weight_name,
    head_weight_name,
    ties_embeddings,
)
from mergekit_sparsegpt.capture.hooks import ActivationError
from mergekit_sparsegpt.capture.model import empty_model
from mergekit_sparsegpt.capture.weights import CheckpointReader
from mergekit_sparsegpt.demo.tiny import train_tokenizer
from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.methods.biases import CONSTANT_INPUT
from mergekit_sparsegpt.methods.context import MergeContext, activated
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.statistics.hessian import hessian_statistics
from mergekit_sparsegpt.statistics.task_statistics import TaskStatistics
from mergekit_sparsegpt.trim.metrics import REPORT_FILE
from tests.norm_reference import is_reference_norm, reference_norm_energies

install()

SAMPLES, SEQ_LEN = 4, 16
DENSITY = 0.5
SIZES = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}


@dataclass(frozen=True)
class Architecture:
    config: Callable[[int], PretrainedConfig]  # vocabulary size -> config
    layers_prefix: str  # where the decoder blocks are, written out for the reference
    extra_tensors: Callable[[PretrainedConfig], dict[str, torch.Tensor]] | None = None


def _pythia_buffers(config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Buffers that Pythia checkpoints on the Hub hold and mergekit's gpt-neox definition
    requires, but transformers 5 no longer saves (nor reads: their values do not matter)."""
    positions = config.max_position_embeddings
    head_dim = config.hidden_size // config.num_attention_heads
    tensors = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"gpt_neox.layers.{layer}.attention"
        tensors[f"{prefix}.bias"] = torch.ones(1, 1, positions, positions).tril()
        tensors[f"{prefix}.masked_bias"] = torch.tensor(-1e9)
        tensors[f"{prefix}.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)
    return tensors


def _llama_like(config_class: type, **extra) -> Callable[[int], PretrainedConfig]:
    return lambda vocab: config_class(vocab_size=vocab, **SIZES, **TOKENS, **extra)


ARCHITECTURES = {
    "llama": Architecture(_llama_like(transformers.LlamaConfig), "model.layers"),
    "mistral": Architecture(
        _llama_like(transformers.MistralConfig, sliding_window=8), "model.layers"
    ),
    "qwen2": Architecture(_llama_like(transformers.Qwen2Config), "model.layers"),
    # Qwen2's small models: q/k/v biases and the head tied to the embedding.
    "qwen2_tied": Architecture(
        _llama_like(transformers.Qwen2Config, tie_word_embeddings=True), "model.layers"
    ),
    "qwen3": Architecture(_llama_like(transformers.Qwen3Config, head_dim=8), "model.layers"),
    "gemma2": Architecture(
        _llama_like(transformers.Gemma2Config, head_dim=8, sliding_window=4), "model.layers"
    ),
    "phi3": Architecture(
        _llama_like(transformers.Phi3Config), "model.layers"
    ),  # fused qkv, gate_up
    "gpt_neox": Architecture(
        lambda vocab: transformers.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **TOKENS,
        ),
        "gpt_neox.layers",
        _pythia_buffers,
    ),
    "gpt2": Architecture(  # Conv1D: W is [in, out]
        lambda vocab: transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS
        ),
        "transformer.h",
    ),
    "llama_tied": Architecture(
        _llama_like(transformers.LlamaConfig, tie_word_embeddings=True), "model.layers"
    ),
    "mixtral": Architecture(  # fused experts: [experts, 2 * intermediate, hidden] and so on
        _llama_like(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2),
        "model.layers",
    ),
    "qwen3_moe": Architecture(
        _llama_like(
            transformers.Qwen3MoeConfig,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
        ),
        "model.layers",
    ),
}


def _texts(kind: str) -> list[str]:
    if kind == "arithmetic":
        return [f"add {a}+{b}={a + b}" for a in range(60) for b in range(0, 60, 7)]
    return [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(_texts("arithmetic") + _texts("code"), 300).save_pretrained(path)
    return path


@dataclass(frozen=True)
class Family:
    name: str
    architecture: Architecture
    base: Path
    experts: tuple[Path, ...]
    calibration: tuple[Path, ...]  # one per expert


def _perturbed(model: torch.nn.Module, seed: int, skip: str | None = None) -> None:
    """Every parameter moved by a few percent of its spread (fine-tuning stand-in)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if skip and re.search(skip, name):
                continue
            spread = parameter.std().item() if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * (0.05 * spread if spread > 0 else 0.01))


def _save(model: torch.nn.Module, tokenizer_dir: Path, path: Path, extra=None) -> Path:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    if extra:
        weights = path / "model.safetensors"
        save_file({**load_file(weights), **extra}, weights, metadata={"format": "pt"})
    return path


def build_family(
    name: str,
    architecture: Architecture,
    root: Path,
    tokenizer_dir: Path,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    skip: str | None = None,
) -> Family:
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    config = architecture.config(vocab)
    extra = architecture.extra_tensors(config) if architecture.extra_tensors else None
    paths = []
    for seed in range(3):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        if prepare:
            prepare(model)
        if seed:
            _perturbed(model, seed, skip)
        paths.append(_save(model, tokenizer_dir, root / f"{name}_{seed}", extra))
    calibration = []
    for kind in ("arithmetic", "code"):
        path = root / f"{kind}.txt"
        path.write_text("\n".join(_texts(kind)), encoding="utf-8")
        calibration.append(path)
    return Family(name, architecture, paths[0], tuple(paths[1:]), tuple(calibration))


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def family(request, tmp_path_factory, tokenizer_dir) -> Family:
    root = tmp_path_factory.mktemp(request.param)
    return build_family(request.param, ARCHITECTURES[request.param], root, tokenizer_dir)


def _merge_config(family: Family, method: str, cache_dir: Path, **shared) -> dict:
    per_model = {"weight": 1.0} if method == "regmean" else {"weight": 1.0, "density": DENSITY}
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [
            {"model": str(path), "parameters": {**per_model, "calibration": str(calibration)}}
            for path, calibration in zip(family.experts, family.calibration, strict=True)
        ],
        "parameters": {
            "calibration_samples": SAMPLES,
            "calibration_seq_len": SEQ_LEN,
            "cache_dir": str(cache_dir),
            **shared,
        },
        "dtype": "float32",
    }


def _run_merge(config: dict, out: Path) -> dict[str, dict]:
    """The merge through mergekit's own entry point; returns the report's tensors."""
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
    )
    return json.loads((out / REPORT_FILE).read_text())["tensors"]


def _run_mergekit_yaml(config: dict, out: Path) -> dict[str, dict]:
    """The merge through the stock ``mergekit-yaml`` command in a fresh interpreter (the plugin
    arrives through its start-up hook); returns the report's tensors."""
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(path), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / REPORT_FILE).read_text())["tensors"]


# ---- the reference: hooks on a full forward of the real model --------------------------------


@contextmanager
def _recorded_matrix_inputs(model: torch.nn.Module, layers_prefix: str) -> Iterator[dict]:
    """Rows fed to every matrix of the decoder blocks during a forward, by checkpoint tensor name
    (``name[e]`` for expert ``e`` of a 3-D expert tensor): every ``F.linear`` whose weight is a
    block parameter or one expert's slice of one, and every GPT-2 ``Conv1D``."""
    names = {
        id(parameter): name
        for name, parameter in model.named_parameters()
        if name.startswith(layers_prefix + ".")
    }
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    linear = torch.nn.functional.linear

    def recording_linear(inputs, weight, bias=None):
        owner = weight if id(weight) in names else weight._base
        if id(owner) in names:
            name = names[id(owner)]
            if owner is not weight:  # one expert's [out, in] slice of a 3-D parameter
                name += f"[{(weight.storage_offset() - owner.storage_offset()) // owner.stride(0)}]"
            rows[name].append(inputs.reshape(-1, inputs.shape[-1]))
        return linear(inputs, weight, bias)

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, Conv1D) and module_name.startswith(layers_prefix + "."):

            def hook(_module, args, name=f"{module_name}.weight"):
                rows[name].append(args[0].reshape(-1, args[0].shape[-1]))

            handles.append(module.register_forward_pre_hook(hook))
    torch.nn.functional.linear = recording_linear
    try:
        yield rows
    finally:
        torch.nn.functional.linear = linear
        for handle in handles:
            handle.remove()


def reference_hessians(
    model: torch.nn.Module, windows: torch.Tensor, layers_prefix: str, sums: dict | None = None
) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T over all n windows, float64, of every matrix's input; ``sums`` (when
    given) receives each input's 2/n [sum x, tokens], the last row of [x; 1]'s Gram."""
    with _recorded_matrix_inputs(model, layers_prefix) as rows, torch.no_grad():
        model(input_ids=windows, use_cache=False)
    hessians = {}
    for name, chunks in rows.items():
        inputs = torch.cat(chunks).double()
        hessians[name] = 2 / len(windows) * inputs.T @ inputs
        if sums is not None:
            ones = torch.ones(len(inputs), 1, dtype=inputs.dtype)
            sums[name] = 2 / len(windows) * torch.cat([inputs, ones], dim=1).sum(0)
    return hessians


def _block_suffix(name: str, layers_prefix: str) -> str:
    # "model.layers.3.mlp.up_proj.weight" -> "mlp.up_proj.weight"
    return name.removeprefix(layers_prefix + ".").split(".", 1)[1]


def _tensor_of(matrix: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.*)\[(\d+)\]", matrix)
    return (match[1], int(match[2])) if match else (matrix, 0)


def _reference_model(path: Path, **kwargs) -> torch.nn.Module:
    # Eager experts: every expert's weight is applied with F.linear, where the hook sees it.
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", **kwargs)


def _windows(model_path: Path, calibration: Path) -> torch.Tensor:
    """The windows the pre-pass cuts from ``calibration`` for the model at ``model_path``."""
    texts = read_calibration_texts(CalibrationSource(str(calibration)), model_name="m")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return calibration_windows(texts, tokenizer, SAMPLES, SEQ_LEN, "m", str(calibration))


def _assert_hessian_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == torch.float32, name
    torch.testing.assert_close(
        actual.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max(), msg=name
    )


# ---- (a) Hessians ------------------------------------------------------------------------------


def test_hessians_equal_hooks_on_a_full_forward(family, tmp_path):
    """The statistics the merge reads (by mergekit's tensor names, through the cache) hold, for
    every matrix, the Hessian of its input on a full forward of the real model; an expert's
    Hessian comes from the tokens routed to it only."""
    config = _merge_config(
        family, "regmean", tmp_path / "cache", hessian_source="finetuned", keep_statistics=True
    )
    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
    )
    assert len(context.tasks) == 2
    for (model, calibration), task in context.tasks.items():
        path = Path(model.model.path)
        windows = _windows(path, Path(calibration))
        model_reference = _reference_model(path)
        sums: dict[str, torch.Tensor] = {}
        prefix = family.architecture.layers_prefix
        reference = reference_hessians(model_reference, windows, prefix, sums)
        assert reference, "the reference hooks saw no matrix"
        forward = functools.partial(model_reference, input_ids=windows)
        energies = reference_norm_energies(model_reference, forward, len(windows))
        assert energies, "the reference hooks saw no norm"
        tensors = defaultdict(dict)
        for matrix, hessian in reference.items():
            tensor, expert = _tensor_of(matrix)
            tensors[tensor][expert] = hessian
        prefix = family.architecture.layers_prefix
        in_blocks = [*tensors, *(name for name in energies if name.startswith(prefix + "."))]
        assert set(task.linear_suffixes) == {_block_suffix(name, prefix) for name in in_blocks}
        for norm, energy in energies.items():  # every norm, the final one included
            statistics = context.tensor_statistics_for(norm, model, calibration)
            assert statistics is not None, f"no channel energies for {norm}"
            (stats,) = statistics.matrices
            assert stats.is_diagonal and stats.hessian is None, norm
            torch.testing.assert_close(
                stats.hessian_diagonal.double(), energy, rtol=1e-4, atol=1e-5, msg=norm
            )
        for tensor, by_expert in tensors.items():
            statistics = context.tensor_statistics_for(tensor, model, calibration)
            assert statistics is not None, f"no Hessian for {tensor}"
            biased = tensor.removesuffix(".weight") + ".bias" in model_reference.state_dict()
            for expert, stats in enumerate(statistics.matrices):
                if expert in by_expert:
                    _assert_hessian_close(stats.hessian, by_expert[expert], f"{tensor}[{expert}]")
                else:  # no token was routed to this expert
                    assert statistics.samples[expert] == 0 and not stats.hessian.any()
            if biased and not statistics.layout.experts:  # the joint solve's input sums
                (stats,) = statistics.matrices
                torch.testing.assert_close(
                    stats.input_sum.double(), sums[tensor], rtol=1e-4, atol=1e-4, msg=tensor
                )


# ---- (b) and (c) merges ------------------------------------------------------------------------


def _linear_tensors(family: Family) -> set[str]:
    """Every checkpoint tensor whose matrices read an input on a full forward of the base."""
    windows = torch.randint(3, 200, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    reference = reference_hessians(
        _reference_model(family.base), windows, family.architecture.layers_prefix
    )
    return {_tensor_of(matrix)[0] for matrix in reference}


def _norm_tensors(family: Family) -> set[str]:
    """Every norm's scale of the base (the blocks' and the final norm)."""
    model = _reference_model(family.base)
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if is_reference_norm(module) and getattr(module, "weight", None) is not None
    }


@pytest.mark.parametrize(
    "method, shared, run",
    [
        ("sparsegpt_ties", {}, _run_mergekit_yaml),
        ("regmean", {"hessian_source": "finetuned"}, _run_merge),
    ],
    ids=["sparsegpt_ties-mergekit-yaml", "regmean-run_merge"],
)
def test_merge_loads_and_merges_every_linear_with_its_hessian(
    family, tmp_path, method, shared, run
):
    out = tmp_path / "out"
    report = run(_merge_config(family, method, tmp_path / "cache", **shared), out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    logits = merged(input_ids=torch.tensor([[1, 5, 9, 40, 7]])).logits
    assert torch.isfinite(logits).all()

    linears = _linear_tensors(family)
    written = set(load_file(out / "model.safetensors"))
    assert linears <= written  # mergekit's own names
    assert set(report) == written
    # Every tensor takes a data-aware rule, or is a bias or other matrix (GPT-2's position
    # embedding) listed as fallback: the decoder linears and the head by their Hessians, the
    # token embedding by its counts (a tied head is that tensor: it is not written), the norms
    # by the default norm_rule (their channel energies: tests/methods/test_norms.py).
    skeleton = empty_model(transformers.AutoConfig.from_pretrained(family.base))
    embedding, head = embedding_weight_name(skeleton, written), head_weight_name(skeleton, written)
    hessian_path = "importance" if method == "sparsegpt_ties" else "regmean"
    expected = {name: hessian_path for name in linears} | {embedding: "tokens"}
    expected |= {name: "norm-mean" for name in _norm_tensors(family)}  # norm_rule: mean
    biases = {b for name in linears if (b := name.removesuffix(".weight") + ".bias") in written}
    if method == "regmean":  # solved with their linears; the trimming methods' stock rule
        expected |= dict.fromkeys(biases, "regmean")
        norms = {n.removesuffix(".weight") + ".bias" for n in _norm_tensors(family)} & written
        reasons = {report[b]["reason"] for b in norms}  # LayerNorm's: no statistics
        assert reasons <= {"a norm's bias: its channel sums are not captured"}
    else:
        assert {report[b]["reason"] for b in biases} <= {CONSTANT_INPUT}
    if not ties_embeddings(skeleton):
        expected[head] = hessian_path
    else:
        assert head not in written
        assert report[embedding]["kind"] == "token embedding (tied to the head)"
        assert report[embedding].get("rule", "tokens") == "tokens"  # the default for both
    data_aware = {name: e["path"] for name, e in report.items() if e["path"] != "fallback"}
    assert data_aware == expected
    fallbacks = {name: e["kind"] for name, e in report.items() if e["path"] == "fallback"}
    # "norm or scale" here: GPT-NeoX's stored rotary inv_freq, a vector that is no norm's.
    assert set(fallbacks.values()) <= {"bias", "other matrix", "norm or scale"}, fallbacks


@pytest.mark.parametrize("name", ["gpt2", "mixtral"])
def test_regmean_through_the_merged_model_covers_conv1d_and_experts(name, tmp_path, tokenizer_dir):
    """RegMean++ builds the merge while it calibrates: Conv1D and fused experts included."""
    family = build_family(name, ARCHITECTURES[name], tmp_path / "models", tokenizer_dir)
    config = _merge_config(family, "regmean", tmp_path / "cache", hessian_source="merged")
    report = _run_merge(config, tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(merged(input_ids=torch.tensor([[1, 5, 9, 40, 7]])).logits).all()
    with_hessian = {tensor for tensor, entry in report.items() if entry["path"] == "regmean"}
    head = "lm_head.weight"  # GPT-2's is tied: the embedding takes both roles
    linears = _linear_tensors(family)
    biases = {b for name in linears if (b := name.removesuffix(".weight") + ".bias") in report}
    assert biases or name == "mixtral"  # GPT-2's Conv1D biases, solved with their weights
    assert with_hessian == linears | biases | ({head} if head in report else set())
    embedding = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
    assert report[embedding]["path"] == "tokens"


def test_supported_architectures_pass_the_check(family):
    config = transformers.AutoConfig.from_pretrained(family.base)
    check_supported(config, str(family.base))


# ---- the kernels on Conv1D and fused-expert layouts --------------------------------------------

KERNEL_CASES = {
    "ties wanda": ("sparsegpt_ties", {"importance": "wanda"}),
    "ties obs row compensated": (
        "sparsegpt_ties",
        {"importance": "obs", "selection": "row", "compensate": True},
    ),
    "dare sparsegpt": ("sparsegpt_dare", {"importance": "sparsegpt"}),
    "regmean": ("regmean", {}),
    "sparsegpt_regmean": ("sparsegpt_regmean", {}),
}
MODELS = {"a": 1.0, "b": 0.5}
COLUMNS = 6


def _hessian(seed: int) -> torch.Tensor:
    """(2/n) X^T X of correlated inputs whose columns differ in energy."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(COLUMNS) + 0.5 * torch.randn(COLUMNS, COLUMNS, generator=generator)
    inputs = torch.randn(40, COLUMNS, generator=generator) @ mixing
    inputs *= torch.linspace(0.2, 3, COLUMNS)
    return 2 / 40 * inputs.T @ inputs


def _context(name: str, layout: TensorLayout, hessians: dict[str, list[torch.Tensor]]):
    """A merge context whose tasks hold ``hessians[model][matrix]`` for tensor ``name``."""
    tasks = {}
    for model, matrices in hessians.items():
        task = TaskStatistics.empty("model.layers")
        for matrix, hessian in zip(layout.matrix_names(name), matrices, strict=True):
            task.groups[matrix] = matrix
            task.statistics[matrix] = hessian_statistics(
                hessian, keep_factor=True, keep_hessian=True
            )
            task.samples[matrix] = 40
        if layout != TensorLayout():
            task.layouts[name] = layout
        task.linear_suffixes = frozenset({_block_suffix(name, "model.layers")})
        tasks[(model, f"{model}.txt")] = task
    return MergeContext(hessian_inputs={}, tasks=tasks)


def _kernel_merge(method, context, name, tensors, **parameters) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, ids=["base", *MODELS], base_index=0, name=name)
    values = {"weight": MODELS, "calibration": {m: f"{m}.txt" for m in MODELS}, **parameters}
    if method != "regmean":
        values["density"] = {"a": 0.4, "b": 0.6}
    with activated(context):
        (merged,) = mergekit.merge_methods.get(method)([group], parameters=values)
    return merged


def _tensors(shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(*shape, generator=generator)
    return [base] + [base + 0.1 * torch.randn(*shape, generator=generator) for _ in MODELS]


@pytest.mark.parametrize("method, parameters", KERNEL_CASES.values(), ids=KERNEL_CASES)
def test_conv1d_tensor_merges_as_the_transpose_of_its_linear_form(method, parameters):
    """GPT-2 stores W as [in, out]: every step (scores, masks, re-fit, solve) must work on the
    transpose. Square, so that using the wrong axis cannot fail on shapes instead."""
    name = "model.layers.0.mlp.c_proj.weight"
    hessians = {model: [_hessian(seed)] for seed, model in enumerate(MODELS)}
    tensors = _tensors((COLUMNS, COLUMNS))  # [out, in]
    conv1d = _kernel_merge(
        method,
        _context(name, TensorLayout(input_axis=-2), hessians),
        name,
        [t.T.contiguous() for t in tensors],
        **parameters,
    )
    linear = _kernel_merge(
        method, _context(name, TensorLayout(), hessians), name, tensors, **parameters
    )
    torch.testing.assert_close(conv1d, linear.T)


def test_conv1d_scores_read_the_hessian_along_rows():
    """Plain reference: with W [in, out], entry (i, o) scores tau[i, o]^2 H[i, i] (wanda)."""
    name = "model.layers.0.mlp.c_proj.weight"
    hessians = {model: [_hessian(seed)] for seed, model in enumerate(MODELS)}
    context = _context(name, TensorLayout(input_axis=-2), hessians)
    tensors = _tensors((COLUMNS, COLUMNS))  # [in, out]
    merged = _kernel_merge(
        "sparsegpt_dare", context, name, tensors, rescale=False, combine="mean"
    )  # the plain weighted sum the reference below adds up
    expected = tensors[0].clone()
    for (model, weight), density in zip(MODELS.items(), (0.4, 0.6), strict=True):
        tau = tensors[1 + list(MODELS).index(model)] - tensors[0]
        scores = tau.square() * hessians[model][0].diagonal()[:, None]
        keep = torch.argsort(scores.flatten(), descending=True)[: int(density * tau.numel())]
        mask = torch.zeros(tau.numel())
        mask[keep] = 1
        expected += weight * tau * mask.reshape(tau.shape)
    torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("input_axis", [-1, -2], ids=["[E, out, in]", "[E, in, out]"])
@pytest.mark.parametrize("method, parameters", KERNEL_CASES.values(), ids=KERNEL_CASES)
def test_fused_experts_merge_as_each_expert_alone(method, parameters, input_axis):
    """A fused [experts, ...] tensor merges as its experts would one by one, each with its own
    Hessian and its own density."""
    experts = 3
    name = "model.layers.0.mlp.experts.down_proj"
    hessians = {
        model: [_hessian(10 * seed + expert) for expert in range(experts)]
        for seed, model in enumerate(MODELS)
    }
    layout = TensorLayout(input_axis, experts)
    shape = (experts, COLUMNS, 5) if input_axis == -2 else (experts, 5, COLUMNS)
    fused_tensors = _tensors(shape)
    context = _context(name, layout, hessians)
    fused = _kernel_merge(method, context, name, fused_tensors, **parameters)
    for expert in range(experts):
        single = {model: [matrices[expert]] for model, matrices in hessians.items()}
        alone = _kernel_merge(
            method,
            _context(name, TensorLayout(input_axis), single),
            name,
            [t[expert] for t in fused_tensors],
            **parameters,
        )
        torch.testing.assert_close(fused[expert], alone)


# ---- MoE: an expert no token reaches ---------------------------------------------------------

# Router rows c_e * u: expert e's logit is c_e (u . h), so the top 2 are experts 0 and 1 when
# u . h > 0 and experts 3 and 4 when it is negative; expert 2 (c = 0) never gets a token.
ROUTER_SCALES = (2.0, 1.0, 0.0, -1.0, -2.0)
UNROUTED = 2


def _collinear_router(model: torch.nn.Module) -> None:
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(torch.tensor(ROUTER_SCALES)[:, None] * direction)


@pytest.fixture(scope="module")
def unrouted_family(tmp_path_factory, tokenizer_dir) -> Family:
    architecture = Architecture(
        _llama_like(
            transformers.MixtralConfig,
            num_local_experts=len(ROUTER_SCALES),
            num_experts_per_tok=2,
        ),
        "model.layers",
    )
    root = tmp_path_factory.mktemp("unrouted")
    return build_family(
        "unrouted", architecture, root, tokenizer_dir, _collinear_router, skip=r"mlp\.gate\."
    )


def _magnitude_ties(base: torch.Tensor, finetuned: list[torch.Tensor]) -> torch.Tensor:
    """TIES on task vectors trimmed to their DENSITY largest |tau| (weights 1, normalize)."""
    trimmed = []
    for tensor in finetuned:
        tau = tensor - base
        keep = torch.argsort(tau.abs().flatten(), descending=True)[: int(DENSITY * tau.numel())]
        mask = torch.zeros(tau.numel())
        mask[keep] = 1
        trimmed.append(tau * mask.reshape(tau.shape))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    return base + (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


def test_expert_without_tokens_falls_back_to_magnitude_and_is_reported(unrouted_family, tmp_path):
    config = _merge_config(unrouted_family, "sparsegpt_ties", tmp_path / "cache")
    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
    )
    for task in context.tasks.values():
        assert sorted(never_ran(task)) == [
            f"model.layers.{layer}.mlp.experts.{tensor}[{UNROUTED}]"
            for layer in range(2)
            for tensor in ("down_proj", "gate_up_proj")
        ]
    report = _run_merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    # The fused expert tensors as transformers holds them (the checkpoints store one per expert).
    models = [
        AutoModelForCausalLM.from_pretrained(path)
        for path in (unrouted_family.base, *unrouted_family.experts)
    ]
    for layer in range(2):
        for tensor in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{tensor}"
            for entry in report[name]["models"].values():
                assert entry["experts_without_tokens"] == [UNROUTED]
            base, *finetuned = (model.get_parameter(name)[UNROUTED].detach() for model in models)
            expected = _magnitude_ties(base, finetuned)
            torch.testing.assert_close(merged[name][UNROUTED], expected)


# ---- refusals ----------------------------------------------------------------------------------


REFUSED = {
    "encoder-decoder": (
        transformers.T5Config(vocab_size=64, d_model=32, d_ff=48, num_layers=2, num_heads=4),
        "t5, which the Hessian pre-pass does not support (AutoModelForCausalLM cannot build it",
    ),
    "unknown mixer": (
        transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2),
        "unknown kind: mixer.A_log (MambaMixer, (64, 4)), mixer.conv1d.weight (Conv1d,",
    ),
}


@pytest.mark.parametrize("config, reason", REFUSED.values(), ids=REFUSED)
def test_unsupported_architecture_is_refused_from_its_config(config, reason, tmp_path):
    config.save_pretrained(tmp_path)  # a config and nothing else: no weight can be read
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError) as refused:
        check_supported(loaded, str(tmp_path))
    message = str(refused.value)
    assert message.startswith(f"Model {tmp_path} has architecture ")
    assert reason in message
    assert "Supported: decoder-only models" in message and "LlamaForCausalLM" in message


def test_block_with_an_unknown_parametrised_module_is_refused(monkeypatch):
    config = _llama_like(transformers.LlamaConfig)(64)
    config.architectures = ["LlamaForCausalLM"]

    class Scaled(torch.nn.Module):  # a matrix applied by a module the pre-pass cannot hook
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.empty(48, 32))

    mlp = transformers.models.llama.modeling_llama.LlamaMLP
    real = mlp.__init__

    def with_table(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.extra = Scaled()

    monkeypatch.setattr(mlp, "__init__", with_table)
    with pytest.raises(
        ValueError,
        match=r"^Model custom has architecture LlamaForCausalLM, .*"
        r"unknown kind: mlp\.extra\.table \(Scaled, \(48, 32\)\)",
    ):
        check_supported(config, "custom")


# ---- half precision ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float32_llama(tmp_path_factory, tokenizer_dir) -> Family:
    root = tmp_path_factory.mktemp("float32_llama")
    return build_family("llama", ARCHITECTURES["llama"], root, tokenizer_dir)


def _saved_in(dtype: torch.dtype, source: Path, target: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.save_pretrained(target)
    return target


@contextmanager
def _linear_input_dtypes() -> Iterator[set]:
    seen: set[torch.dtype] = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: (
            seen.add(args[0].dtype) if isinstance(module, torch.nn.Linear) else None
        )
    )
    try:
        yield seen
    finally:
        handle.remove()


def _capture(path: Path, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each matrix's Hessian from the pre-pass's capture over the checkpoint at ``path``."""
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    LoaderCache().setup(options=MergeOptions())
    config = transformers.AutoConfig.from_pretrained(path)
    reader = CheckpointReader(ModelReference.parse(str(path)), config.model_type)
    hessians = {}
    for layer in capture_layer_hessians(
        empty_model(config), reader, windows, batch_size=len(windows), progress=False
    ):
        hessians.update({m: layer.hessians[g] for m, g in layer.groups.items()})
    return hessians


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_forward_runs_in_the_checkpoint_dtype(float32_llama, tmp_path, dtype):
    path = _saved_in(dtype, float32_llama.base, tmp_path / "model")
    windows = torch.randint(3, 200, (4, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with _linear_input_dtypes() as seen:
        captured = _capture(path, windows)
    assert seen == {dtype}
    half = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    in_dtype = reference_hessians(half, windows, "model.layers")
    # The norms' energies: from their inputs in the checkpoint's dtype, normalized in float32.
    forward = functools.partial(half, input_ids=windows)
    in_dtype |= reference_norm_energies(half, forward, len(windows))
    in_float32 = reference_hessians(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), windows, "model.layers"
    )
    # The head's Hessian is captured too (in the checkpoint's dtype; compared in test_head.py).
    assert captured.keys() == in_dtype.keys() | {"lm_head.weight"}
    del captured["lm_head.weight"]
    for name, hessian in captured.items():
        assert hessian.dtype == torch.float32
        closeness = (hessian.double() - in_dtype[name]).norm() / in_dtype[name].norm()
        assert closeness < 1e-5, name
    # The half-precision forward measurably differs from a float32 one: the check above could
    # tell which one ran.
    assert any(
        (captured[n].double() - in_float32[n]).norm() / in_float32[n].norm() > 1e-4
        for n in in_float32
    )


def test_float16_overflow_names_the_layer(float32_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(float32_llama.base, dtype=torch.float16)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            weight = model.model.layers[0].mlp.get_submodule(name).weight
            weight.copy_(weight.float().div(weight.abs().max()).mul(60000).half())
    model.save_pretrained(tmp_path / "model")
    windows = torch.randint(3, 200, (2, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    with pytest.raises(
        ActivationError,
        match=rf"^Model {re.escape(str(tmp_path / 'model'))}: Non-finite activations entering "
        r"model\.layers\.0\.mlp\.down_proj \(float16 overflow\?\): .* float16 calibration "
        r"forward pass\. .*bfloat16",
    ):
        _capture(tmp_path / "model", windows)
