//! The node-level scaling policy maths (ARCHITECTURE §8): given what the cluster looks like
//! now, whether to add a worker node, remove one, or hold; and [`ThresholdWatch`], which turns a
//! stream of one node's utilization into threshold crossings. Pure: no I/O, no async, and time
//! is passed in as an [`Instant`], so every rule here is tested with exact traces. The
//! autoscale loop owns measuring, acting and telling the [`Evaluator`] what it really did.
//!
//! # How a decision is made
//!
//! Every evaluation, three checks vote `up`, `hold` or `down`:
//! - **cpu** (mean smoothed CPU of the level): `up` above `cpu_high`, `down` below `cpu_low`,
//!   `hold` in between or when unknown;
//! - **mem**: `up` above `mem_high`, `down` below it, `hold` when unknown;
//! - **backlog**: `up` when `queued > 0` and `queued / free_slots >= backlog_per_slot` (or no
//!   slot is free), `down` otherwise.
//!
//! They are resolved together by one rule: **an `up` from cpu or mem with the backlog also
//! voting `up` wins** (capacity is safer than cost); **`down` only when every check votes
//! `down`**; anything else holds. So a hot cluster with nothing waiting holds (another node
//! would sit idle), and a cool cluster with work waiting holds too (its bottleneck is not
//! capacity); memory above `mem_high` blocks a scale-down however idle the CPU is.
//!
//! The band between `cpu_low` and `cpu_high` is the hysteresis: a `hold` there resets both
//! streaks of consecutive agreeing evaluations, and an action needs `within_bounds_trigger` of
//! them, so a metric wobbling across one threshold (79, 81, 79, …) never acts.
//!
//! Cooldowns are measured from the last action carried out, whichever way it went:
//! `cooldown_up_ms` must pass before the next scale-up and `cooldown_down_ms` before the next
//! scale-down (a node just added has not taken load yet, so its idle CPU must not argue for
//! removing it). A cooldown withholds only the action: streaks keep counting through it, so
//! when it ends a trigger already met acts at once, and the decision's reason says
//! "cooling down (up) for 12s" meanwhile.
//!
//! Bounds come before all of that and ignore triggers and cooldowns, because they are not a
//! judgement about load: with no nodes and work queued it goes straight to `max(min, 1)`
//! (scale from zero, no CPU data needed); below `min` straight to `min`; above `max` straight
//! to `max`. Otherwise it moves one node per action and never leaves `min..=max`.
//!
//! With `dry_run` the decision is made and reported (with `dry_run: true`) but nothing is
//! done, so nothing starts a cooldown either: [`Evaluator::acted`] is a no-op, and the same
//! decision is reported again each evaluation while the conditions last.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;
use transcode_core::config::PolicyConfig;
use transcode_core::events::Direction;

/// One level's policy, in the units the maths wants.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    min: u32,
    max: u32,
    cpu_high: f64,
    cpu_low: f64,
    mem_high: f64,
    trigger: u32,
    backlog_per_slot: f64,
    cooldown_up: Duration,
    cooldown_down: Duration,
    evaluation_interval: Duration,
    dry_run: bool,
}

impl Policy {
    /// `Config::validate` has normally checked `c`; if it has not, `max` is raised to `min`
    /// and a trigger of 0 counts as 1, so the maths stays defined instead of panicking.
    pub fn from_config(c: &PolicyConfig) -> Policy {
        Policy {
            min: c.min,
            max: c.max.max(c.min),
            cpu_high: c.cpu_high,
            cpu_low: c.cpu_low,
            mem_high: c.mem_high,
            trigger: c.within_bounds_trigger.max(1),
            backlog_per_slot: c.backlog_per_slot,
            cooldown_up: Duration::from_millis(c.cooldown_up_ms),
            cooldown_down: Duration::from_millis(c.cooldown_down_ms),
            evaluation_interval: Duration::from_millis(c.evaluation_interval_ms),
            dry_run: c.dry_run,
        }
    }

    /// How often the caller should evaluate.
    pub fn evaluation_interval(&self) -> Duration {
        self.evaluation_interval
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    fn backlog(&self, i: &Inputs) -> bool {
        i.queued > 0
            && (i.free_slots == 0 || i.queued as f64 / i.free_slots as f64 >= self.backlog_per_slot)
    }
}

/// What the caller measured for one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inputs {
    /// Nodes (or containers) there are now.
    pub current: u32,
    /// Mean smoothed CPU percent; `None` when no member reported one.
    pub cpu: Option<f64>,
    /// Mean memory percent; `None` when unknown.
    pub mem: Option<f64>,
    /// Tasks waiting in the queue.
    pub queued: u64,
    /// Slots free to take a task right now.
    pub free_slots: u64,
}

