//! The container-level policy maths (ARCHITECTURE §8, "within a node"): whether one node should
//! run one more worker container, one fewer, or keep what it has. Pure: no I/O, time passed in.
//!
//! It reads the node's utilization the other way round from the node level. A node-level
//! policy adds machines when the machines are hot; within a node, a hot node is one that must
//! not get more containers:
//! - **up** (start one): the node has headroom (cpu below `cpu_high` and mem below `mem_high`)
//!   and there is backlog, and every container on it is busy (an idle one will take the next
//!   queued task, so another container would only add a second idle one);
//! - **down, overload** (stop one after its task): cpu above `cpu_high` or mem above
//!   `mem_high`;
//! - **down, idle surplus**: no backlog, cpu below `cpu_low`, and a container with nothing to
//!   do;
//! - otherwise hold.
//!
//! Below `min` it goes up to `min` at once, above `max` down to `max`; otherwise one container
//! per action. A direction acts after `within_bounds_trigger` consecutive evaluations agree;
//! any other verdict resets the streak, which with the cooldowns keeps a node hovering around
//! a threshold from flapping. After any action **both** directions wait out their cooldowns: a
//! container that was just started has not yet shown its load, so taking one away on the
//! next overload reading would undo the decision before it could be judged.

use std::time::{Duration, Instant};
use transcode_core::config::PolicyConfig;

use crate::policy::Action;

/// What the evaluator sees of one node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeLoad {
    pub containers: u32,
    pub cpu: Option<f64>,
    pub mem: Option<f64>,
    pub queued: u64,
    pub free_slots: u64,
    /// Some container on the node has no task.
    pub idle_container: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub action: Action,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct ContainerEvaluator {
    policy: PolicyConfig,
    up_streak: u32,
    down_streak: u32,
    last_action: Option<Instant>,
}

fn backlog(p: &PolicyConfig, l: &NodeLoad) -> bool {
    l.queued > 0
        && (l.free_slots == 0 || l.queued as f64 / l.free_slots as f64 >= p.backlog_per_slot)
}

impl ContainerEvaluator {
    pub fn new(policy: PolicyConfig) -> Self {
        ContainerEvaluator {
            policy,
            up_streak: 0,
            down_streak: 0,
            last_action: None,
        }
    }

    /// Seconds of cooldown left before an action in that direction may happen.
    fn cooldown_left(&self, up: bool, now: Instant) -> Duration {
        let cd = Duration::from_millis(if up {
            self.policy.cooldown_up_ms
        } else {
            self.policy.cooldown_down_ms
        });
        match self.last_action {
            Some(t) => cd.saturating_sub(now.saturating_duration_since(t)),
            None => Duration::ZERO,
        }
    }

    pub fn evaluate(&mut self, l: &NodeLoad, now: Instant) -> Verdict {
        let p = &self.policy;
        let n = l.containers;
        if n < p.min {
            return self.verdict(
                Action::Up { from: n, to: p.min },
                format!("below min {}", p.min),
            );
        }
        if n > p.max {
            return self.verdict(
                Action::Down { from: n, to: p.max },
                format!("above max {}", p.max),
            );
        }
        let has_backlog = backlog(p, l);
        let hot_cpu = l.cpu.is_some_and(|c| c > p.cpu_high);
        let hot_mem = l.mem.is_some_and(|m| m > p.mem_high);
        let (want_up, want_down, why) = if hot_cpu || hot_mem {
            let why = if hot_cpu {
                format!("overload: cpu {:.1} > {}", l.cpu.unwrap_or(0.0), p.cpu_high)
            } else {
                format!("overload: mem {:.1} > {}", l.mem.unwrap_or(0.0), p.mem_high)
            };
            (false, n > p.min, why)
        } else if has_backlog && l.cpu.is_some() && !l.idle_container {
            (
                n < p.max,
                false,
                format!(
                    "headroom (cpu {:.1} < {}) and backlog ({} queued, {} free slots)",
                    l.cpu.unwrap_or(0.0),
                    p.cpu_high,
                    l.queued,
                    l.free_slots
                ),
            )
        } else if !has_backlog && l.idle_container && l.cpu.is_some_and(|c| c < p.cpu_low) {
            (
                false,
                n > p.min,
                format!(
                    "idle surplus: cpu {:.1} < {} and no backlog",
                    l.cpu.unwrap_or(0.0),
                    p.cpu_low
                ),
            )
        } else {
            (false, false, "within bounds".to_string())
        };
        if want_up {
            self.up_streak += 1;
            self.down_streak = 0;
        } else if want_down {
            self.down_streak += 1;
            self.up_streak = 0;
        } else {
            self.up_streak = 0;
            self.down_streak = 0;
            return Verdict {
                action: Action::Hold,
                reason: why,
            };
        }
        let streak = if want_up {
            self.up_streak
        } else {
            self.down_streak
        };
        let trigger = p.within_bounds_trigger.max(1);
        if streak < trigger {
            return Verdict {
                action: Action::Hold,
                reason: format!("{why}; {streak}/{trigger} evaluations"),
            };
        }
        let left = self.cooldown_left(want_up, now);
        if !left.is_zero() {
            return Verdict {
                action: Action::Hold,
                reason: format!(
                    "{why}; cooling down ({}) for {}s",
                    if want_up { "up" } else { "down" },
                    left.as_secs()
                ),
            };
        }
        let action = if want_up {
            Action::Up { from: n, to: n + 1 }
        } else {
            Action::Down { from: n, to: n - 1 }
        };
        self.verdict(action, why)
    }

