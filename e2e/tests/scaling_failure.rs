//! A scaling target that fails is an event, not only a log line (issue 7, `command` target):
//! a real scaler whose `add_node` command exits non-zero, and then one whose command outlives
//! its timeout, each record `ScalingActionFailed` in the store, assume no count change (the
//! next evaluation tries again from what `list_nodes` says), and keep serving.

use std::time::Duration;
use transcode_core::store::{self, EventFilter};
use transcode_e2e::{start_scaler, wait_for};

async fn failures(
    db: &std::sync::Arc<dyn transcode_core::Store>,
    n: usize,
) -> anyhow::Result<Vec<transcode_core::events::StoredEvent>> {
    wait_for(
        Duration::from_secs(60),
        "ScalingActionFailed events",
        || {
            let db = db.clone();
            async move {
                let evs = db
                    .events(&EventFilter {
                        event_type: Some("ScalingActionFailed".into()),
                        limit: 100,
                        ..EventFilter::default()
                    })
                    .await
                    .ok()?;
                (evs.len() >= n).then_some(evs)
            }
        },
    )
    .await
}

fn config(dir: &std::path::Path, add_node: &str, timeout_seconds: u32) -> anyhow::Result<String> {
    let list = dir.join("nodes.txt");
    std::fs::write(&list, "")?;
    let path = dir.join("scaler.hcl");
    std::fs::write(
        &path,
        format!(
            "scaling {{\n  enabled = true\n  node {{\n    target = \"command\"\n    min = 1\n    \
             evaluation_interval_ms = 200\n    cooldown_up_ms = 100\n  }}\n  container {{\n    \
             target = \"command\"\n  }}\n  command {{\n    add_node = \"{add_node}\"\n    \
             remove_node = \"true\"\n    start_container = \"true\"\n    stop_container = \
             \"true\"\n    list_nodes = \"cat {}\"\n    timeout_seconds = {timeout_seconds}\n  \
             }}\n}}\n",
            list.display()
        ),
    )?;
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hung_command_is_a_scaling_action_failed_event() -> anyhow::Result<()> {
    for (add_node, timeout, expect) in [
        ("echo no capacity >&2; exit 3", 30, "exit"),
        ("sleep 30", 1, "timed out"),
    ] {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let url = format!("sqlite://{}", dir.join("t.db").display());
        let cfg = config(dir, add_node, timeout)?;
        let scaler = start_scaler(&url, dir, &["--config", &cfg])?;
        let db = store::open(&url, 1).await?;
        // Two failures: the first did not stop the loop, and no node was assumed added (with
        // one node counted, `min = 1` would be met and nothing would be tried again).
        let evs = failures(&db, 2)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;
        for e in &evs[..2] {
            assert_eq!(e.data["level"], "node", "{}", e.data);
            assert_eq!(e.data["direction"], "up");
            assert_eq!(e.data["target"], "command");
            assert_eq!(e.data["from"], 0);
            let error = e.data["error"].as_str().unwrap_or_default();
            assert!(error.contains(expect), "{add_node}: {error}");
        }
        assert!(
            !db.events(&EventFilter {
                event_type: Some("WorkerNodeScaledUp".into()),
                limit: 10,
                ..EventFilter::default()
            })
            .await?
            .iter()
            .any(|_| true),
            "a failed add is not a scale-up"
        );
        let mut scaler = scaler;
        assert!(
            scaler.wait(Duration::from_millis(100)).is_none(),
            "still serving"
        );
    }
    Ok(())
}
