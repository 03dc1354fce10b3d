//! `Discoverer` on local files: probing a source into a [`SourceInfo`], and measuring an output
//! after a run to prove it is what the plan asked for (codecs, size, duration).

use std::path::Path;
use std::time::Duration;

use gstreamer as gst;
use gstreamer_pbutils as pbutils;
use pbutils::prelude::*;

use super::ladder::Rung;
use super::{RenditionOutput, SourceInfo, TranscodeError};

/// How much shorter than the source an output may be before it counts as truncated. Encoders
/// and muxers legitimately lose a few tens of milliseconds at the tail (audio frame padding,
/// the last video frame's duration); half a second, or 1 % of a long source, is well above that
/// and well below any real truncation.
pub(super) fn truncation_tolerance_ms(expected_ms: u64) -> u64 {
    500.max(expected_ms / 100)
}

/// How long one discovery attempt may take before it is tried again (see [`discover`]).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Short attempts before the last one, which gets the caller's whole timeout.
const SHORT_ATTEMPTS: usize = 3;

/// Discovers a local file, retrying a discovery that timed out.
///
/// GStreamer 1.22's decodebin drops an error raised by an element it is still plugging in: a
/// demuxer in pull mode starts its own thread on activation and can fail (on a truncated MP4,
/// say) before decodebin stops filtering its errors. The error is then lost and the discovery
/// waits for its timeout, about one time in five in a tight loop. Discovering a local file takes
/// well under a second, so a few short attempts find the real error quickly, and the last
/// attempt, with the whole timeout, still covers a slow machine.
fn discover(path: &Path, timeout: Duration) -> Result<pbutils::DiscovererInfo, TranscodeError> {
    let short = ATTEMPT_TIMEOUT.min(timeout);
    let attempts =
        std::iter::repeat_n(short, SHORT_ATTEMPTS).chain((timeout > short).then_some(timeout));
    let mut last = None;
    for (i, attempt) in attempts.enumerate() {
        match discover_once(path, attempt) {
            Err(e @ TranscodeError::Timeout { .. }) => {
                tracing::debug!(path = %path.display(), attempt = i + 1, "discovery timed out; retrying");
                last = Some(e);
            }
            other => return other,
        }
    }
    Err(last.unwrap_or(TranscodeError::Timeout {
        secs: timeout.as_secs(),
    }))
}

fn discover_once(
    path: &Path,
    timeout: Duration,
) -> Result<pbutils::DiscovererInfo, TranscodeError> {
    let uri = gst::glib::filename_to_uri(path, None).map_err(|e| TranscodeError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
    })?;
    // The discoverer accepts 1 s..=1 h; outside that range it would refuse to be created.
    let secs = timeout.as_secs().clamp(1, 3600);
    let discoverer = pbutils::Discoverer::new(gst::ClockTime::from_seconds(secs)).map_err(|e| {
        TranscodeError::Gst {
            message: format!("could not create a discoverer: {e}"),
        }
    })?;
    let info = discoverer
        .discover_uri(&uri)
        .map_err(|e| classify_discover_error(path, &e))?;
    match info.result() {
        pbutils::DiscovererResult::Ok => Ok(info),
        pbutils::DiscovererResult::Timeout => Err(TranscodeError::Timeout { secs }),
        pbutils::DiscovererResult::MissingPlugins => {
            let details = info.missing_elements_installer_details();
            let name = if details.is_empty() {
                "unknown (the discoverer reported a missing plugin)".to_string()
            } else {
                details
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(TranscodeError::MissingPlugin { name })
        }
        other => Err(TranscodeError::Gst {
            message: format!("discovery of {} ended with {other:?}", path.display()),
        }),
    }
}

/// Maps an error GStreamer raised while discovering a file onto our taxonomy. The discoverer
/// does not say which element failed, so the error's domain and code decide alone.
fn classify_discover_error(path: &Path, e: &gst::glib::Error) -> TranscodeError {
    let message = e.message().to_string();
    tracing::debug!(path = %path.display(), error = %message, "discovery failed");
    if let Some(kind) = e.kind::<gst::StreamError>() {
        return match kind {
            gst::StreamError::TypeNotFound | gst::StreamError::WrongType => {
                TranscodeError::NotVideo { message }
            }
            gst::StreamError::CodecNotFound => TranscodeError::MissingPlugin { name: message },
            _ => TranscodeError::Corrupt { message },
        };
    }
    if let Some(gst::CoreError::MissingPlugin) = e.kind::<gst::CoreError>() {
        return TranscodeError::MissingPlugin { name: message };
    }
    if e.kind::<gst::ResourceError>().is_some() {
        return TranscodeError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(message),
        };
    }
    TranscodeError::Gst { message }
}

