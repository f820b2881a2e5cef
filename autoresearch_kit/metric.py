"""The metric: validation bits per byte, and a probe that the model is causal. Trusted code.

    from autoresearch_kit.metric import evaluate_bpb, causality_probe
    bpb = evaluate_bpb(model, data_dir, seq_len=256)          # the whole val split, context 256
    causality_probe(model, vocab_size=4096, seq_len=256, device="cpu")["causal"]

Bits per byte is independent of the tokenizer: the summed cross-entropy (nats) over the
scored target tokens, divided by ln 2 times the UTF-8 bytes those tokens stand for.
Special tokens (BOS) have 0 bytes and are left out of both sums, as in the original
autoresearch. The cross-entropy is computed here, in float32, from the model's logits:
a loss the model returns is never used.

The scored set is two settings, the same here and in the runner (serve.py), which a Lab
pins when it is created (`data.json`, and every ledger record's `extra["eval"]`):

- the scored text: the targets val[1 : n + 1], where n is the whole val split by default
  on every device, or a fixed span of the first `eval_tokens` targets
  (AUTORESEARCH_EVAL_TOKENS);
- the evaluation context `seq_len`: the targets are cut into non-overlapping rows of
  seq_len, each row's inputs the tokens before its targets (the last row padded at its
  end, which a causal model cannot see). A different context is a different score.

Each target's cross-entropy is float32 (`token_ce`, the same bits as
`F.cross_entropy(logits.float(), y, reduction="none")`); the total is one float64 sum over
the scored targets in their order in the split (`total_nats`), so the number does not
depend on batch sizes or on the order the runner scores rows in.

A model that peeks at later tokens would get an absurdly low bpb; `causality_probe`
catches it by changing the tokens after a position and checking the logits up to that
position do not move. The harness runs it before scoring and marks such a run invalid.

Imported by the training child through the harness: torch, numpy and stdlib only.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from autoresearch_kit import config
from autoresearch_kit.data.shards import PreparedData

# Elements of float32 logits per eval batch: rows = budget // (seq_len * vocab). 2**25
# (128 MB) keeps CPU memory modest; on CUDA 2**28 (1 GB) keeps an H100 busy.
_LOGIT_BUDGET = {"cuda": 2**28, "mps": 2**26, "cpu": 2**25}


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _logits(model: torch.nn.Module, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Call the model on ids (B, T) and return its logits (B, T, V), checked."""
    out = model(x)
    if isinstance(out, (tuple, list)):
        # (logits, loss) or (logits, cache): the logits are the one (B, T, V) tensor
        cands = [o for o in out if torch.is_tensor(o) and o.dim() == 3 and tuple(o.shape[:2]) == tuple(x.shape)]
        if len(cands) != 1:
            msg = ("The model returned a tuple without exactly one (B, T, V) logits tensor. "
                   "finish(model) needs forward(ids) -> logits of shape (B, T, vocab).")
            raise TypeError(msg)
        out = cands[0]
    elif isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    if not torch.is_tensor(out) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(x.shape):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        hint = " (it looks like a loss)" if torch.is_tensor(out) and out.dim() == 0 else ""
        msg = (f"The model returned {got}{hint} for ids of shape {tuple(x.shape)}: the metric computes "
               "the cross-entropy itself and needs forward(ids) -> logits of shape (B, T, vocab).")
        raise TypeError(msg)
    if out.shape[-1] < vocab_size:
        msg = f"The model's logits have {out.shape[-1]} classes but the vocabulary has {vocab_size} tokens."
        raise ValueError(msg)
    return out


def _open(data) -> PreparedData:
    if isinstance(data, PreparedData):
        return data
    return PreparedData.open(config.data_dir() if data is None else data)


