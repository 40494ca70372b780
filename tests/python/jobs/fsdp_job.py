#!/usr/bin/env python3
"""An FSDP2 job (``fully_shard``, gloo, CPU) on the hpc_ckpt package, for tests/python/test_sharded.py.

    hpc-ckpt wrap --ranks N -- python fsdp_job.py --steps S --every K [--model mlp|gpt]
                                                   [--async] [--seed X] [--step-delay D]

Models: an MLP with dropout, or a small transformer whose output layer is tied to its token
embedding (``gpt``); each layer and the root are ``fully_shard``-ed over all ranks, so every
parameter and the AdamW state are DTensors and the Checkpointer saves them through DCP. Data: a
shard loader (``ResumableLoader(rank=, world_size=)``) of one global batch of 24 (1, 2 or 3 ranks). Rank 0 prints
``step=<n> loss=<repr>`` after every step, and ``resumed from ... step=<n> world=<w>`` and
``restored <key> <sha256>`` of each gathered full tensor (parameters and optimizer state, keyed
as DCP names them) after a resume; ``full <key> <sha256>`` of each at the end of training.
Without the rank variables (``wrap`` with one rank) it makes a 1-rank process group itself.

Test knob: ``FSDP_JOB_KILL_RANK_AT=R:S`` makes rank R, when it saves step S, write half of its DCP
shard file and SIGKILL itself (a rank dying in the middle of its DCP write).
"""

import argparse
import hashlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import hpc_ckpt
import hpc_ckpt.sharded

VOCAB, CTX = 32, 8
BATCH = 24  # the global batch (each rank takes BATCH // world): 1, 2 and 3 ranks split it evenly


class TinyGPT(nn.Module):
    """Token + position embeddings, two pre-norm attention blocks, an output layer tied to the
    token embedding."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(CTX, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=True,
                                                               norm_first=True) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for b in self.blocks:
            h = b(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def build(kind: str):
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 4))
        layers = [model[0], model[3], model[5]]
    else:
        model = TinyGPT()
        layers = list(model.blocks)
    return model, layers


def data(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        x = torch.randn(512, 16, generator=g)
        return x, (x[:, :4] * 3 + torch.randn(512, 4, generator=g)).argmax(dim=1)
    seq = torch.randint(0, VOCAB, (256, CTX + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def loss_of(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def full_digests(model, opt):
    """sha256 of every gathered full tensor of the model and optimizer, keyed as DCP names them
    (a collective)."""
    full = hpc_ckpt.sharded.full_tensors(hpc_ckpt.sharded.state_of({"": model}, {"": opt}))
    return {k: digest(v) for k, v in full.items()}


def install_kill_knob(rank: int, ck) -> None:
    spec = os.environ.get("FSDP_JOB_KILL_RANK_AT", "")
    if not spec:
        return
    who, at = (int(v) for v in spec.split(":"))
    if rank != who:
        return
    save = hpc_ckpt.sharded.save

    def half_then_die(state, directory):
        if ck.step != at:
            return save(state, directory)
        path = os.path.join(directory, f"__{rank}_0.distcp")
        with open(path, "wb") as f:  # what a torn write leaves: part of the shard, no .metadata
            f.write(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)

    hpc_ckpt.sharded.save = half_then_die


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, required=True)
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if "RANK" not in os.environ:  # one rank: the supervisor sets no rendezvous
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    hpc_ckpt.seed_all(a.seed)  # the same initial weights on every rank
    model, layers = build(a.model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    x, y = data(a.model, a.seed)
    loader = hpc_ckpt.ResumableLoader(torch.utils.data.TensorDataset(x, y), BATCH // world, seed=a.seed,
                                      drop_last=True, rank=rank, world_size=world)
    torch.manual_seed(a.seed * 1000 + rank)  # this rank's dropout stream (saved per rank)
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, loader=loader, every_steps=a.every,
                               total_steps=a.steps, async_save=a.async_save,
                               reference_batch=(x[:8], y[:8]),
                               reference_loss=lambda b: loss_of(a.model, model(b[0]), b[1]),
                               config={"seed": a.seed, "steps": a.steps, "model": a.model})
    assert ck.dcp, "an FSDP2 model is saved through DCP"
    install_kill_knob(rank, ck)

    step = ck.restore()
    if step:
        restored = full_digests(model, opt)
        if rank == 0:
            print(f"resumed from {ck.resume_from} at step={step} world={ck.resumed_world_size}", flush=True)
            for k, v in restored.items():
                print(f"restored {k} {v}", flush=True)
    while step < a.steps and not ck.should_stop():
        for xb, yb in loader:
            loss = loss_of(a.model, model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            # The global batch's loss (every rank's share averaged), as the run's own record.
            lt = loss.detach().clone()
            dist.all_reduce(lt)
            if rank == 0:
                print(f"step={step} loss={(lt / world).item()!r}", flush=True)
            if a.step_delay:
                time.sleep(a.step_delay)
            ck.step_done(step, metrics={"loss": loss.item()})
            if step >= a.steps or ck.should_stop():
                break
    done = ck.finish()
    digests = full_digests(model, opt)
    if rank == 0 and done:
        for k, v in digests.items():
            print(f"full {k} {v}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # all committed; skip torch's seconds of interpreter teardown


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
