//! The dispatcher's state, with no sockets and no clock of its own: which workers are
//! connected, how many credits each has granted, which tasks wait in the queue and which were
//! sent where. Every input is a call with `now`, every output a list of frames to send, so the
//! rules (credits, priority order, timeouts, reconnects, draining) are unit-tested directly.
//! [`crate::dispatch_service`] wires it to the ROUTER socket.

use crate::queue::{PriorityQueue, Pushed, QueueItem};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use transcode_core::protocol::{DispatcherFrame, WorkerFrame};
use transcode_core::TaskId;

/// A worker's credits are capped at its slots times this, so a worker that spams READY cannot
/// pull the whole queue onto itself.
pub const CREDIT_CAP_PER_SLOT: u32 = 2;
/// Largest `slots` a HELLO may claim (the worker config allows at most this many).
pub const MAX_SLOTS: u32 = 1024;
/// Longest worker id or node name accepted; they end up in logs and events.
pub const MAX_NAME: usize = 200;
/// The DONE outcome of a TASK a worker turned down unclaimed (it was draining).
pub const OUTCOME_REJECTED: &str = "rejected";

/// The dispatcher's tunables.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    /// A worker not heard from for this long is dropped.
    pub worker_timeout: Duration,
    /// A task still `queued` this long after its TASK frame was sent may be sent again.
    pub redispatch_after: Duration,
    /// Most tasks held in memory; the store holds the rest and the scan brings them back.
    pub queue_capacity: usize,
}

/// A frame for one worker, addressed by its ROUTER identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub identity: Vec<u8>,
    pub frame: DispatcherFrame,
}

/// What [`Dispatcher::offer`] did with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    Queued,
    AlreadyQueued,
    /// Sent to a worker less than `redispatch_after` ago; the worker's claim is pending.
    RecentlyDispatched,
    /// The queue is full; the task stays `queued` in the store and a later scan finds it.
    QueueFull,
}

/// A worker dropped because it went silent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostWorker {
    pub worker: String,
    pub node: String,
    pub silent_for: Duration,
    /// It had said BYE (or been drained): leaving is what it was expected to do.
    pub draining: bool,
    /// Tasks sent to it and not reported done. Those it claimed come back through the lease
    /// sweeper; those it never claimed are forgotten here so the next scan sends them again.
    pub tasks: Vec<TaskId>,
}

/// Counts for health and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchStats {
    pub workers: usize,
    pub draining: usize,
    pub free_credits: u64,
    pub queue_length: usize,
    pub in_flight: usize,
}

/// One connected worker as the autoscaler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub worker: String,
    pub node: String,
    pub slots: u32,
    /// Free slots it has announced and not been sent work for.
    pub credits: u32,
    /// Tasks sent to it and not reported done.
    pub tasks: usize,
    pub draining: bool,
}

#[derive(Debug)]
struct WorkerEntry {
    identity: Vec<u8>,
    worker: String,
    node: String,
    slots: u32,
    credits: u32,
    draining: bool,
    last_seen: Instant,
    /// Dispatch sequence number of the last task it got; the least recent wins ties.
    last_pick: u64,
    /// Registration order, the final tie-break, so picks are deterministic.
    registered: u64,
    /// When its HELLO arrived: tells a restarted incarnation from the one gossip saw die.
    hello_at: Instant,
}

impl WorkerEntry {
    fn credit_cap(&self) -> u32 {
        self.slots.saturating_mul(CREDIT_CAP_PER_SLOT)
    }
}

#[derive(Debug, Clone)]
struct InFlight {
    worker: String,
    at: Instant,
    item: QueueItem,
}

/// The dispatch state machine.
#[derive(Debug)]
pub struct Dispatcher {
    cfg: DispatchConfig,
    queue: PriorityQueue,
    /// By ROUTER identity: that is what every incoming frame names.
    workers: HashMap<Vec<u8>, WorkerEntry>,
    /// Worker id → identity, so a worker that reconnects replaces its old entry.
    by_id: HashMap<String, Vec<u8>>,
    in_flight: HashMap<TaskId, InFlight>,
    picks: u64,
    registrations: u64,
}

