//! The signals hpc-ckpt handles, by name: the one list of signal names. A bottom-floor module
//! (no other module of the crate below it): the job config parses `signals.warn`/`signals.child`
//! into [`Sig`], and supervision installs handlers for them (`supervision::signals`).

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

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

    pub(crate) fn from_raw(r: i32) -> Option<Sig> {
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
