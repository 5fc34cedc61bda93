//! Replica ingest: messages sequenced elsewhere (by a backplane) enter the ring in order
//! ([`Engine::ingest`]), or a remote state replaces the local one ([`Engine::reset`], which
//! bumps the channel's generation so that hubs close their subscribers for resume).

use super::*;

/// What [`Engine::ingest`] did with a message sequenced elsewhere (by a backplane).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// It was the next message: appended; wake these shards.
    Appended(ShardMask),
    /// The channel already has it (`seq <= top`): ignored.
    Duplicate,
    /// Messages are missing between the local top and this one: nothing was appended; fetch
    /// `top + 1 ..= seq` and ingest them in order (or [`Engine::reset`]).
    Gap {
        /// The local top.
        top: u64,
    },
    /// The message belongs to another epoch than the local one: the local state is stale and
    /// must be [`Engine::reset`].
    OtherEpoch,
}

/// One message of a remote history, for [`Engine::reset`].
#[derive(Clone, Debug)]
pub struct RemoteEntry {
    /// Its seq.
    pub seq: u64,
    /// When it was published, on this process's clock.
    pub at: Instant,
    /// Payload kind.
    pub kind: DataKind,
    /// Payload.
    pub data: Bytes,
}

impl Engine {
    /// Appends a message that a remote sequencer (a backplane) numbered `seq` in `epoch`:
    /// appended when it is the next one of the local epoch, ignored when already there, a gap
    /// otherwise. `at` is when it was published, on this process's clock. Never refused: the
    /// message exists already, and local subscribers wait for it.
    #[allow(clippy::too_many_arguments)]
    pub fn ingest(
        &self,
        name: &ChannelName,
        epoch: Epoch,
        seq: u64,
        kind: DataKind,
        data: Bytes,
        at: Instant,
        now: Instant,
    ) -> IngestOutcome {
        let r = self.with_channel(name, now, false, |ch, st| {
            if st.epoch != epoch {
                return (IngestOutcome::OtherEpoch, None);
            }
            if seq <= st.top {
                return (IngestOutcome::Duplicate, None);
            }
            if seq != st.top + 1 {
                return (IngestOutcome::Gap { top: st.top }, None);
            }
            st.top = seq;
            st.last_active = now;
            st.recent = true;
            let cost = st.push(seq, at, kind, data, self.meter.frames());
            let freed = self.trim(ch, st, now);
            self.meter.add(Kind::History, cost as i64 - freed as i64);
            let wake = Self::mark_dirty(ch, st);
            (IngestOutcome::Appended(wake), Some(ch.clone()))
        });
        let Ok((outcome, ch)) = r else {
            return IngestOutcome::OtherEpoch;
        };
        if let (IngestOutcome::Appended(wake), Some(ch)) = (outcome, ch) {
            return IngestOutcome::Appended(self.enqueue_dirty(&ch, wake));
        }
        outcome
    }

    /// Adopts a remote state: `epoch`, `top`, and the remote history `entries` (ascending; only
    /// those `<= top` are kept, and only a run that ends at `top` is usable for resume). The
    /// channel's generation moves on, so every hub closes the local subscribers it had in the
    /// channel (as slow consumers: they resume against the new state and get exactly what they
    /// missed, or `recovered:false`). Returns the shards to wake.
    pub fn reset(
        &self,
        name: &ChannelName,
        epoch: Epoch,
        top: u64,
        entries: Vec<RemoteEntry>,
        now: Instant,
    ) -> ShardMask {
        let r = self.with_channel(name, now, false, |ch, st| {
            st.epoch = epoch;
            st.top = top;
            let mut freed = 0;
            while let Some((_, cost)) = st.pop() {
                freed += cost;
            }
            st.evicted_through = 0;
            // Keep the contiguous run that ends at `top`, oldest first.
            let mut run: Vec<&RemoteEntry> = Vec::new();
            let mut want = top;
            for e in entries.iter().rev() {
                if want == 0 || e.seq < want {
                    break;
                }
                if e.seq == want {
                    run.push(e);
                    want -= 1;
                }
            }
            let mut added = 0;
            for e in run.into_iter().rev() {
                added += st.push(e.seq, e.at, e.kind, e.data.clone(), self.meter.frames());
            }
            freed += self.trim(ch, st, now);
            self.meter.add(Kind::History, added as i64 - freed as i64);
            st.generation += 1;
            st.last_active = now;
            (Self::mark_dirty(ch, st), ch.clone())
        });
        let Ok((wake, ch)) = r else {
            return 0;
        };
        self.enqueue_dirty(&ch, wake);
        wake
    }
}
