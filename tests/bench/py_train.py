#!/usr/bin/env python3
"""Python baseline for the built-in trainer's speed (`hpc-ckpt train`): the same models,
optimizers, batch sizes and thread counts in eager PyTorch, on the same libtorch.

    .venv/bin/python tests/bench/py_train.py --model mlp [--threads 1] [--warmup 100] [--steps 1000]
    .venv/bin/python tests/bench/py_train.py --model gpt --text FILE [--threads 1] ...

The models mirror src/train/models.rs op for op (initialisation aside, which does not change
speed):

  mlp: flatten -> [Linear -> ReLU -> Dropout] per hidden size -> Linear(classes)
  gpt: tok + pos embedding -> Dropout -> blocks of
         x = x + Dropout(proj(attn(LN1(x))))   (qkv Linear, split, q@k^T * 1/sqrt(dh), causal
                                                 masked_fill(-inf), softmax, Dropout, @v)
         x = x + Dropout(fc_proj(GELU(fc(LN2(x)))))
       -> LN_f -> head(vocab)
  loss: log_softmax(-1, float32) + nll_loss (what tch's cross_entropy_for_logits runs; the same
        kernels F.cross_entropy runs)

One training step is what the trainer's `step()` does: zero_grad (set_to_none), forward, loss,
loss.item() (the trainer reads the loss every step), backward, clip_grad_norm_ (foreach=False)
when --grad-clip is given, optimizer.step() (torch.optim.Adam / AdamW, foreach=False: the
single-tensor path the trainer reimplements), scheduler.step() (LambdaLR: linear warmup then
cosine, the trainer's `scheduler: {kind: cosine}`).

Data: synthetic tensors built before the clock starts (a pool of --pool batches, used in turn):
mlp gets standard-normal features and uniform labels; gpt gets random windows of --text
tokenised by sorted unique characters (the trainer's vocabulary), so the vocabulary size, hence
the head's size, matches the trainer's on the same file.

Times --steps steps after --warmup untimed ones; prints one JSON line on stdout:
  {"model": "...", "threads": T, "steps": N, "seconds": S, "steps_per_s": N/S}
"""
import argparse
import json
import math
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=("mlp", "gpt"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=100, help="untimed steps first (default 100)")
    ap.add_argument("--steps", type=int, default=1000, help="timed steps (default 1000)")
    ap.add_argument("--batch", type=int, default=None, help="default: mlp 64, gpt 16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=32, help="distinct batches made up front")
    ap.add_argument("--lr", type=float, default=None, help="default: mlp 1e-3, gpt 6e-4")
    ap.add_argument("--warmup-lr-steps", type=int, default=50, help="scheduler warmup steps")
    ap.add_argument("--total-steps", type=int, default=None, help="scheduler horizon (default warmup+steps)")
    ap.add_argument("--grad-clip", type=float, default=None, help="max grad norm (default: gpt 1.0, mlp none)")
    ap.add_argument("--dropout", type=float, default=0.1)
    # mlp
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    # gpt
    ap.add_argument("--text", help="gpt: the UTF-8 text file the trainer's job reads (data.path)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--weight-decay", type=float, default=0.1, help="gpt AdamW weight decay")
    args = ap.parse_args()

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    class Mlp(nn.Module):
        def __init__(self, dims, dropout):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
            self.dropout = dropout

        def forward(self, x):
            h = x.flatten(1, -1)
            last = len(self.layers) - 1
            for i, l in enumerate(self.layers):
                h = l(h)
                if i < last:
                    h = F.dropout(h.relu(), self.dropout, self.training)
            return h

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.fc_proj = nn.Linear(4 * d, d)

    class Gpt(nn.Module):
        def __init__(self, vocab, context, layers, heads, d, dropout):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(context, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)
            self.heads, self.d, self.dropout = heads, d, dropout

        def forward(self, idx):
            b, t = idx.shape
            d, nh = self.d, self.heads
            dh = d // nh
            p, train = self.dropout, self.training
            pos = torch.arange(t, dtype=torch.int64)
            x = F.dropout(self.tok(idx) + self.pos(pos), p, train)
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
            scale = 1.0 / math.sqrt(dh)
            for blk in self.blocks:
                h = blk.ln1(x)
                q, k, v = (z.view(b, t, nh, dh).transpose(1, 2) for z in blk.qkv(h).split(d, 2))
                att = (q.matmul(k.transpose(-2, -1)) * scale).masked_fill(mask, float("-inf"))
                att = F.dropout(att.softmax(-1, dtype=torch.float32), p, train)
                y = att.matmul(v).transpose(1, 2).contiguous().view(b, t, d)
                x = x + F.dropout(blk.proj(y), p, train)
                h = F.gelu(blk.fc(blk.ln2(x)), approximate="none")
                x = x + F.dropout(blk.fc_proj(h), p, train)
            return self.head(self.ln_f(x))

    # --- model, data, optimizer (not timed) ---------------------------------------------------
    if args.model == "mlp":
        batch = args.batch or 64
        model = Mlp([args.features, *args.hidden, args.classes], args.dropout)
        pool = [
            (torch.randn(batch, args.features, generator=g),
             torch.randint(0, args.classes, (batch,), generator=g))
            for _ in range(args.pool)
        ]
        lr = args.lr if args.lr is not None else 1e-3
        opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
        clip = args.grad_clip
    else:
        if not args.text:
            ap.error("--model gpt needs --text FILE (the job's data.path)")
        batch = args.batch or 16
        text = open(args.text, encoding="utf-8").read()
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        tokens = torch.tensor([index[c] for c in text], dtype=torch.int64)
        ctx = args.context
        model = Gpt(len(vocab), ctx, args.layers, args.heads, args.d_model, args.dropout)
        pool = []
        for _ in range(args.pool):
            starts = torch.randint(0, len(tokens) - ctx - 1, (batch,), generator=g)
            w = torch.stack([tokens[s : s + ctx + 1] for s in starts.tolist()])
            pool.append((w[:, :ctx].contiguous(), w[:, 1:].contiguous()))
        lr = args.lr if args.lr is not None else 6e-4
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, foreach=False
        )
        clip = args.grad_clip if args.grad_clip is not None else 1.0

    warm = args.warmup_lr_steps
    horizon = args.total_steps or (args.warmup + args.steps)

    def lr_factor(t):  # the trainer's cosine schedule (min_lr 0), as a multiple of the base lr
        if t < warm:
            return (t + 1) / warm
        span = max(horizon - warm, 0)
        prog = 1.0 if span == 0 else min((t - warm) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    gpt = args.model == "gpt"

    def step(i):
        x, y = pool[i % len(pool)]
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        if gpt:
            logits = logits.view(-1, logits.size(2))
            y = y.reshape(-1)
        loss = F.nll_loss(logits.log_softmax(-1, dtype=torch.float32), y)
        lv = loss.item()
        loss.backward()
        if not math.isfinite(lv):
            raise SystemExit(f"step {i}: loss {lv}")
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        opt.step()
        sched.step()

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    secs = time.perf_counter() - t0
    print(json.dumps({
        "model": args.model,
        "threads": args.threads,
        "batch": batch,
        "steps": args.steps,
        "seconds": secs,
        "steps_per_s": args.steps / secs,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
