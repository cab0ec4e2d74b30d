//! NBD sessions over `tokio::io::duplex`, driven by a small hand-written client that encodes
//! and decodes bytes itself (its own constants, not `nbd::proto`'s, so a codec mistake cannot
//! hide in both ends). The export is the in-memory double `nbd::mem::MemExport`: sparse,
//! hole-tracking, with injectable errors and per-offset delays.
//!
//! Also drives `server::run` over real TCP and Unix sockets (limits, shutdown).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nbds3::nbd::mem::{MemExport, MemProvider, Op};
use nbds3::nbd::server::{self, Listener, ServerLimits};
use nbds3::nbd::session::{self, SessionConfig, SessionEnd, SessionError, Shutdown};
use nbds3::nbd::{BlockExport, Errno, ExportError, ExportProvider, ReadChunk};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

// ---- the client's own view of the protocol ------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

const C_FIXED: u32 = 1;
const C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED: u32 = 8;
const OPT_LIST_META: u32 = 9;
const OPT_SET_META: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META: u32 = 4;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_UNKNOWN: u32 = 0x8000_0006;
const ERR_TOO_BIG: u32 = 0x8000_0009;
const ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

const T_HAS_FLAGS: u16 = 1;
const T_READ_ONLY: u16 = 2;
const T_FLUSH: u16 = 4;
const T_FUA: u16 = 8;
const T_ROTATIONAL: u16 = 16;
const T_TRIM: u16 = 32;
const T_ZEROES: u16 = 64;
const T_DF: u16 = 128;
const T_MULTI_CONN: u16 = 256;
const T_CACHE: u16 = 1024;
const T_FAST_ZERO: u16 = 2048;
const T_BLOCK_STAT_PAYLOAD: u16 = 4096;

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;

const F_FUA: u16 = 1;
const F_NO_HOLE: u16 = 2;
const F_DF: u16 = 4;
const F_REQ_ONE: u16 = 8;
const F_FAST_ZERO: u16 = 16;
const F_PAYLOAD_LEN: u16 = 32;

const CH_NONE: u16 = 0;
const CH_DATA: u16 = 1;
const CH_HOLE: u16 = 2;
const CH_BLOCK_STATUS: u16 = 5;
const CH_BLOCK_STATUS_EXT: u16 = 6;
const CH_ERROR: u16 = 0x8001;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const MIB: u64 = 1024 * 1024;
const DISK_BYTES: u64 = 16 * MIB;
const MAX_REQ: u32 = 32 * 1024 * 1024;

struct Client {
    s: DuplexStream,
    /// Extended headers negotiated: 32-byte requests, and only extended reply chunks.
    extended: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    /// The request offset an extended chunk echoes (`None` in a compact chunk).
    offset: Option<u64>,
    payload: Vec<u8>,
}

#[derive(Debug)]
enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk(Chunk),
}

impl Client {
    async fn u16(&mut self) -> u16 {
        self.s.read_u16().await.expect("read u16")
    }
    async fn u32(&mut self) -> u32 {
        self.s.read_u32().await.expect("read u32")
    }
    async fn u64(&mut self) -> u64 {
        self.s.read_u64().await.expect("read u64")
    }
    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).await.expect("read bytes");
        v
    }
    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("send");
    }

    /// Read the greeting and answer with `flags`.
    async fn greet(&mut self, flags: u32) -> u16 {
        assert_eq!(self.u64().await, NBDMAGIC);
        assert_eq!(self.u64().await, IHAVEOPT);
        let hflags = self.u16().await;
        self.send(&flags.to_be_bytes()).await;
        hflags
    }

    async fn opt(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m).await;
    }

    async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64().await, REPLY_MAGIC);
        let option = self.u32().await;
        let kind = self.u32().await;
        let len = self.u32().await as usize;
        (option, kind, self.bytes(len).await)
    }

    /// All replies to one option, up to and including the final ACK or error.
    async fn opt_replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (o, kind, data) = self.opt_reply().await;
            assert_eq!(o, option, "reply for another option");
            let last = kind == REP_ACK || kind & 0x8000_0000 != 0;
            out.push((kind, data));
            if last {
                return out;
            }
        }
    }

    async fn final_reply(&mut self, option: u32, data: &[u8]) -> u32 {
        self.opt(option, data).await;
        self.opt_replies(option).await.last().expect("a reply").0
    }

    /// NBD_OPT_INFO/GO; returns every reply.
    async fn info(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<(u32, Vec<u8>)> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.opt(option, &d).await;
        self.opt_replies(option).await
    }

    /// NBD_OPT_GO that must succeed; returns (size, transmission flags).
    async fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info(OPT_GO, name, &[3]).await;
        assert_eq!(replies.last().map(|r| r.0), Some(REP_ACK), "{replies:?}");
        let export = replies
            .iter()
            .find(|(k, d)| *k == REP_INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let d = &export.1;
        assert_eq!(d.len(), 12);
        (
            u64::from_be_bytes(d[2..10].try_into().unwrap()),
            u16::from_be_bytes(d[10..12].try_into().unwrap()),
        )
    }

    async fn meta(&mut self, option: u32, export: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.opt(option, &d).await;
        self.opt_replies(option).await
    }

    async fn req(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.req64(flags, cmd, cookie, offset, len.into()).await;
    }

    /// A request in the negotiated header form (a 64-bit length needs extended headers).
    async fn req64(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64) {
        let mut m = Vec::with_capacity(32);
        let magic = if self.extended {
            EXT_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        m.extend_from_slice(&magic.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            m.extend_from_slice(&len.to_be_bytes());
        } else {
            m.extend_from_slice(&u32::try_from(len).expect("compact length").to_be_bytes());
        }
        self.send(&m).await;
    }

    async fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.req64(flags, WRITE, cookie, offset, data.len() as u64)
            .await;
        self.send(data).await;
    }

    async fn reply(&mut self) -> Reply {
        let magic = self.u32().await;
        assert_eq!(
            magic == EXT_REPLY_MAGIC,
            self.extended,
            "reply magic {magic:#x} does not match the negotiated headers"
        );
        match magic {
            EXT_REPLY_MAGIC => {
                let flags = self.u16().await;
                let kind = self.u16().await;
                let cookie = self.u64().await;
                let offset = self.u64().await;
                let len = self.u64().await as usize;
                Reply::Chunk(Chunk {
                    flags,
                    kind,
                    cookie,
                    offset: Some(offset),
                    payload: self.bytes(len).await,
                })
            }
            SIMPLE_MAGIC => Reply::Simple {
                error: self.u32().await,
                cookie: self.u64().await,
            },
            STRUCTURED_MAGIC => {
                let flags = self.u16().await;
                let kind = self.u16().await;
                let cookie = self.u64().await;
                let len = self.u32().await as usize;
                Reply::Chunk(Chunk {
                    flags,
                    kind,
                    cookie,
                    offset: None,
                    payload: self.bytes(len).await,
                })
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// A non-READ reply: (cookie, error) whether simple or a structured error/NONE chunk.
    async fn status(&mut self) -> (u64, u32) {
        match self.reply().await {
            Reply::Simple { error, cookie } => (cookie, error),
            Reply::Chunk(c) => {
                assert_eq!(c.flags & 1, 1, "single-chunk reply must be final");
                match c.kind {
                    CH_NONE => (c.cookie, 0),
                    CH_ERROR => {
                        let error = u32::from_be_bytes(c.payload[..4].try_into().unwrap());
                        let mlen = u16::from_be_bytes(c.payload[4..6].try_into().unwrap());
                        assert_eq!(c.payload.len(), 6 + mlen as usize);
                        (c.cookie, error)
                    }
                    k => panic!("unexpected chunk type {k}"),
                }
            }
        }
    }

    /// Chunks of one structured reply, up to the DONE flag; all must carry `cookie`.
    async fn chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let Reply::Chunk(c) = self.reply().await else {
                panic!("simple reply where a structured one is required");
            };
            assert_eq!(c.cookie, cookie, "chunks of different replies interleaved");
            let done = c.flags & 1 == 1;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// Simple-reply READ: (error, cookie, data — empty on error).
    async fn simple_read(&mut self, len: usize) -> (u32, u64, Vec<u8>) {
        let Reply::Simple { error, cookie } = self.reply().await else {
            panic!("structured reply without negotiation");
        };
        let data = if error == 0 {
            self.bytes(len).await
        } else {
            Vec::new()
        };
        (error, cookie, data)
    }

    /// Expect the server to close the connection.
    async fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b))
            .await
            .expect("server did not close")
            .unwrap_or(0);
        assert_eq!(n, 0, "expected end of stream");
    }
}