fn error(identity: &[u8], code: &str, message: impl Into<String>) -> Outgoing {
    Outgoing {
        identity: identity.to_vec(),
        frame: DispatcherFrame::Error {
            code: code.to_string(),
            message: message.into(),
        },
    }
}

impl Dispatcher {
    pub fn new(cfg: DispatchConfig) -> Self {
        Dispatcher {
            queue: PriorityQueue::new(cfg.queue_capacity),
            cfg,
            workers: HashMap::new(),
            by_id: HashMap::new(),
            in_flight: HashMap::new(),
            picks: 0,
            registrations: 0,
        }
    }

    /// Applies one valid frame from `identity`. Returns the replies it calls for (only error
    /// frames: the work it unlocks comes from [`Dispatcher::next_dispatches`]).
    pub fn on_frame(&mut self, identity: &[u8], frame: WorkerFrame, now: Instant) -> Vec<Outgoing> {
        if let WorkerFrame::Hello {
            worker,
            node,
            slots,
        } = frame
        {
            return self.hello(identity, worker, node, slots, now);
        }
        let Some(w) = self.workers.get_mut(identity) else {
            return vec![error(
                identity,
                "no_hello",
                "send HELLO first (the dispatcher does not know this connection)",
            )];
        };
        w.last_seen = now;
        match frame {
            WorkerFrame::Hello { .. } => {}
            WorkerFrame::Ready { credits } => {
                if !w.draining {
                    w.credits = w.credits.saturating_add(credits).min(w.credit_cap());
                }
            }
            WorkerFrame::Done { task_id, outcome } => {
                // Only the worker the task was last sent to settles it: a late DONE from an
                // earlier holder must not hide the current dispatch.
                if self
                    .in_flight
                    .get(&task_id)
                    .is_some_and(|f| f.worker == w.worker)
                {
                    let settled = self.in_flight.remove(&task_id);
                    // A draining worker turns down a TASK that crossed its BYE without claiming
                    // it: the same attempt goes straight back in line rather than waiting for
                    // a scan.
                    if outcome == OUTCOME_REJECTED {
                        if let Some(f) = settled {
                            self.queue.push(f.item);
                        }
                    }
                } else {
                    tracing::debug!(task = %task_id, worker = %w.worker, %outcome,
                        "DONE for a task not in flight to this worker");
                }
            }
            WorkerFrame::Ping => {}
            WorkerFrame::Bye => {
                if !w.draining {
                    tracing::info!(worker = %w.worker, node = %w.node, "worker is draining");
                }
                w.draining = true;
                w.credits = 0;
            }
        }
        Vec::new()
    }

    fn hello(
        &mut self,
        identity: &[u8],
        worker: String,
        node: String,
        slots: u32,
        now: Instant,
    ) -> Vec<Outgoing> {
        if worker.is_empty() || worker.len() > MAX_NAME || node.len() > MAX_NAME {
            return vec![error(
                identity,
                "invalid",
                format!("worker must be 1-{MAX_NAME} characters, node at most {MAX_NAME}"),
            )];
        }
        if slots == 0 || slots > MAX_SLOTS {
            return vec![error(
                identity,
                "invalid",
                format!("slots must be 1-{MAX_SLOTS}, got {slots}"),
            )];
        }
        // The same worker on a new connection: the old entry is stale (its socket is gone, or
        // the worker restarted), so it goes.
        if let Some(old) = self.by_id.get(&worker) {
            if old.as_slice() != identity {
                let old = old.clone();
                self.workers.remove(&old);
                tracing::info!(%worker, "worker reconnected with a new identity");
            }
        }
        // This connection used by another worker id before: that registration is over.
        if let Some(prev) = self.workers.get(identity) {
            if prev.worker != worker {
                let prev_id = prev.worker.clone();
                self.by_id.remove(&prev_id);
            }
        }
        self.registrations += 1;
        tracing::info!(%worker, %node, slots, "worker registered");
        self.by_id.insert(worker.clone(), identity.to_vec());
        self.workers.insert(
            identity.to_vec(),
            WorkerEntry {
                identity: identity.to_vec(),
                worker,
                node,
                slots,
                credits: 0,
                draining: false,
                last_seen: now,
                last_pick: 0,
                registered: self.registrations,
                hello_at: now,
            },
        );
        Vec::new()
    }

