//! Collectives across ranks on an existing engine: libtorch's own c10d `ProcessGroupGloo` (the
//! engine behind `torch.distributed`'s `gloo` backend), through the small C++ file
//! `collective.cpp`. No network protocol of our own: the store (rendezvous) and the transport
//! are c10d's and Gloo's.
//!
//! Surface, deliberately tiny: [`ProcessGroup::connect`] (a `c10d::TCPStore` at host:port with
//! rank 0 its server, or a `c10d::FileStore` on a shared path), [`ProcessGroup::all_reduce_sum`]
//! and [`ProcessGroup::broadcast`] of a contiguous CPU tensor in place, [`ProcessGroup::barrier`];
//! dropping the group destroys it.
//!
//! Guarantees:
//! - **Identical on every rank.** After `all_reduce_sum` every rank holds the same bits: Gloo's
//!   ring all-reduce reduces each chunk once, along the ring, then copies the reduced chunk to
//!   the other ranks (checked bit for bit with 3 ranks, where the order of a float sum matters).
//! - **Deterministic.** The reduction order depends only on the world size, the ranks and the
//!   tensor's size, not on arrival order or timing: the same inputs give the same bits, call after
//!   call and run after run. A different world size may round differently.
//! - **Bounded waits.** `timeout` bounds joining (the store's connect and Gloo's rendezvous:
//!   a peer that never comes is an error after `timeout`, not a hang) and each later collective.
//! - **Errors, not aborts.** Everything libtorch or Gloo raises comes back as a
//!   [`CollectiveError`] naming the rank, the operation and the tensor; no C++ exception crosses
//!   the FFI boundary.
//!
//! As with every c10d group, all ranks must issue the same collectives in the same order with
//! tensors of the same size and dtype; a mismatch is undefined (usually a timeout).
//!
//! Caveat: the torch wheel has Gloo's code inside `libtorch_cpu.so` but not its headers;
//! `collective.cpp` compiles against Debian's `libgloo-dev`, which is older than the Gloo torch
//! 2.13 was built with. That is sound only while `collective.cpp` touches no Gloo type's layout or
//! inline code (Gloo objects are created by libtorch and held through `shared_ptr`; only
//! out-of-line c10d functions are called), so keep this surface tiny and every function of it
//! tested (`tests/it/collective.rs` runs real ranks).
//!
//! Safety argument: the group is an opaque heap object created by `hpc_ckpt_pg_new` and freed
//! exactly once by `hpc_ckpt_pg_free` in [`Drop`]; tensors are passed as tch's `C_tensor`
//! (`torch::Tensor*`), valid for the call, borrowed mutably because the collective writes into
//! them, neither stored nor freed by the C++ side.

use std::ffi::{c_char, c_void, CString};
use std::fmt;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use super::ffi::take_message;

extern "C" {
    fn hpc_ckpt_pg_new(
        host: *const c_char,
        port: u16,
        file_path: *const c_char,
        device_host: *const c_char,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn hpc_ckpt_pg_free(group: *mut c_void);
    fn hpc_ckpt_pg_all_reduce_sum(group: *mut c_void, t: *mut C_tensor) -> *mut c_char;
    fn hpc_ckpt_pg_broadcast(group: *mut c_void, t: *mut C_tensor, root: i32) -> *mut c_char;
    fn hpc_ckpt_pg_barrier(group: *mut c_void) -> *mut c_char;
}

/// Where the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// A `c10d::TCPStore`: rank 0 listens on `port` (on all interfaces) and waits for the others,
    /// which connect to `host:port` (under Slurm: the first node of the job).
    Tcp { host: String, port: u16 },
    /// A `c10d::FileStore`: a file on a file system every rank sees; a fresh path per group (a
    /// leftover file from an earlier group confuses the rendezvous).
    File(PathBuf),
}

impl fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rendezvous::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Rendezvous::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// How to join a group.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous: Rendezvous,
    /// Bounds joining and every collective.
    pub timeout: Duration,
    /// The hostname or address Gloo binds this rank's transport to and announces to its peers.
    /// `None`: Gloo's default (this machine's hostname, else loopback).
    pub device_host: Option<String>,
}

/// A failed collective operation, with its context.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("invalid process group options: {0}")]
    Invalid(String),
    #[error(
        "rank {rank} of {world_size} could not join the process group at {rendezvous} \
         (timeout {timeout:?}): {message}"
    )]
    Connect {
        rank: usize,
        world_size: usize,
        rendezvous: String,
        timeout: Duration,
        message: String,
    },
    #[error("rank {rank} of {world_size}: {op} of {tensor} failed: {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        world_size: usize,
        /// dtype and shape, e.g. `Float [1048576]`, or `-` for a barrier.
        tensor: String,
        message: String,
    },
}

/// One rank's membership of a c10d Gloo process group.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: NonNull<c_void>,
    rank: usize,
    world_size: usize,
}

// SAFETY: the C++ group (ProcessGroupGloo and its store) has no thread affinity and c10d's
// process groups are used from any thread; `&mut self` on every collective keeps calls serial.
unsafe impl Send for ProcessGroup {}

fn cstring(what: &str, s: &str) -> Result<CString, CollectiveError> {
    CString::new(s).map_err(|_| CollectiveError::Invalid(format!("{what} contains a NUL byte")))
}

fn describe(t: &Tensor) -> String {
    match t.f_kind() {
        Ok(k) => format!("{k:?} {:?}", t.size()),
        Err(_) => "an undefined tensor".to_owned(),
    }
}

