//! The transcoder against real files: clips are generated per test with `gst-launch-1.0`
//! (short and small, so the file runs in seconds), and outputs are judged by `ffprobe`, a tool
//! independent of the GStreamer code under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use transcode_core::spec::{CodecPreset, Rendition};
use transcode_worker::transcode::{
    init, probe, transcode, TranscodeError, TranscodeJob, TranscodeReport,
};

fn gst_launch(args: &str) {
    let out = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(args.split_whitespace())
        .output()
        .expect("gst-launch-1.0 runs");
    assert!(
        out.status.success(),
        "gst-launch-1.0 {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Clip {
    width: u32,
    height: u32,
    secs: u32,
    audio: bool,
    /// The index (moov) at the front, as streaming-friendly files have it.
    faststart: bool,
}

impl Clip {
    fn new(width: u32, height: u32) -> Self {
        Clip {
            width,
            height,
            secs: 3,
            audio: true,
            faststart: false,
        }
    }

    fn make(&self, path: &Path) {
        let fps = 30;
        // A moving pattern, so the encoders have real work and the bitrates mean something.
        let mut desc = format!(
            "videotestsrc num-buffers={} pattern=ball ! video/x-raw,width={},height={},framerate={fps}/1 \
             ! x264enc speed-preset=ultrafast key-int-max=30 ! h264parse ! mp4mux name=mux faststart={} \
             ! filesink location={}",
            self.secs * fps,
            self.width,
            self.height,
            self.faststart,
            path.display()
        );
        if self.audio {
            // 1024 samples a buffer at 48 kHz: enough buffers to cover the video.
            let buffers = self.secs * 48_000 / 1024 + 1;
            desc.push_str(&format!(
                " audiotestsrc num-buffers={buffers} ! audio/x-raw,rate=48000,channels=2 \
                 ! avenc_aac ! mux."
            ));
        }
        gst_launch(&desc);
    }
}

fn rung(name: &str, width: u32, height: u32, video_kbps: u32) -> Rendition {
    Rendition {
        name: name.into(),
        width,
        height,
        video_kbps,
        audio_kbps: 96,
    }
}

fn job(input: &Path, out_dir: &Path, renditions: Vec<Rendition>) -> TranscodeJob {
    TranscodeJob::new(input, out_dir, renditions, CodecPreset::Veryfast)
}

fn run(job: &TranscodeJob) -> (Result<TranscodeReport, TranscodeError>, Vec<u8>) {
    let seen = Mutex::new(Vec::new());
    let result = transcode(job, &|p| seen.lock().expect("progress lock").push(p));
    (result, seen.into_inner().expect("progress lock"))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[derive(Debug, Default)]
struct Probed {
    video_codec: String,
    width: u32,
    height: u32,
    audio_codec: Option<String>,
    duration_ms: u64,
}

fn ffprobe(path: &Path) -> Probed {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,codec_name,width,height:format=duration",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success(), "ffprobe {}", path.display());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe json");
    let mut p = Probed {
        duration_ms: v["format"]["duration"]
            .as_str()
            .and_then(|d| d.parse::<f64>().ok())
            .map(|d| (d * 1000.0) as u64)
            .expect("a duration"),
        ..Probed::default()
    };
    for s in v["streams"].as_array().expect("streams") {
        let codec = s["codec_name"].as_str().unwrap_or_default().to_string();
        match s["codec_type"].as_str() {
            Some("video") => {
                p.video_codec = codec;
                p.width = s["width"].as_u64().expect("width") as u32;
                p.height = s["height"].as_u64().expect("height") as u32;
            }
            Some("audio") => p.audio_codec = Some(codec),
            _ => {}
        }
    }
    p
}

/// Presentation times of the video keyframes, in ms.
fn keyframes_ms(path: &Path) -> Vec<u64> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts_time,flags",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success());
    let mut keys: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (pts, flags) = l.split_once(',')?;
            let pts: f64 = pts.parse().ok()?;
            flags
                .starts_with('K')
                .then(|| (pts * 1000.0).round() as u64)
        })
        .collect();
    keys.sort_unstable();
    keys
}

#[test]
fn init_finds_every_element() {
    init().expect("GStreamer and the required plugins are installed");
}

#[test]
fn probe_describes_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    Clip::new(640, 360).make(&input);
    let info = probe(&input, Duration::from_secs(10)).expect("probe");
    assert_eq!((info.width, info.height), (640, 360));
    assert_eq!(info.framerate, (30, 1));
    assert!(info.has_audio);
    assert!(
        (2_900..=3_200).contains(&info.duration_ms),
        "{}",
        info.duration_ms
    );
}

