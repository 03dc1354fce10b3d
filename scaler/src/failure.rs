//! Gossip-driven failure detection and recovery (ARCHITECTURE §7). It runs the scaler's gossip
//! member and reacts to what gossip says: a WORKER marked failed has its running tasks marked
//! `incomplete` and requeued (one store transaction each, with the attempts rule), a
//! ContainerFailureDetected event goes to the store and the bus, the requeued tasks go back
//! to the dispatcher, the worker's credits are dropped and an alert is raised (WARN log and a
//! metric). A graceful leave only drops the credits. Heartbeats and table merges go on the
//! bus as they happen; the store gets `members.last_seen` in batches and at most one
//! heartbeat row per member per interval (always one on a state change). The lease sweeper in
//! `recovery.rs` stays as the backstop for anything gossip misses.
//!
//! It holds its own store handle and bus publisher, so it can be started beside a running
//! [`crate::Scaler`] without reaching into it.

use crate::dispatch_service::DispatchHandle;
use crate::queue::QueueItem;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use transcode_core::bus::{self, Publisher, SocketHandle};
use transcode_core::events::{ContainerFailureDetected, GossipTableMerged, HeartbeatReceived};
use transcode_core::membership::{
    MemberInfo, MemberState, MemberTags, Membership, MembershipEvent, Settings,
};
use transcode_core::metrics::{Kind, Registry};
use transcode_core::store::Member;
use transcode_core::{Event, EventBody, Origin, Store, TaskStatus};

pub const HEARTBEATS: &str = "transcode_gossip_heartbeats_total";
pub const MEMBERS: &str = "transcode_gossip_members";
pub const SUSPECT: &str = "transcode_gossip_suspect_members";
pub const FAILED: &str = "transcode_gossip_failed_members";
pub const LAST_SEEN: &str = "transcode_gossip_member_last_seen_seconds";
pub const FAILURES: &str = "transcode_container_failures_total";

