//! JSON command parsing: serde_json (the server's `json::parse_command`) against simd-json, on
//! publish commands with 64 B and 1 KiB `data` and on a resuming subscribe.
//! `cargo bench --bench json`; results and the decision in `benches/RESULTS.md`.
//!
//! The simd-json parser lives here, not in the server, because it lost. It does the same job as
//! `parse_command`: the same fields, `id` and `data` kept as raw slices of the input (located
//! with simd-json's structural indexes, since simd-json unescapes strings in place, in a copy),
//! the same checks, the same `Request`; the bench asserts both give equal results on its inputs.
//! `simd_json_tape_only` is simd-json's parse alone, a lower bound for any simd-json design.
//!
//! `BENCH_MIN_OF_BATCHES=1 cargo bench --bench json` prints instead the fastest of 3000
//! interleaved batches of each parser: on a busy machine the minimum is the figure that repeats.

use std::borrow::Cow;
use std::cell::RefCell;
use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use simd_json::{Buffers, Node, StaticNode, Tape, INPUT_PADDING};

use relay::protocol::json::parse_command;
use relay::protocol::{ClientPresence, Command, CommandError, Payload, ReqId, Request};
use relay::types::{ChannelName, Epoch, StreamPosition};

/// A publish whose `data` is a JSON object of about `n` bytes, as a chat or game client sends.
fn publish(n: usize) -> String {
    let mut data = String::from("{\"user\":\"alice\",\"kind\":\"chat\",\"items\":[");
    let mut i = 0;
    while data.len() + 40 < n {
        if i > 0 {
            data.push(',');
        }
        data.push_str(&format!(
            "{{\"id\":{i},\"text\":\"hello world {i}\",\"ok\":true}}"
        ));
        i += 1;
    }
    data.push_str("]}");
    while data.len() < n {
        data.insert(data.len() - 1, ' ');
    }
    format!(r#"{{"type":"publish","id":17,"channel":"room:lobby-42","data":{data}}}"#)
}

/// Publishes with 64 B and 1 KiB of `data`, and a resuming subscribe.
fn inputs() -> Vec<(String, String)> {
    let mut inputs: Vec<(String, String)> = [64, 1024]
        .into_iter()
        .map(|n| (format!("publish_{n}"), publish(n)))
        .collect();
    inputs.push((
        "subscribe_resume".into(),
        r#"{"type":"subscribe","id":3,"channel":"room:lobby-42","since":41,"epoch":"9f2c61d3a0b4e5f7"}"#
            .into(),
    ));
    inputs
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("json/parse_command");
    for (name, input) in &inputs() {
        let a = format!("{:?}", parse_command(input.as_bytes()));
        let b = format!("{:?}", simd_parse_command(input.as_bytes()));
        assert_eq!(a, b, "the two parsers disagree on {input}");
        assert!(a.starts_with("Ok"), "{a}");
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_with_input(BenchmarkId::new("serde_json", name), input, |b, i| {
            b.iter(|| parse_command(black_box(i.as_bytes())).is_ok())
        });
        g.bench_with_input(BenchmarkId::new("simd_json", name), input, |b, i| {
            b.iter(|| simd_parse_command(black_box(i.as_bytes())).is_ok())
        });
        g.bench_with_input(
            BenchmarkId::new("simd_json_tape_only", name),
            input,
            |b, i| b.iter(|| simd_tape_only(black_box(i.as_bytes()))),
        );
    }
    g.finish();
}

/// The three parsers in turn, 3000 batches of 200 calls each; the fastest batch of each.
fn min_of_batches() {
    for (name, input) in inputs() {
        let i = input.as_bytes();
        let batch = 200;
        let (mut a, mut b, mut c) = (f64::MAX, f64::MAX, f64::MAX);
        let per_call = |t: std::time::Instant| t.elapsed().as_nanos() as f64 / f64::from(batch);
        for _ in 0..3000 {
            let t = std::time::Instant::now();
            for _ in 0..batch {
                black_box(parse_command(black_box(i)).is_ok());
            }
            a = a.min(per_call(t));
            let t = std::time::Instant::now();
            for _ in 0..batch {
                black_box(simd_parse_command(black_box(i)).is_ok());
            }
            b = b.min(per_call(t));
            let t = std::time::Instant::now();
            for _ in 0..batch {
                black_box(simd_tape_only(black_box(i)));
            }
            c = c.min(per_call(t));
        }
        println!(
            "| {name} | {} B | {a:.0} ns | {b:.0} ns | {c:.0} ns | {:+.0}% |",
            i.len(),
            (b / a - 1.0) * 100.0
        );
    }
}

criterion_group!(benches, parse);

fn main() {
    if std::env::var_os("BENCH_MIN_OF_BATCHES").is_some() {
        return min_of_batches();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

// ---- the simd-json parser ----------------------------------------------------------------------

/// Nesting limit, as serde_json's.
const MAX_DEPTH: usize = 128;

thread_local! {
    /// One parser per thread, reused frame after frame (as a shard would).
    static PARSER: RefCell<Parser> = RefCell::new(Parser::default());
}

/// simd-json's buffers, the padded copy of the frame, and the tape's allocation.
struct Parser {
    buffers: Buffers,
    scratch: Vec<u8>,
    tape: Tape<'static>,
}

impl Default for Parser {
    fn default() -> Self {
        Self {
            buffers: Buffers::with_max_depth(1024, MAX_DEPTH),
            scratch: Vec::new(),
            tape: Tape(Vec::new()),
        }
    }
}

fn simd_tape_only(input: &[u8]) -> bool {
    PARSER.with(|p| {
        let p = &mut *p.borrow_mut();
        let len = input.len();
        p.scratch.clear();
        p.scratch.extend_from_slice(input);
        p.scratch.resize(len + INPUT_PADDING, b' ');
        let mut tape = std::mem::replace(&mut p.tape, Tape(Vec::new())).reset();
        let ok =
            simd_json::fill_tape_padded(&mut p.scratch, len, &mut p.buffers, &mut tape).is_ok();
        p.tape = tape.reset();
        ok
    })
}

/// `parse_command` with simd-json.
fn simd_parse_command(input: &[u8]) -> Result<Request<'_>, CommandError<'_>> {
    let fields = PARSER.with(|p| p.borrow_mut().fields(input))?;
    build(fields)
}

/// The fields of a command; `id`, `data` and `info` raw.
#[derive(Default)]
#[allow(clippy::type_complexity)]
struct Fields<'a> {
    ty: Option<Cow<'a, str>>,
    id: Option<&'a str>,
    channel: Option<Cow<'a, str>>,
    data: Option<&'a str>,
    since: Option<u64>,
    epoch: Option<Cow<'a, str>>,
    presence: Option<(Option<Cow<'a, str>>, Option<&'a str>)>,
}

/// The checks of `json::parse_command`, on extracted fields.
fn build(raw: Fields<'_>) -> Result<Request<'_>, CommandError<'_>> {
    let id = raw.id.map(ReqId::Json);
    let err = |code: &'static str, message: Cow<'static, str>| CommandError { id, code, message };
    let channel = || -> Result<ChannelName, CommandError<'_>> {
        let name = raw
            .channel
            .as_deref()
            .ok_or_else(|| err("bad_request", "missing field `channel`".into()))?;
        ChannelName::new(name).map_err(|e| err("invalid_channel", e.to_string().into()))
    };
    let command = match raw.ty.as_deref() {
        Some("subscribe") => Command::Subscribe {
            channel: channel()?,
            resume: raw.since.map(|seq| StreamPosition {
                epoch: raw
                    .epoch
                    .as_deref()
                    .and_then(Epoch::parse)
                    .unwrap_or(Epoch(0)),
                seq,
            }),
            presence: match raw.presence {
                None => None,
                Some((user, info)) => {
                    if user.as_ref().is_some_and(|u| u.is_empty() || u.len() > 256) {
                        return Err(err(
                            "bad_request",
                            "presence.user must be 1 to 256 bytes".into(),
                        ));
                    }
                    if info.is_some_and(|i| !i.starts_with('{') || i.len() > 4096) {
                        return Err(err(
                            "bad_request",
                            "presence.info must be a JSON object".into(),
                        ));
                    }
                    Some(ClientPresence { user, info })
                }
            },
        },
        Some("presence") => Command::Presence {
            channel: channel()?,
            page: Default::default(),
        },
        Some("unsubscribe") => Command::Unsubscribe {
            channel: channel()?,
        },
        Some("publish") => {
            let channel = channel()?;
            let Some(data) = raw.data else {
                return Err(err("bad_request", "missing field `data`".into()));
            };
            Command::Publish {
                channel,
                data: Payload::Json(data),
                cond: Default::default(),
            }
        }
        Some("heartbeat") => Command::Heartbeat,
        Some(other) => {
            return Err(err(
                "unknown_type",
                format!("unknown command type {other:?}").into(),
            ))
        }
        None => return Err(err("unknown_type", "missing field `type`".into())),
    };
    Ok(Request { id, command })
}

fn bad_json(message: String) -> CommandError<'static> {
    CommandError {
        id: None,
        code: "bad_json",
        message: message.into(),
    }
}

