//! The sans-IO core of a session's commands, shared by `/ws` and `/sse`: who the connection is
//! (its token, refreshed or expired), what it may do (grants, `--max-subscriptions`, the
//! inbound `--rate-limit`), which presence identity it joins with, and which of its channels are
//! subscribed or still waiting for the backplane. Commands come in with `now`; decisions come
//! out as values ([`Refusal`], [`Close`], [`Timed`], [`Unsubscribe`]) that the driver turns
//! into frames, hub calls and closes. It holds no socket, outbox, hub or node: its rules are
//! tested as scripts (`tests` below), once for both transports. Nothing here runs per delivered
//! message (fan-out goes from the hub to the outbox without the session).

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use smallvec::SmallVec;

use super::{Due, SessionClock, Timeouts};
use crate::auth::{Perm, Principal};
use crate::engine::presence::Identity;
use crate::engine::{Overloaded, SubscribeError};
use crate::limits::{Cause, TokenBucket, Verdict};
use crate::protocol::codes::{
    CLOSE_RATE_LIMITED, CLOSE_TOKEN_EXPIRED, CLOSE_TRY_AGAIN, CLOSE_UNAUTHORIZED,
};
use crate::transport::request::ConnAuth;
use crate::types::ChannelName;

/// The node's rules a session follows, read from its settings when a decision needs them
/// (not kept per connection).
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// `--max-subscriptions`: channels per connection (subscribed or waiting to be).
    pub max_subscriptions: usize,
    /// JWT auth is on: presence identity comes from the token, and `auth` is accepted.
    pub jwt: bool,
    /// `--client-presence`: an anonymous client may name its own presence user and info.
    pub client_presence: bool,
}

impl Rules {
    /// The node's rules.
    pub fn of(cfg: &crate::config::Config, jwt: bool) -> Self {
        Self {
            max_subscriptions: cfg.max_subscriptions,
            jwt,
            client_presence: cfg.client_presence(),
        }
    }
}

/// A refused command: the error the client is told, and the cause counted in
/// `relay_refused_total` (`None`: not a limit). The core counts it when it decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error code (`protocol::codes::ERROR_CODES`).
    pub code: &'static str,
    /// The message.
    pub message: Cow<'static, str>,
    /// What it counts as.
    pub cause: Option<Cause>,
}

impl Refusal {
    const fn new(code: &'static str, message: &'static str, cause: Option<Cause>) -> Self {
        Self {
            code,
            message: Cow::Borrowed(message),
            cause,
        }
    }

    /// Counts the refusal (`relay_refused_total`) and returns it.
    fn counted(self, detail: &str) -> Self {
        if let Some(c) = self.cause {
            crate::limits::refused(c, detail);
        }
        self
    }
}

/// A close the driver performs: the close code and its reason.
pub type Close = (u16, &'static str);

/// The answer to a refused `auth`: the error, and a close when the rule ends the connection.
pub type Refused = (Refusal, Option<Close>);

/// An inbound message over the rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Answer it with this error (and drop it).
    Refuse(Refusal),
    /// Close the connection: it kept sending over the limit.
    Close(Close),
}

/// What a timer asks of the driver (after [`SessionCore::on_timeout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timed {
    /// Nothing yet.
    Nothing,
    /// Send the protocol's ping.
    Ping,
    /// Close the session.
    Close(Close),
    /// Tell the client its token expired: it has this long to refresh.
    TokenExpired(Duration),
    /// The close grace is over: drop the connection.
    End,
}

/// What an unsubscribe finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsubscribe {
    /// The channel was waiting for the backplane: the driver drops its pending join.
    Waiting,
    /// The channel was subscribed: the driver leaves it in the hub.
    Subscribed,
    /// Neither: `not_subscribed`.
    Not,
}

/// A client's claim on its presence identity (WebSocket `presence` on subscribe, SSE
/// `presence_user` / `presence_info`): a user id and normalised info.
#[derive(Clone, Debug, Default)]
pub struct Claim {
    /// The user id the client names.
    pub user: Option<Arc<str>>,
    /// The info (a JSON object, normalised).
    pub info: Option<Bytes>,
}

