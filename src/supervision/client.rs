//! The program's side of the child protocol (README, "Child protocol"), for programs written in
//! Rust — the built-in trainer's ranks (`hpc-ckpt train-rank`). The supervisor's side is
//! [`super::protocol`]; the Python package `hpc_ckpt` is the same protocol for Python programs.
//!
//! Guarantees:
//! - a request is written atomically (`<request>.tmp`, fsync, rename): the supervisor never
//!   reads half of one;
//! - [`Client::commit`] returns only once the supervisor has answered (the request removed, the
//!   answer in `<request>.result`), with the checkpoint's name, or the supervisor's reason as an
//!   error; a supervisor that is gone (the parent process changed) is an error, not a hang;
//! - [`say_ready`] tells the supervisor this process handles its stop signals now: until then
//!   the supervisor holds a stop signal back (bounded, see [`super::child`]) instead of killing
//!   the program with it during its start-up.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::child::ENV_READY_FILE;
use super::protocol::{result_path, Request};
use super::ranks::{ENV_RANK, ENV_WORLD_SIZE};
use crate::storage::fsutil::replace_file_durable;

/// How often the answer is looked for.
const POLL: Duration = Duration::from_millis(5);
/// How often a long wait is logged.
const WAIT_LOG: Duration = Duration::from_secs(30);

/// Say "ready": create the file `HPC_CKPT_READY_FILE` names (nothing when it is unset: not
/// under `wrap`). Call it once the stop signals' handlers are installed. Best effort: a file
/// that cannot be created only means the supervisor waits for its bound.
pub fn say_ready() {
    if let Some(path) = std::env::var_os(ENV_READY_FILE).filter(|p| !p.is_empty()) {
        if let Err(e) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&path))
        {
            tracing::warn!(file = %Path::new(&path).display(), error = %e,
                "cannot tell the supervisor this process is ready for stop signals");
        }
    }
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the child protocol: {0}")]
    Env(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the supervisor (parent process) is gone; the commit request {0} will not be answered"
    )]
    SupervisorGone(PathBuf),
    #[error("the supervisor did not commit step {step}: {reason}")]
    Refused { step: u64, reason: String },
}

/// This process's end of the protocol, from the variables the supervisor (or `hpc-ckpt rank`)
/// set.
#[derive(Debug, Clone)]
pub struct Client {
    pub rank: u32,
    pub world_size: u32,
    pub run_dir: PathBuf,
    pub staging: PathBuf,
    pub request: PathBuf,
    /// The checkpoint to resume from (`HPC_CKPT_RESUME_FROM`), if any.
    pub resume_from: Option<PathBuf>,
    parent: u32,
}

