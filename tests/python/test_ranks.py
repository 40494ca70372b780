"""Multi-rank jobs through the hpc_ckpt package (README, "Multi-rank jobs").

Under the real `hpc-ckpt wrap --ranks 2` (gloo on CPU, 2 processes):
- the DDP example (examples/python/ddp_train.py, on the package) stopped twice by USR1 sent to
  the supervisor ends with every file of its final checkpoint byte-identical to a straight run;
- a rank SIGKILLed while it stages: no checkpoint ever holds the files of only some ranks, the
  previous checkpoint stays the resume point, and the rerun ends byte-identical;
- the sharded-optimizer example (ZeroRedundancyOptimizer) resumes exactly with 2 ranks, and
  with 1 rank is refused by the supervisor (exit 7) or, with distributed.reshard, by the package.

In-process (no processes, no torch.distributed): the stop agreement's logic, the per-rank file
layout and what another world size loads, and the shard loader's position mapping.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import hpc_ckpt
from hpc_ckpt.protocol import Environment, Transport
from conftest import assert_same_losses, get, JOBS, PY, REPO, RUN_AGAIN, WrapRun, read, verify

EXAMPLES = os.path.join(REPO, "examples", "python")
TWO = ["--ranks", "2"]
DDP_STEPS, DDP_EVERY = 48, 12
JOB_STEPS, JOB_EVERY, KILL_AT = 40, 10, 20
ZERO_STEPS, ZERO_EVERY = 40, 10


def ddp_cmd(delay: float) -> list:
    return [PY, os.path.join(EXAMPLES, "ddp_train.py"), "--steps", str(DDP_STEPS),
            "--checkpoint-every", str(DDP_EVERY), "--step-delay", str(delay)]


def job_cmd() -> list:
    return [PY, os.path.join(JOBS, "ddp_job.py"), "--steps", str(JOB_STEPS), "--every", str(JOB_EVERY)]


def zero_cmd(delay: float, steps: int = ZERO_STEPS) -> list:
    return [PY, os.path.join(EXAMPLES, "zero_train.py"), "--steps", str(steps),
            "--checkpoint-every", str(ZERO_EVERY), "--step-delay", str(delay)]


@pytest.fixture(scope="module")
def runs(hpc_bin, tmp_path_factory):
    """Every scenario's allocations, two at a time (independent run dirs)."""
    root = tmp_path_factory.mktemp("ranks")

    def run(name, cmd, plan, env=None):
        r = WrapRun(hpc_bin, str(root / name), cmd, args=TWO, env=env or {})
        if plan is None:  # the killed allocation, then the rerun
            first = r.launch(timeout=120)
            assert first.rc == RUN_AGAIN, f"the killed allocation: {first.describe()}"
            every_checkpoint_has_both_ranks(r)  # as the kill left them
            r.after_kill = r.committed_steps()  # type: ignore[attr-defined]
            r.env = {}
            r.launch(timeout=120)
            assert r.history[-1].rc == 0, r.history[-1].describe()
        else:
            r.run_to_end(plan, timeout=120)
        return r

    jobs = {
        "ddp_straight": (ddp_cmd(0.0), []),
        "ddp_usr1": (ddp_cmd(0.05), [(14, "USR1"), (30, "USR1")]),
        "job_straight": (job_cmd(), []),
        "job_killed": (job_cmd(), None, {"DDP_JOB_KILL_RANK1_AT": str(KILL_AT)}),
        "zero_straight": (zero_cmd(0.0), []),
        "zero_usr1": (zero_cmd(0.05), [(15, "USR1")]),
    }
    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = {k: ex.submit(run, k, *v) for k, v in jobs.items()}
        return {k: f.exception() or f.result() for k, f in futs.items()}


def final_files(run: WrapRun, step: int) -> dict:
    d = run.newest()
    assert os.path.basename(d) == f"step-{step:012d}", d
    verify(run.bin, d)
    return {n: read(os.path.join(d, n)) for n in sorted(os.listdir(d)) if n != "MANIFEST.json"}


