//! The GStreamer transcoder: one source file in, one MP4 per ladder rung out, and a report of
//! what was made. It owns probing the source, planning the ladder against it, building and
//! supervising the pipeline, checking every output, and cleaning up after a failure. It knows
//! nothing of tasks, stores or object storage: the worker pipeline calls [`transcode`] on a
//! local file (from `spawn_blocking`, since it blocks) and uploads what it returns.
//!
//! The pipeline is built element by element, never parsed from a string, so nothing from a task
//! can reach a pipeline description:
//!
//! ```text
//! filesrc → decodebin ─(video pad)→ videoconvert → I420 → tee ─┬→ queue → videoscale → videorate
//!                     │                                         │   → caps → x264enc → h264parse → mp4mux → filesink
//!                     │                                         └→ … one branch per rung
//!                     └(audio pad)→ audioconvert → audioresample → AAC encoder → tee → queue → each mp4mux
//! ```
//!
//! Decisions, each with a test in `worker/tests/transcode.rs`:
//! - **Probe first.** The source is probed with `Discoverer` before anything is built, so the
//!   graph matches the source: the audio branch exists only when the source has audio (a static
//!   graph with an audio branch that never gets a pad hangs on GStreamer 1.22), and a source with
//!   no video stream (or only a still image) fails at once with [`TranscodeError::NotVideo`].
//!   decodebin's pads are still linked as they appear, and `no-more-pads` turns a stream that
//!   the probe promised but decodebin did not expose into an error rather than a hang.
//! - **Rungs taller than the source are dropped**, never upscaled, and named in
//!   [`TranscodeReport::dropped`]. When *every* rung is taller, the smallest rung is kept but
//!   capped to the source's height (its width scaled to keep the rung's aspect, both even), so a
//!   small but valid video still gives one playable output instead of a failed task; the output's
//!   real size is in its [`RenditionOutput`].
//! - **Aspect.** Each output is exactly the rung's size with square pixels; a source of another
//!   shape is letterboxed or pillarboxed (`videoscale add-borders`), never stretched.
//! - **Frame rate and keyframes.** Outputs keep the source's frame rate (`videorate` makes it
//!   constant). Every encoder gets the same `key-int-max` (2 s of frames; 60 when the source's
//!   rate is unknown) and `scenecut=0`, so keyframes fall on the same frames in every rung.
//! - **Audio** is encoded once, at the highest `audio_kbps` among the kept rungs (the ladder's
//!   best audio costs little next to its video), and the same AAC stream goes to every output.
//! - **Bounded time.** Errors on the bus end the run at once; a stall watchdog fails the run when
//!   the slowest rung's encoded position has not moved for `stall_timeout`; a hard timeout caps
//!   the whole run. The probe is bounded too, and retries a discovery that timed out, because
//!   GStreamer 1.22's decodebin can drop a demuxer's error (see `discover.rs`). The input must
//!   be a regular local file: a blocking read (a FIFO, a hung network mount) cannot be
//!   interrupted by tearing a pipeline down.
//! - **Outputs are checked** with `Discoverer` after EOS: H.264 video of the planned size, AAC
//!   audio when the source has audio, and a duration no shorter than the source's less
//!   `max(500 ms, 1 %)`. A truncated MP4 whose index survived decodes to a clean EOS with half
//!   the frames; this check turns it into [`TranscodeError::Truncated`].
//! - **Failure leaves nothing behind**: the pipeline is set to NULL on every path (a guard does
//!   it, even on panic) and every output file of the run is deleted.
//! - **Encoder threads**: [`X264_THREADS`] per rung. The rungs already encode in parallel, so
//!   x264's own default (1.5 threads per core for each encoder, so 12 or more on a 2-core
//!   machine for the hd ladder) only adds frame threads: on the hd ladder over a 20 s 1080p
//!   clip it cost 37–43 s of CPU against 35–37 s with 1 or 2 threads, for no gain in wall time.
//!   2 rather than 1 lets the largest rung, most of the work, use both cores.
//! - `video_kbps` in a [`RenditionOutput`] is measured: the bytes of H.264 that went into the
//!   muxer, over the output's duration. It excludes audio and container overhead, so it is
//!   comparable with the rung's requested `video_kbps`.

