//! The admin UI at `/admin` (off unless `--admin-password` or `--admin-token` is set): one page
//! and its script and style, embedded from `clients/admin/`, and its JSON API under
//! `/admin/api/` (node status, every node of a cluster, channels, a channel's history and
//! presence, a live tail, publish).
//!
//! The API reuses the HTTP API's handlers with every grant (`api::publish`, `api::history`,
//! `api::presence`, `api::channels`) and the SSE transport for the tail (`sse::open_as`): the
//! admin UI is a way in to them, never a second implementation.
//!
//! **Auth.** The login form posts the password; it is compared as an HMAC under a per-process
//! random key (constant time, and its length does not leak). Login attempts are rate-limited per
//! client address ([`LOGIN_RATE`]; `relay_refused_total{cause="api_rate_limited"}`), wrong ones
//! counted as `unauthorized`. A success sets a session cookie `exp.MAC` (HMAC-SHA256 of the
//! expiry under the same key: it dies with the process, and sessions need no table), HttpOnly,
//! SameSite=Strict, `Path=/admin`, Secure with TLS, for [`SESSION_TTL`]. Scripts send
//! `Authorization: Bearer <--admin-token>` instead. A state-changing request authorised by the
//! cookie (publish, logout) must come from the page's own origin: its `Origin` host must be the
//! request's `Host` (CSRF). The page is served with a `Content-Security-Policy` that allows
//! only its own script, style and connections.
//!
//! **Invariant:** with neither setting, every `/admin` path is a 404, as if the module did not
//! exist; nothing under `/admin/api/` answers without a valid session or token.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, COOKIE, HOST, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use ring::hmac;
use serde_json::{json, Value};

use super::http::{error, json as json_response, Body};
use super::{api, Node, ShardContext};
use crate::auth::Grants;
use crate::backplane::roster::Roster;

/// The page, its script and its style.
pub const INDEX_HTML: &str = include_str!("../../clients/admin/index.html");
/// The page's script.
pub const APP_JS: &str = include_str!("../../clients/admin/app.js");
/// The page's style.
pub const APP_CSS: &str = include_str!("../../clients/admin/app.css");

/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Login attempts per second per client address (burst: twice as many).
pub const LOGIN_RATE: u32 = 1;

const COOKIE_NAME: &str = "relay_admin";
/// Only the page's own script, style and connections; no inline code, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The admin UI's state, in the [`Node`].
pub struct Admin {
    /// Signs sessions and hides the secrets' lengths when they are compared.
    key: hmac::Key,
    password: Option<hmac::Tag>,
    token: Option<hmac::Tag>,
    logins: crate::limits::ApiLimiter,
    started: Instant,
    started_unix: u64,
    /// Milliseconds after `started` of the last sweep of `logins`.
    swept: AtomicU64,
    /// The other nodes of a cluster, when the backplane is shared ([`announce`]).
    roster: OnceLock<Arc<Roster>>,
}

impl Admin {
    /// The admin state, or `None` when `/admin` is off (neither a password nor a token is set,
    /// or no random key can be had).
    pub fn new(config: &crate::config::Config) -> Option<Admin> {
        if config.admin_password.is_none() && config.admin_token.is_none() {
            return None;
        }
        let rng = ring::rand::SystemRandom::new();
        let key = match hmac::Key::generate(hmac::HMAC_SHA256, &rng) {
            Ok(k) => k,
            Err(_) => {
                tracing::error!("no random key for admin sessions: /admin stays off");
                return None;
            }
        };
        let tag = |s: &Option<String>| s.as_ref().map(|s| hmac::sign(&key, s.as_bytes()));
        let now = crate::types::now();
        Some(Admin {
            password: tag(&config.admin_password),
            token: tag(&config.admin_token),
            key,
            logins: crate::limits::ApiLimiter::new(LOGIN_RATE, 0, 0, now),
            started: now,
            started_unix: crate::auth::unix_now(),
            swept: AtomicU64::new(0),
            roster: OnceLock::new(),
        })
    }

    fn matches(&self, secret: &Option<hmac::Tag>, given: &str) -> bool {
        secret
            .as_ref()
            .is_some_and(|t| hmac::verify(&self.key, given.as_bytes(), t.as_ref()).is_ok())
    }

    /// A session cookie value that expires at Unix second `exp`.
    fn session(&self, exp: u64) -> String {
        let mac = hmac::sign(&self.key, exp.to_string().as_bytes());
        format!(
            "{exp}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.as_ref())
        )
    }

