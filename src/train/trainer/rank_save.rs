//! Two-phase saves of a data-parallel rank (`checkpoint.async: true`, the default), the rank
//! mode's counterpart of `save.rs` (DESIGN, "Two-phase saves"; the synchronous save is
//! [`Trainer::commit_as_rank`]).
//!
//! A save at step S goes through these stages, each at a step boundary of the training thread:
//! 1. **Phase 1** (the boundary of S): rank 0 starts the copy of the replicated state as a
//!    single process does ([`Trainer::start_background_copy`]: the copy overlaps step S+1's
//!    forward and backward and is fenced before its optimizer update); every rank writes down
//!    its own `rank_state.json` (generator, share, data position) and its commit request.
//! 2. **Staging**: once the copy is fenced (the next boundary; at once on the other ranks), a
//!    background thread writes this rank's files into its staging dir — no collective, no
//!    torch, at the persister's lower priority.
//! 3. **Agreement**: every step's all-reduce ([`super::data_parallel::Team::reduce_step`])
//!    carries each rank's "staged" and "failed" votes. At the boundary after the first step whose
//!    sums account for every rank, all ranks decide the same: drop the save (some rank could
//!    not stage) or commit it.
//! 4. **Commit**: each rank's request to the supervisor, and the wait for its answer, on a
//!    background thread; `committed` moves when the answer is "committed".
//!
//! Guarantees:
//! - **Collectives stay on the training thread, in one order on every rank.** The votes ride in
//!   the step's own all-reduce; a save finished early ([`Trainer::finish_rank_save`]: before
//!   the next save, a stop, the end) runs its one count at the same point on every rank, since
//!   every rank is at the same side of the agreement (decided at the same boundary).
//! - **Same files as a synchronous save**: the same snapshot and rank state, taken at the
//!   boundary of S (tested byte for byte).
//! - **At most one save in flight**: the next save, a stop or the end first finishes it; a stop
//!   or the end then commits its own step unless the save in flight was that step.
//! - A SIGKILL at any instant leaves the previous checkpoint as the resume point: the
//!   supervisor commits only when every rank asked, which no rank does before the agreement.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Instant;

use super::data_parallel::{clear_dir, RANK_STATE_FILE};
use super::*;
use crate::storage::persister::lower_priority;
use crate::storage::writer::write_files;
use crate::supervision::client::Client;
use crate::supervision::protocol::Request;

/// A rank's save between its phase 1 and its commit (see the module doc).
pub(super) struct InFlight {
    step: u64,
    req: Request,
    /// `best` before this save changed it (rank 0, with `keep_best`).
    best_before: Option<Option<BestMetric>>,
    /// What the save cost the training thread so far (phase 1, waits to finish it).
    stall: f64,
    stage: Stage,
}

enum Stage {
    /// Rank 0's copy is running (`Trainer::phase1`); this rank's own file is ready.
    Copying(Vec<u8>),
    /// The staging thread writes this rank's files.
    Writing(JoinHandle<Result<(), String>>),
    /// Staged (or failed to): waiting for every rank's vote.
    Written(Result<(), String>),
    /// Every rank staged: this rank's request, waiting for the supervisor's answer.
    Committing(JoinHandle<Result<String, String>>),
}

impl InFlight {
    /// This rank's votes for the step's all-reduce: (staged, failed). Takes in a staging
    /// thread that ended.
    pub(super) fn vote(&mut self) -> (bool, bool) {
        if matches!(&self.stage, Stage::Writing(h) if h.is_finished()) {
            self.join_writer();
        }
        match &self.stage {
            Stage::Written(Ok(())) => (true, false),
            Stage::Written(Err(_)) => (false, true),
            _ => (false, false),
        }
    }

    /// Wait for the staging thread, if it runs.
    fn join_writer(&mut self) {
        let stage = std::mem::replace(&mut self.stage, Stage::Written(Ok(())));
        self.stage = match stage {
            Stage::Writing(h) => Stage::Written(
                h.join()
                    .unwrap_or_else(|_| Err("the staging thread panicked".into())),
            ),
            other => other,
        };
    }
}

