"""Pick the device train.py runs on, and say why: CUDA > MPS > CPU.

    python -m autoresearch_kit.device        # prints the choice and the hardware fingerprint

`detect()` returns a `Device` with the torch device type, a readable name, the autocast
dtype, the dense bf16 peak FLOP/s where the card is known (for MFU), whether
torch.compile pays off, and a one-sentence reason. AUTORESEARCH_DEVICE forces a type,
AUTORESEARCH_PRECISION (bf16 | fp16 | fp32) the autocast dtype: fp16 is what GPUs without
bf16 (T4, P100, V100) get, and forcing it on a bf16 GPU tests that path.
Imported by the training child through the harness: torch and stdlib only.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

import torch

from autoresearch_kit import config
from autoresearch_kit.config import cpu_name  # noqa: F401  (torch-free, there for the Dask workers)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by card name, from the vendor data
# sheets. Matched in order on the lower-cased torch.cuda.get_device_name(); first hit wins,
# so the more specific names come first.
_PEAK_BF16 = (
    ("h200", 989e12),
    ("gh200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("a10g", 70e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
    # Cards without bf16 (compute capability < 8.0) train in fp16: their dense fp16 peak.
    ("v100", 125e12),  # SXM2; the PCIe card is 112e12
    ("p100", 18.7e12),  # PCIe, no tensor cores
    ("t4", 65e12),
)
_PRECISIONS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "half": "float16", "fp32": "fp32", "float32": "fp32"}

_announced = False


@dataclass(frozen=True)
class Device:
    """The device a run trains on.

    Attributes
    ----------
    type : str
        "cuda", "mps" or "cpu" (a torch device type).
    name : str
        The GPU name or the CPU model.
    autocast_dtype : torch.dtype or None
        Dtype for torch.autocast (None: train in float32).
    peak_flops : float or None
        Dense bf16 peak FLOP/s for MFU, when the card is known (fp16 for cards without bf16).
    compile : bool
        Whether torch.compile is worth its cold-start cost on this device.
    reason : str
        One sentence saying why this device and these settings were chosen.
    """

    type: str
    name: str
    autocast_dtype: torch.dtype | None
    peak_flops: float | None
    compile: bool
    reason: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type)

    def describe(self) -> str:
        """e.g. 'cuda: NVIDIA H100 80GB HBM3' (the RunResult.device string)."""
        return f"{self.type}: {self.name}"


def peak_flops_for(name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a known GPU name, else None."""
    low = name.lower()
    for key, flops in _PEAK_BF16:
        if key in low:
            return flops
    return None


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def precision() -> str | None:
    """The autocast dtype AUTORESEARCH_PRECISION asks for: "bfloat16", "float16", "fp32" or None (unset).

    Raises
    ------
    ValueError
        If the value is not one of bf16, fp16, fp32.
    """
    raw = (config.env("PRECISION") or "").strip().lower()
    if not raw:
        return None
    if raw not in _PRECISIONS:
        msg = f"AUTORESEARCH_PRECISION={raw!r} is not a precision: use bf16, fp16 or fp32 (or leave it unset)."
        raise ValueError(msg)
    return _PRECISIONS[raw]


def _apply(default: torch.dtype | None, asked: str | None) -> tuple[torch.dtype | None, str]:
    """The autocast dtype and its name for the reason: `asked` (precision()) wins over `default`."""
    dtype = default if asked is None else (None if asked == "fp32" else getattr(torch, asked))
    label = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "float32"}[dtype]
    return dtype, label + (" (AUTORESEARCH_PRECISION)" if asked is not None else "")


def _cuda(index: int = 0) -> Device:
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    # Native bf16 needs compute capability 8.0 (A100 and later). torch.cuda.is_bf16_supported()
    # also says yes where bf16 is only emulated (a T4 on torch >= 2.3), and Triton cannot
    # compile bf16 there, so the capability decides. T4 (7.5), V100 (7.0), P100 (6.0): fp16.
    native_bf16 = bool(torch.version.hip) or major >= 8
    asked = precision()
    if asked == "bfloat16" and not native_bf16:
        msg = (f"AUTORESEARCH_PRECISION=bf16 but {name} (compute capability {major}.{minor}) has no native bf16: "
               "use fp16, or leave AUTORESEARCH_PRECISION unset.")
        raise ValueError(msg)
    dtype, label = _apply(torch.bfloat16 if native_bf16 else torch.float16, asked)
    # torch.compile's GPU backend (Triton) needs compute capability 7.0: a P100 runs eager.
    compile_ok = bool(torch.version.hip) or major >= 7
    reason = (f"CUDA available: training on {name} with {label}"
              + (" and torch.compile" if compile_ok else
                 f" without torch.compile (Triton needs compute capability 7.0, this is {major}.{minor})"))
    return Device("cuda", name, dtype, peak_flops_for(name), compile_ok, reason)