impl Claim {
    fn claims(&self) -> bool {
        self.user.is_some() || self.info.is_some()
    }
}

const TOO_MANY: Refusal = Refusal::new(
    "too_many_subscriptions",
    "this connection has the most subscriptions allowed",
    Some(Cause::TooManySubscriptions),
);
const ALREADY: Refusal = Refusal::new(
    "already_subscribed",
    "already subscribed to this channel",
    None,
);
const RATE_LIMITED: Refusal = Refusal::new(
    "rate_limited",
    "too many messages: slow down (--rate-limit)",
    Some(Cause::RateLimited),
);
/// Presence identity comes from the token when auth is on.
pub const CLAIM_WITH_TOKEN: &str = "presence identity comes from the token here (JWT auth is on)";
const CLAIM_OFF: &str = "presence identity comes from the server here (--client-presence false)";

/// A session's state apart from its socket: auth, clock, rate and subscriptions. See the
/// module docs.
pub struct SessionCore {
    /// Keep-alive, auth deadlines and the close grace.
    pub clock: SessionClock,
    /// Shared by a shard's anonymous connections (see `ConnAuth::shared`).
    auth: Rc<ConnAuth>,
    /// Inbound message rate; `None`: no limit.
    bucket: Option<TokenBucket>,
    /// The subscribed channels, in the order the hub numbered them, then the last `joining`:
    /// those waiting for the backplane to bring them in sync (they count as subscriptions).
    /// One vector rather than two: every connection holds this, and joins are rare. Most
    /// connections subscribe to one channel: it is kept inline (a `Vec` would allocate room
    /// for four).
    subs: SmallVec<[ChannelName; 1]>,
    joining: u32,
}

impl SessionCore {
    /// The core of a session opened at `now` with `auth` (from its request). `needs_token`: it
    /// may do nothing without a token, so it must authenticate within the auth timeout.
    /// `rate`: the inbound message rate and burst (rate 0: no limit).
    pub(crate) fn new(
        t: &Timeouts,
        now: Instant,
        auth: impl Into<Rc<ConnAuth>>,
        needs_token: bool,
        (rate, burst): (u32, u32),
    ) -> Self {
        let auth = auth.into();
        let expiry = auth.exp.map(|e| instant_at(e, now));
        Self {
            clock: SessionClock::new(t, now, expiry, needs_token && auth.user.is_none()),
            auth,
            bucket: (rate > 0).then(|| TokenBucket::new(rate, burst, now)),
            subs: SmallVec::new(),
            joining: 0,
        }
    }

    /// Who the connection is.
    pub(crate) fn auth(&self) -> &ConnAuth {
        &self.auth
    }

    /// The subscribed channels.
    pub fn subs(&self) -> &[ChannelName] {
        &self.subs[..self.subs.len() - self.joining as usize]
    }

    /// Whether `channel` is subscribed or waiting to be.
    pub fn has(&self, channel: &ChannelName) -> bool {
        self.subs.contains(channel)
    }

    /// A message (not a control frame) came in at `now`: `Ok` to handle it, else what the
    /// inbound rate limit says.
    pub fn on_message(&mut self, now: Instant) -> Result<(), Gate> {
        let Some(bucket) = self.bucket.as_mut() else {
            return Ok(());
        };
        match bucket.take(now) {
            Verdict::Ok => Ok(()),
            Verdict::Refuse => Err(Gate::Refuse(RATE_LIMITED.counted("inbound message rate"))),
            Verdict::Close => {
                crate::limits::refused(Cause::RateClosed, "inbound message rate");
                Err(Gate::Close((CLOSE_RATE_LIMITED, "rate limit exceeded")))
            }
        }
    }

    /// Whether the grants allow `perm` on `channel`; the `forbidden` refusal if not.
    pub fn may(&self, perm: Perm, channel: &ChannelName) -> Result<(), Refusal> {
        if self.auth.grants.allows(perm, channel.as_str()) {
            return Ok(());
        }
        let message = match perm {
            Perm::Subscribe => "no subscribe permission on this channel",
            Perm::Publish => "no publish permission on this channel",
            Perm::Presence => "no presence permission on this channel",
            Perm::History => "no history permission on this channel",
        };
        Err(Refusal::new("forbidden", message, Some(Cause::Forbidden)).counted(perm.as_str()))
    }

