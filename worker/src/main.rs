//! `transcode-worker`: takes tasks from the scaler's dispatcher and runs them (claim, pull,
//! transcode, push), serves `/v1/health` and `/metrics`, and drains on SIGTERM. Flags override
//! the HCL config, which overrides defaults (docs/configuration.md).

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use transcode_core::config::{Config, LogFormat};
use transcode_core::events::Origin;
use transcode_core::metrics::Registry;
use transcode_core::objects::Objects;
use transcode_worker::client::{self, ClientConfig, Exit};
use transcode_worker::pipeline::{Ctx, Mode};

#[derive(Parser)]
#[command(
    name = "transcode-worker",
    version,
    about = "nomad-transcode worker: runs transcoding tasks from the scaler"
)]
struct Args {
    #[arg(long, env = "TRANSCODE_CONFIG")]
    config: Option<PathBuf>,
    /// Store URL (sqlite://PATH or postgres://…).
    #[arg(long)]
    store: Option<String>,
    /// The scaler's dispatch endpoint.
    #[arg(long)]
    dispatch: Option<String>,
    /// The scaler's XSUB endpoint, where events are published.
    #[arg(long)]
    events: Option<String>,
    /// Member id (default worker-<host>-<pid>).
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    slots: Option<u32>,
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    #[arg(long)]
    lease_seconds: Option<u64>,
    #[arg(long)]
    drain_timeout_seconds: Option<u64>,
    /// Health and metrics listen address.
    #[arg(long)]
    http: Option<String>,
    /// Run migrations before starting.
    #[arg(long)]
    migrate: bool,
    /// Seconds without pipeline progress before a transcode counts as stalled.
    #[arg(long, default_value_t = 30)]
    stall_timeout_seconds: u64,
    /// Test and benchmark only: skip pull/transcode/push but write every event.
    #[arg(long, hide = true)]
    noop_transcode: bool,
    /// Gossip listen address, host:port (overrides membership.bind).
    #[arg(long)]
    gossip_bind: Option<String>,
    /// Gossip members to join, comma-separated host:port (overrides membership.join).
    #[arg(long)]
    gossip_join: Option<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn init_logs(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRANSCODE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cfg.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "transcode-worker: error: {}",
                format!("{e:#}").replace('\n', " ")
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let a = Args::parse();
    let mut cfg = Config::load(a.config.as_deref())?;
    let sets: [(&str, Option<String>); 12] = [
        ("store.url", a.store.clone()),
        ("scaler.dispatch", a.dispatch.clone()),
        ("scaler.events_sub", a.events.clone()),
        ("worker.id", a.id.clone()),
        ("worker.node", a.node.clone()),
        ("worker.slots", a.slots.map(|v| v.to_string())),
        (
            "worker.scratch_dir",
            a.scratch_dir.as_ref().map(|p| p.display().to_string()),
        ),
        (
            "worker.lease_seconds",
            a.lease_seconds.map(|v| v.to_string()),
        ),
        (
            "worker.drain_timeout_seconds",
            a.drain_timeout_seconds.map(|v| v.to_string()),
        ),
        ("worker.http", a.http.clone()),
        ("membership.bind", a.gossip_bind.clone()),
        ("membership.join", a.gossip_join.clone()),
    ];
    for (key, v) in sets {
        if let Some(v) = v {
            cfg.set(key, &v)?;
        }
    }
    cfg.validate()?;
    init_logs(&cfg);

    let host = hostname();
    let id = if cfg.worker.id.is_empty() {
        format!("worker-{host}-{}", std::process::id())
    } else {
        cfg.worker.id.clone()
    };
    let node = if cfg.worker.node.is_empty() {
        host.clone()
    } else {
        cfg.worker.node.clone()
    };
    let scratch = if cfg.worker.scratch_dir.is_empty() {
        std::env::temp_dir().join(format!("transcode-{id}"))
    } else {
        PathBuf::from(&cfg.worker.scratch_dir)
    };
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("scratch dir {}", scratch.display()))?;

    // Listen for SIGTERM before the slow parts of start-up (GStreamer's first plugin scan can
    // take seconds), so a stop during start-up is a clean drain, not a kill.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
    });

    let mode = if a.noop_transcode {
        Mode::Noop
    } else {
        transcode_worker::transcode::init().context("GStreamer is not usable")?;
        Mode::Gstreamer
    };

    let pool = usize::try_from(cfg.store.pool_size).unwrap_or(8);
    let store = transcode_core::store::open(&cfg.store.url, pool)
        .await
        .context("opening the store")?;
    if a.migrate {
        store.migrate().await.context("migrating")?;
    }
    let zctx = zmq::Context::new();
    let (bus, _pub_handle) = transcode_core::bus::publisher(&zctx, &cfg.scaler.events_sub)?;
    let metrics = Arc::new(Registry::new());
    transcode_worker::pipeline::describe_metrics(&metrics);
    let objects = Objects::new(cfg.objects.clone());
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        steps: transcode_core::store::StepWriter::start(store.clone()),
        objects,
        bus,
        origin: Origin::new(id.clone(), node.clone()),
        scratch,
        lease: Duration::from_secs(cfg.worker.lease_seconds.max(1)),
        metrics: metrics.clone(),
        mode,
        stall_timeout: Duration::from_secs(a.stall_timeout_seconds.max(1)),
        retry: cfg.retry.clone(),
    });

    let health_store = store.clone();
    let health: transcode_core::http::HealthFn = Arc::new(move || {
        let s = health_store.clone();
        Box::pin(async move {
            match s.ping().await {
                Ok(()) => (true, serde_json::json!({"store": "ok"})),
                Err(e) => (false, serde_json::json!({"store": e.to_string()})),
            }
        })
    });
    let http = transcode_core::http::serve(&cfg.worker.http, health, metrics.clone())
        .await
        .with_context(|| format!("http listen {}", cfg.worker.http))?;
    let busy = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let gossip = transcode_worker::gossip::Gossip::start(
        &cfg.membership,
        &cfg.utilization,
        metrics.clone(),
        &id,
        &node,
        cfg.worker.slots,
        transcode_worker::gossip::Live {
            busy: busy.clone(),
            draining: stop_rx.clone(),
        },
    )
    .await
    .context("starting gossip")?;
    // One machine-readable line so supervisors and tests can find us.
    println!(
        "{}",
        serde_json::json!({"id": id, "node": node, "http": http.to_string()})
    );

    let exit = client::run(
        ctx,
        &zctx,
        ClientConfig {
            dispatch: cfg.scaler.dispatch.clone(),
            slots: cfg.worker.slots,
            drain_timeout: Duration::from_secs(cfg.worker.drain_timeout_seconds),
            ping_every: Duration::from_secs(2),
            busy,
        },
        stop_rx,
    )
    .await?;
    gossip.leave().await;
    let Exit::Drained { released } = exit;
    tracing::info!(released, "drained; exiting");
    Ok(())
}
