//! Who the client is behind load balancers and proxies. Pure: bytes and headers in, an
//! address out; no sockets.
//!
//! - [`parse_proxy_header`]: the PROXY protocol header (v1 text or v2 binary, parsed by the
//!   `ppp` crate) that a load balancer sends before anything else on a connection
//!   (`--proxy-protocol`).
//! - [`TrustedProxies`] and [`forwarded_client`]: `X-Forwarded-For` / `Forwarded`, believed only
//!   from a peer in `--trusted-proxies`, and then only up to the first hop that is not trusted
//!   (the right-most untrusted address: everything left of it was written by the client).
//!
//! **Invariant:** an address comes from a header only when the peer that wrote the header is
//! trusted; a client that connects directly can never choose the address it is counted as.

use std::net::IpAddr;

use hyper::header::HeaderMap;
use ipnet::IpNet;

pub use crate::types::TrustedNet;

/// Longest PROXY header accepted: a v1 header is at most 107 bytes; a v2 header is 16 bytes and
/// its addresses (36 for IPv6) plus TLVs, which load balancers keep short.
pub const MAX_PROXY_HEADER: usize = 1024;

const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 header, line end included.
const V1_MAX: usize = 107;
const V2_PREFIX: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY header that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// It starts like one but is malformed.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    /// Longer than [`MAX_PROXY_HEADER`].
    #[error("PROXY protocol header longer than {MAX_PROXY_HEADER} bytes")]
    TooLong,
}

/// A parsed PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Its length: the connection's own bytes start after it.
    pub len: usize,
    /// The client's address; `None` for a connection of the proxy itself (v2 `LOCAL`, e.g. its
    /// health checks) or an unknown one (v1 `UNKNOWN`, a v2 UNIX or unspecified address).
    pub source: Option<IpAddr>,
}

/// Parses the PROXY header at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let starts_like = |prefix: &[u8]| {
        let n = buf.len().min(prefix.len());
        buf[..n] == prefix[..n]
    };
    if !starts_like(V1_PREFIX) && !starts_like(V2_PREFIX) {
        return Err(ProxyHeaderError::Missing);
    }
    let malformed = |e: &dyn std::fmt::Display| ProxyHeaderError::Malformed(e.to_string());
    // A v1 header is one line of at most 107 bytes: parse it once it is whole (ppp would read a
    // line cut after a space as a malformed one).
    if starts_like(V1_PREFIX) && !buf.windows(2).any(|w| w == b"\r\n") {
        return if buf.len() < V1_MAX {
            Ok(None)
        } else {
            Err(malformed(&"no line end within 107 bytes"))
        };
    }
    let parsed = match ppp::HeaderResult::parse(buf) {
        ppp::HeaderResult::V1(Ok(h)) => {
            use ppp::v1::Addresses;
            let source = match h.addresses {
                Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                Addresses::Unknown => None,
            };
            ProxyHeader {
                len: h.header.len(),
                source,
            }
        }
        ppp::HeaderResult::V2(Ok(h)) => {
            use ppp::v2::{Addresses, Command};
            let source = match (h.command, h.addresses) {
                (Command::Proxy, Addresses::IPv4(a)) => Some(IpAddr::V4(a.source_address)),
                (Command::Proxy, Addresses::IPv6(a)) => Some(IpAddr::V6(a.source_address)),
                _ => None,
            };
            ProxyHeader {
                len: h.len(),
                source,
            }
        }
        r => {
            use ppp::PartialResult;
            if !r.is_incomplete() {
                return Err(match r {
                    ppp::HeaderResult::V1(Err(e)) => malformed(&e),
                    ppp::HeaderResult::V2(Err(e)) => malformed(&e),
                    _ => ProxyHeaderError::Missing,
                });
            }
            if buf.len() >= MAX_PROXY_HEADER {
                return Err(ProxyHeaderError::TooLong);
            }
            return Ok(None);
        }
    };
    if parsed.len > MAX_PROXY_HEADER {
        return Err(ProxyHeaderError::TooLong);
    }
    Ok(Some(parsed))
}

/// The networks `private` stands for.
const PRIVATE: [&str; 9] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

