//! Process identity from /proc. A pid alone is not an identity: after a task exits its pid can
//! be reused by an unrelated process, so the driver always pairs a pid with the process start
//! time (field 22 of /proc/<pid>/stat, clock ticks since boot) and refuses to touch a pid whose
//! start time differs.

use std::path::Path;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process that the driver tracks: pid plus start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process {0} not found")]
    Gone(i32),
    #[error("pid {pid} now belongs to another process (start time {found}, expected {expected})")]
    Reused { pid: i32, found: u64, expected: u64 },
    #[error("cannot parse /proc/{0}/stat")]
    Parse(i32),
    #[error("signal {signal} to pid {pid}: {source}")]
    Signal {
        pid: i32,
        signal: Signal,
        source: nix::Error,
    },
    #[error("unknown signal {0:?}; use a name such as SIGTERM, SIGHUP or SIGUSR1")]
    UnknownSignal(String),
}

/// State letter and start time of a pid, or `None` when there is no such process.
pub fn stat(pid: i32) -> Result<Option<(char, u64)>, ProcError> {
    let text = match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
    {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    // comm (field 2) may contain spaces and parentheses, so parse after the last ')'.
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or(ProcError::Parse(pid))?;
    let mut fields = after.split_whitespace();
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or(ProcError::Parse(pid))?;
    // After ')' the fields start at field 3 (state); starttime is field 22, i.e. 19 further.
    let start = fields
        .nth(18)
        .and_then(|s| s.parse().ok())
        .ok_or(ProcError::Parse(pid))?;
    Ok(Some((state, start)))
}

impl ProcId {
    /// Identifies a live pid now (used right after spawning it).
    pub fn of(pid: i32) -> Result<Self, ProcError> {
        match stat(pid)? {
            Some((_, start_time)) => Ok(Self { pid, start_time }),
            None => Err(ProcError::Gone(pid)),
        }
    }

    /// Ok when the pid still belongs to this process and has not exited (zombies count as
    /// exited: they have finished and only wait to be reaped).
    pub fn check(&self) -> Result<(), ProcError> {
        match stat(self.pid)? {
            None => Err(ProcError::Gone(self.pid)),
            Some((_, found)) if found != self.start_time => Err(ProcError::Reused {
                pid: self.pid,
                found,
                expected: self.start_time,
            }),
            Some(('Z' | 'X' | 'x', _)) => Err(ProcError::Gone(self.pid)),
            Some(_) => Ok(()),
        }
    }

    pub fn is_running(&self) -> bool {
        self.check().is_ok()
    }

    /// Sends a signal only if the pid is still this process, so a reused pid is never hit.
    pub fn signal(&self, signal: Signal) -> Result<(), ProcError> {
        self.check()?;
        nix::sys::signal::kill(Pid::from_raw(self.pid), signal).map_err(|source| {
            ProcError::Signal {
                pid: self.pid,
                signal,
                source,
            }
        })
    }
}

/// Parses the signal names Nomad passes ("SIGTERM", also "TERM", "sigterm" or a number).
pub fn parse_signal(name: &str) -> Result<Signal, ProcError> {
    let trimmed = name.trim();
    if let Ok(n) = trimmed.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| ProcError::UnknownSignal(name.into()));
    }
    let upper = trimmed.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>()
        .map_err(|_| ProcError::UnknownSignal(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_identity() {
        let me = ProcId::of(std::process::id() as i32).expect("self");
        assert!(me.is_running());
        let wrong = ProcId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(matches!(wrong.check(), Err(ProcError::Reused { .. })));
        assert!(matches!(
            wrong.signal(Signal::SIGTERM),
            Err(ProcError::Reused { .. })
        ));
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("SIGTERM").ok(), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("hup").ok(), Some(Signal::SIGHUP));
        assert_eq!(parse_signal("10").ok(), Some(Signal::SIGUSR1));
        assert!(parse_signal("SIGNOPE").is_err());
    }
}