mod discover;
mod graph;
mod ladder;
mod supervise;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gstreamer as gst;
use transcode_core::spec::{CodecPreset, Rendition};

/// x264 threads per rung (see the module doc). Public so benchmarks can give their baselines
/// byte-identical encoder settings.
pub const X264_THREADS: u32 = 2;

/// The default for [`TranscodeJob::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The floor of the default hard timeout, which is otherwise ten times the source's duration.
pub const MIN_HARD_TIMEOUT: Duration = Duration::from_secs(120);

/// One transcode: a local source file and the ladder to make from it.
#[derive(Debug, Clone)]
pub struct TranscodeJob {
    pub input: PathBuf,
    /// Created when missing. Outputs are `<out_dir>/<rendition name>.mp4`.
    pub out_dir: PathBuf,
    pub renditions: Vec<Rendition>,
    pub codec_preset: CodecPreset,
    /// How long the encoded position may stand still before the run fails as stalled.
    pub stall_timeout: Duration,
    /// `None`: `max(120 s, 10 × the source's duration)`.
    pub hard_timeout: Option<Duration>,
}

impl TranscodeJob {
    /// A job with the default timeouts.
    pub fn new(
        input: impl Into<PathBuf>,
        out_dir: impl Into<PathBuf>,
        renditions: Vec<Rendition>,
        codec_preset: CodecPreset,
    ) -> Self {
        TranscodeJob {
            input: input.into(),
            out_dir: out_dir.into(),
            renditions,
            codec_preset,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            hard_timeout: None,
        }
    }

    /// The hard timeout in force for a source of `duration_ms`.
    pub fn effective_hard_timeout(&self, duration_ms: u64) -> Duration {
        self.hard_timeout.unwrap_or_else(|| {
            MIN_HARD_TIMEOUT.max(Duration::from_millis(duration_ms.saturating_mul(10)))
        })
    }
}

/// What the probe learnt about a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    pub width: u32,
    pub height: u32,
    /// 0 when the container does not say.
    pub duration_ms: u64,
    pub has_audio: bool,
    /// `(0, 1)` for a variable or unknown frame rate.
    pub framerate: (i32, i32),
}

/// One output file, as measured after the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenditionOutput {
    pub name: String,
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    pub duration_ms: u64,
    pub bytes: u64,
    /// H.264 bytes written over the output's duration (no audio, no container overhead).
    pub video_kbps: u32,
}

/// The result of a successful run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranscodeReport {
    pub source: SourceInfo,
    /// In ladder order.
    pub outputs: Vec<RenditionOutput>,
    /// Names of the rungs taller than the source, which were not made.
    pub dropped: Vec<String>,
}

/// Why a transcode failed. [`TranscodeError::code`] is stable and stored; the message is for
/// people and carries GStreamer's own text where GStreamer produced the error.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("not a video: {message}")]
    NotVideo { message: String },
    #[error("corrupt input: {message}")]
    Corrupt { message: String },
    #[error("truncated input: the source says {expected_ms} ms but only {got_ms} ms could be transcoded")]
    Truncated { expected_ms: u64, got_ms: u64 },
    #[error("stalled: no progress for {secs} s")]
    Stalled { secs: u64 },
    #[error("timed out after {secs} s")]
    Timeout { secs: u64 },
    #[error("missing GStreamer plugin: {name}")]
    MissingPlugin { name: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A job this transcoder cannot run as given (spec validation should have refused it).
    #[error("invalid job: {message}")]
    InvalidJob { message: String },
    #[error("GStreamer: {message}")]
    Gst { message: String },
}

