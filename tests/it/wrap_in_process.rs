//! The supervisor's in-process path (what `wrap -- train` and `hpc-ckpt train` use), with a
//! small fake trainer: its `stop` callback turns the warning signal into a checkpoint and an
//! early return; the allocation then ends with a requeue decision; a second run resumes from the
//! committed step and completes. Runs in one process (the test sends itself the signal).

use std::path::Path;

use anyhow::Result;
use hpc_ckpt::config::JobConfig;
use hpc_ckpt::storage::verify::Loaded;
use hpc_ckpt::storage::{CommitMeta, FileSource, Snapshot, Store};
use hpc_ckpt::supervision::workload::{Failure, InProcess, InProcessEnd, Workload};
use hpc_ckpt::supervision::wrap::{run, WrapArgs};

/// Counts to `total`, committing every 5 steps; sends itself USR1 at `signal_at`.
struct Counter {
    total: u64,
    signal_at: Option<u64>,
    resumed_from: Option<u64>,
}

impl InProcess for Counter {
    fn run(&mut self, store: &mut Store, stop: &dyn Fn() -> bool) -> Result<InProcessEnd, Failure> {
        let resume: Option<Loaded> = store.load_latest().map_err(anyhow::Error::from)?;
        let mut step = match &resume {
            Some(l) => String::from_utf8(l.files["state.json"].clone())
                .map_err(anyhow::Error::from)?
                .trim()
                .parse()
                .map_err(anyhow::Error::from)?,
            None => 0u64,
        };
        self.resumed_from = resume.map(|l| l.manifest.step);
        let commit = |store: &mut Store, step: u64| -> Result<()> {
            let mut snap = Snapshot::new();
            snap.add(
                "state.json",
                FileSource::Bytes(step.to_string().into_bytes().into()),
            );
            store.commit(
                &snap,
                &CommitMeta {
                    step,
                    ..Default::default()
                },
            )?;
            Ok(())
        };
        while step < self.total {
            if stop() {
                commit(store, step)?;
                return Ok(InProcessEnd::Stopped);
            }
            step += 1;
            if Some(step) == self.signal_at {
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGUSR1)
                    .map_err(anyhow::Error::from)?;
                // Delivery to the signal thread is asynchronous: give it a moment.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if step % 5 == 0 {
                commit(store, step)?;
            }
        }
        Ok(InProcessEnd::Completed)
    }
}

fn wrap(run_dir: &Path, trainer: Counter) -> Result<i32> {
    std::env::remove_var("SLURM_JOB_ID");
    run(WrapArgs {
        config: JobConfig::parse("name: counter\n").unwrap(),
        run_dir: run_dir.to_path_buf(),
        workload: Workload::InProcess(Box::new(trainer)),
    })
}

#[test]
fn warning_signal_checkpoints_in_process_and_the_next_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let code = wrap(
        &run_dir,
        Counter {
            total: 20,
            signal_at: Some(7),
            resumed_from: None,
        },
    )
    .unwrap();
    assert_eq!(code, 11, "work left, not in Slurm: requeue needed");
    let ptr = std::fs::read_to_string(run_dir.join("last_checkpoint")).unwrap();
    assert_eq!(
        ptr.trim(),
        "step-000000000007",
        "stopped at the step boundary after the signal"
    );
    let code = wrap(
        &run_dir,
        Counter {
            total: 20,
            signal_at: None,
            resumed_from: None,
        },
    )
    .unwrap();
    assert_eq!(code, 0);
    let (events, _) = hpc_ckpt::storage::journal::read_all(&run_dir);
    let ends: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "allocation_end")
        .collect();
    assert_eq!(ends[0]["ending"], "warning_signal");
    assert_eq!(ends[0]["decision"], "requeue");
    assert_eq!(ends[1]["ending"], "completed");
    let loads: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "checkpoint_loaded")
        .collect();
    assert_eq!(
        loads.len(),
        1,
        "the second allocation loaded the checkpoint"
    );
    assert_eq!(loads[0]["step"], 7);
    assert!(events.iter().any(|e| e["event"] == "run_done"));
}
