//! End to end on a real local Slurm cluster (slurmctld + slurmd + munge, started by
//! `sbatch/local-cluster.sh`): `hpc-ckpt sbatch` → `sbatch`, with a real PyTorch child under
//! `wrap`. Each test holds the lanes (nodes) its jobs run on (`common::take_lanes`): tests on
//! different nodes run side by side, and no test's preemptor or exclusive job meets another's.
//!
//! - three interruptions by three mechanisms (`scancel --signal=USR1 --batch`, preemption by a
//!   job in the `high` partition, `scontrol requeue`) at seeded moments, and for some chains a
//!   fourth, a SIGKILL of the program (the Python child, or one rank of the built-in trainer):
//!   the chain completes on its own and the final files are byte-identical to a straight run —
//!   the Python child, 2-rank DDP (1 node, 2 nodes), the built-in trainer (1 rank; 2 ranks of
//!   the gpt on 1 node, of the cnn on 2 nodes);
//! - a program that always crashes: the chain stops after `max_no_progress`, saying why;
//! - `scancel` by the user: checkpoint, no requeue.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

fn job_state(conf: &str, job: &str) -> String {
    let o = slurm(conf, "scontrol", &["show", "job", "-o", job]);
    hpc_ckpt::slurm::parse_show_job(&String::from_utf8_lossy(&o.stdout))
        .map(|s| s.state)
        .unwrap_or_else(|| "GONE".into())
}

fn events(run: &Path) -> Vec<serde_json::Value> {
    hpc_ckpt::storage::journal::read_all(run).0
}

