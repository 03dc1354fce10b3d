//! Human-readable tables for the CLI. Column widths adapt to the content; times are shown in
//! UTC to the second so lines from different machines compare directly.

use serde::Serialize;
use std::fmt::Write;
use transcode_core::events::StoredEvent;
use transcode_core::Task;

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub fn tasks_table(tasks: &[Task]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.status.to_string(),
                t.priority.to_string(),
                format!("{}/{}", t.attempts, t.max_attempts),
                format!("{}%", t.progress),
                t.worker_id.clone().unwrap_or_else(|| "-".into()),
                time(t.created_at),
                t.error_code
                    .as_ref()
                    .map(|c| format!("{c}: {}", t.error_message.as_deref().unwrap_or("")))
                    .unwrap_or_else(|| t.spec.source.clone()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATUS",
            "PRIO",
            "ATTEMPTS",
            "PROGRESS",
            "WORKER",
            "CREATED",
            "SOURCE / ERROR",
        ],
        &rows,
    )
}

/// What the last `ContainerErrorEscalation` of a task says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Escalation {
    pub time: chrono::DateTime<chrono::Utc>,
    /// `pull`, `push`, `transcode` or `scratch`.
    pub operation: String,
    /// Attempts made before giving up (1: the error was not worth retrying).
    pub attempts: u64,
    pub class: String,
    pub message: String,
}

/// An escalated task as `tasks --status escalated` shows it. In JSON the task's fields are
/// at the top level, as in the plain listing, plus `escalation` (null when the event is
/// missing, e.g. a task escalated by hand in the database).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Escalated {
    #[serde(flatten)]
    pub task: Task,
    pub escalation: Option<Escalation>,
}

/// The operator's work list: what failed, how often it was tried, and the last error.
pub fn escalated_table(items: &[Escalated]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            let t = &e.task;
            let (op, tries, class, message) = match &e.escalation {
                Some(x) => (
                    x.operation.clone(),
                    x.attempts.to_string(),
                    x.class.clone(),
                    x.message.clone(),
                ),
                None => (
                    "-".into(),
                    "-".into(),
                    t.error_code.clone().unwrap_or_else(|| "-".into()),
                    t.error_message.clone().unwrap_or_default(),
                ),
            };
            vec![
                t.id.to_string(),
                time(t.updated_at),
                op,
                tries,
                class,
                t.worker_id.clone().unwrap_or_else(|| "-".into()),
                t.spec.source.clone(),
                message,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ESCALATED",
            "OPERATION",
            "TRIES",
            "CLASS",
            "WORKER",
            "SOURCE",
            "ERROR",
        ],
        &rows,
    )
}

pub fn events_table(events: &[StoredEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                time(e.time),
                e.event_type.clone(),
                e.task_id
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                e.source.clone(),
                e.data.to_string(),
            ]
        })
        .collect();
    table(&["SEQ", "TIME", "TYPE", "TASK", "SOURCE", "DATA"], &rows)
}

pub fn task_details(t: &Task, events: &[StoredEvent]) -> String {
    let mut out = String::new();
    let spec = serde_json::to_string(&t.spec).unwrap_or_default();
    let _ = writeln!(out, "id:          {}", t.id);
    let _ = writeln!(out, "status:      {}", t.status);
    let _ = writeln!(out, "priority:    {}", t.priority);
    let _ = writeln!(out, "attempts:    {}/{}", t.attempts, t.max_attempts);
    let _ = writeln!(out, "progress:    {}%", t.progress);
    let _ = writeln!(
        out,
        "worker:      {} (node {})",
        t.worker_id.as_deref().unwrap_or("-"),
        t.node.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "lease token: {}", t.lease_token);
    if let Some(code) = &t.error_code {
        let _ = writeln!(
            out,
            "error:       {code}: {}",
            t.error_message.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(out, "created:     {}", time(t.created_at));
    let _ = writeln!(out, "updated:     {}", time(t.updated_at));
    let _ = writeln!(out, "spec:        {spec}");
    let _ = writeln!(out, "\nevents ({}):", events.len());
    out.push_str(&events_table(events));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }
}
