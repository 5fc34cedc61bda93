#![allow(clippy::unwrap_used)]
use super::*;

fn engine(history: usize, shards: usize) -> Engine {
    Engine::new(EngineConfig {
        shards,
        history_size: history,
        history_ttl: Duration::from_secs(300),
        seed: 7,
        ..Default::default()
    })
}

/// What a subscriber's replay would page out of the ring: the seqs after its position.
fn replay(s: &Subscribed) -> Vec<u64> {
    let mut out = Vec::new();
    if let Some(after) = s.replay_after {
        assert!(s
            .channel
            .read_page(after, s.generation, usize::MAX, &mut out));
    }
    out.iter()
        .map(|p| p.seq)
        .filter(|&q| q <= s.position.seq)
        .collect()
}

fn ch(s: &str) -> ChannelName {
    ChannelName::new(s).unwrap()
}

#[test]
fn seqs_start_at_one_and_increase() {
    let e = engine(10, 1);
    let now = Instant::now();
    let a = e
        .publish(&ch("a"), DataKind::Json, Bytes::from_static(b"1"), now)
        .unwrap();
    let b = e
        .publish(&ch("a"), DataKind::Json, Bytes::from_static(b"2"), now)
        .unwrap();
    let other = e
        .publish(&ch("b"), DataKind::Json, Bytes::from_static(b"3"), now)
        .unwrap();
    assert_eq!((a.seq, b.seq, other.seq), (1, 2, 1));
    assert_eq!(a.epoch, b.epoch);
    assert_ne!(a.epoch, other.epoch);
    assert_eq!(a.wake, 0, "no subscriber, nobody to wake");
}

#[test]
fn publish_wakes_each_subscribed_shard_once_until_it_pulls() {
    let e = engine(10, 3);
    let now = Instant::now();
    let s0 = e.subscribe(0, &ch("a"), None, None, now).unwrap();
    let _s2 = e.subscribe(2, &ch("a"), None, None, now).unwrap();
    assert_eq!(
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap()
            .wake,
        0b101
    );
    assert_eq!(
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap()
            .wake,
        0,
        "already dirty"
    );
    let mut dirty = Vec::new();
    e.take_dirty(0, &mut dirty);
    assert_eq!(dirty.len(), 1);
    let mut pubs = Vec::new();
    assert!(!dirty[0].read_since(s0.position.seq, &mut pubs));
    assert_eq!(pubs.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap()
            .wake,
        0b001
    );
}

