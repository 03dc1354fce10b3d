//! `transcode dev`: an all-in-one local cluster on embedded defaults: the SQLite store, a
//! `file://` object folder, and the scaler plus N workers as child processes on loopback. With
//! `--demo` it also makes a test clip, submits it with the `hd` ladder, streams the events live
//! and ends with a table of the outputs. Children log to files under the dev folder, so the
//! terminal shows only what a person wants to read.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use transcode_core::manifest::Manifest;
use transcode_core::objects::Objects;
use transcode_core::url::ObjectUrl;

pub struct DevArgs {
    pub dir: PathBuf,
    pub workers: u32,
    pub slots: u32,
    pub demo: bool,
    pub store_url: String,
    pub intake: String,
    pub dispatch: String,
    pub events_pub: String,
    pub events_sub: String,
    pub http: String,
    pub config: Option<PathBuf>,
}

struct Proc {
    name: String,
    child: Child,
}

/// Finds a sibling binary (same folder as `transcode`), else relies on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts a child whose first stdout line is a JSON object describing where it listens.
async fn spawn(
    name: &str,
    bin: &Path,
    args: &[String],
    logs: &Path,
) -> Result<(Proc, serde_json::Value)> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))
        .with_context(|| format!("log file for {name}"))?;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --workspace)",
                bin.display()
            )
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{name}: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| {
            anyhow!(
                "{name} did not start within 30 s (see {}/{name}.log)",
                logs.display()
            )
        })??
        .ok_or_else(|| {
            anyhow!(
                "{name} exited at start-up (see {}/{name}.log)",
                logs.display()
            )
        })?;
    let info: serde_json::Value = serde_json::from_str(&first)
        .with_context(|| format!("{name} printed {first:?} instead of its endpoints"))?;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((
        Proc {
            name: name.to_string(),
            child,
        },
        info,
    ))
}

fn signal(child: &Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY-free: plain kill(2) through the `kill` command keeps this crate free of libc.
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status();
    }
}

async fn stop_all(mut procs: Vec<Proc>) {
    // Workers first (they drain), the scaler last.
    procs.reverse();
    for p in &procs {
        signal(&p.child, 15);
    }
    for p in &mut procs {
        match tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await {
            Ok(Ok(st)) => eprintln!("  {} exited ({st})", p.name),
            _ => {
                eprintln!("  {} did not stop in 30 s: killing", p.name);
                let _ = p.child.kill().await;
            }
        }
    }
}

pub async fn run(a: DevArgs) -> Result<()> {
    let dir = std::path::absolute(&a.dir).context("dev folder")?;
    let logs = dir.join("logs");
    let objects_dir = dir.join("objects");
    for d in [&logs, &objects_dir, &dir.join("scratch")] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut common: Vec<String> = vec!["--store".into(), a.store_url.clone()];
    if let Some(c) = &a.config {
        common.extend(["--config".into(), c.display().to_string()]);
    }
    let mut scaler_args = common.clone();
    scaler_args.extend([
        "--migrate".into(),
        "--intake".into(),
        a.intake.clone(),
        "--dispatch".into(),
        a.dispatch.clone(),
        "--events-pub".into(),
        a.events_pub.clone(),
        "--events-sub".into(),
        a.events_sub.clone(),
        "--http".into(),
        a.http.clone(),
        "--id".into(),
        "dev-scaler".into(),
    ]);
    let mut procs = Vec::new();
    let (scaler, eps) = spawn("scaler", &sibling("transcode-scaler"), &scaler_args, &logs).await?;
    procs.push(scaler);
    let ep = |k: &str| eps.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (Some(intake), Some(dispatch), Some(xpub), Some(xsub)) = (
        ep("intake"),
        ep("dispatch"),
        ep("events_pub"),
        ep("events_sub"),
    ) else {
        stop_all(procs).await;
        bail!("the scaler did not report its endpoints: {eps}");
    };
    let started = async {
        for i in 0..a.workers {
            let mut args = common.clone();
            args.extend([
                "--dispatch".into(),
                dispatch.clone(),
                "--events".into(),
                xsub.clone(),
                "--id".into(),
                format!("dev-worker-{i}"),
                "--node".into(),
                format!("dev-node-{}", i % 2),
                "--slots".into(),
                a.slots.to_string(),
                "--scratch-dir".into(),
                dir.join("scratch")
                    .join(format!("w{i}"))
                    .display()
                    .to_string(),
                "--http".into(),
                "127.0.0.1:0".into(),
            ]);
            let (w, info) = spawn(
                &format!("worker-{i}"),
                &sibling("transcode-worker"),
                &args,
                &logs,
            )
            .await?;
            procs.push(w);
            eprintln!(
                "  worker-{i}: http {}",
                info.get("http").and_then(|v| v.as_str()).unwrap_or("?")
            );
        }
        anyhow::Ok(())
    };
    if let Err(e) = started.await {
        stop_all(procs).await;
        return Err(e);
    }
    eprintln!("nomad-transcode dev cluster is up:");
    eprintln!("  store     {}", a.store_url);
    eprintln!("  objects   file://{}/", objects_dir.display());
    eprintln!("  intake    {intake}   (submit here: transcode submit --wait …)");
    eprintln!("  dispatch  {dispatch}");
    eprintln!("  events    {xpub}   (transcode events --follow)");
    eprintln!(
        "  health    http://{}/v1/health",
        ep("http").unwrap_or_default()
    );
    eprintln!("  logs      {}/", logs.display());

    let result = if a.demo {
        demo(&a, &objects_dir, &intake, &xpub).await
    } else {
        eprintln!("Ctrl-C stops the cluster.");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok(())
    };
    eprintln!("stopping…");
    stop_all(procs).await;
    result
}

