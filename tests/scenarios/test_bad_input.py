"""Every bad input we know, through the public entry points, with the exact message the user sees.

One row per bad input (docs_bad_input_table.md is the same list as a table). A fatal error must
leave no output directory and no cache entry behind; the rows that are not fatal (a warning, a
fallback) have tests of their own at the end.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mergekit.merge
import pytest
import torch
from merge_configs import regmean_config, sparsegpt_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from mergekit_sparsegpt.integration.registration import install
from mergekit_sparsegpt.prepass import run as prepass
from mergekit_sparsegpt.statistics import resumable
from mergekit_sparsegpt.statistics.cache_dir import CacheWriteError

install()

FIRST = "arithmetic"  # merge_configs lists the experts sorted: models[0] is this one
DOWN = "model.layers.{}.mlp.down_proj.weight"


@dataclass
class Bad:
    """One bad input in the making: the fixture models, a scratch directory, and the paths the
    expected message names (``names``, filled in by the row's ``damage``)."""

    models: Any
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    names: dict[str, Path | str] = field(default_factory=dict)
    out_name: str = "out"  # a row may point the output somewhere it must not go

    @property
    def out(self) -> Path:
        return self.tmp / self.out_name

    @property
    def cache(self) -> Path:
        return self.tmp / "cache"

    def config(self, method: str = "sparsegpt_ties", **shared: Any) -> dict[str, Any]:
        make = regmean_config if "regmean" in method else sparsegpt_config
        config = make(self.models, method, cache_dir=str(self.cache), **shared)
        self.names.update(
            model0=config["models"][0]["model"],
            cal0=config["models"][0]["parameters"]["calibration"],
            base=config["base_model"],
            cache=self.cache,
        )
        return config

    def first(self, config: dict[str, Any], **values: Any) -> dict[str, Any]:
        """``config`` with ``values`` set in models[0]'s parameters."""
        config["models"][0]["parameters"].update(values)
        return config

    def source(self, source: Path | str) -> dict[str, Any]:
        """The config with ``source`` as models[0]'s calibration."""
        config = self.first(self.config(), calibration=str(source))
        self.names["cal0"] = source
        return config

    def calibration(self, name: str, content: str | bytes) -> dict[str, Any]:
        """The config with a calibration file of this content for models[0]."""
        path = self.tmp / name
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        return self.source(path)

    def model(
        self,
        name: str,
        edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
        files: tuple[str, ...] | None = None,
    ) -> Path:
        """A copy of models[0]'s expert (only ``files`` of it), its weights changed by ``edit``."""
        source, target = Path(self.models.experts[FIRST]), self.tmp / name
        target.mkdir()
        for item in files or [p.name for p in source.iterdir()]:
            shutil.copy(source / item, target / item)
        if edit is not None:
            weights = load_file(target / "model.safetensors")
            edit(weights)
            save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
        return target

    def with_model(self, path: Path, method: str = "sparsegpt_ties", **shared: Any) -> dict:
        config = self.config(method, **shared)
        config["models"][0]["model"] = str(path)
        self.names["model0"] = path
        return config


def _set_inf(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(weights: dict[str, torch.Tensor]) -> None:
        weights[name][0, 0] = float("inf")

    return edit


def _smaller_mlp(weights: dict[str, torch.Tensor]) -> None:
    """A model of another size: every MLP 48 wide instead of 64 (config.json is fixed below)."""
    for name in list(weights):
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            weights[name] = weights[name][:48].contiguous()
        elif ".mlp.down_proj." in name:
            weights[name] = weights[name][:, :48].contiguous()


def _other_size(bad: Bad) -> dict:
    path = bad.model("smaller", _smaller_mlp)
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, "intermediate_size": 48}))
    return bad.with_model(path)


