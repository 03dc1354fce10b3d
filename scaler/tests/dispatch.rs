//! The dispatch socket of a real `transcode-scaler`, driven by fake workers (raw DEALER
//! sockets): credit-based delivery in priority order, several workers, garbage frames, silent
//! workers, draining, and tasks that reached the store while the scaler was down.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

/// How long "nothing more arrives" is watched for. Only absence is checked, never a duration.
const QUIET: Duration = Duration::from_millis(300);

#[test]
fn worker_gets_tasks_in_priority_order_never_beyond_its_credits() {
    let scaler = Scaler::start(&[]);
    let low = submit(&scaler, -3);
    let mid = submit(&scaler, 5);
    let zero = submit(&scaler, 0);
    let high = submit(&scaler, 10);
    let w = worker(&scaler, "w1", 4);
    ready(&w, 2);
    let first = recv_frame(&w);
    let second = recv_frame(&w);
    assert_eq!(task_id_of(&first), high);
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["v"], 1);
    assert_eq!(task_id_of(&second), mid);
    assert_eq!(poll_frame(&w, QUIET), None, "more TASK frames than credits");
    scaler.wait_metric("transcode_tasks_in_flight", |v| v == 2.0);
    scaler.wait_metric("transcode_queue_length", |v| v == 2.0);

    ready(&w, 2);
    assert_eq!(task_id_of(&recv_frame(&w)), zero);
    assert_eq!(task_id_of(&recv_frame(&w)), low);
    assert_eq!(scaler.metric("transcode_tasks_dispatched_total"), Some(4.0));

    // DONE settles a task; its outcome is counted.
    let done = json!({"v":1,"op":"done","task_id":high,"outcome":"succeeded"});
    w.send(done.to_string().as_bytes(), 0).expect("done");
    scaler.wait_metric("transcode_tasks_in_flight", |v| v == 3.0);
    scaler.wait_metric("transcode_tasks_done_total{outcome=\"succeeded\"}", |v| {
        v == 1.0
    });
}

#[test]
fn a_second_worker_gets_the_rest() {
    let scaler = Scaler::start(&[]);
    let ids: Vec<_> = (0..4).map(|_| submit(&scaler, 0)).collect();
    let a = worker(&scaler, "wa", 1);
    ready(&a, 1);
    let got_a = task_id_of(&recv_frame(&a));
    let b = worker(&scaler, "wb", 4);
    ready(&b, 4);
    let got_b: Vec<_> = (0..3).map(|_| task_id_of(&recv_frame(&b))).collect();
    assert_eq!(got_a, ids[0]);
    assert_eq!(got_b, ids[1..].to_vec());
    assert_eq!(poll_frame(&a, QUIET), None);
    assert_eq!(poll_frame(&b, QUIET), None);
    let (_, body) = scaler.http_get("/v1/health");
    let h: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(h["details"]["workers"], 2, "{h}");
    assert_eq!(h["details"]["free_credits"], 1, "{h}");
    assert_eq!(h["details"]["in_flight"], 4, "{h}");
}

fn error_code(frame: &serde_json::Value) -> &str {
    assert_eq!(frame["op"], "error", "expected an error frame, got {frame}");
    frame["code"].as_str().unwrap_or_default()
}

