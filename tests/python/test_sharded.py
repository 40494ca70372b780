"""Sharded models (FSDP2) through torch.distributed.checkpoint (README, "Sharded models").

Under the real `hpc-ckpt wrap --ranks N` (gloo on CPU), tests/python/jobs/fsdp_job.py:
- stopped by USR1 and by TERM, and with rank 1 SIGKILLed in the middle of its DCP write, an
  FSDP2 MLP ends with every committed file byte-identical to a straight 2-rank run (DCP's shard
  files and .metadata included) and the same loss at every step; so does a small transformer with
  tied embeddings, and asynchronous saves (dcp.async_save) give the very same files;
- a 2-rank checkpoint resumed by 1 and by 3 ranks: the loaded full tensors equal the saved ones
  (as read back in one process), training continues to the end, `status` shows each
  allocation's ranks;
- a truncated shard and a flipped byte in .metadata: `verify` names the file, the resume falls
  back to the previous checkpoint and the run ends identical to the straight one.

In-process: a committed checkpoint loads with plain DCP; a hostile .metadata runs no code;
the Checkpointer refuses mixing DCP and non-DCP state.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import assert_same_losses, get, JOBS, PY, RUN_AGAIN, WrapRun, read, verify

STEPS, EVERY = 24, 8
GPT_STEPS = 16
KILL = "1:16"  # rank 1 dies in the middle of its DCP write of step 16


def job(model: str = "mlp", steps: int = STEPS, delay: float = 0.0, *extra: str) -> list:
    return [PY, os.path.join(JOBS, "fsdp_job.py"), "--steps", str(steps), "--every", str(EVERY),
            "--model", model, "--step-delay", str(delay), *extra]


def ranks(n: int) -> list:
    return ["--ranks", str(n)]


@pytest.fixture(scope="module")
def runs(hpc_bin, tmp_path_factory):
    """Every scenario's allocations, two at a time (independent run dirs)."""
    root = tmp_path_factory.mktemp("sharded")

    def killed(r: WrapRun) -> None:
        first = r.launch(timeout=120)
        assert first.rc == RUN_AGAIN, f"the allocation whose rank 1 was killed: {first.describe()}"
        r.after_kill = r.committed_steps()  # type: ignore[attr-defined]
        r.kept_after_kill = sorted(os.listdir(os.path.join(r.run_dir, "kept")))  # type: ignore[attr-defined]
        r.env = {}
        assert r.launch(timeout=120).rc == 0, r.history[-1].describe()

    def run(name, cmd, plan, env=None):
        r = WrapRun(hpc_bin, str(root / name), cmd, args=ranks(2), env=env or {})
        if plan is None:
            killed(r)
        else:
            r.run_to_end(plan, timeout=120)
        return r

    def stopped_once(name):  # one stop after the step-8 checkpoint: checkpoints 8 and ~12
        r = WrapRun(hpc_bin, str(root / name), job(delay=0.05), args=ranks(2))
        inc = r.launch(11, "USR1", timeout=120)
        assert inc.rc == RUN_AGAIN, inc.describe()
        return r

    jobs = {
        "straight": (run, "straight", job(), []),
        "stops": (run, "stops", job(delay=0.05), [(6, "USR1"), (14, "TERM")]),
        "killed": (run, "killed", job(), None, {"FSDP_JOB_KILL_RANK_AT": KILL}),
        "async": (run, "async", job("mlp", STEPS, 0.05, "--async"), [(6, "USR1"), (13, "USR1")]),
        "gpt_straight": (run, "gpt_straight", job("gpt", GPT_STEPS), []),
        "gpt_usr1": (run, "gpt_usr1", job("gpt", GPT_STEPS, 0.05), [(9, "USR1")]),
        "stopped_once": (stopped_once, "stopped_once"),
    }
    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = {k: ex.submit(v[0], *v[1:]) for k, v in jobs.items()}
        return {k: f.exception() or f.result() for k, f in futs.items()}


def final_files(run: WrapRun, step: int) -> dict:
    d = run.newest()
    assert os.path.basename(d) == f"step-{step:012d}", d
    verify(run.bin, d)
    return {n: read(os.path.join(d, n)) for n in sorted(os.listdir(d)) if n != "MANIFEST.json"}


