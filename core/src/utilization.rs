//! Utilization sampling (ARCHITECTURE §8): the CPU and RAM percentages a member shares in its
//! gossip tags and its `/metrics`, and that the autoscaler's policies act on. It owns where a
//! reading comes from, how raw readings are smoothed, and nothing else: publishing is the
//! caller's.
//!
//! Sources:
//! - **procfs** (the default). Inside a cgroup v2 that has limits (`cpu.max`, `memory.max`, as
//!   Nomad and our driver set them), the container's own usage against its own limits: a
//!   worker in a 1-CPU allocation on a 16-core host is at 100 % when it uses one core, which is
//!   what the container policy needs to see. Without limits, the whole machine from
//!   `/proc/stat` and `/proc/meminfo`.
//! - **file** (`file:/path.json`): synthetic values for tests and drills, re-read on every
//!   sample, so a test changes the load by rewriting a file and decisions are deterministic.
//!   `{"cpu": 91, "mem": 40}` applies to every node; `{"nodes": {"n1": {"cpu": 91, "mem": 40}},
//!   "default": {"cpu": 5, "mem": 5}}` gives each node its own.
//!
//! CPU is a rate, so a procfs reading is the busy share between two samples; the first sample
//! after start compares with the moment the sampler was made. Every reading is smoothed with an
//! EWMA (`smoothing` is the weight of the newest reading; 1.0 turns smoothing off), so one busy
//! second does not look like a trend to the policies.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

/// One reading, both in percent (0–100).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub cpu: f64,
    pub mem: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum UtilizationError {
    #[error("utilization.source {0:?}: expected \"procfs\" or \"file:/path.json\"")]
    BadSource(String),
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// Where readings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Procfs,
    File(PathBuf),
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, UtilizationError> {
        match s {
            "procfs" | "" => Ok(Source::Procfs),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Source::File(PathBuf::from(p))),
                _ => Err(UtilizationError::BadSource(s.to_string())),
            },
        }
    }
}

/// Cumulative CPU time, in whatever unit the source counts, as (busy, total). For a cgroup
/// `total` is the wall time the quota allows, so busy/total is the share of the limit.
#[derive(Debug, Clone, Copy)]
struct CpuCounter {
    busy: f64,
    total: f64,
}

/// The container's cgroup v2 directory and limits, when it has any.
#[derive(Debug, Clone)]
struct Cgroup {
    dir: PathBuf,
    /// CPUs' worth of quota (`cpu.max` quota / period), when limited.
    cpus: Option<f64>,
    /// `memory.max` in bytes, when limited.
    mem_max: Option<f64>,
}

/// Samples one member's utilization and smooths it.
#[derive(Debug)]
pub struct Sampler {
    source: Source,
    node: String,
    alpha: f64,
    cgroup: Option<Cgroup>,
    last_cpu: Option<(CpuCounter, Instant)>,
    smoothed: Option<Sample>,
}

