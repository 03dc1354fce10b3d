//! `bench-failure`: time from `kill -9` of one gossip member to a survivor observing it
//! failed, for our membership (`transcode_core::membership`, default 1 s probe / 500 ms
//! timeout) and for HashiCorp's Serf agent (LAN profile: the same 1 s / 500 ms), each with N
//! members on loopback, in one invocation; then the figure the farm acts on, the time until a
//! real `transcode-scaler` publishes `ContainerFailureDetected` on its bus (the scaler and N-1
//! worker members); then a quiet run with no kills that counts false failures. Run through
//! `bench/failure-detection.sh`. Not a test.
//!
//! Each of our members is this binary in its hidden `member` mode: one process per member, as
//! in production, printing one JSON line per membership event with its wall-clock time, so
//! detection is timed where it happens. Serf is polled through `serf members` (every
//! [`SERF_POLL`]), so its times carry up to that much polling delay.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use transcode_core::config::MembershipConfig;
use transcode_core::membership::{MemberTags, Membership, MembershipEvent, Settings};

/// How often `serf members` is run while waiting for Serf to mark the victim failed.
const SERF_POLL: Duration = Duration::from_millis(50);
/// Pause after the cluster forms, so probe rounds and coordinates settle before the kill.
const SETTLE: Duration = Duration::from_secs(3);
/// Longest wait for a cluster to form or a failure to show.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Cluster sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "3,10")]
    sizes: Vec<usize>,
    /// Kills measured per size and implementation; the median is reported.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Length of the no-kill run (N = 10, ours) that counts false failures; 0 skips it.
    #[arg(long, default_value_t = 300)]
    quiet_seconds: u64,
    /// The HashiCorp Serf agent binary.
    #[arg(long, default_value = "serf")]
    serf: PathBuf,
    /// The folder holding `transcode-scaler` (for the ContainerFailureDetected figure).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
}

#[derive(Subcommand)]
enum Mode {
    /// One gossip member with the default settings; prints `{"addr":…}` then one line per
    /// event. Used by the benchmark itself.
    #[command(hide = true)]
    Member {
        #[arg(long)]
        id: String,
        #[arg(long)]
        join: Option<String>,
        /// The `role` tag: the scaler recovers only members tagged `worker`.
        #[arg(long, default_value = "bench")]
        role: String,
    },
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn member_mode(id: String, join: Option<String>, role: String) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cfg = MembershipConfig {
            join: join.into_iter().collect(),
            ..MembershipConfig::default()
        };
        let settings = Settings::from_config(&cfg)?;
        let tags = MemberTags {
            role,
            node: id.clone(),
            slots: 1,
            state: "active".into(),
            ..MemberTags::default()
        };
        let (m, mut events) = Membership::start(&id, &settings, tags).await?;
        let m = std::sync::Arc::new(m);
        println!(
            "{}",
            serde_json::json!({ "addr": m.local_addr().to_string() })
        );
        m.join_in_background(settings.join.clone());
        while let Some(ev) = events.recv().await {
            let (kind, who) = match &ev {
                MembershipEvent::Joined(i) => ("joined", &i.id),
                MembershipEvent::Failed(i) => ("failed", &i.id),
                MembershipEvent::Left(i) => ("left", &i.id),
                _ => continue,
            };
            println!(
                "{}",
                serde_json::json!({ "event": kind, "member": who, "at_ms": now_ms() as u64 })
            );
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// A child killed when dropped, so an error leaves no process behind.
struct Kid(Child);

impl Kid {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A line from member `idx`'s stdout.
type Line = (usize, serde_json::Value);

/// Starts our member `idx`; its event lines go to `tx`. Returns the process and its address.
fn spawn_ours(idx: usize, join: Option<&str>, tx: &mpsc::Sender<Line>) -> Result<(Kid, String)> {
    spawn_member(idx, join, "bench", tx)
}

fn spawn_member(
    idx: usize,
    join: Option<&str>,
    role: &str,
    tx: &mpsc::Sender<Line>,
) -> Result<(Kid, String)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["member", "--id", &format!("n{idx}"), "--role", role]);
    if let Some(j) = join {
        cmd.args(["--join", j]);
    }
    let mut child = cmd
        .env("TRANSCODE_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a member")?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let kid = Kid(child);
    let mut lines = BufReader::new(out).lines();
    let first = lines
        .next()
        .ok_or_else(|| anyhow!("member n{idx} printed nothing"))??;
    let v: serde_json::Value = serde_json::from_str(&first)?;
    let addr = v["addr"]
        .as_str()
        .ok_or_else(|| anyhow!("member n{idx}: {first}"))?
        .to_string();
    let tx = tx.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&l) {
                if tx.send((idx, v)).is_err() {
                    return;
                }
            }
        }
    });
    Ok((kid, addr))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Our membership: N members, member 0 the seed and observer; kill the last one.