/// Write `snap` (rank 0's replicated state, if any) and this rank's `own` file into `dir` on a
/// background thread.
fn spawn_writer(
    dir: PathBuf,
    snap: Option<Snapshot<'static>>,
    own: Vec<u8>,
) -> Result<JoinHandle<Result<(), String>>, String> {
    std::thread::Builder::new()
        .name("rank-stage".into())
        .spawn(move || {
            lower_priority();
            let mut snap = snap.unwrap_or_default();
            snap.add(RANK_STATE_FILE, FileSource::Bytes(own.into()));
            write_files(&dir, &snap)
                .map(|_| ())
                .map_err(|e| format!("staging into {}: {e}", dir.display()))
        })
        .map_err(|e| format!("cannot start the staging thread: {e}"))
}

impl Trainer {
    /// Phase 1 of a background save of the current step (see the module doc), after the save
    /// in flight, if any, is finished. A failure of phase 1 is this rank's "failed" vote.
    pub(super) fn start_rank_save(&mut self, client: &Client) -> Result<(), TrainError> {
        let waited = Instant::now();
        self.finish_rank_save(client)?;
        let step = self.st.global_step;
        let wait = waited.elapsed().as_secs_f64();
        if wait >= 0.001 && self.is_lead() {
            tracing::info!(
                step,
                seconds = format!("{wait:.3}"),
                "save waited for the previous checkpoint's background staging and commit"
            );
        }
        self.last_save = Instant::now();
        let started = Instant::now();
        let req = self.rank_request();
        let stage = match self.rank_state_json() {
            Err(e) => Stage::Written(Err(e.to_string())),
            Ok(own) if self.is_lead() => match self.start_background_copy() {
                Ok(()) => Stage::Copying(own),
                Err(e) => Stage::Written(Err(e.to_string())),
            },
            Ok(own) => match spawn_writer(client.staging().to_path_buf(), None, own) {
                Ok(h) => Stage::Writing(h),
                Err(e) => Stage::Written(Err(e)),
            },
        };
        if let Stage::Copying(_) = stage {
            tracing::debug!(step, "rank save: state copy overlapping the next step");
        }
        self.team().save = Some(InFlight {
            step,
            req,
            // Rank 0's, once its copy is taken (`best` is this save's until it fails).
            best_before: None,
            stall: started.elapsed().as_secs_f64(),
            stage,
        });
        Ok(())
    }

    /// At a step boundary: move the save in flight on without blocking (stage the fenced copy,
    /// apply the agreement the step's all-reduce reached, take in the supervisor's answer).
    pub(super) fn advance_rank_save(&mut self, client: &Client) -> Result<(), TrainError> {
        let Some(mut s) = self.team().save.take() else {
            return Ok(());
        };
        let (staged, failed) = self.team().votes;
        let world = self.team().world();
        s.stage = match std::mem::replace(&mut s.stage, Stage::Written(Ok(()))) {
            Stage::Copying(own) => match self.take_copied() {
                Some((snap, before)) => self.stage_copied(client, &mut s, snap, before, own),
                None => Stage::Copying(own),
            },
            Stage::Written(r) if staged + failed == world => {
                return self.agreed(client, s, r.map(|_| failed));
            }
            Stage::Committing(h) if h.is_finished() => return self.settle_rank_save(s, h),
            other => other,
        };
        self.team().save = Some(s);
        Ok(())
    }

