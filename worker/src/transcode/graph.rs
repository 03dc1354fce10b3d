//! Building the pipeline for one plan, element by element: one decode, one colour conversion, a
//! video tee with a scale → rate → encode → mux branch per rung, and (only when the source has
//! audio) one AAC encode teed to every muxer. It also installs the meters the supervisor reads:
//! per rung, the encoded position and the H.264 bytes that reached the muxer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gst::prelude::*;
use gstreamer as gst;
use transcode_core::spec::CodecPreset;

use super::ladder::Plan;
use super::{SourceInfo, TranscodeError, X264_THREADS};

/// What one rung's encoded stream has done so far, written from the streaming thread.
#[derive(Debug, Default)]
pub(super) struct Meter {
    /// The end of the latest encoded frame, in ns of stream time.
    position_ns: AtomicU64,
    video_bytes: AtomicU64,
}

impl Meter {
    pub fn position_ns(&self) -> u64 {
        self.position_ns.load(Ordering::Relaxed)
    }

    pub fn video_bytes(&self) -> u64 {
        self.video_bytes.load(Ordering::Relaxed)
    }

    fn record(&self, buffer: &gst::BufferRef) {
        if let Some(pts) = buffer.pts() {
            let end = pts + buffer.duration().unwrap_or(gst::ClockTime::ZERO);
            // B-frames arrive out of presentation order; the position only moves forward.
            self.position_ns
                .fetch_max(end.nseconds(), Ordering::Relaxed);
        }
        self.video_bytes
            .fetch_add(buffer.size() as u64, Ordering::Relaxed);
    }
}

/// A built pipeline, in NULL state, and what the supervisor needs to judge it.
pub(super) struct Graph {
    pub pipeline: gst::Pipeline,
    /// One per rung, in plan order.
    pub meters: Vec<Arc<Meter>>,
    pub input: PathBuf,
    pub filesrc: gst::Element,
    pub decodebin: gst::Element,
    /// Each rung's filesink and the file it writes, to name the file in an I/O error.
    pub sinks: Vec<(gst::Element, PathBuf)>,
}

fn gst_err(message: String) -> TranscodeError {
    TranscodeError::Gst { message }
}

fn make(factory: &str, name: &str) -> Result<gst::Element, TranscodeError> {
    gst::ElementFactory::make(factory)
        .name(name)
        .build()
        .map_err(|_| TranscodeError::MissingPlugin {
            name: factory.to_string(),
        })
}

fn capsfilter(name: &str, caps: gst::Caps) -> Result<gst::Element, TranscodeError> {
    gst::ElementFactory::make("capsfilter")
        .name(name)
        .property("caps", caps)
        .build()
        .map_err(|_| TranscodeError::MissingPlugin {
            name: "capsfilter".into(),
        })
}

fn path_str(path: &Path) -> Result<&str, TranscodeError> {
    path.to_str().ok_or_else(|| TranscodeError::InvalidJob {
        message: format!("path {} is not UTF-8", path.display()),
    })
}

fn link(elements: &[&gst::Element]) -> Result<(), TranscodeError> {
    gst::Element::link_many(elements.iter().copied()).map_err(|e| gst_err(e.to_string()))
}

fn link_pads(src: &gst::Pad, sink: &gst::Pad) -> Result<(), TranscodeError> {
    src.link(sink)
        .map(|_| ())
        .map_err(|e| gst_err(format!("linking {} to {}: {e:?}", src.name(), sink.name())))
}

fn request_pad(element: &gst::Element, template: &str) -> Result<gst::Pad, TranscodeError> {
    element
        .request_pad_simple(template)
        .ok_or_else(|| gst_err(format!("{} gave no {template} pad", element.name())))
}

fn static_pad(element: &gst::Element, name: &str) -> Result<gst::Pad, TranscodeError> {
    element
        .static_pad(name)
        .ok_or_else(|| gst_err(format!("{} has no {name} pad", element.name())))
}

