#!/usr/bin/env python3
"""Child-protocol (v1) harness for examples/python/train.py (built on the hpc_ckpt package),
without the wrapper.

    .venv/bin/python tests/python/child_protocol_harness.py [--jobs J] [--keep]

It plays the wrapper's part: runs train.py as a child with HPC_CKPT_RUN_DIR,
HPC_CKPT_STAGING, HPC_CKPT_COMMIT_REQUEST, HPC_CKPT_SIGNAL=USR1 (and
HPC_CKPT_RESUME_FROM on restarts) and commits simply: on seeing the request
(polled every 5 ms while the child runs, and once more after it exits) it checks
the request JSON and the staged names, copies STAGING's files into
RUN/checkpoints/step-<N:012>/ (plus a MANIFEST.json the script must ignore; the
directory and files are made read-only), writes <request>.result via a
rename, empties STAGING and removes the request (the acknowledgement).

Scenarios (300 steps, checkpoint every 50):
  a  straight run
  b  interrupted by USR1 at 3 seeded-random steps (>= 1 mid-epoch), each time
     restarted from the newest checkpoint
  c  one SIGTERM (same as USR1), then one SIGKILL (no final checkpoint): restart
     from the last periodic one and redo the lost steps
  d  a's run restarted from its final checkpoint: must do no work, write no request,
     and print the same final line
For b/c: the final checkpoint's model.safetensors, optimizer.safetensors,
rng.safetensors and trainer_state.json must be byte-identical to a's, and the
loss printed at every step must equal a's (including steps run twice after the
SIGKILL). Prints "N passed, 0 failed" and exits 0 on success.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "examples", "python", "train.py")
VENV_PY = os.path.join(REPO, ".venv", "bin", "python")
PY = VENV_PY if os.path.exists(VENV_PY) else sys.executable

STEPS = 300
EVERY = 50
SEED = 7
STEPS_PER_EPOCH = 4096 // 64
DELAY = 0.01          # --step-delay for incarnations the harness interrupts
COMPARED = ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
            "trainer_state.json"]
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
STEP_RE = re.compile(r"^step=(\d+) loss=(\S+)$")
FINAL_RE = re.compile(r"^final step=(\d+) loss=(\S+)$")
RESUMED_RE = re.compile(r"^resumed from .* at step=(\d+) ")


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


class Run:
    """One run directory plus the wrapper's commit side."""

    def __init__(self, root, name):
        self.dir = os.path.join(root, name)
        self.staging = os.path.join(self.dir, "staging")
        self.ckpts = os.path.join(self.dir, "checkpoints")
        self.request = os.path.join(self.dir, "commit-request.json")
        os.makedirs(self.staging)
        os.makedirs(self.ckpts)
        self.commits = []      # (step, epoch, metrics) in commit order
        self.errors = []
        self.lock = threading.Lock()

    def newest(self):
        names = sorted(n for n in os.listdir(self.ckpts) if n.startswith("step-"))
        return os.path.join(self.ckpts, names[-1]) if names else None

    def poll_commit(self):
        with self.lock:
            if not os.path.exists(self.request):
                return
            try:
                self._commit()
            except Exception as e:  # a protocol violation: fail the scenario
                self.errors.append(f"commit: {e}")
                with open(self.request + ".result", "w") as f:
                    json.dump({"ok": False, "error": str(e)}, f)
                for n in os.listdir(self.staging):
                    os.unlink(os.path.join(self.staging, n))
                os.unlink(self.request)

    def _commit(self):
        with open(self.request) as f:
            req = json.load(f)
        check(set(req) - {"stopping"} == {"step", "epoch", "metrics", "done"}, f"request keys {sorted(req)}")
        # "stopping" (saved on a stop signal: work left) is only ever true, and never with done
        check(req.get("stopping", True) is True and not (req.get("stopping") and req["done"]),
              f"request stopping={req.get('stopping')!r} done={req['done']!r}")
        step, epoch, metrics, done = req["step"], req["epoch"], req["metrics"], req["done"]
        check(done is (step == STEPS), f"request step {step} with done={done!r}")
        check(isinstance(step, int) and step >= 0, f"bad step {step!r}")
        check(isinstance(epoch, int) and epoch >= 0, f"bad epoch {epoch!r}")
        check(isinstance(metrics, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v)
            for k, v in metrics.items()), f"bad metrics {metrics!r}")
        names = sorted(os.listdir(self.staging))
        check(names, "empty STAGING")
        for n in names:
            check(NAME_RE.match(n), f"bad staged name {n!r}")
            check(stat.S_ISREG(os.lstat(os.path.join(self.staging, n)).st_mode),
                  f"staged {n!r} is not a regular file")
        check(set(COMPARED) <= set(names), f"staged files {names}")
        with open(os.path.join(self.staging, "trainer_state.json")) as f:
            ts = json.load(f)
        check(ts["format"] == "hpc-ckpt-python/1", f"trainer_state format {ts.get('format')!r}")
        check(ts["step"] == step, "request step != staged step")
        check(ts["epoch"] == epoch, "request epoch != staged epoch")
        check(ts["stateful"]["loader"]["epoch"] == epoch == step // STEPS_PER_EPOCH
              and ts["stateful"]["loader"]["position"] == step % STEPS_PER_EPOCH,
              f"staged data position {ts['stateful']['loader']} != step {step}")
        final = os.path.join(self.ckpts, f"step-{step:012d}")
        check(not os.path.exists(final), f"duplicate checkpoint for step {step}")
        tmp = final + ".tmp"
        os.mkdir(tmp)
        for n in names:
            shutil.copyfile(os.path.join(self.staging, n), os.path.join(tmp, n))
        with open(os.path.join(tmp, "MANIFEST.json"), "w") as f:
            json.dump({"harness": True, "files": names, "step": step}, f)
        for n in os.listdir(tmp):
            os.chmod(os.path.join(tmp, n), 0o444)
        os.rename(tmp, final)
        os.chmod(final, 0o555)
        res = {"ok": True, "checkpoint": os.path.basename(final)}
        with open(self.request + ".result.tmp", "w") as f:
            json.dump(res, f)
        os.rename(self.request + ".result.tmp", self.request + ".result")
        for n in names:
            os.unlink(os.path.join(self.staging, n))
        self.commits.append((step, epoch, metrics))
        os.unlink(self.request)  # the acknowledgement

    def launch(self, resume=None, kill_at=None, kill_sig=None, delay=0.0):
        """Run one incarnation; returns dict(rc, losses, final, resumed_at, out, err)."""
        # A wrapper hands every incarnation an empty STAGING (a killed child may leave files).
        for n in os.listdir(self.staging):
            os.unlink(os.path.join(self.staging, n))
        env = dict(os.environ)
        env.pop("HPC_CKPT_RESUME_FROM", None)
        env.update(HPC_CKPT_RUN_DIR=self.dir, HPC_CKPT_STAGING=self.staging,
                   HPC_CKPT_COMMIT_REQUEST=self.request, HPC_CKPT_SIGNAL="USR1",
                   PYTHONUNBUFFERED="1")
        if resume:
            env["HPC_CKPT_RESUME_FROM"] = resume
        cmd = [PY, TRAIN, "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
               "--seed", str(SEED), "--threads", "1", "--step-delay", str(delay)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, bufsize=1)
        stop = threading.Event()

        def committer():
            while not stop.is_set():
                self.poll_commit()
                time.sleep(0.005)

        err_chunks = []
        t_err = threading.Thread(target=lambda: err_chunks.append(p.stderr.read()), daemon=True)
        t_commit = threading.Thread(target=committer, daemon=True)
        t_err.start()
        t_commit.start()
        out, losses, final, resumed_at, sent = [], {}, None, None, False
        for line in p.stdout:
            line = line.rstrip("\n")
            out.append(line)
            m = STEP_RE.match(line)
            if m:
                n = int(m.group(1))
                check(n not in losses, f"step {n} printed twice by one process")
                losses[n] = m.group(2)
                if kill_at is not None and n >= kill_at and not sent:
                    os.kill(p.pid, kill_sig)
                    sent = True
            elif FINAL_RE.match(line):
                final = FINAL_RE.match(line).groups()
            elif RESUMED_RE.match(line):
                resumed_at = int(RESUMED_RE.match(line).group(1))
        rc = p.wait()
        stop.set()
        t_commit.join()
        t_err.join()
        self.poll_commit()  # a request written just before exiting (the signal path)
        check(not self.errors, f"protocol errors: {self.errors}")
        check(not os.path.exists(self.request), "request still present after commit")
        check(not os.listdir(self.staging), "STAGING not empty after commit")
        return dict(rc=rc, losses=losses, final=final, resumed_at=resumed_at,
                    out=out, err="".join(err_chunks), sent=sent)


