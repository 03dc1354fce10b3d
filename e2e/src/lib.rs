//! Shared by the multi-process scenarios under `e2e/tests/`: finding the workspace binaries,
//! starting them as real processes (killed when the test ends, pass or fail), the throwaway
//! PostgreSQL database and S3 prefix each scenario gets, and clip generation. Services come
//! from `scripts/task test` through `TRANSCODE_TEST_*`; with `TRANSCODE_REQUIRE_SERVICES=1`
//! (CI) a missing one fails the test instead of skipping it.

pub mod faultproxy;
pub mod nomadfake;

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary, built next to the test executable (target/<profile>/).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// A child process that is killed (SIGKILL) when dropped, so a failing test leaves nothing.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub info: serde_json::Value,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` and waits for its first stdout line (a JSON object of endpoints).
    pub fn start(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        logs: &Path,
    ) -> Result<Proc> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("TRANSCODE_LOG", "info,transcode=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {}
        });
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(l))) => l,
            _ => {
                let _ = child.kill();
                bail!("{name} did not start; log:\n{}", tail(&log));
            }
        };
        let info =
            serde_json::from_str(&first).with_context(|| format!("{name} first line {first:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            info,
            log,
        })
    }

    pub fn endpoint(&self, key: &str) -> String {
        self.info
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn require<T>(what: &str) -> Option<T> {
    if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!(
            "{what} is not configured but TRANSCODE_REQUIRE_SERVICES=1: run ./scripts/task test"
        );
    }
    eprintln!("SKIPPED: no {what} (run ./scripts/task test)");
    None
}

/// A fresh PostgreSQL database on the test server, as a URL.
pub fn pg_database(tag: &str) -> Option<String> {
    let Ok(url) = std::env::var("TRANSCODE_TEST_PG_URL") else {
        return require("PostgreSQL (TRANSCODE_TEST_PG_URL)");
    };
    let db = format!("e2e_{tag}_{}", uuid::Uuid::new_v4().simple());
    let out = Command::new("psql")
        .arg(&url)
        .args(["-qc", &format!("CREATE DATABASE {db}")])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (base, _) = url.rsplit_once('/').expect("url has a database");
    Some(format!("{base}/{db}"))
}

/// The S3 test server: (bucket, env for processes that talk to it).
pub fn s3() -> Option<(String, Vec<(String, String)>)> {
    let (Ok(endpoint), Ok(bucket)) = (
        std::env::var("TRANSCODE_TEST_S3_ENDPOINT"),
        std::env::var("TRANSCODE_TEST_S3_BUCKET"),
    ) else {
        return require("S3 server (TRANSCODE_TEST_S3_ENDPOINT)");
    };
    let mut env = vec![("TRANSCODE_OBJECTS_S3_ENDPOINT".to_string(), endpoint)];
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
        if let Ok(v) = std::env::var(k) {
            env.push((k.to_string(), v));
        }
    }
    Some((bucket, env))
}

/// An object client for the test S3 server, from the env that [`s3`] returns, so a test can
/// upload sources and read outputs as the processes do.
pub fn s3_objects(env: &[(String, String)]) -> transcode_core::objects::Objects {
    use transcode_core::objects::{Objects, ObjectsConfig, S3Config};
    let endpoint = env
        .iter()
        .find(|(k, _)| k == "TRANSCODE_OBJECTS_S3_ENDPOINT")
        .map(|(_, v)| v.clone());
    Objects::new(ObjectsConfig {
        s3: S3Config {
            endpoint,
            ..S3Config::default()
        },
    })
}