    /// Whether `channel` may be added (not yet subscribed or waiting, and room under
    /// `--max-subscriptions`). The grants are checked apart ([`SessionCore::may`]): the server
    /// API subscribes a connection whatever they say.
    pub fn admit(&self, rules: &Rules, channel: &ChannelName) -> Result<(), Refusal> {
        if self.has(channel) {
            return Err(ALREADY);
        }
        if self.subs.len() >= rules.max_subscriptions {
            return Err(TOO_MANY.counted("subscribe"));
        }
        Ok(())
    }

    /// Whether the client may claim a presence identity of its own: not where identity comes
    /// from the token (auth is on, or the connection has a subject), nor where the node names
    /// its clients (`--client-presence false`).
    pub fn check_claim(&self, rules: &Rules, claim: &Claim) -> Result<(), Refusal> {
        if !claim.claims() {
            return Ok(());
        }
        let message = if rules.jwt || self.auth.user.is_some() {
            CLAIM_WITH_TOKEN
        } else if !rules.client_presence {
            CLAIM_OFF
        } else {
            return Ok(());
        };
        Err(Refusal::new("forbidden", message, Some(Cause::Forbidden)).counted("presence claim"))
    }

    /// The presence member to join a channel with presence as, with connection id `client`:
    /// the token's subject and info when the connection has a token; else what the client
    /// claims, where the node lets clients name themselves; else a user of its own (its
    /// client id).
    pub fn presence_identity(
        &self,
        rules: &Rules,
        client: &Arc<str>,
        claim: Claim,
    ) -> Result<Identity, Refusal> {
        self.check_claim(rules, &claim)?;
        Ok(match &self.auth.user {
            Some(user) => Identity {
                client: client.clone(),
                user: user.clone(),
                info: self.auth.info.clone(),
            },
            None => Identity {
                client: client.clone(),
                user: claim.user.unwrap_or_else(|| client.clone()),
                info: claim.info,
            },
        })
    }

    /// `channel` waits for the backplane (after [`SessionCore::admit`]); it counts as a
    /// subscription meanwhile.
    pub fn wait_join(&mut self, channel: ChannelName) {
        self.subs.push(channel);
        self.joining += 1;
    }

    /// The backplane answered for `channel`: it no longer waits. False when it was not waiting
    /// (unsubscribed meanwhile: the answer no longer matters).
    pub fn join_answered(&mut self, channel: &ChannelName) -> bool {
        let waiting = self.subs.len() - self.joining as usize;
        match self.subs[waiting..].iter().position(|c| c == channel) {
            Some(i) => {
                self.subs.remove(waiting + i);
                self.joining -= 1;
                true
            }
            None => false,
        }
    }

    /// The hub took the subscription: the slot the hub numbers it with (its index).
    pub fn subscribed(&mut self, channel: ChannelName) {
        let at = self.subs.len() - self.joining as usize;
        self.subs.insert(at, channel);
    }

    /// The slot the next subscription gets.
    pub fn next_slot(&self) -> u16 {
        (self.subs.len() - self.joining as usize) as u16
    }

    /// An unsubscribe: where the channel was (it is neither afterwards).
    pub fn unsubscribe(&mut self, channel: &ChannelName) -> Unsubscribe {
        if self.join_answered(channel) {
            return Unsubscribe::Waiting;
        }
        match self.subs().iter().position(|c| c == channel) {
            Some(i) => {
                self.subs.remove(i);
                Unsubscribe::Subscribed
            }
            None => Unsubscribe::Not,
        }
    }

    /// The session ends: every subscription, for the driver to release.
    pub fn take_subs(&mut self) -> Vec<ChannelName> {
        let mut subs = std::mem::take(&mut self.subs);
        subs.truncate(subs.len() - self.joining as usize);
        self.joining = 0;
        subs.into_vec()
    }

