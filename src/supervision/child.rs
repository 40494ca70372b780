//! The supervised program: spawned in its own process group so that a signal reaches it and
//! everything it started (data-loader workers, `torchrun` ranks), and reaped without blocking.
//!
//! Nothing of the program outlives its supervisor, even a supervisor killed with SIGKILL:
//! - the program itself: before `exec` it asks the kernel for SIGKILL when its parent dies
//!   (`PR_SET_PDEATHSIG`), then checks that its parent is still the supervisor that forked it
//!   (a supervisor killed between fork and `prctl` would otherwise be missed);
//! - what it started (a shell's children without `exec`, data-loader workers, a launcher's
//!   ranks): the death signal reaches the direct child only, so each group has a guard. The
//!   guard is a process forked from the supervisor (no `exec`: only async-signal-safe calls)
//!   that joins the program's group, blocks every signal it can, closes every descriptor but the
//!   read end of a pipe whose only write end the supervisor holds, and sleeps in `read`. When the
//!   supervisor dies, however it dies, the kernel closes that write end: `read` returns and the
//!   guard sends SIGKILL to the whole group (itself included). The supervisor lets the guard go
//!   the same way when the program's main process has ended (or when it drops the group), so
//!   what the program left running in its group ends with it. Being a member, the guard also
//!   keeps the group's id from being reused while the group may still be signalled.
//!
//!   Why not the alternatives: `PR_SET_CHILD_SUBREAPER` on the supervisor does nothing once the
//!   supervisor itself is dead; a cgroup is not available to an unprivileged process everywhere
//!   (inside Slurm the job's cgroup does end everything with the job, and still does); a death
//!   signal on a helper ties the cleanup to the helper's *parent thread*, the pipe to the process.
//!   The limit: a descendant that leaves the group (`setsid`, `setpgid`) is out of the guard's
//!   reach — inside Slurm the job's cgroup ends it with the step.
//!
//! A stop signal in the program's first moments would kill it before it has installed its
//! handlers (a Python program is importing torch). So the program is told where to say it is
//! ready ([`ENV_READY_FILE`]: it creates that file once its handlers are in place; the Python
//! package and [`super::client::say_ready`] do), and the supervisor holds a forwarded stop
//! signal for a program that has not said so yet ([`Team::forward`], [`Team::release`]): until
//! the file appears, at the latest the caller's wait after the program started (`signals.
//! ready_seconds`, 10 s unless the job says) and never longer than the caller's bound (half the
//! grace period). A program that knows nothing of hpc-ckpt never says so: it gets the signal at
//! that bound — late only when the signal comes within its first seconds. Escalations (TERM at
//! the end of the grace, KILL) are never held.
//!
//! A [`Team`] is every group of one program: the only one (a 1-rank program, `srun`, a
//! launcher), or one per rank when the supervisor starts the ranks itself. Signals go to every
//! group; the team has ended when every member has.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The file a program creates once it handles its stop signals (absent: not ready yet).
pub const ENV_READY_FILE: &str = "HPC_CKPT_READY_FILE";

/// A running child process group.
pub struct ChildGroup {
    child: Child,
    pub started: Instant,
    guard: Option<Guard>,
    /// Where the program says it is ready ([`ENV_READY_FILE`]); `None`: always ready.
    ready: Option<PathBuf>,
    held: Option<Held>,
}

/// A stop signal held until the program is ready.
#[derive(Debug, Clone, Copy)]
struct Held {
    signal: Signal,
    since: Instant,
    until: Instant,
}

/// A held signal that went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The member (rank) it went to.
    pub rank: u32,
    pub signal: Signal,
    /// How long it was held.
    pub held: Duration,
    /// Whether the program had said it was ready (else the bound ran out).
    pub ready: bool,
}

/// The guard of one process group (see the module doc): its pid and the pipe's write end.
struct Guard {
    pid: libc::pid_t,
    pgid: libc::pid_t,
    pipe: Option<OwnedFd>,
}

impl Guard {
    /// Fork the guard of group `pgid`.
    fn start(pgid: libc::pid_t) -> std::io::Result<Guard> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let keep = rd.as_raw_fd();
        // SAFETY: the child runs `guard_main` only, which makes async-signal-safe calls and
        // never returns (fork in a multi-threaded process).
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe { guard_main(pgid, keep) },
            pid => {
                drop(rd);
                Ok(Guard {
                    pid,
                    pgid,
                    pipe: Some(wr),
                })
            }
        }
    }

    /// Let the guard go and kill the group: the guard would, but this supervisor is alive and
    /// does it itself (a stopped guard could not); then reap the guard. The group's id cannot
    /// have been reused: the guard, a member, is not reaped yet.
    fn release(&mut self) {
        if self.pipe.take().is_some() {
            // SAFETY: plain syscalls on our own group and child.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
            let mut status = 0;
            // SAFETY: waiting for our own child.
            while unsafe { libc::waitpid(self.pid, &mut status, 0) } == -1
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
    }
}

