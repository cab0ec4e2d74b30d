//! nbds3-inspect against exports written through the log layer and through the real
//! `nbds3d` (with `qemu-io`), on the file store and on the real S3 server of
//! `tools/test-env.sh`: every subcommand in text and JSON, checked against what was written
//! (sizes, versions, mapped ranges, live accounting) and against `nbdinfo --map`; `verify`
//! clean on intact exports (also after compaction and GC) and naming the object (and
//! offset) after corruption; exit codes; and that the tool never writes to the store.

mod common;
#[macro_use]
mod e2e;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use bytes::Bytes;
use nbds3::format::{self, ExportKeys};
use nbds3::inspect::{self, NoProgress};
use nbds3::log::{BatchEntry, Geometry, Log, LogConfig, OpenMode, Update};
use nbds3::store::file::FileStore;
use nbds3::store::memory::MemoryStore;
use nbds3::store::s3::S3Store;
use nbds3::store::{list_all, DynStore, PutMode};
use serde_json::Value;

const BS: u64 = 4096;
const SIZE: u64 = 64 << 20;
const EXPORT: &str = "disk";

/// The export every test writes, and what it should look like afterwards.
///
/// Commits (after the open, which makes versions 1 and 2):
/// - v3: lbas 0..256 = 0xab (1 MiB, frames of 16 blocks)
/// - v4: unmap 100..110, pseudo-random data at 1000..1010, zero-alloc 2000..2016
/// - v5: lbas 0..16 = 0xcd (kills the first frame of v3's segment)
///
/// With `tail_segments_max = 1` the v4 commit (tail of 2) starts a background checkpoint of
/// v4's state (holding v3's and v4's segments); the scenario waits for it, so the v5 commit
/// installs it and v5's segment is the tail.
struct Scenario {
    checkpoint: bool,
}

/// Expected allocation, merged: (first block, blocks, state).
const EXPECTED_MAP: &[(u64, u64, &str)] = &[
    (0, 100, "data"),
    (100, 10, "hole"),
    (110, 146, "data"),
    (256, 744, "hole"),
    (1000, 10, "data"),
    (1010, 990, "hole"),
    (2000, 16, "zero"),
    (2016, SIZE / BS - 2016, "hole"),
];

fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

impl Scenario {
    fn log_config(&self) -> LogConfig {
        LogConfig {
            frame_bytes_max: 64 << 10,
            tail_segments_max: if self.checkpoint { 1 } else { 256 },
            ..LogConfig::default()
        }
    }

    async fn write(&self, store: &DynStore, name: &str) -> Log {
        let log = Log::open(
            Arc::clone(store),
            name,
            Some(Geometry {
                size_bytes: SIZE,
                block_size: BS as u32,
            }),
            self.log_config(),
            OpenMode::Writer,
        )
        .await
        .expect("open writer");
        let data =
            |byte: u8, blocks: u64| Update::Data(Bytes::from(vec![byte; (blocks * BS) as usize]));
        log.commit(&[BatchEntry {
            lba: 0,
            blocks: 256,
            update: data(0xab, 256),
        }])
        .await
        .expect("commit 1");
        log.commit(&[
            BatchEntry {
                lba: 100,
                blocks: 10,
                update: Update::Unmap,
            },
            BatchEntry {
                lba: 1000,
                blocks: 10,
                update: Update::Data(Bytes::from(noise(10 * BS as usize, 7))),
            },
            BatchEntry {
                lba: 2000,
                blocks: 16,
                update: Update::ZeroAlloc,
            },
        ])
        .await
        .expect("commit 2");
        if self.checkpoint {
            assert!(log.wait_checkpoint().await.is_some(), "checkpoint of v4");
        }
        log.commit(&[BatchEntry {
            lba: 0,
            blocks: 16,
            update: data(0xcd, 16),
        }])
        .await
        .expect("commit 3");
        assert_eq!(log.version(), 5);
        log
    }
}

/// Adjacent extents with the same state merged: (first block, blocks, state).
fn merge(extents: impl IntoIterator<Item = (u64, u64, String)>) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for (s, l, st) in extents {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s && last.2 == st => last.1 += l,
            _ => out.push((s, l, st)),
        }
    }
    out
}

