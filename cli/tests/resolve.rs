//! The operator's path for escalated tasks, through the real `transcode` binary on every store:
//! `tasks --status escalated` shows the failing operation and error, `resolve --retry` and
//! `resolve --fail --reason` move the task and record who did it and why, and resolving a task
//! that is not escalated is exit 6 with nothing changed.

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use transcode_core::events::{ContainerErrorEscalation, EventBody, Origin};
use transcode_core::store::{self, Claimant, EventFilter, Fence, Patch, Store};
use transcode_core::{TaskId, TaskSpec, TaskStatus};

fn transcode(store: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_transcode"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("TRANSCODE_CONFIG")
        // Nothing listens here: the best-effort intake nudge must fail quietly.
        .env("TRANSCODE_SCALER_INTAKE", "tcp://127.0.0.1:9")
        .output()
        .expect("run transcode")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// SQLite always; PostgreSQL when the test services are up (required with
/// TRANSCODE_REQUIRE_SERVICES=1), in a database of its own.
fn stores() -> Vec<(String, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = vec![(
        format!("sqlite://{}", dir.path().join("cli.db").display()),
        Some(dir),
    )];
    match std::env::var("TRANSCODE_TEST_PG_URL") {
        Ok(url) => {
            let db = format!("cli_resolve_{}", uuid::Uuid::new_v4().simple());
            let out = Command::new("psql")
                .arg(&url)
                .args(["-qc", &format!("CREATE DATABASE {db}")])
                .output()
                .expect("psql");
            assert!(out.status.success(), "{}", stderr(&out));
            let (base, _) = url.rsplit_once('/').expect("url has a database");
            v.push((format!("{base}/{db}"), None));
        }
        Err(_) if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("TRANSCODE_TEST_PG_URL missing with TRANSCODE_REQUIRE_SERVICES=1")
        }
        Err(_) => eprintln!("SKIPPED postgres half: no TRANSCODE_TEST_PG_URL"),
    }
    v
}

/// Claims the task as a worker would and escalates it after a failed push, with the event the
/// worker writes.
async fn escalate(db: &Arc<dyn Store>, id: TaskId, message: &str) {
    let who = Claimant {
        worker_id: "w-test".into(),
        node: "n".into(),
    };
    let t = db
        .claim(id, &who, Duration::from_secs(30), &[])
        .await
        .expect("claim");
    let ev = Origin::new("w-test", "n").event(
        Some(id),
        EventBody::ContainerErrorEscalation(ContainerErrorEscalation {
            operation: "push".into(),
            attempts: 5,
            class: "unreachable".into(),
            message: message.into(),
        }),
    );
    db.transition(
        id,
        Fence::Token(t.lease_token),
        TaskStatus::Escalated,
        &Patch {
            error_code: Some("push_unreachable".into()),
            error_message: Some(message.into()),
            ..Patch::default()
        },
        &[ev],
    )
    .await
    .expect("escalate");
}

async fn resolved_events(db: &Arc<dyn Store>, id: TaskId) -> Vec<serde_json::Value> {
    db.events(&EventFilter {
        task_id: Some(id),
        event_type: Some("TaskResolved".into()),
        limit: 100,
        ..EventFilter::default()
    })
    .await
    .expect("events")
    .into_iter()
    .map(|e| e.data)
    .collect()
}

