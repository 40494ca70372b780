//! `hpc-ckpt`, the command users run: a launcher that holds the stop signals, then becomes the
//! real program (`hpc-ckpt-core`, next to it).
//!
//! Why: the real program links libtorch, whose loading and static initialisers take ~0.3 s
//! before its `main` runs. A stop signal in that window (Slurm's warning to a job that just
//! started, a `scancel`) would take its default action and kill the supervisor: no journal, no
//! commit, no requeue. This launcher links no libtorch (its own start-up is ~1 ms): it blocks
//! USR1, USR2, TERM, INT and HUP first thing, then `execv`s the real program. A blocked signal
//! stays pending across `exec`; the real program unblocks them once its handlers are installed
//! (`wrap`, `train`, `train-rank`) or at once (every other command), and the pending signal is
//! delivered then. See `hpc_ckpt::supervision::launcher`.
//!
//! It must not use the `hpc_ckpt` library (that would link libtorch): it repeats the one name it
//! needs, [`CORE`], and calls `execv` itself (std's `Command::exec` empties the signal mask
//! before `exec`, which would deliver the pending signal here).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

use nix::libc;

/// The real program's file name (`hpc_ckpt::supervision::launcher::CORE`).
const CORE: &str = "hpc-ckpt-core";

fn main() {
    // SAFETY: sigemptyset/sigaddset fill a local set; sigprocmask is a plain syscall.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let core = match std::env::current_exe() {
        Ok(me) => me.with_file_name(CORE),
        Err(e) => fail(&format!("cannot locate this binary: {e}")),
    };
    let cstr = |b: &[u8]| CString::new(b).unwrap_or_else(|_| fail("an argument holds a NUL byte"));
    let path = cstr(core.as_os_str().as_bytes());
    // argv[0] as given, so the real program names itself as the user called it.
    let args: Vec<CString> = std::env::args_os().map(|a| cstr(a.as_bytes())).collect();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a null-terminated array that outlive the call.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    let e = std::io::Error::last_os_error();
    fail(&format!(
        "cannot run {}: {e} (hpc-ckpt runs {CORE}, which must sit next to it: `cargo build` \
         builds both; copy or install both)",
        core.display()
    ))
}

fn fail(msg: &str) -> ! {
    eprintln!("hpc-ckpt: {msg}");
    std::process::exit(1)
}