def eval_rows(val: np.ndarray, eval_tokens: int, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pinned evaluation rows: inputs, targets, and a mask of real (non-pad) targets.

    Targets are val[1 : eval_tokens + 1], cut into rows of seq_len; the last row is padded
    at its end (inputs with pad_id, targets masked out).
    """
    n = int(eval_tokens)
    stream = np.asarray(val[: n + 1], dtype=np.int64)
    rows = math.ceil(n / seq_len)
    x = np.full(rows * seq_len, pad_id, dtype=np.int64)
    y = np.zeros(rows * seq_len, dtype=np.int64)
    mask = np.zeros(rows * seq_len, dtype=bool)
    x[:n], y[:n], mask[:n] = stream[:n], stream[1 : n + 1], True
    return x.reshape(rows, seq_len), y.reshape(rows, seq_len), mask.reshape(rows, seq_len)


# Elements per float32 chunk in token_ce, per torch thread: 2**20 (4 MB) a thread stays in
# cache between the conversion, the log-softmax and the gather; a chunk per thread keeps
# the number of parallel regions (a barrier each) low. Measured on the 2-core dev box
# (bench/eval.py): 0.05 s for 33.5M bf16 logits on one thread, 0.28 s for F.cross_entropy.
_CE_CHUNK_ELEMENTS = 2**20


def token_ce(logits: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 cross-entropy of each position: logits (..., V), targets y (...) -> (N,) float32.

    The same bits as ``F.cross_entropy(logits.float(), y, reduction="none")`` (log-softmax,
    then the target's entry, negated), computed on the CPU in chunks of a few MB: each
    chunk is converted to float32 and log-softmaxed in place while it is in cache, instead
    of writing the whole float32 copy and a whole log-softmax of it. Off the CPU it is
    that call. `out`, if given, receives the result.
    """
    V = logits.size(-1)
    flat, yf = logits.reshape(-1, V), y.reshape(-1).to(logits.device)
    if logits.device.type != "cpu":
        ce = F.cross_entropy(flat.float(), yf, reduction="none")
        return out.copy_(ce) if out is not None else ce
    n = flat.size(0)
    res = out if out is not None else torch.empty(n, dtype=torch.float32)
    step = max(1, _CE_CHUNK_ELEMENTS * max(1, torch.get_num_threads()) // max(V, 1))
    buf = torch.empty(min(step, n), V, dtype=torch.float32)
    for i in range(0, n, step):
        j = min(n, i + step)
        b = buf[: j - i]
        b.copy_(flat[i:j])                                  # bf16/fp16 -> float32 (exact)
        torch.ops.aten._log_softmax.out(b, 1, False, out=b)  # in place: the row is read first
        torch.gather(b, 1, yf[i:j, None], out=res[i:j, None]).neg_()
    return res


def total_nats(ce: np.ndarray, y: np.ndarray, mask: np.ndarray, token_bytes: np.ndarray) -> tuple[float, int]:
    """The score's two sums over the scored targets, in their order: nats (float64) and bytes.

    ce, y, mask: arrays of one shape (the evaluation rows); token_bytes: bytes per token id.
    A target counts when it is real (mask) and stands for bytes (BOS does not).
    """
    w = np.asarray(token_bytes, dtype=np.int64)[np.asarray(y).reshape(-1)] * np.asarray(mask).reshape(-1)
    scored = w > 0
    nats = float(np.sum(np.asarray(ce, dtype=np.float32).reshape(-1)[scored], dtype=np.float64))
    return nats, int(w.sum())


def score_logits(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy (nats, float32 per token, float64 sum) and bytes of the scored targets.

    `token_ce` then `total_nats` on one batch. `evaluate_bpb_detail` and the runner
    (serve.py) keep each target's cross-entropy and sum once over the whole set instead.
    Targets whose token stands for no bytes (BOS) or that are padding (mask False) count
    in neither sum.
    """
    ce = token_ce(logits, y).cpu().numpy()
    return total_nats(ce, y.cpu().numpy(), mask.cpu().numpy(), token_bytes.cpu().numpy())


# Integer views of float logits, and the exponent bits that make a value inf or NaN.
_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
         torch.float32: (torch.int32, 0x7F800000)}


def _same_finite_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU logit blocks are bit for bit the same and all finite (numpy: a few
    GB/s even on a busy 2-core machine, where small torch reductions took 10-70 ms)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.dtype not in _BITS or a.device.type != "cpu":
        return False
    kind, mask = _BITS[a.dtype]
    x, y = a.contiguous().view(kind).numpy(), b.contiguous().view(kind).numpy()
    return bool(np.array_equal(x, y)) and not bool(np.any((x & mask) == mask))


PROBE_RELEVANT_LOGPROB = -30.0   # entries below this log-probability on both sides move no score
PROBE_MAX_SCALE = 30.0           # the tolerance's scale: an honest model's largest logit, at most this


def probe_mismatch(a: torch.Tensor, b: torch.Tensor, tol: float | None = None) -> dict:
    """Compare the logits (t+1, V) of one row and its probe up to the cut.

    A causal model gives the same logits at every position <= t whatever follows t: the
    row and its probe go through the model in the same batch, so an honest model's prefix
    logits agree to the bit in practice (max difference 0.0 on CPU, bf16 autocast, and on
    the H200). Otherwise they are compared as the score sees them: log-probabilities
    (log-softmax in float32), over the entries that carry probability on either side (log-
    probability above PROBE_RELEVANT_LOGPROB), with a tolerance relative to the largest of
    those logits, counted at most PROBE_MAX_SCALE: 1e-4 for float32 logits, 4e-3 for
    16-bit ones (half a bf16 step at the largest logit). So neither a huge logit on a
    class that is never likely (-1e9 on a padding class or BOS) nor a shift of every logit
    (softmax does not see it) widens the tolerance, as a scale taken from the raw logits
    did. A non-causal tiny model after 10 steps moved its prefix logits by 0.03 (1% of the
    largest): 2e-2 let it through.

    Returns
    -------
    dict
        causal (bool), max_diff (float), position (int or None: first position that moved).
    """
    if _same_finite_bits(a, b):
        return {"causal": True, "max_diff": 0.0, "position": None}   # an honest model, to the bit
    low = a.dtype in (torch.bfloat16, torch.float16) or b.dtype in (torch.bfloat16, torch.float16)
    rel = tol if tol is not None else (4e-3 if low else 1e-4)
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return {"causal": False, "max_diff": float("inf"), "position": 0}
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        bad = ~(torch.isfinite(a).all(dim=-1) & torch.isfinite(b).all(dim=-1))
        return {"causal": False, "max_diff": float("inf"), "position": int(torch.nonzero(bad)[0, 0])}
    la, lb = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
    relevant = (la > PROBE_RELEVANT_LOGPROB) | (lb > PROBE_RELEVANT_LOGPROB)
    diff = torch.where(relevant, (la - lb).abs(), torch.zeros_like(la)).amax(dim=-1)
    # the largest logit that carries probability, at most PROBE_MAX_SCALE: neither a huge logit
    # on an unlikely class nor a shift of every logit (a +1e6 one) widens the tolerance
    big = torch.where(relevant, a.abs(), torch.zeros_like(a))
    scale = min(PROBE_MAX_SCALE, max(1.0, float(big.max()) if big.numel() else 1.0))
    d = float(diff.max()) if diff.numel() else 0.0
    if d > rel * scale:
        return {"causal": False, "max_diff": d, "position": int(torch.nonzero(diff > rel * scale)[0, 0])}
    return {"causal": True, "max_diff": d, "position": None}


def scored_count(val_len: int, eval_tokens: int | None) -> int:
    """Targets scored in a val split of `val_len` tokens: all of them, or the first eval_tokens."""
    available = max(int(val_len) - 1, 0)
    return available if eval_tokens is None else min(int(eval_tokens), available)


def evaluate_bpb_detail(model: torch.nn.Module, data: "PreparedData | str | os.PathLike | None" = None, *,
                        seq_len: int, batch_size: int | None = None, eval_tokens: int | None = None,
                        device: "torch.device | str | None" = None,
                        autocast_dtype: torch.dtype | None = None, verbose: bool = True) -> dict:
    """Score a model on the scored validation set; the full record.

    The same scored set and the same arithmetic as the runner's evaluation (serve.py):
    the targets val[1 : n + 1] (n: the whole split, or `eval_tokens`) in rows of
    `seq_len`, float32 cross-entropy per target, one float64 sum in split order. On the
    same logits the runner and this function give the same bits.

    Parameters
    ----------
    model : torch.nn.Module
        Maps int64 ids (B, T) to logits (B, T, V).
    data : PreparedData, path or None
        The prepared data (default: `config.data_dir()`).
    seq_len : int
        The evaluation context: length of each evaluation row. A Lab pins it
        (`lab.data_pin["eval"]["seq_len"]`); pass the same to compare with its scores.
    batch_size : int, optional
        Rows per forward pass (default: from a memory budget). Does not change the result.
    eval_tokens : int, optional
        Score only the first `eval_tokens` targets (a fixed span). Default:
        AUTORESEARCH_EVAL_TOKENS, else the whole val split. Clamped, with a message, to
        what the split holds.
    device : torch.device or str, optional
        Default: the device of the model's parameters.
    autocast_dtype : torch.dtype, optional
        Run the forward pass under autocast (e.g. bf16, as in training). The
        cross-entropy is always float32.
    verbose : bool
        Print a note when eval_tokens is clamped.

    Returns
    -------
    dict
        bpb, nats, bytes, tokens (targets scored, specials included), seq_len, seconds.
    """
    t0 = time.perf_counter()
    data = _open(data)
    dev = torch.device(device) if device is not None else _model_device(model)
    seq_len = int(seq_len)
    if seq_len < 1:
        msg = f"seq_len must be positive, got {seq_len}."
        raise ValueError(msg)
    asked = config.parse_eval_tokens(eval_tokens) if eval_tokens is not None else config.default_eval_tokens()
    available = len(data.val) - 1
    if available < 1:
        msg = f"The val split of {data.path} is empty; prepare the data again (`python prepare.py --force`)."
        raise ValueError(msg)
    if asked is not None and asked > available and verbose:
        print(f"eval: the val split has {available:,} target tokens; scoring all of them "
              f"instead of the {asked:,} asked for", flush=True)
    n = scored_count(len(data.val), asked)
    x_all, y_all, m_all = eval_rows(data.val, n, seq_len, data.bos_id)
    ce_all = np.zeros(x_all.shape, dtype=np.float32)
    if batch_size is None:
        batch_size = max(1, _LOGIT_BUDGET.get(dev.type, 2**25) // (seq_len * max(data.vocab_size, 1)))
    amp = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    try:
        # no_grad rather than inference_mode: a model that caches tensors lazily (e.g. RoPE
        # tables) would otherwise keep inference tensors that break later training.
        with torch.no_grad():
            for i in range(0, len(x_all), batch_size):
                x = torch.from_numpy(x_all[i : i + batch_size]).to(dev)
                y = torch.from_numpy(y_all[i : i + batch_size])
                with amp:
                    logits = _logits(model, x, data.vocab_size)
                ce = token_ce(logits, y.to(dev))
                ce_all[i : i + batch_size] = ce.cpu().numpy().reshape(len(y), seq_len)
    finally:
        model.train(was_training)
    nats, nbytes = total_nats(ce_all, y_all, m_all, data.token_bytes)
    if nbytes == 0:
        msg = "The scored validation tokens carry no bytes (only special tokens?): cannot compute bits per byte."
        raise ValueError(msg)
    bpb = nats / (math.log(2) * nbytes)
    return {"bpb": bpb, "nats": nats, "bytes": nbytes, "tokens": n, "seq_len": seq_len,
            "seconds": time.perf_counter() - t0}


def evaluate_bpb(model: torch.nn.Module, data: "PreparedData | str | os.PathLike | None" = None, *,
                 seq_len: int, batch_size: int | None = None, eval_tokens: int | None = None,
                 device: "torch.device | str | None" = None, autocast_dtype: torch.dtype | None = None) -> float:
    """Validation bits per byte of `model` on the scored validation set (module docstring).

    See `evaluate_bpb_detail` for the parameters; this returns only the number.
    """
    return evaluate_bpb_detail(model, data, seq_len=seq_len, batch_size=batch_size, eval_tokens=eval_tokens,
                               device=device, autocast_dtype=autocast_dtype)["bpb"]


def causality_probe(model: torch.nn.Module, *, vocab_size: int, seq_len: int,
                    device: "torch.device | str | None" = None, trials: int = 2, tol: float | None = None,
                    seed: int = 1234) -> dict:
    """Check that logits at positions <= t do not depend on tokens after t.

    For each trial: random ids (2, seq_len), a cut t (the middle, then random), the tokens
    after t replaced with fresh random ones; the logits at positions 0..t must not move.
    Runs in eval mode without autocast, so a causal model's prefix logits agree to
    rounding; the default tolerance is 1e-4 (float32 parameters) or 2e-2 (16-bit), relative
    to the largest logit.

    Returns
    -------
    dict
        causal (bool), max_diff (float: largest change seen at positions <= t),
        position (int or None: first position that moved), tol (float).
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    seq_len = int(seq_len)
    if seq_len < 2:
        msg = f"The causality probe needs seq_len >= 2, got {seq_len}."
        raise ValueError(msg)
    low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    rel = tol if tol is not None else (2e-2 if low_precision else 1e-4)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    worst, where, causal = 0.0, None, True
    try:
        with torch.no_grad():
            for trial in range(max(1, trials)):
                t = seq_len // 2 if trial == 0 else int(torch.randint(0, seq_len - 1, (1,), generator=gen))
                ids = torch.randint(0, vocab_size, (2, seq_len), generator=gen)
                alt = ids.clone()
                alt[:, t + 1 :] = torch.randint(0, vocab_size, (2, seq_len - t - 1), generator=gen)
                a = _logits(model, ids.to(dev), vocab_size).float()
                b = _logits(model, alt.to(dev), vocab_size).float()
                scale = max(1.0, float(a.abs().max()))
                diff = (a[:, : t + 1] - b[:, : t + 1]).abs().amax(dim=(0, 2))  # per position
                d = float(diff.max())
                worst = max(worst, d)
                if d > rel * scale and causal:
                    causal = False
                    where = int(torch.nonzero(diff > rel * scale)[0, 0])
    finally:
        model.train(was_training)
    return {"causal": causal, "max_diff": worst, "position": where, "tol": rel}
