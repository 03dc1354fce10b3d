//! The scaler's metric names and help texts, declared in one place so `/metrics` lists every
//! family from the first scrape (an absent series and a zero look different to alerting).

use transcode_core::metrics::{Kind, Registry};

pub const QUEUE_LENGTH: &str = "transcode_queue_length";
pub const IN_FLIGHT: &str = "transcode_tasks_in_flight";
pub const WORKERS: &str = "transcode_workers";
pub const FREE_CREDITS: &str = "transcode_worker_free_credits";
pub const DISPATCHED: &str = "transcode_tasks_dispatched_total";
pub const DONE: &str = "transcode_tasks_done_total";
pub const REJECTED: &str = "transcode_frames_rejected_total";
pub const INTAKE_REQUESTS: &str = "transcode_intake_requests_total";
pub const RECOVERED: &str = "transcode_tasks_recovered_total";
pub const WORKERS_LOST: &str = "transcode_workers_lost_total";
pub const SCANS: &str = "transcode_scans_total";
pub const SCAN_ENQUEUED: &str = "transcode_scan_enqueued_total";
pub const STORE_ERRORS: &str = "transcode_store_errors_total";
pub const EVENTS_PUBLISHED: &str = "transcode_events_published_total";

/// Declares every family the scaler exports.
pub fn describe(r: &Registry) {
    use Kind::{Counter, Gauge};
    let families: [(&str, Kind, &str); 14] = [
        (QUEUE_LENGTH, Gauge, "Tasks waiting in the dispatch queue."),
        (
            IN_FLIGHT,
            Gauge,
            "Tasks sent to a worker and not yet reported done.",
        ),
        (
            WORKERS,
            Gauge,
            "Workers registered on the dispatch socket (draining included).",
        ),
        (
            FREE_CREDITS,
            Gauge,
            "Credits workers have granted and the dispatcher has not used.",
        ),
        (DISPATCHED, Counter, "TASK frames sent to workers."),
        (DONE, Counter, "DONE frames received, by outcome."),
        (
            REJECTED,
            Counter,
            "Frames refused, by socket and error code.",
        ),
        (
            INTAKE_REQUESTS,
            Counter,
            "Intake requests answered, by outcome.",
        ),
        (
            RECOVERED,
            Counter,
            "Tasks recovered from a lost worker (lease sweeper or gossip), by resulting status.",
        ),
        (
            WORKERS_LOST,
            Counter,
            "Workers dropped because they went silent without draining first.",
        ),
        (
            SCANS,
            Counter,
            "Scans of the queued tasks in the store, by result.",
        ),
        (
            SCAN_ENQUEUED,
            Counter,
            "Tasks the scan found queued in the store but not in memory.",
        ),
        (
            STORE_ERRORS,
            Counter,
            "Store calls that failed, by operation.",
        ),
        (
            EVENTS_PUBLISHED,
            Counter,
            "Events the scaler published on the bus.",
        ),
    ];
    for (name, kind, help) in families {
        r.describe(name, kind, help);
    }
}
