"""Tests for the trusted metric (evaluate_bpb) and the causality probe.

    python -m pytest tests/test_metric.py -x -q

The reference bits-per-byte is computed here independently, in float64 numpy, from the
raw val stream; the metric must agree with it to 1e-6 and must not depend on batch size.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch_kit.data.shards import PreparedData
from autoresearch_kit.metric import causality_probe, evaluate_bpb, evaluate_bpb_detail


class Bigram(nn.Module):
    """Logits depend on the current token only: the reference can ignore rows entirely."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2.0)

    def forward(self, idx):
        return self.table[idx]


class TinyAttention(nn.Module):
    """One attention layer: its logits depend on the context (causal unless told otherwise)."""

    def __init__(self, vocab: int, dim: int = 16, causal: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.causal = causal

    def forward(self, idx):
        x = self.emb(idx)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).squeeze(1)
        return self.out(x + y)


class ReverseCumsum(nn.Module):
    """Non-causal: each position sums the embeddings of itself and everything after it."""

    def __init__(self, vocab: int, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx).flip(1).cumsum(1).flip(1)
        return self.out(x)


class PeekNext(nn.Module):
    """Non-causal in the most tempting way: position t sees token t+1 (the target)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, idx):
        nxt = torch.roll(idx, -1, dims=1)
        return 10.0 * F.one_hot(nxt, self.vocab).float() + self.bias


class Const(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1)


def _reference_bpb(model: nn.Module, data: PreparedData, n: int) -> float:
    """float64 numpy: a context-free model on the flat stream val[0:n] -> targets val[1:n+1]."""
    stream = np.asarray(data.val[: n + 1], dtype=np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(stream[:n])[None])[0].double().numpy()
    targets = stream[1:]
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    nats = -logp[np.arange(n), targets]
    nbytes = data.token_bytes[targets].astype(np.float64)
    keep = nbytes > 0
    return float(nats[keep].sum() / (math.log(2) * nbytes[keep].sum()))


def test_matches_float64_reference(tiny_data):
    data = PreparedData.open(tiny_data)
    model = Bigram(data.vocab_size)
    for n, seq_len in ((4096, 64), (3001, 128)):  # the second leaves a padded last row
        got = evaluate_bpb(model, data, seq_len=seq_len, eval_tokens=n)
        ref = _reference_bpb(model, data, n)
        assert got == pytest.approx(ref, rel=1e-6)


def test_uniform_logits_give_log2_vocab_per_scored_token(tiny_data):
    data = PreparedData.open(tiny_data)
    V, n = data.vocab_size, 5000
    d = evaluate_bpb_detail(Const(torch.zeros(V)), data, seq_len=100, eval_tokens=n)
    targets = np.asarray(data.val[1 : n + 1], dtype=np.int64)
    scored = int((data.token_bytes[targets] > 0).sum())
    assert scored < n  # the window contains BOS targets, which must not be scored
    assert d["bytes"] == int(data.token_bytes[targets].sum())
    assert d["bpb"] == pytest.approx(math.log2(V) * scored / d["bytes"], rel=1e-9)
    assert d["tokens"] == n


def test_special_targets_are_excluded(tiny_data):
    # A model that gives BOS (almost) zero probability: its BOS targets would cost ~1e4 nats
    # each if they were scored. Excluded, the rest see a uniform distribution over V-1 tokens.
    data = PreparedData.open(tiny_data)
    V = data.vocab_size
    logits = torch.zeros(V)
    logits[data.bos_id] = -1e4
    d = evaluate_bpb_detail(Const(logits), data, seq_len=64, eval_tokens=4096)
    targets = np.asarray(data.val[1:4097], dtype=np.int64)
    assert (targets == data.bos_id).any()
    scored = int((data.token_bytes[targets] > 0).sum())
    assert d["bpb"] == pytest.approx(math.log2(V - 1) * scored / d["bytes"], rel=1e-6)


def test_same_tokens_whatever_the_batch_size(tiny_data):
    data = PreparedData.open(tiny_data)
    model = TinyAttention(data.vocab_size)
    results = [evaluate_bpb_detail(model, data, seq_len=50, eval_tokens=2000, batch_size=b) for b in (1, 3, 7, None)]
    for r in results[1:]:
        assert r["bytes"] == results[0]["bytes"]
        assert r["bpb"] == pytest.approx(results[0]["bpb"], rel=1e-6)


def test_eval_tokens_clamped_to_the_val_split(tiny_data, capsys):
    data = PreparedData.open(tiny_data)
    d = evaluate_bpb_detail(Bigram(data.vocab_size), data, seq_len=256, eval_tokens=10**9)
    assert d["tokens"] == len(data.val) - 1
    assert "scoring all of them" in capsys.readouterr().out


def test_restores_train_mode_and_uses_no_grad(tiny_data):
    data = PreparedData.open(tiny_data)
    model = Bigram(data.vocab_size)
    model.train()
    evaluate_bpb(model, data, seq_len=32, eval_tokens=512)
    assert model.training
    assert model.table.grad is None
    model.eval()
    evaluate_bpb(model, data, seq_len=32, eval_tokens=512)
    assert not model.training


def test_tuple_output_uses_the_logits_and_a_loss_is_refused(tiny_data):
    data = PreparedData.open(tiny_data)
    base = Bigram(data.vocab_size)

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = base

        def forward(self, idx):
            return self.inner(idx), torch.tensor(0.0)  # (logits, a fake tiny loss)

    class LossOnly(WithLoss):
        def forward(self, idx):
            return torch.tensor(0.01)

    plain = evaluate_bpb(base, data, seq_len=32, eval_tokens=512)
    assert evaluate_bpb(WithLoss(), data, seq_len=32, eval_tokens=512) == pytest.approx(plain, rel=1e-9)
    with pytest.raises(TypeError, match="logits"):
        evaluate_bpb(LossOnly(), data, seq_len=32, eval_tokens=512)


def test_training_a_model_lowers_bpb(tiny_data):
    # The metric must reward learning: a few Adam steps on the bigram beat its random start.
    data = PreparedData.open(tiny_data)
    model = Bigram(data.vocab_size)
    before = evaluate_bpb(model, data, seq_len=64, eval_tokens=2048)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    train = torch.from_numpy(np.asarray(data.train[:20001], dtype=np.int64))
    for _ in range(30):
        loss = F.cross_entropy(model(train[:-1][None])[0], train[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_bpb(model, data, seq_len=64, eval_tokens=2048)
    assert after < before - 1.0


def test_causality_probe_passes_a_causal_model():
    r = causality_probe(TinyAttention(50, causal=True), vocab_size=50, seq_len=32, device="cpu", trials=3)
    assert r["causal"] is True
    assert r["max_diff"] <= 1e-5
    assert r["position"] is None


@pytest.mark.parametrize("model", [TinyAttention(50, causal=False), ReverseCumsum(50), PeekNext(50)],
                         ids=["unmasked-attention", "reverse-cumsum", "peek-next"])
def test_causality_probe_catches_a_model_that_peeks(model):
    r = causality_probe(model, vocab_size=50, seq_len=32, device="cpu")
    assert r["causal"] is False
    assert r["max_diff"] > 1e-3
    assert isinstance(r["position"], int)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_ce_has_the_bits_of_cross_entropy(dtype, monkeypatch):
    # chunked (small chunks here, so rows straddle chunk edges), converted and log-softmaxed
    # in place: the same float32 bits as F.cross_entropy on the whole float32 copy
    from autoresearch_kit import metric

    monkeypatch.setattr(metric, "_CE_CHUNK_ELEMENTS", 3 * 97 + 5)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 13, 97, generator=g) * 4).to(dtype)
    y = torch.randint(0, 97, (5, 13), generator=g)
    ref = F.cross_entropy(logits.float().reshape(-1, 97), y.reshape(-1), reduction="none")
    assert torch.equal(metric.token_ce(logits, y), ref)
    out = torch.full((65,), -1.0)
    metric.token_ce(logits, y, out=out)
    assert torch.equal(out, ref)


def test_the_score_is_the_same_bits_whatever_the_batch_size(tiny_data, monkeypatch):
    # one float64 sum over the targets in split order: batch sizes do not even move the last bit
    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS", raising=False)
    data = PreparedData.open(tiny_data)
    model = Bigram(data.vocab_size)
    results = [evaluate_bpb_detail(model, data, seq_len=50, batch_size=b) for b in (1, 3, 7, None)]
    assert len({(r["nats"], r["bytes"], r["bpb"]) for r in results}) == 1
    assert results[0]["tokens"] == len(data.val) - 1        # the whole split by default


def test_eval_tokens_all_or_a_span(tiny_data, monkeypatch):
    data = PreparedData.open(tiny_data)
    monkeypatch.delenv("AUTORESEARCH_EVAL_TOKENS", raising=False)
    assert evaluate_bpb_detail(Bigram(data.vocab_size), data, seq_len=64)["tokens"] == len(data.val) - 1
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "1000")
    assert evaluate_bpb_detail(Bigram(data.vocab_size), data, seq_len=64)["tokens"] == 1000
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "all")
    assert evaluate_bpb_detail(Bigram(data.vocab_size), data, seq_len=64)["tokens"] == len(data.val) - 1
    with pytest.raises(ValueError, match="positive count or 'all'"):
        evaluate_bpb_detail(Bigram(data.vocab_size), data, seq_len=64, eval_tokens="lots")
