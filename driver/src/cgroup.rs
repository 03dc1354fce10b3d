//! Cgroup placement, limits, statistics and teardown for tasks. Nomad supports cgroup v1 and v2,
//! and so does this driver: it prefers the unified (v2) hierarchy when its `cpu` and `memory`
//! controllers are available, and otherwise uses the v1 `cpu`, `cpuacct` and `memory`
//! hierarchies (hybrid hosts, where the v2 mount has no controllers, end up here). The choice
//! is made at run time from /proc/self/mountinfo, logged, and reported as the fingerprint
//! attribute `driver.transcode.cgroup`.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Which hierarchy the host offers, with its mount points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    V2 {
        root: PathBuf,
    },
    V1 {
        cpu: PathBuf,
        cpuacct: PathBuf,
        memory: PathBuf,
    },
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }

    /// Finds the hierarchy to use. v2 wins when its mount delegates `cpu` and `memory`;
    /// otherwise v1 needs all three of `cpu`, `cpuacct` and `memory` mounted.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::from_mountinfo(&text, |root| {
            fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default()
        })
    }

    /// Pure part of `detect`, so that it can be tested against other hosts' mount tables.
    pub fn from_mountinfo(
        mountinfo: &str,
        v2_controllers: impl Fn(&Path) -> String,
    ) -> Result<Self, CgroupError> {
        let mut v2 = None;
        let (mut cpu, mut cpuacct, mut memory) = (None, None, None);
        for line in mountinfo.lines() {
            // Format: id parent major:minor root mountpoint opts [optional...] - fstype src superopts
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mountpoint) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let fstype = r.next().unwrap_or_default();
            let superopts = r.nth(1).unwrap_or_default();
            let mp = PathBuf::from(unescape_mountinfo(mountpoint));
            match fstype {
                "cgroup2" => v2 = v2.or(Some(mp)),
                "cgroup" => {
                    for opt in superopts.split(',') {
                        match opt {
                            "cpu" => cpu = cpu.or(Some(mp.clone())),
                            "cpuacct" => cpuacct = cpuacct.or(Some(mp.clone())),
                            "memory" => memory = memory.or(Some(mp.clone())),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let mut why = Vec::new();
        if let Some(root) = &v2 {
            let ctrl = v2_controllers(root);
            let has = |c: &str| ctrl.split_whitespace().any(|x| x == c);
            if has("cpu") && has("memory") {
                return Ok(Layout::V2 { root: root.clone() });
            }
            why.push(format!(
                "cgroup2 at {} offers controllers [{}], not cpu and memory",
                root.display(),
                ctrl.trim()
            ));
        } else {
            why.push("no cgroup2 mount".to_owned());
        }
        match (cpu, cpuacct, memory) {
            (Some(cpu), Some(cpuacct), Some(memory)) => Ok(Layout::V1 {
                cpu,
                cpuacct,
                memory,
            }),
            _ => {
                why.push("cgroup v1 cpu, cpuacct and memory are not all mounted".to_owned());
                Err(CgroupError::Unavailable(why.join("; ")))
            }
        }
    }

    /// Creates the task's cgroup under `parent`, applies the limits and returns its handle.
    /// Creating the parent (and enabling v2 controllers on the way) doubles as the check that
    /// the hierarchy is writable.
    pub fn create(&self, parent: &str, name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let parent = parent.trim_matches('/');
        let cg = match self {
            Layout::V2 { root } => {
                // Controllers must be enabled in every ancestor's subtree_control.
                let mut dir = root.clone();
                enable_v2_controllers(&dir)?;
                for part in parent.split('/') {
                    dir.push(part);
                    mkdir(&dir)?;
                    enable_v2_controllers(&dir)?;
                }
                dir.push(name);
                mkdir(&dir)?;
                Cgroup::V2 { path: dir }
            }
            Layout::V1 {
                cpu,
                cpuacct,
                memory,
            } => {
                let cg = Cgroup::V1 {
                    cpu: cpu.join(parent).join(name),
                    cpuacct: cpuacct.join(parent).join(name),
                    memory: memory.join(parent).join(name),
                };
                for d in cg.dirs() {
                    fs::create_dir_all(&d).map_err(io_err("create", &d))?;
                }
                cg
            }
        };
        if let Err(e) = cg.apply(limits) {
            // Do not leave an empty cgroup behind for a task that will never start.
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Checks that a task cgroup could be created here, without keeping it.
    pub fn probe_writable(&self, parent: &str) -> Result<(), CgroupError> {
        // Unique per call: two fingerprint streams may probe at the same moment.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("probe-{}-{n}", std::process::id());
        let cg = self.create(parent, &name, &Limits::default())?;
        cg.remove()
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("create", dir)(e)),
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&file).map_err(io_err("read", &file))?;
    let have = |c: &str| current.split_whitespace().any(|x| x == c);
    if have("cpu") && have("memory") {
        return Ok(());
    }
    fs::write(&file, "+cpu +memory").map_err(io_err("write", &file))
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let p = dir.join(file);
    fs::write(&p, value).map_err(io_err("write", &p))
}

fn read(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file).and_then(|s| s.trim().parse().ok())
}

/// `key value` lines (cpu.stat, memory.stat, memory.events, memory.oom_control).
fn read_keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    read(dir, file)?.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok()))?
    })
}

