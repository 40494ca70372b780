//! OS signals as events on a crossbeam channel.
//!
//! The handler installed by signal-hook only writes to a self-pipe; a dedicated thread turns each
//! delivery into a [`Sig`] on the channel, and the supervisor acts on it at its next loop turn —
//! never inside a handler. Once installed, these signals no longer kill the process.
//!
//! Start-up. The stop signals are blocked before the torch-linked program's ~0.3 s of start-up
//! (by the launcher `hpc-ckpt`, and by [`block_stop`] from an ELF `.preinit_array` entry in
//! `main.rs`; see [`super::launcher`]): a signal sent then stays pending. [`install`] unblocks
//! them once its handlers are in place, and the pending signal reaches the handler; a command
//! that installs no handlers unblocks them first thing in `main` ([`unblock_stop`]), so it
//! behaves as it always did.

use crossbeam_channel::{unbounded, Receiver};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

/// The signals the supervisor handles: the one list of signal names (the job config's
/// `signals.warn`/`signals.child` are parsed into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Usr1,
    Usr2,
    Term,
    Int,
    Hup,
}

impl Sig {
    pub const ALL: [Sig; 5] = [Sig::Usr1, Sig::Usr2, Sig::Term, Sig::Int, Sig::Hup];

    pub fn name(self) -> &'static str {
        match self {
            Sig::Usr1 => "USR1",
            Sig::Usr2 => "USR2",
            Sig::Term => "TERM",
            Sig::Int => "INT",
            Sig::Hup => "HUP",
        }
    }

    /// Parse a name as written in the config (`USR1`, `SIGUSR1`, case-insensitive).
    pub fn from_name(s: &str) -> Option<Sig> {
        let u = s.trim().to_ascii_uppercase();
        let u = u.strip_prefix("SIG").unwrap_or(&u);
        Sig::ALL.into_iter().find(|x| x.name() == u)
    }

    pub fn raw(self) -> i32 {
        match self {
            Sig::Usr1 => SIGUSR1,
            Sig::Usr2 => SIGUSR2,
            Sig::Term => SIGTERM,
            Sig::Int => SIGINT,
            Sig::Hup => SIGHUP,
        }
    }

    fn from_raw(r: i32) -> Option<Sig> {
        Sig::ALL.into_iter().find(|x| x.raw() == r)
    }

    pub fn to_nix(self) -> nix::sys::signal::Signal {
        nix::sys::signal::Signal::try_from(self.raw()).expect("valid signal number")
    }
}

impl std::fmt::Display for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sig, D::Error> {
        let s = String::deserialize(d)?;
        Sig::from_name(&s).ok_or_else(|| {
            let names: Vec<&str> = Sig::ALL.iter().map(|x| x.name()).collect();
            serde::de::Error::custom(format!("{s:?} is not one of {}", names.join(", ")))
        })
    }
}

/// The set of every [`Sig`].
fn stop_set() -> nix::libc::sigset_t {
    use nix::libc;
    // SAFETY: sigemptyset/sigaddset only write the set they are given.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in Sig::ALL {
            libc::sigaddset(&mut set, s.raw());
        }
        set
    }
}

/// Block every [`Sig`] in the calling thread (threads it starts inherit the mask). Safe to call
/// before `main` (only `sigprocmask`; no allocation, no std): the `.preinit_array` entry.
pub fn block_stop() {
    let set = stop_set();
    // SAFETY: a plain syscall wrapper on a valid set.
    unsafe {
        nix::libc::sigprocmask(nix::libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Unblock every [`Sig`] in the calling thread: a signal that arrived while they were blocked
/// is delivered now (to the handler, or with its default action where none is installed).
pub fn unblock_stop() {
    let set = stop_set();
    // SAFETY: as in block_stop.
    unsafe {
        nix::libc::sigprocmask(nix::libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Install handlers for every [`Sig`] and return the channel they feed; then unblock them (a
/// stop signal that came during start-up, held by [`block_stop`], is delivered now).
pub fn install() -> std::io::Result<Receiver<Sig>> {
    let mut signals = Signals::new(Sig::ALL.map(Sig::raw))?;
    let (tx, rx) = unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for raw in signals.forever() {
                if let Some(s) = Sig::from_raw(raw) {
                    if tx.send(s).is_err() {
                        break;
                    }
                }
            }
        })?;
    unblock_stop();
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(Sig::from_name("sigusr2"), Some(Sig::Usr2));
        assert_eq!(Sig::from_name("TERM"), Some(Sig::Term));
        assert_eq!(Sig::from_name("KILL"), None);
    }
}