/// What to do. Serialized as `"hold"` or `{"up":{"from":1,"to":2}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Up { from: u32, to: u32 },
    Down { from: u32, to: u32 },
    Hold,
}

/// One check's opinion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Says {
    Up,
    Hold,
    Down,
}

impl fmt::Display for Says {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Says::Up => "up",
            Says::Hold => "hold",
            Says::Down => "down",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vote {
    /// `cpu`, `mem` or `backlog`.
    pub check: &'static str,
    pub says: Says,
    /// The percentage for cpu and mem, the queue length for backlog; `None` when unknown.
    pub value: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub action: Action,
    /// For operators: which rule decided, with the numbers behind it.
    pub reason: String,
    pub votes: Vec<Vote>,
    /// The policy is in dry run: report the action, do not carry it out.
    pub dry_run: bool,
}

/// What `GET /v1/scaling` (or a log line) shows about an evaluator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluatorStatus {
    /// Consecutive evaluations that wanted to scale up / down.
    pub up_streak: u32,
    pub down_streak: u32,
    /// `within_bounds_trigger`: the streak an action needs.
    pub trigger: u32,
    pub cooldown_up_remaining_ms: u64,
    pub cooldown_down_remaining_ms: u64,
    pub last_decision: Option<Decision>,
}

/// A policy plus the memory it needs between evaluations: the streaks and the time of the last
/// action.
#[derive(Debug, Clone)]
pub struct Evaluator {
    policy: Policy,
    up_streak: u32,
    down_streak: u32,
    last_action: Option<Instant>,
    last_decision: Option<Decision>,
}

