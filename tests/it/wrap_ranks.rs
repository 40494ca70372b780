//! Multi-rank jobs under `hpc-ckpt wrap --ranks 2` (the supervisor starts the ranks itself),
//! with a small bash program that speaks the child protocol per rank and agrees on its stop
//! step with its peer through a file barrier at every step boundary (the program's own
//! collective: a DDP program does the same with an all_reduce).
//!
//! - both ranks' files land in one checkpoint with one manifest (world size 2), and an
//!   interrupted run (the warning to every rank, then a SIGKILL of one rank) ends identical to a
//!   straight one;
//! - a rank that never asks: nothing committed, the previous checkpoint stays, the journal names
//!   the rank, the staged files are kept;
//! - ranks asking for different steps are refused;
//! - sharded state refuses another world size; replicated state loads with any.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// usage: ranks.sh STEPS EVERY DELAY [MODE]. Replicated state (`model`) is written by rank 0
/// alone, per-rank state (`rng`, `step`) by each rank. MODE: `norequest` (rank 1 stages its
/// second checkpoint and exits without asking), `skew` (rank 1 asks for the wrong step at its
/// first checkpoint), `sharded` (requests say so).
const PROGRAM: &str = r#"#!/usr/bin/env bash
set -u
steps=$1 every=$2 delay=$3 mode=${4:-}
r=${HPC_CKPT_RANK:?} w=${HPC_CKPT_WORLD_SIZE:?}
pre=$(printf 'rank%05d.' "$r")
sync="$SYNC_ROOT/$(basename "$HPC_CKPT_RANK_PREFIX")"; mkdir -p "$sync"
sig=0 stop=0; trap 'sig=1' USR1 TERM; : > "$HPC_CKPT_READY_FILE"  # handlers in place: ready
# The stop signal goes to the whole process group (DESIGN: the child's group), and a subshell
# or command does not keep the trap: each one whose death would change the state ignores it.
n=0 last=-1 model=init rng="seed$r"
if [ -n "${HPC_CKPT_RESUME_FROM:-}" ]; then
  src=$HPC_CKPT_RESUME_FROM
  model=$(cat "$src/rank00000.model")
  if [ -e "$src/${pre}step" ]; then n=$(cat "$src/${pre}step"); rng=$(cat "$src/${pre}rng");
  else n=$(cat "$src/rank00000.step"); rng="seed$r:$n"; fi
  last=$n
