//! The ranks of a multi-rank job: how they start, what each one is told, and how their files are
//! named in the one checkpoint they share. No torch, no network: collectives are the program's
//! (torch.distributed), rank start-up is `srun`'s or the program's own launcher's.
//!
//! Guarantees:
//! - every rank gets the same child protocol as a 1-rank program (its own `HPC_CKPT_STAGING` and
//!   `HPC_CKPT_COMMIT_REQUEST`, the same `HPC_CKPT_RESUME_FROM`) plus `HPC_CKPT_RANK` and
//!   `HPC_CKPT_WORLD_SIZE`; a 1-rank job is started exactly as before (no shim, no `srun`);
//! - a rank's files are committed as `rank<NNNNN>.<name>` ([`rank_file`]): plain names, one
//!   flat directory, never two ranks' files under one name; the files torch.distributed.checkpoint
//!   writes keep DCP's own names ([`committed_name`]), which DCP makes unique across ranks, so
//!   plain `dcp.load(checkpoint_id=<checkpoint dir>)` reads the checkpoint;
//! - the `hpc-ckpt rank` shim ([`rank_env`]) refuses to start a rank whose launcher disagrees
//!   with the supervisor on the world size, or that has no rank number.

use std::collections::BTreeMap;
use std::ffi::OsString;

use crate::config::Launcher;

/// The rank of this process, 0-based.
pub const ENV_RANK: &str = "HPC_CKPT_RANK";
/// The number of ranks of the job.
pub const ENV_WORLD_SIZE: &str = "HPC_CKPT_WORLD_SIZE";
/// The world size of the checkpoint in `HPC_CKPT_RESUME_FROM` (1 for a 1-rank checkpoint).
pub const ENV_RESUME_WORLD_SIZE: &str = "HPC_CKPT_RESUME_WORLD_SIZE";
/// Internal, supervisor → shim: rank r stages into `<prefix>-rNNNNN` and requests at
/// `<prefix>-rNNNNN.request`.
pub const ENV_RANK_PREFIX: &str = "HPC_CKPT_RANK_PREFIX";
/// `hpc-ckpt rank` is the shim's subcommand.
pub const SHIM: &str = "rank";

/// How this allocation starts its program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// One rank: the program alone, as a child (the 1-rank protocol, unchanged).
    Single,
    /// `srun … hpc-ckpt rank -- CMD`: one Slurm step of N tasks.
    Srun,
    /// N children started by the supervisor on this machine.
    Local,
    /// The program launches its N ranks itself (each through `hpc-ckpt rank`).
    Command,
}

impl Launch {
    /// What `distributed.launcher` means for `world` ranks, inside a Slurm job or not.
    pub fn resolve(launcher: Launcher, world: u32, in_slurm: bool) -> Launch {
        match launcher {
            Launcher::Auto if world <= 1 => Launch::Single,
            Launcher::Auto if in_slurm => Launch::Srun,
            Launcher::Auto | Launcher::Local if world <= 1 => Launch::Single,
            Launcher::Auto | Launcher::Local => Launch::Local,
            Launcher::Srun => Launch::Srun,
            Launcher::Command => Launch::Command,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Launch::Single => "single",
            Launch::Srun => "srun",
            Launch::Local => "local",
            Launch::Command => "command",
        }
    }
}

/// The token of rank `rank`'s staging dir and request (`<token>` alone for a 1-rank job).
pub fn rank_token(token: &str, rank: u32, world: u32) -> String {
    if world <= 1 {
        token.to_string()
    } else {
        format!("{token}-r{rank:05}")
    }
}

/// The name under which rank `rank`'s staged file `name` is committed (multi-rank jobs).
pub fn rank_file(rank: u32, name: &str) -> String {
    format!("rank{rank:05}.{name}")
}

