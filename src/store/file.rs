//! Local-directory backend (`file://DIR`), the embedded default.
//!
//! A key `a/b/c` is the file `DIR/a/b/c`. Invariants:
//! - Nothing outside `DIR` is ever touched: keys are validated (no `.`/`..`/empty
//!   components, no NUL, no leading `/`) and joined component by component, and the walk in
//!   `list` never follows symlinks.
//! - A `put` is atomic and durable: the bytes go to a temp file in the target's directory,
//!   which is fsynced, then renamed (Overwrite) or hard-linked (IfAbsent) into place, then
//!   the directory is fsynced. A reader therefore sees the old object, or the whole new one.
//! - IfAbsent relies on `link(2)` failing with `EEXIST` atomically, so of any number of
//!   racing puts (threads or processes sharing `DIR`) exactly one wins.
//! - Temp files are named `.nbds3-tmp-*`; `list` never shows them, and keys with a component
//!   starting with that prefix are rejected. A crash mid-put can leave one behind: it is
//!   invisible and harmless (only disk space); the daemon sweeps hour-old ones at start
//!   ([`FileStore::sweep_stale_temp_files`]).
//! - Each key component is at most [`COMPONENT_BYTES_MAX`] bytes (the filesystem's
//!   NAME_MAX); longer ones are `InvalidKey` (the log layer splits long names itself).
//! - A key cannot be both an object and a "directory" of other keys (`a` and `a/b`), unlike
//!   S3; such a put fails with `Permanent` and a reason saying so.
//! - `delete` removes directories left empty (up to, never including, `DIR`). A concurrent
//!   put whose directory vanishes under it re-creates the directory and retries.
//!
//! - `list` walks the directory subtree the prefix pins down on every call and sorts the full
//!   key strings (directory order is not byte order: `a-b` < `a/b`), so a page costs time
//!   proportional to the keys under that subtree, not to the page size.
//!
//! - Objects of 256 KiB and more (segments, big checkpoints) are written with `O_DIRECT`
//!   where the filesystem allows it: they are written once and read back through the
//!   daemon's own cache, and filling the kernel's page cache cost more CPU than the rest of
//!   the write path. Durability does not change: the file is still fsynced before its name
//!   appears.
//!
//! All blocking file I/O runs in `tokio::task::spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use super::*;

/// Longest key component the filesystem accepts (Linux NAME_MAX).
pub const COMPONENT_BYTES_MAX: usize = 255;

/// Prefix of temp files; reserved, so it can never collide with an object.
const TEMP_PREFIX: &str = ".nbds3-tmp-";

/// How often a put re-creates its directory after a concurrent delete removed it.
const PUT_DIR_RETRIES_MAX: usize = 64;

/// Objects at least this large are written with `O_DIRECT` (see [`write_direct`]).
const DIRECT_IO_MIN_BYTES: usize = 256 * 1024;
const DIRECT_ON: u8 = 0;
const DIRECT_OFF: u8 = 1;
/// Tests only: behave as if the filesystem refused `O_DIRECT`.
#[cfg(test)]
const DIRECT_REFUSED_FOR_TEST: u8 = 2;
/// Alignment `O_DIRECT` needs for buffer address, file offset and length.
const DIRECT_IO_ALIGN: usize = 4096;
/// Bytes copied into the aligned buffer per `write` call.
const DIRECT_IO_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    /// [`DIRECT_ON`] until the filesystem refuses `O_DIRECT` (some FUSE and network
    /// filesystems, older tmpfs): then [`DIRECT_OFF`] and every put is buffered.
    direct_io: Arc<AtomicU8>,
}