/// Reassemble a READ's structured reply, checking the chunks' own rules.
fn assemble(offset: u64, len: usize, chunks: &[Chunk]) -> Result<Vec<u8>, u32> {
    let mut out = vec![0xeeu8; len];
    let mut covered = 0usize;
    for c in chunks {
        match c.kind {
            CH_DATA => {
                let at = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                let data = &c.payload[8..];
                assert!(!data.is_empty());
                let start = (at - offset) as usize;
                out[start..start + data.len()].copy_from_slice(data);
                covered += data.len();
            }
            CH_HOLE => {
                assert_eq!(c.payload.len(), 12);
                let at = u64::from_be_bytes(c.payload[..8].try_into().unwrap());
                let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap()) as usize;
                assert!(n > 0);
                let start = (at - offset) as usize;
                out[start..start + n].fill(0);
                covered += n;
            }
            CH_NONE => assert!(c.payload.is_empty()),
            CH_ERROR => return Err(u32::from_be_bytes(c.payload[..4].try_into().unwrap())),
            k => panic!("unexpected chunk {k} in a read reply"),
        }
    }
    assert_eq!(
        covered, len,
        "content chunks must cover the request exactly"
    );
    Ok(out)
}

/// A BLOCK_STATUS_EXT chunk: context id and 64-bit (length, flags) descriptors.
fn extents64(chunk: &Chunk) -> (u32, Vec<(u64, u64)>) {
    assert_eq!(chunk.kind, CH_BLOCK_STATUS_EXT);
    let p = &chunk.payload;
    assert!(
        p.len() >= 24 && (p.len() - 8).is_multiple_of(16),
        "{}",
        p.len()
    );
    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
    let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert_eq!(count * 16, p.len() - 8, "descriptor count");
    let ext = p[8..]
        .chunks(16)
        .map(|e| {
            (
                u64::from_be_bytes(e[..8].try_into().unwrap()),
                u64::from_be_bytes(e[8..].try_into().unwrap()),
            )
        })
        .collect();
    (id, ext)
}

fn extents(chunk: &Chunk) -> (u32, Vec<(u32, u32)>) {
    assert_eq!(chunk.kind, CH_BLOCK_STATUS);
    let p = &chunk.payload;
    assert!(p.len() >= 12 && (p.len() - 4).is_multiple_of(8));
    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
    let ext = p[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    (id, ext)
}

// ---- fixtures -----------------------------------------------------------------------------

struct Fixture {
    client: Client,
    provider: Arc<MemProvider>,
    disk: Arc<MemExport>,
    session: JoinHandle<Result<SessionEnd, SessionError>>,
    trigger: tokio::sync::watch::Sender<bool>,
}

fn provider() -> Arc<MemProvider> {
    Arc::new(
        MemProvider::new()
            .with_export(
                "disk",
                MemExport::new(DISK_BYTES, 4096).with_description("test disk"),
            )
            .with_export("ro", MemExport::new(MIB, 512).with_read_only(true))
            .with_export("other", MemExport::new(MIB, 4096)),
    )
}

fn start_with(provider: Arc<MemProvider>, config: SessionConfig) -> Fixture {
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let (trigger, shutdown) = Shutdown::channel();
    let dyn_provider: Arc<dyn ExportProvider> = provider.clone();
    let session = tokio::spawn(session::serve_stream(
        server_end,
        dyn_provider,
        config,
        shutdown,
    ));
    let disk = provider.export("disk").expect("disk export");
    Fixture {
        client: Client {
            s: client_end,
            extended: false,
        },
        provider,
        disk,
        session,
        trigger,
    }
}

fn start() -> Fixture {
    start_with(provider(), SessionConfig::default())
}

/// Handshake to transmission on `name`; `structured` and `meta` pick the options first.
async fn ready(name: &str, structured: bool, meta: bool) -> (Fixture, u16) {
    ready_with(SessionConfig::default(), name, structured, meta).await
}

async fn ready_with(
    config: SessionConfig,
    name: &str,
    structured: bool,
    meta: bool,
) -> (Fixture, u16) {
    ready_on(provider(), config, name, structured, meta).await
}

/// [`ready_with`] on exports of the caller's.
async fn ready_on(
    provider: Arc<MemProvider>,
    config: SessionConfig,
    name: &str,
    structured: bool,
    meta: bool,
) -> (Fixture, u16) {
    let mut f = start_with(provider, config);
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    if structured {
        assert_eq!(f.client.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    }
    if meta {
        let r = f
            .client
            .meta(OPT_SET_META, name, &["base:allocation"])
            .await;
        assert_eq!(r.len(), 2, "{r:?}");
    }
    let (_, flags) = f.client.go(name).await;
    (f, flags)
}

async fn finish(f: Fixture) -> SessionEnd {
    let Fixture {
        mut client,
        session,
        ..
    } = f;
    client.req(0, DISC, 0, 0, 0).await;
    client.expect_eof().await;
    session.await.expect("session task").expect("session ok")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
        .collect()
}

// ---- handshake ----------------------------------------------------------------------------

#[tokio::test]
async fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let mut f = start();
    assert_eq!(f.client.greet(C_FIXED | C_NO_ZEROES).await, 3);
    f.client.opt(OPT_ABORT, &[]).await;
    assert_eq!(f.client.opt_reply().await.1, REP_ACK);
    f.client.expect_eof().await;
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Aborted);
}

#[tokio::test]
async fn unknown_client_flags_drop_the_connection() {
    let mut f = start();
    f.client.greet(C_FIXED | 0x10).await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::UnknownClientFlags { flags: 0x11 })
    ));
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    for (flags, extra) in [(C_FIXED, 124usize), (C_FIXED | C_NO_ZEROES, 0)] {
        let mut f = start();
        f.client.greet(flags).await;
        f.client.opt(OPT_EXPORT_NAME, b"disk").await;
        assert_eq!(f.client.u64().await, DISK_BYTES);
        let tflags = f.client.u16().await;
        assert_eq!(
            tflags,
            T_HAS_FLAGS
                | T_FLUSH
                | T_FUA
                | T_TRIM
                | T_ZEROES
                | T_MULTI_CONN
                | T_CACHE
                | T_FAST_ZERO
        );
        assert_eq!(f.client.bytes(extra).await, vec![0u8; extra]);
        // Transmission works right after: a simple-reply write.
        f.client.write(0, 9, 0, &[1, 2, 3]).await;
        assert_eq!(f.client.status().await, (9, 0));
        assert_eq!(f.provider.open_count("disk"), 1);
        assert_eq!(finish(f).await, SessionEnd::Disconnected);
    }
}

#[tokio::test]
async fn default_export_is_the_empty_name() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    let (size, _) = f.client.go("").await;
    assert_eq!(size, DISK_BYTES);
    let provider = Arc::clone(&f.provider);
    finish(f).await;
    assert_eq!(provider.open_count(""), 0);
}

#[tokio::test]
async fn export_name_for_unknown_export_disconnects() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    f.client.opt(OPT_EXPORT_NAME, b"nope").await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::ExportRefused { .. })
    ));
}

#[tokio::test]
async fn list_names_every_export() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    f.client.opt(OPT_LIST, &[]).await;
    let replies = f.client.opt_replies(OPT_LIST).await;
    let mut names = Vec::new();
    for (kind, data) in &replies[..replies.len() - 1] {
        assert_eq!(*kind, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "other", "ro"]);
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    // LIST with data is invalid; the session carries on.
    assert_eq!(f.client.final_reply(OPT_LIST, b"x").await, ERR_INVALID);
    f.client.go("disk").await;
    finish(f).await;
}

#[tokio::test]
async fn info_reports_export_block_size_name_and_description() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    let replies = f.client.info(OPT_INFO, "disk", &[1, 2, 3]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    let infos: Vec<&Vec<u8>> = replies
        .iter()
        .filter(|(k, _)| *k == REP_INFO)
        .map(|(_, d)| d)
        .collect();
    let find = |t: u16| {
        infos
            .iter()
            .find(|d| u16::from_be_bytes(d[..2].try_into().unwrap()) == t)
            .map(|d| d[2..].to_vec())
    };
    let export = find(0).expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        DISK_BYTES
    );
    assert_eq!(find(1).unwrap(), b"disk");
    assert_eq!(find(2).unwrap(), b"test disk");
    let bs = find(3).unwrap();
    let sizes: Vec<u32> = bs
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(sizes, [1, 4096, MAX_REQ]);
    // INFO opens and releases at once.
    assert_eq!(f.provider.open_count("disk"), 0);
    // The read-only export: preferred block size 512, READ_ONLY, no write features.
    let replies = f.client.info(OPT_INFO, "ro", &[]).await;
    let export = &replies.iter().find(|(k, _)| *k == REP_INFO).unwrap().1;
    let tflags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_eq!(tflags & (T_READ_ONLY | T_TRIM | T_ZEROES), T_READ_ONLY);
    assert_eq!(tflags & T_ROTATIONAL, 0);
    // Errors: unknown export, malformed request; then GO still works.
    let replies = f.client.info(OPT_INFO, "nope", &[]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, ERR_UNKNOWN);
    assert_eq!(
        f.client.final_reply(OPT_GO, &[0, 0, 0, 9, b'x']).await,
        ERR_INVALID
    );
    assert_eq!(
        f.client.final_reply(OPT_INFO, &[0, 0, 0, 0]).await,
        ERR_INVALID
    );
    let (_, tflags) = f.client.go("disk").await;
    assert_eq!(tflags & T_DF, 0, "DF only with structured replies");
    assert_eq!(f.provider.open_count("disk"), 1);
    let provider = Arc::clone(&f.provider);
    finish(f).await;
    assert_eq!(provider.open_count("disk"), 0);
}