#[test]
fn a_clip_with_audio_gives_aligned_h264_aac_rungs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    Clip::new(640, 360).make(&input);
    let out = dir.path().join("out");
    let job = job(
        &input,
        &out,
        vec![rung("360p", 640, 360, 800), rung("240p", 426, 240, 400)],
    );
    let (result, progress) = run(&job);
    let report = result.expect("transcode");

    assert!(report.source.has_audio);
    assert!(report.dropped.is_empty());
    let names: Vec<_> = report.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["360p", "240p"]);
    for (o, (w, h, kbps)) in report
        .outputs
        .iter()
        .zip([(640, 360, 800), (426, 240, 400)])
    {
        assert_eq!(o.path, out.join(format!("{}.mp4", o.name)));
        assert_eq!((o.width, o.height), (w, h));
        assert_eq!(
            o.bytes,
            std::fs::metadata(&o.path).expect("output exists").len()
        );
        assert!(
            o.video_kbps > 0 && o.video_kbps < kbps * 2,
            "{}: {} kbps for {kbps}",
            o.name,
            o.video_kbps
        );
        let p = ffprobe(&o.path);
        assert_eq!(p.video_codec, "h264", "{}", o.name);
        assert_eq!(p.audio_codec.as_deref(), Some("aac"), "{}", o.name);
        assert_eq!((p.width, p.height), (w, h), "{}", o.name);
        assert!(
            (2_800..=3_300).contains(&p.duration_ms),
            "{}: {} ms",
            o.name,
            p.duration_ms
        );
        assert!(
            o.duration_ms.abs_diff(p.duration_ms) < 100,
            "{o:?} vs {p:?}"
        );
    }

    // Keyframes every 2 s (60 frames at 30 fps) on the same frames in both rungs.
    let keys: Vec<Vec<u64>> = report
        .outputs
        .iter()
        .map(|o| keyframes_ms(&o.path))
        .collect();
    assert_eq!(keys[0], keys[1], "keyframes differ between rungs");
    assert_eq!(keys[0].len(), 2, "{:?}", keys[0]);
    assert_eq!(keys[0][1] - keys[0][0], 2_000, "{:?}", keys[0]);

    assert_eq!(progress.last(), Some(&100), "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {progress:?}"
    );
    assert_eq!(files_in(&out).len(), 2);
}

#[test]
fn a_clip_without_audio_gives_video_only_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    let mut clip = Clip::new(640, 360);
    clip.audio = false;
    clip.secs = 2;
    clip.make(&input);
    let out = dir.path().join("out");
    let (result, _) = run(&job(&input, &out, vec![rung("360p", 640, 360, 600)]));
    let report = result.expect("a source without audio transcodes");
    assert!(!report.source.has_audio);
    let p = ffprobe(&report.outputs[0].path);
    assert_eq!(p.video_codec, "h264");
    assert_eq!(p.audio_codec, None);
    assert!(
        (1_800..=2_300).contains(&p.duration_ms),
        "{}",
        p.duration_ms
    );
}

#[test]
fn rungs_taller_than_the_source_are_dropped_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    let mut clip = Clip::new(640, 360);
    clip.secs = 2;
    clip.make(&input);
    let out = dir.path().join("out");
    let ladder = vec![
        rung("720p", 1280, 720, 3000),
        rung("360p", 640, 360, 800),
        rung("480p", 854, 480, 1500),
    ];
    let (result, _) = run(&job(&input, &out, ladder));
    let report = result.expect("transcode");
    assert_eq!(report.dropped, ["720p", "480p"]);
    assert_eq!(report.outputs.len(), 1);
    assert_eq!(report.outputs[0].name, "360p");
    assert_eq!(files_in(&out), [out.join("360p.mp4")]);
}

#[test]
fn when_every_rung_is_taller_the_smallest_is_made_at_the_source_height() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    let mut clip = Clip::new(320, 240);
    clip.secs = 2;
    clip.make(&input);
    let out = dir.path().join("out");
    let ladder = transcode_core::spec::preset("hd").expect("hd preset");
    let (result, _) = run(&job(&input, &out, ladder));
    let report = result.expect("a small source still gives one output");
    assert_eq!(report.dropped, ["1080p", "720p", "480p"]);
    assert_eq!(report.outputs.len(), 1);
    let o = &report.outputs[0];
    assert_eq!(o.name, "360p");
    // 240 high, never upscaled; the rung's 16:9 shape, so the 4:3 picture is pillarboxed.
    assert_eq!((o.width, o.height), (426, 240));
    let p = ffprobe(&o.path);
    assert_eq!((p.width, p.height), (426, 240));
}

fn assert_fails_cleanly(
    input: &Path,
    dir: &Path,
    check: impl Fn(&TranscodeError) -> bool,
) -> TranscodeError {
    let out = dir.join("out");
    let (result, _) = run(&job(
        input,
        &out,
        vec![rung("360p", 640, 360, 800), rung("240p", 426, 240, 400)],
    ));
    let e = result.expect_err("must fail");
    assert!(check(&e), "unexpected error {:?}: {e}", e.code());
    assert!(
        files_in(&out).is_empty(),
        "left behind: {:?}",
        files_in(&out)
    );
    e
}

