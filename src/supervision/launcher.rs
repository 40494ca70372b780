//! What `hpc-ckpt` is when it starts: a launcher (`src/bin/hpc-ckpt.rs`, no libtorch) that
//! blocks the stop signals and `exec`s the real program, [`CORE`], which sits next to it.
//!
//! The real program links libtorch: ~0.3 s pass before its `main` (`hpc-ckpt --version`), and a
//! stop signal then used to kill the supervisor outright (exit 138: no journal, no commit, no
//! requeue, the end of a Slurm chain). Blocked by the launcher, the signal stays pending across
//! `exec` until [`super::signals::install`] has its handlers in place (or, for a command that
//! installs none, until `main` unblocks it). The real program also blocks them itself from an
//! ELF `.preinit_array` entry, before any library's initialiser, for when it is started
//! directly; that alone leaves ~15 ms (mapping and relocating libtorch), the launcher ~1 ms.
//!
//! Where the binary names itself (the sbatch script it writes, the `srun` rank shim, the built-in
//! trainer's ranks) it names the launcher ([`exe`]), so those start with the signals held too.

use std::path::PathBuf;

/// The real program's file name, next to the launcher `hpc-ckpt`.
pub const CORE: &str = "hpc-ckpt-core";
/// The launcher's file name: the command users run.
pub const LAUNCHER: &str = "hpc-ckpt";

/// The path to run this program by: the launcher next to this binary when this is [`CORE`] and
/// the launcher is there, else this binary.
pub fn exe() -> std::io::Result<PathBuf> {
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == CORE) {
        let launcher = me.with_file_name(LAUNCHER);
        if launcher.is_file() {
            return Ok(launcher);
        }
    }
    Ok(me)
}
