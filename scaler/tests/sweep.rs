//! The lease sweeper of a real `transcode-scaler`: a task claimed by a worker that then
//! vanished (its lease runs out) is requeued in the store, its `TaskRequeued` event is logged
//! and published, and it is dispatched again to a live worker as a new attempt.

mod common;

use common::*;
use std::time::Duration;
use transcode_core::TaskStatus;

#[test]
fn expired_lease_is_requeued_and_dispatched_again() {
    // Scans are made rare so that only the sweeper can bring the task back.
    let scaler = Scaler::start(&["--sweep-interval-ms", "100", "--scan-interval-ms", "600000"]);
    let sub = scaler.socket(zmq::SUB, "events_pub");
    sub.set_subscribe(b"TaskQueued").expect("subscribe");
    sub.set_subscribe(b"TaskRequeued").expect("subscribe");
    sub.set_rcvtimeo(200).expect("short timeout");
    // A subscription takes a moment to reach the publisher: submit low-priority tasks until
    // one is seen, so the TaskRequeued published later cannot be missed.
    let deadline = std::time::Instant::now() + WAIT;
    while sub.recv_multipart(0).is_err() {
        submit(&scaler, -100);
        assert!(
            std::time::Instant::now() < deadline,
            "the bus never delivered"
        );
    }
    sub.set_rcvtimeo(WAIT.as_millis() as i32).expect("timeout");
    // The start-up scan is over, so nothing but the sweeper will notice the task below.
    scaler.wait_metric("transcode_scans_total{result=\"ok\"}", |v| v >= 1.0);

    let store = scaler.store();
    let id = insert(&store, 0);
    // A worker that is gone claimed it; its lease runs out at once.
    claim(&store, id, Duration::from_millis(1));

    let ev = loop {
        let parts = sub.recv_multipart(0).expect("TaskRequeued on the bus");
        if parts[0] == b"TaskRequeued" {
            break serde_json::from_slice::<serde_json::Value>(&parts[1]).expect("cloudevent");
        }
    };
    assert_eq!(ev["subject"], serde_json::json!(id));
    assert_eq!(ev["data"]["status"], "queued");
    assert_eq!(ev["data"]["reason"], "lease expired");

    let task = block_on(store.get_task(id)).expect("task");
    assert_eq!(task.status, TaskStatus::Queued);
    assert_eq!(task.attempts, 1);
    let types = event_types(&store, id);
    assert!(types.iter().any(|t| t == "TaskRequeued"), "{types:?}");
    scaler.wait_metric("transcode_tasks_recovered_total{status=\"queued\"}", |v| {
        v == 1.0
    });
    let log = scaler.log_text();
    assert!(
        log.contains("lease expired") && log.contains("WARN"),
        "{log}"
    );

    // A live worker gets it before the lower-priority warm-up tasks, as a second attempt.
    let w = worker(&scaler, "live", 1);
    ready(&w, 1);
    let frame = recv_frame(&w);
    assert_eq!(task_id_of(&frame), id);
    assert_eq!(frame["attempt"], 2, "{frame}");
}

#[test]
fn attempts_run_out_and_the_task_fails_instead() {
    let scaler = Scaler::start(&["--sweep-interval-ms", "100", "--scan-interval-ms", "600000"]);
    scaler.wait_metric("transcode_scans_total{result=\"ok\"}", |v| v >= 1.0);
    let store = scaler.store();
    let mut sp = spec(0);
    sp.max_attempts = Some(1);
    let id = block_on(store.insert_task(&sp, &[]))
        .expect("insert")
        .task
        .id;
    claim(&store, id, Duration::from_millis(1));
    scaler.wait_metric("transcode_tasks_recovered_total{status=\"failed\"}", |v| {
        v == 1.0
    });
    let task = block_on(store.get_task(id)).expect("task");
    assert_eq!(task.status, TaskStatus::Failed);
    // Nothing to dispatch.
    assert_eq!(scaler.metric("transcode_queue_length"), Some(0.0));
}
