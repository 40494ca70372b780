//! Benchmark: hpc-ckpt's full commit protocol against reference writers on the same filesystem.
//!
//! ```text
//! cargo run --release --example bench_commit -- --dir DIR --rounds 5 \
//!     [--tensors 64 --mib 16] [--python .venv/bin/python] [--only ours,dd,torch,safetensors] \
//!     [--json FILE]
//! ```
//!
//! Methods (`--only` takes a comma list; `all` selects every one; default: the first five):
//! - `ours`: `Store::commit` of one `model.safetensors` built with `FileSource::Tensors` from
//!   buffers filled before the clock starts (checksums, fsyncs, manifest, rename, pointer swap,
//!   journal). Timed from the call to its return, on a fresh run dir per round.
//! - `verify`: `verify_checkpoint` of the checkpoint `ours` just committed, after reading the file
//!   once so it is in page cache (needs `ours`; runs right after it, not rotated).
//! - `dd`: `dd if=/dev/zero of=FILE bs=<mib>M count=<tensors> conv=fsync`, whole process timed.
//! - `torch`, `safetensors`: `tests/bench/py_save.py`; its in-process save+fsync seconds.
//! - experimental, opt-in: `ours-plain`, `ours-direct`, `ours-sfr` are a standalone copy of the
//!   protocol (temp dir, data file, xxh3-128, fsync, MANIFEST.json, fsync dir, rename, fsync
//!   parent, pointer swap; no lock/journal/retention) differing only in how the data file is
//!   written: `plain` = buffered writes like the store's writer (the control), `direct` = O_DIRECT
//!   through a 16 MiB aligned buffer (tail written after clearing O_DIRECT), `sfr` = buffered
//!   writes with `sync_file_range(SYNC_FILE_RANGE_WRITE)` after each tensor. Each result is
//!   checked with `verify_checkpoint` (untimed).
//!
//! `--warmup N` (default 1) first runs N untimed `ours` commits: on the VM this was written on, the
//! first large write after an idle spell is 2-5x slower whatever writes it, which would otherwise
//! be billed to whichever method opens round 1.
//!
//! Round r runs every selected method once, in the selected order rotated left by r. Before each
//! method the previous outputs are deleted and `sync` is called, so one run's writeback (or the
//! previous deletion's discard) is not billed to the next.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use xxhash_rust::xxh3::Xxh3;

use hpc_ckpt::storage::manifest::{
    checkpoint_name, FileEntry, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
};
use hpc_ckpt::storage::run_dir::holder;
use hpc_ckpt::storage::safetensors::{encode_header, Dtype};
use hpc_ckpt::storage::verify::verify_checkpoint;
use hpc_ckpt::storage::{
    pointer, CommitMeta, FileSource, Manifest, RetentionPolicy, Snapshot, Store, TensorData,
};

const DEFAULT_METHODS: &[&str] = &["ours", "verify", "dd", "torch", "safetensors"];
const ALL_METHODS: &[&str] = &[
    "ours",
    "verify",
    "dd",
    "torch",
    "safetensors",
    "ours-plain",
    "ours-direct",
    "ours-sfr",
];
const FILE_NAME: &str = "model.safetensors";
const ALIGN: usize = 4096;