def assert_identical(ref: WrapRun, run: WrapRun, step: int, files: list) -> None:
    a, b = final_files(ref, step), final_files(run, step)
    assert sorted(a) == sorted(files), sorted(a)
    assert sorted(b) == sorted(files), sorted(b)
    for n in files:
        assert a[n] == b[n], f"{n} differs from the straight run's"


def every_checkpoint_has_both_ranks(run: WrapRun) -> None:
    for name in os.listdir(run.checkpoints):
        d = os.path.join(run.checkpoints, name)
        verify(run.bin, d)
        with open(os.path.join(d, "MANIFEST.json")) as f:
            m = json.load(f)
        ranks = {e["name"][:9] for e in m["files"]}
        assert ranks == {"rank00000", "rank00001"}, (name, sorted(e["name"] for e in m["files"]))
        assert m["extra"]["world_size"] == 2
        for r in ("rank00000", "rank00001"):
            assert {f"{r}.rng.safetensors", f"{r}.rank_state.json"} <= {e["name"] for e in m["files"]}


DDP_FILES = [f"rank0000{r}.{n}" for r in (0, 1) for n in ("rank_state.json", "rng.safetensors")] + \
    ["rank00000.model.safetensors", "rank00000.optimizer.safetensors", "rank00000.trainer_state.json"]


# ----------------------------------------------------------------------------- under wrap

def test_ddp_example_stopped_twice_by_usr1_ends_byte_identical(runs):
    straight, run = get(runs, "ddp_straight"), get(runs, "ddp_usr1")
    assert straight.commits() == [12, 24, 36, DDP_STEPS]
    stops = [max(inc.losses) for inc in run.history[:-1]]
    for s in stops:  # both ranks stopped after the same step, and it was committed
        assert s in run.commits(), (s, run.commits())
    resumed = [int(line.split("resumed at step ")[1].split()[0]) for inc in run.history[1:]
               for line in inc.out if line.startswith("resumed at step ")]
    assert resumed == stops
    assert_identical(straight, run, DDP_STEPS, DDP_FILES)
    assert_same_losses(straight, run, DDP_STEPS)
    every_checkpoint_has_both_ranks(run)
    assert "agree_us_per_step=" in straight.history[0].out[-1]


def test_sigkill_of_a_staging_rank_commits_nothing_and_the_rerun_ends_identical(runs):
    straight, run = get(runs, "job_straight"), get(runs, "job_killed")
    killed = run.history[0]
    assert max(killed.losses) >= KILL_AT
    failed = run.journal("rank_failed")
    assert failed and failed[0]["rank"] == 1 and "SIGKILL" in failed[0]["how"], failed
    inc = run.journal("ranks_incomplete")
    assert inc and inc[0]["step"] == KILL_AT and inc[0]["missing"] == [1], inc
    assert run.after_kill == [KILL_AT - JOB_EVERY], run.after_kill  # step 20: nothing on disk
    assert run.commits() == [10, 20, 30, 40], run.commits()  # 20 committed once, by the rerun
    started = run.journal("child_started")
    assert started[1]["resume_step"] == KILL_AT - JOB_EVERY, started[1]
    every_checkpoint_has_both_ranks(run)
    assert_identical(straight, run, JOB_STEPS, DDP_FILES)
    assert_same_losses(straight, run, JOB_STEPS)


def test_sharded_optimizer_resumes_exactly_with_two_ranks(runs):
    straight, run = get(runs, "zero_straight"), get(runs, "zero_usr1")
    files = DDP_FILES + ["rank00001.optimizer.safetensors"]
    stop = max(run.history[0].losses)
    assert stop in run.commits() and stop < ZERO_STEPS, (stop, run.commits())
    assert_identical(straight, run, ZERO_STEPS, files)
    assert_same_losses(straight, run, ZERO_STEPS)
    with open(os.path.join(run.newest(), "MANIFEST.json")) as f:
        assert json.load(f)["extra"]["sharded"] is True


