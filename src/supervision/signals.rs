//! OS signals as events on a crossbeam channel.
//!
//! The handler installed by signal-hook only writes to a self-pipe; a dedicated thread turns each
//! delivery into a [`Sig`] on the channel, and the supervisor acts on it at its next loop turn —
//! never inside a handler. Once installed, these signals no longer kill the process.

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

/// Install handlers for every [`Sig`] and return the channel they feed.
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
