from pathlib import Path

import mergekit.merge
import pytest
from merge_configs import regmean_config
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_sparsegpt.integration.registration import install

install()


def _run(config: dict, out: Path) -> None:
    mergekit.merge.run_merge(
        MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True)
    )


def _set_first_model(config, **values):
    config["models"][0]["parameters"].update(values)


BAD_INPUTS = [
    (
        "alpha high",
        "regmean",
        lambda c: c["parameters"].update(alpha=1.5),
        r"alpha must be in \[0, 1\]",
    ),
    (
        "alpha low",
        "regmean",
        lambda c: c["parameters"].update(alpha=-0.1),
        r"alpha must be in \[0, 1\]",
    ),
    (
        "nongram scale",
        "regmean",
        lambda c: c["parameters"].update(nongram_scale=float("inf")),
        "nongram_scale must be finite",
    ),
    (
        "density",
        "regmean",
        lambda c: _set_first_model(c, density=0.5),
        "Unknown parameter 'density'",
    ),
    (
        "typo",
        "regmean",
        lambda c: c["parameters"].update(nongram_scal=0.1),
        "Did you mean 'nongram_scale'",
    ),
    (
        "sign source",
        "sparsegpt_regmean",
        lambda c: c["parameters"].update(sign_from="raw"),
        "Unknown parameter 'sign_from'",
    ),
    ("per-model alpha", "regmean", lambda c: _set_first_model(c, alpha=0.5), "merge-wide setting"),
    (
        "negative weight",
        "regmean",
        lambda c: _set_first_model(c, weight=-1.0),
        "must be a finite number >= 0",
    ),
    (
        "zero weights",
        "regmean",
        lambda c: [m["parameters"].update(weight=0.0) for m in c["models"]],
        "give at least one model a positive weight",
    ),
    (
        "density range",
        "sparsegpt_regmean",
        lambda c: _set_first_model(c, density=1.5),
        r"outside \[0, 1\]",
    ),
    (
        "importance",
        "sparsegpt_regmean",
        lambda c: c["parameters"].update(importance="magnitude"),
        "Unknown importance",
    ),
    (
        "no calibration",
        "regmean",
        lambda c: c["models"][0]["parameters"].pop("calibration"),
        "has no 'calibration'.*or `statistics: <folder>`",
    ),
    (
        "calibration and statistics",
        "regmean",
        lambda c: _set_first_model(c, statistics="./exported/expert"),
        r"Model \S+ has both 'calibration' and 'statistics'",
    ),
    (
        "statistics under RegMean++",
        "regmean",
        lambda c: (
            c["parameters"].update(hessian_source="merged"),
            c["models"][0]["parameters"].pop("calibration"),
            _set_first_model(c, statistics="./exported/expert"),
        ),
        "has `statistics:`, but hessian_source: merged",
    ),
]


@pytest.mark.parametrize(
    "label, method, damage, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_one_clear_error_and_no_output(
    tiny_models, tmp_path, label, method, damage, message
):
    config = regmean_config(tiny_models, method, cache_dir=str(tmp_path / "cache"))
    damage(config)
    with pytest.raises(ValueError, match=message):
        _run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
