//! `hpc_ckpt::train::collective` with real ranks: separate processes (this test binary re-run
//! with `--exact collective::rank_main` and a role in the environment) joined through libtorch's
//! c10d Gloo, as `srun` would start them. Each rank checks its own results and writes the raw
//! bytes of what it reduced, so that the parent can compare ranks bit for bit. Also: a peer that
//! never comes, dies or stalls is an error within the timeout, never a hang.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hpc_ckpt::train::collective::{ConnectOptions, ProcessGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

const ROLE: &str = "HPC_CKPT_IT_COLLECTIVE";
/// `all` (default): [`rank_body`]; `vanish` and `stall`: [`rank_vanish`].
const SCENARIO: &str = "HPC_CKPT_IT_COLLECTIVE_SCENARIO";
/// 4 MiB of f32: a multi-MB buffer, split into several Gloo ring chunks.
const BIG: i64 = 1 << 20;

/// The entry point of a rank process (run with `--ignored` by [`spawn_rank`]; ignored in an
/// ordinary run, where it would pass without testing anything).
#[test]
#[ignore = "the entry point of the rank processes the collective tests start"]
fn rank_main() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let mut it = role.split(',');
    let mut next = || it.next().expect("role: rank,world,store,out").to_owned();
    let (rank, world): (usize, usize) = (next().parse().unwrap(), next().parse().unwrap());
    let store = next();
    let out = PathBuf::from(next());
    let rendezvous = match store.strip_prefix("tcp:") {
        Some(port) => Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port: port.parse().unwrap(),
        },
        None => Rendezvous::File(PathBuf::from(store)),
    };
    let scenario = std::env::var(SCENARIO).unwrap_or_default();
    let vanish = scenario == "vanish" || scenario == "stall";
    tch::set_num_threads(1);
    let mut pg = ProcessGroup::connect(&ConnectOptions {
        rank,
        world_size: world,
        rendezvous,
        timeout: Duration::from_secs(if vanish { 5 } else { 60 }),
        device_host: Some("127.0.0.1".into()),
    })
    .unwrap();
    if vanish {
        return rank_vanish(&mut pg, &out, scenario == "stall");
    }
    rank_body(&mut pg, &out);
    pg.barrier().unwrap();
}

/// Rank 1 disappears after joining (SIGKILL) or, with `stall`, stays connected but never joins
/// the collective; rank 0's next all-reduce must fail with a clear error, not hang. Rank 0
/// writes the seconds it took and the error.
fn rank_vanish(pg: &mut ProcessGroup, out: &Path, stall: bool) {
    pg.barrier().unwrap();
    if pg.rank() == 1 && stall {
        let t0 = Instant::now();
        while !out.join("done.0").exists() && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Gone without a collective: its peer may have timed out, skip the group's goodbye.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if pg.rank() == 1 {
        // Killed: no goodbye on the sockets, like a crashed or preempted rank.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut t = Tensor::ones([BIG], (Kind::Float, Device::Cpu));
    let t0 = Instant::now();
    let e = pg.all_reduce_sum(&mut t).unwrap_err().to_string();
    let took = t0.elapsed().as_secs_f64();
    std::fs::write(out.join("err.0"), format!("{took:.3}\n{e}")).unwrap();
    std::fs::write(out.join("done.0"), b"ok").unwrap();
}

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t).unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    floats(t).iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Rank r's "hard" values: sums whose float rounding depends on the order of the terms.
fn hard(rank: usize, n: i64) -> Tensor {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_133E_A1EB);
            z ^= z >> 31;
            // Magnitudes from 1e-3 to 1e3, both signs.
            let m = (z >> 40) as f64 / (1u64 << 24) as f64;
            let e = ((z >> 8) % 7) as i32 - 3;
            let sign = if z & 1 == 1 { -1.0 } else { 1.0 };
            (sign * m * 10f64.powi(e)) as f32
        })
        .collect();
    Tensor::from_slice(&v)
}