impl FileStore {
    /// Open (creating if needed) the directory `dir` as a store.
    pub fn open(dir: &str) -> StoreResult<Self> {
        if dir.is_empty() {
            return Err(StoreError::Permanent {
                key: String::new(),
                reason: "file store needs a directory (file://DIR)".into(),
            });
        }
        let perm = |what: &str, e: io::Error| StoreError::Permanent {
            key: dir.to_string(),
            reason: format!("{what}: {e}"),
        };
        fs::create_dir_all(dir).map_err(|e| perm("cannot create store directory", e))?;
        // Absolute, so a later chdir cannot redirect the store and `describe` is unambiguous.
        let root = fs::canonicalize(dir).map_err(|e| perm("cannot resolve store directory", e))?;
        let meta = fs::metadata(&root).map_err(|e| perm("cannot stat store directory", e))?;
        if !meta.is_dir() {
            return Err(StoreError::Permanent {
                key: dir.to_string(),
                reason: "not a directory".into(),
            });
        }
        Ok(Self {
            root,
            direct_io: Arc::new(AtomicU8::new(DIRECT_ON)),
        })
    }

    /// Remove temp files (`.nbds3-tmp-*`) last modified more than `older_than` ago: leftovers
    /// of puts that crashed half-way. A put in progress touches its temp file continuously
    /// and finishes in seconds, so an hour-old one is garbage. Walks the whole tree without
    /// following symlinks; blocking (run it off the reactor). Returns files removed.
    pub fn sweep_stale_temp_files(&self, older_than: std::time::Duration) -> io::Result<u64> {
        let mut removed = 0;
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                // Pruned by a concurrent delete.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let ft = entry.file_type()?;
                if ft.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                let stale_temp = ft.is_file()
                    && entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > older_than);
                if stale_temp {
                    match fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(removed)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Validate `key` and map it to its path under the root.
    fn key_path(&self, key: &str) -> StoreResult<PathBuf> {
        validate_key(key)?;
        let mut path = self.root.clone();
        for comp in key.split('/') {
            check_component(key, comp)?;
            path.push(comp);
        }
        Ok(path)
    }
}

fn check_component(key: &str, comp: &str) -> StoreResult<()> {
    let bad = |reason: String| {
        Err(StoreError::InvalidKey {
            key: key.chars().take(200).collect(),
            reason,
        })
    };
    if comp.len() > COMPONENT_BYTES_MAX {
        return bad(format!(
            "path component of {} bytes is longer than the file store's limit of \
             {COMPONENT_BYTES_MAX} bytes (filesystem NAME_MAX)",
            comp.len()
        ));
    }
    if comp.starts_with(TEMP_PREFIX) {
        return bad(format!(
            "component starts with {TEMP_PREFIX:?}, reserved by the file store"
        ));
    }
    Ok(())
}

/// Map an I/O error to the store's error type, keeping the operation and the OS error.
fn io_err(key: &str, what: &str, e: io::Error) -> StoreError {
    let reason = format!("{what}: {e}");
    if e.kind() == io::ErrorKind::NotFound {
        return StoreError::NotFound { key: key.into() };
    }
    // Conditions that can clear up by themselves are worth retrying higher up.
    let transient = matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSPC | libc::EDQUOT | libc::EINTR | libc::EAGAIN | libc::EMFILE | libc::ENFILE
        )
    ) || matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    );
    if transient {
        StoreError::Transient {
            key: key.into(),
            reason,
        }
    } else {
        StoreError::Permanent {
            key: key.into(),
            reason,
        }
    }
}

/// Run blocking file I/O off the reactor.
async fn blocking<T, F>(key: &str, f: F) -> StoreResult<T>
where
    F: FnOnce() -> StoreResult<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Permanent {
            key: key.into(),
            reason: format!("file I/O task failed: {e}"),
        }),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Create every missing directory from `root` down to `dir`, fsyncing the parent of each one