#[test]
fn garbage_on_dispatch_gets_an_error_frame_and_the_loop_continues() {
    let scaler = Scaler::start(&[]);
    let id = submit(&scaler, 0);
    let d = scaler.socket(zmq::DEALER, "dispatch");
    // Before HELLO, even a valid frame is refused.
    ready(&d, 1);
    assert_eq!(error_code(&recv_frame(&d)), "no_hello");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x00\x01 not json".to_vec(), "malformed"),
        (br#"{"v":1,"op":"steal"}"#.to_vec(), "unknown_op"),
        (
            br#"{"v":3,"op":"ready","credits":1}"#.to_vec(),
            "bad_version",
        ),
        (br#"{"v":1,"op":"ready","credits":-4}"#.to_vec(), "invalid"),
        (vec![b' '; 9 * 1024], "oversized"),
    ];
    for (bytes, code) in cases {
        d.send(bytes, 0).expect("send");
        assert_eq!(error_code(&recv_frame(&d)), code);
    }
    d.send_multipart([&b"a"[..], b"b"], 0).expect("multipart");
    assert_eq!(error_code(&recv_frame(&d)), "bad_envelope");
    // The same connection can still register and work.
    let hello = json!({"v":1,"op":"hello","worker":"w1","node":"n","slots":1});
    d.send(hello.to_string().as_bytes(), 0).expect("hello");
    ready(&d, 1);
    assert_eq!(task_id_of(&recv_frame(&d)), id);

    let metrics = scaler.metrics();
    for code in [
        "no_hello",
        "malformed",
        "unknown_op",
        "bad_version",
        "invalid",
        "oversized",
        "bad_envelope",
    ] {
        let series =
            format!("transcode_frames_rejected_total{{socket=\"dispatch\",code=\"{code}\"}}");
        assert_eq!(
            metric_value(&metrics, &series),
            Some(1.0),
            "{series}\n{metrics}"
        );
    }
}

#[test]
fn task_inserted_while_the_scaler_was_down_is_dispatched_after_start() {
    let dir = prepared_dir();
    let id = block_on(async {
        let store = transcode_core::store::open(&db_url(dir.path()), 1)
            .await
            .expect("open");
        let ev = transcode_core::Origin::new("publisher", "elsewhere").event(
            None,
            transcode_core::EventBody::TaskQueued(transcode_core::events::TaskQueued {
                priority: 0,
                via: "store".into(),
            }),
        );
        store
            .insert_task(&spec(0), &[ev])
            .await
            .expect("insert")
            .task
            .id
    });
    let scaler = Scaler::start_in(dir, &[]);
    let w = worker(&scaler, "w1", 1);
    ready(&w, 1);
    let frame = recv_frame(&w);
    assert_eq!(task_id_of(&frame), id);
    assert_eq!(frame["attempt"], 1);
    scaler.wait_metric("transcode_scan_enqueued_total", |v| v == 1.0);
}

#[test]
fn periodic_scan_finds_rows_written_behind_its_back() {
    let scaler = Scaler::start(&["--scan-interval-ms", "100"]);
    let w = worker(&scaler, "w1", 2);
    ready(&w, 2);
    // Written straight to the store, never announced on intake (a lost message).
    let id = insert(&scaler.store(), 0);
    assert_eq!(task_id_of(&recv_frame(&w)), id);
    // Dispatched, not yet claimed, still `queued`: later scans must not send it again before
    // redispatch-after (30 s by default).
    assert_eq!(poll_frame(&w, QUIET), None);
}

#[test]
fn unclaimed_task_is_sent_again_after_redispatch_after() {
    let scaler = Scaler::start(&["--scan-interval-ms", "100", "--redispatch-after-ms", "300"]);
    let id = submit(&scaler, 0);
    let w = worker(&scaler, "w1", 2);
    ready(&w, 2);
    assert_eq!(task_id_of(&recv_frame(&w)), id);
    // The worker never claims it (as if the frame were lost): it comes again.
    assert_eq!(task_id_of(&recv_frame(&w)), id);
}

#[test]
fn draining_worker_gets_no_more_tasks() {
    let scaler = Scaler::start(&[]);
    let a = worker(&scaler, "wa", 2);
    ready(&a, 2);
    a.send(json!({"v":1,"op":"bye"}).to_string().as_bytes(), 0)
        .expect("bye");
    // Credits offered after BYE do not count.
    ready(&a, 2);
    let b = worker(&scaler, "wb", 1);
    ready(&b, 1);
    // BYE seen (so the READY before it is too), and b's credit registered.
    wait_health(&scaler, "draining", 1);
    scaler.wait_metric("transcode_worker_free_credits", |v| v == 1.0);
    let id = submit(&scaler, 0);
    assert_eq!(task_id_of(&recv_frame(&b)), id);
    let other = submit(&scaler, 0);
    assert_eq!(poll_frame(&a, QUIET), None, "a draining worker got a task");
    // It waits for a worker that takes work.
    ready(&b, 1);
    assert_eq!(task_id_of(&recv_frame(&b)), other);
}

/// Polls the scaler's log until it contains `text`, within the wait.
fn wait_log(scaler: &Scaler, text: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while !scaler.log_text().contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "log never said {text:?}:\n{}",
            scaler.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `/v1/health` until `details.<field>` equals `want`, within the wait.
fn wait_health(scaler: &Scaler, field: &str, want: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = scaler.http_get("/v1/health");
        let h: serde_json::Value = serde_json::from_str(&body).expect("json");
        if h["details"][field] == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{field} never became {want}: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn silent_worker_is_dropped_with_its_credits() {
    let scaler = Scaler::start(&["--worker-timeout-ms", "300"]);
    let w = worker(&scaler, "w1", 2);
    ready(&w, 2);
    // A worker that drained first and then went away is no failure.
    let drained = worker(&scaler, "w2", 1);
    drained
        .send(json!({"v":1,"op":"bye"}).to_string().as_bytes(), 0)
        .expect("bye");
    // Neither says anything more: both are dropped after the timeout; only w1 with a WARN.
    scaler.wait_metric("transcode_workers_lost_total", |v| v == 1.0);
    scaler.wait_metric("transcode_workers", |v| v == 0.0);
    wait_log(&scaler, "drained worker left");
    assert_eq!(scaler.metric("transcode_workers_lost_total"), Some(1.0));
    assert_eq!(scaler.metric("transcode_worker_free_credits"), Some(0.0));
    assert!(scaler.log_text().contains("went silent"));
    // A task submitted now waits; the dropped connection must say HELLO again.
    let id = submit(&scaler, 0);
    assert_eq!(poll_frame(&w, QUIET), None);
    w.send(json!({"v":1,"op":"ping"}).to_string().as_bytes(), 0)
        .expect("ping");
    assert_eq!(error_code(&recv_frame(&w)), "no_hello");
    let hello = json!({"v":1,"op":"hello","worker":"w1","node":"n","slots":2});
    w.send(hello.to_string().as_bytes(), 0).expect("hello");
    ready(&w, 1);
    assert_eq!(task_id_of(&recv_frame(&w)), id);
}

#[test]
fn reconnecting_worker_replaces_its_old_entry() {
    let scaler = Scaler::start(&[]);
    let old = worker(&scaler, "w1", 2);
    ready(&old, 4);
    scaler.wait_metric("transcode_worker_free_credits", |v| v == 4.0);
    // The same worker id on a new connection (a restart): one entry, credits reset.
    let new = worker(&scaler, "w1", 2);
    scaler.wait_metric("transcode_worker_free_credits", |v| v == 0.0);
    assert_eq!(scaler.metric("transcode_workers"), Some(1.0));
    ready(&new, 1);
    let id = submit(&scaler, 0);
    assert_eq!(task_id_of(&recv_frame(&new)), id);
    assert_eq!(poll_frame(&old, QUIET), None);
}