def describe(inc):
    return f"rc={inc['rc']}\nstdout tail: {inc['out'][-5:]}\nstderr: {inc['err'][-2000:]}"


def merge_losses(all_losses, inc):
    for n, v in inc["losses"].items():
        all_losses.setdefault(n, []).append(v)


def run_straight(root):
    run = Run(root, "a")
    inc = run.launch()
    check(inc["rc"] == 0, f"straight run failed: {describe(inc)}")
    check(inc["final"] is not None and int(inc["final"][0]) == STEPS, "no final line")
    check(sorted(inc["losses"]) == list(range(1, STEPS + 1)), "missing step lines")
    steps = [c[0] for c in run.commits]
    want = list(range(EVERY, STEPS, EVERY)) + [STEPS]
    check(steps == want, f"commits at {steps}, expected {want}")
    rerun = run.launch(resume=run.newest())  # for d
    return run, {n: [v] for n, v in inc["losses"].items()}, inc["final"], rerun


def run_interrupted(root, name, plan, redo_ok=False):
    """plan: list of (target_step, signal). Returns (run, losses-by-step, final, info)."""
    run = Run(root, name)
    all_losses, resume, info = {}, None, []
    for target, sig in plan:
        inc = run.launch(resume=resume, kill_at=target, kill_sig=sig, delay=DELAY)
        check(inc["sent"], f"{name}: child finished before step {target}: {describe(inc)}")
        merge_losses(all_losses, inc)
        last = max(inc["losses"])
        if sig == signal.SIGKILL:
            check(inc["rc"] == -signal.SIGKILL, f"{name}: expected SIGKILL death: {describe(inc)}")
        else:
            check(inc["rc"] == 0, f"{name}: exit after {sig.name} not 0: {describe(inc)}")
            # the checkpoint holds the state after the last completed step
            check(run.commits and run.commits[-1][0] == last,
                  f"{name}: last commit {run.commits[-1:]} != last step printed {last}")
        new = run.newest()
        check(new is not None, f"{name}: no checkpoint to resume from")
        ck = int(os.path.basename(new)[5:])
        info.append((sig.name, target, last, ck))
        resume = new
    inc = run.launch(resume=resume)
    check(inc["rc"] == 0, f"{name}: last incarnation failed: {describe(inc)}")
    check(inc["resumed_at"] == int(os.path.basename(resume)[5:]),
          f"{name}: resumed_at {inc['resumed_at']} != {resume}")
    check(inc["final"] is not None and int(inc["final"][0]) == STEPS, f"{name}: no final line")
    merge_losses(all_losses, inc)
    check(sorted(all_losses) == list(range(1, STEPS + 1)), f"{name}: steps not all covered")
    dup = sorted(n for n, v in all_losses.items() if len(v) > 1)
    check(redo_ok or not dup, f"{name}: steps run twice: {dup}")
    return run, all_losses, inc["final"], info


