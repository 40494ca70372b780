//! Small durable-filesystem primitives shared by the store: directory fsync, exclusive creation,
//! atomic replacement of small files, safe opening of untrusted paths, bounded reads, appending to
//! JSON-lines files whose last line a crash tore.
//!
//! Every function returns errors with the path in their context.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::error::{IoContext, Result, StorageError};

/// fsync a directory, making the creation, rename or removal of its entries durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx(|| format!("open dir {} for fsync", dir.display()))?;
    f.sync_all().ctx(|| format!("fsync dir {}", dir.display()))
}

/// Create a file that must not exist yet (O_EXCL), for writing.
pub fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .ctx(|| format!("create {}", path.display()))
}

/// Replace `path` with `bytes` atomically and durably: write a temp file beside it, fsync it,
/// rename it over `path`, fsync the parent directory. A crash leaves either the old content or the
/// new, never a mix; the temp file (`.NAME.tmp-PID`) is removed by the next writer's cleanup.
pub fn replace_file_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    // A bare file name ("out.sbatch") has the empty path as parent: the current directory.
    let dir = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => {
            return Err(StorageError::Invalid(format!(
                "{} has no parent",
                path.display()
            )))
        }
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StorageError::Invalid(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = create_new(&tmp)?;
    f.write_all(bytes)
        .ctx(|| format!("write {}", tmp.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).ctx(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir)
}

/// Open a file that must be a regular file reached without following a symlink in its last
/// component. Returns the file and its size.
pub fn open_regular_nofollow(path: &Path) -> std::result::Result<(File, u64), String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(40) => {
                "is a symbolic link (refused: a checkpoint holds regular files only)".into()
            }
            Some(2) => "missing".into(),
            _ => format!("cannot open: {e}"),
        })?;
    let md = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !md.file_type().is_file() {
        return Err("is not a regular file".into());
    }
    Ok((f, md.size()))
}

/// Read at most `max` bytes of a regular file; a larger file is an error (never an allocation
/// sized by the file).
pub fn read_bounded(path: &Path, max: u64) -> std::result::Result<Vec<u8>, String> {
    let (f, size) = open_regular_nofollow(path)?;
    if size > max {
        return Err(format!("is {size} bytes, more than the {max} allowed"));
    }
    let mut buf = Vec::with_capacity(size as usize);
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("read failed: {e}"))?;
    if buf.len() as u64 > max {
        return Err(format!("grew past the {max} bytes allowed while reading"));
    }
    Ok(buf)
}

/// How a rename into a final name went.
#[derive(Debug, PartialEq, Eq)]
pub enum Renamed {
    /// `to` did not exist; `from` now has that name.
    Fresh,
    /// `to` existed and the two were swapped atomically: the old content is now at `from`.
    Exchanged,
}

/// Move directory `from` to `to`. If `to` exists, swap the two atomically (renameat2
/// RENAME_EXCHANGE), so that at every instant `to` names a complete directory; the caller removes
/// the old one, now at `from`.
pub fn rename_dir_into_place(from: &Path, to: &Path) -> Result<Renamed> {
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => return Ok(Renamed::Fresh),
        Err(nix::errno::Errno::EEXIST) => {}
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            // No renameat2 flags on this filesystem: plain rename, which fails on a non-empty `to`.
            if !to.exists() {
                fs::rename(from, to)
                    .ctx(|| format!("rename {} to {}", from.display(), to.display()))?;
                return Ok(Renamed::Fresh);
            }
        }
        Err(e) => {
            return Err(StorageError::io(
                format!("rename {} to {}", from.display(), to.display()),
                e.into(),
            ))
        }
    }
    match renameat2(None, from, None, to, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(Renamed::Exchanged),
        Err(e) => Err(StorageError::io(
            format!(
                "exchange {} with existing {} (renameat2 RENAME_EXCHANGE)",
                from.display(),
                to.display()
            ),
            e.into(),
        )),
    }
}

/// Total size in bytes of the regular files under `dir` (not following symlinks); 0 if missing.
pub fn tree_size(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Remove a directory tree so that it disappears atomically: rename it to a `.tmp-` name in the
/// same parent (which any later writer cleans up if we crash), fsync the parent, then delete.
pub fn remove_dir_atomically(dir: &Path) -> Result<()> {
    let parent = dir
        .parent()
        .ok_or_else(|| StorageError::Invalid(format!("{} has no parent", dir.display())))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("dir");
    let doomed = parent.join(format!(".tmp-delete-{name}-{}", std::process::id()));
    fs::rename(dir, &doomed).ctx(|| format!("rename {} for deletion", dir.display()))?;
    fsync_dir(parent)?;
    fs::remove_dir_all(&doomed).ctx(|| format!("remove {}", doomed.display()))
}

/// How much of a JSON-lines file's end [`open_lines_append`] reads back.
const TAIL_BYTES: u64 = 64 * 1024;

/// `path` (a JSON-lines file) opened for appending, created when missing; a torn last line (a
/// writer killed mid-write) is ended with a newline first. Returns the file and the lines of its
/// last 64 KiB, oldest first (a line the window cuts is left out).
pub fn open_lines_append(path: &Path) -> Result<(File, Vec<Vec<u8>>)> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    let len = file
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    if len == 0 {
        return Ok((file, Vec::new()));
    }
    let from = len.saturating_sub(TAIL_BYTES);
    let mut tail = Vec::with_capacity((len - from) as usize);
    file.seek(SeekFrom::Start(from))
        .and_then(|_| file.read_to_end(&mut tail))
        .ctx(|| format!("read the end of {}", path.display()))?;
    if tail.last() != Some(&b'\n') {
        file.write_all(b"\n")
            .ctx(|| format!("end the torn last line of {}", path.display()))?;
    }
    let mut lines: Vec<Vec<u8>> = tail
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    Ok((file, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_atomic_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ptr");
        replace_file_durable(&p, b"one").unwrap();
        replace_file_durable(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn replace_works_for_a_bare_file_name_in_the_current_dir() {
        let d = tempfile::tempdir().unwrap();
        let old = std::env::current_dir().unwrap();
        std::env::set_current_dir(d.path()).unwrap();
        let r = replace_file_durable(Path::new("bare.txt"), b"x");
        std::env::set_current_dir(old).unwrap();
        r.unwrap();
        assert_eq!(fs::read(d.path().join("bare.txt")).unwrap(), b"x");
    }

    #[test]
    fn rename_exchanges_existing_dirs() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::write(a.join("x"), "new").unwrap();
        assert_eq!(rename_dir_into_place(&a, &b).unwrap(), Renamed::Fresh);
        fs::create_dir(&a).unwrap();
        fs::write(a.join("x"), "newer").unwrap();
        assert_eq!(rename_dir_into_place(&a, &b).unwrap(), Renamed::Exchanged);
        assert_eq!(fs::read_to_string(b.join("x")).unwrap(), "newer");
        assert_eq!(fs::read_to_string(a.join("x")).unwrap(), "new");
    }

    #[test]
    fn bounded_read_refuses_big_files_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, vec![0u8; 100]).unwrap();
        assert!(read_bounded(&p, 99).unwrap_err().contains("more than"));
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
        std::os::unix::fs::symlink(&p, d.path().join("l")).unwrap();
        assert!(read_bounded(&d.path().join("l"), 1000)
            .unwrap_err()
            .contains("symbolic link"));
    }
}
