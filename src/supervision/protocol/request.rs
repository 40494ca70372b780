//! The protocol's wire format, per rank: the request a program writes (`<token>.request`, JSON,
//! bounded in size), the answer the supervisor writes back (`<request>.result`, then the request
//! is removed: the acknowledgement), and a rank's slot (its staging dir and request file).
//! Guarantees: a request is read whole or refused with what is expected; an answer is written
//! durably before the request goes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::*;
use crate::storage::fsutil::{read_bounded, replace_file_durable};
use crate::storage::Store;

/// The largest request file read.
pub(super) const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// What a program writes to ask for a commit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// This rank's files are a shard of the state (they load only with the same world size,
    /// unless `reshardable`).
    #[serde(default)]
    pub sharded: bool,
    /// The sharded state is written in a format whose reader reshards it to any world size
    /// (torch.distributed.checkpoint): the checkpoint resumes on another number of ranks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reshardable: bool,
    /// Values for the manifest's `extra` (rank 0's request; the supervisor's own keys —
    /// `world_size`, `rank_files`, `sharded`, `reshardable` — may not be set).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The program appends its own per-step lines to `metrics.jsonl` (the built-in trainer's
    /// ranks do): the supervisor adds no line for this commit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_logged: bool,
    /// The program saves because a stop signal reached it (or a peer rank that agreed to stop
    /// with it), not because its work is done: work is left even when it then exits 0. This is
    /// how the supervisor learns of a signal that reached the program but not itself (Slurm's
    /// `--signal=USR1@T` without `B:`, a `scancel --signal` of the job's steps).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Committed {
        name: String,
        done: bool,
        /// Some rank said it saved on a stop signal ([`Request::stopping`]).
        stopping: bool,
    },
    /// Not committed, by rule (an older step); the files were kept aside.
    Refused { reason: String },
    /// The commit failed (bad request, bad files, disk full); the files were kept aside.
    Failed { error: String },
}

/// One rank's staging dir and request file (the only one of a 1-rank job).
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) rank: u32,
    pub(super) token: String,
    pub(super) staging: PathBuf,
    pub(super) request: PathBuf,
}

impl Slot {
    pub(super) fn has_request(&self) -> bool {
        self.request.exists()
    }

    pub(super) fn read_request(&self) -> std::result::Result<Request, String> {
        let bytes = read_bounded(&self.request, MAX_REQUEST_BYTES)
            .map_err(|r| format!("{}: {r}", self.request.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{}: not a valid commit request ({e}); expected {{\"step\": N, \"epoch\"?: E, \
                 \"metrics\"?: {{..}}, \"done\"?: bool, \"sharded\"?: bool, \"reshardable\"?: bool, \
                 \"extra\"?: {{..}}, \"metrics_logged\"?: bool, \"stopping\"?: bool}}",
                self.request.display()
            )
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        fs::read_dir(&self.staging).map_or(true, |mut d| d.next().is_none())
    }

    /// Write the answer, then remove the request (the acknowledgement).
    pub(super) fn reply(&self, result: &serde_json::Value) -> Result<()> {
        replace_file_durable(&result_path(&self.request), result.to_string().as_bytes())?;
        fs::remove_file(&self.request).with_context(|| format!("remove {}", self.request.display()))
    }

    /// Move whatever is staged aside (see [`keep_aside`]) and recreate the staging dir.
    pub(super) fn keep(
        &self,
        store: &mut Store,
        step: Option<u64>,
        reason: &str,
    ) -> Result<Option<String>> {
        let kept = keep_aside(store, &self.staging, &self.token, step, reason)?;
        if kept.is_some() {
            fs::create_dir_all(&self.staging)
                .with_context(|| format!("create {}", self.staging.display()))?;
        }
        Ok(kept)
    }

    pub(super) fn clear(&self) -> Result<()> {
        for e in fs::read_dir(&self.staging)?.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        Ok(())
    }
}

/// `<request>.result`: the answer.
pub fn result_path(request: &Path) -> PathBuf {
    let mut s = request.as_os_str().to_owned();
    s.push(".result");
    PathBuf::from(s)
}

/// `<request>.tmp`: where the program writes before its rename.
pub(super) fn tmp_path(request: &Path) -> PathBuf {
    let mut s = request.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}
