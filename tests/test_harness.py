"""Tests for the harness (what train.py imports), its loader and its budget enforcement.

    python -m pytest tests/test_harness.py -x -q

In-process tests drive a Run directly, standalone (budgets, FLOP counting, divergence);
whole-run tests start a small candidate through the real runner (run_budgeted), which
serves its batches and scores it over the socket of docs/CONTRACTS.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch_kit import harness
from autoresearch_kit import integrity
from autoresearch_kit.runner import run_budgeted
from autoresearch_kit.data.loader import TokenLoader

REPO = Path(__file__).resolve().parents[1]

# A small candidate in train.py's shape; the UPPER_CASE lines are rewritten per test.
CANDIDATE = '''
import os
import torch, torch.nn as nn, torch.nn.functional as F
from autoresearch_kit import harness
print("FD_SEEN", os.environ.get("AUTORESEARCH_CHANNEL_FD"))
CAUSAL = True
NAN_AT = -1
run = harness.start()

class M(nn.Module):
    def __init__(self, vocab, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return self.out(x + F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL).squeeze(1))

model = M(run.vocab_size)
loader = run.train_loader(8, 32)
run.watch(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
step = 0
while run.training(tokens=8 * 32):
    x, y = next(loader)
    with run.autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    if step == NAN_AT:
        loss = loss * float("nan")
    loss.backward()
    opt.step()
    opt.zero_grad()
    run.log(step=step, loss=loss, lr=1e-2)
    step += 1
run.finish(model)
'''


def run_candidate(source: str, tmp_path: Path, env_extra: dict | None = None,
                  timeout: float = 120) -> tuple[int, str]:
    """Run a candidate script on its own (`python train.py`, no runner): exit code, output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "train.py"
    script.write_text(source)
    # One OpenMP thread: the test box's 2 cores are shared, and oversubscribed OpenMP spin-waits
    # made these tiny runs ~30x slower (11 s vs 0.3 s of training, measured).
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def run_served(source: str, tmp_path: Path, budget: str, monkeypatch):
    """Run a candidate through the real runner (the static check off: it prints an env var)."""
    monkeypatch.setattr(integrity, "check_source", lambda source: [])
    res = run_budgeted(source, budget, workdir=tmp_path / "work", device="cpu", hard_limit=120,
                       env={"OMP_NUM_THREADS": "1"})
    return res, Path(res.log_path).read_text()


@pytest.fixture()
def fresh_harness(kit_env, monkeypatch):
    """Allow harness.start() in this process again (one run per process otherwise)."""
    monkeypatch.setattr(harness, "_started", False)
    monkeypatch.setenv("AUTORESEARCH_WARMUP_STEPS", "0")
    return kit_env


# --- imports ---------------------------------------------------------------------------------

def test_harness_import_stays_light():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import autoresearch_kit.harness"],
                         capture_output=True, text=True, check=True, cwd=REPO).stderr
    modules = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.splitlines() if "|" in line}
    assert "torch" in modules and "autoresearch_kit" in modules  # the parse saw real imports
    heavy = modules & {"pandas", "datasets", "openai", "ipywidgets", "matplotlib", "rustbpe", "IPython"}
    assert not heavy, f"harness pulls heavy modules into every candidate: {sorted(heavy)}"


# --- loader ------------------------------------------------------------------------------------

def test_loader_yields_shifted_windows_of_the_stream():
    tokens = np.arange(1000, dtype=np.uint16)  # token i sits at offset i: windows are easy to check
    loader = TokenLoader(tokens, batch_size=5, seq_len=16, device="cpu", seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(5, 16))  # contiguous windows
    assert int(y.max()) <= 999
    assert loader.tokens_yielded == 80
    next(loader)
    assert loader.tokens_yielded == 160 and loader.batches == 2


