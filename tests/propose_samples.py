"""Sample train.py sources and contexts shared by the proposer tests (not a test file).

`SYNTHETIC_TRAIN` is shaped like the kit's train.py (an UPPER_CASE constants block with
comments, a device-dependent choice, a preset dict, the harness calls); it only has to
compile, the proposer tests never run it. `real_train()` returns the repository's
train.py once it exists, so the offline proposer is also tested on the file users get.
"""

from __future__ import annotations

from pathlib import Path

from autoresearch_kit.propose.base import HistoryEntry, ProposalContext, source_hash

SYNTHETIC_TRAIN = '''\
"""A small GPT trained under the kit's budget. Run: python train.py"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch_kit import harness

# ---------------------------------------------------------------- hyperparameters
DEPTH = 4                  # transformer layers
ASPECT_RATIO = 32          # model_dim = DEPTH * ASPECT_RATIO
HEAD_DIM = 32              # attention head size
SEQ_LEN = 128              # tokens per row
BATCH_SIZE = 16            # rows per step
TOTAL_BATCH_SIZE = 2**12   # tokens per optimizer step
MATRIX_LR = 0.04           # Muon-style lr for 2D weights
EMBEDDING_LR = 0.6         # lr for the token embedding
UNEMBEDDING_LR = 4e-3      # lr for the lm head
WEIGHT_DECAY = 0.1         # decoupled weight decay
ADAM_BETAS = (0.8, 0.95)   # Adam beta1, beta2
WARMUP_RATIO = 0.0         # fraction of the budget spent warming up
WARMDOWN_RATIO = 0.5       # fraction of the budget spent cooling down
FINAL_LR_FRAC = 0.0        # lr at the end, as a fraction of the peak
ACTIVATION = "relu2"       # one of "relu2", "gelu", "silu"
TIE_EMBEDDINGS = False     # share the embedding and the lm head
SEED_OFFSET = 0            # not a research knob: the proposer leaves it alone
LOG_EVERY = 10

run = harness.start()
N_KV = 2 if run.device_type == "cpu" else 4   # kv heads: fewer on CPU
PRESETS = {"cpu": {"compile": False, "dropout": 0.0}, "cuda": {"compile": True, "dropout": 0.0}}


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        x = self.fc(x)
        if ACTIVATION == "relu2":
            x = F.relu(x).square()
        elif ACTIVATION == "gelu":
            x = F.gelu(x)
        else:
            x = F.silu(x)
        return self.proj(x)


class GPT(nn.Module):
    def __init__(self, vocab_size, dim, depth):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(MLP(dim) for _ in range(depth))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if TIE_EMBEDDINGS:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = x + block(F.rms_norm(x, (x.size(-1),)))
        return self.lm_head(F.rms_norm(x, (x.size(-1),)))


def lr_factor(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress > 1 - WARMDOWN_RATIO:
        cooldown = (1 - progress) / WARMDOWN_RATIO
        return cooldown + (1 - cooldown) * FINAL_LR_FRAC
    return 1.0


model = GPT(run.vocab_size, DEPTH * ASPECT_RATIO, DEPTH).to(run.device)
opt = torch.optim.AdamW(model.parameters(), lr=MATRIX_LR, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
loader = run.train_loader(BATCH_SIZE, SEQ_LEN)
step = 0
while run.training(tokens=BATCH_SIZE * SEQ_LEN):
    x, y = next(loader)
    for group in opt.param_groups:
        group["lr"] = MATRIX_LR * lr_factor(run.progress)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    run.log(step=step, loss=loss, lr=opt.param_groups[0]["lr"])
    step += 1
run.finish(model)
'''

PROGRAM = """# Research program
Goal: lowest val_bpb within the budget. Focus this week: learning rates and depth.
Do not touch the data loader. PROGRAM-MARKER-7731
"""


def real_train() -> str | None:
    """The repository's train.py, or None while it has not landed yet."""
    path = Path(__file__).resolve().parents[1] / "train.py"
    return path.read_text() if path.exists() else None


def context(parent: str = SYNTHETIC_TRAIN, **kw) -> ProposalContext:
    """A ProposalContext on `parent` with the sample program; keyword overrides."""
    kw.setdefault("program", PROGRAM)
    kw.setdefault("parent_id", "0001")
    kw.setdefault("seen_hashes", {source_hash(parent)})
    return ProposalContext(parent_source=parent, **kw)


def entry(exp_id: str, parent: str, new: str, description: str, *, status: str = "ok",
          decision: str | None = "discard", val_bpb: float | None = 1.5, reason: str = "") -> HistoryEntry:
    """A HistoryEntry for the edit parent -> new."""
    from autoresearch_kit.propose.base import unified_diff
    return HistoryEntry(exp_id=exp_id, description=description, status=status, decision=decision,
                        val_bpb=val_bpb, reason=reason, source_hash=source_hash(new),
                        diff=unified_diff(parent, new))