/// created so the new entry itself survives a crash (create_dir_all would not).
fn make_dirs(root: &Path, dir: &Path) -> io::Result<()> {
    let rel = dir.strip_prefix(root).map_err(io::Error::other)?;
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        let parent = cur.clone();
        cur.push(comp);
        match fs::create_dir(&cur) {
            Ok(()) => fsync_dir(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !fs::symlink_metadata(&cur)?.is_dir() {
                    return Err(io::Error::other(format!(
                        "{} is an object, so it cannot also be a key prefix directory",
                        cur.display()
                    )));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Create a uniquely named temp file in `dir`, creating `dir` as needed.
fn create_temp(root: &Path, dir: &Path) -> io::Result<(PathBuf, File)> {
    let mut last_err = None;
    for _ in 0..PUT_DIR_RETRIES_MAX {
        match make_dirs(root, dir) {
            Ok(()) => {}
            // A concurrent delete pruned a directory we had just created: start over.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        }
        let name = format!(
            "{TEMP_PREFIX}{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            // The directory was removed by a concurrent delete (it looked empty): recreate.
            Err(e) if e.kind() == io::ErrorKind::NotFound => last_err = Some(e),
            // Name collision: try another random name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("could not create temp file")))
}

/// Write `data` to the (empty) file at `path` with `O_DIRECT`, from an aligned buffer, the
/// last block zero-padded and the file then cut to the exact length. Why: segments are
/// written once and read back through the daemon's own cache, and on the machines we
/// measured a buffered write spent 2.8 s of kernel CPU per GiB filling the page cache
/// (against 0.2 s direct) — 42% of the daemon's CPU under random 4 KiB writes. The caller
/// still fsyncs the file (size and metadata) before publishing it. On any error the caller
/// falls back to a buffered write (`EINVAL`: the filesystem does not support it).
fn write_direct(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // A buffer already aligned (the log builds segments so) is written as it is, all but
    // its last partial block: no copy. Only what remains goes through a bounce buffer.
    let direct_len = if data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0 {
        data.len() / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN
    } else {
        0
    };
    // A short write would leave the offset unaligned: write_all then fails with EINVAL
    // and the caller falls back, so a partial direct write is never kept.
    f.write_all(&data[..direct_len])?;
    let data = &data[direct_len..];
    if data.is_empty() {
        return f.set_len(direct_len as u64);
    }
    let mut backing = DIRECT_BUFS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_else(|| vec![0u8; DIRECT_IO_CHUNK_BYTES + DIRECT_IO_ALIGN]);
    let off = backing.as_ptr().align_offset(DIRECT_IO_ALIGN);
    let buf = &mut backing[off..off + DIRECT_IO_CHUNK_BYTES];
    let mut result = Ok(());
    for chunk in data.chunks(DIRECT_IO_CHUNK_BYTES) {
        buf[..chunk.len()].copy_from_slice(chunk);
        let padded = chunk.len().next_multiple_of(DIRECT_IO_ALIGN);
        buf[chunk.len()..padded].fill(0);
        result = f.write_all(&buf[..padded]);
        if result.is_err() {
            break;
        }
    }
    let mut pool = DIRECT_BUFS.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < DIRECT_BUFS_KEPT {
        pool.push(backing);
    }
    drop(pool);
    result?;
    f.set_len((direct_len + data.len()) as u64)
}

/// Aligned bounce buffers kept between direct writes (a fresh 1 MiB one page-faults on
/// every page it is copied into); at most [`DIRECT_BUFS_KEPT`], so at most that many MiB.
static DIRECT_BUFS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
const DIRECT_BUFS_KEPT: usize = 8;

fn direct_attempt(mode: u8, path: &Path, data: &[u8]) -> io::Result<()> {
    #[cfg(test)]
    if mode == DIRECT_REFUSED_FOR_TEST {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let _ = mode;
    write_direct(path, data)
}

fn put_blocking(
    root: &Path,
    path: &Path,
    key: &str,
    data: &[u8],
    mode: PutMode,
    direct_io: &AtomicU8,
) -> StoreResult<()> {
    let dir = path.parent().ok_or_else(|| {
        io_err(
            key,
            "key has no parent directory",
            io::ErrorKind::InvalidInput.into(),
        )
    })?;
    let (temp, mut file) =
        create_temp(root, dir).map_err(|e| io_err(key, "create temp file", e))?;
    let result = (|| {
        let mode_now = direct_io.load(Ordering::Relaxed);
        let wrote_direct = data.len() >= DIRECT_IO_MIN_BYTES
            && mode_now != DIRECT_OFF
            && match direct_attempt(mode_now, &temp, data) {
                Ok(()) => true,
                Err(e) => {
                    // Refused (EINVAL, EOPNOTSUPP: tmpfs of old kernels, some FUSE and
                    // network filesystems): buffered from now on. Any other error: this
                    // put retries buffered, which reports the error if it persists.
                    if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) {
                        tracing::info!(dir = %dir.display(), error = %e, "filesystem refuses O_DIRECT; using buffered writes");
                        direct_io.store(DIRECT_OFF, Ordering::Relaxed);
                    } else {
                        tracing::warn!(%key, error = %e, "O_DIRECT write failed; retrying buffered");
                    }
                    // Start the buffered write from an empty file.
                    file.set_len(0)
                        .map_err(|e| io_err(key, "truncate temp file", e))?;
                    false
                }
            };
        if !wrote_direct {
            file.write_all(data)
                .map_err(|e| io_err(key, "write temp file", e))?;
        }
        // Durability order: the file's bytes must be on disk before its name becomes
        // visible, or a crash could leave a complete-looking name over missing data.
        file.sync_all()
            .map_err(|e| io_err(key, "fsync temp file", e))?;
        drop(file);
        match mode {
            PutMode::Overwrite => fs::rename(&temp, path).map_err(|e| {
                if path.is_dir() {
                    conflict_with_dir(key)
                } else {
                    io_err(key, "rename temp file into place", e)
                }
            })?,
            PutMode::IfAbsent => {
                // link(2) refuses an existing target atomically: exactly one racer wins.
                match fs::hard_link(&temp, path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if path.is_dir() {
                            return Err(conflict_with_dir(key));
                        }
                        return Err(StoreError::PreconditionFailed { key: key.into() });
                    }
                    Err(e) => return Err(io_err(key, "link temp file into place", e)),
                }
                fs::remove_file(&temp).map_err(|e| io_err(key, "remove temp file", e))?;
            }
        }
        // Durability order: the rename/link lives in the directory; fsync it so an Ok put
        // survives a crash.
        match fsync_dir(dir) {
            Ok(()) => Ok(()),
            // A concurrent delete removed the new object and pruned its directory: the put
            // took effect and was then deleted, which is a valid ordering.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(key, "fsync directory", e)),
        }
    })();
    if result.is_err() {
        // Best effort: the temp file is invisible anyway; after a rename it is already gone.
        let _ = fs::remove_file(&temp);
    }
    result
}

fn conflict_with_dir(key: &str) -> StoreError {
    StoreError::Permanent {
        key: key.into(),
        reason: "key is a prefix directory of other keys in the file store".into(),
    }
}

/// Open `path` as an object; a directory (a prefix of other keys) is not an object.
fn open_object(path: &Path, key: &str) -> StoreResult<(File, u64)> {
    let file = File::open(path).map_err(|e| match e.raw_os_error() {
        // A path prefix is an object file: no such key.
        Some(libc::ENOTDIR) => StoreError::NotFound { key: key.into() },
        _ => io_err(key, "open", e),
    })?;
    let meta = file.metadata().map_err(|e| io_err(key, "stat", e))?;
    if !meta.is_file() {
        return Err(StoreError::NotFound { key: key.into() });
    }
    Ok((file, meta.len()))
}

fn get_blocking(path: &Path, key: &str) -> StoreResult<Bytes> {
    let (mut file, size) = open_object(path, key)?;
    let cap = usize::try_from(size).map_err(|_| StoreError::Permanent {
        key: key.into(),
        reason: format!("object of {size} bytes does not fit in memory"),
    })?;
    let mut buf = Vec::with_capacity(cap);
    file.read_to_end(&mut buf)
        .map_err(|e| io_err(key, "read", e))?;
    // Objects are immutable once named (replacement is a rename to a new inode), so the open
    // file cannot change size under us; check anyway rather than return a surprise.
    if buf.len() as u64 != size {
        return Err(StoreError::Transient {
            key: key.into(),
            reason: format!("read {} bytes, expected {size}", buf.len()),
        });
    }
    Ok(Bytes::from(buf))
}

fn get_range_blocking(path: &Path, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
    let (mut file, size) = open_object(path, key)?;
    if range.start >= range.end || range.end > size {
        return Err(StoreError::InvalidRange {
            key: key.into(),
            start: range.start,
            end: range.end,
            size_bytes: size,
        });
    }
    let len = usize::try_from(range.end - range.start).map_err(|_| StoreError::Permanent {
        key: key.into(),
        reason: "range does not fit in memory".into(),
    })?;
    file.seek(SeekFrom::Start(range.start))
        .map_err(|e| io_err(key, "seek", e))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StoreError::Transient {
                key: key.into(),
                reason: "object shorter than its size while reading".into(),
            }
        } else {
            io_err(key, "read", e)
        }
    })?;
    Ok(Bytes::from(buf))
}

/// Unlink one object (missing is fine); returns whether its directory changed.
fn unlink(path: &Path, key: &str) -> StoreResult<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::EISDIR)) =>
        {
            // Missing, a path prefix is an object, or the key is a directory: no such object.
            Ok(false)
        }
        Err(e) => Err(io_err(key, "unlink", e)),
    }
}