#[derive(Parser, Debug)]
#[command(about = "Benchmark hpc-ckpt's commit against dd, torch.save and safetensors")]
struct Args {
    /// Scratch directory on the filesystem to measure (created; outputs deleted between runs).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 64)]
    tensors: usize,
    /// MiB per tensor (f32).
    #[arg(long, default_value_t = 16)]
    mib: usize,
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    #[arg(long, default_value = "tests/bench/py_save.py")]
    script: PathBuf,
    /// Comma list of methods (see the example's doc), or `all`.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Untimed full-size commits before round 1 (the first large write after an idle spell is
    /// consistently 2-5x slower on this VM, whatever writes it).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Save raw samples here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Sample {
    round: usize,
    position: usize,
    seconds: f64,
    bytes: u64,
    extra: Value,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.tensors == 0 || args.mib == 0 {
        bail!("--rounds, --tensors and --mib must be >= 1");
    }
    let mut methods: Vec<String> = match &args.only {
        None => DEFAULT_METHODS.iter().map(|s| s.to_string()).collect(),
        Some(v) if v.iter().any(|m| m == "all") => {
            ALL_METHODS.iter().map(|s| s.to_string()).collect()
        }
        Some(v) => v.iter().map(|s| s.trim().to_string()).collect(),
    };
    methods.dedup();
    for m in &methods {
        if !ALL_METHODS.contains(&m.as_str()) {
            bail!("unknown method {m:?}; known: {}", ALL_METHODS.join(","));
        }
    }
    let want_verify = methods.iter().any(|m| m == "verify");
    if want_verify && !methods.iter().any(|m| m == "ours") {
        bail!("verify measures the checkpoint `ours` commits; select ours too");
    }
    // `verify` is not rotated: it runs right after `ours`.
    let rotated: Vec<String> = methods.iter().filter(|m| *m != "verify").cloned().collect();

    fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = fs::canonicalize(&args.dir)?;
    let total = (args.tensors * args.mib) as u64 * (1 << 20);
    eprintln!(
        "bench dir {} (st_dev {:#x}), {} tensors x {} MiB = {:.3} GiB, methods {:?}, {} rounds",
        dir.display(),
        fs::metadata(&dir)?.dev(),
        args.tensors,
        args.mib,
        total as f64 / (1u64 << 30) as f64,
        rotated,
        args.rounds
    );

    // ---- state, filled before any timing ---------------------------------------------------
    let bufs = make_state(args.tensors, args.mib);
    let names: Vec<String> = (0..args.tensors)
        .map(|i| format!("layer.{i}.weight"))
        .collect();
    let numel = args.mib * (1 << 20) / 4;

    let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for m in &methods {
        samples.insert(m.clone(), Vec::new());
    }

    for w in 0..args.warmup {
        nix::unistd::sync();
        let work = dir.join(format!("warmup-{w}"));
        if work.exists() {
            fs::remove_dir_all(&work)?;
        }
        fs::create_dir(&work)?;
        let (s, _) = run_ours(&work, 1, &names, &bufs, numel)?;
        eprintln!(
            "warm-up {}/{} (untimed): {:.3} s",
            w + 1,
            args.warmup,
            s.seconds
        );
        fs::remove_dir_all(&work)?;
    }

    let started = Instant::now();
    for r in 0..args.rounds {
        let k = rotated.len();
        let order: Vec<&String> = (0..k).map(|i| &rotated[(i + r) % k]).collect();
        eprintln!("round {}/{}: {:?}", r + 1, args.rounds, order);
        for (pos, m) in order.into_iter().enumerate() {
            nix::unistd::sync();
            let work = dir.join(format!("r{r}-{m}"));
            if work.exists() {
                fs::remove_dir_all(&work)?;
            }
            fs::create_dir(&work)?;
            let step = 1000 + r as u64;
            let s = match m.as_str() {
                "ours" => {
                    let (s, ckpt) = run_ours(&work, step, &names, &bufs, numel)?;
                    eprintln!(
                        "    {m:<12} {:8.3} s  ({:.2} GiB/s)",
                        s.seconds,
                        gib_s(s.bytes, s.seconds)
                    );
                    if want_verify {
                        // Untimed read first (run_verify) so the timed pass is served from page cache.
                        let v = run_verify(&ckpt)?;
                        eprintln!(
                            "    {:<12} {:8.3} s  ({:.2} GiB/s)",
                            "verify",
                            v.seconds,
                            gib_s(v.bytes, v.seconds)
                        );
                        samples.get_mut("verify").unwrap().push(Sample {
                            round: r,
                            position: pos,
                            ..v
                        });
                    }
                    s
                }
                "dd" => run_dd(&work, args.tensors, args.mib)?,
                "torch" | "safetensors" => run_python(&args, m, &work)?,
                "ours-plain" => run_standalone(&work, step, &names, &bufs, numel, Strategy::Plain)?,
                "ours-direct" => {
                    run_standalone(&work, step, &names, &bufs, numel, Strategy::Direct)?
                }
                "ours-sfr" => run_standalone(&work, step, &names, &bufs, numel, Strategy::Sfr)?,
                other => unreachable!("{other}"),
            };
            if m != "ours" {
                eprintln!(
                    "    {m:<12} {:8.3} s  ({:.2} GiB/s)",
                    s.seconds,
                    gib_s(s.bytes, s.seconds)
                );
            }
            samples.get_mut(m.as_str()).unwrap().push(Sample {
                round: r,
                position: pos,
                ..s
            });
            fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
        }
        nix::unistd::sync();
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());

