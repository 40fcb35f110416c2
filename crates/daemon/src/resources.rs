//! `GET /systeminfo/resources`: host CPU, memory, disks and uptime from
//! `/proc` and `statvfs`, and per-module use where verged can see the
//! module's processes (process backend, and a process agent).
//!
//! CPU use needs two readings: the handler takes one, waits [`SAMPLE`], and
//! takes another. A module's use is that of its whole process tree (the
//! process backend starts each module as a process-group leader, and its
//! children count too). Docker modules are not measured: only verge-runtime
//! may talk to Docker, and it has no stats call yet — the answer's `notes`
//! say so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{DiskInfo, ModuleResources};

/// The CPU sampling window.
pub const SAMPLE: Duration = Duration::from_millis(250);

/// Clock ticks per second of /proc's CPU times (USER_HZ; 100 on every Linux ABI).
const TICKS_PER_SEC: f64 = 100.0;

/// Busy and total jiffies of all CPUs (first line of /proc/stat).
pub fn parse_cpu_line(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user, so only the first eight add up.
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// (total, available) bytes from /proc/meminfo.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    };
    let total = field("MemTotal:").unwrap_or(0);
    let available = field("MemAvailable:")
        .or_else(|| field("MemFree:"))
        .unwrap_or(0);
    (total, available)
}

/// One process from /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Parent pid.
    pub ppid: u32,
    /// utime + stime, in ticks.
    pub cpu_ticks: u64,
    /// Start, in ticks after boot.
    pub start_ticks: u64,
}

/// Parses /proc/<pid>/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(") ")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(num(4)?).ok()?,
        cpu_ticks: num(14)? + num(15)?,
        start_ticks: num(22)?,
    })
}

/// Every process, by pid.
pub fn read_processes() -> HashMap<u32, ProcStat> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Processes vanish between listing and reading: skip them.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(s) = parse_proc_stat(&text)
        {
            out.insert(pid, s);
        }
    }
    out
}

/// `root` and its descendants.
pub fn tree(procs: &HashMap<u32, ProcStat>, root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, s) in procs {
        children.entry(s.ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    if !procs.contains_key(&root) {
        return out;
    }
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        out.push(p);
        if let Some(c) = children.get(&p) {
            stack.extend(c.iter().copied());
        }
    }
    out
}

/// Resident bytes of a process (`VmRSS` of /proc/<pid>/status; read there
/// because it is in kB, where /proc/<pid>/stat counts pages of a size only
/// `sysconf` knows). 0 when the process is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// Measures the trees of `roots` (name, pid) between two process readings
/// taken `elapsed` apart. A process present in both readings (same start
/// time) counts its CPU time difference; one that started in between counts
/// all of its CPU time.
pub fn module_usage(
    before: &HashMap<u32, ProcStat>,
    after: &HashMap<u32, ProcStat>,
    roots: &[(String, u32)],
    elapsed: Duration,
    rss_of: impl Fn(u32) -> u64,
) -> Vec<ModuleResources> {
    let secs = elapsed.as_secs_f64().max(0.001);
    roots
        .iter()
        .filter_map(|(name, pid)| {
            let pids = tree(after, *pid);
            if pids.is_empty() {
                return None;
            }
            let mut ticks = 0u64;
            let mut rss = 0u64;
            for p in &pids {
                let Some(a) = after.get(p) else { continue };
                let prev = before
                    .get(p)
                    .filter(|b| b.start_ticks == a.start_ticks)
                    .map_or(0, |b| b.cpu_ticks);
                ticks += a.cpu_ticks.saturating_sub(prev);
                rss = rss.saturating_add(rss_of(*p));
            }
            #[allow(clippy::cast_precision_loss)]
            let cpu_percent = ticks as f64 / TICKS_PER_SEC / secs * 100.0;
            Some(ModuleResources {
                name: name.clone(),
                pid: *pid,
                processes: u32::try_from(pids.len()).unwrap_or(u32::MAX),
                cpu_percent: (cpu_percent * 10.0).round() / 10.0,
                memory_bytes: rss,
            })
        })
        .collect()
}

