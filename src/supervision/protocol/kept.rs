//! Staged files are never thrown away: what cannot be committed (a failed or refused commit,
//! files staged with no request, what an earlier allocation left in `staging/`) is moved aside
//! into `kept/<time>-<token>/`, named in an ERROR log line and journaled (`staged_kept`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::*;
use crate::storage::fsutil::{fsync_dir, read_bounded};
use crate::storage::journal::now_rfc3339;
use crate::storage::Store;
use crate::supervision::events::SupervisorEvent;

/// Keep aside whatever earlier allocations left under `staging/` (their staged files; an
/// unanswered request only lends its step to the record); then `staging/` holds nothing of
/// theirs.
pub(super) fn keep_leftovers(store: &mut Store, root: &Path) -> Result<()> {
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

pub(super) fn with_kept(msg: &str, kept: Option<&str>) -> String {
    match kept {
        Some(k) => format!("{msg} (the staged files were kept in {k})"),
        None => msg.to_string(),
    }
}
