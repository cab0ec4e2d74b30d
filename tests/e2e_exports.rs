//! Several exports in one daemon, over TCP and a Unix socket, and two daemons on one store.
//! - Export names are arbitrary bytes to NBD: the empty (default) name, slashes, dots,
//!   `../` traversal attempts, spaces, non-ASCII, and names that differ only by how they
//!   would be percent-encoded. Each must get its own device, nothing may land outside the
//!   store, NBD_OPT_LIST must name them, and all of it must survive a restart.
//! - A second daemon opening an export fences the first: the first one's FLUSH must fail
//!   (never a silent drop), and none of its later writes may reach the store.
//! - With `--tls-cert`/`--tls-key`/`--tls-client-ca`, only TLS clients holding a certificate
//!   from the CA reach the device (libnbd and qemu), across a restart.
//! - Each connection runs on a thread of its own; the export it opened (flusher, lease,
//!   store connections) lives on after that connection and its thread are gone: its timed
//!   flush still persists what that connection wrote, as a crash right after shows.
//! - SIGHUP loads the certificate files again: clients that trust only the new CA get in,
//!   those that trust only the old one no longer do; a broken file leaves the last good
//!   certificate in use; without TLS a SIGHUP changes nothing (and stops nothing).
//! - `--compression off` stores what it writes raw and the default compresses it; an
//!   export written both ways reads back whole (the format lets each frame say which).
//! - `--export-idle-close`: an export no connection has used for that long is flushed and
//!   closed (its lease removed), so exports opened once stop costing memory and store
//!   requests; one still connected stays open; the next client opens it afresh. With
//!   `--exports-max`, another export is refused while all open ones are in use, and opens
//!   once one is left (closing that one, durably).

#[macro_use]
mod e2e;
mod pki;

use std::fs;
use std::path::Path;

use e2e::{cmd, need_bins, need_python_nbd, secs, setup, Backend, Repl};

e2e_tests!(
    exports_are_isolated_listed_and_survive_restart,
    second_daemon_fences_the_first,
    tls_with_client_certificates_end_to_end,
    tls_certificate_reloads_on_sighup,
    export_work_outlives_the_connection_that_started_it,
    compression_is_chosen_per_daemon_run,
    unused_exports_are_flushed_and_closed
);

const NAMES: &[&str] = &[
    "",
    "disk",
    "a/b",
    "a%2Fb",
    "..",
    ".",
    "../../escape",
    "x y",
    "ünï-☃",
    "A",
    "%41",
    "-",
];

fn files_under(dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p.display().to_string());
        }
    }
}

fn exports_are_isolated_listed_and_survive_restart(backend: Backend) {
    let test = "exports_are_isolated_listed_and_survive_restart";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let sock = ctx.scratch.join("nbds3d.sock");
    let sock_arg = sock.display().to_string();
    let mut d = ctx.daemon(&["--default-size", "16M", "--unix", &sock_arg]);
    for (i, name) in NAMES.iter().enumerate() {
        let mut r = Repl::connect(&d.tcp_target(), Some(name))
            .unwrap_or_else(|e| panic!("{}: export {name:?}: connect: {e}", ctx.name));
        assert_eq!(
            r.ok("size"),
            (16u64 << 20).to_string(),
            "{}: export {name:?}",
            ctx.name
        );
        r.ok(&format!("write 0 65536 {:x}", 0x10 + i));
        r.ok(&format!("write 1048576 4096 {:x}", 0x80 + i));
        r.ok("flush");
    }
    // Every name, through the Unix socket this time.
    let mut r = Repl::connect(&format!("unix:{sock_arg}"), Some("disk")).unwrap();
    let listed: Vec<String> = r.ok("list").split('\u{1f}').map(str::to_owned).collect();
    for name in NAMES.iter().filter(|n| !n.is_empty()) {
        assert!(
            listed.iter().any(|l| l == name),
            "{}: NBD_OPT_LIST lacks {name:?}: {listed:?}",
            ctx.name
        );
    }
    drop(r);
    d.stop();
    if backend == Backend::File {
        let mut all = vec![];
        files_under(&ctx.scratch.path, &mut all);
        let store = ctx.scratch.join("store").display().to_string();
        let stray: Vec<&String> = all
            .iter()
            .filter(|f| {
                !f.starts_with(&store)
                    && !f.ends_with(".log")
                    && !f.ends_with(".out")
                    && !f.ends_with(".err")
                    && !f.ends_with(".sock")
            })
            .collect();
        assert!(
            stray.is_empty(),
            "{}: files outside the store: {stray:?}",
            ctx.name
        );
    }
    d.restart();
    for (i, name) in NAMES.iter().enumerate() {
        let mut r = Repl::connect(&format!("unix:{sock_arg}"), Some(name))
            .unwrap_or_else(|e| panic!("{}: export {name:?} after restart: {e}", ctx.name));
        let check = |r: &mut Repl, cmd: String| {
            let a = r.send(&cmd);
            assert!(
                a.starts_with("ok"),
                "{}: export {name:?}: {cmd}: {a}",
                ctx.name
            );
        };
        check(&mut r, format!("read 0 65536 {:x}", 0x10 + i));
        check(&mut r, "read 65536 983040 0".to_owned());
        check(&mut r, format!("read 1048576 4096 {:x}", 0x80 + i));
        check(&mut r, "read 1052672 4096 0".to_owned());
    }
    d.stop();
}