/// Builds the pipeline for `plan`. Element names are derived from rung indexes, never from the
/// job, and paths only ever reach `location` properties.
pub(super) fn build(
    input: &Path,
    source: &SourceInfo,
    plan: &Plan,
    preset: CodecPreset,
    aac_factory: &str,
) -> Result<Graph, TranscodeError> {
    let pipeline = gst::Pipeline::with_name("transcode");

    let filesrc = gst::ElementFactory::make("filesrc")
        .name("src")
        .property("location", path_str(input)?)
        .build()
        .map_err(|_| TranscodeError::MissingPlugin {
            name: "filesrc".into(),
        })?;
    let decodebin = make("decodebin", "decode")?;
    let vconvert = make("videoconvert", "vconvert")?;
    let vformat = capsfilter(
        "vformat",
        gst::Caps::builder("video/x-raw")
            .field("format", "I420")
            .build(),
    )?;
    let vtee = make("tee", "vtee")?;
    pipeline
        .add_many([&filesrc, &decodebin, &vconvert, &vformat, &vtee])
        .map_err(|e| gst_err(e.to_string()))?;
    link(&[&filesrc, &decodebin])?;
    link(&[&vconvert, &vformat, &vtee])?;

    let mut meters = Vec::with_capacity(plan.rungs.len());
    let mut muxers = Vec::with_capacity(plan.rungs.len());
    let mut sinks = Vec::with_capacity(plan.rungs.len());
    for (i, rung) in plan.rungs.iter().enumerate() {
        let queue = make("queue", &format!("vqueue{i}"))?;
        let scale = make("videoscale", &format!("scale{i}"))?;
        let rate = make("videorate", &format!("rate{i}"))?;
        let mut caps = gst::Caps::builder("video/x-raw")
            .field("width", i32::try_from(rung.width).unwrap_or(i32::MAX))
            .field("height", i32::try_from(rung.height).unwrap_or(i32::MAX))
            // Square pixels make videoscale letterbox a source of another shape rather than
            // stretch it or hand the player a non-square pixel aspect.
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1));
        if let Some((num, den)) = plan.framerate {
            caps = caps.field("framerate", gst::Fraction::new(num, den));
        }
        let size = capsfilter(&format!("size{i}"), caps.build())?;
        let encoder = gst::ElementFactory::make("x264enc")
            .name(format!("x264enc{i}"))
            .property("bitrate", rung.video_kbps)
            .property_from_str("speed-preset", preset.as_str())
            .property("key-int-max", plan.key_int_max)
            // Scene-cut keyframes would differ between rungs; fixed GOPs keep them aligned.
            .property("option-string", "scenecut=0")
            .property("threads", X264_THREADS)
            .build()
            .map_err(|_| TranscodeError::MissingPlugin {
                name: "x264enc".into(),
            })?;
        let parse = make("h264parse", &format!("parse{i}"))?;
        let mux = make("mp4mux", &format!("mux{i}"))?;
        let sink = gst::ElementFactory::make("filesink")
            .name(format!("sink{i}"))
            .property("location", path_str(&rung.path)?)
            .build()
            .map_err(|_| TranscodeError::MissingPlugin {
                name: "filesink".into(),
            })?;
        let branch = [&queue, &scale, &rate, &size, &encoder, &parse, &mux, &sink];
        pipeline
            .add_many(branch)
            .map_err(|e| gst_err(e.to_string()))?;
        link(&[&queue, &scale, &rate, &size, &encoder, &parse])?;
        link(&[&mux, &sink])?;
        link_pads(&request_pad(&vtee, "src_%u")?, &static_pad(&queue, "sink")?)?;
        let parsed = static_pad(&parse, "src")?;
        link_pads(&parsed, &request_pad(&mux, "video_%u")?)?;

        let meter = Arc::new(Meter::default());
        let probe_meter = Arc::clone(&meter);
        parsed.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(buffer) = info.buffer() {
                probe_meter.record(buffer);
            }
            gst::PadProbeReturn::Ok
        });
        meters.push(meter);
        muxers.push(mux);
        sinks.push((sink, rung.path.clone()));
    }

    let audio_sink = match plan.audio_bps {
        Some(bps) => Some(build_audio(&pipeline, &muxers, aac_factory, bps)?),
        None => None,
    };
    connect_decodebin(&decodebin, static_pad(&vconvert, "sink")?, audio_sink);
    tracing::debug!(
        rungs = plan.rungs.len(),
        audio = plan.audio_bps.is_some(),
        source_height = source.height,
        key_int_max = plan.key_int_max,
        "pipeline built"
    );
    Ok(Graph {
        pipeline,
        meters,
        input: input.to_path_buf(),
        filesrc,
        decodebin,
        sinks,
    })
}