    /// Finish the save in flight before training goes on: wait for its copy and staging, agree
    /// (one count, on every rank at once: see the module doc) and wait for its commit. Its
    /// failure follows `on_save_error` (it is a periodic save).
    pub(super) fn finish_rank_save(&mut self, client: &Client) -> Result<(), TrainError> {
        let Some(mut s) = self.team().save.take() else {
            return Ok(());
        };
        let started = Instant::now();
        s.stage = match std::mem::replace(&mut s.stage, Stage::Written(Ok(()))) {
            Stage::Copying(own) => {
                self.fence_copy();
                let (snap, before) = self.take_copied().expect("a fenced copy");
                self.stage_copied(client, &mut s, snap, before, own)
            }
            other => other,
        };
        s.join_writer();
        if let Stage::Written(r) = &s.stage {
            let (mine, r) = (r.is_err(), r.clone());
            let failed = self.team().count(&[mine])?[0];
            self.agreed(client, s, r.map(|_| failed))?;
            let Some(next) = self.team().save.take() else {
                return Ok(());
            };
            s = next;
        }
        match std::mem::replace(&mut s.stage, Stage::Written(Ok(()))) {
            Stage::Committing(h) => {
                s.stall += started.elapsed().as_secs_f64();
                self.settle_rank_save(s, h)
            }
            _ => unreachable!("a save past its agreement is committing"),
        }
    }

    /// Rank 0's fenced copy: start staging it with this rank's `own` file.
    #[allow(clippy::type_complexity)]
    fn stage_copied(
        &mut self,
        client: &Client,
        s: &mut InFlight,
        snap: Result<(Snapshot<'static>, CommitMeta), StorageError>,
        best_before: Option<Option<BestMetric>>,
        own: Vec<u8>,
    ) -> Stage {
        s.best_before = best_before;
        let snap = match snap {
            Ok((snap, meta)) => {
                s.req.metrics = meta.metrics;
                s.req.extra = meta.extra;
                snap
            }
            Err(e) => return Stage::Written(Err(e.to_string())),
        };
        tracing::debug!(step = s.step, "rank save: staging in the background");
        match spawn_writer(client.staging().to_path_buf(), Some(snap), own) {
            Ok(h) => Stage::Writing(h),
            Err(e) => Stage::Written(Err(e)),
        }
    }

    /// Every rank voted: with `failed` ranks that could not stage (or this rank's own error),
    /// drop the save; else ask for its commit on a background thread.
    fn agreed(
        &mut self,
        client: &Client,
        mut s: InFlight,
        failed: Result<u32, String>,
    ) -> Result<(), TrainError> {
        let reason = match failed {
            Ok(0) => {
                tracing::debug!(
                    step = s.step,
                    "rank save: every rank staged; committing in the background"
                );
                let (client, req) = (client.clone(), s.req.clone());
                let spawned = std::thread::Builder::new()
                    .name("rank-commit".into())
                    .spawn(move || client.commit(&req).map_err(|e| e.to_string()));
                match spawned {
                    Ok(h) => {
                        s.stage = Stage::Committing(h);
                        self.team().save = Some(s);
                        return Ok(());
                    }
                    Err(e) => format!("cannot start the commit thread: {e}"),
                }
            }
            Ok(n) => format!("{n} rank(s) could not stage their files (see their errors)"),
            Err(mine) => mine,
        };
        clear_dir(client.staging());
        self.rank_save_failed(s, reason)
    }

    /// The supervisor's answer to a save's commit request.
    fn settle_rank_save(
        &mut self,
        s: InFlight,
        h: JoinHandle<Result<String, String>>,
    ) -> Result<(), TrainError> {
        let answer = h
            .join()
            .unwrap_or_else(|_| Err("the commit thread panicked".into()));
        match answer {
            Ok(name) => {
                self.committed = Some(s.step);
                self.commits += 1;
                if self.is_lead() {
                    self.note_stall(s.stall);
                    tracing::debug!(step = s.step, checkpoint = %name, "committed");
                }
                Ok(())
            }
            Err(reason) => self.rank_save_failed(s, reason),
        }
    }

    /// A periodic save that did not commit: `best` back; an error under `on_save_error: stop`,
    /// else logged.
    fn rank_save_failed(&mut self, s: InFlight, reason: String) -> Result<(), TrainError> {
        if let Some(b) = s.best_before {
            self.st.best = b;
        }
        if self.tc.stop_on_save_error {
            return Err(TrainError::Commit {
                step: s.step,
                reason,
            });
        }
        tracing::error!(step = s.step, error = %reason, "checkpoint failed; training on (checkpoint.on_save_error: continue)");
        Ok(())
    }
}
