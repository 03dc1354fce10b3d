//! Following work as it happens: submitting through the scaler's intake, streaming events from
//! the bus, and waiting for a task to end. The bus is fast but may drop messages (PUB/SUB), so
//! waiting also reads the task row from the store: the database has the last word.

use anyhow::{anyhow, bail, Context, Result};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;
use transcode_core::bus;
use transcode_core::protocol::IntakeReply;
use transcode_core::store::Store;
use transcode_core::{Event, Task, TaskId, TaskStatus};

/// Sends one intake request and returns the accepted task id (or the scaler's error).
pub async fn submit_via_intake(endpoint: &str, payload: Vec<u8>) -> Result<(TaskId, bool)> {
    submit_via_intake_within(endpoint, payload, Duration::from_secs(10)).await
}

/// [`submit_via_intake`] with a caller's timeout, for best-effort nudges that must not hold
/// the command up for long when the scaler is down.
pub async fn submit_via_intake_within(
    endpoint: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(TaskId, bool)> {
    let ep = endpoint.to_string();
    let reply: IntakeReply = tokio::task::spawn_blocking(move || {
        let ctx = zmq::Context::new();
        bus::intake_request(&ctx, &ep, &payload, timeout)
    })
    .await
    .context("intake client thread")?
    .with_context(|| {
        format!("no answer from the scaler's intake at {endpoint} (is the scaler running?)")
    })?;
    if reply.ok {
        let id = reply
            .task_id
            .ok_or_else(|| anyhow!("intake accepted but sent no task id"))?;
        Ok((id, reply.created.unwrap_or(true)))
    } else {
        let e = reply.error.unwrap_or(transcode_core::protocol::ErrorBody {
            code: "unknown".into(),
            message: "no error detail".into(),
        });
        bail!(IntakeRefused {
            code: e.code,
            message: e.message
        })
    }
}

/// The scaler refused a submission.
#[derive(Debug, thiserror::Error)]
#[error("intake refused ({code}): {message}")]
pub struct IntakeRefused {
    pub code: String,
    pub message: String,
}

/// Statuses after which nothing happens without an operator.
pub fn is_settled(s: TaskStatus) -> bool {
    s.is_terminal() || s == TaskStatus::Escalated
}

/// Prints one event as a line.
pub fn event_line(ev: &Event) -> String {
    let data = serde_json::to_value(&ev.body)
        .ok()
        .and_then(|v| v.get("data").cloned())
        .unwrap_or_default();
    format!(
        "{}  {:<28} {:<22} {}",
        ev.time.format("%H:%M:%S%.3f"),
        ev.event_type().as_str(),
        ev.source,
        data
    )
}

/// Follows a task until it settles, printing its events from the bus as they arrive (and a
/// progress line on a terminal). Returns the final row.
/// Subscribes to every event; do it before submitting so the first events are not missed.
pub fn subscribe(xpub: &str) -> Result<bus::SocketHandle> {
    let zctx = zmq::Context::new();
    bus::subscriber(&zctx, xpub, &[]).context("subscribing to the event bus")
}

pub async fn wait_for_task(
    store: Arc<dyn Store>,
    mut sub: bus::SocketHandle,
    id: TaskId,
    print_events: bool,
) -> Result<Task> {
    let tty = std::io::stdout().is_terminal();
    let mut poll = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            msg = sub.rx.recv() => {
                let Some(msg) = msg else { bail!("event bus closed") };
                let Some(json) = msg.get(1) else { continue };
                let Ok(ev) = serde_json::from_slice::<Event>(json) else { continue };
                if ev.subject != Some(id) {
                    continue;
                }
                if print_events {
                    println!("{}", event_line(&ev));
                } else if tty {
                    if let transcode_core::EventBody::TaskProgress(p) = &ev.body {
                        eprint!("\r{id}: {:>3}%", p.percent);
                    }
                }
            }
            _ = poll.tick() => {
                let t = store.get_task(id).await?;
                if is_settled(t.status) {
                    if tty && !print_events {
                        eprintln!();
                    }
                    // Let the last events of the task arrive before returning.
                    let grace = tokio::time::sleep(Duration::from_millis(300));
                    tokio::pin!(grace);
                    loop {
                        tokio::select! {
                            _ = &mut grace => break,
                            msg = sub.rx.recv() => {
                                let Some(msg) = msg else { break };
                                if let Some(ev) = msg.get(1).and_then(|j| serde_json::from_slice::<Event>(j).ok()) {
                                    if print_events && ev.subject == Some(id) {
                                        println!("{}", event_line(&ev));
                                    }
                                }
                            }
                        }
                    }
                    sub.close();
                    return Ok(t);
                }
            }
        }
    }
}

/// `transcode events --follow`: prints every bus event (optionally one type) until Ctrl-C.
pub async fn follow_bus(xpub: &str, topic: Option<String>, json: bool) -> Result<()> {
    let zctx = zmq::Context::new();
    let topics: Vec<&str> = topic.as_deref().into_iter().collect();
    let mut sub = bus::subscriber(&zctx, xpub, &topics).context("subscribing to the event bus")?;
    eprintln!("following events on {xpub} (Ctrl-C to stop)");
    loop {
        tokio::select! {
            msg = sub.rx.recv() => {
                let Some(msg) = msg else { bail!("event bus closed") };
                let Some(body) = msg.get(1) else { continue };
                if json {
                    println!("{}", String::from_utf8_lossy(body));
                } else if let Ok(ev) = serde_json::from_slice::<Event>(body) {
                    println!("{}", event_line(&ev));
                }
            }
            _ = tokio::signal::ctrl_c() => {
                sub.close();
                return Ok(());
            }
        }
    }
}