fn expected_map() -> Vec<(u64, u64, String)> {
    EXPECTED_MAP
        .iter()
        .map(|&(s, l, st)| (s, l, st.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Running the binary.

/// How to point the binary at a store.
#[derive(Clone)]
struct Target {
    args: Vec<String>,
}

impl Target {
    fn file(dir: &Path) -> Target {
        Target {
            args: vec!["--store".into(), format!("file://{}", dir.display())],
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nbds3-inspect"))
            .args(&self.args)
            .args(args)
            .env_remove("NBDS3_STORE")
            .env("RUST_LOG", "warn")
            .output()
            .expect("run nbds3-inspect")
    }

    /// Run, expect `code`, return stdout.
    fn expect(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "nbds3-inspect {args:?}: expected exit {code}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
        stdout
    }

    fn json(&self, args: &[&str], code: i32) -> Value {
        let mut a: Vec<&str> = args.to_vec();
        a.push("--json");
        let out = self.expect(&a, code);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

/// Every subcommand, text and JSON, checked against the scenario.
fn check_all_commands(t: &Target, sc: &Scenario) {
    // exports
    let j = t.json(&["exports"], 0);
    let rows = j["exports"].as_array().expect("exports array");
    let row = rows
        .iter()
        .find(|r| r["name"] == EXPORT)
        .unwrap_or_else(|| panic!("export {EXPORT} not listed: {j}"));
    assert_eq!(u(&row["size_bytes"]), SIZE);
    assert_eq!(u(&row["block_size"]), BS);
    assert_eq!(u(&row["version"]), 5);
    assert_eq!(u(&row["writer_epoch"]), 2);
    assert_eq!(u(&row["manifests"]), 5);
    assert_eq!(row["hashed_key"], false);
    assert!(u(&row["bytes_stored"]) > 0);
    assert!(row["error"].is_null());
    let text = t.expect(&["exports"], 0);
    assert!(
        text.contains("NAME") && text.contains(EXPORT) && text.contains("64.0 MiB"),
        "{text}"
    );

    // manifests
    let j = t.json(&["manifests", EXPORT], 0);
    let vs = j["versions"].as_array().expect("versions");
    assert_eq!(
        vs.iter().map(|v| u(&v["version"])).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        vs.iter().map(|v| u(&v["writer_epoch"])).collect::<Vec<_>>(),
        vec![1, 2, 2, 2, 2]
    );
    assert_eq!(
        vs.iter()
            .map(|v| u(&v["tail_segments"]))
            .collect::<Vec<_>>(),
        if sc.checkpoint {
            vec![0, 0, 1, 2, 1]
        } else {
            vec![0, 0, 1, 2, 3]
        }
    );
    assert!(vs
        .iter()
        .all(|v| v["retained"] == true && v["error"].is_null()));
    assert!(vs[3]["checkpoint"].is_null());
    assert_eq!(vs[4]["checkpoint"].is_null(), !sc.checkpoint);
    let text = t.expect(&["manifests", EXPORT], 0);
    assert!(
        text.contains("latest 5") && text.contains("VERSION"),
        "{text}"
    );

    // manifest (latest and an older one)
    let j = t.json(&["manifest", EXPORT], 0);
    let m = &j["manifest"];
    assert_eq!(u(&m["version"]), 5);
    assert_eq!(m["export_name"], EXPORT);
    assert_eq!(u(&m["size_bytes"]), SIZE);
    assert_eq!(u(&m["block_size"]), BS);
    if sc.checkpoint {
        let c = &j["checkpoint"];
        assert_eq!(u(&c["version"]), 4);
        assert_eq!(u(&c["segments"]), 2);
        // Version 4's state: lbas 0..100, 110..256, 1000..1010, zero-alloc 2000..2016.
        assert_eq!(u(&c["mapped_blocks"]), 100 + 146 + 10 + 16);
        assert!(c["error"].is_null());
    } else {
        assert!(j["checkpoint"].is_null());
    }
    let j3 = t.json(&["manifest", EXPORT, "--version", "3"], 0);
    assert_eq!(u(&j3["manifest"]["version"]), 3);
    assert_eq!(j3["manifest"]["tail"].as_array().map(Vec::len), Some(1));
    let text = t.expect(&["manifest", EXPORT], 0);
    assert!(
        text.contains("version       5") && text.contains("(latest)"),
        "{text}"
    );

    // segments: live accounting
    let j = t.json(&["segments", EXPORT], 0);
    let segs = j["segments"].as_array().expect("segments");
    assert_eq!(segs.len(), 3, "{j}");
    let acct: Vec<(u64, u64)> = segs
        .iter()
        .map(|s| (u(&s["blocks_total"]), u(&s["blocks_live"])))
        .collect();
    assert_eq!(acct, vec![(256, 256 - 10 - 16), (10, 10), (16, 16)]);
    let sources: Vec<&str> = segs
        .iter()
        .map(|s| s["source"].as_str().unwrap_or(""))
        .collect();
    if sc.checkpoint {
        assert_eq!(sources, ["checkpoint", "checkpoint", "tail"]);
    } else {
        assert_eq!(sources, ["tail", "tail", "tail"]);
    }
    let dead = segs[0]["dead_fraction"].as_f64().expect("dead_fraction");
    assert!((dead - 26.0 / 256.0).abs() < 1e-9, "{dead}");
    assert_eq!(u(&j["total"]["blocks_live"]), 230 + 10 + 16);
    let text = t.expect(&["segments", EXPORT], 0);
    assert!(
        text.contains("10.2%") && text.contains("3 segment(s)"),
        "{text}"
    );

    // segments --frames: 16 frames of 16 blocks in the first segment, the first one dead.
    let j = t.json(&["segments", EXPORT, "--frames"], 0);
    let frames = j["segments"][0]["frames"].as_array().expect("frames");
    let data: Vec<&Value> = frames.iter().filter(|f| f["kind"] == "data").collect();
    assert_eq!(data.len(), 16);
    assert_eq!(u(&data[0]["live_blocks"]), 0);
    assert_eq!(u(&data[1]["live_blocks"]), 16);
    assert_eq!(
        u(&data[6]["live_blocks"]),
        6,
        "lbas 96..112 minus the unmapped 100..110"
    );
    let kinds: Vec<&str> = j["segments"][1]["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["unmap", "data", "zero_alloc"]);
    let text = t.expect(&["segments", EXPORT, "--frames"], 0);
    assert!(
        text.contains("zero_alloc") && text.contains("FRAME OFF"),
        "{text}"
    );

    // segment ID: read whole and checked.
    let id = u(&segs[0]["id"]);
    let j = t.json(&["segment", EXPORT, &id.to_string()], 0);
    assert_eq!(u(&j["blocks_total"]), 256);
    assert_eq!(u(&j["blocks_live"]), 230);
    assert_eq!(j["reachable"], true);
    assert_eq!(j["problems"].as_array().map(Vec::len), Some(0));
    assert!(j["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .all(|f| f["compressed"] == true));
    let text = t.expect(&["segment", EXPORT, &id.to_string()], 0);
    assert!(
        text.contains("all frames check out") && text.contains("zstd"),
        "{text}"
    );

    // map: the whole device, then a window.
    let j = t.json(&["map", EXPORT], 0);
    let got = merge(j["extents"].as_array().expect("extents").iter().map(|x| {
        (
            u(&x["lba"]),
            u(&x["blocks"]),
            x["state"].as_str().unwrap_or("").to_string(),
        )
    }));
    assert_eq!(got, expected_map());
    assert_eq!(u(&j["data_bytes"]), (100 + 146 + 10) * BS);
    assert_eq!(u(&j["zero_bytes"]), 16 * BS);
    let first = &j["extents"][0];
    assert_eq!(
        u(&first["segment"]),
        u(&segs[2]["id"]),
        "lbas 0..16 live in the v5 segment"
    );
    let j = t.json(&["map", EXPORT, "--offset", "400K", "--length", "50K"], 0);
    assert_eq!(u(&j["offset"]), 400 * 1024);
    assert_eq!(u(&j["length"]), 52 * 1024, "rounded out to whole blocks");
    let got = merge(j["extents"].as_array().expect("extents").iter().map(|x| {
        (
            u(&x["lba"]),
            u(&x["blocks"]),
            x["state"].as_str().unwrap_or("").to_string(),
        )
    }));
    assert_eq!(
        got,
        vec![(100, 10, "hole".to_string()), (110, 3, "data".to_string())]
    );
    let old = t.json(&["map", EXPORT, "--version", "3"], 0);
    assert_eq!(u(&old["data_bytes"]), 256 * BS);
    let text = t.expect(&["map", EXPORT], 0);
    assert!(
        text.contains("OFFSET") && text.contains(" zero ") && text.contains(" hole"),
        "{text}"
    );

    // verify: clean.
    let j = t.json(&["verify", EXPORT], 0);
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["index_checked"], true);
    assert_eq!(u(&j["checked"]["segments"]), 3);
    assert_eq!(u(&j["checked"]["manifests"]), 5);
    assert_eq!(u(&j["checked"]["checkpoints"]), u64::from(sc.checkpoint));
    assert_eq!(u(&j["checked"]["frames"]), 16 + 1 + 1);
    assert_eq!(u(&j["checked"]["mapped_blocks"]), 100 + 146 + 10 + 16);
    assert_eq!(j["orphans"].as_array().map(Vec::len), Some(0), "{j}");
    assert_eq!(j["orphans_certain"], true);
    let j = t.json(&["verify", EXPORT, "--version", "4"], 0);
    assert_eq!(j["ok"], true, "{j}");
    let text = t.expect(&["verify", EXPORT], 0);
    assert!(text.contains("OK: no problems found"), "{text}");
}

/// Every file under `dir` with its length and modification time (to show nothing changed).
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("dir entry");
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (meta.len(), meta.modified().expect("mtime")));
        }
    }
    out
}

fn file_store(dir: &Path) -> DynStore {
    Arc::new(FileStore::open(dir.to_str().expect("utf-8 path")).expect("file store"))
}

// ---------------------------------------------------------------------------------------
// File store.

#[tokio::test(flavor = "multi_thread")]
async fn every_command_on_file_store_tail_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    let sc = Scenario { checkpoint: false };
    drop(sc.write(&store, EXPORT).await);
    let before = tree(dir.path());
    check_all_commands(&Target::file(dir.path()), &sc);
    assert_eq!(before, tree(dir.path()), "nbds3-inspect changed the store");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_on_file_store_with_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    let sc = Scenario { checkpoint: true };
    drop(sc.write(&store, EXPORT).await);
    let before = tree(dir.path());
    check_all_commands(&Target::file(dir.path()), &sc);
    assert_eq!(before, tree(dir.path()), "nbds3-inspect changed the store");
}

fn key_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(key)
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    b[at as usize] ^= 0x5a;
    std::fs::write(path, b).expect("write corrupted object");
}

fn problems(j: &Value) -> Vec<(String, Option<u64>, String, String)> {
    j["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["key"].as_str().unwrap_or("").to_string(),
                p["offset"].as_u64(),
                p["what"].as_str().unwrap_or("").to_string(),
                p["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A flipped byte inside a frame of a segment, then inside a manifest: `verify` names the
/// object (and the frame's offset), fails with exit 1, and an intact export in the same
/// store still verifies clean.
#[tokio::test(flavor = "multi_thread")]
async fn verify_names_corrupt_segment_and_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    let sc = Scenario { checkpoint: false };
    drop(sc.write(&store, EXPORT).await);
    drop(sc.write(&store, "intact").await);
    let t = Target::file(dir.path());
    let keys = ExportKeys::new(EXPORT).expect("keys");

    // The frame holding lbas 16..32 in the first segment.
    let segs = inspect::segments(&store, EXPORT, None, true)
        .await
        .expect("segments");
    let seg = &segs.segments[0];
    let frame = seg
        .frames
        .as_ref()
        .and_then(|f| f.iter().find(|f| f.lba == 16))
        .expect("frame at lba 16");
    let off = frame.frame_offset.expect("data frame offset");
    flip_byte(&key_path(dir.path(), &seg.key), off + 40);

    let j = t.json(&["verify", EXPORT], 1);
    assert_eq!(j["ok"], false);
    let ps = problems(&j);
    assert!(
        ps.iter().any(|p| p.0 == seg.key
            && p.1 == Some(off)
            && p.2 == "segment"
            && p.3.contains("checksum")),
        "{ps:?}"
    );
    assert!(
        ps.iter()
            .any(|p| p.0 == seg.key && p.2 == "data" && p.3.contains("lbas 16+16")),
        "the damaged lbas are named: {ps:?}"
    );
    assert!(
        ps.iter().all(|p| p.0 == seg.key),
        "only that segment: {ps:?}"
    );
    let text = t.expect(&["verify", EXPORT], 1);
    assert!(
        text.contains(&format!("PROBLEM {} @{off}: segment:", seg.key)) && text.contains("FAILED"),
        "{text}"
    );
    // The one-segment view shows the bad frame too.
    let j = t.json(&["segment", EXPORT, &seg.id.to_string()], 1);
    assert_eq!(u(&j["problems"][0]["offset"]), off);
    t.expect(&["verify", "intact"], 0);

    // A manifest: the latest (verify cannot go deeper) and an older retained one.
    flip_byte(&key_path(dir.path(), &keys.manifest(5)), 30);
    flip_byte(&key_path(dir.path(), &keys.manifest(3)), 30);
    let j = t.json(&["verify", EXPORT], 1);
    let ps = problems(&j);
    for v in [3, 5] {
        assert!(
            ps.iter()
                .any(|p| p.0 == keys.manifest(v) && p.2 == "manifest"),
            "manifest {v} not named: {ps:?}"
        );
    }
    assert_eq!(j["index_checked"], false);
    assert_eq!(
        j["orphans_certain"], false,
        "an unreadable manifest hides what it reaches"
    );
    let e = t.json(&["manifest", EXPORT], 5);
    assert_eq!(e["error"]["kind"], "corrupt");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains(&keys.manifest(5)));
    t.expect(&["map", EXPORT], 5);
    // Version 4 is intact and still readable; verifying it finds the bad frame and the
    // two bad manifests, nothing else.
    let j = t.json(&["verify", EXPORT, "--version", "4"], 1);
    assert_eq!(problems(&j).len(), 4, "{j}");
    t.expect(&["verify", "intact"], 0);
}

/// A missing segment and a damaged checkpoint are named; `map` then fails with exit 5.
#[tokio::test(flavor = "multi_thread")]
async fn verify_names_missing_segment_and_bad_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    drop(Scenario { checkpoint: true }.write(&store, EXPORT).await);
    let t = Target::file(dir.path());
    let m = inspect::manifest(&store, EXPORT, None)
        .await
        .expect("manifest");
    let ck = m.checkpoint.expect("checkpoint");
    let tail = m.manifest.tail[0];
    let keys = ExportKeys::new(EXPORT).expect("keys");

    std::fs::remove_file(key_path(dir.path(), &keys.segment(tail.id))).expect("remove segment");
    let j = t.json(&["verify", EXPORT], 1);
    let ps = problems(&j);
    assert!(
        ps.iter()
            .any(|p| p.0 == keys.segment(tail.id) && p.2 == "missing"),
        "{ps:?}"
    );
    let e = t.json(&["map", EXPORT], 5);
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains(&keys.segment(tail.id)));

    flip_byte(&key_path(dir.path(), &ck.key), 40);
    let j = t.json(&["verify", EXPORT, "--version", "5"], 1);
    let ps = problems(&j);
    assert!(
        ps.iter().any(|p| p.0 == ck.key && p.2 == "checkpoint"),
        "{ps:?}"
    );
    assert_eq!(j["index_checked"], false);
    let j = t.json(&["manifest", EXPORT, "--version", "5"], 0);
    assert!(j["checkpoint"]["error"].is_string(), "{j}");
}

/// A checkpoint whose accounting and index disagree with the segments it names (written by
/// hand, as a bug in the writer would): every disagreement is a named problem.
#[tokio::test]
async fn verify_checks_index_and_accounting_against_segments() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    drop(Scenario { checkpoint: true }.write(&store, EXPORT).await);
    let keys = ExportKeys::new(EXPORT).expect("keys");
    let report = inspect::verify(&store, EXPORT, None, &NoProgress)
        .await
        .expect("verify");
    assert!(report.ok, "{:?}", report.problems);

    let m5 =
        format::decode_manifest(&store.get(&keys.manifest(5)).await.expect("get")).expect("decode");
    let cref = m5.checkpoint.expect("checkpoint");
    let mut ck =
        format::decode_checkpoint(&store.get(&keys.checkpoint(cref.id)).await.expect("get"))
            .expect("decode");
    // Segment 0 claims one more written block than its directory holds; one extent points
    // one byte past a frame boundary.
    ck.segments[0].blocks_total += 1;
    let bad_seg = ck.segments[0].id;
    let victim = ck
        .extents
        .iter_mut()
        // Past lba 16: the tail segment maps 0..16 again.
        .find(|e| {
            e.lba >= 16
                && matches!(
                    e.value,
                    format::CheckpointValue::Frame {
                        segment_index: 0,
                        ..
                    }
                )
        })
        .expect("an extent in segment 0");
    let victim_lba = victim.lba;
    if let format::CheckpointValue::Frame { frame_offset, .. } = &mut victim.value {
        *frame_offset += 1;
    }
    let body = format::encode_checkpoint(&ck);
    let new_ck = format::object_id(9, 0);
    store
        .put(
            &keys.checkpoint(new_ck),
            Bytes::from(body.clone()),
            PutMode::IfAbsent,
        )
        .await
        .expect("put checkpoint");
    let mut m6 = m5.clone();
    m6.version = 6;
    m6.checkpoint = Some(format::CheckpointRef {
        id: new_ck,
        size_bytes: body.len() as u64,
    });
    store
        .put(
            &keys.manifest(6),
            Bytes::from(format::encode_manifest(&m6)),
            PutMode::IfAbsent,
        )
        .await
        .expect("put manifest");

    let r = inspect::verify(&store, EXPORT, None, &NoProgress)
        .await
        .expect("verify");
    assert!(!r.ok);
    assert!(r.index_checked);
    let seg_key = keys.segment(bad_seg);
    assert!(
        r.problems.iter().any(|p| p.key == seg_key
            && p.what == "accounting"
            && p.message.contains("257")
            && p.message.contains("256")),
        "{:?}",
        r.problems
    );
    assert!(
        r.problems.iter().any(|p| p.key == seg_key
            && p.what == "index"
            && p.message.contains(&format!("lbas {victim_lba}+"))
            && p.message.contains("not a frame")),
        "{:?}",
        r.problems
    );
    // Version 5 is still intact.
    let r = inspect::verify(&store, EXPORT, Some(5), &NoProgress)
        .await
        .expect("verify 5");
    assert!(r.ok, "{:?}", r.problems);
}

