//! Channel permissions as the settings and tokens write them: [`Perm`], [`Perms`], [`Pattern`]
//! and [`Rule`] (`PERMS=PATTERN`). Plain values, parsed from `--allow` by `config` and from a
//! token's `channels` claim by `auth`, which checks them (`auth::Grants`).

/// Longest channel pattern, bytes.
pub const MAX_PATTERN_LEN: usize = 256;

/// One permission on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// Subscribe (WebSocket `subscribe`, SSE), resume included.
    Subscribe = 1,
    /// Publish (WebSocket `publish`, `POST /api/publish`, `/api/broadcast`).
    Publish = 2,
    /// Query presence (WebSocket `presence`, `GET /api/presence/…`).
    Presence = 4,
    /// Read history (`GET /api/history/…`).
    History = 8,
}

impl Perm {
    /// The name used in rules, claims and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Subscribe => "subscribe",
            Perm::Publish => "publish",
            Perm::Presence => "presence",
            Perm::History => "history",
        }
    }
}

/// A set of [`Perm`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perms(pub(crate) u8);

impl Perms {
    /// Every permission.
    pub const ALL: Perms = Perms(15);

    /// Whether `p` is in the set.
    pub fn contains(self, p: Perm) -> bool {
        self.0 & p as u8 != 0
    }

    /// Parses `subscribe,history` or `all`.
    pub fn parse(s: &str) -> Result<Perms, String> {
        let mut bits = 0;
        for name in s.split(['+', ',', '|']).map(str::trim) {
            bits |= match name {
                "subscribe" => Perm::Subscribe as u8,
                "publish" => Perm::Publish as u8,
                "presence" => Perm::Presence as u8,
                "history" => Perm::History as u8,
                "all" | "*" => Perms::ALL.0,
                other => {
                    return Err(format!(
                        "{other:?} is not subscribe, publish, presence, history or all"
                    ))
                }
            };
        }
        Ok(Perms(bits))
    }
}

/// A channel pattern: literal bytes, `*` (any run of characters, none included) and `{sub}`
/// (the token's subject, matched literally: a `*` in a subject is no wildcard).
///
/// `{sub}` must own its place: it is preceded by the start or a separator (a channel character
/// that is not a letter or digit) and followed by the end or a separator, and no `*` comes before
/// it. A subject that contains one of the separators around `{sub}` is never substituted (see
/// `auth::Grants`), so the subject is the whole run between them and no subject can reach another
/// subject's channels: with `user:{sub}:*`, subject `alice` has `user:alice:…` and subject
/// `alice:x` has no `{sub}` channel at all, instead of sharing `user:alice:x:…` with alice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
    text: String,
    /// The ASCII characters next to a `{sub}` (bit per character).
    pub(crate) delims: u128,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Star,
    Sub,
}

impl Pattern {
    /// Parses a pattern (at most [`MAX_PATTERN_LEN`] bytes, not empty).
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() || s.len() > MAX_PATTERN_LEN {
            return Err(format!("a pattern is 1 to {MAX_PATTERN_LEN} bytes"));
        }
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            if let Some(after) = rest.strip_prefix("{sub}") {
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Sub);
                rest = after;
                continue;
            }
            if c == '*' {
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                if parts.last() != Some(&Part::Star) {
                    parts.push(Part::Star);
                }
            } else {
                lit.push(c);
            }
            rest = &rest[c.len_utf8()..];
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        let delims = sub_delimiters(&parts)?;
        Ok(Pattern {
            parts,
            text: s.to_owned(),
            delims,
        })
    }

    /// Whether the pattern names `{sub}`.
    pub fn uses_sub(&self) -> bool {
        self.parts.contains(&Part::Sub)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `channel` matches, with `{sub}` standing for `sub` (no subject: a pattern with
    /// `{sub}` matches nothing).
    pub fn matches(&self, channel: &str, sub: Option<&str>) -> bool {
        // Literal groups between stars, `{sub}` spliced in.
        let mut groups: Vec<String> = vec![String::new()];
        for p in &self.parts {
            match p {
                Part::Lit(l) => groups.last_mut().map_or((), |g| g.push_str(l)),
                Part::Sub => match sub {
                    Some(s) => groups.last_mut().map_or((), |g| g.push_str(s)),
                    None => return false,
                },
                Part::Star => groups.push(String::new()),
            }
        }
        let (Some(first), Some(last)) = (groups.first(), groups.last()) else {
            return false;
        };
        if groups.len() == 1 {
            return channel == first;
        }
        if channel.len() < first.len() + last.len()
            || !channel.starts_with(first.as_str())
            || !channel.ends_with(last.as_str())
        {
            return false;
        }
        let mut middle = &channel[first.len()..channel.len() - last.len()];
        for g in &groups[1..groups.len() - 1] {
            match middle.find(g.as_str()) {
                Some(at) => middle = &middle[at + g.len()..],
                None => return false,
            }
        }
        true
    }
}

/// The separators around each `{sub}` of a pattern, after checking where `{sub}` stands.
fn sub_delimiters(parts: &[Part]) -> Result<u128, String> {
    const PLACE: &str = "{sub} must stand between separators (the start or end of the \
                         pattern, or a character such as : / . - that is not a letter or digit), \
                         with no * before it";
    let mut delims = 0u128;
    let mut star_seen = false;
    for (i, p) in parts.iter().enumerate() {
        match p {
            Part::Star => star_seen = true,
            Part::Lit(_) => {}
            Part::Sub => {
                if star_seen {
                    return Err(PLACE.into());
                }
                let before = match i.checked_sub(1).map(|j| &parts[j]) {
                    None => None,
                    Some(Part::Lit(l)) => Some(l.chars().next_back()),
                    Some(_) => return Err(PLACE.into()),
                };
                let after = match parts.get(i + 1) {
                    None => None,
                    Some(Part::Lit(l)) => Some(l.chars().next()),
                    Some(_) => return Err(PLACE.into()),
                };
                for c in [before, after].into_iter().flatten().flatten() {
                    if c.is_ascii_alphanumeric() || !c.is_ascii() {
                        return Err(PLACE.into());
                    }
                    delims |= 1u128 << (c as u32);
                }
            }
        }
    }
    Ok(delims)
}

/// Whether `sub` holds none of the characters in `delims`.
pub(crate) fn sub_fits(sub: &str, delims: u128) -> bool {
    sub.bytes()
        .all(|b| b >= 128 || delims & (1u128 << u32::from(b)) == 0)
}

/// Permissions on the channels matching a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// What is allowed.
    pub perms: Perms,
    /// Where.
    pub pattern: Pattern,
}

impl Rule {
    /// Parses `PERMS=PATTERN`, e.g. `subscribe,history=public:*` or `all=user:{sub}`.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let (perms, pattern) = s
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not PERMS=PATTERN (e.g. subscribe=public:*)"))?;
        Ok(Rule {
            perms: Perms::parse(perms)?,
            pattern: Pattern::parse(pattern.trim())?,
        })
    }

    /// The rule as written.
    pub fn to_text(&self) -> String {
        let mut names = Vec::new();
        for p in [
            Perm::Subscribe,
            Perm::Publish,
            Perm::Presence,
            Perm::History,
        ] {
            if self.perms.contains(p) {
                names.push(p.as_str());
            }
        }
        format!("{}={}", names.join(","), self.pattern.as_str())
    }
}

impl serde::Serialize for Rule {
    /// As written: `subscribe,history=public:*`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_text())
    }
}
