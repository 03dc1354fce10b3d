//! Shared harness for the scaler's integration tests: starts the real `transcode-scaler` binary
//! on `:0` ports with a SQLite store in a temp dir, reads its endpoints line, and gives the
//! tests raw ZeroMQ sockets, the store API on the same file, and a tiny HTTP GET. Every wait is
//! bounded, so a broken scaler fails a test instead of hanging it.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use transcode_core::events::{EventBody, Origin, TaskQueued};
use transcode_core::store::{self, Claimant, EventFilter, Store};
use transcode_core::{TaskId, TaskSpec};

/// How long any single wait in these tests may take before it counts as a failure.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Scaler {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub endpoints: serde_json::Value,
    pub log: PathBuf,
    pub ctx: zmq::Context,
}

pub fn db_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("transcode.db").display())
}

/// A temp dir with a migrated database, for tests that write rows before the scaler starts.
pub fn prepared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    block_on(async {
        let s = store::open(&db_url(dir.path()), 1)
            .await
            .expect("open store");
        s.migrate().await.expect("migrate");
    });
    dir
}

impl Scaler {
    pub fn start(extra: &[&str]) -> Scaler {
        Scaler::start_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Scaler {
        let log = dir.path().join("scaler.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_transcode-scaler"))
            .args(["--store", &db_url(dir.path()), "--migrate"])
            .args(["--intake", "tcp://127.0.0.1:0"])
            .args(["--dispatch", "tcp://127.0.0.1:0"])
            .args(["--events-pub", "tcp://127.0.0.1:0"])
            .args(["--events-sub", "tcp://127.0.0.1:0"])
            .args(["--http", "127.0.0.1:0"])
            .args(["--id", "scaler-test", "--node", "test-node"])
            .args(extra)
            // The config must come from the flags alone, whatever the developer's env holds.
            .env_remove("TRANSCODE_CONFIG")
            .env("TRANSCODE_LOG_LEVEL", "debug")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn transcode-scaler");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(WAIT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no endpoints line; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let endpoints: serde_json::Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "endpoints line {line:?}: {e}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Scaler {
            child: Some(child),
            dir,
            endpoints,
            log,
            ctx: zmq::Context::new(),
        }
    }

    pub fn ep(&self, name: &str) -> String {
        self.endpoints[name]
            .as_str()
            .unwrap_or_else(|| panic!("endpoint {name} in {}", self.endpoints))
            .to_string()
    }

    pub fn db_url(&self) -> String {
        db_url(self.dir.path())
    }

    pub fn store(&self) -> Arc<dyn Store> {
        block_on(store::open(&self.db_url(), 1)).expect("open store")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A socket of `kind` connected to endpoint `name`, with bounded receive and send.
    pub fn socket(&self, kind: zmq::SocketType, name: &str) -> zmq::Socket {
        let s = self.ctx.socket(kind).expect("socket");
        s.set_linger(0).expect("linger");
        s.set_rcvtimeo(WAIT.as_millis() as i32).expect("rcvtimeo");
        s.set_sndtimeo(WAIT.as_millis() as i32).expect("sndtimeo");
        s.connect(&self.ep(name)).expect("connect");
        s
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&self.ep("http"), path)
    }