    fn verdict(&self, action: Action, reason: String) -> Verdict {
        Verdict { action, reason }
    }

    /// Called once the action was really carried out: starts the cooldowns.
    pub fn acted(&mut self, now: Instant) {
        self.last_action = Some(now);
        self.up_streak = 0;
        self.down_streak = 0;
    }

    pub fn dry_run(&self) -> bool {
        self.policy.dry_run
    }

    pub fn status(&self, now: Instant) -> serde_json::Value {
        serde_json::json!({
            "up_streak": self.up_streak,
            "down_streak": self.down_streak,
            "cooldown_up_left_ms": self.cooldown_left(true, now).as_millis() as u64,
            "cooldown_down_left_ms": self.cooldown_left(false, now).as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PolicyConfig {
        let mut p = PolicyConfig::container_default();
        p.min = 1;
        p.max = 3;
        p.cpu_high = 80.0;
        p.cpu_low = 20.0;
        p.mem_high = 90.0;
        p.within_bounds_trigger = 2;
        p.cooldown_up_ms = 10_000;
        p.cooldown_down_ms = 20_000;
        p.backlog_per_slot = 1.0;
        p
    }

    fn load(containers: u32, cpu: f64, queued: u64, idle: bool) -> NodeLoad {
        NodeLoad {
            containers,
            cpu: Some(cpu),
            mem: Some(40.0),
            queued,
            free_slots: 0,
            idle_container: idle,
        }
    }

    /// Runs a trace one evaluation per second, acting on every non-hold verdict, and returns
    /// the container count after each step.
    fn trace(e: &mut ContainerEvaluator, steps: &[(f64, u64, bool)], start: u32) -> Vec<u32> {
        let t0 = Instant::now();
        let mut n = start;
        let mut out = Vec::new();
        for (i, (cpu, queued, idle)) in steps.iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64);
            let v = e.evaluate(&load(n, *cpu, *queued, *idle), now);
            match v.action {
                Action::Up { to, .. } | Action::Down { to, .. } => {
                    n = to;
                    e.acted(now);
                }
                Action::Hold => {}
            }
            out.push(n);
        }
        out
    }

    #[test]
    fn headroom_and_backlog_start_one_per_cooldown() {
        let mut e = ContainerEvaluator::new(policy());
        let steps = vec![(30.0, 10, false); 25];
        let counts = trace(&mut e, &steps, 1);
        // Trigger of 2, then 10 s cooldown before the next, up to max 3.
        assert_eq!(counts[0], 1);
        assert_eq!(counts[1], 2);
        // Acted at 1 s, so the up cooldown ends at 11 s, where the streak is already met.
        assert_eq!(counts[10], 2);
        assert_eq!(counts[11], 3);
        assert_eq!(*counts.last().expect("last"), 3);
    }

    #[test]
    fn overload_stops_one_and_noise_does_not_flap() {
        let mut e = ContainerEvaluator::new(policy());
        // Alternating just over and just under cpu_high never reaches the trigger of 2.
        let noise: Vec<(f64, u64, bool)> = (0..20)
            .map(|i| (if i % 2 == 0 { 81.0 } else { 79.0 }, 0, false))
            .collect();
        assert!(trace(&mut e, &noise, 2).iter().all(|&n| n == 2));
        let mut e = ContainerEvaluator::new(policy());
        let hot = vec![(95.0, 5, false); 3];
        assert_eq!(trace(&mut e, &hot, 3), vec![3, 2, 2]);
    }

    #[test]
    fn idle_surplus_needs_an_idle_container_and_no_backlog() {
        let mut e = ContainerEvaluator::new(policy());
        assert_eq!(trace(&mut e, &[(5.0, 0, false); 4], 2), vec![2; 4]);
        assert_eq!(trace(&mut e, &[(5.0, 3, true); 4], 2), vec![2; 4]);
        let mut e = ContainerEvaluator::new(policy());
        assert_eq!(trace(&mut e, &[(5.0, 0, true); 3], 2), vec![2, 1, 1]);
    }

    #[test]
    fn bounds_apply_at_once_and_no_data_holds() {
        let mut e = ContainerEvaluator::new(policy());
        let t = Instant::now();
        assert_eq!(
            e.evaluate(&load(0, 0.0, 0, false), t).action,
            Action::Up { from: 0, to: 1 }
        );
        assert_eq!(
            e.evaluate(&load(5, 50.0, 0, false), t).action,
            Action::Down { from: 5, to: 3 }
        );
        let mut l = load(1, 0.0, 10, false);
        l.cpu = None;
        assert_eq!(e.evaluate(&l, t).action, Action::Hold);
        assert_eq!(e.evaluate(&l, t).action, Action::Hold);
    }

    #[test]
    fn after_an_up_an_overload_waits_for_the_down_cooldown() {
        let mut e = ContainerEvaluator::new(policy());
        let t0 = Instant::now();
        e.acted(t0);
        for s in 1..20 {
            let v = e.evaluate(&load(2, 95.0, 0, false), t0 + Duration::from_secs(s));
            assert_eq!(v.action, Action::Hold, "at {s}s: {}", v.reason);
        }
        let v = e.evaluate(&load(2, 95.0, 0, false), t0 + Duration::from_secs(20));
        assert_eq!(v.action, Action::Down { from: 2, to: 1 });
    }
}