fn ours_once(n: usize) -> Result<f64> {
    let (tx, rx) = mpsc::channel();
    let (seed, seed_addr) = spawn_ours(0, None, &tx)?;
    let mut kids = vec![seed];
    for i in 1..n {
        kids.push(spawn_ours(i, Some(&seed_addr), &tx)?.0);
    }
    let deadline = Instant::now() + PATIENCE;
    let mut joined = std::collections::HashSet::new();
    while joined.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let (idx, v) = rx
            .recv_timeout(left)
            .map_err(|_| anyhow!("ours N={n}: only {} joined", joined.len()))?;
        if idx == 0 && v["event"] == "joined" {
            joined.insert(v["member"].as_str().unwrap_or_default().to_string());
        }
    }
    std::thread::sleep(SETTLE);
    while rx.try_recv().is_ok() {}
    let victim = format!("n{}", n - 1);
    let killed = now_ms();
    kids[n - 1].kill();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (idx, v) = rx
            .recv_timeout(left)
            .map_err(|_| anyhow!("ours N={n}: the kill was not detected"))?;
        if idx == 0 && v["event"] == "failed" && v["member"] == victim.as_str() {
            let at = v["at_ms"].as_u64().unwrap_or_default() as u128;
            return Ok(at.saturating_sub(killed) as f64 / 1000.0);
        }
    }
}

/// A free loopback port (TCP and UDP), as the OS hands them out.
fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let p = t.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port")
}

/// `serf members` on `rpc`: node name → status.
fn serf_members(serf: &PathBuf, rpc: &str) -> Result<Vec<(String, String)>> {
    let out = Command::new(serf)
        .args(["members", &format!("-rpc-addr={rpc}")])
        .output()?;
    if !out.status.success() {
        bail!("serf members: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let _addr = f.next()?;
            Some((name, f.next()?.to_string()))
        })
        .collect())
}