impl Client {
    /// The protocol's variables of this process; an error names the missing one.
    pub fn from_env() -> Result<Client, ClientError> {
        Client::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Client, ClientError> {
        let need = |k: &str| {
            get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
                ClientError::Env(format!(
                    "{k} is not set: this command runs as a child of `hpc-ckpt wrap`, which sets it"
                ))
            })
        };
        let num = |k: &str| -> Result<u32, ClientError> {
            match get(k) {
                None => Ok(if k == ENV_WORLD_SIZE { 1 } else { 0 }),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| ClientError::Env(format!("{k}={v:?} is not a number"))),
            }
        };
        let (rank, world_size) = (num(ENV_RANK)?, num(ENV_WORLD_SIZE)?);
        if rank >= world_size.max(1) {
            return Err(ClientError::Env(format!(
                "{ENV_RANK}={rank} is not below {ENV_WORLD_SIZE}={world_size}"
            )));
        }
        Ok(Client {
            rank,
            world_size: world_size.max(1),
            run_dir: need("HPC_CKPT_RUN_DIR")?.into(),
            staging: need("HPC_CKPT_STAGING")?.into(),
            request: need("HPC_CKPT_COMMIT_REQUEST")?.into(),
            resume_from: get("HPC_CKPT_RESUME_FROM")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            parent: std::os::unix::process::parent_id(),
        })
    }

    /// Where this process stages the files of its next checkpoint.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Ask for a commit of what is staged and wait for the answer: the checkpoint's name.
    pub fn commit(&self, req: &Request) -> Result<String, ClientError> {
        self.post(req)?;
        self.await_answer(req.step)
    }

    fn post(&self, req: &Request) -> Result<(), ClientError> {
        let json = serde_json::to_vec(req).expect("a request serializes");
        replace_file_durable(&self.request, &json).map_err(|e| ClientError::Io {
            what: format!("write the commit request {}", self.request.display()),
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn await_answer(&self, step: u64) -> Result<String, ClientError> {
        let (started, mut logged) = (Instant::now(), Instant::now());
        while self.request.symlink_metadata().is_ok() {
            if std::os::unix::process::parent_id() != self.parent {
                return Err(ClientError::SupervisorGone(self.request.clone()));
            }
            if logged.elapsed() >= WAIT_LOG {
                logged = Instant::now();
                tracing::warn!(
                    step,
                    seconds = started.elapsed().as_secs(),
                    "still waiting for the supervisor to commit"
                );
            }
            std::thread::sleep(POLL);
        }
        let path = result_path(&self.request);
        let text = fs::read(&path).map_err(|source| ClientError::Io {
            what: format!("read the supervisor's answer {}", path.display()),
            source,
        })?;
        let answer: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| ClientError::Io {
                what: format!("parse the supervisor's answer {}", path.display()),
                source: std::io::Error::other(e),
            })?;
        if answer["ok"] == serde_json::Value::Bool(true) {
            Ok(answer["checkpoint"]
                .as_str()
                .unwrap_or_default()
                .to_string())
        } else {
            Err(ClientError::Refused {
                step,
                reason: answer["error"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_environment_names_what_is_missing() {
        let e = Client::from_vars(vars(&[("HPC_CKPT_RUN_DIR", "/r")])).unwrap_err();
        assert!(e.to_string().contains("HPC_CKPT_STAGING"), "{e}");
        let base = [
            ("HPC_CKPT_RUN_DIR", "/r"),
            ("HPC_CKPT_STAGING", "/r/staging/a"),
            ("HPC_CKPT_COMMIT_REQUEST", "/r/staging/a.request"),
        ];
        let c = Client::from_vars(vars(&base)).unwrap();
        assert_eq!((c.rank, c.world_size, c.resume_from), (0, 1, None));
        let mut v = base.to_vec();
        v.extend([(ENV_RANK, "2"), (ENV_WORLD_SIZE, "2")]);
        let e = Client::from_vars(vars(&v)).unwrap_err();
        assert!(e.to_string().contains("not below"), "{e}");
    }

    #[test]
    fn a_commit_waits_for_the_answer_and_reports_a_refusal() {
        let d = tempfile::tempdir().unwrap();
        let request = d.path().join("a.request");
        let c = Client {
            rank: 0,
            world_size: 1,
            run_dir: d.path().into(),
            staging: d.path().join("a"),
            request: request.clone(),
            resume_from: None,
            parent: std::os::unix::process::parent_id(),
        };
        for (answer, want) in [
            (
                r#"{"ok": true, "checkpoint": "step-00000007"}"#,
                Ok("step-00000007"),
            ),
            (r#"{"ok": false, "error": "disk full"}"#, Err("disk full")),
        ] {
            let req = request.clone();
            let supervisor = std::thread::spawn(move || {
                while !req.exists() {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let asked: Request = serde_json::from_slice(&fs::read(&req).unwrap()).unwrap();
                fs::write(result_path(&req), answer).unwrap();
                fs::remove_file(&req).unwrap();
                asked.step
            });
            let got = c.commit(&Request {
                step: 7,
                ..Default::default()
            });
            assert_eq!(supervisor.join().unwrap(), 7);
            match (got, want) {
                (Ok(name), Ok(w)) => assert_eq!(name, w),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{e}"),
                (got, want) => panic!("{got:?} vs {want:?}"),
            }
        }
    }
}