/// Writes a test clip with gst-launch-1.0: a moving pattern, and a tone when `audio`.
pub fn make_clip(path: &Path, seconds: u32, width: u32, height: u32, audio: bool) -> Result<()> {
    let frames = seconds * 30;
    let mut args: Vec<String> = ["-q", "-e", "videotestsrc", "pattern=ball"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(format!("num-buffers={frames}"));
    args.extend([
        "!".to_string(),
        format!("video/x-raw,width={width},height={height},framerate=30/1"),
        "!".into(),
        "x264enc".into(),
        "speed-preset=ultrafast".into(),
        "key-int-max=30".into(),
        "!".into(),
        "h264parse".into(),
        "!".into(),
        "mp4mux".into(),
        "name=mux".into(),
        "!".into(),
        "filesink".into(),
        format!("location={}", path.display()),
    ]);
    if audio {
        // 1024 samples per buffer at 44.1 kHz.
        let buffers = seconds * 44_100 / 1024 + 1;
        args.extend([
            "audiotestsrc".to_string(),
            format!("num-buffers={buffers}"),
            "!".into(),
            "audioconvert".into(),
            "!".into(),
            "avenc_aac".into(),
            "!".into(),
            "aacparse".into(),
            "!".into(),
            "mux.".into(),
        ]);
    }
    let st = Command::new("gst-launch-1.0").args(&args).status()?;
    if !st.success() {
        bail!("gst-launch-1.0 failed making {}", path.display());
    }
    Ok(())
}

/// What ffprobe says about a video file's first video stream: (width, height, duration ms).
pub fn ffprobe(path: &Path) -> Result<(u32, u32, u64)> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height:format=duration",
            "-of",
            "json",
        ])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!(
            "ffprobe {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let w = v["streams"][0]["width"]
        .as_u64()
        .ok_or_else(|| anyhow!("no width"))?;
    let h = v["streams"][0]["height"]
        .as_u64()
        .ok_or_else(|| anyhow!("no height"))?;
    let d: f64 = v["format"]["duration"].as_str().unwrap_or("0").parse()?;
    Ok((w as u32, h as u32, (d * 1000.0) as u64))
}

/// Polls `check` every 200 ms until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits up to `timeout` for task `id` to reach a terminal status (succeeded, failed,
/// cancelled) and returns it; `what` names the wait in the timeout error.
pub async fn finished(
    db: &std::sync::Arc<dyn transcode_core::Store>,
    id: transcode_core::TaskId,
    timeout: Duration,
    what: &str,
) -> Result<transcode_core::Task> {
    wait_for(timeout, what, || {
        let db = db.clone();
        async move {
            let t = db.get_task(id).await.ok()?;
            t.status.is_terminal().then_some(t)
        }
    })
    .await
}

/// Every event of task `id` in store order (empty when the store cannot be read right now, so
/// it can sit inside a [`wait_for`] poll).
pub async fn task_events(
    db: &std::sync::Arc<dyn transcode_core::Store>,
    id: transcode_core::TaskId,
) -> Vec<transcode_core::events::StoredEvent> {
    db.events(&transcode_core::store::EventFilter {
        task_id: Some(id),
        limit: 10_000,
        ..transcode_core::store::EventFilter::default()
    })
    .await
    .unwrap_or_default()
}

/// Waits up to 60 s until a worker has pulled task `id`'s source (so the transcode is under
/// way) and returns that worker's id: the moment the failure scenarios strike.
pub async fn pulled_by(
    db: &std::sync::Arc<dyn transcode_core::Store>,
    id: transcode_core::TaskId,
) -> Result<String> {
    wait_for(
        Duration::from_secs(60),
        "a worker to pull the source",
        || {
            let db = db.clone();
            async move {
                let evs = task_events(&db, id).await;
                if !evs.iter().any(|e| e.event_type == "VideoFilePulled") {
                    return None;
                }
                db.get_task(id).await.ok()?.worker_id
            }
        },
    )
    .await
}

/// `n` distinct ports free for both TCP and UDP on 127.0.0.1 (gossip uses both). All stay
/// bound until every one is chosen; another process could still take one before the scaler
/// or worker binds it, which would fail the start loudly rather than pass wrongly.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        held.push((tcp, udp));
        ports.push(port);
    }
    Ok(ports)
}

/// Starts a scaler on ephemeral ports.
pub fn start_scaler(store: &str, logs: &Path, extra: &[&str]) -> Result<Proc> {
    let mut args: Vec<String> = [
        "--store",
        store,
        "--migrate",
        "--intake",
        "tcp://127.0.0.1:0",
        "--dispatch",
        "tcp://127.0.0.1:0",
        "--events-pub",
        "tcp://127.0.0.1:0",
        "--events-sub",
        "tcp://127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--id",
        "e2e-scaler",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start("scaler", &bin("transcode-scaler"), &args, &[], logs)
}

/// Starts a worker attached to `scaler`.
pub fn start_worker(
    name: &str,
    store: &str,
    scaler: &Proc,
    env: &[(String, String)],
    logs: &Path,
    extra: &[&str],
) -> Result<Proc> {
    let scratch = logs.join(format!("scratch-{name}"));
    let mut args: Vec<String> = vec![
        "--store".into(),
        store.into(),
        "--dispatch".into(),
        scaler.endpoint("dispatch"),
        "--events".into(),
        scaler.endpoint("events_sub"),
        "--id".into(),
        name.into(),
        "--scratch-dir".into(),
        scratch.display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(name, &bin("transcode-worker"), &args, env, logs)
}