    /// Whether a scan should offer this task: not queued here, and not sent recently.
    pub fn wants(&self, id: &TaskId, now: Instant) -> bool {
        !self.queue.contains(id) && !self.recently_dispatched(id, now)
    }

    fn recently_dispatched(&self, id: &TaskId, now: Instant) -> bool {
        self.in_flight
            .get(id)
            .is_some_and(|f| now.saturating_duration_since(f.at) < self.cfg.redispatch_after)
    }

    /// Queues a task the store says is `queued`. `fresh` marks a new attempt (a recovered
    /// task): whatever was in flight for it before is void, so it is queued regardless.
    pub fn offer(&mut self, item: QueueItem, fresh: bool, now: Instant) -> Offered {
        if self.queue.contains(&item.id) {
            return Offered::AlreadyQueued;
        }
        if fresh {
            self.in_flight.remove(&item.id);
        } else if self.recently_dispatched(&item.id, now) {
            return Offered::RecentlyDispatched;
        }
        match self.queue.push(item) {
            Pushed::Added => Offered::Queued,
            Pushed::Duplicate => Offered::AlreadyQueued,
            Pushed::AddedEvicting(evicted) => {
                tracing::debug!(task = %evicted, "queue full: evicted a lower-priority task");
                Offered::Queued
            }
            Pushed::Full => Offered::QueueFull,
        }
    }

    /// Forgets a task that is no longer `queued` (it failed or was cancelled), so it is
    /// neither sent nor counted.
    pub fn forget(&mut self, id: &TaskId) {
        self.queue.remove(id);
        self.in_flight.remove(id);
    }

    /// Sends queued tasks, in priority order, to workers with free credits: each TASK uses one
    /// credit of the worker with the most free credits (ties: the least recently picked).
    pub fn next_dispatches(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while !self.queue.is_empty() {
            let Some(w) = self
                .workers
                .values_mut()
                .filter(|w| !w.draining && w.credits > 0)
                .max_by(|a, b| {
                    a.credits
                        .cmp(&b.credits)
                        .then(b.last_pick.cmp(&a.last_pick))
                        .then(b.registered.cmp(&a.registered))
                })
            else {
                break;
            };
            let Some(item) = self.queue.pop() else { break };
            self.picks += 1;
            w.credits -= 1;
            w.last_pick = self.picks;
            self.in_flight.insert(
                item.id,
                InFlight {
                    worker: w.worker.clone(),
                    at: now,
                    item,
                },
            );
            out.push(Outgoing {
                identity: w.identity.clone(),
                frame: DispatcherFrame::Task {
                    task_id: item.id,
                    attempt: item.attempt,
                },
            });
        }
        out
    }

    /// Drops workers silent for longer than the timeout, with their credits.
    pub fn expire(&mut self, now: Instant) -> Vec<LostWorker> {
        let timeout = self.cfg.worker_timeout;
        let silent: Vec<Vec<u8>> = self
            .workers
            .values()
            .filter(|w| now.saturating_duration_since(w.last_seen) > timeout)
            .map(|w| w.identity.clone())
            .collect();
        let mut lost = Vec::with_capacity(silent.len());
        for identity in silent {
            let Some(w) = self.workers.remove(&identity) else {
                continue;
            };
            if self.by_id.get(&w.worker) == Some(&identity) {
                self.by_id.remove(&w.worker);
            }
            let tasks: Vec<TaskId> = self
                .in_flight
                .iter()
                .filter(|(_, f)| f.worker == w.worker)
                .map(|(id, _)| *id)
                .collect();
            for id in &tasks {
                self.in_flight.remove(id);
            }
            lost.push(LostWorker {
                silent_for: now.saturating_duration_since(w.last_seen),
                draining: w.draining,
                worker: w.worker,
                node: w.node,
                tasks,
            });
        }
        lost
    }

