//! The child protocol of `wrap -- CMD` (README, "Child protocol"): where a program stages a
//! checkpoint, how it asks for a commit, and how it is answered.
//!
//! Each allocation gets its own staging dir and request file (`staging/<token>/`,
//! `staging/<token>.request`), so files or requests an earlier program left — an orphan of a
//! killed supervisor included — can never be committed by a later allocation.
//!
//! A multi-rank job has one staging dir and request file per rank (`staging/<token>-rNNNNN/`,
//! `staging/<token>-rNNNNN.request`, see [`super::ranks`]); its ranks' requests are answered
//! together, by one commit of every rank's files, once every rank has asked for the same step.
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
//!   `status` prints the `hpc-ckpt commit` command that would import it;
//! - a multi-rank checkpoint holds the files of every rank or does not exist: ranks asking for
//!   different steps are refused, and ranks that never ask leave nothing committed (journaled
//!   as `ranks_incomplete`, naming them).
//!
//! Where each part lives: [`request`] the wire format (request, answer, a rank's slot);
//! [`commit`] the commit protocol (agreement of the ranks, refusal, one snapshot, one commit);
//! [`kept`] keeping aside what cannot be committed; [`layout`] what a checkpoint records of
//! the job's ranks. This file: the allocation's protocol state, its environment for the
//! program, answering requests, and the end of the allocation.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use super::events::SupervisorEvent;
use super::ranks;
use crate::storage::manifest::JobInfo;
use crate::storage::Store;

pub mod commit;
pub mod kept;
pub mod layout;
pub mod request;

pub use kept::keep_aside;
use kept::*;
pub use layout::{
    world_of, SavedWorld, Sharding, EXTRA_RANK_FILES, EXTRA_RESHARDABLE, EXTRA_SHARDED,
    EXTRA_WORLD_SIZE,
};
use request::*;
pub use request::{result_path, Answer, Request};

/// Where programs stage checkpoints, one dir per allocation.
pub const STAGING_DIR: &str = "staging";
/// Where staged files that could not be committed are kept.
pub const KEPT_DIR: &str = "kept";
/// Training metrics of committed requests, one JSON object a line.
pub use crate::storage::metrics::METRICS_FILE;

/// One allocation's side of the protocol, for every rank of the job.
///
/// A multi-rank job commits only when every rank has asked for the same step: the staged files
/// of all ranks (`rank<NNNNN>.<name>`, see [`ranks::rank_file`]) go into ONE checkpoint with one
/// manifest (`extra.world_size`), so a checkpoint never holds the files of only some ranks.
/// Every rank's request is answered with the same outcome.
#[derive(Debug)]
pub struct ChildProtocol {
    run_dir: PathBuf,
    token: String,
    slots: Vec<Slot>,
    /// Requests for steps below this are refused.
    floor: Option<u64>,
    allow_backwards: bool,
    job: Option<JobInfo>,
}

impl ChildProtocol {
    /// Set up this allocation's staging dirs, one per rank. Whatever earlier allocations left in
    /// `staging/` is kept aside first (never committed, never deleted). `resume_step` is the
    /// step the program resumes from (the floor of what it may commit).
    pub fn prepare(
        store: &mut Store,
        token: &str,
        world_size: u32,
        resume_step: Option<u64>,
        allow_backwards: bool,
        job: Option<JobInfo>,
    ) -> Result<ChildProtocol> {
        let run_dir = store.run_dir().root().to_path_buf();
        let root = run_dir.join(STAGING_DIR);
        keep_leftovers(store, &root)?;
        let mut slots = Vec::new();
        for rank in 0..world_size.max(1) {
            let t = ranks::rank_token(token, rank, world_size);
            let staging = root.join(&t);
            fs::create_dir_all(&staging)
                .with_context(|| format!("create {}", staging.display()))?;
            slots.push(Slot {
                rank,
                request: root.join(format!("{t}.request")),
                token: t,
                staging,
            });
        }
        Ok(ChildProtocol {
            run_dir,
            token: token.to_string(),
            slots,
            floor: resume_step,
            allow_backwards,
            job,
        })
    }

