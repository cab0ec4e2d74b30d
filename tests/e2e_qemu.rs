//! Real qemu clients against the real daemon: qemu-io pattern I/O across restarts (clean and
//! kill -9 after a flush), qemu-img convert in and out with compare, the allocation map seen
//! by nbdinfo, and an nbdcopy round trip with matching checksums.

#[macro_use]
mod e2e;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use e2e::{cmd, need_bins, secs, setup, Backend, Ctx};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SIZE: u64 = 64 * MIB;

e2e_tests!(
    qemu_io_patterns_survive_restart,
    qemu_img_convert_map_and_nbdcopy
);

/// What the device should hold, byte for byte, with qemu-io's single-byte patterns.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Model {
        Model(vec![0; SIZE as usize])
    }
    fn fill(&mut self, off: u64, len: u64, byte: u8) {
        self.0[off as usize..(off + len) as usize].fill(byte);
    }
    /// `read -P` commands covering the whole device, one per run of equal bytes (split so
    /// no single read is huge).
    fn reads(&self) -> Vec<String> {
        let mut out = vec![];
        let mut start = 0usize;
        while start < self.0.len() {
            let b = self.0[start];
            let mut end = start;
            while end < self.0.len() && self.0[end] == b && end - start < 8 * MIB as usize {
                end += 1;
            }
            out.push(format!("read -P 0x{b:02x} {start} {}", end - start));
            start = end;
        }
        out
    }
}

/// Run qemu-io over NBD with plain (non-FUA) writes; any failed command or pattern mismatch
/// fails the test.
fn qemu_io(ctx: &Ctx, uri: &str, cmds: &[String]) -> String {
    let mut c = cmd("qemu-io");
    c.args(["-f", "raw", "-t", "writeback"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    let out = ctx.run_status(&mut c, secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{}: qemu-io failed ({}):\n{text}",
        ctx.name,
        out.status
    );
    for bad in ["Pattern verification failed", "failed", "error"] {
        assert!(
            !text.contains(bad),
            "{}: qemu-io reported {bad:?}:\n{text}",
            ctx.name
        );
    }
    text
}

fn qemu_io_patterns_survive_restart(backend: Backend) {
    let test = "qemu_io_patterns_survive_restart";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_bins(&ctx.name, &["qemu-io"]) {
        return;
    }
    let mut d = ctx.daemon(&["--default-size", "64M"]);
    let mut m = Model::new();
    let mut w = vec![];
    let write = |m: &mut Model, w: &mut Vec<String>, off: u64, len: u64, byte: u8| {
        m.fill(off, len, byte);
        w.push(if byte == 0 {
            format!("write -z {off} {len}")
        } else {
            format!("write -P 0x{byte:02x} {off} {len}")
        });
    };
    write(&mut m, &mut w, 0, MIB, 0xa1);
    write(&mut m, &mut w, 4 * MIB, 64 * KIB, 0xb2);
    write(&mut m, &mut w, 8 * MIB, 2 * MIB, 0xc3);
    write(&mut m, &mut w, 8 * MIB, 512 * KIB, 0); // write -z
    m.fill(9 * MIB, 512 * KIB, 0);
    w.push(format!("discard {} {}", 9 * MIB, 512 * KIB));
    write(&mut m, &mut w, 1000, 5000, 0xd4); // unaligned: read-modify-write of two blocks
    write(&mut m, &mut w, 2 * MIB - 100, 300, 0xd5); // crosses a block and the a1 edge
    write(&mut m, &mut w, 20 * MIB + 512, 3 * MIB, 0xe6); // multi-MiB, unaligned
    write(&mut m, &mut w, SIZE - MIB, MIB, 0xf7); // the last MiB
    w.push("flush".into());
    // Reads in the same session are served from the dirty set / cache.
    let mut session = w.clone();
    session.extend(m.reads());
    qemu_io(&ctx, &d.uri(), &session);

    // qemu ≥ 8.2 asks for extended headers (option 11) and gets them: the I/O above went
    // through 32-byte headers and extended reply chunks. (Older qemu does not ask.)
    let mut c = cmd("qemu-io");
    c.args([
        "-f",
        "raw",
        "-r",
        "--trace",
        "nbd_receive_option_reply",
        "-c",
    ])
    .arg(&m.reads()[0])
    .arg(d.uri());
    let out = ctx.run_status(&mut c, secs(60));
    assert!(out.status.success(), "{}: qemu-io failed", ctx.name);
    let trace = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = trace.lines().find(|l| l.contains("option reply 11")) {
        assert!(line.contains("(ack)"), "{}: {line}", ctx.name);
    }

    d.stop();
    d.restart();
    qemu_io(&ctx, &d.uri(), &m.reads());

    // Overwrite parts (partial blocks, over holes and data), flush, then kill -9: the flush
    // made it durable, so nothing may be lost.
    let mut w = vec![];
    write(&mut m, &mut w, 512 * KIB, MIB, 0x3c);
    write(&mut m, &mut w, 4 * MIB + 4 * KIB, 4 * KIB, 0);
    write(&mut m, &mut w, 9 * MIB + 4000, 200, 0x4d); // inside the discarded range
    write(&mut m, &mut w, 30 * MIB, 17, 0x5e);
    w.push("flush".into());
    qemu_io(&ctx, &d.uri(), &w);
    d.kill9();
    d.restart();
    qemu_io(&ctx, &d.uri(), &m.reads());
    d.stop();
}

/// Write `len` bytes of deterministic noise (incompressible) at `off`.
fn noise(f: &fs::File, off: u64, len: u64, seed: u64) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; len as usize];
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    f.write_all_at(&buf, off).unwrap();
}

