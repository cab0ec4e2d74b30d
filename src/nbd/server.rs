//! The accept loop: takes connections from TCP and Unix listeners, runs one
//! [`session`](super::session) per connection, and shuts down gracefully.
//!
//! Invariants:
//! - Requests of all sessions together hold at most `request_bytes_in_flight_total_max`
//!   bytes of payload and replies (one shared budget), besides each session's own bound.
//! - At most `connections_max` sessions run at once; a connection above the limit is closed
//!   straight away (and logged) rather than queued, so a flood cannot hold memory.
//! - Every TCP connection has TCP_NODELAY set: replies are small and latency-bound.
//! - Accept errors (EMFILE, ECONNABORTED …) are logged and retried after a pause; they never
//!   end the server.
//! - On shutdown: stop accepting, tell sessions to stop reading, wait up to
//!   `shutdown_grace_ms` for their in-flight requests to finish, then abort the rest.
//! - A session's failure or panic is logged and affects no other connection.
//! - Each session runs on a thread of its own with a single-threaded runtime (its socket,
//!   reader and reply writer live there), while the exports live on the runtime that
//!   called [`run`]: every export call is made in that runtime's context, so nothing an
//!   export starts (flusher, lease, store connections, timers) ends with a connection.
//!   Threads are bounded by `connections_max`; at shutdown, sessions still running after
//!   the grace period are dropped by their threads, and `run` returns once every thread
//!   has finished.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::pool::PayloadPool;
use super::session::{self, InContext, ServerBytes, SessionConfig, Shutdown};
use super::tls::TlsConfig;
use super::ExportProvider;

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Where the listener is bound, for logs and tests.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("tcp (unknown address: {e})")),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "unix (unnamed)".to_owned()),
        }
    }

    async fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                Ok(Connection::Tcp(stream, peer))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok(Connection::Unix(stream))
            }
        }
    }
}

enum Connection {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

/// Server-wide limits.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Concurrent connections; more are closed on accept.
    pub connections_max: usize,
    /// Per connection: requests read but not yet answered.
    pub requests_in_flight_max: usize,
    /// Per connection: WRITE payload and READ reply bytes held by in-flight requests.
    pub request_bytes_in_flight_max: usize,
    /// All connections together: WRITE payload and READ reply bytes held by in-flight
    /// requests (so memory does not scale with `connections_max`).
    pub request_bytes_in_flight_total_max: usize,
    /// Per connection: time allowed for option haggling.
    pub handshake_timeout_ms: u64,
    /// Per connection: largest option data accepted.
    pub option_bytes_max: u32,
    /// On shutdown: how long sessions get to finish in-flight requests.
    pub shutdown_grace_ms: u64,
    /// Where WRITE payload buffers are recycled, all connections together (see
    /// [`super::pool`]); `None`: each payload is its own allocation.
    pub payload_pool: Option<Arc<PayloadPool>>,
    /// STARTTLS offered (or required); `None`: refused.
    pub tls: Option<TlsConfig>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        let session = SessionConfig::default();
        Self {
            connections_max: 256,
            requests_in_flight_max: session.requests_in_flight_max,
            request_bytes_in_flight_max: session.request_bytes_in_flight_max,
            request_bytes_in_flight_total_max: 512 * 1024 * 1024,
            handshake_timeout_ms: session.handshake_timeout.as_millis() as u64,
            option_bytes_max: session.option_bytes_max,
            shutdown_grace_ms: 30_000,
            payload_pool: None,
            tls: None,
        }
    }
}

impl ServerLimits {
    /// One session configuration for the whole server: its `server_bytes` budget is the
    /// same semaphore for every connection.
    fn session_config(&self) -> SessionConfig {
        SessionConfig {
            requests_in_flight_max: self.requests_in_flight_max,
            request_bytes_in_flight_max: self.request_bytes_in_flight_max,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            option_bytes_max: self.option_bytes_max,
            server_bytes: Some(ServerBytes::new(self.request_bytes_in_flight_total_max)),
            payload_pool: self.payload_pool.clone(),
            tls: self.tls.clone(),
            export_runtime: None,
        }
    }
}

