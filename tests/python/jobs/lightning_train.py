#!/usr/bin/env python3
"""A tiny Lightning module under `hpc-ckpt wrap`, made preemption-proof by hpc_ckpt's callback.

    hpc-ckpt wrap [--ranks N] -- python tests/python/jobs/lightning_train.py [--step-delay S]

An MLP with dropout, AdamW + a per-step OneCycle schedule, gradient accumulation 2, numpy noise
augmentation (numpy's global RNG), a resumable data loader, validation each epoch. On N ranks
(the supervisor's env:// variables) it is strategy="ddp" on CPU with a shard loader of BATCH/N
samples a rank, so the global batch and the steps are the same for every N. Rank 0 prints
"step=N loss=L" per optimizer step and "final step=N" at the end.
"""

import argparse
import os
import sys
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

import hpc_ckpt
from hpc_ckpt.integrations.lightning import HpcCkptCallback

N, FEATURES, CLASSES, BATCH, ACCUM, EPOCHS = 640, 16, 4, 16, 2, 2


class Net(L.LightningModule):
    def __init__(self, delay):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(32, CLASSES))
        self.delay = delay

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + torch.from_numpy(np.random.normal(0.0, 0.05, size=x.shape).astype(np.float32))
        return F.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if (batch_idx + 1) % ACCUM == 0 and self.global_rank == 0:
            print(f"step={self.global_step} loss={outputs['loss'].item()!r}", flush=True)
            if self.delay:
                time.sleep(self.delay)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]), sync_dist=self.trainer.world_size > 1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)
        total = EPOCHS * (N // BATCH) // ACCUM
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N + 128, FEATURES, generator=g)
    y = (x[:, :CLASSES] + 0.3 * torch.randn(N + 128, CLASSES, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(x[:N], y[:N]), torch.utils.data.TensorDataset(x[N:], y[N:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--no-rng-restore", action="store_true", help="(a negative control)")
    a = p.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if BATCH % world:
        p.error(f"the global batch of {BATCH} does not split over {world} ranks")
    L.seed_everything(a.seed, verbose=False)
    train, val = data(a.seed)
    ck = HpcCkptCallback(every_n_steps=10, restore_rng=not a.no_rng_restore)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        use_distributed_sampler=False, max_epochs=EPOCHS, accumulate_grad_batches=ACCUM,
                        deterministic=True, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ck])
    loader = hpc_ckpt.ResumableLoader(train, BATCH // world, seed=a.seed, rank=rank, world_size=world)
    net = Net(a.step_delay)
    if world > 1:  # each rank its own dropout and noise streams (DDP gives all rank 0's weights)
        L.seed_everything(a.seed * 1000 + rank, verbose=False)
    trainer.fit(net, train_dataloaders=loader,
                val_dataloaders=torch.utils.data.DataLoader(val, batch_size=64),
                ckpt_path=ck.resume_from)
    if not ck.stopped and trainer.is_global_zero:
        print(f"final step={trainer.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
