//! Gossip under abuse (ARCHITECTURE §7, issue 5 scenarios 2 and 5), with real processes on the
//! PostgreSQL store and `file://` objects (read back here to hash them against the manifest):
//! - a **zombie**, a worker SIGSTOPped mid-task until gossip has the task requeued and
//!   finished elsewhere, then SIGCONTed, cannot change the task or its outputs;
//! - **chaos**, a random worker `kill -9`'d and restarted under the same id every few seconds
//!   while 30 short tasks run: every task succeeds exactly once and none is lost.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transcode_core::store::{self, EventFilter};
use transcode_core::{Store, TaskId, TaskSpec, TaskStatus};
use transcode_e2e::{make_clip, pg_database, start_scaler, start_worker, wait_for, Proc};

/// Leases this long prove that gossip, not the lease sweeper, recovered the zombie's task.
const LONG_LEASE: &str = "60";

async fn all_events(
    db: &Arc<dyn Store>,
) -> anyhow::Result<Vec<transcode_core::events::StoredEvent>> {
    Ok(db
        .events(&EventFilter {
            limit: 100_000,
            ..EventFilter::default()
        })
        .await?)
}

async fn workers_alive(db: &Arc<dyn Store>, ids: &[&str]) -> Option<()> {
    let m = db.members().await.ok()?;
    ids.iter()
        .all(|id| {
            m.iter()
                .any(|m| m.id == *id && m.role == "worker" && m.state == "alive")
        })
        .then_some(())
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    anyhow::ensure!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(out.stdout)?;
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("sha256sum printed nothing"))
}

