//! Fault injection: every kind of bad input a run dir can hold, plus a full disk and a second
//! writer. Each must be detected, reported with the file and the reason, and answered by a
//! fallback — and nothing that verified may be deleted or overwritten.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::common::*;
use hpc_ckpt::storage::checksum::hex_of;
use hpc_ckpt::storage::manifest::{Manifest, MANIFEST_FILE};
use hpc_ckpt::storage::run_dir::{holder, RunDir};
use hpc_ckpt::storage::{RetentionPolicy, Store};
use serde_json::Value;

/// A run dir with checkpoints 1, 2, 3 (each: model.safetensors, optimizer.safetensors,
/// trainer_state.json), made through the library's tensor writer.
fn base_run(root: &Path) -> PathBuf {
    use hpc_ckpt::storage::safetensors::Dtype;
    use hpc_ckpt::storage::{CommitMeta, FileSource, Snapshot, TensorData};
    let run = root.join("run");
    let mut store = Store::open(&run, &holder(None), RetentionPolicy::default()).unwrap();
    let mut rng = Rng(7);
    for step in 1..=3u64 {
        let tensor = |name: &str, n: usize, rng: &mut Rng| TensorData {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![n],
            bytes: rng.bytes(n * 4).into(),
        };
        let mut snap = Snapshot::new();
        snap.add(
            "model.safetensors",
            FileSource::Tensors {
                tensors: vec![tensor("w", 1000, &mut rng), tensor("b", 10, &mut rng)],
                metadata: Default::default(),
            },
        );
        snap.add(
            "optimizer.safetensors",
            FileSource::Tensors {
                tensors: vec![tensor("w.exp_avg", 1000, &mut rng)],
                metadata: Default::default(),
            },
        );
        snap.add(
            "trainer_state.json",
            FileSource::Bytes(format!("{{\"step\": {step}}}").into_bytes().into()),
        );
        store
            .commit(
                &snap,
                &CommitMeta {
                    step,
                    ..Default::default()
                },
            )
            .unwrap();
    }
    run
}

fn ck(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(ckpt(step))
}

fn status_json(run: &Path) -> Value {
    let o = run_status(run);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status --json: {e}: {}", text(&o)))
}

fn run_status(run: &Path) -> std::process::Output {
    crate::common::run(&["status", "--json", run.to_str().unwrap()])
}

fn rewrite_manifest(dir: &Path, f: impl FnOnce(&mut Manifest)) {
    let p = dir.join(MANIFEST_FILE);
    let mut m = Manifest::parse(&fs::read(&p).unwrap()).unwrap();
    f(&mut m);
    fs::write(&p, m.to_json()).unwrap();
}

/// Replace a file's content and fix its manifest entry, so only deeper checks can catch it.
fn replace_consistently(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).unwrap();
    rewrite_manifest(dir, |m| {
        let e = m.files.iter_mut().find(|e| e.name == name).unwrap();
        e.size = bytes.len() as u64;
        e.checksum = hex_of(bytes);
    });
}

struct Case {
    name: &'static str,
    /// Damage the run (whose newest checkpoint is 3).
    damage: fn(&Path),
    /// Substring the fault report must contain (file and reason).
    expect: &'static [&'static str],
    /// Which checkpoint a resume must use afterwards.
    resume: u64,
    /// Whether `verify RUN_DIR` must fail (false for pointer-only damage).
    verify_fails: bool,
}