#[test]
fn an_audio_only_file_is_not_video() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("song.mp4");
    gst_launch(&format!(
        "audiotestsrc num-buffers=50 ! avenc_aac ! mp4mux ! filesink location={}",
        input.display()
    ));
    let e = assert_fails_cleanly(&input, dir.path(), |e| {
        matches!(e, TranscodeError::NotVideo { .. })
    });
    assert!(e.is_permanent());
    assert_eq!(e.code(), "not_video");
    assert!(e.to_string().contains("audio/mpeg"), "{e}");
}

#[test]
fn a_text_file_named_mp4_fails_permanently_with_gstreamers_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("notes.mp4");
    std::fs::write(&input, "these are my notes, not a video\n".repeat(100)).expect("write");
    let e = assert_fails_cleanly(&input, dir.path(), TranscodeError::is_permanent);
    assert!(matches!(e, TranscodeError::NotVideo { .. }), "{e:?}");
    assert!(
        e.to_string().contains("This appears to be a text file"),
        "GStreamer's message is carried: {e}"
    );
}

#[test]
fn an_empty_file_fails_permanently() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("empty.mp4");
    std::fs::write(&input, b"").expect("write");
    let e = assert_fails_cleanly(&input, dir.path(), TranscodeError::is_permanent);
    assert!(matches!(e, TranscodeError::Corrupt { .. }), "{e:?}");
}

fn truncate_to_half(from: &Path, to: &Path) {
    let bytes = std::fs::read(from).expect("read clip");
    std::fs::write(to, &bytes[..bytes.len() / 2]).expect("write half");
}

#[test]
fn a_truncated_mp4_without_its_index_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let whole = dir.path().join("whole.mp4");
    Clip::new(640, 360).make(&whole);
    let input = dir.path().join("half.mp4");
    truncate_to_half(&whole, &input);
    let e = assert_fails_cleanly(&input, dir.path(), TranscodeError::is_permanent);
    assert!(matches!(e, TranscodeError::Corrupt { .. }), "{e:?}");
}

#[test]
fn a_truncated_mp4_that_still_plays_is_caught_by_the_duration_check() {
    // With the index at the front, qtdemux plays the surviving half and ends with a clean EOS:
    // only comparing durations tells this apart from success.
    let dir = tempfile::tempdir().expect("tempdir");
    let whole = dir.path().join("whole.mp4");
    let mut clip = Clip::new(640, 360);
    clip.faststart = true;
    clip.make(&whole);
    let input = dir.path().join("half.mp4");
    truncate_to_half(&whole, &input);
    let e = assert_fails_cleanly(&input, dir.path(), TranscodeError::is_permanent);
    match e {
        TranscodeError::Truncated {
            expected_ms,
            got_ms,
        } => {
            assert!(expected_ms >= 2_900, "{expected_ms}");
            assert!(got_ms < expected_ms - 500, "{got_ms}");
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn an_unwritable_output_is_an_io_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    let mut clip = Clip::new(320, 240);
    clip.secs = 1;
    clip.make(&input);
    let out = dir.path().join("out");
    // A directory where the output file should go: filesink cannot open it.
    let blocked = out.join("240p.mp4");
    std::fs::create_dir_all(&blocked).expect("mkdir");
    let (result, _) = run(&job(&input, &out, vec![rung("240p", 320, 240, 300)]));
    match result.expect_err("must fail") {
        e @ TranscodeError::Io { .. } => {
            assert!(
                !e.is_permanent(),
                "a worker's disk problem is worth a retry"
            );
            assert!(e.to_string().contains("240p.mp4"), "{e}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn the_watchdog_and_the_hard_timeout_stop_a_running_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.mp4");
    let mut clip = Clip::new(320, 240);
    clip.secs = 2;
    clip.make(&input);
    let out = dir.path().join("out");
    let ladder = vec![rung("240p", 320, 240, 300)];

    // Zero limits trip on the first look, so these end mid-run whatever the machine's speed;
    // what is tested is that the run stops, tears down and leaves nothing behind.
    let mut stalled = job(&input, &out, ladder.clone());
    stalled.stall_timeout = Duration::ZERO;
    let (result, _) = run(&stalled);
    let e = result.expect_err("stalled");
    assert!(matches!(e, TranscodeError::Stalled { .. }), "{e:?}");
    assert!(!e.is_permanent());
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));

    let mut timed_out = job(&input, &out, ladder);
    timed_out.hard_timeout = Some(Duration::ZERO);
    let (result, _) = run(&timed_out);
    let e = result.expect_err("timed out");
    assert!(matches!(e, TranscodeError::Timeout { .. }), "{e:?}");
    assert!(!e.is_permanent());
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
}

#[test]
fn a_missing_input_is_an_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (result, _) = run(&job(
        &dir.path().join("nope.mp4"),
        &dir.path().join("out"),
        vec![rung("240p", 426, 240, 400)],
    ));
    match result.expect_err("must fail") {
        TranscodeError::Io { path, source } => {
            assert_eq!(path, dir.path().join("nope.mp4"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}