def _offset_slices(bad: Bad) -> dict:
    config = bad.config("regmean", hessian_source="merged")
    expert = config["models"][0]
    config["slices"] = [
        {
            "sources": [
                {"model": config["base_model"], "layer_range": [0, 1]},
                {**expert, "layer_range": [1, 2]},
            ]
        }
    ]
    del config["models"]
    return config


def _disk_full(bad: Bad) -> dict:
    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    bad.monkeypatch.setattr(resumable.shutil, "copyfileobj", no_space)  # after the header
    return bad.config()


def _read_only_cache(bad: Bad) -> dict:
    bad.cache.mkdir()
    bad.cache.chmod(0o555)
    if os.access(bad.cache, os.W_OK):  # root writes anyway: refuse as the kernel would

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs["dir"])

        bad.monkeypatch.setattr(resumable.tempfile, "NamedTemporaryFile", refuse)
        bad.monkeypatch.setattr(
            resumable.EntryWriter, "_open_checkpoint", lambda self: refuse(dir=self.checkpoint)
        )
    return bad.config()


def _misspelt_method(bad: Bad) -> dict:
    config = bad.config()
    config["merge_method"] = "sparsegpt_tie"
    return config


def _no_base_model(bad: Bad) -> dict:
    config = bad.config()
    del config["base_model"]
    return config


def _config_disagrees(bad: Bad) -> dict:
    path = bad.model("wrong_config")
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, "intermediate_size": 48}))
    return bad.with_model(path)


def _embedding_smaller_than_tokenizer(bad: Bad) -> dict:
    """An expert cut to 250 embedding rows (config.json too) that kept the 300-token tokenizer."""

    def cut(weights: dict[str, torch.Tensor]) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            weights[name] = weights[name][:250].contiguous()

    path = bad.model("smaller_vocabulary", cut)
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, "vocab_size": 250}))
    config = bad.with_model(path)
    config["tokenizer_source"] = "union"
    return config


def _spelled_twice(bad: Bad, spelling: str) -> dict:
    """models[0] listed a second time under another spelling of the same directory."""
    config = bad.config()
    entry = copy.deepcopy(config["models"][0])
    path = Path(entry["model"])
    if spelling == "trailing slash":
        entry["model"] = f"{path}/"
    elif spelling == "symlink":
        (bad.tmp / "link").symlink_to(path)
        entry["model"] = str(bad.tmp / "link")
    else:
        bad.monkeypatch.chdir(path.parent)
        entry["model"] = f"./{path.name}"
    config["models"].append(entry)
    bad.names["other"] = entry["model"]
    return config


def _listed_twice(bad: Bad) -> dict:
    config = bad.config()
    config["models"].append(copy.deepcopy(config["models"][0]))
    return config


def _copied_expert(bad: Bad) -> dict:
    config = bad.config()
    entry = copy.deepcopy(config["models"][0])
    entry["model"] = str(bad.model("copy"))
    config["models"].append(entry)
    bad.names["other"] = entry["model"]
    return config


def _out_at(bad: Bad, where: str) -> dict:
    config = bad.config()
    if where == "the base model":
        bad.out_name = config["base_model"]
    elif where == "a file":
        bad.out.write_text("my notes")
    else:
        bad.out.mkdir()
        (bad.out / "thesis.tex").write_text("mine")
    bad.names["out"] = bad.out
    return config


@dataclass(frozen=True)
class Row:
    id: str
    damage: Callable[[Bad], dict[str, Any]]
    # A regex on the message's distinctive part; "{name}" is the escaped path ``names[name]``.
    message: str
    error: type[BaseException] = ValueError


