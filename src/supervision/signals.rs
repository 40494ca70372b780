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
use signal_hook::iterator::Signals;

pub use crate::sig::Sig;

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
