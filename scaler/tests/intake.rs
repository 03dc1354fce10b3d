//! The intake socket of a real `transcode-scaler`: submits by spec and by id, the error codes a
//! publisher can get, and garbage from raw sockets that must be refused, counted, and must not
//! stop the loop from serving the next request.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;
use transcode_core::store::{Fence, Patch};
use transcode_core::TaskStatus;

#[test]
fn submit_spec_inserts_a_queued_task_with_its_event() {
    let scaler = Scaler::start(&[]);
    let s = scaler.socket(zmq::REQ, "intake");
    let r = req(&s, &json!({"v":1,"op":"submit","spec":spec(7)}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["created"], true, "{r}");
    let id = r["task_id"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("task id");

    let store = scaler.store();
    let task = block_on(store.get_task(id)).expect("row exists");
    assert_eq!(task.status, TaskStatus::Queued);
    assert_eq!(task.priority, 7);
    assert_eq!(event_types(&store, id), vec!["TaskQueued"]);
    let ev = block_on(store.events(&transcode_core::store::EventFilter {
        task_id: Some(id),
        limit: 10,
        ..Default::default()
    }))
    .expect("events");
    assert_eq!(ev[0].data["via"], "intake");
    assert_eq!(ev[0].source, "scaler-test");
    // Queued in memory, waiting for a worker.
    scaler.wait_metric("transcode_queue_length", |v| v == 1.0);
    scaler.wait_metric("transcode_intake_requests_total{outcome=\"ok\"}", |v| {
        v == 1.0
    });
}

#[test]
fn idempotency_key_returns_the_first_task() {
    let scaler = Scaler::start(&[]);
    let s = scaler.socket(zmq::REQ, "intake");
    let mut sp = serde_json::to_value(spec(0)).expect("spec");
    sp["idempotency_key"] = json!("cat-v1");
    let first = req(&s, &json!({"v":1,"op":"submit","spec":sp}));
    let again = req(&s, &json!({"v":1,"op":"submit","spec":sp}));
    assert_eq!(first["created"], true, "{first}");
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(first["task_id"], again["task_id"]);
    // Same key, different spec: a conflict, not a silent overwrite.
    sp["priority"] = json!(9);
    let clash = req(&s, &json!({"v":1,"op":"submit","spec":sp}));
    assert_eq!(clash["ok"], false, "{clash}");
    assert_eq!(clash["error"]["code"], "idempotency_conflict", "{clash}");
}

#[test]
fn submit_by_id_queued_unknown_and_not_queued() {
    let scaler = Scaler::start(&[]);
    let store = scaler.store();
    let s = scaler.socket(zmq::REQ, "intake");

    let queued = insert(&store, 3);
    let r = req(&s, &json!({"v":1,"op":"submit","task_id":queued}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["task_id"], json!(queued));
    // A second submit of the same id is fine and does not queue it twice.
    let r = req(&s, &json!({"v":1,"op":"submit","task_id":queued}));
    assert_eq!(r["ok"], true, "{r}");
    scaler.wait_metric("transcode_queue_length", |v| v == 1.0);

    let unknown = uuid::Uuid::now_v7();
    let r = req(&s, &json!({"v":1,"op":"submit","task_id":unknown}));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "not_found", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&unknown.to_string())),
        "{r}"
    );

    let cancelled = insert(&store, 0);
    block_on(store.transition(
        cancelled,
        Fence::Admin,
        TaskStatus::Cancelled,
        &Patch::default(),
        &[],
    ))
    .expect("cancel");
    let r = req(&s, &json!({"v":1,"op":"submit","task_id":cancelled}));
    assert_eq!(r["error"]["code"], "not_queued", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cancelled")),
        "{r}"
    );
}

#[test]
fn invalid_spec_names_the_field() {
    let scaler = Scaler::start(&[]);
    let s = scaler.socket(zmq::REQ, "intake");
    let mut sp = serde_json::to_value(spec(0)).expect("spec");
    sp["renditions"] = json!([{"name":"odd","width":641,"height":360,"video_kbps":800}]);
    let r = req(&s, &json!({"v":1,"op":"submit","spec":sp}));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "invalid_spec", "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("renditions[0].width"), "{r}");

    let mut sp = serde_json::to_value(spec(0)).expect("spec");
    sp["output"] = json!("s3://media/out/no-slash");
    let r = req(&s, &json!({"v":1,"op":"submit","spec":sp}));
    assert_eq!(r["error"]["code"], "invalid_spec", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("output")),
        "{r}"
    );
    // Nothing was written.
    let rows = block_on(scaler.store().queued_tasks(10)).expect("queued");
    assert!(rows.is_empty(), "{rows:?}");
}