fn duration_ms(info: &pbutils::DiscovererInfo) -> u64 {
    info.duration().map(|d| d.mseconds()).unwrap_or(0)
}

/// Probes a source. Its first video stream is the one the pipeline will use, so it is the one
/// described; a source with no video stream, or only a still image, is not a video.
pub(super) fn source(input: &Path, timeout: Duration) -> Result<SourceInfo, TranscodeError> {
    let info = discover(input, timeout)?;
    let has_audio = !info.audio_streams().is_empty();
    let Some(video) = info.video_streams().into_iter().next() else {
        let found: Vec<String> = info
            .stream_list()
            .iter()
            .filter_map(|s| s.caps())
            .filter_map(|c| c.structure(0).map(|s| s.name().to_string()))
            .collect();
        return Err(TranscodeError::NotVideo {
            message: if found.is_empty() {
                "the input has no streams".into()
            } else {
                format!(
                    "the input has no video stream (found: {})",
                    found.join(", ")
                )
            },
        });
    };
    if video.is_image() {
        return Err(TranscodeError::NotVideo {
            message: "the input is a still image".into(),
        });
    }
    if video.width() < 2 || video.height() < 2 {
        return Err(TranscodeError::Corrupt {
            message: format!(
                "the video stream has no usable size ({}x{})",
                video.width(),
                video.height()
            ),
        });
    }
    let rate = video.framerate();
    let source = SourceInfo {
        width: video.width(),
        height: video.height(),
        duration_ms: duration_ms(&info),
        has_audio,
        framerate: (rate.numer(), rate.denom()),
    };
    tracing::debug!(input = %input.display(), ?source, "probed");
    Ok(source)
}

fn caps_name(stream: &impl IsA<pbutils::DiscovererStreamInfo>) -> String {
    stream
        .caps()
        .and_then(|c| c.structure(0).map(|s| s.name().to_string()))
        .unwrap_or_default()
}

/// Measures one finished output and checks it against its rung and the source. `video_bytes`
/// is the H.264 payload counted on its way into the muxer.
pub(super) fn check_output(
    rung: &Rung,
    source: &SourceInfo,
    video_bytes: u64,
    timeout: Duration,
) -> Result<RenditionOutput, TranscodeError> {
    let bytes = std::fs::metadata(&rung.path)
        .map_err(|e| TranscodeError::Io {
            path: rung.path.clone(),
            source: e,
        })?
        .len();
    let info = discover(&rung.path, timeout).map_err(|e| TranscodeError::Gst {
        message: format!("output {} does not play back: {e}", rung.name),
    })?;
    let video = info
        .video_streams()
        .into_iter()
        .next()
        .ok_or_else(|| TranscodeError::Gst {
            message: format!("output {} has no video stream", rung.name),
        })?;
    let video_codec = caps_name(&video);
    if video_codec != "video/x-h264" {
        return Err(TranscodeError::Gst {
            message: format!("output {} has video {video_codec:?}, not H.264", rung.name),
        });
    }
    if (video.width(), video.height()) != (rung.width, rung.height) {
        return Err(TranscodeError::Gst {
            message: format!(
                "output {} is {}x{}, planned {}x{}",
                rung.name,
                video.width(),
                video.height(),
                rung.width,
                rung.height
            ),
        });
    }
    if source.has_audio {
        let audio = info.audio_streams();
        let codec = audio.first().map(caps_name).unwrap_or_default();
        if codec != "audio/mpeg" {
            return Err(TranscodeError::Gst {
                message: format!("output {} lacks its AAC audio (found {codec:?})", rung.name),
            });
        }
    }
    let got_ms = duration_ms(&info);
    if got_ms == 0 {
        return Err(TranscodeError::Gst {
            message: format!("output {} has no duration", rung.name),
        });
    }
    let expected_ms = source.duration_ms;
    // A source whose container states no duration (0) cannot be checked against.
    if got_ms + truncation_tolerance_ms(expected_ms) < expected_ms {
        return Err(TranscodeError::Truncated {
            expected_ms,
            got_ms,
        });
    }
    let video_kbps = u32::try_from(video_bytes.saturating_mul(8) / got_ms).unwrap_or(u32::MAX);
    Ok(RenditionOutput {
        name: rung.name.clone(),
        path: rung.path.clone(),
        width: video.width(),
        height: video.height(),
        duration_ms: got_ms,
        bytes,
        video_kbps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_half_a_second_or_one_percent() {
        assert_eq!(truncation_tolerance_ms(0), 500);
        assert_eq!(truncation_tolerance_ms(3_000), 500);
        assert_eq!(truncation_tolerance_ms(50_000), 500);
        assert_eq!(truncation_tolerance_ms(600_000), 6_000);
    }
}
