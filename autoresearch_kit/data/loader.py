"""TokenLoader: random (x, y) windows from a uint16 token stream, ready on the device.

    from autoresearch_kit.data.loader import TokenLoader
    loader = TokenLoader(data.train, batch_size=16, seq_len=256, device="cpu", seed=42)
    x, y = next(loader)          # int64 (16, 256) each; y is x shifted by one token

Each batch is B windows of T+1 tokens at random offsets, gathered in one vectorised
fancy index (offsets[:, None] + arange(T+1)) straight from the memmap: no Python loop per
token or per row. On CUDA the batch goes through pinned host memory with non_blocking
copies, so the host-to-device transfer overlaps the GPU work already queued. Windows may
cross document boundaries; every document starts with BOS, so the model sees where one
ends. The loader counts what it hands out (`tokens_yielded`): the harness budgets tokens
from this count, never from train.py's own claim.

Light imports (numpy, torch): the training child imports this through the harness.
"""

from __future__ import annotations

import numpy as np
import torch


def draw_windows(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """B windows of T+1 tokens at random offsets, in one gather: (B, T+1), the stream's dtype.

    The one place training windows are drawn: TokenLoader (standalone runs) and the
    runner's server (serve.py, which hands them to a candidate) call it, so both give the
    same windows for the same seed.
    """
    offsets = rng.integers(0, len(tokens) - (seq_len + 1) + 1, size=batch_size)
    return tokens[offsets[:, None] + np.arange(seq_len + 1, dtype=np.int64)]


class TokenLoader:
    """Infinite iterator of random training windows.

    Parameters
    ----------
    tokens : np.ndarray
        1-D token stream (typically the uint16 memmap `PreparedData.train`).
    batch_size : int
        Rows per batch (B).
    seq_len : int
        Tokens per row (T); each row reads T+1 tokens (inputs and shifted targets).
    device : str or torch.device
        Where the batches go.
    seed : int
        Seeds the offsets, so a run's data order is reproducible.

    Attributes
    ----------
    tokens_yielded : int
        Input tokens handed out so far (B*T per batch).
    batches : int
        Batches handed out so far.
    """

    # Pinned staging buffers on CUDA: a ring of 2, so the copy of batch n can still be in
    # flight while batch n+1 is gathered into the other buffer.
    _RING = 2

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int,
                 device: str | torch.device = "cpu", seed: int = 0) -> None:
        self._setup(batch_size, seq_len, device)
        if tokens.ndim != 1:
            msg = f"TokenLoader needs a 1-D token stream, got shape {tokens.shape}."
            raise ValueError(msg)
        if seq_len + 1 > len(tokens):
            msg = (f"seq_len={seq_len} needs {seq_len + 1} tokens per window but the split has only "
                   f"{len(tokens)}: use a smaller seq_len or prepare more data (`python prepare.py`).")
            raise ValueError(msg)
        self.tokens = tokens
        self._rng = np.random.default_rng(seed)

    def _setup(self, batch_size: int, seq_len: int, device) -> None:
        """Sizes, counters and the pinned staging ring (also for the runner-served loader)."""
        batch_size, seq_len = int(batch_size), int(seq_len)
        if batch_size < 1 or seq_len < 1:
            msg = f"batch_size and seq_len must be positive, got batch_size={batch_size}, seq_len={seq_len}."
            raise ValueError(msg)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.device = torch.device(device)
        self.tokens_yielded = 0
        self.batches = 0
        self._pinned: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        if self.device.type == "cuda":
            for _ in range(self._RING):
                self._pinned.append(torch.empty((batch_size, seq_len + 1), dtype=torch.int64).pin_memory())
                self._events.append(None)

    def __iter__(self) -> "TokenLoader":
        return self

    def _gather(self) -> np.ndarray:
        return draw_windows(self.tokens, self._rng, self.batch_size, self.seq_len)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._gather()
        if self._pinned:
            slot = self.batches % self._RING
            ev = self._events[slot]
            if ev is not None:
                ev.synchronize()  # the previous copy out of this buffer must be done
            buf = self._pinned[slot]
            buf.numpy()[...] = rows  # uint16 -> int64 into pinned memory
            batch = buf.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._events[slot] = ev
        else:
            batch = torch.from_numpy(rows.astype(np.int64))
            if self.device.type != "cpu":
                batch = batch.to(self.device)
        self.batches += 1
        self.tokens_yielded += self.batch_size * self.seq_len
        # contiguous, so train.py can .view() them (a slice of (B, T+1) is not)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