fn bad_request(message: String) -> CommandError<'static> {
    CommandError {
        id: None,
        code: "bad_request",
        message: format!("a field has the wrong type: {message}").into(),
    }
}

impl Parser {
    fn fields<'i>(&mut self, input: &'i [u8]) -> Result<Fields<'i>, CommandError<'i>> {
        let len = input.len();
        self.scratch.clear();
        self.scratch.reserve(len + INPUT_PADDING);
        self.scratch.extend_from_slice(input);
        self.scratch.resize(len + INPUT_PADDING, b' ');
        let mut tape = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset();
        let result =
            match simd_json::fill_tape_padded(&mut self.scratch, len, &mut self.buffers, &mut tape)
            {
                Ok(()) => Doc {
                    tape: &tape.0,
                    st: self.buffers.structural_indexes(),
                    input,
                }
                .command(),
                Err(e) => Err(bad_json(format!("not a JSON object: {e}"))),
            };
        self.tape = tape.reset();
        result
    }
}

/// A parsed frame: the tape (values), the structural indexes (where each token starts) and the
/// input as received (simd-json's copy has its strings unescaped in place).
struct Doc<'t, 'x, 'i> {
    tape: &'t [Node<'x>],
    st: &'t [u32],
    input: &'i [u8],
}

fn inconsistent() -> CommandError<'static> {
    bad_json("not a JSON object: unexpected structure".to_owned())
}

