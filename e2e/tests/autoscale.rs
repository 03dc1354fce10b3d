//! Scenarios "node scaling, for real" and "container scaling, for real" (issue 7, tests 2 and 3;
//! ARCHITECTURE §8). A real `transcode-scaler` runs with `scaling.enabled` and the `local`
//! target, which starts and stops real `transcode-worker` processes grouped into named nodes.
//! Utilization is synthetic: every worker reads its CPU and memory from a JSON file the test
//! rewrites (`utilization.source = "file:…"`), so the autoscaler's inputs are set, not guessed.
//! The tasks are real transcodes of a generated clip, pulled from and pushed to the SeaweedFS S3
//! server, on the PostgreSQL store. Every ordering is asserted on the store's event `seq`, never
//! on time, and every wait polls with a generous bound.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use transcode_core::events::StoredEvent;
use transcode_core::store::{self, EventFilter};
use transcode_core::url::ObjectUrl;
use transcode_core::{Store, Task, TaskId, TaskStatus};
use transcode_e2e::{bin, make_clip, pg_database, s3, start_scaler, wait_for, Proc};

/// With 720p renditions at the `slow` codec preset, long enough that a transcode is still
/// running a few evaluations after the test changes the load (about 10 s for one rendition on
/// an idle 2-core machine). Task A gets two renditions, twice the work, because it starts first
/// and must outlast task B's start.
const CLIP_SECONDS: u32 = 15;
/// Upper bound for anything the farm has to do: start a worker, transcode a clip, drain.
const SETTLE: Duration = Duration::from_secs(180);
const THRESHOLD: &str = "ResourceUtilizationThresholdReached";

/// Test 2: nodes from 1 to 2; the container level pinned at one worker per node.
const NODE_POLICIES: &str = r#"
  node {
    target                 = "local"
    evaluation_interval_ms = 300
    cooldown_up_ms         = 1000
    cooldown_down_ms       = 1000
    min                    = 1
    max                    = 2
    cpu_high               = 80.0
    cpu_low                = 30.0
    mem_high               = 90.0
    within_bounds_trigger  = 2
    backlog_per_slot       = 1.0
    drain_deadline_seconds = 300
  }
  container {
    target                 = "local"
    evaluation_interval_ms = 300
    min                    = 1
    max                    = 1
  }
"#;

/// Test 3: one node; its containers from 1 to 2 and back.
const CONTAINER_POLICIES: &str = r#"
  node {
    target                 = "local"
    evaluation_interval_ms = 300
    min                    = 1
    max                    = 1
  }
  container {
    target                 = "local"
    evaluation_interval_ms = 300
    cooldown_up_ms         = 500
    cooldown_down_ms       = 500
    min                    = 1
    max                    = 2
    cpu_high               = 80.0
    cpu_low                = 30.0
    mem_high               = 90.0
    within_bounds_trigger  = 2
    backlog_per_slot       = 1.0
    drain_deadline_seconds = 300
  }
"#;

fn two_renditions() -> Value {
    json!([
        {"name": "a", "width": 1280, "height": 720, "video_kbps": 2000},
        {"name": "b", "width": 960, "height": 540, "video_kbps": 1200}
    ])
}

fn one_rendition() -> Value {
    json!([{"name": "a", "width": 1280, "height": 720, "video_kbps": 2000}])
}

/// A scaler with the autoscaler on, its bus subscriber, the store, and the S3 clip.
struct Farm {
    pg: String,
    db: Arc<dyn Store>,
    dir: PathBuf,
    util: PathBuf,
    source: String,
    output: String,
    scaler: Proc,
    /// Ids of every event a SUB socket on the scaler's `events_pub` received.
    bus: Arc<Mutex<HashSet<String>>>,
    collector: tokio::task::JoinHandle<()>,
    _zctx: zmq::Context,
    _tmp: tempfile::TempDir,
}