#[tokio::test]
async fn unsupported_options_are_refused_and_parsing_continues() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    assert_eq!(f.client.final_reply(999, b"whatever").await, ERR_UNSUP);
    assert_eq!(f.client.final_reply(OPT_STARTTLS, &[]).await, ERR_UNSUP);
    assert_eq!(
        f.client.final_reply(OPT_STRUCTURED, b"x").await,
        ERR_INVALID
    );
    // Oversized option data is skipped and refused; the next option still parses.
    let big = vec![7u8; 64 * 1024 + 1];
    assert_eq!(f.client.final_reply(OPT_INFO, &big).await, ERR_TOO_BIG);
    assert_eq!(f.client.final_reply(12345, &big).await, ERR_UNSUP);
    assert_eq!(f.client.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    let (_, tflags) = f.client.go("disk").await;
    assert_eq!(tflags & T_DF, T_DF);
    finish(f).await;
}

#[tokio::test]
async fn export_name_longer_than_a_string_disconnects() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    f.client.opt(OPT_EXPORT_NAME, &vec![b'a'; 5000]).await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::ExportNameTooLong { length: 5000 })
    ));
}

#[tokio::test]
async fn meta_context_negotiation() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    // SET before structured replies is invalid.
    let r = f
        .client
        .meta(OPT_SET_META, "disk", &["base:allocation"])
        .await;
    assert_eq!(r.last().unwrap().0, ERR_INVALID);
    assert_eq!(f.client.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    let context = |r: &[(u32, Vec<u8>)]| -> Vec<(u32, String)> {
        r.iter()
            .filter(|(k, _)| *k == REP_META)
            .map(|(_, d)| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    String::from_utf8(d[4..].to_vec()).unwrap(),
                )
            })
            .collect()
    };
    // LIST: no queries = everything; "base:" is a wildcard; unknown namespaces are ignored.
    let r = f.client.meta(OPT_LIST_META, "disk", &[]).await;
    assert_eq!(context(&r), [(0, "base:allocation".to_owned())]);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let r = f.client.meta(OPT_LIST_META, "disk", &["base:"]).await;
    assert_eq!(context(&r), [(0, "base:allocation".to_owned())]);
    let r = f
        .client
        .meta(OPT_LIST_META, "disk", &["qemu:dirty-bitmap:a", "base:nope"])
        .await;
    assert_eq!(r, [(REP_ACK, vec![])]);
    // SET: "base:" selects nothing, an empty list selects nothing.
    let r = f.client.meta(OPT_SET_META, "disk", &["base:"]).await;
    assert_eq!(r, [(REP_ACK, vec![])]);
    let r = f.client.meta(OPT_SET_META, "disk", &[]).await;
    assert_eq!(r, [(REP_ACK, vec![])]);
    let r = f
        .client
        .meta(OPT_SET_META, "disk", &["x-foo:bar", "base:allocation"])
        .await;
    assert_eq!(context(&r), [(1, "base:allocation".to_owned())]);
    // Malformed: a query length past the end.
    let mut bad = Vec::new();
    bad.extend_from_slice(&4u32.to_be_bytes());
    bad.extend_from_slice(b"disk");
    bad.extend_from_slice(&1u32.to_be_bytes());
    bad.extend_from_slice(&100u32.to_be_bytes());
    bad.extend_from_slice(b"base:allocation");
    assert_eq!(f.client.final_reply(OPT_SET_META, &bad).await, ERR_INVALID);
    // That failed SET cleared the selection: BLOCK_STATUS is now refused.
    f.client.go("disk").await;
    f.client.req(0, BLOCK_STATUS, 1, 0, 4096).await;
    assert_eq!(f.client.status().await, (1, EINVAL));
    finish(f).await;
}

#[tokio::test]
async fn meta_context_for_another_export_does_not_apply() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    assert_eq!(f.client.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    let r = f
        .client
        .meta(OPT_SET_META, "other", &["base:allocation"])
        .await;
    assert_eq!(r.len(), 2);
    f.client.go("disk").await;
    f.client.req(0, BLOCK_STATUS, 1, 0, 4096).await;
    assert_eq!(f.client.status().await, (1, EINVAL));
    finish(f).await;
}

#[tokio::test]
async fn handshake_times_out() {
    let config = SessionConfig {
        handshake_timeout: Duration::from_millis(100),
        ..SessionConfig::default()
    };
    let mut f = start_with(provider(), config);
    f.client.greet(C_FIXED).await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::HandshakeTimeout(_))
    ));
}

#[tokio::test]
async fn client_closing_during_handshake_is_clean() {
    let mut f = start();
    f.client.greet(C_FIXED).await;
    drop(f.client);
    assert_eq!(
        f.session.await.unwrap().unwrap(),
        SessionEnd::ClosedInHandshake
    );
}

// ---- transmission: simple replies ---------------------------------------------------------

#[tokio::test]
async fn simple_replies_for_every_command() {
    let (mut f, flags) = ready("disk", false, false).await;
    assert_eq!(flags & T_DF, 0);
    let data = pattern(3, 12288);
    f.client.write(F_FUA, 1, 4096, &data).await;
    assert_eq!(f.client.status().await, (1, 0));
    f.client.req(0, READ, 2, 0, 20480).await;
    let (err, cookie, got) = f.client.simple_read(20480).await;
    assert_eq!((err, cookie), (0, 2));
    assert_eq!(&got[4096..16384], &data[..]);
    assert!(got[..4096].iter().chain(&got[16384..]).all(|&b| b == 0));
    f.client.req(F_FUA, FLUSH, 3, 0, 0).await;
    assert_eq!(f.client.status().await, (3, 0));
    f.client.req(F_FUA, TRIM, 4, 4096, 4096).await;
    assert_eq!(f.client.status().await, (4, 0));
    f.client
        .req(F_FUA | F_NO_HOLE | F_FAST_ZERO, ZEROES, 5, 8192, 100)
        .await;
    assert_eq!(f.client.status().await, (5, 0));
    f.client.req(F_FUA, CACHE, 6, 0, 65536).await;
    assert_eq!(f.client.status().await, (6, 0));
    f.client.req(0, READ, 7, 4096, 8192).await;
    let (_, _, got) = f.client.simple_read(8192).await;
    assert!(got[..4196].iter().all(|&b| b == 0));
    assert_eq!(&got[4196..], &data[4196..8192]);
    let stats = &f.disk.stats;
    assert_eq!(stats.flushes.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.fua_ops.load(Ordering::Relaxed),
        3,
        "write, trim, zeroes"
    );
    assert_eq!(stats.no_hole_zeroes.load(Ordering::Relaxed), 1);
    assert_eq!(stats.caches.load(Ordering::Relaxed), 1);
    // Block status needs structured replies and a context: refused.
    f.client.req(0, BLOCK_STATUS, 8, 0, 4096).await;
    assert_eq!(f.client.status().await, (8, EINVAL));
    // DF without structured replies: refused.
    f.client.req(F_DF, READ, 9, 0, 4096).await;
    assert_eq!(f.client.simple_read(4096).await.0, EINVAL);
    assert_eq!(finish(f).await, SessionEnd::Disconnected);
}

