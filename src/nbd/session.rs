//! One NBD connection: the fixed-newstyle handshake, then the transmission phase with
//! pipelined requests. Works over any `AsyncRead`/`AsyncWrite` pair, so tests drive it with
//! `tokio::io::duplex` and the server with TCP or Unix sockets.
//!
//! Shape of the transmission phase:
//! ```text
//!  reader loop (this task)            request futures                      writer task
//!  read header ─ validate ─┬─ error reply ───────────────────────────────┐
//!                          └─ export.read/write/… ─► reply ──────────────┴─► mpsc ─► batch ─► socket
//!                             (polled once inline; spawned as its own task if it has to wait)
//! ```
//! With [`SessionConfig::export_runtime`] set (the server sets it: sessions run on threads
//! of their own), request futures are polled in that runtime's context and the ones that
//! wait are spawned there; the reader and writer stay on the session's runtime.
//! Invariants:
//! - Every request is validated (command, flags, range with `checked_add`, size limits,
//!   read-only) before any I/O, so exports only see requests inside the device and
//!   `len <= REQUEST_BYTES_MAX` (TRIM / WRITE_ZEROES are split into pieces that size).
//! - The byte stream stays parseable after any bad request: a WRITE's payload (or, with
//!   extended headers, any request's payload announced by `NBD_CMD_FLAG_PAYLOAD_LEN`) is
//!   always consumed (read, or discarded for oversized/invalid ones) before the next header.
//!   Only a bad request magic, a payload too large to skip ([`SKIP_BYTES_MAX`]) or an I/O
//!   error ends the connection.
//! - Once extended headers are negotiated every request header is the 32-byte form and
//!   every reply is a 32-byte extended chunk (no simple replies); lengths of TRIM,
//!   WRITE_ZEROES and BLOCK_STATUS may then pass 4 GiB, READ, WRITE and CACHE stay within
//!   the advertised 32 MiB. BLOCK_STATUS may then carry a payload (offered in GO only
//!   when `base:allocation` was selected): it is read into memory only when no longer
//!   than a valid one can be (8 + 4 bytes per negotiated context), else skipped.
//! - All chunks of one reply are encoded by the single writer task from one message, so
//!   replies never interleave; replies to different requests go out in completion order.
//! - Memory is bounded per connection: at most `requests_in_flight_max` requests and
//!   `request_bytes_in_flight_max` payload/reply bytes are held between reading a request
//!   and writing its reply (permits travel with the reply and drop once it is written).
//! - The session ends (DISC, EOF, shutdown, protocol violation) by stopping to read, letting
//!   in-flight requests finish and their replies be written, then closing; the export is
//!   released exactly once per successful open.
//! - A panic in an export call becomes an EIO reply for that request only.
//! - STARTTLS (when a [`TlsConfig`] is set): after its ACK the connection's halves are joined,
//!   upgraded, and option haggling starts afresh over TLS (nothing negotiated in clear
//!   carries over); bytes the client sent before the ACK end the session, since they would
//!   be taken for its TLS hello. The handshake timeout covers all of it.

use std::borrow::Cow;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use std::task::Poll;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::pool::PayloadPool;
use super::proto::{self, *};
use super::tls::{TlsConfig, TlsMode};
use super::{BlockExport, Errno, ExportError, ExportProvider, ReadChunk, REQUEST_BYTES_MAX};

/// Limits for one connection.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Requests read but not yet answered (the per-connection queue depth).
    pub requests_in_flight_max: usize,
    /// WRITE payload and READ reply bytes held by in-flight requests.
    pub request_bytes_in_flight_max: usize,
    /// The whole option haggling must finish within this time.
    pub handshake_timeout: Duration,
    /// Largest option data accepted; larger options are discarded and refused.
    pub option_bytes_max: u32,
    /// Shared by every connection of a server: WRITE payload and READ reply bytes held by
    /// in-flight requests of all connections together (permits are bytes). `None`: only
    /// the per-connection bound applies.
    pub server_bytes: Option<ServerBytes>,
    /// Where WRITE payload buffers come from and go back to (shared by every connection
    /// of a server); `None`: each payload is its own allocation.
    pub payload_pool: Option<Arc<PayloadPool>>,
    /// STARTTLS offered (and, in `Require` mode, required); `None`: refused.
    pub tls: Option<TlsConfig>,
    /// The runtime the exports live on. When set, every request future is polled inside
    /// its context (so whatever the export spawns, times or connects belongs to it, not to
    /// the runtime driving this session), and requests that have to wait continue as
    /// tasks on it. `None`: the session's own runtime does both.
    pub export_runtime: Option<tokio::runtime::Handle>,
}

/// The server-wide in-flight byte budget, shared by all sessions.
#[derive(Debug, Clone)]
pub struct ServerBytes {
    sem: Arc<Semaphore>,
    max: usize,
}

impl ServerBytes {
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            requests_in_flight_max: 128,
            request_bytes_in_flight_max: 128 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            option_bytes_max: 64 * 1024,
            server_bytes: None,
            payload_pool: None,
            tls: None,
            export_runtime: None,
        }
    }
}

/// A future polled inside a given runtime's context (`None`: the caller's).
///
/// Why: a connection's session may run on a runtime of its own (see
/// [`server`](super::server)), which ends with the connection. Anything an export call
/// starts there (a flush task, a store connection, a timer) would die with it, while the
/// export outlives every connection.
pub struct InContext<F> {
    handle: Option<tokio::runtime::Handle>,
    fut: F,
}

