//! Scenario: "retry and escalation for a functional container error", for real. A scaler and a
//! worker run as processes against PostgreSQL and the SeaweedFS S3 server; the worker reaches
//! S3 through the fault proxy (`transcode_e2e::faultproxy`), which injects the errors and counts
//! the requests. Retry delays are shortened through the worker's `TRANSCODE_RETRY_*`
//! environment so the file runs in seconds.
//!
//! Cases: two 503s then success; every kind of transient fault (reset, truncated body, stall);
//! S3 down past the retry budget (escalation, the worker moves on, `resolve --fail`); a push
//! that escalates half-way and is resumed with `resolve --retry` without uploading anything
//! twice; a 404 on pull (no retry, failed) and a 403 (no retry, escalated); a PostgreSQL
//! restart in the middle of a task; a full scratch disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use transcode_core::events::StoredEvent;
use transcode_core::objects::{Objects, ObjectsConfig, S3Config};
use transcode_core::store::{self, EventFilter, Store};
use transcode_core::url::ObjectUrl;
use transcode_core::{Task, TaskId, TaskSpec, TaskStatus};
use transcode_e2e::faultproxy::{sequence, Fault, FaultProxy, Matcher};
use transcode_e2e::{bin, make_clip, pg_database, s3, start_scaler, start_worker, wait_for, Proc};

/// Fast retries for tests: 4 attempts, 100 ms doubling (equal jitter), at most 1 s.
const FAST_RETRY: &[(&str, &str)] = &[
    ("TRANSCODE_RETRY_PULL_MAX_ATTEMPTS", "4"),
    ("TRANSCODE_RETRY_PULL_BASE_DELAY_MS", "100"),
    ("TRANSCODE_RETRY_PULL_MAX_DELAY_MS", "1000"),
    ("TRANSCODE_RETRY_PUSH_MAX_ATTEMPTS", "3"),
    ("TRANSCODE_RETRY_PUSH_BASE_DELAY_MS", "100"),
    ("TRANSCODE_RETRY_PUSH_MAX_DELAY_MS", "1000"),
];

/// Two small rungs of a 320x180 source: a few kilobytes each, one PUT each.
const LADDER: &str = r#"[{"name":"a","width":192,"height":108,"video_kbps":200},{"name":"b","width":128,"height":72,"video_kbps":100}]"#;

/// One scaler and one worker (one slot) on a fresh database, the worker behind a fault proxy.
struct Farm {
    pg: String,
    db: Arc<dyn Store>,
    bucket: String,
    prefix: String,
    objects: Objects,
    proxy: FaultProxy,
    scaler: Proc,
    worker: Proc,
    logs: tempfile::TempDir,
    clip: PathBuf,
}

struct FarmOptions<'a> {
    /// `None`: a fresh database on the shared test server.
    pg: Option<String>,
    env: &'a [(&'a str, &'a str)],
    /// Runs before the worker starts, with the folder it will use as scratch.
    before_worker: Option<&'a dyn Fn(&Path)>,
}