/// The guard's whole life, in the forked child: async-signal-safe calls only.
unsafe fn guard_main(pgid: libc::pid_t, pipe: libc::c_int) -> ! {
    let mut all = std::mem::zeroed::<libc::sigset_t>();
    libc::sigfillset(&mut all);
    libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    libc::prctl(libc::PR_SET_NAME, c"hpc-ckpt-guard".as_ptr());
    libc::setpgid(0, pgid);
    // Every other descriptor closed: no other guard's write end, no file of the supervisor.
    let below = pipe == 0 || libc::syscall(libc::SYS_close_range, 0u32, pipe as u32 - 1, 0u32) == 0;
    let above = libc::syscall(libc::SYS_close_range, pipe as u32 + 1, u32::MAX, 0u32) == 0;
    if !(below && above) {
        for fd in (0..65536).filter(|&fd| fd != pipe) {
            libc::close(fd);
        }
    }
    let mut b = [0u8; 1];
    loop {
        let n = libc::read(pipe, b.as_mut_ptr().cast(), 1);
        if n > 0 || (n < 0 && *libc::__errno_location() == libc::EINTR) {
            continue;
        }
        break;
    }
    libc::kill(-pgid, libc::SIGKILL);
    libc::_exit(0)
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
    /// Spawn `cmd` as the leader of a new process group that dies with this process, with its
    /// guard. `ready`: where the program says it handles its stop signals ([`ENV_READY_FILE`]);
    /// `None` when it need not (it is ready from the start).
    ///
    /// The death signal is tied to the calling *thread* (the kernel's rule): spawn from the
    /// thread that supervises the child until it is reaped.
    pub fn spawn(mut cmd: Command, ready: Option<PathBuf>) -> std::io::Result<ChildGroup> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        if let Some(r) = &ready {
            let _ = std::fs::remove_file(r);
            cmd.env(ENV_READY_FILE, r);
        }
        let parent = nix::unistd::getpid();
        // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid.
        unsafe {
            cmd.pre_exec(move || {
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
        let mut group = ChildGroup {
            started: Instant::now(),
            guard: None,
            ready,
            held: None,
            child,
        };
        // On error the group is dropped: killed and reaped.
        group.guard = Some(Guard::start(group.child.id() as libc::pid_t)?);
        Ok(group)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `sig` to the whole group (ignoring a group that is already gone).
    pub fn signal(&self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Non-blocking: the exit, if the child has ended. Once it has, what it left running in
    /// its group is killed (its guard let go).
    pub fn poll(&mut self) -> std::io::Result<Option<Exit>> {
        let exit = self.child.try_wait()?.map(Exit::from_status);
        if exit.is_some() {
            self.held = None;
            if let Some(g) = &mut self.guard {
                g.release();
            }
        }
        Ok(exit)
    }

    /// Whether the program said it handles its stop signals.
    pub fn is_ready(&self) -> bool {
        self.ready.as_ref().is_none_or(|p| p.exists())
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

    /// Send `sig` to every member's group that is still running, now (an escalation): a
    /// signal still held for a member is dropped, this one supersedes it.
    pub fn signal(&mut self, sig: Signal) {
        for (m, e) in self.members.iter_mut().zip(&self.exits) {
            m.held = None;
            if e.is_none() {
                m.signal(sig);
            }
        }
    }

    /// Forward a stop signal: at once to the members that said they are ready, held for the
    /// others until they do, or until `ready_wait` after they started, and never after
    /// `latest`. Returns the members it is held for.
    pub fn forward(
        &mut self,
        sig: Signal,
        now: Instant,
        ready_wait: Duration,
        latest: Instant,
    ) -> Vec<u32> {
        let mut held = Vec::new();
        for (i, (m, e)) in self.members.iter_mut().zip(&self.exits).enumerate() {
            if e.is_some() {
                continue;
            }
            let until = (m.started + ready_wait).min(latest);
            if m.is_ready() || now >= until {
                m.signal(sig);
            } else {
                m.held = Some(Held {
                    signal: sig,
                    since: now,
                    until,
                });
                held.push(i as u32);
            }
        }
        held
    }

    /// The latest instant a held signal goes out, if one is held.
    pub fn hold_deadline(&self) -> Option<Instant> {
        self.members
            .iter()
            .filter_map(|m| m.held.map(|h| h.until))
            .max()
    }

    /// Send the held signals whose member is ready now or whose bound ran out.
    pub fn release(&mut self, now: Instant) -> Vec<Released> {
        let mut out = Vec::new();
        for (i, (m, e)) in self.members.iter_mut().zip(&self.exits).enumerate() {
            let Some(h) = m.held else { continue };
            if e.is_some() {
                m.held = None;
                continue;
            }
            let ready = m.is_ready();
            if ready || now >= h.until {
                m.held = None;
                m.signal(h.signal);
                out.push(Released {
                    rank: i as u32,
                    signal: h.signal,
                    held: now - h.since,
                    ready,
                });
            }
        }
        out
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
        if let Some(g) = &mut self.guard {
            g.release();
        }
        if let Some(r) = &self.ready {
            let _ = std::fs::remove_file(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    fn wait_exit(team: &mut Team) -> Exit {
        let t = Instant::now();
        while team.running() {
            team.poll().unwrap();
            assert!(t.elapsed() < Duration::from_secs(20), "still running");
            std::thread::sleep(Duration::from_millis(5));
        }
        team.exit()
    }

    /// Whether `pid` is a live process (not a zombie).
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with(['Z', 'X']))
        })
    }

    #[test]
    fn what_the_leader_left_in_its_group_ends_with_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; exit 0", f.display());
        let mut team = Team::new(vec![ChildGroup::spawn(sh(&script), None).unwrap()]);
        assert_eq!(wait_exit(&mut team), Exit::Code(0));
        let pid: i32 = std::fs::read_to_string(&f).unwrap().trim().parse().unwrap();
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !alive(pid),
            "the background sleep {pid} outlived its group's leader"
        );
    }

    #[test]
    fn a_held_signal_goes_out_once_the_program_says_it_is_ready() {
        let d = tempfile::tempdir().unwrap();
        let ready = d.path().join("a.ready");
        let script = r#"sleep 0.3; trap 'exit 3' USR1; : > "$HPC_CKPT_READY_FILE"; while :; do sleep 0.01; done"#;
        let mut team = Team::new(vec![ChildGroup::spawn(sh(script), Some(ready)).unwrap()]);
        let t0 = Instant::now();
        let held = team.forward(Signal::SIGUSR1, t0, TEN, t0 + Duration::from_secs(20));
        assert_eq!(held, vec![0]);
        assert!(team.hold_deadline().is_some());
        let released = loop {
            let r = team.release(Instant::now());
            if !r.is_empty() {
                break r;
            }
            assert!(team.poll().unwrap().is_empty(), "died of the held signal?");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(released.len(), 1);
        assert!(released[0].ready && released[0].held >= Duration::from_millis(250));
        assert_eq!(wait_exit(&mut team), Exit::Code(3));
    }

    /// The default `signals.ready_seconds`.
    const TEN: Duration = Duration::from_secs(10);

    #[test]
    fn a_program_that_never_says_ready_gets_the_signal_at_the_bound() {
        let d = tempfile::tempdir().unwrap();
        // The bound is the sooner of the caller's (half the grace) and the ready wait counted
        // from the program's start: here the one, then the other.
        let t200 = Duration::from_millis(200);
        for (ready_wait, latest) in [(TEN, t200), (t200, Duration::from_secs(20))] {
            let ready = d.path().join("a.ready");
            let mut team = Team::new(vec![ChildGroup::spawn(sh("sleep 30"), Some(ready)).unwrap()]);
            let t0 = team.members[0].started;
            let bound = t0 + t200;
            assert_eq!(
                team.forward(Signal::SIGUSR1, t0, ready_wait, t0 + latest),
                vec![0]
            );
            assert_eq!(team.hold_deadline(), Some(bound));
            assert!(team.release(t0 + Duration::from_millis(100)).is_empty());
            std::thread::sleep(bound.saturating_duration_since(Instant::now()));
            let r = team.release(Instant::now());
            assert_eq!(r.len(), 1);
            assert!(!r[0].ready);
            assert_eq!(wait_exit(&mut team), Exit::Signal(libc::SIGUSR1));
        }
    }

    #[test]
    fn a_ready_program_gets_the_signal_at_once_and_escalations_are_never_held() {
        let mut team = Team::new(vec![ChildGroup::spawn(sh("sleep 30"), None).unwrap()]);
        let t0 = Instant::now();
        assert!(team
            .forward(Signal::SIGUSR1, t0, TEN, t0 + Duration::from_secs(20))
            .is_empty());
        assert_eq!(wait_exit(&mut team), Exit::Signal(libc::SIGUSR1));

        let d = tempfile::tempdir().unwrap();
        let ready = d.path().join("b.ready");
        let mut team = Team::new(vec![ChildGroup::spawn(sh("sleep 30"), Some(ready)).unwrap()]);
        assert_eq!(
            team.forward(Signal::SIGUSR1, t0, TEN, t0 + Duration::from_secs(20)),
            vec![0]
        );
        team.signal(Signal::SIGTERM);
        assert!(
            team.hold_deadline().is_none(),
            "the escalation supersedes the held signal"
        );
        assert_eq!(wait_exit(&mut team), Exit::Signal(libc::SIGTERM));
    }
}
