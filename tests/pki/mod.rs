//! A throwaway PKI for TLS tests, made with the `openssl` command: a CA, a server
//! certificate for `localhost` and 127.0.0.1, a client certificate from the same CA, and
//! one from an unrelated CA. (Key usage names key encipherment too: qemu asks for it.) Directories follow the layout libnbd (`tls-certificates=`)
//! and qemu (`tls-creds-x509,dir=`) read: `ca-cert.pem`, `client-cert.pem`,
//! `client-key.pem`.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    _dir: tempfile::TempDir,
    /// Server certificate (signed by the CA) and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The CA certificate, for --tls-client-ca.
    pub ca_cert: PathBuf,
    /// A client directory with the CA only (verifies the server, no client certificate).
    pub client_anon: PathBuf,
    /// A client directory with the CA and a client certificate the CA signed.
    pub client_cert: PathBuf,
    /// A client directory with the CA and a client certificate from another CA.
    pub client_stranger: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key and a CA certificate named `name`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
        ],
    );
}

/// A P-256 key and a certificate `name` signed by CA `ca` with the extensions `ext`.
fn leaf(dir: &Path, name: &str, ca: &str, ext: &str, serial: u32) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "3650",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}-cert.pem"),
        ],
    );
}

/// Make a client directory `name` holding `ca` as `ca-cert.pem` and, if given, `client`'s
/// certificate and key.
fn client_dir(root: &Path, name: &str, client: Option<&str>) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(root.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    if let Some(c) = client {
        std::fs::copy(
            root.join(format!("{c}-cert.pem")),
            d.join("client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(root.join(format!("{c}-key.pem")), d.join("client-key.pem")).unwrap();
    }
    d
}

/// Whether the `openssl` command runs (tests print a loud skip without it).
pub fn available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn make() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    ca(root, "ca");
    ca(root, "stranger-ca");
    leaf(
        root,
        "server",
        "ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
         basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        1,
    );
    let client_ext = "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n\
                      keyUsage=critical,digitalSignature,keyEncipherment\n";
    leaf(root, "client", "ca", client_ext, 2);
    leaf(root, "stranger", "stranger-ca", client_ext, 3);
    Pki {
        server_cert: root.join("server-cert.pem"),
        server_key: root.join("server-key.pem"),
        ca_cert: root.join("ca-cert.pem"),
        client_anon: client_dir(root, "anon", None),
        client_cert: client_dir(root, "client", Some("client")),
        client_stranger: client_dir(root, "stranger", Some("stranger")),
        _dir: dir,
    }
}