impl Farm {
    async fn start(tag: &str, opts: FarmOptions<'_>) -> anyhow::Result<Option<Farm>> {
        let pg = match opts.pg {
            Some(url) => url,
            None => match pg_database(tag) {
                Some(url) => url,
                None => return Ok(None),
            },
        };
        let Some((bucket, s3env)) = s3() else {
            return Ok(None);
        };
        let logs = tempfile::tempdir()?;
        let endpoint = s3env
            .iter()
            .find(|(k, _)| k == "TRANSCODE_OBJECTS_S3_ENDPOINT")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("no S3 endpoint"))?;
        let objects = Objects::new(ObjectsConfig {
            s3: S3Config {
                endpoint: Some(endpoint.clone()),
                ..S3Config::default()
            },
        });
        let proxy = FaultProxy::start(&endpoint).await?;
        let mut env: Vec<(String, String)> = s3env
            .into_iter()
            .map(|(k, v)| {
                if k == "TRANSCODE_OBJECTS_S3_ENDPOINT" {
                    (k, proxy.endpoint())
                } else {
                    (k, v)
                }
            })
            .collect();
        // A stalled request fails after a second instead of a minute.
        env.push(("TRANSCODE_OBJECTS_S3_TIMEOUT_SECS".into(), "1".into()));
        for (k, v) in FAST_RETRY.iter().chain(opts.env) {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let scaler = start_scaler(&pg, logs.path(), &["--scan-interval-ms", "300"])?;
        if let Some(f) = opts.before_worker {
            f(&logs.path().join("scratch-w1"));
        }
        let worker = start_worker("w1", &pg, &scaler, &env, logs.path(), &["--slots", "1"])?;
        let db = store::open(&pg, 2).await?;
        let clip = logs.path().join("clip.mp4");
        make_clip(&clip, 1, 320, 180, false)?;
        let prefix = format!("e2e-retry-{tag}-{}", uuid::Uuid::new_v4().simple());
        Ok(Some(Farm {
            pg,
            db,
            bucket,
            prefix,
            objects,
            proxy,
            scaler,
            worker,
            logs,
            clip,
        }))
    }

    /// Uploads the clip (straight to S3, not through the proxy) and returns its key and URL.
    async fn source(&self, name: &str) -> anyhow::Result<(String, String)> {
        let key = format!("{}/in/{name}.mp4", self.prefix);
        let url = format!("s3://{}/{key}", self.bucket);
        self.objects
            .put_file(&self.clip, &ObjectUrl::parse(&url)?)
            .await?;
        Ok((key, url))
    }

    fn output(&self, name: &str) -> (String, String) {
        let key = format!("{}/out/{name}/", self.prefix);
        (key.clone(), format!("s3://{}/{key}", self.bucket))
    }

    async fn submit(&self, source: &str, output: &str) -> anyhow::Result<TaskId> {
        let spec: TaskSpec = serde_json::from_str(&format!(
            r#"{{"source":"{source}","output":"{output}","renditions":{LADDER},"codec_preset":"ultrafast"}}"#
        ))?;
        Ok(self.db.insert_task(&spec, &[]).await?.task.id)
    }

    /// Waits until the task is terminal or escalated.
    async fn settle(&self, id: TaskId, secs: u64) -> Task {
        let db = self.db.clone();
        let got = wait_for(Duration::from_secs(secs), "the task to settle", || {
            let db = db.clone();
            async move {
                let t = db.get_task(id).await.ok()?;
                (t.status.is_terminal() || t.status == TaskStatus::Escalated).then_some(t)
            }
        })
        .await;
        match got {
            Ok(t) => t,
            Err(e) => panic!(
                "{e}\nworker:\n{}\nscaler:\n{}",
                self.worker.log_tail(),
                self.scaler.log_tail()
            ),
        }
    }

    async fn events(&self, id: TaskId) -> Vec<StoredEvent> {
        self.db
            .events(&EventFilter {
                task_id: Some(id),
                limit: 10_000,
                ..EventFilter::default()
            })
            .await
            .expect("events")
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("transcode"))
            .args(["--store", &self.pg])
            .args(args)
            .env_remove("TRANSCODE_CONFIG")
            .env("TRANSCODE_SCALER_INTAKE", self.scaler.endpoint("intake"))
            .output()
            .expect("run transcode")
    }

    /// The worker's `/metrics`.
    fn metrics(&self) -> String {
        http_get(&self.worker.endpoint("http"), "/metrics")
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to worker http");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

fn of_type<'a>(evs: &'a [StoredEvent], t: &str) -> Vec<&'a StoredEvent> {
    evs.iter().filter(|e| e.event_type == t).collect()
}