/// Remove directories left empty above `path`, up to but excluding `root`. Failure just means
/// the directory is not empty (or a put is recreating it), so it is ignored. Returns the
/// deepest directory that still exists (whose entry list changed), to be fsynced.
fn prune_empty_dirs(root: &Path, path: &Path) -> PathBuf {
    let mut dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.to_path_buf());
    while dir != root && dir.starts_with(root) {
        if fs::remove_dir(&dir).is_err() {
            return dir;
        }
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    dir
}

fn delete_many_blocking(root: &Path, items: &[(PathBuf, String)]) -> StoreResult<()> {
    let mut touched = std::collections::BTreeSet::new();
    for (path, key) in items {
        if unlink(path, key)? {
            touched.insert(prune_empty_dirs(root, path));
        }
    }
    // Make the removals durable once per directory rather than once per key; a delete that
    // a crash undoes is harmless (GC retries) but an acknowledged one should stay.
    for dir in touched {
        match fsync_dir(&dir) {
            Ok(()) => {}
            // Removed meanwhile by a concurrent delete: nothing left to make durable here.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir.display().to_string(), "fsync directory", e)),
        }
    }
    Ok(())
}

/// Could any key under the directory whose keys all start with `dir_key` (ending in `/`)
/// be listed for this prefix and start_after?
fn dir_may_match(dir_key: &str, prefix: &str, start_after: Option<&str>) -> bool {
    if !(dir_key.starts_with(prefix) || prefix.starts_with(dir_key)) {
        return false;
    }
    match start_after {
        // Every key under the directory starts with `dir_key`. If `start_after` is greater
        // than `dir_key` without extending it, it differs at a byte within `dir_key` and is
        // greater there, so it is greater than every such key.
        Some(a) => a.starts_with(dir_key) || a < dir_key,
        None => true,
    }
}

