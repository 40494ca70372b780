//! The child protocol of `wrap -- CMD` (README, "Child protocol"): where a program stages a
//! checkpoint, how it asks for a commit, and how it is answered.
//!
//! Each allocation gets its own staging dir and request file (`staging/<token>/`,
//! `staging/<token>.request`), so files or requests an earlier program left — an orphan of a
//! killed supervisor included — can never be committed by a later allocation.
//!
//! Guarantees:
//! - every request is answered (`<request>.result`, then the request is removed: the
//!   acknowledgement), commit or not;
//! - committed steps only grow: a request for a step older than the resume point or than a step
//!   this allocation committed is refused, unless `checkpoint.allow_step_backwards` is set;
//! - staged files are adopted, not copied: each is hard-linked into the checkpoint, read once for
//!   its checksum and fsynced ([`crate::storage::FileSource::Adopt`]); the staging name goes only
//!   once the commit is durable, so a failed or interrupted commit leaves the files staged;
//! - staged files are never thrown away: what cannot be committed (a failed or refused commit,
//!   files staged with no request, files an earlier allocation left) is moved aside into
//!   `kept/<time>-<token>/`, named in an ERROR log line and journaled (`staged_kept`), and
//!   `status` prints the `hpc-ckpt commit` command that would import it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;

use super::events::SupervisorEvent;
use crate::storage::fsutil::{fsync_dir, read_bounded, replace_file_durable};
use crate::storage::journal::now_rfc3339;
use crate::storage::manifest::JobInfo;
use crate::storage::{CommitMeta, Snapshot, Store};

/// Where programs stage checkpoints, one dir per allocation.
pub const STAGING_DIR: &str = "staging";
/// Where staged files that could not be committed are kept.
pub const KEPT_DIR: &str = "kept";
/// Training metrics of committed requests, one JSON object a line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The largest request file read.
const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// What a program writes to ask for a commit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub step: u64,
    #[serde(default)]
    pub epoch: Option<u64>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The program says this is its final checkpoint: training is complete.
    #[serde(default)]
    pub done: bool,
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Committed {
        name: String,
        done: bool,
    },
    /// Not committed, by rule (an older step); the files were kept aside.
    Refused {
        reason: String,
    },
    /// The commit failed (bad request, bad files, disk full); the files were kept aside.
    Failed {
        error: String,
    },
}

/// One allocation's side of the protocol.
#[derive(Debug)]
pub struct ChildProtocol {
    run_dir: PathBuf,
    token: String,
    staging: PathBuf,
    request: PathBuf,
    /// Requests for steps below this are refused.
    floor: Option<u64>,
    allow_backwards: bool,
    job: Option<JobInfo>,
}

impl ChildProtocol {
    /// Set up this allocation's staging dir. Whatever earlier allocations left in `staging/` is
    /// kept aside first (never committed, never deleted). `resume_step` is the step the program
    /// resumes from (the floor of what it may commit).
    pub fn prepare(
        store: &mut Store,
        token: &str,
        resume_step: Option<u64>,
        allow_backwards: bool,
        job: Option<JobInfo>,
    ) -> Result<ChildProtocol> {
        let run_dir = store.run_dir().root().to_path_buf();
        let root = run_dir.join(STAGING_DIR);
        keep_leftovers(store, &root)?;
        let staging = root.join(token);
        fs::create_dir_all(&staging).with_context(|| format!("create {}", staging.display()))?;
        Ok(ChildProtocol {
            request: root.join(format!("{token}.request")),
            run_dir,
            token: token.to_string(),
            staging,
            floor: resume_step,
            allow_backwards,
            job,
        })
    }

    pub fn staging(&self) -> &Path {
        &self.staging
    }

    pub fn request_path(&self) -> &Path {
        &self.request
    }

    /// The protocol's environment for the program (`HPC_CKPT_RESUME_FROM` is the caller's).
    pub fn env(&self, signal: &str) -> Vec<(&'static str, OsString)> {
        vec![
            ("HPC_CKPT_RUN_DIR", self.run_dir.clone().into()),
            ("HPC_CKPT_STAGING", self.staging.clone().into()),
            ("HPC_CKPT_COMMIT_REQUEST", self.request.clone().into()),
            ("HPC_CKPT_SIGNAL", signal.into()),
        ]
    }

