//! Writing a checkpoint's files into a fresh directory: what a snapshot is, and the staging half
//! of the commit protocol (the other half, rename + pointer + retention, is in [`super::run_dir`]).
//!
//! A [`Snapshot`] is a list of named files. Tensor files are real safetensors, laid out in the
//! order given; their bytes are [`Cow`]s, so a caller can lend its buffers for a synchronous save
//! or hand over owned host copies (`Snapshot<'static>`, which is `Send`) for a background persist.
//! Every byte is checksummed on its way to disk (no second read; for a large file on a helper
//! thread handed the very slices the writer writes, so hashing overlaps the writes) — an adopted
//! file, already on the checkpoint's file system, is linked in and read once instead — every
//! file is fsynced, and the manifest is written last.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::checksum::{self, Checksum};
use super::error::{IoContext, Result, StorageError};
use super::fsutil::{create_new, fsync_dir, open_regular_nofollow};
use super::manifest::{check_file_name, FileEntry, JobInfo, Manifest, MANIFEST_FILE};
use super::safetensors::{byte_len, encode_header, Dtype};

/// One tensor to write: its bytes are little-endian, row-major, `dtype` × `shape` long.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

/// Where a checkpoint file's content comes from.
#[derive(Debug, Clone)]
pub enum FileSource<'a> {
    /// A safetensors file of these tensors (in this order) and string metadata.
    Tensors {
        tensors: Vec<TensorData<'a>>,
        metadata: BTreeMap<String, String>,
    },
    /// Raw bytes (JSON state, anything).
    Bytes(Cow<'a, [u8]>),
    /// Copy of an existing regular file (used by `hpc-ckpt commit`).
    CopyOf(PathBuf),
    /// An existing regular file on the checkpoint's file system, adopted without copying its
    /// bytes: hard-linked into the checkpoint's temp dir, then read once for the checksum
    /// (through the descriptor opened before the link, after checking that the link names that
    /// very file) and fsynced. The source keeps its own name until the caller removes it, so a
    /// failed or interrupted commit leaves it where it was. Across file systems (or on one
    /// without hard links) it is copied instead. Used for the files a `wrap` child staged.
    Adopt(PathBuf),
}

/// The files of one checkpoint, by name.
#[derive(Debug, Clone, Default)]
pub struct Snapshot<'a> {
    pub files: Vec<(String, FileSource<'a>)>,
}

/// What the caller says about the checkpoint besides its files.
#[derive(Debug, Clone, Default)]
pub struct CommitMeta {
    pub step: u64,
    pub epoch: Option<u64>,
    pub metrics: BTreeMap<String, f64>,
    pub job: Option<JobInfo>,
    /// Added to the manifest's versions (hpc_ckpt's own is always recorded).
    pub versions: BTreeMap<String, String>,
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// How the save went before the commit began (a trainer's saves; journaled with the commit).
    pub save: Option<SaveTiming>,
}

/// What a save cost its caller before the commit began: journaled with the commit, so that the
/// run's history knows each save's stall (the training time it took).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SaveTiming {
    /// Persisted on a background thread while the caller went on (phase 2 of a two-phase
    /// save); false: the caller waited for the commit.
    pub background: bool,
    /// Seconds the caller waited for the previous persist to end before it could copy.
    pub wait_seconds: f64,
    /// Seconds the copy into host buffers took (phase 1).
    pub copy_seconds: f64,
    /// Why the save came when it did, when the saver chose its interval from data.
    pub cadence: Option<super::journal::Cadence>,
}

impl SaveTiming {
    /// The caller's stall: the wait and the copy, and the commit itself when not in the
    /// background (`commit_seconds`).
    pub fn stall_seconds(&self, commit_seconds: f64) -> f64 {
        let commit = if self.background { 0.0 } else { commit_seconds };
        self.wait_seconds + self.copy_seconds + commit
    }
}