def test_loader_is_seeded_and_covers_the_stream():
    tokens = np.arange(300, dtype=np.uint16)
    a = TokenLoader(tokens, 4, 8, "cpu", seed=1)
    b = TokenLoader(tokens, 4, 8, "cpu", seed=1)
    c = TokenLoader(tokens, 4, 8, "cpu", seed=2)
    xa, xb, xc = next(a)[0], next(b)[0], next(c)[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    starts = torch.cat([next(a)[0][:, 0] for _ in range(200)])
    assert int(starts.min()) == 0 and int(starts.max()) == 300 - 9  # the last full window is reachable


def test_loader_refuses_a_window_longer_than_the_data():
    with pytest.raises(ValueError, match="seq_len=100"):
        TokenLoader(np.zeros(50, dtype=np.uint16), 2, 100, "cpu", seed=0)


# --- start, attributes -------------------------------------------------------------------------

def test_start_reads_the_environment_and_run_is_read_only(fresh_harness, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "5k-tokens")
    monkeypatch.setenv("AUTORESEARCH_SEED", "7")
    run = harness.start()
    assert run.device_type == "cpu" and run.seed == 7 and str(run.budget) == "5k-tokens"
    assert run.vocab_size == 257 and run.bos_id == 256
    assert run.tokenizer.decode(run.tokenizer.encode_ordinary("hi")) == "hi"
    for name, value in (("budget", None), ("progress", 1.0), ("anything", 1)):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(run, name, value)
    with pytest.raises(RuntimeError, match="already called"):
        harness.start()


def test_start_without_data_names_prepare(fresh_harness, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_DATA", str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="python prepare.py"):
        harness.start()


# --- budgets -------------------------------------------------------------------------------------

def _loop(run, loader, tokens_hint=None, step_fn=None, max_steps=10_000):
    steps = 0
    while run.training(tokens=tokens_hint) and steps < max_steps:
        next(loader)
        if step_fn is not None:
            step_fn(steps)
        steps += 1
    return steps


def test_token_budget_stops_at_the_count(fresh_harness, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "1000-tokens")
    run = harness.start()
    loader = run.train_loader(4, 16)  # 64 tokens a step
    progress = []
    steps = 0
    while run.training(tokens=64):
        next(loader)
        progress.append(run.progress)
        steps += 1
    assert steps == 15 and run.tokens == 960  # a 16th step would make 1024 > 1000
    assert progress == sorted(progress) and run.progress == 1.0


def test_token_budget_counts_what_the_loader_yielded_not_the_claim(fresh_harness, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "1000-tokens")
    run = harness.start()
    loader = run.train_loader(4, 16)
    steps = 0
    while run.training(tokens=1):  # claims 1 token a step, takes 128
        next(loader)
        next(loader)
        steps += 1
    assert run.tokens <= 1000 + 128 and steps <= 8


def test_seconds_budget_excludes_warmup_steps(fresh_harness, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "0.4s")
    monkeypatch.setenv("AUTORESEARCH_WARMUP_STEPS", "2")
    run = harness.start()
    loader = run.train_loader(2, 8)
    t0 = time.perf_counter()
    warming = []
    # the two warm-up steps take 0.5 s each (a compile, say): counted, they alone would end the run
    steps = _loop(run, loader, step_fn=lambda i: (warming.append(run.warming_up), time.sleep(0.5 if i < 2 else 0.05)))
    assert warming[:3] == [True, True, False] and not any(warming[2:])  # train.py sees which steps are warm-up
    wall = time.perf_counter() - t0
    assert steps >= 2 + 5
    assert run.progress == 1.0
    result_seconds = run._s.train_seconds
    assert 0.4 <= result_seconds < 0.4 + 0.3
    assert wall >= 1.0 + 0.4


def test_flop_budget_needs_watch(fresh_harness, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BUDGET", "1e9-flops")
    run = harness.start()
    run.train_loader(2, 8)
    with pytest.raises(RuntimeError, match="run.watch"):
        run.training(tokens=16)


def test_watch_counts_flops_exactly_and_leaves_training_alone(fresh_harness, monkeypatch):
    V, d, T = 257, 24, 16
    monkeypatch.setenv("AUTORESEARCH_BUDGET", f"{6 * d * V * 64 * 10}-flops")  # exactly 10 steps of 64 tokens
    run = harness.start()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, d), nn.Linear(d, V, bias=False))
    model[1].weight.grad = torch.ones_like(model[1].weight)  # a grad in flight must survive
    before = [p.detach().clone() for p in model.parameters()]
    loader = run.train_loader(4, T)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    info = run.watch(model)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG stream is untouched
    assert torch.equal(model[1].weight.grad, torch.ones_like(model[1].weight))
    assert model[0].weight.grad is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Linear d->V: 2dV forward, 4dV backward per token; the embedding lookup is free
    assert info["flops_per_token"] == 6 * d * V
    assert info["params"] == V * d + d * V
    assert _loop(run, loader, tokens_hint=64) == 10


def test_watch_counts_attention_on_cpu(fresh_harness):
    run = harness.start()
    T, d = 32, 16
    run.train_loader(2, T)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(257, d)

        def forward(self, idx):
            x = self.emb(idx)[:, None]  # one head of dim d
            return F.scaled_dot_product_attention(x, x, x, is_causal=True)[:, 0]

    info = run.watch(Attn())
    # SDPA over (1, 1, T, d): 4 T^2 d forward + 10 T^2 d backward (torch's formulas), per token
    assert info["flops_per_token"] == pytest.approx(14 * T * T * d / T)


# --- divergence ----------------------------------------------------------------------------------

def test_nan_loss_exits_with_code_3(fresh_harness, capsys):
    run = harness.start()
    run.train_loader(2, 8)
    assert run.training()
    run.log(step=0, loss=torch.tensor(3.0))
    assert run.training()
    run.log(step=1, loss=torch.tensor(float("nan")))  # materialised lazily: at the next log
    with pytest.raises(SystemExit) as e:
        run.log(step=2, loss=torch.tensor(2.0))
    assert e.value.code == harness.EXIT_DIVERGED
    assert "diverged: loss is nan at step 1" in capsys.readouterr().out
    assert run.training() is False


def test_exploding_loss_exits_after_warmup(fresh_harness, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_WARMUP_STEPS", "2")
    run = harness.start()
    run.train_loader(2, 8)
    losses = [5.0, 30.0, 4.0, 4.0, 16.0]  # 30 during warm-up is tolerated; 16 > 3 x 5 is not
    with pytest.raises(SystemExit) as e:
        for i, loss in enumerate(losses + [1.0]):
            assert run.training()
            run.log(step=i, loss=loss)
    assert e.value.code == harness.EXIT_DIVERGED
    assert i == len(losses)  # noticed when step 4's loss was materialised


# --- whole runs, as the runner starts them -------------------------------------------------------

def test_candidate_run_is_served_and_scored_by_the_runner(kit_env, tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(integrity, "check_source", lambda source: [])
    res = run_budgeted(CANDIDATE, "40k-tokens", workdir=tmp_path / "work", device="cpu", hard_limit=120,
                       env={"OMP_NUM_THREADS": "1"}, on_event=events.append)
    out = Path(res.log_path).read_text()
    assert res.status == "ok", res.reason + out
    assert "FD_SEEN None" in out  # the socket left os.environ before train.py ran
    assert res.tokens == 156 * 256 and res.steps == 3 + 156  # 157 x 256 > 40k: counted by the runner (after 3 warm-up steps, not counted)
    assert res.flops == pytest.approx(res.tokens * res.extra["flops_per_token"])
    assert "not verified" in res.extra["flops_source"]
    assert res.eval_tokens == 4096 and res.extra["eval"]["probes"] >= 1
    assert res.curve[-1]["step"] == res.steps - 1  # the last step always reaches the live curve
    assert set(res.curve[-1]) >= {"step", "loss", "lr", "tokens", "elapsed", "progress", "tok_per_s"}
    assert events and events[-1]["tokens"] == res.tokens  # the curve carries the runner's count
    # uniform over 257 tokens is ~8 bits per byte; a trained model is far below it
    assert 0 < res.val_bpb < math.log2(257) - 2
    assert f"val_bpb:          {res.val_bpb:.6f}" in out  # the child prints the runner's score
    assert out.rstrip().splitlines()[-1].startswith("num_params_M:")


def test_nan_candidate_reports_diverged(kit_env, tmp_path, monkeypatch):
    res, out = run_served(CANDIDATE.replace("NAN_AT = -1", "NAN_AT = 5"), tmp_path, "40k-tokens", monkeypatch)
    assert res.status == "diverged", res.reason
    assert "nan" in res.reason and res.val_bpb is None
    assert "val_bpb:" not in out


def test_non_causal_candidate_is_invalid(kit_env, tmp_path, monkeypatch):
    res, out = run_served(CANDIDATE.replace("CAUSAL = True", "CAUSAL = False"), tmp_path, "5k-tokens", monkeypatch)
    assert res.status == "invalid" and res.val_bpb is None
    assert "not causal" in res.reason
    assert "val_bpb:" not in out


def test_standalone_run_writes_last_result(kit_env, tmp_path):
    code, out = run_candidate(CANDIDATE, tmp_path, {"AUTORESEARCH_BUDGET": "5k-tokens"})
    assert code == 0, out
    saved = json.loads((Path(os.environ["AUTORESEARCH_CACHE"]) / "runs" / "last_result.json").read_text())
    assert saved["status"] == "ok" and f"val_bpb:          {saved['val_bpb']:.6f}" in out
    # the warm-up line says "compile included" only where something compiles: not on CPU
    assert "clock: started after 3 warm-up steps (" in out and "compile included" not in out


# --- device --------------------------------------------------------------------------------------

def test_detect_cpu_says_why_and_uses_bf16_without_compile(capsys, monkeypatch):
    from autoresearch_kit import device

    monkeypatch.setattr(device, "_announced", False)
    d = device.detect("cpu")
    assert (d.type, d.autocast_dtype, d.compile, d.peak_flops) == ("cpu", torch.bfloat16, False, None)
    assert d.name and "bf16 autocast" in d.reason
    assert d.reason in capsys.readouterr().out
    device.detect("cpu")
    assert capsys.readouterr().out == ""  # announced once per process
    fp = device.hardware_fingerprint(d)
    assert fp["device"] == "cpu" and fp["torch"] == torch.__version__ and fp["cpu_count"] >= 1


def test_detect_refuses_an_unavailable_or_unknown_device(monkeypatch):
    from autoresearch_kit import device

    with pytest.raises(ValueError, match="cuda, mps or cpu"):
        device.detect("tpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("AUTORESEARCH_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            device.detect()


def test_peak_flops_by_card_name():
    from autoresearch_kit.device import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Some Future GPU") is None