/// Is `name` a file of torch.distributed.checkpoint's file-system layout: its metadata file
/// (`.metadata`, written by the coordinator rank only) or a shard file `__<rank>_<n>.distcp`
/// (DCP puts the writing rank in the name)?
pub fn is_dcp_file(name: &str) -> bool {
    if name == crate::storage::manifest::DCP_METADATA_FILE {
        return true;
    }
    let Some(stem) = name
        .strip_prefix("__")
        .and_then(|n| n.strip_suffix(".distcp"))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    stem.split_once('_')
        .is_some_and(|(r, k)| digits(r) && digits(k))
}

/// The name in the one checkpoint of rank `rank`'s staged file `name`: DCP's files keep their
/// names (unique across ranks by DCP's construction, and where DCP's readers look), every other
/// file is [`rank_file`]'s.
pub fn committed_name(rank: u32, name: &str) -> String {
    if is_dcp_file(name) {
        name.to_string()
    } else {
        rank_file(rank, name)
    }
}

/// The rank whose file a committed multi-rank file name is: `rank<NNNNN>.` files, DCP shard
/// files by the rank DCP put in their name, DCP's metadata by its coordinator (rank 0).
pub fn rank_of_file(name: &str) -> Option<u32> {
    if let Some((r, _)) = parse_rank_file(name) {
        return Some(r);
    }
    if name == crate::storage::manifest::DCP_METADATA_FILE {
        return Some(0);
    }
    is_dcp_file(name)
        .then(|| name[2..].split_once('_')?.0.parse().ok())
        .flatten()
}

/// The rank and staged name of a committed multi-rank file name, if it is one.
pub fn parse_rank_file(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("rank")?;
    let (digits, file) = rest.split_once('.')?;
    if digits.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) || file.is_empty() {
        return None;
    }
    Some((digits.parse().ok()?, file))
}

