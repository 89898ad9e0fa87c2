from mergekit_sparsegpt.statistics import cache_dir


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGEKIT_SPARSEGPT_CACHE", str(tmp_path / "c"))
    assert cache_dir.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MERGEKIT_SPARSEGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir.default_cache_dir() == tmp_path / "mergekit_sparsegpt"
