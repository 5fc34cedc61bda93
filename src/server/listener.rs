//! Listening sockets: one per shard, all on the same address with `SO_REUSEPORT`, so the kernel
//! spreads new connections over the shards with no accept lock.
//!
//! `SO_REUSEPORT` would also let a second server of the same user bind the same address, and
//! the kernel would then split connections between two unrelated servers. So [`bind_shards`]
//! first tries a plain bind (which fails while anyone listens there), and once its own sockets
//! listen, looks for listening sockets on the port that are not its own
//! (`/proc/net/tcp{,6}`): two servers starting at the same moment both see each other and both
//! refuse; never do both serve.
//!
//! **Invariant:** `bind_shards` returns only when no other socket listens on the address.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog of each listener when it is bound; each shard sets `--listen-backlog`
/// when it starts serving.
pub const BACKLOG: i32 = 4096;

/// The kernel's cap on any listener's backlog (`net.core.somaxconn`), when it can be read.
pub fn somaxconn() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Binds one non-blocking listener with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Sets what every connection accepted from `listener` inherits from it (Linux copies a
/// listening socket's options into each connection it accepts), which saves two syscalls per
/// connection: no Nagle delay on our small frames, and bytes the kernel holds for a client
/// that reads nothing (an answer already handed to the socket, which no write of ours waits
/// on) bounded by `write_timeout` too: the kernel resets a connection whose data stays
/// unacknowledged, zero-window probes included, for that long. Then sets the backlog:
/// `listen()` on a listening socket sets it again, so this serves listeners bound here and by
/// a caller of `server::start_on` alike.
pub fn prepare(
    listener: &impl std::os::fd::AsFd,
    write_timeout: std::time::Duration,
    backlog: i32,
) -> io::Result<()> {
    let sock = socket2::SockRef::from(listener);
    sock.set_tcp_nodelay(true)?;
    sock.set_tcp_user_timeout(Some(write_timeout))?;
    sock.listen(backlog)
}

/// Binds `n` listeners on `addr`, unless another socket listens there already. With port 0
/// the first one picks the port and the others join it.
pub fn bind_shards(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    if addr.port() != 0 {
        probe(addr)?;
    }
    let first = bind_reuseport(addr)?;
    let actual = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..n {
        out.push(bind_reuseport(actual)?);
    }
    ensure_alone(actual, &out)?;
    Ok(out)
}

fn in_use(addr: SocketAddr, how: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{addr} is already served by another process ({how}); refusing to start: both \
             would bind it (SO_REUSEPORT) and the kernel would split the connections between \
             two unrelated servers. Stop the other one or choose another --listen address"
        ),
    )
}

/// A bind without `SO_REUSEPORT`: refused while any socket listens on `addr`.
fn probe(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    match socket.bind(&addr.into()) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            Err(in_use(addr, "the address is in use"))
        }
        r => r,
    }
}

/// Fails when a listening socket that is not one of `ours` covers `addr` (the same port, and
/// the same address or either one a wildcard).
fn ensure_alone(addr: SocketAddr, ours: &[TcpListener]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut own = Vec::with_capacity(ours.len());
    for l in ours {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd()));
        match link
            .ok()
            .as_ref()
            .and_then(|p| socket_inode(&p.to_string_lossy()))
        {
            Some(inode) => own.push(inode),
            // No /proc: the probe bind is the only check.
            None => return Ok(()),
        }
    }
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        let text = listening_prefix(io::BufReader::new(file));
        for (local, inode) in listening(&text) {
            if local.port() == addr.port()
                && overlaps(local.ip(), addr.ip())
                && !own.contains(&inode)
            {
                return Err(in_use(
                    addr,
                    &format!("a listening socket we do not own, inode {inode}"),
                ));
            }
        }
    }
    Ok(())
}

