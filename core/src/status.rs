//! The task state machine of ARCHITECTURE §4. Every status change in every store goes through
//! [`TaskStatus::check_transition`], so the rules live in exactly one place.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Escalated,
    Incomplete,
    Cancelled,
}

/// A status change the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal task transition {from} -> {to}")]
pub struct IllegalTransition {
    pub from: TaskStatus,
    pub to: TaskStatus,
}

/// A status string that names no status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task status {0:?} (expected one of: queued, running, succeeded, failed, escalated, incomplete, cancelled)")]
pub struct UnknownStatus(pub String);

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Escalated,
        TaskStatus::Incomplete,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Escalated => "escalated",
            TaskStatus::Incomplete => "incomplete",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// No transition leaves a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// The allowed edges. `running -> queued` is the graceful release a draining worker makes
    /// for work it could not finish; it is not a failure, so it does not pass via `incomplete`.
    pub fn can_transition(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Escalated)
                | (Running, Incomplete)
                | (Running, Cancelled)
                | (Running, Queued)
                | (Escalated, Queued)
                | (Escalated, Failed)
                | (Escalated, Cancelled)
                | (Incomplete, Queued)
                | (Incomplete, Failed)
        )
    }

    pub fn check_transition(self, to: TaskStatus) -> Result<(), IllegalTransition> {
        if self.can_transition(to) {
            Ok(())
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskStatus::*;

    /// The whole 7x7 table, written out, so a change to the rules has to change this too.
    #[test]
    fn every_pair_of_states() {
        // rows: from; columns: to, in TaskStatus::ALL order
        // Q  R  S  F  E  I  C
        let table: [(TaskStatus, [u8; 7]); 7] = [
            (Queued, [0, 1, 0, 0, 0, 0, 1]),
            (Running, [1, 0, 1, 1, 1, 1, 1]),
            (Succeeded, [0, 0, 0, 0, 0, 0, 0]),
            (Failed, [0, 0, 0, 0, 0, 0, 0]),
            (Escalated, [1, 0, 0, 1, 0, 0, 1]),
            (Incomplete, [1, 0, 0, 1, 0, 0, 0]),
            (Cancelled, [0, 0, 0, 0, 0, 0, 0]),
        ];
        for (from, row) in table {
            for (to, allowed) in TaskStatus::ALL.into_iter().zip(row) {
                let got = from.check_transition(to);
                if allowed == 1 {
                    assert_eq!(got, Ok(()), "{from} -> {to} should be allowed");
                } else {
                    assert_eq!(
                        got,
                        Err(IllegalTransition { from, to }),
                        "{from} -> {to} should be refused"
                    );
                }
            }
        }
    }

    #[test]
    fn terminal_states_have_no_exits() {
        for from in TaskStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert!(TaskStatus::ALL.iter().all(|to| !from.can_transition(*to)));
        }
    }

    #[test]
    fn parse_round_trip() {
        for st in TaskStatus::ALL {
            assert_eq!(st.as_str().parse::<TaskStatus>(), Ok(st));
            assert_eq!(
                serde_json::to_string(&st).expect("serialize"),
                format!("\"{st}\"")
            );
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }
}
