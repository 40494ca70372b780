//! `hpc-ckpt wrap` outside Slurm, with a real PyTorch child (`examples/python/train.py`):
//! interrupted by the warning signal and by TERM, and with the child SIGKILLed, a run ends
//! byte-identical to a straight one; a crash loop stops after `max_no_progress`; a finished run
//! is not requeued; a child that ignores signals is escalated to TERM and KILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn train_cmd(run: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["wrap", "--run-dir", run.to_str().unwrap(), "--"])
        .arg(python())
        .arg(repo().join("examples/python/train.py"))
        .args(["--steps", "160", "--checkpoint-every", "40"])
        .args(extra)
        .env("HPC_CKPT_LOG", "info")
        .env_remove("SLURM_JOB_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn wait_out(c: Child) -> Output {
    c.wait_with_output().unwrap()
}

/// Wait until the run's journal shows `n` committed checkpoints (bounded).
fn wait_commits(run: &Path, n: usize) {
    let t = Instant::now();
    loop {
        let j = std::fs::read_to_string(run.join("journal.jsonl")).unwrap_or_default();
        if j.matches("\"checkpoint_committed\"").count() >= n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no commit #{n} within 120 s: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn final_file(run: &Path, step: u64, name: &str) -> Vec<u8> {
    std::fs::read(run.join("checkpoints").join(ckpt(step)).join(name)).unwrap()
}

/// A job config `name` with run dir TMP/run plus `extra` YAML; returns (config, run dir).
fn job(tmp: &Path, name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let cfg = tmp.join("job.yaml");
    let run = tmp.join("run");
    std::fs::write(
        &cfg,
        format!("name: {name}\nrun_dir: {}\n{extra}", run.display()),
    )
    .unwrap();
    (cfg, run)
}

fn journal(run: &Path) -> Vec<serde_json::Value> {
    hpc_ckpt::storage::journal::read_all(run).0
}

#[test]
fn interrupted_python_run_ends_byte_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let o = wait_out(train_cmd(&straight, &[]).spawn().unwrap());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let run = tmp.path().join("interrupted");
    let slow = ["--step-delay", "0.02"];
    // 1: the warning signal after the first periodic commit → checkpoint, "requeue needed" (11).
    let c = train_cmd(&run, &slow).spawn().unwrap();
    wait_commits(&run, 1);
    kill(Pid::from_raw(c.id() as i32), Signal::SIGUSR1).unwrap();
    let o = wait_out(c);
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    assert!(
        text(&o).contains("run the same command again"),
        "{}",
        text(&o)
    );
    // 2: the child is SIGKILLed (node trouble): no final checkpoint; the wrapper retries (11).
    let commits = journal(&run)
        .iter()
        .filter(|e| e["event"] == "checkpoint_committed")
        .count();
    let c = train_cmd(&run, &slow).spawn().unwrap();
    wait_commits(&run, commits + 1);
    let child_pid = journal(&run)
        .iter()
        .rev()
        .find(|e| e["event"] == "child_started")
        .and_then(|e| e["pid"].as_i64())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(child_pid as i32), Signal::SIGKILL).unwrap();
    let o = wait_out(c);
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    // 3: a bare TERM outside Slurm (a person's kill): checkpoint, exit 12, no requeue.
    let commits = journal(&run)
        .iter()
        .filter(|e| e["event"] == "checkpoint_committed")
        .count();
    let c = train_cmd(&run, &slow).spawn().unwrap();
    wait_commits(&run, commits + 1);
    kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
    let o = wait_out(c);
    assert_eq!(o.status.code(), Some(12), "{}", text(&o));
    // 4: to the end.
    let o = wait_out(train_cmd(&run, &[]).spawn().unwrap());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
    ] {
        assert!(
            final_file(&straight, 160, f) == final_file(&run, 160, f),
            "{f} differs"
        );
    }
    let j = journal(&run);
    let ends: Vec<_> = j
        .iter()
        .filter(|e| e["event"] == "allocation_end")
        .collect();
    let endings: Vec<_> = ends.iter().map(|e| e["ending"].as_str().unwrap()).collect();
    assert_eq!(
        endings,
        ["warning_signal", "failed", "terminated", "completed"],
        "{j:#?}"
    );
    assert!(j.iter().any(|e| e["event"] == "run_done"));

    // A finished run started again: nothing to do, no requeue.
    let o = wait_out(train_cmd(&run, &[]).spawn().unwrap());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let st = crate::common::run(&["status", "--json", run.to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["run"]["state"], "done", "{st:#}");
}