impl<'i> Doc<'_, '_, 'i> {
    fn at(&self, s: usize) -> Option<u8> {
        self.input.get(*self.st.get(s)? as usize).copied()
    }

    fn skip_node(&self, t: usize) -> usize {
        match self.tape.get(t) {
            Some(Node::Object { count, .. } | Node::Array { count, .. }) => t + 1 + count,
            _ => t + 1,
        }
    }

    /// The structural index after the value starting at structural `s`.
    fn skip_value(&self, s: usize) -> Option<usize> {
        if !matches!(self.at(s)?, b'{' | b'[') {
            return Some(s + 1);
        }
        let mut depth = 0usize;
        let mut i = s;
        loop {
            match self.at(i)? {
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// The exact text of the value from structural `s` to before structural `after`.
    fn raw(&self, s: usize, after: usize) -> Option<&'i str> {
        let start = *self.st.get(s)? as usize;
        let mut end = *self.st.get(after)? as usize;
        while end > start && matches!(self.input[end - 1], b' ' | b'\t' | b'\n' | b'\r') {
            end -= 1;
        }
        std::str::from_utf8(self.input.get(start..end)?).ok()
    }

    /// A string (borrowed from the input when it has no escapes) or null.
    fn string(&self, t: usize, s: usize, after: usize) -> Option<Option<Cow<'i, str>>> {
        match self.tape.get(t)? {
            Node::Static(StaticNode::Null) => Some(None),
            Node::String(v) => {
                let raw = self.raw(s, after)?;
                let inner = raw.get(1..raw.len().checked_sub(1)?)?;
                Some(Some(if inner.contains('\\') {
                    Cow::Owned((*v).to_owned())
                } else {
                    Cow::Borrowed(inner)
                }))
            }
            _ => None,
        }
    }

    /// Calls `f(key, t, s, after)` for each member of the object at tape `t`, structural `s`.
    fn members(
        &self,
        t: usize,
        s: usize,
        mut f: impl FnMut(&str, usize, usize, usize) -> Result<(), CommandError<'i>>,
    ) -> Result<(), CommandError<'i>> {
        let Some(Node::Object { len, .. }) = self.tape.get(t) else {
            return Err(inconsistent());
        };
        let (mut t, mut s) = (t + 1, s + 1);
        for _ in 0..*len {
            let Some(Node::String(key)) = self.tape.get(t) else {
                return Err(inconsistent());
            };
            // key, ':', value … then ',' or '}'.
            let after = self.skip_value(s + 2).ok_or_else(inconsistent)?;
            f(key, t + 1, s + 2, after)?;
            t = self.skip_node(t + 1);
            s = after + 1;
        }
        Ok(())
    }

