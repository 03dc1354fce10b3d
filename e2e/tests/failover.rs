//! Scaler failover (ARCHITECTURE §8, issue 7 scenario 4), with real processes on the test
//! PostgreSQL: two `transcode-scaler`s share one store, so the advisory lock makes one lead
//! and the other stand by, binding nothing. Both are given the same fixed intake, dispatch and
//! bus endpoints, so the workers' ZeroMQ sockets reconnect to whichever one binds them, and
//! each other's worker gossip addresses to join. The leader is `kill -9`'d while tasks run and
//! more are submitted while no scaler leads: the standby must take over, see the workers
//! through gossip, and every task must succeed exactly once.
//!
//! PostgreSQL is required (the leader lock under test is its advisory lock); objects are
//! `file://` in the test's temporary directory, since S3 plays no part in the failover.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transcode_core::store::{self, EventFilter};
use transcode_core::{Store, TaskId, TaskSpec, TaskStatus};
use transcode_e2e::{bin, free_ports, make_clip, pg_database, wait_for, Proc};

/// Starts `bin` without waiting for its endpoints line (a standby prints it only once it
/// leads). The line, when it comes, arrives on the returned channel.
fn spawn_quiet(
    name: &str,
    bin: &Path,
    args: &[String],
    logs: &Path,
) -> anyhow::Result<(Proc, mpsc::Receiver<String>)> {
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log)?;
    let mut child = Command::new(bin)
        .args(args)
        .env("TRANSCODE_LOG", "info,transcode=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        for _ in lines {}
    });
    let proc = Proc {
        name: name.to_string(),
        child,
        info: serde_json::Value::Null,
        log,
    };
    Ok((proc, rx))
}

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