impl Farm {
    /// `None` when the services are absent and not required (the test is skipped).
    async fn start(tag: &str, policies: &str, load: Value) -> Result<Option<Farm>> {
        let (Some(pg), Some((bucket, s3env))) = (pg_database(tag), s3()) else {
            return Ok(None);
        };
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        let endpoint = s3env
            .iter()
            .find(|(k, _)| k == "TRANSCODE_OBJECTS_S3_ENDPOINT")
            .map(|(_, v)| v.clone())
            .context("no S3 endpoint")?;
        let objects = transcode_e2e::s3_objects(&s3env);
        let prefix = format!("e2e-{tag}-{}", uuid::Uuid::new_v4().simple());
        let clip = dir.join("clip.mp4");
        make_clip(&clip, CLIP_SECONDS, 1280, 720, true)?;
        let source = format!("s3://{bucket}/{prefix}/in/clip.mp4");
        objects.put_file(&clip, &ObjectUrl::parse(&source)?).await?;

        let util = dir.join("utilization.json");
        write_load(&util, &load)?;
        let utilization = format!(
            "utilization {{\n  sample_interval_ms  = 100\n  smoothing           = 1.0\n  \
             publish_interval_ms = 200\n  source              = \"file:{}\"\n}}\n",
            util.display()
        );
        // The workers the local target starts get this file (`scaling.local.worker_config`);
        // the S3 credentials reach them through the environment they inherit.
        let worker_cfg = dir.join("worker.hcl");
        std::fs::write(
            &worker_cfg,
            format!(
                "objects {{\n  s3 {{\n    endpoint   = \"{endpoint}\"\n    allow_http = true\n  }}\n}}\n\
                 worker {{\n  scratch_dir           = \"{}\"\n  drain_timeout_seconds = 300\n}}\n{utilization}",
                dir.join("scratch").display()
            ),
        )?;
        let scaler_cfg = dir.join("scaler.hcl");
        std::fs::write(
            &scaler_cfg,
            format!(
                "log {{\n  level = \"info,transcode_scaler::autoscale=debug\"\n}}\n{utilization}\
                 scaling {{\n  enabled = true\n{policies}\n  local {{\n    worker_config       = \"{}\"\n    \
                 containers_per_node = 1\n    slots               = 1\n    node_prefix         = \"{tag}-\"\n  }}\n}}\n",
                worker_cfg.display()
            ),
        )?;
        let cfg_arg = scaler_cfg.display().to_string();
        let scaler = start_scaler(
            &pg,
            &dir,
            &["--config", &cfg_arg, "--scan-interval-ms", "500"],
        )?;
        let db = store::open(&pg, 2).await?;

        let zctx = zmq::Context::new();
        let sub = transcode_core::bus::subscriber(&zctx, &scaler.endpoint("events_pub"), &[])?;
        let bus: Arc<Mutex<HashSet<String>>> = Arc::default();
        let collector = {
            let bus = bus.clone();
            tokio::spawn(async move {
                // The whole handle moves in: dropping its sender would stop the socket.
                let mut sub = sub;
                while let Some(msg) = sub.rx.recv().await {
                    if let Some(ev) = msg
                        .get(1)
                        .and_then(|b| serde_json::from_slice::<transcode_core::Event>(b).ok())
                    {
                        if let Ok(mut s) = bus.lock() {
                            s.insert(ev.id.to_string());
                        }
                    }
                }
            })
        };
        let farm = Farm {
            pg,
            db,
            dir,
            util,
            source,
            output: format!("s3://{bucket}/{prefix}/out"),
            scaler,
            bus,
            collector,
            _zctx: zctx,
            _tmp: tmp,
        };
        // The subscription is live once anything arrives (gossip heartbeats flow as soon as
        // the first node's worker joins); events the test asserts on come after this.
        let bus = &farm.bus;
        let live = wait_for(SETTLE, "the bus subscription to deliver", || async move {
            bus.lock().ok().filter(|s| !s.is_empty()).map(|_| ())
        })
        .await;
        live.map_err(|e| farm.fail(e))?;
        Ok(Some(farm))
    }