#[test]
fn publishes_to_many_channels_wake_a_shard_once_per_pass() {
    let e = engine(10, 2);
    let now = Instant::now();
    let names: Vec<ChannelName> = (0..5).map(|i| ch(&format!("room-{i}"))).collect();
    for n in &names {
        e.subscribe(0, n, None, None, now).unwrap();
        e.subscribe(1, n, None, None, now).unwrap();
    }
    let wakes: Vec<ShardMask> = names
        .iter()
        .map(|n| {
            e.publish(n, DataKind::Json, Bytes::new(), now)
                .unwrap()
                .wake
        })
        .collect();
    assert_eq!(
        wakes,
        [0b11, 0, 0, 0, 0],
        "one wake per shard until it pulls"
    );
    // Shard 0 pulls every channel; shard 1's pass is still to come.
    let mut dirty = Vec::new();
    e.take_dirty(0, &mut dirty);
    assert_eq!(dirty.len(), names.len(), "the pass takes every channel");
    let again = e
        .publish(&names[2], DataKind::Json, Bytes::new(), now)
        .unwrap();
    assert_eq!(
        again.wake, 0b01,
        "a new pass for the shard that pulled only"
    );
    let mut dirty1 = Vec::new();
    e.take_dirty(1, &mut dirty1);
    assert_eq!(
        dirty1.len(),
        names.len(),
        "nothing lost for the shard not woken again"
    );
    let mut pubs = Vec::new();
    e.take_dirty(0, &mut dirty);
    assert_eq!(dirty.len(), 1);
    assert!(!dirty[0].read_since(0, &mut pubs));
    assert_eq!(pubs.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn resume_recovers_exactly_the_missed_messages() {
    let e = engine(5, 1);
    let now = Instant::now();
    let first = e
        .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
        .unwrap();
    for _ in 0..3 {
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
    }
    let pos = StreamPosition {
        epoch: first.epoch,
        seq: 1,
    };
    let s = e.subscribe(0, &ch("a"), Some(pos), None, now).unwrap();
    assert!(s.recovered);
    assert_eq!(replay(&s), [2, 3, 4]);
    assert_eq!(s.position.seq, 4);

    let at_top = StreamPosition {
        epoch: first.epoch,
        seq: 4,
    };
    let s = e.subscribe(0, &ch("a"), Some(at_top), None, now).unwrap();
    assert!(s.recovered && s.replay_after.is_none());
}

#[test]
fn resume_fails_whole_on_gap_epoch_or_future() {
    let e = engine(5, 1);
    let now = Instant::now();
    let p = e
        .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
        .unwrap();
    for _ in 0..9 {
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
    }
    for (pos, reason) in [
        (
            StreamPosition {
                epoch: p.epoch,
                seq: 4,
            },
            GapReason::HistoryExpired,
        ),
        (
            StreamPosition {
                epoch: p.epoch,
                seq: 11,
            },
            GapReason::HistoryExpired,
        ),
        (
            StreamPosition {
                epoch: Epoch(1),
                seq: 9,
            },
            GapReason::EpochChanged,
        ),
    ] {
        let s = e.subscribe(0, &ch("a"), Some(pos), None, now).unwrap();
        assert!(!s.recovered);
        assert!(s.replay_after.is_none());
        assert_eq!(s.gap, Some(reason));
    }
    // The oldest message still in the window is seq 6, so since=5 recovers.
    let s = e
        .subscribe(
            0,
            &ch("a"),
            Some(StreamPosition {
                epoch: p.epoch,
                seq: 5,
            }),
            None,
            now,
        )
        .unwrap();
    assert!(s.recovered);
    assert_eq!(replay(&s).len(), 5);
}

#[test]
fn history_ttl_hides_old_messages() {
    let e = Engine::new(EngineConfig {
        history_size: 100,
        history_ttl: Duration::from_secs(10),
        seed: 1,
        ..Default::default()
    });
    let t0 = Instant::now();
    e.publish(&ch("a"), DataKind::Json, Bytes::new(), t0)
        .unwrap();
    e.publish(
        &ch("a"),
        DataKind::Json,
        Bytes::new(),
        t0 + Duration::from_secs(8),
    )
    .unwrap();
    let h = e.history(&ch("a"), 0, 100, t0 + Duration::from_secs(12));
    assert!(!h.complete);
    assert_eq!(
        h.publications.iter().map(|p| p.seq).collect::<Vec<_>>(),
        [2]
    );
    let h = e.history(&ch("a"), 1, 100, t0 + Duration::from_secs(12));
    assert!(h.complete);
}

#[test]
fn expiry_forgets_idle_channels_and_gives_a_new_epoch() {
    let e = Engine::new(EngineConfig {
        history_size: 100,
        history_ttl: Duration::from_secs(10),
        seed: 1,
        ..Default::default()
    });
    let t0 = Instant::now();
    let p = e
        .publish(&ch("a"), DataKind::Json, Bytes::new(), t0)
        .unwrap();
    let sub = e.subscribe(0, &ch("b"), None, None, t0).unwrap();
    assert_eq!(e.tick(t0 + Duration::from_secs(5)).expired, 0);
    let t = e.tick(t0 + Duration::from_secs(20));
    assert_eq!((t.checked, t.expired), (2, 1), "b is subscribed");
    assert_eq!(e.channel_count(), 1);
    let again = e
        .publish(
            &ch("a"),
            DataKind::Json,
            Bytes::new(),
            t0 + Duration::from_secs(21),
        )
        .unwrap();
    assert_eq!(again.seq, 1);
    assert_ne!(again.epoch, p.epoch);
    e.unsubscribe(0, &sub.channel, t0);
}

#[test]
fn a_reader_that_falls_behind_the_ring_sees_lost() {
    let e = engine(1, 1);
    let now = Instant::now();
    let s = e.subscribe(0, &ch("a"), None, None, now).unwrap();
    for _ in 0..(FANOUT_MIN + 10) {
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
            .unwrap();
    }
    let mut out = Vec::new();
    assert!(s.channel.read_since(0, &mut out));
    assert_eq!(out.len(), FANOUT_MIN);
    out.clear();
    assert!(!s.channel.read_since(20, &mut out));
}

#[test]
fn ingest_appends_the_next_ignores_duplicates_and_reports_gaps() {
    let e = engine(10, 2);
    let now = Instant::now();
    let epoch = Epoch(0x1234 | 1 << 60);
    e.reset(&ch("a"), epoch, 0, Vec::new(), now);
    let s = e.subscribe(1, &ch("a"), None, None, now).unwrap();
    assert_eq!(e.local_subscribers(&ch("a")), 1);
    assert_eq!(s.position, StreamPosition { epoch, seq: 0 });
    let data = || Bytes::from_static(b"x");
    assert_eq!(
        e.ingest(&ch("a"), epoch, 1, DataKind::Json, data(), now, now),
        IngestOutcome::Appended(0b10)
    );
    assert_eq!(
        e.ingest(&ch("a"), epoch, 1, DataKind::Json, data(), now, now),
        IngestOutcome::Duplicate
    );
    assert_eq!(
        e.ingest(&ch("a"), epoch, 3, DataKind::Json, data(), now, now),
        IngestOutcome::Gap { top: 1 }
    );
    assert_eq!(
        e.ingest(&ch("a"), Epoch(9), 2, DataKind::Json, data(), now, now),
        IngestOutcome::OtherEpoch
    );
    assert_eq!(
        e.ingest(&ch("a"), epoch, 2, DataKind::Json, data(), now, now),
        IngestOutcome::Appended(0),
        "already dirty"
    );
    let mut out = Vec::new();
    assert!(!s.channel.read_since(0, &mut out));
    assert_eq!(out.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
    // Resume against ingested history works like against published history.
    let r = e
        .subscribe(
            0,
            &ch("a"),
            Some(StreamPosition { epoch, seq: 1 }),
            None,
            now,
        )
        .unwrap();
    assert!(r.recovered);
    assert_eq!(e.local_subscribers(&ch("a")), 2);
    assert_eq!(replay(&r), [2]);
    assert!(!e.unsubscribe(0, &r.channel, now));
    assert!(
        e.unsubscribe(1, &s.channel, now),
        "the last one on this node"
    );
    assert_eq!(e.local_subscribers(&ch("a")), 0);
}

#[test]
fn reset_adopts_the_remote_state_and_moves_the_generation() {
    let e = engine(5, 1);
    let now = Instant::now();
    let p = e
        .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
        .unwrap();
    let s = e.subscribe(0, &ch("a"), None, None, now).unwrap();
    let remote = Epoch(0xABC | 1 << 60);
    let entry = |seq| RemoteEntry {
        seq,
        at: now,
        kind: DataKind::Json,
        data: Bytes::from(seq.to_string()),
    };
    // Entries that do not end at top, and ones beyond it, are not kept as history.
    let wake = e.reset(
        &ch("a"),
        remote,
        7,
        vec![entry(3), entry(5), entry(6), entry(7), entry(8)],
        now,
    );
    assert_eq!(
        wake, 0b1,
        "the subscribed shard pumps, sees the new generation"
    );
    assert_ne!(remote, p.epoch);
    assert_eq!(
        e.position(&ch("a")),
        Some(StreamPosition {
            epoch: remote,
            seq: 7
        })
    );
    let mut pubs = Vec::new();
    let (_, _, current) =
        s.channel
            .read_all_since_in(0, 0, Some(s.generation), &mut pubs, &mut Vec::new());
    assert_eq!(current, Err((s.generation + 1, 7)));
    let r = e
        .subscribe(
            0,
            &ch("a"),
            Some(StreamPosition {
                epoch: remote,
                seq: 4,
            }),
            None,
            now,
        )
        .unwrap();
    assert!(r.recovered);
    assert_eq!(replay(&r), [5, 6, 7]);
    let r = e
        .subscribe(
            0,
            &ch("a"),
            Some(StreamPosition {
                epoch: remote,
                seq: 3,
            }),
            None,
            now,
        )
        .unwrap();
    assert_eq!(r.gap, Some(GapReason::HistoryExpired), "4 is not there");
    let old = e
        .subscribe(
            0,
            &ch("a"),
            Some(StreamPosition {
                epoch: p.epoch,
                seq: 1,
            }),
            None,
            now,
        )
        .unwrap();
    assert_eq!(old.gap, Some(GapReason::EpochChanged));
}

#[test]
fn idempotency_keys_are_counted_and_keep_their_channel_for_the_window() {
    use idempotency::{PublishConditions, KEY_OVERHEAD};
    let e = Engine::new(EngineConfig {
        history_ttl: Duration::from_secs(1),
        idempotency_window: Duration::from_secs(10),
        ..Default::default()
    });
    let t0 = Instant::now();
    let a = ch("a");
    let cond = PublishConditions {
        idempotency_key: Some("key".into()),
        expected_seq: None,
    };
    let data = || Bytes::from_static(b"1");
    let (p, dup) = e
        .publish_with(&a, DataKind::Json, data(), &cond, t0)
        .unwrap();
    assert!(!dup);
    let with_key = e.meter().bytes(Kind::History);
    e.publish(&ch("b"), DataKind::Json, data(), t0).unwrap();
    let without = e.meter().bytes(Kind::History) - with_key;
    assert_eq!(with_key - without, KEY_OVERHEAD + 3);
    // Past the TTL the message is gone, not the key, nor the channel and its epoch.
    for s in 2..=5 {
        e.tick(t0 + Duration::from_secs(s));
    }
    let (again, dup) = e
        .publish_with(
            &a,
            DataKind::Json,
            data(),
            &cond,
            t0 + Duration::from_secs(5),
        )
        .unwrap();
    assert!(dup);
    assert_eq!((again.epoch, again.seq), (p.epoch, p.seq));
    // Past the window the key goes, and then the idle channel with it.
    for s in 11..=14 {
        e.tick(t0 + Duration::from_secs(s));
    }
    assert_eq!(e.meter().bytes(Kind::History), 0);
    assert_eq!(e.position(&a), None);
}

fn big(n: usize) -> Bytes {
    Bytes::from(vec![b'x'; n])
}

#[test]
fn history_keeps_its_count_and_bytes_and_the_fanout_window_only_for_its_age() {
    let e = Engine::new(EngineConfig {
        history_size: 10,
        history_max_bytes: 100 << 10,
        ..Default::default()
    });
    let t0 = Instant::now();
    let a = ch("a");
    // 200 × 60 KB in one burst: the fan-out window keeps what fits 4 MiB.
    for _ in 0..200 {
        e.publish(&a, DataKind::Json, big(60_000), t0).unwrap();
    }
    let held = e.meter().bytes(Kind::History);
    assert!(held <= FANOUT_MAX_BYTES, "{held}");
    assert!(held > FANOUT_MAX_BYTES / 2, "{held}");
    // History itself: 100 KiB hold one 60 KB message (10 would fit by count).
    let h = e.history(&a, 0, 100, t0);
    assert_eq!(h.publications.len(), 1);
    assert!(!h.complete);
    // Once the window closes, only history remains, without another publish.
    let later = t0 + FANOUT_MIN_AGE + Duration::from_secs(1);
    e.tick(later);
    assert_eq!(e.meter().bytes(Kind::History), 60_000 + ENTRY_OVERHEAD);
    // Small messages: the count bounds.
    let b = ch("b");
    for _ in 0..50 {
        e.publish(&b, DataKind::Json, big(10), later).unwrap();
    }
    e.tick(later + FANOUT_MIN_AGE + Duration::from_secs(1));
    assert_eq!(e.history(&b, 0, 100, later).publications.len(), 10);
}

#[test]
fn reads_never_create_channels() {
    let e = Engine::new(EngineConfig {
        presence: presence::PresenceConfig {
            patterns: vec!["*".into()],
            ..Default::default()
        },
        ..Default::default()
    });
    let now = Instant::now();
    for i in 0..100 {
        let name = ch(&format!("ghost:{i}"));
        let h = e.history(&name, 0, 10, now);
        assert!(h.position.is_none() && h.publications.is_empty() && h.complete);
        assert!(!e.history(&name, 5, 10, now).complete, "since 5: missed");
        let p = e.presence(&name, None, 10, 1000).unwrap();
        assert!(p.members.is_empty() && p.next.is_none());
        assert_eq!(e.position(&name), None);
        assert_eq!(e.local_subscribers(&name), 0);
        assert!(e.presence_local(&name).is_empty());
        assert_eq!(
            e.presence_remote(&name, presence_who("c", None), None, now),
            0
        );
    }
    assert_eq!(e.channel_count(), 0);
    assert!(e.channels().is_empty());
    assert_eq!(e.meter().total(), 0);
}

fn presence_who(client: &str, info: Option<usize>) -> Identity {
    Identity {
        client: client.into(),
        user: client.into(),
        info: info.map(big),
    }
}

#[test]
fn max_channels_refuses_a_new_channel_but_not_an_existing_one() {
    let e = Engine::new(EngineConfig {
        max_channels: 2,
        ..Default::default()
    });
    let now = Instant::now();
    e.publish(&ch("a"), DataKind::Json, Bytes::new(), now)
        .unwrap();
    e.subscribe(0, &ch("b"), None, None, now).unwrap();
    assert_eq!(
        e.publish(&ch("c"), DataKind::Json, Bytes::new(), now)
            .unwrap_err(),
        Overloaded::Channels
    );
    assert!(matches!(
        e.subscribe(0, &ch("c"), None, None, now),
        Err(SubscribeError::Overloaded(Overloaded::Channels))
    ));
    assert!(e
        .publish(&ch("b"), DataKind::Json, Bytes::new(), now)
        .is_ok());
    assert_eq!(e.admit(&ch("a"), now), Ok(()));
    assert_eq!(e.admit(&ch("c"), now), Err(Overloaded::Channels));
    assert_eq!(e.channel_count(), 2);
}

#[test]
fn expiry_examines_a_bounded_number_of_channels_per_tick() {
    let e = Engine::new(EngineConfig {
        history_ttl: Duration::from_secs(1),
        ..Default::default()
    });
    let t0 = Instant::now();
    let n = 3 * TICK_CHECKS + 100;
    for i in 0..n {
        e.publish(&ch(&format!("c{i}")), DataKind::Json, big(10), t0)
            .unwrap();
    }
    assert_eq!(e.channel_count(), n);
    // Past the TTL and the fan-out window.
    let mut t = t0 + FANOUT_MIN_AGE + Duration::from_secs(1);
    let mut ticks = 0;
    while e.channel_count() > 0 {
        let s = e.tick(t);
        assert!(s.checked <= TICK_CHECKS, "{s:?}");
        ticks += 1;
        assert!(ticks < 10, "expiry stalled at {}", e.channel_count());
        t += Duration::from_millis(100);
    }
    assert_eq!(
        ticks, 4,
        "all due at once: four ticks of at most {TICK_CHECKS}"
    );
    assert_eq!(
        e.meter().total(),
        0,
        "forgotten channels give back everything"
    );
    assert_eq!(e.stats().expired.load(Ordering::Relaxed), n as u64);
}

#[test]
fn eviction_takes_the_least_recently_used_history_first_and_resume_says_evicted() {
    let e = Engine::new(EngineConfig {
        max_memory: 16 << 20,
        ..Default::default()
    });
    let t0 = Instant::now();
    let mut epochs = Vec::new();
    // 12 channels × 1 MB: 75 % of the budget, no pressure yet.
    for i in 0..12 {
        let p = e
            .publish(&ch(&format!("h{i}")), DataKind::Json, big(1_000_000), t0)
            .unwrap();
        epochs.push(p.epoch);
    }
    assert_eq!(e.meter().recompute(), Pressure::Normal);
    // h0 is used again: it is not the least recently used any more.
    e.publish(&ch("h0"), DataKind::Json, big(10), t0).unwrap();
    for i in 12..16 {
        e.publish(&ch(&format!("h{i}")), DataKind::Json, big(1_000_000), t0)
            .unwrap();
    }
    let s = e.tick(t0 + Duration::from_millis(100));
    assert!(s.evicted > 0);
    assert!(e.meter().total() <= (16 << 20) * 3 / 4 + (1 << 20));
    assert_eq!(e.meter().recompute(), Pressure::Normal);
    let resume = |i: usize| {
        e.subscribe(
            0,
            &ch(&format!("h{i}")),
            Some(StreamPosition {
                epoch: epochs[i],
                seq: 0,
            }),
            None,
            t0,
        )
        .unwrap()
    };
    let s = resume(1);
    assert_eq!((s.recovered, s.gap), (false, Some(GapReason::Evicted)));
    let s = resume(0);
    assert!(s.recovered, "h0 had its second chance");
    assert!(e.stats().evictions.load(Ordering::Relaxed) >= 4);
}

#[test]
fn over_the_budget_publishes_and_subscribes_are_refused_until_memory_returns() {
    let e = Engine::new(EngineConfig {
        max_memory: 16 << 20,
        ..Default::default()
    });
    let now = Instant::now();
    // What eviction cannot free: outboxes (reported by the shards).
    e.meter().set_shard(0, Kind::Outbox, 17 << 20);
    assert!(e.overloaded());
    assert_eq!(
        e.publish(&ch("a"), DataKind::Json, Bytes::new(), now),
        Err(Overloaded::Memory)
    );
    assert!(matches!(
        e.subscribe(0, &ch("a"), None, None, now),
        Err(SubscribeError::Overloaded(Overloaded::Memory))
    ));
    e.meter()
        .set_shard(0, Kind::Outbox, (15 << 20) + (512 << 10));
    e.tick(now);
    assert!(e.overloaded(), "still over 95 %");
    e.meter().set_shard(0, Kind::Outbox, 1 << 20);
    e.tick(now);
    assert!(!e.overloaded());
    assert!(e
        .publish(&ch("a"), DataKind::Json, Bytes::new(), now)
        .is_ok());
}

#[test]
fn the_presence_info_budget_refuses_info_past_it_and_comes_back() {
    let e = Engine::new(EngineConfig {
        presence: presence::PresenceConfig {
            patterns: vec!["p:*".into()],
            info_budget: 10_000,
            ..Default::default()
        },
        ..Default::default()
    });
    let now = Instant::now();
    let join = |c: &str, info| {
        Some(Join {
            who: presence_who(c, info),
            live: Arc::new(Liveness::default()),
        })
    };
    let a = e
        .subscribe(0, &ch("p:1"), None, join("a", Some(4000)), now)
        .unwrap();
    e.subscribe(0, &ch("p:2"), None, join("b", Some(4000)), now)
        .unwrap();
    assert!(matches!(
        e.subscribe(0, &ch("p:1"), None, join("c", Some(4000)), now),
        Err(SubscribeError::Presence(PresenceError::InfoBudget))
    ));
    e.subscribe(0, &ch("p:1"), None, join("d", None), now)
        .unwrap();
    assert_eq!(e.presence_info_bytes(), 8000);
    e.leave_presence(&a.channel, "a", Instant::now());
    assert_eq!(e.presence_info_bytes(), 4000);
    e.subscribe(0, &ch("p:1"), None, join("c", Some(4000)), now)
        .unwrap();
}

#[test]
fn presence_memory_returns_once_members_leave_and_their_events_age_out() {
    let e = Engine::new(EngineConfig {
        history_ttl: Duration::from_secs(1),
        presence: presence::PresenceConfig {
            patterns: vec!["p:*".into()],
            ..Default::default()
        },
        ..Default::default()
    });
    let t0 = Instant::now();
    let mut subs = Vec::new();
    for i in 0..50 {
        let s = e
            .subscribe(
                0,
                &ch("p:room"),
                None,
                Some(Join {
                    who: presence_who(&format!("c{i}"), Some(4096)),
                    live: Arc::new(Liveness::default()),
                }),
                t0,
            )
            .unwrap();
        subs.push(s);
    }
    assert!(e.meter().bytes(Kind::Presence) > 2 * 50 * 4096);
    for (i, s) in subs.iter().enumerate() {
        e.leave_presence(&s.channel, &format!("c{i}"), Instant::now());
        e.unsubscribe(0, &s.channel, t0);
    }
    assert!(e.meter().bytes(Kind::Presence) > 0, "the leave events");
    // The events age out, then the idle channel is forgotten: everything comes back.
    let mut t = Instant::now();
    for _ in 0..100 {
        t += Duration::from_millis(200);
        e.tick(t);
    }
    assert_eq!(e.meter().bytes(Kind::Presence), 0);
    assert_eq!(e.channel_count(), 0);
    assert_eq!(e.meter().total(), 0);
}

#[test]
fn channels_come_in_pages_in_name_order() {
    let e = engine(10, 1);
    let now = Instant::now();
    for i in (0..250).rev() {
        e.publish(&ch(&format!("c{i:03}")), DataKind::Json, Bytes::new(), now)
            .unwrap();
    }
    let mut after = None;
    let mut all = Vec::new();
    loop {
        let page = e.channels_page(after.as_ref(), 100);
        assert!(page.channels.len() <= 100);
        all.extend(page.channels.into_iter().map(|c| c.name));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let want: Vec<ChannelName> = (0..250).map(|i| ch(&format!("c{i:03}"))).collect();
    assert_eq!(all, want);
}

#[test]
fn frames_are_encoded_once() {
    let p = Publication::new(1, Instant::now(), DataKind::Json, Bytes::from_static(b"x"));
    let mut calls = 0;
    for _ in 0..3 {
        let f = p.frame(0, |_| {
            calls += 1;
            Bytes::from_static(b"frame")
        });
        assert_eq!(&f[..], b"frame");
    }
    assert_eq!(calls, 1);
}