#[tokio::test]
async fn invalid_requests_get_errors_and_the_stream_stays_in_sync() {
    let (mut f, _) = ready("disk", false, false).await;
    let c = &mut f.client;
    let end = DISK_BYTES;
    // Reads past the end, or whose offset+len overflows: EINVAL.
    c.req(0, READ, 1, end - 4096, 8192).await;
    assert_eq!(c.simple_read(8192).await.0, EINVAL);
    c.req(0, READ, 2, u64::MAX - 10, 4096).await;
    assert_eq!(c.simple_read(4096).await.0, EINVAL);
    // Writes past the end: ENOSPC; the payload is consumed.
    c.write(0, 3, end - 10, &[9u8; 4096]).await;
    assert_eq!(c.status().await, (3, ENOSPC));
    c.write(0, 4, u64::MAX, &[9u8; 16]).await;
    assert_eq!(c.status().await, (4, ENOSPC));
    // Trim past the end: EINVAL; write zeroes past the end: ENOSPC.
    c.req(0, TRIM, 5, end, 1).await;
    assert_eq!(c.status().await, (5, EINVAL));
    c.req(0, ZEROES, 6, end - 1, 2).await;
    assert_eq!(c.status().await, (6, ENOSPC));
    c.req(0, CACHE, 7, end, 4096).await;
    assert_eq!(c.status().await, (7, EINVAL));
    // Flags not valid for the command; unknown command.
    c.req(F_NO_HOLE, READ, 8, 0, 512).await;
    assert_eq!(c.simple_read(512).await.0, EINVAL);
    c.write(F_REQ_ONE, 9, 0, &[1u8; 512]).await;
    assert_eq!(c.status().await, (9, EINVAL));
    c.req(0x8000, FLUSH, 10, 0, 0).await;
    assert_eq!(c.status().await, (10, EINVAL));
    c.req(0, 99, 11, 0, 0).await;
    assert_eq!(c.status().await, (11, EINVAL));
    // Oversized READ / CACHE: EINVAL. Oversized WRITE: EINVAL after its payload is skipped.
    c.req(0, READ, 12, 0, MAX_REQ + 1).await;
    assert_eq!(c.simple_read(0).await.0, EINVAL);
    c.req(0, CACHE, 13, 0, MAX_REQ + 1).await;
    assert_eq!(c.status().await, (13, EINVAL));
    let big = vec![0x42u8; MAX_REQ as usize + 1];
    c.write(0, 14, 0, &big).await;
    assert_eq!(c.status().await, (14, EINVAL));
    // Large TRIM / WRITE_ZEROES are fine (no payload; split for the export).
    c.req(0, ZEROES, 15, 0, DISK_BYTES as u32).await;
    assert_eq!(c.status().await, (15, 0));
    // Zero-length requests succeed without touching the export.
    c.write(0, 16, end, &[]).await;
    assert_eq!(c.status().await, (16, 0));
    c.req(0, READ, 17, end, 0).await;
    assert_eq!(c.simple_read(0).await, (0, 17, vec![]));
    c.req(0, TRIM, 18, 0, 0).await;
    assert_eq!(c.status().await, (18, 0));
    // After all that the stream is still in sync.
    c.write(0, 19, 0, b"ok").await;
    assert_eq!(c.status().await, (19, 0));
    c.req(0, READ, 20, 0, 2).await;
    assert_eq!(c.simple_read(2).await, (0, 20, b"ok".to_vec()));
    assert_eq!(f.disk.stats.writes.load(Ordering::Relaxed), 1);
    finish(f).await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm() {
    let (mut f, flags) = ready("ro", false, false).await;
    assert_eq!(flags & T_READ_ONLY, T_READ_ONLY);
    f.client.write(0, 1, 0, &[1u8; 512]).await;
    assert_eq!(f.client.status().await, (1, EPERM));
    f.client.req(0, TRIM, 2, 0, 512).await;
    assert_eq!(f.client.status().await, (2, EPERM));
    f.client.req(0, ZEROES, 3, 0, 512).await;
    assert_eq!(f.client.status().await, (3, EPERM));
    f.client.req(0, READ, 4, 0, 512).await;
    assert_eq!(f.client.simple_read(512).await.0, 0);
    f.client.req(0, FLUSH, 5, 0, 0).await;
    assert_eq!(f.client.status().await, (5, 0));
    finish(f).await;
}

#[tokio::test]
async fn export_errors_become_error_replies() {
    let (mut f, _) = ready("disk", false, false).await;
    f.disk.set_fail(Some(Op::Write), Errno::Io);
    f.client.write(0, 1, 0, &[1u8; 512]).await;
    assert_eq!(f.client.status().await, (1, EIO));
    f.disk.set_fail(Some(Op::Read), Errno::Io);
    f.client.req(0, READ, 2, 0, 512).await;
    // Simple replies: error, and no payload follows.
    assert_eq!(f.client.simple_read(512).await, (EIO, 2, vec![]));
    f.disk.set_fail(Some(Op::Flush), Errno::NoSpc);
    f.client.req(0, FLUSH, 3, 0, 0).await;
    assert_eq!(f.client.status().await, (3, ENOSPC));
    f.disk.clear_faults();
    f.client.req(0, READ, 4, 0, 512).await;
    assert_eq!(f.client.simple_read(512).await.0, 0);
    finish(f).await;
}

// ---- transmission: structured replies -----------------------------------------------------

#[tokio::test]
async fn structured_reads_use_data_and_hole_chunks() {
    let (mut f, flags) = ready("disk", true, true).await;
    assert_eq!(flags & T_DF, T_DF);
    let data = pattern(5, 8192);
    f.client.write(0, 1, 8192, &data).await;
    assert_eq!(f.client.status().await, (1, 0));
    // 0..8192 hole, 8192..16384 data, 16384..24576 hole.
    f.client.req(0, READ, 2, 0, 24576).await;
    let chunks = f.client.chunks(2).await;
    let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [CH_HOLE, CH_DATA, CH_HOLE]);
    assert!(chunks[..2].iter().all(|c| c.flags & 1 == 0));
    let got = assemble(0, 24576, &chunks).unwrap();
    assert_eq!(&got[8192..16384], &data[..]);
    assert!(got[..8192].iter().chain(&got[16384..]).all(|&b| b == 0));
    // DF: exactly one content chunk, holes written out as zeros.
    f.client.req(F_DF, READ, 3, 4096, 16384).await;
    let chunks = f.client.chunks(3).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, CH_DATA);
    assert_eq!(assemble(4096, 16384, &chunks).unwrap(), got[4096..20480]);
    // DF over pure hole: one hole chunk.
    f.client.req(F_DF, READ, 4, 65536, 65536).await;
    let chunks = f.client.chunks(4).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, CH_HOLE);
    // Zero-length read: a lone NONE chunk.
    f.client.req(0, READ, 5, 0, 0).await;
    let chunks = f.client.chunks(5).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!((chunks[0].kind, chunks[0].flags), (CH_NONE, 1));
    // Read errors (even early EINVAL) are structured error chunks.
    f.client.req(0, READ, 6, DISK_BYTES, 1).await;
    let chunks = f.client.chunks(6).await;
    assert_eq!(assemble(DISK_BYTES, 1, &chunks), Err(EINVAL));
    f.disk.set_fail(Some(Op::Read), Errno::Io);
    f.client.req(0, READ, 7, 0, 4096).await;
    let chunks = f.client.chunks(7).await;
    assert_eq!(assemble(0, 4096, &chunks), Err(EIO));
    let mlen = u16::from_be_bytes(chunks[0].payload[4..6].try_into().unwrap());
    assert!(mlen > 0, "error chunks carry a message");
    finish(f).await;
}

#[tokio::test]
async fn block_status_reports_allocation() {
    let (mut f, _) = ready("disk", true, true).await;
    f.client.write(0, 1, 4096, &pattern(1, 4096)).await;
    assert_eq!(f.client.status().await, (1, 0));
    f.client.req(F_NO_HOLE, ZEROES, 2, 8192, 8192).await;
    assert_eq!(f.client.status().await, (2, 0));
    f.client.req(0, BLOCK_STATUS, 3, 0, 32768).await;
    let chunks = f.client.chunks(3).await;
    assert_eq!(chunks.len(), 1);
    let (id, ext) = extents(&chunks[0]);
    assert_eq!(id, 1);
    assert_eq!(ext, [(4096, 3), (4096, 0), (8192, 2), (16384, 3)]);
    // REQ_ONE: one extent, no longer than the request.
    f.client.req(F_REQ_ONE, BLOCK_STATUS, 4, 16384, 1000).await;
    let (_, ext) = extents(&f.client.chunks(4).await[0]);
    assert_eq!(ext, [(1000, 3)]);
    // Without REQ_ONE the last extent may not run past the end of the export.
    f.client
        .req(0, BLOCK_STATUS, 5, DISK_BYTES - 4096, 4096)
        .await;
    let (_, ext) = extents(&f.client.chunks(5).await[0]);
    assert_eq!(ext, [(4096, 3)]);
    // Errors: past the end, zero length, bad flag.
    f.client.req(0, BLOCK_STATUS, 6, DISK_BYTES, 1).await;
    assert_eq!(f.client.status().await, (6, EINVAL));
    f.client.req(0, BLOCK_STATUS, 7, 0, 0).await;
    assert_eq!(f.client.status().await, (7, EINVAL));
    f.client.req(F_DF, BLOCK_STATUS, 8, 0, 512).await;
    assert_eq!(f.client.status().await, (8, EINVAL));
    // A whole-device query (longer than the export contract) still answers.
    f.client.req(0, BLOCK_STATUS, 9, 0, DISK_BYTES as u32).await;
    let (_, ext) = extents(&f.client.chunks(9).await[0]);
    assert_eq!(ext.iter().map(|e| u64::from(e.0)).sum::<u64>(), DISK_BYTES);
    finish(f).await;
}

