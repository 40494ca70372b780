#!/usr/bin/env python3
"""The prepared GPU check's driver (run it through tests/gpu/check.sh, which sets the paths).

Checks, each recorded in one JSON file (`--out`):

1. ``exact_resume``: tests/gpu/job.py (AdamW, dropout, bf16 autocast, deterministic algorithms)
   under ``hpc-ckpt wrap``, three ways: straight; stopped by USR1 at step 15 and resumed;
   the supervisor SIGKILLed at step 25 (its guard takes the program down) and resumed from the
   step-20 checkpoint. Every step's loss and every file of the final checkpoint (but the
   manifest, which records times) must be byte-identical to the straight run's; on CUDA the
   checkpoint's RNG file must hold the CUDA generator (``torch.cuda.0``).
2. ``save_stall``: tests/gpu/stall.py, a >= 2 GB state on the device (``--state-gb``):
   ``Checkpointer(async_save=True).save()`` against ``dcp.async_save``, interleaved; medians.
3. ``builtin_trainer``: ``hpc-ckpt train`` (the tch trainer, bf16) straight and stopped by USR1, final
   checkpoints byte-identical. Needs a torch-linked ``hpc-ckpt`` (``--trainer-bin``), or a cargo
   and a libtorch that tch accepts (torch 2.13) to build one; otherwise it is skipped and the
   JSON says why.

``--dry-run`` runs all of it on the CPU with small sizes (the CI runs it so this script cannot
rot); the CUDA-only assertions are listed as ``not_run`` there. Exit 0 when no check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STEP_RE = re.compile(r"^step=(\d+) loss=(\S+)$")
STEPS, EVERY, STOP_AT, KILL_AT = 40, 10, 15, 25


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_env() -> Dict[str, str]:
    """The environment without any HPC_CKPT_* of an enclosing wrap (the runs here are their own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HPC_CKPT_") or k == "HPC_CKPT_LOG"}


def wrap_run(binary: str, run_dir: str, cmd: List[str], stop_at: Optional[int] = None,
             how: str = "USR1", timeout: float = 600.0) -> Dict[str, object]:
    """One allocation of `hpc-ckpt wrap`; at step >= stop_at send `how` ("USR1", or "KILL": the
    supervisor is SIGKILLed). Returns rc, the losses printed and the output's tail."""
    p = subprocess.Popen([binary, "wrap", "--run-dir", run_dir, "--"] + cmd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, bufsize=1, env=clean_env(),
                         start_new_session=True)
    err: List[str] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    killer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    killer.start()
    losses: Dict[int, str] = {}
    out: List[str] = []
    sent = False
    try:
        for line in p.stdout:
            line = line.rstrip("\n")
            out.append(line)
            m = STEP_RE.match(line)
            if m:
                losses[int(m.group(1))] = m.group(2)
                if stop_at is not None and int(m.group(1)) >= stop_at and not sent:
                    sent = True
                    os.kill(p.pid, signal.SIGKILL if how == "KILL" else getattr(signal, "SIG" + how))
        rc = p.wait()
    finally:
        killer.cancel()
    reader.join()
    return {"rc": rc, "losses": losses, "sent": sent, "tail": out[-5:], "stderr": "".join(err)[-3000:]}


def expect_rc(run: Dict[str, object], want: int, what: str) -> None:
    if run["rc"] != want:
        raise CheckFailed(f"{what}: exit {run['rc']}, expected {want}\nstdout tail: {run['tail']}\n"
                          f"stderr tail: {run['stderr']}")


def newest(run_dir: str) -> str:
    with open(os.path.join(run_dir, "last_checkpoint")) as f:
        return os.path.join(run_dir, "checkpoints", f.read().strip())


def checkpoint_files(path: str) -> Dict[str, bytes]:
    """Every file of a checkpoint dir but MANIFEST.json (it records commit times and hosts)."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            if n != "MANIFEST.json":
                full = os.path.join(root, n)
                with open(full, "rb") as f:
                    out[os.path.relpath(full, path)] = f.read()
    return out


def same_checkpoints(ref: str, other: str, what: str) -> int:
    a, b = checkpoint_files(ref), checkpoint_files(other)
    if sorted(a) != sorted(b):
        raise CheckFailed(f"{what}: the final checkpoints hold other files: {sorted(a)} vs {sorted(b)}")
    differ = [n for n in a if a[n] != b[n]]
    if differ:
        raise CheckFailed(f"{what}: final checkpoint files differ from the straight run's: {differ}")
    return sum(len(v) for v in a.values())


def merged_losses(*runs: Dict[str, object]) -> Dict[int, str]:
    """Each step's loss as the allocation that went on from it printed it (later ones win)."""
    out: Dict[int, str] = {}
    for r in runs:
        out.update(r["losses"])  # type: ignore[arg-type]
    return out


def check_exact_resume(a: argparse.Namespace, work: str, device: str) -> Dict[str, object]:
    job = [sys.executable, os.path.join(HERE, "job.py"), "--device", device, "--precision", "bf16",
           "--steps", str(STEPS), "--every", str(EVERY), "--width", str(a.width)]
    t0 = time.monotonic()
    runs: Dict[str, List[Dict[str, object]]] = {}

    def chain(name: str, stop_at: Optional[int], how: str) -> None:
        run_dir = os.path.join(work, name)
        runs[name] = [wrap_run(a.bin, run_dir, job, stop_at, how)]
        if stop_at is not None:
            runs[name].append(wrap_run(a.bin, run_dir, job))

    # The three runs are independent: side by side (the CPU dry run's time; on a GPU they share it).
    threads = [threading.Thread(target=chain, args=args) for args in
               (("straight", None, "USR1"), ("usr1", STOP_AT, "USR1"), ("kill", KILL_AT, "KILL"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = sorted({"straight", "usr1", "kill"} - set(runs))
    if missing:
        raise CheckFailed(f"runs {missing} did not finish (see stderr)")
    straight, usr1, kill = runs["straight"][0], runs["usr1"], runs["kill"]
    expect_rc(straight, 0, "straight run")
    expect_rc(usr1[0], 11, f"USR1 at step {STOP_AT} (no Slurm here: exit 11, run again)")
    expect_rc(usr1[1], 0, "the allocation after USR1")
    expect_rc(kill[0], -signal.SIGKILL, f"SIGKILL of the supervisor at step {KILL_AT}")
    expect_rc(kill[1], 0, "the allocation after the SIGKILL")

    want = straight["losses"]
    for name, runs in (("USR1", usr1), ("SIGKILL", kill)):
        got = merged_losses(*runs)
        bad = [s for s in sorted(want) if got.get(s) != want[s]]  # type: ignore[union-attr]
        if bad:
            raise CheckFailed(f"{name}: losses differ from the straight run's at steps {bad[:10]}")
    ref = newest(os.path.join(work, "straight"))
    size = same_checkpoints(ref, newest(os.path.join(work, "usr1")), "USR1 then resume")
    same_checkpoints(ref, newest(os.path.join(work, "kill")), "SIGKILL then resume")
    cuda_rng = rng_keys(ref)
    if device == "cuda" and not any(k.startswith("torch.cuda.") for k in cuda_rng):
        raise CheckFailed(f"the checkpoint's RNG file holds no CUDA generator state: {cuda_rng}")
    return {"device": device, "precision": "bf16", "steps": STEPS, "stops": [f"USR1@{STOP_AT}",
            f"SIGKILL@{KILL_AT}"], "identical_files": sorted(checkpoint_files(ref)),
            "checkpoint_bytes": size, "rng_keys": cuda_rng, "seconds": round(time.monotonic() - t0, 1)}


def rng_keys(ckpt: str) -> List[str]:
    from safetensors import safe_open

    path = os.path.join(ckpt, "rng.safetensors")
    with safe_open(path, framework="pt") as f:
        return sorted(f.keys())


def check_save_stall(a: argparse.Namespace, work: str, device: str) -> Dict[str, object]:
    plain = os.path.join(work, "plain")
    os.makedirs(plain)
    cmd = [sys.executable, os.path.join(HERE, "stall.py"), "--device", device, "--state-gb",
           str(a.state_gb), "--rounds", str(a.rounds), "--plain", plain]
    run = wrap_run(a.bin, os.path.join(work, "run"), cmd)
    line = next((ln for ln in run["tail"] if ln.startswith("STALL ")), None)  # type: ignore[union-attr]
    expect_rc(run, 0, "the save-stall benchmark")
    if line is None:
        raise CheckFailed(f"stall.py printed no STALL line: {run['tail']}")
    rec = json.loads(line[6:])
    med = {m: {k: round(statistics.median(r[k] for r in rows), 4) for k in ("stall", "durable")}
           for m, rows in rec["rows"].items()}
    return {"device": rec["device"], "state_gb": round(rec["state_bytes"] / 1e9, 3),
            "rounds": a.rounds, "median_s": med, "raw": rec["rows"]}


def torch_linked(binary: str) -> bool:
    """Whether this hpc-ckpt has the built-in trainer (a --no-default-features build has not)."""
    core = os.path.join(os.path.dirname(os.path.abspath(binary)), "hpc-ckpt-core")
    try:
        out = subprocess.run(["ldd", core], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "libtorch" in out


def trainer_binary(a: argparse.Namespace, work: str) -> (Optional[str], str):
    """A torch-linked hpc-ckpt for check 3, or None and why there is none."""
    if a.trainer_bin:
        return (a.trainer_bin, "given") if torch_linked(a.trainer_bin) else \
            (None, f"--trainer-bin {a.trainer_bin} is not linked with libtorch")
    if torch_linked(a.bin):
        return a.bin, "the hpc-ckpt under test is torch-linked"
    if a.dry_run:
        return None, "dry run: no torch-linked hpc-ckpt given, and a dry run builds none"
    cargo = shutil.which("cargo")
    if cargo is None:
        return None, "no torch-linked hpc-ckpt was given and no cargo is on PATH to build one"
    import torch

    if not torch.__version__.startswith("2.13."):
        return None, (f"cargo found, but this python's torch is {torch.__version__}; tch 0.26 "
                      "accepts libtorch 2.13 only")
    target = os.path.join(work, "target")
    env = dict(os.environ, LIBTORCH=os.path.dirname(torch.__file__), CARGO_TARGET_DIR=target,
               HPC_CKPT_LINK_CUDA="1")
    log("building the torch-linked hpc-ckpt with cargo (offline) ...")
    p = subprocess.run([cargo, "build", "--release", "--offline", "--bins"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        return None, f"cargo build failed (exit {p.returncode}): {p.stderr[-1500:]}"
    return os.path.join(target, "release", "hpc-ckpt"), "built here with cargo"


TRAIN_CONFIG = """\
name: gpu-check
seed: 0
device: {device}
precision: bf16
deterministic: true
threads: 1
model: {{kind: mlp, hidden: [128, 128], dropout: 0.1}}
data: {{kind: synthetic, samples: 2048, features: 32, classes: 10}}
batch_size: 32
max_steps: {steps}
optimizer: {{kind: adamw, lr: 0.001}}
scheduler: {{kind: cosine, warmup_steps: 5}}
checkpoint: {{every_steps: {every}}}
"""


def check_builtin_trainer(a: argparse.Namespace, work: str, device: str) -> Dict[str, object]:
    binary, why = trainer_binary(a, work)
    if binary is None:
        return {"skipped": why}
    config = os.path.join(work, "job.yaml")
    # On the CPU (the dry run) the mlp's steps take ~1 ms: the 30 left after the first commit
    # ended before a loaded machine delivered the USR1. 400 leave it time.
    steps = 400 if a.dry_run else STEPS
    with open(config, "w") as f:
        f.write(TRAIN_CONFIG.format(device=device, steps=steps, every=EVERY))
    t0 = time.monotonic()

    def train(run_dir: str, stop_after_commit: bool) -> int:
        p = subprocess.Popen([binary, "train", "--config", config, "--run-dir", run_dir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=clean_env(), start_new_session=True)
        if stop_after_commit:  # USR1 once the first periodic checkpoint is committed
            pointer = os.path.join(run_dir, "last_checkpoint")
            end = time.monotonic() + 300
            while not os.path.exists(pointer) and p.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGUSR1)
        _, err = p.communicate(timeout=600)
        if p.returncode not in (0, 11):
            raise CheckFailed(f"hpc-ckpt train exit {p.returncode}: {err[-2000:]}")
        return p.returncode

    rc = train(os.path.join(work, "straight"), False)
    if rc != 0:
        raise CheckFailed(f"the straight built-in run ended with exit {rc}")
    stops = 0
    while train(os.path.join(work, "usr1"), stops == 0) == 11:
        stops += 1
        if stops > 5:
            raise CheckFailed("the USR1 run did not complete in 5 allocations")
    if stops == 0:
        raise CheckFailed("the built-in run ended before USR1 reached it (no interruption)")
    same_checkpoints(newest(os.path.join(work, "straight")), newest(os.path.join(work, "usr1")),
                     "built-in trainer, USR1 then resume")
    return {"binary": why, "device": device, "precision": "bf16", "steps": steps, "interruptions": stops,
            "seconds": round(time.monotonic() - t0, 1)}


def environment(a: argparse.Namespace) -> Dict[str, object]:
    import torch

    env: Dict[str, object] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "host": platform.node(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "hpc_ckpt_bin": a.bin,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    v = subprocess.run([a.bin, "--version"], capture_output=True, text=True)
    env["hpc_ckpt_version"] = v.stdout.strip() or v.stderr.strip()
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU only, small sizes (what the CI runs)")
    p.add_argument("--out", required=True, help="the JSON file of results")
    p.add_argument("--bin", required=True, help="the hpc-ckpt to test (a torch-free build will do)")
    p.add_argument("--trainer-bin", default=None, help="a torch-linked hpc-ckpt for the built-in trainer")
    p.add_argument("--state-gb", type=float, default=None, help="the save-stall state (default 2.4, dry 0.05)")
    p.add_argument("--rounds", type=int, default=None, help="save-stall rounds (default 3, dry 2)")
    p.add_argument("--width", type=int, default=None, help="job.py's width (default 512, dry 64)")
    p.add_argument("--only", default="exact_resume,save_stall,builtin_trainer")
    a = p.parse_args()
    a.state_gb = a.state_gb or (0.05 if a.dry_run else 2.4)
    a.rounds = a.rounds or (2 if a.dry_run else 3)
    a.width = a.width or (64 if a.dry_run else 512)
    import torch

    device = "cpu" if a.dry_run else "cuda"
    report: Dict[str, object] = {"dry_run": a.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "environment": environment(a), "checks": {}}
    if not a.dry_run and not torch.cuda.is_available():
        report["error"] = "torch sees no CUDA device: run with --dry-run on a machine without one"
        write(a.out, report)
        log(report["error"])
        return 2
    if a.dry_run:
        report["not_run"] = ["CUDA tensors, CUDA generator state and pinned staging (CPU dry run)"]
    checks = {"exact_resume": check_exact_resume, "save_stall": check_save_stall,
              "builtin_trainer": check_builtin_trainer}
    failed = []
    work_root = tempfile.mkdtemp(prefix="hpc-ckpt-gpu-check-")
    try:
        for name in [n for n in a.only.split(",") if n]:
            if name not in checks:
                raise SystemExit(f"--only: unknown check {name!r}; known: {', '.join(checks)}")
            work = os.path.join(work_root, name)
            os.makedirs(work)
            log(f"{name} on {device} ...")
            t0 = time.monotonic()
            try:
                result = checks[name](a, work, device)
                result["ok"] = "skipped" not in result
            except CheckFailed as e:
                result = {"ok": False, "error": str(e)}
                failed.append(name)
            result["wall_s"] = round(time.monotonic() - t0, 1)
            report["checks"][name] = result  # type: ignore[index]
            log(f"{name}: {'skipped: ' + result['skipped'] if 'skipped' in result else ('ok' if result['ok'] else 'FAILED')}"
                f" ({result['wall_s']} s)")
            write(a.out, report)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    report["failed"] = failed
    write(a.out, report)
    passed = sum(1 for r in report["checks"].values() if r.get("ok"))  # type: ignore[union-attr]
    # The line tests/ci.sh's closing count reads (skipped checks are neither).
    print(f"{passed} passed, {len(failed)} failed: tests/gpu/check.sh{' --dry-run' if a.dry_run else ''}",
          flush=True)
    if failed:
        for name in failed:
            log(f"{name} FAILED: {report['checks'][name]['error']}")  # type: ignore[index]
    return 1 if failed else 0


def write(path: str, report: Dict[str, object]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