/// A sparse 64 MiB raw image with data (patterns and noise) at 4 KiB-aligned places and
/// holes elsewhere; returns the data ranges.
fn make_image(path: &Path) -> Vec<(u64, u64)> {
    let f = fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let data = vec![
        (0, MIB),
        (5 * MIB, 192 * KIB),
        (20 * MIB, 3 * MIB),
        (30 * MIB, 2 * MIB),
        (40 * MIB, 4 * KIB),
        (47 * MIB + 12 * KIB, 28 * KIB),
        (SIZE - MIB, MIB),
    ];
    for (i, &(off, len)) in data.iter().enumerate() {
        if i % 2 == 0 {
            f.write_all_at(&vec![0x11 * (i as u8 + 1); len as usize], off)
                .unwrap();
        } else {
            noise(&f, off, len, 0x9e37_79b9_7f4a_7c15 ^ i as u64);
        }
    }
    f.sync_all().unwrap();
    data
}

/// The map the daemon should report: data (type 0) exactly on the written ranges, holes
/// reading as zeros (type 3) everywhere else.
fn expected_map(data: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut runs = vec![];
    let mut pos = 0;
    for &(off, len) in data {
        if off > pos {
            runs.push((pos, off - pos, 3));
        }
        runs.push((off, len, 0));
        pos = off + len;
    }
    if pos < SIZE {
        runs.push((pos, SIZE - pos, 3));
    }
    runs
}

fn qemu_img_convert_map_and_nbdcopy(backend: Backend) {
    let test = "qemu_img_convert_map_and_nbdcopy";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_bins(&ctx.name, &["qemu-img", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let src = ctx.scratch.join("src.img");
    let data = make_image(&src);
    let src_sum = e2e::sha256_file(&src);
    let mut d = ctx.daemon(&["--default-size", "64M"]);

    // In with qemu-img (the export exists: -n), compare, map.
    ctx.run(
        cmd("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(d.uri()),
        secs(120),
    );
    ctx.run(
        cmd("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(d.uri()),
        secs(120),
    );
    assert_eq!(
        e2e::nbd_map(&ctx, &d.uri()),
        expected_map(&data),
        "{}: nbdinfo --map after qemu-img convert",
        ctx.name
    );

    // In with nbdcopy into a second export.
    let copy_uri = d.uri_for("copy");
    ctx.run(cmd("nbdcopy").arg(&src).arg(&copy_uri), secs(120));

    // Restart: the map and the data now come from the store.
    d.stop();
    d.restart();
    let uri = d.uri();
    let copy_uri = d.uri_for("copy");
    assert_eq!(
        e2e::nbd_map(&ctx, &uri),
        expected_map(&data),
        "{}: nbdinfo --map after restart",
        ctx.name
    );
    assert_eq!(
        e2e::nbd_map(&ctx, &copy_uri),
        expected_map(&data),
        "{}: nbdinfo --map of the nbdcopy'd export",
        ctx.name
    );
    ctx.run(
        cmd("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        secs(120),
    );

    // Out with qemu-img and with nbdcopy; checksums must match the source.
    let out1 = ctx.scratch.join("out-qemu-img.img");
    ctx.run(
        cmd("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out1),
        secs(120),
    );
    assert_eq!(
        e2e::sha256_file(&out1),
        src_sum,
        "{}: qemu-img convert out",
        ctx.name
    );
    let out2 = ctx.scratch.join("out-nbdcopy.img");
    fs::File::create(&out2).unwrap();
    ctx.run(cmd("nbdcopy").arg(&copy_uri).arg(&out2), secs(120));
    assert_eq!(
        e2e::sha256_file(&out2),
        src_sum,
        "{}: nbdcopy out",
        ctx.name
    );
    assert_eq!(fs::metadata(&out2).unwrap().len(), SIZE);
    d.stop();
}