    /// Whether a request waits for an answer.
    pub fn has_request(&self) -> bool {
        self.request.exists()
    }

    /// Answer the waiting request: commit the staged files, or refuse, or fail — and in every
    /// case write the result, empty the staging dir (committed, or kept aside) and remove the
    /// request. `Err` only when the answer itself cannot be written.
    pub fn answer(&mut self, store: &mut Store) -> Result<Answer> {
        let answer = match self.read_request() {
            Err(error) => {
                self.keep(
                    store,
                    None,
                    &format!("the commit request was invalid: {error}"),
                )?;
                Answer::Failed { error }
            }
            Ok(req) => self.commit_or_refuse(store, &req)?,
        };
        let result = match &answer {
            Answer::Committed { name, .. } => json!({"ok": true, "checkpoint": name}),
            Answer::Refused { reason } => json!({"ok": false, "error": reason}),
            Answer::Failed { error } => json!({"ok": false, "error": error}),
        };
        replace_file_durable(&result_path(&self.request), result.to_string().as_bytes())?;
        fs::remove_file(&self.request)
            .with_context(|| format!("remove {}", self.request.display()))?;
        Ok(answer)
    }

    fn read_request(&self) -> std::result::Result<Request, String> {
        let bytes = read_bounded(&self.request, MAX_REQUEST_BYTES)
            .map_err(|r| format!("{}: {r}", self.request.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{}: not a valid commit request ({e}); expected {{\"step\": N, \"epoch\"?: E, \
                 \"metrics\"?: {{..}}, \"done\"?: bool}}",
                self.request.display()
            )
        })
    }

    fn commit_or_refuse(&mut self, store: &mut Store, req: &Request) -> Result<Answer> {
        if let Some(reason) = self.refusal(req.step) {
            tracing::error!(step = req.step, %reason, "commit request refused");
            store.journal().append(&SupervisorEvent::RequestRefused {
                step: Some(req.step),
                reason: reason.clone(),
            })?;
            let kept = self.keep(store, Some(req.step), &reason)?;
            return Ok(Answer::Refused {
                reason: with_kept(&reason, kept.as_deref()),
            });
        }
        match self.commit(store, req) {
            Ok(name) => {
                self.floor = Some(self.floor.map_or(req.step, |f| f.max(req.step)));
                Ok(Answer::Committed {
                    name,
                    done: req.done,
                })
            }
            Err(e) => {
                let error = format!("{e:#}");
                let kept = self.keep(
                    store,
                    Some(req.step),
                    &format!("the commit failed: {error}"),
                )?;
                Ok(Answer::Failed {
                    error: with_kept(&error, kept.as_deref()),
                })
            }
        }
    }

    /// Why a request for `step` must be refused, if it must.
    fn refusal(&self, step: u64) -> Option<String> {
        let floor = self.floor?;
        if step >= floor || self.allow_backwards {
            return None;
        }
        Some(format!(
            "step {step} is older than step {floor}, the newest checkpoint of this run (the one \
             the program resumed from, or committed since): committed steps only grow. The usual \
             cause is a program that started from scratch instead of resuming from \
             HPC_CKPT_RESUME_FROM; if going back is intended, set checkpoint.allow_step_backwards: \
             true in the job config"
        ))
    }

    fn commit(&mut self, store: &mut Store, req: &Request) -> Result<String> {
        // Staged in the run dir: adopted (linked in and read once), not copied a second time.
        let snapshot = Snapshot::adopt_dir(&self.staging)?;
        let meta = CommitMeta {
            step: req.step,
            epoch: req.epoch,
            metrics: req.metrics.clone(),
            job: self.job.clone(),
            ..Default::default()
        };
        let report = store.commit(&snapshot, &meta)?;
        let line = json!({"ts": now_rfc3339(), "step": req.step, "epoch": req.epoch, "metrics": req.metrics});
        let path = self.run_dir.join(METRICS_FILE);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("append to {}", path.display()))?;
        for e in fs::read_dir(&self.staging)?.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        Ok(report.name)
    }

    /// Move whatever is staged aside (see [`keep_aside`]); a no-op when nothing is staged.
    /// Returns the kept dir, relative to the run dir.
    fn keep(&self, store: &mut Store, step: Option<u64>, reason: &str) -> Result<Option<String>> {
        let kept = keep_aside(store, &self.staging, &self.token, step, reason)?;
        if kept.is_some() {
            fs::create_dir_all(&self.staging)
                .with_context(|| format!("create {}", self.staging.display()))?;
        }
        Ok(kept)
    }

