//! The benchmark scripts still run to the end. Each one is started with tiny settings
//! against the daemon this test run built, and must exit 0 and print its table.
//!
//! Numbers are not checked here: speed targets live in the benchmarks themselves, never in
//! tests. The point is that `tools/bench/*.sh` keep working as the code and the helpers they
//! share change. run.sh once stopped at its first server for a whole session, because a
//! helper it called had moved into common.sh, which it did not source.
//!
//! The scripts run one at a time (each fills a device of its own, up to 1 GiB twice).

#[allow(unused_macros)]
mod e2e;

use std::fs;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use e2e::{daemon_bin, need_bins, need_python_nbd, secs, wait_timeout, Scratch};

/// One script at a time: they are heavy, and they would only measure each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Run `tools/bench/SCRIPT ARGS` with `env`; its stdout, or a panic with both streams.
fn run_script(test: &str, script: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = Scratch::new(test);
    let out = scratch.join("stdout");
    let err = scratch.join("stderr");
    let repo = env!("CARGO_MANIFEST_DIR");
    let mut cmd = Command::new("bash");
    cmd.arg(format!("{repo}/tools/bench/{script}"))
        .args(args)
        .current_dir(repo)
        // The scripts' temporary directories (fills, stores) go under the scratch dir.
        .env("TMPDIR", &scratch.path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = wait_timeout(cmd.spawn().expect("start bash"), secs(600));
    let stdout = fs::read_to_string(&out).unwrap_or_default();
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "{test}: tools/bench/{script} {args:?} ended with {status:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    stdout
}

/// The table row starting with `| label`, split into its cells.
fn row(table: &str, label: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{table}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

/// `run.sh` against nbdkit memory and nbds3d on a file store: every row of the table, with
/// a number for both servers and a ratio for nbds3d.
#[test]
fn run_sh_prints_a_full_table() {
    let test = "run_sh_prints_a_full_table";
    if !need_bins(
        test,
        &[
            "fio", "nbdcopy", "nbdinfo", "nbdkit", "qemu-nbd", "qemu-img",
        ],
    ) {
        return;
    }
    let daemon = daemon_bin();
    let table = run_script(
        test,
        "run.sh",
        &[],
        &[
            ("NBDS3_BENCH_NBDS3D", &daemon),
            ("NBDS3_BENCH_SERVERS", "nbdkit-memory nbds3d-file"),
            ("NBDS3_BENCH_RUNTIME", "1"),
            ("NBDS3_BENCH_SIZE", "64M"),
            ("NBDS3_BENCH_NBDS3D_ARGS", "--cache-size 128M"),
        ],
    );
    let header = row(&table, "|");
    assert_eq!(header[1..], ["nbdkit-memory", "nbds3d-file"], "{table}");
    for label in [
        "randwrite 4k qd32 (IOPS)",
        "randread 4k qd32 (IOPS)",
        "seqwrite 1M qd8 (MiB/s)",
        "seqread 1M qd8 (MiB/s)",
        "nbdcopy in --flush (MiB/s)",
        "nbdcopy out, 1st read after writes (MiB/s)",
    ] {
        let cells = row(&table, label);
        assert!(
            cells[1].chars().next().is_some_and(|c| c.is_ascii_digit()),
            "{label}: nbdkit has no number: {cells:?}"
        );
        assert!(
            cells[2].chars().next().is_some_and(|c| c.is_ascii_digit()) && cells[2].ends_with("×)"),
            "{label}: nbds3d has no number and ratio: {cells:?}"
        );
    }
    let rss = row(&table, "peak RSS (MiB)");
    assert!(rss[2].parse::<f64>().is_ok_and(|m| m > 0.0), "{rss:?}");
}

/// `targets.sh`, one round: a verdict line for both targets.
#[test]
fn targets_sh_gives_both_verdicts() {
    let test = "targets_sh_gives_both_verdicts";
    if !need_bins(test, &["fio", "nbdcopy", "nbdinfo", "nbdkit"]) || !need_python_nbd(test) {
        return;
    }
    let daemon = daemon_bin();
    let out = run_script(
        test,
        "targets.sh",
        &[&daemon],
        &[("NBDS3_BENCH_ROUNDS", "1"), ("NBDS3_BENCH_RUNTIME", "1")],
    );
    for job in ["randwrite", "seqread"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{job}: median ratio"))
                    && (l.ends_with(": met") || l.ends_with(": NOT met"))),
            "no verdict for {job}:\n{out}"
        );
    }
}

/// `ab.sh` with the same binary on both sides, one round: a median row.
#[test]
fn ab_sh_prints_a_median() {
    let test = "ab_sh_prints_a_median";
    if !need_bins(test, &["fio", "nbdcopy", "nbdinfo"]) || !need_python_nbd(test) {
        return;
    }
    let daemon = daemon_bin();
    let out = run_script(
        test,
        "ab.sh",
        &[&daemon, &daemon, "randwrite", "1"],
        &[("NBDS3_BENCH_RUNTIME", "1")],
    );
    let median = row(&out, "**median**");
    assert!(median[3].ends_with("×**"), "{median:?}\n{out}");
}