/// Objects nothing reaches are listed with a reason and left alone; they do not fail
/// `verify`. Manifests below the latest manifest's `gc_low_water` count among them.
#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_listed_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    drop(Scenario { checkpoint: false }.write(&store, EXPORT).await);
    let keys = ExportKeys::new(EXPORT).expect("keys");
    // A segment from a commit that never landed, leftover probes, a stray object, and a
    // manifest raising the low-water mark to 3.
    let m5 =
        format::decode_manifest(&store.get(&keys.manifest(5)).await.expect("get")).expect("decode");
    let orphan_id = format::object_id(2, 99);
    let mut b = format::SegmentBuilder::new(orphan_id, 2, BS as u32, Some(1));
    b.add_frame(5000, &noise(BS as usize, 3));
    let seg_body = Bytes::from(b.finish().0);
    let puts = [
        (keys.segment(orphan_id), seg_body.clone()),
        (
            format!("{}probe-0000000000000001", keys.probe_prefix()),
            Bytes::from_static(b"first"),
        ),
        (
            "probe/probe-00000000000000aa".to_string(),
            Bytes::from_static(b"first"),
        ),
        (format!("{}junk", keys.root), Bytes::from_static(b"??")),
    ];
    for (k, b) in puts {
        store.put(&k, b, PutMode::IfAbsent).await.expect("put");
    }
    let mut m6 = m5.clone();
    m6.version = 6;
    m6.gc_low_water = 3;
    store
        .put(
            &keys.manifest(6),
            Bytes::from(format::encode_manifest(&m6)),
            PutMode::IfAbsent,
        )
        .await
        .expect("put manifest");

    let before = tree(dir.path());
    let t = Target::file(dir.path());
    let j = t.json(&["verify", EXPORT], 0);
    assert_eq!(j["ok"], true, "{j}");
    let orphans: Vec<(String, String)> = j["orphans"]
        .as_array()
        .expect("orphans")
        .iter()
        .map(|o| {
            (
                o["key"].as_str().unwrap_or("").to_string(),
                o["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let has = |k: &str, why: &str| orphans.iter().any(|(ok, r)| ok == k && r.contains(why));
    assert!(has(&keys.manifest(1), "gc_low_water"), "{orphans:?}");
    assert!(has(&keys.manifest(2), "gc_low_water"), "{orphans:?}");
    assert!(
        has(&keys.segment(orphan_id), "segment no retained manifest"),
        "{orphans:?}"
    );
    assert!(has(
        &format!("{}probe-0000000000000001", keys.probe_prefix()),
        "probe"
    ));
    assert!(has("probe/probe-00000000000000aa", "store root"));
    assert!(has(&format!("{}junk", keys.root), "unknown"));
    assert_eq!(orphans.len(), 6, "{orphans:?}");
    let j = t.json(&["manifests", EXPORT], 0);
    assert_eq!(j["versions"][0]["retained"], false);
    assert_eq!(j["versions"][2]["retained"], true);
    let text = t.expect(&["verify", EXPORT], 0);
    assert!(
        text.contains("6 unreachable object(s)") && text.contains("OK"),
        "{text}"
    );
    let text = t.expect(&["segment", EXPORT, &orphan_id.to_string()], 0);
    assert!(text.contains("not reached by that version"), "{text}");
    assert_eq!(before, tree(dir.path()), "orphans must be left alone");
}

/// Long names live under a hashed key; the tool still shows (and finds) them by name.
#[tokio::test(flavor = "multi_thread")]
async fn hashed_export_names_are_shown_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    let long = format!("vm/{}/root-disk", "x".repeat(300));
    drop(Scenario { checkpoint: false }.write(&store, &long).await);
    let t = Target::file(dir.path());
    let j = t.json(&["exports"], 0);
    let row = &j["exports"][0];
    assert_eq!(row["name"], long.as_str());
    assert_eq!(row["hashed_key"], true);
    assert!(row["key"].as_str().unwrap_or("").starts_with('h'));
    assert_eq!(u(&row["size_bytes"]), SIZE);
    let text = t.expect(&["exports"], 0);
    assert!(
        text.contains("vm/xxxx") && text.contains("[hashed key]"),
        "{text}"
    );
    t.expect(&["verify", &long], 0);
    let j = t.json(&["map", &long], 0);
    assert_eq!(u(&j["data_bytes"]), (100 + 146 + 10) * BS);
}

/// Unknown export, version and segment (3), a missing store directory (4, and not
/// created), an unreachable S3 endpoint (4), bad arguments (2).
#[tokio::test(flavor = "multi_thread")]
async fn errors_have_distinct_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    drop(Scenario { checkpoint: false }.write(&store, EXPORT).await);
    let t = Target::file(dir.path());

    let e = t.json(&["manifests", "nope"], 3);
    assert_eq!(e["error"]["kind"], "no_such_export");
    let out = t.run(&["verify", "nope"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim(), "nbds3-inspect: no such export \"nope\"");
    let e = t.json(&["manifest", EXPORT, "--version", "9"], 3);
    assert_eq!(e["error"]["kind"], "no_such_version");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("present: 1-5"));
    t.expect(&["verify", EXPORT, "--version", "0"], 3);
    t.expect(&["segment", EXPORT, "12345"], 3);

    let gone = dir.path().join("no-such-dir");
    let e = Target::file(&gone).json(&["exports"], 4);
    assert_eq!(e["error"]["kind"], "store");
    assert!(
        !gone.exists(),
        "inspect must not create the store directory"
    );

    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_nbds3-inspect"))
        .args([
            "--store",
            "s3://bucket/prefix",
            "--s3-endpoint",
            "http://127.0.0.1:9",
            "--s3-region",
            "us-east-1",
            "--s3-path-style",
            "--s3-retry-max",
            "1s",
            "exports",
        ])
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));

    t.expect(&[], 2);
    t.expect(&["map", EXPORT, "--offset", "ten"], 2);
    t.expect(&["map", EXPORT, "--offset", "1G"], 2);
    t.expect(&["frobnicate"], 2);
    t.expect(&["--help"], 0);
}

