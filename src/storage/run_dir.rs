//! A run directory: its layout, read-only inspection ([`RunDir`]), and the single writer
//! ([`Store`]) that commits, loads with fallback, and applies retention.
//!
//! What the store owns of a run dir: `run.lock`, `journal.jsonl`, `last_checkpoint`,
//! `checkpoints/step-N/`, `checkpoints/.tmp-*` (in-progress writes, never read, removed when a
//! writer opens the run). The rest of the layout (config copy, metrics, the child protocol's
//! staging) belongs to the supervisor; README "Run directory" lists all of it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::error::{Fault, IoContext, Result, StorageError};
use super::fsutil::{fsync_dir, remove_dir_atomically, rename_dir_into_place, Renamed};
use super::journal::{now_rfc3339, FaultRecord, Journal, StoreEvent};
use super::lock::{Holder, RunLock};
use super::manifest::{checkpoint_name, parse_checkpoint_name, Manifest, FORMAT, FORMAT_VERSION};
use super::pointer::{self, Pointer};
use super::retention::{self, Candidate, RetentionPolicy};
use super::verify::{self, Loaded};
use super::writer::{self, CommitMeta, CommitReport, Snapshot};

pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Prefix of in-progress (or being-deleted) entries; never read, removed by the next writer.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Headroom kept free beyond a checkpoint's own size when checking disk space.
const SPACE_MARGIN: u64 = 1 << 20;

/// A committed checkpoint directory found in `checkpoints/` (not yet verified).
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub step: u64,
    pub path: PathBuf,
}

/// Which checkpoint a resume would use, and why.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// What the pointer says (or its fault).
    pub pointer: std::result::Result<Pointer, Fault>,
    /// The checkpoint chosen (verified), with its manifest.
    pub chosen: Option<(Listed, Manifest)>,
    /// Faults of every checkpoint tried and refused before `chosen` (the pointer's first).
    pub refused: Vec<(String, Vec<Fault>)>,
    /// Committed checkpoints newer than the pointer's target that verify (a crash between the
    /// rename and the pointer swap); a writer adopts them when it opens the run.
    pub newer_than_pointer: Vec<String>,
}

impl Resolution {
    /// Whether the chosen checkpoint is not what the pointer names.
    pub fn fell_back(&self) -> bool {
        !self.refused.is_empty()
    }
}