ROWS = [
    # --- calibration data ---
    Row(
        "calibration file missing",
        lambda b: b.source(b.tmp / "missing.txt"),
        r"^calibration data '{cal0}' for model '{model0}': file not found: {cal0}\. Fix the "
        r"path \(a relative path is resolved against the current directory, .*\)\.$",
    ),
    Row(
        "calibration file empty",
        lambda b: b.calibration("empty.txt", " \n\n"),
        r"^calibration data '{cal0}' for model '{model0}': contains no text\. Point the "
        r"calibration source at data with non-blank text\.$",
    ),
    Row(
        "calibration text too short",
        lambda b: b.calibration("short.txt", "def f(): pass\n"),
        r"^calibration data '{cal0}' for model '{model0}, run through {base}' gives only \d+ "
        r"tokens with that model's "
        r"tokenizer; calibration_samples x calibration_seq_len = 8 x 32 = 256 are needed\. Add "
        r"text or lower calibration_samples / calibration_seq_len\.$",
    ),
    Row(
        "calibration file of NUL bytes",
        lambda b: b.calibration("download.txt", bytes(65536)),
        r"^calibration data '{cal0}' for model '{model0}, run through {base}': 100% of its "
        r"characters are control or invisible format characters \(65,536 of the 65,536 read, "
        r"not counting spaces and line breaks; the first is U\+0000\)\. This does not look like "
        r"text: check that the file is a finished download",
    ),
    Row(
        "calibration text of zero-width characters",
        lambda b: b.calibration("invisible.txt", "\u200b" * 5000 + "\n"),
        r"^calibration data '{cal0}' for model '{model0}, run through {base}': 100% of its "
        r"characters are control or invisible format characters .*the first is U\+200B\)\.",
    ),
    Row(
        "calibration file not UTF-8",
        lambda b: b.calibration("latin1.txt", "café au lait ".encode("latin-1") * 100),
        r"^calibration data '{cal0}' for model '{model0}': {cal0} is not valid UTF-8 \('utf-8' "
        r"codec can't decode byte 0xe9 in position 3: invalid continuation byte\)\. Re-save the "
        r"file as UTF-8\.$",
    ),
    Row(
        "calibration file of an unsupported type",
        lambda b: b.calibration("data.csv", "text\nhello\n"),
        r"^calibration data '{cal0}' for model '{model0}': unsupported file type '\.csv'\. "
        r"Supported calibration sources: a \.txt file",
    ),
    Row(
        "calibration JSONL line not JSON",
        lambda b: b.calibration("bad.jsonl", '{"text": "a"}\n{oops\n'),
        r"^calibration data '{cal0}' for model '{model0}': {cal0} line 2 is not valid JSON "
        r"\(Expecting property name enclosed in double quotes at column 2\)\. Fix or remove that "
        r"line: a \.jsonl file holds one JSON object per line\.$",
    ),
    Row(
        "calibration JSONL record without the text field",
        lambda b: b.calibration("field.jsonl", '{"content": "a"}\n'),
        r"^calibration data '{cal0}' for model '{model0}': {cal0} line 1 has no field 'text' "
        r"\(fields: 'content'\)\. Set calibration_field to the field that holds the text, or add "
        r"it to that record\.$",
    ),
    Row(
        "calibration dataset name not in the local cache, offline",
        lambda b: _offline(b).source("someorg/not-a-cached-dataset"),
        r"^calibration data '{cal0}' for model '{model0}': the path does not exist and it could "
        r"not be loaded as a Hugging Face dataset \(.*\)\. Give an existing file or directory, "
        r"or a dataset name \('name' or 'name:config'\)\. Offline mode is on "
        r"\(HF_HUB_OFFLINE=1\), so only datasets already in the local Hugging Face cache load: "
        r"unset HF_HUB_OFFLINE to read it from the Hub, or download it once with network access "
        r"\(datasets\.load_dataset\('someorg/not-a-cached-dataset', split='train'\)\) so it is "
        r"in the cache\.$",
    ),
    Row(
        "model without calibration",
        lambda b: _without_calibration(b.config()),
        r"^Model {model0} has no 'calibration' parameter\. Every merged model needs calibration "
        r"text: add `calibration: <file or dataset>` to its parameters \(or a default under the "
        r"top-level `parameters:`\), or `statistics: <folder>` exported by `mergekit-sparsegpt "
        r"calibrate --export`\.$",
    ),
    # --- parameters ---
    Row(
        "density an empty list",
        lambda b: b.first(b.config(), density=[]),
        r"^'density' in models\[0\] \({model0}\) is an empty list: give it a value \(or, for a "
        r"number, a non-empty list of numbers as a per-layer gradient\)\.$",
    ),
    Row(
        "calibration_seq_len true",
        lambda b: b.config(calibration_seq_len=True),
        r"^'calibration_seq_len' in parameters must be an integer, got True$",
    ),
    Row(
        "calibration_samples a fraction",
        lambda b: b.config(calibration_samples=8.5),
        r"^'calibration_samples' in parameters must be an integer, got 8\.5$",
    ),
    Row(
        "calibration a list of sources",
        lambda b: b.first(b.config(), calibration=[str(p) for p in b.models.calibration.values()]),
        r"^'calibration' in models\[0\] \({model0}\) is a list, \[.*\]: mergekit reads a list as "
        r"a per-layer gradient, so each layer would get one of its items\. Give one source: put "
        r"the texts in one file \(for instance a \.jsonl with one record per document\) or one "
        r"dataset\.$",
    ),
    Row(
        "unknown importance",
        lambda b: b.config(importance="magnitude"),
        r"^Unknown importance 'magnitude'; choose one of design_note, obs, sparsegpt, wanda$",
    ),
    Row(
        "density above 1",
        lambda b: b.first(b.config(), density=1.5),
        r"^density 1\.5 for model {model0} at \S+ is outside \[0, 1\]; it is the fraction of "
        r"task-vector entries kept$",
    ),
    Row(
        "weight NaN",
        lambda b: b.first(b.config(), weight=float("nan")),
        r"^weight nan for model {model0} at \S+ must be a finite number: it scales the model's "
        r"task vector, and the merged weights would be inf/NaN$",
    ),
    Row(
        "weight inf (sparsegpt_dare)",
        lambda b: b.first(b.config("sparsegpt_dare"), weight=float("inf")),
        r"^weight inf for model {model0} at \S+ must be a finite number",
    ),
    Row(
        "negative weight for regmean",
        lambda b: b.first(b.config("regmean"), weight=-1.0),
        r"^weight -1\.0 for model {model0} at \S+ must be a finite number >= 0: RegMean weighs "
        r"each model's Hessian by it, and a negative weight makes the system indefinite$",
    ),
    Row(
        "every weight 0 for regmean",
        lambda b: _all_weights(b.config("regmean"), 0.0),
        r"^Every weight of the models feeding \S+ is 0; give at least one model a positive "
        r"weight$",
    ),
    Row(
        "misspelt parameter",
        lambda b: b.first(b.config(), calibraton="x.txt"),
        r"^Unknown parameter 'calibraton' in models\[0\] \({model0}\) for sparsegpt_ties\. Did you "
        r"mean 'calibration'\? Known parameters: cache_dir, calibration, .*, weight\.$",
    ),
    Row(
        "parameter of another method",
        lambda b: b.first(b.config("regmean"), density=0.5),
        r"^Unknown parameter 'density' in models\[0\] \({model0}\) for regmean\. Known "
        r"parameters: alpha, .*, weight\.$",
    ),
    Row(
        "merge-wide key given per model",
        lambda b: b.first(b.config(), importance="obs"),
        r"^'importance' in models\[0\] \({model0}\) is a merge-wide setting, which mergekit "
        r"ignores when it is given per model; move it to the top-level `parameters:`\.$",
    ),
    Row(
        "calibration_samples 0",
        lambda b: b.config(calibration_samples=0),
        r"^calibration_samples must be at least 1, got 0$",
    ),
    Row(
        "calibration_samples not an integer",
        lambda b: b.config(calibration_samples=2.5),
        r"^'calibration_samples' in parameters must be an integer, got 2\.5$",
    ),
    Row(
        "density not a number",
        lambda b: b.first(b.config(), density="half"),
        r"^'density' in models\[0\] \({model0}\) must be a number, got 'half'$",
    ),
    Row(
        "pre-pass setting that differs between tensors",
        lambda b: b.config(calibration_samples=[4, 8]),
        r"^calibration_samples must have one value for the whole merge \(it shapes the "
        r"Hessians\); the config resolves it to \[4, 8\] for different tensors$",
    ),
    Row(
        "unknown hessian_source",
        lambda b: b.config(hessian_source="expert"),
        r"^hessian_source must be one of finetuned, base, merged, got 'expert'$",
    ),
    Row(
        "hessian_source: merged with a trimming method",
        lambda b: b.config(hessian_source="merged"),
        r"^hessian_source: merged \(RegMean\+\+\) is for regmean and sparsegpt_regmean, not "
        r"sparsegpt_ties; use finetuned or base$",
    ),
    Row(
        "hessian_source: merged with slices layer offsets",
        _offset_slices,
        r"^hessian_source: merged merges layer by layer in the base model's layout, but \S+ "
        r"comes from another tensor of {model0} \(slices with layer offsets\); use "
        r"hessian_source: finetuned for such merges$",
    ),
    Row(
        "unknown selection",
        lambda b: b.config(selection="column"),
        r"^selection must be one of tensor, row, got 'column'$",
    ),
    Row(
        "unknown sign_from",
        lambda b: b.config(sign_from="merged"),
        r"^sign_from must be one of raw, compensated, got 'merged'$",
    ),
    Row(
        "alpha outside [0, 1]",
        lambda b: b.config("regmean", alpha=1.5),
        r"^alpha must be in \[0, 1\], got 1\.5: it is the share of each Hessian's off-diagonal "
        r"entries RegMean keeps \(1: exact least squares, 0: diagonal only\)$",
    ),
    Row(
        "negative dampening",
        lambda b: b.config(dampening=-0.01),
        r"^dampening must be a finite number >= 0, got -0\.01$",
    ),
    Row(
        "lambda not finite",
        lambda b: b.config(**{"lambda": float("inf")}),
        r"^lambda must be finite, got inf$",
    ),
    # --- models ---
    *(
        Row(
            f"one model spelled two ways ({spelling})",
            lambda b, spelling=spelling: _spelled_twice(b, spelling),
            r"^Models (?:{model0} and {other}|{other} and {model0}) are the same model \(\S+\) "
            r"spelled two ways: mergekit would treat them as two models and count its task "
            r"vector twice\. Write it one way everywhere in the config\.$",
        )
        for spelling in ("trailing slash", "symlink", "relative")
    ),
    Row(
        "one model listed twice",
        _listed_twice,
        r"^Model {model0} is listed twice in models \(entries 0 and 2\): mergekit keeps only one "
        r"entry's parameters\. List it once\.$",
    ),
    Row(
        "a copy of an expert listed as another model",
        _copied_expert,
        r"^Models (?:{model0} and {other}|{other} and {model0}) have the same weights \(a copy of "
        r"one directory\): the merge would count that model twice\. List it once\.$",
    ),
    Row(
        "output directory is the base model",
        lambda b: _out_at(b, "the base model"),
        r"^Output directory {base} is the input model {base}: the merge would overwrite it\. "
        r"Write the merge to a new directory\.$",
    ),
    Row(
        "output path is an existing file",
        lambda b: _out_at(b, "a file"),
        r"^Output path {out} is an existing file, not a directory: choose a new directory for "
        r"the merge \(or move the file away\)\.$",
    ),
    Row(
        "output directory holds other data",
        lambda b: _out_at(b, "other data"),
        r"^Output directory {out} holds thesis\.tex, which no merge writes: only an empty "
        r"directory or a previous merge's output is replaced\. Write the merge to a new "
        r"directory, or empty this one\.$",
    ),
    Row(
        "misspelt merge method",
        _misspelt_method,
        r"^Unimplemented merge method sparsegpt_tie$",
        RuntimeError,
    ),
    Row(
        "no base_model",
        _no_base_model,
        r"^sparsegpt_ties needs a base_model: every task vector is a model minus the base\. Add "
        r"`base_model: <the model the others were fine-tuned from>` to the config\.$",
    ),
    Row(
        "model path that does not exist",
        lambda b: b.with_model(b.tmp / "no_such_model"),
        r"^Model {model0} cannot be loaded \(there is no directory {model0}\)\. Give the "
        r"directory of a Hugging Face checkpoint \(config\.json and model\.safetensors or "
        r"pytorch_model\.bin, possibly sharded\) or a model id on the Hub\.$",
    ),
    Row(
        "model directory without config.json",
        lambda b: b.with_model(b.model("no_config", files=("model.safetensors",))),
        r"^Model {model0} cannot be loaded \(Unrecognized model in {model0}\. Should have a "
        r"`model_type` key in its config\.json\.\)\. Give the directory",
    ),
    Row(
        "model directory without weights",
        lambda b: b.with_model(b.model("no_weights", files=("config.json",))),
        r"^Model {model0} cannot be loaded \(Unable to find model files at {model0}\)\. Give the "
        r"directory",
    ),
    Row(
        "tokenizer missing next to the model",
        lambda b: b.with_model(
            b.model("no_tokenizer", files=("config.json", "model.safetensors")),
            hessian_source="finetuned",
        ),
        r"^Could not load the tokenizer of model {model0} \(.*\)\. Calibration text is tokenized "
        r"with the tokenizer of the model it runs through: save that tokenizer next to the "
        r"model's weights \(tokenizer\.save_pretrained\)\.$",
    ),
    Row(
        "tensor shapes differ between models",
        _other_size,
        r"^Tensor model\.layers\.0\.mlp\.\w+_proj\.weight has different shapes in the models "
        r"merged: .*\((?:48, \d+|\d+, 48)\) in {model0}.*\. Only models of one architecture and "
        r"size can be merged; check that every model is a fine-tune of the base model\.$",
    ),
    Row(
        "config.json that disagrees with the weights",
        _config_disagrees,
        r"^Model {model0}: its config\.json does not match its weights: model\.layers\.0\.mlp\."
        r"\w+_proj\.weight is \(\d+, \d+\) in model\.safetensors, but the config gives \(\d+, "
        r"\d+\)\. Save the config\.json that belongs to these weights \(or download the model "
        r"again\)\.$",
    ),
    Row(
        "tokenizer larger than the embedding, with tokenizer_source",
        _embedding_smaller_than_tokenizer,
        r"^The tokenizer saved with model {model0} has 300 tokens, but the model's embedding has "
        r"250 rows, so mergekit cannot map it for tokenizer_source: that tokenizer is not the "
        r"model's own\. Save the tokenizer the model was trained with next to its weights\.$",
    ),
    Row(
        "checkpoint missing a tensor (hessian_source: finetuned)",
        lambda b: b.with_model(
            b.model("missing_tensor", lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
            hessian_source="finetuned",
        ),
        r"^Model {model0} has no checkpoint tensor 'model\.layers\.1\.mlp\.up_proj\.weight', "
        r"which its transformers architecture needs for the calibration forward pass$",
    ),
    Row(
        "checkpoint missing a tensor (hessian_source: base)",
        lambda b: b.with_model(
            b.model("missing_tensor", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
        ),
        r"^Tensor model\.layers\.1\.mlp\.up_proj\.weight required but not present in model "
        r"{model0}$",
        RuntimeError,
    ),
    Row(
        "checkpoint with inf weights (hessian_source: finetuned)",
        lambda b: b.with_model(
            b.model("inf_weights", _set_inf(DOWN.format(0))), hessian_source="finetuned"
        ),
        r"^Model {model0}: Non-finite activations entering model\.layers\.1\.input_layernorm: "
        r"\d+ of \d+ values are non-finite \(inf/NaN\) in the float32 calibration forward "
        r"pass\. Check the checkpoint for inf/NaN weights\.$",
    ),
    Row(
        "checkpoint with inf weights (hessian_source: base)",
        lambda b: b.with_model(b.model("inf_weights", _set_inf(DOWN.format(0)))),
        r"^model\.layers\.0\.mlp\.down_proj\.weight of model {model0} has inf/NaN entries\. "
        r"Check that checkpoint; if its values overflow the merge dtype, merge with dtype: "
        r"float32\.$",
    ),
    # --- the statistics cache ---
    Row(
        "disk full while writing the cache",
        _disk_full,
        r"^Could not write the statistics cache entry {cache}/[0-9a-f]{{64}}\.safetensors \(No "
        r"space left on device\)\. Free space there, make {cache} writable, or set cache_dir "
        r"\(or MERGEKIT_SPARSEGPT_CACHE\) to a writable directory with room for it\.$",
        CacheWriteError,
    ),
    Row(
        "read-only cache directory",
        _read_only_cache,
        r"^Could not write the statistics cache entry {cache}/[0-9a-f]{{64}}\.safetensors "
        r"\(Permission denied\)\. Free space there, make {cache} writable",
        CacheWriteError,
    ),
]


def _offline(bad: Bad) -> Bad:
    """HF_HUB_OFFLINE=1 as a user sets it; both libraries read it when imported, hence the
    flags. An empty datasets cache: nothing is in it."""
    import datasets.config
    import huggingface_hub.constants

    for variable in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        bad.monkeypatch.delenv(variable, raising=False)
    bad.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad.monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", bad.tmp / "hf_datasets")
    for module, flag in (
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ):
        bad.monkeypatch.setattr(module, flag, True)
    return bad


def _without_calibration(config: dict) -> dict:
    del config["models"][0]["parameters"]["calibration"]
    return config


def _all_weights(config: dict, weight: float) -> dict:
    for entry in config["models"]:
        entry["parameters"]["weight"] = weight
    return config


def _merge(config: dict, out: Path, quiet: bool = True) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=quiet)
    )


