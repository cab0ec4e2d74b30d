//! End-to-end harness: the real `nbds3d` binary over a real store (a temp dir through
//! `file://`, and the S3 server of `tools/test-env.sh` when the environment names one),
//! driven by real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, libnbd, fio, nbdfuse).
//!
//! Each `tests/e2e_*.rs` file does `mod e2e;` and declares its tests with [`e2e_tests!`],
//! which makes one `#[test]` per backend: `NAME::file` and `NAME::s3`.
//!
//! Environment:
//! - `NBDS3_TEST_S3_ENDPOINT`, `NBDS3_TEST_S3_BUCKET` (+ AWS credentials and `AWS_REGION`):
//!   run the `::s3` variants against that server, each test under a fresh prefix.
//! - `NBDS3_REQUIRE_S3=1`: a missing S3 endpoint FAILS the `::s3` tests instead of skipping.
//! - `NBDS3_REQUIRE_CLIENTS=1`: a missing client binary (or /dev/fuse, root …) FAILS the
//!   test instead of skipping it (CI installs everything, so a skip there would hide a gap).
//! - `NBDS3_E2E_LOG`: the daemon's `RUST_LOG` (default `info`).
//! - `NBDS3_E2E_KEEP=1`: keep scratch dirs (logs, client output) of passing tests too.
//! - `NBDS3_E2E_DAEMON`: run this binary instead of the `nbds3d` cargo built.
//!
//! Every test gets a scratch directory under `$CARGO_TARGET_TMPDIR/e2e/`; the daemon's
//! stderr goes to `nbds3d-<run>.log` there. The directory is removed when the test passes
//! and kept (its path printed, with the tail of every daemon log) when it fails.
#![allow(dead_code)]

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Export name every test uses unless it needs several.
pub const EXPORT: &str = "disk";
/// How long the daemon may take from spawn to accepting connections (S3 probe included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM'd daemon may take to flush and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// Python with the libnbd bindings. A pyenv `python3` earlier in PATH lacks them.
pub const PYTHON: &str = "/usr/bin/python3";

/// Declares `mod NAME { #[test] fn file(); #[test] fn s3(); }` for each `fn NAME(Backend)`.
#[macro_export]
macro_rules! e2e_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn file() {
                    super::$name($crate::e2e::Backend::File)
                }
                #[test]
                fn s3() {
                    super::$name($crate::e2e::Backend::S3)
                }
            }
        )*
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    S3,
}

fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

fn loud_skip(test: &str, why: &str) {
    eprintln!();
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {test}: {why}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!();
}

/// Skip (or, with `NBDS3_REQUIRE_CLIENTS=1`, fail) a test whose prerequisite is missing.
/// Returns whether the test may go on.
pub fn prerequisite(test: &str, ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if env_flag("NBDS3_REQUIRE_CLIENTS") {
        panic!("{test}: {why} (NBDS3_REQUIRE_CLIENTS=1, so this fails instead of skipping)");
    }
    loud_skip(test, why);
    false
}

/// Full path of an executable found in PATH or the sbin directories, if any.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        fs::metadata(p)
            .map(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

/// [`prerequisite`] for a list of client binaries.
pub fn need_bins(test: &str, bins: &[&str]) -> bool {
    let missing: Vec<&str> = bins
        .iter()
        .copied()
        .filter(|b| find_bin(b).is_none())
        .collect();
    prerequisite(
        test,
        missing.is_empty(),
        &format!("missing client binaries {missing:?} (install qemu-utils, libnbd-bin, fio, nbdkit, fuse3, e2fsprogs)"),
    )
}

/// [`prerequisite`] for `/usr/bin/python3` with `import nbd` (python3-libnbd).
pub fn need_python_nbd(test: &str) -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    prerequisite(
        test,
        ok,
        "/usr/bin/python3 cannot `import nbd` (install python3-libnbd)",
    )
}

/// Path of a helper script shipped next to this module.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(name)
}

