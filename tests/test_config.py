"""Budget parsing and the AUTORESEARCH_* configuration."""

from __future__ import annotations

import pytest

from autoresearch_kit import config
from autoresearch_kit.config import Budget


@pytest.mark.parametrize(
    ("text", "kind", "amount"),
    [
        ("60s", "seconds", 60), ("5min", "seconds", 300), ("5m", "seconds", 300), ("300", "seconds", 300),
        ("50M-tokens", "tokens", 50e6), ("2e6 tokens", "tokens", 2e6), ("1e15-flops", "flops", 1e15),
        ("3P-flops", "flops", 3e15), ("20s", "seconds", 20),
    ],
)
def test_budget_parse(text, kind, amount):
    b = Budget.parse(text)
    assert (b.kind, b.amount) == (kind, amount)
    assert Budget.parse(str(b)) == b  # the string form round-trips (it travels in the environment)


@pytest.mark.parametrize("text", ["abc", "5 parsecs", "-3s", "0s", "10X-tokens"])
def test_bad_budgets_say_what_to_write(text):
    with pytest.raises(ValueError, match="budget|Budget|scale|positive"):
        Budget.parse(text)


def test_budget_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        Budget(seconds=1, tokens=2)
    with pytest.raises(ValueError, match="exactly one"):
        Budget()


def test_data_dir_follows_env_then_latest_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    assert config.data_dir() == tmp_path / "data" / "builtin-bpe4096"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "LATEST").write_text("tinystories-bpe8192\n")
    assert config.data_dir() == tmp_path / "data" / "tinystories-bpe8192"
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path / "mine"))
    assert config.data_dir() == tmp_path / "mine"
    assert config.data_dir("builtin", "bytes") == tmp_path / "data" / "builtin-bytes"


def test_default_budget_depends_on_device(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BUDGET", raising=False)
    assert config.default_budget("cuda") == Budget(seconds=300)
    assert config.default_budget("cpu") == Budget(seconds=60)
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "1M-tokens")
    assert config.default_budget("cpu") == Budget(tokens=1_000_000)


def test_budgets_beyond_one_experiment_or_negative_are_refused():
    import pytest

    from autoresearch_kit.config import MAX_BUDGET, Budget

    for text, says in (("-3s", "must be positive"), ("- 5min", "must be positive"),
                       ("1e99-flops", "beyond what one experiment can spend"),
                       ("2e12-tokens", r"at most 1e\+12 tokens"), ("12 days", "Unknown budget unit")):
        with pytest.raises(ValueError, match=says):
            Budget.parse(text)
    assert Budget.parse("1e21-flops").amount == MAX_BUDGET["flops"]       # the limit itself is allowed
    with pytest.raises(ValueError, match="beyond"):
        Budget(seconds=2e6)
