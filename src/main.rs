//! `hpc-ckpt-core`, the real program the launcher `hpc-ckpt` execs (`src/bin/hpc-ckpt.rs`): stop
//! signals held from before libtorch loads, logging set-up, then [`hpc_ckpt::cli`].

use std::io::IsTerminal;

use clap::Parser;
use hpc_ckpt::cli::Command;
use hpc_ckpt::supervision::signals;

/// Runs before any shared library's initialiser (libtorch's take ~0.3 s): blocks the stop
/// signals, so one sent while the binary starts stays pending until `wrap`/`train` have their
/// handlers. The launcher has blocked them already; this covers a start without it
/// (`supervision::launcher` says what is left of the window either way).
/// glibc calls `.preinit_array` entries of the executable with `(argc, argv, envp)`.
#[used]
#[link_section = ".preinit_array"]
static HOLD_STOP_SIGNALS: extern "C" fn(i32, *const *const u8, *const *const u8) = hold;

extern "C" fn hold(_: i32, _: *const *const u8, _: *const *const u8) {
    signals::block_stop();
}

fn main() {
    // Ranks other than 0 of a multi-rank job say only what goes wrong: progress is rank 0's.
    let quiet_rank =
        std::env::var(hpc_ckpt::supervision::ranks::ENV_RANK).is_ok_and(|r| r.trim() != "0");
    let filter = tracing_subscriber::EnvFilter::try_from_env("HPC_CKPT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if quiet_rank { "warn" } else { "info" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let cli = hpc_ckpt::cli::Cli::parse();
    // The supervisor (`wrap`, `train`) and the built-in trainer's ranks unblock the stop signals
    // once their handlers are installed; every other command takes them as it always did.
    let handles_signals = match &cli.command {
        Command::Wrap(_) => true,
        #[cfg(feature = "torch")]
        Command::Train(_) | Command::TrainRank(_) => true,
        _ => false,
    };
    if !handles_signals {
        signals::unblock_stop();
    }
    std::process::exit(hpc_ckpt::cli::run(cli));
}
