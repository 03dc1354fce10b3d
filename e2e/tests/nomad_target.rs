//! The scaler's `nomad` target against the in-process Nomad fake: the exact requests it sends
//! (method, path, query, token, JSON body) for each operation, the retry while a deployment
//! blocks scaling, error answers, and how nodes and allocations become [`NodeInfo`].

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use transcode_e2e::nomadfake::{FakeAlloc, FakeNode, NomadFake, Recorded};
use transcode_scaler::targets::nomad::{DeploymentRetry, NomadSettings, NomadTarget};
use transcode_scaler::targets::{NodeInfo, Target, TargetError};

const JOB: &str = "transcode-worker";
const GROUP: &str = "workers";
const QUERY: &str = "namespace=farm&region=eu";
const TOKEN: &str = "3f1c-secret";

fn settings(fake: &NomadFake) -> NomadSettings {
    let mut s = NomadSettings::new(&fake.address(), JOB, GROUP);
    s.token = Some(TOKEN.to_string());
    s.namespace = "farm".to_string();
    s.region = Some("eu".to_string());
    s.request_timeout = Duration::from_secs(5);
    s.deployment_retry = DeploymentRetry {
        tries: 4,
        first_delay: Duration::from_millis(20),
    };
    s
}

fn target(fake: &NomadFake, f: impl FnOnce(&mut NomadSettings)) -> NomadTarget {
    let mut s = settings(fake);
    f(&mut s);
    NomadTarget::new(s).expect("valid settings")
}

fn req(method: &str, path: &str, body: Option<Value>) -> Recorded {
    Recorded {
        method: method.to_string(),
        path: path.to_string(),
        query: Some(QUERY.to_string()),
        token: Some(TOKEN.to_string()),
        body,
    }
}

fn scale_get() -> Recorded {
    req("GET", "/v1/job/transcode-worker/scale", None)
}

fn scale_post(count: i64, message: &str) -> Recorded {
    req(
        "POST",
        "/v1/job/transcode-worker/scale",
        Some(json!({
            "Count": count,
            "Target": { "Group": GROUP },
            "Message": message,
            "PolicyOverride": false,
        })),
    )
}

const START_MSG: &str = "transcode-scaler: start a worker container (wanted on node-1)";
const STOP_MSG: &str = "transcode-scaler: stop drained worker 8a3f0c11-worker on node-1";

#[tokio::test]
async fn start_container_scales_the_group_up_by_one() {
    let fake = NomadFake::start(JOB, &[(GROUP, 2), ("other", 7)])
        .await
        .expect("fake");
    let t = target(&fake, |_| {});
    assert_eq!(t.kind(), "nomad");
    t.start_container("node-1").await.expect("scale up");
    assert_eq!(fake.count(GROUP), Some(3));
    assert_eq!(fake.count("other"), Some(7), "only the worker group moves");
    assert_eq!(fake.requests(), vec![scale_get(), scale_post(3, START_MSG)]);
}

#[tokio::test]
async fn stop_container_scales_the_group_down_by_one() {
    let fake = NomadFake::start(JOB, &[(GROUP, 2)]).await.expect("fake");
    let t = target(&fake, |_| {});
    t.stop_container("node-1", "8a3f0c11-worker")
        .await
        .expect("scale down");
    assert_eq!(fake.count(GROUP), Some(1));
    assert_eq!(fake.requests(), vec![scale_get(), scale_post(1, STOP_MSG)]);
}

#[tokio::test]
async fn stop_container_at_zero_fails_without_scaling() {
    let fake = NomadFake::start(JOB, &[(GROUP, 0)]).await.expect("fake");
    let t = target(&fake, |_| {});
    let e = t
        .stop_container("node-1", "8a3f0c11-worker")
        .await
        .expect_err("nothing to stop");
    assert!(matches!(e, TargetError::Failed(_)), "{e:?}");
    assert_eq!(fake.requests(), vec![scale_get()]);
    assert_eq!(fake.count(GROUP), Some(0));
}

#[tokio::test]
async fn an_active_deployment_is_retried_with_the_same_count() {
    let fake = NomadFake::start(JOB, &[(GROUP, 2)]).await.expect("fake");
    fake.block_next_scales(2);
    let t = target(&fake, |_| {});
    let started = Instant::now();
    t.start_container("node-1")
        .await
        .expect("third try succeeds");
    // Waits of 20 ms then 40 ms before the second and third tries.
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(fake.count(GROUP), Some(3), "retries must not scale twice");
    assert_eq!(
        fake.requests(),
        vec![
            scale_get(),
            scale_post(3, START_MSG),
            scale_post(3, START_MSG),
            scale_post(3, START_MSG),
        ]
    );
}

