//! Durability against the real daemon, with a libnbd client that knows what it was promised
//! (`tests/e2e/nbd_workload.py`):
//! - kill -9 mid-workload, several rounds (one and several connections, multi-conn FLUSH
//!   semantics): every block whose write was covered by a completed FLUSH reads back
//!   exactly; later writes may be old or new, but each block holds one of the values
//!   written to it, never garbage. Once without compaction, once with compaction and GC
//!   running as often as they can.
//! - SIGTERM while writes are dirty (idle client, and a client still streaming writes): exit
//!   status 0, and after a restart every acknowledged write is there.
//! - S3 unreachable (a relay between daemon and server is cut): a FLUSH rides out an
//!   outage shorter than `--s3-retry-max` and succeeds; past it, it fails with EIO, never
//!   hangs and never says "ok"; the writes stay readable, and the first FLUSH after the
//!   store is back persists them, so a kill -9 right after loses nothing. A cold READ
//!   with the store gone is EIO after the window too (never zeros), and reads once it is
//!   back. SIGTERM with unflushed writes and the store gone: the daemon keeps retrying its
//!   final flush and exits 0 once the store is back; a second SIGTERM exits non-zero at
//!   once, saying the data is not durable.
//! - A bulk copy into a daemon whose store is down stalls at `--dirty-max` with the daemon's
//!   peak RSS inside its budget, and completes, byte for byte, once the store is back.
//! - An outage longer than `--write-stall-max`: a write that finds the dirty set full gets
//!   EIO once it has waited that long (never a hang), the writes taken before still read
//!   back and land once the store is back, and the refused one was not taken.

#[macro_use]
mod e2e;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::{
    cmd, defrag_passes, need_bins, need_python_nbd, noise_bytes, script, secs, setup, sha256_file,
    Backend, Ctx, CutProxy, Daemon, Repl, PYTHON,
};

e2e_tests!(
    kill9_mid_workload_keeps_flushed_writes,
    kill9_with_compaction_and_gc_running,
    sigterm_with_dirty_writes_is_durable
);

const BLOCKS: &str = "2048"; // 8 MiB of 4 KiB pattern blocks

fn progress(path: &Path) -> (u64, u64) {
    let text = fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("flushes="), field("writes="))
}

fn writer(ctx: &Ctx, d: &Daemon, state: &Path, extra: &[&str]) -> e2e::Bg {
    let mut c = std::process::Command::new(PYTHON);
    c.arg(script("nbd_workload.py"))
        .args(["write", &d.uri()])
        .arg(state)
        .args(["--blocks", BLOCKS])
        .args(extra);
    ctx.spawn(&mut c)
}

fn verify(ctx: &Ctx, d: &Daemon, state: &Path) -> String {
    let out = ctx.python(
        "nbd_workload.py",
        &["verify", &d.uri(), state.to_str().unwrap()],
        secs(120),
    );
    eprintln!("{}: {}", ctx.name, out.trim());
    assert!(out.contains("verified"), "{}: verify:\n{out}", ctx.name);
    out
}