def _mps() -> Device:
    # bf16 autocast on MPS needs macOS 14+ and is often slower than fp16 there; fp16
    # autocast without a grad scaler risks underflow in the gradients, so MPS trains
    # in float32, which is what works everywhere. No compile: inductor has no MPS path
    # worth its start-up cost in a 60 s budget.
    dtype, label = _apply(None, precision())
    return Device("mps", "Apple GPU (" + platform.machine() + ")", dtype, None, False,
                  f"no CUDA: training on Apple MPS in {label} (no torch.compile)")


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread" + ("s" if n != 1 else "")


def _cpu(why: str) -> Device:
    # bf16 autocast measured on the dev box (2-core EPYC with avx512_bf16): 7.5k tok/s
    # vs 4.4-5.0k fp32 for a 4M-param GPT. A cold torch.compile cost 18-31 s there, more
    # than it saves in a 60 s budget, so no compile on CPU.
    dtype, label = _apply(torch.bfloat16, precision())
    return Device("cpu", cpu_name(), dtype, None, False, f"{why}: training on CPU with {label}, {_threads()} (no torch.compile)")


def detect(prefer: str | None = None, *, announce: bool = True) -> Device:
    """Choose the device: `prefer`, else AUTORESEARCH_DEVICE, else CUDA > MPS > CPU.

    Parameters
    ----------
    prefer : str, optional
        "cuda", "mps" or "cpu" (a "cuda:1" style index is accepted for CUDA).
    announce : bool
        Print the choice and its reason (once per process).

    Returns
    -------
    Device

    Raises
    ------
    ValueError
        If the requested device type is unknown or not available here.
    """
    global _announced
    want = (prefer or config.env("DEVICE") or "").strip().lower() or None
    if want is not None:
        kind, _, idx = want.partition(":")
        if kind not in ("cuda", "mps", "cpu"):
            msg = f"Unknown device {want!r}: use cuda, mps or cpu (AUTORESEARCH_DEVICE)."
            raise ValueError(msg)
        asked = f"device {want!r} was asked for" + ("" if prefer else " (AUTORESEARCH_DEVICE)")
        if kind == "cuda" and not torch.cuda.is_available():
            msg = (f"{asked} but torch sees no CUDA GPU: leave the device unset to autodetect, "
                   "or install a CUDA build of torch.")
            raise ValueError(msg)
        if kind == "mps" and not _mps_available():
            msg = f"{asked} but MPS is not available here: leave the device unset to autodetect."
            raise ValueError(msg)
        if kind == "cuda":
            dev = _cuda(int(idx) if idx else 0)
        elif kind == "mps":
            dev = _mps()
        else:
            dev = _cpu("CPU requested")
    elif torch.cuda.is_available():
        dev = _cuda()
    elif _mps_available():
        dev = _mps()
    else:
        dev = _cpu("no CUDA")
    if announce and not _announced:
        _announced = True
        print(dev.reason, flush=True)
    return dev


def hardware_fingerprint(device: Device | None = None) -> dict:
    """What a result depends on: device type and name, autocast dtype, torch, CPU count, python.

    Stored with every experiment so numbers from different machines are never compared
    blindly.
    """
    dev = device or detect(announce=False)
    return {
        "device": dev.type,
        "device_name": dev.name,
        "precision": str(dev.autocast_dtype).removeprefix("torch.") if dev.autocast_dtype else "float32",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "platform": sys.platform,
    }


if __name__ == "__main__":
    import json

    d = detect()
    print(json.dumps({"device": d.describe(), "dtype": str(d.autocast_dtype), "peak_flops": d.peak_flops,
                      "compile": d.compile, **hardware_fingerprint(d)}, indent=2))