/// Sends `parts` from a DEALER (which can send anything), expects a reply with `code`, then
/// checks that a ping still gets an answer.
fn refused(dealer: &zmq::Socket, parts: Vec<Vec<u8>>, code: &str) {
    dealer.send_multipart(parts, 0).expect("send junk");
    let reply = recv_parts(dealer);
    let body: serde_json::Value =
        serde_json::from_slice(reply.last().expect("a part")).expect("json reply");
    assert_eq!(body["ok"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    dealer
        .send(json!({"v":1,"op":"ping"}).to_string().as_bytes(), 0)
        .expect("ping");
    let pong = recv_parts(dealer);
    let pong: serde_json::Value = serde_json::from_slice(&pong[0]).expect("pong json");
    assert_eq!(pong["ok"], true, "after {code}: {pong}");
}

#[test]
fn garbage_is_refused_counted_and_the_loop_keeps_serving() {
    let scaler = Scaler::start(&[]);
    let d = scaler.socket(zmq::DEALER, "intake");
    let oversized = {
        let mut v = br#"{"v":1,"op":"ping","pad":""#.to_vec();
        v.extend(std::iter::repeat_n(b'x', 70 * 1024));
        v.extend(br#""}"#);
        v
    };
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![b"\xff\x00garbage".to_vec()], "malformed"),
        (vec![b"[1,2,3]".to_vec()], "malformed"),
        (vec![br#"{"v":2,"op":"ping"}"#.to_vec()], "bad_version"),
        (vec![br#"{"v":1,"op":"explode"}"#.to_vec()], "unknown_op"),
        (
            vec![br#"{"v":1,"op":"submit","task_id":"nope"}"#.to_vec()],
            "invalid",
        ),
        (vec![oversized], "oversized"),
        (
            vec![b"junk".to_vec(), b"more".to_vec(), b"parts".to_vec()],
            "bad_envelope",
        ),
    ];
    for (parts, code) in cases {
        refused(&d, parts, code);
    }
    // A REQ client's junk is answered through its envelope too (it would hang otherwise).
    let r = scaler.socket(zmq::REQ, "intake");
    r.send("not json", 0).expect("send");
    let reply: serde_json::Value =
        serde_json::from_slice(&r.recv_bytes(0).expect("reply")).expect("json");
    assert_eq!(reply["error"]["code"], "malformed", "{reply}");
    r.send_multipart([&b"a"[..], b"b"], 0)
        .expect("send multipart");
    let reply: serde_json::Value =
        serde_json::from_slice(&r.recv_bytes(0).expect("reply")).expect("json");
    assert_eq!(reply["error"]["code"], "bad_envelope", "{reply}");

    let metrics = scaler.metrics();
    for (code, n) in [
        ("malformed", 3.0),
        ("bad_version", 1.0),
        ("unknown_op", 1.0),
        ("invalid", 1.0),
        ("oversized", 1.0),
        ("bad_envelope", 2.0),
    ] {
        let series =
            format!("transcode_frames_rejected_total{{socket=\"intake\",code=\"{code}\"}}");
        assert_eq!(
            metric_value(&metrics, &series),
            Some(n),
            "{series}\n{metrics}"
        );
    }
    assert_eq!(
        metric_value(
            &metrics,
            "transcode_intake_requests_total{outcome=\"rejected\"}"
        ),
        Some(9.0),
        "{metrics}"
    );
    let log = scaler.log_text();
    assert!(
        log.contains("frame rejected") && log.contains("WARN"),
        "{log}"
    );
}

#[test]
fn health_reports_ok_and_counts_and_sigterm_exits_zero() {
    let mut scaler = Scaler::start(&[]);
    submit(&scaler, 0);
    let (code, body) = scaler.http_get("/v1/health");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).expect("health json");
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["details"]["store"], "ok", "{h}");
    assert_eq!(h["details"]["sockets"], "bound", "{h}");
    assert_eq!(h["details"]["queue_length"], 1, "{h}");
    assert_eq!(h["details"]["workers"], 0, "{h}");
    let status = scaler.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(scaler.log_text().contains("scaler stopped"));
}

#[test]
fn bus_carries_intake_events_and_forwards_other_publishers() {
    let scaler = Scaler::start(&[]);
    let sub = scaler.socket(zmq::SUB, "events_pub");
    sub.set_subscribe(b"").expect("subscribe");
    sub.set_rcvtimeo(200).expect("short timeout");
    // A subscription takes a moment to reach the publishers; submit until an event arrives.
    let deadline = std::time::Instant::now() + WAIT;
    let (topic, ev) = loop {
        let id = submit(&scaler, 0);
        if let Ok(parts) = sub.recv_multipart(0) {
            let ev: serde_json::Value = serde_json::from_slice(&parts[1]).expect("cloudevent");
            if ev["subject"] == json!(id) || ev["type"] == "TaskQueued" {
                break (parts[0].clone(), ev);
            }
        }
        assert!(std::time::Instant::now() < deadline, "no event on the bus");
    };
    assert_eq!(topic, b"TaskQueued");
    assert_eq!(ev["specversion"], "1.0");
    assert_eq!(ev["source"], "scaler-test");
    assert!(ev["subject"].is_string(), "{ev}");
    // The event on the bus is the one in the database.
    let id = ev["subject"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("id");
    let stored = block_on(scaler.store().events(&transcode_core::store::EventFilter {
        task_id: Some(id),
        limit: 10,
        ..Default::default()
    }))
    .expect("events");
    assert_eq!(json!(stored[0].id), ev["id"]);

    // Another process's PUB on the XSUB side reaches the subscriber through the forwarder.
    let publ = scaler.socket(zmq::PUB, "events_sub");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        publ.send_multipart([&b"HeartbeatReceived"[..], br#"{"x":1}"#], 0)
            .expect("publish");
        match sub.recv_multipart(0) {
            Ok(p) if p[0] == b"HeartbeatReceived" => break,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "forwarder passed nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
