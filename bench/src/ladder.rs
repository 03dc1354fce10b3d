//! `bench-ladder`: runs the worker's transcoder (`transcode_worker::transcode::transcode`) on one
//! local file with a named ladder and prints how long it took, so `bench/ladder.sh` can compare
//! it with `gst-launch-1.0` and ffmpeg doing the same work in the same run. Not a test.
//!
//! Output, one `key=value` a line: `transcode_seconds`, then per output its name, size and
//! measured video bitrate. `--print-x264-threads` prints only the encoder thread count the
//! transcoder uses, so the baselines can be given byte-identical x264 settings.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use transcode_core::spec::{preset, CodecPreset};
use transcode_worker::transcode::{self, TranscodeJob};

#[derive(Parser)]
struct Args {
    /// The source file.
    #[arg(long, required_unless_present = "print_x264_threads")]
    input: Option<PathBuf>,
    /// Where the renditions go (created if missing).
    #[arg(long, required_unless_present = "print_x264_threads")]
    out_dir: Option<PathBuf>,
    /// A ladder preset name from the task spec (`hd`, `sd`).
    #[arg(long, default_value = "hd")]
    ladder: String,
    /// x264 speed preset, as in the task spec.
    #[arg(long, default_value = "veryfast")]
    codec_preset: String,
    #[arg(long)]
    print_x264_threads: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.print_x264_threads {
        println!("{}", transcode::X264_THREADS);
        return Ok(());
    }
    let (Some(input), Some(out_dir)) = (args.input, args.out_dir) else {
        bail!("--input and --out-dir are required");
    };
    let renditions =
        preset(&args.ladder).with_context(|| format!("unknown ladder {:?}", args.ladder))?;
    let codec_preset: CodecPreset = serde_json::from_value(serde_json::json!(args.codec_preset))
        .with_context(|| format!("unknown codec preset {:?}", args.codec_preset))?;
    transcode::init()?;
    let job = TranscodeJob::new(input, out_dir, renditions, codec_preset);

    let started = Instant::now();
    let report = transcode::transcode(&job, &|_| {})?;
    let secs = started.elapsed().as_secs_f64();

    println!("transcode_seconds={secs:.3}");
    for o in &report.outputs {
        println!(
            "output={} size={}x{} duration_ms={} bytes={} video_kbps={}",
            o.name, o.width, o.height, o.duration_ms, o.bytes, o.video_kbps
        );
    }
    Ok(())
}