// ---------------------------------------------------------------------------------------
// The real S3 server (SeaweedFS from tools/test-env.sh).

/// A fresh prefix on the SeaweedFS test server: the binary's arguments for it and a
/// writable store handle for the test, or `None` (after a loud SKIP) when unconfigured.
async fn s3_target(test: &str) -> Option<(Target, DynStore)> {
    let (endpoint, bucket) = common::s3_test_endpoint(common::S3Kind::SeaweedFs, test)?;
    let url = format!(
        "{bucket}/nbds3-test/inspect-{test}-{}",
        common::random_tag()
    );
    let store = S3Store::open(&url, &common::s3_test_options(&endpoint))
        .await
        .unwrap_or_else(|e| panic!("open s3://{url}: {e}"));
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let t = Target {
        args: vec![
            "--store".into(),
            format!("s3://{url}"),
            "--s3-endpoint".into(),
            endpoint,
            "--s3-region".into(),
            region,
            "--s3-path-style".into(),
        ],
    };
    Some((t, Arc::new(store)))
}

async fn listing(store: &DynStore) -> Vec<(String, u64)> {
    list_all(store.as_ref(), "")
        .await
        .expect("list")
        .into_iter()
        .map(|o| (o.key, o.size_bytes))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_on_s3() {
    let Some((t, store)) = s3_target("every_command_on_s3").await else {
        return;
    };
    let sc = Scenario { checkpoint: true };
    drop(sc.write(&store, EXPORT).await);
    let before = listing(&store).await;
    check_all_commands(&t, &sc);
    assert_eq!(
        before,
        listing(&store).await,
        "nbds3-inspect changed the store"
    );
    common::remove_all(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_names_corrupt_objects_on_s3() {
    let Some((t, store)) = s3_target("verify_names_corrupt_objects_on_s3").await else {
        return;
    };
    drop(Scenario { checkpoint: false }.write(&store, EXPORT).await);
    t.expect(&["verify", EXPORT], 0);
    let keys = ExportKeys::new(EXPORT).expect("keys");
    let m = inspect::manifest(&store, EXPORT, None)
        .await
        .expect("manifest");
    let seg_key = keys.segment(m.manifest.tail[1].id);
    // The frame of the v4 segment (pseudo-random data at lbas 1000..1010) starts at 16.
    let flip = |key: String, at: usize| {
        let store = Arc::clone(&store);
        async move {
            let mut b = store.get(&key).await.expect("get").to_vec();
            b[at] ^= 0x5a;
            store
                .put(&key, Bytes::from(b), PutMode::Overwrite)
                .await
                .expect("put corrupted");
        }
    };
    flip(seg_key.clone(), 16 + 100).await;
    let j = t.json(&["verify", EXPORT], 1);
    let ps = problems(&j);
    assert!(
        ps.iter()
            .any(|p| p.0 == seg_key && p.1 == Some(16) && p.2 == "segment"),
        "{ps:?}"
    );
    assert!(
        ps.iter()
            .any(|p| p.0 == seg_key && p.2 == "data" && p.3.contains("lbas 1000+10")),
        "{ps:?}"
    );
    flip(keys.manifest(5), 26).await;
    let j = t.json(&["verify", EXPORT], 1);
    assert!(
        problems(&j)
            .iter()
            .any(|p| p.0 == keys.manifest(5) && p.2 == "manifest"),
        "{j}"
    );
    t.expect(&["manifest", EXPORT], 5);
    common::remove_all(store.as_ref()).await;
}

// ---------------------------------------------------------------------------------------
// The real daemon, written by a real client (qemu-io), compared with nbdinfo --map.

e2e_tests!(inspect_what_qemu_io_wrote_through_nbds3d);

/// nbdinfo's allocation types: 0 data, 2 zero (allocated), 3 hole (reads as zeros).
fn nbd_type(state: &str) -> u32 {
    match state {
        "data" => 0,
        "zero" => 2,
        _ => 3,
    }
}

fn inspect_what_qemu_io_wrote_through_nbds3d(backend: e2e::Backend) {
    const MIB: u64 = 1 << 20;
    let Some(ctx) = e2e::setup("inspect_what_qemu_io_wrote_through_nbds3d", backend) else {
        return;
    };
    if !e2e::need_bins(&ctx.name, &["qemu-io", "nbdinfo"]) {
        return;
    }
    // No background compaction/GC: the versions and segments below are then exactly what
    // the client's writes and flushes made.
    let mut d = ctx.daemon(&[
        "--default-size",
        "64M",
        "--no-compactor",
        "--lease-interval",
        "3s",
    ]);
    let uri = d.uri();
    let qemu_io = |cmds: &[&str]| {
        let mut c = e2e::cmd("qemu-io");
        c.args(["-f", "raw", "-t", "writeback"]).arg(&uri);
        for x in cmds {
            c.arg("-c").arg(x);
        }
        ctx.run(&mut c, e2e::secs(120));
    };
    qemu_io(&["write -P 0xab 0 1M", "flush"]);
    qemu_io(&[
        "write -P 0xcd 4M 64k",
        "discard 512k 128k",
        "write -z 8M 1M",
        "flush",
    ]);
    let mut t = Target {
        args: vec!["--store".into(), ctx.store.url.clone()],
    };
    t.args.extend(ctx.store.args.iter().cloned());

    // While the daemon serves the export: its lease is live, and everything checks out.
    let j = t.json(&["exports"], 0);
    let row = &j["exports"][0];
    assert_eq!(row["name"], e2e::EXPORT, "{j}");
    assert_eq!(u(&row["size_bytes"]), 64 * MIB);
    assert_eq!(u(&row["block_size"]), 4096);
    assert_eq!(row["lease"]["live"], true, "{j}");
    assert_eq!(
        u(&row["lease"]["ttl_ms"]),
        12_000,
        "4 × --lease-interval: {j}"
    );
    let latest = u(&row["version"]);
    assert!(latest >= 3, "open + two flushes: {j}");

    let map = t.json(&["map", e2e::EXPORT], 0);
    let ours = merge(map["extents"].as_array().expect("extents").iter().map(|x| {
        (
            u(&x["offset"]),
            u(&x["length"]),
            x["state"].as_str().unwrap_or("").to_string(),
        )
    }));
    let ours: Vec<(u64, u64, u32)> = ours
        .into_iter()
        .map(|(o, l, st)| (o, l, nbd_type(&st)))
        .collect();
    assert_eq!(
        ours,
        e2e::nbd_map(&ctx, &uri),
        "inspect map vs nbdinfo --map"
    );
    // What was written: 1 MiB minus the 128 KiB discard, plus 64 KiB.
    assert_eq!(u(&map["data_bytes"]), MIB - 128 * 1024 + 64 * 1024);
    assert!(ours.contains(&(512 * 1024, 128 * 1024, 3)), "{ours:?}");

    let segs = t.json(&["segments", e2e::EXPORT], 0);
    assert_eq!(
        u(&segs["total"]["blocks_live"]) * 4096,
        u(&map["data_bytes"]),
        "live accounting = mapped data"
    );
    let ms = t.json(&["manifests", e2e::EXPORT], 0);
    assert_eq!(u(&ms["latest"]), latest);
    let m = t.json(&["manifest", e2e::EXPORT], 0);
    assert_eq!(u(&m["manifest"]["size_bytes"]), 64 * MIB);
    let v = t.json(&["verify", e2e::EXPORT], 0);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["lease"]["live"], true);
    let text = t.expect(&["verify", e2e::EXPORT], 0);
    assert!(text.contains("a daemon holds the lease"), "{text}");

    // After a clean shutdown: the same map from the store alone, still clean.
    d.stop();
    let after = t.json(&["map", e2e::EXPORT], 0);
    assert_eq!(after["extents"], map["extents"]);
    let v = t.json(&["verify", e2e::EXPORT], 0);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["lease"].is_null() || v["lease"]["live"] == false, "{v}");
}

/// After compaction rewrote the partly dead segment and GC collected everything no kept
/// version needs, the inspector agrees with GC: nothing unreachable is left, the low-water
/// mark is shown, the map is unchanged, and everything verifies.
#[tokio::test(flavor = "multi_thread")]
async fn inspector_agrees_with_compaction_and_gc() {
    use nbds3::log::compact::{self, CompactConfig};
    use nbds3::log::gc::{self, GcConfig, GcState};
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let store = file_store(dir.path());
    let log = Scenario { checkpoint: false }.write(&store, EXPORT).await;
    let t = Target::file(dir.path());
    let map_before = t.json(&["map", EXPORT], 0)["extents"].clone();
    let cfg = CompactConfig {
        dead_fraction_min: 0.05,
        gc: GcConfig {
            keep_versions_min: 1,
            retain_window: Duration::ZERO,
            ..GcConfig::default()
        },
        ..CompactConfig::default()
    };
    let pass = compact::compact_pass(&log, &cfg, None)
        .await
        .expect("compact");
    assert!(
        pass.victims >= 1 && pass.version.is_some(),
        "the 10%-dead segment is a victim: {pass:?}"
    );
    let mut state = GcState::default();
    for _ in 0..3 {
        gc::gc_pass(&log, &cfg.gc, &mut state).await.expect("gc");
    }
    drop(log);

    let j = t.json(&["verify", EXPORT], 0);
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["orphans"].as_array().map(Vec::len), Some(0), "{j}");
    let low = u(&j["gc_low_water"]);
    assert!(low > 1, "GC raised the low-water mark: {j}");
    let ms = t.json(&["manifests", EXPORT], 0);
    let versions: Vec<u64> = ms["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| u(&v["version"]))
        .collect();
    assert!(
        versions.iter().all(|&v| v >= low),
        "GC left {versions:?} below {low}"
    );
    let after = t.json(&["map", EXPORT], 0);
    let states = |x: &Value| {
        merge(x.as_array().expect("extents").iter().map(|e| {
            (
                u(&e["lba"]),
                u(&e["blocks"]),
                e["state"].as_str().unwrap_or("").to_string(),
            )
        }))
    };
    assert_eq!(states(&after["extents"]), states(&map_before));
    let segs = t.json(&["segments", EXPORT], 0);
    assert!(
        segs["segments"]
            .as_array()
            .expect("segments")
            .iter()
            .all(|s| u(&s["blocks_live"]) == u(&s["blocks_total"])),
        "no dead blocks after compaction: {segs}"
    );
}