def _snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    """Everything at ``path``: a failed run must leave it byte for byte as it was."""
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _pattern(template: str, names: dict[str, Path | str]) -> str:
    return template.format(**{key: re.escape(str(value)) for key, value in names.items()})


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_clear_error_and_leaves_nothing(tiny_models, tmp_path, monkeypatch, row):
    bad = Bad(tiny_models, tmp_path, monkeypatch)
    config = row.damage(bad)
    before = _snapshot(bad.out)
    with pytest.raises(row.error) as raised:
        _merge(config, bad.out)
    message = str(raised.value)
    assert re.search(_pattern(row.message, bad.names), message, re.DOTALL), message
    assert _snapshot(bad.out) == before
    assert not [p for p in bad.out.parent.iterdir() if ".partial-" in p.name]
    entries = list(bad.cache.iterdir()) if bad.cache.exists() else []
    assert not [entry for entry in entries if entry.suffix == ".partial"]


# --- inputs that are not fatal, or fatal only in the merge ---


def test_truncated_cache_entry_is_reported_and_recomputed(
    tiny_models, tmp_path, monkeypatch, caplog
):
    bad = Bad(tiny_models, tmp_path, monkeypatch)
    config = bad.config()
    prepass.prepare_statistics(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    entries = sorted(bad.cache.glob("*.safetensors"))
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING):
        _merge(config, tmp_path / "out")
    pattern = (
        rf"Ignoring statistics cache {re.escape(str(bad.cache))}/[0-9a-f]{{64}}\.safetensors: "
        r".+; recomputing\."
    )
    assert len(re.findall(pattern, caplog.text)) == len(entries) == 2, caplog.text
    assert (tmp_path / "out" / "model.safetensors").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the recomputed entries are used
        prepass.prepare_statistics(
            MergeConfiguration.model_validate(config), MergeOptions(quiet=True)
        )
    assert "Ignoring" not in caplog.text


