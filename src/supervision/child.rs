//! The supervised program: spawned in its own process group so that a signal reaches it and
//! everything it started (data-loader workers, `torchrun` ranks), and reaped without blocking.

use std::process::{Child, Command, ExitStatus};
use std::time::Instant;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A running child process group.
pub struct ChildGroup {
    child: Child,
    pub started: Instant,
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn from_status(s: ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            _ => Exit::Code(-1),
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    pub fn describe(self) -> String {
        match self {
            Exit::Code(c) => format!("exit code {c}"),
            Exit::Signal(s) => format!(
                "killed by signal {}",
                Signal::try_from(s)
                    .map(|x| x.as_str().to_string())
                    .unwrap_or(s.to_string())
            ),
        }
    }
}

impl ChildGroup {
    /// Spawn `cmd` as the leader of a new process group.
    pub fn spawn(mut cmd: Command) -> std::io::Result<ChildGroup> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd.spawn()?;
        Ok(ChildGroup {
            child,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `sig` to the whole group (ignoring a group that is already gone).
    pub fn signal(&self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Non-blocking: the exit, if the child has ended.
    pub fn poll(&mut self) -> std::io::Result<Option<Exit>> {
        Ok(self.child.try_wait()?.map(Exit::from_status))
    }
}

impl Drop for ChildGroup {
    fn drop(&mut self) {
        // Never leave an orphaned group behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
