//! Compaction and garbage collection under a live workload, against the real daemon with
//! both running as often as they can (`--gc-retain 0s`: old segments are deleted as soon as
//! no manifest needs them). Readers racing writers must never get an error, stale data
//! (older than a write that had completed before the read) or garbage; after a restart the
//! device holds exactly the last writes. (`tests/e2e/nbd_read_race.py` does the checking.)

#[macro_use]
mod e2e;

use e2e::{defrag_passes, need_python_nbd, secs, setup, Backend};

e2e_tests!(reads_racing_writes_compaction_and_gc);

const AGGRESSIVE: &[&str] = &[
    "--default-size",
    "64M",
    "--flush-interval",
    "300ms",
    "--dirty-max",
    "4M",
    "--cache-size",
    "2M",
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
    // ~170 index runs: scattered writes keep the index over it, so passes also
    // defragment (rewrite stretches by LBA) while readers race them.
    "--index-max",
    "16K",
];

fn reads_racing_writes_compaction_and_gc(backend: Backend) {
    let test = "reads_racing_writes_compaction_and_gc";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let state = ctx.scratch.join("race.json");
    let state = state.to_str().unwrap();
    // A tiny page cache, so reads really go to the segments compaction is moving.
    let mut d = ctx.daemon(AGGRESSIVE);
    let out = ctx.python(
        "nbd_read_race.py",
        &[&d.uri(), "8", "--state", state],
        secs(120),
    );
    eprintln!("{}: {}", ctx.name, out.trim());
    assert!(out.contains("ALL OK"), "{}: {out}", ctx.name);
    d.stop();
    d.restart();
    let out = ctx.python(
        "nbd_read_race.py",
        &[&d.uri(), "4", "--state", state, "--seed", "2"],
        secs(120),
    );
    eprintln!("{}: after restart: {}", ctx.name, out.trim());
    assert!(out.contains("ALL OK"), "{}: {out}", ctx.name);
    d.stop();
    let logs = d.logs();
    let compactions = logs.matches("compaction pass committed").count();
    let gcs = logs.matches("gc pass").count();
    eprintln!(
        "{}: {compactions} compaction passes, {gcs} gc passes",
        ctx.name
    );
    assert!(
        compactions > 0 && gcs > 0,
        "{}: compaction ({compactions}) or GC ({gcs}) never ran; nothing was tested",
        ctx.name
    );
    let defrags = defrag_passes(&logs);
    eprintln!("{}: {defrags} of them defragmented", ctx.name);
    assert!(
        defrags > 0,
        "{}: no pass defragmented the index; that path was not tested",
        ctx.name
    );
}
