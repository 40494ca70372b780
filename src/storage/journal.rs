//! `journal.jsonl`: the run's append-only history, one JSON object a line, fsynced per event.
//!
//! Every commit, fallback, deletion and error is recorded ([`StoreEvent`]), and the supervisor
//! adds allocations, signals and requeue decisions (its own event type, in `supervision`). Each
//! line has `ts` (RFC 3339) and `event` (the serde tag); the other fields depend on the event.
//! Events are typed where they are written ([`Journal::append`]) and where they are read; a
//! reader tolerates events it does not know, and skips a torn last line (a crash mid-append)
//! instead of failing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{IoContext, Result};

pub const JOURNAL_FILE: &str = "journal.jsonl";

/// An open journal for appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

/// Current time as RFC 3339 UTC with millisecond precision.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Journal {
    pub fn open(run_dir: &Path) -> Result<Journal> {
        let path = run_dir.join(JOURNAL_FILE);
        // A crash mid-append leaves a torn last line: the opener ends it, so the next event
        // stands alone.
        let (file, _) = super::fsutil::open_lines_append(&path)?;
        Ok(Journal { file, path })
    }

    /// Append one typed event durably. `event` must serialize to a JSON object whose `event`
    /// field names it (a `#[serde(tag = "event")]` enum).
    pub fn append<E: Serialize>(&mut self, event: &E) -> Result<()> {
        let Value::Object(mut fields) = serde_json::to_value(event).expect("events serialize")
        else {
            panic!("a journal event must serialize to a JSON object");
        };
        let name = match fields.remove("event") {
            Some(Value::String(n)) => n,
            _ => panic!("a journal event must carry its name in `event`"),
        };
        self.record(&name, Value::Object(fields))
    }

    /// Append one event durably from its name and fields. `fields` must be a JSON object (or
    /// null). Prefer [`Journal::append`] with a typed event.
    pub fn record(&mut self, event: &str, fields: Value) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::String(now_rfc3339()));
        obj.insert("event".into(), Value::String(event.into()));
        if let Value::Object(m) = fields {
            obj.extend(m);
        }
        let mut line = serde_json::to_vec(&Value::Object(obj)).expect("json serializes");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .ctx(|| format!("append to {}", self.path.display()))
    }
}

/// A file and what is wrong with it, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub file: String,
    pub reason: String,
}

impl From<&super::error::Fault> for FaultRecord {
    fn from(f: &super::error::Fault) -> Self {
        FaultRecord {
            file: f.file.clone(),
            reason: f.reason.clone(),
        }
    }
}

/// Why a save came when it did, for a saver that chooses its interval from data (journaled
/// with the commit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cadence {
    /// The interval recommended at this save, seconds.
    pub recommended_seconds: f64,
    /// Seconds since the previous save (or since training began in this process).
    pub actual_seconds: f64,
    /// What the recommendation rests on, in words.
    pub reason: String,
}

/// What the store journals about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A checkpoint is durable and the pointer names it.
    CheckpointCommitted {
        checkpoint: String,
        step: u64,
        #[serde(default)]
        epoch: Option<u64>,
        bytes: u64,
        seconds: f64,
        #[serde(default)]
        replaced: bool,
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
        /// Seconds the saving program's work stood still for this save (a trainer's saves:
        /// waiting for the previous persist, copying, and the commit unless in the background).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stall_seconds: Option<f64>,
        /// Persisted on a background thread (a two-phase save) while training went on.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        background: bool,
        /// The interval the saver chose and why (`checkpoint.interval: auto`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cadence: Option<Cadence>,
    },
    /// Retention deleted a checkpoint.
    CheckpointDeleted { checkpoint: String, reason: String },
    /// A save failed; every committed checkpoint is intact.
    SaveFailed { step: u64, error: String },
    /// A checkpoint was not used: it does not verify, or (the trainer) does not restore.
    CheckpointRefused {
        checkpoint: String,
        faults: Vec<FaultRecord>,
    },
    /// The resume point is not what the pointer names.
    Fallback { checkpoint: String, step: u64 },
    /// A checkpoint was read into memory to resume from.
    CheckpointLoaded { checkpoint: String, step: u64 },
    /// Checkpoints exist but none verifies.
    LoadFailed { detail: String },
    /// Temp entries of an interrupted writer were removed.
    TempRemoved { entries: Vec<String> },
    /// The pointer was moved to a durable checkpoint it did not name.
    PointerAdopted { checkpoint: String, reason: String },
}

/// Read every well-formed event of a run's journal (missing journal: none). Lines that do not
/// parse (a torn last line) are skipped and counted.
pub fn read_all(run_dir: &Path) -> (Vec<Value>, usize) {
    let Ok(f) = File::open(run_dir.join(JOURNAL_FILE)) else {
        return (Vec::new(), 0);
    };
    let mut events = Vec::new();
    let mut bad = 0;
    for line in BufReader::new(f).split(b'\n').map_while(|l| l.ok()) {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match serde_json::from_slice::<Value>(&line) {
            Ok(v @ Value::Object(_)) => events.push(v),
            _ => bad += 1,
        }
    }
    (events, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_events_round_trip_with_their_tag() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        let e = StoreEvent::Fallback {
            checkpoint: "step-000000000004".into(),
            step: 4,
        };
        j.append(&e).unwrap();
        let (ev, _) = read_all(d.path());
        assert_eq!(ev[0]["event"], "fallback");
        assert!(ev[0]["ts"].is_string());
        let back: StoreEvent = serde_json::from_value(ev[0].clone()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn append_and_read_skipping_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.record("commit", serde_json::json!({"step": 3})).unwrap();
        j.record("error", Value::Null).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(JOURNAL_FILE))
            .unwrap()
            .write_all(b"{\"ts\":\"x\",\"ev")
            .unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.record("after_crash", Value::Null).unwrap();
        let (ev, bad) = read_all(d.path());
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[2]["event"], "after_crash");
        assert_eq!(bad, 1);
        assert_eq!(ev[0]["step"], 3);
        assert_eq!(ev[1]["event"], "error");
    }
}
