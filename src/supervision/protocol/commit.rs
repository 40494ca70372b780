//! The commit protocol: from the ranks' requests to one checkpoint. The ranks must agree on one
//! step ([`ChildProtocol::agreed`]); a step older than the resume point or than this
//! allocation's commits is refused unless `checkpoint.allow_step_backwards`
//! ([`ChildProtocol::refusal`]); the files of every rank become one snapshot, adopted (linked in
//! and read once) rather than copied, and are committed by the store in one atomic commit.
//! Guarantees: a multi-rank checkpoint holds every rank's files or does not exist; what cannot be
//! committed is kept aside, never deleted.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::json;

use super::*;
use crate::storage::journal::now_rfc3339;
use crate::storage::metrics as storage_metrics;
use crate::storage::{CommitMeta, Snapshot, Store};
use crate::supervision::events::SupervisorEvent;
use crate::supervision::ranks;

impl ChildProtocol {
    /// The one request of all ranks (rank 0's epoch, metrics and `done`; sharded when any rank
    /// says so, reshardable when every rank does), or why there is none: an invalid request fails, different steps are refused.
    pub(super) fn agreed(
        &self,
        requests: &[std::result::Result<Request, String>],
    ) -> std::result::Result<(Request, Sharding), Answer> {
        let errors: Vec<String> = requests
            .iter()
            .zip(&self.slots)
            .filter_map(|(r, s)| r.as_ref().err().map(|e| (s.rank, e)))
            .map(|(rank, e)| self.of_rank(rank, e))
            .collect();
        if !errors.is_empty() {
            return Err(Answer::Failed {
                error: errors.join("; "),
            });
        }
        let reqs: Vec<&Request> = requests.iter().flatten().collect();
        let mut lead = reqs[0].clone();
        // One rank's stop signal is the job's: the ranks agreed to stop with it.
        lead.stopping = reqs.iter().any(|r| r.stopping);
        if reqs.iter().any(|r| r.step != lead.step) {
            let steps: Vec<String> = reqs
                .iter()
                .enumerate()
                .map(|(i, r)| format!("rank {i}: step {}", r.step))
                .collect();
            return Err(Answer::Refused {
                reason: format!(
                    "the ranks asked for different steps ({}): a checkpoint holds one step of \
                     every rank, so nothing was committed. The ranks must agree on the step at \
                     which they save (e.g. an all_reduce of the stop flag at each step boundary)",
                    steps.join(", ")
                ),
            });
        }
        let sharding = Sharding {
            sharded: reqs.iter().any(|r| r.sharded),
            reshardable: reqs.iter().all(|r| r.reshardable),
        };
        Ok((lead, sharding))
    }

    pub(super) fn of_rank(&self, rank: u32, msg: &str) -> String {
        if self.world_size() == 1 {
            msg.to_string()
        } else {
            format!("rank {rank}: {msg}")
        }
    }