impl Evaluator {
    pub fn new(policy: Policy) -> Self {
        Evaluator {
            policy,
            up_streak: 0,
            down_streak: 0,
            last_action: None,
            last_decision: None,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn evaluate(&mut self, inputs: &Inputs, now: Instant) -> Decision {
        let p = &self.policy;
        let votes = votes(p, inputs);
        let backlog = p.backlog(inputs);
        let wants = resolve(&votes);
        // Streaks are updated before bounds and cooldowns are looked at, so neither of them
        // hides how long the load has pointed one way.
        match wants {
            Says::Up => {
                self.up_streak = self.up_streak.saturating_add(1);
                self.down_streak = 0;
            }
            Says::Down => {
                self.down_streak = self.down_streak.saturating_add(1);
                self.up_streak = 0;
            }
            Says::Hold => {
                self.up_streak = 0;
                self.down_streak = 0;
            }
        }
        let summary = summary(&votes);
        let n = inputs.current;
        let (action, reason) = if n == 0 && backlog && p.max > 0 {
            let to = p.min.max(1);
            (
                Action::Up { from: 0, to },
                format!("scale from zero: no nodes and a backlog ({summary})"),
            )
        } else if n < p.min {
            (
                Action::Up { from: n, to: p.min },
                format!("below min {} ({summary})", p.min),
            )
        } else if n > p.max {
            (
                Action::Down { from: n, to: p.max },
                format!("above max {} ({summary})", p.max),
            )
        } else {
            self.judge(wants, n, &summary, now)
        };
        let decision = Decision {
            action,
            reason,
            votes,
            dry_run: p.dry_run,
        };
        self.last_decision = Some(decision.clone());
        decision
    }

    /// The decision inside the bounds: rule, then trigger, then limits, then cooldown.
    fn judge(&self, wants: Says, n: u32, summary: &str, now: Instant) -> (Action, String) {
        let p = &self.policy;
        let (streak, action, at_limit, cooldown) = match wants {
            Says::Hold => {
                return (
                    Action::Hold,
                    format!("hold: no up vote with a backlog behind it, and not every check votes down ({summary})"),
                )
            }
            Says::Up => (
                self.up_streak,
                Action::Up { from: n, to: n + 1 },
                (n >= p.max).then(|| format!("at max {}", p.max)),
                self.cooldown_left(Says::Up, now),
            ),
            Says::Down => (
                self.down_streak,
                Action::Down {
                    from: n,
                    to: n.saturating_sub(1),
                },
                (n <= p.min).then(|| format!("at min {}", p.min)),
                self.cooldown_left(Says::Down, now),
            ),
        };
        let rule = match wants {
            Says::Up => "an up vote with a backlog behind it wins",
            _ => "every check votes down",
        };
        if streak < p.trigger {
            return (
                Action::Hold,
                format!(
                    "{wants} wanted ({rule}), {streak}/{} evaluations agree ({summary})",
                    p.trigger
                ),
            );
        }
        if let Some(limit) = at_limit {
            return (
                Action::Hold,
                format!("{wants} wanted ({rule}) but {limit} ({summary})"),
            );
        }
        if !cooldown.is_zero() {
            return (
                Action::Hold,
                format!(
                    "{wants} wanted ({rule}) but cooling down ({wants}) for {} ({summary})",
                    human(cooldown)
                ),
            );
        }
        (
            action,
            format!(
                "{wants}: {rule}, {streak}/{} evaluations agree ({summary})",
                p.trigger
            ),
        )
    }

    /// Called by the caller only after it really carried `action` out: starts the cooldowns and
    /// resets the streaks. A `Hold`, or any action under dry run, changes nothing.
    pub fn acted(&mut self, action: &Action, now: Instant) {
        if self.policy.dry_run || *action == Action::Hold {
            return;
        }
        self.last_action = Some(now);
        self.up_streak = 0;
        self.down_streak = 0;
    }

    pub fn status(&self, now: Instant) -> EvaluatorStatus {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        EvaluatorStatus {
            up_streak: self.up_streak,
            down_streak: self.down_streak,
            trigger: self.policy.trigger,
            cooldown_up_remaining_ms: ms(self.cooldown_left(Says::Up, now)),
            cooldown_down_remaining_ms: ms(self.cooldown_left(Says::Down, now)),
            last_decision: self.last_decision.clone(),
        }
    }

    fn cooldown_left(&self, direction: Says, now: Instant) -> Duration {
        let length = match direction {
            Says::Up => self.policy.cooldown_up,
            Says::Down => self.policy.cooldown_down,
            Says::Hold => return Duration::ZERO,
        };
        match self.last_action {
            Some(at) => length.saturating_sub(now.saturating_duration_since(at)),
            None => Duration::ZERO,
        }
    }
}

/// A reading that is not a number is treated as no reading.
fn known(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

fn votes(p: &Policy, i: &Inputs) -> Vec<Vote> {
    let cpu = known(i.cpu);
    let mem = known(i.mem);
    vec![
        Vote {
            check: "cpu",
            says: match cpu {
                Some(c) if c > p.cpu_high => Says::Up,
                Some(c) if c < p.cpu_low => Says::Down,
                _ => Says::Hold,
            },
            value: cpu,
        },
        Vote {
            check: "mem",
            says: match mem {
                Some(m) if m > p.mem_high => Says::Up,
                Some(m) if m < p.mem_high => Says::Down,
                _ => Says::Hold,
            },
            value: mem,
        },
        Vote {
            check: "backlog",
            says: if p.backlog(i) { Says::Up } else { Says::Down },
            value: Some(i.queued as f64),
        },
    ]
}

/// The documented rule (see the module doc): a resource's up vote with the backlog voting up
/// wins; down needs every vote; else hold.
fn resolve(votes: &[Vote]) -> Says {
    let backlog = votes
        .iter()
        .any(|v| v.check == "backlog" && v.says == Says::Up);
    let resource_up = votes
        .iter()
        .any(|v| v.check != "backlog" && v.says == Says::Up);
    if resource_up && backlog {
        Says::Up
    } else if votes.iter().all(|v| v.says == Says::Down) {
        Says::Down
    } else {
        Says::Hold
    }
}

fn summary(votes: &[Vote]) -> String {
    votes
        .iter()
        .map(|v| match (v.check, v.value) {
            ("backlog", Some(q)) => format!("backlog {} ({q} queued)", v.says),
            (check, Some(x)) => format!("{check} {} ({x:.1}%)", v.says),
            (check, None) => format!("{check} {} (unknown)", v.says),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `12s`, or `1.5s` below ten seconds, as an operator reads a countdown.
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1}s")
    } else {
        format!("{}s", s.round())
    }
}

/// One crossing of a threshold, for `ResourceUtilizationThresholdReached`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Crossing {
    pub metric: &'static str,
    pub value: f64,
    /// The threshold crossed: `high` going above, `low` going below.
    pub threshold: f64,
    pub direction: Direction,
}

/// Watches one metric of one node and reports each crossing once: `Above` when the value rises
/// over `high`, then `Below` only once it has fallen under `low`. Values between the two change
/// nothing, so noise around one threshold produces one event, not one per sample. A watch
/// starts on the low side, so a node that is quiet from the start reports nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct ThresholdWatch {
    metric: &'static str,
    high: f64,
    low: f64,
    above: bool,
}

impl ThresholdWatch {
    /// A `low` above `high` is brought down to `high` (no band: plain threshold).
    pub fn new(metric: &'static str, high: f64, low: f64) -> Self {
        ThresholdWatch {
            metric,
            high,
            low: low.min(high),
            above: false,
        }
    }

