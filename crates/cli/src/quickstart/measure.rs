//! `--measure`: the runtime's cold start and idle memory (BENCHMARKS.md,
//! "Runtime footprint").

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use tokio::process::Child;

use super::{
    AGENT, CloudInfo, FILTER, FILTER_MODULE, HUB, Quickstart, SENSOR, SENSOR_MODULE, write_file,
};
use crate::cloud::{CloudClient, stream_lines};

impl Quickstart {
    /// `--measure`. The first start above provisioned everything (device,
    /// identities, certificates, the deployment in the cloud). Then, three
    /// times: stop verged and the modules, forget the modules' runtime state,
    /// the agent's storage and the hub's store (identities, keys and the edge
    /// CA stay), start verged and time it until the first message from the
    /// sensor reaches the cloud — a provisioned device booting with nothing
    /// running: verged, agent, deployment from the twin, hub, sensor, route,
    /// upstream. After the last, 10 s idle, then the RSS of verged, the agent
    /// and the hub.
    pub(super) async fn measure(
        &mut self,
        cloud: &CloudInfo,
        first: Duration,
        mut next_offset: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        eprintln!(
            "first start (provisioning included): {} ms; now timing restarts …",
            first.as_millis()
        );
        let mut colds = Vec::new();
        for run in 1..=3 {
            self.stop_edge().await;
            for d in [
                self.lay.homedir.join("modules"),
                self.lay.agent_storage.clone(),
                self.lay.hub_dir.join("storage"),
            ] {
                match std::fs::remove_dir_all(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(anyhow!("removing {}: {e}", d.display())),
                }
            }
            // Let the machine settle (page cache, sockets in TIME_WAIT).
            tokio::time::sleep(Duration::from_secs(2)).await;
            self.start_verged().await?;
            let started = self
                .verged_started
                .ok_or_else(|| anyhow!("verged has no start time"))?;
            let (cold, next) = first_message(&cloud.client, next_offset, started, timeout)
                .await
                .with_context(|| format!("restart {run}: no message within {timeout:?}"))?;
            next_offset = next;
            eprintln!("restart {run}: first message after {} ms", cold.as_millis());
            colds.push(cold);
        }
        colds.sort();
        let median = colds[colds.len() / 2];
        eprintln!("letting the runtime idle for 10 s …");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let verged_pid = self
            .verged
            .as_ref()
            .and_then(Child::id)
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| anyhow!("verged is not running"))?;
        let procs = descendants(verged_pid);
        // comm is the executable's name cut to 15 bytes.
        let mut anon = anon_pss_kib(verged_pid);
        let mut runtime_pids = vec![verged_pid];
        let mut rss = |names: &[&str]| -> (u64, usize) {
            let mut total = 0;
            let mut n = 0;
            for (pid, comm) in &procs {
                if names.iter().any(|x| comm.as_str() == &x[..x.len().min(15)]) {
                    total += rss_kib(*pid);
                    if names.contains(&AGENT) || names.contains(&HUB) {
                        let (a, p) = anon_pss_kib(*pid);
                        anon = (anon.0 + a, anon.1 + p);
                        runtime_pids.push(*pid);
                    }
                    n += 1;
                }
            }
            (total, n)
        };
        let verged = rss_kib(verged_pid);
        let (agent, na) = rss(&[AGENT]);
        let (hub, nh) = rss(&[HUB]);
        let (modules, nm) = rss(&[SENSOR, FILTER]);
        if na != 1 || nh != 1 {
            bail!("expected one agent and one hub under verged, found {na} and {nh}");
        }
        let runtime = verged + agent + hub;
        let resident = resident_set_kib(&runtime_pids);
        let mb = |kib: u64| kib as f64 / 1024.0;
        let ms: Vec<String> = colds.iter().map(|d| d.as_millis().to_string()).collect();
        println!(
            "cold start (verged start → first message in the cloud): median {} ms (runs: {} ms; \
             first start with provisioning: {} ms)",
            median.as_millis(),
            ms.join(", "),
            first.as_millis()
        );
        println!(
            "idle RSS after 10 s: verged {:.1} MB + verge-agent {:.1} MB + verge-hub {:.1} MB \
             = {:.1} MB (example modules, {nm} processes: {:.1} MB more)",
            mb(verged),
            mb(agent),
            mb(hub),
            mb(runtime),
            mb(modules)
        );
        println!(
            "  of the runtime's RSS: {:.1} MB anonymous (heap, stacks), PSS {:.1} MB",
            mb(anon.0),
            mb(anon.1)
        );
        println!(
            "  the runtime's resident set, each page counted once (code shared by the \
             three processes too): {:.1} MB",
            mb(resident)
        );
        let json = json!({
            "cold_start_ms": {"median": median.as_millis() as u64, "runs": colds.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(), "first_start_with_provisioning": first.as_millis() as u64},
            "rss_kib": {"verged": verged, "verge_agent": agent, "verge_hub": hub, "runtime_total": runtime, "runtime_anon": anon.0, "runtime_pss": anon.1, "runtime_resident_set": resident, "example_modules": modules},
        });
        write_file(
            &self.lay.dir.join("measure.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
            0o644,
        )?;
        Ok(())
    }
}