    pub(super) fn commit_or_refuse(
        &mut self,
        store: &mut Store,
        req: &Request,
        sharding: Sharding,
    ) -> Result<Answer> {
        if let Some(reason) = self.refusal(req.step) {
            tracing::error!(step = req.step, %reason, "commit request refused");
            store.journal().append(&SupervisorEvent::RequestRefused {
                step: Some(req.step),
                reason: reason.clone(),
            })?;
            let kept = self.keep_all(store, Some(req.step), &reason)?;
            return Ok(Answer::Refused {
                reason: with_kept(&reason, kept.as_deref()),
            });
        }
        match self.commit(store, req, sharding) {
            Ok(name) => {
                self.floor = Some(self.floor.map_or(req.step, |f| f.max(req.step)));
                Ok(Answer::Committed {
                    name,
                    done: req.done,
                    stopping: req.stopping,
                })
            }
            Err(e) => {
                let error = format!("{e:#}");
                let kept = self.keep_all(
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
    pub(super) fn refusal(&self, step: u64) -> Option<String> {
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

    /// The files of every rank as one snapshot (a multi-rank job's under `rank<NNNNN>.` names,
    /// DCP's files under their own: [`ranks::committed_name`]); two ranks staging one DCP name
    /// fail the commit. Staged in the run dir, they are adopted (linked in and read once), not
    /// copied again.
    pub(super) fn snapshot(&self) -> Result<Snapshot<'static>> {
        if self.world_size() == 1 {
            return Ok(Snapshot::adopt_dir(self.staging())?);
        }
        let mut all = Snapshot::new();
        let mut owner = BTreeMap::new();
        for slot in self.slots.iter().filter(|s| !s.is_empty()) {
            let snap = Snapshot::adopt_dir(&slot.staging)
                .with_context(|| format!("rank {}", slot.rank))?;
            for (name, src) in snap.files {
                let committed = ranks::committed_name(slot.rank, &name);
                if let Some(other) = owner.insert(committed.clone(), slot.rank) {
                    anyhow::bail!(
                        "ranks {other} and {} both staged {name:?}, a torch.distributed.checkpoint \
                         file that keeps its name in the checkpoint: DCP writes each such name \
                         on one rank only (.metadata on its coordinator, __<rank>_<n>.distcp on \
                         <rank>); did two ranks save with different process groups?",
                        slot.rank
                    );
                }
                all.add(committed, src);
            }
        }
        anyhow::ensure!(
            !all.files.is_empty(),
            "no rank staged any file (in {}-r*)",
            self.run_dir.join(STAGING_DIR).join(&self.token).display()
        );
        Ok(all)
    }

    pub(super) fn commit(
        &mut self,
        store: &mut Store,
        req: &Request,
        sharding: Sharding,
    ) -> Result<String> {
        let snapshot = self.snapshot()?;
        let reserved = [
            EXTRA_WORLD_SIZE,
            EXTRA_RANK_FILES,
            EXTRA_SHARDED,
            EXTRA_RESHARDABLE,
        ];
        if let Some(k) = req.extra.keys().find(|k| reserved.contains(&k.as_str())) {
            anyhow::bail!(
                "the request's extra sets {k:?}, which the supervisor writes itself (reserved: \
                 {})",
                reserved.join(", ")
            );
        }
        let mut extra = req.extra.clone();
        if self.world_size() > 1 {
            extra.insert(EXTRA_WORLD_SIZE.into(), json!(self.world_size()));
            extra.insert(EXTRA_RANK_FILES.into(), json!("rank{rank:05}.{name}"));
        }
        if sharding.sharded {
            extra.insert(EXTRA_SHARDED.into(), json!(true));
        }
        if sharding.reshardable {
            extra.insert(EXTRA_RESHARDABLE.into(), json!(true));
        }
        let meta = CommitMeta {
            step: req.step,
            epoch: req.epoch,
            metrics: req.metrics.clone(),
            job: self.job.clone(),
            extra,
            ..Default::default()
        };
        let report = store.commit(&snapshot, &meta)?;
        if !req.metrics_logged {
            let line = json!({"ts": now_rfc3339(), "step": req.step, "epoch": req.epoch, "metrics": req.metrics});
            let (mut f, _) = storage_metrics::open_append(&self.run_dir)?;
            storage_metrics::append(&mut f, &line).with_context(|| {
                format!("append to {}", self.run_dir.join(METRICS_FILE).display())
            })?;
        }
        for slot in &self.slots {
            slot.clear()?;
        }
        Ok(report.name)
    }

    /// Keep aside what every rank staged; the kept dirs, relative to the run dir, joined.
    pub(super) fn keep_all(
        &self,
        store: &mut Store,
        step: Option<u64>,
        reason: &str,
    ) -> Result<Option<String>> {
        let mut kept = Vec::new();
        for slot in &self.slots {
            kept.extend(slot.keep(store, step, reason)?);
        }
        Ok((!kept.is_empty()).then(|| kept.join(", ")))
    }
}