fn rank_body(pg: &mut ProcessGroup, out: &Path) {
    let (rank, world) = (pg.rank(), pg.world_size());
    let rsum: f32 = (1..=world).map(|r| r as f32).sum();

    // Small, exact: rank r contributes (r+1) * [1, 2, 3, 4].
    let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]) * (rank as f64 + 1.0);
    pg.all_reduce_sum(&mut t).unwrap();
    assert_eq!(floats(&t), vec![rsum, 2.0 * rsum, 3.0 * rsum, 4.0 * rsum]);

    // Multi-MB, exact (integers below 2^24): rank r contributes (r+1) * (i mod 1000).
    let base = Tensor::arange(BIG, (Kind::Float, Device::Cpu)).fmod(1000.0);
    let mut big = &base * (rank as f64 + 1.0);
    pg.all_reduce_sum(&mut big).unwrap();
    let want = &base * rsum as f64;
    assert!(big.equal(&want), "rank {rank}: 4 MiB sum differs");

    // Order-sensitive values, reduced twice: the same bits both times (fixed order) and, checked
    // by the parent from the files, on every rank; close to the exact (f64) sum.
    let mut a = hard(rank, BIG + 3);
    let mut b = a.copy();
    pg.all_reduce_sum(&mut a).unwrap();
    pg.all_reduce_sum(&mut b).unwrap();
    assert!(
        a.equal(&b),
        "rank {rank}: the same reduction gave different bits"
    );
    let exact = (0..world).fold(
        Tensor::zeros([BIG + 3], (Kind::Double, Device::Cpu)),
        |acc, r| acc + hard(r, BIG + 3).to_kind(Kind::Double),
    );
    let err = (a.to_kind(Kind::Double) - &exact)
        .abs()
        .max()
        .double_value(&[]);
    assert!(err < 1e-3, "rank {rank}: max error {err}");
    std::fs::write(out.join(format!("hard.{rank}")), bytes(&a)).unwrap();

    // Broadcast from the last rank, which holds 7s; the others hold their rank.
    let root = world - 1;
    let fill = if rank == root { 7.0 } else { rank as f64 };
    let mut c = Tensor::full([BIG], fill, (Kind::Float, Device::Cpu));
    pg.broadcast(&mut c, root).unwrap();
    assert!(c.equal(&Tensor::full([BIG], 7.0, (Kind::Float, Device::Cpu))));

    // A local refusal (no collective is issued, so the ranks stay in step).
    let mut strided = Tensor::zeros([8, 8], (Kind::Float, Device::Cpu)).tr();
    let e = pg.all_reduce_sum(&mut strided).unwrap_err().to_string();
    assert!(e.contains("contiguous"), "{e}");

    std::fs::write(out.join(format!("done.{rank}")), b"ok").unwrap();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_rank(rank: usize, world: usize, store: &str, out: &Path, scenario: &str) -> Child {
    let log = std::fs::File::create(out.join(format!("log.{rank}"))).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "collective::rank_main",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, format!("{rank},{world},{store},{}", out.display()))
        .env(SCENARIO, scenario)
        // To a file, not a pipe: nobody reads a pipe before the rank exits.
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