fi
echo "rank $r of $w resumes at $n (saved by ${HPC_CKPT_RESUME_WORLD_SIZE:-none})"
wait_ack() { local i=0; while [ -e "$HPC_CKPT_COMMIT_REQUEST" ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done; }
agree() { # stop = all_reduce(max) of the signal flags at step boundary $1, through files
  echo $sig > "$sync/$1.$r.tmp"; (trap '' USR1 TERM; mv "$sync/$1.$r.tmp" "$sync/$1.$r")
  local i=0 k any=0
  for ((k = 0; k < w; k++)); do
    while [ ! -e "$sync/$1.$k" ]; do sleep 0.005; i=$((i+1)); [ $i -lt 6000 ] || exit 3; done
    [ "$(trap '' USR1 TERM; cat "$sync/$1.$k")" = 1 ] && any=1
  done
  stop=$any
}
save() {
  local s=$1 extra=""
  wait_ack
  [ "$r" = 0 ] && printf %s "$model" > "$HPC_CKPT_STAGING/model"
  printf %s "$rng" > "$HPC_CKPT_STAGING/rng"; printf %s "$s" > "$HPC_CKPT_STAGING/step"
  if [ "$mode" = norequest ] && [ "$r" = 1 ] && [ "$s" -gt "$every" ]; then echo "rank 1 leaves"; exit 0; fi
  if [ "$mode" = skew ] && [ "$r" = 1 ] && [ "$s" = "$every" ]; then s=$((s+1)); fi
  [ "$mode" = sharded ] && extra=', "sharded": true'
  printf '{"step": %s%s}' "$s" "$extra" > "$HPC_CKPT_COMMIT_REQUEST.tmp"
  (trap '' USR1 TERM; mv "$HPC_CKPT_COMMIT_REQUEST.tmp" "$HPC_CKPT_COMMIT_REQUEST")
  last=$1
}
while [ "$n" -lt "$steps" ]; do
  agree "$n"
  if [ $stop = 1 ]; then [ "$last" = "$n" ] || save "$n"; echo "rank $r stops at $n"; exit 0; fi
  sleep "$delay"
  n=$((n+1))
  model=$(trap '' USR1 TERM; printf '%s:%s' "$model" "$n" | md5sum | cut -c1-16)
  rng=$(trap '' USR1 TERM; printf '%s:%s' "$rng" "$n" | md5sum | cut -c1-16)
  if [ $((n % every)) = 0 ] || [ "$n" = "$steps" ]; then save "$n"; fi
done
wait_ack
echo "rank $r done at $n model $model"
"#;

struct Job {
    tmp: tempfile::TempDir,
    program: PathBuf,
}

impl Job {
    fn new() -> Job {
        let tmp = tempfile::tempdir().unwrap();
        let program = tmp.path().join("ranks.sh");
        std::fs::write(&program, PROGRAM).unwrap();
        Job { tmp, program }
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `wrap --run-dir RUN --ranks N -- ranks.sh ARGS…` (plus `pre` before `--`).
    fn cmd(&self, run: &Path, ranks: u32, pre: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(["wrap", "--run-dir", run.to_str().unwrap()])
            .args(["--ranks", &ranks.to_string()])
            .args(pre)
            .arg("--")
            .arg("bash")
            .arg(&self.program)
            .args(args)
            .env("HPC_CKPT_LOG", "info")
            .env("SYNC_ROOT", self.tmp.path().join("sync"))
            .env_remove("SLURM_JOB_ID")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, run: &Path, ranks: u32, args: &[&str]) -> Output {
        self.cmd(run, ranks, &[], args).output().unwrap()
    }
}

fn journal(run: &Path) -> Vec<serde_json::Value> {
    hpc_ckpt::storage::journal::read_all(run).0
}

fn events<'a>(j: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    j.iter().filter(|e| e["event"] == name).collect()
}

fn wait_event(run: &Path, name: &str, n: usize) {
    let t = Instant::now();
    while events(&journal(run), name).len() < n {
        assert!(t.elapsed() < Duration::from_secs(60), "no {name} #{n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_commits(run: &Path, n: usize) {
    wait_event(run, "checkpoint_committed", n)
}

fn checkpoint_files(run: &Path, step: u64) -> Vec<(String, Vec<u8>)> {
    let dir = run.join("checkpoints").join(ckpt(step));
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n, std::fs::read(e.path()).unwrap())
        })
        .filter(|(n, _)| n != "MANIFEST.json")
        .collect();
    v.sort();
    v
}