    /// The allocation is over: keep aside files staged with no request, remove this
    /// allocation's staging dir and answer files.
    pub fn finish(self, store: &mut Store) -> Result<Option<String>> {
        let kept = keep_aside(
            store,
            &self.staging,
            &self.token,
            None,
            &format!(
                "the program staged files but wrote no commit request ({}): nothing was committed",
                self.request.display()
            ),
        )?;
        let _ = fs::remove_dir(&self.staging);
        for p in [result_path(&self.request), tmp_path(&self.request)] {
            let _ = fs::remove_file(p);
        }
        Ok(kept)
    }
}

/// Keep aside whatever earlier allocations left under `staging/` (their staged files; an
/// unanswered request only lends its step to the record); then `staging/` holds nothing of
/// theirs.
fn keep_leftovers(store: &mut Store, root: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(());
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for dir in paths.iter().filter(|p| p.is_dir()) {
        let token = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let request = root.join(format!("{token}.request"));
        let step = read_bounded(&request, MAX_REQUEST_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<Request>(&b).ok())
            .map(|r| r.step);
        let reason = match step {
            Some(s) => format!(
                "staged by an earlier allocation ({token}) that asked for step {s} but ended \
                 before its commit"
            ),
            None => format!(
                "staged by an earlier allocation ({token}) and never committed (no commit \
                 request, or its supervisor ended first)"
            ),
        };
        keep_aside(store, dir, &token, step, &reason)?;
        let _ = fs::remove_dir(dir);
    }
    // Requests, answers and temp files of earlier allocations: their files are kept above.
    for p in paths.iter().filter(|p| !p.is_dir()) {
        let _ = fs::remove_file(p);
    }
    Ok(())
}

/// Move the files of `dir` (if any) into a new `kept/<time>-<token>/` of the run dir, by one
/// rename (no copy); log an ERROR naming them and journal `staged_kept`. Returns the kept dir
/// relative to the run dir, or None when `dir` held nothing.
pub fn keep_aside(
    store: &mut Store,
    dir: &Path,
    token: &str,
    step: Option<u64>,
    reason: &str,
) -> Result<Option<String>> {
    let mut files: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    files.sort();
    let run_dir = store.run_dir().root().to_path_buf();
    let kept_root = run_dir.join(KEPT_DIR);
    fs::create_dir_all(&kept_root).with_context(|| format!("create {}", kept_root.display()))?;
    let stamp = now_rfc3339().replace([':', '.'], "");
    let mut rel = format!("{KEPT_DIR}/{stamp}-{token}");
    let mut n = 1;
    while run_dir.join(&rel).exists() {
        n += 1;
        rel = format!("{KEPT_DIR}/{stamp}-{token}-{n}");
    }
    let dest = run_dir.join(&rel);
    fs::rename(dir, &dest)
        .with_context(|| format!("move {} to {}", dir.display(), dest.display()))?;
    fsync_dir(&kept_root)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    tracing::error!(
        kept = %dest.display(),
        files = ?files,
        %reason,
        "staged files were NOT committed; they are kept (import them with `hpc-ckpt commit`, see \
         `hpc-ckpt status`)"
    );
    store.journal().append(&SupervisorEvent::StagedKept {
        dir: rel.clone(),
        files,
        step,
        reason: reason.to_string(),
    })?;
    Ok(Some(rel))
}

fn with_kept(msg: &str, kept: Option<&str>) -> String {
    match kept {
        Some(k) => format!("{msg} (the staged files were kept in {k})"),
        None => msg.to_string(),
    }
}

/// `<request>.result`: the answer.
pub fn result_path(request: &Path) -> PathBuf {
    let mut s = request.as_os_str().to_owned();
    s.push(".result");
    PathBuf::from(s)
}

