//! TLS with rustls (ring provider): the server config from `--tls-cert`/`--tls-key`, ALPN
//! `h2` and `http/1.1`, and a reloadable slot that SIGHUP swaps.
//!
//! **Invariant:** a connection takes the config current when it is accepted and keeps it; a
//! reload only changes what later connections see, so it never drops one. A reload that fails
//! (unreadable or mismatched files) keeps the previous config and says why in the log.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::Config;

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What a client that speaks plain HTTP to the TLS port gets, instead of a silent drop.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
connection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 61\r\n\r\n\
this port speaks TLS: use https:// or wss:// instead of http\n";

/// Whether a client on the TLS port spoke plain HTTP first (a TLS client opens with a
/// handshake record, byte 0x16; an HTTP request with an upper-case method). If so, answers
/// [`PLAIN_HTTP_ANSWER`], closes, and returns true. Reads at most 64 KiB for at most a second
/// (so that closing does not reset the connection before the client reads the answer). The
/// caller bounds the wait for the first byte (the handshake timeout).
pub async fn answer_plain_http(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0].is_ascii_uppercase() => {}
        _ => return false,
    }
    let mut buf = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while total < 64 * 1024 {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            total += n;
            // The request head ends with an empty line; the client waits for the answer then.
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
    let _ = stream.write_all(PLAIN_HTTP_ANSWER).await;
    let _ = stream.shutdown().await;
    true
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the certificate and key (e.g. they do not match).
    #[error("certificate/key: {0}")]
    Rustls(#[from] rustls::Error),
}

fn build(cert: &PathBuf, key: &PathBuf) -> Result<Arc<ServerConfig>, TlsError> {
    let pem = |path: &PathBuf, e: &dyn std::fmt::Display| TlsError::Pem {
        path: path.clone(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, &e))?;
    if chain.is_empty() {
        return Err(pem(cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// The node's TLS state: the current server config, swapped whole on reload.
pub struct Tls {
    current: ArcSwap<ServerConfig>,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// The TLS state of `cfg`, or `None` when TLS is off.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<Tls>>, TlsError> {
        let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Tls {
            current: ArcSwap::new(build(cert, key)?),
            cert: cert.clone(),
            key: key.clone(),
        })))
    }

    /// An acceptor with the current config (one atomic load).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Reads the files again and, if they are good, serves them to new connections.
    pub fn reload(&self) -> Result<(), TlsError> {
        let next = build(&self.cert, &self.key)?;
        self.current.store(next);
        Ok(())
    }
}