// ---- extended headers ---------------------------------------------------------------------

/// `provider()`'s disk plus an 8 GiB sparse export, for lengths past 4 GiB.
fn big_provider() -> Arc<MemProvider> {
    Arc::new(
        MemProvider::new()
            .with_export("disk", MemExport::new(DISK_BYTES, 4096))
            .with_export("big", MemExport::new(8 << 30, 4096)),
    )
}

/// Handshake with extended headers (no separate structured-reply option: they include
/// it), `base:allocation` when `meta`, then GO on `name`.
async fn ready_extended(provider: Arc<MemProvider>, name: &str, meta: bool) -> (Fixture, u16) {
    let mut f = start_with(provider, SessionConfig::default());
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    assert_eq!(
        f.client.final_reply(OPT_EXTENDED_HEADERS, &[]).await,
        REP_ACK
    );
    if meta {
        let r = f
            .client
            .meta(OPT_SET_META, name, &["base:allocation"])
            .await;
        assert_eq!(r.len(), 2, "{r:?}");
    }
    let (_, flags) = f.client.go(name).await;
    f.client.extended = true;
    (f, flags)
}

#[tokio::test]
async fn extended_headers_are_negotiated_as_the_spec_says() {
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    assert_eq!(
        f.client.final_reply(OPT_EXTENDED_HEADERS, b"x").await,
        ERR_INVALID
    );
    // Structured replies first, then the upgrade: allowed.
    assert_eq!(f.client.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    assert_eq!(
        f.client.final_reply(OPT_EXTENDED_HEADERS, &[]).await,
        REP_ACK
    );
    assert_eq!(
        f.client.final_reply(OPT_EXTENDED_HEADERS, &[]).await,
        ERR_INVALID
    );
    // Back to compact headers: refused with the spec's own error.
    assert_eq!(
        f.client.final_reply(OPT_STRUCTURED, &[]).await,
        ERR_EXT_HEADER_REQD
    );
    let r = f
        .client
        .meta(OPT_SET_META, "disk", &["base:allocation"])
        .await;
    assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
    let (_, tflags) = f.client.go("disk").await;
    assert_eq!(tflags & T_DF, T_DF);
    f.client.extended = true;
    // Every reply is an extended chunk, even a plain success (no simple replies).
    f.client.req(0, FLUSH, 1, 0, 0).await;
    let Reply::Chunk(c) = f.client.reply().await else {
        panic!("simple reply with extended headers");
    };
    assert_eq!(
        (c.kind, c.flags, c.cookie, c.offset),
        (CH_NONE, 1, 1, Some(0))
    );
    assert!(c.payload.is_empty());
    assert_eq!(finish(f).await, SessionEnd::Disconnected);
}

#[tokio::test]
async fn extended_headers_serve_every_command() {
    let (mut f, tflags) = ready_extended(big_provider(), "disk", true).await;
    assert_eq!(tflags & T_DF, T_DF);
    let data = pattern(3, 8192);
    f.client.write(F_FUA, 1, 4096, &data).await;
    assert_eq!(f.client.status().await, (1, 0));
    // PAYLOAD_LEN is redundant on a WRITE, and allowed there.
    f.client.write(F_PAYLOAD_LEN, 2, 65536, &data[..4096]).await;
    assert_eq!(f.client.status().await, (2, 0));
    // Hole, data, hole: every chunk echoes the request's offset in its header.
    f.client.req(0, READ, 3, 0, 16384).await;
    let chunks = f.client.chunks(3).await;
    assert!(chunks.iter().all(|c| c.offset == Some(0)), "{chunks:?}");
    assert!(chunks.iter().any(|c| c.kind == CH_HOLE), "{chunks:?}");
    let mut want = vec![0u8; 16384];
    want[4096..12288].copy_from_slice(&data);
    assert_eq!(assemble(0, 16384, &chunks), Ok(want));
    f.client.req(F_DF, READ, 4, 65536, 4096).await;
    let chunks = f.client.chunks(4).await;
    assert_eq!(chunks[0].offset, Some(65536));
    assert_eq!(assemble(65536, 4096, &chunks), Ok(data[..4096].to_vec()));
    f.client.req(0, TRIM, 5, 4096, 4096).await;
    assert_eq!(f.client.status().await, (5, 0));
    f.client.req(F_NO_HOLE, ZEROES, 6, MIB, 8192).await;
    assert_eq!(f.client.status().await, (6, 0));
    f.client.req(0, CACHE, 7, 0, 65536).await;
    assert_eq!(f.client.status().await, (7, 0));
    f.client.req(0, FLUSH, 8, 0, 0).await;
    assert_eq!(f.client.status().await, (8, 0));
    // Block status is BLOCK_STATUS_EXT (64-bit descriptors) and nothing else.
    f.client.req(0, BLOCK_STATUS, 9, 0, 16384).await;
    let chunks = f.client.chunks(9).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].offset, Some(0));
    let (id, ext) = extents64(&chunks[0]);
    assert_eq!(id, 1);
    assert_eq!(ext, [(8192, 3), (4096, 0), (4096, 3)]);
    f.client.req(F_REQ_ONE, BLOCK_STATUS, 10, MIB, 1000).await;
    let (_, ext) = extents64(&f.client.chunks(10).await[0]);
    assert_eq!(ext, [(1000, 2)]);
    // Errors are extended error chunks.
    f.client.req(0, READ, 11, DISK_BYTES, 4096).await;
    let chunks = f.client.chunks(11).await;
    assert_eq!(chunks[0].offset, Some(DISK_BYTES));
    assert_eq!(assemble(DISK_BYTES, 4096, &chunks), Err(EINVAL));
    f.client.write(0, 12, DISK_BYTES, &data[..512]).await;
    assert_eq!(f.client.status().await, (12, ENOSPC));
    finish(f).await;
}

#[tokio::test]
async fn extended_headers_carry_lengths_past_4_gib() {
    const GIB: u64 = 1 << 30;
    let (mut f, _) = ready_extended(big_provider(), "big", true).await;
    f.client.write(0, 1, 5 * GIB, &pattern(9, 4096)).await;
    assert_eq!(f.client.status().await, (1, 0));
    // Block status over 6 GiB: answered, covering at most what was asked.
    f.client.req64(0, BLOCK_STATUS, 2, 0, 6 * GIB).await;
    let (_, ext) = extents64(&f.client.chunks(2).await[0]);
    let covered: u64 = ext.iter().map(|e| e.0).sum();
    assert!(covered > 0 && covered <= 6 * GIB, "{ext:?}");
    // One TRIM of 6 GiB reaches the block at 5 GiB.
    f.client.req64(0, TRIM, 3, 0, 6 * GIB).await;
    assert_eq!(f.client.status().await, (3, 0));
    f.client.req(0, READ, 4, 5 * GIB, 4096).await;
    let chunks = f.client.chunks(4).await;
    assert_eq!(assemble(5 * GIB, 4096, &chunks), Ok(vec![0; 4096]));
    f.client
        .req64(F_REQ_ONE, BLOCK_STATUS, 5, 5 * GIB, 4096)
        .await;
    let (_, ext) = extents64(&f.client.chunks(5).await[0]);
    assert_eq!(ext, [(4096, 3)]);
    // WRITE_ZEROES of 5 GiB; one reaching past the end is ENOSPC.
    f.client.req64(0, ZEROES, 6, GIB, 5 * GIB).await;
    assert_eq!(f.client.status().await, (6, 0));
    f.client.req64(0, ZEROES, 7, 4 * GIB, 5 * GIB).await;
    assert_eq!(f.client.status().await, (7, ENOSPC));
    // READ and CACHE stay within the advertised 32 MiB.
    f.client
        .req64(0, READ, 8, 0, u64::from(MAX_REQ) + 4096)
        .await;
    assert_eq!(assemble(0, 0, &f.client.chunks(8).await), Err(EINVAL));
    f.client.req64(0, CACHE, 9, 0, 5 * GIB).await;
    assert_eq!(f.client.status().await, (9, EINVAL));
    // A request may announce a payload; on a command that takes none (CACHE here, an
    // unknown command next) the server refuses it, skips the payload, and the stream
    // stays in sync.
    f.client.req64(F_PAYLOAD_LEN, CACHE, 10, 0, 12).await;
    f.client.send(&[0u8; 12]).await;
    assert_eq!(f.client.status().await, (10, EINVAL));
    f.client.req64(F_PAYLOAD_LEN, 99, 11, 0, 5).await;
    f.client.send(&[1u8; 5]).await;
    assert_eq!(f.client.status().await, (11, EINVAL));
    f.client.req(0, FLUSH, 12, 0, 0).await;
    assert_eq!(f.client.status().await, (12, 0));
    finish(f).await;
}