#[tokio::test]
async fn a_deployment_that_outlasts_the_retries_fails_clearly() {
    let fake = NomadFake::start(JOB, &[(GROUP, 2)]).await.expect("fake");
    fake.block_next_scales(10);
    let t = target(&fake, |_| {});
    let e = t
        .start_container("node-1")
        .await
        .expect_err("still blocked");
    let msg = e.to_string();
    assert!(
        msg.contains("deployment") && msg.contains("4 tries"),
        "{msg}"
    );
    assert_eq!(fake.count(GROUP), Some(2));
    let posts = fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 4, "exactly the configured number of tries");
}

#[tokio::test]
async fn other_error_answers_fail_at_once_with_status_and_body() {
    let fake = NomadFake::start(JOB, &[(GROUP, 2)]).await.expect("fake");
    let t = target(&fake, |_| {});

    fake.fail_next_scales(1, 500, "rpc error: No cluster leader");
    let e = t.start_container("node-1").await.expect_err("500");
    let msg = e.to_string();
    assert!(matches!(e, TargetError::Failed(_)), "{e:?}");
    assert!(
        msg.contains("500") && msg.contains("No cluster leader"),
        "{msg}"
    );
    assert_eq!(fake.requests(), vec![scale_get(), scale_post(3, START_MSG)]);

    // A 400 that is not about a deployment is not retried either.
    fake.clear_requests();
    fake.fail_next_scales(1, 400, "Permission denied");
    let e = t.start_container("node-1").await.expect_err("400");
    assert!(e.to_string().contains("Permission denied"), "{e}");
    assert_eq!(fake.requests().len(), 2);

    // A failing read: no scale call is made on a count that could not be read.
    fake.clear_requests();
    fake.fail_next(403, "ACL token not found");
    let e = t.start_container("node-1").await.expect_err("403");
    assert!(
        e.to_string().contains("403") && e.to_string().contains("ACL token not found"),
        "{e}"
    );
    assert_eq!(fake.requests(), vec![scale_get()]);
    assert_eq!(fake.count(GROUP), Some(2));
}

#[tokio::test]
async fn an_unknown_group_or_job_is_an_error() {
    let fake = NomadFake::start(JOB, &[("something-else", 2)])
        .await
        .expect("fake");
    let e = target(&fake, |_| {})
        .start_container("node-1")
        .await
        .expect_err("no such group");
    assert!(e.to_string().contains("no task group \"workers\""), "{e}");
    let e = target(&fake, |s| s.job = "nope".into())
        .start_container("node-1")
        .await
        .expect_err("no such job");
    assert!(e.to_string().contains("404"), "{e}");
}

fn cluster(fake: &NomadFake) {
    fake.add_node(FakeNode::ready("id-1", "node-1", "transcode"));
    fake.add_node(FakeNode::ready("id-2", "gpu-1", "gpu"));
    fake.add_node(FakeNode {
        status: "down".into(),
        ..FakeNode::ready("id-3", "node-3", "transcode")
    });
    fake.add_node(FakeNode {
        eligibility: "ineligible".into(),
        ..FakeNode::ready("id-4", "node-4", "transcode")
    });
    fake.add_node(FakeNode::ready("id-5", "node-5", "transcode"));
    fake.add_node(FakeNode {
        status: "initializing".into(),
        ..FakeNode::ready("id-6", "node-6", "transcode")
    });
    fake.add_alloc("a1", "id-1", GROUP, "running");
    fake.add_alloc("a2", "id-1", GROUP, "running");
    fake.add_alloc("a3", "id-1", GROUP, "pending");
    fake.add_alloc("a4", "id-1", "sidecar", "running");
    fake.add_alloc("a5", "id-1", GROUP, "complete");
    fake.add_alloc_full(FakeAlloc {
        id: "a6".into(),
        node_id: "id-1".into(),
        node_name: "node-1".into(),
        task_group: GROUP.into(),
        client_status: "running".into(),
        desired_status: "stop".into(),
    });
    fake.add_alloc("a7", "id-2", GROUP, "running");
    fake.add_alloc("a8", "id-4", GROUP, "running");
    fake.add_alloc("a9", "id-5", GROUP, "failed");
}

fn node(name: &str, containers: u32) -> NodeInfo {
    NodeInfo {
        name: name.to_string(),
        containers,
    }
}

