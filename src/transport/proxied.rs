//! The transports' side of the backend proxy ([`crate::backend`]): one call per decision point
//! (`handshake` and `admit` at connect, `before_subscribe`, `publish`), so that a session makes
//! each decision with one call and acts on its answer.

use std::sync::Arc;

use bytes::Bytes;

use crate::backend::{Asker, Handshake, Refusal};
use crate::types::{ChannelName, DataKind};

/// A node's refusal of a publish or a join, as the client is told it.
fn refusal(e: super::PublishError) -> Refusal {
    Refusal::new(e.code(), e.to_string())
}

/// The connect decision for connection `client` whose auth is `auth`: asked only when it has
/// no user yet (no token: with JWT off, the proxy is the auth). On admission with a user, the
/// connection gets that user (and every permission but the Pusher apps' protected channels:
/// the backend decided; the subscribe and publish proxies decide per channel). `Ok`: the
/// server-side channels to subscribe.
pub(crate) async fn admit(
    hs: &Handshake,
    client: &str,
    auth: &mut super::request::ConnAuth,
) -> Result<Vec<ChannelName>, Refusal> {
    let proxy = hs.caller.proxy();
    if auth.user.is_some() || !proxy.has_connect() {
        return Ok(Vec::new());
    }
    let Some(a) = proxy
        .connect(&hs.caller, client, hs.token.as_deref())
        .await?
    else {
        return Ok(Vec::new());
    };
    if let Some(user) = a.user {
        auth.user = Some(user);
        auth.grants = crate::auth::Grants::all_but_pusher_private();
        auth.info = a.info;
        auth.exp = a.expire_at;
    }
    Ok(a.channels)
}

/// The handshake a WebSocket or SSE request gives the proxy (`None`: no proxy configured).
pub(crate) fn handshake<B>(
    ctx: &super::ShardContext,
    req: &hyper::Request<B>,
    kind: (&'static str, &'static str),
    auth: &super::request::ConnAuth,
) -> Option<Handshake> {
    let proxy = ctx.node.backend.as_ref()?;
    let remote = req
        .extensions()
        .get::<super::Peer>()
        // The client a trusted proxy names, else the peer itself.
        .map(|p| ctx.node.client(p, req.headers()).unwrap_or(p.ip));
    // The token goes to the connect proxy only when it will be asked.
    let token = (proxy.has_connect() && auth.user.is_none())
        .then(|| super::request::request_token(req))
        .flatten();
    Some(proxy.handshake(kind, remote, req.headers(), token))
}

/// What a subscribe to `channel` waits for before it is made: the subscribe proxy (`asker`),
/// then the backplane's sync of the channel; `None`: nothing, subscribe now.
pub(crate) fn before_subscribe(
    node: &Arc<super::Node>,
    asker: Option<Asker>,
    channel: &ChannelName,
) -> Option<crate::backplane::BoxFuture<Result<(), Refusal>>> {
    let Some(asker) = asker else {
        let join = node.join(channel)?;
        return Some(Box::pin(async move { join.await.map_err(refusal) }));
    };
    let (node, channel) = (node.clone(), channel.clone());
    Some(Box::pin(async move {
        asker.subscribe(channel.clone()).await?;
        // Joined only once allowed: a refused subscribe leaves nothing behind.
        if let Some(join) = node.join(&channel) {
            join.await.map_err(refusal)?;
        }
        Ok(())
    }))
}

/// A client publish: the publish proxy first (`asker`; it may replace the data), then the
/// node's publish. A publish refusal is counted here.
pub(crate) async fn publish(
    node: &super::Node,
    asker: Option<Asker>,
    channel: &ChannelName,
    data: (DataKind, Bytes),
    cond: crate::engine::idempotency::PublishConditions,
) -> Result<(crate::engine::Published, bool), Refusal> {
    let (kind, bytes) = match asker {
        Some(a) => a.publish(channel, data).await?,
        None => data,
    };
    node.publish_with(channel, kind, bytes, cond)
        .await
        .map_err(|e| {
            e.count();
            refusal(e)
        })
}
