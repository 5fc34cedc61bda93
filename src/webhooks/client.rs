//! The outbound HTTP client of webhooks and the backend proxy: hyper's pooled client over
//! plain TCP or rustls (ring, with the webpki root certificates compiled in, so a static binary
//! needs no system store). hyper is already in the binary; this adds only its client half.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Why a POST failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, sending or reading failed.
    #[error("{0}")]
    Http(String),
    /// The receiver answered with a status other than 2xx.
    #[error("status {0}")]
    Status(u16),
    /// The answer's body was larger than allowed.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// A cheap-to-clone pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<HttpConnector>,
        Full<Bytes>,
    >,
}

impl Client {
    /// A client for `http://` and `https://` URLs. Must be used inside a tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        Ok(Self { inner })
    }

    /// POSTs `body` (JSON) with `headers` to `url`; `Ok` on a 2xx answer within `timeout`
    /// (its body is read and dropped).
    pub async fn post(
        &self,
        url: &hyper::Uri,
        headers: Vec<(hyper::header::HeaderName, String)>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(), PostError> {
        self.send(hyper::Method::POST, url, headers, body, timeout, None)
            .await
            .map(|_| ())
    }

    /// GETs `url` and returns the 2xx answer's body, at most `max_answer` bytes.
    pub async fn get(
        &self,
        url: &hyper::Uri,
        timeout: Duration,
        max_answer: usize,
    ) -> Result<Bytes, PostError> {
        self.send(
            hyper::Method::GET,
            url,
            Vec::new(),
            Bytes::new(),
            timeout,
            Some(max_answer),
        )
        .await
    }

    /// One exchange within `timeout`; the answer's body is kept when `keep` gives its most
    /// bytes (a longer one fails), else read and dropped.
    pub async fn send(
        &self,
        method: hyper::Method,
        url: &hyper::Uri,
        headers: Vec<(hyper::header::HeaderName, String)>,
        body: Bytes,
        timeout: Duration,
        keep: Option<usize>,
    ) -> Result<Bytes, PostError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(url.clone())
            .header(
                hyper::header::USER_AGENT,
                concat!("relay/", env!("CARGO_PKG_VERSION")),
            );
        if !body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| PostError::Http(e.to_string()))?;
        let exchange = async {
            let res = self
                .inner
                .request(req)
                .await
                .map_err(|e| PostError::Http(e.to_string()))?;
            let status = res.status();
            let mut body = res.into_body();
            let mut out = bytes::BytesMut::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| PostError::Http(e.to_string()))?;
                if let (Some(d), Some(max)) = (frame.data_ref(), keep) {
                    if out.len() + d.len() > max {
                        return Err(PostError::TooLarge(max));
                    }
                    out.extend_from_slice(d);
                }
            }
            if !status.is_success() {
                return Err(PostError::Status(status.as_u16()));
            }
            Ok(out.freeze())
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| PostError::Timeout(timeout))?
    }
}