/// Limits taken from the task's resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Hard CPU cap, as CFS quota and period in microseconds.
    pub cpu_quota_period: Option<(u64, u64)>,
    /// Relative CPU weight in v1 shares (Nomad's MHz-based shares).
    pub cpu_shares: Option<u64>,
    /// Hard memory limit in bytes.
    pub memory_max: Option<u64>,
}

/// Nomad's mapping of v1 shares (2..262144) onto v2 weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// A task's cgroup. Serialized into the task handle's driver state so a restarted plugin can
/// read its stats, its OOM count and remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum Cgroup {
    V2 {
        path: PathBuf,
    },
    V1 {
        cpu: PathBuf,
        cpuacct: PathBuf,
        memory: PathBuf,
    },
}

/// Raw counters read from a cgroup at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawStats {
    pub cpu_total_ns: Option<u64>,
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    pub throttled_periods: Option<u64>,
    pub throttled_ns: Option<u64>,
    pub mem_usage: Option<u64>,
    pub mem_max_usage: Option<u64>,
    pub mem_rss: Option<u64>,
    pub mem_cache: Option<u64>,
    pub mem_swap: Option<u64>,
    pub mem_kernel: Option<u64>,
    pub mem_kernel_max: Option<u64>,
}

impl Cgroup {
    pub fn version(&self) -> &'static str {
        match self {
            Cgroup::V2 { .. } => "v2",
            Cgroup::V1 { .. } => "v1",
        }
    }

    /// Distinct directories (v1 controllers may be co-mounted and so share one).
    pub fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Cgroup::V2 { path } => vec![path.clone()],
            Cgroup::V1 {
                cpu,
                cpuacct,
                memory,
            } => {
                let mut v = vec![memory.clone(), cpu.clone(), cpuacct.clone()];
                v.dedup();
                let mut out: Vec<PathBuf> = Vec::new();
                for d in v {
                    if !out.contains(&d) {
                        out.push(d);
                    }
                }
                out
            }
        }
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Human-readable location, for logs and driver attributes.
    pub fn display(&self) -> String {
        self.dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        match self {
            Cgroup::V2 { path } => {
                if let Some((q, p)) = l.cpu_quota_period {
                    write(path, "cpu.max", &format!("{q} {p}"))?;
                }
                if let Some(s) = l.cpu_shares {
                    write(path, "cpu.weight", &shares_to_weight(s).to_string())?;
                }
                if let Some(m) = l.memory_max {
                    write(path, "memory.max", &m.to_string())?;
                    // Swap would let the task exceed its limit without an OOM kill.
                    let _ = write(path, "memory.swap.max", "0");
                }
            }
            Cgroup::V1 { cpu, memory, .. } => {
                if let Some((q, p)) = l.cpu_quota_period {
                    write(cpu, "cpu.cfs_period_us", &p.to_string())?;
                    write(cpu, "cpu.cfs_quota_us", &q.to_string())?;
                }
                if let Some(s) = l.cpu_shares {
                    write(cpu, "cpu.shares", &s.clamp(2, 262_144).to_string())?;
                }
                if let Some(m) = l.memory_max {
                    write(memory, "memory.limit_in_bytes", &m.to_string())?;
                    // memsw exists only with swap accounting; where it does, cap swap too.
                    let _ = write(memory, "memory.memsw.limit_in_bytes", &m.to_string());
                }
            }
        }
        Ok(())
    }

    /// Number of OOM kills in this cgroup: v2 `memory.events`, v1 `memory.oom_control`
    /// (kernels since 4.13). `None` when the kernel does not count them.
    pub fn oom_kills(&self) -> Option<u64> {
        match self {
            Cgroup::V2 { path } => read_keyed(path, "memory.events", "oom_kill"),
            Cgroup::V1 { memory, .. } => read_keyed(memory, "memory.oom_control", "oom_kill")
                .or_else(|| read_keyed(memory, "memory.events", "oom_kill")),
        }
    }

    /// How many times the memory limit was hit (v1 `memory.failcnt`, v2 `max` events). Used
    /// only as a fallback OOM signal on kernels without an oom_kill counter.
    pub fn limit_hits(&self) -> Option<u64> {
        match self {
            Cgroup::V2 { path } => read_keyed(path, "memory.events", "max"),
            Cgroup::V1 { memory, .. } => read_u64(memory, "memory.failcnt"),
        }
    }

    pub fn stats(&self) -> RawStats {
        match self {
            Cgroup::V2 { path } => {
                let us = |k: &str| read_keyed(path, "cpu.stat", k).map(|v| v * 1000);
                RawStats {
                    cpu_total_ns: us("usage_usec"),
                    cpu_user_ns: us("user_usec"),
                    cpu_system_ns: us("system_usec"),
                    throttled_periods: read_keyed(path, "cpu.stat", "nr_throttled"),
                    throttled_ns: us("throttled_usec"),
                    mem_usage: read_u64(path, "memory.current"),
                    mem_max_usage: read_u64(path, "memory.peak"),
                    mem_rss: read_keyed(path, "memory.stat", "anon"),
                    mem_cache: read_keyed(path, "memory.stat", "file"),
                    mem_swap: read_u64(path, "memory.swap.current"),
                    mem_kernel: read_keyed(path, "memory.stat", "kernel"),
                    mem_kernel_max: None,
                }
            }
            Cgroup::V1 {
                cpu,
                cpuacct,
                memory,
            } => {
                // usage_user/usage_sys are newer; cpuacct.stat (in USER_HZ ticks) is the
                // fallback every v1 kernel has.
                let tick_ns = 1_000_000_000 / clock_ticks_per_sec();
                let user = read_u64(cpuacct, "cpuacct.usage_user")
                    .or_else(|| read_keyed(cpuacct, "cpuacct.stat", "user").map(|t| t * tick_ns));
                let sys = read_u64(cpuacct, "cpuacct.usage_sys")
                    .or_else(|| read_keyed(cpuacct, "cpuacct.stat", "system").map(|t| t * tick_ns));
                RawStats {
                    cpu_total_ns: read_u64(cpuacct, "cpuacct.usage"),
                    cpu_user_ns: user,
                    cpu_system_ns: sys,
                    throttled_periods: read_keyed(cpu, "cpu.stat", "nr_throttled"),
                    throttled_ns: read_keyed(cpu, "cpu.stat", "throttled_time"),
                    mem_usage: read_u64(memory, "memory.usage_in_bytes"),
                    mem_max_usage: read_u64(memory, "memory.max_usage_in_bytes"),
                    mem_rss: read_keyed(memory, "memory.stat", "total_rss")
                        .or_else(|| read_keyed(memory, "memory.stat", "rss")),
                    mem_cache: read_keyed(memory, "memory.stat", "total_cache")
                        .or_else(|| read_keyed(memory, "memory.stat", "cache")),
                    mem_swap: read_keyed(memory, "memory.stat", "total_swap")
                        .or_else(|| read_keyed(memory, "memory.stat", "swap")),
                    mem_kernel: read_u64(memory, "memory.kmem.usage_in_bytes"),
                    mem_kernel_max: read_u64(memory, "memory.kmem.max_usage_in_bytes"),
                }
            }
        }
    }

    /// Pids currently in the cgroup (all controllers' views, merged).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything in the cgroup once (v2 `cgroup.kill` when the kernel has it).
    /// Callers loop until `pids()` is empty, since a process may fork while being killed.
    pub fn kill_all(&self) {
        if let Cgroup::V2 { path } = self {
            if fs::write(path.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup directories. Fails with EBUSY while processes remain.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for d in self.dirs() {
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &d)(e)),
            }
        }
        Ok(())
    }

    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }
}

