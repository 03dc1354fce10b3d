//! Planning a ladder against a probed source: which rungs are made and at what size, which are
//! dropped, the one audio bitrate, and the keyframe interval shared by every encoder. Pure
//! functions, so every rule is unit-tested without GStreamer.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use transcode_core::spec::Rendition;

use super::{SourceInfo, TranscodeError};

/// One rung to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rung {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub video_kbps: u32,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// In ladder order.
    pub rungs: Vec<Rung>,
    pub dropped: Vec<String>,
    /// `None` when the source has no audio.
    pub audio_bps: Option<u32>,
    pub key_int_max: u32,
    /// `None` when the source's rate is variable or unknown: outputs then keep the timestamps
    /// they are given.
    pub framerate: Option<(i32, i32)>,
}

/// Frames in the keyframe interval when the source does not state a frame rate (2 s at 30 fps).
const FALLBACK_KEY_INT: u32 = 60;

/// Names become file names; the spec validation allows the same set, this guards the file
/// system against a caller that skipped it.
fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn invalid(message: String) -> TranscodeError {
    TranscodeError::InvalidJob { message }
}

fn even_floor(v: u64) -> u32 {
    u32::try_from(v & !1).unwrap_or(u32::MAX - 1).max(2)
}

pub(super) fn key_int_max((num, den): (i32, i32)) -> u32 {
    if num <= 0 || den <= 0 {
        return FALLBACK_KEY_INT;
    }
    // Two seconds of frames, rounded to the nearest frame: 29.97 fps gives 60.
    let frames = (2 * i64::from(num) + i64::from(den) / 2) / i64::from(den);
    u32::try_from(frames.max(1)).unwrap_or(FALLBACK_KEY_INT)
}