/// How often `members.last_seen` is written and the gauges refreshed.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// What the failure loop needs from the scaler.
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub dispatch: DispatchHandle,
    pub metrics: Arc<Registry>,
    pub origin: Origin,
    /// The scaler's event XSUB endpoint, where this loop publishes.
    pub events_sub: String,
    /// At most one heartbeat row per member per this long.
    pub row_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error(transparent)]
    Membership(#[from] transcode_core::membership::MembershipError),
    #[error("gossip event publisher: {0}")]
    Bus(#[from] transcode_core::bus::BusError),
}

/// The running gossip member and its loop. Stop it with [`Gossip::shutdown`] before the
/// scaler's own shutdown: it holds a dispatcher handle.
pub struct Gossip {
    membership: Arc<Membership>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    pub_socket: SocketHandle,
    ctx: zmq::Context,
}

fn describe(r: &Registry) {
    r.describe(
        HEARTBEATS,
        Kind::Counter,
        "Gossip heartbeats (probe acks) received, by member.",
    );
    r.describe(MEMBERS, Kind::Gauge, "Gossip members by state.");
    r.describe(SUSPECT, Kind::Gauge, "Gossip members suspected of failure.");
    r.describe(FAILED, Kind::Gauge, "Gossip members marked failed.");
    r.describe(
        LAST_SEEN,
        Kind::Gauge,
        "Seconds since each member's last heartbeat.",
    );
    r.describe(
        FAILURES,
        Kind::Counter,
        "Workers gossip marked failed (alert on any increase).",
    );
}

impl Gossip {
    pub async fn start(settings: &Settings, deps: Deps) -> Result<Gossip, GossipError> {
        describe(&deps.metrics);
        let tags = MemberTags {
            role: "scaler".into(),
            node: deps.origin.node.clone(),
            state: "active".into(),
            ..MemberTags::default()
        };
        let (membership, rx) = Membership::start(&deps.origin.member, settings, tags).await?;
        let membership = Arc::new(membership);
        membership.join_in_background(settings.join.clone());
        let ctx = zmq::Context::new();
        let (publisher, pub_socket) = bus::publisher(&ctx, &deps.events_sub)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(membership.clone(), rx, deps, publisher, stop_rx));
        Ok(Gossip {
            membership,
            stop,
            task,
            pub_socket,
            ctx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.membership.local_addr()
    }

    /// The member table as gossip sees it now, for the autoscaler.
    pub fn members_fn(&self) -> crate::autoscale::MembersFn {
        let m = Arc::downgrade(&self.membership);
        Arc::new(move || m.upgrade().map(|m| m.members()).unwrap_or_default())
    }

    /// Leaves the cluster (a scaler that stops is not a failure) and stops the loop.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.membership.leave().await;
        let _ = self.task.await;
        let Gossip {
            pub_socket, ctx, ..
        } = self;
        let _ = tokio::task::spawn_blocking(move || {
            pub_socket.close();
            drop(ctx);
        })
        .await;
    }
}

struct Loop {
    deps: Deps,
    publisher: Publisher,
    /// Member → when its last heartbeat row was written.
    last_row: HashMap<String, Instant>,
}

impl Loop {
    fn emit(&self, ev: &Event) {
        self.publisher.publish(ev);
    }

    async fn store_events(&self, events: &[Event]) {
        if let Err(e) = self.deps.store.append_events(events).await {
            tracing::warn!(error = %e, "gossip events not stored");
        }
    }

    async fn on_event(&mut self, ev: MembershipEvent) {
        match ev {
            MembershipEvent::Heartbeat { member, rtt } => {
                self.deps.metrics.inc(HEARTBEATS, &[("member", &member)]);
                let e = self.deps.origin.event(
                    None,
                    EventBody::HeartbeatReceived(HeartbeatReceived {
                        member: member.clone(),
                        rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
                    }),
                );
                self.emit(&e);
                let due = self
                    .last_row
                    .get(&member)
                    .is_none_or(|t| t.elapsed() >= self.deps.row_interval);
                if due {
                    self.last_row.insert(member, Instant::now());
                    self.store_events(&[e]).await;
                }
            }
            MembershipEvent::Merged { count, changes } => {
                let e = self.deps.origin.event(
                    None,
                    EventBody::GossipTableMerged(GossipTableMerged {
                        merged: count,
                        changes: changes.clone(),
                    }),
                );
                self.emit(&e);
                // A state change always gets a row.
                if !changes.is_empty() {
                    self.store_events(&[e]).await;
                }
            }
            MembershipEvent::Failed(m) if m.tags.role == "worker" => self.worker_failed(&m).await,
            MembershipEvent::Failed(m) => {
                tracing::warn!(member = %m.id, role = %m.tags.role, "gossip member failed");
            }
            MembershipEvent::Left(m) => {
                tracing::info!(member = %m.id, node = %m.tags.node, "member left gracefully");
                if m.tags.role == "worker" {
                    self.deps.dispatch.drain(&m.id);
                }
            }
            MembershipEvent::Joined(m) | MembershipEvent::Updated(m) => {
                tracing::debug!(member = %m.id, state = %m.state, "gossip member up");
            }
        }
    }

    /// The recovery sequence of ARCHITECTURE §7, in order.
    async fn worker_failed(&mut self, m: &MemberInfo) {
        let d = &self.deps;
        let tasks = match d.store.tasks_of_worker(&m.id).await {
            Ok(t) => t,
            Err(e) => {
                // The lease sweeper will recover them when their leases run out.
                tracing::error!(member = %m.id, error = %e,
                    "cannot read the failed worker's tasks; leaving them to the lease sweeper");
                Vec::new()
            }
        };
        let task_ids: Vec<_> = tasks.iter().map(|t| t.id).collect();
        let detected = d.origin.event(
            None,
            EventBody::ContainerFailureDetected(ContainerFailureDetected {
                member: m.id.clone(),
                node: m.tags.node.clone(),
                task_ids: task_ids.clone(),
            }),
        );
        d.metrics.inc(FAILURES, &[("node", &m.tags.node)]);
        tracing::warn!(member = %m.id, node = %m.tags.node, tasks = ?task_ids,
            "ALERT: gossip marked a worker failed; recovering its tasks");
        // The detection event commits with the first task's incomplete → queued step, so the
        // log never shows a requeue without its cause.
        let mut pending = vec![detected.clone()];
        let mut requeue = Vec::new();
        let mut gone = Vec::new();
        let mut requeued_events = Vec::new();
        for t in &tasks {
            match d
                .store
                .recover_task(
                    t.id,
                    transcode_core::store::Fence::Admin,
                    &d.origin,
                    "worker failed (gossip)",
                    &pending,
                )
                .await
            {
                Ok(r) => {
                    pending.clear();
                    // Same counter as the lease sweeper's, so one metric counts every recovery.
                    d.metrics.inc(
                        crate::metrics::RECOVERED,
                        &[("status", r.task.status.as_str())],
                    );
                    requeued_events.push(r.event.clone());
                    if r.task.status == TaskStatus::Queued {
                        requeue.push(QueueItem {
                            id: r.task.id,
                            priority: r.task.priority,
                            attempt: r.task.attempts.saturating_add(1),
                        });
                    } else {
                        gone.push(r.task.id);
                    }
                }
                // It finished or moved on between the read and now: nothing to recover.
                Err(e) => tracing::info!(task = %t.id, error = %e, "task not recovered"),
            }
        }
        if !pending.is_empty() {
            self.store_events(&pending).await;
        }
        self.emit(&detected);
        for e in &requeued_events {
            self.emit(e);
        }
        d.dispatch.forget(&gone);
        d.dispatch.offer(&requeue, true);
        // The failure can be noticed after the worker restarted under the same id and said
        // HELLO again; only the incarnation gossip last heard before it died is drained.
        let silent_for = (chrono::Utc::now() - m.last_seen)
            .to_std()
            .unwrap_or(Duration::ZERO);
        let last_seen = Instant::now()
            .checked_sub(silent_for)
            .unwrap_or_else(Instant::now);
        d.dispatch.drain_failed(&m.id, last_seen);
    }
}

fn to_row(m: &MemberInfo) -> Member {
    Member {
        id: m.id.clone(),
        role: m.tags.role.clone(),
        node: m.tags.node.clone(),
        state: m.state.to_string(),
        last_seen: m.last_seen,
        tags: serde_json::to_value(&m.tags).unwrap_or_default(),
    }
}

fn refresh_gauges(r: &Registry, members: &[MemberInfo]) {
    let now = chrono::Utc::now();
    r.clear(LAST_SEEN);
    for s in MemberState::ALL {
        let n = members.iter().filter(|m| m.state == s).count();
        r.set(MEMBERS, &[("state", s.as_str())], n as f64);
    }
    let count = |s| members.iter().filter(|m| m.state == s).count() as f64;
    r.set(SUSPECT, &[], count(MemberState::Suspect));
    r.set(FAILED, &[], count(MemberState::Failed));
    for m in members {
        let age = (now - m.last_seen).num_milliseconds().max(0) as f64 / 1000.0;
        r.set(LAST_SEEN, &[("member", &m.id)], age);
    }
}

async fn run(
    membership: Arc<Membership>,
    mut rx: mpsc::Receiver<MembershipEvent>,
    deps: Deps,
    publisher: Publisher,
    mut stop: watch::Receiver<bool>,
) {
    let mut l = Loop {
        deps,
        publisher,
        last_row: HashMap::new(),
    };
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::server::stopped(&mut stop) => break,
            ev = rx.recv() => match ev {
                Some(MembershipEvent::Merged { count, changes }) => {
                    // State changes are written at once, with their current row.
                    let members = membership.members();
                    let rows: Vec<Member> = members
                        .iter()
                        .filter(|m| changes.iter().any(|c| c.member == m.id))
                        .map(to_row)
                        .collect();
                    if !rows.is_empty() {
                        if let Err(e) = l.deps.store.upsert_members(&rows).await {
                            tracing::warn!(error = %e, "member states not stored");
                        }
                    }
                    l.on_event(MembershipEvent::Merged { count, changes: changes.clone() }).await;
                }
                Some(ev) => l.on_event(ev).await,
                None => break,
            },
            _ = flush.tick() => {
                let members = membership.members();
                refresh_gauges(&l.deps.metrics, &members);
                let rows: Vec<Member> = members.iter().map(to_row).collect();
                if let Err(e) = l.deps.store.upsert_members(&rows).await {
                    tracing::warn!(error = %e, "members.last_seen not stored; retrying next flush");
                }
            }
        }
    }
}