    /// Asks a worker to drain: it gets a DRAIN frame and no more tasks. `None` when no worker
    /// with this id is connected.
    pub fn drain(&mut self, worker: &str) -> Option<Outgoing> {
        let identity = self.by_id.get(worker)?;
        let w = self.workers.get_mut(identity)?;
        w.draining = true;
        w.credits = 0;
        tracing::info!(worker = %w.worker, node = %w.node, "draining worker");
        Some(Outgoing {
            identity: w.identity.clone(),
            frame: DispatcherFrame::Drain,
        })
    }

    /// [`Dispatcher::drain`] for a worker gossip declared failed, last heard from at
    /// `last_seen`. A worker that restarted under the same id sent its HELLO after that, and
    /// is a new, healthy incarnation: it keeps its place (`None`).
    pub fn drain_failed(&mut self, worker: &str, last_seen: Instant) -> Option<Outgoing> {
        let identity = self.by_id.get(worker)?;
        if self.workers.get(identity)?.hello_at > last_seen {
            tracing::info!(%worker, "not draining: the worker restarted after gossip last saw it");
            return None;
        }
        self.drain(worker)
    }

    /// Every connected worker, sorted by id.
    pub fn workers(&self) -> Vec<WorkerView> {
        let mut tasks: HashMap<&str, usize> = HashMap::new();
        for f in self.in_flight.values() {
            *tasks.entry(f.worker.as_str()).or_default() += 1;
        }
        let mut out: Vec<WorkerView> = self
            .workers
            .values()
            .map(|w| WorkerView {
                worker: w.worker.clone(),
                node: w.node.clone(),
                slots: w.slots,
                credits: w.credits,
                tasks: tasks.get(w.worker.as_str()).copied().unwrap_or(0),
                draining: w.draining,
            })
            .collect();
        out.sort_by(|a, b| a.worker.cmp(&b.worker));
        out
    }