fn count(run: &Path, event: &str) -> usize {
    events(run).iter().filter(|e| e["event"] == event).count()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where a job runs on the local cluster.
struct Layout {
    /// Lines of the job config's `slurm:` section (besides `partition`, which the lanes give,
    /// `signal_lead` and `extra`).
    slurm: &'static str,
    /// The nodes the job's allocation spans (the lanes it holds).
    nodes: u32,
}

/// One node (either lane: `low` or `low2`; `high` or `high2` preempts).
const ONE_NODE: Layout = Layout {
    slurm: "",
    nodes: 1,
};

/// Two nodes × one task (both lanes: partition `wide`, the local cluster's two slurmd);
/// `widehigh` preempts.
const TWO_NODES: Layout = Layout {
    slurm: "  nodes: 2\n  ntasks_per_node: 1\n",
    nodes: 2,
};

/// A layout on the lanes it holds until it drops: the `slurm:` lines of its jobs and the `sbatch`
/// options of a job that preempts them there.
struct Placed {
    slurm: String,
    preemptor: Vec<String>,
    _lanes: Lanes,
}

/// Wait for the lanes `layout` needs on the cluster at `conf` and take them.
fn place(conf: &str, layout: &Layout) -> Placed {
    let lanes = take_lanes(conf, layout.nodes as usize);
    let (low, high) = lanes.partitions();
    Placed {
        slurm: format!("  partition: {low}\n{}", layout.slurm),
        preemptor: vec![
            "-p".into(),
            high.into(),
            format!("-N{}", layout.nodes),
            "--exclusive".into(),
        ],
        _lanes: lanes,
    }
}

/// Write a job config for `command` (slurm lead 30 s, exclusive nodes, the `slurm:` lines
/// `slurm`) plus `extra_yaml`.
fn write_config(
    dir: &Path,
    name: &str,
    command: &[String],
    slurm: &str,
    extra_yaml: &str,
) -> (PathBuf, PathBuf) {
    let run = dir.join("run");
    let cfg = dir.join("job.yaml");
    let cmd_yaml: Vec<String> = command.iter().map(|c| format!("{c:?}")).collect();
    std::fs::write(
        &cfg,
        format!(
            "name: {name}\nrun_dir: {}\ncommand: [{}]\nslurm:\n{}  signal_lead: 30\n  \
             extra: ['--exclusive']\n{extra_yaml}",
            run.display(),
            cmd_yaml.join(", "),
            slurm,
        ),
    )
    .unwrap();
    (cfg, run)
}

/// Render the config's sbatch script through the real `hpc-ckpt sbatch`; its path.
fn render_script(cfg: &Path) -> PathBuf {
    let script = cfg.with_extension("sbatch");
    let o = crate::common::run(&[
        "sbatch",
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        script.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    script
}

/// Render the config's sbatch script and submit it; the job id.
fn submit_config(conf: &str, cfg: &Path) -> String {
    submit_script(conf, &render_script(cfg))
}

/// `sbatch --parsable SCRIPT`; the job id.
fn submit_script(conf: &str, script: &Path) -> String {
    let o = slurm(conf, "sbatch", &["--parsable", script.to_str().unwrap()]);
    assert!(o.status.success(), "sbatch: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

fn submit(
    conf: &str,
    dir: &Path,
    name: &str,
    command: &[String],
    slurm: &str,
    extra_yaml: &str,
) -> (String, PathBuf) {
    let (cfg, run) = write_config(dir, name, command, slurm, extra_yaml);
    (submit_config(conf, &cfg), run)
}

fn train_args(steps: u32) -> Vec<String> {
    vec![
        python().display().to_string(),
        repo()
            .join("examples/python/train.py")
            .display()
            .to_string(),
        "--steps".into(),
        steps.to_string(),
        "--checkpoint-every".into(),
        "20".into(),
        "--step-delay".into(),
        "0.1".into(),
    ]
}

fn dump(run: &Path) -> String {
    let o = crate::common::run(&["status", run.to_str().unwrap()]);
    let mut s = text(&o);
    for e in std::fs::read_dir(run).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("slurm-") {
            s += &format!(
                "\n--- {}\n{}",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            );
        }
    }
    s
}

#[test]
fn four_interruptions_by_four_mechanisms_end_byte_identical_python_child() {
    let steps = 200;
    // The straight run, outside Slurm, without the per-step delay.
    let fast: Vec<String> = train_args(steps)
        .into_iter()
        .filter(|a| a != "0.1" && a != "--step-delay")
        .collect();
    interruptions(&Chain {
        name: "e2e-three-py",
        command: &train_args(steps),
        straight_command: &fast,
        layout: &ONE_NODE,
        extra_yaml: "",
        steps,
        files: PY_FILES,
        kill: Some(Kill {
            cmdline: "examples/python/train.py",
            rank: None,
        }),
    });
}

/// The files compared with the straight run (`examples/python/train.py`'s, all of them).
const PY_FILES: &[&str] = &[
    "model.safetensors",
    "optimizer.safetensors",
    "rng.safetensors",
    "trainer_state.json",
    "reference_batch.safetensors",
];

/// The files compared with the straight run (the built-in trainer's, 1 rank).
const SINGLE_FILES: &[&str] = &[
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
];

/// `examples/python/ddp_train.py` for `steps` steps, a commit every 15.
fn ddp_command(steps: u32, delay: bool) -> Vec<String> {
    let mut v = vec![
        python().display().to_string(),
        repo()
            .join("examples/python/ddp_train.py")
            .display()
            .to_string(),
        "--steps".into(),
        steps.to_string(),
        "--checkpoint-every".into(),
        "15".into(),
    ];
    if delay {
        v.extend(["--step-delay".into(), "0.1".into()]);
    }
    v
}

/// The files of a 2-rank DDP checkpoint compared with the straight run.
const DDP_FILES: &[&str] = &[
    "rank00000.model.safetensors",
    "rank00000.optimizer.safetensors",
    "rank00000.rng.safetensors",
    "rank00001.rng.safetensors",
];

/// A 2-rank torch.distributed (gloo) DDP job: the supervisor starts the ranks with `srun`, the
/// warning reaches both through srun, they agree on the stop step with an all_reduce, and every
/// checkpoint holds both ranks' files. The straight run starts its 2 ranks locally.
#[test]
fn three_interruptions_of_a_two_rank_ddp_job_end_byte_identical() {
    let steps = 120;
    interruptions(&Chain {
        name: "e2e-three-ddp",
        command: &ddp_command(steps, true),
        straight_command: &ddp_command(steps, false),
        layout: &ONE_NODE,
        extra_yaml: "distributed:\n  world_size: 2\n",
        steps,
        files: DDP_FILES,
        kill: None,
    });
}

/// The same DDP job as 2 nodes × 1 task (the local cluster's two slurmd nodes): the batch step
/// and the supervisor on the first node, `srun` puts rank 1 on the second; the warning reaches
/// both nodes' ranks, one coordinated commit per checkpoint, one requeue per interruption.
#[test]
fn three_interruptions_of_a_two_node_ddp_job_end_byte_identical() {
    let steps = 90;
    interruptions(&Chain {
        name: "e2e-three-ddp-2n",
        command: &ddp_command(steps, true),
        straight_command: &ddp_command(steps, false),
        layout: &TWO_NODES,
        extra_yaml: "",
        steps,
        files: DDP_FILES,
        kill: None,
    });
}

/// `tests/python/jobs/fsdp_job.py` (an FSDP2 MLP, every parameter and optimizer state a
/// DTensor, saved through torch.distributed.checkpoint) for `steps` steps, a commit every 15.
fn fsdp_command(steps: u32, delay: bool) -> Vec<String> {
    let mut v = vec![
        python().display().to_string(),
        repo()
            .join("tests/python/jobs/fsdp_job.py")
            .display()
            .to_string(),
        "--steps".into(),
        steps.to_string(),
        "--every".into(),
        "15".into(),
    ];
    if delay {
        v.extend(["--step-delay".into(), "0.1".into()]);
    }
    v
}

/// Every file of a 2-rank FSDP2 checkpoint but the manifest: DCP's own (`.metadata`, one shard
/// file per rank) and hpc_ckpt's.
const FSDP_FILES: &[&str] = &[
    ".metadata",
    "__0_0.distcp",
    "__1_0.distcp",
    "rank00000.trainer_state.json",
    "rank00000.reference_batch.safetensors",
    "rank00000.rank_state.json",
    "rank00000.rng.safetensors",
    "rank00001.rank_state.json",
    "rank00001.rng.safetensors",
];

/// A 2-rank FSDP2 job through the emitted sbatch script: `srun` starts the ranks, each writes
/// its DCP shard into its staging, one commit holds them all; USR1, preemption and `scontrol
/// requeue` later the final checkpoint is byte-identical to a straight run's (DCP's files too).
#[test]
fn three_interruptions_of_a_two_rank_fsdp2_job_end_byte_identical() {
    let steps = 120;
    interruptions(&Chain {
        name: "e2e-three-fsdp",
        command: &fsdp_command(steps, true),
        straight_command: &fsdp_command(steps, false),
        layout: &ONE_NODE,
        extra_yaml: "distributed:\n  world_size: 2\n",
        steps,
        files: FSDP_FILES,
        kill: None,
    });
}

/// The built-in trainer (in-process under the supervisor): a small char-level GPT with dropout,
/// AdamW, cosine warmup, grad accumulation and clipping.
///
/// Sized by measurement: the interruptions take the first ~190 steps (~205 on two ranks, below)
/// on a quiet machine, where steps are fastest against the test's wall-clock waits (Slurm's
/// requeue, the jitter); 700 (600) steps leave three times that and the straight run and the
/// chain train no more than they must (each step of this gpt costs ~21 ms of CPU; at 2000 and
/// 1500 steps the two chains were ~130 CPU-s more of the suite's).
#[test]
fn three_interruptions_by_three_mechanisms_end_byte_identical_builtin_trainer() {
    let yaml = "seed: 3\nthreads: 1\nmodel: {kind: gpt, layers: 2, heads: 2, d_model: 64, context: 32, dropout: 0.1}\n\
                data: {kind: text}\nbatch_size: 16\ngrad_accum: 2\ngrad_clip: 1.0\nmax_steps: 700\n\
                optimizer: {kind: adamw, lr: 0.001}\nscheduler: {kind: cosine, warmup_steps: 20}\n\
                checkpoint: {every_steps: 25, keep_last: 3}\n";
    let train = vec!["train".to_string()];
    interruptions(&Chain {
        name: "e2e-three-builtin",
        command: &train,
        straight_command: &train,
        layout: &ONE_NODE,
        extra_yaml: yaml,
        steps: 700,
        files: SINGLE_FILES,
        kill: None,
    });
}

/// The files of a 2-rank checkpoint of the built-in trainer compared with the straight run.
const BUILTIN_RANK_FILES: &[&str] = &[
    "rank00000.model.safetensors",
    "rank00000.optimizer.safetensors",
    "rank00000.trainer_state.json",
    "rank00000.rank_state.json",
    "rank00001.rank_state.json",
];

/// The built-in trainer as 2 data-parallel ranks (`srun` of `hpc-ckpt train-rank`, c10d Gloo):
/// the gpt, interrupted by USR1, preemption, `scontrol requeue` and a SIGKILL of rank 1; the
/// straight run starts its 2 ranks locally.
#[test]
fn four_interruptions_of_the_builtin_trainer_on_two_ranks_end_byte_identical() {
    let yaml = "seed: 3\nthreads: 1\nmodel: {kind: gpt, layers: 2, heads: 2, d_model: 64, context: 32, dropout: 0.1}\n\
                data: {kind: text}\nbatch_size: 16\ngrad_accum: 2\ngrad_clip: 1.0\nmax_steps: 600\n\
                optimizer: {kind: adamw, lr: 0.001}\nscheduler: {kind: cosine, warmup_steps: 20}\n\
                checkpoint: {every_steps: 25, keep_last: 3}\ndistributed:\n  world_size: 2\n";
    let train = vec!["train".to_string()];
    interruptions(&Chain {
        name: "e2e-builtin-2r",
        command: &train,
        straight_command: &train,
        layout: &ONE_NODE,
        extra_yaml: yaml,
        steps: 600,
        files: BUILTIN_RANK_FILES,
        kill: Some(Kill {
            cmdline: "train-rank",
            rank: Some(1),
        }),
    });
}

/// The same as 2 nodes × 1 task with the cnn, whose batchnorm statistics rank 0 shares after
/// every step.
#[test]
fn four_interruptions_of_the_builtin_cnn_on_two_nodes_end_byte_identical() {
    let yaml = "seed: 3\nthreads: 1\nmodel: {kind: cnn, channels: [8, 16], dropout: 0.1}\n\
                data: {kind: synthetic-images, samples: 2000, size: 12, classes: 4}\nbatch_size: 32\n\
                max_steps: 1200\noptimizer: {kind: sgd, lr: 0.05, momentum: 0.9}\n\
                checkpoint: {every_steps: 25, keep_last: 3}\n";
    let train = vec!["train".to_string()];
    interruptions(&Chain {
        name: "e2e-builtin-2n",
        command: &train,
        straight_command: &train,
        layout: &TWO_NODES,
        extra_yaml: yaml,
        steps: 1200,
        files: BUILTIN_RANK_FILES,
        kill: Some(Kill {
            cmdline: "train-rank",
            rank: Some(1),
        }),
    });
}

/// The straight run of a chain test: `wrap --config` outside Slurm, in `dir/straight`; its run
/// dir.
fn straight_run(
    dir: &Path,
    name: &str,
    command: &[String],
    layout: &Layout,
    extra_yaml: &str,
) -> PathBuf {
    let dir = dir.join("straight");
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg, run) = write_config(&dir, name, command, layout.slurm, extra_yaml);
    let o = crate::common::cmd(&["wrap", "--config", cfg.to_str().unwrap()])
        .env_remove("SLURM_JOB_ID")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    run
}

/// A chain test: what runs, where, and how it is interrupted.
struct Chain<'a> {
    name: &'a str,
    command: &'a [String],
    /// The same program outside Slurm (e.g. without a per-step delay).
    straight_command: &'a [String],
    layout: &'a Layout,
    extra_yaml: &'a str,
    steps: u32,
    /// The final checkpoint's files that must be byte-identical.
    files: &'a [&'a str],
    /// A fourth interruption: SIGKILL of one of the program's processes.
    kill: Option<Kill<'a>>,
}

/// Which process a chain SIGKILLs: the run's process whose command line contains `cmdline`
/// (and whose `HPC_CKPT_RANK` is `rank`, when given).
struct Kill<'a> {
    cmdline: &'a str,
    rank: Option<u32>,
}

