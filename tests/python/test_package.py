"""hpc_ckpt's own guarantees, in-process (fast): complete state, no pickle, tied weights, the
child protocol's side (atomic request, acknowledgement, errors), signals, local run dirs through
the real `hpc-ckpt commit`, and the resumable loader."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hpc_ckpt
from hpc_ckpt import _codec
from hpc_ckpt.protocol import Environment
from conftest import PY, REPO, verify, wait_for

PKG = os.path.join(REPO, "src", "python", "hpc_ckpt")


# ----------------------------------------------------------------------------- helpers

class Net(torch.nn.Module):
    """Parameters, a BatchNorm (buffers: running stats, a counter), dropout, a tied pair."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        return self.head(self.drop(self.bn(self.emb(x))))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)], milestones=[3])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    data = torch.utils.data.TensorDataset(torch.arange(60) % 10)
    loader = hpc_ckpt.ResumableLoader(data, 8, seed=4)
    rngs = {"py": random.Random(1), "np": np.random.default_rng(2), "legacy": np.random.RandomState(3),
            "torch": torch.Generator().manual_seed(4)}
    return model, opt, sched, scaler, loader, rngs


def train_steps(model, opt, sched, scaler, loader, rngs, n):
    losses = []
    it = iter(loader)
    for _ in range(n):
        try:
            (x,) = next(it)
        except StopIteration:
            it = iter(loader)
            (x,) = next(it)
        noise = rngs["np"].normal() + rngs["legacy"].normal() + rngs["py"].random() + random.random() \
            + np.random.normal() + torch.rand(1, generator=rngs["torch"]).item()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), x) * (1 + 1e-3 * noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return losses


def state_bytes(model, opt):
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v.clone()
    return out


def checkpointer(objs, **kw):
    model, opt, sched, scaler, loader, rngs = objs
    kw.setdefault("session", hpc_ckpt.Session(env=Environment(None, None, None, None, None), verbose=False))
    return hpc_ckpt.Checkpointer(model=model, optimizer=opt, scheduler=sched, scaler=scaler, loader=loader,
                                 rngs=rngs, **kw)


# ----------------------------------------------------------------------------- state

def test_complete_state_round_trip_continues_bit_identical(tmp_path):
    """Save mid-epoch, train on; a fresh process's objects (other seed) loaded from the files
    train on with bit-identical losses, weights, optimizer state and RNG draws."""
    a = make(0)
    train_steps(*a, n=11)  # mid-epoch (8 batches an epoch), scaler grew, scheduler past warmup
    ck = checkpointer(a, extra={"tokens": 123, "pair": (1, 2.5), "nan": math.nan, "t": torch.arange(3)},
                      monitor="loss", mode="min", config={"lr": 1e-2})
    ck.step_done(11, metrics={"loss": torch.tensor(0.5), "acc": np.float32(0.25)})
    ck.write(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                            "state.safetensors", "trainer_state.json"]
    cont_a = train_steps(*a, n=9)
    after_a = (torch.rand(3), np.random.random(), random.random())

    b = make(1)
    train_steps(*b, n=2)  # different state everywhere, loader at another position
    extra = {"stale": True}
    ck_b = checkpointer(b, extra=extra, monitor="loss", mode="min", config={"lr": 1e-2})
    ck_b.load(str(tmp_path))
    assert ck_b.step == 11 and ck_b.epoch == 1 and ck_b.best == {"value": 0.5, "step": 11}
    assert ck_b.metrics == {"loss": 0.5, "acc": 0.25}
    assert extra.keys() == {"tokens", "pair", "nan", "t"} and extra["pair"] == (1, 2.5)
    assert math.isnan(extra["nan"]) and torch.equal(extra["t"], torch.arange(3))
    assert (b[4].epoch, b[4].position) == (1, 3)  # 11 batches of 8-batch epochs
    cont_b = train_steps(*b, n=9)
    after_b = (torch.rand(3), np.random.random(), random.random())
    assert cont_a == cont_b
    sa, sb = state_bytes(a[0], a[1]), state_bytes(b[0], b[1])
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(after_a[0], after_b[0]) and after_a[1:] == after_b[1:]
    assert a[3].state_dict() == b[3].state_dict() and a[2].state_dict() == b[2].state_dict()
    assert b[0].head.weight is b[0].emb.weight, "the tie was broken by the load"


def test_tied_weights_saved_once_and_files_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    objs = make(0)
    train_steps(*objs, n=1)
    checkpointer(objs).write(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("emb.weight" in keys) != ("head.weight" in keys), keys  # one copy of the tied pair
    st = json.loads((tmp_path / "trainer_state.json").read_text())
    assert st["model"][""]["aliases"] in ({"head.weight": "emb.weight"}, {"emb.weight": "head.weight"})
    assert "bn.num_batches_tracked" in keys and "bn.running_var" in keys
    with safe_open(str(tmp_path / "optimizer.safetensors"), framework="pt") as f:
        assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(f.keys())


# The one module that reads pickles: DCP's format pickles its .metadata and torch.saves its
# tensors, and hpc_ckpt.sharded reads them with an allow-listed Unpickler and weights_only=True.
DCP_READER = "sharded.py"


def test_no_pickle_anywhere():
    """The package never pickles: its code imports no pickle and calls no torch.save/torch.load
    (the framework integrations leave the frameworks' own files to the frameworks), except the
    DCP reader, which only subclasses ``pickle.Unpickler`` (restricting ``find_class``) and calls
    ``torch.load(..., weights_only=True)``."""
    import ast

    for dp, _, fs in os.walk(PKG):
        for f in (x for x in fs if x.endswith(".py")):
            tree = ast.parse(open(os.path.join(dp, f)).read())
            dcp = f == DCP_READER
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    banned = ("cloudpickle", "dill", "joblib") if dcp else ("pickle", "cloudpickle", "dill", "joblib")
                    assert not any(n.split(".")[0] in banned for n in names), f
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    if node.value.id == "torch" and node.attr in ("save", "load") and not dcp:
                        raise AssertionError(f"{f}:{node.lineno}: torch.{node.attr}")
                    if node.value.id == "pickle" and node.attr not in ("Unpickler", "UnpicklingError"):
                        raise AssertionError(f"{f}:{node.lineno}: pickle.{node.attr}")
                if dcp and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                    kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                    assert kw.get("weights_only") is True, f"{f}:{node.lineno}: torch.load without weights_only=True"


def test_non_json_scheduler_state_names_the_key(tmp_path):
    class Warmup:  # a callable object: LambdaLR saves its __dict__
        def __init__(self):
            self.n = 5
            self.curve = lambda s: s / 5

        def __call__(self, s):
            return min(1.0, self.curve(s + 1))

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup())
    ck = hpc_ckpt.Checkpointer(model=model, optimizer=opt, scheduler=sched,
                               session=hpc_ckpt.Session(env=Environment(None, None, None, None, None)))
    with pytest.raises(hpc_ckpt.NotSerializableError) as e:
        ck.write(str(tmp_path))
    assert "scheduler.lr_lambdas[0].curve" in str(e.value) and "function" in str(e.value)


def test_codec_round_trip_is_exact():
    sink = _codec.TensorSink()
    obj = {"t": (1, 2.0), 3: [math.inf, -math.inf, None, "x"], "$odd": b"\x00\xff",
           "arr": np.arange(6, dtype=np.uint32).reshape(2, 3), "ten": torch.ones(2), "dt": torch.bfloat16}
    js = json.loads(json.dumps(_codec.encode(obj, "root", sink), allow_nan=False))
    back = _codec.decode(js, sink.tensors)
    assert back["t"] == (1, 2.0) and back[3][:2] == [math.inf, -math.inf] and back["$odd"] == b"\x00\xff"
    assert back["arr"].dtype == np.uint32 and (back["arr"] == obj["arr"]).all()
    assert torch.equal(back["ten"], obj["ten"]) and back["dt"] is torch.bfloat16


def test_config_change_is_refused(tmp_path):
    objs = make(0)
    checkpointer(objs, config={"lr": 1e-2, "batch": 8}).write(str(tmp_path))
    with pytest.raises(hpc_ckpt.ConfigMismatchError, match="batch: 8 -> 16"):
        checkpointer(make(0), config={"lr": 1e-2, "batch": 16}).load(str(tmp_path))
    checkpointer(make(0), config={"lr": 1e-2, "batch": 16}, mutable_config=["batch"]).load(str(tmp_path))


def test_reference_batch_check(tmp_path):
    objs = make(0)
    model = objs[0]
    batch = torch.arange(8) % 10
    fn = lambda b: F.cross_entropy(model(b), b)  # noqa: E731
    checkpointer(objs, reference_batch=batch, reference_loss=fn).write(str(tmp_path))
    b = make(1)
    checkpointer(b, reference_batch=batch, reference_loss=lambda x: F.cross_entropy(b[0](x), x)).load(str(tmp_path))
    st = json.loads((tmp_path / "trainer_state.json").read_text())
    st["reference"]["loss_bits"] = "0" * 16  # as if the weights did not compute what was saved
    (tmp_path / "trainer_state.json").write_text(json.dumps(st))
    c = make(2)
    with pytest.raises(hpc_ckpt.ReferenceMismatchError, match="reference batch"):
        checkpointer(c, reference_batch=batch, reference_loss=lambda x: F.cross_entropy(c[0](x), x)).load(str(tmp_path))


def test_reference_batch_with_shared_tensors_resumes(tmp_path):
    """A reference batch holding one tensor twice (and a view of it) is saved once and re-tied:
    the load's check passes bit for bit instead of failing on a missing tensor."""
    from safetensors import safe_open

    objs = make(0)
    x = torch.arange(8) % 10
    batch = (x, x, x[:])  # x[:]: another tensor object, the same storage, offset, shape, stride
    loss = lambda m: lambda b: F.cross_entropy(m(b[0]), b[1]) + F.cross_entropy(m(b[2]), b[1])  # noqa: E731
    checkpointer(objs, reference_batch=batch, reference_loss=loss(objs[0])).write(str(tmp_path))
    with safe_open(str(tmp_path / "reference_batch.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 1, list(f.keys())
    b = make(1)
    ck = checkpointer(b, reference_batch=batch, reference_loss=loss(b[0]))
    ck.load(str(tmp_path))  # raised KeyError: tensor 'batch[1]' is missing from the checkpoint
    assert ck.step == 0


def test_shared_tensors_in_extra_and_stateful_are_saved_once_and_retied(tmp_path):
    """One tensor in two extra entries, in a view, and in a stateful object's state: stored once
    in state.safetensors, the same tensor again after the load."""
    from safetensors import safe_open

    class Ema:
        def __init__(self, t):
            self.t = t

        def state_dict(self):
            return {"avg": self.t, "twice": [self.t]}

        def load_state_dict(self, sd):
            assert sd["avg"] is sd["twice"][0]
            self.t = sd["avg"]

    t = torch.linspace(0, 1, 5)
    objs = make(0)
    checkpointer(objs, extra={"a": t, "b": t, "view": t[:], "n": 3}, stateful={"ema": Ema(t)}).write(str(tmp_path))
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 1, list(f.keys())
    extra, ema = {}, Ema(torch.zeros(5))
    checkpointer(make(1), extra=extra, stateful={"ema": ema}).load(str(tmp_path))
    assert extra.keys() == {"a", "b", "view", "n"} and torch.equal(extra["a"], t)
    assert extra["a"] is extra["b"] is extra["view"] is ema.t


def test_import_is_lazy():
    p = subprocess.run([PY, "-c", "import sys, hpc_ckpt; sys.exit('torch' in sys.modules)"], capture_output=True)
    assert p.returncode == 0, "importing hpc_ckpt imported torch"


# ----------------------------------------------------------------------------- data

@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_yields_the_exact_next_batch(workers):
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    full = hpc_ckpt.ResumableLoader(ds, 6, seed=9, num_workers=workers)
    seq = [b[0].tolist() for _ in range(3) for b in full]  # 3 epochs
    first = hpc_ckpt.ResumableLoader(ds, 6, seed=9, num_workers=workers)
    got = []
    for b in first:
        got.append(b[0].tolist())
        if len(got) == 5:  # workers have prefetched further: the position counts what we took
            break
    sd = first.state_dict()
    assert (sd["epoch"], sd["position"]) == (0, 5)
    second = hpc_ckpt.ResumableLoader(ds, 6, seed=9, num_workers=workers)
    second.load_state_dict(json.loads(json.dumps(sd)))
    while len(got) < len(seq):
        got += [b[0].tolist() for b in second]
    assert got == seq and sorted(sum(seq[:9], [])) == list(range(50))
    assert second.epoch == 3 and second.position == 0


# ----------------------------------------------------------------------------- protocol

def test_no_handlers_when_nothing_is_saved():
    """Neither `wrap` nor a run dir: checkpoints are off, and the process keeps its own signal
    handling (a TERM still ends it)."""
    prev = signal.getsignal(signal.SIGTERM)
    s = hpc_ckpt.Session(env=Environment(None, None, None, None, None), verbose=False)
    assert not s.enabled and signal.getsignal(signal.SIGTERM) is prev
    ck = hpc_ckpt.Checkpointer(model=torch.nn.Linear(1, 1), session=s, every_steps=1)
    assert ck.restore() == 0
    ck.step_done(1)
    assert ck.finish() is True


def test_handler_sets_a_flag_and_passes_signals_on_after_close():
    from hpc_ckpt.protocol import StopSignals

    got = []
    prev = signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
    try:
        ss = StopSignals([signal.SIGUSR2])
        ours = signal.getsignal(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        wait_for(lambda: ss.received is not None, what="the flag")
        assert ss.received == signal.SIGUSR2 and not got  # only the flag
        ss.close()
        assert signal.getsignal(signal.SIGUSR2) is not ours  # the previous handler is back
        signal.signal(signal.SIGUSR2, ours)  # as Lightning does: it re-installs what it found (ours)
        os.kill(os.getpid(), signal.SIGUSR2)
        wait_for(lambda: got, what="the previous handler")
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, prev)


class _FakeSupervisor:
    """The wrapper's side of the protocol, in a thread: answers each request."""

    def __init__(self, root, answer=None, delay=0.0):
        self.staging = os.path.join(root, "staging")
        self.request = os.path.join(root, "staging.request")
        os.makedirs(self.staging)
        self.answer = answer or (lambda req: {"ok": True, "checkpoint": f"step-{req['step']:012d}"})
        self.delay = delay
        self.seen = []
        self.changed_while_pending = False
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def snapshot(self):
        return {n: (st.st_size, st.st_mtime_ns, st.st_ino) for n in os.listdir(self.staging)
                for st in [os.stat(os.path.join(self.staging, n))]}

    def env(self):
        return Environment(os.path.dirname(self.staging), None, self.staging, self.request, "USR1")

    def loop(self):
        while not self.stop.is_set():
            if os.path.exists(self.request):
                with open(self.request) as f:
                    req = json.load(f)
                before = self.snapshot()
                self.seen.append((req, sorted(before), os.path.exists(self.request + ".tmp")))
                time.sleep(self.delay)  # "committing": the child must not touch staging meanwhile
                self.changed_while_pending |= self.snapshot() != before
                with open(self.request + ".result", "w") as f:
                    json.dump(self.answer(req), f)
                for n in os.listdir(self.staging):
                    os.unlink(os.path.join(self.staging, n))
                os.unlink(self.request)
            time.sleep(0.005)


def test_wrap_protocol_request_ack_and_stop_signal(tmp_path):
    sup = _FakeSupervisor(str(tmp_path), delay=0.3)
    prev = signal.getsignal(signal.SIGUSR1)
    objs = make(0)
    ck = checkpointer(objs, session=hpc_ckpt.Session(env=sup.env(), verbose=False), every_steps=2, total_steps=6)
    assert ck.restore() == 0
    assert signal.getsignal(signal.SIGUSR1) is not prev
    steps = 0
    while steps < 6:
        train_steps(*objs, n=1)
        steps += 1
        ck.step_done(steps, metrics={"loss": 1.0 / steps, "note": "text"})
        if steps == 5:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets a flag: we are still here
            assert ck.session.stop_requested and not ck._stopped
        if ck.should_stop():
            break
    assert steps == 5 and ck.finish() is False
    sup.stop.set()
    assert signal.getsignal(signal.SIGUSR1) is prev, "the previous handler was not restored"
    reqs = [r for r, _, _ in sup.seen]
    assert [r["step"] for r in reqs] == [2, 4, 5] and [r["done"] for r in reqs] == [False] * 3
    # only the save made on the signal says so (work is left, whatever the exit status)
    assert [r.get("stopping", False) for r in reqs] == [False, False, True]
    assert reqs[-1]["metrics"] == {"loss": 0.2} and reqs[-1]["epoch"] == 0
    for _, files, tmp_left in sup.seen:
        assert not tmp_left and "trainer_state.json" in files
    assert not sup.changed_while_pending, "staging was written before the acknowledgement"


def test_wrap_protocol_final_checkpoint_is_done(tmp_path):
    sup = _FakeSupervisor(str(tmp_path))
    objs = make(0)
    ck = checkpointer(objs, session=hpc_ckpt.Session(env=sup.env(), verbose=False), every_steps=3, total_steps=3)
    ck.restore()
    train_steps(*objs, n=3)
    ck.step_done(3)
    assert ck.finish() is True
    sup.stop.set()
    assert [(r["step"], r["done"]) for r, _, _ in sup.seen] == [(3, True)]


@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_a_refused_commit_raises_with_the_supervisors_message(tmp_path, policy):
    sup = _FakeSupervisor(str(tmp_path), answer=lambda req: {"ok": False, "error": "no space left (ENOSPC)"})
    objs = make(0)
    ck = checkpointer(objs, session=hpc_ckpt.Session(env=sup.env(), verbose=False, on_commit_error=policy),
                      every_steps=1)
    ck.step_done(1)
    if policy == "raise":
        with pytest.raises(hpc_ckpt.CommitError, match=r"step 1 .*no space left \(ENOSPC\)"):
            ck.step_done(2)
    else:
        ck.step_done(2)
        ck.finish()
    sup.stop.set()
    ck.close()


def test_local_run_dir_commits_through_the_binary(hpc_bin, tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_CKPT_BIN", hpc_bin)
    for k in ("HPC_CKPT_STAGING", "HPC_CKPT_COMMIT_REQUEST", "HPC_CKPT_RESUME_FROM", "HPC_CKPT_RUN_DIR"):
        monkeypatch.delenv(k, raising=False)
    rd = str(tmp_path / "run")
    objs = make(0)
    ck = checkpointer(objs, session=None, run_dir=rd, every_steps=2, commit_args=["--keep-last", "2"], verbose=False)
    assert ck.restore() == 0
    for s in range(1, 6):
        train_steps(*objs, n=1)
        ck.step_done(s, metrics={"loss": float(s)})
    assert ck.finish() is True
    cps = sorted(os.listdir(os.path.join(rd, "checkpoints")))
    assert cps == ["step-000000000004", "step-000000000005"], cps
    verify(hpc_bin, rd)
    assert not [n for n in os.listdir(rd) if n.startswith("staging")]
    b = make(1)
    ck2 = checkpointer(b, session=None, run_dir=rd, verbose=False)
    assert ck2.restore() == 5 and ck2.resume_from.endswith("step-000000000005")
    sa, sb = state_bytes(objs[0], objs[1]), state_bytes(b[0], b[1])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ck2.close()


def test_local_run_dir_without_the_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_CKPT_BIN", str(tmp_path / "nope"))
    for k in ("HPC_CKPT_STAGING", "HPC_CKPT_COMMIT_REQUEST"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(hpc_ckpt.ProtocolError, match="hpc-ckpt` binary"):
        hpc_ckpt.Checkpointer(model=torch.nn.Linear(1, 1), run_dir=str(tmp_path / "run"))