/// Waits for the first message from the sensor or the filter at or after
/// D2C offset `from`; returns the time since `started` and the next offset.
async fn first_message(
    client: &CloudClient,
    from: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<(Duration, u64)> {
    let wait = async {
        let r = client.messages(from, true).await?;
        let mut found = None;
        stream_lines(r, |line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return true;
            };
            let module = v.get("moduleId").and_then(Value::as_str).unwrap_or("");
            if module == SENSOR_MODULE || module == FILTER_MODULE {
                let next = v.get("offset").and_then(Value::as_u64).unwrap_or(from) + 1;
                found = Some((started.elapsed(), next));
                return false;
            }
            true
        })
        .await?;
        found.ok_or_else(|| anyhow!("the cloud's message stream ended"))
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

/// Descendants of `root` (pid, comm), from /proc.
fn descendants(root: i32) -> Vec<(i32, String)> {
    let mut parent: Vec<(i32, i32, String)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_owned();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            parent.push((pid, ppid, comm));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, comm) in &parent {
            if *ppid == p {
                out.push((*pid, comm.clone()));
                frontier.push(*pid);
            }
        }
    }
    out
}

/// A `Key:   123 kB` field of a /proc file, in KiB (0 if absent).
fn proc_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// VmRSS of a process in KiB (0 if gone).
fn rss_kib(pid: i32) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// (anonymous RSS, PSS) of a process in KiB: the memory it alone costs,
/// and its RSS with shared pages split among their users.
fn anon_pss_kib(pid: i32) -> (u64, u64) {
    (
        proc_kib(&format!("/proc/{pid}/status"), "RssAnon:"),
        proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:"),
    )
}

/// The resident set of the processes `pids` taken together, in KiB: every
/// page resident in any of them, counted once. Summing VmRSS counts a code
/// page that three processes map three times; this is what the kernel
/// actually holds for them. A file page is identified by (device, inode,
/// page of the file), from `/proc/<pid>/maps` and the file-page bit of
/// `/proc/<pid>/pagemap`; an anonymous page (heap, stack, a written copy of
/// a file page) belongs to one process. No privilege needed: page frame
/// numbers are not read.
fn resident_set_kib(pids: &[i32]) -> u64 {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let page_kib = proc_kib("/proc/self/smaps", "KernelPageSize:").max(4);
    let page = page_kib * 1024;
    let mut file_pages: std::collections::HashSet<(String, u64, u64)> = Default::default();
    let mut anon_pages = 0u64;
    for pid in pids {
        let (Ok(maps), Ok(mut pagemap)) = (
            std::fs::read_to_string(format!("/proc/{pid}/maps")),
            std::fs::File::open(format!("/proc/{pid}/pagemap")),
        ) else {
            continue;
        };
        for line in maps.lines() {
            // start-end perms offset dev inode [path]
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(range), Some(offset), Some(dev), Some(inode)) =
                (f.first(), f.get(2), f.get(3), f.get(4))
            else {
                continue;
            };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
                u64::from_str_radix(start, 16),
                u64::from_str_radix(end, 16),
                u64::from_str_radix(offset, 16),
                inode.parse::<u64>(),
            ) else {
                continue;
            };
            if f.get(5) == Some(&"[vsyscall]") {
                continue;
            }
            let pages = (end - start) / page;
            let mut buf = vec![0u8; pages as usize * 8];
            if pagemap.seek(SeekFrom::Start(start / page * 8)).is_err()
                || pagemap.read_exact(&mut buf).is_err()
            {
                continue;
            }
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if e >> 63 == 0 {
                    continue; // not present
                }
                if (e >> 61) & 1 == 1 && inode != 0 {
                    file_pages.insert((dev.to_string(), inode, offset / page + i as u64));
                } else {
                    anon_pages += 1;
                }
            }
        }
    }
    (file_pages.len() as u64 + anon_pages) * page_kib
}