def test_sharded_checkpoint_with_one_rank_is_refused(runs, hpc_bin, tmp_path):
    base = get(runs, "zero_straight")
    # The supervisor refuses before starting the program (exit 7, both world sizes named).
    p = subprocess.run([hpc_bin, "wrap", "--run-dir", base.run_dir, "--ranks", "1", "--"] + zero_cmd(0.0),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 7, p.stderr[-2000:]
    assert "written by 2 ranks" in p.stderr and "this job has 1" in p.stderr, p.stderr[-2000:]
    # distributed.reshard says the program reshards: hpc_ckpt refuses with a clear error.
    cfg = tmp_path / "reshard.yaml"
    cfg.write_text("name: reshard\ndistributed:\n  world_size: 1\n  reshard: true\n")
    p = subprocess.run([hpc_bin, "wrap", "--run-dir", base.run_dir, "--config", str(cfg), "--"] + zero_cmd(0.0),
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if not k.startswith("HPC_CKPT_")})
    assert p.returncode != 0
    assert "IncompatibleCheckpointError" in p.stderr and "the optimizer is sharded" in p.stderr \
        and "written by 2 ranks" in p.stderr and "this job has 1" in p.stderr, p.stderr[-3000:]


# ----------------------------------------------------------------------------- in-process

def _peer_reduce(peer):
    """A 2-rank all_reduce(MAX) whose other rank reports ``peer[0]`` (a list, changeable)."""
    return lambda local: [max(a, b) for a, b in zip(local, peer[0])]


def test_agreement_stops_every_rank_at_the_same_agreed_step():
    peer = [[0, 0]]
    ag = hpc_ckpt.StopAgreement(2, every=3, reduce=_peer_reduce(peer))
    assert ag.active() and [s for s in range(7) if ag.due(s)] == [0, 3, 6]
    assert ag.agree([0, 0]) == [0, 0]
    peer[0] = [1, 0]
    assert ag.agree([0, 1]) == [1, 1], "the peer's stop and this rank's due save, both"
    assert ag.calls == 2 and ag.median_us() is not None
    assert hpc_ckpt.StopAgreement(1).agree([1, 0]) == [1, 0], "one rank: local flags, no reduce"
    assert not hpc_ckpt.StopAgreement(2, enabled=False, reduce=_peer_reduce(peer)).active()
    with pytest.raises(ValueError):
        hpc_ckpt.StopAgreement(2, every=0)


def test_checkpointer_stops_only_when_the_ranks_agree():
    peer = [[0, 0]]
    env = Environment(None, None, None, None, None, rank=1, world_size=2)
    ck = hpc_ckpt.Checkpointer(model=torch.nn.Linear(2, 2), agree_every=2,
                               session=hpc_ckpt.Session(env=env, verbose=False))
    ck.agreement = hpc_ckpt.StopAgreement(2, every=2, reduce=_peer_reduce(peer))
    ck.request_stop()  # this rank's signal: nothing happens before an agreement step
    ck.step_done(1)
    assert not ck.should_stop(), "a local signal alone must not stop one rank"
    ck.step_done(2)
    assert ck.should_stop() and ck.step == 2
    ck2 = hpc_ckpt.Checkpointer(model=torch.nn.Linear(2, 2),
                                session=hpc_ckpt.Session(env=env, verbose=False))
    ck2.agreement = hpc_ckpt.StopAgreement(2, reduce=_peer_reduce(peer))
    peer[0] = [1, 0]  # only the peer got the signal
    ck2.step_done(1)
    assert ck2.should_stop(), "the peer's signal stops this rank at the same step"


