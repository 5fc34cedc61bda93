//! The sans-IO core of a session: inputs come in with `now`, decisions go out as values, and a
//! driver (`ws.rs`, `sse.rs`, `pusher/ws.rs`) does the I/O. [`commands`]: who a connection is,
//! what it may do and which channels it holds ([`SessionCore`], shared by `/ws` and `/sse`).
//! [`reader`]: the read side of a WebSocket session (shared by `/ws` and Pusher's `/app/KEY`).
//!
//! Here: the session's timers, shared by the WebSocket sessions: keep-alive (ping after
//! `--ping-interval` of silence, close after `--idle-timeout`), the auth deadlines (no token
//! within `--auth-timeout`, an expired token not refreshed in time) and the close grace. It
//! reads no clock: `now` comes in with every call, so that its rules are tested as scripts
//! (`tests` below) and a driver decides whose clock is used. The driver asks
//! [`SessionClock::poll_timeout`] when to wake it, and acts on what
//! [`SessionClock::handle_timeout`] says is [`Due`]. Nothing here runs per delivered message.

pub mod commands;
pub mod reader;

pub use commands::{
    on_connect, Claim, Close, Gate, OverBudget, Refusal, Rules, SessionCore, Timed, Unsubscribe,
};

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

/// The drivers' clock: tokio's, which is the system's in production and the test's paused
/// clock under `start_paused` / `tokio::time::pause()`; the drivers' timers sleep on the same
/// clock, so a paused test drives the sessions' timeouts. (The core itself never reads it.)
pub fn now() -> Instant {
    crate::types::now()
}

/// The settings the clock follows (from the node's config).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Silence after which the server pings.
    pub ping_interval: Duration,
    /// Silence after which the connection is closed.
    pub idle_timeout: Duration,
    /// How long a connection may go without a valid token (at the start, or after its token
    /// expired).
    pub auth_timeout: Duration,
    /// How long a closing connection may take to finish the close handshake.
    pub close_grace: Duration,
}

impl Timeouts {
    /// The node's settings, with the transport's close grace.
    pub fn from_config(cfg: &crate::config::Config, close_grace: Duration) -> Self {
        Self {
            ping_interval: cfg.ping_interval,
            idle_timeout: cfg.idle_timeout,
            auth_timeout: cfg.auth_timeout,
            close_grace,
        }
    }
}

/// What a timeout asks the driver to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing yet (woken early).
    Nothing,
    /// Send a ping (the protocol's own).
    Ping,
    /// Close: nothing came in for the idle timeout.
    Idle,
    /// Close (4001): no valid token within the auth timeout.
    AuthTimeout,
    /// Close (4003): the token expired and no refresh came within the auth timeout.
    RefreshTimeout,
    /// The token expired now: tell the client, which has `refresh_within` to refresh (or
    /// close at once where the protocol has no refresh).
    TokenExpired {
        /// The time left for a refresh.
        refresh_within: Duration,
    },
    /// The close grace is over: drop the connection.
    End,
}

/// A session's deadlines. See the module docs. The settings ([`Timeouts`]) come in with each
/// call rather than living here: every connection holds a clock.
#[derive(Debug)]
pub struct SessionClock {
    last_inbound: Instant,
    ping_sent: bool,
    /// The deadlines besides keep-alive, boxed and made when the first is set: an anonymous
    /// idle session has none, and every connection's task holds its clock (issue 12 item 4:
    /// 88 bytes inline were 56 more in each task than these 32).
    rare: Option<Box<Deadlines>>,
}

/// The deadlines a session has only while it authenticates, holds an expiring token or
/// closes.
#[derive(Debug, Default)]
struct Deadlines {
    /// Set once the session closes: it ends at this time at the latest.
    close: Option<Instant>,
    /// Close with 4001 at this time unless a token comes.
    auth: Option<Instant>,
    /// When the token expires.
    expiry: Option<Instant>,
    /// Close with 4003 at this time unless a refresh comes.
    refresh: Option<Instant>,
}