/// audioconvert → audioresample → AAC → tee → one queue per muxer. Returns the pad decodebin's
/// audio goes into.
fn build_audio(
    pipeline: &gst::Pipeline,
    muxers: &[gst::Element],
    aac_factory: &str,
    bps: u32,
) -> Result<gst::Pad, TranscodeError> {
    let convert = make("audioconvert", "aconvert")?;
    let resample = make("audioresample", "aresample")?;
    let encoder = gst::ElementFactory::make(aac_factory)
        .name("aac")
        .property("bitrate", i32::try_from(bps).unwrap_or(i32::MAX))
        .build()
        .map_err(|_| TranscodeError::MissingPlugin {
            name: aac_factory.to_string(),
        })?;
    let atee = make("tee", "atee")?;
    pipeline
        .add_many([&convert, &resample, &encoder, &atee])
        .map_err(|e| gst_err(e.to_string()))?;
    link(&[&convert, &resample, &encoder, &atee])?;
    for (i, mux) in muxers.iter().enumerate() {
        let queue = make("queue", &format!("aqueue{i}"))?;
        pipeline.add(&queue).map_err(|e| gst_err(e.to_string()))?;
        link_pads(&request_pad(&atee, "src_%u")?, &static_pad(&queue, "sink")?)?;
        link_pads(&static_pad(&queue, "src")?, &request_pad(mux, "audio_%u")?)?;
    }
    static_pad(&convert, "sink")
}

/// Links decodebin's pads as they appear: the first video stream to the video chain, the first
/// audio stream to the audio chain if there is one; anything else is left unlinked, which
/// decodebin tolerates. Once decodebin has exposed everything, a chain still waiting for data
/// would wait forever (every muxer waits on all its pads), so it becomes an error on the bus.
fn connect_decodebin(decodebin: &gst::Element, video: gst::Pad, audio: Option<gst::Pad>) {
    let (video_check, audio_check) = (video.clone(), audio.clone());
    decodebin.connect_pad_added(move |dbin, pad| {
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let kind = caps
            .structure(0)
            .map(|s| s.name().to_string())
            .unwrap_or_default();
        let target = if kind.starts_with("video/") {
            Some(&video)
        } else if kind.starts_with("audio/") {
            audio.as_ref()
        } else {
            None
        };
        let Some(target) = target else {
            tracing::debug!(pad = %pad.name(), caps = %kind, "ignoring a decoded stream");
            return;
        };
        match pad.link(target) {
            Ok(_) => tracing::debug!(pad = %pad.name(), caps = %kind, "linked a decoded stream"),
            // A second stream of a kind we already take (another audio language, say).
            Err(gst::PadLinkError::WasLinked) => {
                tracing::debug!(pad = %pad.name(), caps = %kind, "ignoring an extra stream")
            }
            Err(e) => gst::element_error!(
                dbin,
                gst::CoreError::Negotiation,
                ("could not link the decoded {} stream: {:?}", kind, e)
            ),
        }
    });
    decodebin.connect_no_more_pads(move |dbin| {
        if !video_check.is_linked() {
            gst::element_error!(
                dbin,
                gst::StreamError::WrongType,
                ("the input has no decodable video stream")
            );
        } else if audio_check.as_ref().is_some_and(|a| !a.is_linked()) {
            gst::element_error!(
                dbin,
                gst::StreamError::CodecNotFound,
                ("the input's audio stream could not be decoded")
            );
        }
    });
}
