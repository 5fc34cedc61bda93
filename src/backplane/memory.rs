//! The single-node backplane: the engine is the sequencer, history is the engine's ring, and
//! every future is ready at once. The reference for the others' contract.

use std::sync::Arc;

use bytes::Bytes;

use super::{Backplane, BackplaneError, BoxFuture, Wakers};
use crate::engine::{Engine, History};
use crate::types::{ChannelName, DataKind, Epoch};

/// See the module docs.
pub struct MemoryBackplane {
    engine: Arc<Engine>,
    wakers: Wakers,
}

impl MemoryBackplane {
    /// A backplane over `engine` that wakes `wakers` after each publish.
    pub fn new(engine: Arc<Engine>, wakers: Wakers) -> Self {
        Self { engine, wakers }
    }
}

impl Backplane for MemoryBackplane {
    fn publish(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
    ) -> BoxFuture<Result<(Epoch, u64), BackplaneError>> {
        let r = match self
            .engine
            .publish(channel, kind, data, crate::types::now())
        {
            Ok(p) => {
                self.wakers.wake(p.wake);
                Ok((p.epoch, p.seq))
            }
            Err(o) => Err(BackplaneError::Overloaded(o)),
        };
        Box::pin(std::future::ready(r))
    }

    fn publish_with(
        &self,
        channel: &ChannelName,
        kind: DataKind,
        data: Bytes,
        cond: crate::engine::idempotency::PublishConditions,
    ) -> BoxFuture<Result<(Epoch, u64, bool), BackplaneError>> {
        use crate::engine::PublishRefused;
        let r = match self
            .engine
            .publish_with(channel, kind, data, &cond, crate::types::now())
        {
            Ok((p, duplicate)) => {
                self.wakers.wake(p.wake);
                Ok((p.epoch, p.seq, duplicate))
            }
            Err(PublishRefused::Overloaded(o)) => Err(BackplaneError::Overloaded(o)),
            Err(PublishRefused::SeqMismatch(at)) => Err(BackplaneError::SeqMismatch(at)),
        };
        Box::pin(std::future::ready(r))
    }

    fn join(&self, _channel: &ChannelName) -> Option<BoxFuture<Result<(), BackplaneError>>> {
        None
    }

    fn history(
        &self,
        channel: &ChannelName,
        since: u64,
        limit: usize,
    ) -> BoxFuture<Result<History, BackplaneError>> {
        let h = self
            .engine
            .history(channel, since, limit, crate::types::now());
        Box::pin(std::future::ready(Ok(h)))
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::task::{Context, Poll};

    fn ready<T>(mut f: BoxFuture<T>) -> T {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("memory futures are ready at once"),
        }
    }

    #[test]
    fn publishes_sequence_in_the_engine_and_are_ready_at_once() {
        let engine = Arc::new(Engine::new(crate::engine::EngineConfig {
            history_size: 10,
            history_ttl: std::time::Duration::from_secs(60),
            seed: 3,
            ..Default::default()
        }));
        let bp = MemoryBackplane::new(engine.clone(), Wakers::new(1));
        let ch = ChannelName::new("a").unwrap();
        let (e1, s1) = ready(bp.publish(&ch, DataKind::Json, Bytes::from_static(b"1"))).unwrap();
        let (e2, s2) = ready(bp.publish(&ch, DataKind::Json, Bytes::from_static(b"2"))).unwrap();
        assert_eq!((s1, s2), (1, 2));
        assert_eq!(e1, e2);
        assert!(bp.join(&ch).is_none());
        assert!(bp.is_ready());
        let h = ready(bp.history(&ch, 0, 10)).unwrap();
        assert_eq!(h.publications.len(), 2);
        assert!(h.complete);
    }
}
