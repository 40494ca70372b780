"""examples/python/train.py (the hpc_ckpt package) under the real `hpc-ckpt wrap`.

A straight run against runs stopped by USR1 (twice, mid-epoch), by TERM, by USR1 sent to the
program alone (the supervisor must still see work left: exit 11, not 0), and by a SIGKILL of the
program (resumed from the last periodic checkpoint, lost steps redone): every file of the final
checkpoint is byte-identical and every step's loss is the same.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PY, REPO, WrapRun, read, verify

STEPS, EVERY, SEED = 128, 25, 3          # 2 epochs of 64 batches
FILES = ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json",
         "reference_batch.safetensors"]


def cmd(delay: float) -> list:
    return [PY, os.path.join(REPO, "examples", "python", "train.py"), "--steps", str(STEPS),
            "--checkpoint-every", str(EVERY), "--seed", str(SEED), "--step-delay", str(delay)]


PLANS = {"USR1": [(30, "USR1"), (93, "USR1")], "TERM": [(45, "TERM")], "KILL": [(60, "KILL_CHILD")],
         "USR1_CHILD": [(70, "USR1_CHILD")]}


@pytest.fixture(scope="module")
def runs(hpc_bin, tmp_path_factory):
    """Every scenario's allocations, two scenarios at a time (they are independent)."""
    root = tmp_path_factory.mktemp("example")

    def straight():
        run = WrapRun(hpc_bin, str(root / "straight"), cmd(0.0))
        run.run_to_end([])
        return run

    def stopped(name):
        run = WrapRun(hpc_bin, str(root / name), cmd(0.01))
        run.run_to_end(PLANS[name])
        return run

    with ThreadPoolExecutor(max_workers=2) as ex:
        futs = {"straight": ex.submit(straight), **{k: ex.submit(stopped, k) for k in PLANS}}
        return {k: f.exception() or f.result() for k, f in futs.items()}


def get(runs, name) -> WrapRun:
    r = runs[name]
    if isinstance(r, BaseException):
        raise r
    return r


@pytest.fixture(scope="module")
def straight(runs):
    run = get(runs, "straight")
    assert run.commits() == [25, 50, 75, 100, 125, STEPS], run.commits()
    return run


def check_identical(ref: WrapRun, run: WrapRun, redo_ok: bool = False) -> None:
    a, b = ref.newest(), run.newest()
    assert os.path.basename(a) == os.path.basename(b) == f"step-{STEPS:012d}"
    verify(run.bin, b)
    for f in FILES:
        assert read(os.path.join(a, f)) == read(os.path.join(b, f)), f"{f} differs from the straight run's"
    want = {n: v[0] for n, v in ref.all_losses().items()}
    got = run.all_losses()
    assert sorted(got) == list(range(1, STEPS + 1)), "steps missing"
    bad = [(n, want[n], v) for n, vs in got.items() for v in vs if v != want[n]]
    assert not bad, f"losses differ at {len(bad)} steps, first {bad[:3]}"
    if not redo_ok:
        assert all(len(v) == 1 for v in got.values()), "steps run twice"
    with open(os.path.join(b, "trainer_state.json")) as f:
        st = json.load(f)
    assert st["step"] == STEPS and st["stateful"]["loader"] == {**st["stateful"]["loader"], "epoch": 2, "position": 0}


def stop_points(run: WrapRun) -> list:
    """The last step each stopped allocation printed."""
    return [max(inc.losses) for inc in run.history[:-1]]


@pytest.mark.parametrize("how", ["USR1", "TERM", "USR1_CHILD"])
def test_stop_signal_resumes_byte_identical(runs, straight, how):
    run = get(runs, how)
    committed, stops = run.commits(), stop_points(run)
    for last in stops:  # the stop checkpoint is the state after the last step done
        assert last in committed, (last, committed)
    if how == "USR1":  # (where a signal lands depends on timing; one mid-epoch stop is enough)
        assert any(s % EVERY and s % 64 for s in stops), f"no mid-epoch stop: {stops}"
    assert [inc.resumed_at for inc in run.history[1:]] == stop_points(run)
    check_identical(straight, run)
    if how == "USR1_CHILD":  # the supervisor never got the signal; the commit said "stopping"
        ends = run.journal("allocation_end")
        assert [e["ending"] for e in ends] == ["warning_signal", "completed"], ends


def test_sigkill_of_the_program_resumes_from_periodic(runs, straight):
    run = get(runs, "KILL")
    killed, last = run.history[0], run.history[1]
    assert killed.rc == 11 and max(killed.losses) >= 60
    assert last.resumed_at == 50, f"resumed at {last.resumed_at}, expected the periodic checkpoint 50"
    redone = sorted(n for n, v in run.all_losses().items() if len(v) > 1)
    assert redone == list(range(51, max(killed.losses) + 1)), redone
    check_identical(straight, run, redo_ok=True)


def test_finished_run_is_not_rerun(straight):
    """A second `wrap` of a completed run: no step runs, nothing is committed, exit 0."""
    before = straight.committed_steps()
    inc = straight.launch()
    assert inc.rc == 0 and not inc.losses and inc.resumed_at in (STEPS, None), inc.describe()
    assert straight.committed_steps() == before