pub(super) fn plan(
    source: &SourceInfo,
    renditions: &[Rendition],
    out_dir: &Path,
    max_audio_bps: u32,
) -> Result<Plan, TranscodeError> {
    if renditions.is_empty() {
        return Err(invalid("the ladder has no renditions".into()));
    }
    let mut names = HashSet::new();
    for r in renditions {
        if !valid_name(&r.name) {
            return Err(invalid(format!("rendition name {:?} is not valid", r.name)));
        }
        if !names.insert(r.name.as_str()) {
            return Err(invalid(format!("rendition name {:?} is repeated", r.name)));
        }
        if r.width < 2 || r.height < 2 || r.width % 2 != 0 || r.height % 2 != 0 {
            return Err(invalid(format!(
                "rendition {:?} is {}x{}; sizes must be even and at least 2",
                r.name, r.width, r.height
            )));
        }
        if r.video_kbps == 0 {
            return Err(invalid(format!("rendition {:?} has no bitrate", r.name)));
        }
    }

    let rung = |r: &Rendition, width: u32, height: u32| Rung {
        name: r.name.clone(),
        width,
        height,
        video_kbps: r.video_kbps,
        path: out_dir.join(format!("{}.mp4", r.name)),
    };
    let (kept, dropped): (Vec<&Rendition>, Vec<&Rendition>) =
        renditions.iter().partition(|r| r.height <= source.height);
    let (rungs, kept_renditions, dropped) = if kept.is_empty() {
        // Every rung is taller than the source: keep the smallest one rather than fail a valid
        // video, at the source's height so nothing is upscaled, with the rung's aspect.
        let smallest = renditions
            .iter()
            .min_by_key(|r| (r.height, r.width))
            .ok_or_else(|| invalid("the ladder has no renditions".into()))?;
        let height = even_floor(u64::from(source.height));
        let width = even_floor(
            (u64::from(smallest.width) * u64::from(height) + u64::from(smallest.height) / 2)
                / u64::from(smallest.height),
        );
        let dropped = renditions
            .iter()
            .filter(|r| r.name != smallest.name)
            .map(|r| r.name.clone())
            .collect();
        (vec![rung(smallest, width, height)], vec![smallest], dropped)
    } else {
        (
            kept.iter().map(|r| rung(r, r.width, r.height)).collect(),
            kept,
            dropped.iter().map(|r| r.name.clone()).collect(),
        )
    };

    let audio_bps = source.has_audio.then(|| {
        let kbps = kept_renditions
            .iter()
            .map(|r| r.audio_kbps)
            .max()
            .unwrap_or(128);
        kbps.saturating_mul(1000).min(max_audio_bps)
    });
    let (num, den) = source.framerate;
    Ok(Plan {
        rungs,
        dropped,
        audio_bps,
        key_int_max: key_int_max(source.framerate),
        framerate: (num > 0 && den > 0).then_some((num, den)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(width: u32, height: u32, has_audio: bool) -> SourceInfo {
        SourceInfo {
            width,
            height,
            duration_ms: 3_000,
            has_audio,
            framerate: (30, 1),
        }
    }

    fn r(name: &str, width: u32, height: u32, video_kbps: u32, audio_kbps: u32) -> Rendition {
        Rendition {
            name: name.into(),
            width,
            height,
            video_kbps,
            audio_kbps,
        }
    }

    fn hd() -> Vec<Rendition> {
        transcode_core::spec::preset("hd").expect("the hd preset exists")
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.rungs.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn rungs_taller_than_the_source_are_dropped_in_order() {
        let p = plan(&source(1280, 720, true), &hd(), Path::new("/o"), 512_000).expect("plan");
        assert_eq!(names(&p), ["720p", "480p", "360p"]);
        assert_eq!(p.dropped, ["1080p"]);
        assert_eq!(p.rungs[0].path, Path::new("/o/720p.mp4"));
        assert_eq!((p.rungs[0].width, p.rungs[0].height), (1280, 720));
        // The highest audio bitrate among the kept rungs, not the dropped 1080p's.
        assert_eq!(p.audio_bps, Some(128_000));
    }

    #[test]
    fn audio_bitrate_comes_from_kept_rungs_and_is_capped_by_the_encoder() {
        let ladder = vec![r("a", 640, 360, 800, 96), r("b", 426, 240, 400, 64)];
        let p = plan(&source(640, 360, true), &ladder, Path::new("/o"), 512_000).expect("plan");
        assert_eq!(p.audio_bps, Some(96_000));
        let p = plan(&source(426, 240, true), &ladder, Path::new("/o"), 512_000).expect("plan");
        assert_eq!(p.audio_bps, Some(64_000));
        let loud = vec![r("a", 640, 360, 800, 500)];
        let p = plan(&source(640, 360, true), &loud, Path::new("/o"), 320_000).expect("plan");
        assert_eq!(p.audio_bps, Some(320_000));
        let p = plan(&source(640, 360, false), &loud, Path::new("/o"), 320_000).expect("plan");
        assert_eq!(p.audio_bps, None);
    }

    #[test]
    fn when_every_rung_is_taller_the_smallest_is_kept_at_the_source_height() {
        let p = plan(&source(320, 240, false), &hd(), Path::new("/o"), 512_000).expect("plan");
        assert_eq!(names(&p), ["360p"]);
        assert_eq!((p.rungs[0].width, p.rungs[0].height), (426, 240));
        assert_eq!(p.rungs[0].video_kbps, 800);
        assert_eq!(p.dropped, ["1080p", "720p", "480p"]);
        // An odd source height rounds down, never up.
        let p = plan(&source(175, 145, false), &hd(), Path::new("/o"), 512_000).expect("plan");
        assert_eq!((p.rungs[0].width, p.rungs[0].height), (256, 144));
    }

    #[test]
    fn a_rung_as_tall_as_the_source_is_kept() {
        let p = plan(&source(640, 360, false), &hd(), Path::new("/o"), 512_000).expect("plan");
        assert_eq!(names(&p), ["360p"]);
        assert_eq!((p.rungs[0].width, p.rungs[0].height), (640, 360));
    }

    #[test]
    fn keyframe_interval_is_two_seconds_of_frames() {
        assert_eq!(key_int_max((30, 1)), 60);
        assert_eq!(key_int_max((25, 1)), 50);
        assert_eq!(key_int_max((30_000, 1_001)), 60);
        assert_eq!(key_int_max((24_000, 1_001)), 48);
        assert_eq!(key_int_max((1, 5)), 1);
        assert_eq!(key_int_max((0, 1)), FALLBACK_KEY_INT);
        let mut s = source(640, 360, false);
        s.framerate = (0, 1);
        let p = plan(&s, &hd(), Path::new("/o"), 512_000).expect("plan");
        assert_eq!(p.framerate, None);
        assert_eq!(p.key_int_max, 60);
    }

    #[test]
    fn jobs_the_spec_validation_would_refuse_are_refused() {
        let s = source(640, 360, false);
        let bad: Vec<Vec<Rendition>> = vec![
            vec![],
            vec![r("../x", 640, 360, 800, 96)],
            vec![r("", 640, 360, 800, 96)],
            vec![r("a", 641, 360, 800, 96)],
            vec![r("a", 640, 0, 800, 96)],
            vec![r("a", 640, 360, 0, 96)],
            vec![r("a", 640, 360, 800, 96), r("a", 426, 240, 400, 64)],
        ];
        for ladder in bad {
            let e = plan(&s, &ladder, Path::new("/o"), 512_000).expect_err("refused");
            assert_eq!(e.code(), "invalid_job", "{ladder:?}: {e}");
        }
    }
}