impl ProcessGroup {
    /// Join the group: blocks until all `world_size` ranks have joined, or fails after
    /// `timeout`.
    pub fn connect(opts: &ConnectOptions) -> Result<ProcessGroup, CollectiveError> {
        let ConnectOptions {
            rank,
            world_size,
            rendezvous,
            timeout,
            device_host,
        } = opts;
        if *world_size == 0 || rank >= world_size || *world_size > i32::MAX as usize {
            return Err(CollectiveError::Invalid(format!(
                "rank {rank} is not in [0, {world_size})"
            )));
        }
        if timeout.is_zero() {
            return Err(CollectiveError::Invalid("timeout must be > 0".into()));
        }
        let timeout_ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let (host, port, file) = match rendezvous {
            Rendezvous::Tcp { host, port } => (Some(cstring("host", host)?), *port, None),
            Rendezvous::File(p) => {
                let s = p.to_str().ok_or_else(|| {
                    CollectiveError::Invalid(format!("store path {} is not UTF-8", p.display()))
                })?;
                (None, 0, Some(cstring("store path", s)?))
            }
        };
        let device = device_host
            .as_deref()
            .map(|h| cstring("device host", h))
            .transpose()?;
        let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the strings are NUL-terminated and outlive the call (the C++ side copies them);
        // `out` is a valid place for the group pointer.
        let err = unsafe {
            hpc_ckpt_pg_new(
                ptr(&host),
                port,
                ptr(&file),
                ptr(&device),
                *rank as i32,
                *world_size as i32,
                timeout_ms,
                &mut out,
            )
        };
        let connect_err = |message: String| CollectiveError::Connect {
            rank: *rank,
            world_size: *world_size,
            rendezvous: rendezvous.to_string(),
            timeout: *timeout,
            message,
        };
        if let Some(message) = take_message(err) {
            return Err(connect_err(message));
        }
        let raw = NonNull::new(out).ok_or_else(|| connect_err("no group came back".into()))?;
        Ok(ProcessGroup {
            raw,
            rank: *rank,
            world_size: *world_size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn result(
        &self,
        op: &'static str,
        tensor: String,
        err: *mut c_char,
    ) -> Result<(), CollectiveError> {
        match take_message(err) {
            None => Ok(()),
            Some(message) => Err(CollectiveError::Collective {
                op,
                rank: self.rank,
                world_size: self.world_size,
                tensor,
                message,
            }),
        }
    }

    /// Sum `t` over all ranks, in place: afterwards every rank holds the same sum, bit for bit.
    /// `t` must be a contiguous CPU tensor of the same dtype and shape on every rank.
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        // SAFETY: see the module doc; the group and the tensor are valid for the call.
        let err = unsafe { hpc_ckpt_pg_all_reduce_sum(self.raw.as_ptr(), t.as_mut_ptr()) };
        self.result("all_reduce_sum", describe(t), err)
    }

    /// Copy `root`'s `t` into every other rank's `t` (same dtype and shape everywhere).
    pub fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Invalid(format!(
                "broadcast root {root} is not a rank of {}",
                self.world_size
            )));
        }
        // SAFETY: as in all_reduce_sum.
        let err = unsafe { hpc_ckpt_pg_broadcast(self.raw.as_ptr(), t.as_mut_ptr(), root as i32) };
        self.result("broadcast", describe(t), err)
    }

    /// Wait until every rank has reached its barrier.
    pub fn barrier(&mut self) -> Result<(), CollectiveError> {
        // SAFETY: the group is valid.
        let err = unsafe { hpc_ckpt_pg_barrier(self.raw.as_ptr()) };
        self.result("barrier", "-".into(), err)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by hpc_ckpt_pg_new, freed only here.
        unsafe { hpc_ckpt_pg_free(self.raw.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn opts(rank: usize, world_size: usize, path: PathBuf) -> ConnectOptions {
        ConnectOptions {
            rank,
            world_size,
            rendezvous: Rendezvous::File(path),
            timeout: Duration::from_secs(20),
            device_host: Some("127.0.0.1".into()),
        }
    }

    #[test]
    fn a_group_of_one_reduces_broadcasts_and_refuses_bad_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let mut pg = ProcessGroup::connect(&opts(0, 1, dir.path().join("store"))).unwrap();
        assert_eq!((pg.rank(), pg.world_size()), (0, 1));
        let mut t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
        pg.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.5, -2.0, 3.25]);
        pg.broadcast(&mut t, 0).unwrap();
        pg.barrier().unwrap();
        assert!(matches!(
            pg.broadcast(&mut t, 1),
            Err(CollectiveError::Invalid(_))
        ));
        let mut strided = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)).tr();
        let e = pg.all_reduce_sum(&mut strided).unwrap_err().to_string();
        assert!(
            e.contains("rank 0 of 1: all_reduce_sum of Float [4, 4] failed")
                && e.contains("contiguous"),
            "{e}"
        );
    }

    #[test]
    fn bad_options_are_refused_before_any_io() {
        let dir = tempfile::tempdir().unwrap();
        let e = ProcessGroup::connect(&opts(2, 2, dir.path().join("s"))).unwrap_err();
        assert!(e.to_string().contains("rank 2 is not in [0, 2)"), "{e}");
        let mut o = opts(0, 1, dir.path().join("s"));
        o.timeout = Duration::ZERO;
        assert!(ProcessGroup::connect(&o).is_err());
    }
}
