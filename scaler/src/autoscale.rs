//! The autoscaler (ARCHITECTURE §8): the loop that reads utilization from the gossip table and
//! backlog from the dispatcher, asks the node policy (`policy`) and the per-node container
//! policy (`container_policy`) what to do, and carries decisions out through the targets. It
//! owns the order of a scale-in (DRAIN first, wait for running transcodes, then remove), the
//! scaling events, the decision log and the status `/v1/scaling` shows.
//!
//! Actions run as background operations so a slow target (a `terraform apply`) never stops
//! evaluation: the policies keep counting, and the status keeps showing fresh inputs. At most
//! one node operation runs at a time, and at most one container operation per node; a policy
//! that wants to act meanwhile holds with the reason "an action is in progress". A cooldown
//! starts when an action has finished, and only if it succeeded: a failed action changed
//! nothing that may be assumed, and the next evaluation decides afresh.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use transcode_core::bus::Publisher;
use transcode_core::config::PolicyConfig;
use transcode_core::events::{
    ContainerScaled, EventBody, NodeScaled, Origin, ScalingActionFailed, ThresholdReached,
};
use transcode_core::membership::{MemberInfo, MemberState};
use transcode_core::metrics::{Kind, Registry};
use transcode_core::store::Store;

use crate::container_policy::{ContainerEvaluator, NodeLoad};
use crate::dispatch::WorkerView;
use crate::policy::{Action, Evaluator, Inputs, Policy, ThresholdWatch};
use crate::targets::{NodeInfo, Target};
use crate::DispatchHandle;

const DECISIONS: &str = "transcode_scaling_decisions_total";
const ACTIONS: &str = "transcode_scaling_actions_total";
const NODE_CPU: &str = "transcode_node_cpu_percent";
const NODE_MEM: &str = "transcode_node_mem_percent";
const NODES: &str = "transcode_scaling_nodes";
/// Recent decisions kept for `transcode scaling status`.
const HISTORY: usize = 20;
/// Longest a target's listing may take before this evaluation is skipped.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// The member table, as gossip sees it now.
pub type MembersFn = Arc<dyn Fn() -> Vec<MemberInfo> + Send + Sync>;

pub struct Deps {
    pub store: Arc<dyn Store>,
    pub dispatch: DispatchHandle,
    pub metrics: Arc<Registry>,
    pub origin: Origin,
    pub publisher: Publisher,
    pub members: MembersFn,
    /// Where the loop leaves its status for `/v1/scaling`.
    pub status: Arc<Mutex<serde_json::Value>>,
}

pub struct Settings {
    pub node: PolicyConfig,
    pub container: PolicyConfig,
    pub node_target: Arc<dyn Target>,
    pub container_target: Arc<dyn Target>,
}

/// What a finished background operation reports back to the loop.
enum Done {
    NodesAdded {
        from: u32,
        added: Vec<String>,
        avg_cpu: f64,
        reason: String,
        error: Option<String>,
    },
    NodeRemoved {
        from: u32,
        node: String,
        avg_cpu: f64,
        reason: String,
        error: Option<String>,
    },
    Container {
        up: bool,
        node: String,
        from: u32,
        member: Option<String>,
        reason: String,
        error: Option<String>,
    },
}

fn describe(r: &Registry) {
    r.describe(
        DECISIONS,
        Kind::Counter,
        "Autoscaler evaluations, by level and outcome (up, down, hold, dry_run).",
    );
    r.describe(
        ACTIONS,
        Kind::Counter,
        "Scaling actions carried out, by level, direction and result.",
    );
    r.describe(
        NODE_CPU,
        Kind::Gauge,
        "Smoothed CPU use per worker node, percent.",
    );
    r.describe(
        NODE_MEM,
        Kind::Gauge,
        "Smoothed memory use per worker node, percent.",
    );
    r.describe(NODES, Kind::Gauge, "Worker nodes the node target manages.");
}