fn file_path(url: &str) -> anyhow::Result<&Path> {
    url.strip_prefix("file://")
        .map(Path::new)
        .ok_or_else(|| anyhow::anyhow!("not a file:// url: {url}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_worker_cannot_touch_its_requeued_task() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let Some(url) = pg_database("gossipchaos") else {
        return Ok(());
    };
    let clip = dir.join("long.mp4");
    make_clip(&clip, 10, 1280, 720, true)?;
    let scaler = start_scaler(&url, dir, &["--scan-interval-ms", "300"])?;
    let join = scaler.endpoint("gossip");
    let mut workers = Vec::new();
    for name in ["z1", "z2"] {
        workers.push(start_worker(
            name,
            &url,
            &scaler,
            &[],
            dir,
            &["--lease-seconds", LONG_LEASE, "--gossip-join", &join],
        )?);
    }
    let db = store::open(&url, 1).await?;
    wait_for(
        Duration::from_secs(30),
        "both workers alive in gossip",
        || {
            let db = db.clone();
            async move { workers_alive(&db, &["z1", "z2"]).await }
        },
    )
    .await?;
    let out_dir = dir.join("out");
    let spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "source": format!("file://{}", clip.display()),
        "output": format!("file://{}/", out_dir.display()),
        "renditions": [
            {"name": "360p", "width": 640, "height": 360, "video_kbps": 800},
            {"name": "180p", "width": 320, "height": 180, "video_kbps": 300},
        ],
    }))?;
    let id = db.insert_task(&spec, &[]).await?.task.id;
    let zombie_id = transcode_e2e::pulled_by(&db, id).await?;
    let zombie = workers
        .iter()
        .find(|w| w.name == zombie_id)
        .ok_or_else(|| anyhow::anyhow!("no worker named {zombie_id}"))?;
    zombie.signal("STOP");
    let paused = db.get_task(id).await?;
    assert_eq!(paused.status, TaskStatus::Running, "paused mid-task");
    let zombie_token = paused.lease_token;

    let done = transcode_e2e::finished(
        &db,
        id,
        Duration::from_secs(90),
        "the task to succeed on the other worker",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;
    assert_eq!(
        done.status,
        TaskStatus::Succeeded,
        "{:?}",
        done.error_message
    );
    assert_ne!(done.worker_id.as_deref(), Some(zombie_id.as_str()));
    assert!(done.lease_token > zombie_token);
    let manifest_path = out_dir.join("manifest.json");
    let before = std::fs::read(&manifest_path)?;

    // Wake the zombie and give it time to try its writes: it must find its token stale.
    zombie.signal("CONT");
    wait_for(
        Duration::from_secs(30),
        "the zombie to log that its lease token is stale",
        || {
            let log = zombie.log_tail();
            async move { log.contains("stale").then_some(()) }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", zombie.log_tail()))?;
    // A few more seconds for anything it might still write (a bounded pause, not a timing
    // assertion: the checks below hold however long it takes).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let all = all_events(&db).await?;
    let succeeded = all
        .iter()
        .filter(|e| e.task_id == Some(id) && e.event_type == "TaskSucceeded")
        .count();
    assert_eq!(succeeded, 1, "exactly one success");
    let requeued = all
        .iter()
        .find(|e| e.task_id == Some(id) && e.event_type == "TaskRequeued")
        .ok_or_else(|| anyhow::anyhow!("no TaskRequeued"))?;
    assert_eq!(
        requeued.data["reason"], "worker failed (gossip)",
        "gossip recovered it, not the sweeper"
    );
    let zombie_writes: Vec<_> = all
        .iter()
        .filter(|e| e.task_id == Some(id) && e.seq > requeued.seq && e.source == zombie_id)
        .map(|e| e.event_type.as_str())
        .collect();
    assert!(
        zombie_writes.is_empty(),
        "the zombie's writes after the requeue were refused: {zombie_writes:?}"
    );
    let t = db.get_task(id).await?;
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(
        t.lease_token, done.lease_token,
        "the zombie did not move the task"
    );

    // The outputs are the winner's, whole: every file matches the manifest's sha256.
    let after = std::fs::read(&manifest_path)?;
    assert_eq!(before, after, "the zombie did not rewrite the manifest");
    let manifest: transcode_core::manifest::Manifest = serde_json::from_slice(&after)?;
    assert_eq!(
        manifest.lease_token, done.lease_token,
        "the winner's manifest"
    );
    assert_eq!(Some(manifest.worker.as_str()), done.worker_id.as_deref());
    assert_eq!(manifest.outputs.len(), 2, "{manifest:?}");
    for o in &manifest.outputs {
        let p = file_path(&o.url)?;
        assert_eq!(sha256_of(p)?, o.sha256, "{} intact", o.name);
        assert_eq!(std::fs::metadata(p)?.len(), o.bytes, "{} size", o.name);
    }
    eprintln!(
        "zombie {zombie_id} (token {zombie_token}) fenced; {} won with token {}",
        manifest.worker, manifest.lease_token
    );
    Ok(())
}

/// A cheap random number without a dependency: v4 UUIDs come from the OS generator.
fn random_below(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n as u128) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_same_id_restarts_lose_no_task() -> anyhow::Result<()> {
    const TASKS: usize = 30;
    const IDS: [&str; 3] = ["c1", "c2", "c3"];
    /// Chaos stops at this point even if tasks remain; the rest must then finish unharmed.
    const CHAOS_FOR: Duration = Duration::from_secs(25);
    const KILL_EVERY: Duration = Duration::from_secs(3);
    const SUBMIT_EVERY: Duration = Duration::from_millis(600);
    let started = Instant::now();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let Some(url) = pg_database("gossipchaos") else {
        return Ok(());
    };
    let clip = dir.join("tiny.mp4");
    make_clip(&clip, 3, 160, 90, false)?;
    let scaler = start_scaler(&url, dir, &["--scan-interval-ms", "300"])?;
    let join = scaler.endpoint("gossip");
    // A lease short enough that the sweeper backstop finishes anything gossip does not see
    // within the test's bounds (a restart can beat gossip's detection).
    // Each id keeps its gossip port across restarts, as a worker with a fixed
    // `membership.bind` does: the restart then refutes its old incarnation at the same
    // address. (At a new address memberlist would refuse the name until a state sync long
    // after the old one is dead; docs/gossip.md.)
    let ports: HashMap<&str, String> = IDS
        .iter()
        .zip(transcode_e2e::free_ports(IDS.len())?)
        .map(|(id, p)| (*id, format!("127.0.0.1:{p}")))
        .collect();
    let start = |name: &str| {
        let bind = ports.get(name).map(String::as_str).unwrap_or("127.0.0.1:0");
        let args = [
            "--lease-seconds",
            "10",
            "--gossip-join",
            join.as_str(),
            "--gossip-bind",
            bind,
        ];
        start_worker(name, &url, &scaler, &[], dir, &args)
    };
    let mut workers: Vec<Proc> = IDS.iter().map(|n| start(n)).collect::<Result<_, _>>()?;
    let db = store::open(&url, 1).await?;
    wait_for(
        Duration::from_secs(30),
        "all workers alive in gossip",
        || {
            let db = db.clone();
            async move { workers_alive(&db, &IDS).await }
        },
    )
    .await?;

    // Tasks arrive as a stream over most of the chaos window, so that kills land while
    // work is running rather than after a burst has already drained.
    let submit = {
        let (db, clip, out) = (db.clone(), clip.clone(), dir.join("out"));
        tokio::spawn(async move {
            let mut ids: Vec<TaskId> = Vec::new();
            for n in 0..TASKS {
                let spec: TaskSpec = serde_json::from_value(serde_json::json!({
                    "source": format!("file://{}", clip.display()),
                    "output": format!("file://{}/{n}/", out.display()),
                    "renditions": [{"name": "tiny", "width": 128, "height": 72, "video_kbps": 100}],
                    // Chaos may hit one task several times; that must not fail it.
                    "max_attempts": 20,
                }))?;
                ids.push(db.insert_task(&spec, &[]).await?.task.id);
                tokio::time::sleep(SUBMIT_EVERY).await;
            }
            Ok::<_, anyhow::Error>(ids)
        })
    };

    let all_terminal = |db: Arc<dyn Store>, ids: Vec<TaskId>| async move {
        for id in &ids {
            if !db.get_task(*id).await.ok()?.status.is_terminal() {
                return None;
            }
        }
        Some(())
    };
    let mut kills = 0;
    let chaos_end = Instant::now() + CHAOS_FOR;
    while Instant::now() < chaos_end {
        tokio::time::sleep(KILL_EVERY).await;
        if submit.is_finished() {
            break;
        }
        let i = random_below(workers.len());
        let name = workers[i].name.clone();
        workers[i].signal("KILL");
        workers[i].wait(Duration::from_secs(10));
        kills += 1;
        // Same id: the dispatcher must take the HELLO and gossip must take the rejoin.
        workers[i] = start(&name)?;
    }
    let chaos_done = started.elapsed();
    let ids = submit.await??;
    assert!(
        kills >= 3,
        "chaos must actually kill workers ({kills} kills)"
    );

    wait_for(Duration::from_secs(60), "every task to finish", || {
        all_terminal(db.clone(), ids.clone())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;

    let all = all_events(&db).await?;
    let mut successes: HashMap<TaskId, usize> = HashMap::new();
    let mut requeues: HashMap<String, usize> = HashMap::new();
    for e in &all {
        match (e.event_type.as_str(), e.task_id) {
            ("TaskSucceeded", Some(t)) => *successes.entry(t).or_default() += 1,
            ("TaskRequeued", Some(_)) => {
                let reason = e.data["reason"].as_str().unwrap_or("?").to_string();
                *requeues.entry(reason).or_default() += 1;
            }
            _ => {}
        }
    }
    let detections = all
        .iter()
        .filter(|e| e.event_type == "ContainerFailureDetected")
        .count();
    for id in &ids {
        let t = db.get_task(*id).await?;
        assert_eq!(
            t.status,
            TaskStatus::Succeeded,
            "task {id}: {:?} {:?}",
            t.error_code,
            t.error_message
        );
        assert_eq!(
            successes.get(id),
            Some(&1),
            "task {id} succeeded exactly once"
        );
    }
    assert_eq!(successes.len(), TASKS, "no success for an unknown task");

    // The restarted workers are members again and still running: a late failure notice
    // about an old incarnation must not drain the new one.
    wait_for(
        Duration::from_secs(60),
        "every restarted worker alive in gossip",
        || {
            let db = db.clone();
            async move { workers_alive(&db, &IDS).await }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;
    for w in &mut workers {
        assert!(
            w.child.try_wait()?.is_none(),
            "{} exited after its restart:\n{}",
            w.name,
            w.log_tail()
        );
    }
    eprintln!(
        "chaos: {TASKS} tasks, {kills} kills in {:.1}s, {detections} gossip detections, \
         requeues by reason {requeues:?}, all succeeded once in {:.1}s",
        chaos_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