fn wait_until(
    ctx: &Ctx,
    w: &mut e2e::Bg,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            w.is_running(),
            "{}: the workload stopped before {what}:\n{}{}",
            ctx.name,
            w.stdout(),
            w.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "{}: timed out waiting for {what}",
            ctx.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_reason(state: &Path) -> String {
    let st: serde_json::Value = serde_json::from_str(&fs::read_to_string(state).unwrap()).unwrap();
    st["stop_reason"].as_str().unwrap_or("").to_owned()
}

fn seed(ctx: &Ctx) -> u64 {
    let seed = std::env::var("NBDS3_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        });
    eprintln!(
        "{}: seed {seed} (NBDS3_E2E_SEED={seed} to repeat)",
        ctx.name
    );
    seed
}

/// Rounds of: workload → kill -9 at a seed-chosen moment after some acknowledged flushes →
/// restart → every block checked against the model. Round `r` uses `flush_every[r]` and
/// `conns[r]` connections.
fn crash_rounds(ctx: &Ctx, d: &mut Daemon, flush_every: &[u32], conns: &[u32], extra_ms: u64) {
    let seed = seed(ctx);
    let state = ctx.scratch.join("state.json");
    let prog = ctx.scratch.join("state.json.progress");
    for (round, (&fe, &nc)) in flush_every.iter().zip(conns).enumerate() {
        let round = round as u64;
        let _ = fs::remove_file(&prog);
        let mut w = writer(
            ctx,
            d,
            &state,
            &[
                "--seconds",
                "120",
                "--flush-every",
                &fe.to_string(),
                "--qd",
                "16",
                "--conns",
                &nc.to_string(),
                "--seed",
                &(seed + round).to_string(),
            ],
        );
        // Pull the plug at a different point each round, after some flushes have landed.
        let want_flushes = 2 + (seed + round) % 4;
        wait_until(ctx, &mut w, "enough acknowledged flushes", secs(90), || {
            progress(&prog).0 >= want_flushes
        });
        std::thread::sleep(Duration::from_millis(
            (seed * 7 + round * 131) % (400 + extra_ms),
        ));
        assert!(
            w.is_running(),
            "{}: workload ended before the kill",
            ctx.name
        );
        d.kill9();
        let out = w.wait_ok(secs(60));
        eprintln!("{}: round {round}: {}", ctx.name, out.trim());
        let reason = stop_reason(&state);
        assert!(
            reason.starts_with("nbd error"),
            "{}: workload stopped for {reason:?}, not the kill",
            ctx.name
        );
        d.restart();
        verify(ctx, d, &state);
    }
    d.stop();
    // And once more after a clean stop.
    d.restart();
    verify(ctx, d, &state);
    d.stop();
}

fn kill9_mid_workload_keeps_flushed_writes(backend: Backend) {
    let test = "kill9_mid_workload_keeps_flushed_writes";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    // A short flush interval and a small dirty budget: background flushes and writers
    // waiting on the budget both happen while the client runs its own flushes.
    let mut d = ctx.daemon(&[
        "--default-size",
        "64M",
        "--flush-interval",
        "1s",
        "--dirty-max",
        "8M",
        "--no-compactor",
    ]);
    crash_rounds(&ctx, &mut d, &[16, 64, 200, 32], &[1, 1, 1, 4], 0);
}

/// The same with compaction and garbage collection running flat out: segments get
/// rewritten and old manifests and segments deleted under the writer's feet, and the
/// daemon is killed in the middle of whatever they are doing.
fn kill9_with_compaction_and_gc_running(backend: Backend) {
    let test = "kill9_with_compaction_and_gc_running";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let mut d = ctx.daemon(&[
        "--default-size",
        "64M",
        "--flush-interval",
        "300ms",
        "--dirty-max",
        "4M",
        "--compact-interval",
        "100ms",
        "--compact-idle",
        "0s",
        "--compact-threshold",
        "0.05",
        "--gc-interval",
        "200ms",
        "--gc-keep-versions",
        "1",
        "--gc-retain",
        "0s",
        // Passes also defragment the index (rewrite stretches by LBA) when killed.
        "--index-max",
        "16K",
    ]);
    crash_rounds(
        &ctx,
        &mut d,
        &[64, 16, 128, 48, 256],
        &[2, 1, 3, 2, 1],
        1500,
    );
    let logs = d.logs();
    let passes = logs.matches("compaction pass committed").count();
    eprintln!(
        "{}: {passes} compaction passes committed over all runs, {} defragmenting",
        ctx.name,
        defrag_passes(&logs)
    );
    assert!(
        passes > 0,
        "{}: compaction never ran; the test did not test it",
        ctx.name
    );
}

fn sigterm_with_dirty_writes_is_durable(backend: Backend) {
    let test = "sigterm_with_dirty_writes_is_durable";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let state = ctx.scratch.join("state.json");
    // Nothing is flushed on its own: no timer flush within the test, a budget far above
    // what the workload writes. Only the shutdown can make the writes durable.
    let args = [
        "--default-size",
        "64M",
        "--flush-interval",
        "3600s",
        "--dirty-max",
        "1G",
    ];
    let mut d = ctx.daemon(&args);

    // 1. The client wrote without FLUSH and sits idle on its connection.
    let mut w = writer(
        &ctx,
        &d,
        &state,
        &[
            "--seconds",
            "2",
            "--flush-every",
            "1000000000",
            "--durable",
            "ack",
            "--hold",
        ],
    );
    let idle = ctx.scratch.join("state.json.idle");
    wait_until(&ctx, &mut w, "the client going idle", secs(60), || {
        idle.exists()
    });
    d.stop();
    let out = w.wait_ok(secs(60));
    eprintln!("{}: idle client: {}", ctx.name, out.trim());
    d.restart();
    verify(&ctx, &d, &state);

    // 2. SIGTERM lands while the client is still streaming writes: whatever was
    //    acknowledged must be durable.
    let prog = ctx.scratch.join("state.json.progress");
    let _ = fs::remove_file(&prog);
    let mut w = writer(
        &ctx,
        &d,
        &state,
        &[
            "--seconds",
            "60",
            "--flush-every",
            "1000000000",
            "--durable",
            "ack",
            "--seed",
            "2",
        ],
    );
    wait_until(&ctx, &mut w, "2048 acknowledged writes", secs(60), || {
        progress(&prog).1 >= 2048
    });
    d.stop();
    let out = w.wait_ok(secs(60));
    eprintln!("{}: streaming client: {}", ctx.name, out.trim());
    assert!(
        stop_reason(&state).starts_with("nbd error"),
        "{}: workload was not cut off by the shutdown",
        ctx.name
    );
    d.restart();
    verify(&ctx, &d, &state);
    d.stop();
}

/// Send `line` with the store unreachable: it must fail with EIO once the retry `window`
/// has passed, neither sooner nor much later (a hang would show here; so would the
/// default window, 30 s, which the daemon under test was not given). The slack covers
/// attempts under way and a timed flush's batch a FLUSH may wait on.
fn eio_after_window(name: &str, c: &mut Repl, line: &str, window: Duration) {
    let started = Instant::now();
    let answer = c.send(line);
    let took = started.elapsed();
    eprintln!("{name}: {line:?} with the store gone answered {answer:?} after {took:?}");
    assert!(
        answer.starts_with("err EIO"),
        "{name}: {line:?}: {answer:?}"
    );
    assert!(
        took >= window && took < secs(20),
        "{name}: {line:?} failed after {took:?}"
    );
}

/// Point the test's daemon at the S3 server through a relay the test can cut.
fn relay_to_s3(ctx: &mut Ctx) -> std::sync::Arc<CutProxy> {
    let at = ctx
        .store
        .args
        .iter()
        .position(|a| a == "--s3-endpoint")
        .expect("an S3 store has an endpoint")
        + 1;
    let upstream = ctx.store.args[at]
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = std::sync::Arc::new(CutProxy::start(&upstream));
    ctx.store.args[at] = proxy.endpoint();
    proxy
}

#[test]
fn s3_outage_fails_flush_with_eio_and_loses_nothing() {
    let test = "s3_outage_fails_flush_with_eio_and_loses_nothing";
    let Some(mut ctx) = setup(test, Backend::S3) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let proxy = relay_to_s3(&mut ctx);
    let window = secs(4);
    let mut d = ctx.daemon(&["--default-size", "64M", "--s3-retry-max", "4s"]);
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok("write 0 1048576 a5");
    c.ok("flush");

    // An outage shorter than the window: the FLUSH waits it out and succeeds.
    proxy.cut();
    c.ok("write 1048576 1048576 c3");
    let restorer = {
        let proxy = std::sync::Arc::clone(&proxy);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            proxy.restore();
        })
    };
    let started = Instant::now();
    c.ok("flush");
    let took = started.elapsed();
    restorer.join().unwrap();
    eprintln!("{}: FLUSH across a 1.5 s outage took {took:?}", ctx.name);
    assert!(
        took >= Duration::from_millis(1500),
        "{}: {took:?}",
        ctx.name
    );

    // An outage longer than the window: EIO once it has passed, never a hang or an "ok".
    proxy.cut();
    c.ok("write 2097152 1048576 5a");
    eio_after_window(&ctx.name, &mut c, "flush", window);
    // Still served: the unflushed write from the dirty set, the flushed ones from the cache.
    c.ok("read 2097152 1048576 5a");
    c.ok("read 0 1048576 a5");
    c.ok("read 1048576 1048576 c3");

    proxy.restore();
    // The store is back: this FLUSH persists what the failed one could not.
    c.ok("flush");
    drop(c);
    d.kill9();
    d.restart();
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    // A cold read with the store gone: EIO after the window, not a hang and not zeros;
    // holes need no store and still read. Then, with the store back, everything is there.
    proxy.cut();
    eio_after_window(&ctx.name, &mut c, "read 0 1048576 a5", window);
    c.ok("read 3145728 1048576 0");
    proxy.restore();
    c.ok("read 0 1048576 a5");
    c.ok("read 1048576 1048576 c3");
    c.ok("read 2097152 1048576 5a");

    // SIGTERM with unflushed writes and the store gone: the daemon keeps trying its final
    // flush instead of exiting without it, and exits 0 once the store is back.
    c.ok("write 4194304 1048576 e7");
    drop(c);
    proxy.cut();
    d.sigterm();
    d.wait_for_log("final flush failed; retrying");
    assert!(
        d.wait_exit(secs(2)).is_none(),
        "{}: nbds3d exited with its final flush undone",
        ctx.name
    );
    proxy.restore();
    let status = d
        .wait_exit(secs(60))
        .expect("nbds3d exits once the store is back");
    assert!(
        status.success(),
        "{}: exit {status}\n{}",
        ctx.name,
        d.log_tail(20)
    );
    d.restart();
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok("read 4194304 1048576 e7");

    // The same, but the operator insists: a second SIGTERM exits at once, non-zero, and
    // says the data is not durable; the writes are indeed not there after a restart.
    c.ok("write 5242880 1048576 9b");
    drop(c);
    proxy.cut();
    let runs_before = d.logs().matches("final flush failed; retrying").count();
    d.sigterm();
    let deadline = Instant::now() + secs(60);
    while d.logs().matches("final flush failed; retrying").count() == runs_before {
        assert!(Instant::now() < deadline, "{}: no retry logged", ctx.name);
        std::thread::sleep(Duration::from_millis(50));
    }
    d.sigterm();
    let status = d
        .wait_exit(secs(30))
        .expect("a second SIGTERM ends the daemon");
    assert!(
        !status.success(),
        "{}: exit {status} after giving up",
        ctx.name
    );
    assert!(
        d.logs().contains("final flush failed, data not durable"),
        "{}: {}",
        ctx.name,
        d.log_tail(20)
    );
    proxy.restore();
    d.restart();
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok("read 5242880 1048576 0");
    c.ok("read 4194304 1048576 e7");
    drop(c);
    d.stop();
    d.assert_no_panic();
    assert!(
        d.logs().contains("request failed with EIO"),
        "{}: the daemon did not log the failed FLUSH",
        ctx.name
    );
}