SHARDED_FILES = sorted([".metadata", "__0_0.distcp", "__1_0.distcp", "rank00000.trainer_state.json",
                        "rank00000.reference_batch.safetensors"]
                       + [f"rank0000{r}.{n}" for r in (0, 1) for n in ("rank_state.json", "rng.safetensors")])


def assert_identical(ref: WrapRun, run: WrapRun, step: int) -> None:
    a, b = final_files(ref, step), final_files(run, step)
    assert sorted(a) == SHARDED_FILES, sorted(a)
    assert sorted(b) == SHARDED_FILES, sorted(b)
    for n in SHARDED_FILES:
        assert a[n] == b[n], f"{n} differs from the straight run's"
    assert full_lines(ref) and full_lines(run) == full_lines(ref), "gathered full tensors differ"


def full_lines(run: WrapRun) -> list:
    return [line for line in run.history[-1].out if line.startswith("full ")]


def digest(t) -> str:
    import torch

    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def saved_digests(checkpoint: str) -> list:
    import hpc_ckpt.sharded

    return [f"restored {k} {digest(v)}" for k, v in hpc_ckpt.sharded.read_full(checkpoint).items()]


def clone(run: WrapRun, dst: str, args: list, cmd=None) -> WrapRun:
    shutil.copytree(run.run_dir, dst)
    for n in ("run.lock",):
        if os.path.exists(os.path.join(dst, n)):
            os.unlink(os.path.join(dst, n))
    return WrapRun(run.bin, dst, cmd or job(), args=args)


# ----------------------------------------------------------------------------- under wrap
def test_stopped_by_usr1_and_term_ends_byte_identical(runs):
    ref, r = get(runs, "straight"), get(runs, "stops")
    assert_identical(ref, r, STEPS)
    assert_same_losses(ref, r, STEPS)
    assert [inc.resumed_at is not None for inc in r.history] == [False, True, True]
    m = json.loads(read(os.path.join(r.newest(), "MANIFEST.json")))
    assert m["extra"]["world_size"] == 2 and m["extra"]["sharded"] and m["extra"]["reshardable"]


def test_a_rank_killed_in_its_dcp_write_commits_nothing_and_the_rerun_ends_identical(runs):
    ref, r = get(runs, "straight"), get(runs, "killed")
    assert r.after_kill == [8], f"checkpoints after the kill: {r.after_kill}"
    assert r.kept_after_kill, "the ranks' staged files are kept, not deleted"
    assert_identical(ref, r, STEPS)
    assert_same_losses(ref, r, STEPS)


def test_asynchronous_saves_write_the_same_files(runs):
    ref, r = get(runs, "straight"), get(runs, "async")
    assert_identical(ref, r, STEPS)
    assert_same_losses(ref, r, STEPS)
    assert any("written in the background" in inc.err for inc in r.history), r.history[0].err[-2000:]


def test_transformer_with_tied_embeddings_resumes_identical(runs):
    ref, r = get(runs, "gpt_straight"), get(runs, "gpt_usr1")
    assert_identical(ref, r, GPT_STEPS)
    assert_same_losses(ref, r, GPT_STEPS)


@pytest.mark.parametrize("world", [1, 3])
def test_another_world_size_loads_the_saved_full_tensors_and_trains_on(runs, tmp_path, world):
    base = get(runs, "stopped_once")
    ck = base.newest()
    r = clone(base, str(tmp_path / "run"), ranks(world))
    inc = r.launch(timeout=120)
    assert inc.rc == 0, inc.describe()
    assert inc.resumed_at == int(os.path.basename(ck)[5:]), inc.describe()
    restored = [line for line in inc.out if line.startswith("restored ")]
    assert restored and restored == saved_digests(ck), "the loaded full tensors differ from the saved ones"
    assert "world=2" in next(line for line in inc.out if line.startswith("resumed from"))
    assert sorted(r.all_losses()) == list(range(inc.resumed_at + 1, STEPS + 1))
    st = json.loads(subprocess.run([r.bin, "status", r.run_dir, "--json"], capture_output=True,
                                   text=True, check=True).stdout)
    assert [a.get("world_size") or 1 for a in st["run"]["allocations"]] == [2, world]
    text = subprocess.run([r.bin, "status", r.run_dir], capture_output=True, text=True, check=True).stdout
    assert "RANKS" in text, text


