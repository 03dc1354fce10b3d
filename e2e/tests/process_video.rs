//! Scenario: "a client request to process a video", for real. A scaler and two workers run as
//! processes against the test PostgreSQL and the SeaweedFS S3 server; six tasks arrive, three
//! from the pyzmq publisher example and three from the `transcode` CLI. Every task must
//! succeed, its renditions must be in S3 with the right sizes and durations, its events must be
//! in PostgreSQL in causal order, and the same events must have reached a bus subscriber.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transcode_core::store::{self, EventFilter};
use transcode_core::url::ObjectUrl;
use transcode_core::{TaskId, TaskStatus};
use transcode_e2e::{
    bin, ffprobe, make_clip, pg_database, s3, s3_objects, start_scaler, start_worker, wait_for,
};

// Every task here asks for two renditions, so two `RenditionUploaded` records precede the
// upload event that closes the step.
const CAUSAL: [&str; 11] = [
    "TaskQueued",
    "TaskReceived",
    "TaskDetailsRetrieved",
    "WorkloadProcessingStarted",
    "VideoFilePulled",
    "VideoTranscoded",
    "RenditionUploaded",
    "RenditionUploaded",
    "TranscodedVideoUploaded",
    "WorkloadProcessingFinished",
    "TaskSucceeded",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_videos_through_scaler_and_two_workers() -> anyhow::Result<()> {
    let (Some(pg), Some((bucket, s3env))) = (pg_database("pipeline"), s3()) else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let logs = tmp.path();
    // Two sources: one with audio, one without (video-only outputs).
    let prefix = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    let objects = s3_objects(&s3env);
    let mut sources = Vec::new();
    for (name, audio) in [("tone", true), ("silent", false)] {
        let local = logs.join(format!("{name}.mp4"));
        make_clip(&local, 2, 640, 360, audio)?;
        let url = ObjectUrl::parse(&format!("s3://{bucket}/{prefix}/in/{name}.mp4"))?;
        objects.put_file(&local, &url).await?;
        sources.push(url.to_string());
    }

    let scaler = start_scaler(&pg, logs, &["--scan-interval-ms", "500"])?;
    let w1 = start_worker("w1", &pg, &scaler, &s3env, logs, &["--slots", "2"])?;
    let w2 = start_worker("w2", &pg, &scaler, &s3env, logs, &["--slots", "2"])?;

    // Subscribe before anything is submitted; PUB/SUB joins need a moment to propagate.
    let zctx = zmq::Context::new();
    let mut sub = transcode_core::bus::subscriber(&zctx, &scaler.endpoint("events_pub"), &[])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.rx.recv().await {
                if let Some(ev) = msg
                    .get(1)
                    .and_then(|b| serde_json::from_slice::<transcode_core::Event>(b).ok())
                {
                    if let Ok(mut s) = seen.lock() {
                        s.insert(ev.id.to_string());
                    }
                }
            }
        })
    };

    let renditions = "[{\"name\":\"small\",\"width\":320,\"height\":180,\"video_kbps\":400},{\"name\":\"tiny\",\"width\":256,\"height\":144,\"video_kbps\":200,\"audio_kbps\":64}]";
    let mut ids: Vec<TaskId> = Vec::new();
    let venv_py = std::env::var("TRANSCODE_TEST_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/publisher.py");
    for i in 0..3 {
        let source = &sources[i % 2];
        let out = Command::new(&venv_py)
            .arg(&example)
            .args(["--intake", &scaler.endpoint("intake")])
            .args(["--source", source])
            .args(["--output", &format!("s3://{bucket}/{prefix}/out/py{i}/")])
            .args([
                "--rendition",
                "small:320x180:400",
                "--rendition",
                "tiny:256x144:200:64",
            ])
            .output()?;
        assert!(
            out.status.success(),
            "publisher.py: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(reply["ok"], true, "{reply}");
        ids.push(reply["task_id"].as_str().unwrap_or_default().parse()?);
    }
    for i in 0..3 {
        let spec = logs.join(format!("spec{i}.json"));
        std::fs::write(
            &spec,
            format!(
                "{{\"source\":\"{}\",\"output\":\"s3://{bucket}/{prefix}/out/cli{i}/\",\"renditions\":{renditions}}}",
                sources[(i + 1) % 2]
            ),
        )?;
        let out = Command::new(bin("transcode"))
            .args(["--store", &pg, "submit", "--intake", "--spec"])
            .arg(&spec)
            .env("TRANSCODE_SCALER_INTAKE", scaler.endpoint("intake"))
            .output()?;
        assert!(
            out.status.success(),
            "transcode submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ids.push(String::from_utf8_lossy(&out.stdout).trim().parse()?);
    }

    let db = store::open(&pg, 2).await?;
    let done = wait_for(Duration::from_secs(240), "six tasks to settle", || {
        let db = db.clone();
        let ids = ids.clone();
        async move {
            let mut tasks = Vec::new();
            for id in &ids {
                let t = db.get_task(*id).await.ok()?;
                if !(t.status.is_terminal() || t.status == TaskStatus::Escalated) {
                    return None;
                }
                tasks.push(t);
            }
            Some(tasks)
        }
    })
    .await;
    let tasks = match done {
        Ok(t) => t,
        Err(e) => panic!(
            "{e}\nscaler:\n{}\nw1:\n{}\nw2:\n{}",
            scaler.log_tail(),
            w1.log_tail(),
            w2.log_tail()
        ),
    };
    for t in &tasks {
        assert_eq!(
            t.status,
            TaskStatus::Succeeded,
            "task {} ended {} ({:?} {:?})\nw1:\n{}\nw2:\n{}",
            t.id,
            t.status,
            t.error_code,
            t.error_message,
            w1.log_tail(),
            w2.log_tail()
        );
        assert_eq!(t.progress, 100);
    }
    let workers: HashSet<_> = tasks.iter().filter_map(|t| t.worker_id.clone()).collect();
    eprintln!("tasks ran on {workers:?}");

    // Outputs in S3: real files with the asked sizes and the source's duration.
    for t in &tasks {
        let manifest_url = ObjectUrl::parse(&format!("{}manifest.json", t.spec.output))?;
        let manifest: transcode_core::manifest::Manifest =
            serde_json::from_slice(&objects.get_bytes(&manifest_url, 1 << 20).await?)?;
        assert_eq!(manifest.task_id, t.id);
        assert_eq!(manifest.outputs.len(), 2);
        for (o, (w, h)) in manifest.outputs.iter().zip([(320, 180), (256, 144)]) {
            let local = logs.join(format!("{}-{}.mp4", t.id, o.name));
            let got = objects
                .get_to_file(&ObjectUrl::parse(&o.url)?, &local)
                .await?;
            assert_eq!(
                got.sha256, o.sha256,
                "sha256 of {} matches the manifest",
                o.url
            );
            let (pw, ph, dur) = ffprobe(&local)?;
            assert_eq!((pw, ph), (w, h), "{}", o.url);
            assert!(
                (1700..=2400).contains(&dur),
                "{} lasts {dur} ms, source 2000 ms",
                o.url
            );
        }
    }

    // Events in PostgreSQL, in causal order, per task.
    let mut db_ids = HashSet::new();
    for t in &tasks {
        let evs = db
            .events(&EventFilter {
                task_id: Some(t.id),
                limit: 1000,
                ..EventFilter::default()
            })
            .await?;
        let kinds: Vec<&str> = evs
            .iter()
            .map(|e| e.event_type.as_str())
            .filter(|k| *k != "TaskProgress")
            .collect();
        assert_eq!(kinds, CAUSAL, "events of {}", t.id);
        for e in &evs {
            if e.event_type != "TaskProgress" {
                db_ids.insert(e.id.to_string());
            }
        }
    }

    // The same events reached the bus (give the last ones a moment to arrive).
    let all_seen = wait_for(Duration::from_secs(10), "bus events", || {
        let seen = seen.clone();
        let want = db_ids.clone();
        async move {
            let s = seen.lock().ok()?;
            want.iter().all(|id| s.contains(id)).then_some(())
        }
    })
    .await;
    collector.abort();
    if all_seen.is_err() {
        let s = seen.lock().map(|s| s.clone()).unwrap_or_default();
        let missing: Vec<_> = db_ids.iter().filter(|id| !s.contains(*id)).collect();
        panic!(
            "{} of {} logged events never reached the bus: {missing:?}",
            missing.len(),
            db_ids.len()
        );
    }
    drop((w1, w2, scaler));
    Ok(())
}