fn clock_ticks_per_sec() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(v)) if v > 0 => v as u64,
        _ => 100,
    }
}

/// A cgroup directory name for a Nomad task id ("<alloc>/<task>/<suffix>"): slashes and other
/// unusual characters become '_'.
pub fn dir_name_for(task_id: &str) -> String {
    task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu rw,nosuid shared:9 - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/cpuacct rw,nosuid - cgroup cgroup rw,cpuacct
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
";

    #[test]
    fn hybrid_without_v2_controllers_falls_back_to_v1() {
        let l = Layout::from_mountinfo(HYBRID, |_| "hugetlb\n".into()).expect("layout");
        assert_eq!(
            l,
            Layout::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                cpuacct: "/sys/fs/cgroup/cpuacct".into(),
                memory: "/sys/fs/cgroup/memory".into(),
            }
        );
    }

    #[test]
    fn v2_with_controllers_wins() {
        let l = Layout::from_mountinfo(HYBRID, |_| "cpuset cpu io memory pids\n".into())
            .expect("layout");
        assert_eq!(
            l,
            Layout::V2 {
                root: "/sys/fs/cgroup/unified".into()
            }
        );
    }

    #[test]
    fn comounted_v1_and_nothing_at_all() {
        let co = "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  35 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let l = Layout::from_mountinfo(co, |_| String::new()).expect("layout");
        let Layout::V1 { cpu, cpuacct, .. } = &l else {
            panic!("expected v1, got {l:?}");
        };
        assert_eq!(cpu, cpuacct);
        let cg = Cgroup::V1 {
            cpu: cpu.join("p/t"),
            cpuacct: cpuacct.join("p/t"),
            memory: "/sys/fs/cgroup/memory/p/t".into(),
        };
        assert_eq!(cg.dirs().len(), 2);
        let e = Layout::from_mountinfo("", |_| String::new()).expect_err("none");
        assert!(e.to_string().contains("no cgroup2 mount"), "{e}");
    }

    #[test]
    fn weights_and_names() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(dir_name_for("a1/web/x9"), "a1_web_x9");
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }
}