async fn statuses(db: &Arc<dyn Store>, ids: &[TaskId]) -> Option<HashMap<TaskStatus, usize>> {
    let mut by = HashMap::new();
    for id in ids {
        *by.entry(db.get_task(*id).await.ok()?.status).or_insert(0) += 1;
    }
    Some(by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_scaler_takes_over_and_no_task_is_lost() -> anyhow::Result<()> {
    const WORKERS: [&str; 3] = ["fw1", "fw2", "fw3"];
    /// Submitted while the first scaler leads.
    const BEFORE: usize = 8;
    /// Submitted straight into the store after the kill, while no scaler leads yet.
    const DURING: usize = 4;
    let Some(pg) = pg_database("failover") else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let clip = dir.join("clip.mp4");
    make_clip(&clip, 4, 320, 240, false)?;

    // intake, dispatch, events_pub, events_sub (shared), http ×2, scaler gossip ×2, workers'.
    let p = free_ports(8 + WORKERS.len())?;
    let ep = |port: u16| format!("tcp://127.0.0.1:{port}");
    let (intake, dispatch, events_pub, events_sub) = (ep(p[0]), ep(p[1]), ep(p[2]), ep(p[3]));
    let scaler_gossip = [format!("127.0.0.1:{}", p[6]), format!("127.0.0.1:{}", p[7])];
    let worker_gossip: Vec<String> = p[8..].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let scaler_args = |id: &str, http: u16, gossip: &str| -> Vec<String> {
        [
            "--store",
            &pg,
            "--migrate",
            "--intake",
            &intake,
            "--dispatch",
            &dispatch,
            "--events-pub",
            &events_pub,
            "--events-sub",
            &events_sub,
            "--http",
            &format!("127.0.0.1:{http}"),
            "--id",
            id,
            "--scan-interval-ms",
            "300",
            "--gossip-bind",
            gossip,
            // A scaler that takes over joins the workers: the old leader's address is dead.
            "--gossip-join",
            &worker_gossip.join(","),
        ]
        .map(String::from)
        .to_vec()
    };
    let scaler_bin = bin("transcode-scaler");
    let mut leader = Proc::start(
        "scaler-a",
        &scaler_bin,
        &scaler_args("scaler-a", p[4], &scaler_gossip[0]),
        &[],
        dir,
    )?;
    assert_eq!(leader.endpoint("dispatch"), dispatch, "the fixed endpoint");
    let (mut standby, standby_line) = spawn_quiet(
        "scaler-b",
        &scaler_bin,
        &scaler_args("scaler-b", p[5], &scaler_gossip[1]),
        dir,
    )?;
    wait_for(Duration::from_secs(30), "scaler-b to stand by", || {
        let log = standby.log_tail();
        async move { log.contains("standby").then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.log_tail()))?;
    assert!(
        standby_line.try_recv().is_err(),
        "a standby binds nothing and prints no endpoints while the leader lives"
    );

    let mut workers = Vec::new();
    for (name, gossip) in WORKERS.iter().zip(&worker_gossip) {
        let scratch = dir.join(format!("scratch-{name}"));
        let args: Vec<String> = [
            "--store",
            &pg,
            "--dispatch",
            &dispatch,
            "--events",
            &events_sub,
            "--id",
            name,
            "--scratch-dir",
            &scratch.display().to_string(),
            "--http",
            "127.0.0.1:0",
            "--slots",
            "1",
            "--lease-seconds",
            "10",
            "--gossip-bind",
            gossip,
            "--gossip-join",
            &scaler_gossip.join(","),
        ]
        .map(String::from)
        .to_vec();
        workers.push(Proc::start(
            name,
            &bin("transcode-worker"),
            &args,
            &[],
            dir,
        )?);
    }
    let db = store::open(&pg, 2).await?;
    wait_for(
        Duration::from_secs(30),
        "all workers alive in gossip",
        || {
            let db = db.clone();
            async move {
                let m = db.members().await.ok()?;
                WORKERS
                    .iter()
                    .all(|w| m.iter().any(|m| m.id == *w && m.state == "alive"))
                    .then_some(())
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", leader.log_tail()))?;

    let spec = |n: usize| -> anyhow::Result<TaskSpec> {
        Ok(serde_json::from_value(serde_json::json!({
            "source": format!("file://{}", clip.display()),
            "output": format!("file://{}/out/{n}/", dir.display()),
            "renditions": [{"name": "small", "width": 160, "height": 120, "video_kbps": 200}],
        }))?)
    };
    let mut ids = Vec::new();
    for n in 0..BEFORE {
        ids.push(db.insert_task(&spec(n)?, &[]).await?.task.id);
    }
    // Mid-way: some work done, some running, some still queued.
    let at_kill = wait_for(
        Duration::from_secs(120),
        "a task done and another running",
        || {
            let (db, ids) = (db.clone(), ids.clone());
            async move {
                let by = statuses(&db, &ids).await?;
                let done = by.get(&TaskStatus::Succeeded).copied().unwrap_or(0);
                let running = by.get(&TaskStatus::Running).copied().unwrap_or(0);
                (done >= 1 && running >= 1 && done < BEFORE).then_some(by)
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", leader.log_tail()))?;
    leader.signal("KILL");
    assert!(
        leader.wait(Duration::from_secs(10)).is_some(),
        "the leader died"
    );
    let killed = Instant::now();
    for n in BEFORE..BEFORE + DURING {
        ids.push(db.insert_task(&spec(n)?, &[]).await?.task.id);
    }

    // Takeover: the standby wins the lock and binds the same endpoints.
    let line = wait_for(Duration::from_secs(60), "the standby to take over", || {
        let got = standby_line.try_recv().ok();
        async move { got }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.log_tail()))?;
    let takeover = killed.elapsed();
    standby.info = serde_json::from_str(&line)?;
    assert_eq!(standby.endpoint("dispatch"), dispatch);
    assert_eq!(standby.endpoint("events_sub"), events_sub);
    assert!(standby.log_tail().contains("this scaler leads"));

    // The new leader sees every worker through gossip: its own heartbeat rows name them.
    wait_for(
        Duration::from_secs(60),
        "the new leader to hear every worker's heartbeat",
        || {
            let db = db.clone();
            async move {
                let all = all_events(&db).await.ok()?;
                WORKERS
                    .iter()
                    .all(|w| {
                        all.iter().any(|e| {
                            e.event_type == "HeartbeatReceived"
                                && e.source == "scaler-b"
                                && e.data["member"] == *w
                        })
                    })
                    .then_some(())
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", standby.log_tail()))?;

    // The tasks submitted while no scaler led can only have been dispatched by the new
    // leader, to workers whose sockets reconnected to it by themselves.
    wait_for(Duration::from_secs(180), "every task to finish", || {
        let (db, ids) = (db.clone(), ids.clone());
        async move {
            let by = statuses(&db, &ids).await?;
            by.keys().all(|s| s.is_terminal()).then_some(())
        }
    })
    .await
    .map_err(|e| {
        let w: Vec<String> = workers.iter().map(|w| w.log_tail()).collect();
        anyhow::anyhow!("{e}\n{}\n{}", standby.log_tail(), w.join("\n---\n"))
    })?;

    let all = all_events(&db).await?;
    let mut successes: HashMap<TaskId, usize> = HashMap::new();
    for e in &all {
        if let ("TaskSucceeded", Some(t)) = (e.event_type.as_str(), e.task_id) {
            *successes.entry(t).or_default() += 1;
        }
    }
    let mut by_worker: HashMap<String, usize> = HashMap::new();
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
        *by_worker
            .entry(t.worker_id.unwrap_or_default())
            .or_default() += 1;
    }
    assert_eq!(successes.len(), ids.len(), "no success for an unknown task");
    for w in &mut workers {
        assert!(
            w.child.try_wait()?.is_none(),
            "{} exited:\n{}",
            w.name,
            w.log_tail()
        );
    }
    assert!(
        standby.child.try_wait()?.is_none(),
        "the new leader runs on"
    );
    eprintln!(
        "failover: killed the leader with {at_kill:?}; the standby led after {:.1}s; \
         {} tasks succeeded once each, by worker {by_worker:?}",
        takeover.as_secs_f64(),
        ids.len()
    );
    Ok(())
}
