//! Running a built pipeline to its end, within bounded time: the bus is polled for EOS and
//! errors, the rungs' meters feed progress and a stall watchdog, a hard timeout caps the run,
//! and GStreamer's errors are mapped onto [`TranscodeError`]. The pipeline is set to NULL on
//! every way out, by a guard, so a failure can never leave threads running or files open.

use std::time::{Duration, Instant};

use gst::prelude::*;
use gstreamer as gst;
use gstreamer_pbutils as pbutils;

use super::graph::Graph;
use super::TranscodeError;

/// How often the watchdog looks when the bus is quiet.
const POLL: Duration = Duration::from_millis(200);
/// The least time between two progress calls.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub stall: Duration,
    pub hard: Duration,
}

/// Sets the pipeline to NULL when dropped, whatever path the run leaves by.
struct NullOnDrop(gst::Pipeline);

impl Drop for NullOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_state(gst::State::Null) {
            tracing::warn!(error = %e, "could not set the pipeline to NULL");
        }
    }
}

/// Runs `graph` to EOS. Returns the H.264 bytes each rung wrote, in plan order; by the time it
/// returns, the pipeline is in NULL and every output file is closed.
pub(super) fn run(
    graph: Graph,
    duration_ms: u64,
    limits: Limits,
    progress: &(dyn Fn(u8) + Send + Sync),
) -> Result<Vec<u64>, TranscodeError> {
    let guard = NullOnDrop(graph.pipeline.clone());
    let bus = graph.pipeline.bus().ok_or_else(|| TranscodeError::Gst {
        message: "the pipeline has no bus".into(),
    })?;
    let mut missing_plugins = Vec::new();
    if graph.pipeline.set_state(gst::State::Playing).is_err() {
        // The reason, if GStreamer gave one, is already on the bus.
        let error = bus
            .iter_filtered(&[gst::MessageType::Error])
            .next()
            .and_then(|msg| match msg.view() {
                gst::MessageView::Error(err) => Some(classify(&graph, err, &missing_plugins)),
                _ => None,
            });
        return Err(error.unwrap_or_else(|| TranscodeError::Gst {
            message: "the pipeline refused to start".into(),
        }));
    }

    let mut watchdog = Watchdog::new(limits, Instant::now());
    let mut reported: Option<(Instant, u8)> = None;
    loop {
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64)) {
            match msg.view() {
                gst::MessageView::Eos(_) => break,
                gst::MessageView::Error(err) => {
                    return Err(classify(&graph, err, &missing_plugins));
                }
                gst::MessageView::Warning(w) => tracing::warn!(
                    element = %w.src().map(|s| s.path_string().to_string()).unwrap_or_default(),
                    warning = %w.error(),
                    debug = ?w.debug(),
                    "GStreamer warning"
                ),
                gst::MessageView::Element(_) => {
                    if let Ok(missing) = pbutils::MissingPluginMessage::parse(&msg) {
                        missing_plugins.push(missing.description().to_string());
                    }
                }
                _ => {}
            }
        }

        let now = Instant::now();
        // The slowest rung is the run's real position: a single stuck branch stalls every
        // muxer sharing its decoder, so it must trip the watchdog too.
        let slowest = graph
            .meters
            .iter()
            .map(|m| m.position_ns())
            .min()
            .unwrap_or(0);
        watchdog.observe(now, slowest)?;
        if let Some(pct) = percent(slowest, duration_ms) {
            let due = match reported {
                None => true,
                Some((at, last)) => pct != last && now.duration_since(at) >= PROGRESS_EVERY,
            };
            if due {
                progress(pct);
                reported = Some((now, pct));
            }
        }
    }
    drop(guard);
    Ok(graph.meters.iter().map(|m| m.video_bytes()).collect())
}

/// The stall watchdog and the hard timeout, judged on instants handed in so they can be tested
/// without waiting.
#[derive(Debug)]
struct Watchdog {
    limits: Limits,
    started: Instant,
    position_ns: u64,
    moved_at: Instant,
}

impl Watchdog {
    fn new(limits: Limits, now: Instant) -> Self {
        Watchdog {
            limits,
            started: now,
            position_ns: 0,
            moved_at: now,
        }
    }

    fn observe(&mut self, now: Instant, position_ns: u64) -> Result<(), TranscodeError> {
        if position_ns > self.position_ns {
            self.position_ns = position_ns;
            self.moved_at = now;
        }
        if now.duration_since(self.started) >= self.limits.hard {
            return Err(TranscodeError::Timeout {
                secs: self.limits.hard.as_secs(),
            });
        }
        if now.duration_since(self.moved_at) >= self.limits.stall {
            return Err(TranscodeError::Stalled {
                secs: self.limits.stall.as_secs(),
            });
        }
        Ok(())
    }
}