impl TranscodeError {
    /// A stable snake_case code for the store and the events.
    pub fn code(&self) -> &'static str {
        match self {
            TranscodeError::NotVideo { .. } => "not_video",
            TranscodeError::Corrupt { .. } => "corrupt_input",
            TranscodeError::Truncated { .. } => "truncated_input",
            TranscodeError::Stalled { .. } => "transcode_stalled",
            TranscodeError::Timeout { .. } => "transcode_timeout",
            TranscodeError::MissingPlugin { .. } => "missing_plugin",
            TranscodeError::Io { .. } => "io_error",
            TranscodeError::InvalidJob { .. } => "invalid_job",
            TranscodeError::Gst { .. } => "gstreamer_error",
        }
    }

    /// True when the error proves the input or the job itself bad. The others (stalls,
    /// timeouts, I/O, missing plugins, other GStreamer errors) could in principle be the
    /// machine's fault; the pipeline still fails the task for them, except a missing plugin
    /// (escalated: an operator fixes the node) and ENOSPC (a scratch error), because the issue
    /// contract is that a bad input ends within the watchdog's bound instead of being retried
    /// forever. An admin can resubmit; see docs/decisions.md.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TranscodeError::NotVideo { .. }
                | TranscodeError::Corrupt { .. }
                | TranscodeError::Truncated { .. }
                | TranscodeError::InvalidJob { .. }
        )
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        TranscodeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The elements every run needs, besides an AAC encoder.
const REQUIRED_ELEMENTS: &[&str] = &[
    "filesrc",
    "decodebin",
    "videoconvert",
    "capsfilter",
    "tee",
    "queue",
    "videoscale",
    "videorate",
    "x264enc",
    "h264parse",
    "mp4mux",
    "filesink",
    "audioconvert",
    "audioresample",
];

/// AAC encoders in order of preference; all take `bitrate` in bits/s.
const AAC_ENCODERS: &[(&str, u32)] = &[
    ("avenc_aac", 512_000),
    ("fdkaacenc", 512_000),
    ("voaacenc", 320_000),
];

/// The AAC encoder [`init`] found: its factory name and the highest bitrate it takes.
#[derive(Debug, Clone, Copy)]
struct AacEncoder {
    factory: &'static str,
    max_bps: u32,
}

#[derive(Debug, Clone)]
enum InitFailure {
    Gst(String),
    MissingPlugin(String),
}

static INIT: OnceLock<Result<AacEncoder, InitFailure>> = OnceLock::new();

/// Initialises GStreamer once per process and checks that every element the pipeline uses is
/// installed. Cheap after the first call; [`probe`] and [`transcode`] call it themselves.
pub fn init() -> Result<(), TranscodeError> {
    aac_encoder().map(|_| ())
}

fn aac_encoder() -> Result<AacEncoder, TranscodeError> {
    let outcome = INIT.get_or_init(|| {
        gst::init().map_err(|e| InitFailure::Gst(format!("gst::init failed: {e}")))?;
        if let Some(missing) = REQUIRED_ELEMENTS
            .iter()
            .find(|name| gst::ElementFactory::find(name).is_none())
        {
            return Err(InitFailure::MissingPlugin((*missing).to_string()));
        }
        let found = AAC_ENCODERS
            .iter()
            .find(|(name, _)| gst::ElementFactory::find(name).is_some())
            .map(|&(factory, max_bps)| AacEncoder { factory, max_bps })
            .ok_or_else(|| {
                InitFailure::MissingPlugin(
                    "an AAC encoder (avenc_aac, fdkaacenc or voaacenc)".into(),
                )
            })?;
        tracing::info!(
            gstreamer = %gst::version_string(),
            aac_encoder = found.factory,
            "GStreamer ready"
        );
        Ok(found)
    });
    match outcome {
        Ok(aac) => Ok(*aac),
        Err(InitFailure::Gst(message)) => Err(TranscodeError::Gst {
            message: message.clone(),
        }),
        Err(InitFailure::MissingPlugin(name)) => {
            Err(TranscodeError::MissingPlugin { name: name.clone() })
        }
    }
}

