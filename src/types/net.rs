//! `--trusted-proxies` entries: the networks whose forwarding headers are believed (checked in
//! `proxy`); and server URLs with their password hidden (`check-config`, backplane logs).

use std::net::IpAddr;

use ipnet::IpNet;

/// One entry of `--trusted-proxies`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustedNet {
    /// `none`: trust nobody.
    None,
    /// `private`: loopback, private (RFC 1918, RFC 4193), shared (RFC 6598) and link-local
    /// networks, where load balancers, ingress controllers and sidecars live.
    Private,
    /// A network (`10.0.0.0/8`) or one address.
    Net(IpNet),
}

impl TrustedNet {
    /// Parses `none`, `private`, a CIDR network or an address.
    pub fn parse(s: &str) -> Result<TrustedNet, String> {
        let s = s.trim();
        match s {
            "none" => return Ok(TrustedNet::None),
            "private" => return Ok(TrustedNet::Private),
            _ => {}
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(TrustedNet::Net(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| TrustedNet::Net(IpNet::from(ip)))
            .map_err(|_| format!("{s:?} is not a CIDR network, an address, `private` or `none`"))
    }
}

/// Written as it is given (`private`, `none`, a network): `relay check-config` prints it.
impl serde::Serialize for TrustedNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for TrustedNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrustedNet::None => f.write_str("none"),
            TrustedNet::Private => f.write_str("private"),
            TrustedNet::Net(n) => write!(f, "{n}"),
        }
    }
}

/// `redis://user:pass@host` → `redis://user:<hidden>@host`; `nats://token@host` →
/// `nats://<hidden>@host` (`hidden` in place of the secret), for output and logs.
pub fn mask_url_password(url: &str, hidden: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:{hidden}"),
        None => hidden.to_owned(),
    };
    format!("{scheme}://{userinfo}{}", &rest[at..])
}
