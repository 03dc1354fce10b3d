//! Two scenarios of the worker's life outside the happy path of one task: a SIGTERM drain whose
//! deadline passes mid-transcode (the task goes back to the queue with `TaskReleased`, the
//! worker exits 0, and another worker finishes it), and `transcode dev --demo`, the README's
//! first command, run for real on ephemeral ports with `transcode submit --wait` against the
//! cluster it leaves up.

use std::process::Command;
use std::time::Duration;
use transcode_core::store;
use transcode_core::TaskStatus;
use transcode_e2e::{bin, ffprobe, make_clip, start_scaler, start_worker, task_events};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_deadline_gives_the_task_back_and_exits_zero() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let clip = dir.join("long.mp4");
    // Long enough that a one-second drain deadline always falls inside the transcode.
    make_clip(&clip, 30, 1280, 720, true)?;
    let scaler = start_scaler(&url, dir, &["--scan-interval-ms", "300"])?;
    let mut w1 = start_worker(
        "w1",
        &url,
        &scaler,
        &[],
        dir,
        &["--slots", "1", "--drain-timeout-seconds", "1"],
    )?;
    let db = store::open(&url, 1).await?;
    let spec: transcode_core::TaskSpec = serde_json::from_value(serde_json::json!({
        "source": format!("file://{}", clip.display()),
        "output": format!("file://{}/out/", dir.display()),
        "preset": "hd",
    }))?;
    let id = db.insert_task(&spec, &[]).await?.task.id;
    let puller = transcode_e2e::pulled_by(&db, id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", w1.log_tail()))?;
    assert_eq!(puller, "w1");

    w1.signal("TERM");
    let status = w1
        .wait(Duration::from_secs(60))
        .ok_or_else(|| anyhow::anyhow!("w1 did not exit after SIGTERM\n{}", w1.log_tail()))?;
    assert!(
        status.success(),
        "a drain exits 0: {status}\n{}",
        w1.log_tail()
    );

    let t = db.get_task(id).await?;
    assert_eq!(t.status, TaskStatus::Queued, "given back, not lost: {t:?}");
    let evs = task_events(&db, id).await;
    let released: Vec<_> = evs
        .iter()
        .filter(|e| e.event_type == "TaskReleased")
        .collect();
    assert_eq!(released.len(), 1, "{evs:?}");
    assert_eq!(released[0].data["worker"], "w1");
    assert!(
        !evs.iter().any(|e| e.event_type == "VideoTranscoded"),
        "the drain cut the transcode short, so the scenario tested what it meant to"
    );

    // Nothing of w1's attempt is left in its scratch folder.
    let scratch = dir.join("scratch-w1");
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch left behind: {left:?}");

    let w2 = start_worker("w2", &url, &scaler, &[], dir, &["--slots", "1"])?;
    let done = transcode_e2e::finished(&db, id, Duration::from_secs(180), "w2 to finish the task")
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", w2.log_tail()))?;
    assert_eq!(
        done.status,
        TaskStatus::Succeeded,
        "{:?}",
        done.error_message
    );
    assert_eq!(done.worker_id.as_deref(), Some("w2"));
    assert_eq!(done.attempts, 2);
    let (w, h, ms) = ffprobe(&dir.join("out").join("720p.mp4"))?;
    assert_eq!((w, h), (1280, 720));
    assert!((29_000..=31_000).contains(&ms), "duration {ms} ms");
    Ok(())
}

/// `transcode dev --demo` on a fresh folder, with every port ephemeral so it can run beside
/// other tests; then the same binaries serve `transcode submit --wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_transcodes_its_clip_and_submit_wait_follows_a_task() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("demo");
    let ephemeral = [
        ("TRANSCODE_SCALER_INTAKE", "tcp://127.0.0.1:0"),
        ("TRANSCODE_SCALER_DISPATCH", "tcp://127.0.0.1:0"),
        ("TRANSCODE_SCALER_EVENTS_PUB", "tcp://127.0.0.1:0"),
        ("TRANSCODE_SCALER_EVENTS_SUB", "tcp://127.0.0.1:0"),
        ("TRANSCODE_SCALER_HTTP", "127.0.0.1:0"),
    ];
    let out = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            Command::new(bin("transcode"))
                .args(["dev", "--demo", "--dir"])
                .arg(&dir)
                .envs(ephemeral)
                .output()
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The live event stream (stdout, before the summary), in the pipeline's order.
    let at = |name: &str| {
        stdout
            .find(name)
            .unwrap_or_else(|| panic!("{name} missing from the live stream:\n{stdout}"))
    };
    assert!(at("TaskReceived") < at("VideoFilePulled"));
    assert!(at("VideoFilePulled") < at("VideoTranscoded"));
    assert!(at("VideoTranscoded") < at("TranscodedVideoUploaded"));
    assert!(at("TranscodedVideoUploaded") < at("WorkloadProcessingFinished"));
    // The summary table: the 720p source keeps 720p, 480p and 360p and drops 1080p.
    assert!(at("WorkloadProcessingFinished") < at("succeeded: source 1280x720"));
    assert!(
        stdout.contains(&format!("{:<8} dropped", "1080p")),
        "{stdout}"
    );
    let outs: Vec<_> = std::fs::read_dir(dir.join("objects").join("out"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(outs.len(), 1, "{outs:?}");
    for (name, w, h) in [("720p", 1280, 720), ("480p", 854, 480), ("360p", 640, 360)] {
        let (fw, fh, ms) = ffprobe(&outs[0].join(format!("{name}.mp4")))?;
        assert_eq!((fw, fh), (w, h), "{name}");
        assert!((5_500..=6_500).contains(&ms), "{name}: {ms} ms");
        let row = format!("{name:<8} {:>10}", format!("{w}x{h}"));
        assert!(stdout.contains(&row), "{row:?} in\n{stdout}");
    }
    assert!(outs[0].join("manifest.json").exists());
    assert!(!outs[0].join("1080p.mp4").exists(), "never upscaled");

    // `submit --wait` against a scaler and worker on the demo's own database.
    let url = format!("sqlite://{}", dir.join("transcode.db").display());
    let logs = tmp.path();
    let scaler = start_scaler(&url, logs, &[])?;
    let _w = start_worker("w1", &url, &scaler, &[], logs, &[])?;
    let clip = dir.join("objects").join("in").join("demo.mp4");
    let out = tokio::task::spawn_blocking({
        let (intake, xpub) = (scaler.endpoint("intake"), scaler.endpoint("events_pub"));
        let (clip, url) = (clip.clone(), url.clone());
        let target = format!("file://{}/again/", tmp.path().display());
        move || {
            Command::new(bin("transcode"))
                .args(["--store", &url, "submit", "--wait", "--preset", "sd"])
                .arg("--source")
                .arg(format!("file://{}", clip.display()))
                .args(["--output", &target])
                .env("TRANSCODE_SCALER_INTAKE", intake)
                .env("TRANSCODE_SCALER_EVENTS_PUB", xpub)
                .output()
        }
    })
    .await??;
    assert!(
        out.status.success(),
        "submit --wait: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (w, h, _) = ffprobe(&tmp.path().join("again").join("480p.mp4"))?;
    assert_eq!((w, h), (854, 480));
    Ok(())
}
