"""Tests for the baseline train.py: it runs as a real subprocess on tiny data under each
budget kind, and its failure modes (diverging, peeking ahead) end the way the runner expects.

    python -m pytest tests/test_train.py -x -q

The model is shrunk by rewriting the UPPER_CASE constants (the way the offline mutator edits
them), so each run takes seconds on a shared 2-core CPU.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_harness import run_served

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
HARNESS_API = {"start", "train_loader", "watch", "training", "log", "finish", "progress", "autocast"}
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_memory_gb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M"]


def with_constants(source: str, **values) -> str:
    """Rewrite `NAME = literal` lines of the constants block; fails if a name is missing."""
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = [^#\n]+", f"{name} = {value!r}", source, count=1, flags=re.M)
        assert n == 1, f"train.py has no constant {name}"
    return source


def small_train(**extra) -> str:
    # depth 1, width 64, 32 tokens x 8 rows: ~40k params, ~10 ms a step
    return with_constants(TRAIN.read_text(), CPU_DEPTH=1, CPU_SEQ_LEN=32, CPU_BATCH_SIZE=8, **extra)


def summary(out: str) -> dict[str, float]:
    lines = out.splitlines()
    block = lines[lines.index("---") + 1:]
    found = dict(line.split(":", 1) for line in block if ":" in line)
    assert list(found)[: len(SUMMARY_KEYS)] == SUMMARY_KEYS, block
    return {k: (None if v.strip() == "n/a" else float(v)) for k, v in found.items()}


def test_constants_block_is_literal_and_the_harness_api_is_all_it_uses():
    src = TRAIN.read_text()
    assert len(src.splitlines()) < 400
    tree = ast.parse(src)
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and isinstance(node.value, ast.Constant):
                constants[name] = node.value.value
        if isinstance(node, ast.Assign) and ast.unparse(node.value) == "harness.start()":
            break  # the literal block ends where the run starts
    assert {"CPU_DEPTH", "GPU_DEPTH", "CPU_SEQ_LEN", "GPU_SEQ_LEN", "MATRIX_LR", "WARMDOWN_FRAC"} <= set(constants)
    assert all(isinstance(v, (int, float, str, bool)) for v in constants.values())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in ("run", "harness")}
    assert {"start", "train_loader", "watch", "training", "log", "finish", "progress", "autocast"} <= used
    reads = {"device", "device_type", "vocab_size", "compile", "autocast_dtype", "eval_seq_len", "warming_up"}
    assert used <= HARNESS_API | reads, used - HARNESS_API - reads


def test_seconds_budget_run(kit_env, tmp_path, monkeypatch):
    res, out = run_served(small_train(), tmp_path, "3s", monkeypatch)
    assert res.status == "ok", res.reason + out
    s = summary(out)
    assert res.val_bpb == pytest.approx(s["val_bpb"], abs=1e-6)  # the child prints the runner's score
    # uniform over the 257 byte tokens is log2(257) = 8.0 bits per byte; 3 s of training beats it by far
    assert math.isfinite(s["val_bpb"]) and s["val_bpb"] < math.log2(257) - 3
    assert 3.0 <= res.training_seconds < 3.0 + 1.5  # the runner's clock; the last step may end past it
    assert res.wall_seconds > res.training_seconds + res.eval_seconds
    assert s["num_steps"] == res.steps > 10
    assert res.curve[0]["loss"] > res.curve[-1]["loss"]
    assert res.curve[-1]["lr_mult"] < 0.2 and res.curve[3]["lr_mult"] == 1.0  # the warm-down ran
    assert [c["lr_mult"] for c in res.curve[:3]] == [0.0] * 3  # the warm-up steps only compile
    assert re.search(r" \| lr x[0-9.]+ \|", out) and " | lr 1 |" not in out  # the printed line says it is a multiplier
    assert "compile included" not in out                    # CPU: nothing compiles


def test_the_warm_up_steps_leave_the_model_as_initialised(kit_env, tmp_path, monkeypatch):
    # Their batches are random ids (nothing to learn, the runner's choice): were they trained
    # on, the first timed step would start from a model pushed towards uniform answers
    # (0.036 bpb worse after 20 s on an H200) with the optimizer's moments full of noise.
    src = small_train().replace("step = 0\nwarming = True\n", (
        "step = 0\nwarming = True\n_w0 = [p.detach().clone() for p in model.parameters()]\n"), 1)
    src = src.replace("    x, y = next(loader)\n", (
        "    if step == 3:\n"
        "        print('warm-up moved', max((p - q).abs().max().item() for p, q in zip(model.parameters(), _w0)),"
        " 'moments', sum(len(o.state) for o in optimizers), flush=True)\n"
        "    x, y = next(loader)\n"), 1)
    assert "_w0" in src and "warm-up moved" in src
    res, out = run_served(src, tmp_path, "2k-tokens", monkeypatch)
    assert res.status == "ok", res.reason + out
    assert "warm-up moved 0.0 moments 0" in out, out


def test_token_and_flop_budgets(kit_env, tmp_path, monkeypatch):
    res, out = run_served(small_train(), tmp_path / "a", "30k-tokens", monkeypatch)
    assert res.status == "ok", res.reason + out
    assert res.tokens == 117 * 256 and res.steps == 3 + 117  # a 118th step would pass 30,000: not served (3 warm-up steps on random ids are not counted)
    # a token budget still reports the time it trained (item 17 saw training_seconds: 0.0)
    assert res.training_seconds > 0 and summary(out)["training_seconds"] > 0
    fpt = res.extra["flops_per_token"]
    assert fpt > 6 * res.params * 0.5  # measured: about 6 FLOPs per parameter per token
    budget = fpt * 256 * 40  # exactly 40 steps' worth of FLOPs
    res, out = run_served(small_train(), tmp_path / "b", f"{budget!r}-flops", monkeypatch)
    assert res.status == "ok", res.reason + out
    assert res.steps == 3 + 40 and res.flops == pytest.approx(budget)  # warm-up FLOPs are not counted
    assert "reported by train.py" in res.extra["flops_source"]


def test_exploding_learning_rate_ends_as_diverged(kit_env, tmp_path, monkeypatch):
    res, out = run_served(small_train(MATRIX_LR=1e30, EMBED_LR=1e30), tmp_path, "30k-tokens", monkeypatch)
    assert res.status == "diverged", res.reason
    assert res.val_bpb is None and "val_bpb:" not in out


def test_attention_without_the_causal_mask_is_invalid(kit_env, tmp_path, monkeypatch):
    res, out = run_served(small_train().replace("is_causal=True", "is_causal=False"), tmp_path, "10k-tokens",
                          monkeypatch)
    assert res.status == "invalid" and res.val_bpb is None
    assert "not causal" in res.reason


def test_train_py_without_prepared_data_says_what_to_run(tmp_path):
    env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_DEVICE": "cpu"}
    env.pop("AUTORESEARCH_DATA", None)
    p = subprocess.run([sys.executable, str(TRAIN)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert "python prepare.py" in p.stderr and "Traceback" not in p.stderr