/// The `srun` command line that starts `world` ranks of `command` through the shim `exe`.
pub fn srun_command(world: u32, exe: &str, command: &[String]) -> Vec<String> {
    let mut c: Vec<String> = [
        "srun",
        &format!("--ntasks={world}"),
        "--kill-on-bad-exit=1",
        "--export=ALL",
        exe,
        SHIM,
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    c.extend(command.iter().cloned());
    c
}

/// The conventional torch.distributed variables (`env://`) for rank `rank` of `world` started
/// locally, each only where the supervisor's own environment does not set it already.
pub fn local_dist_env(
    rank: u32,
    world: u32,
    master_port: u16,
    have: impl Fn(&str) -> bool,
) -> Vec<(&'static str, String)> {
    [
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("LOCAL_WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", master_port.to_string()),
    ]
    .into_iter()
    .filter(|(k, _)| !have(k))
    .collect()
}

/// A TCP port that was free a moment ago, for `MASTER_PORT` (torch.distributed's store). Rank
/// start-up is the program's; this only saves it from picking a port itself.
///
/// Rank 0 binds it a second or more later, so the port is drawn at random *below* the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`): a port that `bind(0)` hands out is handed
/// out again to any outgoing connection in the meantime (seen as EADDRINUSE when chains ran side
/// by side), while one below the range is only ever taken by a program that asks for it by
/// number. Falls back to `bind(0)` when no such port is free after 64 draws.
pub fn free_port() -> std::io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let (ephemeral_low, _) = ephemeral_range();
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(1));
    if high > low {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        for i in 0..64u64 {
            h.write_u64(i);
            let port = low + (h.finish() % u64::from(high - low + 1)) as u16;
            if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The kernel's ephemeral port range (Linux's default when it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The shim's work: from the launcher's variables (`RANK`/`WORLD_SIZE` of a torchrun-style
/// launcher, else `SLURM_PROCID`/`SLURM_NTASKS` of srun) and the supervisor's
/// (`HPC_CKPT_WORLD_SIZE`, the staging prefix), the variables rank r gets. `get` reads the
/// environment.
pub fn rank_env(get: impl Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>, String> {
    let num = |k: &str| -> Result<Option<u32>, String> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{k}={v:?} is not a number")),
        }
    };
    let prefix = get(ENV_RANK_PREFIX).ok_or_else(|| {
        format!(
            "{ENV_RANK_PREFIX} is not set: `hpc-ckpt {SHIM}` runs inside a multi-rank job of \
             `hpc-ckpt wrap` (distributed.world_size > 1), which sets it"
        )
    })?;
    let world = num(ENV_WORLD_SIZE)?.ok_or_else(|| format!("{ENV_WORLD_SIZE} is not set"))?;
    let (rank, their_world, from) = match (num("RANK")?, num("WORLD_SIZE")?) {
        (Some(r), Some(w)) => (r, w, "RANK/WORLD_SIZE"),
        _ => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            (Some(r), Some(w)) => (r, w, "SLURM_PROCID/SLURM_NTASKS"),
            _ => {
                return Err(
                    "no rank: neither RANK and WORLD_SIZE (torchrun-style launchers) nor \
                     SLURM_PROCID and SLURM_NTASKS (srun) are set"
                        .into(),
                )
            }
        },
    };
    if their_world != world {
        return Err(format!(
            "the launcher started {their_world} ranks ({from}) but the job has {world} \
             (distributed.world_size / slurm.ntasks): a checkpoint needs every rank's files"
        ));
    }
    if rank >= world {
        return Err(format!(
            "rank {rank} ({from}) is not below the world size {world}"
        ));
    }
    let slot = format!("{prefix}-r{rank:05}");
    let mut out = vec![
        (ENV_RANK.to_string(), rank.to_string()),
        ("HPC_CKPT_STAGING".to_string(), slot.clone()),
        (
            "HPC_CKPT_COMMIT_REQUEST".to_string(),
            format!("{slot}.request"),
        ),
    ];
    // srun alone: give torch.distributed's env:// its conventional names too.
    for (k, v) in [
        ("RANK", Some(rank.to_string())),
        ("WORLD_SIZE", Some(world.to_string())),
        ("LOCAL_RANK", get("SLURM_LOCALID")),
    ] {
        if let (None, Some(v)) = (get(k), v) {
            out.push((k.to_string(), v));
        }
    }
    Ok(out)
}

/// `hpc-ckpt rank -- CMD`: set this rank's variables and replace this process with CMD (so
/// the launcher's signals reach the program itself). Returns only on failure.
pub fn exec_rank(command: &[String]) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    if command.is_empty() {
        return anyhow::anyhow!("no command: `hpc-ckpt {SHIM} -- CMD [ARGS…]`");
    }
    let vars: BTreeMap<String, OsString> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .collect();
    let env = match rank_env(|k| vars.get(k).and_then(|v| v.to_str()).map(String::from)) {
        Ok(e) => e,
        Err(e) => return anyhow::anyhow!("hpc-ckpt {SHIM}: {e}"),
    };
    let e = std::process::Command::new(&command[0])
        .args(&command[1..])
        .envs(env)
        .exec();
    anyhow::anyhow!("hpc-ckpt {SHIM}: cannot run {:?}: {e}", command[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn get<'a>(out: &'a [(String, String)], k: &str) -> Option<&'a str> {
        out.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_master_port_is_free_and_below_the_ephemeral_range() {
        let (low, _) = ephemeral_range();
        for _ in 0..20 {
            let p = free_port().unwrap();
            assert!(
                p >= 10_000 && p < low,
                "port {p}, ephemeral range from {low}"
            );
            std::net::TcpListener::bind(("0.0.0.0", p)).unwrap();
        }
    }

    #[test]
    fn launch_resolution() {
        use Launcher::*;
        assert_eq!(Launch::resolve(Auto, 1, true), Launch::Single);
        assert_eq!(Launch::resolve(Auto, 2, true), Launch::Srun);
        assert_eq!(Launch::resolve(Auto, 2, false), Launch::Local);
        assert_eq!(Launch::resolve(Local, 1, true), Launch::Single);
        assert_eq!(Launch::resolve(Srun, 1, true), Launch::Srun);
        assert_eq!(Launch::resolve(Command, 4, false), Launch::Command);
    }

    #[test]
    fn names_are_plain_and_round_trip() {
        assert_eq!(rank_token("a0001-7", 0, 1), "a0001-7");
        assert_eq!(rank_token("a0001-7", 3, 4), "a0001-7-r00003");
        let n = rank_file(12, "model.safetensors");
        assert_eq!(n, "rank00012.model.safetensors");
        crate::storage::manifest::check_file_name(&n).unwrap();
        assert_eq!(parse_rank_file(&n), Some((12, "model.safetensors")));
        assert_eq!(parse_rank_file("model.safetensors"), None);
        assert_eq!(parse_rank_file("rank1.x"), None);
        assert_eq!(parse_rank_file("rank00001."), None);
    }

    #[test]
    fn dcp_files_keep_their_names_and_name_their_rank() {
        for (name, rank) in [(".metadata", 0), ("__0_0.distcp", 0), ("__12_3.distcp", 12)] {
            assert!(is_dcp_file(name), "{name}");
            assert_eq!(committed_name(7, name), name);
            assert_eq!(rank_of_file(name), Some(rank), "{name}");
        }
        for name in [
            "__0.distcp",
            "__a_0.distcp",
            "__0_0.distcp.tmp",
            ".metadata.tmp",
            "_0_0.distcp",
        ] {
            assert!(!is_dcp_file(name), "{name}");
            assert_eq!(committed_name(7, name), format!("rank00007.{name}"));
        }
        assert_eq!(rank_of_file("rank00003.rng.safetensors"), Some(3));
        assert_eq!(rank_of_file("model.safetensors"), None);
    }

    #[test]
    fn shim_maps_srun_and_torchrun_variables_to_the_rank_protocol() {
        let base = [(ENV_RANK_PREFIX, "/r/staging/a1"), (ENV_WORLD_SIZE, "2")];
        let mut srun = base.to_vec();
        srun.extend([
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ]);
        let out = rank_env(env_of(&srun)).unwrap();
        assert_eq!(get(&out, ENV_RANK), Some("1"));
        assert_eq!(get(&out, "HPC_CKPT_STAGING"), Some("/r/staging/a1-r00001"));
        assert_eq!(
            get(&out, "HPC_CKPT_COMMIT_REQUEST"),
            Some("/r/staging/a1-r00001.request")
        );
        assert_eq!(get(&out, "RANK"), Some("1"));
        assert_eq!(get(&out, "LOCAL_RANK"), Some("0"));
        // torchrun's RANK wins over srun's task id (srun starts one torchrun per node).
        let mut tr = srun.clone();
        tr.extend([("RANK", "0"), ("WORLD_SIZE", "2")]);
        let out = rank_env(env_of(&tr)).unwrap();
        assert_eq!(get(&out, ENV_RANK), Some("0"));
        assert_eq!(get(&out, "RANK"), None, "not overridden");
    }

    #[test]
    fn shim_refuses_a_disagreeing_or_missing_launcher() {
        let mut v = vec![(ENV_RANK_PREFIX, "/p"), (ENV_WORLD_SIZE, "4")];
        v.extend([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
        let e = rank_env(env_of(&v)).unwrap_err();
        assert!(e.contains("started 2 ranks") && e.contains("has 4"), "{e}");
        let e = rank_env(env_of(&[(ENV_RANK_PREFIX, "/p"), (ENV_WORLD_SIZE, "2")])).unwrap_err();
        assert!(e.contains("no rank"), "{e}");
        let e = rank_env(env_of(&[(ENV_WORLD_SIZE, "2")])).unwrap_err();
        assert!(e.contains(ENV_RANK_PREFIX), "{e}");
    }

    #[test]
    fn srun_line_and_local_env() {
        let c = srun_command(2, "/bin/hpc-ckpt", &["python".into(), "t.py".into()]);
        assert_eq!(
            c.join(" "),
            "srun --ntasks=2 --kill-on-bad-exit=1 --export=ALL /bin/hpc-ckpt rank -- python t.py"
        );
        let e = local_dist_env(1, 2, 1234, |k| k == "MASTER_ADDR");
        assert!(e.contains(&("RANK", "1".into())) && e.contains(&("MASTER_PORT", "1234".into())));
        assert!(!e.iter().any(|(k, _)| *k == "MASTER_ADDR"));
    }
}