/// `<request>.tmp`: where the program writes before its rename.
fn tmp_path(request: &Path) -> PathBuf {
    let mut s = request.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::run_dir::holder;
    use crate::storage::RetentionPolicy;

    fn store(dir: &Path) -> Store {
        Store::open(dir, &holder(None), RetentionPolicy::default()).unwrap()
    }

    fn stage_and_request(p: &ChildProtocol, step: u64) {
        fs::write(p.staging().join("w.bin"), step.to_le_bytes()).unwrap();
        fs::write(p.request_path(), format!("{{\"step\": {step}}}")).unwrap();
    }

    fn kept_events(dir: &Path) -> Vec<serde_json::Value> {
        crate::storage::journal::read_all(dir)
            .0
            .into_iter()
            .filter(|e| e["event"] == "staged_kept")
            .collect()
    }

    #[test]
    fn a_request_older_than_the_resume_point_is_refused_and_its_files_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut p = ChildProtocol::prepare(&mut s, "a1", Some(200), false, None).unwrap();
        stage_and_request(&p, 50);
        let a = p.answer(&mut s).unwrap();
        let Answer::Refused { reason } = a else {
            panic!("{a:?}")
        };
        assert!(reason.contains("older than step 200") && reason.contains("kept in kept/"));
        assert!(!p.has_request(), "answered");
        let result = fs::read_to_string(result_path(p.request_path())).unwrap();
        assert!(result.contains("\"ok\":false"), "{result}");
        assert!(s.run_dir().list().is_empty(), "nothing committed");
        assert_eq!(kept_events(d.path())[0]["step"], 50);
        // The same step as the floor, and newer ones, commit; then the floor follows.
        stage_and_request(&p, 200);
        assert!(matches!(
            p.answer(&mut s).unwrap(),
            Answer::Committed { .. }
        ));
        stage_and_request(&p, 300);
        assert!(matches!(
            p.answer(&mut s).unwrap(),
            Answer::Committed { .. }
        ));
        stage_and_request(&p, 250);
        assert!(matches!(p.answer(&mut s).unwrap(), Answer::Refused { .. }));
    }

    #[test]
    fn going_back_is_allowed_only_when_configured() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut p = ChildProtocol::prepare(&mut s, "a1", Some(200), true, None).unwrap();
        stage_and_request(&p, 50);
        assert!(matches!(
            p.answer(&mut s).unwrap(),
            Answer::Committed { .. }
        ));
    }

    #[test]
    fn files_staged_without_a_request_are_kept_not_deleted() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let p = ChildProtocol::prepare(&mut s, "a1", None, false, None).unwrap();
        fs::write(p.staging().join("model.safetensors"), b"weights").unwrap();
        let kept = p.finish(&mut s).unwrap().expect("kept");
        assert_eq!(
            fs::read(d.path().join(&kept).join("model.safetensors")).unwrap(),
            b"weights"
        );
        let ev = kept_events(d.path());
        assert_eq!(ev[0]["files"], json!(["model.safetensors"]));
        assert!(ev[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no commit request"));
    }

    #[test]
    fn a_later_allocation_keeps_what_an_earlier_one_left_and_never_commits_it() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let p = ChildProtocol::prepare(&mut s, "a1", None, false, None).unwrap();
        stage_and_request(&p, 7);
        drop(p); // the supervisor died before answering
        let p2 = ChildProtocol::prepare(&mut s, "a2", None, false, None).unwrap();
        assert!(!p2.has_request());
        assert!(s.run_dir().list().is_empty(), "never committed");
        let ev = kept_events(d.path());
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            ev[0]["step"], 7,
            "the unanswered request's step is recorded"
        );
        let dir = d.path().join(ev[0]["dir"].as_str().unwrap());
        assert!(dir.join("w.bin").exists());
        assert_eq!(
            fs::read_dir(d.path().join(STAGING_DIR)).unwrap().count(),
            1,
            "only a2's dir is left"
        );
    }

    #[test]
    fn a_failed_commit_keeps_the_files_and_says_where() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut p = ChildProtocol::prepare(&mut s, "a1", None, false, None).unwrap();
        fs::write(p.staging().join("MANIFEST.json"), b"{}").unwrap();
        fs::write(p.request_path(), "{\"step\": 3}").unwrap();
        let Answer::Failed { error } = p.answer(&mut s).unwrap() else {
            panic!()
        };
        assert!(
            error.contains("MANIFEST.json") && error.contains("kept in"),
            "{error}"
        );
        assert_eq!(kept_events(d.path()).len(), 1);
        fs::write(p.request_path(), "{\"stp\": 3}").unwrap();
        assert!(matches!(p.answer(&mut s).unwrap(), Answer::Failed { .. }));
    }
}
