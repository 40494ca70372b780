//! Which checkpoints to keep: `last` (the newest N), `best` (by a monitored metric, min or max),
//! `periodic` (every N steps, keeping the newest K of those), and `milestones` (kept forever).
//!
//! [`select`] is a pure function from the committed checkpoints to the ones to delete. Whatever
//! the policy, it never selects the pointer's target or the best checkpoint, and the store only
//! applies it after the newest commit is durable.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Min,
    Max,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Best {
    /// Metric name as recorded in the manifest (e.g. `val_loss`).
    pub monitor: String,
    pub mode: Mode,
    /// How many of the best to keep (at least 1).
    #[serde(default = "one")]
    pub keep: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Periodic {
    /// Keep checkpoints whose step is a multiple of this.
    pub every: u64,
    /// How many of those to keep, newest first; 0 keeps them all.
    #[serde(default)]
    pub keep: usize,
}

fn one() -> usize {
    1
}

/// `--keep-best METRIC:min|max` (keeps the one best).
impl std::str::FromStr for Best {
    type Err = String;

    fn from_str(s: &str) -> Result<Best, String> {
        let (k, m) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not METRIC:min or METRIC:max"))?;
        let mode = match m {
            "min" => Mode::Min,
            "max" => Mode::Max,
            _ => return Err(format!("mode {m:?} is not min or max")),
        };
        if k.is_empty() {
            return Err("metric name is empty".into());
        }
        Ok(Best {
            monitor: k.into(),
            mode,
            keep: one(),
        })
    }
}

/// `--keep-every N[:K]`.
impl std::str::FromStr for Periodic {
    type Err = String;

    fn from_str(s: &str) -> Result<Periodic, String> {
        let (n, k) = match s.split_once(':') {
            Some((n, k)) => (n, k.parse().map_err(|_| format!("{k:?} is not a count"))?),
            None => (s, 0),
        };
        let every: u64 = n
            .parse()
            .map_err(|_| format!("{n:?} is not a step count"))?;
        if every == 0 {
            return Err("N must be at least 1".into());
        }
        Ok(Periodic { every, keep: k })
    }
}

/// A retention policy: the one declaration of the retention keys (the job config's
/// `checkpoint:` section reads them into this type, `hpc-ckpt commit` sets them by flags).
/// `keep_last: None` keeps everything (nothing is ever deleted); [`Default`] is that policy.
/// Read with serde, a policy that leaves `keep_last` out keeps the newest
/// [`DEFAULT_KEEP_LAST`] (`keep_last: null` keeps everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep the newest N checkpoints (≥ 1), and those kept by the other rules; delete the rest.
    #[serde(default = "default_keep_last")]
    pub keep_last: Option<usize>,
    /// Also keep the best checkpoint(s) by a metric the manifests record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<Best>,
    /// Also keep checkpoints whose step is a multiple of N (the newest K of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodic: Option<Periodic>,
    /// Keep the checkpoints of these steps forever.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub milestones: Vec<u64>,
}

/// How many of the newest checkpoints a policy read from a file keeps when it does not say.
pub const DEFAULT_KEEP_LAST: usize = 3;

fn default_keep_last() -> Option<usize> {
    Some(DEFAULT_KEEP_LAST)
}

/// What retention knows of one committed checkpoint.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub step: u64,
    pub metric: Option<f64>,
}

/// Why a checkpoint is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The pointer's target.
    Pointer,
    Last,
    Best,
    Periodic,
    Milestone,
}