/// HashiCorp Serf: N agents, agent 0 the seed and observer; kill the last one.
fn serf_once(serf: &PathBuf, n: usize) -> Result<f64> {
    let mut kids = Vec::new();
    let mut seed = String::new();
    let mut rpc0 = String::new();
    for i in 0..n {
        let bind = format!("127.0.0.1:{}", free_port()?);
        let rpc = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(serf);
        cmd.args([
            "agent",
            &format!("-node=n{i}"),
            &format!("-bind={bind}"),
            &format!("-rpc-addr={rpc}"),
            "-log-level=err",
        ]);
        if i == 0 {
            seed = bind.clone();
            rpc0 = rpc.clone();
        } else {
            cmd.arg(format!("-retry-join={seed}"))
                .arg("-retry-interval=1s");
        }
        kids.push(Kid(cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting serf agent")?));
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let alive = serf_members(serf, &rpc0)
            .map(|m| m.iter().filter(|(_, s)| s == "alive").count())
            .unwrap_or(0);
        if alive == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("serf N={n}: only {alive} alive");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(SETTLE);
    let victim = format!("n{}", n - 1);
    let killed = Instant::now();
    kids[n - 1].kill();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let m = serf_members(serf, &rpc0)?;
        if m.iter().any(|(name, s)| *name == victim && s == "failed") {
            return Ok(killed.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("serf N={n}: the kill was not detected");
        }
        std::thread::sleep(SERF_POLL);
    }
}

/// A real scaler (SQLite in a temp dir, ephemeral ports) and N-1 members tagged `worker`; kill
/// the last one and time until `ContainerFailureDetected` naming it arrives on the scaler's
/// bus, which is when the farm starts recovering its tasks.
fn scaler_once(bin_dir: &std::path::Path, n: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = format!("sqlite://{}", dir.path().join("bench.db").display());
    let mut child = Command::new(bin_dir.join("transcode-scaler"))
        .args(["--store", &store, "--migrate", "--id", "bench-scaler"])
        .args([
            "--intake",
            "tcp://127.0.0.1:0",
            "--dispatch",
            "tcp://127.0.0.1:0",
        ])
        .args([
            "--events-pub",
            "tcp://127.0.0.1:0",
            "--events-sub",
            "tcp://127.0.0.1:0",
        ])
        .args(["--http", "127.0.0.1:0"])
        .env("TRANSCODE_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}/transcode-scaler", bin_dir.display()))?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let _scaler = Kid(child);
    let mut lines = BufReader::new(out).lines();
    let first = lines
        .next()
        .ok_or_else(|| anyhow!("the scaler printed nothing"))??;
    std::thread::spawn(move || for _ in lines {});
    let info: serde_json::Value = serde_json::from_str(&first)?;
    let (Some(gossip), Some(xpub)) = (info["gossip"].as_str(), info["events_pub"].as_str()) else {
        bail!("the scaler did not report gossip and events_pub: {first}");
    };
    let zctx = zmq::Context::new();
    let sub = zctx.socket(zmq::SUB)?;
    sub.set_linger(0)?;
    sub.connect(xpub)?;
    sub.set_subscribe(b"ContainerFailureDetected")?;
    sub.set_subscribe(b"HeartbeatReceived")?;
    let (tx, _rx) = mpsc::channel();
    let mut kids = Vec::new();
    for i in 1..n {
        kids.push(spawn_member(i, Some(gossip), "worker", &tx)?.0);
    }
    // Formed once the scaler has heard from every member (heartbeats name them).
    let mut heard = std::collections::HashSet::new();
    let deadline = Instant::now() + PATIENCE;
    sub.set_rcvtimeo(1000)?;
    while heard.len() < n - 1 {
        if Instant::now() > deadline {
            bail!("scaler N={n}: heard only {} members", heard.len());
        }
        let Ok(parts) = sub.recv_multipart(0) else {
            continue;
        };
        if let Some(v) = parts
            .get(1)
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        {
            if let Some(m) = v["data"]["member"].as_str() {
                heard.insert(m.to_string());
            }
        }
    }
    std::thread::sleep(SETTLE);
    sub.set_unsubscribe(b"HeartbeatReceived")?;
    let victim = format!("n{}", n - 1);
    let killed = Instant::now();
    if let Some(k) = kids.last_mut() {
        k.kill();
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        if Instant::now() > deadline {
            bail!("scaler N={n}: no ContainerFailureDetected for {victim}");
        }
        let Ok(parts) = sub.recv_multipart(0) else {
            continue;
        };
        let at = killed.elapsed().as_secs_f64();
        let v: serde_json::Value = parts
            .get(1)
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        if v["type"] == "ContainerFailureDetected" && v["data"]["member"] == victim.as_str() {
            return Ok(at);
        }
    }
}

/// N = 10 of ours, no kills, for `secs`: every Failed any member reports is a false failure.
fn quiet(secs: u64) -> Result<usize> {
    let n = 10;
    let (tx, rx) = mpsc::channel();
    let (seed, seed_addr) = spawn_ours(0, None, &tx)?;
    let mut kids = vec![seed];
    for i in 1..n {
        kids.push(spawn_ours(i, Some(&seed_addr), &tx)?.0);
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut failed = 0;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((idx, v)) if v["event"] == "failed" => {
                failed += 1;
                eprintln!("false failure: n{idx} saw {} failed", v["member"]);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(kids);
    Ok(failed)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Mode::Member { id, join, role }) = args.mode {
        return member_mode(id, join, role);
    }
    println!("failure detection on loopback, probe 1 s / timeout 500 ms, kill -9 → failed seen by a survivor");
    println!(
        "{:>4}  {:>12}  {:>12}  {:>10}   (median of {} kills each; serf polled every {} ms)",
        "N",
        "ours (s)",
        "serf (s)",
        "ours/serf",
        args.trials,
        SERF_POLL.as_millis()
    );
    for &n in &args.sizes {
        if n < 2 {
            bail!("--sizes: a cluster needs at least 2 members");
        }
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..args.trials {
            ours.push(ours_once(n)?);
            theirs.push(serf_once(&args.serf, n)?);
        }
        let (o, s) = (median(ours.clone()), median(theirs.clone()));
        println!(
            "{n:>4}  {o:>12.2}  {s:>12.2}  {:>9.2}x   ours {ours:.2?}  serf {theirs:.2?}",
            o / s
        );
    }
    println!();
    println!("kill -9 of a worker → ContainerFailureDetected on a real scaler's bus (N members incl. the scaler)");
    println!(
        "{:>4}  {:>12}  {:>12}  {:>10}",
        "N", "scaler (s)", "serf (s)", "scaler/serf"
    );
    for &n in &args.sizes {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..args.trials {
            ours.push(scaler_once(&args.bin_dir, n)?);
            theirs.push(serf_once(&args.serf, n)?);
        }
        let (o, s) = (median(ours.clone()), median(theirs.clone()));
        println!(
            "{n:>4}  {o:>12.2}  {s:>12.2}  {:>9.2}x   scaler {ours:.2?}  serf {theirs:.2?}",
            o / s
        );
    }
    if args.quiet_seconds > 0 {
        let f = quiet(args.quiet_seconds)?;
        println!(
            "false failures: {f} over {} s with N = 10 and no kills (ours)",
            args.quiet_seconds
        );
    }
    Ok(())
}