    pub fn observe(&mut self, value: f64) -> Option<Crossing> {
        if !value.is_finite() {
            return None;
        }
        let (threshold, direction) = if !self.above && value > self.high {
            (self.high, Direction::Above)
        } else if self.above && value < self.low {
            (self.low, Direction::Below)
        } else {
            return None;
        };
        self.above = direction == Direction::Above;
        Some(Crossing {
            metric: self.metric,
            value,
            threshold,
            direction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_secs(10);

    /// Node defaults, but with round numbers chosen per test.
    fn config(edit: impl FnOnce(&mut PolicyConfig)) -> PolicyConfig {
        let mut c = PolicyConfig::node_default();
        c.min = 1;
        c.max = 10;
        c.cpu_high = 80.0;
        c.cpu_low = 30.0;
        c.mem_high = 90.0;
        c.within_bounds_trigger = 3;
        c.cooldown_up_ms = 60_000;
        c.cooldown_down_ms = 120_000;
        c.backlog_per_slot = 1.0;
        edit(&mut c);
        c
    }

    fn evaluator(edit: impl FnOnce(&mut PolicyConfig)) -> Evaluator {
        Evaluator::new(Policy::from_config(&config(edit)))
    }

    /// Load without `current`, which the trace fills in: (cpu, mem, queued, free_slots).
    type Load = (Option<f64>, Option<f64>, u64, u64);

    const HOT_BACKLOG: Load = (Some(90.0), Some(50.0), 20, 0);
    const IDLE: Load = (Some(10.0), Some(40.0), 0, 4);

    fn inputs(current: u32, (cpu, mem, queued, free_slots): Load) -> Inputs {
        Inputs {
            current,
            cpu,
            mem,
            queued,
            free_slots,
        }
    }

    /// Runs one evaluation per `STEP`, carrying out (and reporting with `acted`) every action.
    /// Returns one character per evaluation, `U` up, `D` down, `.` hold, and the final count.
    fn trace(e: &mut Evaluator, start: u32, loads: &[Load]) -> (String, u32) {
        let t0 = Instant::now();
        let mut n = start;
        let mut out = String::new();
        for (i, load) in loads.iter().enumerate() {
            let now = t0 + STEP * i as u32;
            let d = e.evaluate(&inputs(n, *load), now);
            match d.action {
                Action::Up { from, to } => {
                    assert_eq!(from, n, "{}", d.reason);
                    out.push('U');
                    n = to;
                }
                Action::Down { from, to } => {
                    assert_eq!(from, n, "{}", d.reason);
                    out.push('D');
                    n = to;
                }
                Action::Hold => out.push('.'),
            }
            e.acted(&d.action, now);
        }
        (out, n)
    }

    #[test]
    fn a_step_up_in_load_scales_up_once_per_cooldown() {
        // Quiet for 3 evaluations, then hot with a backlog for 17: the trigger (3) is met at
        // the 6th evaluation, then the 60 s up cooldown spaces the next actions 6 steps apart.
        let mut loads = vec![IDLE; 3];
        loads.extend([HOT_BACKLOG; 17]);
        let mut e = evaluator(|c| c.min = 2);
        let (got, n) = trace(&mut e, 2, &loads);
        assert_eq!(got, ".....U.....U.....U..");
        assert_eq!(n, 5);
    }

    #[test]
    fn noise_around_a_threshold_does_not_flap() {
        let cases: &[(&str, Load, Load, u32)] = &[
            (
                "cpu 79/81 around cpu_high 80",
                (Some(79.0), Some(50.0), 20, 0),
                (Some(81.0), Some(50.0), 20, 0),
                3,
            ),
            (
                "cpu 29/31 around cpu_low 30",
                (Some(29.0), Some(50.0), 0, 4),
                (Some(31.0), Some(50.0), 0, 4),
                3,
            ),
            (
                "backlog on and off",
                (Some(90.0), Some(50.0), 20, 0),
                (Some(90.0), Some(50.0), 0, 4),
                3,
            ),
            (
                "mem 89/91 around mem_high 90 when idle",
                (Some(10.0), Some(89.0), 0, 4),
                (Some(10.0), Some(91.0), 0, 4),
                3,
            ),
        ];
        for (what, a, b, start) in cases {
            let loads: Vec<Load> = (0..20).map(|i| if i % 2 == 0 { *a } else { *b }).collect();
            let mut e = evaluator(|c| {
                c.cooldown_up_ms = 0;
                c.cooldown_down_ms = 0;
            });
            let (got, n) = trace(&mut e, *start, &loads);
            assert_eq!(got, ".".repeat(20), "{what}");
            assert_eq!(n, *start, "{what}");
        }
    }

    #[test]
    fn scale_down_waits_for_the_trigger_and_stops_at_min() {
        let mut e = evaluator(|c| c.cooldown_down_ms = 0);
        let (got, n) = trace(&mut e, 3, &[IDLE; 10]);
        assert_eq!(got, "..D..D....");
        assert_eq!(n, 1);
        let d = e.evaluate(&inputs(1, IDLE), Instant::now());
        assert!(d.reason.contains("at min 1"), "{}", d.reason);
    }

    #[test]
    fn disagreeing_checks_resolve_as_documented() {
        // (what, load, wanted): trigger 1 and no cooldown, from 3 nodes, so the rule alone
        // decides.
        let cases: &[(&str, Load, Says)] = &[
            (
                "cpu up, mem down, backlog",
                (Some(90.0), Some(50.0), 5, 0),
                Says::Up,
            ),
            (
                "cpu up, mem down, no backlog",
                (Some(90.0), Some(50.0), 0, 4),
                Says::Hold,
            ),
            (
                "cpu down, mem up, backlog",
                (Some(10.0), Some(95.0), 5, 0),
                Says::Up,
            ),
            (
                "cpu down, mem up, no backlog",
                (Some(10.0), Some(95.0), 0, 4),
                Says::Hold,
            ),
            (
                "cpu down, mem down, no backlog",
                (Some(10.0), Some(50.0), 0, 4),
                Says::Down,
            ),
            (
                "cpu down, mem down, backlog",
                (Some(10.0), Some(50.0), 5, 0),
                Says::Hold,
            ),
            (
                "cpu between, backlog",
                (Some(50.0), Some(50.0), 5, 0),
                Says::Hold,
            ),
            (
                "cpu between, no backlog",
                (Some(50.0), Some(50.0), 0, 4),
                Says::Hold,
            ),
            ("nothing known, backlog", (None, None, 5, 0), Says::Hold),
            (
                "cpu down, mem unknown",
                (Some(10.0), None, 0, 4),
                Says::Hold,
            ),
            (
                "cpu NaN, mem up, backlog",
                (Some(f64::NAN), Some(95.0), 5, 0),
                Says::Up,
            ),
            (
                "1 queued per 4 free slots is no backlog",
                (Some(90.0), Some(50.0), 1, 4),
                Says::Hold,
            ),
            (
                "4 queued per 4 free slots is a backlog",
                (Some(90.0), Some(50.0), 4, 4),
                Says::Up,
            ),
            (
                "queued with no free slot is a backlog",
                (Some(90.0), Some(50.0), 1, 0),
                Says::Up,
            ),
            (
                "cpu exactly at cpu_high holds",
                (Some(80.0), Some(50.0), 5, 0),
                Says::Hold,
            ),
        ];
        for (what, load, wanted) in cases {
            let mut e = evaluator(|c| {
                c.within_bounds_trigger = 1;
                c.cooldown_up_ms = 0;
                c.cooldown_down_ms = 0;
            });
            let d = e.evaluate(&inputs(3, *load), Instant::now());
            let want = match wanted {
                Says::Up => Action::Up { from: 3, to: 4 },
                Says::Down => Action::Down { from: 3, to: 2 },
                Says::Hold => Action::Hold,
            };
            assert_eq!(d.action, want, "{what}: {}", d.reason);
            assert_eq!(d.votes.len(), 3, "{what}");
            assert!(!d.dry_run);
        }

        let mut e = evaluator(|c| c.within_bounds_trigger = 1);
        let d = e.evaluate(&inputs(3, (Some(90.0), Some(50.0), 5, 0)), Instant::now());
        assert_eq!(
            d.votes,
            vec![
                Vote {
                    check: "cpu",
                    says: Says::Up,
                    value: Some(90.0)
                },
                Vote {
                    check: "mem",
                    says: Says::Down,
                    value: Some(50.0)
                },
                Vote {
                    check: "backlog",
                    says: Says::Up,
                    value: Some(5.0)
                },
            ]
        );
        assert!(
            d.reason
                .contains("an up vote with a backlog behind it wins"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn backlog_with_zero_nodes_scales_up_from_zero() {
        let now = Instant::now();
        // min 0: one node at once, without CPU data, trigger or cooldown.
        let mut e = evaluator(|c| c.min = 0);
        e.last_action = Some(now);
        let d = e.evaluate(&inputs(0, (None, None, 3, 0)), now);
        assert_eq!(d.action, Action::Up { from: 0, to: 1 }, "{}", d.reason);
        assert!(d.reason.starts_with("scale from zero"), "{}", d.reason);
        // min 2: straight to min.
        let mut e = evaluator(|c| c.min = 2);
        let d = e.evaluate(&inputs(0, (None, None, 3, 0)), now);
        assert_eq!(d.action, Action::Up { from: 0, to: 2 });
        // Nothing queued and min 0: stay at zero.
        let mut e = evaluator(|c| c.min = 0);
        let d = e.evaluate(&inputs(0, (None, None, 0, 0)), now);
        assert_eq!(d.action, Action::Hold);
    }

    #[test]
    fn min_and_max_clamp() {
        let now = Instant::now();
        let cases: &[(&str, u32, Load, Action)] = &[
            ("below min, idle", 1, IDLE, Action::Up { from: 1, to: 3 }),
            (
                "above max, hot",
                9,
                HOT_BACKLOG,
                Action::Down { from: 9, to: 6 },
            ),
            ("at max, hot", 6, HOT_BACKLOG, Action::Hold),
            ("at min, idle", 3, IDLE, Action::Hold),
            ("inside, hot", 5, HOT_BACKLOG, Action::Up { from: 5, to: 6 }),
            ("inside, idle", 4, IDLE, Action::Down { from: 4, to: 3 }),
        ];
        for (what, n, load, want) in cases {
            let mut e = evaluator(|c| {
                c.min = 3;
                c.max = 6;
                c.within_bounds_trigger = 1;
            });
            // Cooldowns long over, so only the bounds and the rule decide.
            e.last_action = Some(now);
            let d = e.evaluate(&inputs(*n, *load), now + Duration::from_secs(200));
            assert_eq!(&d.action, want, "{what}: {}", d.reason);
        }
        let mut e = evaluator(|c| {
            c.min = 3;
            c.max = 6;
        });
        // A fresh cooldown and no streak yet: bounds ignore both.
        e.last_action = Some(now);
        let d = e.evaluate(&inputs(1, IDLE), now);
        assert_eq!(
            d.action,
            Action::Up { from: 1, to: 3 },
            "no trigger, no cooldown"
        );
        let d = e.evaluate(&inputs(8, IDLE), now);
        assert_eq!(d.action, Action::Down { from: 8, to: 6 });
    }

    #[test]
    fn dry_run_reports_but_starts_no_cooldown() {
        let mut e = evaluator(|c| {
            c.dry_run = true;
            c.within_bounds_trigger = 1;
        });
        let t0 = Instant::now();
        for i in 0..3 {
            let now = t0 + STEP * i;
            let d = e.evaluate(&inputs(2, HOT_BACKLOG), now);
            assert_eq!(d.action, Action::Up { from: 2, to: 3 }, "{}", d.reason);
            assert!(d.dry_run);
            e.acted(&d.action, now);
            let s = e.status(now);
            assert_eq!(s.cooldown_up_remaining_ms, 0);
            assert_eq!(s.cooldown_down_remaining_ms, 0);
            assert_eq!(s.up_streak, i + 1, "streaks are not reset by a dry run");
        }
    }

    #[test]
    fn cooldown_does_not_stop_counting() {
        let mut e = evaluator(|c| c.within_bounds_trigger = 3);
        let t0 = Instant::now();
        e.acted(&Action::Up { from: 1, to: 2 }, t0);
        // Hot for 5 evaluations inside the 60 s up cooldown: the streak reaches 5 but nothing
        // happens, and the reason says how long is left.
        for i in 1..=5 {
            let d = e.evaluate(&inputs(2, HOT_BACKLOG), t0 + STEP * i);
            assert_eq!(d.action, Action::Hold, "{}", d.reason);
            if i >= 3 {
                let left = 60 - 10 * i;
                assert!(
                    d.reason.contains(&format!("cooling down (up) for {left}s")),
                    "{}",
                    d.reason
                );
            }
        }
        let s = e.status(t0 + STEP * 5);
        assert_eq!(s.up_streak, 5);
        assert_eq!(s.cooldown_up_remaining_ms, 10_000);
        assert_eq!(s.cooldown_down_remaining_ms, 70_000);
        assert_eq!(s.trigger, 3);
        assert!(s.last_decision.is_some());
        // The cooldown ends: the trigger was met long ago, so it acts at once.
        let d = e.evaluate(&inputs(2, HOT_BACKLOG), t0 + STEP * 6);
        assert_eq!(d.action, Action::Up { from: 2, to: 3 }, "{}", d.reason);

        // A scale-up also holds back a scale-down for the (longer) down cooldown.
        let mut e = evaluator(|c| c.within_bounds_trigger = 1);
        e.acted(&Action::Up { from: 1, to: 2 }, t0);
        let d = e.evaluate(&inputs(2, IDLE), t0 + Duration::from_secs(100));
        assert_eq!(d.action, Action::Hold);
        assert!(
            d.reason.contains("cooling down (down) for 20s"),
            "{}",
            d.reason
        );
        let d = e.evaluate(&inputs(2, IDLE), t0 + Duration::from_secs(120));
        assert_eq!(d.action, Action::Down { from: 2, to: 1 });
    }

    #[test]
    fn decisions_serialize_for_the_status_endpoint() {
        let mut e = evaluator(|c| c.within_bounds_trigger = 1);
        let d = e.evaluate(&inputs(2, HOT_BACKLOG), Instant::now());
        let v = serde_json::to_value(&d).expect("serializes");
        assert_eq!(v["action"], serde_json::json!({"up": {"from": 2, "to": 3}}));
        assert_eq!(v["votes"][0]["says"], "up");
        assert_eq!(v["votes"][0]["check"], "cpu");
        assert_eq!(v["dry_run"], false);
        let hold = serde_json::to_value(Action::Hold).expect("serializes");
        assert_eq!(hold, "hold");
        let s = serde_json::to_value(e.status(Instant::now())).expect("serializes");
        assert_eq!(s["last_decision"]["action"]["up"]["to"], 3);
    }

    #[test]
    fn threshold_watch_reports_each_crossing_once() {
        let mut w = ThresholdWatch::new("cpu", 80.0, 70.0);
        let values = [
            50.0,
            79.0,
            81.0,
            85.0,
            75.0,
            81.0,
            69.0,
            65.0,
            71.0,
            f64::NAN,
            81.0,
        ];
        let got: Vec<Option<(Direction, f64)>> = values
            .iter()
            .map(|v| w.observe(*v).map(|c| (c.direction, c.threshold)))
            .collect();
        let a = Some((Direction::Above, 80.0));
        let b = Some((Direction::Below, 70.0));
        assert_eq!(
            got,
            vec![None, None, a, None, None, None, b, None, None, None, a]
        );

        // Noise across one threshold: one event, not one per sample.
        let mut w = ThresholdWatch::new("mem", 90.0, 81.0);
        let n = [89.0, 91.0, 89.0, 91.0, 89.0, 91.0]
            .iter()
            .filter_map(|v| w.observe(*v))
            .count();
        assert_eq!(n, 1);

        // Starting above reports at once, with the metric and value.
        let mut w = ThresholdWatch::new("cpu", 80.0, 90.0);
        assert_eq!(
            w.observe(95.0),
            Some(Crossing {
                metric: "cpu",
                value: 95.0,
                threshold: 80.0,
                direction: Direction::Above
            })
        );
        // low above high became high: just under high is below.
        assert_eq!(w.observe(79.0).map(|c| c.direction), Some(Direction::Below));
    }
}
