//! What every stream request (`/ws`, `/sse`) and API query carries, read the same way by each
//! transport: the token and the connection's auth ([`ConnAuth`]), and the query's form pairs.
//! Here so that the transports share it without importing one another.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::Request;

use super::ShardContext;

/// Who a connection is and what it may do.
pub(crate) struct ConnAuth {
    /// What the connection may do.
    pub grants: crate::auth::Grants,
    /// The token's subject; `None`: anonymous.
    pub user: Option<Arc<str>>,
    /// Presence info from the token.
    pub info: Option<Bytes>,
    /// Token expiry, Unix seconds.
    pub exp: Option<u64>,
}

impl ConnAuth {
    pub(crate) fn anonymous(ctx: &ShardContext) -> ConnAuth {
        ConnAuth {
            grants: ctx.node.anonymous_grants(),
            user: None,
            info: None,
            exp: None,
        }
    }

    pub(crate) fn from_principal(p: crate::auth::Principal) -> ConnAuth {
        ConnAuth {
            grants: p.grants,
            user: Some(p.sub),
            info: p.info,
            exp: Some(p.exp),
        }
    }
}

/// The token of a request: `?token=`, else `Authorization: Bearer`.
pub(crate) fn request_token<B>(req: &Request<B>) -> Option<String> {
    let query = req.uri().query().unwrap_or("");
    form_pairs(query)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .or_else(|| {
            req.headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|v| v.trim().to_owned())
        })
}

/// The connection's auth from its request: anonymous without a token (or with auth off), the
/// token's principal with one, an error for a bad one.
pub(crate) fn connection_auth(
    ctx: &ShardContext,
    req: &Request<Incoming>,
) -> Result<ConnAuth, crate::auth::TokenError> {
    let Some(auth) = &ctx.node.auth else {
        return Ok(ConnAuth::anonymous(ctx));
    };
    match request_token(req) {
        None => Ok(ConnAuth::anonymous(ctx)),
        Some(t) => auth.verify(&t).map(ConnAuth::from_principal),
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs.
pub fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode_component(k), decode_component(v))
    })
}

fn decode_component(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}