/// Probes a local file: its video size, duration, frame rate and whether it has audio. Fails
/// with [`TranscodeError::NotVideo`] when it has no video stream (or is a still image), and
/// within `timeout` whatever the file holds.
pub fn probe(input: &Path, timeout: Duration) -> Result<SourceInfo, TranscodeError> {
    init()?;
    let meta = std::fs::metadata(input).map_err(|e| TranscodeError::io(input, e))?;
    if !meta.is_file() {
        return Err(TranscodeError::io(
            input,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    // Typefinding an empty file fails too, but with a message about "no data" that reads
    // like a bug; an empty upload deserves to be named as such.
    if meta.len() == 0 {
        return Err(TranscodeError::Corrupt {
            message: "the input file is empty (0 bytes)".into(),
        });
    }
    discover::source(input, timeout)
}

/// Transcodes `job.input` into one MP4 per kept rung under `job.out_dir`. Blocks until done;
/// `progress` gets 0..=100 at most about twice a second. On failure no output file is left.
pub fn transcode(
    job: &TranscodeJob,
    progress: &(dyn Fn(u8) + Send + Sync),
) -> Result<TranscodeReport, TranscodeError> {
    let started = Instant::now();
    let aac = aac_encoder()?;
    let source = probe(&job.input, job.stall_timeout)?;
    let plan = ladder::plan(&source, &job.renditions, &job.out_dir, aac.max_bps)?;
    tracing::info!(
        input = %job.input.display(),
        width = source.width,
        height = source.height,
        duration_ms = source.duration_ms,
        has_audio = source.has_audio,
        rungs = ?plan.rungs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        dropped = ?plan.dropped,
        "transcode starting"
    );
    std::fs::create_dir_all(&job.out_dir).map_err(|e| TranscodeError::io(&job.out_dir, e))?;

    let outcome = run_and_check(job, &source, &plan, aac, progress);
    match outcome {
        Ok(outputs) => {
            progress(100);
            tracing::info!(
                input = %job.input.display(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                outputs = outputs.len(),
                "transcode finished"
            );
            Ok(TranscodeReport {
                source,
                outputs,
                dropped: plan.dropped,
            })
        }
        Err(e) => {
            for rung in &plan.rungs {
                remove_partial(&rung.path);
            }
            tracing::warn!(
                input = %job.input.display(),
                code = e.code(),
                error = %e,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "transcode failed"
            );
            Err(e)
        }
    }
}

fn run_and_check(
    job: &TranscodeJob,
    source: &SourceInfo,
    plan: &ladder::Plan,
    aac: AacEncoder,
    progress: &(dyn Fn(u8) + Send + Sync),
) -> Result<Vec<RenditionOutput>, TranscodeError> {
    let graph = graph::build(&job.input, source, plan, job.codec_preset, aac.factory)?;
    let limits = supervise::Limits {
        stall: job.stall_timeout,
        hard: job.effective_hard_timeout(source.duration_ms),
    };
    let video_bytes = supervise::run(graph, source.duration_ms, limits, progress)?;
    plan.rungs
        .iter()
        .zip(video_bytes)
        .map(|(rung, bytes)| discover::check_output(rung, source, bytes, job.stall_timeout))
        .collect()
}

fn remove_partial(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed partial output"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove partial output")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_permanence_follows_the_input() {
        let cases: Vec<(TranscodeError, &str, bool)> = vec![
            (
                TranscodeError::NotVideo {
                    message: "x".into(),
                },
                "not_video",
                true,
            ),
            (
                TranscodeError::Corrupt {
                    message: "x".into(),
                },
                "corrupt_input",
                true,
            ),
            (
                TranscodeError::Truncated {
                    expected_ms: 2,
                    got_ms: 1,
                },
                "truncated_input",
                true,
            ),
            (
                TranscodeError::InvalidJob {
                    message: "x".into(),
                },
                "invalid_job",
                true,
            ),
            (
                TranscodeError::Stalled { secs: 1 },
                "transcode_stalled",
                false,
            ),
            (
                TranscodeError::Timeout { secs: 1 },
                "transcode_timeout",
                false,
            ),
            (
                TranscodeError::MissingPlugin { name: "x".into() },
                "missing_plugin",
                false,
            ),
            (
                TranscodeError::io(Path::new("/x"), std::io::Error::other("disk")),
                "io_error",
                false,
            ),
            (
                TranscodeError::Gst {
                    message: "x".into(),
                },
                "gstreamer_error",
                false,
            ),
        ];
        for (e, code, permanent) in cases {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(e.is_permanent(), permanent, "{e}");
        }
    }

    #[test]
    fn hard_timeout_defaults_to_ten_times_the_source_with_a_floor() {
        let mut job = TranscodeJob::new("/in.mp4", "/out", vec![], CodecPreset::Veryfast);
        assert_eq!(job.stall_timeout, DEFAULT_STALL_TIMEOUT);
        assert_eq!(job.effective_hard_timeout(3_000), MIN_HARD_TIMEOUT);
        assert_eq!(job.effective_hard_timeout(60_000), Duration::from_secs(600));
        job.hard_timeout = Some(Duration::from_secs(5));
        assert_eq!(job.effective_hard_timeout(60_000), Duration::from_secs(5));
    }
}
