//! Two-phase saves (DESIGN, "Two-phase saves"): for the length of a scope the store belongs to a
//! persister thread, which commits the snapshots it is handed one at a time while the caller goes
//! on working.
//!
//! Phase 1 is the caller's: copy the state into host buffers ([`Buffers`]) and hand the
//! [`Snapshot<'static>`] over ([`Persister::submit`]). Phase 2 is the thread's: [`Store::commit`],
//! the full protocol, so the pointer and retention move only after the checkpoint is durable and
//! the store journals its own commit. The store is single-writer: during the scope only the
//! persister thread touches it, and the scope gives it back when the thread has ended.
//!
//! Guarantees:
//! - at most one persist is in flight: [`Persister::submit`] refuses a second one (the caller
//!   [`Persister::wait`]s first — that wait is what a save costs beyond its copy);
//! - the buffers are the persister's and are reused: when a persist ends, its snapshot's bytes come
//!   back and [`Persister::buffers`] lends them to the next copy, so a caller that waits before it
//!   copies never holds more than one state's worth;
//! - the outcome of every submitted snapshot is returned exactly once, by [`Persister::poll`] or
//!   [`Persister::wait`];
//! - the persister thread (and the checksum thread it starts) runs at a lower CPU priority
//!   ([`PERSIST_NICE`] above the caller's): on a machine with few cores the checksum and the copies
//!   into the page cache yield to the training thread instead of slowing its steps;
//! - when the scope ends — normally, by an error, or by a panic — the persist in flight is
//!   finished, never abandoned (a SIGKILL is the store's crash story: the previous checkpoint
//!   stays the resume point).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::error::{Result, StorageError};
use super::run_dir::Store;
use super::writer::{CommitMeta, CommitReport, FileSource, Snapshot};

/// How one persist ended.
#[derive(Debug)]
pub struct Persisted {
    pub step: u64,
    pub result: Result<CommitReport>,
    /// Seconds from the hand-over to the end of the commit (durable, or failed).
    pub seconds: f64,
}

/// What [`Persister::wait`] found.
#[derive(Debug)]
pub struct Waited {
    /// The persist that was in flight (None: there was none).
    pub persisted: Option<Persisted>,
    /// How long the caller was blocked.
    pub waited: Duration,
}

struct Job {
    snapshot: Snapshot<'static>,
    meta: CommitMeta,
    handed_over: Instant,
}

struct Done {
    persisted: Persisted,
    snapshot: Snapshot<'static>,
}

/// The caller's side of the persister thread; see the module doc.
pub struct Persister {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// The step in flight.
    in_flight: Option<u64>,
    /// The bytes of the last snapshot persisted, for the next copy.
    spare: Option<Snapshot<'static>>,
}