impl<F> InContext<F> {
    pub fn new(handle: Option<tokio::runtime::Handle>, fut: F) -> Self {
        Self { handle, fut }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for InContext<F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<F::Output> {
        let this = &mut *self;
        let _entered = this.handle.as_ref().map(|h| h.enter());
        std::pin::Pin::new(&mut this.fut).poll(cx)
    }
}

/// Read buffer per connection: holds many small requests per syscall.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Replies are batched up to this many bytes per write.
const WRITE_BATCH_BYTES: usize = 128 * 1024;
/// Data pieces at least this large are written straight from their buffer, not copied.
const ZERO_COPY_MIN_BYTES: usize = 2048;
/// Buffers per vectored write (Linux's IOV_MAX is 1024).
const IOVECS_PER_WRITE_MAX: usize = 512;
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
/// Largest payload of a refused request that is read and dropped to stay in sync; a longer
/// one ends the connection. 4 GiB: what a compact header can announce (only extended
/// headers can claim more, and a client sending that much past the advertised 32 MiB
/// maximum has broken the protocol anyway).
pub const SKIP_BYTES_MAX: u64 = 1 << 32;

/// Tells sessions the server is shutting down: stop reading, finish in-flight, close.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A trigger (send `true`) and the signal sessions watch.
    pub fn channel() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// A signal that never fires.
    pub fn never() -> Shutdown {
        Shutdown(watch::channel(false).1)
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once triggered; never if the trigger is dropped untriggered.
    pub async fn wait(&mut self) {
        loop {
            if *self.0.borrow_and_update() {
                return;
            }
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Why a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent NBD_OPT_ABORT.
    Aborted,
    /// The client closed the connection during the handshake.
    ClosedInHandshake,
    /// The client sent NBD_CMD_DISC.
    Disconnected,
    /// The client closed the connection during transmission.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// The reply stream failed (the client stopped reading or went away).
    WriterClosed,
}

/// Why a session ended with an error (the connection is dropped).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("refused request announces a {length}-byte payload, more than can be skipped")]
    PayloadTooLarge { length: u64 },
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client sent unknown flags {flags:#x}")]
    UnknownClientFlags { flags: u32 },
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS")]
    TlsRequired,
    #[error("client sent {0} bytes after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls(usize),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("NBD_OPT_EXPORT_NAME of {length} bytes exceeds the name limit")]
    ExportNameTooLong { length: u32 },
    #[error("export {name:?} refused on NBD_OPT_EXPORT_NAME: {message}")]
    ExportRefused { name: String, message: String },
}

/// Serve one connection over a single bidirectional stream.
pub async fn serve_stream<S>(
    stream: S,
    provider: Arc<dyn ExportProvider>,
    config: SessionConfig,
    shutdown: Shutdown,
) -> Result<SessionEnd, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    serve(
        reader,
        writer,
        |r, w| Ok(r.unsplit(w)),
        provider,
        config,
        shutdown,
    )
    .await
}

/// Serve one connection: handshake, then transmission until the client leaves or shutdown.
/// Record the export name on the caller's span (field `export`) once negotiated. `join`
/// puts the two halves back together when the client upgrades to TLS (the handshake then
/// goes on, and transmission runs, over the TLS stream).
pub async fn serve<R, W, S, J>(
    reader: R,
    mut writer: W,
    join: J,
    provider: Arc<dyn ExportProvider>,
    config: SessionConfig,
    mut shutdown: Shutdown,
) -> Result<SessionEnd, SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    J: FnOnce(R, W) -> io::Result<S>,
{
    // The whole negotiation, TLS handshake included, has one deadline.
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let timed_out = || SessionError::HandshakeTimeout(config.handshake_timeout);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let tls = match &config.tls {
        None => TlsPhase::Unavailable,
        Some(t) => TlsPhase::Offered {
            required: t.mode == TlsMode::Require,
        },
    };
    let plain = handshake(
        &mut reader,
        &mut writer,
        provider.as_ref(),
        &config,
        &mut shutdown,
        None,
        tls,
    );
    let no_zeroes = match tokio::time::timeout_at(deadline, plain).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Handshake::End(end))) => return Ok(end),
        Ok(Ok(Handshake::Go(n))) => {
            return run_transmission(reader, writer, n, provider, &config, shutdown).await
        }
        Ok(Ok(Handshake::StartTls { no_zeroes })) => no_zeroes,
    };
    // STARTTLS was acknowledged: the client's next bytes are its TLS hello. Anything it
    // sent before our ACK would be read as TLS and cannot be meant as such.
    if !reader.buffer().is_empty() {
        return Err(SessionError::DataBeforeTls(reader.buffer().len()));
    }
    let Some(tls_config) = &config.tls else {
        return Err(SessionError::Tls(io::Error::other("TLS not configured")));
    };
    let stream = join(reader.into_inner(), writer)?;
    let stream = match tokio::time::timeout_at(deadline, tls_config.acceptor().accept(stream)).await
    {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err(SessionError::Tls(e)),
        Ok(Ok(s)) => s,
    };
    {
        let (_, tls_state) = stream.get_ref();
        tracing::debug!(
            version = ?tls_state.protocol_version(),
            cipher = ?tls_state.negotiated_cipher_suite().map(|c| c.suite()),
            client_certificate = tls_state.peer_certificates().is_some(),
            "TLS established"
        );
    }
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let secured = handshake(
        &mut reader,
        &mut writer,
        provider.as_ref(),
        &config,
        &mut shutdown,
        Some(no_zeroes),
        TlsPhase::Active,
    );
    match tokio::time::timeout_at(deadline, secured).await {
        Err(_) => Err(timed_out()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Handshake::End(end))) => Ok(end),
        Ok(Ok(Handshake::Go(n))) => {
            run_transmission(reader, writer, n, provider, &config, shutdown).await
        }
        // `handshake` refuses a second STARTTLS itself.
        Ok(Ok(Handshake::StartTls { .. })) => {
            Err(SessionError::Tls(io::Error::other("STARTTLS inside TLS")))
        }
    }
}

/// The transmission phase of a negotiated session, then the export's release.
async fn run_transmission<R, W>(
    reader: BufReader<R>,
    writer: W,
    negotiated: Negotiated,
    provider: Arc<dyn ExportProvider>,
    config: &SessionConfig,
    shutdown: Shutdown,
) -> Result<SessionEnd, SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::Span::current().record("export", negotiated.name.as_str());
    tracing::debug!(
        structured = negotiated.structured,
        extended_headers = negotiated.extended,
        base_allocation = negotiated.base_allocation,
        flags = negotiated.transmission_flags,
        "entering transmission"
    );
    let name = negotiated.name.clone();
    let result = transmission(reader, writer, negotiated, config, shutdown).await;
    provider.release(&name).await;
    result
}

// ---- handshake ----------------------------------------------------------------------------

struct Negotiated {
    name: String,
    export: Arc<dyn BlockExport>,
    structured: bool,
    /// Extended headers (implies `structured`): 32-byte requests and reply chunks.
    extended: bool,
    /// `base:allocation` was selected for this export: BLOCK_STATUS is allowed.
    base_allocation: bool,
    transmission_flags: u16,
}

enum Handshake {
    Go(Negotiated),
    End(SessionEnd),
    /// STARTTLS was acknowledged: upgrade, then negotiate again over TLS.
    StartTls {
        no_zeroes: bool,
    },
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPhase {
    /// Not configured: STARTTLS is refused.
    Unavailable,
    /// Configured, not started; `required`: nothing but STARTTLS and ABORT is served.
    Offered { required: bool },
    /// The connection runs over TLS.
    Active,
}

/// `block_stat_payload`: offer BLOCK_STATUS payloads (`NBD_FLAG_BLOCK_STAT_PAYLOAD`); the
/// spec allows it only with extended headers.
fn transmission_flags(export: &dyn BlockExport, structured: bool, block_stat_payload: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if export.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    if block_stat_payload {
        flags |= TFLAG_BLOCK_STAT_PAYLOAD;
    }
    flags
}

/// Preferred block size to advertise: the export's, if the spec allows it (a power of two,
/// at least 512, at most the maximum), else 4096.
fn preferred_block_size(export: &dyn BlockExport) -> u32 {
    let bs = export.block_size();
    if bs.is_power_of_two() && (512..=REQUEST_BYTES_MAX).contains(&bs) {
        bs
    } else {
        4096
    }
}

async fn write_now<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    writer.write_all(bytes).await?;
    writer.flush().await
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    encode_option_reply(out, option, reply_type, data);
}

fn option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    option_reply(out, option, reply_type, clip_message(message).as_bytes());
}

/// Read and drop the payload of a refused request, if it is not too long to skip.
async fn skip_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: u64,
) -> Result<(), SessionError> {
    if length > SKIP_BYTES_MAX {
        return Err(SessionError::PayloadTooLarge { length });
    }
    discard(reader, length).await.map_err(SessionError::from)
}