/// The file systems to report: `/`, `extra` (verged's homedir), and every
/// mount of a block device; one entry per file system.
pub fn disks(extra: Option<&Path>) -> Vec<DiskInfo> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    // (device, mount point, type), unescaping nothing: octal escapes (\040)
    // only occur in odd mount points, which then just fail statvfs.
    let table: Vec<(&str, &str, &str)> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?, f.next()?))
        })
        .collect();
    let mut wanted: Vec<PathBuf> = vec![PathBuf::from("/")];
    if let Some(p) = extra {
        wanted.push(
            p.ancestors()
                .find(|a| a.exists())
                .unwrap_or(p)
                .to_path_buf(),
        );
    }
    wanted.extend(
        table
            .iter()
            .filter(|(dev, _, _)| dev.starts_with("/dev/"))
            .map(|(_, mp, _)| PathBuf::from(mp)),
    );
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for path in wanted {
        let Ok(st) = nix::sys::statvfs::statvfs(&path) else {
            continue;
        };
        // The mount holding `path`: the longest mount point that is its prefix.
        let (dev, mp, fstype) = table
            .iter()
            .filter(|(_, mp, _)| path.starts_with(mp))
            .max_by_key(|(_, mp, _)| mp.len())
            .map_or(("", "/", ""), |&(d, m, t)| (d, m, t));
        if !seen.insert((st.filesystem_id(), mp.to_owned())) {
            continue;
        }
        let frag = st.fragment_size();
        out.push(DiskInfo {
            name: if dev.is_empty() {
                mp.to_owned()
            } else {
                dev.to_owned()
            },
            mount_point: mp.to_owned(),
            available_space: st.blocks_available().saturating_mul(frag),
            total_space: st.blocks().saturating_mul(frag),
            file_system: fstype.to_owned(),
        });
    }
    out
}

/// Seconds since boot, from /proc/uptime.
pub fn host_uptime() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let s = s.max(0.0) as u64;
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  100 5 50 800 20 0 5 0 7 0\ncpu0 1 2 3 4\n";
        // busy = total - idle - iowait; guest (7) is not added again.
        assert_eq!(parse_cpu_line(stat), Some((160, 980)));
        assert_eq!(parse_cpu_line("intr 1 2"), None);
        let mem = "MemTotal:       2048 kB\nMemFree:   100 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(parse_meminfo(mem), (2048 * 1024, 1024 * 1024));
        assert_eq!(
            parse_meminfo("MemTotal: 4 kB\nMemFree: 1 kB\n"),
            (4096, 1024)
        );
        // A command name with spaces and a parenthesis.
        let p = "42 (my (odd) name) S 7 42 42 0 -1 4194560 100 0 0 0 30 12 0 0 20 0 1 0 555 1000 77 \
                 18446744073709551615";
        assert_eq!(
            parse_proc_stat(p),
            Some(ProcStat {
                ppid: 7,
                cpu_ticks: 42,
                start_ticks: 555
            })
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn sums_trees_and_handles_new_and_recycled_pids() {
        let p = |ppid, cpu, start| ProcStat {
            ppid,
            cpu_ticks: cpu,
            start_ticks: start,
        };
        let before = HashMap::from([(10, p(1, 100, 5)), (11, p(10, 50, 6)), (12, p(10, 9, 1))]);
        // 11 grew by 25 ticks; 12 is a recycled pid (new start time): all 4
        // count; 13 is new (3); 20 is another tree.
        let after = HashMap::from([
            (10, p(1, 100, 5)),
            (11, p(10, 75, 6)),
            (12, p(11, 4, 9)),
            (13, p(12, 3, 9)),
            (20, p(1, 500, 2)),
        ]);
        let got = module_usage(
            &before,
            &after,
            &[("m".into(), 10), ("gone".into(), 99)],
            Duration::from_secs(1),
            |_| 10,
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].processes, 4);
        assert!((got[0].cpu_percent - 32.0).abs() < 1e-9, "{got:?}");
        assert_eq!(got[0].memory_bytes, 40);
    }

    #[test]
    fn reads_this_host() {
        assert!(host_uptime() > 0);
        let d = disks(Some(Path::new("/nonexistent/dir")));
        assert!(d.iter().any(|d| d.mount_point == "/"), "{d:?}");
        assert!(d.iter().all(|d| d.total_space >= d.available_space));
        let me = std::process::id();
        assert!(read_processes().contains_key(&me));
        assert!(rss_bytes(me) > 0);
        assert_eq!(rss_bytes(u32::MAX), 0);
    }
}
