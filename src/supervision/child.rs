//! The supervised program: spawned in its own process group so that a signal reaches it and
//! everything it started (data-loader workers, `torchrun` ranks), and reaped without blocking.
//!
//! The program dies with its supervisor: before `exec` the child asks the kernel for SIGKILL
//! when its parent dies (`PR_SET_PDEATHSIG`), then checks that its parent is still the
//! supervisor that forked it (a supervisor killed between fork and `prctl` would otherwise be
//! missed). So a supervisor killed with SIGKILL never leaves its program training on and writing
//! into the run dir beside the next allocation's. The death signal reaches the direct child only;
//! what it started itself (a shell's children, data-loader workers) must watch its own parent —
//! inside Slurm, the job's cgroup ends them with the step.
//!
//! A [`Team`] is every group of one program: the only one (a 1-rank program, `srun`, a
//! launcher), or one per rank when the supervisor starts the ranks itself. Signals go to every
//! group; the team has ended when every member has.

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
    /// Spawn `cmd` as the leader of a new process group that dies with this process.
    ///
    /// The death signal is tied to the calling *thread* (the kernel's rule): spawn from the
    /// thread that supervises the child until it is reaped.
    pub fn spawn(mut cmd: Command) -> std::io::Result<ChildGroup> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let parent = nix::unistd::getpid();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid.
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent.as_raw() {
                    // The supervisor died before the death signal was armed.
                    return Err(std::io::Error::other(
                        "the supervisor exited during start-up",
                    ));
                }
                Ok(())
            });
        }
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

/// The process groups of one program, by rank (one member unless ranks are started locally).
pub struct Team {
    members: Vec<ChildGroup>,
    /// How each member ended, once it has.
    exits: Vec<Option<Exit>>,
    /// Members in the order they ended.
    order: Vec<usize>,
    pub started: Instant,
}

impl Team {
    pub fn new(members: Vec<ChildGroup>) -> Team {
        Team {
            exits: vec![None; members.len()],
            order: Vec::new(),
            members,
            started: Instant::now(),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(ChildGroup::pid).collect()
    }

    /// Send `sig` to every member's group that is still running.
    pub fn signal(&self, sig: Signal) {
        for (m, e) in self.members.iter().zip(&self.exits) {
            if e.is_none() {
                m.signal(sig);
            }
        }
    }

    /// Non-blocking: reap the members that ended; returns them (index, exit).
    pub fn poll(&mut self) -> std::io::Result<Vec<(u32, Exit)>> {
        let mut ended = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            if self.exits[i].is_none() {
                if let Some(e) = m.poll()? {
                    self.exits[i] = Some(e);
                    self.order.push(i);
                    ended.push((i as u32, e));
                }
            }
        }
        Ok(ended)
    }

    /// Whether member `i` has ended.
    pub fn ended(&self, i: u32) -> bool {
        self.exits.get(i as usize).is_some_and(Option::is_some)
    }

    /// Whether every member has ended.
    pub fn done(&self) -> bool {
        self.exits.iter().all(Option::is_some)
    }

    /// Whether some member is still running.
    pub fn running(&self) -> bool {
        !self.done()
    }

    /// The program's exit: the first member to fail, else success.
    pub fn exit(&self) -> Exit {
        self.order
            .iter()
            .filter_map(|&i| self.exits[i])
            .find(|e| !e.success())
            .unwrap_or(Exit::Code(0))
    }

    /// How the program ended, in words (per rank when there are several, first to end first).
    pub fn describe(&self) -> String {
        if self.members.len() == 1 {
            return self.exits[0].map_or("still running".into(), Exit::describe);
        }
        if self.exits.iter().all(|e| e.is_some_and(Exit::success)) {
            return "every rank: exit code 0".into();
        }
        self.order
            .iter()
            .filter_map(|&i| self.exits[i].map(|e| format!("rank {i}: {}", e.describe())))
            .collect::<Vec<_>>()
            .join("; ")
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