/// Read and drop `len` bytes.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(len), &mut tokio::io::sink()).await?;
    if copied != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Option haggling. With `greeted` None this starts the connection (greeting and client
/// flags); after a TLS upgrade it carries the client's NO_ZEROES flag and only the options
/// follow, with everything negotiated before forgotten.
async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    provider: &dyn ExportProvider,
    config: &SessionConfig,
    shutdown: &mut Shutdown,
    greeted: Option<bool>,
    tls: TlsPhase,
) -> Result<Handshake, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    let no_zeroes = match greeted {
        Some(no_zeroes) => no_zeroes,
        None => {
            encode_greeting(&mut out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            write_now(writer, &out).await?;
            let mut flag_bytes = [0u8; 4];
            match reader.read_exact(&mut flag_bytes).await {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(Handshake::End(SessionEnd::ClosedInHandshake))
                }
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            let client_flags = u32::from_be_bytes(flag_bytes);
            if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
                // The spec: the server MUST drop the connection on unknown client flags.
                return Err(SessionError::UnknownClientFlags {
                    flags: client_flags,
                });
            }
            client_flags & FLAG_C_NO_ZEROES != 0
        }
    };

    let mut structured = false;
    let mut extended = false;
    // Export name for which `base:allocation` was selected by the last SET_META_CONTEXT.
    let mut meta_export: Option<String> = None;
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        let read = tokio::select! {
            _ = shutdown.wait() => return Ok(Handshake::End(SessionEnd::Shutdown)),
            r = reader.read_exact(&mut header) => r,
        };
        match read {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Handshake::End(SessionEnd::ClosedInHandshake))
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let OptionHeader { option, length } = OptionHeader::decode(&header)?;
        out.clear();

        if option == OPT_EXPORT_NAME && length as usize > STRING_BYTES_MAX {
            // EXPORT_NAME has no error reply; a name this long cannot be valid.
            return Err(SessionError::ExportNameTooLong { length });
        }
        if length > config.option_bytes_max {
            // Skipping keeps the stream parseable; the client learns why from the reply.
            discard(reader, length.into()).await?;
            let reply_type = if option_known(option) {
                REP_ERR_TOO_BIG
            } else {
                REP_ERR_UNSUP
            };
            option_error(&mut out, option, reply_type, "option data too large");
            write_now(writer, &out).await?;
            continue;
        }
        data.resize(length as usize, 0);
        reader.read_exact(&mut data).await?;

        if shutdown.is_triggered() && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Ok(Handshake::End(SessionEnd::Shutdown));
            }
            option_error(
                &mut out,
                option,
                REP_ERR_SHUTDOWN,
                "server is shutting down",
            );
            write_now(writer, &out).await?;
            continue;
        }
        if tls == (TlsPhase::Offered { required: true })
            && option != OPT_STARTTLS
            && option != OPT_ABORT
        {
            if option == OPT_EXPORT_NAME {
                // It has no error reply; the spec says to end the session.
                return Err(SessionError::TlsRequired);
            }
            option_error(
                &mut out,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            write_now(writer, &out).await?;
            continue;
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = parse_string(&data)?;
                let export =
                    provider
                        .open(&name)
                        .await
                        .map_err(|e| SessionError::ExportRefused {
                            name: name.clone(),
                            message: e.message,
                        })?;
                let base_allocation = meta_export.as_deref() == Some(name.as_str());
                // (A client with extended headers must use GO, but if it does not, the
                // same rule applies: payloads only where BLOCK_STATUS can be used.)
                let flags =
                    transmission_flags(export.as_ref(), structured, extended && base_allocation);
                encode_export_name_reply(&mut out, export.size_bytes(), flags, no_zeroes);
                if let Err(e) = write_now(writer, &out).await {
                    provider.release(&name).await;
                    return Err(e.into());
                }
                return Ok(Handshake::Go(Negotiated {
                    name,
                    export,
                    structured,
                    extended,
                    base_allocation,
                    transmission_flags: flags,
                }));
            }
            OPT_ABORT => {
                option_reply(&mut out, option, REP_ACK, &[]);
                // The client may already have closed; the reply is a courtesy.
                let _ = write_now(writer, &out).await;
                return Ok(Handshake::End(SessionEnd::Aborted));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    match provider.list().await {
                        Ok(names) => {
                            for name in names {
                                let mut item = Vec::with_capacity(4 + name.len());
                                encode_rep_server(&mut item, &name, "");
                                option_reply(&mut out, option, REP_SERVER, &item);
                            }
                            option_reply(&mut out, option, REP_ACK, &[]);
                        }
                        Err(e) => {
                            let reply_type = if e.errno == Errno::Shutdown {
                                REP_ERR_SHUTDOWN
                            } else {
                                REP_ERR_POLICY
                            };
                            option_error(&mut out, option, reply_type, &e.message);
                        }
                    }
                }
            }
            OPT_STARTTLS => match tls {
                TlsPhase::Unavailable => {
                    option_error(&mut out, option, REP_ERR_UNSUP, "TLS is not configured")
                }
                TlsPhase::Active => {
                    option_error(&mut out, option, REP_ERR_INVALID, "TLS is already active")
                }
                TlsPhase::Offered { .. } if !data.is_empty() => option_error(
                    &mut out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                ),
                TlsPhase::Offered { .. } => {
                    option_reply(&mut out, option, REP_ACK, &[]);
                    write_now(writer, &out).await?;
                    return Ok(Handshake::StartTls { no_zeroes });
                }
            },
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    );
                } else if extended {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    // Extended headers include structured replies (the spec).
                    extended = true;
                    structured = true;
                    option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if extended {
                    // Asking for the compact form after the extended one: the spec's answer.
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else {
                    structured = true;
                    option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_INFO | OPT_GO => {
                let request = match InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        option_error(&mut out, option, REP_ERR_INVALID, &e.to_string());
                        write_now(writer, &out).await?;
                        continue;
                    }
                };
                let export = match provider.open(&request.name).await {
                    Ok(export) => export,
                    Err(e) => {
                        let reply_type = if e.errno == Errno::Shutdown {
                            REP_ERR_SHUTDOWN
                        } else {
                            REP_ERR_UNKNOWN
                        };
                        option_error(&mut out, option, reply_type, &e.message);
                        write_now(writer, &out).await?;
                        continue;
                    }
                };
                let base_allocation = meta_export.as_deref() == Some(request.name.as_str());
                // INFO says what the server can do once contexts are chosen (as qemu-nbd
                // does); GO offers payloads only when BLOCK_STATUS itself can be used.
                let payloads = extended && (option == OPT_INFO || base_allocation);
                let flags = transmission_flags(export.as_ref(), structured, payloads);
                encode_info_replies(&mut out, option, &request, export.as_ref(), flags);
                option_reply(&mut out, option, REP_ACK, &[]);
                let written = write_now(writer, &out).await;
                if option == OPT_INFO || written.is_err() {
                    provider.release(&request.name).await;
                }
                written?;
                if option == OPT_GO {
                    return Ok(Handshake::Go(Negotiated {
                        name: request.name,
                        export,
                        structured,
                        extended,
                        base_allocation,
                        transmission_flags: flags,
                    }));
                }
                // Already written above (the release depends on the write).
                continue;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // The spec: SET replaces the selection even when it fails.
                    meta_export = None;
                }
                if set && !structured {
                    option_error(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                } else {
                    match MetaContextRequest::decode(&data) {
                        Err(e) => option_error(&mut out, option, REP_ERR_INVALID, &e.to_string()),
                        Ok(request) => {
                            let selected = if set {
                                select_meta_contexts(&request.queries)
                            } else {
                                list_meta_contexts(&request.queries)
                            };
                            if selected {
                                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                                let mut item = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                                encode_rep_meta_context(&mut item, id, BASE_ALLOCATION);
                                option_reply(&mut out, option, REP_META_CONTEXT, &item);
                                if set {
                                    meta_export = Some(request.export);
                                }
                            }
                            option_reply(&mut out, option, REP_ACK, &[]);
                        }
                    }
                }
            }
            _ => {
                option_error(&mut out, option, REP_ERR_UNSUP, "unknown option");
            }
        }
        write_now(writer, &out).await?;
    }
}