/// Pause after a failed accept (typically EMFILE), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accept on every listener until `shutdown` resolves, then drain sessions and return.
pub async fn run(
    listeners: Vec<Listener>,
    provider: Arc<dyn ExportProvider>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    if listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no listeners to serve",
        ));
    }
    for l in &listeners {
        tracing::info!(listener = %l.describe(), "listening");
    }
    // Exports live on the runtime that called us; sessions run on threads of their own.
    let exports = tokio::runtime::Handle::current();
    let provider: Arc<dyn ExportProvider> = Arc::new(OnRuntime {
        inner: provider,
        handle: exports.clone(),
    });
    let mut config = limits.session_config();
    config.export_runtime = Some(exports);
    let (stop_tx, stop) = Shutdown::channel();
    let (abort_tx, abort) = Shutdown::channel();
    let mut sessions = JoinSet::new();
    let mut next_id: u64 = 0;
    tokio::pin!(shutdown);

    loop {
        let accept_any =
            futures::future::select_all(listeners.iter().map(|l| Box::pin(l.accept())));
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = sessions.join_next(), if !sessions.is_empty() => log_join(done),
            (accepted, _, _) = accept_any => {
                let connection = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                while let Some(done) = sessions.try_join_next() {
                    log_join(done);
                }
                next_id += 1;
                let (peer, socket) = match connection {
                    Connection::Tcp(stream, peer) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        (peer.to_string(), stream.into_std().map(Socket::Tcp))
                    }
                    Connection::Unix(stream) => ("unix".to_owned(), stream.into_std().map(Socket::Unix)),
                };
                if sessions.len() >= limits.connections_max {
                    tracing::warn!(%peer, connections_max = limits.connections_max,
                        "connection limit reached; closing new connection");
                    continue;
                }
                let span = tracing::info_span!("nbd_conn", conn = next_id, %peer, export = tracing::field::Empty);
                // Off the shared runtime's reactor: the session's own runtime takes it.
                let socket = match socket {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot hand the connection to a session thread; closing it");
                        continue;
                    }
                };
                let session = Session {
                    socket,
                    provider: Arc::clone(&provider),
                    config: config.clone(),
                    stop: stop.clone(),
                    abort: abort.clone(),
                };
                match spawn_session(next_id, session, span) {
                    Ok(finished) => {
                        sessions.spawn(async move {
                            // The sender is dropped unsent only if the thread panicked.
                            if finished.await.is_err() {
                                tracing::error!("session thread panicked");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot start a session thread; closing connection"),
                }
            }
        }
    }

    // Stop accepting first, so clients see refused connections rather than silence.
    drop(listeners);
    let _ = stop_tx.send(true);
    let active = sessions.len();
    if active > 0 {
        tracing::info!(
            active,
            "shutting down: waiting for sessions to finish in-flight requests"
        );
    }
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    let drained = tokio::time::timeout(grace, async {
        while let Some(done) = sessions.join_next().await {
            log_join(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = sessions.len(),
            ?grace,
            "sessions did not finish in time; aborting them"
        );
        // Each session thread drops its session (cancelling its requests) and exits.
        let _ = abort_tx.send(true);
        while sessions.join_next().await.is_some() {}
    }
    tracing::info!("server stopped");
    Ok(())
}

/// What a session thread needs.
struct Session {
    socket: Socket,
    provider: Arc<dyn ExportProvider>,
    config: SessionConfig,
    stop: Shutdown,
    abort: Shutdown,
}

/// Run one connection's session on a thread of its own with a single-threaded runtime;
/// the receiver resolves when the thread has finished (an error if it panicked).
///
/// Why a thread per connection: with the session's reader and writer tasks on a shared
/// multi-threaded runtime, an idle worker picks up each socket event and the reply is
/// written from the other core, so every request paid a cross-core wake-up and an extra
/// `epoll_wait` + `recv` (tools/bench/RESULTS.md, session 18). On its own thread a
/// connection reads the requests that queued while it was writing in one `recv`, and the
/// exports' flush pipeline keeps the shared runtime's workers. Export calls still run in
/// the shared runtime's context ([`SessionConfig::export_runtime`]).
fn spawn_session(
    id: u64,
    session: Session,
    span: tracing::Span,
) -> io::Result<tokio::sync::oneshot::Receiver<()>> {
    let Session {
        socket,
        provider,
        config,
        stop,
        mut abort,
    } = session;
    let (finished, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _enter = span.enter();
                    tracing::warn!(error = %e, "cannot build a session runtime; closing connection");
                    let _ = finished.send(());
                    return;
                }
            };
            let run = async move {
                tracing::debug!("connected");
                tokio::select! {
                    biased;
                    _ = abort.wait() => tracing::warn!("session aborted at shutdown"),
                    result = serve_socket(socket, provider, config, stop) => match result {
                        Ok(end) => tracing::info!(?end, "connection closed"),
                        // A client vanishing mid-stream is routine, not a server problem.
                        Err(session::SessionError::Io(e)) if client_went_away(&e) => {
                            tracing::info!(error = %e, "client went away")
                        }
                        Err(e) => tracing::warn!(error = %e, "connection dropped"),
                    },
                }
            };
            runtime.block_on(run.instrument(span));
            // Local tasks (the reply writer) go with the runtime, before we report done.
            drop(runtime);
            let _ = finished.send(());
        })?;
    Ok(done)
}

/// An accepted connection's socket, not registered with any runtime.
enum Socket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// Register the socket with the session's runtime and serve it.
async fn serve_socket(
    socket: Socket,
    provider: Arc<dyn ExportProvider>,
    config: SessionConfig,
    stop: Shutdown,
) -> Result<session::SessionEnd, session::SessionError> {
    match socket {
        Socket::Tcp(s) => {
            let (r, w) = TcpStream::from_std(s)?.into_split();
            let join =
                |r: tokio::net::tcp::OwnedReadHalf, w| r.reunite(w).map_err(io::Error::other);
            session::serve(r, w, join, provider, config, stop).await
        }
        Socket::Unix(s) => {
            let (r, w) = UnixStream::from_std(s)?.into_split();
            let join =
                |r: tokio::net::unix::OwnedReadHalf, w| r.reunite(w).map_err(io::Error::other);
            session::serve(r, w, join, provider, config, stop).await
        }
    }
}

/// An export provider whose calls (opening an export starts its background tasks) run in
/// the context of the runtime the exports live on, not a session's own.
struct OnRuntime {
    inner: Arc<dyn ExportProvider>,
    handle: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl ExportProvider for OnRuntime {
    async fn open(&self, name: &str) -> Result<Arc<dyn super::BlockExport>, super::ExportError> {
        InContext::new(Some(self.handle.clone()), self.inner.open(name)).await
    }
    async fn list(&self) -> Result<Vec<String>, super::ExportError> {
        InContext::new(Some(self.handle.clone()), self.inner.list()).await
    }
    async fn release(&self, name: &str) {
        InContext::new(Some(self.handle.clone()), self.inner.release(name)).await
    }
}

fn client_went_away(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionAborted
    )
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "session panicked");
        }
    }
}
