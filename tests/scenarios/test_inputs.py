"""Inputs as users give them: LoRA adapters, models with their own tokenizers, the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_sparsegpt.calibration.source import CalibrationSource
from mergekit_sparsegpt.calibration.texts import read_calibration_texts
from mergekit_sparsegpt.calibration.windows import calibration_windows
from mergekit_sparsegpt.demo.tiny import train_tokenizer
from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.prepass import task_statistics
from mergekit_sparsegpt.prepass.tasks import DEFAULT_SEQ_LEN
from mergekit_sparsegpt.reporting.model_card import SECTION_TITLE

install()


def _prepare(config: dict, **flags):
    return prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=True, **flags)
    )


def _hooked_hessian_diagonals(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag(2/n X^T X) of every block linear's input, hooks on a full forward pass."""
    diagonals: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:

            def hook(_module, args, name=name):
                rows = args[0].reshape(-1, args[0].shape[-1]).double()
                diagonals[f"{name}.weight"] = 2 / len(windows) * rows.square().sum(0)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return diagonals


def _task_windows(tiny_models, domain: str, tokenizer_path: Path, samples=8, seq_len=32):
    texts = read_calibration_texts(CalibrationSource(str(tiny_models.calibration[domain])), "m")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return calibration_windows(texts, tokenizer, samples, seq_len, "m", "s")