/// Path of the daemon binary cargo built for this test run (`NBDS3_E2E_DAEMON` overrides it,
/// e.g. to run the suite against a release build).
pub fn daemon_bin() -> String {
    std::env::var("NBDS3_E2E_DAEMON").unwrap_or_else(|_| env!("CARGO_BIN_EXE_nbds3d").to_owned())
}

/// A per-test directory: removed on success, kept (and announced) on failure.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e");
        let path = base.join(format!(
            "{}-{}-{}",
            test.replace("::", "-"),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "e2e: test failed; scratch dir kept at {}",
                self.path.display()
            );
        } else if env_flag("NBDS3_E2E_KEEP") {
            eprintln!(
                "e2e: NBDS3_E2E_KEEP=1: scratch dir kept at {}",
                self.path.display()
            );
        } else if fs::remove_dir_all(&self.path).is_err() {
            // A leftover mount point (fs test) must not fail a passing test.
            eprintln!("e2e: could not remove {}", self.path.display());
        }
    }
}

/// Where the daemon keeps its objects.
#[derive(Debug, Clone)]
pub struct Store {
    pub backend: Backend,
    pub url: String,
    /// Extra daemon arguments (S3 endpoint …).
    pub args: Vec<String>,
}

/// Everything a test needs: its name, scratch dir and store.
pub struct Ctx {
    pub name: String,
    pub store: Store,
    // Dropped last: daemons and mounts that live in it go first.
    pub scratch: Scratch,
    cmd_seq: AtomicU32,
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{:x}", std::process::id(), nanos)
}

/// Set up a test for `backend`; `None` means skip (no S3 server configured).
pub fn setup(test: &str, backend: Backend) -> Option<Ctx> {
    let name = format!(
        "{test}::{}",
        match backend {
            Backend::File => "file",
            Backend::S3 => "s3",
        }
    );
    let store = match backend {
        Backend::File => None,
        Backend::S3 => {
            let endpoint = std::env::var("NBDS3_TEST_S3_ENDPOINT")
                .ok()
                .filter(|s| !s.is_empty());
            let bucket = std::env::var("NBDS3_TEST_S3_BUCKET")
                .ok()
                .filter(|s| !s.is_empty());
            match (endpoint, bucket) {
                (Some(endpoint), Some(bucket)) => {
                    let region = std::env::var("AWS_REGION")
                        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                        .unwrap_or_else(|_| "us-east-1".to_owned());
                    Some(Store {
                        backend,
                        url: format!("s3://{bucket}/e2e-{test}-{}", unique_suffix()),
                        args: vec![
                            "--s3-endpoint".into(),
                            endpoint,
                            "--s3-region".into(),
                            region,
                            "--s3-path-style".into(),
                        ],
                    })
                }
                _ => {
                    if env_flag("NBDS3_REQUIRE_S3") {
                        panic!(
                            "{name}: NBDS3_REQUIRE_S3=1 but NBDS3_TEST_S3_ENDPOINT/NBDS3_TEST_S3_BUCKET are not set (source tools/test-env.sh)"
                        );
                    }
                    loud_skip(
                        &name,
                        "no S3 server (NBDS3_TEST_S3_ENDPOINT unset; `source tools/test-env.sh` to run it)",
                    );
                    return None;
                }
            }
        }
    };
    let scratch = Scratch::new(&name);
    let store = store.unwrap_or_else(|| Store {
        backend,
        url: format!("file://{}", scratch.join("store").display()),
        args: vec![],
    });
    eprintln!(
        "e2e: {name}: store {} scratch {}",
        store.url,
        scratch.path.display()
    );
    Some(Ctx {
        name,
        store,
        scratch,
        cmd_seq: AtomicU32::new(0),
    })
}

