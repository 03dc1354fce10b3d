//! Bad input gets a clear answer and nothing is lost: a missing source, a file that is not a
//! video, a second delivery of a claimed task, and a worker killed between claim and completion.
//! These run on the embedded defaults (SQLite and `file://` objects), the same code paths as
//! the real services, so they need no server.

use std::time::Duration;
use transcode_core::protocol::{self, DispatcherFrame, WorkerFrame};
use transcode_core::store::{self, Claimant, EventFilter, Store};
use transcode_core::{TaskSpec, TaskStatus};
use transcode_e2e::{make_clip, start_scaler, start_worker, wait_for};

fn spec(source: &str, out: &str) -> TaskSpec {
    serde_json::from_value(serde_json::json!({
        "source": source,
        "output": out,
        "renditions": [{"name": "small", "width": 320, "height": 180, "video_kbps": 300}],
    }))
    .expect("spec")
}

async fn settle(
    db: &std::sync::Arc<dyn Store>,
    id: transcode_core::TaskId,
    secs: u64,
) -> anyhow::Result<transcode_core::Task> {
    wait_for(Duration::from_secs(secs), "the task to settle", || {
        let db = db.clone();
        async move {
            let t = db.get_task(id).await.ok()?;
            (t.status.is_terminal() || t.status == TaskStatus::Escalated).then_some(t)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_source_and_non_video_fail_permanently() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let scaler = start_scaler(&url, dir, &["--scan-interval-ms", "300"])?;
    let worker = start_worker("w1", &url, &scaler, &[], dir, &[])?;
    let db = store::open(&url, 1).await?;

    let missing = db
        .insert_task(
            &spec(
                &format!("file://{}/nope.mp4", dir.display()),
                &format!("file://{}/out1/", dir.display()),
            ),
            &[],
        )
        .await?
        .task
        .id;
    let text = dir.join("notes.mp4");
    std::fs::write(&text, "this is a shopping list, not a video\n".repeat(200))?;
    let not_video = db
        .insert_task(
            &spec(
                &format!("file://{}", text.display()),
                &format!("file://{}/out2/", dir.display()),
            ),
            &[],
        )
        .await?
        .task
        .id;

    let t = settle(&db, missing, 60)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.error_code.as_deref(), Some("source_not_found"));
    assert!(
        t.error_message
            .as_deref()
            .unwrap_or("")
            .contains("source not found"),
        "{:?}",
        t.error_message
    );
    assert_eq!(t.attempts, 1, "a permanent failure is not retried");

    let t = settle(&db, not_video, 60)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Failed, "{:?}", t.error_message);
    let msg = t.error_message.clone().unwrap_or_default();
    assert!(
        !msg.is_empty() && t.error_code.is_some(),
        "carries a code and GStreamer's message: {t:?}"
    );
    // typefind's own words for a text file, carried through to the task row.
    assert!(
        msg.contains("text file"),
        "GStreamer's message is on the task: {msg}"
    );
    eprintln!("non-video input: {:?}: {msg}", t.error_code);
    // Both failures are logged as events, and nothing was written to the outputs.
    for id in [missing, not_video] {
        let evs = db
            .events(&EventFilter {
                task_id: Some(id),
                limit: 100,
                ..EventFilter::default()
            })
            .await?;
        assert!(evs.iter().any(|e| e.event_type == "TaskFailed"));
        assert!(!evs
            .iter()
            .any(|e| e.event_type == "TranscodedVideoUploaded"));
    }
    assert!(!dir.join("out2").join("small.mp4").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_fails_its_checksum_is_pulled_again_then_fails() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let scaler = start_scaler(&url, dir, &["--scan-interval-ms", "300"])?;
    let worker = start_worker("w1", &url, &scaler, &[], dir, &[])?;
    let db = store::open(&url, 1).await?;
    let clip = dir.join("clip.mp4");
    transcode_e2e::make_clip(&clip, 1, 320, 180, false)?;
    let out = std::process::Command::new("sha256sum")
        .arg(&clip)
        .output()?;
    let real = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(real.len(), 64, "sha256sum output: {out:?}");

    let mut good = spec(
        &format!("file://{}", clip.display()),
        &format!("file://{}/good/", dir.display()),
    );
    // Upper case is the same digest.
    good.source_sha256 = Some(real.to_ascii_uppercase());
    let mut bad = spec(
        &format!("file://{}", clip.display()),
        &format!("file://{}/bad/", dir.display()),
    );
    bad.source_sha256 = Some("0".repeat(64));
    let good = db.insert_task(&good, &[]).await?.task.id;
    let bad = db.insert_task(&bad, &[]).await?.task.id;

    let t = settle(&db, good, 60)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Succeeded, "{:?}", t.error_message);

    let t = settle(&db, bad, 60)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", worker.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Failed, "{:?}", t.error_message);
    assert_eq!(t.error_code.as_deref(), Some("source_checksum_mismatch"));
    let msg = t.error_message.unwrap_or_default();
    assert!(
        msg.contains(&real) && msg.contains(&"0".repeat(64)),
        "{msg}"
    );
    let evs = db
        .events(&EventFilter {
            task_id: Some(bad),
            limit: 100,
            ..EventFilter::default()
        })
        .await?;
    let retries: Vec<_> = evs
        .iter()
        .filter(|e| e.event_type == "ContainerErrorRetry")
        .collect();
    assert_eq!(retries.len(), 1, "one full retry of the pull, no more");
    assert_eq!(retries[0].data["class"], "checksum_mismatch");
    assert!(!evs.iter().any(|e| e.event_type == "VideoFilePulled"));
    assert!(
        !dir.join("bad").exists(),
        "nothing was written for the bad task"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_delivery_of_a_claimed_task_is_a_noop() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let db = store::open(&url, 1).await?;
    db.migrate().await?;
    // The test plays the dispatcher.
    let zctx = zmq::Context::new();
    let router = transcode_core::bus::socket(&zctx, zmq::ROUTER)?;
    let ep = transcode_core::bus::bind(&router, "tcp://127.0.0.1:0")?;
    let mut r = transcode_core::bus::spawn_loop(&zctx, router, "test-dispatch", 64)?;
    let worker = transcode_e2e::Proc::start(
        "w1",
        &transcode_e2e::bin("transcode-worker"),
        &[
            "--store".into(),
            url.clone(),
            "--dispatch".into(),
            ep.clone(),
            // Nobody listens for events here; the publisher connects lazily.
            "--events".into(),
            "tcp://127.0.0.1:1".into(),
            "--id".into(),
            "w1".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
        ],
        &[],
        dir,
    )?;
    let hello = tokio::time::timeout(Duration::from_secs(20), r.rx.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no hello"))?;
    let identity = hello[0].clone();
    assert!(matches!(
        protocol::parse_worker(&hello[1]),
        Ok(WorkerFrame::Hello { .. })
    ));

    let id = db
        .insert_task(&spec("file:///x/a.mp4", "file:///x/o/"), &[])
        .await?
        .task
        .id;
    let holder = Claimant {
        worker_id: "someone-else".into(),
        node: "n".into(),
    };
    let claimed = db.claim(id, &holder, Duration::from_secs(600), &[]).await?;
    r.send(vec![
        identity,
        protocol::encode(&DispatcherFrame::Task {
            task_id: id,
            attempt: 1,
        }),
    ]);
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = r.rx.recv().await {
            if let Ok(WorkerFrame::Done { task_id, outcome }) = protocol::parse_worker(&m[1]) {
                return Some((task_id, outcome));
            }
        }
        None
    })
    .await?;
    assert_eq!(
        outcome,
        Some((id, "duplicate".to_string())),
        "{}",
        worker.log_tail()
    );
    let t = db.get_task(id).await?;
    assert_eq!(
        (t.status, t.lease_token, t.worker_id.as_deref()),
        (
            TaskStatus::Running,
            claimed.lease_token,
            Some("someone-else")
        )
    );
    assert!(
        worker.log_tail().contains("second delivery"),
        "a log line says why"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_task_is_recovered_after_its_lease() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let clip = dir.join("long.mp4");
    make_clip(&clip, 12, 1280, 720, true)?;
    let scaler = start_scaler(
        &url,
        dir,
        &["--scan-interval-ms", "300", "--sweep-interval-ms", "500"],
    )?;
    let mut doomed = start_worker("doomed", &url, &scaler, &[], dir, &["--lease-seconds", "2"])?;
    let db = store::open(&url, 1).await?;
    let task_spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "source": format!("file://{}", clip.display()),
        "output": format!("file://{}/out/", dir.display()),
        "preset": "hd",
    }))?;
    let id = db.insert_task(&task_spec, &[]).await?.task.id;
    // Kill it once the transcode has started.
    transcode_e2e::pulled_by(&db, id).await?;
    doomed.signal("KILL");
    doomed.wait(Duration::from_secs(10));
    assert_eq!(
        db.get_task(id).await?.status,
        TaskStatus::Running,
        "killed mid-task"
    );
    let rescuer = start_worker(
        "rescuer",
        &url,
        &scaler,
        &[],
        dir,
        &["--lease-seconds", "10"],
    )?;
    let t = settle(&db, id, 180)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", scaler.log_tail(), rescuer.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Succeeded, "{:?}", t.error_message);
    assert_eq!(t.attempts, 2);
    assert_eq!(t.worker_id.as_deref(), Some("rescuer"));
    let kinds: Vec<String> = db
        .events(&EventFilter {
            task_id: Some(id),
            limit: 1000,
            ..EventFilter::default()
        })
        .await?
        .into_iter()
        .map(|e| e.event_type)
        .filter(|k| k != "TaskProgress")
        .collect();
    let requeued = kinds
        .iter()
        .position(|k| k == "TaskRequeued")
        .expect("a TaskRequeued event");
    assert!(kinds[..requeued].contains(&"TaskDetailsRetrieved".to_string()));
    assert_eq!(kinds.last().map(String::as_str), Some("TaskSucceeded"));
    assert_eq!(kinds.iter().filter(|k| *k == "TaskSucceeded").count(), 1);
    Ok(())
}