    /// `auth` with a token that `verify` checks (`None`: auth is off on this node): the new
    /// principal's subject and expiry to confirm, or the refusal (a bad token closes 4001).
    pub fn on_auth(
        &mut self,
        now: Instant,
        verify: Option<impl FnOnce() -> Result<Principal, String>>,
    ) -> Result<(Arc<str>, u64), Refused> {
        let Some(verify) = verify else {
            let r = Refusal::new("bad_request", "auth is off on this node", None);
            return Err((r, None));
        };
        if self.auth.user.is_some() {
            let r = Refusal::new("bad_request", "already authenticated: use refresh", None);
            return Err((r, None));
        }
        match verify() {
            Ok(p) => {
                let confirmed = (p.sub.clone(), p.exp);
                self.auth = Rc::new(ConnAuth::from_principal(p));
                let expiry = self.auth.exp.map(|e| instant_at(e, now));
                self.clock.authenticated(expiry);
                Ok(confirmed)
            }
            Err(e) => {
                crate::limits::refused(Cause::Unauthorized, &e);
                let r = Refusal {
                    code: "unauthorized",
                    message: Cow::Owned(e),
                    cause: Some(Cause::Unauthorized),
                };
                Err((r, Some((CLOSE_UNAUTHORIZED, "invalid token"))))
            }
        }
    }

    /// `refresh` with a token that `verify` checks (`None`: auth is off): its expiry to
    /// confirm, or the refusal (nothing changes). A refresh keeps the subject.
    pub fn on_refresh(
        &mut self,
        now: Instant,
        verify: Option<impl FnOnce() -> Result<Principal, String>>,
    ) -> Result<u64, Refusal> {
        let (Some(verify), Some(user)) = (verify, &self.auth.user) else {
            return Err(Refusal::new(
                "bad_request",
                "nothing to refresh: the connection has no token",
                None,
            ));
        };
        match verify() {
            Ok(p) if p.sub != *user => Err(Refusal::new(
                "forbidden",
                "a refresh token must have the same subject",
                Some(Cause::Forbidden),
            )
            .counted("refresh subject")),
            Ok(p) => {
                let exp = p.exp;
                self.auth = Rc::new(ConnAuth::from_principal(p));
                self.clock.refreshed(Some(instant_at(exp, now)));
                Ok(exp)
            }
            Err(e) => {
                crate::limits::refused(Cause::Unauthorized, &e);
                Err(Refusal {
                    code: "unauthorized",
                    message: Cow::Owned(e),
                    cause: Some(Cause::Unauthorized),
                })
            }
        }
    }

    /// What is due at `now`; `refresh`: the protocol can refresh a token (else an expired token
    /// closes at once).
    pub fn on_timeout(&mut self, now: Instant, t: &Timeouts, refresh: bool) -> Timed {
        match self.clock.handle_timeout(now, t) {
            Due::Nothing => Timed::Nothing,
            Due::End => Timed::End,
            Due::Ping => Timed::Ping,
            Due::Idle => Timed::Close((crate::protocol::codes::CLOSE_GOING_AWAY, "idle timeout")),
            Due::AuthTimeout => {
                crate::limits::refused(Cause::Unauthorized, "no auth command in time");
                Timed::Close((CLOSE_UNAUTHORIZED, "authentication timeout"))
            }
            Due::RefreshTimeout => {
                crate::limits::refused(Cause::TokenExpired, "no refresh in time");
                Timed::Close((CLOSE_TOKEN_EXPIRED, "token expired"))
            }
            Due::TokenExpired { refresh_within } if refresh => Timed::TokenExpired(refresh_within),
            Due::TokenExpired { .. } => {
                crate::limits::refused(Cause::TokenExpired, "no refresh on this protocol");
                Timed::Close((CLOSE_TOKEN_EXPIRED, "token expired"))
            }
        }
    }
}

/// A new session the node does not open: it is over its memory budget, and every session
/// holds memory the budget counts (its outbox, its subscriptions). Decided at connect by
/// [`on_connect`], for every transport; each tells the client in its own terms, listed here
/// (Pusher's `/app/KEY` with its own catalogue's 4100 "Over capacity").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverBudget;

impl OverBudget {
    /// `/ws`: closed with 1013 right after the upgrade (a browser sees a close code; it would
    /// not see an HTTP status refused before the upgrade).
    pub const CLOSE: Close = (
        CLOSE_TRY_AGAIN,
        "overloaded: the node is over its memory budget, try again later",
    );
    /// `/sse` and the admin's live tail: 503 with this error code, before the stream opens.
    pub const CODE: &'static str = "overloaded";
}

