"""The fp16 path: what GPUs without bf16 (T4, P100, V100) train with, forced here on a CPU.

    python -m pytest tests/test_precision.py -x -q

device.py picks the autocast dtype from the GPU's compute capability (simulated below by
replacing torch.cuda's answers), AUTORESEARCH_PRECISION forces one, and train.py's loss
scaling and Newton-Schulz are run for real: the optimizer code is taken from train.py's own
source, and the whole train.py trains and is scored through the runner in fp16 autocast.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from autoresearch_kit import device
from test_harness import run_served
from test_train import small_train

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


# --- device.py -------------------------------------------------------------------------------

def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    # what torch >= 2.3 answers on a T4: bf16 "supported" (emulated); device.py must not ask it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize(("name", "capability", "dtype", "compiles"), [
    ("NVIDIA H200", (9, 0), torch.bfloat16, True),
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16, True),
    ("Tesla T4", (7, 5), torch.float16, True),
    ("Tesla V100-SXM2-16GB", (7, 0), torch.float16, True),
    ("Tesla P100-PCIE-16GB", (6, 0), torch.float16, False),  # Triton needs compute capability 7.0
])
def test_gpus_without_bf16_get_fp16_and_old_ones_no_compile(monkeypatch, name, capability, dtype, compiles):
    monkeypatch.delenv("AUTORESEARCH_PRECISION", raising=False)
    _fake_gpu(monkeypatch, name, capability)
    d = device._cuda()
    assert d.autocast_dtype == dtype and d.compile is compiles
    assert ("fp16 autocast" if dtype == torch.float16 else "bf16 autocast") in d.reason
    assert d.peak_flops is not None  # MFU is reported on these cards too (fp16 peak where no bf16)
    if not compiles:
        assert "compute capability 7.0" in d.reason


def test_precision_forces_fp16_on_a_bf16_gpu_and_refuses_bf16_where_missing(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA H200", (9, 0))
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "fp16")
    d = device._cuda()
    assert d.autocast_dtype == torch.float16 and "fp16 autocast (AUTORESEARCH_PRECISION)" in d.reason
    assert d.compile and d.peak_flops == device.peak_flops_for("NVIDIA H200")
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "fp32")
    assert device._cuda().autocast_dtype is None
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "bf16")
    with pytest.raises(ValueError, match=r"Tesla T4 \(compute capability 7.5\) has no native bf16: use fp16"):
        device._cuda()


def test_precision_on_cpu_and_a_bad_value(monkeypatch):
    monkeypatch.setattr(device, "_announced", True)
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "FP16")
    d = device.detect("cpu")
    assert d.autocast_dtype == torch.float16 and "fp16 autocast" in d.reason
    assert device.hardware_fingerprint(d)["precision"] == "float16"
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "fp32")
    assert device.detect("cpu").autocast_dtype is None
    monkeypatch.delenv("AUTORESEARCH_PRECISION")
    assert device.detect("cpu").autocast_dtype == torch.bfloat16  # the CPU default is unchanged
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "fp8")
    with pytest.raises(ValueError, match="AUTORESEARCH_PRECISION='fp8' is not a precision: use bf16, fp16 or fp32"):
        device.detect("cpu")


# --- train.py's optimizer code, taken from its source ---------------------------------------------

def _train_py_optimizer(ns_dtype: torch.dtype) -> dict:
    """newton_schulz and Muon exactly as train.py defines them, with NS_DTYPE set."""
    tree = ast.parse(TRAIN.read_text())
    wanted = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
              and n.name in ("newton_schulz", "Muon")]
    assert len(wanted) == 2, "train.py no longer defines newton_schulz and Muon"
    scope = {"torch": torch, "NS_DTYPE": ns_dtype}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(TRAIN), "exec"), scope)
    return scope


def test_newton_schulz_in_fp16_keeps_tiny_gradients():
    torch.manual_seed(0)
    G = torch.randn(2, 24, 40) * 1e-9  # below fp16's smallest subnormal (6e-8): zero if cast first
    assert G.half().abs().max() == 0
    ref = _train_py_optimizer(torch.float32)["newton_schulz"](G, 5)
    got = _train_py_optimizer(torch.float16)["newton_schulz"](G, 5)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.float() - ref).abs().max() < 0.02
    s = torch.linalg.svdvals(got.float())  # roughly orthogonalised: singular values near 1
    assert 0.5 < s.min() and s.max() < 1.5


def test_grad_scaler_with_muon_skips_a_step_that_overflowed():
    scope = _train_py_optimizer(torch.float16)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16))
    muon = scope["Muon"]([w], lr=0.02, momentum=0.95, ns_steps=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def step(grad_value):
        scaler.scale((w * grad_value).sum()).backward()  # d/dw = grad_value, times the scale
        scaler.step(muon)
        scaler.update()
        w.grad = None

    before = w.detach().clone()
    step(float("inf"))
    assert torch.equal(w.detach(), before)  # skipped: no NaN reached the weights or the momentum
    assert scaler.get_scale() == 2.0**15 and not muon.state  # scale halved, no momentum buffer yet
    step(1e-3)
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), before)
    assert torch.isfinite(muon.state[w]["buf"]).all()


# --- the whole train.py in fp16 autocast, through the runner -----------------------------------------

def test_train_py_trains_and_scores_in_fp16(kit_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PRECISION", "fp16")
    source = small_train()
    assert source.count("\nrun.finish(model)\n") == 1
    source = source.replace("\nrun.finish(model)\n", "\nprint('SCALER', scaler.is_enabled(), scaler.get_scale())"
                                                      "\nrun.finish(model)\n")
    res, out = run_served(source, tmp_path, "20k-tokens", monkeypatch)
    assert res.status == "ok", res.reason + out
    assert "training on CPU with fp16 autocast (AUTORESEARCH_PRECISION)" in out
    enabled, scale = out.split("SCALER ", 1)[1].split()[:2]
    assert enabled == "True" and 1.0 <= float(scale) <= 2.0**16  # the loss was scaled, by a finite scale
    assert res.val_bpb is not None and math.isfinite(res.val_bpb)
    assert res.val_bpb < math.log2(257) - 2  # it learned: uniform over the 257 byte tokens is 8.0 bpb
    assert res.curve[-1]["loss"] < res.curve[0]["loss"]