impl SessionClock {
    /// The clock of a session opened at `now`, whose token expires at `expiry` (`None`: no
    /// token or no expiry). `needs_token`: the connection may do nothing without one, so it
    /// must authenticate within the auth timeout.
    pub fn new(t: &Timeouts, now: Instant, expiry: Option<Instant>, needs_token: bool) -> Self {
        let auth = needs_token.then(|| now + t.auth_timeout);
        Self {
            last_inbound: now,
            ping_sent: false,
            rare: (auth.is_some() || expiry.is_some()).then(|| {
                Box::new(Deadlines {
                    auth,
                    expiry,
                    ..Deadlines::default()
                })
            }),
        }
    }

    /// The rare deadlines, none if never set.
    fn deadlines(&self) -> &Deadlines {
        const NONE: &Deadlines = &Deadlines {
            close: None,
            auth: None,
            expiry: None,
            refresh: None,
        };
        self.rare.as_deref().unwrap_or(NONE)
    }

    /// The rare deadlines, to set one.
    fn deadlines_mut(&mut self) -> &mut Deadlines {
        self.rare.get_or_insert_with(Box::default)
    }

    /// When the driver must call [`SessionClock::handle_timeout`] next.
    pub fn poll_timeout(&self, t: &Timeouts) -> Instant {
        let d = self.deadlines();
        if let Some(close) = d.close {
            return close;
        }
        let keepalive = if self.ping_sent {
            self.last_inbound + t.idle_timeout
        } else {
            self.last_inbound + t.ping_interval
        };
        [d.auth, d.expiry, d.refresh]
            .into_iter()
            .flatten()
            .fold(keepalive, Instant::min)
    }

    /// What is due at `now`. The auth deadlines come first, then keep-alive; once closing,
    /// only the end of the grace.
    pub fn handle_timeout(&mut self, now: Instant, t: &Timeouts) -> Due {
        let d = self.deadlines();
        if let Some(close) = d.close {
            return if now >= close { Due::End } else { Due::Nothing };
        }
        if d.auth.is_some_and(|d| now >= d) {
            return Due::AuthTimeout;
        }
        if d.refresh.is_some_and(|d| now >= d) {
            return Due::RefreshTimeout;
        }
        if d.expiry.is_some_and(|d| now >= d) {
            let d = self.deadlines_mut();
            d.expiry = None;
            d.refresh = Some(now + t.auth_timeout);
            return Due::TokenExpired {
                refresh_within: t.auth_timeout,
            };
        }
        if now >= self.last_inbound + t.idle_timeout {
            return Due::Idle;
        }
        if !self.ping_sent && now >= self.last_inbound + t.ping_interval {
            self.ping_sent = true;
            return Due::Ping;
        }
        Due::Nothing
    }

    /// Bytes came in at `now`: the peer is alive.
    pub fn on_inbound(&mut self, now: Instant) {
        self.last_inbound = now;
        self.ping_sent = false;
    }

    /// When bytes last came in.
    pub fn last_inbound(&self) -> Instant {
        self.last_inbound
    }

    /// The session closes at `now`: it ends at the close grace at the latest. Returns false
    /// when it was already closing (the first close decides).
    pub fn close(&mut self, now: Instant, t: &Timeouts) -> bool {
        if self.is_closing() {
            return false;
        }
        self.deadlines_mut().close = Some(now + t.close_grace);
        true
    }

    /// Whether the session is closing.
    pub fn is_closing(&self) -> bool {
        self.deadlines().close.is_some()
    }

    /// A token came (`auth`): no auth deadline any more; the token's expiry counts.
    pub fn authenticated(&mut self, expiry: Option<Instant>) {
        if self.rare.is_none() && expiry.is_none() {
            return;
        }
        let d = self.deadlines_mut();
        d.auth = None;
        d.expiry = expiry;
        self.tidy();
    }

    /// A new token for the same subject (`refresh`): its expiry replaces the old one.
    pub fn refreshed(&mut self, expiry: Option<Instant>) {
        if self.rare.is_none() && expiry.is_none() {
            return;
        }
        let d = self.deadlines_mut();
        d.expiry = expiry;
        d.refresh = None;
        self.tidy();
    }