/// Per-node utilization: the mean of its live workers' gossip tags.
fn node_usage(members: &[MemberInfo]) -> BTreeMap<String, (f64, f64)> {
    let mut sums: BTreeMap<String, (f64, f64, u32)> = BTreeMap::new();
    for m in members {
        if m.tags.role != "worker" || m.state != MemberState::Alive {
            continue;
        }
        let e = sums.entry(m.tags.node.clone()).or_default();
        e.0 += m.tags.cpu;
        e.1 += m.tags.mem;
        e.2 += 1;
    }
    sums.into_iter()
        .map(|(n, (c, m, k))| (n, (c / f64::from(k), m / f64::from(k))))
        .collect()
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = xs.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / f64::from(n))
}

/// The node a scale-in takes: fewest running tasks, then lowest CPU, then the newest name
/// (so a farm shrinks in the reverse order it grew).
fn least_busy(
    nodes: &[NodeInfo],
    workers: &[WorkerView],
    usage: &BTreeMap<String, (f64, f64)>,
) -> Option<String> {
    let busy = |n: &str| -> usize {
        workers
            .iter()
            .filter(|w| w.node == n)
            .map(|w| w.tasks)
            .sum()
    };
    nodes
        .iter()
        .map(|n| {
            let cpu = usage.get(&n.name).map_or(0.0, |u| u.0);
            (busy(&n.name), cpu, n.name.clone())
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(b.2.cmp(&a.2)))
        .map(|t| t.2)
}

struct Loop {
    s: Settings,
    d: Deps,
    node_eval: Evaluator,
    containers: HashMap<String, ContainerEvaluator>,
    watches: HashMap<(String, &'static str), ThresholdWatch>,
    ops: JoinSet<Done>,
    node_op: bool,
    container_ops: HashSet<String>,
    /// Nodes being drained and removed: not counted, not given containers.
    leaving: HashSet<String>,
    history: VecDeque<serde_json::Value>,
    last_node: serde_json::Value,
    last_containers: BTreeMap<String, serde_json::Value>,
}

impl Loop {
    async fn emit(&self, body: EventBody) {
        let ev = self.d.origin.event(None, body);
        self.d.publisher.publish(&ev);
        if let Err(e) = self.d.store.append_events(std::slice::from_ref(&ev)).await {
            tracing::warn!(error = %e, event = %ev.event_type(), "scaling event not logged to the store");
        }
    }

    /// A failed action is an event too, so it shows in `transcode events` beside the decisions
    /// that worked, and in `/v1/scaling`'s recent list.
    async fn failed(
        &mut self,
        level: &str,
        direction: &str,
        target: &str,
        node: Option<String>,
        from: u32,
        error: String,
    ) {
        self.remember(serde_json::json!({"level": level, "at": chrono::Utc::now(), "done": format!("scaling {direction} failed"), "from": from, "node": node, "error": error}));
        self.emit(EventBody::ScalingActionFailed(ScalingActionFailed {
            level: level.to_string(),
            direction: direction.to_string(),
            target: target.to_string(),
            node,
            from,
            error,
        }))
        .await;
    }

    fn remember(&mut self, entry: serde_json::Value) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(entry);
    }

    /// One carried-out (or failed) action in `transcode_scaling_actions_total`.
    fn acted_metric(&self, level: &str, direction: &str, result: &str) {
        self.d.metrics.inc(
            ACTIONS,
            &[
                ("level", level),
                ("direction", direction),
                ("result", result),
            ],
        );
    }

    fn count(&self, level: &str, outcome: &str) {
        self.d
            .metrics
            .inc(DECISIONS, &[("level", level), ("outcome", outcome)]);
    }

    async fn list_nodes(&self, target: &Arc<dyn Target>) -> Option<Vec<NodeInfo>> {
        match tokio::time::timeout(LIST_TIMEOUT, target.nodes()).await {
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => {
                tracing::warn!(target = target.kind(), error = %e, "cannot list nodes; skipping this evaluation");
                None
            }
            Err(_) => {
                tracing::warn!(
                    target = target.kind(),
                    "listing nodes timed out; skipping this evaluation"
                );
                None
            }
        }
    }

    async fn evaluate_nodes(&mut self) {
        let Some(all) = self.list_nodes(&self.s.node_target.clone()).await else {
            return;
        };
        let nodes: Vec<NodeInfo> = all
            .into_iter()
            .filter(|n| !self.leaving.contains(&n.name))
            .collect();
        let members = (self.d.members)();
        let usage = node_usage(&members);
        for (n, (c, m)) in &usage {
            self.d.metrics.set(NODE_CPU, &[("node", n)], *c);
            self.d.metrics.set(NODE_MEM, &[("node", n)], *m);
        }
        self.d.metrics.set(NODES, &[], nodes.len() as f64);
        let cpu = mean(nodes.iter().filter_map(|n| usage.get(&n.name).map(|u| u.0)));
        let mem = mean(nodes.iter().filter_map(|n| usage.get(&n.name).map(|u| u.1)));
        let stats = self.d.dispatch.stats();
        let inputs = Inputs {
            current: nodes.len() as u32,
            cpu,
            mem,
            queued: stats.queue_length as u64,
            free_slots: stats.free_credits,
        };
        let now = Instant::now();
        let decision = self.node_eval.evaluate(&inputs, now);
        tracing::debug!(
            level = "node",
            current = inputs.current,
            cpu = ?inputs.cpu,
            mem = ?inputs.mem,
            queued = inputs.queued,
            free_slots = inputs.free_slots,
            action = ?decision.action,
            reason = %decision.reason,
            dry_run = decision.dry_run,
            "scaling decision"
        );
        self.last_node = serde_json::json!({
            "inputs": {"current": inputs.current, "cpu": inputs.cpu, "mem": inputs.mem,
                       "queued": inputs.queued, "free_slots": inputs.free_slots},
            "decision": decision,
            "nodes": nodes.iter().map(|n| serde_json::json!({
                "name": n.name, "containers": n.containers,
                "cpu": usage.get(&n.name).map(|u| u.0), "mem": usage.get(&n.name).map(|u| u.1),
            })).collect::<Vec<_>>(),
            "leaving": self.leaving.iter().collect::<Vec<_>>(),
        });
        let outcome = match (&decision.action, decision.dry_run) {
            (Action::Hold, _) => "hold",
            (_, true) => "dry_run",
            (Action::Up { .. }, false) => "up",
            (Action::Down { .. }, false) => "down",
        };
        self.count("node", outcome);
        if decision.action == Action::Hold {
            return;
        }
        self.remember(serde_json::json!({
            "level": "node", "at": chrono::Utc::now(), "decision": decision,
        }));
        if decision.dry_run {
            tracing::info!(action = ?decision.action, reason = %decision.reason, "dry run: node scaling not carried out");
            return;
        }
        if self.node_op {
            tracing::debug!("node action in progress; this decision waits");
            return;
        }
        let avg_cpu = cpu.unwrap_or(0.0);
        let reason = decision.reason.clone();
        match decision.action {
            Action::Up { from, to } => {
                self.node_op = true;
                let target = self.s.node_target.clone();
                self.ops.spawn(async move {
                    let mut added = Vec::new();
                    let mut error = None;
                    for _ in from..to {
                        match target.add_node().await {
                            Ok(n) => added.push(n),
                            Err(e) => {
                                error = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    Done::NodesAdded {
                        from,
                        added,
                        avg_cpu,
                        reason,
                        error,
                    }
                });
            }
            Action::Down { from, .. } => {
                let workers = self.d.dispatch.workers();
                let Some(node) = least_busy(&nodes, &workers, &usage) else {
                    return;
                };
                self.node_op = true;
                self.leaving.insert(node.clone());
                let drained: Vec<String> = workers
                    .iter()
                    .filter(|w| w.node == node)
                    .map(|w| w.worker.clone())
                    .collect();
                for w in &drained {
                    self.d.dispatch.drain(w);
                }
                tracing::info!(%node, workers = ?drained, "scale-in: draining node");
                let deadline = Duration::from_secs(self.s.node.drain_deadline_seconds);
                let target = self.s.node_target.clone();
                let dispatch = self.d.dispatch.clone();
                self.ops.spawn(async move {
                    let started = Instant::now();
                    // Running transcodes finish first; the workers exit by themselves once
                    // idle, and the target reaps them.
                    while started.elapsed() < deadline {
                        let busy: usize = dispatch
                            .workers()
                            .iter()
                            .filter(|w| w.node == node)
                            .map(|w| w.tasks)
                            .sum();
                        if busy == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let left = deadline.saturating_sub(started.elapsed());
                    let error = target
                        .remove_node(&node, left)
                        .await
                        .err()
                        .map(|e| e.to_string());
                    Done::NodeRemoved {
                        from,
                        node,
                        avg_cpu,
                        reason,
                        error,
                    }
                });
            }
            Action::Hold => {}
        }
    }

    async fn evaluate_containers(&mut self) {
        let Some(nodes) = self.list_nodes(&self.s.container_target.clone()).await else {
            return;
        };
        let members = (self.d.members)();
        let usage = node_usage(&members);
        let workers = self.d.dispatch.workers();
        let stats = self.d.dispatch.stats();
        let now = Instant::now();
        let p = &self.s.container;
        for n in nodes.iter().filter(|n| !self.leaving.contains(&n.name)) {
            let (cpu, mem) = match usage.get(&n.name) {
                Some((c, m)) => (Some(*c), Some(*m)),
                None => (None, None),
            };
            for (metric, value, high, low) in [
                ("cpu", cpu, p.cpu_high, p.cpu_low),
                ("mem", mem, p.mem_high, p.mem_high * 0.9),
            ] {
                let Some(v) = value else { continue };
                let w = self
                    .watches
                    .entry((n.name.clone(), metric))
                    .or_insert_with(|| ThresholdWatch::new(metric, high, low));
                if let Some(c) = w.observe(v) {
                    tracing::info!(node = %n.name, metric, value = v, threshold = c.threshold, direction = ?c.direction, "utilization threshold crossed");
                    self.emit(EventBody::ResourceUtilizationThresholdReached(
                        ThresholdReached {
                            node: n.name.clone(),
                            metric: metric.to_string(),
                            value: v,
                            threshold: c.threshold,
                            direction: c.direction,
                        },
                    ))
                    .await;
                }
            }
            let on_node: Vec<&WorkerView> = workers
                .iter()
                .filter(|w| w.node == n.name && !w.draining)
                .collect();
            let load = NodeLoad {
                containers: n.containers,
                cpu,
                mem,
                queued: stats.queue_length as u64,
                free_slots: stats.free_credits,
                idle_container: on_node.iter().any(|w| w.tasks == 0),
            };
            let eval = self
                .containers
                .entry(n.name.clone())
                .or_insert_with(|| ContainerEvaluator::new(self.s.container.clone()));
            let verdict = eval.evaluate(&load, now);
            let dry_run = eval.dry_run();
            tracing::debug!(level = "container", node = %n.name, ?load, action = ?verdict.action, reason = %verdict.reason, dry_run, "scaling decision");
            self.last_containers.insert(
                n.name.clone(),
                serde_json::json!({
                    "containers": n.containers, "cpu": cpu, "mem": mem,
                    "action": format!("{:?}", verdict.action), "reason": verdict.reason,
                    "state": eval.status(now),
                }),
            );
            let outcome = match (&verdict.action, dry_run) {
                (Action::Hold, _) => "hold",
                (_, true) => "dry_run",
                (Action::Up { .. }, false) => "up",
                (Action::Down { .. }, false) => "down",
            };
            self.d
                .metrics
                .inc(DECISIONS, &[("level", "container"), ("outcome", outcome)]);
            if verdict.action == Action::Hold {
                continue;
            }
            let entry = serde_json::json!({
                "level": "container", "node": n.name, "at": chrono::Utc::now(),
                "action": format!("{:?}", verdict.action), "reason": verdict.reason, "dry_run": dry_run,
            });
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(entry);
            if dry_run || self.container_ops.contains(&n.name) {
                continue;
            }
            let target = self.s.container_target.clone();
            let node = n.name.clone();
            let reason = verdict.reason.clone();
            match verdict.action {
                Action::Up { from, .. } => {
                    self.container_ops.insert(node.clone());
                    self.ops.spawn(async move {
                        let error = target
                            .start_container(&node)
                            .await
                            .err()
                            .map(|e| e.to_string());
                        Done::Container {
                            up: true,
                            node,
                            from,
                            member: None,
                            reason,
                            error,
                        }
                    });
                }
                Action::Down { from, .. } => {
                    // The container with the least work goes; it finishes what it has first.
                    let Some(victim) = on_node
                        .iter()
                        .min_by_key(|w| (w.tasks, std::cmp::Reverse(w.worker.clone())))
                    else {
                        continue;
                    };
                    let member = victim.worker.clone();
                    self.d.dispatch.drain(&member);
                    self.container_ops.insert(node.clone());
                    self.ops.spawn(async move {
                        let error = target
                            .stop_container(&node, &member)
                            .await
                            .err()
                            .map(|e| e.to_string());
                        Done::Container {
                            up: false,
                            node,
                            from,
                            member: Some(member),
                            reason,
                            error,
                        }
                    });
                }
                Action::Hold => {}
            }
        }
        // Forget nodes that are gone, so a name reused later starts afresh.
        let live: HashSet<&String> = nodes.iter().map(|n| &n.name).collect();
        self.containers.retain(|n, _| live.contains(n));
        self.watches.retain(|(n, _), _| live.contains(n));
        self.last_containers.retain(|n, _| live.contains(n));
    }

    async fn finished(&mut self, done: Done) {
        let now = Instant::now();
        match done {
            Done::NodesAdded {
                from,
                added,
                avg_cpu,
                reason,
                error,
            } => {
                self.node_op = false;
                if let Some(e) = &error {
                    tracing::error!(error = %e, added = ?added, "adding a worker node failed");
                    self.acted_metric("node", "up", "error");
                    let target = self.s.node_target.kind();
                    self.failed("node", "up", target, None, from, e.to_string())
                        .await;
                }
                if added.is_empty() {
                    return;
                }
                let to = from + added.len() as u32;
                self.node_eval.acted(&Action::Up { from, to }, now);
                self.acted_metric("node", "up", "ok");
                tracing::info!(from, to, nodes = ?added, %reason, "worker nodes added");
                self.remember(serde_json::json!({"level": "node", "at": chrono::Utc::now(), "done": "scaled up", "from": from, "to": to, "nodes": added}));
                self.emit(EventBody::WorkerNodeScaledUp(NodeScaled {
                    from,
                    to,
                    node: Some(added.join(",")),
                    avg_cpu,
                    reason,
                }))
                .await;
            }
            Done::NodeRemoved {
                from,
                node,
                avg_cpu,
                reason,
                error,
            } => {
                self.node_op = false;
                self.leaving.remove(&node);
                if let Some(e) = error {
                    tracing::error!(%node, error = %e, "removing a worker node failed");
                    self.acted_metric("node", "down", "error");
                    let target = self.s.node_target.kind();
                    self.failed("node", "down", target, Some(node), from, e.to_string())
                        .await;
                    return;
                }
                let to = from.saturating_sub(1);
                self.node_eval.acted(&Action::Down { from, to }, now);
                self.acted_metric("node", "down", "ok");
                tracing::info!(from, to, %node, %reason, "worker node drained and removed");
                self.remember(serde_json::json!({"level": "node", "at": chrono::Utc::now(), "done": "scaled down", "from": from, "to": to, "node": node}));
                self.emit(EventBody::WorkerNodeScaledDown(NodeScaled {
                    from,
                    to,
                    node: Some(node),
                    avg_cpu,
                    reason,
                }))
                .await;
            }
            Done::Container {
                up,
                node,
                from,
                member,
                reason,
                error,
            } => {
                self.container_ops.remove(&node);
                let direction = if up { "up" } else { "down" };
                if let Some(e) = error {
                    tracing::error!(%node, direction, error = %e, "container scaling failed");
                    self.acted_metric("container", direction, "error");
                    let target = self.s.container_target.kind();
                    self.failed(
                        "container",
                        direction,
                        target,
                        Some(node),
                        from,
                        e.to_string(),
                    )
                    .await;
                    return;
                }
                if let Some(ev) = self.containers.get_mut(&node) {
                    ev.acted(now);
                }
                self.acted_metric("container", direction, "ok");
                let to = if up { from + 1 } else { from.saturating_sub(1) };
                tracing::info!(%node, from, to, ?member, %reason, "container scaled {direction}");
                self.remember(serde_json::json!({"level": "container", "node": node, "at": chrono::Utc::now(), "done": format!("scaled {direction}"), "from": from, "to": to, "member": member}));
                let body = ContainerScaled {
                    node,
                    from,
                    to,
                    member,
                    reason,
                };
                self.emit(if up {
                    EventBody::ContainerScaledUp(body)
                } else {
                    EventBody::ContainerScaledDown(body)
                })
                .await;
            }
        }
    }

    fn publish_status(&self) {
        let now = Instant::now();
        let status = serde_json::json!({
            "enabled": true,
            "leader": self.d.origin.member,
            "node": {
                "target": self.s.node_target.kind(),
                "policy": self.s.node,
                "state": self.node_eval.status(now),
                "last": self.last_node,
                "action_in_progress": self.node_op,
            },
            "container": {
                "target": self.s.container_target.kind(),
                "policy": self.s.container,
                "nodes": self.last_containers,
                "actions_in_progress": self.container_ops.iter().collect::<Vec<_>>(),
            },
            "recent": self.history,
        });
        if let Ok(mut s) = self.d.status.lock() {
            *s = status;
        }
    }
}

/// Runs until `stop` turns true; in-flight operations are abandoned (their targets finish or
/// time out on their own).
pub async fn run(s: Settings, d: Deps, mut stop: watch::Receiver<bool>) {
    describe(&d.metrics);
    let node_every = Duration::from_millis(s.node.evaluation_interval_ms.max(100));
    let container_every = Duration::from_millis(s.container.evaluation_interval_ms.max(100));
    let mut l = Loop {
        node_eval: Evaluator::new(Policy::from_config(&s.node)),
        s,
        d,
        containers: HashMap::new(),
        watches: HashMap::new(),
        ops: JoinSet::new(),
        node_op: false,
        container_ops: HashSet::new(),
        leaving: HashSet::new(),
        history: VecDeque::new(),
        last_node: serde_json::Value::Null,
        last_containers: BTreeMap::new(),
    };
    let mut node_tick = tokio::time::interval(node_every);
    let mut container_tick = tokio::time::interval(container_every);
    node_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    container_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        node_target = l.s.node_target.kind(),
        container_target = l.s.container_target.kind(),
        "autoscaler started"
    );
    loop {
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() { break; }
            }
            _ = node_tick.tick() => l.evaluate_nodes().await,
            _ = container_tick.tick() => l.evaluate_containers().await,
            Some(done) = l.ops.join_next(), if !l.ops.is_empty() => {
                match done {
                    Ok(d) => l.finished(d).await,
                    Err(e) => {
                        tracing::error!(error = %e, "a scaling operation panicked");
                        l.node_op = false;
                        l.container_ops.clear();
                    }
                }
            }
        }
        l.publish_status();
    }
    tracing::info!("autoscaler stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(worker: &str, node: &str, tasks: usize) -> WorkerView {
        WorkerView {
            worker: worker.into(),
            node: node.into(),
            slots: 2,
            credits: 0,
            tasks,
            draining: false,
        }
    }

    #[test]
    fn scale_in_takes_the_least_busy_newest_node() {
        let nodes: Vec<NodeInfo> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| NodeInfo {
                name: n.to_string(),
                containers: 1,
            })
            .collect();
        let usage: BTreeMap<String, (f64, f64)> = [
            ("n1".to_string(), (10.0, 0.0)),
            ("n2".to_string(), (10.0, 0.0)),
            ("n3".to_string(), (50.0, 0.0)),
        ]
        .into();
        let w = vec![view("a", "n1", 0), view("b", "n2", 0), view("c", "n3", 0)];
        // n1 and n2 tie on tasks and cpu: the newer name goes.
        assert_eq!(least_busy(&nodes, &w, &usage).as_deref(), Some("n2"));
        let w = vec![view("a", "n1", 0), view("b", "n2", 1), view("c", "n3", 0)];
        assert_eq!(least_busy(&nodes, &w, &usage).as_deref(), Some("n1"));
        assert_eq!(least_busy(&[], &w, &usage), None);
    }
}
