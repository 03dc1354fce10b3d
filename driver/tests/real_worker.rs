//! The driver with the real `transcode-worker`, not the shell stand-in the other tests use.
//! This is the end-to-end check of the env contract: the worker refuses unknown
//! `TRANSCODE_<SECTION>_*` names at start, so a driver that misspells one fails here, and the
//! worker's own start-up line and logs show which values it actually took.
//!
//! The worker binary is found next to this test's target dir (`target/<profile>/`); build it
//! first with `cargo build -p transcode-worker`. No scaler runs: the worker's ZeroMQ sockets
//! connect lazily, so it starts and drains against closed ports. Like the other driver tests,
//! this needs root, writable cgroups and GStreamer with the worker's encoders.

mod harness;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use harness::*;
use nomad_driver_transcode::proto::drivers as pb;
use tokio::sync::mpsc;

/// Generous: the first GStreamer registry scan after a fresh install can take many seconds.
const START_LIMIT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(20);

const ALLOC_ID: &str = "3f2a9c1e-5b7d-4e0a-9c3b-1d2e3f4a5b6c";
const NODE_NAME: &str = "client-1";
/// `<short alloc id>-<task name>`: what the driver must pass as the worker's id.
const WORKER_ID: &str = "3f2a9c1e-worker";

/// `target/<profile>/transcode-worker`, a sibling of `target/<profile>/deps/<this test>`.
fn real_worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("transcode-worker");
    assert!(
        bin.is_file(),
        "REAL WORKER MISSING: {} does not exist. Build it with the same profile as these \
         tests first: `cargo build -p transcode-worker` (or `cargo build --workspace --bins`).",
        bin.display()
    );
    bin
}

/// Ports that nothing listens on: bound (all at once, so they differ) and released.
fn closed_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().expect("local addr").port();
    }
    ports
}

/// Removes the test's cgroup parent even when an assertion fails.
struct CgroupParent(String);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        remove_cgroup_parent(&self.0);
    }
}

/// A "logmon" for one of Nomad's log FIFOs: each line goes to a channel as it arrives, and
/// the whole text is kept for failure messages.
struct FifoReader {
    lines: mpsc::UnboundedReceiver<String>,
    text: Arc<Mutex<String>>,
    thread: std::thread::JoinHandle<()>,
}