    print_table(&methods, &samples);

    if let Some(path) = &args.json {
        let out = json!({
            "config": {
                "dir": dir, "rounds": args.rounds, "tensors": args.tensors, "mib": args.mib,
                "bytes": total, "methods": methods, "warmup": args.warmup,
                "host": hpc_ckpt::storage::run_dir::hostname(),
            },
            "samples": samples.iter().map(|(m, v)| (m.clone(), v.iter().map(|s| json!({
                "round": s.round, "position": s.position, "seconds": s.seconds,
                "bytes": s.bytes, "extra": s.extra,
            })).collect::<Vec<_>>().into())).collect::<serde_json::Map<String, Value>>(),
        });
        fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("raw samples: {}", path.display());
    }
    Ok(())
}

/// Deterministic non-zero f32 data in [0.5, 1.5), one buffer per tensor (all pages touched).
fn make_state(tensors: usize, mib: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..tensors)
        .map(|_| {
            let mut b = vec![0u8; mib << 20];
            for c in b.chunks_exact_mut(4) {
                // xorshift64*
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
                let v = 0.5f32 + (r >> 40) as f32 / (1u64 << 24) as f32;
                c.copy_from_slice(&v.to_le_bytes());
            }
            b
        })
        .collect()
}

fn gib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / secs
}

fn run_ours(
    work: &Path,
    step: u64,
    names: &[String],
    bufs: &[Vec<u8>],
    numel: usize,
) -> Result<(Sample, PathBuf)> {
    let mut store = Store::open(work, &holder(None), RetentionPolicy::default())?;
    let tensors: Vec<TensorData<'_>> = names
        .iter()
        .zip(bufs)
        .map(|(n, b)| TensorData {
            name: n.clone(),
            dtype: Dtype::F32,
            shape: vec![numel],
            bytes: Cow::Borrowed(b.as_slice()),
        })
        .collect();
    let mut snap = Snapshot::new();
    snap.add(
        FILE_NAME,
        FileSource::Tensors {
            tensors,
            metadata: BTreeMap::new(),
        },
    );
    let meta = CommitMeta {
        step,
        ..Default::default()
    };
    let t0 = Instant::now();
    let rep = store.commit(&snap, &meta)?;
    let seconds = t0.elapsed().as_secs_f64();
    drop(store);
    Ok((
        Sample {
            round: 0,
            position: 0,
            seconds,
            bytes: rep.bytes,
            extra: json!({"report_seconds": rep.seconds}),
        },
        work.join("checkpoints").join(rep.name),
    ))
}

fn run_verify(ckpt: &Path) -> Result<Sample> {
    // Read every file once so the timed pass is served from page cache.
    let mut buf = vec![0u8; 16 << 20];
    let mut bytes = 0u64;
    for e in fs::read_dir(ckpt)? {
        let mut f = File::open(e?.path())?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    let t0 = Instant::now();
    let m = verify_checkpoint(ckpt).map_err(|f| anyhow!("verify {}: {f:?}", ckpt.display()))?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Sample {
        round: 0,
        position: 0,
        seconds,
        bytes: m.total_bytes(),
        extra: json!({"bytes_incl_manifest": bytes}),
    })
}

fn run_dd(work: &Path, tensors: usize, mib: usize) -> Result<Sample> {
    let out = work.join("dd.bin");
    let t0 = Instant::now();
    let st = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .arg(format!("bs={mib}M"))
        .arg(format!("count={tensors}"))
        .arg("conv=fsync")
        .arg("status=none")
        .stdin(Stdio::null())
        .status()
        .context("run dd")?;
    let seconds = t0.elapsed().as_secs_f64();
    if !st.success() {
        bail!("dd failed: {st}");
    }
    Ok(Sample {
        round: 0,
        position: 0,
        seconds,
        bytes: fs::metadata(&out)?.len(),
        extra: Value::Null,
    })
}