# ------------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_adapter(tiny_models, tmp_path_factory) -> Path:
    """A random (non-zero) LoRA on the base's attention and MLP projections."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_models.base)
    adapter = get_peft_model(
        base,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    path = tmp_path_factory.mktemp("lora") / "adapter"
    adapter.save_pretrained(path)
    return path


def test_lora_model_is_calibrated_on_the_merged_weights(tiny_models, lora_adapter, tmp_path):
    from peft import PeftModel

    lora_model = f"{tiny_models.base}+{lora_adapter}"
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    config["models"][1]["model"] = lora_model  # sorted: arithmetic, code
    config["parameters"]["hessian_source"] = "finetuned"
    context = _prepare(config, lora_merge_cache=str(tmp_path / "lora_merged"))
    [statistics] = [s for (m, _), s in context.tasks.items() if str(m) == lora_model]

    windows = _task_windows(tiny_models, "code", tiny_models.base)
    base = AutoModelForCausalLM.from_pretrained(tiny_models.base).eval()
    on_base = _hooked_hessian_diagonals(base, windows)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_models.base), lora_adapter
    ).merge_and_unload()
    on_merged = _hooked_hessian_diagonals(merged.eval(), windows)
    # Layer 1's inputs come after layer 0's adapted v_proj and down_proj.
    name = "model.layers.1.self_attn.q_proj.weight"
    captured = statistics.for_weight(name).hessian_diagonal.double()
    torch.testing.assert_close(captured, on_merged[name], rtol=1e-4, atol=1e-6)
    assert (captured - on_base[name]).abs().max() > 1e-3 * on_base[name].abs().max()


def test_lora_without_merge_cache_names_the_flag(tiny_models, lora_adapter, tmp_path):
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path))
    config["models"][0]["model"] = f"{tiny_models.base}+{lora_adapter}"
    with pytest.raises(ValueError, match=r"is a LoRA adapter.*--lora-merge-cache DIR"):
        _prepare(config)


# ------------------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module")
def expert_with_own_tokenizer(tiny_models, tmp_path_factory) -> Path:
    """The code expert with a tokenizer of the same size trained on other text."""
    path = tmp_path_factory.mktemp("own_tokenizer") / "expert_code"
    shutil.copytree(tiny_models.experts["code"], path)
    texts = [tiny_models.calibration["code"].read_text(encoding="utf-8")[:20000]] * 2
    vocab = AutoTokenizer.from_pretrained(tiny_models.experts["code"]).vocab_size
    train_tokenizer(texts, vocab).save_pretrained(path)
    return path


@pytest.mark.parametrize("source", ["finetuned", "base"])
def test_each_task_is_tokenized_by_the_model_it_runs_through(
    tiny_models, expert_with_own_tokenizer, tmp_path, monkeypatch, source
):
    seen: list[torch.Tensor] = []
    original = task_statistics.capture_layer_hessians

    def recording(model, load_tensor, windows, **kwargs):
        seen.append(windows.clone())
        return original(model, load_tensor, windows, **kwargs)

    monkeypatch.setattr(task_statistics, "capture_layer_hessians", recording)
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path), hessian_source=source)
    config["models"][1]["model"] = str(expert_with_own_tokenizer)  # sorted: arithmetic, code
    _prepare(config)
    code_tokenizer = expert_with_own_tokenizer if source == "finetuned" else tiny_models.base
    expected = {
        "arithmetic": _task_windows(
            tiny_models,
            "arithmetic",
            tiny_models.experts["arithmetic"] if source == "finetuned" else tiny_models.base,
        ),
        "code": _task_windows(tiny_models, "code", code_tokenizer),
    }
    assert len(seen) == 2
    assert not torch.equal(
        _task_windows(tiny_models, "code", expert_with_own_tokenizer),
        _task_windows(tiny_models, "code", tiny_models.base),
    )  # the two tokenizers do differ on this text
    assert any(torch.equal(w, expected["code"]) for w in seen)
    assert any(torch.equal(w, expected["arithmetic"]) for w in seen)


def test_tokenizer_larger_than_the_embedding_is_refused(tiny_models, tmp_path):
    path = tmp_path / "expert_code"
    shutil.copytree(tiny_models.experts["code"], path)
    texts = [tiny_models.calibration["code"].read_text(encoding="utf-8")[:20000]]
    train_tokenizer(texts, 1000).save_pretrained(path)  # the model has 300 embedding rows
    config = sparsegpt_config(
        tiny_models, cache_dir=str(tmp_path / "c"), hessian_source="finetuned"
    )
    config["models"][1]["model"] = str(path)
    with pytest.raises(ValueError, match=rf"tokenizer saved with model {path} gives token id"):
        _prepare(config)


def test_windows_longer_than_the_positions_are_refused(tiny_models, tmp_path):
    positions = AutoModelForCausalLM.from_pretrained(
        tiny_models.base
    ).config.max_position_embeddings
    config = sparsegpt_config(
        tiny_models,
        cache_dir=str(tmp_path),
        calibration_seq_len=positions + 1,
        calibration_samples=1,
    )
    with pytest.raises(ValueError, match=rf"calibration_seq_len {positions + 1} is longer"):
        _prepare(config)


# ------------------------------------------------------------- defaults fitted to the model


def _unset(config: dict, *names: str) -> dict:
    for name in names:
        del config["parameters"][name]
    return config


def test_unset_seq_len_is_the_default_cut_to_the_models_context(tiny_models, tmp_path, capsys):
    positions = AutoModelForCausalLM.from_pretrained(
        tiny_models.base
    ).config.max_position_embeddings
    assert positions < DEFAULT_SEQ_LEN  # the case a user's short-context model hits
    config = _unset(sparsegpt_config(tiny_models, cache_dir=str(tmp_path)), "calibration_seq_len")
    config["parameters"]["calibration_samples"] = 2
    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=False)
    )
    said = capsys.readouterr().err
    assert f"calibration_seq_len not set: windows of {positions} tokens" in said
    assert f"the default {DEFAULT_SEQ_LEN} cut to the {positions} positions" in said
    assert {shape for shape in context.card_facts.windows.values()} == {(2, positions)}


def test_unset_seq_len_keeps_the_default_on_a_longer_context(tiny_models, tmp_path, capsys):
    model = tmp_path / "long_base"
    shutil.copytree(tiny_models.base, model)
    loaded = AutoModelForCausalLM.from_pretrained(model)
    loaded.config.max_position_embeddings = 4 * DEFAULT_SEQ_LEN
    loaded.config.save_pretrained(model)
    config = _unset(sparsegpt_config(tiny_models, cache_dir=str(tmp_path)), "calibration_seq_len")
    config["base_model"] = str(model)
    config["parameters"]["calibration_samples"] = 1
    context = prepass.prepare_statistics(
        MergeConfiguration.model_validate(config), MergeOptions(quiet=False)
    )
    said = capsys.readouterr().err
    assert f"calibration_seq_len not set: windows of {DEFAULT_SEQ_LEN} tokens\n" in said
    assert {shape for shape in context.card_facts.windows.values()} == {(1, DEFAULT_SEQ_LEN)}


def test_unset_samples_on_short_text_take_every_whole_window(tiny_models, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    text = tiny_models.calibration["code"].read_text(encoding="utf-8")
    short = tmp_path / "short.txt"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    short.write_text(tokenizer.decode(ids[: 20 * 32 + 5]), encoding="utf-8")
    config = _unset(sparsegpt_config(tiny_models, cache_dir=str(tmp_path)), "calibration_samples")
    config["models"][1]["parameters"]["calibration"] = str(short)
    with caplog.at_level("WARNING"):
        context = _prepare(config)
    windows = {str(model): shape for (model, _), shape in context.card_facts.windows.items()}
    expected = len(tokenizer(short.read_text(), add_special_tokens=False)["input_ids"]) // 32
    assert 16 <= expected < 128
    assert windows[str(tiny_models.experts["code"])] == (expected, 32)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    (warning,) = [w for w in warnings if "short.txt" in w]
    assert str(tiny_models.experts["code"]) in warning and f" {expected} whole windows" in warning


def test_unset_samples_below_the_floor_name_the_text_not_the_setting(tiny_models, tmp_path):
    short = tmp_path / "tiny.txt"
    short.write_text("def f(x):\n    return x\n" * 10, encoding="utf-8")
    config = _unset(sparsegpt_config(tiny_models, cache_dir=str(tmp_path)), "calibration_samples")
    config["models"][0]["parameters"]["calibration"] = str(short)
    with pytest.raises(ValueError, match="tiny.txt") as caught:
        _prepare(config)
    message = str(caught.value)
    assert "fewer than the 16 taken at least when calibration_samples is not set" in message
    assert "calibration_samples x calibration_seq_len" not in message


def test_samples_the_user_wrote_keep_the_strict_error(tiny_models, tmp_path):
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path), calibration_samples=100000)
    with pytest.raises(ValueError, match=r"calibration_samples x calibration_seq_len = 100000"):
        _prepare(config)


# ------------------------------------------------------------------------------ model card


def _card(config: dict, out: Path, **flags) -> str | None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, **flags)
    )
    card = out / "README.md"
    return card.read_text(encoding="utf-8") if card.exists() else None


def _table_row(card: str, first_cell: str) -> list[str]:
    for line in card.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in the card")


def test_model_card_names_method_densities_score_and_calibration(tiny_models, tmp_path):
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "cache"), importance="obs")
    config["models"][0]["parameters"]["density"] = [0.2, 0.6]  # a per-layer gradient
    card = _card(config, tmp_path / "out")
    section = card[card.index(SECTION_TITLE) :]
    assert "Merged with `sparsegpt_ties`" in section
    assert "8 windows of 32 tokens per model" in section
    assert _table_row(section, "importance")[1] == "obs"
    assert _table_row(section, "hessian_source")[1] == "base"  # the default, resolved
    header = _table_row(section, "model")
    for domain in ("arithmetic", "code"):
        row = dict(zip(header, _table_row(section, str(tiny_models.experts[domain])), strict=True))
        assert row["calibration data"] == str(tiny_models.calibration[domain])
        assert row["tokens (windows x length)"] == f"{8 * 32:,} (8 x 32)"
        assert row["weight"] == "1.0"
    arithmetic = dict(
        zip(header, _table_row(section, str(tiny_models.experts["arithmetic"])), strict=True)
    )
    assert arithmetic["density"].endswith("(varies by tensor)")
    assert arithmetic["density"].startswith("0.2 to 0.6")
    code = dict(zip(header, _table_row(section, str(tiny_models.experts["code"])), strict=True))
    assert code["density"] == "0.3"
    # 14 decoder linears and lm_head; the embedding by its token counts; 5 norms.
    rules = "Hessian importance: 15; token-count importance: 1; channel-energy importance: 0"
    assert f"{rules}; plain mean of the norm scales (norm_rule: mean): 5; stock ties: 0" in section


def test_model_card_for_regmean_lists_its_own_settings(tiny_models, tmp_path):
    card = _card(regmean_config(tiny_models, cache_dir=str(tmp_path / "c")), tmp_path / "out")
    section = card[card.index(SECTION_TITLE) :]
    assert "Merged with `regmean`" in section
    assert _table_row(section, "alpha")[1] == "1.0"
    assert _table_row(section, "hessian_source")[1] == "finetuned"
    assert "density" not in _table_row(section, "model")


def test_no_card_no_section(tiny_models, tmp_path):
    config = sparsegpt_config(tiny_models, cache_dir=str(tmp_path / "cache"))
    assert _card(config, tmp_path / "out", write_model_card=False) is None
