//! Gossip failure detection and recovery (ARCHITECTURE §7), with real processes: a worker
//! `kill -9`'d mid-transcode (PostgreSQL store, S3 objects) is detected by gossip and its task
//! finishes elsewhere long before its lease would run out, and a member with the wrong
//! encryption key cannot join and says why (embedded defaults: gossip is all it exercises).

use std::time::Duration;
use transcode_core::store::{self, EventFilter};
use transcode_core::url::ObjectUrl;
use transcode_core::{TaskSpec, TaskStatus};
use transcode_e2e::{make_clip, pg_database, s3, s3_objects, start_scaler, start_worker, wait_for};

/// Leases this long prove that gossip, not the lease sweeper, recovered the task.
const LONG_LEASE: &str = "60";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_transcode_is_detected_by_gossip_and_recovered() -> anyhow::Result<()> {
    let (Some(url), Some((bucket, s3env))) = (pg_database("gossipkill"), s3()) else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let clip = dir.join("long.mp4");
    make_clip(&clip, 12, 1280, 720, true)?;
    let prefix = format!("e2e-gossip-{}", uuid::Uuid::new_v4().simple());
    let source = ObjectUrl::parse(&format!("s3://{bucket}/{prefix}/in/long.mp4"))?;
    let objects = s3_objects(&s3env);
    objects.put_file(&clip, &source).await?;
    let scaler = start_scaler(&url, dir, &["--scan-interval-ms", "300"])?;
    let join = scaler.endpoint("gossip");
    assert!(!join.is_empty(), "the scaler reports its gossip address");
    let mut workers = Vec::new();
    for name in ["w1", "w2", "w3"] {
        workers.push(start_worker(
            name,
            &url,
            &scaler,
            &s3env,
            dir,
            &["--lease-seconds", LONG_LEASE, "--gossip-join", &join],
        )?);
    }
    let db = store::open(&url, 1).await?;
    wait_for(
        Duration::from_secs(30),
        "all workers in the members table",
        || {
            let db = db.clone();
            async move {
                let m = db.members().await.ok()?;
                let alive = m
                    .iter()
                    .filter(|m| m.role == "worker" && m.state == "alive")
                    .count();
                (alive == 3).then_some(())
            }
        },
    )
    .await?;
    let task_spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "source": source.to_string(),
        "output": format!("s3://{bucket}/{prefix}/out/"),
        "preset": "hd",
    }))?;
    let id = db.insert_task(&task_spec, &[]).await?.task.id;
    let victim = transcode_e2e::pulled_by(&db, id).await?;
    let doomed = workers
        .iter_mut()
        .find(|w| w.name == victim)
        .ok_or_else(|| anyhow::anyhow!("no worker named {victim}"))?;
    doomed.signal("KILL");
    doomed.wait(Duration::from_secs(10));
    assert_eq!(
        db.get_task(id).await?.status,
        TaskStatus::Running,
        "killed mid-task"
    );

    let t = transcode_e2e::finished(
        &db,
        id,
        Duration::from_secs(120),
        "the task to succeed elsewhere",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Succeeded, "{:?}", t.error_message);
    assert_eq!(t.attempts, 2);
    assert_ne!(t.worker_id.as_deref(), Some(victim.as_str()));

    // The story, in store order: detection names the worker and the task, then the requeue,
    // then the other worker's run to a single success.
    let all = db
        .events(&EventFilter {
            limit: 10_000,
            ..EventFilter::default()
        })
        .await?;
    let detected: Vec<_> = all
        .iter()
        .filter(|e| e.event_type == "ContainerFailureDetected")
        .collect();
    assert_eq!(detected.len(), 1, "{detected:?}");
    let d = detected[0];
    assert_eq!(d.data["member"], victim.as_str());
    assert_eq!(d.data["task_ids"], serde_json::json!([id]));
    let story: Vec<&str> = all
        .iter()
        .filter(|e| e.seq >= d.seq && (e.task_id == Some(id) || e.seq == d.seq))
        .map(|e| e.event_type.as_str())
        .filter(|k| *k != "TaskProgress")
        .collect();
    assert_eq!(
        story.first(),
        Some(&"ContainerFailureDetected"),
        "{story:?}"
    );
    assert_eq!(story.get(1), Some(&"TaskRequeued"), "{story:?}");
    assert_eq!(story.last(), Some(&"TaskSucceeded"), "{story:?}");
    assert_eq!(story.iter().filter(|k| **k == "TaskSucceeded").count(), 1);
    let requeued = all
        .iter()
        .find(|e| e.event_type == "TaskRequeued" && e.task_id == Some(id))
        .ok_or_else(|| anyhow::anyhow!("no TaskRequeued"))?;
    assert_eq!(
        requeued.data["reason"], "worker failed (gossip)",
        "gossip recovered it, not the sweeper"
    );
    // The victim's row says failed; the alert was logged.
    let members = db.members().await?;
    let row = members
        .iter()
        .find(|m| m.id == victim)
        .ok_or_else(|| anyhow::anyhow!("no member row"))?;
    assert_eq!(row.state, "failed");
    assert!(scaler.log_tail().contains("ALERT"), "{}", scaler.log_tail());
    assert!(
        all.iter().any(|e| e.event_type == "HeartbeatReceived"),
        "heartbeats reach the store (at most one per member per interval)"
    );
    // The recovered attempt's outputs are in S3, as its manifest says.
    let manifest = ObjectUrl::parse(&format!("s3://{bucket}/{prefix}/out/manifest.json"))?;
    let m: serde_json::Value =
        serde_json::from_slice(&objects.get_bytes(&manifest, 1 << 20).await?)?;
    assert_eq!(m["task_id"], serde_json::json!(id));
    for o in m["outputs"].as_array().into_iter().flatten() {
        let url = ObjectUrl::parse(o["url"].as_str().unwrap_or_default())?;
        let head = objects.head(&url).await?;
        assert_eq!(head.map(|h| h.size), o["bytes"].as_u64(), "{url}");
    }
    eprintln!(
        "detected {} failure, requeued, succeeded on {:?} (attempt {})",
        victim, t.worker_id, t.attempts
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_encryption_key_cannot_join_and_says_so() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let good = "T9jncgl9mbLus+baTTa7q7nPSUrXwbDi2dhbtqir37s=";
    let bad = "q1pVPNTMvYjAgXbz6OURt5/F2Y5M6PYk2XwLk1D9A3M=";
    // The scaler reads its key from the environment, as an operator's unit file would set it.
    let scaler = transcode_e2e::Proc::start(
        "scaler",
        &transcode_e2e::bin("transcode-scaler"),
        &[
            "--store",
            &url,
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
        .map(String::from),
        &[("TRANSCODE_MEMBERSHIP_ENCRYPT_KEY".into(), good.into())],
        dir,
    )?;
    let join = scaler.endpoint("gossip");
    let key = |k: &str| {
        vec![(
            "TRANSCODE_MEMBERSHIP_ENCRYPT_KEY".to_string(),
            k.to_string(),
        )]
    };
    let ok = start_worker(
        "good",
        &url,
        &scaler,
        &key(good),
        dir,
        &["--gossip-join", &join],
    )?;
    let intruder = start_worker(
        "intruder",
        &url,
        &scaler,
        &key(bad),
        dir,
        &["--gossip-join", &join],
    )?;
    let db = store::open(&url, 1).await?;
    wait_for(Duration::from_secs(30), "the good worker to join", || {
        let db = db.clone();
        async move {
            let m = db.members().await.ok()?;
            m.iter()
                .any(|m| m.id == "good" && m.state == "alive")
                .then_some(())
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", ok.log_tail()))?;
    wait_for(
        Duration::from_secs(30),
        "the intruder to say why it cannot join",
        || {
            let log = intruder.log_tail();
            async move { log.contains("encryption key does not match").then_some(()) }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", intruder.log_tail()))?;
    // Give gossip a few rounds, then check it never got in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = db.members().await?;
    assert!(!m.iter().any(|m| m.id == "intruder"), "{m:?}");
    Ok(())
}
