//! Process figures from /proc and getrusage: server CPU time and RSS, the generator's own CPU.

use std::io;

/// Clock ticks per second for /proc/PID/stat times.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Parse utime+stime (clock ticks) out of the text of /proc/PID/stat.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system) used by process `pid` so far, in nanoseconds.
pub fn cpu_ns(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_cpu_ticks(&s)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))?;
    Ok(ticks * (1_000_000_000 / clk_tck()))
}

/// Parse the busy time (user, nice, system, steal; clock ticks) of all CPUs out of the text of
/// /proc/stat. Interrupt time is left out: with IRQ time accounting the softirq work of our own
/// loopback traffic lands there rather than in the processes' times, and would read as noise.
pub fn parse_proc_stat_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_ascii_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    if v.len() < 8 {
        return None;
    }
    Some(v[0] + v[1] + v[2] + v[7])
}

/// CPU time all processes on the machine spent busy so far, in nanoseconds.
pub fn machine_busy_ns() -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let ticks = parse_proc_stat_busy(&s)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/stat"))?;
    Ok(ticks * (1_000_000_000 / clk_tck()))
}

/// Parse `VmRSS` (kB) out of the text of /proc/PID/status.
pub fn parse_status_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of process `pid`, in kB.
pub fn rss_kb(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_rss_kb(&s)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc/PID/status"))
}

/// CPU time (user + system, all threads) of this process so far, in nanoseconds.
pub fn own_cpu_ns() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// How many CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> usize {
    // SAFETY: sched_getaffinity fills the zeroed set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return n as usize;
            }
        }
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let s = "1234 (we ird) name)) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 1 0";
        assert_eq!(parse_stat_cpu_ticks(s), Some(267));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_proc_stat() {
        let s = "cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_proc_stat_busy(s), Some(100 + 5 + 50 + 1));
        assert!(machine_busy_ns().unwrap() > 0);
    }

    #[test]
    fn parses_status() {
        let s = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    4242 kB\nThreads: 1\n";
        assert_eq!(parse_status_rss_kb(s), Some(4242));
    }

    #[test]
    fn reads_self() {
        let me = std::process::id();
        assert!(rss_kb(me).unwrap() > 0);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(own_cpu_ns() > 0);
        cpu_ns(me).unwrap();
        assert!(allowed_cpus() >= 1);
    }
}
