//! Real NBD clients (libnbd's nbdinfo and Python binding, qemu-io, qemu-img) against the
//! protocol layer, served in-process by `server::run` over in-memory exports — the same code
//! `examples/memserver.rs` runs, without depending on where cargo put the example binary.
//!
//! Each client that is not installed is skipped with a loud message rather than failing, so
//! the suite still runs on machines without qemu-utils / libnbd-bin / python3-libnbd. The
//! daemon's own end-to-end tests live elsewhere; this one stays small.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

mod pki;

use nbds3::nbd::mem::{MemExport, MemProvider};
use nbds3::nbd::server::{self, Listener, ServerLimits};
use nbds3::nbd::tls::{self, TlsConfig, TlsMode};
use tokio::process::Command;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// libnbd's Python module is installed for Debian's python, not a pyenv shim's.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

struct Served {
    tcp: String,
    unix: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Served {
    serve_with(None).await
}

async fn serve_with(tls: Option<TlsConfig>) -> Served {
    let provider = MemProvider::new()
        .with_export("disk", MemExport::new(1 << 30, 4096))
        .with_export("ro", MemExport::new(64 << 20, 4096).with_read_only(true));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("nbd.sock");
    let unix_listener = tokio::net::UnixListener::bind(&unix).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        vec![Listener::Tcp(tcp), Listener::Unix(unix_listener)],
        Arc::new(provider),
        ServerLimits {
            tls,
            ..ServerLimits::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    Served {
        tcp: format!("nbd://{addr}"),
        unix,
        stop: Some(stop),
        server,
        _dir: dir,
    }
}

impl Served {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// Whether `program` runs at all; prints a loud notice when it does not.
async fn available(program: &str, args: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(args)
        .output()
        .await
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("\n*** SKIPPING: `{program}` is not available; real-client check not run ***\n");
    }
    ok
}

/// Run a client that may fail; its output either way.
async fn try_run(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(CLIENT_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

async fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(CLIENT_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_and_maps() {
    if !available("nbdinfo", &["--version"]).await {
        return;
    }
    let s = serve().await;
    let list = stdout(&run("nbdinfo", &["--list", &s.tcp]).await);
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"ro\""),
        "{list}"
    );
    assert!(list.contains("base:allocation"), "{list}");
    assert!(list.contains("block_size_maximum: 33554432"), "{list}");
    let map = stdout(&run("nbdinfo", &["--map", &format!("{}/disk", s.tcp)]).await);
    assert!(map.contains("hole,zero"), "{map}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_and_qemu_img() {
    if !available("qemu-io", &["--version"]).await || !available("qemu-img", &["--version"]).await {
        return;
    }
    let s = serve().await;
    let uri = format!("{}/disk", s.tcp);
    // qemu ≥ 8.2 asks for extended headers first, and gets them.
    let cmds = [
        "write -P 0x55 0 64k",
        "write -P 0xaa 1M 4k",
        "write -z 2M 1M",
        "discard 0 4k",
        "read -P 0 0 4k",
        "read -P 0x55 4k 60k",
        "read -P 0xaa 1M 4k",
        "read -P 0 2M 1M",
        "flush",
    ];
    let mut args = vec!["-f", "raw", "-t", "writeback"];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    let out = run("qemu-io", &args).await;
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    // Default cache mode: FUA on every write.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 8M 128k",
            "-c",
            "read -P 0x11 8M 128k",
            &uri,
        ],
    )
    .await;
    assert!(!stdout(&out).contains("Pattern verification failed"));
    // Extended headers, explicitly: qemu ≥ 8.2 asks (option 11) and gets them, so every
    // command above went out in 32-byte headers and came back in extended chunks. Older
    // qemu never asks; then this run covered compact headers only.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "--trace",
            "nbd_receive_option_reply",
            "-c",
            "read -P 0xaa 1M 4k",
            &uri,
        ],
    )
    .await;
    let trace = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = trace.lines().find(|l| l.contains("option reply 11")) {
        assert!(line.contains("(ack)"), "{line}");
        assert!(!stdout(&out).contains("Pattern verification failed"));
        // Block status through BLOCK_STATUS_EXT: data exactly where it was written.
        let map = stdout(&run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]).await);
        let data: Vec<&str> = map
            .lines()
            .filter(|l| l.contains("\"data\": true"))
            .collect();
        assert!(
            data.iter()
                .any(|l| l.contains("\"start\": 4096, \"length\": 61440")),
            "{map}"
        );
        assert!(
            data.iter()
                .any(|l| l.contains("\"start\": 1048576, \"length\": 4096")),
            "{map}"
        );
        // qemu-nbd --list reads what INFO advertises under extended headers: 64-bit
        // transactions and block status payloads.
        let socket = s.unix.to_string_lossy().into_owned();
        let list = stdout(&run("qemu-nbd", &["--list", "-k", &socket]).await);
        assert!(list.contains("transaction size: 64-bit"), "{list}");
        assert!(list.contains("block-status-payload"), "{list}");
        assert!(list.contains("base:allocation"), "{list}");
    } else {
        eprintln!("note: this qemu does not request extended headers; they were not exercised");
    }
    let info = stdout(&run("qemu-img", &["info", "--output=json", &uri]).await);
    assert!(info.contains("\"virtual-size\": 1073741824"), "{info}");
    // The Unix socket serves the same export.
    let unix_uri = format!("nbd+unix:///disk?socket={}", s.unix.display());
    let out = run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xaa 1M 4k", &unix_uri],
    )
    .await;
    assert!(!stdout(&out).contains("Pattern verification failed"));
    s.stop().await;
}