def _make(rank, world, seed=0):
    hpc_ckpt.seed_all(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.arange(64.0).reshape(16, 4))
    loader = hpc_ckpt.ResumableLoader(data, 8 // world, seed=1, rank=rank, world_size=world)
    env = Environment(None, None, None, None, None, rank=rank, world_size=world)
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, loader=loader, stop_agreement=False,
                               session=hpc_ckpt.Session(env=env, verbose=False))
    return model, opt, loader, ck


def _train(model, opt, loader, n):
    it = iter(loader)
    for _ in range(n):
        (x,) = next(it)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()


def _commit(tmp_path, world, step, sharded=False):
    """What the supervisor commits for ``world`` ranks at ``step``: rank r's NAME as
    rank<r:05d>.NAME, and a manifest recording the world size."""
    ck_dir = tmp_path / f"w{world}"
    ck_dir.mkdir()
    for r in range(world):
        model, opt, loader, ck = _make(r, world)
        if sharded:
            ck.sharded = {""}
        _train(model, opt, loader, step)
        torch.manual_seed(100 + r)  # this rank's stream
        ck.step = step
        stage = tmp_path / f"stage{r}"
        stage.mkdir()
        ck.write(str(stage))
        for n in os.listdir(stage):
            os.rename(stage / n, ck_dir / (f"rank{r:05d}.{n}" if world > 1 else n))
    (ck_dir / "MANIFEST.json").write_text(json.dumps({"extra": {"world_size": world} if world > 1 else {}}))
    return str(ck_dir)


def test_rank_files_and_other_world_sizes(tmp_path):
    path = _commit(tmp_path, 2, 1)
    names = sorted(os.listdir(path))
    assert names == ["MANIFEST.json", "rank00000.model.safetensors", "rank00000.optimizer.safetensors",
                     "rank00000.rank_state.json", "rank00000.rng.safetensors",
                     "rank00000.trainer_state.json", "rank00001.rank_state.json",
                     "rank00001.rng.safetensors"], "replicated state from rank 0 alone"
    for world in (1, 2, 4):
        for rank in range(world):
            model, opt, loader, ck = _make(rank, world)
            torch.manual_seed(7)
            before = torch.get_rng_state()
            ck.load(path)
            assert ck.step == 1 and ck.resumed_world_size == 2
            assert ck.rank_state_restored == (rank < 2)
            got = torch.get_rng_state()
            if rank < 2:
                torch.manual_seed(100 + rank)
                assert torch.equal(got, torch.get_rng_state()), "this rank's saved stream"
            else:
                assert torch.equal(got, before), "a new rank keeps its own seeding"
            # the data position is the global sample index: 1 step of a global batch of 8
            assert loader.position * loader.global_batch == 8
    # Another global batch that does not divide the samples seen: a clear error.
    model, opt, _, _ = _make(0, 1)
    loader = hpc_ckpt.ResumableLoader(torch.utils.data.TensorDataset(torch.zeros(16, 4)), 3, seed=1)
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, loader=loader, session=hpc_ckpt.Session(
        env=Environment(None, None, None, None, None), verbose=False))
    with pytest.raises(hpc_ckpt.IncompatibleCheckpointError, match=r"8 samples into epoch 0.*global batch is now 3"):
        ck.load(path)


def test_restored_rank_state_matches_what_it_saved(tmp_path):
    path = _commit(tmp_path, 2, 1)
    for rank in (0, 1):
        _, _, _, ck = _make(rank, 2)
        ck.load(path)
        got = torch.rand(3)
        torch.manual_seed(100 + rank)
        assert torch.equal(got, torch.rand(3)), f"rank {rank}'s RNG is its own"


def test_sharded_optimizer_state_refuses_another_world_size(tmp_path):
    path = _commit(tmp_path, 2, 1, sharded=True)
    assert "rank00001.optimizer.safetensors" in os.listdir(path)
    _, _, _, ck = _make(1, 2)
    ck.sharded = {""}
    ck.load(path)  # the same world size: each rank its own shard
    _, _, _, ck = _make(0, 1)
    with pytest.raises(hpc_ckpt.IncompatibleCheckpointError,
                       match=r"the optimizer is sharded .*written by 2 ranks.* this job has 1"):
        ck.load(path)