#[test]
fn s3_outage_past_the_stall_bound_fails_writes_with_eio() {
    const MIB: u64 = 1 << 20;
    let test = "s3_outage_past_the_stall_bound_fails_writes_with_eio";
    let Some(mut ctx) = setup(test, Backend::S3) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let proxy = relay_to_s3(&mut ctx);
    let stall = secs(3);
    let mut d = ctx.daemon(&[
        "--default-size",
        "64M",
        "--dirty-max",
        "4M",
        "--no-compactor",
        "--s3-retry-max",
        "2s",
        "--write-stall-max",
        "3s",
    ]);
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok(&format!("write 0 {MIB} a5"));
    c.ok("flush");

    proxy.cut();
    let mut accepted = Vec::new();
    let (refused_at, answer, took) = loop {
        let at = (accepted.len() as u64 + 1) * MIB;
        assert!(
            at < 32 * MIB,
            "{}: 31 MiB taken with --dirty-max 4M",
            ctx.name
        );
        let started = Instant::now();
        let answer = c.send(&format!("write {at} {MIB} {:02x}", 0x10 + at / MIB));
        let took = started.elapsed();
        if !answer.starts_with("ok") {
            break (at, answer, took);
        }
        accepted.push(at);
    };
    eprintln!(
        "{}: {} writes of 1 MiB taken, then {answer:?} after {took:?}",
        ctx.name,
        accepted.len()
    );
    assert!(answer.starts_with("err EIO"), "{}: {answer:?}", ctx.name);
    assert!(
        took >= stall && took < secs(20),
        "{}: the write failed after {took:?}",
        ctx.name
    );
    assert!(!accepted.is_empty(), "{}: nothing taken", ctx.name);
    for &at in &accepted {
        c.ok(&format!("read {at} {MIB} {:02x}", 0x10 + at / MIB));
    }

    // The store is back: a write into the still-full dirty set is taken (room is made by
    // a flush, tried at once if the write has to wait the stall bound), no FLUSH first.
    proxy.restore();
    let after = refused_at + MIB;
    c.ok(&format!("write {after} {MIB} 3c"));
    c.ok("flush");
    drop(c);
    d.kill9();
    d.restart();
    let mut c = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    c.ok(&format!("read 0 {MIB} a5"));
    for &at in &accepted {
        c.ok(&format!("read {at} {MIB} {:02x}", 0x10 + at / MIB));
    }
    c.ok(&format!("read {refused_at} {MIB} 0"));
    c.ok(&format!("read {after} {MIB} 3c"));
    drop(c);
    d.stop();
    d.assert_no_panic();
}