fn list_blocking(
    root: &Path,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> StoreResult<ListPage> {
    // Start at the deepest directory the prefix pins down: for `a/b` that is `a/` (both
    // `a/bc` and `a/b/x` match), for `a/b/` it is `a/b/`.
    let dir_part = match prefix.rfind('/') {
        Some(i) => &prefix[..=i],
        None => "",
    };
    let mut start_dir = root.to_path_buf();
    for comp in dir_part.split('/').filter(|c| !c.is_empty()) {
        start_dir.push(comp);
    }
    let mut keys: Vec<String> = Vec::new();
    let mut stack = vec![(start_dir, dir_part.to_string())];
    while let Some((dir, dir_key)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            // Absent (no keys under it, or removed by a concurrent delete) or a file.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                continue
            }
            Err(e) => return Err(io_err(prefix, "read directory", e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(prefix, "read directory entry", e))?;
            // Names that are not UTF-8 were not written by this store; they cannot be keys.
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let ft = match entry.file_type() {
                Ok(ft) => ft,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(prefix, "stat directory entry", e)),
            };
            let key = format!("{dir_key}{name}");
            if ft.is_dir() {
                let sub_key = format!("{key}/");
                if dir_may_match(&sub_key, prefix, start_after) {
                    stack.push((entry.path(), sub_key));
                }
            } else if ft.is_file()
                && key.starts_with(prefix)
                && start_after.is_none_or(|a| key.as_str() > a)
            {
                keys.push(key);
            }
            // Symlinks and other file types are never created by the store: ignored.
        }
    }
    // Sort full key strings: directory order would put `a/b` before `a-b`, byte order not.
    keys.sort_unstable();
    let more = keys.len() > limit;
    keys.truncate(limit);
    let next = if more { keys.last().cloned() } else { None };
    let mut objects = Vec::with_capacity(keys.len());
    for key in keys {
        let mut path = root.to_path_buf();
        path.extend(key.split('/'));
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => objects.push(ObjectMeta {
                key,
                size_bytes: m.len(),
            }),
            // Deleted or replaced by a directory since the walk: skip it.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&key, "stat", e)),
        }
    }
    Ok(ListPage { objects, next })
}

