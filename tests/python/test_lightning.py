"""Lightning (a tiny module, gradient accumulation, dropout, numpy augmentation, a per-step
OneCycle schedule, validation each epoch) + hpc_ckpt's callback under `hpc-ckpt wrap`: stopped
twice by USR1 mid-epoch and resumed through `fit(ckpt_path=...)`, the final weights, optimizer
and scheduler state are bit-identical to an uninterrupted run's, and so is every step's loss.

Lightning itself saves no random state and restarts a plain DataLoader's epoch from the start;
the callback's RNG entry and hpc_ckpt.ResumableLoader are what make this hold. A control run with
the callback's RNG restore switched off diverges right after its resume, so the comparison would
catch a missing random state.

The same on 2 ranks (strategy="ddp" on CPU under `wrap --ranks 2`): one checkpoint of rank 0's
lightning.ckpt and each rank's rng.safetensors, identical to a straight 2-rank run; a USR1 that reaches
rank 1 alone still stops both ranks after the same step (the stop agreement)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from conftest import DONE, JOBS, PY, RUN_AGAIN, WrapRun, read, require, verify

STEPS = 40  # 2 epochs x 20 optimizer steps (40 batches, accumulation 2)


TWO = ["--ranks", "2"]


def run_of(hpc_bin: str, root, delay: float, *extra: str, args=()) -> WrapRun:
    return WrapRun(hpc_bin, str(root / "run"),
                   [PY, os.path.join(JOBS, "lightning_train.py"), "--step-delay", str(delay), *extra],
                   args=list(args))


def load(ckpt_dir: str, name: str = "lightning.ckpt") -> dict:
    import torch

    return torch.load(os.path.join(ckpt_dir, name), weights_only=True)  # as Lightning does


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


# ----------------------------------------------------------------------------- 2 ranks

RANK_FILES = ["rank00000.lightning.ckpt", "rank00000.rng.safetensors", "rank00001.rng.safetensors"]


def manifest_names(ckpt_dir: str) -> list:
    with open(os.path.join(ckpt_dir, "MANIFEST.json")) as f:
        return sorted(e["name"] for e in json.load(f)["files"])


def test_lightning_ddp_two_ranks_two_usr1_stops_identical(hpc_bin, tmp_path):
    require("lightning")
    ref = run_of(hpc_bin, tmp_path / "straight", 0.0, args=TWO)
    run = run_of(hpc_bin, tmp_path / "stopped", 0.1, args=TWO)
    with ThreadPoolExecutor(max_workers=2) as ex:
        done = [ex.submit(ref.run_to_end, [], 120), ex.submit(run.run_to_end, [(6, "USR1"), (26, "USR1")], 120)]
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
    assert manifest_names(a) == manifest_names(b) == RANK_FILES, manifest_names(b)
    ca, cb = load(a, RANK_FILES[0]), load(b, RANK_FILES[0])
    assert ca["global_step"] == cb["global_step"] == STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert bits_equal(ca[key], cb[key]), f"{key} differs from the straight 2-rank run's"
    for name in RANK_FILES[1:]:
        assert read(os.path.join(a, name)) == read(os.path.join(b, name)), f"{name}: the random state differs"
    assert read(os.path.join(b, RANK_FILES[1])) != read(os.path.join(b, RANK_FILES[2])), "the ranks saved one RNG state"

    want = {n: v[0] for n, v in ref.all_losses().items()}
    got = run.all_losses()
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    bad = [(n, want[n], v[0]) for n, v in got.items() if v[0] != want[n]]
    assert not bad, f"losses differ at {len(bad)} steps, first {bad[:3]}"


def test_lightning_ddp_usr1_to_one_rank_stops_both_at_the_same_step(hpc_bin, tmp_path):
    require("lightning")
    run = run_of(hpc_bin, tmp_path / "one", 0.1, args=TWO)
    inc = run.launch(6, "USR1_RANK1", timeout=60)
    # the supervisor never got the signal; rank 1's commit said it stopped: work is left
    assert inc.sent and inc.rc == RUN_AGAIN, inc.describe()
    stop = max(inc.losses)
    assert stop < STEPS and run.commits()[-1] == stop, (stop, run.commits(), inc.describe())
    # both ranks asked for that step (the supervisor commits nothing else): both stopped there
    assert manifest_names(run.newest()) == RANK_FILES