@pytest.mark.parametrize("method", ["sparsegpt_ties", "regmean", "regmean, kept"])
def test_cache_entry_deleted_during_the_merge(tiny_models, tmp_path, monkeypatch, method):
    """Without whole matrices the statistics are all in memory and the merge completes; with
    them (RegMean's kept statistics, compensate) it stops naming the entry, the model and the
    calibration; RegMean's solved linears, naming the entry and the tensor."""
    bad = Bad(tiny_models, tmp_path, monkeypatch)
    config = bad.config(method.split(",")[0])
    if method == "regmean, kept":
        config["parameters"]["keep_statistics"] = True
    original = prepass.prepare_statistics

    def then_delete(*args: Any, **kwargs: Any) -> Any:
        context = original(*args, **kwargs)
        for entry in bad.cache.glob("*.safetensors"):
            entry.unlink()
        return context

    monkeypatch.setattr(prepass, "prepare_statistics", then_delete)
    out = tmp_path / "out"
    if method == "sparsegpt_ties":
        _merge(config, out)
        assert (out / "model.safetensors").exists()
        return
    with pytest.raises(ValueError) as raised:
        _merge(config, out)
    needs = (
        r"Hessian statistics of model \S+ with calibration '\S+', needed for \S+"
        if method == "regmean, kept"
        else r"The solved linears of this merge, needed for \S+"
    )
    pattern = (
        rf"^{needs}: cache entry "
        rf"{re.escape(str(bad.cache))}/[0-9a-f]{{64}}\.safetensors can no longer be read \(.+\)\. "
        r"Delete that cache entry and rerun the merge; the pre-pass will recompute it\.$"
    )
    assert re.search(pattern, str(raised.value)), str(raised.value)
    assert not out.exists()