/// The head line and the listening sockets of a `/proc/net/tcp{,6}` table. The kernel lists
/// the listening sockets first (its iterator walks the listening hash, then the established
/// one), so reading stops at the first other line: a restart amid a fleet's 10,000 closing
/// connections would otherwise read (and the kernel format) every one of them.
fn listening_prefix(table: impl io::BufRead) -> String {
    let mut out = String::new();
    for (i, line) in table.lines().enumerate() {
        let Ok(line) = line else { break };
        if i > 0 && line.split_whitespace().nth(3) != Some("0A") {
            break;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The inode of a `/proc/self/fd` link to a socket (`socket:[12345]`).
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The listening sockets of a `/proc/net/tcp` or `tcp6` table: local address and inode.
fn listening(table: &str) -> impl Iterator<Item = (SocketAddr, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" {
            return None;
        }
        let (ip, port) = f[1].split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        // Each 32-bit word is printed as a native-endian number.
        let word = |w: &str| u32::from_str_radix(w, 16).ok().map(u32::to_ne_bytes);
        let ip = match ip.len() {
            8 => IpAddr::from(word(ip)?),
            32 => {
                let mut b = [0u8; 16];
                for i in 0..4 {
                    b[4 * i..4 * i + 4].copy_from_slice(&word(&ip[8 * i..8 * i + 8])?);
                }
                IpAddr::from(b)
            }
            _ => return None,
        };
        Some((SocketAddr::new(ip, port), f[9].parse().ok()?))
    })
}

/// Whether connections to `a` could reach a listener on `b` or the other way round.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    let (a, b) = (crate::proxy::canonical(a), crate::proxy::canonical(b));
    a.is_unspecified() || b.is_unspecified() || a == b
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shards_share_one_port() {
        let ls = bind_shards("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }

    #[test]
    fn a_second_server_on_the_same_address_is_refused() {
        let ours = bind_shards("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = ours[0].local_addr().unwrap();
        let err = bind_shards(addr, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Past the probe (as when two start at once), the table check still sees the first.
        let theirs = bind_reuseport(addr).unwrap();
        let err = ensure_alone(addr, std::slice::from_ref(&theirs)).unwrap_err();
        assert!(err.to_string().contains("do not own"), "{err}");
        assert!(ensure_alone(addr, &ours).is_err());
        // A wildcard on the same port covers it too.
        let any = SocketAddr::new("0.0.0.0".parse().unwrap(), addr.port());
        assert!(bind_shards(any, 1).is_err());
    }

    #[test]
    fn accepted_connections_inherit_the_listeners_socket_options() {
        use std::time::Duration;
        let l = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        prepare(&l, Duration::from_secs(7), 64).unwrap();
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (conn, _) = l.accept().unwrap();
        // What the shard no longer sets on each connection.
        assert!(conn.nodelay().unwrap());
        assert_eq!(
            socket2::SockRef::from(&conn).tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn the_kernel_cap_on_backlogs_is_read() {
        // Every Linux has it; the value is the machine's.
        assert!(somaxconn().is_some_and(|n| n > 0));
    }

    #[test]
    fn proc_net_tcp_lines() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0\n";
        let l: Vec<_> = listening(table).collect();
        // The established line (and anything after it) is not read.
        assert_eq!(listening_prefix(table.as_bytes()).lines().count(), 2);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].1, 4242);
        assert_eq!(l[0].0.port(), 8080);
        if cfg!(target_endian = "little") {
            assert_eq!(l[0].0.ip(), IpAddr::from([127, 0, 0, 1]));
        }
        assert_eq!(socket_inode("socket:[99]"), Some(99));
        assert_eq!(socket_inode("/dev/null"), None);
        assert!(overlaps(
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap()
        ));
        assert!(overlaps(
            "::".parse().unwrap(),
            "127.0.0.1".parse().unwrap()
        ));
        assert!(!overlaps(
            "127.0.0.2".parse().unwrap(),
            "127.0.0.1".parse().unwrap()
        ));
    }
}
