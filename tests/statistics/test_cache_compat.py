"""Entries written before the cache was split into modules still hit (within a format version).

The golden values below were computed with the single-module cache (git history:
``mergekit_sparsegpt/statistics/cache.py``); ``data/entry_format4.safetensors`` was written by it.
Format 5 (the head's statistics and the token counts) retired format 4's entries on purpose: the
file is re-keyed to the current format to check that its contents still read the same.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file
from statistics_helpers import rekeyed_to_current_format

from mergekit_sparsegpt.statistics import keys
from mergekit_sparsegpt.statistics.entries import load_statistics
from mergekit_sparsegpt.statistics.hessian import hessian_statistics

PAYLOAD = {
    "format": 4,
    "model": "org/model@main",
    "weights": "wwwwwwww",
    "config": "cccccccc",
    "tokens": "tttttttt",
    "token_shape": [2, 8],
    "dampening": 0.01,
    "factors": True,
    "hessians": False,
}
ENTRY = Path(__file__).parent / "data" / "entry_format4.safetensors"
ENTRY_PAYLOAD = {**PAYLOAD, "hessians": True}


class _FixedConfig:
    def __init__(self, **changes):
        self.settings = {
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "rms_norm_eps": 1e-6,
            "_name_or_path": "/somewhere",
            "transformers_version": "5.24.0",
            **changes,
        }

    def to_dict(self):
        return dict(self.settings)


NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")


def test_key_and_fingerprints_are_those_of_existing_entries():
    assert keys.cache_key(PAYLOAD) == (
        "7399c843a3860699cbe942958831c87b1085e5dd6e3c3bbd4176a2c49e8a54d5"
    )
    assert keys.tokens_fingerprint(torch.arange(24).reshape(3, 8)) == (
        "088889b8071756d3559dc2172e525644f0be09d4b3fb26a697070bddcb805338"
    )
    # A fixed to_dict(): PretrainedConfig's own adds transformers_version and the defaults of
    # the installed transformers, which change between releases.
    assert keys.config_fingerprint(_FixedConfig()) == (
        "53a26b66c6564fd9eee489d2f6f8f43647e1f257ef8e54bdde93cf9468477c1a"
    )
    assert keys.config_fingerprint(_FixedConfig(_name_or_path="/elsewhere")) == (
        keys.config_fingerprint(_FixedConfig())
    )


def test_payload_builder_gives_the_payloads_of_existing_entries():
    assert keys.statistics_payload(
        model="org/model@main",
        weights="wwwwwwww",
        config="cccccccc",
        tokens="tttttttt",
        token_shape=[2, 8],
        dampening=0.01,
        factors=True,
        hessians=False,
    ) == {**PAYLOAD, "format": keys.FORMAT_VERSION}
    # hessian_source: merged, as prepass.merged_source built it (the task is added per entry).
    assert keys.statistics_payload(
        hessian_source="merged",
        merge="mmmm",
        weights={"a": "wa", "b": "wb"},
        config="cccc",
        tokens={"a on x.txt": "ta"},
        token_shape=[4, 16],
        dampening=0.1,
        factors=False,
        hessians=True,
    ) == {
        "format": keys.FORMAT_VERSION,
        "hessian_source": "merged",
        "merge": "mmmm",
        "weights": {"a": "wa", "b": "wb"},
        "config": "cccc",
        "tokens": {"a on x.txt": "ta"},
        "token_shape": [4, 16],
        "dampening": 0.1,
        "factors": False,
        "hessians": True,
    }


def test_an_entry_written_by_the_single_module_cache_is_read_with_its_statistics(tmp_path):
    entry = tmp_path / ENTRY.name
    entry.write_bytes(ENTRY.read_bytes())
    assert load_statistics(entry, ENTRY_PAYLOAD) is None  # format 4: recomputed
    payload = rekeyed_to_current_format(ENTRY, ENTRY_PAYLOAD, entry)
    loaded = load_statistics(entry, payload)
    assert loaded is not None
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    expected = hessian_statistics(2 / 20 * inputs.T @ inputs, 0.01, True, True)
    raw = load_file(ENTRY)
    for name in NAMES:
        stats = loaded.for_weight(name)
        assert stats is not None
        assert loaded.samples[name] == 20
        for field, value in expected.tensors().items():
            assert torch.equal(getattr(stats, field), value), field
            assert torch.equal(getattr(stats, field), raw[f"{name}::{field}"]), field
        assert (stats.damping, stats.inverse_path) == (expected.damping, expected.inverse_path)
    assert loaded.groups["model.layers.0.self_attn.k_proj.weight"] == NAMES[0]