/// What a successful commit did.
#[derive(Debug, Clone)]
pub struct CommitReport {
    pub name: String,
    pub step: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// True when a checkpoint of the same step existed and was replaced atomically.
    pub replaced: bool,
    /// Checkpoints retention deleted after this commit was durable.
    pub deleted: Vec<String>,
}

impl<'a> Snapshot<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, source: FileSource<'a>) -> &mut Self {
        self.files.push((name.into(), source));
        self
    }

    /// A snapshot of every regular file directly inside `dir`, copied (for `hpc-ckpt commit`,
    /// which imports files it must not take over). Refuses symlinks, subdirectories, other file
    /// types, names that are not plain, and `MANIFEST.json`.
    pub fn from_dir(dir: &Path) -> Result<Snapshot<'static>> {
        Self::of_dir(dir, FileSource::CopyOf)
    }

    /// A snapshot of every regular file directly inside `dir`, adopted ([`FileSource::Adopt`]:
    /// no second copy of the bytes) — for the files a `wrap` child staged in the run dir. The
    /// same refusals as [`Snapshot::from_dir`].
    pub fn adopt_dir(dir: &Path) -> Result<Snapshot<'static>> {
        Self::of_dir(dir, FileSource::Adopt)
    }

    fn of_dir(dir: &Path, source: fn(PathBuf) -> FileSource<'static>) -> Result<Snapshot<'static>> {
        let rd = fs::read_dir(dir).ctx(|| format!("read source dir {}", dir.display()))?;
        let mut files = Vec::new();
        for e in rd {
            let e = e.ctx(|| format!("read source dir {}", dir.display()))?;
            let os_name = e.file_name();
            let name = os_name.to_str().ok_or_else(|| {
                StorageError::Invalid(format!(
                    "{}: file name {:?} is not UTF-8",
                    dir.display(),
                    os_name
                ))
            })?;
            check_file_name(name)
                .map_err(|r| StorageError::Invalid(format!("{}: {r}", e.path().display())))?;
            if name == MANIFEST_FILE {
                return Err(StorageError::Invalid(format!(
                    "{}: {MANIFEST_FILE} is written by hpc-ckpt; remove it from the source dir",
                    e.path().display()
                )));
            }
            let ft = e
                .file_type()
                .ctx(|| format!("stat {}", e.path().display()))?;
            if !ft.is_file() {
                let what = if ft.is_symlink() {
                    "a symbolic link"
                } else if ft.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                };
                return Err(StorageError::Invalid(format!(
                    "{} is {what}; a checkpoint holds regular files only",
                    e.path().display()
                )));
            }
            files.push((name.to_string(), source(e.path())));
        }
        if files.is_empty() {
            return Err(StorageError::Invalid(format!(
                "{} holds no files to commit",
                dir.display()
            )));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Snapshot { files })
    }

    /// Check names and tensor sizes before anything touches the disk.
    pub fn validate(&self) -> Result<()> {
        let mut seen = BTreeSet::new();
        for (name, src) in &self.files {
            check_file_name(name)
                .map_err(|r| StorageError::Invalid(format!("file {name:?}: {r}")))?;
            if name == MANIFEST_FILE {
                return Err(StorageError::Invalid(format!(
                    "{MANIFEST_FILE} is reserved"
                )));
            }
            if !seen.insert(name.as_str()) {
                return Err(StorageError::Invalid(format!("file {name:?} given twice")));
            }
            if let FileSource::Tensors { tensors, .. } = src {
                for t in tensors {
                    let want = byte_len(t.dtype, &t.shape);
                    if want != Some(t.bytes.len() as u64) {
                        return Err(StorageError::Invalid(format!(
                            "{name}: tensor {:?} is {}{:?} ({want:?} bytes) but has {} bytes",
                            t.name,
                            t.dtype.name(),
                            t.shape,
                            t.bytes.len()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// New bytes the checkpoint will take on disk (manifest excluded; an adopted file takes
    /// none: its blocks are already there).
    pub fn estimated_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|(_, src)| match src {
                FileSource::Tensors { tensors, .. } => {
                    tensors
                        .iter()
                        .map(|t| t.bytes.len() as u64 + 128 + t.name.len() as u64)
                        .sum::<u64>()
                        + 64
                }
                FileSource::Bytes(b) => b.len() as u64,
                FileSource::CopyOf(p) => fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                FileSource::Adopt(_) => 0,
            })
            .sum()
    }
}

/// Small writes are gathered in a buffer; large slices go to the file directly (no copy).
const GATHER: usize = 4 << 20;

/// A file at least this large is checksummed on a helper thread while it is written (below
/// that, the thread's start costs more than the overlap saves).
const HASH_THREAD_MIN: u64 = 8 << 20;

/// Pieces queued for the hashing thread at most (references into the snapshot, no copies): the
/// writer runs at most this far ahead of the checksum.
const HASH_QUEUE: usize = 16;

/// Where a file's checksum is computed: inline, or on a helper thread that is handed every
/// piece (borrowed, in file order) just before the writer writes it, so that hashing overlaps
/// the writes.
enum Hasher<'a> {
    Inline(Box<Checksum>),
    Thread(crossbeam_channel::Sender<&'a [u8]>),
}

impl<'a> Hasher<'a> {
    fn update(&mut self, bytes: &'a [u8]) -> Result<()> {
        match self {
            Hasher::Inline(sum) => {
                sum.update(bytes);
                Ok(())
            }
            Hasher::Thread(tx) => tx.send(bytes).map_err(|_| {
                StorageError::Invalid("the checksum thread ended early (it panicked)".into())
            }),
        }
    }
}

/// One file being written: every byte goes through [`HashingFile::put`], which hands the very
/// slice it writes to the [`Hasher`], so the checksum is of exactly the bytes written, in order.
struct HashingFile<'a> {
    file: File,
    path: PathBuf,
    hasher: Hasher<'a>,
    buf: Vec<u8>,
    written: u64,
}

impl<'a> HashingFile<'a> {
    fn create(path: PathBuf, hasher: Hasher<'a>) -> Result<Self> {
        Ok(HashingFile {
            file: create_new(&path)?,
            path,
            hasher,
            buf: Vec::new(),
            written: 0,
        })
    }

    fn put(&mut self, bytes: &'a [u8]) -> Result<()> {
        if bytes.len() >= GATHER {
            self.flush_buf()?;
            // Piece by piece, so the checksum of one piece runs while the previous is written.
            for piece in bytes.chunks(GATHER) {
                self.hasher.update(piece)?;
                self.written += piece.len() as u64;
                self.file
                    .write_all(piece)
                    .ctx(|| format!("write {}", self.path.display()))?;
            }
            return Ok(());
        }
        self.hasher.update(bytes)?;
        self.written += bytes.len() as u64;
        if self.buf.len() + bytes.len() > GATHER {
            self.flush_buf()?;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(GATHER);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Like [`HashingFile::put`] for bytes that do not outlive the call (read from a file into a
    /// reused buffer): checksummed inline.
    fn put_transient(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.hasher {
            Hasher::Inline(sum) => sum.update(bytes),
            Hasher::Thread(_) => unreachable!("copies are checksummed inline"),
        }
        self.written += bytes.len() as u64;
        self.flush_buf()?;
        self.file
            .write_all(bytes)
            .ctx(|| format!("write {}", self.path.display()))
    }

    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all(&self.buf)
                .ctx(|| format!("write {}", self.path.display()))?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Flush and fsync; returns the size and the inline checksum, if inline.
    fn finish(mut self) -> Result<(u64, Option<String>)> {
        self.flush_buf()?;
        tracing::debug!(phase = "fsync", file = %self.path.display(), "fsync");
        self.file
            .sync_all()
            .ctx(|| format!("fsync {}", self.path.display()))?;
        let sum = match &self.hasher {
            Hasher::Inline(sum) => Some(sum.hex()),
            Hasher::Thread(_) => None,
        };
        Ok((self.written, sum))
    }
}

fn write_one(dir: &Path, name: &str, src: &FileSource<'_>) -> Result<FileEntry> {
    let (size, checksum) = match src {
        FileSource::Adopt(path) => return adopt_one(dir, name, path),
        FileSource::CopyOf(path) => copy_one(&dir.join(name), path)?,
        FileSource::Tensors { tensors, metadata } => {
            let layout: Vec<(&str, Dtype, &[usize])> = tensors
                .iter()
                .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
                .collect();
            let header = encode_header(&layout, metadata)
                .map_err(|r| StorageError::Invalid(format!("{name}: {r}")))?;
            let mut pieces = vec![header.as_slice()];
            pieces.extend(tensors.iter().map(|t| &*t.bytes));
            write_pieces(&dir.join(name), &pieces)?
        }
        FileSource::Bytes(b) => write_pieces(&dir.join(name), &[&**b])?,
    };
    Ok(FileEntry {
        name: name.to_string(),
        size,
        checksum,
    })
}

/// Write `pieces` in order into the new file `path`, checksum them, fsync: (size, checksum). A
/// large file is checksummed on a helper thread fed the same borrowed slices the writer writes
/// (the bytes cannot change meanwhile: they are borrowed immutably for the whole call), so the
/// checksum costs no time beside the writes.
fn write_pieces(path: &Path, pieces: &[&[u8]]) -> Result<(u64, String)> {
    let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
    if total < HASH_THREAD_MIN {
        let (size, sum) = write_through(path, pieces, Hasher::Inline(Box::default()))?;
        return Ok((size, sum.expect("an inline checksum")));
    }
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<&[u8]>(HASH_QUEUE);
        let hashing = std::thread::Builder::new()
            .name("hpc-ckpt-hash".into())
            .spawn_scoped(s, move || {
                let mut sum = Checksum::new();
                for piece in rx {
                    sum.update(piece);
                }
                sum.hex()
            })
            .ctx(|| format!("start the checksum thread for {}", path.display()))?;
        // `write` consumes the sender: the thread's loop ends when the writer is done or fails.
        let written = write_through(path, pieces, Hasher::Thread(tx));
        let sum = hashing.join().map_err(|_| {
            StorageError::Invalid(format!(
                "the checksum thread of {} panicked",
                path.display()
            ))
        });
        let (size, _) = written?;
        Ok((size, sum?))
    })
}

/// Create `path`, put every piece through `hasher` into it, fsync it.
fn write_through<'a>(
    path: &Path,
    pieces: &[&'a [u8]],
    hasher: Hasher<'a>,
) -> Result<(u64, Option<String>)> {
    let mut out = HashingFile::create(path.to_path_buf(), hasher)?;
    for p in pieces {
        out.put(p)?;
    }
    out.finish()
}

/// Copy the regular file `src` into the new file `path`, checksumming inline: (size, checksum).
fn copy_one(path: &Path, src: &Path) -> Result<(u64, String)> {
    let (mut f, _) = open_regular_nofollow(src)
        .map_err(|r| StorageError::Invalid(format!("{}: {r}", src.display())))?;
    let mut out = HashingFile::create(path.to_path_buf(), Hasher::Inline(Box::default()))?;
    read_all(&mut f, src, |chunk| out.put_transient(chunk))?;
    let (size, sum) = out.finish()?;
    Ok((size, sum.expect("an inline checksum")))
}

/// Read `f` (opened from `path`) to its end, handing each chunk to `each`; returns the bytes read.
fn read_all(f: &mut File, path: &Path, mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<u64> {
    let mut buf = vec![0u8; GATHER];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StorageError::io(format!("read {}", path.display()), e)),
        };
        total += n as u64;
        each(&buf[..n])?;
    }
}

/// Adopt `src` as `dir/name` ([`FileSource::Adopt`]): open it (a regular file, not through a
/// symlink), hard-link it into `dir`, check that the link names the file opened, checksum it by
/// reading it once, fsync it, and check that it did not change size meanwhile. A copy where a
/// hard link is not possible (another file system, or one without hard links).
fn adopt_one(dir: &Path, name: &str, src: &Path) -> Result<FileEntry> {
    use std::os::unix::fs::MetadataExt;
    let invalid =
        |r: &dyn std::fmt::Display| StorageError::Invalid(format!("{}: {r}", src.display()));
    let (mut f, _) = open_regular_nofollow(src).map_err(|r| invalid(&r))?;
    let dest = dir.join(name);
    tracing::debug!(phase = "adopt", file = %name, "adopting");
    if let Err(e) = fs::hard_link(src, &dest) {
        use nix::libc::{EMLINK, EOPNOTSUPP, EPERM, EXDEV};
        if matches!(e.raw_os_error(), Some(EXDEV | EPERM | EOPNOTSUPP | EMLINK)) {
            tracing::debug!(file = %name, error = %e, "cannot hard-link: copying instead");
            return write_one(dir, name, &FileSource::CopyOf(src.to_path_buf()));
        }
        return Err(StorageError::io(
            format!("hard-link {} to {}", src.display(), dest.display()),
            e,
        ));
    }
    let opened = f.metadata().ctx(|| format!("stat {}", src.display()))?;
    let linked = fs::symlink_metadata(&dest).ctx(|| format!("stat {}", dest.display()))?;
    if (opened.dev(), opened.ino()) != (linked.dev(), linked.ino()) {
        return Err(invalid(&"was replaced while being adopted"));
    }
    let mut sum = Checksum::new();
    let size = read_all(&mut f, src, |chunk| {
        sum.update(chunk);
        Ok(())
    })?;
    tracing::debug!(phase = "fsync", file = %dest.display(), "fsync");
    f.sync_all().ctx(|| format!("fsync {}", dest.display()))?;
    let now = f.metadata().ctx(|| format!("stat {}", src.display()))?;
    if now.len() != size {
        return Err(invalid(&format_args!(
            "changed size while being adopted ({size} bytes read, {} now): was it still being \
             written?",
            now.len()
        )));
    }
    Ok(FileEntry {
        name: name.to_string(),
        size,
        checksum: sum.hex(),
    })
}

/// Write every file of `snapshot` into the existing directory `dir` (no manifest: a program's
/// staging dir, which the supervisor commits), fsync each, then fsync `dir`. A file of the same
/// name must not exist (a staging dir is emptied after every commit). Returns the bytes written.
pub fn write_files(dir: &Path, snapshot: &Snapshot<'_>) -> Result<u64> {
    snapshot.validate()?;
    let mut bytes = 0;
    for (name, src) in &snapshot.files {
        bytes += write_one(dir, name, src)?.size;
    }
    fsync_dir(dir)?;
    Ok(bytes)
}

/// Write every file of `snapshot` and then the manifest into `dir` (an empty directory this
/// process created exclusively), fsync each, then fsync `dir`. Returns the manifest written.
pub fn stage(dir: &Path, snapshot: &Snapshot<'_>, manifest_base: Manifest) -> Result<Manifest> {
    let mut manifest = manifest_base;
    manifest.files.clear();
    for (name, src) in &snapshot.files {
        tracing::debug!(phase = "write", file = %name, "writing");
        manifest.files.push(write_one(dir, name, src)?);
    }
    manifest.checksum_algorithm = checksum::ALGORITHM.to_string();
    tracing::debug!(phase = "manifest", "writing manifest");
    let mut mf = create_new(&dir.join(MANIFEST_FILE))?;
    mf.write_all(&manifest.to_json())
        .and_then(|_| mf.sync_all())
        .ctx(|| format!("write {}", dir.join(MANIFEST_FILE).display()))?;
    fsync_dir(dir)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::storage::run_dir::holder;
    use crate::storage::verify::verify_checkpoint;
    use crate::storage::{RetentionPolicy, Store};

    fn staged(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        let big: Vec<u8> = (0..5u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        fs::write(dir.join("model.bin"), big).unwrap();
        fs::write(dir.join("state.json"), b"{\"step\": 7}").unwrap();
    }

    #[test]
    fn a_large_file_checksummed_beside_its_writes_has_the_checksum_of_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        // Above the thread's threshold, in pieces not multiples of the write chunk.
        let a: Vec<u8> = (0..(9 << 20) + 3).map(|i: u32| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..(5 << 20) + 11).map(|i: u32| (i % 13) as u8).collect();
        let small = b"tail".to_vec();
        let pieces = [
            a.as_slice(),
            small.as_slice(),
            b.as_slice(),
            small.as_slice(),
        ];
        let path = d.path().join("big.bin");
        let (size, sum) = write_pieces(&path, &pieces).unwrap();
        let on_disk = fs::read(&path).unwrap();
        assert_eq!(on_disk, pieces.concat());
        assert_eq!(size, on_disk.len() as u64);
        assert_eq!(sum, checksum::hex_of(&on_disk));
        // Below the threshold, inline: the same answer for the same bytes.
        let path = d.path().join("small.bin");
        let (size, sum) = write_pieces(&path, &[&small, &small]).unwrap();
        assert_eq!((size, sum), (8, checksum::hex_of(b"tailtail")));
    }

    #[test]
    fn adopted_files_are_linked_not_copied_and_commit_like_copies() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let staging = run.join("staging").join("a");
        let mut store = Store::open(&run, &holder(None), RetentionPolicy::default()).unwrap();
        staged(&staging);
        let meta = |step| CommitMeta {
            step,
            ..CommitMeta::default()
        };
        let copied = store
            .commit(&Snapshot::from_dir(&staging).unwrap(), &meta(6))
            .unwrap();
        let adopted = store
            .commit(&Snapshot::adopt_dir(&staging).unwrap(), &meta(7))
            .unwrap();
        let dirs = store.run_dir().checkpoints_dir();
        let (a, b) = (
            verify_checkpoint(&dirs.join(&copied.name)).unwrap(),
            verify_checkpoint(&dirs.join(&adopted.name)).unwrap(),
        );
        assert_eq!(a.files, b.files, "same manifest entries either way");
        for f in ["model.bin", "state.json"] {
            let (s, c) = (
                fs::metadata(staging.join(f)).unwrap(),
                fs::metadata(dirs.join(&adopted.name).join(f)).unwrap(),
            );
            assert_eq!((s.dev(), s.ino()), (c.dev(), c.ino()), "{f} was copied");
            let copy = fs::metadata(dirs.join(&copied.name).join(f)).unwrap();
            assert_ne!(copy.ino(), s.ino());
        }
        // Adopting takes no new space: the space check asks for none.
        assert_eq!(Snapshot::adopt_dir(&staging).unwrap().estimated_bytes(), 0);
    }

    #[test]
    fn a_failed_adoption_leaves_the_staged_files_and_the_previous_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let staging = run.join("staging").join("a");
        let mut store = Store::open(&run, &holder(None), RetentionPolicy::default()).unwrap();
        staged(&staging);
        let meta = |step| CommitMeta {
            step,
            ..CommitMeta::default()
        };
        store
            .commit(&Snapshot::adopt_dir(&staging).unwrap(), &meta(1))
            .unwrap();
        let mut snap = Snapshot::adopt_dir(&staging).unwrap();
        snap.add(
            "vanished.bin",
            FileSource::Adopt(staging.join("vanished.bin")),
        );
        let e = store.commit(&snap, &meta(2)).unwrap_err();
        assert!(e.to_string().contains("vanished.bin: missing"), "{e}");
        assert!(staging.join("model.bin").is_file() && staging.join("state.json").is_file());
        assert!(store.run_dir().temp_entries().is_empty());
        assert_eq!(store.resume_point().unwrap().unwrap().0.step, 1);
    }
}