/// Run `f` with a persister that owns `store` until `f` returns and the persist in flight (if any)
/// has ended.
pub fn scope<R>(store: &mut Store, f: impl FnOnce(&mut Persister) -> R) -> R {
    std::thread::scope(|s| {
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(1);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(1);
        let thread = std::thread::Builder::new()
            .name("hpc-ckpt-persist".into())
            .spawn_scoped(s, move || {
                lower_priority();
                for job in job_rx {
                    let result = store.commit(&job.snapshot, &job.meta);
                    let persisted = Persisted {
                        step: job.meta.step,
                        result,
                        seconds: job.handed_over.elapsed().as_secs_f64(),
                    };
                    let done = Done {
                        persisted,
                        snapshot: job.snapshot,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the persister thread");
        let mut p = Persister {
            jobs: Some(job_tx),
            done: done_rx,
            in_flight: None,
            spare: None,
        };
        let r = f(&mut p);
        // Closing the channel ends the thread once the persist in flight is done.
        p.jobs = None;
        let _ = thread.join();
        r
    })
}

/// How much nicer than its caller the persister thread runs (see the module doc).
pub const PERSIST_NICE: i32 = 10;

/// Lower the calling thread's CPU priority by [`PERSIST_NICE`] (Linux: a nice value is per
/// thread, and threads it starts inherit it). Best effort: a failure is logged and ignored.
/// Also for the trainer's other background writers (a rank's staging thread).
pub fn lower_priority() {
    use nix::libc;
    // SAFETY: plain syscalls about this very thread (its kernel thread id).
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + PERSIST_NICE).min(19))
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the persister thread's priority");
    }
}

impl Persister {
    /// The step whose persist is in flight.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// The host buffers of the last snapshot persisted (empty before the first), for the next
    /// copy to reuse. Take them after [`Persister::wait`], so that only one state's worth exists.
    pub fn buffers(&mut self) -> Buffers {
        self.spare.take().map(Buffers::from).unwrap_or_default()
    }

    /// Hand `snapshot` over to be committed as `meta.step` in the background. Refused while a
    /// persist is in flight.
    pub fn submit(&mut self, snapshot: Snapshot<'static>, meta: CommitMeta) -> Result<()> {
        if let Some(step) = self.in_flight {
            return Err(StorageError::Invalid(format!(
                "the checkpoint of step {step} is still being persisted; wait for it before \
                 handing over step {}",
                meta.step
            )));
        }
        let step = meta.step;
        let job = Job {
            snapshot,
            meta,
            handed_over: Instant::now(),
        };
        let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return Err(gone(step));
        }
        self.in_flight = Some(step);
        Ok(())
    }

    /// The outcome of the persist in flight if it has ended; never blocks.
    pub fn poll(&mut self) -> Option<Persisted> {
        let step = self.in_flight?;
        match self.done.try_recv() {
            Ok(d) => Some(self.finished(d)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(self.lost(step)),
        }
    }

    /// Block until the persist in flight (if any) has ended; says how long that took.
    pub fn wait(&mut self) -> Waited {
        let started = Instant::now();
        let persisted = self.in_flight.map(|step| match self.done.recv() {
            Ok(d) => self.finished(d),
            Err(_) => self.lost(step),
        });
        Waited {
            persisted,
            waited: started.elapsed(),
        }
    }

    fn finished(&mut self, d: Done) -> Persisted {
        self.in_flight = None;
        self.spare = Some(d.snapshot);
        d.persisted
    }

    /// The thread ended without an answer (it panicked).
    fn lost(&mut self, step: u64) -> Persisted {
        self.in_flight = None;
        Persisted {
            step,
            result: Err(gone(step)),
            seconds: 0.0,
        }
    }
}

fn gone(step: u64) -> StorageError {
    StorageError::Invalid(format!(
        "the persister thread ended before committing step {step} (it panicked; see the log)"
    ))
}

/// Host buffers of an earlier snapshot, by file and tensor name, for the next snapshot's copies.
/// Whatever the next snapshot does not take is freed with this value.
#[derive(Debug, Default)]
pub struct Buffers {
    tensors: HashMap<(String, String), Vec<u8>>,
    files: HashMap<String, Vec<u8>>,
}

impl From<Snapshot<'static>> for Buffers {
    fn from(s: Snapshot<'static>) -> Buffers {
        let mut b = Buffers::default();
        for (file, src) in s.files {
            match src {
                FileSource::Tensors { tensors, .. } => {
                    for t in tensors {
                        b.tensors
                            .insert((file.clone(), t.name), t.bytes.into_owned());
                    }
                }
                FileSource::Bytes(bytes) => {
                    b.files.insert(file, bytes.into_owned());
                }
                FileSource::CopyOf(_) | FileSource::Adopt(_) => {}
            }
        }
        b
    }
}

impl Buffers {
    /// A buffer of `len` bytes for tensor `tensor` of file `file`: the earlier snapshot's when
    /// it is large enough (its content is stale: the caller overwrites all of it), else a new
    /// one.
    pub fn tensor(&mut self, file: &str, tensor: &str, len: usize) -> Vec<u8> {
        let old = self.tensors.remove(&(file.to_owned(), tensor.to_owned()));
        sized(old, len)
    }

    /// A buffer of `len` bytes for the raw file `file` (see [`Buffers::tensor`]).
    pub fn file(&mut self, file: &str, len: usize) -> Vec<u8> {
        sized(self.files.remove(file), len)
    }
}