fn second_daemon_fences_the_first(backend: Backend) {
    let test = "second_daemon_fences_the_first";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let args = ["--default-size", "16M", "--flush-interval", "3600s"];
    let mut d1 = ctx.daemon(&args);
    let mut r1 = Repl::connect(&d1.uri(), None).unwrap();
    r1.ok("write 0 4096 aa");
    r1.ok("flush");

    // A second daemon takes the export over.
    let mut d2 = ctx.daemon(&args);
    let mut r2 = Repl::connect(&d2.uri(), None).unwrap();
    r2.ok("read 0 4096 aa");

    // The first daemon may accept a write into memory, but its flush must fail.
    let w = r1.send("write 0 4096 bb");
    let f = r1.send("flush");
    eprintln!(
        "{}: fenced daemon: write -> {w:?}, flush -> {f:?}",
        ctx.name
    );
    assert!(
        f.starts_with("err"),
        "{}: a fenced daemon acknowledged a FLUSH: {f}",
        ctx.name
    );
    let errno = r1.err("write 8192 4096 cc");
    eprintln!("{}: fenced daemon: later write -> {errno}", ctx.name);
    let f = r1.send("flush");
    assert!(
        f.starts_with("err"),
        "{}: a fenced daemon acknowledged a second FLUSH: {f}",
        ctx.name
    );

    // The new owner sees none of it and keeps working.
    r2.ok("read 0 4096 aa");
    r2.ok("read 8192 4096 0");
    r2.ok("write 4096 4096 dd");
    r2.ok("flush");
    drop(r1);
    drop(r2);
    let st = d1.terminate();
    eprintln!("{}: fenced daemon exited with {st} on SIGTERM", ctx.name);
    d1.assert_no_panic();
    d2.stop();
    d2.restart();
    let mut r = Repl::connect(&d2.uri(), None).unwrap();
    r.ok("read 0 4096 aa");
    r.ok("read 4096 4096 dd");
    r.ok("read 8192 4096 0");
    drop(r);
    d2.stop();
}