/// A BLOCK_STATUS payload: effect length, then context ids.
fn status_payload(effect_length: u64, ids: &[u32]) -> Vec<u8> {
    let mut p = effect_length.to_be_bytes().to_vec();
    for id in ids {
        p.extend_from_slice(&id.to_be_bytes());
    }
    p
}

#[tokio::test]
async fn block_status_payloads_are_offered_with_extended_headers_and_a_context() {
    // Offered: extended headers and base:allocation selected.
    let (f, tflags) = ready_extended(provider(), "disk", true).await;
    assert_eq!(tflags & T_BLOCK_STAT_PAYLOAD, T_BLOCK_STAT_PAYLOAD);
    finish(f).await;
    // Not with extended headers alone: BLOCK_STATUS cannot be used at all.
    let (f, tflags) = ready_extended(provider(), "disk", false).await;
    assert_eq!(tflags & T_BLOCK_STAT_PAYLOAD, 0);
    finish(f).await;
    // Never with compact headers (the spec forbids it).
    let (f, tflags) = ready("disk", true, true).await;
    assert_eq!(tflags & T_BLOCK_STAT_PAYLOAD, 0);
    finish(f).await;
    // INFO with extended headers says the server can (contexts may still be chosen).
    let mut f = start();
    f.client.greet(C_FIXED | C_NO_ZEROES).await;
    assert_eq!(
        f.client.final_reply(OPT_EXTENDED_HEADERS, &[]).await,
        REP_ACK
    );
    let replies = f.client.info(OPT_INFO, "disk", &[]).await;
    let export = &replies.iter().find(|(k, _)| *k == REP_INFO).unwrap().1;
    let tflags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_eq!(tflags & T_BLOCK_STAT_PAYLOAD, T_BLOCK_STAT_PAYLOAD);
}

#[tokio::test]
async fn block_status_payloads_are_answered_and_bad_ones_refused_in_sync() {
    let (mut f, _) = ready_extended(provider(), "disk", true).await;
    f.client.write(0, 1, 4096, &pattern(5, 8192)).await;
    assert_eq!(f.client.status().await, (1, 0));
    // The length field is the payload's (12 bytes); the effect length is the query's.
    let payload = status_payload(16384, &[1]);
    f.client
        .req64(F_PAYLOAD_LEN, BLOCK_STATUS, 2, 0, payload.len() as u64)
        .await;
    f.client.send(&payload).await;
    let chunks = f.client.chunks(2).await;
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].offset, Some(0));
    assert_eq!(
        extents64(&chunks[0]),
        (1, vec![(4096, 3), (8192, 0), (4096, 3)])
    );
    // REQ_ONE applies as without a payload, and the offset is the header's.
    f.client
        .req64(F_PAYLOAD_LEN | F_REQ_ONE, BLOCK_STATUS, 3, 8192, 12)
        .await;
    f.client.send(&status_payload(MIB, &[1])).await;
    let chunks = f.client.chunks(3).await;
    assert_eq!(extents64(&chunks[0]), (1, vec![(4096, 0)]));
    // Each bad payload is refused with EINVAL and consumed: the next request parses.
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("unknown context", status_payload(4096, &[2])),
        ("context 0", status_payload(4096, &[0])),
        ("one id twice", status_payload(4096, &[1, 1])),
        ("no id", status_payload(4096, &[])),
        ("torn id", status_payload(4096, &[1])[..10].to_vec()),
        ("stray byte", [status_payload(4096, &[1]), vec![7]].concat()),
        ("zero effect length", status_payload(0, &[1])),
        ("past the end", status_payload(DISK_BYTES, &[1])),
        ("far too long", vec![0x5a; 100_000]),
        ("empty", vec![]),
    ];
    for (i, (why, payload)) in bad.iter().enumerate() {
        let cookie = 10 + i as u64;
        f.client
            .req64(
                F_PAYLOAD_LEN,
                BLOCK_STATUS,
                cookie,
                4096,
                payload.len() as u64,
            )
            .await;
        f.client.send(payload).await;
        assert_eq!(f.client.status().await, (cookie, EINVAL), "{why}");
        f.client.req(0, FLUSH, 100 + i as u64, 0, 0).await;
        assert_eq!(f.client.status().await, (100 + i as u64, 0), "{why}");
    }
    finish(f).await;
}

#[tokio::test]
async fn block_status_payloads_are_refused_where_not_offered() {
    // Extended headers without a context: no payload was offered, so PAYLOAD_LEN on
    // BLOCK_STATUS is a bad flag; the payload is skipped and the stream stays in sync.
    let (mut f, tflags) = ready_extended(provider(), "disk", false).await;
    assert_eq!(tflags & T_BLOCK_STAT_PAYLOAD, 0);
    f.client.req64(F_PAYLOAD_LEN, BLOCK_STATUS, 1, 0, 12).await;
    f.client.send(&status_payload(4096, &[1])).await;
    assert_eq!(f.client.status().await, (1, EINVAL));
    f.client.req(0, FLUSH, 2, 0, 0).await;
    assert_eq!(f.client.status().await, (2, 0));
    finish(f).await;
}

#[tokio::test]
async fn a_compact_request_after_extended_headers_ends_the_session() {
    let (mut f, _) = ready_extended(provider(), "disk", false).await;
    f.client.extended = false;
    f.client.req(0, FLUSH, 1, 0, 0).await;
    // (28 bytes: the server reads 32 before it can judge the magic.)
    f.client.req(0, FLUSH, 2, 0, 0).await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::Protocol(_))
    ));
}

#[tokio::test]
async fn a_refused_payload_too_large_to_skip_ends_the_session() {
    let (mut f, _) = ready_extended(provider(), "disk", false).await;
    let length = (1u64 << 32) + 1;
    f.client.req64(0, WRITE, 1, 0, length).await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::PayloadTooLarge { length: l }) if l == length
    ));
}

// ---- concurrency --------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_requests_complete_out_of_order() {
    let (mut f, _) = ready("disk", true, false).await;
    // (Not offset 0: the double's flush counts as offset 0.)
    f.disk.set_delay(12288, Duration::from_millis(300));
    f.client.req(0, READ, 1, 12288, 4096).await;
    f.client.write(0, 2, 8192, &pattern(2, 4096)).await;
    f.client.req(0, READ, 3, 4096, 4096).await;
    f.client.req(0, FLUSH, 4, 0, 0).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        match f.client.reply().await {
            Reply::Simple { cookie, error } => {
                assert_eq!(error, 0);
                order.push(cookie);
            }
            Reply::Chunk(c) => {
                assert_eq!(c.flags & 1, 1, "these reads are single chunks");
                order.push(c.cookie);
            }
        }
    }
    assert_eq!(order.len(), 4);
    assert_eq!(
        *order.last().unwrap(),
        1,
        "the delayed read finishes last: {order:?}"
    );
    finish(f).await;
}

#[tokio::test]
async fn disc_waits_for_in_flight_requests() {
    let (mut f, _) = ready("disk", false, false).await;
    f.disk.set_delay(0, Duration::from_millis(200));
    f.client.write(0, 1, 0, &pattern(9, 4096)).await;
    f.client.req(0, DISC, 2, 0, 0).await;
    // The delayed write still gets its reply, then the server closes.
    assert_eq!(f.client.status().await, (1, 0));
    f.client.expect_eof().await;
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Disconnected);
    assert_eq!(f.disk.stats.writes.load(Ordering::Relaxed), 1);
    assert_eq!(f.provider.open_count("disk"), 0, "released on close");
}

#[tokio::test]
async fn shutdown_stops_reading_and_finishes_in_flight() {
    let (mut f, _) = ready("disk", false, false).await;
    f.disk.set_delay(0, Duration::from_millis(200));
    f.client.req(0, READ, 1, 0, 4096).await;
    // Trigger only once the read is in flight (it then sleeps in the export).
    while f.disk.stats.started.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.trigger.send(true).unwrap();
    let (err, cookie, data) = f.client.simple_read(4096).await;
    assert_eq!((err, cookie, data.len()), (0, 1, 4096));
    f.client.expect_eof().await;
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Shutdown);
}

#[tokio::test]
async fn bad_request_magic_ends_the_session_after_in_flight_replies() {
    let (mut f, _) = ready("disk", false, false).await;
    f.disk.set_delay(0, Duration::from_millis(100));
    f.client.write(0, 1, 0, &[1u8; 512]).await;
    f.client.send(&[0xffu8; 28]).await;
    assert_eq!(f.client.status().await, (1, 0));
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::Protocol(_))
    ));
    assert_eq!(f.provider.open_count("disk"), 0);
}