    /// The error, with the scaler's log (its workers log there too).
    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        let log = std::fs::read_to_string(&self.scaler.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(150)..].join("\n");
        e.context(format!("scaler and worker log (tail):\n{tail}"))
    }

    fn write_load(&self, load: &Value) -> Result<()> {
        write_load(&self.util, load)
    }

    fn submit(&self, name: &str, renditions: Value) -> Result<TaskId> {
        let spec = self.dir.join(format!("spec-{name}.json"));
        std::fs::write(
            &spec,
            serde_json::to_vec(&json!({
                "source": self.source,
                "output": format!("{}/{name}/", self.output),
                "renditions": renditions,
                "codec_preset": "slow",
            }))?,
        )?;
        let out = std::process::Command::new(bin("transcode"))
            .args(["--store", &self.pg, "submit", "--intake", "--spec"])
            .arg(&spec)
            .env("TRANSCODE_SCALER_INTAKE", self.scaler.endpoint("intake"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "transcode submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    async fn task(&self, id: TaskId) -> Result<Task> {
        Ok(self.db.get_task(id).await?)
    }

    async fn wait_task(&self, id: TaskId, what: &str, ok: impl Fn(&Task) -> bool) -> Result<Task> {
        let ok = &ok;
        let r = wait_for(SETTLE, what, || async move {
            self.task(id).await.ok().filter(|t| ok(t))
        })
        .await;
        r.map_err(|e| self.fail(e))
    }

    /// Waits until `id` has ended, and answers it.
    async fn settled(&self, id: TaskId) -> Result<Task> {
        self.wait_task(id, "a task to end", |t| {
            t.status.is_terminal() || t.status == TaskStatus::Escalated
        })
        .await
    }

    /// Events of one type in the store, in `seq` order.
    async fn events(&self, ty: &str) -> Result<Vec<StoredEvent>> {
        let mut evs = self
            .db
            .events(&EventFilter {
                event_type: Some(ty.to_string()),
                limit: 10_000,
                ..EventFilter::default()
            })
            .await?;
        evs.sort_by_key(|e| e.seq);
        Ok(evs)
    }

    async fn task_events(&self, id: TaskId) -> Result<Vec<StoredEvent>> {
        let mut evs = self
            .db
            .events(&EventFilter {
                task_id: Some(id),
                limit: 10_000,
                ..EventFilter::default()
            })
            .await?;
        evs.sort_by_key(|e| e.seq);
        Ok(evs)
    }

    /// The first stored event of type `ty` that `ok` accepts.
    async fn wait_event(
        &self,
        ty: &str,
        what: &str,
        ok: impl Fn(&StoredEvent) -> bool,
    ) -> Result<StoredEvent> {
        let ok = &ok;
        let r = wait_for(SETTLE, what, || async move {
            self.events(ty).await.ok()?.into_iter().find(|e| ok(e))
        })
        .await;
        r.map_err(|e| self.fail(e))
    }

    /// `transcode scaling status --json`: the autoscaler's `/v1/scaling` document.
    async fn status(&self) -> Option<Value> {
        let out = tokio::process::Command::new(bin("transcode"))
            .args(["scaling", "status", "--json", "--scaler-http"])
            .arg(self.scaler.endpoint("http"))
            .output()
            .await
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Every one of `events` also reached the bus subscriber.
    async fn on_bus(&self, events: &[&StoredEvent]) -> Result<()> {
        let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        let ids = &ids;
        let r = wait_for(
            Duration::from_secs(15),
            "the events on the bus",
            || async move {
                let s = self.bus.lock().ok()?;
                ids.iter().all(|id| s.contains(id)).then_some(())
            },
        )
        .await;
        r.map_err(|e| {
            let missing: Vec<String> = events
                .iter()
                .filter(|ev| {
                    self.bus
                        .lock()
                        .map(|s| !s.contains(&ev.id.to_string()))
                        .unwrap_or(true)
                })
                .map(|ev| format!("{} seq {}", ev.event_type, ev.seq))
                .collect();
            e.context(format!("stored but never received on the bus: {missing:?}"))
        })
    }

    /// Command lines of the scaler's live child processes (the local target's workers).
    fn workers(&self) -> Vec<String> {
        children(self.scaler.pid())
            .into_iter()
            .filter_map(|pid| {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                cmd.contains("transcode-worker").then_some(cmd)
            })
            .collect()
    }
}

impl Drop for Farm {
    /// SIGTERM: the scaler stops its autoscaler and sends its workers SIGTERM, so they drain
    /// and leave. A worker still alive after that (or after a SIGKILLed scaler) is killed here,
    /// by pid, so a failed run leaves no process behind.
    fn drop(&mut self) {
        self.collector.abort();
        let pids = children(self.scaler.pid());
        self.scaler.signal("TERM");
        let _ = self.scaler.wait(Duration::from_secs(30));
        for pid in pids {
            let alive = |pid: u32| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains("transcode-worker"))
                    .unwrap_or(false)
            };
            for _ in 0..100 {
                if !alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Live direct children of `pid`: every process whose parent it is (`/proc/*/stat`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let child: u32 = p.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
            // "pid (comm) state ppid …": comm may hold spaces and parentheses.
            let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
            let state = rest.next()?;
            let ppid: u32 = rest.next()?.parse().ok()?;
            (ppid == pid && state != "Z").then_some(child)
        })
        .collect()
}

/// Replaces the synthetic utilization file in one rename, so no sample reads half of it.
fn write_load(path: &Path, load: &Value) -> Result<()> {
    let tmp = path.with_extension("json.new");
    std::fs::write(&tmp, serde_json::to_vec(load)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn data_str<'a>(e: &'a StoredEvent, key: &str) -> &'a str {
    e.data[key].as_str().unwrap_or_default()
}

fn data_u64(e: &StoredEvent, key: &str) -> Option<u64> {
    e.data[key].as_u64()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts the task succeeded on its first attempt, never given back, and that its
/// `TaskSucceeded` is logged before `before` (by seq).
async fn succeeded_before(farm: &Farm, id: TaskId, before: &StoredEvent) -> Result<()> {
    let t = farm.settled(id).await?;
    assert_eq!(
        t.status,
        TaskStatus::Succeeded,
        "task {id} ended {} ({:?} {:?})",
        t.status,
        t.error_code,
        t.error_message
    );
    assert_eq!(
        t.attempts, 1,
        "task {id} ran once: it was not taken away and re-run"
    );
    let evs = farm.task_events(id).await?;
    let given_back: Vec<&str> = evs
        .iter()
        .map(|e| e.event_type.as_str())
        .filter(|k| matches!(*k, "TaskReleased" | "TaskRequeued" | "TaskFailed"))
        .collect();
    assert!(
        given_back.is_empty(),
        "task {id} was interrupted: {given_back:?}"
    );
    let done = evs
        .iter()
        .find(|e| e.event_type == "TaskSucceeded")
        .with_context(|| format!("no TaskSucceeded for {id}"))?;
    assert!(
        done.seq < before.seq,
        "{} (seq {}) came before task {id}'s TaskSucceeded (seq {}): it did not wait for the transcode",
        before.event_type,
        before.seq,
        done.seq
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_scaling_adds_nodes_then_drains_a_busy_one_before_removing_it() -> Result<()> {
    let Some(farm) = Farm::start("nodes", NODE_POLICIES, json!({"cpu": 95.0, "mem": 20.0})).await?
    else {
        return Ok(());
    };
    let f = &farm;

    // min = 1: the first node comes at once (a bound, not a judgement about load).
    let first = f
        .wait_event("WorkerNodeScaledUp", "the first node (below min)", |e| {
            data_u64(e, "from") == Some(0) && data_u64(e, "to") == Some(1)
        })
        .await?;
    let a = f.submit("a", two_renditions())?;
    let ta = f
        .wait_task(a, "task A running on the first node", |t| {
            t.status == TaskStatus::Running
        })
        .await?;
    let node_a = ta.node.clone().context("A runs on a node")?;
    assert_eq!(node_a, data_str(&first, "node"));

    // The node's one slot is taken, so B waits: a backlog, with CPU above cpu_high.
    let b = f.submit("b", one_rendition())?;
    let up = f
        .wait_event(
            "WorkerNodeScaledUp",
            "a second node (cpu high, backlog)",
            |e| data_u64(e, "from") == Some(1) && data_u64(e, "to") == Some(2),
        )
        .await?;
    assert!(first.seq < up.seq);
    assert!(
        up.data["avg_cpu"].as_f64().is_some_and(|c| c > 80.0),
        "{}",
        up.data
    );
    assert!(
        data_str(&up, "reason").starts_with("up:"),
        "scaled up by the cpu + backlog rule: {}",
        up.data
    );
    let node_b = data_str(&up, "node").to_string();
    assert_ne!(node_b, node_a);
    let tb = f
        .wait_task(b, "task B running on the new node", |t| {
            t.status == TaskStatus::Running && t.node.as_deref() == Some(node_b.as_str())
        })
        .await?;
    let procs = f.workers();
    assert!(
        procs
            .iter()
            .any(|c| c.contains(&format!("--node {node_b} "))),
        "the new node is a real worker process: {procs:?}"
    );
    let ta = f.task(a).await?;
    assert_eq!(
        ta.status,
        TaskStatus::Running,
        "A ended before B started: the clip is too short for this machine"
    );

    // Load drops below cpu_low on both nodes, and nothing waits: scale in. Both nodes run one
    // task, so the least busy is the one with the lower CPU: node B.
    f.write_load(&json!({
        "nodes": {
            node_a.as_str(): {"cpu": 20.0, "mem": 20.0},
            node_b.as_str(): {"cpu": 5.0, "mem": 20.0}
        },
        "default": {"cpu": 5.0, "mem": 20.0}
    }))?;
    // Node → tasks seen running on it while the scaler listed it as leaving (draining).
    let drained_busy: Arc<Mutex<HashMap<String, HashSet<TaskId>>>> = Arc::default();
    let down = wait_for(SETTLE, "WorkerNodeScaledDown", || {
        let seen = drained_busy.clone();
        async move {
            if let Some(st) = f.status().await {
                let leaving = strings(&st["node"]["last"]["leaving"]);
                // Read after the status: a task running now was running after the drain began.
                for id in [a, b] {
                    let Ok(t) = f.task(id).await else { continue };
                    if let (TaskStatus::Running, Some(n)) = (t.status, &t.node) {
                        if leaving.contains(n) {
                            if let Ok(mut s) = seen.lock() {
                                s.entry(n.clone()).or_default().insert(id);
                            }
                        }
                    }
                }
            }
            f.events("WorkerNodeScaledDown")
                .await
                .ok()?
                .into_iter()
                .next()
        }
    })
    .await
    .map_err(|e| f.fail(e))?;

    assert_eq!(
        (data_u64(&down, "from"), data_u64(&down, "to")),
        (Some(2), Some(1)),
        "{}",
        down.data
    );
    assert!(up.seq < down.seq);
    let victim = data_str(&down, "node").to_string();
    let seen = drained_busy.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        victim, node_b,
        "the least busy node goes (one task each, {node_b} has the lower CPU); drains seen: {seen:?}"
    );
    assert!(
        seen.get(&victim).is_some_and(|t| t.contains(&b)),
        "node {victim} was never seen draining while task B ran on it; seen: {seen:?}"
    );
    assert_eq!(tb.node.as_deref(), Some(victim.as_str()));
    // B finished, on its first attempt, before the node was removed.
    succeeded_before(f, b, &down).await?;
    // Removed for real: the node's worker process is gone by the time the event is out.
    let procs = f.workers();
    assert!(
        !procs
            .iter()
            .any(|c| c.contains(&format!("--node {victim} "))),
        "node {victim} still has a worker process: {procs:?}"
    );
    f.on_bus(&[&up, &down]).await?;

    // The node that stayed keeps working, and the scaler counts only it.
    let ta = f.settled(a).await?;
    assert_eq!(ta.status, TaskStatus::Succeeded, "{:?}", ta.error_message);
    let stayed = node_a.as_str();
    let counted = wait_for(SETTLE, "the scaler to count one node", || async move {
        let st = f.status().await?;
        let nodes: Vec<String> = st["node"]["last"]["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect();
        (nodes == [stayed]).then_some(())
    })
    .await;
    counted.map_err(|e| f.fail(e))?;
    let downs = f.events("WorkerNodeScaledDown").await?;
    assert_eq!(downs.len(), 1, "one scale-in, at min afterwards: {downs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_scaling_follows_node_thresholds_and_stops_a_container_after_its_task(
) -> Result<()> {
    let Some(farm) = Farm::start(
        "containers",
        CONTAINER_POLICIES,
        json!({"cpu": 95.0, "mem": 20.0}),
    )
    .await?
    else {
        return Ok(());
    };
    let f = &farm;
    let node_up = f
        .wait_event("WorkerNodeScaledUp", "the node", |e| {
            data_u64(e, "to") == Some(1)
        })
        .await?;
    let node = data_str(&node_up, "node").to_string();
    let node = node.as_str();
    let crossing = |direction: &'static str| {
        move |e: &StoredEvent| {
            data_str(e, "node") == node
                && data_str(e, "metric") == "cpu"
                && data_str(e, "direction") == direction
        }
    };

    // Hot from the start: one crossing above cpu_high.
    let hot = f
        .wait_event(
            THRESHOLD,
            "cpu above cpu_high on the node",
            crossing("above"),
        )
        .await?;
    assert_eq!(hot.data["threshold"].as_f64(), Some(80.0), "{}", hot.data);
    assert!(hot.data["value"].as_f64().is_some_and(|v| v > 80.0));

    let a = f.submit("a", two_renditions())?;
    let ta = f
        .wait_task(a, "task A running", |t| t.status == TaskStatus::Running)
        .await?;
    let member_a = ta.worker_id.clone().context("A has a worker")?;
    let b = f.submit("b", one_rendition())?;
    // A hot node with work waiting gets no container: it is overloaded (and at min, so none
    // is stopped either).
    let held = wait_for(
        SETTLE,
        "the hot node to hold with a backlog",
        || async move {
            let st = f.status().await?;
            let queued = st["node"]["last"]["inputs"]["queued"].as_u64()?;
            let reason = st["container"]["nodes"][node]["reason"].as_str()?;
            (queued >= 1 && reason.starts_with("overload")).then_some(())
        },
    )
    .await;
    held.map_err(|e| f.fail(e))?;
    assert!(f.events("ContainerScaledUp").await?.is_empty());

    // This node's own value falls below cpu_low (the default for other nodes stays hot):
    // headroom plus a backlog starts a second container, which takes B.
    f.write_load(&json!({
        "nodes": {node: {"cpu": 10.0, "mem": 20.0}},
        "default": {"cpu": 95.0, "mem": 20.0}
    }))?;
    let cool = f
        .wait_event(
            THRESHOLD,
            "cpu below cpu_low on the node",
            crossing("below"),
        )
        .await?;
    assert_eq!(cool.data["threshold"].as_f64(), Some(30.0), "{}", cool.data);
    let up = f
        .wait_event("ContainerScaledUp", "a second container", |e| {
            data_str(e, "node") == node
                && data_u64(e, "from") == Some(1)
                && data_u64(e, "to") == Some(2)
        })
        .await?;
    assert!(
        hot.seq < cool.seq && cool.seq < up.seq,
        "{hot:?} {cool:?} {up:?}"
    );
    let tb = f
        .wait_task(b, "task B running on the second container", |t| {
            t.status == TaskStatus::Running && t.worker_id.as_deref() != Some(member_a.as_str())
        })
        .await?;
    let member_b = tb.worker_id.clone().context("B has a worker")?;
    let procs = f.workers();
    assert!(
        procs
            .iter()
            .any(|c| c.contains(&format!("--id {member_b} "))),
        "the new container is a real worker process: {procs:?}"
    );
    let ta = f.task(a).await?;
    assert_eq!(
        ta.status,
        TaskStatus::Running,
        "A ended before B started: the clip is too short for this machine"
    );

    // Overload again, with two containers: one is stopped, after its current task.
    f.write_load(&json!({"nodes": {node: {"cpu": 95.0, "mem": 20.0}}, "default": {"cpu": 95.0, "mem": 20.0}}))?;
    // Worker → tasks seen running on it while a container scale-down was in progress.
    let stopping_busy: Arc<Mutex<HashMap<String, HashSet<TaskId>>>> = Arc::default();
    let down = wait_for(SETTLE, "ContainerScaledDown", || {
        let seen = stopping_busy.clone();
        async move {
            if let Some(st) = f.status().await {
                let in_progress = strings(&st["container"]["actions_in_progress"]);
                // Only a scale-down can be in progress once it has been decided: the scale-up
                // above had finished before this load was written, and the node is at max.
                let down_decided = st["recent"].as_array().is_some_and(|r| {
                    r.iter().any(|d| {
                        d["level"] == "container"
                            && d["node"] == node
                            && d["action"].as_str().is_some_and(|a| a.starts_with("Down"))
                    })
                });
                if down_decided && in_progress.iter().any(|n| n == node) {
                    for id in [a, b] {
                        let Ok(t) = f.task(id).await else { continue };
                        if let (TaskStatus::Running, Some(w)) = (t.status, &t.worker_id) {
                            if let Ok(mut s) = seen.lock() {
                                s.entry(w.clone()).or_default().insert(id);
                            }
                        }
                    }
                }
            }
            f.events("ContainerScaledDown")
                .await
                .ok()?
                .into_iter()
                .next()
        }
    })
    .await
    .map_err(|e| f.fail(e))?;

    assert_eq!(data_str(&down, "node"), node);
    assert_eq!(
        (data_u64(&down, "from"), data_u64(&down, "to")),
        (Some(2), Some(1)),
        "{}",
        down.data
    );
    let hot_again = f
        .events(THRESHOLD)
        .await?
        .into_iter()
        .find(|e| e.seq > up.seq && crossing("above")(e))
        .context("no second crossing above cpu_high")?;
    assert!(
        hot_again.seq < down.seq,
        "the crossing (seq {}) precedes the scale-down (seq {})",
        hot_again.seq,
        down.seq
    );
    let stopped = data_str(&down, "member").to_string();
    let seen = stopping_busy.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        stopped, member_b,
        "the container with the least work goes (one task each: the newest); seen: {seen:?}"
    );
    assert!(
        seen.get(&stopped).is_some_and(|t| t.contains(&b)),
        "container {stopped} was never seen stopping while task B ran on it; seen: {seen:?}"
    );
    // The stopped container finished B first, and its process is gone.
    succeeded_before(f, b, &down).await?;
    let procs = f.workers();
    assert!(
        !procs
            .iter()
            .any(|c| c.contains(&format!("--id {stopped} "))),
        "container {stopped} still runs: {procs:?}"
    );
    assert!(
        procs
            .iter()
            .any(|c| c.contains(&format!("--id {member_a} "))),
        "the other container stays: {procs:?}"
    );
    // Every crossing is about cpu: memory stayed at 20 %, below mem_high throughout.
    let crossings = f.events(THRESHOLD).await?;
    assert!(
        crossings.iter().all(|e| data_str(e, "metric") == "cpu"),
        "{crossings:?}"
    );
    f.on_bus(&[&cool, &up, &hot_again, &down]).await?;

    let ta = f.settled(a).await?;
    assert_eq!(ta.status, TaskStatus::Succeeded, "{:?}", ta.error_message);
    assert_eq!(f.events("ContainerScaledUp").await?.len(), 1);
    assert_eq!(f.events("ContainerScaledDown").await?.len(), 1);
    Ok(())
}