    fn command(&self) -> Result<Fields<'i>, CommandError<'i>> {
        if !matches!(self.tape.first(), Some(Node::Object { .. })) {
            return Err(bad_request("a command must be a JSON object".to_owned()));
        }
        let mut f = Fields::default();
        let mut seen = 0u8;
        let wrong = |field: &str, want: &str| bad_request(format!("`{field}` must be {want}"));
        self.members(0, 0, |key, t, s, after| {
            let bit = match key {
                "type" => 1,
                "id" => 2,
                "channel" => 4,
                "data" => 8,
                "since" => 16,
                "epoch" => 32,
                "presence" => 64,
                _ => return Ok(()),
            };
            if seen & bit != 0 {
                return Err(bad_request(format!("duplicate field `{key}`")));
            }
            seen |= bit;
            let string = |name| {
                self.string(t, s, after)
                    .ok_or_else(|| wrong(name, "a string"))
            };
            match bit {
                1 => f.ty = string("type")?,
                2 => f.id = Some(self.raw(s, after).ok_or_else(inconsistent)?),
                4 => f.channel = string("channel")?,
                8 => f.data = Some(self.raw(s, after).ok_or_else(inconsistent)?),
                16 => {
                    f.since = match self.tape.get(t) {
                        Some(Node::Static(StaticNode::Null)) => None,
                        Some(Node::Static(StaticNode::U64(n))) => Some(*n),
                        Some(Node::Static(StaticNode::I64(n))) if *n >= 0 => Some(*n as u64),
                        _ => return Err(wrong("since", "a non-negative integer")),
                    }
                }
                32 => f.epoch = string("epoch")?,
                _ => f.presence = self.presence(t, s)?,
            }
            Ok(())
        })?;
        Ok(f)
    }

    #[allow(clippy::type_complexity)]
    fn presence(
        &self,
        t: usize,
        s: usize,
    ) -> Result<Option<(Option<Cow<'i, str>>, Option<&'i str>)>, CommandError<'i>> {
        match self.tape.get(t) {
            Some(Node::Static(StaticNode::Null)) => return Ok(None),
            Some(Node::Object { .. }) => {}
            _ => return Err(bad_request("`presence` must be an object".to_owned())),
        }
        let (mut user, mut info, mut seen) = (None, None, 0u8);
        self.members(t, s, |key, t, s, after| {
            let bit = match key {
                "user" => 1,
                "info" => 2,
                _ => return Ok(()),
            };
            if seen & bit != 0 {
                return Err(bad_request(format!("duplicate field `{key}`")));
            }
            seen |= bit;
            if bit == 1 {
                user = self
                    .string(t, s, after)
                    .ok_or_else(|| bad_request("`presence.user` must be a string".into()))?;
            } else if !matches!(self.tape.get(t), Some(Node::Static(StaticNode::Null))) {
                info = Some(self.raw(s, after).ok_or_else(inconsistent)?);
            }
            Ok(())
        })?;
        Ok(Some((user, info)))
    }
}