/// Makes a short clip with a moving test pattern and a tone (the video and audio branches both
/// get exercised), unless one is already there.
async fn make_clip(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("part.mp4");
    let status = Command::new("gst-launch-1.0")
        .args([
            "-q",
            "-e",
            "videotestsrc",
            "num-buffers=180",
            "pattern=ball",
            "!",
            "video/x-raw,width=1280,height=720,framerate=30/1",
            "!",
            "x264enc",
            "speed-preset=ultrafast",
            "bitrate=4000",
            "!",
            "h264parse",
            "!",
            "mp4mux",
            "name=mux",
            "!",
            "filesink",
        ])
        .arg(format!("location={}", tmp.display()))
        .args([
            "audiotestsrc",
            "num-buffers=259",
            "wave=sine",
            "!",
            "audioconvert",
            "!",
            "avenc_aac",
            "!",
            "aacparse",
            "!",
            "mux.",
        ])
        .status()
        .await
        .context("running gst-launch-1.0 (install gstreamer1.0-tools)")?;
    if !status.success() {
        bail!("gst-launch-1.0 could not make the demo clip ({status})");
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn demo(a: &DevArgs, objects_dir: &Path, intake: &str, xpub: &str) -> Result<()> {
    let clip = objects_dir.join("in").join("demo.mp4");
    eprintln!("making a 6 s 1280x720 test clip at {}", clip.display());
    make_clip(&clip).await?;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let output = format!(
        "file://{}/out/demo-{}/",
        objects_dir.display(),
        &run_id[..12]
    );
    let spec = serde_json::json!({
        "source": format!("file://{}", clip.display()),
        "output": output,
        "preset": "hd",
    });
    let store = transcode_core::store::open(&a.store_url, 2).await?;
    let sub = crate::follow::subscribe(xpub)?;
    // PUB/SUB joins are asynchronous: give the subscription a moment to reach the forwarder.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = serde_json::to_vec(&serde_json::json!({"v": 1, "op": "submit", "spec": spec}))?;
    let (id, _) = crate::follow::submit_via_intake(intake, payload).await?;
    eprintln!("submitted task {id} (hd ladder); events as they happen:");
    let task = crate::follow::wait_for_task(store, sub, id, true).await?;
    eprintln!();
    if task.status != transcode_core::TaskStatus::Succeeded {
        bail!(
            "demo task ended {}: {} {}",
            task.status,
            task.error_code.unwrap_or_default(),
            task.error_message.unwrap_or_default()
        );
    }
    let objects = Objects::new(Default::default());
    let url = ObjectUrl::parse(&format!("{output}manifest.json"))?;
    let bytes = objects.get_bytes(&url, 1 << 20).await?;
    let m: Manifest = serde_json::from_slice(&bytes)?;
    print!("{}", summary(&m));
    Ok(())
}

pub fn summary(m: &Manifest) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "task {} succeeded: source {}x{}, {:.1} s, audio: {}",
        m.task_id,
        m.source_width,
        m.source_height,
        m.duration_ms as f64 / 1000.0,
        if m.has_audio { "yes" } else { "no" }
    );
    let _ = writeln!(
        out,
        "{:<8} {:>10} {:>10} {:>9} {:>10}  URL",
        "NAME", "SIZE", "KBPS", "SECONDS", "BYTES"
    );
    for o in &m.outputs {
        let _ = writeln!(
            out,
            "{:<8} {:>10} {:>10} {:>9.2} {:>10}  {}",
            o.name,
            format!("{}x{}", o.width, o.height),
            o.video_kbps,
            o.duration_ms as f64 / 1000.0,
            o.bytes,
            o.url
        );
    }
    for d in &m.dropped {
        let _ = writeln!(out, "{d:<8} dropped: taller than the source");
    }
    out
}
