//! `transcode members` shows what the scaler recorded about gossip members.

use std::process::Command;
use transcode_core::store::{self, Member};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_table_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let s = store::open(&url, 1).await.expect("open");
    s.migrate().await.expect("migrate");
    let now = chrono::Utc::now();
    s.upsert_members(&[
        Member {
            id: "worker-a".into(),
            role: "worker".into(),
            node: "node-1".into(),
            state: "alive".into(),
            last_seen: now,
            tags: serde_json::json!({"role":"worker","node":"node-1","slots":4,"busy":3,"cpu":71.5,"mem":40.0,"state":"active"}),
        },
        Member {
            id: "worker-b".into(),
            role: "worker".into(),
            node: "node-2".into(),
            state: "failed".into(),
            last_seen: now - chrono::Duration::seconds(30),
            tags: serde_json::json!({"unexpected": true}),
        },
    ])
    .await
    .expect("upsert");
    let out = Command::new(env!("CARGO_BIN_EXE_transcode"))
        .args(["--store", &url, "members"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID"), "{text}");
    assert!(
        lines[1].contains("worker-a") && lines[1].contains("71.5%") && lines[1].contains("3/4"),
        "{text}"
    );
    assert!(
        lines[2].contains("worker-b") && lines[2].contains("failed"),
        "{text}"
    );
    let json = Command::new(env!("CARGO_BIN_EXE_transcode"))
        .args(["--store", &url, "members", "--json"])
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(2));
    assert_eq!(v[1]["state"], "failed");
}