/// The decision at connect, before a session holds anything, the same for every transport:
/// a node `overloaded` (over its memory budget, `Engine::overloaded`) opens no new session.
/// A refusal is counted (`relay_refused_total{cause="memory"}`; `detail`: the transport, for
/// the log).
pub fn on_connect(overloaded: bool, detail: &str) -> Result<(), OverBudget> {
    if overloaded {
        crate::limits::refused(Cause::Memory, detail);
        return Err(OverBudget);
    }
    Ok(())
}

/// The code a refused hub subscribe answers with (`presence_full` or `overloaded`), counted.
// `let code = match`: the form the docs test (`tests/first_steps.rs`) reads codes from.
#[allow(clippy::let_and_return)]
pub fn subscribe_refusal(e: SubscribeError, detail: &str) -> &'static str {
    use crate::engine::presence::PresenceError;
    let code = match e {
        SubscribeError::Presence(PresenceError::Full) => "presence_full",
        SubscribeError::Presence(PresenceError::InfoBudget) => {
            crate::limits::refused(Cause::PresenceInfo, detail);
            "overloaded"
        }
        SubscribeError::Overloaded(o) => {
            let cause = match o {
                Overloaded::Memory => Cause::Memory,
                Overloaded::Channels => Cause::MaxChannels,
            };
            crate::limits::refused(cause, detail);
            "overloaded"
        }
    };
    code
}