/// The peers whose forwarding headers are believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// The networks of `--trusted-proxies`.
    pub fn new(list: &[TrustedNet]) -> TrustedProxies {
        let mut nets = Vec::new();
        for n in list {
            match n {
                TrustedNet::None => {}
                TrustedNet::Net(net) => nets.push(*net),
                TrustedNet::Private => {
                    nets.extend(PRIVATE.iter().filter_map(|p| p.parse::<IpNet>().ok()))
                }
            }
        }
        TrustedProxies { nets }
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// An IPv4-mapped IPv6 address as IPv4 (a dual-stack listener sees IPv4 peers that way).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address a request is counted as, from its `peer` (the TCP peer, or the source of its
/// PROXY header): the peer itself unless it is a trusted proxy; from a trusted proxy, the
/// right-most address of `X-Forwarded-For` (or, without one, `Forwarded`) that is not a trusted
/// proxy, or the left-most when all are. `None`: a trusted proxy that names no client (its own
/// requests, such as health checks), which no per-address limit applies to.
pub fn forwarded_client(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    if !trusted.contains(peer) {
        return Some(canonical(peer));
    }
    let mut hops: Vec<Option<IpAddr>> = Vec::new();
    let xff = headers.get_all("x-forwarded-for");
    if xff.iter().next().is_some() {
        for v in xff {
            let Ok(v) = v.to_str() else {
                hops.push(None);
                continue;
            };
            hops.extend(v.split(',').map(|h| parse_hop(h.trim())));
        }
    } else {
        for v in headers.get_all("forwarded") {
            let Ok(v) = v.to_str() else {
                hops.push(None);
                continue;
            };
            for element in v.split(',') {
                let node = element.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
                });
                hops.push(node.and_then(|n| parse_hop(n.trim_matches('"'))));
            }
        }
    }
    // From the right: each trusted hop vouches for the one before it. An entry that is not an
    // address ends the walk at the last hop vouched for.
    let mut client = None;
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) if trusted.contains(*ip) => client = Some(canonical(*ip)),
            Some(ip) => return Some(canonical(*ip)),
            None => break,
        }
    }
    client
}