/// The event types of a task in log order, without the chatty TaskProgress.
fn kinds(evs: &[StoredEvent]) -> Vec<&str> {
    evs.iter()
        .map(|e| e.event_type.as_str())
        .filter(|k| *k != "TaskProgress")
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn me() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_503s_then_success() -> anyhow::Result<()> {
    let Some(f) = Farm::start(
        "twice",
        FarmOptions {
            pg: None,
            env: &[("TRANSCODE_RETRY_PULL_BASE_DELAY_MS", "200")],
            before_worker: None,
        },
    )
    .await?
    else {
        return Ok(());
    };
    let (key, src) = f.source("twice").await?;
    f.proxy
        .inject(Matcher::new("GET", &key), Fault::Status(503), 2);
    let (_, out) = f.output("twice");
    let id = f.submit(&src, &out).await?;
    let t = f.settle(id, 60).await;
    assert_eq!(
        t.status,
        TaskStatus::Succeeded,
        "{:?}\n{}",
        t.error_message,
        f.worker.log_tail()
    );

    let evs = f.events(id).await;
    let retries = of_type(&evs, "ContainerErrorRetry");
    assert_eq!(retries.len(), 2, "exactly two retries: {:?}", kinds(&evs));
    let delays: Vec<u64> = retries
        .iter()
        .map(|e| e.data["delay_ms"].as_u64().unwrap_or(0))
        .collect();
    for (i, r) in retries.iter().enumerate() {
        assert_eq!(r.data["operation"], "pull");
        assert_eq!(r.data["attempt"], i as u64 + 1);
        assert_eq!(r.data["class"], "transient");
        assert!(
            r.data["message"].as_str().unwrap_or("").contains("503"),
            "{}",
            r.data
        );
    }
    assert!(
        delays[1] > delays[0],
        "delays must increase: {delays:?} (equal jitter: [100,200) then [200,400))"
    );
    assert!((100..200).contains(&delays[0]), "{delays:?}");
    assert!(of_type(&evs, "ContainerErrorEscalation").is_empty());
    assert_eq!(
        kinds(&evs),
        [
            "TaskReceived",
            "TaskDetailsRetrieved",
            "WorkloadProcessingStarted",
            "ContainerErrorRetry",
            "ContainerErrorRetry",
            "VideoFilePulled",
            "VideoTranscoded",
            "RenditionUploaded",
            "RenditionUploaded",
            "TranscodedVideoUploaded",
            "WorkloadProcessingFinished",
            "TaskSucceeded",
        ]
    );
    // One attempt is one request: object_store does not retry underneath our policy.
    assert_eq!(f.proxy.count("GET", &key), 3);
    assert_eq!(f.proxy.count_ok("GET", &key), 1);
    let m = f.metrics();
    assert!(
        m.contains("transcode_retries_total{operation=\"pull\",class=\"transient\"} 2"),
        "{m}"
    );
    eprintln!("retry delays: {delays:?} ms");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_truncated_and_stalled_transfers_are_retried() -> anyhow::Result<()> {
    let Some(f) = Farm::start(
        "kinds",
        FarmOptions {
            pg: None,
            env: &[("TRANSCODE_RETRY_PULL_MAX_ATTEMPTS", "5")],
            before_worker: None,
        },
    )
    .await?
    else {
        return Ok(());
    };
    let (key, src) = f.source("kinds").await?;
    sequence(
        &f.proxy,
        &Matcher::new("GET", &key),
        [Fault::Reset, Fault::Truncate, Fault::Stall],
    );
    // And a reset on an upload: the push side retries too.
    let (out_key, out) = f.output("kinds");
    f.proxy.inject(
        Matcher::new("PUT", &format!("{out_key}a.mp4")),
        Fault::Reset,
        1,
    );
    let id = f.submit(&src, &out).await?;
    let t = f.settle(id, 90).await;
    assert_eq!(
        t.status,
        TaskStatus::Succeeded,
        "{:?}\n{}",
        t.error_message,
        f.worker.log_tail()
    );
    let evs = f.events(id).await;
    let retries = of_type(&evs, "ContainerErrorRetry");
    let summary: Vec<String> = retries
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.data["operation"], e.data["class"], e.data["message"]
            )
        })
        .collect();
    eprintln!("retries:\n{}", summary.join("\n"));
    assert_eq!(retries.len(), 4, "{summary:?}");
    let ops: Vec<&str> = retries
        .iter()
        .map(|e| e.data["operation"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ops, ["pull", "pull", "pull", "push"]);
    for r in &retries {
        let class = r.data["class"].as_str().unwrap_or("");
        assert!(
            class == "transient" || class == "unreachable",
            "every fault here is transient: {}",
            r.data
        );
    }
    assert!(
        retries[1].data["message"]
            .as_str()
            .unwrap_or("")
            .to_lowercase()
            .contains("truncated")
            || retries[1].data["class"] == "transient",
        "{}",
        retries[1].data
    );
    assert_eq!(f.proxy.count("GET", &key), 4);
    assert_eq!(f.proxy.count_ok("PUT", &format!("{out_key}a.mp4")), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_down_escalates_and_the_worker_moves_on() -> anyhow::Result<()> {
    let Some(f) = Farm::start(
        "down",
        FarmOptions {
            pg: None,
            env: &[],
            before_worker: None,
        },
    )
    .await?
    else {
        return Ok(());
    };
    let (key, src) = f.source("down").await?;
    // S3 is down for longer than the pull budget (4 attempts).
    f.proxy.inject_always(Matcher::any(), Fault::Status(503));
    let (_, out) = f.output("down");
    let id = f.submit(&src, &out).await?;
    let t = f.settle(id, 60).await;
    assert_eq!(t.status, TaskStatus::Escalated, "{}", f.worker.log_tail());
    assert_eq!(t.error_code.as_deref(), Some("pull_transient"));
    assert!(
        t.error_message
            .as_deref()
            .unwrap_or("")
            .starts_with("gave up after 4 attempts"),
        "{:?}",
        t.error_message
    );
    let evs = f.events(id).await;
    let esc = of_type(&evs, "ContainerErrorEscalation");
    assert_eq!(esc.len(), 1, "{:?}", kinds(&evs));
    assert_eq!(esc[0].data["operation"], "pull");
    assert_eq!(esc[0].data["attempts"], 4);
    assert_eq!(esc[0].data["class"], "transient");
    assert_eq!(of_type(&evs, "ContainerErrorRetry").len(), 3);
    assert_eq!(f.proxy.count("GET", &key), 4);
    let fin = of_type(&evs, "WorkloadProcessingFinished");
    assert_eq!(fin.len(), 1);
    assert_eq!(fin[0].data["outcome"], "escalated");
    // The alert: a WARN line and the metric.
    assert!(
        f.worker.log_tail().contains("task escalated"),
        "{}",
        f.worker.log_tail()
    );
    let m = f.metrics();
    assert!(
        m.contains("transcode_escalations_total{operation=\"pull\"} 1"),
        "{m}"
    );

    // The operator's list shows the failing operation and the error.
    let list = f.cli(&["tasks", "--status", "escalated"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let row = stdout(&list)
        .lines()
        .find(|l| l.starts_with(&id.to_string()))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        row.contains("pull") && row.contains("gave up after 4 attempts"),
        "{}",
        stdout(&list)
    );

    // S3 comes back: the same worker (one slot) takes the next task, so the slot was freed.
    f.proxy.clear();
    let (_, src2) = f.source("down2").await?;
    let (_, out2) = f.output("down2");
    let next = f.submit(&src2, &out2).await?;
    let t2 = f.settle(next, 60).await;
    assert_eq!(
        t2.status,
        TaskStatus::Succeeded,
        "{:?}\n{}",
        t2.error_message,
        f.worker.log_tail()
    );
    assert_eq!(t2.worker_id.as_deref(), Some("w1"));

    // The operator gives up on the escalated one.
    let fail = f.cli(&[
        "resolve",
        &id.to_string(),
        "--fail",
        "--reason",
        "source bucket retired",
    ]);
    assert!(fail.status.success(), "{}", stderr(&fail));
    let t = f.db.get_task(id).await?;
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.error_code.as_deref(), Some("operator_failed"));
    assert_eq!(t.error_message.as_deref(), Some("source bucket retired"));
    let evs = f.events(id).await;
    let resolved = of_type(&evs, "TaskResolved");
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].data["by"], me().as_str());
    assert_eq!(resolved[0].data["action"], "fail");
    assert_eq!(resolved[0].data["reason"], "source bucket retired");
    // Failed for good: never delivered again.
    assert_eq!(of_type(&evs, "TaskReceived").len(), 1);
    let again = f.cli(&["resolve", &id.to_string(), "--retry"]);
    assert_eq!(again.status.code(), Some(6), "{}", stderr(&again));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resolve_retry_resumes_without_uploading_twice() -> anyhow::Result<()> {
    let Some(f) = Farm::start(
        "resume",
        FarmOptions {
            pg: None,
            env: &[],
            before_worker: None,
        },
    )
    .await?
    else {
        return Ok(());
    };
    let (_, src) = f.source("resume").await?;
    let (out_key, out) = f.output("resume");
    let a_key = format!("{out_key}a.mp4");
    let b_key = format!("{out_key}b.mp4");
    let manifest_key = format!("{out_key}manifest.json");
    // Rung a goes up; every upload of rung b fails: the push escalates half-way.
    f.proxy
        .inject_always(Matcher::new("PUT", &b_key), Fault::Status(503));
    let id = f.submit(&src, &out).await?;
    let t = f.settle(id, 60).await;
    assert_eq!(t.status, TaskStatus::Escalated, "{}", f.worker.log_tail());
    assert_eq!(t.error_code.as_deref(), Some("push_transient"));
    let evs = f.events(id).await;
    let esc = of_type(&evs, "ContainerErrorEscalation");
    assert_eq!(esc.len(), 1);
    assert_eq!(esc[0].data["operation"], "push");
    assert_eq!(esc[0].data["attempts"], 3);
    let ups = of_type(&evs, "RenditionUploaded");
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].data["name"], "a");
    assert_eq!(f.proxy.count("PUT", &a_key), 1);
    assert_eq!(f.proxy.count("PUT", &b_key), 3);
    assert_eq!(f.proxy.count("PUT", &manifest_key), 0);

    // S3 is healthy again; the operator retries.
    f.proxy.clear();
    let retry = f.cli(&[
        "resolve",
        &id.to_string(),
        "--retry",
        "--reason",
        "S3 fixed",
    ]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    assert!(
        stderr(&retry).contains("dispatched through the scaler's intake"),
        "{}",
        stderr(&retry)
    );
    let t = f.settle(id, 60).await;
    assert_eq!(
        t.status,
        TaskStatus::Succeeded,
        "{:?}\n{}",
        t.error_message,
        f.worker.log_tail()
    );
    assert_eq!(t.attempts, 2);

    // Rung a was not uploaded again (nor transcoded again); b and the manifest once each.
    assert_eq!(f.proxy.count("PUT", &a_key), 1, "{:?}", f.proxy.seen());
    assert_eq!(f.proxy.count_ok("PUT", &b_key), 1);
    assert_eq!(f.proxy.count("PUT", &manifest_key), 1);
    assert!(
        f.proxy.count("HEAD", &a_key) >= 1,
        "the resume checks rung a"
    );
    let evs = f.events(id).await;
    let resolved = of_type(&evs, "TaskResolved");
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].data["action"], "retry");
    assert_eq!(resolved[0].data["by"], me().as_str());
    let transcoded = of_type(&evs, "VideoTranscoded");
    assert_eq!(transcoded.len(), 2);
    assert_eq!(transcoded[1].data["renditions"], serde_json::json!(["b"]));
    assert_eq!(transcoded[1].data["reused"], serde_json::json!(["a"]));
    let uploaded = of_type(&evs, "TranscodedVideoUploaded");
    assert_eq!(uploaded.len(), 1);
    let outs = &uploaded[0].data["outputs"];
    assert_eq!(outs[0]["name"], "a");
    assert_eq!(outs[0]["uploaded"], false);
    assert_eq!(outs[1]["name"], "b");
    assert_eq!(outs[1]["uploaded"], true);

    // The manifest lists both rungs, and each sha256 is that of the object in S3.
    let manifest: transcode_core::manifest::Manifest = serde_json::from_slice(
        &f.objects
            .get_bytes(&ObjectUrl::parse(&format!("{out}manifest.json"))?, 1 << 20)
            .await?,
    )?;
    assert_eq!(manifest.task_id, id);
    let names: Vec<&str> = manifest.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    for o in &manifest.outputs {
        let local = f.logs.path().join(format!("check-{}.mp4", o.name));
        let got = f
            .objects
            .get_to_file(&ObjectUrl::parse(&o.url)?, &local)
            .await?;
        assert_eq!(got.sha256, o.sha256, "{}", o.url);
        assert_eq!(got.bytes, o.bytes, "{}", o.url);
    }
    let again = f.cli(&["resolve", &id.to_string(), "--retry"]);
    assert_eq!(again.status.code(), Some(6), "{}", stderr(&again));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_source_fails_and_forbidden_escalates_without_retry() -> anyhow::Result<()> {
    let Some(f) = Farm::start(
        "perm",
        FarmOptions {
            pg: None,
            env: &[],
            before_worker: None,
        },
    )
    .await?
    else {
        return Ok(());
    };
    // A real 404 from the server.
    let missing_key = format!("{}/in/nope.mp4", f.prefix);
    let (_, out) = f.output("nope");
    let id = f
        .submit(&format!("s3://{}/{missing_key}", f.bucket), &out)
        .await?;
    let t = f.settle(id, 60).await;
    assert_eq!(t.status, TaskStatus::Failed, "{}", f.worker.log_tail());
    assert_eq!(t.error_code.as_deref(), Some("source_not_found"));
    let evs = f.events(id).await;
    assert!(of_type(&evs, "ContainerErrorRetry").is_empty());
    assert!(of_type(&evs, "ContainerErrorEscalation").is_empty());
    assert_eq!(f.proxy.count("GET", &missing_key), 1, "no retry");

    // A 403: an operator must fix credentials or a policy; no retry, escalated at once.
    let (key, src) = f.source("denied").await?;
    f.proxy
        .inject_always(Matcher::new("GET", &key), Fault::Status(403));
    let (_, out) = f.output("denied");
    let id = f.submit(&src, &out).await?;
    let t = f.settle(id, 60).await;
    assert_eq!(t.status, TaskStatus::Escalated, "{}", f.worker.log_tail());
    assert_eq!(t.error_code.as_deref(), Some("pull_permission_denied"));
    let evs = f.events(id).await;
    assert!(of_type(&evs, "ContainerErrorRetry").is_empty());
    let esc = of_type(&evs, "ContainerErrorEscalation");
    assert_eq!(esc.len(), 1);
    assert_eq!(esc[0].data["attempts"], 1);
    assert_eq!(esc[0].data["class"], "permission_denied");
    assert_eq!(f.proxy.count("GET", &key), 1, "no retry");
    Ok(())
}