fn tls_with_client_certificates_end_to_end(backend: Backend) {
    let test = "tls_with_client_certificates_end_to_end";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_bins(&ctx.name, &["openssl", "nbdcopy", "nbdinfo", "qemu-io"]) {
        return;
    }
    let pki = pki::make();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (cert, key, ca) = (s(&pki.server_cert), s(&pki.server_key), s(&pki.ca_cert));
    let mut d = ctx.daemon(&[
        "--default-size",
        "64M",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    assert!(
        d.logs().contains("tls=\"required, client certificates\""),
        "{}",
        d.log_tail(5)
    );
    let tls_uri = |d: &e2e::Daemon, dir: &Path| {
        format!(
            "{}?tls-certificates={}",
            d.uri().replacen("nbd://", "nbds://", 1),
            dir.display()
        )
    };
    // 8 MiB of noise in over TLS, flushed.
    let src = ctx.scratch.join("src.img");
    let bytes = e2e::noise_bytes(8 << 20, 0x9e37_79b9_7f4a_7c15);
    fs::write(&src, &bytes).unwrap();
    ctx.run(
        cmd("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(tls_uri(&d, &pki.client_cert)),
        secs(120),
    );
    // Without TLS, or without a certificate from the CA, nothing is served.
    for uri in [
        d.uri(),
        tls_uri(&d, &pki.client_anon),
        tls_uri(&d, &pki.client_stranger),
    ] {
        let out = ctx.run_status(cmd("nbdinfo").arg(&uri), secs(60));
        assert!(!out.status.success(), "{}: {uri} was served", ctx.name);
    }
    // qemu with the client certificate: a pattern over TLS (and extended headers).
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.client_cert.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=disk,tls-creds=tls0",
        d.port
    );
    ctx.run(
        cmd("qemu-io")
            .args(["--object", &object, "--image-opts", "-t", "writeback"])
            .args(["-c", "write -P 0x6b 16M 1M", "-c", "flush"])
            .arg(&image),
        secs(120),
    );
    // After a restart the same clients read it all back.
    d.stop();
    d.restart();
    let back = ctx.scratch.join("back.img");
    ctx.run(
        cmd("nbdcopy").arg(tls_uri(&d, &pki.client_cert)).arg(&back),
        secs(120),
    );
    let got = fs::read(&back).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(
        got[..8 << 20] == bytes[..],
        "{}: data differs after restart",
        ctx.name
    );
    assert!(got[16 << 20..17 << 20].iter().all(|&b| b == 0x6b));
    assert!(got[8 << 20..16 << 20].iter().all(|&b| b == 0));
    d.stop();
}

fn tls_certificate_reloads_on_sighup(backend: Backend) {
    let test = "tls_certificate_reloads_on_sighup";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_bins(&ctx.name, &["openssl", "nbdinfo"]) {
        return;
    }
    // Two unrelated PKIs; the daemon's certificate and key live at fixed paths whose
    // contents get replaced, as a certificate renewal does.
    let (old, new) = (pki::make(), pki::make());
    let cert = ctx.scratch.join("server-cert.pem");
    let key = ctx.scratch.join("server-key.pem");
    let install = |p: &pki::Pki| {
        fs::copy(&p.server_cert, &cert).unwrap();
        fs::copy(&p.server_key, &key).unwrap();
    };
    install(&old);
    let tls_args = [
        "--default-size",
        "16M",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let mut d = ctx.daemon(&tls_args);
    // Whether a client trusting only the CA in `ca_dir` is served.
    let served = |d: &e2e::Daemon, ca_dir: &Path| {
        let uri = format!(
            "{}?tls-certificates={}",
            d.uri().replacen("nbd://", "nbds://", 1),
            ca_dir.display()
        );
        let out = ctx.run_status(cmd("nbdinfo").arg("--size").arg(&uri), secs(60));
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "16777216"
    };
    assert!(served(&d, &old.client_anon), "{}: old CA refused", ctx.name);
    assert!(
        !served(&d, &new.client_anon),
        "{}: new CA served early",
        ctx.name
    );
    // New files on disk change nothing until the signal.
    install(&new);
    assert!(
        served(&d, &old.client_anon),
        "{}: reloaded without SIGHUP",
        ctx.name
    );
    d.hangup();
    d.wait_for_log("SIGHUP: TLS certificate reloaded");
    assert!(served(&d, &new.client_anon), "{}: new CA refused", ctx.name);
    assert!(
        !served(&d, &old.client_anon),
        "{}: old CA still served",
        ctx.name
    );
    // A broken key: the reload fails and the last good certificate stays in use.
    fs::write(&key, "not a key\n").unwrap();
    d.hangup();
    d.wait_for_log("reloading the TLS certificate failed");
    assert!(
        d.is_running(),
        "{}: a failed reload stopped the daemon",
        ctx.name
    );
    assert!(
        served(&d, &new.client_anon),
        "{}: bad reload took effect",
        ctx.name
    );
    d.stop();
    // Without TLS a SIGHUP is logged and the daemon keeps serving.
    d.restart_with(&["--default-size", "16M"]);
    d.hangup();
    d.wait_for_log("SIGHUP: no TLS configured");
    assert!(d.is_running(), "{}: SIGHUP stopped the daemon", ctx.name);
    let size = ctx.run(cmd("nbdinfo").arg("--size").arg(d.uri()), secs(60));
    assert_eq!(size.trim(), "16777216");
    d.stop();
}

/// Threads of `pid` named `nbd-conn-*` (one per live connection).
fn connection_threads(pid: u32) -> Vec<String> {
    let mut names = vec![];
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(comm) = fs::read_to_string(task.path().join("comm")) {
            if comm.starts_with("nbd-conn-") {
                names.push(comm.trim().to_owned());
            }
        }
    }
    names
}

/// Waits up to 10 s for `pid` to have exactly `want` connection threads.
fn wait_connection_threads(ctx_name: &str, pid: u32, want: usize) {
    let deadline = std::time::Instant::now() + secs(10);
    loop {
        let now = connection_threads(pid);
        if now.len() == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ctx_name}: expected {want} connection threads, found {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn export_work_outlives_the_connection_that_started_it(backend: Backend) {
    let test = "export_work_outlives_the_connection_that_started_it";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let mut d = ctx.daemon(&["--default-size", "16M", "--flush-interval", "1s"]);
    let pid = d.pid();
    wait_connection_threads(&ctx.name, pid, 0);
    // The first connection opens the export, so the export's background tasks (the timed
    // flusher among them) start while serving it; it writes without flushing and leaves.
    let mut first = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    first.ok("write 0 65536 a5");
    first.ok("write 8388608 1048576 5a");
    wait_connection_threads(&ctx.name, pid, 1);
    drop(first);
    d.wait_for_log("connection closed");
    // Its thread and runtime are gone.
    wait_connection_threads(&ctx.name, pid, 0);
    // The timed flush (every 1 s) must still happen: if the flusher had lived on the first
    // connection's runtime it would have died with it, and the crash would lose the data.
    std::thread::sleep(secs(4));
    d.kill9();
    d.restart();
    let pid = d.pid();
    let mut second = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    second.ok("read 0 65536 a5");
    second.ok("read 8388608 1048576 5a");
    second.ok("write 65536 4096 c3");
    second.ok("flush");
    drop(second);
    wait_connection_threads(&ctx.name, pid, 0);
    d.kill9();
    d.restart();
    let mut after = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    after.ok("read 0 65536 a5");
    after.ok("read 65536 4096 c3");
    after.ok("read 69632 1024000 0");
    after.ok("read 8388608 1048576 5a");
    drop(after);
    d.stop();
    d.assert_no_panic();
}

fn unused_exports_are_flushed_and_closed(backend: Backend) {
    let test = "unused_exports_are_flushed_and_closed";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    // Timed flushes far off: only the idle close can make the writes durable.
    let mut d = ctx.daemon(&[
        "--default-size",
        "16M",
        "--flush-interval",
        "10m",
        "--export-idle-close",
        "2s",
        "--lease-interval",
        "1s",
    ]);
    let mut kept = Repl::connect(&d.tcp_target(), Some("kept")).unwrap();
    kept.ok("write 0 65536 3c");
    let mut gone = Repl::connect(&d.tcp_target(), Some("gone")).unwrap();
    gone.ok("write 0 1048576 a5");
    gone.ok("write 4194304 65536 5a");
    drop(gone);
    d.wait_for_log("closed an export no connection used");
    let logs = d.logs();
    let closed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("closed an export no connection used"))
        .collect();
    assert!(
        closed.iter().all(|l| l.contains("export=\"gone\"")),
        "{}: {closed:?}",
        ctx.name
    );
    // Its lease is gone with it; the connected export keeps its own.
    let v = inspect_exports(&ctx);
    assert!(export_row(&ctx, &v, "gone")["lease"].is_null(), "{v}");
    assert_eq!(export_row(&ctx, &v, "kept")["lease"]["live"], true, "{v}");
    // A crash now loses nothing of "gone": the close flushed it (nothing else did).
    drop(kept);
    d.kill9();
    d.restart();
    let mut c = Repl::connect(&d.tcp_target(), Some("gone")).unwrap();
    c.ok("read 0 1048576 a5");
    c.ok("read 4194304 65536 5a");
    c.ok("read 1048576 65536 0");
    // Reopened, it is served and closed again like any export.
    c.ok("write 8388608 4096 e7");
    drop(c);
    let closes = |d: &e2e::Daemon| {
        d.logs()
            .matches("closed an export no connection used")
            .count()
    };
    let end = std::time::Instant::now() + secs(30);
    while closes(&d) < 2 {
        assert!(
            std::time::Instant::now() < end,
            "{}: not closed again",
            ctx.name
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.kill9();
    d.restart();
    let mut c = Repl::connect(&d.tcp_target(), Some("gone")).unwrap();
    c.ok("read 8388608 4096 e7");
    drop(c);

    // --exports-max 1: a second export is refused while the first has a connection, and
    // opens once the first is left (closing it, durably, to make room).
    d.stop();
    d.restart_with(&["--default-size", "16M", "--exports-max", "1"]);
    let mut x = Repl::connect(&d.tcp_target(), Some("x")).unwrap();
    x.ok("write 0 4096 11");
    let refused = Repl::connect(&d.tcp_target(), Some("y"));
    assert!(refused.is_err(), "{}: a second export opened", ctx.name);
    d.wait_for_log("--exports-max are open and in use");
    // Once the server has seen "x"'s connection close (it then holds no user of "x").
    let ended = |d: &e2e::Daemon| {
        let logs = d.logs();
        logs.matches("connection closed").count() + logs.matches("client went away").count()
    };
    let closed = ended(&d);
    drop(x);
    let end = std::time::Instant::now() + secs(30);
    while ended(&d) == closed {
        assert!(
            std::time::Instant::now() < end,
            "{}: no close logged",
            ctx.name
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut y = Repl::connect(&d.tcp_target(), Some("y")).unwrap();
    y.ok("write 0 4096 22");
    drop(y);
    d.kill9();
    d.restart();
    let mut x = Repl::connect(&d.tcp_target(), Some("x")).unwrap();
    x.ok("read 0 4096 11");
    drop(x);
    d.stop();
    d.assert_no_panic();
}

/// `nbds3-inspect --json exports` of the test's store.
fn inspect_exports(ctx: &e2e::Ctx) -> serde_json::Value {
    let out = ctx.run(
        cmd(env!("CARGO_BIN_EXE_nbds3-inspect"))
            .args(["--store", &ctx.store.url])
            .args(&ctx.store.args)
            .args(["--json", "exports"]),
        secs(60),
    );
    serde_json::from_str(&out).expect("inspect prints JSON")
}

/// The row of `export` in an `inspect_exports` answer.
fn export_row<'a>(ctx: &e2e::Ctx, v: &'a serde_json::Value, export: &str) -> &'a serde_json::Value {
    v["exports"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["name"] == export))
        .unwrap_or_else(|| panic!("{}: no export {export:?} in {v}", ctx.name))
}

/// Bytes of every object of `export` in the test's store, by `nbds3-inspect exports`.
fn bytes_stored(ctx: &e2e::Ctx, export: &str) -> u64 {
    let v = inspect_exports(ctx);
    export_row(ctx, &v, export)["bytes_stored"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no bytes_stored for {export:?} in {v}", ctx.name))
}

fn compression_is_chosen_per_daemon_run(backend: Backend) {
    const MIB: u64 = 1 << 20;
    let test = "compression_is_chosen_per_daemon_run";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    // 4 MiB of one byte value: what zstd shrinks ~1000-fold, stored raw.
    let mut d = ctx.daemon(&["--default-size", "64M", "--compression", "off"]);
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok("write 0 4194304 5a");
    c.ok("flush");
    drop(c);
    d.stop();
    let raw = bytes_stored(&ctx, "disk");
    assert!(raw >= 4 * MIB, "{}: {raw} bytes stored", ctx.name);
    // The same again with the default (zstd): a few KiB more.
    d.restart_with(&["--default-size", "64M"]);
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok("write 8388608 4194304 a5");
    c.ok("flush");
    drop(c);
    d.stop();
    let both = bytes_stored(&ctx, "disk");
    assert!(
        both > raw && both - raw < MIB / 4,
        "{}: {raw} then {both} bytes stored",
        ctx.name
    );
    // Raw and compressed frames of one export read back, with an explicit level too.
    d.restart_with(&["--default-size", "64M", "--zstd-level", "-7"]);
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok("read 0 4194304 5a");
    c.ok("read 8388608 4194304 a5");
    c.ok("read 4194304 4194304 0");
    drop(c);
    d.stop();
    d.assert_no_panic();
}