#[async_trait]
impl ObjectStore for FileStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        let path = self.key_path(key)?;
        let root = self.root.clone();
        let k = key.to_string();
        let direct = Arc::clone(&self.direct_io);
        blocking(key, move || {
            put_blocking(&root, &path, &k, &data, mode, &direct)
        })
        .await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let path = self.key_path(key)?;
        let k = key.to_string();
        blocking(key, move || get_blocking(&path, &k)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let path = self.key_path(key)?;
        let k = key.to_string();
        blocking(key, move || get_range_blocking(&path, &k, range)).await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let path = self.key_path(key)?;
        let k = key.to_string();
        blocking(key, move || {
            let (_, size_bytes) = open_object(&path, &k)?;
            Ok(ObjectMeta { key: k, size_bytes })
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        validate_prefix(prefix)?;
        let limit = limit.clamp(1, LIST_PAGE_MAX);
        let root = self.root.clone();
        let p = prefix.to_string();
        let a = start_after.map(str::to_string);
        blocking(prefix, move || {
            list_blocking(&root, &p, a.as_deref(), limit)
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.delete_many(&[key.to_string()]).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        // Validate everything before touching anything.
        let items = keys
            .iter()
            .map(|k| Ok((self.key_path(k)?, k.clone())))
            .collect::<StoreResult<Vec<_>>>()?;
        if items.is_empty() {
            return Ok(());
        }
        let root = self.root.clone();
        let first = keys.first().cloned().unwrap_or_default();
        blocking(&first, move || delete_many_blocking(&root, &items)).await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::open(dir.path().to_str().expect("utf-8 path")).expect("open");
        (dir, s)
    }

    async fn large_objects_round_trip(s: &FileStore) {
        // Lengths around the direct-I/O threshold and alignment, and across chunks; from
        // buffers at an arbitrary address (copied through a bounce buffer) and at an
        // aligned one (written in place but for the tail).
        for (i, (len, aligned)) in [
            (DIRECT_IO_MIN_BYTES - 1, false),
            (DIRECT_IO_MIN_BYTES, false),
            (DIRECT_IO_MIN_BYTES + 1, false),
            (3 * DIRECT_IO_CHUNK_BYTES + 12_345, false),
            (3 * DIRECT_IO_CHUNK_BYTES + 12_345, true),
            (DIRECT_IO_MIN_BYTES, true),
            (DIRECT_IO_MIN_BYTES + 1, true),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            let key = format!("big/{i}");
            let body = if aligned {
                let mut v: Vec<u8> = Vec::with_capacity(len + DIRECT_IO_ALIGN);
                let pad = v.as_ptr().align_offset(DIRECT_IO_ALIGN);
                v.resize(pad, 0xEE);
                v.extend_from_slice(&data);
                let b = Bytes::from(v).slice(pad..);
                assert_eq!(b.as_ptr().align_offset(DIRECT_IO_ALIGN), 0);
                b
            } else {
                Bytes::from(data.clone())
            };
            s.put(&key, body, PutMode::IfAbsent).await.unwrap();
            assert_eq!(s.head(&key).await.unwrap().size_bytes, len as u64);
            assert!(s.get(&key).await.unwrap() == data, "{len} bytes differ");
            let r = (len as u64 - 5000)..len as u64;
            assert!(
                s.get_range(&key, r.clone()).await.unwrap()[..]
                    == data[r.start as usize..r.end as usize]
            );
        }
    }

    #[tokio::test]
    async fn large_objects_are_exact_with_direct_io() {
        let (d, s) = store();
        let probe = d.path().join("probe");
        fs::write(&probe, b"").unwrap();
        let supported = write_direct(&probe, &[1u8; 4096]).is_ok();
        large_objects_round_trip(&s).await;
        // Where the filesystem supports O_DIRECT the store is still using it.
        assert_eq!(s.direct_io.load(Ordering::Relaxed) == DIRECT_ON, supported);
    }

    #[tokio::test]
    async fn large_objects_fall_back_where_direct_io_is_refused() {
        let (_d, s) = store();
        s.direct_io
            .store(DIRECT_REFUSED_FOR_TEST, Ordering::Relaxed);
        large_objects_round_trip(&s).await;
        assert_eq!(s.direct_io.load(Ordering::Relaxed), DIRECT_OFF);
    }

    #[test]
    fn stale_temp_files_are_swept_and_fresh_ones_and_objects_kept() {
        let (d, s) = store();
        let sub = d.path().join("exports/a/segment");
        fs::create_dir_all(&sub).unwrap();
        let old = sub.join(format!("{TEMP_PREFIX}1-00"));
        let fresh = sub.join(format!("{TEMP_PREFIX}1-01"));
        let object = sub.join("00000000000000000001");
        let old_named_object = sub.join("00000000000000000002");
        for p in [&old, &fresh, &object, &old_named_object] {
            fs::write(p, b"x").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for p in [&old, &old_named_object] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
        }
        let n = s
            .sweep_stale_temp_files(std::time::Duration::from_secs(3600))
            .unwrap();
        assert_eq!(n, 1);
        assert!(!old.exists());
        assert!(fresh.exists() && object.exists() && old_named_object.exists());
    }

    #[tokio::test]
    async fn temp_files_are_invisible_and_cleaned_up() {
        let (dir, s) = store();
        s.put("x/y", Bytes::from_static(b"1"), PutMode::IfAbsent)
            .await
            .expect("put");
        let err = s
            .put("x/y", Bytes::from_static(b"2"), PutMode::IfAbsent)
            .await
            .expect_err("second put");
        assert!(err.is_precondition_failed());
        let names: Vec<_> = fs::read_dir(dir.path().join("x"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("y")]);
        // A stray temp file (crash mid-put) never shows up in a listing.
        fs::write(
            dir.path().join("x").join(format!("{TEMP_PREFIX}stale")),
            b"z",
        )
        .expect("write");
        let page = s.list("", None, 100).await.expect("list");
        let keys: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, vec!["x/y"]);
    }

    #[tokio::test]
    async fn long_and_reserved_components_rejected() {
        let (_dir, s) = store();
        let long = "a".repeat(256);
        let err = s
            .put(&format!("p/{long}"), Bytes::new(), PutMode::Overwrite)
            .await
            .expect_err("long component");
        assert!(matches!(err, StoreError::InvalidKey { ref reason, .. } if reason.contains("255")));
        let ok = "a".repeat(255);
        s.put(&format!("p/{ok}"), Bytes::new(), PutMode::Overwrite)
            .await
            .expect("255-byte component");
        let err = s
            .put(
                &format!("p/{TEMP_PREFIX}x"),
                Bytes::new(),
                PutMode::Overwrite,
            )
            .await
            .expect_err("reserved");
        assert!(matches!(err, StoreError::InvalidKey { .. }));
    }

    #[tokio::test]
    async fn delete_prunes_empty_dirs_but_not_root() {
        let (dir, s) = store();
        s.put("a/b/c", Bytes::from_static(b"1"), PutMode::Overwrite)
            .await
            .expect("put");
        s.put("a/d", Bytes::from_static(b"1"), PutMode::Overwrite)
            .await
            .expect("put");
        s.delete("a/b/c").await.expect("delete");
        assert!(!dir.path().join("a/b").exists());
        assert!(dir.path().join("a/d").exists());
        s.delete("a/d").await.expect("delete");
        assert!(!dir.path().join("a").exists());
        assert!(dir.path().exists());
        // Recreating after pruning works.
        s.put("a/b/c", Bytes::from_static(b"2"), PutMode::IfAbsent)
            .await
            .expect("put again");
        assert_eq!(&s.get("a/b/c").await.expect("get")[..], b"2");
    }

    #[tokio::test]
    async fn object_and_prefix_directory_conflict_is_an_error() {
        let (_dir, s) = store();
        s.put("a/b", Bytes::from_static(b"1"), PutMode::Overwrite)
            .await
            .expect("put");
        for mode in [PutMode::Overwrite, PutMode::IfAbsent] {
            let err = s
                .put("a", Bytes::from_static(b"1"), mode)
                .await
                .expect_err("a is a directory");
            assert!(matches!(err, StoreError::Permanent { .. }), "{err:?}");
        }
        assert!(s.get("a").await.expect_err("dir").is_not_found());
        assert!(s.head("a").await.expect_err("dir").is_not_found());
        s.delete("a")
            .await
            .expect("delete of a directory key is a no-op");
        let err = s
            .put("a/b/c", Bytes::from_static(b"1"), PutMode::Overwrite)
            .await
            .expect_err("a/b is an object");
        assert!(matches!(err, StoreError::Permanent { .. }), "{err:?}");
        assert!(s.get("a/b/c").await.expect_err("missing").is_not_found());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_put_and_delete_in_same_dir() {
        let (_dir, s) = store();
        let s = Arc::new(s);
        let mut tasks = Vec::new();
        for i in 0..8u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..50u32 {
                    let key = format!("d/e/k{i}-{j}");
                    s.put(&key, Bytes::from(vec![1u8; 10]), PutMode::IfAbsent)
                        .await
                        .expect("put");
                    assert_eq!(s.get(&key).await.expect("get").len(), 10);
                    s.delete(&key).await.expect("delete");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert!(s.list("", None, 10).await.expect("list").objects.is_empty());
    }

    #[test]
    fn dir_pruning_rule() {
        assert!(dir_may_match("a/", "", None));
        assert!(dir_may_match("a/", "a", None));
        assert!(dir_may_match("a/", "a/b", None));
        assert!(!dir_may_match("a/", "b", None));
        assert!(!dir_may_match("ab/", "a/", None));
        assert!(dir_may_match("a/", "", Some("a/x")));
        assert!(dir_may_match("b/", "", Some("a/x")));
        assert!(!dir_may_match("a/", "", Some("b")));
        assert!(!dir_may_match("a/", "", Some("a0")));
        assert!(dir_may_match("a/", "", Some("a-")));
    }
}