/// Run `world` ranks of `scenario` to the end (killing them after `limit`) and assert that each
/// exited 0 having written `done.<rank>` (for `vanish`: rank 0 did, rank 1 ended).
fn run_scenario(scenario: &str, world: usize, store: &str, out: &Path, limit: Duration) {
    let mut children: Vec<Child> = (0..world)
        .map(|r| spawn_rank(r, world, store, out, scenario))
        .collect();
    let t0 = Instant::now();
    let mut status = vec![None; world];
    while status.iter().any(Option::is_none) && t0.elapsed() < limit {
        for (c, s) in children.iter_mut().zip(status.iter_mut()) {
            if s.is_none() {
                *s = c.try_wait().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut report = String::new();
    for (r, (c, s)) in children.iter_mut().zip(&status).enumerate() {
        if s.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let log = std::fs::read_to_string(out.join(format!("log.{r}"))).unwrap_or_default();
        report.push_str(&format!("--- rank {r}: {s:?}\n{log}\n"));
    }
    for (r, s) in status.iter().enumerate() {
        // `vanish`, `stall`: rank 1 kills itself; only its end matters.
        let ok = if scenario != "all" && r > 0 {
            s.is_some()
        } else {
            out.join(format!("done.{r}")).exists() && s.is_some_and(|s| s.success())
        };
        assert!(ok, "rank {r} did not finish (limit {limit:?}):\n{report}");
    }
}

/// [`run_scenario`] `all`, then the hard-sum bytes of each rank.
fn run_ranks(world: usize, store: &str, out: &Path, limit: Duration) -> Vec<Vec<u8>> {
    run_scenario("all", world, store, out, limit);
    (0..world)
        .map(|r| std::fs::read(out.join(format!("hard.{r}"))).unwrap())
        .collect()
}

#[test]
fn two_ranks_over_a_tcp_store_reduce_exactly_and_identically() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("tcp:{}", free_port());
    let sums = run_ranks(2, &store, dir.path(), Duration::from_secs(180));
    assert_eq!(sums[0].len(), (BIG as usize + 3) * 4);
    assert!(sums[0] == sums[1], "the ranks' sums differ in their bits");
}

#[test]
fn three_ranks_over_a_file_store_agree_bit_for_bit_where_order_matters() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let sums = run_ranks(
        3,
        store.to_str().unwrap(),
        dir.path(),
        Duration::from_secs(180),
    );
    assert!(sums[0] == sums[1] && sums[1] == sums[2], "ranks differ");
    // The values are order-sensitive: a naive left-to-right f32 sum differs somewhere from the
    // ring's result, so this checks a real reduction order, not a lucky exact sum.
    let naive = (hard(0, BIG + 3) + hard(1, BIG + 3)) + hard(2, BIG + 3);
    let other = (hard(2, BIG + 3) + hard(1, BIG + 3)) + hard(0, BIG + 3);
    assert!(!naive.equal(&other), "test values are not order-sensitive");
}

/// Join alone a group of 2 on a thread; the peer never comes. Returns the error and how long it
/// took; panics if it neither failed nor returned within `limit` (a hang).
fn join_alone(rank: usize, rendezvous: Rendezvous, limit: Duration) -> (String, Duration) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let r = ProcessGroup::connect(&ConnectOptions {
            rank,
            world_size: 2,
            rendezvous,
            timeout: Duration::from_secs(2),
            device_host: Some("127.0.0.1".into()),
        });
        let _ = tx.send(r.map(drop).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(limit) {
        Ok(Err(e)) => {
            eprintln!("rank {rank} alone: {e}");
            (e, t0.elapsed())
        }
        Ok(Ok(())) => panic!("rank {rank} joined a group whose peer never came"),
        Err(_) => panic!("rank {rank}: connect hung past {limit:?} (timeout 2 s)"),
    }
}

#[test]
fn a_peer_that_never_comes_is_a_clear_error_after_the_timeout() {
    let limit = Duration::from_secs(60);
    // Rank 0, the store's server, waits for a client that never connects.
    let port = free_port();
    let (e, took) = join_alone(
        0,
        Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        limit,
    );
    assert!(
        e.starts_with(&format!(
            "rank 0 of 2 could not join the process group at tcp://127.0.0.1:{port} (timeout 2s)"
        )),
        "{e}"
    );
    assert!(took >= Duration::from_secs(2), "{took:?}: {e}");
    // Rank 1, a client, finds no server.
    let (e, _) = join_alone(
        1,
        Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port: free_port(),
        },
        limit,
    );
    assert!(e.contains("rank 1 of 2 could not join"), "{e}");
    // A file store whose peer never writes: Gloo's rendezvous times out.
    let dir = tempfile::tempdir().unwrap();
    let (e, _) = join_alone(0, Rendezvous::File(dir.path().join("store")), limit);
    assert!(e.contains("rank 0 of 2 could not join"), "{e}");
}

/// Run a 2-rank `scenario` whose rank 0 sees its all-reduce fail; (seconds it took, error).
fn failed_all_reduce(scenario: &str) -> (f64, String) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("tcp:{}", free_port());
    run_scenario(scenario, 2, &store, dir.path(), Duration::from_secs(120));
    let report = std::fs::read_to_string(dir.path().join("err.0")).unwrap();
    let (took, e) = report.split_once('\n').unwrap();
    eprintln!("after {took} s: {e}");
    assert!(
        e.starts_with("rank 0 of 2: all_reduce_sum of Float [1048576] failed: "),
        "{e}"
    );
    (took.parse().unwrap(), e.to_string())
}

#[test]
fn a_peer_that_dies_fails_the_next_all_reduce_instead_of_hanging() {
    let (took, e) = failed_all_reduce("vanish");
    // The collective timeout is 5 s; a dead peer's socket usually fails it at once.
    assert!(took < 30.0, "{took} s: {e}");
}

#[test]
fn a_peer_that_stalls_fails_the_all_reduce_after_the_timeout() {
    let (took, e) = failed_all_reduce("stall");
    assert!((4.0..30.0).contains(&took), "{took} s (timeout 5 s): {e}");
}