def compare(ref_run, ref_losses, ref_final, run, losses, final, name):
    fa, fb = ref_run.newest(), run.newest()
    check(os.path.basename(fa) == os.path.basename(fb) == f"step-{STEPS:012d}",
          f"{name}: newest checkpoints {fa} {fb}")
    for f in COMPARED:
        with open(os.path.join(fa, f), "rb") as x, open(os.path.join(fb, f), "rb") as y:
            check(x.read() == y.read(), f"{name}: {f} differs from the straight run's")
    bad = [(n, ref_losses[n][0], v) for n, vs in losses.items() for v in vs
           if v != ref_losses[n][0]]
    check(not bad, f"{name}: losses differ at {len(bad)} steps, first {bad[:3]}")
    check(final == ref_final, f"{name}: final line {final} != {ref_final}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2, help="scenarios run concurrently")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    t0 = time.monotonic()

    rng = random.Random(20240601)
    # USR1 targets: 3 distinct steps in separate thirds, none on/next to an epoch edge,
    # so the checkpoints land mid-epoch (checked below).
    b_targets = []
    for lo, hi in ((5, 95), (105, 195), (205, 290)):
        while True:
            t = rng.randrange(lo, hi)
            if 2 <= t % STEPS_PER_EPOCH <= STEPS_PER_EPOCH - 4 and t % EVERY not in (0, 49):
                break
        b_targets.append(t)
    c_plan = [(rng.randrange(55, 95), signal.SIGTERM),
              (rng.randrange(110, 140), signal.SIGKILL)]  # after the periodic one at 100

    root = tempfile.mkdtemp(prefix="hpc-ckpt-child-")
    results, passed, failed = {}, 0, 0
    try:
        plans = {
            "a": lambda: run_straight(root),
            "b": lambda: run_interrupted(root, "b", [(t, signal.SIGUSR1) for t in b_targets]),
            "c": lambda: run_interrupted(root, "c", c_plan, redo_ok=True),
        }
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
            futs = {k: ex.submit(f) for k, f in plans.items()}
            for k, fut in futs.items():
                try:
                    results[k] = fut.result()
                except Failure as e:
                    results[k] = e

        def report(name, fn):
            nonlocal passed, failed
            try:
                msg = fn()
                passed += 1
                print(f"ok   {name}{': ' + msg if msg else ''}", flush=True)
            except Failure as e:
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)

        def need(k):
            if isinstance(results[k], Exception):
                raise results[k]
            return results[k]

        def test_a():
            run, _, final, _ = need("a")
            return f"{STEPS} steps, commits {[c[0] for c in run.commits]}, final loss {final[1]}"

        def test_b():
            run, losses, final, info = need("b")
            ra, la, fa = need("a")[:3]
            ck_steps = [i[3] for i in info]
            check(len(set(ck_steps)) == 3, f"b: interruptions {info}")
            check(any(s % STEPS_PER_EPOCH for s in ck_steps), f"b: none mid-epoch: {info}")
            compare(ra, la, fa, run, losses, final, "b")
            return "USR1 at " + ", ".join(f"{t}->ckpt {ck} (epoch step {ck % STEPS_PER_EPOCH})"
                                          for _, t, _, ck in info) + "; bytes+losses identical"

        def test_c():
            run, losses, final, info = need("c")
            ra, la, fa = need("a")[:3]
            (_, _, t_last, t_ck), (_, _, last, ck) = info
            check(t_ck == t_last, f"c: SIGTERM checkpoint {t_ck} != last step {t_last}")
            check(ck < last, f"c: resumed from {ck} but the killed run reached {last}")
            redone = sorted(n for n, v in losses.items() if len(v) > 1)
            check(redone == list(range(ck + 1, last + 1)), f"c: redone steps {redone}")
            compare(ra, la, fa, run, losses, final, "c")
            return (f"SIGTERM at {t_ck}, SIGKILL at step {last}, resumed from {ck}, "
                    f"{len(redone)} steps redone with identical losses; bytes identical")

        def test_d():
            run, _, fa, inc = need("a")
            check(inc["rc"] == 0 and not inc["losses"], f"d: rerun did work: {describe(inc)}")
            check(inc["resumed_at"] == STEPS, f"d: resumed_at {inc['resumed_at']}")
            check(len(run.commits) == len(range(EVERY, STEPS, EVERY)) + 1,
                  "d: rerun from the final checkpoint committed")
            check(inc["final"] == fa, f"d: rerun final {inc['final']} != {fa}")
            return "resume from the final checkpoint: no steps, no request, same final line"

        report("a straight run", test_a)
        report("b USR1 x3 + resumes", test_b)
        report("c SIGTERM, SIGKILL + resume from periodic", test_c)
        report("d resume from final checkpoint is a no-op", test_d)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            for dp, dns, _ in os.walk(root):
                for d in dns:
                    os.chmod(os.path.join(dp, d), 0o755)
            shutil.rmtree(root, ignore_errors=True)
    print(f"({time.monotonic() - t0:.1f} s)")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
