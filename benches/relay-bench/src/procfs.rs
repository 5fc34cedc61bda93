//! CPU time and RSS of processes, read from /proc (the server's, relay-bench's own, its workers').

use std::time::Instant;

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, 100 on Linux).
fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process (all its threads, dead ones included), in seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// Resident set size in bytes.
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sum of the RSS of a set of processes.
pub fn rss_sum(pids: &[String]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_bytes(p)).sum()
}

/// Read-like and write-like syscalls of a process, all threads (`syscr` + `syscw` of
/// /proc/<pid>/io: read, readv, recvmsg, write, writev, sendmsg… but not epoll_wait, accept or
/// futex).
pub fn io_syscalls(pid: &str) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("syscr:")? + field("syscw:")?)
}

/// Voluntary context switches (a thread blocked: each is one sleep, so one wake-up) and
/// involuntary ones (preempted), summed over the live threads of a process.
pub fn ctx_switches(pid: &str) -> Option<(u64, u64)> {
    let mut v = 0;
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(t) = t else { continue };
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for l in status.lines() {
            if let Some(x) = l.strip_prefix("voluntary_ctxt_switches:") {
                v += x.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(x) = l.strip_prefix("nonvoluntary_ctxt_switches:") {
                n += x.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some((v, n))
}

/// What a set of processes did over a window: CPU, read/write syscalls, context switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_s: f64,
    pub syscalls: u64,
    pub vol_ctx: u64,
    pub invol_ctx: u64,
}

impl Usage {
    pub fn now(pids: &[String]) -> Option<Self> {
        if pids.is_empty() {
            return None;
        }
        let mut u = Usage::default();
        for p in pids {
            u.cpu_s += cpu_seconds(p)?;
            u.syscalls += io_syscalls(p).unwrap_or(0);
            let (v, n) = ctx_switches(p).unwrap_or((0, 0));
            u.vol_ctx += v;
            u.invol_ctx += n;
        }
        Some(u)
    }

    pub fn since(self, start: Usage) -> Usage {
        Usage {
            cpu_s: (self.cpu_s - start.cpu_s).max(0.0),
            syscalls: self.syscalls.saturating_sub(start.syscalls),
            vol_ctx: self.vol_ctx.saturating_sub(start.vol_ctx),
            invol_ctx: self.invol_ctx.saturating_sub(start.invol_ctx),
        }
    }
}

/// Every syscall of a set of processes over a window (not only the read/write family of
/// `io_syscalls`: epoll_wait, send/recv, futex… too), counted by `perf stat -e
/// raw_syscalls:sys_enter` attached to them. The tracepoint adds a little to each syscall, so
/// this is opt-in.
pub struct PerfSyscalls {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl PerfSyscalls {
    pub fn start(pids: &[String]) -> Option<Self> {
        if pids.is_empty() {
            return None;
        }
        let out = std::env::temp_dir().join(format!(
            "relay-bench-perf-{}-{}.csv",
            std::process::id(),
            crate::subs::now_ns()
        ));
        let child = std::process::Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pids.join(","))
            .arg("-o")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(Self { child, out })
    }

    /// Stops perf and returns the count.
    pub fn stop(mut self) -> Option<u64> {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        text.lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Machine-wide TCP counters of /proc/net/netstat (`TcpExt:`): how many connections the kernel
/// dropped because a listen queue was full (`ListenOverflows`, `ListenDrops`). A client whose SYN
/// is dropped retries after the SYN timeout (1 s), so these explain slow storms.
pub fn listen_drops() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |n: &str| -> Option<u64> {
        let i = names.iter().position(|x| *x == n)?;
        values.get(i)?.parse().ok()
    };
    Some((get("ListenOverflows")?, get("ListenDrops")?))
}

/// Busy time of the whole machine (all CPUs, every process), in seconds.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0.0);
    Some((total - idle) / clk_tck())
}

/// Cores used by the whole machine over a window.
pub struct MachineMeter {
    start_busy: Option<f64>,
    start: Instant,
}

impl MachineMeter {
    pub fn start() -> Self {
        Self {
            start_busy: machine_busy_seconds(),
            start: Instant::now(),
        }
    }

    pub fn cores(&self) -> Option<f64> {
        let now = machine_busy_seconds()?;
        let start = self.start_busy?;
        let dt = self.start.elapsed().as_secs_f64();
        (dt > 0.0).then(|| (now - start) / dt)
    }
}

/// CPU used by a set of processes over a window, as a share of one core (1.0 = one full core).
pub struct CpuMeter {
    pids: Vec<String>,
    start_cpu: f64,
    start: Instant,
}

impl CpuMeter {
    pub fn start(pids: &[String]) -> Self {
        let start_cpu = pids.iter().filter_map(|p| cpu_seconds(p)).sum();
        Self {
            pids: pids.to_vec(),
            start_cpu,
            start: Instant::now(),
        }
    }

    /// Cores used since `start` (None without a process to watch).
    pub fn cores(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        let now: f64 = self.pids.iter().filter_map(|p| cpu_seconds(p)).sum();
        let dt = self.start.elapsed().as_secs_f64();
        (dt > 0.0).then(|| (now - self.start_cpu) / dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id().to_string();
        assert!(cpu_seconds(&me).is_some());
        assert!(rss_bytes(&me).is_some_and(|r| r > 0));
        assert!(io_syscalls(&me).is_some());
        assert!(ctx_switches(&me).is_some_and(|(v, n)| v + n > 0));
        assert!(listen_drops().is_some());
        let u = Usage::now(&[me]);
        assert!(u.is_some_and(|u| u.syscalls > 0));
    }
}