fn option_known(option: u32) -> bool {
    (OPT_EXPORT_NAME..=OPT_EXTENDED_HEADERS).contains(&option) && option != OPT_PEEK_EXPORT
}

/// NBD_OPT_LIST_META_CONTEXT: no queries means "everything"; `base:` is a wildcard for the
/// base namespace. Unknown namespaces and leaf names are ignored, as the spec requires.
fn list_meta_contexts(queries: &[String]) -> bool {
    queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
}

/// NBD_OPT_SET_META_CONTEXT: no queries selects nothing; `base:` must be ignored here.
fn select_meta_contexts(queries: &[String]) -> bool {
    queries.iter().any(|q| q == BASE_ALLOCATION)
}

fn encode_info_replies(
    out: &mut Vec<u8>,
    option: u32,
    request: &InfoRequest,
    export: &dyn BlockExport,
    flags: u16,
) {
    let mut infos = vec![
        Info::Export {
            size_bytes: export.size_bytes(),
            transmission_flags: flags,
        },
        // Always sent (the spec allows unrequested info): clients that understand it learn
        // the preferred size and the 32 MiB cap even if they did not ask.
        Info::BlockSize {
            minimum: 1,
            preferred: preferred_block_size(export),
            maximum: REQUEST_BYTES_MAX,
        },
    ];
    if request.info_types.contains(&INFO_NAME) {
        infos.push(Info::Name(request.name.clone()));
    }
    if request.info_types.contains(&INFO_DESCRIPTION) {
        if let Some(text) = export.description() {
            infos.push(Info::Description(clip_message(&text).to_owned()));
        }
    }
    let mut item = Vec::with_capacity(64);
    for info in infos {
        item.clear();
        info.encode(&mut item);
        option_reply(out, option, REP_INFO, &item);
    }
}

// ---- transmission -------------------------------------------------------------------------

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Trim { .. } => "trim",
            Op::WriteZeroes { .. } => "write_zeroes",
            Op::Cache { .. } => "cache",
            Op::BlockStatus { .. } => "block_status",
        }
    }
}

/// A validated request, ready for the export.
enum Op {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

/// What to send back for one request.
enum Body {
    Ok,
    Error {
        errno: Errno,
        message: Cow<'static, str>,
    },
    Read {
        offset: u64,
        chunks: Vec<ReadChunk>,
        df: bool,
    },
    BlockStatus {
        extents: Vec<(u32, u32)>,
    },
}

impl Body {
    fn error(errno: Errno, message: impl Into<Cow<'static, str>>) -> Self {
        Body::Error {
            errno,
            message: message.into(),
        }
    }
}

impl From<ExportError> for Body {
    fn from(e: ExportError) -> Self {
        Body::error(e.errno, e.message)
    }
}

/// What the reader hands the writer: one reply (from a request that ran as its own task) or
/// the replies of requests the reader finished inline from input that was already buffered.
enum ToWriter {
    One(Outgoing),
    Batch(Vec<Outgoing>),
}

/// Inline-finished replies the reader holds back at most, so one writer wakeup and one
/// vectored write carry many replies; bounded also by the request permits they hold.
const INLINE_BATCH_MAX: usize = 64;

/// Emptied batch vectors the writer hands back to the reader, at most this many. Why: a
/// fresh vector per batch, grown push by push and freed on the writer's thread, cost a
/// malloc and reallocs per batch (the reallocs alone were 1.7% of the CPU of 4 KiB random
/// writes in perf).
const SPARE_BATCHES_MAX: usize = 4;

/// Batch vectors going back from the writer to the reader (see [`SPARE_BATCHES_MAX`]).
#[derive(Default)]
struct Spares(std::sync::Mutex<Vec<Vec<Outgoing>>>);

impl Spares {
    fn take(&self) -> Option<Vec<Outgoing>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }
    /// Keep `v` (emptied) for reuse, unless enough are kept already.
    fn give(&self, mut v: Vec<Outgoing>) {
        v.clear();
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() < SPARE_BATCHES_MAX {
            g.push(v);
        }
    }
}

/// A reply plus the permits that bound it; the permits drop once it is written.
struct Outgoing {
    to: ReplyTo,
    body: Body,
    _request_permit: OwnedSemaphorePermit,
    _bytes_permit: Option<OwnedSemaphorePermit>,
    _server_permit: Option<OwnedSemaphorePermit>,
}

struct Rejected {
    errno: Errno,
    message: &'static str,
}

fn reject(errno: Errno, message: &'static str) -> Rejected {
    Rejected { errno, message }
}

/// Check a request against the negotiated state before any I/O. WRITE payloads are not
/// part of the result; the caller reads or discards them.
fn validate(
    header: &RequestHeader,
    command: Command,
    negotiated: &Negotiated,
    size_bytes: u64,
    read_only: bool,
) -> Result<(), Rejected> {
    let mut flags = header.flags;
    if negotiated.extended && command == Command::Write {
        // Redundant on a WRITE (its length is always the payload's), so allowed.
        flags &= !CMD_FLAG_PAYLOAD_LEN;
    }
    if flags & !command.flags_allowed() != 0 {
        return Err(reject(
            Errno::Inval,
            "command flags not valid for this command",
        ));
    }
    if flags & CMD_FLAG_DF != 0 && !negotiated.structured {
        return Err(reject(Errno::Inval, "DF needs structured replies"));
    }
    let in_range = header
        .offset
        .checked_add(header.length)
        .is_some_and(|end| end <= size_bytes);
    let oversized = header.length > u64::from(REQUEST_BYTES_MAX);
    match command {
        Command::Read | Command::Cache => {
            if oversized {
                return Err(reject(
                    Errno::Inval,
                    "length exceeds the maximum block size",
                ));
            }
            if !in_range {
                return Err(reject(Errno::Inval, "range past the end of the export"));
            }
        }
        Command::Write => {
            if oversized {
                return Err(reject(
                    Errno::Inval,
                    "length exceeds the maximum block size",
                ));
            }
            if read_only {
                return Err(reject(Errno::Perm, "export is read-only"));
            }
            if !in_range {
                return Err(reject(Errno::NoSpc, "write past the end of the export"));
            }
        }
        Command::WriteZeroes => {
            if read_only {
                return Err(reject(Errno::Perm, "export is read-only"));
            }
            if !in_range {
                return Err(reject(
                    Errno::NoSpc,
                    "write zeroes past the end of the export",
                ));
            }
        }
        Command::Trim => {
            if read_only {
                return Err(reject(Errno::Perm, "export is read-only"));
            }
            if !in_range {
                return Err(reject(Errno::Inval, "trim past the end of the export"));
            }
        }
        Command::BlockStatus => {
            if !negotiated.base_allocation {
                return Err(reject(Errno::Inval, "no metadata context negotiated"));
            }
            if header.length == 0 {
                return Err(reject(Errno::Inval, "zero-length block status"));
            }
            if !in_range {
                return Err(reject(Errno::Inval, "range past the end of the export"));
            }
        }
        // FLUSH's offset and length are reserved; they are ignored rather than rejected
        // because the spec gives them no meaning and old clients are sloppy with them.
        Command::Flush | Command::Disc => {}
    }
    Ok(())
}

