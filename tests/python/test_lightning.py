"""Lightning (a tiny module, gradient accumulation, dropout, numpy augmentation, a per-step
OneCycle schedule, validation each epoch) + hpc_ckpt's callback under `hpc-ckpt wrap`: stopped
twice by USR1 mid-epoch and resumed through `fit(ckpt_path=...)`, the final weights, optimizer
and scheduler state are bit-identical to an uninterrupted run's, and so is every step's loss.

Lightning itself saves no random state and restarts a plain DataLoader's epoch from the start;
the callback's RNG entry and hpc_ckpt.ResumableLoader are what make this hold. A control run with
the callback's RNG restore switched off diverges right after its resume, so the comparison would
catch a missing random state."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from conftest import JOBS, PY, WrapRun, require, verify

STEPS = 40  # 2 epochs x 20 optimizer steps (40 batches, accumulation 2)


def run_of(hpc_bin: str, root, delay: float, *extra: str) -> WrapRun:
    return WrapRun(hpc_bin, str(root / "run"),
                   [PY, os.path.join(JOBS, "lightning_train.py"), "--step-delay", str(delay), *extra])


def load(ckpt_dir: str) -> dict:
    import torch

    return torch.load(os.path.join(ckpt_dir, "lightning.ckpt"), weights_only=True)  # as Lightning does


def bits_equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        f = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(f(a), f(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bits_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_lightning_two_usr1_stops_bit_identical(hpc_bin, tmp_path):
    require("lightning")
    ref = run_of(hpc_bin, tmp_path / "straight", 0.0)
    run = run_of(hpc_bin, tmp_path / "stopped", 0.15)
    control = run_of(hpc_bin, tmp_path / "control", 0.15, "--no-rng-restore")
    with ThreadPoolExecutor(max_workers=2) as ex:  # independent runs, side by side
        done = [ex.submit(ref.run_to_end, []), ex.submit(run.run_to_end, [(6, "USR1"), (26, "USR1")]),
                ex.submit(control.run_to_end, [(6, "USR1")])]
    for f in done:
        f.result()
    assert ref.commits() == [10, 20, 30, STEPS], ref.commits()

    stops = [max(inc.losses) for inc in run.history[:-1]]
    assert any(s % 20 and s % 10 for s in stops), f"no stop mid-epoch and off the cadence: {stops}"
    assert all(s in run.commits() for s in stops), (stops, run.commits())
    assert [min(inc.losses) for inc in run.history[1:]] == [s + 1 for s in stops]

    a, b = ref.newest(), run.newest()
    assert os.path.basename(a) == os.path.basename(b) == f"step-{STEPS:012d}"
    verify(hpc_bin, b)
    ca, cb = load(a), load(b)
    assert ca["global_step"] == cb["global_step"] == STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert bits_equal(ca[key], cb[key]), f"{key} differs from the uninterrupted run's"

    want = {n: v[0] for n, v in ref.all_losses().items()}
    got = run.all_losses()
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    bad = [(n, want[n], v[0]) for n, v in got.items() if v[0] != want[n]]
    assert not bad, f"losses differ at {len(bad)} steps, first {bad[:3]}"

    # the control: identical up to its stop, different from the first step after its resume
    cstop = max(control.history[0].losses)
    closs = {n: v[0] for n, v in control.all_losses().items()}
    assert all(closs[n] == want[n] for n in range(1, cstop + 1))
    assert closs[cstop + 1] != want[cstop + 1], "without the RNG restore the resume was still exact?"
    assert not bits_equal(load(control.newest())["state_dict"], ca["state_dict"])
