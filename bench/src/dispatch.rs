//! `bench-dispatch`: tasks per second through the whole control path (intake → queue →
//! dispatch → claim → every event → done) with the no-op transcoder, against a one-process
//! loop that only claims and completes tasks on the same store. Both run in this invocation and
//! the ratio is printed. Run through `bench/dispatch.sh`, which provides PostgreSQL.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use transcode_core::store::{self, Claimant, Fence, Patch, TaskFilter};
use transcode_core::{TaskSpec, TaskStatus};

#[derive(Parser)]
struct Args {
    /// Base store URL for the baseline; the system run gets its own database/file.
    #[arg(long)]
    baseline_store: String,
    #[arg(long)]
    system_store: String,
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    #[arg(long, default_value_t = 2)]
    workers: u32,
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Folder with transcode-scaler and transcode-worker.
    #[arg(long)]
    bin_dir: PathBuf,
}

fn spec(n: usize) -> Result<TaskSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "source": format!("s3://media/in/{n}.mp4"),
        "output": format!("s3://media/out/{n}/"),
        "preset": "sd",
    }))?)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bin: &PathBuf, args: &[String]) -> Result<(Kill, serde_json::Value)> {
    let mut child = Command::new(bin)
        .args(args)
        .env("TRANSCODE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(out).lines();
    let first = lines
        .next()
        .ok_or_else(|| anyhow!("{} exited", bin.display()))??;
    std::thread::spawn(move || for _ in lines {});
    Ok((Kill(child), serde_json::from_str(&first)?))
}

async fn baseline(url: &str, n: usize) -> Result<f64> {
    let s = store::open(url, 2).await?;
    s.migrate().await?;
    for i in 0..n {
        s.insert_task(&spec(i)?, &[]).await?;
    }
    let who = Claimant {
        worker_id: "bench".into(),
        node: "bench".into(),
    };
    let t0 = Instant::now();
    let mut done = 0;
    while let Some(t) = s.claim_next(&who, Duration::from_secs(60), &[]).await? {
        s.transition(
            t.id,
            Fence::Token(t.lease_token),
            TaskStatus::Succeeded,
            &Patch::default(),
            &[],
        )
        .await?;
        done += 1;
    }
    if done != n {
        bail!("baseline completed {done} of {n}");
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

async fn system(a: &Args) -> Result<f64> {
    let ep = |k: &str, v: &serde_json::Value| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no {k}"))
    };
    let p = |s: &str| s.to_string();
    let (_scaler, info) = start(
        &a.bin_dir.join("transcode-scaler"),
        &[
            p("--store"),
            a.system_store.clone(),
            p("--migrate"),
            p("--intake"),
            p("tcp://127.0.0.1:0"),
            p("--dispatch"),
            p("tcp://127.0.0.1:0"),
            p("--events-pub"),
            p("tcp://127.0.0.1:0"),
            p("--events-sub"),
            p("tcp://127.0.0.1:0"),
            p("--http"),
            p("127.0.0.1:0"),
        ],
    )?;
    let mut workers = Vec::new();
    for i in 0..a.workers {
        workers.push(start(
            &a.bin_dir.join("transcode-worker"),
            &[
                p("--store"),
                a.system_store.clone(),
                p("--dispatch"),
                ep("dispatch", &info)?,
                p("--events"),
                ep("events_sub", &info)?,
                p("--id"),
                format!("bench-w{i}"),
                p("--slots"),
                a.slots.to_string(),
                p("--http"),
                p("127.0.0.1:0"),
                p("--noop-transcode"),
            ],
        )?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let intake = ep("intake", &info)?;
    let n = a.tasks;
    let t0 = Instant::now();
    // A DEALER keeps a window of submissions in flight; replies are counted, not awaited one
    // by one. The intake answers `busy` past its pending limit (backpressure, as a publisher
    // would meet it), and a refused submission is simply sent again.
    let submitter = std::thread::spawn(move || -> Result<usize> {
        const WINDOW: usize = 512;
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::DEALER)?;
        s.set_linger(0)?;
        s.set_sndhwm(100_000)?;
        s.set_rcvtimeo(60_000)?;
        s.connect(&intake)?;
        let (mut next, mut to_send, mut in_flight, mut ok, mut busy) = (0usize, n, 0usize, 0, 0);
        while ok < n {
            while to_send > 0 && in_flight < WINDOW {
                let frame = serde_json::json!({"v": 1, "op": "submit", "spec": spec(next)?});
                s.send_multipart([Vec::new(), serde_json::to_vec(&frame)?], 0)?;
                next += 1;
                to_send -= 1;
                in_flight += 1;
            }
            let parts = s.recv_multipart(0)?;
            in_flight -= 1;
            let reply: serde_json::Value =
                serde_json::from_slice(parts.last().ok_or_else(|| anyhow!("empty reply"))?)?;
            if reply["ok"] == true {
                ok += 1;
            } else if reply["error"]["code"] == "busy" {
                busy += 1;
                to_send += 1;
            } else {
                bail!("intake refused a submission: {reply}");
            }
        }
        if busy > 0 {
            eprintln!("(intake answered busy {busy} times; those were sent again)");
        }
        Ok(ok)
    });
    let db = store::open(&a.system_store, 2).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = db
            .list_tasks(&TaskFilter {
                status: Some(TaskStatus::Succeeded),
                limit: u32::try_from(n + 1).unwrap_or(u32::MAX),
                before: None,
            })
            .await?
            .len();
        if done >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {n} tasks succeeded in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let accepted = submitter
        .join()
        .map_err(|_| anyhow!("submitter panicked"))??;
    if accepted != n {
        bail!("intake accepted {accepted} of {n}");
    }
    Ok(rate)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    println!(
        "# dispatch benchmark: {} tasks, {} workers x {} slots, no-op transcoder",
        a.tasks, a.workers, a.slots
    );
    let base = baseline(&a.baseline_store, a.tasks).await?;
    println!("baseline (one process: claim + complete):  {base:>8.0} tasks/s");
    let sys = system(&a).await?;
    println!("system (intake→dispatch→claim→events→done): {sys:>8.0} tasks/s");
    println!("ratio system/baseline: {:.2}x", sys / base);
    Ok(())
}