    pub fn stats(&self) -> DispatchStats {
        DispatchStats {
            workers: self.workers.len(),
            draining: self.workers.values().filter(|w| w.draining).count(),
            free_credits: self.workers.values().map(|w| u64::from(w.credits)).sum(),
            queue_length: self.queue.len(),
            in_flight: self.in_flight.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn cfg() -> DispatchConfig {
        DispatchConfig {
            worker_timeout: Duration::from_secs(10),
            redispatch_after: Duration::from_secs(30),
            queue_capacity: 1000,
        }
    }

    fn hello(worker: &str, slots: u32) -> WorkerFrame {
        WorkerFrame::Hello {
            worker: worker.into(),
            node: "n1".into(),
            slots,
        }
    }

    fn item(priority: i32) -> QueueItem {
        QueueItem {
            id: Uuid::new_v4(),
            priority,
            attempt: 1,
        }
    }

    fn tasks_for(out: &[Outgoing], identity: &[u8]) -> Vec<TaskId> {
        out.iter()
            .filter(|o| o.identity == identity)
            .filter_map(|o| match o.frame {
                DispatcherFrame::Task { task_id, .. } => Some(task_id),
                _ => None,
            })
            .collect()
    }

    fn error_code(out: &[Outgoing]) -> Option<String> {
        out.iter().find_map(|o| match &o.frame {
            DispatcherFrame::Error { code, .. } => Some(code.clone()),
            _ => None,
        })
    }

    #[test]
    fn tasks_go_out_only_against_credits() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        for _ in 0..5 {
            d.offer(item(0), false, now);
        }
        assert!(d.on_frame(b"a", hello("w1", 4), now).is_empty());
        // Registered but no credits yet: nothing goes out.
        assert!(d.next_dispatches(now).is_empty());
        d.on_frame(b"a", WorkerFrame::Ready { credits: 2 }, now);
        let out = d.next_dispatches(now);
        assert_eq!(tasks_for(&out, b"a").len(), 2);
        assert_eq!(d.stats().free_credits, 0);
        assert_eq!(d.stats().queue_length, 3);
        assert_eq!(d.stats().in_flight, 2);
        assert!(d.next_dispatches(now).is_empty());
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1 }, now);
        assert_eq!(tasks_for(&d.next_dispatches(now), b"a").len(), 1);
    }

    #[test]
    fn credits_are_capped_at_twice_the_slots() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        d.on_frame(b"a", hello("w1", 3), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1000 }, now);
        assert_eq!(d.stats().free_credits, 6);
        d.on_frame(b"a", WorkerFrame::Ready { credits: u32::MAX }, now);
        assert_eq!(d.stats().free_credits, 6);
    }

    #[test]
    fn priority_order_across_dispatches() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        let (low, mid_a, high, mid_b) = (item(-1), item(5), item(100), item(5));
        for i in [low, mid_a, high, mid_b] {
            assert_eq!(d.offer(i, false, now), Offered::Queued);
        }
        d.on_frame(b"a", hello("w1", 8), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 8 }, now);
        let out = d.next_dispatches(now);
        assert_eq!(
            tasks_for(&out, b"a"),
            vec![high.id, mid_a.id, mid_b.id, low.id]
        );
    }

    #[test]
    fn dedup_in_queue_and_in_flight() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        let t = item(0);
        assert_eq!(d.offer(t, false, now), Offered::Queued);
        assert_eq!(d.offer(t, false, now), Offered::AlreadyQueued);
        assert!(!d.wants(&t.id, now));
        d.on_frame(b"a", hello("w1", 2), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 2 }, now);
        assert_eq!(tasks_for(&d.next_dispatches(now), b"a"), vec![t.id]);
        // Sent and not yet claimed: a scan finding it still queued leaves it alone...
        let later = now + Duration::from_secs(29);
        assert!(!d.wants(&t.id, later));
        assert_eq!(d.offer(t, false, later), Offered::RecentlyDispatched);
        // ...until redispatch_after has passed: the TASK frame may have been lost.
        let much_later = now + Duration::from_secs(31);
        assert!(d.wants(&t.id, much_later));
        assert_eq!(d.offer(t, false, much_later), Offered::Queued);
        assert_eq!(tasks_for(&d.next_dispatches(much_later), b"a"), vec![t.id]);
        // A recovered task is a new attempt and is queued at once.
        let r = item(0);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1 }, now);
        d.offer(r, false, now);
        assert_eq!(tasks_for(&d.next_dispatches(now), b"a"), vec![r.id]);
        assert_eq!(d.offer(r, false, now), Offered::RecentlyDispatched);
        assert_eq!(d.offer(r, true, now), Offered::Queued);
        assert_eq!(d.stats().queue_length, 1);
        // A task that left `queued` (failed, cancelled) is dropped entirely.
        d.forget(&r.id);
        assert_eq!(d.stats().queue_length, 0);
        assert!(d.wants(&r.id, now));
    }

    #[test]
    fn done_settles_only_the_current_holder() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        let t = item(0);
        d.on_frame(b"a", hello("w1", 1), now);
        d.on_frame(b"b", hello("w2", 1), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1 }, now);
        d.offer(t, false, now);
        assert_eq!(tasks_for(&d.next_dispatches(now), b"a"), vec![t.id]);
        let done = |outcome: &str| WorkerFrame::Done {
            task_id: t.id,
            outcome: outcome.into(),
        };
        d.on_frame(b"b", done("duplicate"), now);
        assert_eq!(d.stats().in_flight, 1);
        d.on_frame(b"a", done("succeeded"), now);
        assert_eq!(d.stats().in_flight, 0);
        assert_eq!(d.stats().queue_length, 0);
    }

    #[test]
    fn a_rejected_task_goes_straight_back_in_line() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        let t = QueueItem {
            attempt: 3,
            ..item(7)
        };
        d.on_frame(b"a", hello("w1", 1), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1 }, now);
        d.offer(t, false, now);
        assert_eq!(tasks_for(&d.next_dispatches(now), b"a"), vec![t.id]);
        d.on_frame(b"a", WorkerFrame::Bye, now);
        d.on_frame(
            b"a",
            WorkerFrame::Done {
                task_id: t.id,
                outcome: OUTCOME_REJECTED.into(),
            },
            now,
        );
        assert_eq!(d.stats().in_flight, 0);
        assert_eq!(d.stats().queue_length, 1);
        d.on_frame(b"b", hello("w2", 1), now);
        d.on_frame(b"b", WorkerFrame::Ready { credits: 1 }, now);
        let out = d.next_dispatches(now);
        assert_eq!(
            out,
            vec![Outgoing {
                identity: b"b".to_vec(),
                frame: DispatcherFrame::Task {
                    task_id: t.id,
                    attempt: 3
                }
            }]
        );
    }

    #[test]
    fn most_free_credits_wins_and_ties_round_robin() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        d.on_frame(b"a", hello("w1", 8), now);
        d.on_frame(b"b", hello("w2", 8), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 4 }, now);
        d.on_frame(b"b", WorkerFrame::Ready { credits: 1 }, now);
        for _ in 0..3 {
            d.offer(item(0), false, now);
        }
        // a has 4 against b's 1: a takes three tasks, down to 1.
        let out = d.next_dispatches(now);
        assert_eq!(tasks_for(&out, b"a").len(), 3);
        // Now 2 each: ties alternate, starting with the one picked least recently (b).
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1 }, now);
        d.on_frame(b"b", WorkerFrame::Ready { credits: 1 }, now);
        let ids: Vec<QueueItem> = (0..4).map(|_| item(0)).collect();
        for i in &ids {
            d.offer(*i, false, now);
        }
        let out = d.next_dispatches(now);
        let who: Vec<&[u8]> = out.iter().map(|o| o.identity.as_slice()).collect();
        assert_eq!(who, vec![&b"b"[..], b"a", b"b", b"a"]);
    }

    #[test]
    fn frames_before_hello_are_refused() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        for f in [
            WorkerFrame::Ready { credits: 1 },
            WorkerFrame::Ping,
            WorkerFrame::Bye,
            WorkerFrame::Done {
                task_id: Uuid::new_v4(),
                outcome: "succeeded".into(),
            },
        ] {
            let out = d.on_frame(b"x", f, now);
            assert_eq!(error_code(&out).as_deref(), Some("no_hello"));
            assert_eq!(out[0].identity, b"x");
        }
        assert_eq!(d.stats().workers, 0);
        assert_eq!(
            error_code(&d.on_frame(b"x", hello("", 1), now)).as_deref(),
            Some("invalid")
        );
        assert_eq!(
            error_code(&d.on_frame(b"x", hello("w", 0), now)).as_deref(),
            Some("invalid")
        );
        assert_eq!(d.stats().workers, 0);
    }

    #[test]
    fn silent_workers_expire_with_their_credits() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(cfg());
        d.on_frame(b"a", hello("w1", 2), t0);
        d.on_frame(b"b", hello("w2", 2), t0);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 1 }, t0);
        let t = item(0);
        d.offer(t, false, t0);
        assert_eq!(tasks_for(&d.next_dispatches(t0), b"a"), vec![t.id]);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 2 }, t0);
        // b keeps pinging, a goes quiet.
        let t1 = t0 + Duration::from_secs(8);
        d.on_frame(b"b", WorkerFrame::Ping, t1);
        assert!(d.expire(t1).is_empty());
        let t2 = t0 + Duration::from_secs(11);
        let lost = d.expire(t2);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].worker, "w1");
        assert!(!lost[0].draining);
        assert_eq!(lost[0].tasks, vec![t.id]);
        let s = d.stats();
        assert_eq!((s.workers, s.free_credits, s.in_flight), (1, 0, 0));
        // Its unclaimed task is wanted again at once, without waiting for redispatch_after.
        assert!(d.wants(&t.id, t2));
        // A frame from the dropped connection must HELLO again.
        assert_eq!(
            error_code(&d.on_frame(b"a", WorkerFrame::Ping, t2)).as_deref(),
            Some("no_hello")
        );
    }

    #[test]
    fn reconnect_with_the_same_id_replaces_the_old_entry() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        d.on_frame(b"old", hello("w1", 2), now);
        d.on_frame(b"old", WorkerFrame::Ready { credits: 4 }, now);
        assert_eq!(d.stats().free_credits, 4);
        d.on_frame(b"new", hello("w1", 2), now);
        let s = d.stats();
        // One worker, credits reset to 0 until it sends READY on the new connection.
        assert_eq!((s.workers, s.free_credits), (1, 0));
        assert_eq!(
            error_code(&d.on_frame(b"old", WorkerFrame::Ping, now)).as_deref(),
            Some("no_hello")
        );
        d.on_frame(b"new", WorkerFrame::Ready { credits: 1 }, now);
        let t = item(0);
        d.offer(t, false, now);
        assert_eq!(tasks_for(&d.next_dispatches(now), b"new"), vec![t.id]);
        // A HELLO on the same connection resets its credits too.
        d.on_frame(b"new", WorkerFrame::Ready { credits: 3 }, now);
        d.on_frame(b"new", hello("w1", 2), now);
        assert_eq!(d.stats().free_credits, 0);
        assert_eq!(d.stats().workers, 1);
    }

    #[test]
    fn draining_workers_get_nothing_more() {
        let now = Instant::now();
        let mut d = Dispatcher::new(cfg());
        d.on_frame(b"a", hello("w1", 4), now);
        d.on_frame(b"b", hello("w2", 4), now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 4 }, now);
        d.on_frame(b"b", WorkerFrame::Ready { credits: 2 }, now);
        // BYE from the worker itself.
        d.on_frame(b"a", WorkerFrame::Bye, now);
        d.on_frame(b"a", WorkerFrame::Ready { credits: 4 }, now);
        for _ in 0..3 {
            d.offer(item(0), false, now);
        }
        let out = d.next_dispatches(now);
        assert!(tasks_for(&out, b"a").is_empty());
        assert_eq!(tasks_for(&out, b"b").len(), 2);
        assert_eq!(d.stats().draining, 1);
        // DRAIN asked by the scaler.
        let drain = d.drain("w2");
        assert_eq!(
            drain,
            Some(Outgoing {
                identity: b"b".to_vec(),
                frame: DispatcherFrame::Drain
            })
        );
        d.on_frame(b"b", WorkerFrame::Ready { credits: 2 }, now);
        assert!(d.next_dispatches(now).is_empty());
        assert_eq!(d.stats().draining, 2);
        assert_eq!(d.drain("nobody"), None);
    }

    #[test]
    fn a_late_failure_notice_spares_a_restarted_incarnation() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(cfg());
        d.on_frame(b"old", hello("w1", 2), t0);
        let died = t0 + Duration::from_secs(1);
        // Restarted under the same id after gossip last heard the old process.
        d.on_frame(b"new", hello("w1", 2), died + Duration::from_secs(1));
        assert_eq!(d.drain_failed("w1", died), None);
        assert_eq!(d.stats().draining, 0);
        // The incarnation gossip saw die is drained as before.
        let later = died + Duration::from_secs(5);
        assert_eq!(
            d.drain_failed("w1", later).map(|o| o.identity),
            Some(b"new".to_vec())
        );
        assert_eq!(d.stats().draining, 1);
        assert_eq!(d.drain_failed("nobody", later), None);
    }
}