fn sized(old: Option<Vec<u8>>, len: usize) -> Vec<u8> {
    match old {
        Some(mut v) if v.capacity() >= len => {
            v.resize(len, 0);
            v
        }
        _ => vec![0u8; len],
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use super::*;
    use crate::storage::run_dir::holder;
    use crate::storage::safetensors::Dtype;
    use crate::storage::{RetentionPolicy, TensorData};

    fn snapshot(bufs: &mut Buffers, fill: u8) -> Snapshot<'static> {
        let mut bytes = bufs.tensor("m.safetensors", "w", 1 << 20);
        bytes.fill(fill);
        let mut s = Snapshot::new();
        s.add(
            "m.safetensors",
            FileSource::Tensors {
                tensors: vec![TensorData {
                    name: "w".into(),
                    dtype: Dtype::U8,
                    shape: vec![1 << 20],
                    bytes: Cow::Owned(bytes),
                }],
                metadata: BTreeMap::new(),
            },
        );
        s
    }

    fn meta(step: u64) -> CommitMeta {
        CommitMeta {
            step,
            ..CommitMeta::default()
        }
    }

    #[test]
    fn one_in_flight_buffers_come_back_and_every_outcome_is_returned() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(d.path(), &holder(None), RetentionPolicy::default()).unwrap();
        scope(&mut store, |p| {
            assert!(p.wait().persisted.is_none());
            let mut b = p.buffers();
            p.submit(snapshot(&mut b, 1), meta(1)).unwrap();
            assert_eq!(p.in_flight(), Some(1));
            let e = p.submit(snapshot(&mut b, 2), meta(2)).unwrap_err();
            assert!(
                e.to_string().contains("step 1 is still being persisted"),
                "{e}"
            );
            let w = p.wait();
            let done = w.persisted.unwrap();
            assert_eq!(done.step, 1);
            assert_eq!(done.result.unwrap().name, "step-000000000001");
            assert!(p.poll().is_none());
            // The bytes of step 1 are lent to step 2's copy.
            let mut b = p.buffers();
            let reused = b.tensor("m.safetensors", "w", 1 << 20);
            assert!(reused.iter().all(|&x| x == 1));
            p.submit(snapshot(&mut Buffers::default(), 2), meta(2))
                .unwrap();
        });
        // The scope finished the persist in flight.
        let (listed, m) = store.resume_point().unwrap().unwrap();
        assert_eq!((listed.step, m.step), (2, 2));
    }

    /// The nice value of this process's thread named `name` (from /proc).
    fn nice_of(name: &str) -> Option<i32> {
        for t in fs_read_dir("/proc/self/task") {
            // Other tests' threads come and go meanwhile: one that ended is skipped.
            let Ok(stat) = std::fs::read_to_string(t.join("stat")) else {
                continue;
            };
            let Some((comm, rest)) = stat.split_once(") ") else {
                continue;
            };
            if comm.ends_with(&format!("({name}")) {
                // After "pid (comm) ": state is field 3; nice is field 19.
                return rest.split(' ').nth(19 - 3).and_then(|n| n.parse().ok());
            }
        }
        None
    }

    fn fs_read_dir(p: &str) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    #[test]
    fn the_persister_thread_runs_nicer_than_its_caller() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(d.path(), &holder(None), RetentionPolicy::default()).unwrap();
        // SAFETY: a plain syscall about the calling thread (who 0).
        let mine = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
        scope(&mut store, |p| {
            // The thread lowers its priority first thing; a persist round trip orders that.
            p.submit(snapshot(&mut Buffers::default(), 1), meta(1))
                .unwrap();
            assert!(p.wait().persisted.unwrap().result.is_ok());
            let nice = nice_of("hpc-ckpt-persis").expect("the persister thread in /proc");
            assert_eq!(nice, (mine + PERSIST_NICE).min(19));
        });
    }

    #[test]
    fn a_failed_persist_is_returned_and_the_store_stays_usable() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(d.path(), &holder(None), RetentionPolicy::default()).unwrap();
        scope(&mut store, |p| {
            let mut s = Snapshot::new();
            s.add("../evil", FileSource::Bytes(Cow::Owned(vec![1])));
            p.submit(s, meta(3)).unwrap();
            let done = p.wait().persisted.unwrap();
            assert_eq!(done.step, 3);
            assert!(done.result.is_err());
            p.submit(snapshot(&mut Buffers::default(), 4), meta(4))
                .unwrap();
            let done = loop {
                if let Some(d) = p.poll() {
                    break d;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            assert!(done.result.is_ok());
        });
        assert_eq!(store.resume_point().unwrap().unwrap().0.step, 4);
    }
}
