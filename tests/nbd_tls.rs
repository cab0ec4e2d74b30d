//! STARTTLS at the protocol level: a session over `tokio::io::duplex` driven by a small
//! client that speaks the handshake itself and upgrades with rustls. Real clients (libnbd,
//! qemu) over TLS are in `nbd_real_clients.rs` and `e2e_exports.rs`.

mod pki;

use std::sync::Arc;
use std::time::Duration;

use nbds3::nbd::mem::{MemExport, MemProvider};
use nbds3::nbd::session::{self, SessionConfig, SessionEnd, SessionError, Shutdown};
use nbds3::nbd::tls::{self, TlsMode};
use nbds3::nbd::ExportProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED: u32 = 8;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_TLS_REQD: u32 = 0x8000_0005;

const T_DF: u16 = 128;
const WRITE: u16 = 1;
const READ: u16 = 0;
const DISC: u16 = 2;

/// A handshake client over any stream (plain, then TLS).
struct Client<S> {
    s: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn greet(&mut self) {
        assert_eq!(self.s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(self.s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(self.s.read_u16().await.unwrap(), 3);
        // FIXED_NEWSTYLE | NO_ZEROES
        self.s.write_all(&3u32.to_be_bytes()).await.unwrap();
    }

    async fn opt(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).await.unwrap();
    }

    /// Every reply to the last option, the final one last.
    async fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            assert_eq!(self.s.read_u64().await.unwrap(), REPLY_MAGIC);
            assert_eq!(self.s.read_u32().await.unwrap(), option);
            let kind = self.s.read_u32().await.unwrap();
            let mut data = vec![0u8; self.s.read_u32().await.unwrap() as usize];
            self.s.read_exact(&mut data).await.unwrap();
            let last = kind == REP_ACK || kind & 0x8000_0000 != 0;
            out.push((kind, data));
            if last {
                return out;
            }
        }
    }

    async fn final_reply(&mut self, option: u32, data: &[u8]) -> u32 {
        self.opt(option, data).await;
        self.replies(option).await.last().unwrap().0
    }

    /// NBD_OPT_GO on `name`; returns the transmission flags.
    async fn go(&mut self, name: &str) -> u16 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.opt(OPT_GO, &d).await;
        let replies = self.replies(OPT_GO).await;
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        let export = replies
            .iter()
            .find(|(k, d)| *k == REP_INFO && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        u16::from_be_bytes(export.1[10..12].try_into().unwrap())
    }

    async fn req(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).await.unwrap();
    }

    /// A simple reply: (cookie, error).
    async fn simple(&mut self) -> (u64, u32) {
        assert_eq!(self.s.read_u32().await.unwrap(), SIMPLE_MAGIC);
        let error = self.s.read_u32().await.unwrap();
        (self.s.read_u64().await.unwrap(), error)
    }

    async fn expect_eof(&mut self) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b))
            .await
            .expect("server did not close")
            .unwrap_or(0);
        assert_eq!(n, 0, "expected end of stream");
    }
}

struct Fixture {
    client: Client<tokio::io::DuplexStream>,
    session: JoinHandle<Result<SessionEnd, SessionError>>,
    provider: Arc<MemProvider>,
    _pki: pki::Pki,
    ca: std::path::PathBuf,
}

fn start(mode: Option<TlsMode>) -> Option<Fixture> {
    if !pki::available() {
        eprintln!("\n*** SKIPPING: `openssl` is not available; TLS tests not run ***\n");
        return None;
    }
    let pki = pki::make();
    let tls = mode.map(|m| tls::load(&pki.server_cert, &pki.server_key, None, m).unwrap());
    let provider = Arc::new(MemProvider::new().with_export("disk", MemExport::new(1 << 20, 4096)));
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let (_trigger, shutdown) = Shutdown::channel();
    std::mem::forget(_trigger);
    let dyn_provider: Arc<dyn ExportProvider> = provider.clone();
    let config = SessionConfig {
        tls,
        ..SessionConfig::default()
    };
    let session = tokio::spawn(session::serve_stream(
        server_end,
        dyn_provider,
        config,
        shutdown,
    ));
    Some(Fixture {
        client: Client { s: client_end },
        session,
        provider,
        ca: pki.ca_cert.clone(),
        _pki: pki,
    })
}

/// Upgrade the client side to TLS, verifying the server against the test CA as `localhost`.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    ca: &std::path::Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), s)
        .await
}

