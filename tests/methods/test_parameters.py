import re

import pytest

from mergekit_sparsegpt.methods.parameters import IMPORTANCE, SELECTION, SIGN_FROM, Choice
from mergekit_sparsegpt.methods.registry import plugin_method


def test_choice_is_a_string_parameter_with_its_default():
    spec = Choice("colour", ("red", "blue"), "red").spec
    assert (spec.name, spec.value_type, spec.default, spec.scope.value) == (
        "colour",
        str,
        "red",
        "shared",
    )


def test_choice_refuses_what_is_not_a_choice_and_ignores_what_is_absent():
    choice = Choice("colour", ("red", "blue"), "red")
    choice.check({"colour": "blue"})
    choice.check({})
    with pytest.raises(ValueError, match="^colour must be one of red, blue, got 'green'$"):
        choice.check({"colour": "green"})


def test_choice_parameters_of_the_methods():
    assert SELECTION.choices == ("tensor", "row")
    assert SIGN_FROM.choices == ("raw", "compensated") and SIGN_FROM.default == "raw"
    assert IMPORTANCE.choices == ("design_note", "obs", "sparsegpt", "wanda")
    assert IMPORTANCE.default == "wanda"


MESSAGES = [
    ("selection", "rows", "selection must be one of tensor, row, got 'rows'"),
    (
        "importance",
        "magnitude",
        "Unknown importance 'magnitude'; choose one of design_note, obs, sparsegpt, wanda",
    ),
    ("lambda", float("inf"), "lambda must be finite, got inf"),
]


@pytest.mark.parametrize("method", ["sparsegpt_ties", "sparsegpt_dare", "sparsegpt_regmean"])
@pytest.mark.parametrize("name, value, message", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_trimming_methods_check_their_values(method, name, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        plugin_method(method).check_shared({name: value})


def test_sign_from_is_checked_where_there_is_sign_election():
    message = "sign_from must be one of raw, compensated, got 'median'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        plugin_method("sparsegpt_ties").check_shared({"sign_from": "median"})


@pytest.mark.parametrize("method", ["regmean", "sparsegpt_regmean"])
def test_regmean_checks_alpha_and_scales(method):
    with pytest.raises(ValueError, match=r"^alpha must be in \[0, 1\], got 1.5: it is the share"):
        plugin_method(method).check_shared({"alpha": 1.5})
    with pytest.raises(ValueError, match="^nongram_scale must be finite, got nan$"):
        plugin_method(method).check_shared({"nongram_scale": float("nan")})
    plugin_method(method).check_shared({"alpha": 0.0, "lambda": 2.0, "nongram_scale": 0.2})


def test_regmean_without_trim_has_no_trim_values_to_check():
    plugin_method("regmean").check_shared({"lambda": 1.0})