/// A PostgreSQL cluster of this test's own. The restart must not cut the connections of every
/// other test running at the same time against the shared server, so the test gets a server it
/// alone uses: the same binaries and OS user the services script uses (TRANSCODE_TEST_PG_BIN,
/// TRANSCODE_TEST_PG_OS_USER), durable settings, a free port.
struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: String,
    port: u16,
}

impl PrivatePg {
    fn as_pg(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.user == me() {
            Command::new(exe)
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.user, "--"]).arg(exe);
            c
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start() -> Option<PrivatePg> {
        let (Ok(bin), Ok(user)) = (
            std::env::var("TRANSCODE_TEST_PG_BIN"),
            std::env::var("TRANSCODE_TEST_PG_OS_USER"),
        ) else {
            if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("TRANSCODE_TEST_PG_BIN/TRANSCODE_TEST_PG_OS_USER missing with TRANSCODE_REQUIRE_SERVICES=1");
            }
            eprintln!("SKIPPED: no PostgreSQL binaries (run ./scripts/task test)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("e2e-pg-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let pg = PrivatePg {
            dir,
            bin: PathBuf::from(bin),
            user,
            port,
        };
        // The postgres OS user must reach and own its data dir.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(pg.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir(pg.data()).expect("mkdir data");
        if pg.user != me() {
            let st = Command::new("chown")
                .arg(format!("{}:", pg.user))
                .arg(pg.data())
                .status()
                .expect("chown");
            assert!(st.success(), "chown of the data dir failed");
        }
        let init = pg
            .as_pg("initdb")
            .arg("-D")
            .arg(pg.data())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ])
            .output()
            .expect("initdb");
        assert!(init.status.success(), "initdb: {}", stderr(&init));
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\nfsync = on\nsynchronous_commit = on\nmax_connections = 50\n"
        );
        // Appended as the postgres user, who owns the file.
        let st = pg
            .as_pg_shell(&format!("cat >> '{}/postgresql.conf'", pg.data().display()))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                if let Some(mut i) = c.stdin.take() {
                    i.write_all(conf.as_bytes())?;
                }
                c.wait()
            })
            .expect("write postgresql.conf");
        assert!(st.success(), "writing postgresql.conf failed");
        let start = pg
            .as_pg("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(pg.data())
            .arg("-l")
            .arg(pg.data().join("server.log"))
            .args(["-w", "-t", "60"])
            .output()
            .expect("pg_ctl start");
        assert!(
            start.status.success(),
            "pg_ctl start: {} {}",
            stdout(&start),
            stderr(&start)
        );
        let create = pg
            .as_pg("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "e2e",
            ])
            .output()
            .expect("createdb");
        assert!(create.status.success(), "createdb: {}", stderr(&create));
        Some(pg)
    }

    fn as_pg_shell(&self, script: &str) -> Command {
        if self.user == me() {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.user, "--", "sh", "-c", script]);
            c
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/e2e", self.port)
    }

    fn restart(&self) -> Output {
        self.as_pg("pg_ctl")
            .arg("restart")
            .arg("-D")
            .arg(self.data())
            // Without a log file the new server inherits our stdout/stderr pipes, and
            // `output()` would wait for them to close, that is for the server to exit.
            .arg("-l")
            .arg(self.data().join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60"])
            .output()
            .expect("pg_ctl restart")
    }

    fn accepting(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .as_pg("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_mid_task_loses_nothing() -> anyhow::Result<()> {
    let Some(pg) = PrivatePg::start() else {
        return Ok(());
    };
    let Some(mut f) = Farm::start(
        "pgrestart",
        FarmOptions {
            pg: Some(pg.url()),
            // Renewed every second: renewals run into the restart as well.
            env: &[("TRANSCODE_WORKER_LEASE_SECONDS", "3")],
            before_worker: None,
        },
    )
    .await?
    else {
        return Ok(());
    };
    let (key, src) = f.source("pgrestart").await?;
    // The pull's answer (a 503) is held until the database is down, so the worker's next
    // write (the ContainerErrorRetry) meets the restart for certain.
    f.proxy
        .inject(Matcher::new("GET", &key), Fault::Gated(503), 1);
    let (_, out) = f.output("pgrestart");
    let id = f.submit(&src, &out).await?;
    wait_for(Duration::from_secs(30), "the worker's pull", || async {
        (f.proxy.count("GET", &key) >= 1).then_some(())
    })
    .await?;
    let restarting = {
        let pg_ref = &pg;
        std::thread::scope(|scope| {
            let restart = scope.spawn(|| pg_ref.restart());
            // Wait for the server to go down (the port refuses), then release the 503.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while pg_ref.accepting() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let was_down = !pg_ref.accepting();
            f.proxy.open_gate();
            let out = restart.join().expect("restart thread");
            (was_down, out)
        })
    };
    let (was_down, restart) = restarting;
    assert!(
        restart.status.success(),
        "pg_ctl restart: {} {}",
        stdout(&restart),
        stderr(&restart)
    );
    assert!(was_down, "the server never went down during the restart");

    let t = f.settle(id, 90).await;
    assert_eq!(
        t.status,
        TaskStatus::Succeeded,
        "{:?}\nworker:\n{}\nscaler:\n{}",
        t.error_message,
        f.worker.log_tail(),
        f.scaler.log_tail()
    );
    assert_eq!(t.attempts, 1, "the task was never lost or requeued");
    let evs = f.events(id).await;
    assert_eq!(
        kinds(&evs),
        [
            "TaskReceived",
            "TaskDetailsRetrieved",
            "WorkloadProcessingStarted",
            "ContainerErrorRetry",
            "VideoFilePulled",
            "VideoTranscoded",
            "RenditionUploaded",
            "RenditionUploaded",
            "TranscodedVideoUploaded",
            "WorkloadProcessingFinished",
            "TaskSucceeded",
        ],
        "events complete, once each, in causal order"
    );
    let mut ids = std::collections::HashSet::new();
    for w in evs.windows(2) {
        assert!(w[0].seq < w[1].seq);
        assert!(w[0].time <= w[1].time, "{:?} after {:?}", w[1], w[0]);
    }
    for e in &evs {
        assert!(ids.insert(e.id), "duplicate event {}", e.id);
    }
    // The worker did meet the outage, and rode it out.
    let log = std::fs::read_to_string(&f.worker.log).unwrap_or_default();
    assert!(
        log.contains("store unavailable"),
        "the worker never saw the database down:\n{}",
        f.worker.log_tail()
    );
    assert!(f.scaler.child.try_wait()?.is_none(), "scaler died");
    assert!(f.worker.child.try_wait()?.is_none(), "worker died");
    drop(f);
    drop(pg);
    Ok(())
}

/// A tmpfs of `size` mounted at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        // No skip: without the mount the test proves nothing, so it fails loudly.
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs at {} failed (this test needs root): {}",
            dir.display(),
            stderr(&out)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn unmount(&self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_scratch_disk_is_a_task_error() -> anyhow::Result<()> {
    let mounted: std::sync::Mutex<Option<Tmpfs>> = std::sync::Mutex::new(None);
    // Smaller than the ~30 KB source: the pull hits ENOSPC.
    let mount = |dir: &Path| {
        *mounted.lock().expect("lock") = Some(Tmpfs::mount(dir, "16k"));
    };
    let Some(mut f) = Farm::start(
        "enospc",
        FarmOptions {
            pg: None,
            env: &[],
            before_worker: Some(&mount),
        },
    )
    .await?
    else {
        return Ok(());
    };
    let scratch = f.logs.path().join("scratch-w1");
    let (_, src) = f.source("enospc").await?;
    let (_, out) = f.output("enospc");
    let id = f.submit(&src, &out).await?;
    let t = f.settle(id, 60).await;
    assert_eq!(t.status, TaskStatus::Failed, "{}", f.worker.log_tail());
    assert_eq!(t.error_code.as_deref(), Some("pull_no_space"));
    let msg = t.error_message.clone().unwrap_or_default();
    assert!(msg.contains("ENOSPC"), "{msg}");
    let evs = f.events(id).await;
    assert!(
        of_type(&evs, "ContainerErrorRetry").is_empty(),
        "a full disk is not retried"
    );
    // The worker is alive and left nothing on the disk.
    assert!(f.worker.child.try_wait()?.is_none(), "worker crashed");
    let left: Vec<_> = std::fs::read_dir(&scratch)?.collect();
    assert!(left.is_empty(), "scratch not cleaned: {left:?}");

    // Space is freed (the tiny disk goes away): the same worker process runs the next task.
    if let Some(m) = mounted.lock().expect("lock").take() {
        m.unmount();
    }
    let (_, src2) = f.source("enospc2").await?;
    let (_, out2) = f.output("enospc2");
    let next = f.submit(&src2, &out2).await?;
    let t2 = f.settle(next, 60).await;
    assert_eq!(
        t2.status,
        TaskStatus::Succeeded,
        "{:?}\n{}",
        t2.error_message,
        f.worker.log_tail()
    );
    Ok(())
}