    /// Frees the box once no rare deadline is left (a token without expiry came in time).
    fn tidy(&mut self) {
        if let Some(Deadlines {
            close: None,
            auth: None,
            expiry: None,
            refresh: None,
        }) = self.rare.as_deref()
        {
            self.rare = None;
        }
    }
}

/// Decisions a session waits for without stopping its other work. Each entry is a request
/// (`T`: what the session needs to finish it) and a future of the answer, which some other
/// part performs (the backplane bringing a channel in sync; a backend's answer to a proxied
/// connect or subscribe fits the same way). The driver's loop awaits [`Pending::next`] next
/// to its reads and timers and hands the request and its answer back to the session, which
/// finishes it. Bounded by the caller (a subscribe waiting counts as a subscription).
pub struct Pending<T, R> {
    waiting: Vec<(T, Answer<R>)>,
}

/// A decision's answer, to come.
pub type Answer<R> = Pin<Box<dyn Future<Output = R>>>;

impl<T, R> Default for Pending<T, R> {
    fn default() -> Self {
        Self {
            waiting: Vec::new(),
        }
    }
}

impl<T, R> Pending<T, R> {
    /// Holds `request` until `answer` completes.
    pub fn hold(&mut self, request: T, answer: Answer<R>) {
        self.waiting.push((request, answer));
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Whether a waiting request matches `f`.
    pub fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.waiting.iter().any(|(t, _)| f(t))
    }

    /// Drops the first waiting request that matches `f` (its answer no longer matters) and
    /// returns it.
    pub fn cancel(&mut self, f: impl Fn(&T) -> bool) -> Option<T> {
        let i = self.waiting.iter().position(|(t, _)| f(t))?;
        Some(self.waiting.swap_remove(i).0)
    }