/// Read-only view of a run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR)
    }

    /// Committed checkpoint directories, oldest first. Entries that are neither checkpoints nor
    /// temp dirs are ignored here (status reports them).
    pub fn list(&self) -> Vec<Listed> {
        let mut out: Vec<Listed> = fs::read_dir(self.checkpoints_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = parse_checkpoint_name(&name)?;
                Some(Listed {
                    path: e.path(),
                    name,
                    step,
                })
            })
            .collect();
        out.sort_by_key(|l| l.step);
        out
    }

    /// In-progress or abandoned temp entries in `checkpoints/` and the run dir.
    pub fn temp_entries(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (dir, prefix) in [
            (self.checkpoints_dir(), TEMP_PREFIX.to_string()),
            (
                self.root.clone(),
                format!(".{}.tmp-", pointer::POINTER_FILE),
            ),
        ] {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    /// Decide which checkpoint a resume uses: the pointer's target if it verifies, else the
    /// newest checkpoint that verifies. Reads and verifies; writes nothing.
    pub fn resolve(&self) -> Resolution {
        let ptr = pointer::read(&self.root);
        let listed = self.list();
        let mut refused = Vec::new();
        let mut chosen = None;
        let mut newer = Vec::new();
        let target = match &ptr {
            Ok(Pointer::Names(n)) => Some(n.clone()),
            _ => None,
        };
        if let Err(f) = &ptr {
            refused.push((pointer::POINTER_FILE.to_string(), vec![f.clone()]));
        }
        if let Some(t) = &target {
            match listed.iter().find(|l| &l.name == t) {
                None => refused.push((
                    t.clone(),
                    vec![Fault::new(
                        pointer::POINTER_FILE,
                        format!("names {t}, which does not exist"),
                    )],
                )),
                Some(l) => match verify::verify_checkpoint(&l.path) {
                    Ok(m) => chosen = Some((l.clone(), m)),
                    Err(f) => refused.push((t.clone(), f)),
                },
            }
        }
        let target_step = target.as_deref().and_then(parse_checkpoint_name);
        for l in listed.iter().rev() {
            if Some(&l.name) == target.as_ref() {
                continue;
            }
            let newer_than_target = target_step.is_none_or(|s| l.step > s);
            if chosen.is_some() && !newer_than_target {
                break;
            }
            match verify::verify_checkpoint(&l.path) {
                Ok(_) if chosen.is_some() => newer.push(l.name.clone()),
                Ok(m) => chosen = Some((l.clone(), m)),
                Err(f) if chosen.is_none() => refused.push((l.name.clone(), f)),
                Err(_) => {}
            }
        }
        // Without a pointer, a verified checkpoint is adopted, not a fallback.
        if let (Ok(Pointer::Absent), Some((l, _))) = (&ptr, &chosen) {
            newer = vec![l.name.clone()];
        }
        Resolution {
            pointer: ptr,
            chosen,
            refused,
            newer_than_pointer: newer,
        }
    }
}

/// The one writer of a run directory: holds `run.lock` for its lifetime.
#[derive(Debug)]
pub struct Store {
    dir: RunDir,
    journal: Journal,
    policy: RetentionPolicy,
    _lock: RunLock,
}

/// The holder record for this process (pid, host, job id from the caller).
pub fn holder(job_id: Option<String>) -> Holder {
    Holder {
        pid: std::process::id(),
        host: hostname(),
        job_id,
        since: now_rfc3339(),
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

impl Store {
    /// Open `root` for writing: create the layout, take the lock (failing at once if another
    /// writer holds it), remove stale temp entries, and adopt a newer durable checkpoint the
    /// pointer does not name yet (a crash between rename and pointer swap).
    pub fn open(root: &Path, me: &Holder, policy: RetentionPolicy) -> Result<Store> {
        policy.validate().map_err(StorageError::Invalid)?;
        fs::create_dir_all(root.join(CHECKPOINTS_DIR))
            .ctx(|| format!("create run dir {}", root.display()))?;
        let lock = RunLock::acquire(root, me)?;
        tracing::debug!(phase = "open", run_dir = %root.display(), "lock taken");
        let mut journal = Journal::open(root)?;
        let dir = RunDir::new(root);
        let stale = dir.temp_entries();
        for p in &stale {
            let r = if p.is_dir() {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            };
            r.ctx(|| format!("remove stale temp entry {}", p.display()))?;
        }
        if !stale.is_empty() {
            fsync_dir(&dir.checkpoints_dir())?;
            let names: Vec<String> = stale
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            tracing::info!(removed = ?names, "removed temp entries left by an interrupted writer");
            journal.append(&StoreEvent::TempRemoved { entries: names })?;
        }
        let mut store = Store {
            dir,
            journal,
            policy,
            _lock: lock,
        };
        store.adopt_unpointed()?;
        Ok(store)
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.dir
    }

    pub fn journal(&mut self) -> &mut Journal {
        &mut self.journal
    }

    pub fn policy(&self) -> &RetentionPolicy {
        &self.policy
    }

    /// Checkpoint dirs newer than the pointer's target (or any, without a valid pointer) are
    /// complete by construction (renamed only after fsync); adopt the newest that verifies. The
    /// pointer's own target is not re-verified here: loading does that.
    fn adopt_unpointed(&mut self) -> Result<()> {
        let pointed = match pointer::read(self.dir.root()) {
            Ok(Pointer::Names(n)) => parse_checkpoint_name(&n),
            _ => None,
        };
        let newer = self
            .dir
            .list()
            .into_iter()
            .rev()
            .filter(|l| pointed.is_none_or(|p| l.step > p))
            .find(|l| verify::verify_checkpoint(&l.path).is_ok());
        if let Some(l) = newer {
            pointer::write(self.dir.root(), &l.name)?;
            tracing::warn!(
                checkpoint = %l.name,
                "last_checkpoint did not name the newest durable checkpoint (interrupted between \
                 rename and pointer swap, or pointer lost); pointer moved to it"
            );
            self.journal.append(&StoreEvent::PointerAdopted {
                checkpoint: l.name.clone(),
                reason: "a committed checkpoint newer than last_checkpoint verifies".into(),
            })?;
        }
        Ok(())
    }

    /// Choose the checkpoint a resume should use: the pointer's target if it verifies, else the
    /// newest that verifies (loudly: log and journal name the refused files and reasons).
    /// `Ok(None)` means a fresh run (nothing was ever committed).
    pub fn resume_point(&mut self) -> Result<Option<(Listed, Manifest)>> {
        let res = self.dir.resolve();
        for (name, faults) in &res.refused {
            for f in faults {
                tracing::error!(checkpoint = %name, file = %f.file, reason = %f.reason, "checkpoint refused");
            }
            self.journal.append(&StoreEvent::CheckpointRefused {
                checkpoint: name.clone(),
                faults: faults.iter().map(FaultRecord::from).collect(),
            })?;
        }
        let Some((listed, manifest)) = res.chosen.clone() else {
            if res.refused.is_empty() {
                return Ok(None);
            }
            let detail = res
                .refused
                .iter()
                .map(|(n, f)| {
                    format!(
                        "{n}: {}",
                        f.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            self.journal.append(&StoreEvent::LoadFailed {
                detail: detail.clone(),
            })?;
            return Err(StorageError::NothingValid {
                run_dir: self.dir.root().to_path_buf(),
                detail,
            });
        };
        if res.fell_back() {
            tracing::warn!(checkpoint = %listed.name, "FELL BACK to an older checkpoint: the newest could not be used (see errors above)");
            self.journal.append(&StoreEvent::Fallback {
                checkpoint: listed.name.clone(),
                step: listed.step,
            })?;
        }
        Ok(Some((listed, manifest)))
    }

    /// [`Store::resume_point`], then read it into memory, verifying while reading so that what
    /// is returned is exactly what was verified.
    pub fn load_latest(&mut self) -> Result<Option<Loaded>> {
        let Some((listed, _)) = self.resume_point()? else {
            return Ok(None);
        };
        let loaded =
            verify::load_checkpoint(&listed.path).map_err(|faults| StorageError::Corrupt {
                dir: listed.path.clone(),
                faults,
            })?;
        self.journal.append(&StoreEvent::CheckpointLoaded {
            checkpoint: listed.name.clone(),
            step: listed.step,
        })?;
        Ok(Some(loaded))
    }

    /// Commit `snapshot` as the checkpoint of `meta.step` with the full protocol, then apply
    /// retention. On failure the temp dir is removed, the error is journaled, and every
    /// committed checkpoint is left as it was.
    pub fn commit(&mut self, snapshot: &Snapshot<'_>, meta: &CommitMeta) -> Result<CommitReport> {
        let started = Instant::now();
        let result = self.commit_inner(snapshot, meta, started);
        if let Err(e) = &result {
            tracing::error!(step = meta.step, error = %e, "checkpoint save failed; committed checkpoints are intact");
            let _ = self.journal.append(&StoreEvent::SaveFailed {
                step: meta.step,
                error: e.to_string(),
            });
        }
        result
    }

    /// The commit protocol as named steps: check, stage into a temp dir, publish (rename, fsync
    /// the parent, swap the pointer), record (journal and log), then retention.
    fn commit_inner(
        &mut self,
        snapshot: &Snapshot<'_>,
        meta: &CommitMeta,
        started: Instant,
    ) -> Result<CommitReport> {
        self.check_commit(snapshot, meta)?;
        let name = checkpoint_name(meta.step);
        let (tmp, manifest) = self.stage_in_temp(&name, snapshot, meta)?;
        let replaced = self.publish(&tmp, &name)?;
        let done = Committed {
            name,
            bytes: manifest.total_bytes(),
            seconds: started.elapsed().as_secs_f64(),
            replaced,
        };
        self.record(&done, meta)?;
        tracing::debug!(phase = "retention", "applying retention");
        let deleted = self.apply_retention()?;
        Ok(CommitReport {
            name: done.name,
            step: meta.step,
            bytes: done.bytes,
            seconds: done.seconds,
            replaced,
            deleted,
        })
    }

    /// Before anything touches the disk: names, tensor sizes, finite metrics, and room for the
    /// checkpoint (retention applied first when short).
    fn check_commit(&mut self, snapshot: &Snapshot<'_>, meta: &CommitMeta) -> Result<()> {
        snapshot.validate()?;
        if let Some((k, v)) = meta.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(StorageError::Invalid(format!(
                "metric {k} is {v}; metrics must be finite"
            )));
        }
        self.ensure_space(meta.step, snapshot.estimated_bytes() + SPACE_MARGIN)
    }

    /// Write every file and the manifest into a fresh temp dir in `checkpoints/`, each fsynced,
    /// then the dir (see [`writer::stage`]); the temp dir is removed when that fails.
    fn stage_in_temp(
        &self,
        name: &str,
        snapshot: &Snapshot<'_>,
        meta: &CommitMeta,
    ) -> Result<(PathBuf, Manifest)> {
        let tmp = self.dir.checkpoints_dir().join(format!(
            "{TEMP_PREFIX}{name}-{}-{}",
            std::process::id(),
            unique()
        ));
        fs::create_dir(&tmp).ctx(|| format!("create temp dir {}", tmp.display()))?;
        match writer::stage(&tmp, snapshot, self.manifest_base(meta)) {
            Ok(m) => Ok((tmp, m)),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Make the staged `tmp` the checkpoint `name`: rename it into place (exchanging with a
    /// checkpoint of the same step), fsync `checkpoints/`, swap the pointer, and only then remove
    /// what was replaced. Returns whether a checkpoint was replaced.
    fn publish(&self, tmp: &Path, name: &str) -> Result<bool> {
        let ckpts = self.dir.checkpoints_dir();
        tracing::debug!(phase = "rename", checkpoint = %name, "renaming into place");
        let renamed = match rename_dir_into_place(tmp, &ckpts.join(name)) {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir_all(tmp);
                return Err(e);
            }
        };
        tracing::debug!(phase = "fsync-parent", "fsync checkpoints/");
        fsync_dir(&ckpts)?;
        tracing::debug!(phase = "pointer", checkpoint = %name, "swapping last_checkpoint");
        pointer::write(self.dir.root(), name)?;
        let replaced = renamed == Renamed::Exchanged;
        if replaced {
            // The previous checkpoint of this step now sits at the temp name.
            fs::remove_dir_all(tmp).ctx(|| format!("remove replaced {}", tmp.display()))?;
        }
        Ok(replaced)
    }

    /// Journal the durable commit (with the save's stall when the caller said how the save
    /// went) and log it.
    fn record(&mut self, done: &Committed, meta: &CommitMeta) -> Result<()> {
        let Committed {
            name,
            bytes,
            seconds,
            replaced,
        } = done;
        let (bytes, seconds) = (*bytes, *seconds);
        let stall_seconds = meta.save.as_ref().map(|s| s.stall_seconds(seconds));
        let background = meta.save.as_ref().is_some_and(|s| s.background);
        tracing::debug!(phase = "journal", "recording commit");
        self.journal.append(&StoreEvent::CheckpointCommitted {
            checkpoint: name.clone(),
            step: meta.step,
            epoch: meta.epoch,
            bytes,
            seconds,
            replaced: *replaced,
            metrics: meta.metrics.clone(),
            stall_seconds,
            background,
            cadence: meta.save.as_ref().and_then(|s| s.cadence.clone()),
        })?;
        let seconds = format!("{seconds:.3}");
        match (&meta.save, stall_seconds) {
            (Some(save), Some(stall)) => {
                let stall = format!("{stall:.3}");
                let waited = format!("{:.3}", save.wait_seconds);
                match &save.cadence {
                    Some(c) => tracing::info!(
                        checkpoint = %name, bytes, seconds, stall_seconds = stall,
                        waited_seconds = waited, background,
                        interval_seconds = format!("{:.1}", c.actual_seconds),
                        recommended_interval_seconds = format!("{:.1}", c.recommended_seconds),
                        "checkpoint committed"
                    ),
                    None => tracing::info!(
                        checkpoint = %name, bytes, seconds, stall_seconds = stall,
                        waited_seconds = waited, background, "checkpoint committed"
                    ),
                }
            }
            _ => tracing::info!(checkpoint = %name, bytes, seconds, "checkpoint committed"),
        }
        Ok(())
    }

    fn manifest_base(&self, meta: &CommitMeta) -> Manifest {
        let mut versions = BTreeMap::new();
        versions.insert(
            "hpc_ckpt".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        );
        versions.insert("checkpoint_format".to_string(), FORMAT_VERSION.to_string());
        versions.extend(meta.versions.clone());
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            step: meta.step,
            epoch: meta.epoch,
            metrics: meta.metrics.clone(),
            created_at: now_rfc3339(),
            host: hostname(),
            job: meta.job.clone(),
            versions,
            checksum_algorithm: String::new(),
            files: Vec::new(),
            retention: Some(self.policy.clone()).filter(|p| *p != RetentionPolicy::default()),
            extra: meta.extra.clone(),
        }
    }

    fn ensure_space(&mut self, step: u64, need: u64) -> Result<()> {
        let ckpts = self.dir.checkpoints_dir();
        let free = fs2::available_space(&ckpts).ctx(|| format!("statvfs {}", ckpts.display()))?;
        if free >= need {
            return Ok(());
        }
        tracing::warn!(
            need,
            free,
            "checkpoint may not fit; applying retention first"
        );
        self.apply_retention()?;
        let free = fs2::available_space(&ckpts).ctx(|| format!("statvfs {}", ckpts.display()))?;
        if free >= need {
            return Ok(());
        }
        Err(StorageError::NoSpace {
            dir: ckpts,
            step,
            need,
            free,
        })
    }

    /// Delete what the policy does not keep. Only checkpoints whose manifest reads are
    /// candidates (an unreadable one is left for a person to inspect); the pointer's target and
    /// the best are always kept.
    fn apply_retention(&mut self) -> Result<Vec<String>> {
        if self.policy == RetentionPolicy::default() {
            return Ok(Vec::new());
        }
        let monitor = self.policy.keep_best.as_ref().map(|b| b.monitor.clone());
        let cands: Vec<Candidate> = self
            .dir
            .list()
            .into_iter()
            .filter_map(|l| {
                let m = verify::read_manifest(&l.path).ok()?;
                Some(Candidate {
                    metric: monitor.as_ref().and_then(|k| m.metrics.get(k).copied()),
                    name: l.name,
                    step: l.step,
                })
            })
            .collect();
        let ptr = match pointer::read(self.dir.root()) {
            Ok(Pointer::Names(n)) => Some(n),
            _ => None,
        };
        let doomed = retention::select(&self.policy, &cands, ptr.as_deref());
        for name in &doomed {
            remove_dir_atomically(&self.dir.checkpoints_dir().join(name))?;
            tracing::info!(checkpoint = %name, "retention deleted checkpoint");
            self.journal.append(&StoreEvent::CheckpointDeleted {
                checkpoint: name.clone(),
                reason: "retention".into(),
            })?;
        }
        Ok(doomed)
    }
}

/// A checkpoint just made durable, for [`Store::record`].
struct Committed {
    name: String,
    bytes: u64,
    seconds: f64,
    replaced: bool,
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Verify every committed checkpoint of a run dir (for `verify RUN_DIR`): (name, result).
pub fn verify_all(dir: &RunDir) -> Vec<(String, std::result::Result<Manifest, Vec<Fault>>)> {
    dir.list()
        .into_iter()
        .map(|l| (l.name.clone(), verify::verify_checkpoint(&l.path)))
        .collect()
}