    /// Whether `value` is a session of ours that has not expired.
    fn valid_session(&self, value: &str) -> bool {
        let Some((exp, mac)) = value.split_once('.') else {
            return false;
        };
        let (Ok(exp_n), Ok(mac)) = (
            exp.parse::<u64>(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(mac),
        ) else {
            return false;
        };
        exp_n > crate::auth::unix_now() && hmac::verify(&self.key, exp.as_bytes(), &mac).is_ok()
    }

    /// Counts a login attempt of the request's client; the wait before the next one when it is
    /// over [`LOGIN_RATE`].
    fn login_allowed(&self, node: &Node, req: &Request<Incoming>) -> Result<(), Duration> {
        let now = crate::types::now();
        // Forget refilled buckets at most once a second (logins are rare; no timer needed).
        let ms = now.saturating_duration_since(self.started).as_millis() as u64;
        let last = self.swept.load(Relaxed);
        if ms >= last + 1000
            && self
                .swept
                .compare_exchange(last, ms, Relaxed, Relaxed)
                .is_ok()
        {
            self.logins.sweep(now);
        }
        // The client a trusted proxy names, else the peer itself: unlike the API, a login
        // attempt is never unlimited (a proxy that names nobody shares one bucket).
        let who = req
            .extensions()
            .get::<super::Peer>()
            .map(|p| node.client(p, req.headers()).unwrap_or(p.ip))
            .map_or(
                crate::limits::ApiClient::Unknown,
                crate::limits::ApiClient::Ip,
            );
        self.logins.check(who, now)
    }
}

/// How a request to `/admin/api/` is authorised.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The session cookie (a browser: state changes need the same origin).
    Session,
    /// `Authorization: Bearer <--admin-token>` (a script; not ambient, so no CSRF).
    Token,
}

fn caller(admin: &Admin, req: &Request<Incoming>) -> Option<Caller> {
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|t| admin.matches(&admin.token, t.trim())) {
        return Some(Caller::Token);
    }
    let session = req
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE_NAME && admin.valid_session(v));
    session.then_some(Caller::Session)
}

/// Whether the request comes from a page of this very server: its `Origin` names the host
/// the request was sent to. The scheme is not compared, so that a TLS-terminating proxy in
/// front does not break the check.
fn same_origin(req: &Request<Incoming>) -> bool {
    let origin = req.headers().get(ORIGIN).and_then(|v| v.to_str().ok());
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let origin_host = origin.and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Routes `/admin` and `/admin/*`.
pub async fn handle(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    let Some(admin) = ctx.node.admin.as_ref() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such path");
    };
    let path = req.uri().path().to_owned();
    let mut res = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/admin" | "/admin/") => {
            let mut res = fixed(INDEX_HTML, "text/html; charset=utf-8");
            res.headers_mut()
                .insert("content-security-policy", HeaderValue::from_static(CSP));
            res
        }
        (Method::GET, "/admin/app.js") => fixed(APP_JS, "text/javascript; charset=utf-8"),
        (Method::GET, "/admin/app.css") => fixed(APP_CSS, "text/css; charset=utf-8"),
        // Whether the (HttpOnly) session cookie is still good: the page asks before it shows
        // the login form, so that a logged-out page makes no failing request.
        (Method::GET, "/admin/session") => json_response(
            StatusCode::OK,
            json!({ "session": caller(admin, &req) == Some(Caller::Session) }).to_string(),
        ),
        (Method::POST, "/admin/login") => login(&ctx, admin, req).await,
        (Method::POST, "/admin/logout") => match caller(admin, &req) {
            Some(Caller::Session) if !same_origin(&req) => cross_origin(),
            _ => {
                let mut res = Response::new(Body::Empty);
                *res.status_mut() = StatusCode::NO_CONTENT;
                set_cookie(&mut res, &format!("{COOKIE_NAME}=; Max-Age=0"), &ctx);
                res
            }
        },
        (_, p) if p.starts_with("/admin/api/") => match caller(admin, &req) {
            None => {
                crate::limits::refused(crate::limits::Cause::Unauthorized, "admin api");
                error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "log in at /admin, or send Authorization: Bearer <--admin-token>",
                )
            }
            Some(Caller::Session) if req.method() != Method::GET && !same_origin(&req) => {
                cross_origin()
            }
            Some(_) => admin_api(ctx.clone(), req).await,
        },
        (_, "/admin" | "/admin/" | "/admin/app.js" | "/admin/app.css") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        (_, "/admin/login" | "/admin/logout") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin path"),
    };
    let h = res.headers_mut();
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    res
}

fn cross_origin() -> Response<Body> {
    crate::limits::refused(crate::limits::Cause::Origin, "admin (not same-origin)");
    error(
        StatusCode::FORBIDDEN,
        "forbidden_origin",
        "an admin change needs the admin page's own Origin",
    )
}