#[test]
fn a_crash_loop_stops_after_max_no_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = job(
        tmp.path(),
        "crashy",
        "requeue:
  max_no_progress: 2
",
    );
    let go = || {
        crate::common::cmd(&[
            "wrap",
            "--config",
            cfg.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo boom >&2; exit 3",
        ])
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap()
    };
    let o = go();
    assert_eq!(
        o.status.code(),
        Some(11),
        "first failure is retried: {}",
        text(&o)
    );
    let o = go();
    assert_eq!(o.status.code(), Some(13), "{}", text(&o));
    assert!(text(&o).contains("crash loop"), "{}", text(&o));
    let j = journal(&run);
    let last = j
        .iter()
        .rev()
        .find(|e| e["event"] == "allocation_end")
        .unwrap();
    assert_eq!(last["decision"], "stop");
    assert!(last["reason"].as_str().unwrap().contains("max_no_progress"));
    let st = crate::common::run(&["status", run.to_str().unwrap()]);
    assert!(text(&st).contains("crash loop"), "{}", text(&st));
}

#[test]
fn a_child_that_ignores_signals_is_escalated_and_its_staged_files_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = job(
        tmp.path(),
        "stubborn",
        "signals:
  grace_seconds: 1
",
    );
    // Stages a checkpoint and asks for it, then ignores USR1 and TERM forever.
    let script = r#"trap '' USR1 TERM
printf 'w' > "$HPC_CKPT_STAGING/model.bin"
printf '{"step": 7}' > "$HPC_CKPT_COMMIT_REQUEST.tmp"; mv "$HPC_CKPT_COMMIT_REQUEST.tmp" "$HPC_CKPT_COMMIT_REQUEST"
while [ -e "$HPC_CKPT_COMMIT_REQUEST" ]; do sleep 0.02; done
printf 'x' > "$HPC_CKPT_STAGING/model.bin"
printf '{"step": 8}' > "$HPC_CKPT_COMMIT_REQUEST.tmp"; mv "$HPC_CKPT_COMMIT_REQUEST.tmp" "$HPC_CKPT_COMMIT_REQUEST"
touch "$HPC_CKPT_RUN_DIR/ready"
while true; do sleep 0.1; done"#;
    let c = crate::common::cmd(&[
        "wrap",
        "--config",
        cfg.to_str().unwrap(),
        "--",
        "bash",
        "-c",
        script,
    ])
    .env_remove("SLURM_JOB_ID")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !run.join("ready").exists() {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    kill(Pid::from_raw(c.id() as i32), Signal::SIGUSR1).unwrap();
    let o = c.wait_with_output().unwrap();
    let waited = t.elapsed();
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    assert!(
        waited >= Duration::from_secs(11),
        "grace 1 s + 10 s before KILL, took {waited:?}"
    );
    let j = journal(&run);
    let esc: Vec<_> = j
        .iter()
        .filter(|e| e["event"] == "child_escalated")
        .map(|e| e["signal"].as_str().unwrap())
        .collect();
    assert_eq!(esc, ["TERM", "KILL"]);
    assert_eq!(
        std::fs::read(run.join("checkpoints").join(ckpt(8)).join("model.bin")).unwrap(),
        b"x"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("last_checkpoint"))
            .unwrap()
            .trim(),
        ckpt(8)
    );
}

#[test]
fn protocol_errors_are_answered_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // A bad request, then a staged symlink, then a good one; the child reads each result.
    let script = r#"set -e