impl RetentionPolicy {
    /// The policy of a file that names no retention key: keep the newest [`DEFAULT_KEEP_LAST`].
    pub fn kept_by_default() -> RetentionPolicy {
        RetentionPolicy {
            keep_last: default_keep_last(),
            ..RetentionPolicy::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.keep_last == Some(0) {
            return Err(
                "keep_last must be at least 1 (the newest checkpoint is always kept)".into(),
            );
        }
        if let Some(b) = &self.keep_best {
            if b.keep == 0 {
                return Err("keep_best.keep must be at least 1".into());
            }
            if b.monitor.is_empty() {
                return Err("keep_best.monitor must name a metric".into());
            }
        }
        if let Some(p) = &self.periodic {
            if p.every == 0 {
                return Err("periodic.every must be at least 1".into());
            }
        }
        Ok(())
    }

    /// The roles of each candidate under this policy (empty: deletable).
    pub fn roles(&self, all: &[Candidate], pointer: Option<&str>) -> Vec<(String, BTreeSet<Role>)> {
        let mut by_step: Vec<&Candidate> = all.iter().collect();
        by_step.sort_by_key(|c| std::cmp::Reverse(c.step));
        let mut out: Vec<(String, BTreeSet<Role>)> = by_step
            .iter()
            .map(|c| (c.name.clone(), BTreeSet::new()))
            .collect();
        for (i, c) in by_step.iter().enumerate() {
            let roles = &mut out[i].1;
            if Some(c.name.as_str()) == pointer {
                roles.insert(Role::Pointer);
            }
            if self.keep_last.is_some_and(|n| i < n) {
                roles.insert(Role::Last);
            }
            if self.milestones.contains(&c.step) {
                roles.insert(Role::Milestone);
            }
        }
        if let Some(p) = &self.periodic {
            let limit = if p.keep == 0 { usize::MAX } else { p.keep };
            let mut n = 0;
            for (i, c) in by_step.iter().enumerate() {
                if c.step % p.every == 0 && n < limit {
                    out[i].1.insert(Role::Periodic);
                    n += 1;
                }
            }
        }
        if let Some(b) = &self.keep_best {
            let mut ranked: Vec<(usize, f64)> = by_step
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.metric.filter(|m| m.is_finite()).map(|m| (i, m)))
                .collect();
            // Best first; ties go to the newer checkpoint (by_step is newest first, sort is stable).
            ranked.sort_by(|a, b2| match b.mode {
                Mode::Min => a.1.total_cmp(&b2.1),
                Mode::Max => b2.1.total_cmp(&a.1),
            });
            for (i, _) in ranked.into_iter().take(b.keep) {
                out[i].1.insert(Role::Best);
            }
        }
        out
    }
}

/// The checkpoints to delete: those with no role under the policy. Without `keep_last`
/// nothing is deleted.
pub fn select(policy: &RetentionPolicy, all: &[Candidate], pointer: Option<&str>) -> Vec<String> {
    if policy.keep_last.is_none() {
        return Vec::new();
    }
    policy
        .roles(all, pointer)
        .into_iter()
        .filter(|(_, r)| r.is_empty())
        .map(|(n, _)| n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(steps_metrics: &[(u64, Option<f64>)]) -> Vec<Candidate> {
        steps_metrics
            .iter()
            .map(|&(s, m)| Candidate {
                name: format!("s{s}"),
                step: s,
                metric: m,
            })
            .collect()
    }

    #[test]
    fn keep_everything_by_default() {
        let c = cands(&[(1, None), (2, None)]);
        assert!(select(&RetentionPolicy::default(), &c, None).is_empty());
    }

    #[test]
    fn last_best_periodic_milestones_pointer() {
        let c = cands(&[
            (100, Some(0.9)),
            (200, Some(0.2)),
            (300, Some(0.5)),
            (400, Some(0.7)),
            (500, Some(0.6)),
            (600, Some(0.8)),
        ]);
        let p = RetentionPolicy {
            keep_last: Some(2),
            keep_best: Some(Best {
                monitor: "val".into(),
                mode: Mode::Min,
                keep: 1,
            }),
            periodic: Some(Periodic {
                every: 300,
                keep: 1,
            }),
            milestones: vec![100],
        };
        // Pointer lags at 400 (e.g. a crash before the pointer swap was adopted).
        let mut del = select(&p, &c, Some("s400"));
        del.sort();
        // kept: 600,500 last; 200 best; 600 periodic (newest multiple of 300); 100 milestone; 400 pointer.
        assert_eq!(del, vec!["s300"]);
    }

    #[test]
    fn best_max_and_never_zero() {
        let c = cands(&[(1, Some(1.0)), (2, Some(3.0)), (3, Some(2.0))]);
        let p = RetentionPolicy {
            keep_last: Some(1),
            keep_best: Some(Best {
                monitor: "acc".into(),
                mode: Mode::Max,
                keep: 1,
            }),
            ..Default::default()
        };
        assert_eq!(select(&p, &c, Some("s3")), vec!["s1"]);
        assert!(RetentionPolicy {
            keep_last: Some(0),
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
