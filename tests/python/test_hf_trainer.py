"""transformers.Trainer (tiny GPT-2 from a config) + hpc_ckpt's callback under `hpc-ckpt wrap`:
stopped twice by USR1 mid-epoch and resumed through the Trainer's own resume path, the final
weights are byte-identical to an uninterrupted run, and so are the optimizer, scheduler and RNG
state and every step's loss.

The same on 2 ranks (`wrap --ranks 2`, DDP over gloo on CPU): one checkpoint holds rank 0's
files and each rank's RNG file, each rank resumes from its own layout of it, and the end is
identical to a straight 2-rank run; a USR1 that reaches rank 1 alone still stops both ranks
after the same step (the stop agreement)."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from conftest import JOBS, PY, RUN_AGAIN, WrapRun, read, require, verify

STEPS = 24  # 2 epochs x 12 optimizer steps (192 sequences, batch 8, gradient accumulation 2)


TWO = ["--ranks", "2"]


def run_of(hpc_bin: str, root, delay: float, args=(), env=None) -> WrapRun:
    return WrapRun(hpc_bin, str(root / "run"),
                   [PY, os.path.join(JOBS, "hf_train.py"), "--output-dir", str(root / "hf-out"),
                    "--step-delay", str(delay)], args=list(args), env=dict(env or {}))


def torch_state(path: str):
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():  # what the Trainer does: weights_only, numpy's RNG state allowed
        return torch.load(path, weights_only=True)


def assert_same(a, b, where: str) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        bits = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(bits(a), bits(b)), f"{where}: bytes differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        import numpy as np

        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b), where
        else:
            assert a == b, f"{where}: {a!r} != {b!r}"


def test_hf_trainer_two_usr1_stops_byte_identical(hpc_bin, tmp_path):
    require("transformers")
    ref = run_of(hpc_bin, tmp_path / "straight", 0.0)
    run = run_of(hpc_bin, tmp_path / "stopped", 0.15)
    with ThreadPoolExecutor(max_workers=2) as ex:  # independent runs, side by side
        done = [ex.submit(ref.run_to_end, []), ex.submit(run.run_to_end, [(6, "USR1"), (16, "USR1")])]
    for f in done:
        f.result()
    assert ref.commits() == [5, 10, 15, 20, STEPS], ref.commits()

    stops = [max(inc.losses) for inc in run.history[:-1]]
    assert any(s % 12 and s % 5 for s in stops), f"no stop mid-epoch and off the save cadence: {stops}"
    assert all(s in run.commits() for s in stops), (stops, run.commits())
    # each allocation resumed at the step after the one its predecessor committed on the signal
    assert [min(inc.losses) for inc in run.history[1:]] == [s + 1 for s in stops]

    a, b = ref.newest(), run.newest()
    assert os.path.basename(a) == os.path.basename(b) == f"step-{STEPS:012d}"
    verify(hpc_bin, b)
    assert read(os.path.join(a, "model.safetensors")) == read(os.path.join(b, "model.safetensors")), \
        "final weights differ from the uninterrupted run's"
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert_same(torch_state(os.path.join(a, f)), torch_state(os.path.join(b, f)), f)
    assert not os.path.exists(os.path.join(b, "training_args.bin")), "a full pickle was committed"

    want = {n: v[0] for n, v in ref.all_losses().items()}
    got = run.all_losses()
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    bad = [(n, want[n], v[0]) for n, v in got.items() if v[0] != want[n]]
    assert not bad, f"losses differ at {len(bad)} steps, first {bad[:3]}"
    with open(os.path.join(b, "trainer_state.json")) as f:
        st = json.load(f)
    assert st["global_step"] == STEPS
    # the commit requests carried the Trainer's metrics and epochs
    last = run.journal("checkpoint_committed")[-1]
    assert last["step"] == STEPS and last["epoch"] == 2 and "loss" in last["metrics"], last


# ----------------------------------------------------------------------------- 2 ranks

RANK_FILES = [f"rank00000.{n}" for n in ("config.json", "generation_config.json", "model.safetensors",
                                         "optimizer.pt", "rng_state_0.pth", "scheduler.pt",
                                         "trainer_state.json")] + ["rank00001.rng_state_1.pth"]


def test_hf_trainer_two_ranks_two_usr1_stops_identical(hpc_bin, tmp_path):
    require("transformers")
    ref = run_of(hpc_bin, tmp_path / "straight", 0.0, TWO)
    run = run_of(hpc_bin, tmp_path / "stopped", 0.15, TWO)
    with ThreadPoolExecutor(max_workers=2) as ex:
        done = [ex.submit(ref.run_to_end, [], 180), ex.submit(run.run_to_end, [(6, "USR1"), (16, "USR1")], 180)]
    for f in done:
        f.result()
    assert ref.commits() == [5, 10, 15, 20, STEPS], ref.commits()
    stops = [max(inc.losses) for inc in run.history[:-1]]
    assert any(s % 12 and s % 5 for s in stops), f"no stop mid-epoch and off the save cadence: {stops}"
    assert all(s in run.commits() for s in stops), (stops, run.commits())
    assert [min(inc.losses) for inc in run.history[1:]] == [s + 1 for s in stops]

    a, b = ref.newest(), run.newest()
    assert os.path.basename(a) == os.path.basename(b) == f"step-{STEPS:012d}"
    verify(hpc_bin, b)
    for d in (a, b):
        assert sorted(n for n in os.listdir(d) if n != "MANIFEST.json") == sorted(RANK_FILES), os.listdir(d)
    assert read(os.path.join(a, "rank00000.model.safetensors")) == read(os.path.join(b, "rank00000.model.safetensors")), \
        "final weights differ from the straight 2-rank run's"
    for f in ("rank00000.optimizer.pt", "rank00000.scheduler.pt", "rank00000.rng_state_0.pth",
              "rank00001.rng_state_1.pth"):
        assert_same(torch_state(os.path.join(a, f)), torch_state(os.path.join(b, f)), f)
    rng0, rng1 = (torch_state(os.path.join(b, f"rank0000{r}.rng_state_{r}.pth"))["cpu"] for r in (0, 1))
    assert not rng0.equal(rng1), "the ranks saved one random state: a swapped restore would pass"
    assert_same_losses(ref, run)
    # each rank read its own layout of the checkpoint, removed when training ended
    layouts = tmp_path / "stopped" / "hf-out" / ".hpc-ckpt-resume"
    assert sorted(os.listdir(layouts)) == ["rank00000", "rank00001"]
    assert all(not os.listdir(layouts / r) for r in os.listdir(layouts))


def test_hf_trainer_usr1_to_one_rank_stops_both_at_the_same_step(hpc_bin, tmp_path):
    require("transformers")
    run = run_of(hpc_bin, tmp_path / "one", 0.15, TWO, env={"HF_JOB_PRINT_STOP": "1"})
    inc = run.launch(6, "USR1_RANK1", timeout=90)
    # the supervisor never got the signal; rank 1's commit said it stopped: work is left
    assert inc.sent and inc.rc == RUN_AGAIN, inc.describe()
    # (two ranks share the pipe, and print() writes its newline apart: another rank's output
    # may follow on the same line)
    stopped = sorted(m.group(0) for line in inc.out for m in [re.search(r"rank=\d+ stopped at step=\d+", line)] if m)
    assert len(stopped) == 2, f"both ranks must stop: {stopped}\n{inc.describe()}"
    step = int(stopped[0].rsplit("=", 1)[1])
    assert stopped == [f"rank={r} stopped at step={step}" for r in (0, 1)], stopped
    assert max(inc.losses) == step and run.commits()[-1] == step, (step, run.commits())
    with open(os.path.join(run.newest(), "MANIFEST.json")) as f:
        names = sorted(e["name"] for e in json.load(f)["files"])
    assert names == sorted(RANK_FILES), names


def assert_same_losses(ref: WrapRun, run: WrapRun) -> None:
    want = {n: v[0] for n, v in ref.all_losses().items()}
    got = run.all_losses()
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values())
    bad = [(n, want[n], v[0]) for n, v in got.items() if v[0] != want[n]]
    assert not bad, f"losses differ at {len(bad)} steps, first {bad[:3]}"


def test_each_rank_stages_only_what_it_wrote_and_the_layout_gives_back_the_trainers_names(tmp_path):
    require("transformers")
    import pytest

    from hpc_ckpt.errors import IncompatibleCheckpointError
    from hpc_ckpt.integrations.hf import own_files, trainer_layout

    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    for n in ("model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_0.pth",
              "rng_state_1.pth", "rank1-of-2-optimizer.pt", "training_args.bin"):
        (folder / n).write_text(n)
    # rank 1's RNG file is there already (rank 1 was faster): rank 0 still leaves it to rank 1
    assert sorted(own_files(str(folder), 0, 2)) == ["model.safetensors", "optimizer.pt",
                                                   "rng_state_0.pth", "trainer_state.json"]
    assert sorted(own_files(str(folder), 1, 2)) == ["rank1-of-2-optimizer.pt", "rng_state_1.pth"]
    assert "training_args.bin" not in own_files(str(folder), 0, 1)

    ckpt = tmp_path / "step-000000000006"
    ckpt.mkdir()
    for r in (0, 1):
        for n in own_files(str(folder), r, 2):
            (ckpt / f"rank{r:05d}.{n}").write_text(n)
    (ckpt / "MANIFEST.json").write_text("{}")
    dest = trainer_layout(str(ckpt), str(tmp_path / "layout" / "checkpoint-6"))
    assert sorted(os.listdir(dest)) == sorted(n for n in os.listdir(folder) if n != "training_args.bin")
    assert all((tmp_path / "layout" / "checkpoint-6" / n).read_text() == n for n in os.listdir(dest))
    assert os.stat(os.path.join(dest, "model.safetensors")).st_ino == \
        os.stat(ckpt / "rank00000.model.safetensors").st_ino, "a hard link, not a copy"

    (ckpt / "rank00001.model.safetensors").write_text("x")  # two ranks claim one Trainer file
    with pytest.raises(IncompatibleCheckpointError, match="both the Trainer's model.safetensors"):
        trainer_layout(str(ckpt), dest)