req="$HPC_CKPT_COMMIT_REQUEST"
ask() { printf '%s' "$1" > "$req.tmp"; mv "$req.tmp" "$req"; while [ -e "$req" ]; do sleep 0.02; done; cat "$req.result"; echo; }
printf 'a' > "$HPC_CKPT_STAGING/a.bin"; ask 'not json'
ln -s /etc/passwd "$HPC_CKPT_STAGING/evil"; ask '{"step": 1}'
printf 'b' > "$HPC_CKPT_STAGING/b.bin"; ask '{"step": 2, "metrics": {"loss": 0.5}, "done": true}'
test -z "$(ls -A "$HPC_CKPT_STAGING")""#;
    let o = crate::common::cmd(&[
        "wrap",
        "--run-dir",
        run.to_str().unwrap(),
        "--",
        "bash",
        "-c",
        script,
    ])
    .env_remove("SLURM_JOB_ID")
    .output()
    .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains(r#""ok":false"#) && out.contains("not a valid commit request"),
        "{out}"
    );
    assert!(out.contains("symbolic link"), "{out}");
    assert!(
        out.contains(r#"{"checkpoint":"step-000000000002","ok":true}"#),
        "{out}"
    );
    let names: Vec<_> = hpc_ckpt::storage::run_dir::RunDir::new(&run)
        .list()
        .into_iter()
        .map(|l| l.step)
        .collect();
    assert_eq!(names, [2]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"loss\":0.5"), "{metrics}");
}

#[test]
fn wrap_refuses_what_it_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // `-- train` is the built-in trainer: it needs a model in the config (exit 7), or, in a
    // build without it, says so (exit 1). Nothing is started either way.
    let o = crate::common::run(&["wrap", "--run-dir", run.to_str().unwrap(), "--", "train"]);
    if cfg!(feature = "torch") {
        assert_eq!(o.status.code(), Some(7), "{}", text(&o));
        assert!(text(&o).contains("model: missing"), "{}", text(&o));
    } else {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("built-in trainer"), "{}", text(&o));
    }
    assert!(!run.join("journal.jsonl").exists(), "nothing ran");
    let cfg = tmp.path().join("bad.yaml");
    std::fs::write(&cfg, "name: x\ncheckpoint:\n  keep_lst: 2\n").unwrap();
    let o = crate::common::run(&["wrap", "--config", cfg.to_str().unwrap(), "--", "true"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        text(&o).contains("bad.yaml") && text(&o).contains("keep_lst"),
        "{}",
        text(&o)
    );
    let o = crate::common::run(&[
        "wrap",
        "--run-dir",
        run.to_str().unwrap(),
        "--",
        "/nonexistent/prog",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot start"), "{}", text(&o));
}

/// `hpc-ckpt sbatch` makes the built-in trainer's checks that need no torch where it runs, on
/// the login node (tests/ci.sh runs this suite against the login-node build, without libtorch):
/// a job the trainer would refuse after the queue wait is refused before it is submitted,
/// naming the file and the key, and no script is written.
#[test]
fn sbatch_refuses_a_trainer_job_the_trainer_would_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let base = "name: t\ncommand: [train]\nmax_steps: 10\n";
    let cases = [
        ("", "model: missing"),
        (
            "model: {kind: gpt, layers: 1, heads: 1, d_model: 8, context: 8}\n\
             data: {kind: text, path: no-such.txt}\n",
            "data.path: cannot read no-such.txt",
        ),
        (
            "model: {kind: mlp, hidden: [8]}\nbatch_size: 15\ndistributed: {world_size: 2}\n",
            "batch_size: 15 samples cannot be shared equally by 2 ranks",
        ),
        ("model: {kind: mlp, hidden: [8]}\n", ""),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let cfg = tmp.path().join(format!("job{i}.yaml"));
        std::fs::write(&cfg, format!("{base}{extra}")).unwrap();
        let script = tmp.path().join(format!("job{i}.sbatch"));
        let o = cmd(&[
            "sbatch",
            "--config",
            cfg.to_str().unwrap(),
            "-o",
            script.to_str().unwrap(),
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
        if want.is_empty() {
            assert_eq!(o.status.code(), Some(0), "{}", text(&o));
            assert!(script.exists(), "{}", text(&o));
            continue;
        }
        assert_eq!(o.status.code(), Some(7), "{want}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("job{i}.yaml")) && text(&o).contains(want),
            "{want}: {}",
            text(&o)
        );
        assert!(!script.exists(), "a script was written for a refused job");
    }
}
