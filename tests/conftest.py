"""Shared fixtures: a tiny, fast-to-build model family (base + two experts) on real text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mergekit_sparsegpt.demo.build import Family, Sizes


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes a minute or more (deselect: -m 'not slow')")


def tiny_sizes() -> Sizes:
    """Fixture sizes: seconds to build, yet experts measurably learn their domain."""
    from mergekit_sparsegpt.demo.build import Sizes

    return Sizes(
        vocab=300,
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=64,
        seq_len=32,
        train_windows=256,
        batch_size=8,
        base_steps=30,
        base_lr=3e-3,
        expert_steps=20,
        expert_lr=3e-3,
        expert_batch_size=8,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Tiny Llama family saved as HF checkpoints (safetensors + tokenizer).

    Fields: ``base`` (path), ``experts`` (name -> path: "code", "arithmetic"),
    ``calibration`` (name -> file: code is ``.txt``, arithmetic is ``.jsonl`` with a ``text``
    field; each holds thousands of tokens), ``tokenizer`` (path), ``root``. Every weight of each
    expert differs from the base.
    """
    # Imported here so collecting tests that do not use the fixture stays torch-free.
    from mergekit_sparsegpt.demo.build import build_family

    return build_family(tmp_path_factory.mktemp("tiny_models"), tiny_sizes())
