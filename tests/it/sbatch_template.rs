//! The rendered auto-resume script against a real (local) Slurm: `sbatch --test-only` accepts
//! what `hpc_ckpt::slurm::template::render` emits for a few configs and refuses an impossible
//! allocation; one tiny job really runs from a work dir whose name needs quoting.
//!
//! Starts the local cluster (`sbatch/local-cluster.sh start`, idempotent) and leaves it running:
//! other tests share it, and tests/ci.sh stops it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{cluster, slurm, take_lanes, text};
use hpc_ckpt::config::JobConfig;
use hpc_ckpt::slurm::template::render;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// Render `yaml` into DIR/NAME.sbatch (work dir: the crate) and return the script's path.
fn write_script(dir: &Path, yaml: &str) -> PathBuf {
    let cfg = JobConfig::parse(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let script = render(
        &cfg,
        Path::new("job.yaml"),
        &crate::common::bin(),
        Path::new(MANIFEST),
    )
    .unwrap();
    let path = dir.join(format!("{}.sbatch", cfg.name));
    std::fs::write(&path, script).unwrap();
    path
}

#[test]
fn sbatch_test_only_accepts_rendered_scripts() {
    let conf = cluster();
    let dir = tempfile::tempdir().unwrap();
    let configs = [
        "name: t-minimal\n",
        "name: t-low\nslurm:\n  partition: low\n  time: '00:05:00'\n  mem: 1G\n  cpus_per_task: 1\n  \
         nodes: 1\n  ntasks: 1\n  signal_lead: 30\n  setup: ['echo hi']\n",
        "name: t-high\nslurm:\n  partition: high\n  time: '10'\n  mem: 1G\n  cpus_per_task: 1\n\
         signals:\n  warn: USR2\n",
        "name: t-exclusive\nslurm:\n  time: '1-00:00:00'\n  mem: 1G\n  extra: ['--exclusive']\n\
         command: [python3, train.py, --lr, '0.1']\n",
    ];
    for yaml in configs {
        let script = write_script(dir.path(), yaml);
        let o = slurm(&conf, "sbatch", &["--test-only", script.to_str().unwrap()]);
        let out = text(&o);
        assert!(
            o.status.success() && out.contains("to start at"),
            "sbatch --test-only refused the script for\n{yaml}\n{out}\n--- script ---\n{}",
            std::fs::read_to_string(&script).unwrap()
        );
    }
}

#[test]
fn sbatch_test_only_refuses_an_impossible_allocation() {
    let conf = cluster();
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "name: t-huge\nslurm:\n  mem: 999999G\n");
    let o = slurm(&conf, "sbatch", &["--test-only", script.to_str().unwrap()]);
    assert!(
        !o.status.success() && !text(&o).contains("to start at"),
        "sbatch --test-only accepted mem=999999G:\n{}",
        text(&o)
    );
}

/// A real job: the setup line runs, the script `cd`s into a work dir with a space, a quote and a
/// `%`, `exec`s the (stand-in) supervisor with the right arguments, and Slurm writes the output
/// into `<run_dir>/slurm-<id>.out` under that work dir.
#[test]
fn rendered_script_runs_from_a_work_dir_that_needs_quoting() {
    let conf = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("work dir 'q' 100%");
    let name = format!("t-run-{}", std::process::id());
    let run_dir = workdir.join("runs").join(&name);
    // Slurm does not create the output file's directory.
    std::fs::create_dir_all(&run_dir).unwrap();
    // A stand-in for hpc-ckpt that prints where it runs and its arguments.
    let fake = tmp.path().join("fake hpc-ckpt's");
    std::fs::write(
        &fake,
        "#!/bin/bash\necho \"pwd=$PWD\"\nfor a in \"$@\"; do echo \"arg=$a\"; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let yaml = format!(
        "name: {name}\ncommand: [python3, \"it's $HOME\"]\nslurm:\n  time: '2'\n  mem: 100M\n  \
         cpus_per_task: 1\n  setup: ['echo \"setup in $PWD\"']\n"
    );
    let cfg = JobConfig::parse(&yaml).unwrap();
    let script = render(&cfg, Path::new("my job.yaml"), &fake, &workdir).unwrap();
    let script_path = tmp.path().join("job.sbatch");
    std::fs::write(&script_path, &script).unwrap();

    // A node of its own (slurm_e2e's exclusive jobs and preemptors hold theirs).
    let lanes = take_lanes(&conf, 1);
    let o = slurm(
        &conf,
        "sbatch",
        &[
            "--parsable",
            "-p",
            lanes.partitions().0,
            script_path.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "sbatch failed:\n{}\n{script}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let out_file = run_dir.join(format!("slurm-{id}.out"));
    let want_tail = format!(
        "pwd={}\narg=wrap\narg=--config\narg=my job.yaml\narg=--\narg=python3\narg=it's $HOME\n",
        workdir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = String::new();
    while Instant::now() < deadline {
        got = std::fs::read_to_string(&out_file).unwrap_or_default();
        if got.ends_with(&want_tail) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !got.ends_with(&want_tail) {
        slurm(&conf, "scancel", &[&id]);
        let q = slurm(&conf, "scontrol", &["show", "job", &id]);
        panic!(
            "job {id}: {} does not end with\n{want_tail}\ngot:\n{got}\n{}\n--- script ---\n{script}",
            out_file.display(),
            text(&q)
        );
    }
    assert!(got.starts_with("setup in "), "{got}");
}