fn run_python(args: &Args, method: &str, work: &Path) -> Result<Sample> {
    let out = work.join(format!("{method}.bin"));
    let t0 = Instant::now();
    let o = Command::new(&args.python)
        .arg(&args.script)
        .args(["--method", method, "--out"])
        .arg(&out)
        .args([
            "--tensors",
            &args.tensors.to_string(),
            "--mib",
            &args.mib.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args.python.display()))?;
    let wall = t0.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "py_save.py --method {method} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("py_save.py printed no JSON: {stdout}"))?;
    let v: Value = serde_json::from_str(line)?;
    Ok(Sample {
        round: 0,
        position: 0,
        seconds: v["seconds"]
            .as_f64()
            .ok_or_else(|| anyhow!("no seconds in {line}"))?,
        bytes: v["bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("no bytes in {line}"))?,
        extra: json!({"process_wall_seconds": wall}),
    })
}

// ---- experimental standalone commit -----------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Strategy {
    Plain,
    Direct,
    Sfr,
}

fn hex(h: &Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// The store's protocol, minus lock/journal/retention, with the data file written by `how`.
fn run_standalone(
    work: &Path,
    step: u64,
    names: &[String],
    bufs: &[Vec<u8>],
    numel: usize,
    how: Strategy,
) -> Result<Sample> {
    let ckpts = work.join("checkpoints");
    fs::create_dir_all(&ckpts)?;
    fsync_path(work)?;
    let shape = [numel];
    let layout: Vec<(&str, Dtype, &[usize])> = names
        .iter()
        .map(|n| (n.as_str(), Dtype::F32, &shape[..]))
        .collect();

    let t0 = Instant::now();
    let header = encode_header(&layout, &BTreeMap::new()).map_err(|e| anyhow!(e))?;
    let name = checkpoint_name(step);
    let tmp = ckpts.join(format!(".tmp-{name}-{}", std::process::id()));
    fs::create_dir(&tmp)?;
    let data_path = tmp.join(FILE_NAME);
    let (size, checksum) = match how {
        Strategy::Plain => write_buffered(&data_path, &header, bufs, false)?,
        Strategy::Sfr => write_buffered(&data_path, &header, bufs, true)?,
        Strategy::Direct => write_direct(&data_path, &header, bufs)?,
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        step,
        epoch: None,
        metrics: BTreeMap::new(),
        created_at: hpc_ckpt::storage::journal::now_rfc3339(),
        host: hpc_ckpt::storage::run_dir::hostname(),
        job: None,
        versions: BTreeMap::from([(
            "hpc_ckpt".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
        checksum_algorithm: hpc_ckpt::storage::checksum::ALGORITHM.into(),
        files: vec![FileEntry {
            name: FILE_NAME.into(),
            size,
            checksum,
        }],
        retention: None,
        extra: Default::default(),
    };
    let mut mf = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp.join(MANIFEST_FILE))?;
    mf.write_all(&manifest.to_json())?;
    mf.sync_all()?;
    drop(mf);
    fsync_path(&tmp)?;
    let final_path = ckpts.join(&name);
    fs::rename(&tmp, &final_path)?;
    fsync_path(&ckpts)?;
    pointer::write(work, &name)?;
    let seconds = t0.elapsed().as_secs_f64();

    // Untimed: the result must be a valid checkpoint.
    verify_checkpoint(&final_path)
        .map_err(|f| anyhow!("{how:?} wrote a checkpoint that does not verify: {f:?}"))?;
    Ok(Sample {
        round: 0,
        position: 0,
        seconds,
        bytes: size,
        extra: json!({"strategy": format!("{how:?}")}),
    })
}

fn fsync_path(p: &Path) -> Result<()> {
    File::open(p)?.sync_all()?;
    Ok(())
}

fn create_excl(path: &Path, flags: i32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(flags)
        .open(path)
        .with_context(|| format!("create {}", path.display()))
}

/// Like the store's writer: header, then one write per tensor; optionally start writeback of
/// each tensor's range right after writing it.
fn write_buffered(
    path: &Path,
    header: &[u8],
    bufs: &[Vec<u8>],
    sfr: bool,
) -> Result<(u64, String)> {
    let mut f = create_excl(path, 0)?;
    let mut h = Xxh3::new();
    let mut off = 0u64;
    h.update(header);
    f.write_all(header)?;
    off += header.len() as u64;
    for b in bufs {
        h.update(b);
        f.write_all(b)?;
        if sfr {
            // SAFETY: plain syscall on an fd we own.
            let rc = unsafe {
                nix::libc::sync_file_range(
                    f.as_raw_fd(),
                    off as nix::libc::off64_t,
                    b.len() as nix::libc::off64_t,
                    nix::libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("sync_file_range");
            }
        }
        off += b.len() as u64;
    }
    f.sync_all()?;
    Ok((off, hex(&h)))
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// O_DIRECT through one 16 MiB aligned staging buffer: header and tensors are copied in, each full
/// buffer is written at a 16 MiB-aligned offset; the last partial buffer is written as its
/// 4 KiB-aligned part with O_DIRECT and the remaining tail after clearing O_DIRECT; then fsync.
fn write_direct(path: &Path, header: &[u8], bufs: &[Vec<u8>]) -> Result<(u64, String)> {
    const CHUNK: usize = 16 << 20;
    let mut f = create_excl(path, nix::libc::O_DIRECT)?;
    let mut stage = AlignedBuf::new(CHUNK);
    let buf = stage.as_mut();
    let mut h = Xxh3::new();
    let mut fill = 0usize;
    let mut written = 0u64;
    for src in std::iter::once(header).chain(bufs.iter().map(|b| b.as_slice())) {
        h.update(src);
        let mut rest = src;
        while !rest.is_empty() {
            let n = rest.len().min(CHUNK - fill);
            buf[fill..fill + n].copy_from_slice(&rest[..n]);
            fill += n;
            rest = &rest[n..];
            if fill == CHUNK {
                f.write_all(buf).context("O_DIRECT write")?;
                written += CHUNK as u64;
                fill = 0;
            }
        }
    }
    if fill > 0 {
        let aligned = fill & !(ALIGN - 1);
        if aligned > 0 {
            f.write_all(&buf[..aligned])
                .context("O_DIRECT write (aligned tail)")?;
        }
        let fd = f.as_raw_fd();
        // SAFETY: fcntl on an fd we own.
        let fl = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFL) };
        if fl < 0
            || unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFL, fl & !nix::libc::O_DIRECT) } < 0
        {
            return Err(std::io::Error::last_os_error()).context("clear O_DIRECT");
        }
        f.write_all(&buf[aligned..fill])
            .context("buffered tail write")?;
        written += fill as u64;
    }
    f.sync_all()?;
    Ok((written, hex(&h)))
}

// ---- report ----------------------------------------------------------------------------------

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_table(methods: &[String], samples: &BTreeMap<String, Vec<Sample>>) {
    let ours_med = samples
        .get("ours")
        .filter(|v| !v.is_empty())
        .map(|v| median(&mut v.iter().map(|s| s.seconds).collect::<Vec<_>>()));
    println!("| method | n | min s | median s | max s | GiB/s @median | median / ours |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for m in methods {
        let v = &samples[m];
        if v.is_empty() {
            continue;
        }
        let mut secs: Vec<f64> = v.iter().map(|s| s.seconds).collect();
        let med = median(&mut secs);
        let (min, max) = (secs[0], secs[secs.len() - 1]);
        let bytes = v[0].bytes;
        let ratio = match (m.as_str(), ours_med) {
            ("verify", _) | (_, None) => "—".to_string(),
            (_, Some(o)) => format!("{:.2}×", med / o),
        };
        let label = if m == "verify" {
            "verify (page cache)"
        } else {
            m.as_str()
        };
        println!(
            "| {label} | {} | {min:.3} | {med:.3} | {max:.3} | {:.2} | {ratio} |",
            v.len(),
            gib_s(bytes, med)
        );
    }
}