async fn transmission<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    negotiated: Negotiated,
    config: &SessionConfig,
    mut shutdown: Shutdown,
) -> Result<SessionEnd, SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = Arc::clone(&negotiated.export);
    let size_bytes = export.size_bytes();
    let read_only = export.read_only();
    let structured = negotiated.structured;
    let payloads_offered = negotiated.transmission_flags & TFLAG_BLOCK_STAT_PAYLOAD != 0;
    // Context ids a BLOCK_STATUS payload may name: those selected in the handshake.
    let contexts: &[u32] = if negotiated.base_allocation {
        &[BASE_ALLOCATION_ID]
    } else {
        &[]
    };
    let header_bytes = if negotiated.extended {
        EXTENDED_REQUEST_HEADER_BYTES
    } else {
        REQUEST_HEADER_BYTES
    };
    let requests = Arc::new(Semaphore::new(
        config
            .requests_in_flight_max
            .clamp(1, Semaphore::MAX_PERMITS),
    ));
    let bytes_max = config
        .request_bytes_in_flight_max
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let bytes = Arc::new(Semaphore::new(bytes_max));
    let (tx, rx) = mpsc::unbounded_channel::<ToWriter>();
    let spares = Arc::new(Spares::default());
    let writer_task = tokio::spawn(write_replies(writer, rx, structured, Arc::clone(&spares)));
    let mut tasks = JoinSet::new();
    // Replies of requests finished inline, not yet handed to the writer. Invariant: the
    // batch is handed over before the reader awaits anything that may not be ready at once
    // (socket input, a permit), because those replies' permits may be what it waits for and
    // the client may be waiting for those replies before it sends more.
    let mut batch: Vec<Outgoing> = Vec::new();
    let hand_over = |batch: &mut Vec<Outgoing>| {
        if !batch.is_empty() {
            // The next batch reuses a vector the writer has emptied, else starts with
            // room for as many replies as this one had.
            let next = spares
                .take()
                .unwrap_or_else(|| Vec::with_capacity(batch.len()));
            let _ = tx.send(ToWriter::Batch(std::mem::replace(batch, next)));
        }
    };

    let outcome: Result<SessionEnd, SessionError> = loop {
        while tasks.try_join_next().is_some() {}
        if !batch.is_empty() && reader.buffer().is_empty() && batch.len() < INLINE_BATCH_MAX {
            // Input may have arrived while this batch ran: take it (one read, never a wait)
            // so its replies join the batch, and one write answers more requests.
            let fill = std::future::poll_fn(|cx| {
                std::pin::Pin::new(&mut reader)
                    .poll_fill_buf(cx)
                    .map(|r| r.map(|_| ()))
            });
            if let Poll::Ready(Err(e)) = futures::poll!(fill) {
                break Err(e.into());
            }
        }
        if batch.len() >= INLINE_BATCH_MAX || reader.buffer().len() < header_bytes {
            hand_over(&mut batch);
        }
        // Take the request slot before reading, so a full queue pushes back on the socket.
        let request_permit = match Arc::clone(&requests).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                hand_over(&mut batch);
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break Ok(SessionEnd::Shutdown),
                    _ = tx.closed() => break Ok(SessionEnd::WriterClosed),
                    p = Arc::clone(&requests).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break Ok(SessionEnd::Shutdown),
                    },
                }
            }
        };
        let mut raw = [0u8; EXTENDED_REQUEST_HEADER_BYTES];
        let read =
            if reader.buffer().len() >= header_bytes && !shutdown.is_triggered() && !tx.is_closed()
            {
                // Already buffered: nothing to wait for, so no need to watch the shutdown
                // signal and the writer while waiting (registering and dropping those two
                // waiters on every request was 2.5% of the instructions of 4 KiB writes).
                raw[..header_bytes].copy_from_slice(&reader.buffer()[..header_bytes]);
                std::pin::Pin::new(&mut reader).consume(header_bytes);
                Ok(header_bytes)
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break Ok(SessionEnd::Shutdown),
                    _ = tx.closed() => break Ok(SessionEnd::WriterClosed),
                    r = reader.read_exact(&mut raw[..header_bytes]) => r,
                }
            };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(SessionEnd::Eof),
            Err(e) => break Err(e.into()),
        }
        let decoded = if negotiated.extended {
            RequestHeader::decode_extended(&raw)
        } else {
            let mut compact = [0u8; REQUEST_HEADER_BYTES];
            compact.copy_from_slice(&raw[..REQUEST_HEADER_BYTES]);
            RequestHeader::decode(&compact)
        };
        let header = match decoded {
            Ok(h) => h,
            // Without a valid magic the stream cannot be resynchronised.
            Err(e) => break Err(e.into()),
        };
        let to = if negotiated.extended {
            ReplyTo::extended(header.cookie, header.offset)
        } else {
            ReplyTo::compact(header.cookie)
        };
        // A payload follows a WRITE, and with extended headers any request flagged so.
        let announces_payload = negotiated.extended && header.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        let reply_now = |batch: &mut Vec<Outgoing>, body: Body, permit: OwnedSemaphorePermit| {
            batch.push(Outgoing {
                to,
                body,
                _request_permit: permit,
                _bytes_permit: None,
                _server_permit: None,
            });
        };
        let Some(command) = Command::from_u16(header.command) else {
            tracing::debug!(command = header.command, "unknown command");
            if announces_payload {
                hand_over(&mut batch);
                if let Err(e) = skip_payload(&mut reader, header.length).await {
                    break Err(e);
                }
            }
            reply_now(
                &mut batch,
                Body::error(Errno::Inval, "unknown command"),
                request_permit,
            );
            continue;
        };
        if command == Command::Disc {
            break Ok(SessionEnd::Disconnected);
        }
        let mut header = header;
        let mut announces_payload = announces_payload;
        if command == Command::BlockStatus && announces_payload && payloads_offered {
            // The payload replaces the length field: read it, then validate the request
            // with its effect length like any other BLOCK_STATUS. The only context there
            // is to name is base:allocation, so a payload that decodes selects exactly
            // what an unfiltered request answers; what it changes is the length.
            if (reader.buffer().len() as u64) < header.length {
                hand_over(&mut batch);
            }
            match read_block_status_filter(&mut reader, header.length, contexts).await {
                Err(e) => break Err(e),
                Ok(Err(message)) => {
                    tracing::debug!(
                        length = header.length,
                        reason = message,
                        "block status payload rejected"
                    );
                    reply_now(
                        &mut batch,
                        Body::error(Errno::Inval, message),
                        request_permit,
                    );
                    continue;
                }
                Ok(Ok(filter)) => {
                    header.length = filter.effect_length;
                    header.flags &= !CMD_FLAG_PAYLOAD_LEN;
                    announces_payload = false;
                }
            }
        }
        if let Err(r) = validate(&header, command, &negotiated, size_bytes, read_only) {
            tracing::debug!(
                ?command,
                offset = header.offset,
                length = header.length,
                flags = header.flags,
                reason = r.message,
                "request rejected"
            );
            if command == Command::Write || announces_payload {
                // The payload follows regardless; consume it to stay in sync. Up to 4 GiB
                // may be skipped this way, streamed through a small buffer.
                hand_over(&mut batch);
                if let Err(e) = skip_payload(&mut reader, header.length).await {
                    break Err(e);
                }
            }
            reply_now(&mut batch, Body::error(r.errno, r.message), request_permit);
            continue;
        }

        // Bytes this request holds until its reply is written: WRITE payload or READ data.
        let held = match command {
            Command::Read | Command::Write => header.length as usize,
            _ => 0,
        };
        // Always the connection's budget first, then the server's: one order, so waiting
        // for the shared budget only ever holds this connection's own permits.
        let bytes_permit = if held == 0 {
            None
        } else {
            // A request larger than the whole budget takes all of it rather than waiting forever.
            let cost = held.min(bytes_max) as u32;
            match Arc::clone(&bytes).try_acquire_many_owned(cost) {
                Ok(p) => Some(p),
                Err(_) => {
                    hand_over(&mut batch);
                    match Arc::clone(&bytes).acquire_many_owned(cost).await {
                        Ok(p) => Some(p),
                        Err(_) => break Ok(SessionEnd::Shutdown),
                    }
                }
            }
        };
        let server_permit = match (&config.server_bytes, held) {
            (Some(budget), 1..) => {
                let cost = held.min(budget.max) as u32;
                match Arc::clone(&budget.sem).try_acquire_many_owned(cost) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        hand_over(&mut batch);
                        match Arc::clone(&budget.sem).acquire_many_owned(cost).await {
                            Ok(p) => Some(p),
                            Err(_) => break Ok(SessionEnd::Shutdown),
                        }
                    }
                }
            }
            _ => None,
        };

        let len = header.length;
        let offset = header.offset;
        let flags = header.flags;
        let fua = flags & CMD_FLAG_FUA != 0;
        let op = match command {
            Command::Read => Op::Read {
                offset,
                // Validated: at most REQUEST_BYTES_MAX.
                len: len as u32,
                df: flags & CMD_FLAG_DF != 0,
            },
            Command::Write => {
                if reader.buffer().len() < len as usize {
                    hand_over(&mut batch);
                }
                let pooled = config
                    .payload_pool
                    .as_ref()
                    .and_then(|p| p.take(len as usize));
                let data = match pooled {
                    Some(mut buf) => match reader.read_exact(buf.as_mut()).await {
                        Ok(_) => buf.freeze(),
                        Err(e) => break Err(e.into()),
                    },
                    None => {
                        let mut buf = BytesMut::with_capacity(len as usize);
                        if let Err(e) = read_payload(&mut reader, &mut buf, len as usize).await {
                            break Err(e.into());
                        }
                        buf.freeze()
                    }
                };
                Op::Write { offset, data, fua }
            }
            Command::Flush => Op::Flush,
            Command::Trim => Op::Trim { offset, len, fua },
            Command::WriteZeroes => Op::WriteZeroes {
                offset,
                len,
                fua,
                // FAST_ZERO needs nothing: zeroing only touches metadata, so it is always
                // faster than writing, and the spec then says to just do it.
                no_hole: flags & CMD_FLAG_NO_HOLE != 0,
            },
            Command::Cache => Op::Cache { offset, len },
            Command::BlockStatus => Op::BlockStatus {
                offset,
                len,
                req_one: flags & CMD_FLAG_REQ_ONE != 0,
            },
            Command::Disc => break Ok(SessionEnd::Disconnected),
        };
        let export = Arc::clone(&export);
        let cookie = header.cookie;
        let op_name = op.name();
        let mut request = InContext::new(
            config.export_runtime.clone(),
            Box::pin(async move {
                let body = AssertUnwindSafe(execute(export.as_ref(), op, size_bytes))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(cookie, "export panicked while serving a request");
                        Body::error(Errno::Io, "internal error")
                    });
                if let Body::Error {
                    errno: Errno::Io,
                    message,
                } = &body
                {
                    // Storage failures reach the client as EIO; the operator sees them here.
                    tracing::warn!(cookie, request = op_name, error = %message, "request failed with EIO");
                }
                Outgoing {
                    to,
                    body,
                    _request_permit: request_permit,
                    _bytes_permit: bytes_permit,
                    _server_permit: server_permit,
                }
            }),
        );
        // Fast path: most requests (a write into a dirty set, a cached read) finish without
        // waiting; running them here saves a task spawn and a cross-thread wakeup each, and
        // their replies go out together. One that has to wait continues as its own task (a
        // future may move between tasks: the spawned task re-polls it at once and so
        // registers the right waker).
        match futures::poll!(&mut request) {
            Poll::Ready(reply) => batch.push(reply),
            Poll::Pending => {
                let tx = tx.clone();
                let waiting = async move {
                    let _ = tx.send(ToWriter::One(request.await));
                };
                match &config.export_runtime {
                    Some(rt) => tasks.spawn_on(waiting, rt),
                    None => tasks.spawn(waiting),
                };
            }
        }
    };

    // Stop reading; let in-flight requests finish and their replies drain, then close.
    hand_over(&mut batch);
    drop(tx);
    while tasks.join_next().await.is_some() {}
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "reply stream closed with an error"),
        Err(e) => tracing::error!(error = %e, "reply writer task failed"),
    }
    outcome
}

