//! `bench-store`: store throughput against PostgreSQL (or SQLite), each figure printed as a
//! ratio to the single-row path measured in the same run, because absolute times on shared
//! machines are noise. Run through `bench/store.sh`, which starts a throwaway PostgreSQL.
//!
//! - claims: 8 concurrent `claim_next` loops vs one loop, one row per transaction each;
//! - event appends: batched `append_events` (binary COPY on PostgreSQL) vs one INSERT per
//!   transaction.

use anyhow::{Context, Result};
use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use transcode_core::events::{EventBody, HeartbeatReceived, Origin};
use transcode_core::store::{self, Claimant, Store};
use transcode_core::TaskSpec;

#[derive(Parser)]
struct Args {
    /// Store URL; a fresh schema is expected (the script creates a database per run).
    #[arg(long, env = "BENCH_STORE_URL")]
    store: String,
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    #[arg(long, default_value_t = 8)]
    claimers: usize,
    #[arg(long, default_value_t = 3000)]
    single_events: usize,
    #[arg(long, default_value_t = 60_000)]
    batched_events: usize,
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

fn spec(n: usize) -> Result<TaskSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "source": format!("s3://media/in/{n}.mp4"),
        "output": format!("s3://media/out/{n}/"),
        "preset": "sd",
    }))?)
}

async fn fill(s: &Arc<dyn Store>, n: usize, offset: usize) -> Result<()> {
    // Inserts run 8-wide so filling the queue does not dominate the run.
    let mut handles = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                s.insert_task(&spec(offset + i)?, &[]).await?;
                i += 8;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

async fn claim_all(s: &Arc<dyn Store>, claimers: usize) -> Result<(usize, Duration)> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..claimers {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let who = Claimant {
                worker_id: format!("bench-{w}"),
                node: "bench".into(),
            };
            let mut n = 0usize;
            while s
                .claim_next(&who, Duration::from_secs(600), &[])
                .await?
                .is_some()
            {
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await??;
    }
    Ok((total, start.elapsed()))
}

fn events(n: usize, o: &Origin) -> Vec<transcode_core::Event> {
    (0..n)
        .map(|i| {
            o.event(
                None,
                EventBody::HeartbeatReceived(HeartbeatReceived {
                    member: format!("m{}", i % 64),
                    rtt_ms: Some(0.3),
                }),
            )
        })
        .collect()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let s = store::open(&a.store, a.claimers + 2)
        .await
        .context("open store")?;
    s.migrate().await?;
    let o = Origin::new("bench", "bench");

    println!(
        "# store benchmark on {}",
        a.store.split('@').next_back().unwrap_or("?")
    );
    fill(&s, a.tasks, 0).await?;
    let (n1, d1) = claim_all(&s, 1).await?;
    fill(&s, a.tasks, a.tasks).await?;
    let (n8, d8) = claim_all(&s, a.claimers).await?;
    anyhow::ensure!(
        n1 == a.tasks && n8 == a.tasks,
        "claimed {n1} and {n8} of {} tasks",
        a.tasks
    );
    let (r1, r8) = (rate(n1, d1), rate(n8, d8));
    println!("claim, 1 claimer (baseline):   {r1:>10.0} tasks/s  ({n1} in {d1:.2?})");
    println!(
        "claim, {} claimers:             {r8:>10.0} tasks/s  ({n8} in {d8:.2?})",
        a.claimers
    );
    println!(
        "claim ratio ({}x vs 1x):        {:>10.2}x",
        a.claimers,
        r8 / r1
    );

    let singles = events(a.single_events, &o);
    let start = Instant::now();
    for ev in &singles {
        s.append_events(std::slice::from_ref(ev)).await?;
    }
    let ds = start.elapsed();
    let batched = events(a.batched_events, &o);
    let start = Instant::now();
    for chunk in batched.chunks(a.batch) {
        s.append_events(chunk).await?;
    }
    let db = start.elapsed();
    let (rs, rb) = (rate(singles.len(), ds), rate(batched.len(), db));
    println!(
        "events, single INSERT (baseline): {rs:>10.0} events/s  ({} in {ds:.2?})",
        singles.len()
    );
    println!(
        "events, batched by {} (COPY):   {rb:>10.0} events/s  ({} in {db:.2?})",
        a.batch,
        batched.len()
    );
    println!("event append ratio (batched vs single): {:>8.1}x", rb / rs);
    Ok(())
}