    /// The first request whose answer has come, with the answer; pending while none has (and
    /// for ever when none waits).
    pub async fn next(&mut self) -> (T, R) {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Pending::next`] as a poll, for a driver that polls its sources itself.
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> Poll<(T, R)> {
        for i in 0..self.waiting.len() {
            if let Poll::Ready(r) = self.waiting[i].1.as_mut().poll(cx) {
                let (t, _) = self.waiting.swap_remove(i);
                return Poll::Ready((t, r));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        ping_interval: Duration::from_secs(25),
        idle_timeout: Duration::from_secs(60),
        auth_timeout: Duration::from_secs(10),
        close_grace: Duration::from_secs(3),
    };

    /// One step of a script: at `secs`, an input, then what `handle_timeout` must say.
    enum Step {
        /// Bytes come in.
        Inbound,
        /// The driver wakes at the clock's own timeout, which must be at `secs`.
        Wake(Due),
        /// A token comes, expiring this many seconds after the start.
        Auth(Option<u64>),
        /// A refresh, expiring this many seconds after the start.
        Refresh(Option<u64>),
        /// The driver closes the session.
        Close,
    }

    /// Runs `script` (seconds since the start, step) on a fresh clock and checks every wake-up
    /// happens at the time the clock asked for and says what the script expects.
    fn check(expiry: Option<u64>, needs_token: bool, script: &[(u64, Step)]) {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = SessionClock::new(&T, t0, expiry.map(at), needs_token);
        for (i, (secs, step)) in script.iter().enumerate() {
            let now = at(*secs);
            match step {
                Step::Inbound => c.on_inbound(now),
                Step::Wake(want) => {
                    assert_eq!(c.poll_timeout(&T), now, "step {i}: woken at the wrong time");
                    assert_eq!(c.handle_timeout(now, &T), *want, "step {i}");
                }
                Step::Auth(exp) => c.authenticated(exp.map(at)),
                Step::Refresh(exp) => c.refreshed(exp.map(at)),
                Step::Close => {
                    c.close(now, &T);
                }
            }
        }
    }

    use Step::*;

    #[test]
    fn a_silent_connection_is_pinged_then_closed_at_the_idle_timeout() {
        check(
            None,
            false,
            &[(25, Wake(Due::Ping)), (60, Wake(Due::Idle)), (60, Close)],
        );
    }

    #[test]
    fn traffic_puts_off_the_ping_and_a_pong_the_idle_close() {
        check(
            None,
            false,
            &[
                (20, Inbound),
                (45, Wake(Due::Ping)),
                (50, Inbound),
                (75, Wake(Due::Ping)),
                (110, Wake(Due::Idle)),
            ],
        );
    }

    #[test]
    fn a_connection_without_a_token_closes_at_the_auth_timeout() {
        check(None, true, &[(10, Wake(Due::AuthTimeout))]);
    }

    #[test]
    fn a_token_in_time_lifts_the_auth_deadline_and_its_expiry_counts() {
        check(
            None,
            true,
            &[
                (5, Auth(Some(20))),
                (
                    20,
                    Wake(Due::TokenExpired {
                        refresh_within: T.auth_timeout,
                    }),
                ),
                (25, Wake(Due::Ping)),
                (30, Wake(Due::RefreshTimeout)),
            ],
        );
    }

    #[test]
    fn a_refresh_in_time_keeps_the_connection_until_the_new_expiry() {
        check(
            Some(5),
            false,
            &[
                (
                    5,
                    Wake(Due::TokenExpired {
                        refresh_within: T.auth_timeout,
                    }),
                ),
                (8, Refresh(Some(100))),
                (25, Wake(Due::Ping)),
                (30, Inbound),
                (55, Wake(Due::Ping)),
                (90, Wake(Due::Idle)),
            ],
        );
    }

    #[test]
    fn a_closing_session_ends_at_the_grace_whatever_else_was_due() {
        check(Some(1), true, &[(0, Close), (3, Wake(Due::End))]);
        let t0 = Instant::now();
        let mut c = SessionClock::new(&T, t0, None, false);
        assert!(c.close(t0, &T));
        assert!(
            !c.close(t0 + Duration::from_secs(1), &T),
            "the first close decides"
        );
        assert_eq!(
            c.handle_timeout(t0 + Duration::from_secs(2), &T),
            Due::Nothing
        );
        assert_eq!(c.poll_timeout(&T), t0 + T.close_grace);
    }

    #[test]
    fn a_pending_decision_comes_back_with_its_request_and_a_cancelled_one_never() {
        use std::task::{Context, Waker};
        let mut p: Pending<&str, u32> = Pending::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        p.hold("a", Box::pin(async { rx.await.unwrap_or(0) }));
        p.hold("b", Box::pin(std::future::pending()));
        p.hold("c", Box::pin(std::future::ready(3)));
        assert_eq!(p.cancel(|t| *t == "c"), Some("c"));
        assert!(p.any(|t| *t == "b") && !p.any(|t| *t == "c"));
        let mut cx = Context::from_waker(Waker::noop());
        {
            let next = std::pin::pin!(p.next());
            assert!(next.poll(&mut cx).is_pending(), "no answer yet");
        }
        assert!(tx.send(7).is_ok());
        {
            let next = std::pin::pin!(p.next());
            match next.poll(&mut cx) {
                Poll::Ready(got) => assert_eq!(got, ("a", 7)),
                Poll::Pending => panic!("the answer came"),
            }
        }
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn an_anonymous_clock_keeps_its_rare_deadlines_out_of_line_until_needed() {
        let t0 = Instant::now();
        let mut c = SessionClock::new(&T, t0, None, false);
        assert!(c.rare.is_none(), "an anonymous idle session has no box");
        let mut a = SessionClock::new(&T, t0, None, true);
        assert_eq!(a.poll_timeout(&T), t0 + T.auth_timeout);
        a.authenticated(None);
        assert!(a.rare.is_none(), "a token without expiry frees it");
        assert_eq!(a.poll_timeout(&T), t0 + T.ping_interval);
        assert!(c.close(t0, &T));
        assert_eq!(c.poll_timeout(&T), t0 + T.close_grace);
        assert!(!c.close(t0 + T.close_grace, &T), "the first close decides");
    }
}