#[test]
fn s3_outage_under_a_bulk_copy_stalls_within_the_memory_budget() {
    const MIB: u64 = 1 << 20;
    let test = "s3_outage_under_a_bulk_copy_stalls_within_the_memory_budget";
    let Some(mut ctx) = setup(test, Backend::S3) else {
        return;
    };
    if !need_python_nbd(&ctx.name) || !need_bins(&ctx.name, &["nbdcopy"]) {
        return;
    }
    let proxy = relay_to_s3(&mut ctx);
    let size = 512 * MIB;
    let src = ctx.scratch.join("src.img");
    fs::write(&src, noise_bytes(size as usize, 0x5eed)).unwrap();
    let mut d = ctx.daemon(&[
        "--default-size",
        "512M",
        "--cache-size",
        "32M",
        "--dirty-max",
        "32M",
        "--inflight-bytes-max",
        "32M",
        "--no-compactor",
        "--s3-retry-max",
        "2s",
        // Writers wait out the outage however long it lasts (the default fails a write
        // that has waited 30 s: s3_outage_past_the_stall_bound_fails_writes_with_eio).
        "--write-stall-max",
        "0s",
    ]);
    // The export is opened (from the store) while the store is up, and stays open.
    let mut keep = Repl::connect(&d.tcp_target(), Some("disk")).unwrap();
    keep.ok("flush");
    proxy.cut();
    let mut copy = ctx.spawn(cmd("nbdcopy").arg("--flush").arg(&src).arg(d.uri()));
    std::thread::sleep(secs(10));
    assert!(
        copy.is_running(),
        "{}: the copy finished with the store down: {}",
        ctx.name,
        copy.stderr()
    );
    // Budget: cache + dirty + requests in flight + upload buffers (8 × 8 MiB) and 64 MiB
    // of slack (the daemon's resident target, plus the in-flight bound), and a margin.
    // Accepting the copy unbounded would take 512 MiB and more.
    let peak_mib = d.peak_rss_kib().expect("VmHWM") / 1024;
    eprintln!("{}: peak RSS with the store down: {peak_mib} MiB", ctx.name);
    assert!(
        peak_mib < 32 + 32 + 32 + 64 + 64 + 64,
        "{}: {peak_mib} MiB",
        ctx.name
    );
    proxy.restore();
    copy.wait_ok(secs(180));
    let peak_mib = d.peak_rss_kib().expect("VmHWM") / 1024;
    eprintln!("{}: peak RSS after the copy: {peak_mib} MiB", ctx.name);
    drop(keep);
    d.kill9();
    d.restart();
    let out = ctx.scratch.join("out.img");
    ctx.run(cmd("nbdcopy").arg(d.uri()).arg(&out), secs(180));
    assert_eq!(
        sha256_file(&out),
        sha256_file(&src),
        "{}: copy differs",
        ctx.name
    );
    d.stop();
    d.assert_no_panic();
}
