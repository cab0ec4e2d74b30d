//! Durability against the real daemon, with a libnbd client that knows what it was promised
//! (`tests/e2e/nbd_workload.py`):
//! - kill -9 mid-workload, several rounds: every block whose write was covered by a completed
//!   FLUSH reads back exactly; later writes may be old or new, but each block holds one of
//!   the values written to it, never garbage.
//! - SIGTERM while writes are dirty (idle client, and a client still streaming writes): exit
//!   status 0, and after a restart every acknowledged write is there.

#[macro_use]
mod e2e;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::{need_python_nbd, script, secs, setup, Backend, Ctx, Daemon, PYTHON};

e2e_tests!(
    kill9_mid_workload_keeps_flushed_writes,
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

fn kill9_mid_workload_keeps_flushed_writes(backend: Backend) {
    let test = "kill9_mid_workload_keeps_flushed_writes";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
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
    let state = ctx.scratch.join("state.json");
    let prog = ctx.scratch.join("state.json.progress");
    // A short flush interval and a small dirty budget: background flushes and writers
    // waiting on the budget both happen while the client runs its own flushes.
    let mut d = ctx.daemon(&[
        "--default-size",
        "64M",
        "--flush-interval",
        "1s",
        "--dirty-max",
        "8M",
    ]);
    for round in 0..3u64 {
        let _ = fs::remove_file(&prog);
        let flush_every = ["16", "64", "200"][round as usize];
        let mut w = writer(
            &ctx,
            &d,
            &state,
            &[
                "--seconds",
                "60",
                "--flush-every",
                flush_every,
                "--qd",
                "16",
                "--seed",
                &(seed + round).to_string(),
            ],
        );
        // Pull the plug at a different point each round, after some flushes have landed.
        let want_flushes = 2 + (seed + round) % 4;
        wait_until(
            &ctx,
            &mut w,
            "enough acknowledged flushes",
            secs(90),
            || progress(&prog).0 >= want_flushes,
        );
        std::thread::sleep(Duration::from_millis((seed * 7 + round * 131) % 400));
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
        verify(&ctx, &d, &state);
    }
    d.stop();
    // And once more after a clean stop.
    d.restart();
    verify(&ctx, &d, &state);
    d.stop();
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