impl Ctx {
    /// Run a client command to completion (killed after `timeout`); stdout/stderr are kept
    /// in the scratch dir. Panics with both when it fails.
    pub fn run(&self, cmd: &mut Command, timeout: Duration) -> String {
        let out = self.run_status(cmd, timeout);
        if !out.status.success() {
            panic!(
                "{}: command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.name,
                out.status,
                cmd,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Ctx::run`] but returns whatever happened.
    pub fn run_status(&self, cmd: &mut Command, timeout: Duration) -> Output {
        let n = self.cmd_seq.fetch_add(1, Ordering::Relaxed);
        let out_path = self.scratch.join(&format!("cmd-{n:03}.out"));
        let err_path = self.scratch.join(&format!("cmd-{n:03}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("create cmd stdout"))
            .stderr(fs::File::create(&err_path).expect("create cmd stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot spawn {:?}: {e}", self.name, cmd));
        let status = wait_timeout(child, timeout)
            .unwrap_or_else(|| panic!("{}: timed out after {timeout:?}: {:?}", self.name, cmd));
        Output {
            status,
            stdout: fs::read(&out_path).unwrap_or_default(),
            stderr: fs::read(&err_path).unwrap_or_default(),
        }
    }

    /// Run a helper Python script (libnbd) from `tests/e2e/`.
    pub fn python(&self, script_name: &str, args: &[&str], timeout: Duration) -> String {
        let mut cmd = Command::new(PYTHON);
        cmd.arg(script(script_name)).args(args);
        self.run(&mut cmd, timeout)
    }

    /// Start a client in the background; its output goes to the scratch dir.
    pub fn spawn(&self, cmd: &mut Command) -> Bg {
        let n = self.cmd_seq.fetch_add(1, Ordering::Relaxed);
        let out = self.scratch.join(&format!("bg-{n:03}.out"));
        let err = self.scratch.join(&format!("bg-{n:03}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("create bg stdout"))
            .stderr(fs::File::create(&err).expect("create bg stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot spawn {:?}: {e}", self.name, cmd));
        Bg {
            child: Some(child),
            what: format!("{cmd:?}"),
            out,
            err,
        }
    }

    /// Start a daemon on this test's store.
    pub fn daemon(&self, args: &[&str]) -> Daemon {
        Daemon::start(self, args)
    }
}

/// Wait for `child`, killing it after `timeout` (returns `None` then).
pub fn wait_timeout(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running (or stopped) `nbds3d` on `127.0.0.1:<port>` over one store. Restarts keep the
/// store and the arguments; each run gets a fresh port and its own log. Dropping it kills
/// the process (SIGKILL).
pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    store: Store,
    dir: PathBuf,
    test: String,
    args: Vec<String>,
    runs: u32,
    logs: Vec<PathBuf>,
}

impl Daemon {
    pub fn start(ctx: &Ctx, args: &[&str]) -> Daemon {
        let mut d = Daemon {
            child: None,
            port: 0,
            store: ctx.store.clone(),
            dir: ctx.scratch.path.clone(),
            test: ctx.name.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
            runs: 0,
            logs: vec![],
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "{}: daemon already running",
            self.test
        );
        // The free port can be taken between our probe and the daemon's bind: retry.
        // Log names are unique per test process: several daemons may share a scratch dir.
        static RUN: AtomicU32 = AtomicU32::new(1);
        for attempt in 0..5 {
            self.runs = RUN.fetch_add(1, Ordering::Relaxed);
            let port = free_port();
            let log = self.dir.join(format!("nbds3d-{}.log", self.runs));
            let mut cmd = Command::new(daemon_bin());
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--store")
                .arg(&self.store.url)
                .args(&self.store.args)
                .args(&self.args)
                .env(
                    "RUST_LOG",
                    std::env::var("NBDS3_E2E_LOG").unwrap_or_else(|_| "info".into()),
                )
                .env("NO_COLOR", "1")
                .env_remove("NBDS3_STORE")
                .stdin(Stdio::null())
                .stdout(
                    fs::File::create(self.dir.join(format!("nbds3d-{}.out", self.runs))).unwrap(),
                )
                .stderr(fs::File::create(&log).expect("create daemon log"));
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("{}: cannot spawn {}: {e}", self.test, daemon_bin()));
            self.logs.push(log.clone());
            self.child = Some(child);
            self.port = port;
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    self.child = None;
                    let t = tail(&log, 40);
                    if t.contains("in use") && attempt < 4 {
                        break; // port race: try another
                    }
                    panic!(
                        "{}: nbds3d exited during startup ({status}); args {:?}\n--- log ---\n{t}",
                        self.test, cmd
                    );
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "{}: nbds3d did not accept connections within {START_TIMEOUT:?}\n--- log ---\n{}",
                        self.test,
                        tail(&log, 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("{}: could not start nbds3d on a free port", self.test);
    }

    /// `nbd://127.0.0.1:PORT/disk`.
    pub fn uri(&self) -> String {
        self.uri_for(EXPORT)
    }

    /// `tcp:127.0.0.1:PORT`, the target form of `nbd_repl.py` (any export name).
    pub fn tcp_target(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().unwrap().is_none(),
        }
    }

    /// Peak resident set (VmHWM) of the running daemon, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    fn signal(&self, sig: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "{}: kill({pid}, {sig}) failed", self.test);
    }

    /// SIGHUP (reload the TLS configuration); does not wait for anything.
    pub fn hangup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Wait (up to 30 s) until the log (of every run so far) contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.logs().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: no {text:?} in the log within 30 s:\n{}",
                self.test,
                self.log_tail(10)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, without waiting for anything.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Wait up to `timeout` for the daemon to exit; `None` if it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait for the exit (in-flight requests finish, everything is flushed).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let child = self.child.take().unwrap();
        let started = Instant::now();
        let status = wait_timeout(child, STOP_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "{}: nbds3d did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- log ---\n{}",
                self.test,
                self.log_tail(40)
            )
        });
        eprintln!(
            "e2e: {}: nbds3d stopped by SIGTERM in {:?}: {status}",
            self.test,
            started.elapsed()
        );
        status
    }

    /// SIGTERM, and the exit must be clean (status 0).
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "{}: nbds3d exited with {status} after SIGTERM (want 0)\n--- log ---\n{}",
            self.test,
            self.log_tail(40)
        );
        self.assert_no_panic();
    }

    /// The daemon's logs so far hold no panic message.
    pub fn assert_no_panic(&self) {
        let logs = self.logs();
        if let Some(at) = logs.find("panicked at") {
            let end = logs[at..]
                .char_indices()
                .nth(600)
                .map_or(logs.len(), |(i, _)| at + i);
            panic!("{}: nbds3d panicked:\n{}", self.test, &logs[at..end]);
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same store with the same arguments (on a new port).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Start again with different extra arguments (e.g. `--read-only`).
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }

    pub fn log_path(&self) -> &Path {
        self.logs.last().expect("daemon never started")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(self.log_path(), lines)
    }

    /// The whole log of every run so far.
    pub fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            for log in &self.logs {
                eprintln!(
                    "--- {} (last 30 lines) ---\n{}",
                    log.display(),
                    tail(log, 30)
                );
            }
        }
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` bytes of xorshift noise from `seed` (incompressible, reproducible).
pub fn noise_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A `Command` for a client binary.
pub fn cmd(bin: &str) -> Command {
    Command::new(find_bin(bin).unwrap_or_else(|| PathBuf::from(bin)))
}

/// Seconds-scale timeouts for client commands.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A background client process; killed when dropped.
pub struct Bg {
    child: Option<Child>,
    what: String,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().unwrap().is_none(),
        }
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Wait for the exit; panics on timeout or failure, with its output.
    pub fn wait_ok(&mut self, timeout: Duration) -> String {
        let child = self.child.take().expect("already waited");
        let status = wait_timeout(child, timeout);
        match status {
            Some(s) if s.success() => self.stdout(),
            other => panic!(
                "background command {} ({:?}): {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                match other {
                    None => "timed out".to_owned(),
                    Some(s) => format!("failed with {s}"),
                },
                timeout,
                self.what,
                self.stdout(),
                self.stderr()
            ),
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `nbdinfo --map URI` as merged `(offset, length, type)` runs (type 0 = data,
/// 3 = hole reading as zeros).
pub fn nbd_map(ctx: &Ctx, uri: &str) -> Vec<(u64, u64, u32)> {
    let out = ctx.run(cmd("nbdinfo").args(["--map", uri]), secs(60));
    let mut runs: Vec<(u64, u64, u32)> = vec![];
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parse = |i: usize| -> u64 {
            f.get(i)
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("{}: unexpected nbdinfo --map line {line:?}", ctx.name))
        };
        let (off, len, ty) = (parse(0), parse(1), parse(2) as u32);
        match runs.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == off => last.1 += len,
            _ => runs.push((off, len, ty)),
        }
    }
    runs
}

/// Bytes `nbdinfo --map` reports as allocated (not a hole).
pub fn allocated_bytes(ctx: &Ctx, uri: &str) -> u64 {
    nbd_map(ctx, uri)
        .iter()
        .filter(|r| r.2 & 1 == 0)
        .map(|r| r.1)
        .sum()
}

/// One libnbd connection driven step by step (`tests/e2e/nbd_repl.py`): each command
/// answers one line, `ok …` or `err ERRNAME …`.
pub struct Repl {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    what: String,
}

impl Repl {
    /// Connect to `target` (`tcp:HOST:PORT`, `unix:PATH` or a URI), export `export`.
    /// Returns the connection, or the `err …` line when connecting failed.
    pub fn connect(target: &str, export: Option<&str>) -> Result<Repl, String> {
        use std::io::BufRead;
        let mut cmd = Command::new(PYTHON);
        cmd.arg(script("nbd_repl.py")).arg(target);
        if let Some(e) = export {
            cmd.arg(e);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbd_repl.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut r = Repl {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            what: format!("{target} export {export:?}"),
        };
        let first = r.answer("connect");
        if first.starts_with("ok") {
            Ok(r)
        } else {
            Err(first)
        }
    }

    fn answer(&mut self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("nbd_repl ({}): no answer to {what:?}: {e}", self.what))
    }

    /// Send one command; its answer line.
    pub fn send(&mut self, line: &str) -> String {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("repl closed");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .expect("write to nbd_repl");
        self.answer(line)
    }

    /// Send a command that must succeed; the rest of its answer.
    pub fn ok(&mut self, line: &str) -> String {
        let a = self.send(line);
        assert!(
            a.starts_with("ok"),
            "nbd_repl ({}): {line:?} answered {a:?}",
            self.what
        );
        a[2..].trim().to_owned()
    }

    /// Send a command that must fail; its errno name.
    pub fn err(&mut self, line: &str) -> String {
        let a = self.send(line);
        assert!(
            a.starts_with("err"),
            "nbd_repl ({}): {line:?} should fail, answered {a:?}",
            self.what
        );
        a.split_whitespace().nth(1).unwrap_or("").to_owned()
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if wait_timeout_ref(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_timeout_ref(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The values of field `key` (`key=N`) on the "compaction pass committed" lines of a
/// daemon log, in order (lines without it are skipped).
pub fn pass_values<'a>(logs: &'a str, key: &'a str) -> impl Iterator<Item = u64> + 'a {
    let key = format!("{key}=");
    logs.lines()
        .filter(|l| l.contains("compaction pass committed"))
        .filter_map(move |l| {
            l.split_once(key.as_str())
                .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
        })
}

/// Committed compaction passes in a daemon log that defragmented the page index
/// (`fragments=N` with N > 0 on the "compaction pass committed" line).
pub fn defrag_passes(logs: &str) -> usize {
    pass_values(logs, "fragments").filter(|&n| n > 0).count()
}

/// A TCP relay to `upstream` that a test can cut and restore, to make a store unreachable
/// without touching the server (other tests share it). Cut: every relayed connection is
/// shut down and new ones are accepted and closed at once, as a client sees an endpoint
/// that is down; restore: connections are relayed again.
pub struct CutProxy {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CutProxy {
    /// Relay 127.0.0.1:`port` (free, chosen here) to `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str) -> CutProxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (up2, live2, stop2, upstream) =
            (up.clone(), live.clone(), stop.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut l = live2.lock().unwrap();
                    l.push(client.try_clone().unwrap());
                    l.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy {
            port,
            up,
            live,
            stop,
        }
    }

    /// `http://127.0.0.1:PORT`, for `--s3-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