/// The name `transcode` should record: the real uid's entry in /etc/passwd.
fn me() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalated_tasks_are_listed_and_resolved_once() {
    for (url, _guard) in stores() {
        let m = transcode(&url, &["migrate"]);
        assert!(m.status.success(), "{}", stderr(&m));
        let db = store::open(&url, 2).await.expect("open store");
        let spec: TaskSpec = serde_json::from_value(serde_json::json!({
            "source": "s3://media/in/cat.mp4",
            "output": "s3://media/out/cat/",
            "preset": "sd",
        }))
        .expect("spec");
        let id = db.insert_task(&spec, &[]).await.expect("insert").task.id;
        let ids = id.to_string();

        // Not escalated (queued): refused, exit 6, nothing written.
        let early = transcode(&url, &["resolve", &ids, "--retry"]);
        assert_eq!(early.status.code(), Some(6), "{}", stderr(&early));
        assert!(
            stderr(&early).contains("only an escalated task can be resolved"),
            "{}",
            stderr(&early)
        );
        assert_eq!(
            db.get_task(id).await.expect("get").status,
            TaskStatus::Queued
        );
        assert!(resolved_events(&db, id).await.is_empty());

        // --fail needs a reason; clap refuses before anything runs.
        let bare = transcode(&url, &["resolve", &ids, "--fail"]);
        assert_eq!(bare.status.code(), Some(2), "{}", stderr(&bare));
        let both = transcode(&url, &["resolve", &ids, "--retry", "--fail"]);
        assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));

        escalate(&db, id, "gave up after 5 attempts: connection refused").await;

        // The work list names the operation, the attempts and the error.
        let list = transcode(&url, &["tasks", "--status", "escalated"]);
        assert!(list.status.success(), "{}", stderr(&list));
        let text = stdout(&list);
        let header = text.lines().next().unwrap_or_default();
        for col in ["OPERATION", "TRIES", "CLASS", "ERROR"] {
            assert!(header.contains(col), "{text}");
        }
        let row = text
            .lines()
            .find(|l| l.starts_with(&ids))
            .unwrap_or_else(|| panic!("{ids} not listed:\n{text}"));
        for want in [
            "push",
            " 5 ",
            "unreachable",
            "gave up after 5 attempts: connection refused",
        ] {
            assert!(row.contains(want), "{want:?} missing from {row:?}");
        }
        let json = transcode(&url, &["tasks", "--status", "escalated", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("json");
        assert_eq!(v[0]["id"], ids.as_str());
        assert_eq!(v[0]["status"], "escalated");
        assert_eq!(v[0]["escalation"]["operation"], "push");
        assert_eq!(v[0]["escalation"]["attempts"], 5);

        // --retry: back to queued, who and why recorded; the scaler is down, which is fine.
        let retry = transcode(
            &url,
            &["resolve", &ids, "--retry", "--reason", "S3 is back"],
        );
        assert!(retry.status.success(), "{}", stderr(&retry));
        assert!(stdout(&retry).contains("queued"), "{}", stdout(&retry));
        assert!(
            stderr(&retry).contains("periodic scan will dispatch"),
            "{}",
            stderr(&retry)
        );
        let t = db.get_task(id).await.expect("get");
        assert_eq!(t.status, TaskStatus::Queued);
        assert!(t.error_code.is_none());
        let evs = resolved_events(&db, id).await;
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0]["action"], "retry");
        assert_eq!(evs[0]["reason"], "S3 is back");
        assert_eq!(evs[0]["by"], me().as_str());

        // Resolving again: it is no longer escalated.
        let again = transcode(&url, &["resolve", &ids, "--retry"]);
        assert_eq!(again.status.code(), Some(6), "{}", stderr(&again));
        assert_eq!(resolved_events(&db, id).await.len(), 1);

        // Escalated a second time, then failed for good with the reason.
        escalate(&db, id, "still refused").await;
        let fail = transcode(
            &url,
            &[
                "resolve",
                &ids,
                "--fail",
                "--reason",
                "source bucket was deleted",
                "--json",
            ],
        );
        assert!(fail.status.success(), "{}", stderr(&fail));
        let v: serde_json::Value = serde_json::from_str(&stdout(&fail)).expect("json");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error_code"], "operator_failed");
        assert_eq!(v["error_message"], "source bucket was deleted");
        let evs = resolved_events(&db, id).await;
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[1]["action"], "fail");
        assert_eq!(evs[1]["reason"], "source bucket was deleted");
        let after = transcode(&url, &["resolve", &ids, "--fail", "--reason", "x"]);
        assert_eq!(after.status.code(), Some(6), "{}", stderr(&after));
        let missing = transcode(
            &url,
            &["resolve", &uuid::Uuid::now_v7().to_string(), "--retry"],
        );
        assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));
    }
}