/// Progress in percent, or `None` when the source's duration is unknown. 100 is kept for when
/// the outputs have been checked, so a run at its last frame reports 99.
fn percent(position_ns: u64, duration_ms: u64) -> Option<u8> {
    let pct = (position_ns / 1_000_000)
        .saturating_mul(100)
        .checked_div(duration_ms)?;
    Some(pct.min(99) as u8)
}

/// Maps an error message from the bus onto our taxonomy, by where it came from and what it
/// says. Errors from the decoding side are the input's fault; anything after the tee is ours.
fn classify(graph: &Graph, err: &gst::message::Error, missing: &[String]) -> TranscodeError {
    let error = err.error();
    let text = error.message().to_string();
    let src = err.src();
    let element = src.map(|s| s.name().to_string()).unwrap_or_default();
    tracing::debug!(
        element = %src.map(|s| s.path_string().to_string()).unwrap_or_default(),
        error = %text,
        debug = ?err.debug(),
        "pipeline error"
    );
    if matches!(
        error.kind::<gst::CoreError>(),
        Some(gst::CoreError::MissingPlugin)
    ) || matches!(
        error.kind::<gst::StreamError>(),
        Some(gst::StreamError::CodecNotFound)
    ) {
        let name = if missing.is_empty() {
            text
        } else {
            missing.join(", ")
        };
        return TranscodeError::MissingPlugin { name };
    }
    let Some(src) = src else {
        return TranscodeError::Gst { message: text };
    };
    if let Some((_, path)) = graph
        .sinks
        .iter()
        .find(|(sink, _)| sink.upcast_ref::<gst::Object>() == src)
    {
        return TranscodeError::Io {
            path: path.clone(),
            source: std::io::Error::new(io_kind(&error), text),
        };
    }
    if src == graph.filesrc.upcast_ref::<gst::Object>() {
        return TranscodeError::Io {
            path: graph.input.clone(),
            source: std::io::Error::new(io_kind(&error), text),
        };
    }
    let from_decoding =
        src == graph.decodebin.upcast_ref::<gst::Object>() || src.has_as_ancestor(&graph.decodebin);
    match error.kind::<gst::StreamError>() {
        Some(gst::StreamError::TypeNotFound | gst::StreamError::WrongType) if from_decoding => {
            TranscodeError::NotVideo { message: text }
        }
        Some(_) if from_decoding => TranscodeError::Corrupt {
            message: format!("{element}: {text}"),
        },
        _ => TranscodeError::Gst {
            message: format!("{element}: {text}"),
        },
    }
}

fn io_kind(error: &gst::glib::Error) -> std::io::ErrorKind {
    match error.kind::<gst::ResourceError>() {
        Some(gst::ResourceError::NotFound) => std::io::ErrorKind::NotFound,
        Some(gst::ResourceError::NoSpaceLeft) => std::io::ErrorKind::StorageFull,
        Some(gst::ResourceError::NotAuthorized) => std::io::ErrorKind::PermissionDenied,
        _ => std::io::ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        stall: Duration::from_secs(30),
        hard: Duration::from_secs(120),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_moving_position_keeps_the_watchdog_quiet() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(LIMITS, t0);
        for i in 1..=10u64 {
            w.observe(t0 + secs(i * 10), i * 1_000_000_000)
                .expect("progress every 10 s is no stall");
        }
    }

    #[test]
    fn no_progress_for_the_stall_timeout_is_a_stall() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(LIMITS, t0);
        w.observe(t0 + secs(5), 1_000).expect("moving");
        w.observe(t0 + secs(34), 1_000).expect("29 s still");
        let e = w.observe(t0 + secs(35), 1_000).expect_err("30 s still");
        assert!(matches!(e, TranscodeError::Stalled { secs: 30 }), "{e}");
        // Going backwards is not progress either.
        let mut w = Watchdog::new(LIMITS, t0);
        w.observe(t0 + secs(1), 5_000).expect("moving");
        let e = w
            .observe(t0 + secs(31), 4_000)
            .expect_err("no forward motion");
        assert!(matches!(e, TranscodeError::Stalled { .. }), "{e}");
    }

    #[test]
    fn a_run_that_keeps_moving_still_hits_the_hard_timeout() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(LIMITS, t0);
        for i in 1..12u64 {
            w.observe(t0 + secs(i * 10), i)
                .expect("under the hard timeout");
        }
        let e = w.observe(t0 + secs(120), 99).expect_err("hard timeout");
        assert!(matches!(e, TranscodeError::Timeout { secs: 120 }), "{e}");
    }

    #[test]
    fn percent_is_capped_below_100_and_unknown_without_a_duration() {
        assert_eq!(percent(0, 3_000), Some(0));
        assert_eq!(percent(1_500_000_000, 3_000), Some(50));
        assert_eq!(percent(3_000_000_000, 3_000), Some(99));
        assert_eq!(percent(9_000_000_000, 3_000), Some(99));
        assert_eq!(percent(1_000_000_000, 0), None);
    }
}