fn fixed(text: &'static str, kind: &'static str) -> Response<Body> {
    super::landing::fixed(Bytes::from_static(text.as_bytes()), kind, "no-cache")
}

fn set_cookie(res: &mut Response<Body>, cookie: &str, ctx: &ShardContext) {
    let secure = if ctx.node.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let value = format!("{cookie}; Path=/admin; HttpOnly; SameSite=Strict{secure}");
    if let Ok(v) = HeaderValue::from_str(&value) {
        res.headers_mut().append(hyper::header::SET_COOKIE, v);
    }
}

/// `POST /admin/login` with a form body `password=…`: 204 and the session cookie, 401 for a
/// wrong password, 429 past [`LOGIN_RATE`].
async fn login(ctx: &ShardContext, admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    // A login form posted from another site would log the victim's browser in to ours.
    if req.headers().contains_key(ORIGIN) && !same_origin(&req) {
        return cross_origin();
    }
    if let Err(wait) = admin.login_allowed(&ctx.node, &req) {
        crate::limits::refused(crate::limits::Cause::ApiRateLimited, "admin login");
        return api::rate_limited("login attempts", wait);
    }
    let body = match api::read_body(ctx, req).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    let given = super::request::form_pairs(&String::from_utf8_lossy(&body))
        .find(|(k, _)| k == "password")
        .map(|(_, v)| v)
        .unwrap_or_default();
    if !admin.matches(&admin.password, &given) {
        crate::limits::refused(crate::limits::Cause::Unauthorized, "admin login");
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "wrong password");
    }
    let exp = crate::auth::unix_now() + SESSION_TTL.as_secs();
    let mut res = Response::new(Body::Empty);
    *res.status_mut() = StatusCode::NO_CONTENT;
    let cookie = format!(
        "{COOKIE_NAME}={}; Max-Age={}",
        admin.session(exp),
        SESSION_TTL.as_secs()
    );
    set_cookie(&mut res, &cookie, ctx);
    res
}

/// `/admin/api/*`, once authorised.
async fn admin_api(ctx: Rc<ShardContext>, req: Request<Incoming>) -> Response<Body> {
    let all = Grants::all();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/admin/api/status") => {
            json_response(StatusCode::OK, status(&ctx.node).to_string())
        }
        (Method::GET, "/admin/api/nodes") => {
            json_response(StatusCode::OK, nodes(&ctx.node).to_string())
        }
        (Method::GET, "/admin/api/channels") => api::channels(&ctx, &query, true),
        (Method::GET, p) if p.starts_with("/admin/api/history/") => {
            api::history(&ctx, &all, &p["/admin/api/history/".len()..], &query).await
        }
        (Method::GET, p) if p.starts_with("/admin/api/presence/") => {
            let rest = &p["/admin/api/presence/".len()..];
            // The inspector opens any channel: one without presence is an empty answer that
            // says so, not the API's 404.
            let name = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
            match crate::types::ChannelName::new(&name) {
                Ok(ch) if !ctx.node.engine.has_presence(&ch) => json_response(
                    StatusCode::OK,
                    json!({ "channel": ch.as_str(), "presence": false, "members": [] }).to_string(),
                ),
                _ => api::presence(&ctx, &all, rest, &query).await,
            }
        }
        (Method::GET, "/admin/api/tail") => {
            let admin = super::request::ConnAuth {
                grants: all,
                user: None,
                info: None,
                exp: None,
            };
            super::sse::open_as(ctx, req, Some(admin)).await
        }
        (Method::POST, "/admin/api/publish") => match api::read_body(&ctx, req).await {
            Ok(b) => match api::parse(&b) {
                Ok(body) => api::publish(&ctx, &all, body).await,
                Err(res) => res,
            },
            Err(res) => res,
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin API path"),
    }
}