    pub fn world_size(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Rank `rank`'s staging dir.
    pub fn staging_of(&self, rank: u32) -> &Path {
        &self.slots[rank as usize].staging
    }

    /// Rank `rank`'s request file.
    pub fn request_of(&self, rank: u32) -> &Path {
        &self.slots[rank as usize].request
    }

    /// The staging dir of a 1-rank job (rank 0's).
    pub fn staging(&self) -> &Path {
        self.staging_of(0)
    }

    /// The request file of a 1-rank job (rank 0's).
    pub fn request_path(&self) -> &Path {
        self.request_of(0)
    }

    /// The protocol's environment for the program, the same for every rank
    /// (`HPC_CKPT_RESUME_FROM` is the caller's). A 1-rank job gets its staging and request here;
    /// a multi-rank one gets the world size and the prefix `hpc-ckpt rank` derives them from.
    pub fn env(&self, signal: &str) -> Vec<(&'static str, OsString)> {
        let mut env = vec![
            ("HPC_CKPT_RUN_DIR", self.run_dir.clone().into()),
            ("HPC_CKPT_SIGNAL", signal.into()),
        ];
        if self.world_size() == 1 {
            env.push(("HPC_CKPT_STAGING", self.staging().into()));
            env.push(("HPC_CKPT_COMMIT_REQUEST", self.request_path().into()));
        } else {
            let prefix = self.run_dir.join(STAGING_DIR).join(&self.token);
            env.push((ranks::ENV_WORLD_SIZE, self.world_size().to_string().into()));
            env.push((ranks::ENV_RANK_PREFIX, prefix.into()));
        }
        env
    }

    /// What rank `rank` gets besides [`Self::env`] when the supervisor starts it itself.
    pub fn rank_env(&self, rank: u32) -> Vec<(&'static str, OsString)> {
        let s = &self.slots[rank as usize];
        vec![
            (ranks::ENV_RANK, rank.to_string().into()),
            ("HPC_CKPT_STAGING", s.staging.clone().into()),
            ("HPC_CKPT_COMMIT_REQUEST", s.request.clone().into()),
        ]
    }

    /// Whether a request waits for an answer: every rank has asked (the only rank, for a 1-rank
    /// job). A multi-rank request set that never completes is settled by [`Self::finish`].
    pub fn has_request(&self) -> bool {
        self.slots.iter().all(Slot::has_request)
    }

    /// Answer the waiting requests of every rank: commit the staged files, or refuse, or fail —
    /// and in every case write each rank's result, empty its staging dir (committed, or kept
    /// aside) and remove its request. `Err` only when an answer itself cannot be written.
    pub fn answer(&mut self, store: &mut Store) -> Result<Answer> {
        let requests: Vec<_> = self.slots.iter().map(Slot::read_request).collect();
        let answer = match self.agreed(&requests) {
            Err(Answer::Failed { error }) => {
                let kept = self.keep_all(
                    store,
                    None,
                    &format!("the commit request was invalid: {error}"),
                )?;
                Answer::Failed {
                    error: with_kept(&error, kept.as_deref()),
                }
            }
            Err(Answer::Refused { reason }) => {
                tracing::error!(%reason, "commit requests refused");
                store.journal().append(&SupervisorEvent::RequestRefused {
                    step: None,
                    reason: reason.clone(),
                })?;
                let kept = self.keep_all(store, None, &reason)?;
                Answer::Refused {
                    reason: with_kept(&reason, kept.as_deref()),
                }
            }
            Err(other) => other,
            Ok((req, sharding)) => self.commit_or_refuse(store, &req, sharding)?,
        };
        let result = match &answer {
            Answer::Committed { name, .. } => json!({"ok": true, "checkpoint": name}),
            Answer::Refused { reason } => json!({"ok": false, "error": reason}),
            Answer::Failed { error } => json!({"ok": false, "error": error}),
        };
        for slot in &self.slots {
            slot.reply(&result)?;
        }
        Ok(answer)
    }

    /// Whether rank `rank` has a request waiting.
    pub fn has_asked(&self, rank: u32) -> bool {
        self.slots[rank as usize].has_request()
    }

    /// Settle a multi-rank request set that can no longer complete (the caller knows the ranks
    /// that did not ask have ended): nothing is committed, the journal names the ranks that
    /// never asked (`ranks_incomplete`), the askers are answered and their files kept aside.
    /// Returns the reason when there was such a set.
    pub fn settle_incomplete(&self, store: &mut Store) -> Result<Option<String>> {
        let asked: Vec<u32> = self
            .slots
            .iter()
            .filter(|s| s.has_request())
            .map(|s| s.rank)
            .collect();
        if asked.is_empty() || asked.len() == self.slots.len() {
            return Ok(None);
        }
        self.incomplete(store, &asked).map(Some)
    }

    /// The allocation is over (every rank has ended): a request set that never completed is
    /// settled ([`Self::settle_incomplete`]); files staged with no request are kept aside; the
    /// staging dirs and answer files are removed.
    pub fn finish(self, store: &mut Store) -> Result<Option<String>> {
        self.settle_incomplete(store)?;
        let mut kept = Vec::new();
        for slot in &self.slots {
            kept.extend(keep_aside(
                store,
                &slot.staging,
                &slot.token,
                None,
                &format!(
                    "the program staged files but wrote no commit request ({}): nothing was \
                     committed",
                    slot.request.display()
                ),
            )?);
            let _ = fs::remove_dir(&slot.staging);
            for p in [result_path(&slot.request), tmp_path(&slot.request)] {
                let _ = fs::remove_file(p);
            }
        }
        Ok((!kept.is_empty()).then(|| kept.join(", ")))
    }

    /// Some ranks asked for a commit, others never did: nothing is committed.
    fn incomplete(&self, store: &mut Store, asked: &[u32]) -> Result<String> {
        let missing: Vec<u32> = self
            .slots
            .iter()
            .map(|s| s.rank)
            .filter(|r| !asked.contains(r))
            .collect();
        let step = self
            .slots
            .iter()
            .filter(|s| s.has_request())
            .find_map(|s| s.read_request().ok())
            .map(|r| r.step);
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let reason = format!(
            "rank(s) {} asked for a commit{} but rank(s) {} never did before the program ended: \
             nothing was committed (a checkpoint holds every rank's files); the previous \
             checkpoint stays the resume point",
            list(asked),
            step.map(|s| format!(" of step {s}")).unwrap_or_default(),
            list(&missing)
        );
        tracing::error!(%reason, "incomplete multi-rank checkpoint");
        store.journal().append(&SupervisorEvent::RanksIncomplete {
            step,
            missing: missing.clone(),
            requested: asked.to_vec(),
            reason: reason.clone(),
        })?;
        for slot in self.slots.iter().filter(|s| s.has_request()) {
            let kept = slot.keep(store, step, &reason)?;
            slot.reply(&json!({"ok": false, "error": with_kept(&reason, kept.as_deref())}))?;
        }
        Ok(reason)
    }
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
        let mut p = ChildProtocol::prepare(&mut s, "a1", 1, Some(200), false, None).unwrap();
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
        let mut p = ChildProtocol::prepare(&mut s, "a1", 1, Some(200), true, None).unwrap();
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
        let p = ChildProtocol::prepare(&mut s, "a1", 1, None, false, None).unwrap();
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
        let p = ChildProtocol::prepare(&mut s, "a1", 1, None, false, None).unwrap();
        stage_and_request(&p, 7);
        drop(p); // the supervisor died before answering
        let p2 = ChildProtocol::prepare(&mut s, "a2", 1, None, false, None).unwrap();
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
        let mut p = ChildProtocol::prepare(&mut s, "a1", 1, None, false, None).unwrap();
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

    fn stage_rank(p: &ChildProtocol, rank: u32, step: u64, files: &[&str]) {
        for f in files {
            fs::write(p.staging_of(rank).join(f), format!("{rank}:{f}:{step}")).unwrap();
        }
        fs::write(p.request_of(rank), format!("{{\"step\": {step}}}")).unwrap();
    }

    #[test]
    fn ranks_commit_together_into_one_checkpoint_once_all_have_asked() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut p = ChildProtocol::prepare(&mut s, "a1", 2, None, false, None).unwrap();
        assert!(p.staging_of(1).ends_with("staging/a1-r00001"));
        stage_rank(&p, 0, 10, &["model.bin", "rng.bin"]);
        assert!(!p.has_request(), "rank 1 has not asked yet");
        stage_rank(&p, 1, 10, &["rng.bin"]);
        assert!(p.has_request());
        let Answer::Committed { name, .. } = p.answer(&mut s).unwrap() else {
            panic!()
        };
        let m =
            crate::storage::verify::verify_checkpoint(&s.run_dir().checkpoints_dir().join(&name))
                .unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "rank00000.model.bin",
                "rank00000.rng.bin",
                "rank00001.rng.bin"
            ]
        );
        assert_eq!(world_of(&m).world, 2);
        assert!(!world_of(&m).sharding.sharded);
        for r in 0..2 {
            assert!(!p.request_of(r).exists(), "answered");
            let res = fs::read_to_string(result_path(p.request_of(r))).unwrap();
            assert!(res.contains("\"ok\":true"), "{res}");
            assert!(
                p.staging_of(r).read_dir().unwrap().next().is_none(),
                "emptied"
            );
        }
        // A rank may stage nothing (replicated state from rank 0 alone), and say sharded.
        stage_rank(&p, 0, 20, &["model.bin"]);
        fs::write(p.request_of(1), "{\"step\": 20, \"sharded\": true}").unwrap();
        assert!(matches!(
            p.answer(&mut s).unwrap(),
            Answer::Committed { .. }
        ));
        let (l, m) = s.resume_point().unwrap().unwrap();
        assert_eq!((l.step, world_of(&m).world), (20, 2));
        assert!(world_of(&m).pinned(), "sharded, not reshardable");
    }

    #[test]
    fn dcp_files_keep_their_names_and_a_reshardable_request_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut p = ChildProtocol::prepare(&mut s, "a1", 2, None, false, None).unwrap();
        let reshardable = |p: &ChildProtocol, rank: u32, step: u64| {
            fs::write(
                p.request_of(rank),
                format!("{{\"step\": {step}, \"sharded\": true, \"reshardable\": true}}"),
            )
            .unwrap()
        };
        stage_rank(&p, 0, 4, &[".metadata", "__0_0.distcp", "state.json"]);
        stage_rank(&p, 1, 4, &["__1_0.distcp", "state.json"]);
        reshardable(&p, 0, 4);
        reshardable(&p, 1, 4);
        assert!(matches!(
            p.answer(&mut s).unwrap(),
            Answer::Committed { .. }
        ));
        let (_, m) = s.resume_point().unwrap().unwrap();
        let mut names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                ".metadata",
                "__0_0.distcp",
                "__1_0.distcp",
                "rank00000.state.json",
                "rank00001.state.json"
            ]
        );
        let w = world_of(&m);
        assert!(w.sharding.sharded && w.sharding.reshardable && !w.pinned());
        // One rank not reshardable: the checkpoint is pinned to its world size.
        stage_rank(&p, 0, 5, &["state.json"]);
        stage_rank(&p, 1, 5, &["state.json"]);
        reshardable(&p, 0, 5);
        fs::write(p.request_of(1), "{\"step\": 5, \"sharded\": true}").unwrap();
        p.answer(&mut s).unwrap();
        let (_, m) = s.resume_point().unwrap().unwrap();
        assert!(world_of(&m).pinned());
        // Two ranks staging one DCP name: nothing committed, both kept.
        stage_rank(&p, 0, 6, &[".metadata"]);
        stage_rank(&p, 1, 6, &[".metadata"]);
        let Answer::Failed { error } = p.answer(&mut s).unwrap() else {
            panic!()
        };
        assert!(
            error.contains("ranks 0 and 1 both staged \".metadata\""),
            "{error}"
        );
        assert_eq!(s.resume_point().unwrap().unwrap().0.step, 5);
    }

    #[test]
    fn ranks_asking_for_different_steps_are_refused_and_their_files_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let mut p = ChildProtocol::prepare(&mut s, "a1", 2, None, false, None).unwrap();
        stage_rank(&p, 0, 10, &["w.bin"]);
        stage_rank(&p, 1, 12, &["w.bin"]);
        let Answer::Refused { reason } = p.answer(&mut s).unwrap() else {
            panic!()
        };
        assert!(
            reason.contains("rank 0: step 10, rank 1: step 12") && reason.contains("kept in"),
            "{reason}"
        );
        assert!(s.run_dir().list().is_empty());
        assert_eq!(kept_events(d.path()).len(), 2, "each rank's files kept");
        let res = fs::read_to_string(result_path(p.request_of(1))).unwrap();
        assert!(res.contains("different steps"), "{res}");
    }

    #[test]
    fn a_rank_that_never_asks_leaves_nothing_committed_and_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let p = ChildProtocol::prepare(&mut s, "a1", 3, None, false, None).unwrap();
        stage_rank(&p, 0, 10, &["w.bin"]);
        stage_rank(&p, 2, 10, &["w.bin"]);
        fs::write(p.staging_of(1).join("w.bin"), b"half").unwrap(); // staged, never asked
        let req0 = p.request_of(0).to_path_buf();
        p.finish(&mut s).unwrap();
        assert!(s.run_dir().list().is_empty(), "nothing committed");
        let j = crate::storage::journal::read_all(d.path()).0;
        let inc: Vec<_> = j
            .iter()
            .filter(|e| e["event"] == "ranks_incomplete")
            .collect();
        assert_eq!(inc.len(), 1, "{j:?}");
        assert_eq!(inc[0]["missing"], json!([1]));
        assert_eq!(inc[0]["requested"], json!([0, 2]));
        assert_eq!(inc[0]["step"], 10);
        assert_eq!(
            kept_events(d.path()).len(),
            3,
            "every rank's staged files kept"
        );
        assert!(!req0.exists(), "answered");
    }
}