#[tokio::test]
async fn eof_mid_session_is_clean() {
    let (f, _) = ready("disk", false, false).await;
    let Fixture {
        client,
        session,
        provider,
        ..
    } = f;
    drop(client);
    assert_eq!(session.await.unwrap().unwrap(), SessionEnd::Eof);
    assert_eq!(provider.open_count("disk"), 0);
}

#[tokio::test]
async fn tight_limits_still_make_progress() {
    // One request at a time, and a byte budget smaller than one request.
    let config = SessionConfig {
        requests_in_flight_max: 1,
        request_bytes_in_flight_max: 1024,
        ..SessionConfig::default()
    };
    let (mut f, _) = ready_with(config, "disk", true, false).await;
    let data = pattern(7, 65536);
    for i in 0..8u64 {
        f.client.write(0, i, i * 65536, &data).await;
    }
    for i in 0..8u64 {
        f.client.req(0, READ, 100 + i, i * 65536, 65536).await;
    }
    let mut seen = 0;
    for _ in 0..16 {
        match f.client.reply().await {
            Reply::Simple { error, .. } => assert_eq!(error, 0),
            Reply::Chunk(c) => {
                assert_eq!(c.kind, CH_DATA);
                assert_eq!(&c.payload[8..], &data[..]);
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 16);
    finish(f).await;
}

/// An export whose every I/O call panics: the session must turn that into EIO.
struct PanickingExport;

#[async_trait]
impl BlockExport for PanickingExport {
    fn size_bytes(&self) -> u64 {
        MIB
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, _: u64, _: u32) -> Result<Vec<ReadChunk>, ExportError> {
        panic!("read exploded")
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), ExportError> {
        panic!("write exploded")
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), ExportError> {
        Ok(())
    }
    async fn cache(&self, _: u64, _: u64) -> Result<(), ExportError> {
        Ok(())
    }
    async fn block_status(&self, _: u64, _: u64) -> Result<Vec<(u32, u32)>, ExportError> {
        // Not a panic, but an invalid answer: no extents at all.
        Ok(vec![])
    }
}

struct PanickingProvider;

#[async_trait]
impl ExportProvider for PanickingProvider {
    async fn open(&self, _: &str) -> Result<Arc<dyn BlockExport>, ExportError> {
        Ok(Arc::new(PanickingExport))
    }
    async fn list(&self) -> Result<Vec<String>, ExportError> {
        Err(ExportError::new(Errno::Io, "listing failed"))
    }
}

#[tokio::test]
async fn export_panics_and_bad_answers_become_eio() {
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let session = tokio::spawn(session::serve_stream(
        server_end,
        Arc::new(PanickingProvider),
        SessionConfig::default(),
        Shutdown::never(),
    ));
    let mut c = Client {
        s: client_end,
        extended: false,
    };
    c.greet(C_FIXED | C_NO_ZEROES).await;
    // A provider error on LIST is an error reply, not a dropped connection.
    assert!(c.final_reply(OPT_LIST, &[]).await & 0x8000_0000 != 0);
    assert_eq!(c.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    let r = c.meta(OPT_SET_META, "x", &["base:allocation"]).await;
    assert_eq!(r.len(), 2);
    c.go("x").await;
    c.write(0, 1, 0, &[1u8; 512]).await;
    assert_eq!(c.status().await, (1, EIO));
    c.req(0, READ, 2, 0, 512).await;
    assert_eq!(assemble(0, 512, &c.chunks(2).await), Err(EIO));
    c.req(0, BLOCK_STATUS, 3, 0, 512).await;
    assert_eq!(c.status().await, (3, EIO));
    c.req(0, FLUSH, 4, 0, 0).await;
    assert_eq!(c.status().await, (4, 0));
    c.req(0, DISC, 5, 0, 0).await;
    c.expect_eof().await;
    assert_eq!(session.await.unwrap().unwrap(), SessionEnd::Disconnected);
}

// ---- server over real sockets -------------------------------------------------------------

async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&(C_FIXED | C_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
    s.write_all(&OPT_EXPORT_NAME.to_be_bytes()).await.unwrap();
    s.write_all(&4u32.to_be_bytes()).await.unwrap();
    s.write_all(b"disk").await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        DISK_BYTES
    );
}

/// A compact request header, followed by `payload`, as a client sends it.
fn raw_request(command: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&command.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(payload);
    req
}

/// `server::run` as a task, shutting down when the returned sender fires.
fn spawn_server(
    listeners: Vec<Listener>,
    provider: Arc<dyn ExportProvider>,
    limits: ServerLimits,
) -> (
    JoinHandle<std::io::Result<()>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listeners, provider, limits, async {
        let _ = stop_rx.await;
    }));
    (server, stop_tx)
}

#[tokio::test]
async fn server_serves_tcp_and_unix_and_shuts_down() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let unix = tokio::net::UnixListener::bind(&path).unwrap();
    let limits = ServerLimits {
        shutdown_grace_ms: 5_000,
        ..ServerLimits::default()
    };
    let provider = provider();
    let (server, stop_tx) = spawn_server(
        vec![Listener::Tcp(tcp), Listener::Unix(unix)],
        provider.clone(),
        limits,
    );

    let mut t = tokio::net::TcpStream::connect(addr).await.unwrap();
    client_handshake(&mut t).await;
    let mut u = tokio::net::UnixStream::connect(&path).await.unwrap();
    client_handshake(&mut u).await;
    // Write over TCP, read it back over Unix: one shared export.
    t.write_all(&raw_request(WRITE, 1, 0, 4, b"abcd"))
        .await
        .unwrap();
    let mut reply = [0u8; 16];
    t.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0]);
    u.write_all(&raw_request(READ, 2, 0, 4, b"")).await.unwrap();
    let mut reply = [0u8; 20];
    u.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[16..], b"abcd");

    // Shutdown: both sessions stop reading, close; the server returns.
    stop_tx.send(()).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(t.read(&mut b).await.unwrap_or(0), 0);
    assert_eq!(u.read(&mut b).await.unwrap_or(0), 0);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    assert_eq!(provider.open_count("disk"), 0);
    // Not accepting any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn server_closes_connections_above_the_limit() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let limits = ServerLimits {
        connections_max: 1,
        ..ServerLimits::default()
    };
    let (server, stop_tx) = spawn_server(vec![Listener::Tcp(tcp)], provider(), limits);
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    client_handshake(&mut first).await;
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut b))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "the second connection is closed without a greeting");
    // Once the first leaves, a new connection is served (retry: the server notices the
    // first one's end asynchronously).
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut magic = [0u8; 8];
        if third.read_exact(&mut magic).await.is_ok() {
            assert_eq!(&magic, b"NBDMAGIC");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

// ---- garbage from the client ----------------------------------------------------------------

/// Feed `bytes` to a session (optionally after a successful GO) and close: the session must
/// end on its own, without panicking, whatever the bytes were.
fn survive(bytes: Vec<u8>, after_go: bool) {
    survive_with(bytes, after_go, false)
}

/// `survive`, with extended headers negotiated before GO when `extended`.
fn survive_with(bytes: Vec<u8>, after_go: bool, extended: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut f = start();
        f.client.greet(C_FIXED | C_NO_ZEROES).await;
        if after_go {
            let option = if extended {
                OPT_EXTENDED_HEADERS
            } else {
                OPT_STRUCTURED
            };
            assert_eq!(f.client.final_reply(option, &[]).await, REP_ACK);
            f.client.go("disk").await;
        }
        let Fixture {
            client, session, ..
        } = f;
        let (mut r, mut w) = tokio::io::split(client.s);
        // Drain replies concurrently so the server never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink).await;
        });
        let _ = w.write_all(&bytes).await;
        let _ = w.shutdown().await;
        drop(w);
        let ended = tokio::time::timeout(Duration::from_secs(10), session)
            .await
            .expect("session ends after garbage");
        assert!(ended.is_ok(), "session task panicked");
        drain.abort();
    });
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    #[test]
    fn garbage_options_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        survive(bytes, false);
    }

    #[test]
    fn garbage_after_option_magic_never_panics(
        option in 0u32..16,
        len in 0u32..600,
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
    ) {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&body);
        survive(bytes, false);
    }

    #[test]
    fn garbage_requests_never_panic(
        headers in proptest::collection::vec(
            (0u16..32, 0u16..10, proptest::prelude::any::<u64>(), 0u32..70_000, proptest::prelude::any::<bool>()),
            1..12,
        ),
    ) {
        let mut bytes = Vec::new();
        for (flags, cmd, offset, len, small_offset) in headers {
            let offset = if small_offset { offset % (DISK_BYTES + 8192) } else { offset };
            bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            bytes.extend_from_slice(&flags.to_be_bytes());
            bytes.extend_from_slice(&cmd.to_be_bytes());
            bytes.extend_from_slice(&7u64.to_be_bytes());
            bytes.extend_from_slice(&offset.to_be_bytes());
            bytes.extend_from_slice(&len.to_be_bytes());
            if cmd == WRITE {
                bytes.resize(bytes.len() + len as usize, 0x5a);
            }
        }
        survive(bytes, true);
    }

    #[test]
    fn garbage_extended_requests_never_panic(
        headers in proptest::collection::vec(
            (0u16..64, 0u16..10, proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>(), 0u8..3),
            1..12,
        ),
    ) {
        let mut bytes = Vec::new();
        for (flags, cmd, offset, len, shape) in headers {
            // Mostly plausible requests, some with wild offsets and lengths.
            let (offset, len) = match shape {
                0 => (offset % (DISK_BYTES + 8192), len % 70_000),
                1 => (offset % (DISK_BYTES + 8192), len),
                _ => (offset, len % 70_000),
            };
            bytes.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
            bytes.extend_from_slice(&flags.to_be_bytes());
            bytes.extend_from_slice(&cmd.to_be_bytes());
            bytes.extend_from_slice(&7u64.to_be_bytes());
            bytes.extend_from_slice(&offset.to_be_bytes());
            bytes.extend_from_slice(&len.to_be_bytes());
            if (cmd == WRITE || flags & F_PAYLOAD_LEN != 0) && len < 70_000 {
                bytes.resize(bytes.len() + len as usize, 0x5a);
            }
        }
        survive_with(bytes, true, true);
    }
}

