//! The supervisor's rules, each through the real binary with a real child (a shell script) or
//! the built-in trainer — one test per defect of issue 7 that lived on the supervisor's side:
//!
//! - staged files with no commit request are kept (moved aside, named, journaled, shown by
//!   `status` with the command that imports them), never deleted;
//! - a commit request older than the newest checkpoint is refused (the pointer never moves
//!   back), unless `checkpoint.allow_step_backwards`;
//! - a supervisor killed with SIGKILL takes its child with it, and the next one never commits
//!   what an earlier child staged;
//! - `on_save_error: stop` stops the chain (exit 12), `continue` trains on (`save_failed`);
//! - a resume refused for a changed config stops the chain (exit 7), not a requeue;
//! - each commit is logged once.

use std::fs;
use std::path::Path;
#[cfg(feature = "torch")]
use std::path::PathBuf;
#[cfg(feature = "torch")]
use std::process::Command;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn journal(run: &Path) -> Vec<Value> {
    hpc_ckpt::storage::journal::read_all(run).0
}

fn events<'a>(j: &'a [Value], name: &str) -> Vec<&'a Value> {
    j.iter().filter(|e| e["event"] == name).collect()
}

fn status_json(dir: &Path) -> Value {
    let o = crate::common::run(&["status", "--json", dir.to_str().unwrap()]);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

/// Poll until `cond` holds (at most 30 s).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `hpc-ckpt wrap --run-dir RUN [--config CFG] -- sh -c SCRIPT`, started (not awaited).
fn spawn_wrap(run: &Path, cfg: Option<&Path>, script: &str) -> Child {
    let mut args = vec!["wrap", "--run-dir", run.to_str().unwrap()];
    if let Some(c) = cfg {
        args.extend(["--config", c.to_str().unwrap()]);
    }
    args.extend(["--", "sh", "-c", script]);
    cmd(&args)
        .env("HPC_CKPT_LOG", "info")
        .env_remove("SLURM_JOB_ID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hpc-ckpt wrap")
}

fn finish(child: Child) -> (i32, String) {
    let o = child.wait_with_output().unwrap();
    (o.status.code().unwrap_or(-1), text(&o))
}

/// Shell: write a commit request for `step` atomically and wait for its acknowledgement.
const REQUEST_FN: &str = r#"
request() {
    printf '{"step": %s}' "$1" > "$HPC_CKPT_COMMIT_REQUEST.tmp"
    mv "$HPC_CKPT_COMMIT_REQUEST.tmp" "$HPC_CKPT_COMMIT_REQUEST"
    while [ -e "$HPC_CKPT_COMMIT_REQUEST" ]; do sleep 0.02; done
    cat "$HPC_CKPT_COMMIT_REQUEST.result" >> "$OUT/results"
    echo >> "$OUT/results"
}
"#;

#[test]
fn files_staged_without_a_request_are_kept_and_status_says_how_to_commit_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // The program a user writes after reading only "write a checkpoint here": on the signal it
    // stages its files and exits 0, with no commit request.
    let script = r#"trap 'echo weights > "$HPC_CKPT_STAGING/model.bin"; echo 7 > "$HPC_CKPT_STAGING/state.json"; exit 0' USR1
        : > "$HPC_CKPT_READY_FILE"
        while true; do sleep 0.05; done"#;
    let child = spawn_wrap(&run, None, script);
    wait_until("the child to start", || {
        !events(&journal(&run), "child_started").is_empty()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let (code, log) = finish(child);
    assert_eq!(code, 11, "work left, outside Slurm: {log}");
    assert!(
        log.contains("ERROR") && log.contains("NOT committed") && log.contains("model.bin"),
        "an ERROR names the files: {log}"
    );
    let j = journal(&run);
    let kept = events(&j, "staged_kept");
    assert_eq!(kept.len(), 1, "{j:#?}");
    assert!(kept[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no commit request"));
    let dir = run.join(kept[0]["dir"].as_str().unwrap());
    assert_eq!(
        fs::read_to_string(dir.join("model.bin")).unwrap(),
        "weights\n"
    );
    assert_eq!(fs::read_to_string(dir.join("state.json")).unwrap(), "7\n");

    let st = status_json(&run);
    let cmdline = st["kept"][0]["commit_command"].as_str().unwrap();
    assert!(
        cmdline.starts_with("hpc-ckpt commit --run-dir ")
            && cmdline.ends_with(dir.to_str().unwrap()),
        "{cmdline}"
    );
    let shown = text(&crate::common::run(&["status", run.to_str().unwrap()]));
    assert!(
        shown.contains("Kept staged files (NOT committed)"),
        "{shown}"
    );
    // The printed command works (with the step filled in).
    let cmdline = cmdline.replace("STEP", "7");
    let args: Vec<&str> = cmdline.split(' ').skip(1).collect();
    let o = crate::common::run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        fs::read_to_string(run.join("last_checkpoint"))
            .unwrap()
            .trim(),
        ckpt(7)
    );
}

#[test]
fn a_request_older_than_the_newest_checkpoint_is_refused_unless_allowed() {
    for allow in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        let cfg = tmp.path().join("job.yaml");
        fs::write(
            &cfg,
            format!("name: back\ncheckpoint:\n  allow_step_backwards: {allow}\n"),
        )
        .unwrap();
        let script = format!(
            "{REQUEST_FN}\n echo a > \"$HPC_CKPT_STAGING/w.bin\"; request 200\n \
             echo b > \"$HPC_CKPT_STAGING/w.bin\"; request 50\n"
        );
        let child = {
            let mut c = cmd(&[
                "wrap",
                "--run-dir",
                run.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--",
                "sh",
                "-c",
                &script,
            ]);
            c.env("OUT", &out).env_remove("SLURM_JOB_ID");
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (code, log) = finish(child);
        assert_eq!(code, 0, "{log}");
        let results = fs::read_to_string(out.join("results")).unwrap();
        let pointer = fs::read_to_string(run.join("last_checkpoint")).unwrap();
        let j = journal(&run);
        if allow {
            assert_eq!(pointer.trim(), ckpt(50), "allowed: the pointer follows");
            assert!(!results.contains("\"ok\":false"), "{results}");
        } else {
            assert_eq!(pointer.trim(), ckpt(200), "committed steps only grow");
            let second = results.lines().nth(1).unwrap();
            assert!(
                second.contains("\"ok\":false")
                    && second.contains("older than step 200")
                    && second.contains("HPC_CKPT_RESUME_FROM"),
                "{results}"
            );
            assert_eq!(events(&j, "request_refused").len(), 1);
            assert!(!run.join("checkpoints").join(ckpt(50)).exists());
            let st = status_json(&run);
            let warnings = st["warnings"].to_string();
            assert!(warnings.contains("refused"), "{warnings}");
            assert_eq!(
                st["kept"][0]["step"], 50,
                "the refused files are kept: {st:#}"
            );
        }
    }
}

#[test]
fn a_supervisor_killed_with_sigkill_takes_its_child_along() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let pidfile = tmp.path().join("child.pid");
    let script = format!("echo $$ > {}; exec sleep 600", pidfile.display());
    let mut wrap = spawn_wrap(&run, None, &script);
    wait_until("the child's pid", || {
        fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = |pid: i32| {
        // A zombie still has a /proc entry; its state is Z.
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split(' ').nth(2).is_none_or(|st| st != "Z"))
            .unwrap_or(false)
    };
    assert!(alive(pid));
    wrap.kill().unwrap(); // SIGKILL
    wrap.wait().unwrap();
    wait_until("the orphan to die", || !alive(pid));
}

#[test]
fn a_new_supervisor_never_commits_what_an_earlier_child_staged() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // What a killed allocation leaves: staged files and an unanswered request (its own token).
    let old = run.join("staging").join("a0001-4242");
    make_src(&old, &[("w.bin", 100)], 1);
    fs::write(run.join("staging/a0001-4242.request"), "{\"step\": 9}").unwrap();
    let (code, log) = finish(spawn_wrap(&run, None, "exit 0"));
    assert_eq!(code, 0, "{log}");
    assert!(
        !run.join("checkpoints").join(ckpt(9)).exists(),
        "never committed"
    );
    assert!(!run.join("last_checkpoint").exists());
    let j = journal(&run);
    let kept = events(&j, "staged_kept");
    assert_eq!(kept.len(), 1, "{j:#?}");
    assert_eq!(kept[0]["step"], 9);
    assert!(run
        .join(kept[0]["dir"].as_str().unwrap())
        .join("w.bin")
        .exists());
    assert_eq!(
        fs::read_dir(run.join("staging"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "staging/ holds nothing of earlier allocations"
    );
}

/// A trainer config whose checkpoints (~13 MiB: a 1M-parameter mlp with Adam) cannot fit a
/// 4 MiB tmpfs.
#[cfg(feature = "torch")]
fn big_mlp(on_save_error: &str) -> String {
    format!(
        "name: full\ncheckpoint: {{every_steps: 5, keep_last: 2, on_save_error: {on_save_error}}}\n\
         seed: 0\nmodel: {{kind: mlp, hidden: [1024, 1024]}}\n\
         data: {{kind: synthetic, samples: 512, features: 32, classes: 10}}\n\
         batch_size: 32\nmax_steps: 12\noptimizer: {{kind: adam, lr: 0.001}}\n"
    )
}

/// A mounted tmpfs of `size`, unmounted on drop; None where this machine cannot mount one.
#[cfg(feature = "torch")]
struct Tmpfs(PathBuf);

#[cfg(feature = "torch")]
impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").is_err(),
                "CI runs as root in a sandbox that allows tmpfs mounts; this test must run there"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        }
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

#[cfg(feature = "torch")]
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[cfg(feature = "torch")]
#[test]
fn on_save_error_stop_ends_the_chain_and_continue_trains_on() {
    for policy in ["stop", "continue"] {
        let tmp = tempfile::tempdir().unwrap();
        let Some(mnt) = Tmpfs::mount(&tmp.path().join("mnt"), "4m") else {
            return;
        };
        let run = mnt.0.join("run");
        let cfg = tmp.path().join("job.yaml");
        fs::write(&cfg, big_mlp(policy)).unwrap();
        let o = cmd(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap();
        let j = journal(&run);
        let end = events(&j, "allocation_end")[0];
        let failed = events(&j, "save_failed");
        if policy == "stop" {
            assert_eq!(o.status.code(), Some(12), "{}", text(&o));
            assert_eq!(end["decision"], "stop");
            let reason = end["reason"].as_str().unwrap();
            assert!(
                reason.contains("on_save_error is stop") && reason.contains("step 5"),
                "{reason}"
            );
            assert_eq!(failed.len(), 1, "stopped at the first failed save");
            let st = status_json(&run);
            assert_eq!(st["run"]["state"], "stopped");
        } else {
            // Every save fails (the disk stays full); training runs to its end regardless, and the
            // failed final save is retried by a requeue (here: exit 11).
            assert_eq!(o.status.code(), Some(11), "{}", text(&o));
            assert!(failed.len() >= 3, "{failed:?}");
            let metrics = fs::read_to_string(run.join("metrics.jsonl")).unwrap();
            assert!(
                metrics.lines().any(|l| l.contains("\"step\":12")),
                "trained to the end"
            );
            assert_eq!(end["decision"], "requeue");
        }
        drop(mnt);
    }
}

#[cfg(feature = "torch")]
#[test]
fn a_resume_refused_for_a_changed_config_stops_with_exit_7() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let job = |lr: &str, steps: u32| {
        let p = tmp.path().join(format!("job-{lr}-{steps}.yaml"));
        fs::write(
            &p,
            format!(
                "name: cfg\ncheckpoint: {{every_steps: 5}}\nseed: 0\n\
                 model: {{kind: mlp, hidden: [16]}}\n\
                 data: {{kind: synthetic, samples: 256, features: 8, classes: 4}}\n\
                 batch_size: 16\nmax_steps: {steps}\noptimizer: {{kind: adam, lr: {lr}}}\n"
            ),
        )
        .unwrap();
        p
    };
    let train = |cfg: &Path| {
        cmd(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .env("HPC_CKPT_LOG", "info")
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap()
    };
    let o = train(&job("0.001", 10));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Each commit is logged once at INFO (2 commits: steps 5 and 10).
    let log = text(&o);
    let lines = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("checkpoint committed"))
        .count();
    assert_eq!(lines, 2, "{log}");

    let o = train(&job("0.01", 20));
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let j = journal(&run);
    let end = events(&j, "allocation_end").last().copied().unwrap();
    assert_eq!(end["decision"], "stop");
    assert_eq!(end["exit_code"], 7);
    let st = status_json(&run);
    assert_eq!(st["run"]["state"], "stopped");
    let reason = st["run"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("config") && reason.contains("optimizer.lr"),
        "status says why: {reason}"
    );
}