def _cholesky_always_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not positive definite even at the largest damping: unreachable with a finite Hessian
    (the last step adds the mean diagonal), so simulated."""
    original = torch.linalg.cholesky_ex

    def failing(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        factor, info = original(matrix, *args, **kwargs)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)


def test_not_positive_definite_falls_back_to_the_pseudo_inverse(
    tiny_models, tmp_path, monkeypatch, capsys
):
    bad = Bad(tiny_models, tmp_path, monkeypatch)
    config = bad.config(importance="obs")  # reads H^-1: the whole H is factorised
    _cholesky_always_fails(monkeypatch)
    _merge(config, tmp_path / "out", quiet=False)
    stderr = capsys.readouterr().err
    for name in ("code", "arithmetic"):
        calibration = re.escape(str(tiny_models.calibration[name]))
        pattern = (
            rf"Hessians of {re.escape(str(tiny_models.base))} on {calibration}: 0 needed more "
            r"damping than 0\.01, 9 needed the pseudo-inverse, 0 linears never ran \(ranked by "
            r"\|tau\|\)"
        )
        assert re.search(pattern, stderr), stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_not_positive_definite_with_compensate_is_an_error(tiny_models, tmp_path, monkeypatch):
    bad = Bad(tiny_models, tmp_path, monkeypatch)
    config = bad.config(compensate=True)
    _cholesky_always_fails(monkeypatch)
    with pytest.raises(ValueError) as raised:
        _merge(config, tmp_path / "out")
    pattern = (
        r"^(model\.layers\.\d+\.\S+|lm_head)\.weight of model \S+: compensate needs the Cholesky "
        r"factor of "
        r"its Hessian, which is missing \(the pseudo-inverse fallback was used, or the statistics "
        r"were computed without compensate\); delete that cache entry or raise dampening$"
    )
    assert re.search(pattern, str(raised.value)), str(raised.value)
    assert not (tmp_path / "out").exists()