impl Sampler {
    /// `node` picks the entry of a per-node synthetic file. `smoothing` is clamped to (0, 1].
    pub fn new(source: Source, node: &str, smoothing: f64) -> Sampler {
        let cgroup = match source {
            Source::Procfs => {
                own_cgroup(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup"))
            }
            Source::File(_) => None,
        };
        let mut s = Sampler {
            source,
            node: node.to_string(),
            alpha: if smoothing.is_finite() && smoothing > 0.0 {
                smoothing.min(1.0)
            } else {
                1.0
            },
            cgroup,
            last_cpu: None,
            smoothed: None,
        };
        if s.source == Source::Procfs {
            s.last_cpu = s.cpu_counter().ok().map(|c| (c, Instant::now()));
        }
        s
    }

    /// The latest smoothed value, if any sample succeeded yet.
    pub fn current(&self) -> Option<Sample> {
        self.smoothed
    }

    /// Takes a reading and folds it into the average; answers the new average.
    pub fn sample(&mut self) -> Result<Sample, UtilizationError> {
        let raw = match &self.source {
            Source::File(p) => read_synthetic(p, &self.node)?,
            Source::Procfs => Sample {
                cpu: self.procfs_cpu()?,
                mem: self.procfs_mem()?,
            },
        };
        let raw = Sample {
            cpu: raw.cpu.clamp(0.0, 100.0),
            mem: raw.mem.clamp(0.0, 100.0),
        };
        let next = match self.smoothed {
            None => raw,
            Some(prev) => Sample {
                cpu: ewma(prev.cpu, raw.cpu, self.alpha),
                mem: ewma(prev.mem, raw.mem, self.alpha),
            },
        };
        self.smoothed = Some(next);
        Ok(next)
    }

    fn cpu_counter(&self) -> Result<CpuCounter, UtilizationError> {
        if let Some(cg) = &self.cgroup {
            if cg.cpus.is_some() {
                let path = cg.dir.join("cpu.stat");
                let text = read(&path)?;
                let usec = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .ok_or_else(|| parse_err(&path, "no usage_usec line"))?;
                // `total` is filled in from wall time by the caller.
                return Ok(CpuCounter {
                    busy: usec,
                    total: 0.0,
                });
            }
        }
        let path = Path::new("/proc/stat");
        parse_proc_stat(&read(path)?).ok_or_else(|| parse_err(path, "no aggregate cpu line"))
    }

    fn procfs_cpu(&mut self) -> Result<f64, UtilizationError> {
        let now = Instant::now();
        let cur = self.cpu_counter()?;
        let prev = self.last_cpu.replace((cur, now));
        let Some((prev, then)) = prev else {
            return Ok(0.0);
        };
        let cpus = self.cgroup.as_ref().and_then(|c| c.cpus);
        let share = match cpus {
            Some(cpus) => {
                let wall_usec = now.duration_since(then).as_secs_f64() * 1e6 * cpus;
                if wall_usec <= 0.0 {
                    return Ok(self.smoothed.map_or(0.0, |s| s.cpu));
                }
                (cur.busy - prev.busy) / wall_usec
            }
            None => {
                let total = cur.total - prev.total;
                if total <= 0.0 {
                    return Ok(self.smoothed.map_or(0.0, |s| s.cpu));
                }
                (cur.busy - prev.busy) / total
            }
        };
        Ok((share * 100.0).clamp(0.0, 100.0))
    }

    fn procfs_mem(&self) -> Result<f64, UtilizationError> {
        if let Some(Cgroup {
            dir,
            mem_max: Some(max),
            ..
        }) = &self.cgroup
        {
            let cur_path = dir.join("memory.current");
            let current: f64 = read(&cur_path)?
                .trim()
                .parse()
                .map_err(|_| parse_err(&cur_path, "not a number"))?;
            // Page cache the kernel can drop at once is not pressure.
            let inactive = read(&dir.join("memory.stat"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("inactive_file "))
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0);
            return Ok(((current - inactive).max(0.0) / max * 100.0).clamp(0.0, 100.0));
        }
        let path = Path::new("/proc/meminfo");
        parse_meminfo(&read(path)?).ok_or_else(|| parse_err(path, "no MemTotal/MemAvailable"))
    }
}

fn ewma(prev: f64, new: f64, alpha: f64) -> f64 {
    alpha * new + (1.0 - alpha) * prev
}

fn read(path: &Path) -> Result<String, UtilizationError> {
    std::fs::read_to_string(path).map_err(|e| UtilizationError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn parse_err(path: &Path, message: &str) -> UtilizationError {
    UtilizationError::Parse {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The aggregate `cpu` line: busy is everything but idle and iowait.
fn parse_proc_stat(text: &str) -> Option<CpuCounter> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is already in user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0.0);
    Some(CpuCounter {
        busy: total - idle,
        total,
    })
}

fn parse_meminfo(text: &str) -> Option<f64> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?;
    (total > 0.0).then(|| ((total - avail) / total * 100.0).clamp(0.0, 100.0))
}

/// The cgroup v2 directory of this process (the `0::` line) and its limits, if any are set.
fn own_cgroup(proc_cgroup: &Path, root: &Path) -> Option<Cgroup> {
    let text = std::fs::read_to_string(proc_cgroup).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = root.join(rel.trim_start_matches('/'));
    let cpus = std::fs::read_to_string(dir.join("cpu.max"))
        .ok()
        .and_then(|s| parse_cpu_max(&s));
    let mem_max = std::fs::read_to_string(dir.join("memory.max"))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|m| *m > 0.0);
    (cpus.is_some() || mem_max.is_some()).then_some(Cgroup { dir, cpus, mem_max })
}

/// `cpu.max` is `QUOTA PERIOD` or `max PERIOD`.
fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let quota: f64 = it.next()?.parse().ok()?;
    let period: f64 = it.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reading {
    cpu: f64,
    mem: f64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SyntheticFile {
    PerNode {
        nodes: std::collections::BTreeMap<String, Reading>,
        #[serde(default)]
        default: Option<Reading>,
    },
    All(Reading),
}

fn read_synthetic(path: &Path, node: &str) -> Result<Sample, UtilizationError> {
    let text = read(path)?;
    let file: SyntheticFile = serde_json::from_str(&text).map_err(|e| {
        parse_err(
            path,
            &format!(
                "{e}: expected {{\"cpu\": N, \"mem\": N}} or {{\"nodes\": {{NAME: {{…}}}}, \"default\": {{…}}}}"
            ),
        )
    })?;
    let r = match file {
        SyntheticFile::All(r) => r,
        SyntheticFile::PerNode { mut nodes, default } => match nodes.remove(node).or(default) {
            Some(r) => r,
            None => {
                return Err(parse_err(
                    path,
                    &format!("no entry for node {node:?} and no \"default\""),
                ))
            }
        },
    };
    if !(r.cpu.is_finite() && r.mem.is_finite()) {
        return Err(parse_err(path, "cpu and mem must be finite numbers"));
    }
    Ok(Sample {
        cpu: r.cpu,
        mem: r.mem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(Source::parse("procfs").ok(), Some(Source::Procfs));
        assert_eq!(
            Source::parse("file:/tmp/u.json").ok(),
            Some(Source::File("/tmp/u.json".into()))
        );
        assert!(Source::parse("file:").is_err());
        assert!(Source::parse("http://x").is_err());
    }

    #[test]
    fn proc_stat_and_meminfo() {
        let c = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").expect("cpu");
        assert_eq!(c.total, 1000.0);
        assert_eq!(c.busy, 150.0);
        let m = parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 250 kB\n");
        assert_eq!(m, Some(75.0));
        assert_eq!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
    }

    #[test]
    fn cgroup_limits_are_found_from_proc_self_cgroup() {
        let dir = tempfile::tempdir().expect("tmp");
        let cg = dir.path().join("root/nomad/alloc1");
        std::fs::create_dir_all(&cg).expect("mkdir");
        std::fs::write(cg.join("cpu.max"), "50000 100000\n").expect("w");
        std::fs::write(cg.join("memory.max"), "1048576\n").expect("w");
        let pc = dir.path().join("cgroup");
        std::fs::write(&pc, "0::/nomad/alloc1\n").expect("w");
        let found = own_cgroup(&pc, &dir.path().join("root")).expect("cgroup");
        assert_eq!(found.cpus, Some(0.5));
        assert_eq!(found.mem_max, Some(1048576.0));
        // No limits: the machine's figures are used instead.
        std::fs::write(cg.join("cpu.max"), "max 100000\n").expect("w");
        std::fs::write(cg.join("memory.max"), "max\n").expect("w");
        assert!(own_cgroup(&pc, &dir.path().join("root")).is_none());
    }

    #[test]
    fn synthetic_file_per_node_and_smoothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("u.json");
        std::fs::write(
            &f,
            r#"{"nodes":{"n1":{"cpu":90,"mem":40}},"default":{"cpu":10,"mem":5}}"#,
        )
        .expect("w");
        let mut n1 = Sampler::new(Source::File(f.clone()), "n1", 0.5);
        let mut n2 = Sampler::new(Source::File(f.clone()), "n2", 1.0);
        assert_eq!(
            n1.sample().expect("n1"),
            Sample {
                cpu: 90.0,
                mem: 40.0
            }
        );
        assert_eq!(
            n2.sample().expect("n2"),
            Sample {
                cpu: 10.0,
                mem: 5.0
            }
        );
        std::fs::write(&f, r#"{"cpu":10,"mem":40}"#).expect("w");
        // Half way from 90 to 10 with alpha 0.5.
        assert_eq!(n1.sample().expect("n1").cpu, 50.0);
        assert_eq!(n1.sample().expect("n1").cpu, 30.0);
        std::fs::write(&f, r#"{"nodes":{"n1":{"cpu":1,"mem":1}}}"#).expect("w");
        let e = n2.sample().expect_err("no entry");
        assert!(e.to_string().contains("no entry for node \"n2\""), "{e}");
        std::fs::write(&f, "not json").expect("w");
        assert!(n1.sample().is_err());
        // A failed read keeps the last good value.
        assert_eq!(n1.current().map(|s| s.cpu), Some(30.0));
    }

    #[test]
    fn procfs_readings_are_percentages() {
        let mut s = Sampler::new(Source::Procfs, "n", 0.3);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let a = s.sample().expect("procfs");
        assert!((0.0..=100.0).contains(&a.cpu), "{a:?}");
        assert!(a.mem > 0.0 && a.mem <= 100.0, "{a:?}");
    }
}