/// The pid of the run's process `k` names, if it runs (read from /proc: srun's tasks are not
/// the supervisor's children).
fn find_process(run: &Path, k: &Kill) -> Option<i32> {
    let run_env = format!("HPC_CKPT_RUN_DIR={}", run.display());
    let rank_env = k.rank.map(|r| format!("HPC_CKPT_RANK={r}"));
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(k.cmdline) {
            return None;
        }
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let vars: Vec<String> = environ
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let has = |want: &str| vars.iter().any(|v| v == want);
        (has(&run_env) && rank_env.as_deref().is_none_or(has)).then_some(pid)
    })
}

/// Run the chain's command straight (outside Slurm, as `straight_command`) and as a Slurm job
/// interrupted by `scancel --signal=USR1 --batch`, preemption and `scontrol requeue` (and a
/// SIGKILL, when the chain says) at seeded moments; the chain must complete on its own with
/// final files byte-identical to the straight run.
fn interruptions(chain: &Chain) {
    let Chain {
        name,
        command,
        straight_command,
        layout,
        extra_yaml,
        steps,
        files,
        ..
    } = *chain;
    let conf = cluster();
    let tmp = tempfile::tempdir().unwrap();
    // The straight run needs no cluster: it runs before this test waits for its lanes.
    let straight = straight_run(tmp.path(), name, straight_command, layout, extra_yaml);

    let placed = place(&conf, layout);
    let dir = tmp.path().join("chain");
    std::fs::create_dir_all(&dir).unwrap();
    let (job, run) = submit(
        &conf,
        &dir,
        name,
        command,
        &placed.slurm,
        &format!("signals:\n  grace_seconds: 20\n{extra_yaml}"),
    );
    let mut rng = Rng(std::env::var("HPC_CKPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4));
    let limit = Duration::from_secs(240);
    let mut jitter = || Duration::from_millis(rng.below(1500));

    // 1. scancel --signal=USR1 --batch, after the first commit.
    wait_for("commit 1", limit, || {
        count(&run, "checkpoint_committed") >= 1
    });
    let record = text(&slurm(&conf, "scontrol", &["show", "job", "-o", &job]));
    assert!(
        record.contains(&format!("NumNodes={} ", layout.nodes)),
        "the allocation should span {} node(s): {record}",
        layout.nodes
    );
    std::thread::sleep(jitter());
    let o = slurm(&conf, "scancel", &["--signal=USR1", "--batch", &job]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("allocation 2", limit, || count(&run, "child_started") >= 2);

    // 2. Preemption by a high-partition job, after a commit of allocation 2.
    let c = count(&run, "checkpoint_committed");
    wait_for("a commit in allocation 2", limit, || {
        count(&run, "checkpoint_committed") > c
    });
    std::thread::sleep(jitter());
    let mut preemptor = vec!["--parsable"];
    preemptor.extend(placed.preemptor.iter().map(String::as_str));
    preemptor.extend(["-o", "/dev/null", "--wrap", "sleep 2"]);
    let o = slurm(&conf, "sbatch", &preemptor);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("allocation 3", limit, || count(&run, "child_started") >= 3);

    // 3. scontrol requeue from outside (TERM with no warning; Slurm requeues it itself).
    let c = count(&run, "checkpoint_committed");
    wait_for("a commit in allocation 3", limit, || {
        count(&run, "checkpoint_committed") > c
    });
    std::thread::sleep(jitter());
    let o = slurm(&conf, "scontrol", &["requeue", &job]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("allocation 4", limit, || count(&run, "child_started") >= 4);

    // 4. SIGKILL of one process of the program (a crash: the supervisor requeues).
    if let Some(k) = &chain.kill {
        let c = count(&run, "checkpoint_committed");
        wait_for("a commit in allocation 4", limit, || {
            count(&run, "checkpoint_committed") > c
        });
        std::thread::sleep(jitter());
        let mut pid = None;
        wait_for("the process to kill", limit, || {
            pid = find_process(&run, k);
            pid.is_some()
        });
        let pid = pid.unwrap();
        eprintln!("SIGKILL to {pid} ({})", k.cmdline);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for("allocation 5", limit, || count(&run, "child_started") >= 5);
    }

    // The chain completes on its own.
    wait_for("the run to finish", limit, || count(&run, "run_done") >= 1);
    wait_for("the job to complete", Duration::from_secs(30), || {
        matches!(job_state(&conf, &job).as_str(), "COMPLETED" | "GONE")
    });
    let final_of = |r: &Path, f: &str| {
        std::fs::read(r.join("checkpoints").join(ckpt(steps as u64)).join(f)).unwrap()
    };
    for f in files {
        assert!(
            final_of(&straight, f) == final_of(&run, f),
            "{f} differs from the straight run\n{}",
            dump(&run)
        );
    }
    let ev = events(&run);
    let endings: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "allocation_end")
        .map(|e| e["ending"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        endings[..3],
        ["warning_signal", "warning_signal", "terminated"],
        "{}",
        dump(&run)
    );
    assert_eq!(*endings.last().unwrap(), "completed");
    let codes: Vec<i64> = ev
        .iter()
        .filter(|e| e["event"] == "allocation_end")
        .map(|e| e["exit_code"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(
        codes[..2],
        [10, 10],
        "requeued allocations exit 10: {}",
        dump(&run)
    );
    assert_eq!(*codes.last().unwrap(), 0);
    let st = crate::common::run(&["status", "--json", run.to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["run"]["state"], "done", "{}", dump(&run));
    let allocs = st["run"]["allocations"].as_array().unwrap();
    assert!(allocs.len() >= 4, "{}", dump(&run));
    assert!(
        allocs.iter().all(|a| a["job_id"] == job.as_str()),
        "one job id across requeues"
    );
    eprintln!("{}", dump(&run));
}

#[test]
fn a_program_that_always_crashes_stops_after_max_no_progress() {
    let conf = cluster();
    let placed = place(&conf, &ONE_NODE);
    let tmp = tempfile::tempdir().unwrap();
    let cmd = vec![
        "sh".to_string(),
        "-c".into(),
        "echo crashing >&2; exit 3".into(),
    ];
    let (job, run) = submit(
        &conf,
        tmp.path(),
        "e2e-crash",
        &cmd,
        &placed.slurm,
        "requeue:\n  max_no_progress: 2\n",
    );
    wait_for("the chain to stop", Duration::from_secs(90), || {
        events(&run)
            .iter()
            .any(|e| e["event"] == "allocation_end" && e["decision"] == "stop")
    });
    wait_for("the job to end", Duration::from_secs(30), || {
        !matches!(
            job_state(&conf, &job).as_str(),
            "RUNNING" | "PENDING" | "COMPLETING"
        )
    });
    let ev = events(&run);
    let ends: Vec<_> = ev
        .iter()
        .filter(|e| e["event"] == "allocation_end")
        .collect();
    assert_eq!(ends.len(), 2, "{}", dump(&run));
    assert_eq!(ends[0]["decision"], "requeue");
    assert_eq!(ends[1]["exit_code"], 13);
    assert!(ends[1]["reason"].as_str().unwrap().contains("crash loop"));
    let st = crate::common::run(&["status", run.to_str().unwrap()]);
    assert!(
        text(&st).contains("STOPPED") && text(&st).contains("crash loop"),
        "{}",
        text(&st)
    );
}

#[test]
fn scancel_by_the_user_is_not_requeued() {
    let conf = cluster();
    let placed = place(&conf, &ONE_NODE);
    let tmp = tempfile::tempdir().unwrap();
    let (job, run) = submit(
        &conf,
        tmp.path(),
        "e2e-cancel",
        &train_args(400),
        &placed.slurm,
        "",
    );
    wait_for("commit 1", Duration::from_secs(120), || {
        count(&run, "checkpoint_committed") >= 1
    });
    let o = slurm(&conf, "scancel", &[&job]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for("the allocation to end", Duration::from_secs(30), || {
        count(&run, "allocation_end") >= 1
    });
    // Slurm's word that the job ended: a requeued job would be pending or running again instead
    // (and its second allocation_start follows from that), a cancelled one never comes back.
    wait_for("the job to end", Duration::from_secs(30), || {
        !matches!(
            job_state(&conf, &job).as_str(),
            "RUNNING" | "PENDING" | "COMPLETING" | "CONFIGURING" | "REQUEUED"
        )
    });
    assert_eq!(
        count(&run, "allocation_start"),
        1,
        "a cancelled job came back:\n{}",
        dump(&run)
    );
    let end = events(&run)
        .into_iter()
        .find(|e| e["event"] == "allocation_end")
        .unwrap();
    assert_eq!(end["decision"], "stop", "{}", dump(&run));
    assert_eq!(end["ending"], "terminated");
    assert!(matches!(
        job_state(&conf, &job).as_str(),
        "CANCELLED" | "GONE"
    ));
}

/// `--time=2` with `--signal=B:USR1@60`: the warning comes 60–90 s before the limit (Slurm checks
/// every 30 s); the program checkpoints, the job is requeued, and the chain finishes.
///
/// (Its name sorts it early: libtest starts tests in name order, and this one's ~2 minutes are
/// mostly Slurm's clock, little CPU. Started last, as it was, it was the suite's tail.)
#[test]
fn a_time_limit_warning_checkpoints_and_resumes() {
    let conf = cluster();
    let placed = place(&conf, &ONE_NODE);
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, run) = write_config(
        tmp.path(),
        "e2e-timelimit",
        &train_args(800),
        &placed.slurm,
        "",
    );
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("signal_lead: 30", "signal_lead: 60\n  time: '2'");
    std::fs::write(&cfg, text_cfg).unwrap();
    let job = submit_config(&conf, &cfg);
    wait_for("the run to finish", Duration::from_secs(420), || {
        count(&run, "run_done") >= 1
    });
    let ev = events(&run);
    let first_end = ev.iter().find(|e| e["event"] == "allocation_end").unwrap();
    assert_eq!(first_end["ending"], "warning_signal", "{}", dump(&run));
    assert_eq!(first_end["decision"], "requeue");
    let sig = ev.iter().find(|e| e["event"] == "signal_received").unwrap();
    assert_eq!(sig["signal"], "USR1");
    assert!(
        ev.iter()
            .filter(|e| e["event"] == "allocation_start")
            .count()
            >= 2
    );
    wait_for("the job to complete", Duration::from_secs(30), || {
        matches!(job_state(&conf, &job).as_str(), "COMPLETED" | "GONE")
    });
}

/// A job submitted without `--signal` (a hand-written script): no warning ever comes, so the
/// supervisor's time-limit watch stops the program `slurm.signal_lead` before the time limit,
/// commits, requeues; the next allocation finishes, byte-identical to a straight run.
#[test]
fn a_job_without_a_warning_signal_saves_before_its_time_limit_and_resumes() {
    let conf = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let steps = 360;
    let fast: Vec<String> = train_args(steps)
        .into_iter()
        .filter(|a| a != "0.1" && a != "--step-delay")
        .collect();
    let straight = straight_run(tmp.path(), "e2e-nowarn", &fast, &ONE_NODE, "");

    let placed = place(&conf, &ONE_NODE);
    let (cfg, run) = write_config(
        tmp.path(),
        "e2e-nowarn",
        &train_args(steps),
        &placed.slurm,
        "",
    );
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("signal_lead: 30", "signal_lead: 30\n  time: '1'");
    std::fs::write(&cfg, text_cfg).unwrap();
    let script = render_script(&cfg);
    // What a hand-written script would be: no --signal line.
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --signal="), "{body}");
    let body: String = body
        .lines()
        .filter(|l| !l.starts_with("#SBATCH --signal="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&script, body).unwrap();
    let job = submit_script(&conf, &script);
    // The first allocation's watch fires (a minute's limit, 30 s lead). The requeued job then
    // gets 5 minutes, so the next allocation finishes before its own watch however loaded the
    // machine is (other chains run beside this one): Slurm restarts a requeued job only after
    // its credential expired (5 s), time enough for the update.
    wait_for(
        "the first allocation to end",
        Duration::from_secs(240),
        || count(&run, "allocation_end") >= 1,
    );
    let o = slurm(
        &conf,
        "scontrol",
        &["update", &format!("JobId={job}"), "TimeLimit=5"],
    );
    assert!(o.status.success(), "{}", text(&o));

    wait_for("the run to finish", Duration::from_secs(240), || {
        count(&run, "run_done") >= 1
    });
    let ev = events(&run);
    assert_eq!(count(&run, "signal_received"), 0, "{}", dump(&run));
    let watch = ev.iter().find(|e| e["event"] == "time_limit_watch");
    let watch = watch.unwrap_or_else(|| panic!("no time_limit_watch: {}", dump(&run)));
    assert_eq!(watch["lead_seconds"], 30);
    assert!(watch["seconds_left"].as_u64().unwrap() <= 60);
    assert_eq!(count(&run, "time_limit_near"), 1, "{}", dump(&run));
    let first_end = ev.iter().find(|e| e["event"] == "allocation_end").unwrap();
    assert_eq!(first_end["ending"], "warning_signal", "{}", dump(&run));
    assert_eq!(first_end["decision"], "requeue");
    assert_eq!(first_end["exit_code"], 10);
    let o = crate::common::run(&["status", "--json", run.to_str().unwrap()]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let w = &st["saves"]["time_limit_watch"];
    assert_eq!(w["lead_seconds"], 30, "{st}");
    assert_eq!(
        w["fired"], false,
        "the last allocation finished before its watch: {st}"
    );
    assert_eq!(
        st["run"]["allocations"][0]["interruption"], "announced",
        "a save before the limit is an announced interruption: {st}"
    );
    wait_for("the job to complete", Duration::from_secs(30), || {
        matches!(job_state(&conf, &job).as_str(), "COMPLETED" | "GONE")
    });
    for f in SINGLE_FILES {
        let final_of = |r: &Path| {
            std::fs::read(r.join("checkpoints").join(ckpt(steps as u64)).join(f)).unwrap()
        };
        assert!(final_of(&straight) == final_of(&run), "{f} differs");
    }
}

/// The harness itself: a test that fails while its job runs must not hand its lane to the next
/// test with that job still on it. The guard's drop (while the failure unwinds) cancels the job
/// and frees the lane only once Slurm no longer lists it.
#[test]
fn a_failed_test_leaves_no_job_on_its_lane() {
    let conf = cluster();
    let job = std::sync::Mutex::new(String::new());
    let failed = std::panic::catch_unwind(|| {
        let placed = place(&conf, &ONE_NODE);
        let p = placed.slurm.trim().trim_start_matches("partition: ");
        let o = slurm(
            &conf,
            "sbatch",
            &[
                "--parsable",
                "-p",
                p,
                "-o",
                "/dev/null",
                "--wrap",
                "sleep 300",
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        *job.lock().unwrap() = String::from_utf8_lossy(&o.stdout).trim().to_string();
        wait_for("the job to run", Duration::from_secs(60), || {
            let id = job.lock().unwrap().clone();
            job_state(&conf, &id) == "RUNNING"
        });
        panic!("the test fails while its job runs");
    });
    assert!(failed.is_err());
    let job = job.into_inner().unwrap();
    let o = slurm(&conf, "squeue", &["-h", "-j", &job, "-o", "%T"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "",
        "job {job} outlived the failed test that held its lane"
    );
    assert!(
        matches!(job_state(&conf, &job).as_str(), "CANCELLED" | "GONE"),
        "job {job}: {}",
        job_state(&conf, &job)
    );
}