/// An export whose writes wait for a gate, counting the payload bytes they hold.
#[derive(Default)]
struct GatedExport {
    held: std::sync::atomic::AtomicUsize,
    max_held: std::sync::atomic::AtomicUsize,
    open: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl BlockExport for GatedExport {
    fn size_bytes(&self) -> u64 {
        16 * MIB
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, _: u64, len: u32) -> Result<Vec<ReadChunk>, ExportError> {
        Ok(vec![ReadChunk::Hole(len)])
    }
    async fn write(&self, _: u64, data: Bytes, _: bool) -> Result<(), ExportError> {
        let now = self.held.fetch_add(data.len(), Ordering::SeqCst) + data.len();
        self.max_held.fetch_max(now, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.held.fetch_sub(data.len(), Ordering::SeqCst);
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), ExportError> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), ExportError> {
        Ok(())
    }
    async fn cache(&self, _: u64, _: u64) -> Result<(), ExportError> {
        Ok(())
    }
    async fn block_status(&self, _: u64, len: u64) -> Result<Vec<(u32, u32)>, ExportError> {
        Ok(vec![(len as u32, 0)])
    }
}

struct GatedProvider(Arc<GatedExport>);

#[async_trait]
impl ExportProvider for GatedProvider {
    async fn open(&self, _: &str) -> Result<Arc<dyn BlockExport>, ExportError> {
        Ok(self.0.clone())
    }
    async fn list(&self) -> Result<Vec<String>, ExportError> {
        Ok(vec!["disk".into()])
    }
}

#[tokio::test]
async fn server_wide_byte_budget_bounds_all_connections_together() {
    const W: usize = 64 * 1024;
    let export = Arc::new(GatedExport::default());
    let provider: Arc<dyn ExportProvider> = Arc::new(GatedProvider(export.clone()));
    // Each connection alone could hold 1 MiB; the server as a whole only 2 writes.
    let config = SessionConfig {
        request_bytes_in_flight_max: 1 << 20,
        server_bytes: Some(session::ServerBytes::new(2 * W)),
        ..SessionConfig::default()
    };
    let mut clients = Vec::new();
    let mut sessions = Vec::new();
    let mut triggers = Vec::new();
    for _ in 0..3 {
        let (client_end, server_end) = tokio::io::duplex(4 << 20);
        let (trigger, shutdown) = Shutdown::channel();
        sessions.push(tokio::spawn(session::serve_stream(
            server_end,
            provider.clone(),
            config.clone(),
            shutdown,
        )));
        triggers.push(trigger);
        let mut c = Client {
            s: client_end,
            extended: false,
        };
        c.greet(C_FIXED | C_NO_ZEROES).await;
        c.go("disk").await;
        clients.push(c);
    }
    let data = pattern(3, W);
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..4u64 {
            c.write(0, j, (i as u64 * 4 + j) * W as u64, &data).await;
        }
    }
    // Give every session time to read what it can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(export.held.load(Ordering::SeqCst), 2 * W);
    assert_eq!(export.max_held.load(Ordering::SeqCst), 2 * W);
    export.open.store(true, Ordering::SeqCst);
    for c in clients.iter_mut() {
        for _ in 0..4 {
            match c.reply().await {
                Reply::Simple { error, .. } => assert_eq!(error, 0),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    assert!(export.max_held.load(Ordering::SeqCst) <= 2 * W);
    for c in clients.iter_mut() {
        c.req(0, DISC, 0, 0, 0).await;
        c.expect_eof().await;
    }
    for s in sessions {
        s.await.expect("session task").expect("session ok");
    }
    drop(triggers);
}

/// A session whose request never finishes holds up shutdown only for the grace period:
/// then its thread drops it (the request with it), the client sees the connection close,
/// and the server returns.
#[tokio::test]
async fn server_aborts_sessions_stuck_past_the_shutdown_grace() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let export = Arc::new(GatedExport::default());
    let provider: Arc<dyn ExportProvider> = Arc::new(GatedProvider(export.clone()));
    let limits = ServerLimits {
        shutdown_grace_ms: 300,
        ..ServerLimits::default()
    };
    let (server, stop_tx) = spawn_server(vec![Listener::Tcp(tcp)], provider, limits);
    let mut t = tokio::net::TcpStream::connect(addr).await.unwrap();
    client_handshake(&mut t).await;
    t.write_all(&raw_request(WRITE, 1, 0, 4, b"abcd"))
        .await
        .unwrap();
    while export.held.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = std::time::Instant::now();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops after the grace period")
        .unwrap()
        .unwrap();
    assert!(stopping.elapsed() >= Duration::from_millis(300));
    // Closed without a reply: the write was never acknowledged.
    let mut b = [0u8; 16];
    assert_eq!(t.read(&mut b).await.unwrap_or(0), 0);
    assert_eq!(export.held.load(Ordering::SeqCst), 4);
}

// ---- payload pool --------------------------------------------------------------------------

/// Pipelined writes through a payload pool: every length the pool keeps (whole 4 KiB steps
/// up to 128 KiB) reuses buffers the export has given back, the others (odd lengths,
/// longer payloads) are allocated as before, and every byte reads back as written although
/// buffers go round with old contents in them.
#[tokio::test]
async fn writes_through_a_payload_pool_reuse_buffers_and_keep_every_byte() {
    use nbds3::nbd::pool::{PayloadPool, POOLED_LEN_MAX};
    let pool = PayloadPool::new(4 * MIB as usize);
    let config = SessionConfig {
        payload_pool: Some(Arc::clone(&pool)),
        ..SessionConfig::default()
    };
    let disk = MemExport::new(DISK_BYTES, 4096).with_payload_pool(Arc::clone(&pool));
    let exports = Arc::new(MemProvider::new().with_export("disk", disk));
    let (mut f, _) = ready_on(exports, config, "disk", false, false).await;
    let lens = [
        4096usize,
        8192,
        5000,
        POOLED_LEN_MAX,
        POOLED_LEN_MAX + 4096,
        4096,
    ];
    let mut want = vec![0u8; 8 * MIB as usize];
    let mut at = 0usize;
    let mut cookie = 0u64;
    for round in 0..4u8 {
        // A burst of writes in flight together, then their replies.
        let mut sent = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let data = pattern(round * 16 + i as u8, len);
            want[at..at + len].copy_from_slice(&data);
            cookie += 1;
            f.client.write(0, cookie, at as u64, &data).await;
            sent.push(cookie);
            at += len;
        }
        for _ in &sent {
            let (c, err) = f.client.status().await;
            assert!(sent.contains(&c) && err == 0, "cookie {c} error {err}");
        }
    }
    cookie += 1;
    f.client.req(0, READ, cookie, 0, at as u32).await;
    let (err, c, got) = f.client.simple_read(at).await;
    assert_eq!((err, c), (0, cookie));
    assert!(
        got == want[..at],
        "data read back differs from what was written"
    );
    // 4 rounds x 4 pooled payloads (4096, 8192, 128 KiB, 4096): from the second round on,
    // buffers the export has dropped come back round.
    let reused = pool.stats.reused.load(Ordering::Relaxed);
    let allocated = pool.stats.allocated.load(Ordering::Relaxed);
    assert_eq!(
        reused + allocated,
        16,
        "only pooled lengths go through the pool"
    );
    assert!(reused >= 8, "reused {reused}, allocated {allocated}");
    finish(f).await;
}
