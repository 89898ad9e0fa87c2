import os

from statistics_helpers import (
    PAYLOAD,
)

from mergekit_sparsegpt.statistics import keys as cache_keys


def test_entries_holding_more_matrices_serve_a_merge_needing_fewer():
    needs_nothing = {**PAYLOAD, "factors": False, "hessians": False}
    served_by = cache_keys.serving_payloads(needs_nothing)
    assert served_by[0] == needs_nothing
    assert [(p["factors"], p["hessians"]) for p in served_by[1:3]] in (
        [(True, False), (False, True)],
        [(False, True), (True, False)],
    )
    assert (served_by[3]["factors"], served_by[3]["hessians"]) == (True, True)
    needs_hessians = {**PAYLOAD, "factors": False, "hessians": True}
    assert cache_keys.serving_payloads(needs_hessians) == [
        needs_hessians,
        {**needs_hessians, "factors": True},
    ]
    everything = {**PAYLOAD, "factors": True, "hessians": True}
    assert cache_keys.serving_payloads(everything) == [everything]
    keys = {cache_keys.cache_key(p) for p in served_by}
    assert len(keys) == 4


def test_whole_entries_serve_a_diagonal_merge_and_never_the_reverse():
    diagonal = {**PAYLOAD, "factors": False, "hessians": False, cache_keys.DIAGONAL: True}
    whole = {key: value for key, value in diagonal.items() if key != cache_keys.DIAGONAL}
    served_by = cache_keys.serving_payloads(diagonal)
    assert served_by[0] == diagonal
    assert served_by[1:] == cache_keys.serving_payloads(whole)  # whole ones, fewest extras first
    assert not any(p.get(cache_keys.DIAGONAL) for p in cache_keys.serving_payloads(whole))
    assert cache_keys.cache_key(diagonal) != cache_keys.cache_key(whole)
    built = cache_keys.statistics_payload(
        weights="w",
        config="c",
        tokens="t",
        token_shape=[1, 2],
        dampening=0.01,
        factors=False,
        hessians=False,
        diagonal=True,
        model="m",
    )
    assert built[cache_keys.DIAGONAL] is True


def test_key_changes_with_every_payload_field():
    keys = {cache_keys.cache_key(PAYLOAD)}
    for field, value in [
        ("model", "./other"),
        ("tokens", "abd"),
        ("dampening", 0.1),
        ("format", 0),
        ("factors", True),
        ("hessians", True),
    ]:
        keys.add(cache_keys.cache_key({**PAYLOAD, field: value}))
    assert len(keys) == 7


def test_fingerprint_sees_changed_bytes(tmp_path):
    weights = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * 4096  # 1 MiB
    weights.write_bytes(bytes(data))
    before = cache_keys.weights_fingerprint([str(weights)])
    data[0] ^= 1
    weights.write_bytes(bytes(data))
    assert cache_keys.weights_fingerprint([str(weights)]) != before


def test_fingerprint_sees_an_in_place_edit_between_samples(tmp_path):
    weights = tmp_path / "model.safetensors"
    data = bytearray(8 << 20)  # 8 MiB: most bytes lie outside the sampled chunks
    weights.write_bytes(bytes(data))
    before = cache_keys.weights_fingerprint([str(weights)])
    data[(1 << 20) + 12345] = 7
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(0, os.stat(weights).st_mtime_ns + 1_000_000))
    assert cache_keys.weights_fingerprint([str(weights)]) != before


def test_config_fingerprint_changes_with_architecture_settings():
    from transformers import LlamaConfig

    one = LlamaConfig(hidden_size=32, rms_norm_eps=1e-6)
    two = LlamaConfig(hidden_size=32, rms_norm_eps=1e-1)
    assert cache_keys.config_fingerprint(one) == cache_keys.config_fingerprint(
        LlamaConfig(hidden_size=32, rms_norm_eps=1e-6)
    )
    assert cache_keys.config_fingerprint(one) != cache_keys.config_fingerprint(two)
    elsewhere = LlamaConfig(hidden_size=32, rms_norm_eps=1e-6, name_or_path="/other/spelling")
    assert cache_keys.config_fingerprint(one) == cache_keys.config_fingerprint(elsewhere)


# --- resume checkpoints: what an interrupted pre-pass leaves, and how a rerun uses it ---