#[tokio::test]
async fn required_tls_serves_nothing_before_starttls() {
    let Some(mut f) = start(Some(TlsMode::Require)) else {
        return;
    };
    f.client.greet().await;
    for option in [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED, 999] {
        assert_eq!(
            f.client.final_reply(option, &[]).await,
            ERR_TLS_REQD,
            "{option}"
        );
    }
    assert_eq!(f.client.final_reply(OPT_STARTTLS, b"x").await, ERR_INVALID);
    assert_eq!(f.client.final_reply(OPT_STARTTLS, &[]).await, REP_ACK);
    let s = upgrade(f.client.s, &f.ca).await.expect("TLS handshake");
    let mut c = Client { s };
    // Over TLS everything is served; a second STARTTLS is invalid.
    assert_eq!(c.final_reply(OPT_STARTTLS, &[]).await, ERR_INVALID);
    c.opt(OPT_LIST, &[]).await;
    let list = c.replies(OPT_LIST).await;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].0, REP_SERVER);
    c.go("disk").await;
    c.req(WRITE, 1, 4096, 4096).await;
    c.s.write_all(&[0x42; 4096]).await.unwrap();
    assert_eq!(c.simple().await, (1, 0));
    c.req(READ, 2, 4096, 4096).await;
    assert_eq!(c.simple().await, (2, 0));
    let mut data = vec![0u8; 4096];
    c.s.read_exact(&mut data).await.unwrap();
    assert_eq!(data, vec![0x42; 4096]);
    c.req(DISC, 3, 0, 0).await;
    c.expect_eof().await;
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Disconnected);
    assert_eq!(f.provider.open_count("disk"), 0);
}

#[tokio::test]
async fn required_tls_ends_a_plain_export_name() {
    let Some(mut f) = start(Some(TlsMode::Require)) else {
        return;
    };
    f.client.greet().await;
    f.client.opt(OPT_EXPORT_NAME, b"disk").await;
    f.client.expect_eof().await;
    assert!(matches!(
        f.session.await.unwrap(),
        Err(SessionError::TlsRequired)
    ));
    assert_eq!(f.provider.open_count("disk"), 0);
}

#[tokio::test]
async fn allowed_tls_serves_plain_clients_and_forgets_what_came_before_the_upgrade() {
    let Some(mut f) = start(Some(TlsMode::Allow)) else {
        return;
    };
    f.client.greet().await;
    // Plain options work; structured replies negotiated in clear...
    assert_eq!(f.client.final_reply(OPT_STRUCTURED, &[]).await, REP_ACK);
    assert_eq!(f.client.final_reply(OPT_STARTTLS, &[]).await, REP_ACK);
    let s = upgrade(f.client.s, &f.ca).await.expect("TLS handshake");
    let mut c = Client { s };
    // ...do not carry over: no DF without structured replies negotiated over TLS.
    assert_eq!(c.go("disk").await & T_DF, 0);
    c.req(DISC, 1, 0, 0).await;
    c.expect_eof().await;
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Disconnected);

    // And a client that never upgrades is served.
    let Some(mut f) = start(Some(TlsMode::Allow)) else {
        return;
    };
    f.client.greet().await;
    assert_eq!(f.client.go("disk").await & T_DF, 0);
    f.client.req(DISC, 1, 0, 0).await;
    f.client.expect_eof().await;
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Disconnected);
}

#[tokio::test]
async fn starttls_without_tls_configured_is_unsupported() {
    let Some(mut f) = start(None) else {
        return;
    };
    f.client.greet().await;
    assert_eq!(f.client.final_reply(OPT_STARTTLS, &[]).await, ERR_UNSUP);
    f.client.opt(OPT_ABORT, &[]).await;
    assert_eq!(f.client.replies(OPT_ABORT).await[0].0, REP_ACK);
    assert_eq!(f.session.await.unwrap().unwrap(), SessionEnd::Aborted);
}

#[tokio::test]
async fn bytes_sent_before_the_starttls_ack_end_the_session() {
    let Some(mut f) = start(Some(TlsMode::Require)) else {
        return;
    };
    f.client.greet().await;
    // STARTTLS and, without waiting for its ACK, something that is not a TLS hello.
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(b"GET / HTTP/1.0\r\n");
    f.client.s.write_all(&m).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), f.session)
        .await
        .expect("session ends")
        .unwrap();
    assert!(
        matches!(ended, Err(SessionError::DataBeforeTls(16))),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_failed_tls_handshake_ends_only_that_session() {
    let Some(mut f) = start(Some(TlsMode::Require)) else {
        return;
    };
    f.client.greet().await;
    assert_eq!(f.client.final_reply(OPT_STARTTLS, &[]).await, REP_ACK);
    // A client that does not trust this server's CA gives up during the handshake.
    let stranger = pki::make();
    assert!(upgrade(f.client.s, &stranger.ca_cert).await.is_err());
    let ended = tokio::time::timeout(Duration::from_secs(5), f.session)
        .await
        .expect("session ends")
        .unwrap();
    assert!(matches!(ended, Err(SessionError::Tls(_))), "{ended:?}");
}