/// Read a BLOCK_STATUS payload of `length` bytes. A payload longer than any valid one for
/// `contexts` is skipped unread (as any refused payload is) and refused; the inner error
/// is the reason for an `NBD_EINVAL` reply, the outer one ends the session.
async fn read_block_status_filter<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: u64,
    contexts: &[u32],
) -> Result<Result<BlockStatusFilter, &'static str>, SessionError> {
    if length > block_status_payload_max(contexts.len()) {
        skip_payload(reader, length).await?;
        return Ok(Err(
            "block status payload names more contexts than were negotiated",
        ));
    }
    // At most 8 + 4 × contexts bytes, checked just above.
    let mut payload = vec![0u8; length as usize];
    reader.read_exact(&mut payload).await?;
    Ok(decode_block_status_payload(&payload, contexts))
}

async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    len: usize,
) -> io::Result<()> {
    while buf.len() < len {
        // `limit` keeps the read from running into the next request's header.
        let remaining = len - buf.len();
        let mut window = (&mut *buf).limit(remaining);
        if reader.read_buf(&mut window).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn execute(export: &dyn BlockExport, op: Op, size_bytes: u64) -> Body {
    match op {
        Op::Read { offset, len, df } => {
            if len == 0 {
                return Body::Read {
                    offset,
                    chunks: Vec::new(),
                    df,
                };
            }
            match export.read(offset, len).await {
                Ok(chunks) => {
                    let total: u64 = chunks.iter().map(|c| u64::from(c.len())).sum();
                    if total != u64::from(len) {
                        tracing::error!(offset, len, total, "export returned a short read");
                        return Body::error(Errno::Io, "export returned the wrong length");
                    }
                    Body::Read { offset, chunks, df }
                }
                Err(e) => e.into(),
            }
        }
        Op::Write { offset, data, fua } => {
            if data.is_empty() {
                return Body::Ok;
            }
            result_body(export.write(offset, data, fua).await)
        }
        Op::Flush => result_body(export.flush().await),
        Op::Trim { offset, len, fua } => {
            for (o, l) in pieces(offset, len) {
                if let Err(e) = export.trim(o, l, fua).await {
                    return e.into();
                }
            }
            Body::Ok
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => {
            for (o, l) in pieces(offset, len) {
                if let Err(e) = export.write_zeroes(o, l, fua, no_hole).await {
                    return e.into();
                }
            }
            Body::Ok
        }
        Op::Cache { offset, len } => {
            if len == 0 {
                return Body::Ok;
            }
            result_body(export.cache(offset, len).await)
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            // The length is only a hint; asking for less keeps the export's contract.
            let ask = len.min(u64::from(REQUEST_BYTES_MAX));
            match export.block_status(offset, ask).await {
                Ok(extents) => {
                    let available = size_bytes.saturating_sub(offset);
                    match clip_extents(extents, len, available, req_one) {
                        Some(extents) => Body::BlockStatus { extents },
                        None => {
                            tracing::error!(offset, len, "export returned no usable extents");
                            Body::error(Errno::Io, "export returned no extents")
                        }
                    }
                }
                Err(e) => e.into(),
            }
        }
    }
}

fn result_body(r: Result<(), ExportError>) -> Body {
    match r {
        Ok(()) => Body::Ok,
        Err(e) => e.into(),
    }
}

/// Split a range into pieces of at most REQUEST_BYTES_MAX (the export's contract).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let step = u64::from(REQUEST_BYTES_MAX);
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let n = step.min(len - done);
        let piece = (offset + done, n);
        done += n;
        Some(piece)
    })
}

