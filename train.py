"""train.py: a small modern GPT, trained for a fixed budget and scored by val bits per byte.

    python train.py            # 60 s on CPU/MPS, 300 s on CUDA; prints val_bpb at the end

This is the file the agent edits: model, optimizer, schedule and the UPPER_CASE knobs
below are all fair game. What it must keep: `run = harness.start()`, training data from
`run.train_loader`, the loop `while run.training(...)`, `run.log(...)` per step, and
`run.finish(model)` with a model mapping token ids (B, T) to logits (B, T, V). The
harness owns the budget, the clock and the metric.

Model: RoPE, QK-norm, parameter-free RMSNorm, ReLU^2 MLP, untied embedding and lm_head,
no biases, causal SDPA, logit soft-capping. Optimizer: Muon (Newton-Schulz orthogonalised
momentum) for the 2-D matrices inside the blocks, AdamW for the embedding and lm_head.
LR schedule from run.progress: warm-up, constant, linear warm-down.

Speed on a GPU (docs/PERFORMANCE.md has the numbers): bf16 autocast (fp16 with loss scaling on
GPUs without bf16: T4, P100, V100), cuDNN attention first,
regional torch.compile (one graph shared by the blocks, one for head + loss), fused AdamW,
Muon batched over same-shape matrices, and no host sync in the loop (the harness reads the
loss one step late).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autoresearch_kit import harness

# ---------------------------------------------------------------------------------------
# Hyperparameters: simple literals, one block. CPU_* apply on CPU and MPS, GPU_* on CUDA.
CPU_DEPTH = 3            # transformer blocks; the width follows: DEPTH * ASPECT_RATIO
CPU_SEQ_LEN = 256        # training context length (the evaluation context is the lab's: run.eval_seq_len)
CPU_BATCH_SIZE = 16      # sequences per step
GPU_DEPTH = 12
GPU_SEQ_LEN = 2048
GPU_BATCH_SIZE = 64
ASPECT_RATIO = 64        # model width per block of depth, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 64
MLP_RATIO = 4            # hidden width of the MLP / model width
LOGIT_SOFTCAP = 15.0     # logits = cap * tanh(logits / cap); 0 turns it off
ROPE_BASE = 10000.0
EMBED_LR = 0.2           # AdamW, token embedding (scaled by (width/768)^-0.5 as in nanochat)
UNEMBED_LR = 0.004       # AdamW, lm_head (same scaling)
MATRIX_LR = 0.02         # Muon, every 2-D matrix inside the blocks
ADAM_BETA1 = 0.8
ADAM_BETA2 = 0.95
WEIGHT_DECAY = 0.0       # AdamW weight decay
MUON_MOMENTUM = 0.95
NS_STEPS = 5             # Newton-Schulz iterations per Muon update
WARMUP_FRAC = 0.0        # fraction of the budget with a linear LR warm-up
WARMDOWN_FRAC = 0.4      # fraction of the budget at the end with a linear LR decay
FINAL_LR_FRAC = 0.0      # LR multiplier reached at the very end
GRAD_CLIP = 0.0          # max gradient norm; 0 turns clipping off
# ---------------------------------------------------------------------------------------

run = harness.start()
ON_GPU = run.device_type == "cuda"
DEPTH = GPU_DEPTH if ON_GPU else CPU_DEPTH
SEQ_LEN = GPU_SEQ_LEN if ON_GPU else CPU_SEQ_LEN
BATCH_SIZE = GPU_BATCH_SIZE if ON_GPU else CPU_BATCH_SIZE
WIDTH = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
N_HEAD = WIDTH // HEAD_DIM
# fp16 (GPUs without bf16) flushes gradients below ~6e-8 to zero: the scaler multiplies the loss
# before backward, unscales the gradients at the optimizers' step and skips a step whose
# gradients overflowed (halving the scale). In bf16 and float32 it is off and does nothing.
FP16 = run.autocast_dtype == torch.float16
scaler = torch.amp.GradScaler(run.device_type, enabled=FP16)
NS_DTYPE = torch.float16 if FP16 else torch.bfloat16  # Newton-Schulz: bf16 where the GPU has it
if ON_GPU:
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
# Attention kernels in order of preference; the first that supports the inputs runs. On an
# H100, cuDNN's fwd+bwd ran ~1.6x faster than flash for causal attention (head_dim 128).
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


# --- model --------------------------------------------------------------------------------
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):
    # x: (B, T, H, D); rotate pairs of the two halves of the head dimension
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, width, n_head, head_dim):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.c_q = nn.Linear(width, n_head * head_dim, bias=False)
        self.c_k = nn.Linear(width, n_head * head_dim, bias=False)
        self.c_v = nn.Linear(width, n_head * head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * head_dim, width, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        q, k = rotary(norm(q), cos, sin), rotary(norm(k), cos, sin)  # QK-norm, then RoPE
        q, k = q.type_as(v), k.type_as(v)  # norm may run in fp32 under autocast; SDPA wants one dtype
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, MLP_RATIO * width, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * width, width, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, width, n_head, head_dim):
        super().__init__()
        self.attn = Attention(width, n_head, head_dim)
        self.mlp = MLP(width)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, width, depth, n_head, head_dim, max_seq_len):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList([Block(width, n_head, head_dim) for _ in range(depth)])
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0) / math.sqrt(lin.in_features)  # uniform with std 1/sqrt(fan_in)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)

    def trunk(self, idx, blocks=None):
        """Hidden states after the blocks: self.blocks, or compiled stand-ins for them."""
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.blocks if blocks is None else blocks:
            x = block(x, cos, sin)
        return x

    def head(self, x):
        logits = self.lm_head(norm(x))
        if LOGIT_SOFTCAP > 0:
            logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        return logits

    def forward(self, idx):
        return self.head(self.trunk(idx))


# --- optimizer ----------------------------------------------------------------------------
def newton_schulz(G, steps):
    """Approximately orthogonalise each matrix of the stack G (n, rows, cols), i.e. the U V^T
    of its SVD, with a quintic iteration in NS_DTYPE (bf16, or fp16 on GPUs without bf16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # normalised in float32 before the cast: small gradients would underflow in fp16
    X = (G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(NS_DTYPE)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A in one kernel
        X = torch.baddbmm(X, B, X, beta=a)           # a*X + B@X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalised updates: every direction of a matrix moves at the same rate.

    Matrices of one shape form one group and are updated as a stack: each Newton-Schulz
    iteration is one batched matmul for all of them instead of dozens of small launches.
    """

    def __init__(self, params, lr, momentum, ns_steps):
        by_shape = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        groups = [dict(params=same) for same in by_shape.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            state = self.state[params[0]]
            if "buf" not in state:
                state["buf"] = torch.zeros_like(grads)
            buf = state["buf"]
            buf.lerp_(grads, 1 - group["momentum"])
            g = grads.lerp_(buf, group["momentum"])  # Nesterov
            update = newton_schulz(g, group["ns_steps"]).to(params[0].dtype)
            scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5  # tall matrices: comparable steps
            for p, u in zip(params, update):
                p.add_(u, alpha=-group["lr"] * scale)


def lr_multiplier(progress):
    if WARMUP_FRAC > 0 and progress < WARMUP_FRAC:
        return (progress + 1e-3) / WARMUP_FRAC
    if progress < 1.0 - WARMDOWN_FRAC:
        return 1.0
    cooldown = (1.0 - progress) / max(WARMDOWN_FRAC, 1e-9)
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


# --- setup --------------------------------------------------------------------------------
with run.device:  # initialise the weights where they train: no host-side init and copy
    # RoPE table long enough for training and for the lab's pinned evaluation context
    model = GPT(run.vocab_size, WIDTH, DEPTH, N_HEAD, HEAD_DIM, max(SEQ_LEN, run.eval_seq_len))
loader = run.train_loader(BATCH_SIZE, SEQ_LEN)
run.watch(model)  # params and FLOPs/token, measured by the harness

adam_scale = (WIDTH / 768) ** -0.5  # the Adam LRs were tuned at width 768
adam = torch.optim.AdamW(
    [dict(params=[model.wte.weight], lr=EMBED_LR * adam_scale),
     dict(params=[model.lm_head.weight], lr=UNEMBED_LR * adam_scale)],
    betas=(ADAM_BETA1, ADAM_BETA2), eps=1e-10, weight_decay=WEIGHT_DECAY, fused=ON_GPU)
muon = Muon([p for p in model.blocks.parameters() if p.dim() == 2], lr=MATRIX_LR,
            momentum=MUON_MOMENTUM, ns_steps=NS_STEPS)
optimizers = [adam, muon]
for opt in optimizers:
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]



def head_loss(x, y):
    logits = model.head(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


# Regional compilation: the blocks are identical, so one compiled graph serves all DEPTH of
# them (a fraction of the compile time of the whole model), and head + loss compile as one
# graph, so the soft-cap, the float32 upcast and the cross-entropy fuse (the tokens x vocab
# logits are never written out in float32). Only training uses the compiled versions: the
# harness evaluates the eager model, at other batch shapes, without recompiling.
blocks = [torch.compile(block) for block in model.blocks] if run.compile else model.blocks
head_loss = torch.compile(head_loss) if run.compile else head_loss


def train_loss(x, y):
    return head_loss(model.trunk(x, blocks), y)
print(f"model: depth {DEPTH}, width {WIDTH}, {N_HEAD} heads | batch {BATCH_SIZE} x {SEQ_LEN} tokens"
      f" | compile {run.compile}", flush=True)

# --- training -----------------------------------------------------------------------------
step = 0
warming = True
while run.training(tokens=BATCH_SIZE * SEQ_LEN):
    if warming and not run.warming_up:  # the first timed step: forget the warm-up's moments
        for opt in optimizers:
            opt.state.clear()
    warming = run.warming_up
    # The warm-up steps (random ids, off the clock) only compile: learning rate 0 keeps the
    # weights as initialised.
    lrm = 0.0 if warming else lr_multiplier(run.progress)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    x, y = next(loader)
    with run.autocast():
        loss = train_loss(x, y)
    scaler.scale(loss).backward()  # loss * scale in fp16, the loss itself otherwise
    if GRAD_CLIP > 0:
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    for opt in optimizers:
        scaler.step(opt)  # skipped in fp16 when this optimizer's gradients are not finite
    scaler.update()
    model.zero_grad(set_to_none=True)
    run.log(step=step, loss=loss.detach(), lr_mult=lrm)   # printed as "lr x0.66": a factor
    step += 1

run.finish(model)