    pub fn metrics(&self) -> String {
        let (code, body) = self.http_get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// The value of one metric series, e.g. `transcode_workers` or
    /// `transcode_frames_rejected_total{socket="intake",code="malformed"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    /// Polls a metric until `pred` holds, within [`WAIT`].
    pub fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series);
            if let Some(v) = v.filter(|v| pred(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{series} stayed at {v:?}; metrics:\n{}\nlog:\n{}",
                self.metrics(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "scaler did not exit after SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- scaler log ----\n{}", self.log_text());
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// A one-shot HTTP/1.0 GET (the server closes the connection after the response).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

pub fn spec(priority: i32) -> TaskSpec {
    serde_json::from_value(serde_json::json!({
        "source": "s3://media/in/cat.mp4",
        "output": "s3://media/out/cat/",
        "preset": "hd",
        "priority": priority,
    }))
    .expect("spec")
}

/// Inserts a queued task straight into the store, as a publisher that owns its rows would.
pub fn insert(store: &Arc<dyn Store>, priority: i32) -> TaskId {
    let ev = Origin::new("test", "test-node").event(
        None,
        EventBody::TaskQueued(TaskQueued {
            priority,
            via: "test".into(),
        }),
    );
    block_on(store.insert_task(&spec(priority), &[ev]))
        .expect("insert")
        .task
        .id
}

pub fn claim(store: &Arc<dyn Store>, id: TaskId, lease: Duration) {
    let who = Claimant {
        worker_id: "ghost".into(),
        node: "gone".into(),
    };
    block_on(store.claim(id, &who, lease, &[])).expect("claim");
}

pub fn event_types(store: &Arc<dyn Store>, id: TaskId) -> Vec<String> {
    block_on(store.events(&EventFilter {
        task_id: Some(id),
        limit: 100,
        ..EventFilter::default()
    }))
    .expect("events")
    .into_iter()
    .map(|e| e.event_type)
    .collect()
}

/// Sends one request on a REQ socket and parses the reply.
pub fn req(s: &zmq::Socket, body: &serde_json::Value) -> serde_json::Value {
    s.send(body.to_string().as_bytes(), 0).expect("send");
    let reply = s.recv_bytes(0).expect("reply within the wait");
    serde_json::from_slice(&reply).expect("json reply")
}

/// Receives one message on a DEALER socket (its parts).
pub fn recv_parts(s: &zmq::Socket) -> Vec<Vec<u8>> {
    s.recv_multipart(0).expect("a message within the wait")
}

/// Receives one dispatcher frame on a worker's DEALER, as JSON.
pub fn recv_frame(s: &zmq::Socket) -> serde_json::Value {
    let parts = recv_parts(s);
    assert_eq!(parts.len(), 1, "one part from the dispatcher");
    serde_json::from_slice(&parts[0]).expect("json frame")
}

/// Whether a frame arrives on `s` within `within`; for checking that nothing more is sent.
pub fn poll_frame(s: &zmq::Socket, within: Duration) -> Option<serde_json::Value> {
    let mut items = [s.as_poll_item(zmq::POLLIN)];
    zmq::poll(&mut items, within.as_millis() as i64).expect("poll");
    if items[0].is_readable() {
        Some(recv_frame(s))
    } else {
        None
    }
}

/// A fake worker: a DEALER on the dispatch socket that has said HELLO.
pub fn worker(scaler: &Scaler, id: &str, slots: u32) -> zmq::Socket {
    let s = scaler.socket(zmq::DEALER, "dispatch");
    let hello =
        serde_json::json!({"v":1,"op":"hello","worker":id,"node":"test-node","slots":slots});
    s.send(hello.to_string().as_bytes(), 0).expect("hello");
    s
}

pub fn ready(s: &zmq::Socket, credits: u32) {
    let f = serde_json::json!({"v":1,"op":"ready","credits":credits});
    s.send(f.to_string().as_bytes(), 0).expect("ready");
}

pub fn task_id_of(frame: &serde_json::Value) -> TaskId {
    assert_eq!(frame["op"], "task", "expected a TASK frame, got {frame}");
    frame["task_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("task_id in {frame}"))
}

/// Submits a spec through intake and returns the new task id.
pub fn submit(scaler: &Scaler, priority: i32) -> TaskId {
    let s = scaler.socket(zmq::REQ, "intake");
    let r = req(
        &s,
        &serde_json::json!({"v":1,"op":"submit","spec":spec(priority)}),
    );
    assert_eq!(r["ok"], true, "{r}");
    r["task_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("task id")
}