/// Make an export's extents a valid BLOCK_STATUS reply: no empty extents, nothing past the
/// end of the export, with REQ_ONE a single extent no longer than the request, otherwise
/// stop at the first extent that reaches the requested length.
fn clip_extents(
    extents: Vec<(u32, u32)>,
    requested: u64,
    available: u64,
    req_one: bool,
) -> Option<Vec<(u32, u32)>> {
    let mut out = Vec::with_capacity(if req_one { 1 } else { extents.len() });
    let mut covered = 0u64;
    for (len, flags) in extents {
        let room = available.saturating_sub(covered);
        let len = u64::from(len).min(room);
        if len == 0 {
            if room == 0 {
                break;
            }
            continue;
        }
        if req_one {
            // At most the extent's own (32-bit) length.
            let len = len.min(requested) as u32;
            return Some(vec![(len, flags)]);
        }
        out.push((len as u32, flags));
        covered += len;
        if covered >= requested {
            break;
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

// ---- reply writer -------------------------------------------------------------------------

/// Reply bytes waiting to be written: small pieces (headers, small data) are copied into
/// one buffer; data pieces are queued by reference and go out with vectored writes, so a
/// cached read is copied once, by the kernel, from the page cache's blocks to the socket.
struct OutQueue {
    small: BytesMut,
    parts: Vec<Bytes>,
    /// Bytes in `parts`.
    queued_bytes: usize,
}

impl OutQueue {
    fn new() -> Self {
        Self {
            small: BytesMut::with_capacity(WRITE_BATCH_BYTES),
            parts: Vec::new(),
            queued_bytes: 0,
        }
    }

    /// Where encoders append headers and small replies.
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.small
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.queued_bytes += self.small.len();
            self.parts.push(self.small.split().freeze());
        }
    }

    fn push_data(&mut self, b: &Bytes) {
        if b.len() < ZERO_COPY_MIN_BYTES {
            self.small.extend_from_slice(b);
        } else {
            self.seal();
            self.queued_bytes += b.len();
            self.parts.push(b.clone());
        }
    }

    fn push_zeros(&mut self, mut len: usize) {
        while len > 0 {
            let n = len.min(ZEROS.len());
            self.push_data(&Bytes::from_static(&ZEROS[..n]));
            len -= n;
        }
    }

    fn push_chunk(&mut self, chunk: &ReadChunk) {
        match chunk {
            ReadChunk::Data(b) => self.push_data(b),
            ReadChunk::Pieces(ps) => ps.iter().for_each(|b| self.push_data(b)),
            ReadChunk::Hole(n) => self.push_zeros(*n as usize),
        }
    }

    fn pending_bytes(&self) -> usize {
        self.queued_bytes + self.small.len()
    }

    fn is_full(&self) -> bool {
        self.pending_bytes() >= WRITE_BATCH_BYTES || self.parts.len() >= IOVECS_PER_WRITE_MAX
    }

    /// Write everything queued, in order.
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        self.seal();
        let mut first = 0; // index of the first part not fully written
        let mut skip = 0; // bytes of parts[first] already written
        while first < self.parts.len() {
            let end = (first + IOVECS_PER_WRITE_MAX).min(self.parts.len());
            let slices: Vec<io::IoSlice<'_>> = self.parts[first..end]
                .iter()
                .enumerate()
                .map(|(i, b)| io::IoSlice::new(if i == 0 { &b[skip..] } else { &b[..] }))
                .collect();
            let mut n = writer.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while n > 0 && first < self.parts.len() {
                let left = self.parts[first].len() - skip;
                if n >= left {
                    n -= left;
                    first += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        self.parts.clear();
        self.queued_bytes = 0;
        Ok(())
    }
}

/// Encode replies as they arrive, batching whatever is queued into one vectored write. A
/// reply's permits are released only after its bytes were written, so what the queue holds
/// stays within the session's budget.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<ToWriter>,
    structured: bool,
    spares: Arc<Spares>,
) -> io::Result<()> {
    let mut q = OutQueue::new();
    let mut written = HeldPermits::default();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next {
            let (one, mut many) = match msg {
                ToWriter::One(r) => (Some(r), Vec::new()),
                ToWriter::Batch(rs) => (None, rs),
            };
            for reply in one.into_iter().chain(many.drain(..)) {
                let Outgoing {
                    to,
                    body,
                    _request_permit,
                    _bytes_permit,
                    _server_permit,
                } = reply;
                encode_reply(&mut q, to, body, structured);
                written.hold(_request_permit, _bytes_permit, _server_permit);
                if q.is_full() {
                    q.write_to(&mut writer).await?;
                    written.clear();
                }
            }
            if many.capacity() > 0 {
                spares.give(many);
            }
            next = rx.try_recv().ok();
        }
        q.write_to(&mut writer).await?;
        written.clear();
        writer.flush().await?;
    }
    writer.shutdown().await
}

/// The permits of replies queued but not yet written, merged per semaphore: each kind is
/// released with one semaphore lock per write, not one per reply (three locks per
/// request were 1.4% of the instructions of 4 KiB random writes).
#[derive(Default)]
struct HeldPermits {
    requests: Option<OwnedSemaphorePermit>,
    bytes: Option<OwnedSemaphorePermit>,
    server: Option<OwnedSemaphorePermit>,
}

impl HeldPermits {
    fn hold(
        &mut self,
        request: OwnedSemaphorePermit,
        bytes: Option<OwnedSemaphorePermit>,
        server: Option<OwnedSemaphorePermit>,
    ) {
        // Every permit of a kind comes from the same semaphore (the session's two, the
        // server's one), which is what `merge` requires.
        fn add(acc: &mut Option<OwnedSemaphorePermit>, p: Option<OwnedSemaphorePermit>) {
            match (acc.as_mut(), p) {
                (Some(a), Some(p)) => a.merge(p),
                (None, p) => *acc = p,
                (Some(_), None) => {}
            }
        }
        add(&mut self.requests, Some(request));
        add(&mut self.bytes, bytes);
        add(&mut self.server, server);
    }

    /// Release everything held (the replies went out).
    fn clear(&mut self) {
        *self = HeldPermits::default();
    }
}

/// Encode one reply: simple replies without structured replies, else chunks in the
/// connection's header form (`to`); with extended headers even a plain success is a chunk
/// (NONE), as the spec allows no simple replies there.
fn encode_reply(q: &mut OutQueue, to: ReplyTo, body: Body, structured: bool) {
    let cookie = to.cookie;
    match body {
        Body::Ok if to.extended => proto::encode_none_chunk(q.buf(), to),
        Body::Ok => SimpleReply { error: 0, cookie }.encode(q.buf()),
        Body::Error { errno, message } => {
            if structured {
                encode_error_chunk(q.buf(), to, errno as u32, &message);
            } else {
                SimpleReply {
                    error: errno as u32,
                    cookie,
                }
                .encode(q.buf());
            }
        }
        Body::BlockStatus { extents } => {
            encode_block_status(q.buf(), to, BASE_ALLOCATION_ID, &extents, true);
        }
        Body::Read { offset, chunks, df } => {
            if !structured {
                SimpleReply { error: 0, cookie }.encode(q.buf());
                for chunk in &chunks {
                    q.push_chunk(chunk);
                }
                return;
            }
            let chunks: Vec<&ReadChunk> = chunks.iter().filter(|c| !c.is_empty()).collect();
            let total: u32 = chunks.iter().map(|c| c.len()).sum();
            if chunks.is_empty() {
                proto::encode_none_chunk(q.buf(), to);
            } else if df && chunks.len() > 1 {
                // One content chunk only: a hole if it is all hole, else data with the
                // holes written out as zeros.
                if chunks.iter().all(|c| matches!(c, ReadChunk::Hole(_))) {
                    encode_offset_hole(q.buf(), to, offset, total, true);
                } else {
                    encode_offset_data_header(q.buf(), to, offset, total, true);
                    for chunk in chunks {
                        q.push_chunk(chunk);
                    }
                }
            } else {
                let last = chunks.len() - 1;
                let mut at = offset;
                for (i, chunk) in chunks.into_iter().enumerate() {
                    match chunk {
                        ReadChunk::Hole(n) => encode_offset_hole(q.buf(), to, at, *n, i == last),
                        data => {
                            encode_offset_data_header(q.buf(), to, at, data.len(), i == last);
                            q.push_chunk(data);
                        }
                    }
                    at += u64::from(chunk.len());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts at most 7 bytes per write (vectored or not), like a congested socket.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut left = 7;
            for b in bufs {
                let n = b.len().min(left);
                self.0.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(7 - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn out_queue_writes_everything_in_order_across_partial_writes() {
        let mut q = OutQueue::new();
        let mut want = Vec::new();
        let big: Vec<Bytes> = (0..600u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; 4096 + (i as usize % 3)]))
            .collect();
        // Small copied bytes, zero-copy pieces (more than one vectored write's worth),
        // zeros, and small bytes again.
        q.buf().extend_from_slice(b"header");
        want.extend_from_slice(b"header");
        q.push_chunk(&ReadChunk::Pieces(big.clone()));
        big.iter().for_each(|b| want.extend_from_slice(b));
        q.push_chunk(&ReadChunk::Hole(100_000));
        want.extend(std::iter::repeat_n(0u8, 100_000));
        q.push_data(&Bytes::from_static(b"tail"));
        want.extend_from_slice(b"tail");
        let mut w = Trickle(Vec::new());
        q.write_to(&mut w).await.unwrap();
        assert_eq!(w.0.len(), want.len());
        assert!(w.0 == want, "bytes differ");
        assert_eq!(q.pending_bytes(), 0);
        // The queue is reusable afterwards.
        q.push_data(&Bytes::from(vec![5u8; 5000]));
        q.write_to(&mut w).await.unwrap();
        assert_eq!(w.0.len(), want.len() + 5000);
    }

    #[test]
    fn pieces_cover_the_range() {
        let max = u64::from(REQUEST_BYTES_MAX);
        let v: Vec<_> = pieces(10, 2 * max + 5).collect();
        assert_eq!(v, vec![(10, max), (10 + max, max), (10 + 2 * max, 5)]);
        assert_eq!(pieces(0, 0).count(), 0);
    }

    #[test]
    fn extents_are_clipped() {
        // REQ_ONE: one extent, no longer than the request.
        assert_eq!(
            clip_extents(vec![(8192, 3), (4096, 0)], 4096, 1 << 20, true),
            Some(vec![(4096, 3)])
        );
        // Stop once the request is covered; drop empty extents; respect the device end.
        assert_eq!(
            clip_extents(
                vec![(0, 1), (512, 0), (8192, 3), (4096, 0)],
                1024,
                1 << 20,
                false
            ),
            Some(vec![(512, 0), (8192, 3)])
        );
        assert_eq!(
            clip_extents(vec![(8192, 3)], 1024, 2048, false),
            Some(vec![(2048, 3)])
        );
        assert_eq!(clip_extents(vec![], 1024, 2048, false), None);
        assert_eq!(clip_extents(vec![(0, 0)], 1024, 2048, true), None);
    }

    #[test]
    fn meta_context_queries() {
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(list_meta_contexts(&[]));
        assert!(list_meta_contexts(&q(&["base:"])));
        assert!(!list_meta_contexts(&q(&[
            "qemu:dirty-bitmap:x",
            "base:nope"
        ])));
        assert!(!select_meta_contexts(&[]));
        assert!(!select_meta_contexts(&q(&["base:"])));
        assert!(select_meta_contexts(&q(&["x-foo:bar", "base:allocation"])));
    }
}