fn flip(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    let i = (at as usize).min(b.len() - 1);
    b[i] ^= 0x40;
    fs::write(path, b).unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "truncated file",
            damage: |r| {
                let p = ck(r, 3).join("model.safetensors");
                let len = fs::metadata(&p).unwrap().len();
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len - 1)
                    .unwrap();
            },
            expect: &["step-000000000003/model.safetensors", "size is"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "one flipped byte in tensor data",
            damage: |r| flip(&ck(r, 3).join("model.safetensors"), 2000),
            expect: &["model.safetensors", "checksum mismatch"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "one flipped byte in the JSON state",
            damage: |r| flip(&ck(r, 3).join("trainer_state.json"), 3),
            expect: &["trainer_state.json", "checksum mismatch"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "one flipped byte in the manifest",
            damage: |r| {
                let p = ck(r, 3).join(MANIFEST_FILE);
                let s = fs::read_to_string(&p).unwrap();
                let at = s.find("\"checksum\": \"").unwrap() + 14;
                flip(&p, at as u64);
            },
            expect: &["step-000000000003/"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "deleted file",
            damage: |r| fs::remove_file(ck(r, 3).join("optimizer.safetensors")).unwrap(),
            expect: &["optimizer.safetensors", "missing"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "missing manifest",
            damage: |r| fs::remove_file(ck(r, 3).join(MANIFEST_FILE)).unwrap(),
            expect: &["step-000000000003/MANIFEST.json", "missing"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "garbage manifest",
            damage: |r| fs::write(ck(r, 3).join(MANIFEST_FILE), b"\x00\xffnot json{{").unwrap(),
            expect: &["MANIFEST.json", "not a valid manifest"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "manifest entry ../x",
            damage: |r| rewrite_manifest(&ck(r, 3), |m| m.files[0].name = "../x".into()),
            expect: &["MANIFEST.json", "\"../x\""],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "manifest entry with an absolute path",
            damage: |r| rewrite_manifest(&ck(r, 3), |m| m.files[0].name = "/etc/passwd".into()),
            expect: &["MANIFEST.json", "/etc/passwd"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "file replaced by a symlink to identical bytes",
            damage: |r| {
                let p = ck(r, 3).join("model.safetensors");
                let copy = r.join("outside.bin");
                fs::copy(&p, &copy).unwrap();
                fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(&copy, &p).unwrap();
            },
            expect: &["model.safetensors", "symbolic link"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "safetensors header claims more bytes than the file holds",
            damage: |r| {
                let mut b = 4096u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}      ");
                replace_consistently(&ck(r, 3), "model.safetensors", &b);
            },
            expect: &["model.safetensors", "holds only"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "safetensors header length 2^60",
            damage: |r| {
                let mut b = (1u64 << 60).to_le_bytes().to_vec();
                b.extend_from_slice(&[b' '; 64]);
                replace_consistently(&ck(r, 3), "model.safetensors", &b);
            },
            expect: &["model.safetensors", "more than the"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "safetensors offsets that do not tile the data",
            damage: |r| {
                let j = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
                let mut b = (j.len() as u64).to_le_bytes().to_vec();
                b.extend_from_slice(j);
                b.extend_from_slice(&[0u8; 8]);
                replace_consistently(&ck(r, 3), "model.safetensors", &b);
            },
            expect: &["model.safetensors", "tile"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "extra file with a non-UTF-8 name",
            damage: |r| {
                use std::os::unix::ffi::OsStrExt;
                let n = std::ffi::OsStr::from_bytes(b"evil\xff.py");
                fs::write(ck(r, 3).join(n), b"import os").unwrap();
            },
            expect: &["step-000000000003/evil", "not listed in the manifest"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "manifest step differs from the directory name",
            damage: |r| rewrite_manifest(&ck(r, 3), |m| m.step = 99),
            expect: &["MANIFEST.json", "says step 99"],
            resume: 2,
            verify_fails: true,
        },
        Case {
            name: "pointer names a missing dir",
            damage: |r| fs::write(r.join("last_checkpoint"), "step-000000000099\n").unwrap(),
            expect: &["last_checkpoint", "does not exist"],
            resume: 3,
            verify_fails: false,
        },
        Case {
            name: "garbage pointer",
            damage: |r| fs::write(r.join("last_checkpoint"), b"\xde\xad../../etc\n").unwrap(),
            expect: &["last_checkpoint"],
            resume: 3,
            verify_fails: false,
        },
        Case {
            name: "pointer names a corrupt checkpoint, newest also corrupt",
            damage: |r| {
                flip(&ck(r, 3).join("model.safetensors"), 100);
                flip(&ck(r, 2).join("optimizer.safetensors"), 100);
            },
            expect: &[
                "step-000000000003/model.safetensors",
                "step-000000000002/optimizer.safetensors",
            ],
            resume: 1,
            verify_fails: true,
        },
    ]
}

/// Checksums of every file of every checkpoint that verifies.
fn verified_contents(run: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for l in RunDir::new(run).list() {
        if hpc_ckpt::storage::verify::verify_checkpoint(&l.path).is_ok() {
            for e in fs::read_dir(&l.path).unwrap().flatten() {
                out.push((
                    format!("{}/{}", l.name, e.file_name().to_string_lossy()),
                    fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_bad_input_is_reported_and_answered_by_a_fallback() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = base_run(tmp.path());
    for (i, case) in cases().into_iter().enumerate() {
        let root = tmp.path().join(format!("case{i}"));
        copy_tree(&pristine, &root);
        let run = root.as_path();
        (case.damage)(run);
        let before = verified_contents(run);

        // verify: exit code and a line naming the file and reason.
        let o = crate::common::run(&["verify", run.to_str().unwrap()]);
        let out = text(&o);
        assert_eq!(
            o.status.code(),
            Some(if case.verify_fails { 3 } else { 0 }),
            "[{}] verify exit code; output:\n{out}",
            case.name
        );

        // status: the resume point is the expected fallback, and the report names the fault.
        let st = status_json(run);
        assert_eq!(
            st["resume_from"].as_str(),
            Some(ckpt(case.resume).as_str()),
            "[{}] status resume_from: {st:#}",
            case.name
        );
        let st_text = st.to_string();
        for e in case.expect {
            assert!(
                out.contains(e) || st_text.contains(e),
                "[{}] expected {e:?} in the fault report:\nverify: {out}\nstatus: {st:#}",
                case.name
            );
        }

        // A writer loads with fallback: the loaded step is the expected one and the journal
        // records the refusal.
        {
            let mut store = Store::open(run, &holder(None), RetentionPolicy::default()).unwrap();
            let loaded = store.load_latest().unwrap().expect("a checkpoint loads");
            assert_eq!(
                loaded.manifest.step, case.resume,
                "[{}] loaded step",
                case.name
            );
            if case.resume != 3 {
                let j = fs::read_to_string(run.join("journal.jsonl")).unwrap();
                assert!(
                    j.contains("checkpoint_refused") && j.contains("\"fallback\""),
                    "[{}] journal: {j}",
                    case.name
                );
            }
        }
        // Then a new commit goes through, and nothing that verified was deleted or changed.
        let src = root.join("src");
        make_src(&src, &[("state.json", 100)], 1);
        let o = crate::common::run(&[
            "commit",
            "--run-dir",
            run.to_str().unwrap(),
            "--step",
            "4",
            src.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "[{}] commit after damage: {}",
            case.name,
            text(&o)
        );
        let after = verified_contents(run);
        for item in &before {
            assert!(
                after.contains(item),
                "[{}] {} changed or vanished",
                case.name,
                item.0
            );
        }
        eprintln!("ok: {}", case.name);
    }
}

#[test]
fn commit_refuses_bad_sources_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let good = tmp.path().join("good");
    make_src(&good, &[("a.bin", 10)], 1);
    commit_ok(&run, 1, &good, &[]);
    let snapshot = || {
        let mut v: Vec<_> = walk(&run);
        v.retain(|(p, _)| !p.ends_with("journal.jsonl") && !p.ends_with("run.lock"));
        v
    };
    let before = snapshot();

    type Setup = fn(&Path);
    let bad: Vec<(&str, Setup, &str)> = vec![
        (
            "symlink",
            |d| std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap(),
            "symbolic link",
        ),
        (
            "subdir",
            |d| fs::create_dir(d.join("sub")).unwrap(),
            "a directory",
        ),
        (
            "manifest",
            |d| fs::write(d.join("MANIFEST.json"), "{}").unwrap(),
            "MANIFEST.json",
        ),
        (
            "hidden",
            |d| fs::write(d.join(".x"), "").unwrap(),
            "starts with '.'",
        ),
        (
            "non-utf8",
            |d| {
                use std::os::unix::ffi::OsStrExt;
                fs::write(d.join(std::ffi::OsStr::from_bytes(b"a\xff")), "").unwrap()
            },
            "not UTF-8",
        ),
        (
            "space",
            |d| fs::write(d.join("a b"), "").unwrap(),
            "allowed are",
        ),
        ("empty", |_| {}, "holds no files"),
    ];
    for (name, setup, expect) in bad {
        let src = tmp.path().join(format!("bad-{name}"));
        fs::create_dir_all(&src).unwrap();
        if name != "empty" {
            fs::write(src.join("ok.bin"), "x").unwrap();
        }
        setup(&src);
        let o = crate::common::run(&[
            "commit",
            "--run-dir",
            run.to_str().unwrap(),
            "--step",
            "2",
            src.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(6), "[{name}] {}", text(&o));
        assert!(
            text(&o).contains(expect),
            "[{name}] expected {expect:?}: {}",
            text(&o)
        );
        assert_eq!(snapshot(), before, "[{name}] run dir changed");
    }
    // Bad flags are usage errors.
    let o = crate::common::run(&[
        "commit",
        "--run-dir",
        run.to_str().unwrap(),
        "--step",
        "2",
        "--metric",
        "loss=nan",
        good.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not finite"));
}

fn walk(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push((p.display().to_string(), fs::read(&p).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

/// The write fails mid-file (a file-size limit makes write() return EFBIG, as a full disk returns
/// ENOSPC): clear error, exit 5, temp dir removed, previous checkpoint still the pointer's target.
#[test]
fn disk_full_mid_write_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let small = tmp.path().join("small");
    let big = tmp.path().join("big");
    make_src(&small, &[("a.bin", 1000)], 1);
    make_src(&big, &[("a.bin", 8 << 20), ("b.bin", 8 << 20)], 2);
    commit_ok(&run, 1, &small, &[]);
    let before = verified_contents(&run);
    let mut c = cmd(&[
        "commit",
        "--run-dir",
        run.to_str().unwrap(),
        "--step",
        "2",
        big.to_str().unwrap(),
    ]);
    unsafe {
        c.pre_exec(|| {
            use nix::sys::resource::{setrlimit, Resource};
            use nix::sys::signal::{signal, SigHandler, Signal};
            signal(Signal::SIGXFSZ, SigHandler::SigIgn).map_err(std::io::Error::from)?;
            setrlimit(Resource::RLIMIT_FSIZE, 4 << 20, 4 << 20).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("a.bin"),
        "error names the file: {}",
        text(&o)
    );
    assert!(
        RunDir::new(&run).temp_entries().is_empty(),
        "temp dir left behind"
    );
    assert_eq!(
        fs::read_to_string(run.join("last_checkpoint"))
            .unwrap()
            .trim(),
        ckpt(1)
    );
    assert_eq!(verified_contents(&run), before);
    let j = fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(j.contains("save_failed"), "{j}");
}

/// A real full filesystem (a small tmpfs, when this sandbox lets root mount one): the space
/// check refuses a save that cannot fit (after retention) with need and free in the message, and
/// an ENOSPC in the middle of a write leaves the last checkpoint intact.
#[test]
fn real_enospc_on_a_small_tmpfs() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root in a sandbox that allows tmpfs mounts; this test must run there"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(mnt.clone());
    let run = mnt.join("run");
    let s1 = tmp.path().join("s1");
    make_src(&s1, &[("a.bin", 2 << 20)], 1);
    commit_ok(&run, 1, &s1, &["--keep-last", "1"]);
    // Too big to ever fit: refused up front, with numbers.
    let huge = tmp.path().join("huge");
    make_src(&huge, &[("a.bin", 8 << 20)], 2);
    let o = crate::common::run(&[
        "commit",
        "--run-dir",
        run.to_str().unwrap(),
        "--step",
        "2",
        "--keep-last",
        "1",
        huge.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("needs") && text(&o).contains("free"),
        "{}",
        text(&o)
    );
    // The space check passes, then the filesystem runs out in the middle of the commit: tmpfs
    // inodes are capped so that the temp dir and the first two files can be created and the
    // manifest cannot (a deterministic ENOSPC after real data was written).
    let s3 = tmp.path().join("s3");
    make_src(&s3, &[("a.bin", 1 << 20), ("b.bin", 1 << 20)], 3);
    let before = verified_contents(&run);
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    let used = st.files() - st.files_free();
    let ok = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size=6m,nr_inodes={}", used + 3)])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount with an inode cap");
    let o = crate::common::run(&[
        "commit",
        "--run-dir",
        run.to_str().unwrap(),
        "--step",
        "3",
        "--keep-last",
        "1",
        s3.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("No space left on device"), "{}", text(&o));
    assert_eq!(
        fs::read_to_string(run.join("last_checkpoint"))
            .unwrap()
            .trim(),
        ckpt(1)
    );
    assert_eq!(
        verified_contents(&run),
        before,
        "a committed checkpoint changed"
    );
    assert!(RunDir::new(&run).temp_entries().is_empty());
}

#[test]
fn a_second_writer_fails_at_once_naming_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let src = tmp.path().join("src");
    make_src(&src, &[("a.bin", 10)], 1);
    let mut me = holder(Some("4242".into()));
    me.host = "node-a".into();
    let _store = Store::open(&run, &me, RetentionPolicy::default()).unwrap();
    let t = std::time::Instant::now();
    let o = crate::common::run(&[
        "commit",
        "--run-dir",
        run.to_str().unwrap(),
        "--step",
        "1",
        src.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(
        msg.contains("node-a") && msg.contains("Slurm job 4242"),
        "{msg}"
    );
    assert!(t.elapsed().as_secs() < 5, "must fail at once, not wait");
    assert!(RunDir::new(&run).list().is_empty());
    let st = status_json(&run);
    assert_eq!(st["writer"]["job_id"], "4242");
}

#[test]
fn racing_writers_never_corrupt_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let src = tmp.path().join("src");
    make_src(&src, &[("a.bin", 2 << 20)], 1);
    let mut won = 0;
    let mut locked = 0;
    for round in 0..15u64 {
        let spawn = |step: u64| {
            cmd(&[
                "commit",
                "--run-dir",
                run.to_str().unwrap(),
                "--step",
                &step.to_string(),
                src.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        };
        let (a, b) = (spawn(round * 2 + 1), spawn(round * 2 + 2));
        for c in [a, b] {
            let o = c.wait_with_output().unwrap();
            match o.status.code() {
                Some(0) => won += 1,
                Some(4) => locked += 1,
                other => panic!("unexpected exit {other:?}: {}", text(&o)),
            }
        }
        let o = crate::common::run(&["verify", run.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
    }
    eprintln!("racing writers: {won} committed, {locked} refused by the lock");
    assert!(won >= 15);
}