/// One hop of a forwarding header: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or
/// `[2001:db8::1]:5678`; `None` for anything else (`unknown`, obfuscated names, garbage).
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse().ok();
    }
    let (ip, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hyper::header::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v2(command: u8, family: u8, addrs: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_PREFIX.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&((addrs.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn proxy_v1_headers() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 8080\r\nGET / HTTP/1.1\r\n";
        let p = parse_proxy_header(h).unwrap().unwrap();
        assert_eq!(p.source, Some(ip("203.0.113.7")));
        assert_eq!(&h[p.len..p.len + 3], b"GET");
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n";
        let p = parse_proxy_header(h6).unwrap().unwrap();
        assert_eq!((p.source, p.len), (Some(ip("2001:db8::7")), h6.len()));
        let unknown = parse_proxy_header(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!(unknown.source, None);
        // Every prefix is incomplete, never an error.
        for n in 0..h.len() - 18 {
            assert_eq!(parse_proxy_header(&h[..n]), Ok(None), "{n}");
        }
        assert!(matches!(
            parse_proxy_header(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n"),
            Err(ProxyHeaderError::Malformed(_))
        ));
        assert_eq!(
            parse_proxy_header(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::Missing)
        );
        // No line end within the longest v1 header.
        assert!(parse_proxy_header(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat()).is_err());
    }

    #[test]
    fn proxy_v2_headers() {
        let addrs = [203, 0, 113, 7, 10, 0, 0, 1, 0xc8, 0x22, 0x1f, 0x90];
        let mut h = v2(1, 0x11, &addrs, &[0x04, 0, 1, 42]);
        let header_len = h.len();
        h.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let p = parse_proxy_header(&h).unwrap().unwrap();
        assert_eq!((p.source, p.len), (Some(ip("203.0.113.7")), header_len));
        for n in 0..header_len {
            assert_eq!(parse_proxy_header(&h[..n]), Ok(None), "{n}");
        }
        let mut six = [0u8; 36];
        six[..16].copy_from_slice(&ip_bytes("2001:db8::7"));
        let p = parse_proxy_header(&v2(1, 0x21, &six, &[]))
            .unwrap()
            .unwrap();
        assert_eq!(p.source, Some(ip("2001:db8::7")));
        // LOCAL: the proxy's own connection (health checks).
        let local = parse_proxy_header(&v2(0, 0x00, &[], &[])).unwrap().unwrap();
        assert_eq!(local.source, None);
        assert!(parse_proxy_header(&v2(1, 0x11, &[1, 2, 3], &[])).is_err());
        let long = v2(1, 0x11, &addrs, &[0u8; 2000]);
        assert!(parse_proxy_header(&long).is_err());
        assert!(parse_proxy_header(&long[..MAX_PROXY_HEADER]).is_err());
    }

    fn ip_bytes(s: &str) -> [u8; 16] {
        match ip(s) {
            IpAddr::V6(v) => v.octets(),
            IpAddr::V4(_) => unreachable!(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap();
            h.append(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn trusted_networks() {
        let t = TrustedProxies::new(&[
            TrustedNet::parse("10.1.0.0/16").unwrap(),
            TrustedNet::parse("192.0.2.1").unwrap(),
        ]);
        assert!(t.contains(ip("10.1.200.3")));
        assert!(!t.contains(ip("10.2.0.1")));
        assert!(t.contains(ip("192.0.2.1")));
        assert!(t.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        let p = TrustedProxies::new(&[TrustedNet::Private]);
        for a in [
            "127.0.0.1",
            "10.9.9.9",
            "172.20.0.1",
            "192.168.1.1",
            "fd00::1",
            "::1",
        ] {
            assert!(p.contains(ip(a)), "{a}");
        }
        for a in ["203.0.113.1", "8.8.8.8", "2001:db8::1", "172.32.0.1"] {
            assert!(!p.contains(ip(a)), "{a}");
        }
        assert!(!TrustedProxies::new(&[TrustedNet::None]).contains(ip("127.0.0.1")));
        assert!(TrustedNet::parse("10.0.0.0/33").is_err());
        assert!(TrustedNet::parse("lan").is_err());
        assert_eq!(
            TrustedNet::parse("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let t = TrustedProxies::new(&[TrustedNet::parse("10.0.0.0/8").unwrap()]);
        let lb = ip("10.0.0.2");
        let client = |peer, pairs: &[(&str, &str)]| forwarded_client(peer, &headers(pairs), &t);
        // A direct client is its own address, whatever it claims.
        assert_eq!(
            client(ip("198.51.100.1"), &[("x-forwarded-for", "1.2.3.4")]),
            Some(ip("198.51.100.1"))
        );
        // Through the load balancer: the hop it appended, not what the client wrote before it.
        assert_eq!(
            client(lb, &[("x-forwarded-for", "1.2.3.4, 203.0.113.9")]),
            Some(ip("203.0.113.9"))
        );
        // Several trusted hops, several header lines, ports.
        assert_eq!(
            client(
                lb,
                &[
                    ("x-forwarded-for", "1.2.3.4"),
                    ("x-forwarded-for", "203.0.113.9:5555, 10.0.0.7")
                ]
            ),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            client(lb, &[("x-forwarded-for", "[2001:db8::9]:443")]),
            Some(ip("2001:db8::9"))
        );
        // All trusted: the left-most; nothing usable: no client.
        assert_eq!(
            client(lb, &[("x-forwarded-for", "10.0.0.9, 10.0.0.8")]),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(client(lb, &[]), None);
        assert_eq!(client(lb, &[("x-forwarded-for", "unknown")]), None);
        // Garbage stops the walk at the last hop vouched for.
        assert_eq!(
            client(lb, &[("x-forwarded-for", "203.0.113.9, bogus, 10.0.0.5")]),
            Some(ip("10.0.0.5"))
        );
        // Forwarded (RFC 7239) when there is no X-Forwarded-For.
        assert_eq!(
            client(
                lb,
                &[(
                    "forwarded",
                    "for=1.2.3.4;proto=http, For=\"[2001:db8:cafe::17]:4711\";by=10.0.0.2"
                )]
            ),
            Some(ip("2001:db8:cafe::17"))
        );
        assert_eq!(
            client(
                lb,
                &[
                    ("forwarded", "for=1.2.3.4"),
                    ("x-forwarded-for", "203.0.113.9")
                ]
            ),
            Some(ip("203.0.113.9"))
        );
    }
}