const NBDSH_SCRIPT: &str = r#"
import errno, sys
import nbd

uri, ro_uri = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_df() and h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn() and not h.is_rotational()
size = h.get_size()
M = 1 << 20
h.pwrite(b"\x5a" * 65536, M, nbd.CMD_FLAG_FUA)
assert h.pread(65536, M) == b"\x5a" * 65536

chunks = []
def chunk(sub, off, status, err):
    chunks.append((off, len(sub), status))
    return 0
buf = h.pread_structured(131072, M + 32768, chunk, nbd.CMD_FLAG_DF)
assert buf[:32768] == b"\x5a" * 32768 and buf[32768:] == bytes(98304)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA, chunks
chunks.clear()
h.pread_structured(131072, M + 32768, chunk)
assert [c[2] for c in chunks] == [nbd.READ_DATA, nbd.READ_HOLE], chunks

ext = []
def extent(meta, off, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        ext.append(list(entries))
    return 0
h.block_status(4 * M, 0, extent)
assert ext[-1][:4] == [M, 3, 65536, 0], ext
h.block_status(4 * M, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert ext[-1] == [M, 3], ext
h.zero(65536, 2 * M, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
h.block_status(65536, 2 * M, extent, nbd.CMD_FLAG_REQ_ONE)
assert ext[-1] == [65536, 2], ext
h.trim(65536, 2 * M, nbd.CMD_FLAG_FUA)
h.block_status(65536, 2 * M, extent, nbd.CMD_FLAG_REQ_ONE)
assert ext[-1] == [65536, 3], ext
h.cache(65536, 0)
h.flush()

h.set_strict_mode(0)  # let these reach the server
for f, want in [(lambda: h.pread(4096, size), errno.EINVAL),
                (lambda: h.pwrite(b"x" * 4096, size - 1), errno.ENOSPC),
                (lambda: h.zero(4096, size), errno.ENOSPC),
                (lambda: h.trim(4096, size), errno.EINVAL)]:
    try:
        f()
        raise SystemExit("expected an error")
    except nbd.Error as e:
        assert e.errno == errno.errorcode[want], (e.errno, want, e.string)

cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
for i in range(64):
    assert h.pread(4096, i * 4096) == bytes([i]) * 4096

h2 = nbd.NBD()
h2.connect_uri(uri)
assert h2.pread(4096, 63 * 4096) == bytes([63]) * 4096
h2.shutdown()
h.shutdown()

h3 = nbd.NBD()
h3.connect_uri(ro_uri)
h3.set_strict_mode(0)
assert h3.is_read_only()
try:
    h3.pwrite(b"x" * 512, 0)
    raise SystemExit("expected EPERM")
except nbd.Error as e:
    assert e.errno == "EPERM", e.errno
h3.shutdown()
print("nbdsh script ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_python_script() {
    if !Path::new(SYSTEM_PYTHON).exists() || !available(SYSTEM_PYTHON, &["-c", "import nbd"]).await
    {
        return;
    }
    let s = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("smoke.py");
    std::fs::write(&script, NBDSH_SCRIPT).unwrap();
    let script = script.display().to_string();
    let out = run(
        SYSTEM_PYTHON,
        &[
            &script,
            &format!("{}/disk", s.tcp),
            &format!("{}/ro", s.tcp),
        ],
    )
    .await;
    assert!(stdout(&out).contains("nbdsh script ok"));
    s.stop().await;
}

/// The TCP port of a served `nbd://127.0.0.1:PORT` address.
fn port(s: &Served) -> &str {
    s.tcp.rsplit(':').next().unwrap()
}

/// `qemu-io` over TLS with the x509 client credentials in `dir`.
async fn qemu_io_tls(port: &str, dir: &Path, cmds: &[&str]) -> Output {
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0"
    );
    let mut args = vec!["--object", &object, "--image-opts", "-t", "writeback"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&image);
    try_run("qemu-io", &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_over_tls() {
    if !pki::available()
        || !available("nbdinfo", &["--version"]).await
        || !available("nbdcopy", &["--version"]).await
        || !available("qemu-io", &["--version"]).await
    {
        return;
    }
    let pki = pki::make();
    let config = tls::load(&pki.server_cert, &pki.server_key, None, TlsMode::Require).unwrap();
    let s = serve_with(Some(config)).await;
    let tls_uri = |export: &str, dir: &Path| {
        format!(
            "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
            port(&s),
            dir.display()
        )
    };
    let info = stdout(&run("nbdinfo", &[&tls_uri("disk", &pki.client_anon)]).await);
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 1073741824"), "{info}");
    // Plain connections get nothing: not even the export list.
    let plain = try_run("nbdinfo", &[&format!("{}/disk", s.tcp)]).await;
    assert!(!plain.status.success(), "{}", stdout(&plain));
    let plain = try_run("nbdinfo", &["--list", &s.tcp]).await;
    assert!(!plain.status.success(), "{}", stdout(&plain));
    // qemu: writes and reads back a pattern over TLS (extended headers inside TLS).
    let out = qemu_io_tls(
        port(&s),
        &pki.client_anon,
        &["write -P 0x77 1M 64k", "flush", "read -P 0x77 1M 64k"],
    )
    .await;
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // nbdcopy: 4 MiB of varied bytes in and out over TLS, byte for byte.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let bytes: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &bytes).unwrap();
    let uri = tls_uri("disk", &pki.client_anon);
    run("nbdcopy", &[src.to_str().unwrap(), &uri]).await;
    // (nbdcopy reads the whole export: 1 GiB, mostly holes.)
    run("nbdcopy", &[&uri, back.to_str().unwrap()]).await;
    let got = std::fs::read(&back).unwrap();
    assert_eq!(&got[..bytes.len()], &bytes[..]);
    // A client that does not trust the server's CA refuses the connection.
    let wrong = try_run("nbdinfo", &[&tls_uri("disk", &pki::make().client_anon)]).await;
    assert!(!wrong.status.success());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_and_optional_tls() {
    if !pki::available() || !available("nbdinfo", &["--version"]).await {
        return;
    }
    let pki = pki::make();
    // Mutual TLS: only clients with a certificate from the configured CA get in.
    let config = tls::load(
        &pki.server_cert,
        &pki.server_key,
        Some(&pki.ca_cert),
        TlsMode::Require,
    )
    .unwrap();
    let s = serve_with(Some(config)).await;
    let uri = |s: &Served, dir: &Path| {
        format!(
            "nbds://127.0.0.1:{}/disk?tls-certificates={}",
            port(s),
            dir.display()
        )
    };
    let ok = stdout(&run("nbdinfo", &[&uri(&s, &pki.client_cert)]).await);
    assert!(ok.contains("with TLS"), "{ok}");
    for dir in [&pki.client_anon, &pki.client_stranger] {
        let out = try_run("nbdinfo", &[&uri(&s, dir)]).await;
        assert!(!out.status.success(), "{}: {}", dir.display(), stdout(&out));
    }
    s.stop().await;

    // Allow mode: plain and TLS clients both served, on TCP and on the Unix socket.
    let config = tls::load(&pki.server_cert, &pki.server_key, None, TlsMode::Allow).unwrap();
    let s = serve_with(Some(config)).await;
    let plain = stdout(&run("nbdinfo", &[&format!("{}/disk", s.tcp)]).await);
    assert!(plain.contains("without TLS"), "{plain}");
    let secure = stdout(&run("nbdinfo", &[&uri(&s, &pki.client_anon)]).await);
    assert!(secure.contains("with TLS"), "{secure}");
    let unix = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}&tls-hostname=localhost",
        s.unix.display(),
        pki.client_anon.display()
    );
    let out = try_run("nbdinfo", &[&unix]).await;
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("with TLS"), "{text}");
    s.stop().await;
}