def corrupt_shard(d: str) -> str:
    p = os.path.join(d, "__1_0.distcp")
    os.truncate(p, os.path.getsize(p) // 2)
    return "__1_0.distcp"


def corrupt_metadata(d: str) -> str:
    p = os.path.join(d, ".metadata")
    b = bytearray(read(p))
    b[len(b) // 2] ^= 0x40
    with open(p, "wb") as f:
        f.write(b)
    return ".metadata"


@pytest.mark.parametrize("corrupt", [corrupt_shard, corrupt_metadata])
def test_a_damaged_dcp_file_fails_verify_and_the_resume_falls_back(runs, tmp_path, corrupt):
    base, ref = get(runs, "stopped_once"), get(runs, "straight")
    r = clone(base, str(tmp_path / "run"), ranks(2))
    newest = r.newest()
    assert r.committed_steps()[0] == EVERY and len(r.committed_steps()) == 2, r.committed_steps()
    name = corrupt(newest)
    p = subprocess.run([r.bin, "verify", newest], capture_output=True, text=True)
    assert p.returncode != 0 and name in p.stdout + p.stderr, p.stdout + p.stderr
    inc = r.launch(timeout=120)
    assert inc.rc == 0, inc.describe()
    assert inc.resumed_at == EVERY, "fell back to the previous checkpoint"
    assert r.journal("fallback") or r.journal("checkpoint_refused"), "the fallback is journaled"
    assert final_files(r, STEPS) == final_files(ref, STEPS)


# ----------------------------------------------------------------------------- in-process
def test_a_committed_checkpoint_loads_with_plain_dcp(runs):
    """No lock-in: torch's own reader and planner read the committed directory as it is."""
    import torch
    import torch.distributed.checkpoint as dcp

    import hpc_ckpt.sharded

    ck = get(runs, "straight").newest()
    ours = hpc_ckpt.sharded.read_full(ck)
    plain = {k: torch.empty_like(v) for k, v in ours.items()}
    dcp.load(plain, checkpoint_id=ck, no_dist=True)
    assert plain.keys() == ours.keys() and all(torch.equal(plain[k], ours[k]) for k in ours)
    assert any(k.startswith("optimizer._.state.") for k in ours), sorted(ours)[:5]


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM_RAN",))


def test_a_hostile_metadata_file_runs_no_code(runs, tmp_path, monkeypatch):
    import hpc_ckpt.sharded
    from hpc_ckpt.errors import IncompatibleCheckpointError

    d = tmp_path / "ck"
    shutil.copytree(get(runs, "straight").newest(), d)
    with open(d / ".metadata", "wb") as f:
        pickle.dump(_Boom(), f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match="not a DCP metadata type"):
        hpc_ckpt.sharded.read_full(str(d))
    assert not (tmp_path / "BOOM_RAN").exists()


def test_dcp_and_safetensors_state_are_not_mixed(hpc_bin, tmp_path):
    import torch

    import hpc_ckpt
    from hpc_ckpt.errors import IncompatibleCheckpointError

    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="async_save=True applies"):
        hpc_ckpt.Checkpointer(model=m, async_save=True, run_dir=str(tmp_path / "r"), binary=hpc_bin,
                              verbose=False)
    ck = hpc_ckpt.Checkpointer(model=m, run_dir=str(tmp_path / "r"), binary=hpc_bin, verbose=False)
    assert not ck.dcp
    with pytest.raises(IncompatibleCheckpointError, match="saved through DCP"):
        ck._check_dcp({"model": {"": {"dcp": True}}, "optimizer": {}}, "checkpoint X")
    ck._check_dcp({"model": {"": {"tensors": {}}}, "optimizer": {}}, "checkpoint X")
    ck.close()