def test_shard_loader_splits_one_global_batch_and_maps_positions():
    data = torch.utils.data.TensorDataset(torch.arange(24))
    one = [b[0].tolist() for b in hpc_ckpt.ResumableLoader(data, 4, seed=3)]
    two = [[b[0].tolist() for b in hpc_ckpt.ResumableLoader(data, 2, seed=3, rank=r, world_size=2)]
           for r in (0, 1)]
    for g, a, b in zip(one, *two):
        assert sorted(a + b) == sorted(g) and a == g[0::2] and b == g[1::2]
    src = hpc_ckpt.ResumableLoader(data, 2, seed=3, rank=0, world_size=2)
    it = iter(src)
    next(it), next(it)  # 2 global batches of 4 = 8 samples
    dst = hpc_ckpt.ResumableLoader(data, 8, seed=3)
    dst.load_state_dict(src.state_dict())
    assert dst.position == 1
    bad = hpc_ckpt.ResumableLoader(data, 3, seed=3)
    with pytest.raises(ValueError, match="does not divide 8"):
        bad.load_state_dict(src.state_dict())
    with pytest.raises(ValueError):
        hpc_ckpt.ResumableLoader(data, 2, rank=2, world_size=2)


def test_rank_variables_are_read_and_checked():
    env = Environment.from_env({"HPC_CKPT_RANK": "1", "HPC_CKPT_WORLD_SIZE": "2",
                                "HPC_CKPT_RESUME_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.resume_world_size) == (1, 2, 4)
    assert Environment.from_env({}).world_size == 1
    for bad, msg in ((("2", "2"), "not below"), (("x", "2"), "not a number"), (("0", "0"), ">= 1")):
        with pytest.raises(hpc_ckpt.ProtocolError, match=msg):
            Environment.from_env({"HPC_CKPT_RANK": bad[0], "HPC_CKPT_WORLD_SIZE": bad[1]})
    assert hpc_ckpt.ranks.rank_file(3, "rng.safetensors", 4) == "rank00003.rng.safetensors"
    assert hpc_ckpt.ranks.rank_file(0, "rng.safetensors", 1) == "rng.safetensors"


class _Recorder(Transport):
    """A transport that records each request and what was staged for it."""

    def __init__(self, d):
        self.d, self.reqs = d, []

    def staging(self):
        for n in os.listdir(self.d):
            os.unlink(os.path.join(self.d, n))
        return self.d

    def submit(self, step, epoch, metrics, done, sharded=False, reshardable=False, stopping=False):
        self.reqs.append((step, done, sharded, sorted(os.listdir(self.d))))


def test_time_based_saves_and_finish_follow_the_agreement(tmp_path):
    peer = [[0, 1]]  # the peer's every_seconds save is due, this rank's is not
    env = Environment(None, None, None, None, None, rank=1, world_size=2)
    ck = hpc_ckpt.Checkpointer(model=torch.nn.Linear(2, 2), optimizer=None, every_seconds=1e9,
                               sharded=(), session=hpc_ckpt.Session(env=env, verbose=False))
    ck.session.transport = rec = _Recorder(str(tmp_path))
    ck.agreement = hpc_ckpt.StopAgreement(2, reduce=_peer_reduce(peer))
    ck.step_done(1)
    peer[0] = [0, 0]
    ck.step_done(2)
    peer[0] = [1]  # the peer was signalled after the last step: finish() agrees on a stop
    assert ck.finish() is False
    assert [(s, d) for s, d, _, _ in rec.reqs] == [(1, False), (2, False)]
    assert rec.reqs[0][3] == ["rank_state.json", "rng.safetensors"], "rank 1 stages no replicated state"