/// This node: version, id, uptime, shards with their connections, memory, backplane, and the
/// totals of published and delivered messages (the page's rates are their differences).
pub fn status(node: &Node) -> Value {
    use crate::engine::memory::Kind;
    let meter = node.engine.meter();
    let memory: serde_json::Map<String, Value> = Kind::ALL
        .iter()
        .map(|k| (k.as_str().to_owned(), meter.bytes(*k).into()))
        .collect();
    let shards: Vec<Value> = node
        .load
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "shard": i,
                "ws": l.ws.load(Relaxed),
                "sse": l.sse.load(Relaxed),
                "subscriptions": l.subscriptions.load(Relaxed),
            })
        })
        .collect();
    let sum = |f: fn(&crate::metrics::ShardLoad) -> i64| node.load.iter().map(f).sum::<i64>();
    // The registry's counters (process-wide), read from the text `/metrics` serves: the hot
    // path keeps its one atomic per pump pass.
    let text = crate::metrics::render(|| super::engine_figures(&node.engine)).unwrap_or_default();
    let (started, uptime) = node
        .admin
        .as_ref()
        .map_or((0, 0), |a| (a.started_unix, a.started.elapsed().as_secs()));
    json!({
        "node": node.config.node_id(),
        "version": env!("CARGO_PKG_VERSION"),
        "started": started,
        "uptime": uptime,
        "draining": node.is_leaving(),
        "backplane": {
            "kind": format!("{:?}", node.config.backplane).to_lowercase(),
            "ready": node.backplane.is_ready(),
        },
        "connections": sum(|l| l.ws.load(Relaxed) + l.sse.load(Relaxed)),
        "subscriptions": sum(|l| l.subscriptions.load(Relaxed)),
        "channels": node.engine.channel_count(),
        "shards": shards,
        "memory": {
            "limit": meter.limit(),
            "pressure": meter.pressure() as u8,
            "bytes": memory,
        },
        "published": counter_sum(&text, "relay_messages_published_total"),
        "delivered": counter_sum(&text, "relay_messages_delivered_total"),
    })
}

/// The sum of every series of counter `name` in Prometheus text.
fn counter_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// This node (`"self": true`) and every other node that announced itself on the backplane
/// within [`crate::backplane::roster::FORGET_AFTER`], by id.
pub fn nodes(node: &Node) -> Value {
    let me = node.config.node_id();
    let mut own = status(node);
    own["self"] = true.into();
    let mut all = vec![own];
    if let Some(roster) = node.admin.as_ref().and_then(|a| a.roster.get()) {
        for (id, record) in roster.peers() {
            if id == me {
                continue;
            }
            let mut v: Value = serde_json::from_str(&record).unwrap_or_else(|_| json!({}));
            v["node"] = id.into();
            v["self"] = false.into();
            all.push(v);
        }
    }
    all[1..].sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    json!({ "nodes": all })
}

/// With the admin UI on and a shared backplane, starts announcing this node's status on it
/// and listening for the others' ([`Roster`]); otherwise does nothing.
pub fn announce(node: &Arc<Node>) -> std::io::Result<()> {
    use crate::config::BackplaneKind;
    let Some(admin) = node.admin.as_ref() else {
        return Ok(());
    };
    let target = match node.config.backplane {
        BackplaneKind::Memory => return Ok(()),
        BackplaneKind::Redis => {
            crate::backplane::roster::Target::Redis(node.config.redis_url.clone())
        }
        BackplaneKind::Nats => crate::backplane::roster::Target::Nats(node.config.nats_url.clone()),
    };
    let weak = Arc::downgrade(node);
    let record = move || weak.upgrade().map(|n| status(&n).to_string());
    let roster = Roster::start(
        target,
        node.config.node_id().to_owned(),
        Box::new(record),
        node.shutdown.clone(),
    )?;
    let _ = admin.roster.set(roster);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn admin() -> Admin {
        let c = crate::config::Config {
            admin_password: Some("correct horse".into()),
            admin_token: Some("0123456789abcdef-token".into()),
            ..Default::default()
        };
        Admin::new(&c).unwrap()
    }

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_with_our_key() {
        let a = admin();
        let now = crate::auth::unix_now();
        assert!(a.valid_session(&a.session(now + 60)));
        assert!(!a.valid_session(&a.session(now.saturating_sub(1))));
        // Another process's key, a changed expiry, garbage.
        assert!(!admin().valid_session(&a.session(now + 60)));
        let s = a.session(now + 60);
        let forged = format!("{}{}", now + 6000, &s[s.find('.').unwrap()..]);
        assert!(!a.valid_session(&forged));
        assert!(!a.valid_session("x.y") && !a.valid_session(""));
    }

    #[test]
    fn secrets_match_only_in_full() {
        let a = admin();
        assert!(a.matches(&a.password, "correct horse"));
        assert!(!a.matches(&a.password, "correct hors"));
        assert!(!a.matches(&a.password, ""));
        assert!(a.matches(&a.token, "0123456789abcdef-token"));
        assert!(!a.matches(&a.token, "correct horse"));
    }

    #[test]
    fn counters_are_summed_over_their_series_only() {
        let text = "# HELP relay_messages_published_total x\n\
                    relay_messages_published_total 7\n\
                    relay_messages_published_total_other 100\n\
                    relay_connections{transport=\"ws\"} 2\n\
                    relay_connections{transport=\"sse\"} 3\n";
        assert_eq!(counter_sum(text, "relay_messages_published_total"), 7);
        assert_eq!(counter_sum(text, "relay_connections"), 5);
        assert_eq!(counter_sum(text, "relay_nothing"), 0);
    }
}