#[tokio::test]
async fn nodes_are_ready_eligible_nodes_of_the_class_with_running_allocations() {
    let fake = NomadFake::start(JOB, &[(GROUP, 4)]).await.expect("fake");
    cluster(&fake);
    let t = target(&fake, |s| s.node_class = Some("transcode".into()));
    let nodes = t.nodes().await.expect("nodes");
    assert_eq!(nodes, vec![node("node-1", 2), node("node-5", 0)]);
    assert_eq!(
        fake.requests(),
        vec![
            req("GET", "/v1/nodes", None),
            req("GET", "/v1/job/transcode-worker/allocations", None),
        ]
    );

    let all = target(&fake, |s| s.node_class = None)
        .nodes()
        .await
        .expect("nodes");
    assert_eq!(
        all,
        vec![node("gpu-1", 1), node("node-1", 2), node("node-5", 0)]
    );
}

#[tokio::test]
async fn remove_node_marks_ineligible_then_drains_with_a_deadline_in_ns() {
    let fake = NomadFake::start(JOB, &[(GROUP, 4)]).await.expect("fake");
    cluster(&fake);
    // An old entry of a replaced machine under the same name must not confuse the lookup.
    fake.add_node(FakeNode {
        status: "down".into(),
        ..FakeNode::ready("id-old", "node-1", "transcode")
    });
    let t = target(&fake, |s| s.node_class = Some("transcode".into()));
    t.remove_node("node-1", Duration::from_secs(90))
        .await
        .expect("remove");
    assert_eq!(
        fake.requests(),
        vec![
            req("GET", "/v1/nodes", None),
            req(
                "POST",
                "/v1/node/id-1/eligibility",
                Some(json!({ "NodeID": "id-1", "Eligibility": "ineligible" })),
            ),
            req(
                "POST",
                "/v1/node/id-1/drain",
                Some(json!({
                    "DrainSpec": { "Deadline": 90_000_000_000_i64, "IgnoreSystemJobs": false },
                    "MarkEligible": false,
                })),
            ),
        ]
    );
    let n = fake.node("id-1").expect("node");
    assert_eq!(n.eligibility, "ineligible");
    assert!(n.drain.is_some());
    assert_eq!(fake.node("id-old").and_then(|n| n.drain), None);
}

#[tokio::test]
async fn remove_node_with_no_time_left_forces_the_drain() {
    let fake = NomadFake::start(JOB, &[(GROUP, 1)]).await.expect("fake");
    cluster(&fake);
    let t = target(&fake, |_| {});
    t.remove_node("node-5", Duration::ZERO)
        .await
        .expect("remove");
    let drain = fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/node/id-5/drain")
        .expect("a drain request");
    assert_eq!(
        drain.body,
        Some(json!({
            "DrainSpec": { "Deadline": -1, "IgnoreSystemJobs": false },
            "MarkEligible": false,
        }))
    );
}

#[tokio::test]
async fn remove_node_of_an_unknown_or_foreign_node_sends_nothing() {
    let fake = NomadFake::start(JOB, &[(GROUP, 4)]).await.expect("fake");
    cluster(&fake);
    let t = target(&fake, |s| s.node_class = Some("transcode".into()));
    for name in ["no-such-node", "gpu-1", "node-3"] {
        let e = t
            .remove_node(name, Duration::from_secs(10))
            .await
            .expect_err(name);
        assert!(
            matches!(&e, TargetError::UnknownNode(n) if n == name),
            "{name}: {e:?}"
        );
    }
    assert!(
        fake.requests().iter().all(|r| r.method == "GET"),
        "{:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn add_node_is_unsupported_and_calls_nothing() {
    let fake = NomadFake::start(JOB, &[(GROUP, 1)]).await.expect("fake");
    let e = target(&fake, |_| {})
        .add_node()
        .await
        .expect_err("unsupported");
    assert!(
        matches!(
            e,
            TargetError::Unsupported {
                target: "nomad",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn without_token_or_region_neither_is_sent() {
    let fake = NomadFake::start(JOB, &[(GROUP, 1)]).await.expect("fake");
    cluster(&fake);
    let t = NomadTarget::new(NomadSettings::new(&fake.address(), JOB, GROUP)).expect("target");
    t.start_container("node-1").await.expect("scale");
    t.nodes().await.expect("nodes");
    t.remove_node("node-5", Duration::from_secs(1))
        .await
        .expect("remove");
    let requests = fake.requests();
    assert_eq!(requests.len(), 7);
    for r in requests {
        assert_eq!(r.token, None, "{r:?}");
        assert_eq!(r.query.as_deref(), Some("namespace=default"), "{r:?}");
    }
}

#[tokio::test]
async fn an_unreachable_nomad_is_a_failure_naming_the_call() {
    // Bind then drop a listener to get a port nothing answers on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut s = NomadSettings::new(&format!("http://127.0.0.1:{port}"), JOB, GROUP);
    s.request_timeout = Duration::from_secs(2);
    let e = NomadTarget::new(s)
        .expect("target")
        .nodes()
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(&e, TargetError::Failed(m) if m.contains("/v1/nodes")),
        "{e:?}"
    );
}
