//! `metrics.jsonl`: training and eval metrics by step, one JSON object a line
//! (`{"ts", "step", "epoch", "metrics": {name: value}}`), appended by the built-in trainer at
//! every step and by the supervisor at every commit a child asked for.
//!
//! One home for the file's name, its opening for append and its reading. A writer killed in the
//! middle of a line leaves it torn: [`open_append`] ends that line first, so the next record
//! stands on its own line, and [`read`] skips (and counts) lines that do not parse.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::SystemTime;

use serde_json::Value;

use super::error::Result;
use super::fsutil::open_lines_append;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One step's record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub step: u64,
    pub ts: Option<SystemTime>,
    pub metrics: BTreeMap<String, f64>,
}

impl Record {
    fn parse(line: &[u8]) -> Option<Record> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let step = v.get("step")?.as_u64()?;
        let ts = v["ts"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok());
        let metrics = v["metrics"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Some(Record { step, ts, metrics })
    }
}

/// `RUN_DIR/metrics.jsonl` opened for appending (see [`open_lines_append`]; a torn last line is ended), and its last
/// readable record: how far the previous writer got, and when.
pub fn open_append(run_dir: &Path) -> Result<(File, Option<Record>)> {
    let (file, lines) = open_lines_append(&run_dir.join(METRICS_FILE))?;
    let last = lines.iter().rev().find_map(|l| Record::parse(l));
    Ok((file, last))
}

/// Append one record as a single write of the whole line (O_APPEND).
pub fn append(file: &mut File, line: &Value) -> std::io::Result<()> {
    file.write_all(format!("{line}\n").as_bytes())
}

/// Every readable record of a run's metrics, in file order (missing file: none), and the number
/// of lines that could not be read (a torn line, garbage).
pub fn read(run_dir: &Path) -> (Vec<Record>, usize) {
    let Ok(f) = File::open(run_dir.join(METRICS_FILE)) else {
        return (Vec::new(), 0);
    };
    let mut records = Vec::new();
    let mut bad = 0;
    for line in BufReader::new(f).split(b'\n').map_while(|l| l.ok()) {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match Record::parse(&line) {
            Some(r) => records.push(r),
            None => bad += 1,
        }
    }
    (records, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_torn_last_line_is_ended_before_the_next_record_and_skipped_by_readers() {
        let d = tempfile::tempdir().unwrap();
        let (mut f, last) = open_append(d.path()).unwrap();
        assert_eq!(last, None);
        append(&mut f, &json!({"step": 1, "metrics": {"loss": 2.0}})).unwrap();
        append(
            &mut f,
            &json!({"ts": "2026-01-01T00:00:00Z", "step": 2, "metrics": {"loss": 1.5}}),
        )
        .unwrap();
        // SIGKILL mid-write.
        f.write_all(b"{\"step\": 3, \"metr").unwrap();
        drop(f);
        let (mut f, last) = open_append(d.path()).unwrap();
        let last = last.expect("the last complete record");
        assert_eq!((last.step, last.metrics["loss"]), (2, 1.5));
        assert!(last.ts.is_some());
        append(&mut f, &json!({"step": 3, "metrics": {"loss": 1.0}})).unwrap();
        let text = std::fs::read_to_string(d.path().join(METRICS_FILE)).unwrap();
        assert!(
            text.ends_with("\n{\"metrics\":{\"loss\":1.0},\"step\":3}\n"),
            "{text}"
        );
        let (records, bad) = read(d.path());
        assert_eq!(bad, 1);
        let steps: Vec<u64> = records.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 2, 3]);
        // An intact file is left as it is.
        let before = std::fs::read(d.path().join(METRICS_FILE)).unwrap();
        let (_, last) = open_append(d.path()).unwrap();
        assert_eq!(last.map(|r| r.step), Some(3));
        assert_eq!(std::fs::read(d.path().join(METRICS_FILE)).unwrap(), before);
    }

    #[test]
    fn a_last_line_without_its_newline_that_parses_still_counts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(METRICS_FILE), b"{\"step\": 7}").unwrap();
        let (_, last) = open_append(d.path()).unwrap();
        assert_eq!(last.map(|r| r.step), Some(7));
        assert_eq!(
            std::fs::read(d.path().join(METRICS_FILE)).unwrap(),
            b"{\"step\": 7}\n"
        );
    }
}
