//! `nbds3-compact` end to end on a file store: a dry run changes no byte of the store, a
//! real run reclaims space and keeps every block, a fresh daemon lease makes it refuse
//! (and `--force` fences that daemon), and each failure class has its own exit code; the
//! frames it rewrites follow `--compression`.
//! Also: the daemon's log is plain text when stderr is not a terminal.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nbds3::format::ExportKeys;
use nbds3::log::lease::{self, Lease};
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, LogError, OpenMode, Update};
use nbds3::store::file::FileStore;
use nbds3::store::{DynStore, PutMode};

const NAME: &str = "disk";
const BS: usize = 4096;
const BLOCKS: u64 = 1024;

fn block(lba: u64, id: u64) -> Vec<u8> {
    let mut x =
        lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1;
    let mut v = Vec::with_capacity(BS);
    while v.len() < BS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn store_at(dir: &Path) -> DynStore {
    Arc::new(FileStore::open(dir.to_str().unwrap()).unwrap())
}

async fn open(store: &DynStore, mode: OpenMode) -> Log {
    open_with(store, mode, LogConfig::default().zstd_level).await
}

async fn open_with(store: &DynStore, mode: OpenMode, zstd_level: Option<i32>) -> Log {
    Log::open(
        Arc::clone(store),
        NAME,
        Some(Geometry {
            size_bytes: BLOCKS * BS as u64,
            block_size: BS as u32,
        }),
        LogConfig {
            segment_bytes_max: 256 << 10,
            zstd_level,
            ..LogConfig::default()
        },
        mode,
    )
    .await
    .unwrap()
}

/// Fill the export, then overwrite most of it twice: plenty of mostly-dead segments.
/// Returns the id each block holds.
async fn populate(store: &DynStore) -> Vec<u64> {
    let log = open(store, OpenMode::Writer).await;
    let mut ids = vec![0u64; BLOCKS as usize];
    for round in 1..=3u64 {
        for chunk in (0..BLOCKS).collect::<Vec<_>>().chunks(64) {
            let mut entries = Vec::new();
            for &lba in chunk {
                // Round 1 writes everything; later rounds 3 blocks of 4.
                if round == 1 || !lba.is_multiple_of(4) {
                    ids[lba as usize] = round;
                    entries.push(BatchEntry {
                        lba,
                        blocks: 1,
                        update: Update::Data(Bytes::from(block(lba, round))),
                    });
                }
            }
            log.commit(&entries).await.unwrap();
        }
    }
    ids
}

/// `populate`'s history with text blocks (zstd shrinks them many times over), all of it
/// stored raw (`--compression off`): compaction then has raw frames to rewrite.
async fn populate_raw_text(store: &DynStore) {
    let log = open_with(store, OpenMode::Writer, None).await;
    for round in 1..=3u64 {
        for chunk in (0..BLOCKS).collect::<Vec<_>>().chunks(64) {
            let entries: Vec<BatchEntry> = chunk
                .iter()
                .filter(|&&lba| round == 1 || !lba.is_multiple_of(4))
                .map(|&lba| BatchEntry {
                    lba,
                    blocks: 1,
                    update: Update::Data(Bytes::from(text_block(lba, round))),
                })
                .collect();
            log.commit(&entries).await.unwrap();
        }
    }
}

fn text_block(lba: u64, round: u64) -> Vec<u8> {
    format!("block {lba} of round {round}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(BS)
        .collect()
}

async fn segment_bytes(store: &DynStore) -> u64 {
    let keys = ExportKeys::new(NAME).unwrap();
    let objs = nbds3::log::gc::list_objects(store, &keys).await.unwrap();
    objs.iter()
        .filter(|o| o.key.contains("/segment/"))
        .map(|o| o.size_bytes)
        .sum()
}

/// Every file under `dir` with its full content: what "byte-identical" compares.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let k = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(k, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn compact(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_nbds3-compact"))
        .arg("--store")
        .arg(format!("file://{}", dir.display()))
        .args(args)
        .env_remove("NBDS3_STORE")
        .output()
        .unwrap();
    eprintln!(
        "nbds3-compact {args:?} -> {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn assert_content(store: &DynStore, ids: &[u64]) {
    let log = open(store, OpenMode::ReadOnly).await;
    log.check_accounting().unwrap();
    let data = log.read_blocks(0, BLOCKS).await.unwrap();
    for lba in 0..BLOCKS {
        let got = &data[lba as usize * BS..(lba as usize + 1) * BS];
        assert!(
            got == block(lba, ids[lba as usize]).as_slice(),
            "block {lba}"
        );
    }
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_at(dir.path());
    populate(&store).await;
    let before = snapshot(dir.path());
    let out = compact(dir.path(), &[NAME, "--dry-run", "--retain", "0s"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("would rewrite"), "{stdout}");
    assert!(stdout.contains("would delete"), "{stdout}");
    let after = snapshot(dir.path());
    assert!(before == after, "a dry run changed the store");
    // Also with a live daemon lease: the dry run still only reads.
    let log = Arc::new(open(&store, OpenMode::Writer).await);
    let l = lease::spawn_lease(Arc::clone(&log), Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = snapshot(dir.path());
    let out = compact(dir.path(), &[NAME, "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        before == snapshot(dir.path()),
        "a dry run changed the store"
    );
    l.close().await;
}

#[tokio::test]
async fn compacts_and_collects_keeping_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_at(dir.path());
    let ids = populate(&store).await;
    let out = compact(
        dir.path(),
        &[NAME, "--retain", "0s", "--keep-versions", "1"],
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for field in [
        "segments read",
        "segments written",
        "bytes stored",
        "before",
        "after",
        "requests",
        "gc deleted",
    ] {
        assert!(stdout.contains(field), "summary lacks {field:?}:\n{stdout}");
    }
    // Space: the summary's before/after, checked independently from the store.
    let keys = ExportKeys::new(NAME).unwrap();
    let objs = nbds3::log::gc::list_objects(&store, &keys).await.unwrap();
    let stored: u64 = objs.iter().map(|o| o.size_bytes).sum();
    let live = BLOCKS * BS as u64;
    assert!(
        (stored as f64) < 1.15 * live as f64,
        "stored {stored} for {live} live bytes"
    );
    assert_content(&store, &ids).await;
    // Nothing left to do: a second run rewrites nothing.
    let out = compact(
        dir.path(),
        &[NAME, "--retain", "0s", "--keep-versions", "1"],
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 compaction passes"), "{stdout}");
    assert_content(&store, &ids).await;
}

#[tokio::test]
async fn rewritten_frames_follow_the_compression_flag() {
    // Round 1's segments end 3/4 dead and are rewritten; round 3's stay as they are, raw.
    let live = BLOCKS * BS as u64;
    let mut stored = Vec::new();
    for args in [&[][..], &["--compression", "off"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let store = store_at(dir.path());
        populate_raw_text(&store).await;
        let mut all = vec![NAME, "--retain", "0s", "--keep-versions", "1"];
        all.extend_from_slice(args);
        assert_eq!(compact(dir.path(), &all).status.code(), Some(0));
        let log = open(&store, OpenMode::ReadOnly).await;
        log.check_accounting().unwrap();
        let data = log.read_blocks(0, BLOCKS).await.unwrap();
        for lba in 0..BLOCKS {
            let round = if lba.is_multiple_of(4) { 1 } else { 3 };
            assert!(
                data[lba as usize * BS..(lba as usize + 1) * BS] == text_block(lba, round)[..],
                "block {lba} after {args:?}"
            );
        }
        stored.push(segment_bytes(&store).await);
    }
    let (zstd, raw) = (stored[0], stored[1]);
    // Raw: every live byte. zstd: round 3's raw 3/4 plus the rewritten quarter, shrunk.
    assert!(
        raw >= live,
        "--compression off: {raw} bytes for {live} live"
    );
    assert!(
        zstd < live * 8 / 10,
        "default: {zstd} bytes for {live} live (off: {raw})"
    );
}

#[tokio::test]
async fn refuses_while_a_daemon_holds_the_lease_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_at(dir.path());
    let ids = populate(&store).await;
    // The "daemon": a writer log with its lease heartbeat.
    let daemon = Arc::new(open(&store, OpenMode::Writer).await);
    let l = lease::spawn_lease(Arc::clone(&daemon), Duration::from_millis(200));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = snapshot(dir.path());
    let out = compact(dir.path(), &[NAME]);
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("served by a daemon") && stderr.contains("--force"),
        "{stderr}"
    );
    // Refusing wrote nothing (the lease itself is refreshed meanwhile: compare the rest).
    let lease_key = ExportKeys::new(NAME).unwrap().lease();
    let strip = |mut m: BTreeMap<String, Vec<u8>>| {
        m.retain(|k, _| !k.ends_with(&lease_key));
        m
    };
    assert!(strip(before) == strip(snapshot(dir.path())));
    assert!(daemon
        .commit(&[BatchEntry {
            lba: 1,
            blocks: 1,
            update: Update::Data(Bytes::from(block(1, 9))),
        }])
        .await
        .is_ok());
    let mut ids = ids;
    ids[1] = 9;

    // --force takes the export: the daemon is fenced, its acknowledged data survives.
    let out = compact(dir.path(), &[NAME, "--force", "--retain", "0s"]);
    assert_eq!(out.status.code(), Some(0));
    let err = daemon
        .commit(&[BatchEntry {
            lba: 2,
            blocks: 1,
            update: Update::Data(Bytes::from(block(2, 10))),
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::Fenced { .. }), "{err}");
    l.close().await;
    assert_content(&store, &ids).await;
}

#[tokio::test]
async fn an_expired_lease_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_at(dir.path());
    let ids = populate(&store).await;
    let keys = ExportKeys::new(NAME).unwrap();
    let stale = Lease {
        epoch: 2,
        nonce: 1,
        holder: "gone:1".into(),
        renewed_unix_ms: nbds3::util::unix_ms_now() - 60_000,
        ttl_ms: 20_000,
    };
    store
        .put(
            &keys.lease(),
            Bytes::from(lease::encode_lease(&stale)),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let out = compact(dir.path(), &[NAME]);
    assert_eq!(out.status.code(), Some(0));
    assert_content(&store, &ids).await;
    // An unreadable lease is treated as a daemon that may be live.
    store
        .put(
            &keys.lease(),
            Bytes::from_static(b"garbage"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let out = compact(dir.path(), &[NAME]);
    assert_eq!(out.status.code(), Some(6));
}

#[tokio::test]
async fn exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_at(dir.path());
    populate(&store).await;
    // Usage.
    assert_eq!(compact(dir.path(), &[]).status.code(), Some(2));
    assert_eq!(
        compact(dir.path(), &[NAME, "--threshold", "1.5"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        compact(dir.path(), &[NAME, "--keep-versions", "0"])
            .status
            .code(),
        Some(2)
    );
    // Unknown export.
    let out = compact(dir.path(), &["no-such-disk"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no export named"));
    // Store error: the store directory cannot be created (a file is in the way).
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nbds3-compact"))
        .arg("--store")
        .arg(format!("file://{}/sub", file.display()))
        .arg(NAME)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    // A corrupt object the export needs.
    let keys = ExportKeys::new(NAME).unwrap();
    let latest = nbds3::log::latest_version(&store, &keys)
        .await
        .unwrap()
        .unwrap();
    let path = dir.path().join(keys.manifest(latest));
    let mut b = std::fs::read(&path).unwrap();
    let n = b.len();
    b[n - 1] ^= 0x55;
    std::fs::write(&path, b).unwrap();
    assert_eq!(compact(dir.path(), &[NAME]).status.code(), Some(5));
}

/// An export written as interleaved commits (even blocks, then odd blocks: every block
/// its own frame, nothing dead) in a fresh directory; returns each block's version.
async fn interleaved_export(dir: &std::path::Path) -> Vec<u64> {
    let store = store_at(dir);
    let log = open(&store, OpenMode::Writer).await;
    let mut ids = vec![0u64; BLOCKS as usize];
    for parity in 0..2u64 {
        let entries: Vec<BatchEntry> = (0..BLOCKS)
            .filter(|l| l % 2 == parity)
            .map(|lba| {
                ids[lba as usize] = 10 + parity;
                BatchEntry {
                    lba,
                    blocks: 1,
                    update: Update::Data(Bytes::from(block(lba, 10 + parity))),
                }
            })
            .collect();
        log.commit(&entries).await.unwrap();
    }
    assert_eq!(log.index_extents(), BLOCKS as usize);
    ids
}

/// `--index-max`: an interleaved export is defragmented to one run per frame; the dry run
/// says it would, and every block stays. 4 KiB of index is ~42 runs (31 after a pass):
/// with `--defrag-frame-max 128K` (the writers' frames) it stops at one run per 128 KiB
/// frame, 1024 / 32 = 32; by default frames may grow to 1 MiB and 256 KiB ones (64
/// blocks, 16 runs) fit.
#[tokio::test]
async fn index_max_defragments_the_index() {
    for (frame_max, runs, frame_blocks) in [(Some("128K"), 32usize, 32u64), (None, 16, 64)] {
        let dir = tempfile::tempdir().unwrap();
        let ids = interleaved_export(dir.path()).await;
        let store = store_at(dir.path());
        let mut args = vec![NAME, "--index-max", "4K"];
        if let Some(f) = frame_max {
            args.extend(["--defrag-frame-max", f]);
        }
        let out = compact(dir.path(), &[&args[..], &["--dry-run"]].concat());
        assert_eq!(out.status.code(), Some(0));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("would defragment"), "{stdout}");
        let out = compact(dir.path(), &[&args[..], &["--threshold", "1"]].concat());
        assert_eq!(out.status.code(), Some(0));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("index runs          before 1024, after {runs}")),
            "{stdout}"
        );
        let log = open(&store, OpenMode::ReadOnly).await;
        assert_eq!(log.index_extents(), runs);
        let layout = log.lookup(0, BLOCKS);
        assert!(
            layout
                .iter()
                .all(|&(lba, n, _)| lba % frame_blocks == 0 && n == frame_blocks),
            "{layout:?}"
        );
        drop(log);
        assert_content(&store, &ids).await;
        // Without the flag nothing is rewritten (no segment has dead blocks).
        let out = compact(dir.path(), &[NAME, "--threshold", "1"]);
        assert_eq!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stdout).contains("0 compaction passes"));
    }
    // A frame limit the format does not allow is a usage error.
    let dir = tempfile::tempdir().unwrap();
    interleaved_export(dir.path()).await;
    let out = compact(
        dir.path(),
        &[NAME, "--index-max", "4K", "--defrag-frame-max", "8M"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Logs redirected away from a terminal (a file, a pipe, a journal) are plain text: no
/// colour escapes between a field's name and its value, so `grep index_runs_after=` works.
#[test]
fn daemon_logs_plain_text_when_stderr_is_not_a_terminal() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nbds3d"))
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(format!("file://{}", dir.path().display()))
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("resident_target_mib="), "{line:?}");
    assert!(
        !line.contains('\x1b'),
        "colour escapes in a piped log: {line:?}"
    );
}

/// TLS flags: a missing or unreadable certificate or key stops the daemon at start with a
/// message naming the file (never a daemon that silently serves in clear), and a key
/// without a certificate is a usage error.
#[test]
fn daemon_refuses_to_start_with_a_bad_tls_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_nbds3d"))
            .args(["--listen", "127.0.0.1:0", "--store", &store])
            .args(args)
            .output()
            .unwrap()
    };
    let (g, m) = (garbage.to_str().unwrap(), missing.to_str().unwrap());
    for (args, needle) in [
        (vec!["--tls-cert", m, "--tls-key", g], "missing.pem"),
        (vec!["--tls-cert", g, "--tls-key", g], "garbage.pem"),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("TLS") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    let out = run(&["--tls-key", g]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