/// When Unix time `exp` comes, on the clock whose present is `now` (at most a year away).
pub fn instant_at(exp: u64, now: Instant) -> Instant {
    let left = exp
        .saturating_sub(crate::auth::unix_now())
        .min(365 * 24 * 3600);
    now + Duration::from_secs(left)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::auth::{Grants, Rule};

    const T: Timeouts = Timeouts {
        ping_interval: Duration::from_secs(25),
        idle_timeout: Duration::from_secs(60),
        auth_timeout: Duration::from_secs(10),
        close_grace: Duration::from_secs(3),
    };

    const RULES: Rules = Rules {
        max_subscriptions: 2,
        jwt: false,
        client_presence: true,
    };

    fn ch(name: &str) -> ChannelName {
        ChannelName::new(name).unwrap()
    }

    fn anonymous(rules: &[&str]) -> ConnAuth {
        let rules: Vec<Rule> = rules.iter().map(|r| Rule::parse(r).unwrap()).collect();
        ConnAuth {
            grants: Grants::anonymous(Arc::from(rules)),
            user: None,
            info: None,
            exp: None,
        }
    }

    fn principal(sub: &str, expires_in: u64) -> Principal {
        Principal {
            sub: Arc::from(sub),
            info: Some(Bytes::from_static(b"{\"n\":1}")),
            exp: crate::auth::unix_now() + expires_in,
            grants: Grants::all(),
        }
    }

    /// A core opened at `t0` (anonymous, allowed everything under `public:`), and the clock.
    fn open(needs_token: bool, rate: (u32, u32)) -> (SessionCore, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        let auth = anonymous(&["all=public:*"]);
        let core = SessionCore::new(&T, t0, auth, needs_token, rate);
        (core, move |s| t0 + Duration::from_secs(s))
    }

    #[test]
    fn a_node_over_its_memory_budget_opens_no_new_session_until_it_is_back_under() {
        // The node's budget state at each connect, and the decision.
        let script = [
            (false, Ok(())),
            (true, Err(OverBudget)),
            (true, Err(OverBudget)),
            (false, Ok(())),
        ];
        for (i, (overloaded, want)) in script.into_iter().enumerate() {
            assert_eq!(on_connect(overloaded, "test"), want, "connect {i}");
        }
        // Told in the catalogue's terms: close 1013 (try again later), error `overloaded`.
        assert_eq!(OverBudget::CLOSE.0, 1013);
        assert!(crate::protocol::codes::CLOSE_CODES.contains(&OverBudget::CLOSE.0));
        assert!(crate::protocol::codes::ERROR_CODES.contains(&OverBudget::CODE));
    }

    #[test]
    fn a_waiting_join_counts_as_a_subscription_and_a_cancelled_one_frees_its_slot() {
        let (mut c, _) = open(false, (0, 0));
        let (a, b, d) = (ch("public:a"), ch("public:b"), ch("public:d"));
        assert_eq!(c.admit(&RULES, &a), Ok(()));
        c.subscribed(a.clone());
        assert_eq!(c.admit(&RULES, &b), Ok(()));
        c.wait_join(b.clone());
        assert_eq!(c.admit(&RULES, &a).unwrap_err().code, "already_subscribed");
        assert_eq!(c.admit(&RULES, &b).unwrap_err().code, "already_subscribed");
        let full = c.admit(&RULES, &d).unwrap_err();
        assert_eq!(full.code, "too_many_subscriptions");
        assert_eq!(full.cause, Some(Cause::TooManySubscriptions));
        // Unsubscribed while waiting: its answer, when it comes, no longer matters.
        assert_eq!(c.unsubscribe(&b), Unsubscribe::Waiting);
        assert!(!c.join_answered(&b));
        assert_eq!(c.admit(&RULES, &d), Ok(()));
        c.wait_join(d.clone());
        assert!(c.join_answered(&d), "the answer finishes the join");
        c.subscribed(d.clone());
        assert_eq!(c.subs(), &[a.clone(), d.clone()]);
        assert_eq!(c.unsubscribe(&a), Unsubscribe::Subscribed);
        assert_eq!(c.unsubscribe(&a), Unsubscribe::Not);
        assert_eq!(c.next_slot(), 1);
        assert_eq!(c.take_subs(), vec![d]);
        assert!(c.subs().is_empty());
    }

    #[test]
    fn the_grants_decide_each_command_and_name_the_permission_refused() {
        let (c, _) = open(false, (0, 0));
        assert_eq!(c.may(Perm::Subscribe, &ch("public:a")), Ok(()));
        let r = c.may(Perm::Publish, &ch("private:a")).unwrap_err();
        assert_eq!(
            (r.code, &*r.message),
            ("forbidden", "no publish permission on this channel")
        );
        assert_eq!(r.cause, Some(Cause::Forbidden));
        let r = c.may(Perm::Presence, &ch("private:a")).unwrap_err();
        assert_eq!(&*r.message, "no presence permission on this channel");
    }

    #[test]
    fn messages_over_the_rate_are_refused_then_a_client_that_keeps_on_is_closed() {
        let (mut c, at) = open(false, (2, 2));
        assert_eq!(c.on_message(at(0)), Ok(()));
        assert_eq!(c.on_message(at(0)), Ok(()));
        for _ in 0..2 {
            assert_eq!(c.on_message(at(0)), Err(Gate::Refuse(RATE_LIMITED)));
        }
        assert_eq!(
            c.on_message(at(0)),
            Err(Gate::Close((CLOSE_RATE_LIMITED, "rate limit exceeded")))
        );
        // A client that slows down is served again.
        assert_eq!(c.on_message(at(10)), Ok(()));
        let (mut free, at) = open(false, (0, 0));
        for _ in 0..1000 {
            assert_eq!(free.on_message(at(0)), Ok(()), "no limit");
        }
    }

    #[test]
    fn presence_identity_comes_from_the_token_else_from_the_claim_where_allowed() {
        let client: Arc<str> = Arc::from("c1");
        let claim = || Claim {
            user: Some(Arc::from("alice")),
            info: None,
        };
        let (mut c, at) = open(false, (0, 0));
        // Anonymous, no claim: a user of its own.
        let who = c
            .presence_identity(&RULES, &client, Claim::default())
            .unwrap();
        assert_eq!((&*who.client, &*who.user), ("c1", "c1"));
        // A claim where clients name themselves.
        let who = c.presence_identity(&RULES, &client, claim()).unwrap();
        assert_eq!(&*who.user, "alice");
        let off = Rules {
            client_presence: false,
            ..RULES
        };
        let r = c.presence_identity(&off, &client, claim()).unwrap_err();
        assert_eq!((r.code, &*r.message), ("forbidden", CLAIM_OFF));
        assert_eq!(c.check_claim(&off, &Claim::default()), Ok(()));
        // With auth on, the token decides and a claim is refused.
        let jwt = Rules { jwt: true, ..RULES };
        let r = c.presence_identity(&jwt, &client, claim()).unwrap_err();
        assert_eq!(&*r.message, CLAIM_WITH_TOKEN);
        let verify = || Ok(principal("bob", 100));
        assert!(c.on_auth(at(1), Some(verify)).is_ok());
        let who = c
            .presence_identity(&jwt, &client, Claim::default())
            .unwrap();
        assert_eq!(
            (&*who.user, who.info.as_deref()),
            ("bob", Some(&b"{\"n\":1}"[..]))
        );
    }

    /// Wakes the core at the time its clock asks for, which must be `secs` (±1 s: a token's
    /// expiry is whole Unix seconds), and returns what is due.
    fn wake(c: &mut SessionCore, at: &impl Fn(u64) -> Instant, secs: u64, refresh: bool) -> Timed {
        let when = c.clock.poll_timeout(&T);
        assert!(
            when >= at(secs.saturating_sub(1)) && when <= at(secs),
            "woken at the wrong time: want {secs} s"
        );
        c.on_timeout(when, &T, refresh)
    }

    #[test]
    fn a_token_in_time_lifts_the_auth_deadline_and_its_expiry_asks_for_a_refresh() {
        let (mut c, at) = open(true, (0, 0));
        let ok = || Ok(principal("bob", 15));
        let (user, _) = c.on_auth(at(5), Some(ok)).unwrap();
        assert_eq!(&*user, "bob");
        let again = c.on_auth(at(6), Some(ok)).unwrap_err();
        assert_eq!(&*again.0.message, "already authenticated: use refresh");
        assert_eq!(
            wake(&mut c, &at, 20, true),
            Timed::TokenExpired(T.auth_timeout)
        );
        // Another subject may not refresh; the same one may, and its expiry counts.
        let other = || Ok(principal("eve", 100));
        assert_eq!(
            c.on_refresh(at(21), Some(other)).unwrap_err().code,
            "forbidden"
        );
        let same = || Ok(principal("bob", 78));
        assert!(c.on_refresh(at(22), Some(same)).is_ok());
        assert_eq!(wake(&mut c, &at, 25, true), Timed::Ping);
        c.clock.on_inbound(at(90));
        assert_eq!(
            wake(&mut c, &at, 100, true),
            Timed::TokenExpired(T.auth_timeout)
        );
        assert_eq!(
            wake(&mut c, &at, 110, true),
            Timed::Close((CLOSE_TOKEN_EXPIRED, "token expired"))
        );
    }

    #[test]
    fn without_a_token_in_time_or_with_a_bad_one_the_session_closes_4001() {
        let (mut c, at) = open(true, (0, 0));
        assert_eq!(
            wake(&mut c, &at, 10, true),
            Timed::Close((CLOSE_UNAUTHORIZED, "authentication timeout"))
        );
        let (mut c, at) = open(true, (0, 0));
        let bad = || Err("token expired".to_owned());
        let (r, close) = c.on_auth(at(1), Some(bad)).unwrap_err();
        assert_eq!((r.code, &*r.message), ("unauthorized", "token expired"));
        assert_eq!(close, Some((CLOSE_UNAUTHORIZED, "invalid token")));
        let bad = || Err("bad signature".to_owned());
        assert_eq!(
            c.on_refresh(at(2), Some(bad)).unwrap_err().code,
            "bad_request"
        );
        let none: Option<fn() -> Result<Principal, String>> = None;
        let (r, close) = c.on_auth(at(2), none).unwrap_err();
        assert_eq!((r.code, close), ("bad_request", None));
    }

    #[test]
    fn an_expired_token_closes_at_once_where_the_protocol_cannot_refresh() {
        let (mut c, at) = open(true, (0, 0));
        let ok = || Ok(principal("bob", 20));
        assert!(c.on_auth(at(0), Some(ok)).is_ok());
        assert_eq!(
            wake(&mut c, &at, 20, false),
            Timed::Close((CLOSE_TOKEN_EXPIRED, "token expired"))
        );
    }
}