fn manifest(run: &Path, step: u64) -> serde_json::Value {
    let p = run
        .join("checkpoints")
        .join(ckpt(step))
        .join("MANIFEST.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn pointer(run: &Path) -> String {
    std::fs::read_to_string(run.join("last_checkpoint"))
        .unwrap()
        .trim()
        .to_string()
}

fn wait_out(c: Child) -> Output {
    c.wait_with_output().unwrap()
}

#[test]
fn two_ranks_commit_together_and_an_interrupted_run_ends_identical() {
    let job = Job::new();
    // Straight: one checkpoint with both ranks' files, one manifest.
    let straight = job.run_dir("straight");
    let o = job.run(&straight, 2, &["8", "4", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let files = checkpoint_files(&straight, 8);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "rank00000.model",
            "rank00000.rng",
            "rank00000.step",
            "rank00001.rng",
            "rank00001.step"
        ]
    );
    let m = manifest(&straight, 8);
    assert_eq!(m["extra"]["world_size"], 2, "{m}");
    let o = run(&["verify", straight.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let started = &events(&journal(&straight), "child_started")[0].clone();
    assert_eq!(started["world_size"], 2);
    assert_eq!(started["launcher"], "local");
    assert_eq!(started["pids"].as_array().unwrap().len(), 2);
    // status: per-rank bytes.
    let o = run(&["status", "--json", straight.to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["checkpoints"][0]["world_size"], 2);
    assert_eq!(
        st["checkpoints"][0]["rank_bytes"].as_array().unwrap().len(),
        2
    );
    let o = run(&["status", straight.to_str().unwrap()]);
    assert!(text(&o).contains("2 ranks: rank 0"), "{}", text(&o));

    // Interrupted: the warning reaches every rank (they agree on the step, both stage, one
    // commit); then rank 1 is SIGKILLed (its peer is taken down, nothing half-committed);
    // then to the end.
    let run_dir = job.run_dir("interrupted");
    let c = job
        .cmd(&run_dir, 2, &[], &["8", "4", "0.15"])
        .spawn()
        .unwrap();
    wait_event(&run_dir, "child_started", 1); // the supervisor handles signals from here on
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(c.id() as i32), Signal::SIGUSR1).unwrap();
    let o = wait_out(c);
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    let j = journal(&run_dir);
    let commits = events(&j, "checkpoint_committed");
    assert_eq!(commits.len(), 1, "{j:?}");
    let stopped_at = commits[0]["step"].as_u64().unwrap();
    assert!(
        stopped_at < 4,
        "stopped before the periodic save: {stopped_at}"
    );
    assert_eq!(checkpoint_files(&run_dir, stopped_at).len(), 5);

    let c = job
        .cmd(&run_dir, 2, &[], &["8", "4", "0.15"])
        .spawn()
        .unwrap();
    wait_commits(&run_dir, 2); // step 4
    let pids = events(&journal(&run_dir), "child_started")[1]["pids"].clone();
    std::thread::sleep(Duration::from_millis(200));
    kill(
        Pid::from_raw(pids[1].as_i64().unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let o = wait_out(c);
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    let j = journal(&run_dir);
    let failed = events(&j, "rank_failed");
    assert_eq!(failed.len(), 1, "{j:?}");
    assert_eq!(failed[0]["rank"], 1);
    assert_eq!(pointer(&run_dir), ckpt(4));

    let o = job.run(&run_dir, 2, &["8", "4", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("resumes at 4"), "{}", text(&o));
    assert_eq!(
        checkpoint_files(&run_dir, 8),
        files,
        "identical to the straight run"
    );
}

#[test]
fn a_rank_that_never_asks_leaves_the_previous_checkpoint_and_is_named() {
    let job = Job::new();
    let run_dir = job.run_dir("run");
    let o = job.run(&run_dir, 2, &["6", "3", "0", "norequest"]);
    // Every rank exited 0, but the last state is not committed: not done, retried.
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    assert_eq!(pointer(&run_dir), ckpt(3), "the previous checkpoint stays");
    assert!(!run_dir.join("checkpoints").join(ckpt(6)).exists());
    let j = journal(&run_dir);
    let inc = events(&j, "ranks_incomplete");
    assert_eq!(inc.len(), 1, "{j:?}");
    assert_eq!(inc[0]["missing"], serde_json::json!([1]));
    assert_eq!(inc[0]["requested"], serde_json::json!([0]));
    assert_eq!(inc[0]["step"], 6);
    // Both ranks' staged files are kept, never deleted.
    let kept = events(&j, "staged_kept");
    assert_eq!(kept.len(), 2, "{kept:?}");
    for k in &kept {
        assert!(run_dir
            .join(k["dir"].as_str().unwrap())
            .join("step")
            .exists());
    }
    let o = run(&["status", run_dir.to_str().unwrap()]);
    assert!(text(&o).contains("rank(s) 1 never asked"), "{}", text(&o));
    // The next allocation resumes from step 3 and finishes.
    let o = job.run(&run_dir, 2, &["6", "3", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("resumes at 3"), "{}", text(&o));
}

#[test]
fn ranks_asking_for_different_steps_are_refused() {
    let job = Job::new();
    let run_dir = job.run_dir("run");
    let o = job.run(&run_dir, 2, &["6", "3", "0", "skew"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = journal(&run_dir);
    let refused = events(&j, "request_refused");
    assert_eq!(refused.len(), 1, "{j:?}");
    let reason = refused[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("rank 0: step 3, rank 1: step 4"),
        "{reason}"
    );
    let steps: Vec<u64> = events(&j, "checkpoint_committed")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [6]);
    assert_eq!(
        events(&j, "staged_kept").len(),
        2,
        "both ranks' step-3 files kept"
    );
}

#[test]
fn sharded_state_refuses_another_world_size_and_replicated_state_loads_anywhere() {
    let job = Job::new();
    let sharded = job.run_dir("sharded");
    let o = job.run(&sharded, 2, &["3", "3", "0", "sharded"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(manifest(&sharded, 3)["extra"]["sharded"], true);
    let o = job.run(&sharded, 3, &["6", "3", "0"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("written by 2 ranks") && t.contains("this job has 3"),
        "{t}"
    );
    assert!(
        events(&journal(&sharded), "child_started").len() == 1,
        "never started"
    );
    // With distributed.reshard the program is trusted to reshard.
    let cfg = job.tmp.path().join("reshard.yaml");
    std::fs::write(
        &cfg,
        format!(
            "name: reshard\nrun_dir: {}\ndistributed:\n  world_size: 3\n  reshard: true\n",
            sharded.display()
        ),
    )
    .unwrap();
    let o = job
        .cmd(
            &sharded,
            3,
            &["--config", cfg.to_str().unwrap()],
            &["6", "3", "0"],
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // Replicated: 2 ranks save, 3 resume (rank 2 derives its own state), told the saved size.
    let replicated = job.run_dir("replicated");
    let o = job.run(&replicated, 2, &["3", "3", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = job.run(&replicated, 3, &["6", "3", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("rank 2 of 3 resumes at 3 (saved by 2)"),
        "{}",
        text(&o)
    );
    assert_eq!(manifest(&replicated, 6)["extra"]["world_size"], 3);
}

/// `distributed.launcher: command`: the program starts its ranks itself, each through the
/// `hpc-ckpt rank` shim (as torchrun would with `--no-python hpc-ckpt rank -- …`); the shim
/// takes the launcher's RANK/WORLD_SIZE and refuses a launcher that disagrees on the world size.
#[test]
fn a_launcher_that_starts_its_own_ranks_goes_through_the_shim() {
    let job = Job::new();
    let run_dir = job.run_dir("run");
    let cfg = job.tmp.path().join("cmd.yaml");
    std::fs::write(
        &cfg,
        "name: cmd\ndistributed: {world_size: 2, launcher: command}\n",
    )
    .unwrap();
    let launch = |world: u32| {
        format!(
            "for r in 0 1; do RANK=$r WORLD_SIZE={world} {} rank -- bash {} 6 3 0 & done; wait",
            bin().display(),
            job.program.display()
        )
    };
    let o = Command::new(bin())
        .args(["wrap", "--config", cfg.to_str().unwrap()])
        .args(["--run-dir", run_dir.to_str().unwrap(), "--", "bash", "-c"])
        .arg(launch(2))
        .env("SYNC_ROOT", job.tmp.path().join("sync"))
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(checkpoint_files(&run_dir, 6).len(), 5);
    assert_eq!(
        events(&journal(&run_dir), "child_started")[0]["launcher"],
        "command"
    );

    let o = Command::new(bin())
        .args(["wrap", "--config", cfg.to_str().unwrap()])
        .args([
            "--run-dir",
            job.run_dir("bad").to_str().unwrap(),
            "--",
            "bash",
            "-c",
        ])
        .arg(launch(3))
        .env("SYNC_ROOT", job.tmp.path().join("sync"))
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap();
    assert!(
        text(&o).contains("the launcher started 3 ranks (RANK/WORLD_SIZE) but the job has 2"),
        "{}",
        text(&o)
    );
}
