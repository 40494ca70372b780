//! The `hpc-ckpt` binary: logging set-up, then [`hpc_ckpt::cli`].

use std::io::IsTerminal;

use clap::Parser;

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
    std::process::exit(hpc_ckpt::cli::run(cli));
}