impl FifoReader {
    fn open(path: &Path) -> FifoReader {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let (tx, lines) = mpsc::unbounded_channel();
        let text = Arc::new(Mutex::new(String::new()));
        let (path, keep) = (path.to_owned(), text.clone());
        let thread = std::thread::spawn(move || {
            use std::io::BufRead;
            // Blocks until the worker side opens the FIFO, as Nomad's logmon does.
            let Ok(f) = std::fs::File::open(&path) else {
                return;
            };
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut t) = keep.lock() {
                    t.push_str(&line);
                    t.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        FifoReader {
            lines,
            text,
            thread,
        }
    }

    /// The next line matching `pred`, or a panic naming `what` with `context` after `limit`.
    async fn line_where(
        &mut self,
        what: &str,
        limit: Duration,
        context: &dyn Fn() -> String,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let found = tokio::time::timeout(limit, async {
            while let Some(l) = self.lines.recv().await {
                if pred(&l) {
                    return Some(l);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(l)) => l,
            Ok(None) => panic!("the worker closed the log before {what}\n{}", context()),
            Err(_) => panic!("no {what} within {limit:?}\n{}", context()),
        }
    }
}

/// The tracing JSON event whose message is `msg`, from the worker's stderr text.
fn log_event(stderr: &str, msg: &str) -> Option<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.pointer("/fields/message").and_then(|m| m.as_str()) == Some(msg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_worker_starts_reports_and_drains_through_the_driver() {
    let worker = real_worker_binary();
    let tmp = tempfile::tempdir().expect("tempdir");
    let parent = CgroupParent(format!("transcode-test-real-{}", std::process::id()));
    let plugin = Plugin::launch(tmp.path()).await;
    plugin
        .configure(&plugin_config(
            &worker,
            &parent.0,
            &tmp.path().join("state"),
        ))
        .await;
    healthy_fingerprint(&plugin).await;

    let [dispatch_port, events_port] = closed_ports::<2>();
    let dispatch = format!("tcp://127.0.0.1:{dispatch_port}");
    let events = format!("tcp://127.0.0.1:{events_port}");
    let db = tmp.path().join("w.db");
    let out = tmp.path().join("task");
    std::fs::create_dir_all(&out).expect("task dir");
    let id = format!("{ALLOC_ID}/worker/real");
    let opts = TaskOpts {
        id: &id,
        // The stand-in's knobs; the real worker gets its own env below.
        mode: "real",
        out: &out,
        // GStreamer's registry and the store pool need more than the stand-in's 256 MiB.
        memory_mb: 512,
        cpu_quota: None,
        stdout_path: out.join("stdout.fifo"),
        stderr_path: out.join("stderr.fifo"),
    };
    let mut stdout = FifoReader::open(&opts.stdout_path);
    let mut stderr = FifoReader::open(&opts.stderr_path);
    let mut task = task_config(&opts);
    task.alloc_id = ALLOC_ID.into();
    task.node_name = NODE_NAME.into();
    task.msgpack_driver_config = cty_object(
        TASK_KEYS,
        &[
            ("store_url", s(&format!("sqlite://{}", db.display()))),
            ("scaler_address", s(&dispatch)),
            ("events_address", s(&events)),
            // Exercised for their names only: the worker reaches S3 only for s3:// task URLs.
            ("s3_endpoint", s("http://127.0.0.1:9")),
            ("s3_region", s("eu-west-1")),
            ("slots", Cty::Num(2)),
            ("args", Cty::List(vec![s("--migrate")])),
            ("drain_timeout", s("5s")),
            // No node_label: the worker must get Nomad's node name.
        ],
    );
    task.env = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        // Keeps the worker's scratch dir inside the test's tempdir.
        ("TMPDIR", tmp.path().to_str().expect("utf8 tempdir")),
        // A worker setting passed through the task's env, and logs a test can parse.
        ("TRANSCODE_LOG_FORMAT", "json"),
        // Must lose to the typed `slots`.
        ("TRANSCODE_WORKER_SLOTS", "99"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();

    let handle = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task.clone()),
        })
        .await
        .expect("StartTask")
        .into_inner()
        .handle
        .expect("handle");
    assert_eq!(handle.state, pb::TaskState::Running as i32);

    // What a failure message shows: both logs so far (shared handles, so the readers can
    // still be borrowed mutably below).
    let (worker_log, plugin_log) = (stderr.text.clone(), plugin.stderr_log.clone());
    let context = move || {
        format!(
            "worker stderr:\n{}\nplugin stderr:\n{}",
            worker_log.lock().map(|t| t.clone()).unwrap_or_default(),
            std::fs::read_to_string(&plugin_log).unwrap_or_default()
        )
    };
    // The worker's one machine-readable line, printed once store, GStreamer and HTTP are up.
    let line = stdout
        .line_where("start-up line on stdout", START_LIMIT, &context, |l| {
            l.starts_with('{')
        })
        .await;
    let started: serde_json::Value = serde_json::from_str(&line).expect("start-up line is JSON");
    assert_eq!(
        started["id"], WORKER_ID,
        "worker id from the driver: {line}"
    );
    assert_eq!(started["node"], NODE_NAME, "Nomad's node name: {line}");
    assert!(
        started["http"].as_str().is_some_and(|h| h.contains(':')),
        "{line}"
    );
    assert!(db.is_file(), "the worker used store_url and --migrate");

    // What the worker took for the scaler and slots, from its own log.
    let connected = stderr
        .line_where("'connected to dispatcher' log", LONG, &context, |l| {
            l.contains("connected to dispatcher")
        })
        .await;
    let ev = log_event(&connected, "connected to dispatcher").expect("JSON log line");
    assert_eq!(ev["fields"]["dispatch"], dispatch.as_str(), "{connected}");
    assert_eq!(ev["fields"]["slots"], 2, "{connected}");

    // Still running a second later: no config error, no crash against the closed ports.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let insp = plugin
        .driver()
        .inspect_task(pb::InspectTaskRequest {
            task_id: id.clone(),
        })
        .await
        .expect("InspectTask")
        .into_inner()
        .task
        .expect("status");
    assert_eq!(
        insp.state,
        pb::TaskState::Running as i32,
        "{insp:?}\n{}",
        context()
    );

    // Stats of a real process: the first sample's CPU is the average since start, which
    // includes GStreamer's start-up work.
    let mut stats = plugin
        .driver()
        .task_stats(pb::TaskStatsRequest {
            task_id: id.clone(),
            collection_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
        })
        .await
        .expect("TaskStats")
        .into_inner();
    let usage = tokio::time::timeout(LONG, stats.next())
        .await
        .expect("a stats sample in time")
        .expect("a stats sample")
        .expect("stats ok")
        .stats
        .expect("stats")
        .agg_resource_usage
        .expect("usage");
    drop(stats);
    let mem = usage.memory.expect("memory");
    assert!(mem.usage > 0, "memory usage: {mem:?}");
    let cpu = usage.cpu.expect("cpu");
    assert!(cpu.percent > 0.0, "cpu: {cpu:?}");

    // SIGTERM: the worker drains (nothing to hand back) and exits 0 on its own.
    plugin
        .driver()
        .stop_task(pb::StopTaskRequest {
            task_id: id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 15,
                nanos: 0,
            }),
            signal: "SIGTERM".into(),
        })
        .await
        .expect("StopTask");
    let w = tokio::time::timeout(
        LONG,
        plugin.driver().wait_task(pb::WaitTaskRequest {
            task_id: id.clone(),
        }),
    )
    .await
    .expect("WaitTask answered")
    .expect("WaitTask ok")
    .into_inner();
    let r = w.result.expect("result");
    assert_eq!(
        (r.exit_code, r.signal, r.oom_killed),
        (0, 0, false),
        "a drain, not a kill: {}\n{}",
        w.err,
        context()
    );
    drop(stdout.lines);
    drop(stderr.lines);
    let _ = stdout.thread.join();
    let _ = stderr.thread.join();
    let log = stderr.text.lock().map(|t| t.clone()).unwrap_or_default();
    assert!(
        log_event(&log, "shutdown requested: draining").is_some(),
        "the worker drained:\n{log}"
    );
    assert!(
        log_event(&log, "drained; exiting").is_some(),
        "the worker drained:\n{log}"
    );

    plugin
        .driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id.clone(),
            force: false,
        })
        .await
        .expect("DestroyTask");
}
