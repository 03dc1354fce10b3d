//! `transcode-scaler`: the binary edge. It parses flags, loads the config (file, then
//! `TRANSCODE_*` env, then flags), sets up logging on stderr, starts the scaler, prints one JSON
//! line with the bound endpoints on stdout (so callers can bind `:0` ports and still find
//! them), and shuts down cleanly on SIGTERM or SIGINT.

use anyhow::{Context, Result};
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use transcode_core::config::{Config, LogFormat};
use transcode_scaler::{Scaler, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "transcode-scaler",
    version,
    about = "Intake, dispatch, event bus and recovery for a nomad-transcode farm"
)]
struct Cli {
    /// HCL config file (default: none; embedded defaults, then TRANSCODE_* env).
    #[arg(long, value_name = "FILE", env = "TRANSCODE_CONFIG")]
    config: Option<PathBuf>,
    /// Store URL: sqlite://PATH or postgres://USER@HOST:PORT/DB (overrides store.url).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Apply pending database migrations before serving.
    #[arg(long)]
    migrate: bool,
    /// Intake ROUTER endpoint, e.g. tcp://127.0.0.1:5570 (port 0 picks a free one).
    #[arg(long, value_name = "ENDPOINT")]
    intake: Option<String>,
    /// Dispatch ROUTER endpoint for workers.
    #[arg(long, value_name = "ENDPOINT")]
    dispatch: Option<String>,
    /// Event bus XPUB endpoint, where subscribers connect.
    #[arg(long, value_name = "ENDPOINT")]
    events_pub: Option<String>,
    /// Event bus XSUB endpoint, where publishers connect.
    #[arg(long, value_name = "ENDPOINT")]
    events_sub: Option<String>,
    /// Health and metrics HTTP listener, host:port.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Member id, the source of this scaler's events (default scaler-<hostname>-<pid>).
    #[arg(long)]
    id: Option<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// How often the store is scanned for queued tasks the dispatcher does not hold.
    #[arg(long, value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    scan_interval_ms: u64,
    /// How often expired leases are swept (their tasks requeued).
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    sweep_interval_ms: u64,
    /// A worker silent (no frame at all) for this long is dropped.
    #[arg(long, value_name = "MS", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    worker_timeout_ms: u64,
    /// A task still queued this long after its TASK frame went out is sent again.
    #[arg(long, value_name = "MS", default_value_t = 30000, value_parser = clap::value_parser!(u64).range(1..))]
    redispatch_after_ms: u64,
    /// Gossip listen address, host:port (overrides membership.bind; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    gossip_bind: Option<String>,
    /// Gossip members to join, comma-separated host:port (overrides membership.join).
    #[arg(long, value_name = "ADDRS")]
    gossip_join: Option<String>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}

fn load_config(cli: &Cli) -> Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    let flags = [
        ("store.url", &cli.store),
        ("scaler.intake", &cli.intake),
        ("scaler.dispatch", &cli.dispatch),
        ("scaler.events_pub", &cli.events_pub),
        ("scaler.events_sub", &cli.events_sub),
        ("scaler.http", &cli.http),
        ("membership.bind", &cli.gossip_bind),
        ("membership.join", &cli.gossip_join),
    ];
    for (key, value) in flags {
        if let Some(v) = value {
            cfg.set(key, v)?;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

fn init_logging(cfg: &Config) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .with_context(|| format!("log.level {:?}", cfg.log.level))?;
    // Colour codes only help a person at a terminal; in a log file they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("logging: {e}"))
}

async fn wait_for_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Gossip failure detection beside the scaler (see `failure.rs`).
async fn start_gossip(
    cfg: &Config,
    scaler: &Scaler,
    origin: transcode_core::Origin,
) -> Result<transcode_scaler::failure::Gossip> {
    use transcode_core::membership::Settings as GossipSettings;
    let settings = GossipSettings::from_config(&cfg.membership)?;
    let store = transcode_core::store::open(&cfg.store.url, 2)
        .await
        .context("opening the store for gossip recovery")?;
    let deps = transcode_scaler::failure::Deps {
        store,
        dispatch: scaler.dispatcher(),
        metrics: scaler.metrics(),
        origin,
        events_sub: scaler.endpoints().events_sub.clone(),
        row_interval: Duration::from_secs(cfg.membership.event_row_interval_seconds),
    };
    transcode_scaler::failure::Gossip::start(&settings, deps)
        .await
        .context("starting gossip")
}

/// Blocks until this process holds the scaler leader lock (ARCHITECTURE §8). A standby binds
/// nothing while it waits, so workers and publishers keep talking to the leader; when the
/// leader dies its lock goes with its database session (or its file lock), and the standby
/// binds the same endpoints, where the workers' sockets reconnect by themselves.
async fn become_leader(cfg: &Config) -> Result<Box<dyn transcode_core::store::Leadership>> {
    let store = transcode_core::store::open(&cfg.store.url, 1)
        .await
        .context("opening the store for leader election")?;
    let mut said = false;
    loop {
        match store.try_lead(LEADER_LOCK).await {
            Ok(Some(l)) => {
                tracing::info!("this scaler leads");
                return Ok(l);
            }
            Ok(None) => {
                if !said {
                    tracing::info!("standby: another scaler leads; waiting for its lock");
                    said = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader election: store unavailable; retrying"),
        }
        tokio::time::sleep(LEADER_POLL).await;
    }
}

/// Answers when leadership is lost for good (another scaler took the lock).
async fn watch_leadership(mut l: Box<dyn transcode_core::store::Leadership>) -> String {
    loop {
        tokio::time::sleep(LEADER_POLL).await;
        match l.confirm().await {
            Ok(()) => {}
            Err(transcode_core::store::StoreError::LostLeadership(why)) => return why,
            Err(e) => tracing::warn!(error = %e, "cannot confirm leadership; will ask again"),
        }
    }
}

const LEADER_LOCK: &str = "transcode-scaler";
const LEADER_POLL: Duration = Duration::from_secs(1);

/// The node target, the container target, and the `local` target when either level uses it.
type Targets = (
    std::sync::Arc<dyn transcode_scaler::targets::Target>,
    std::sync::Arc<dyn transcode_scaler::targets::Target>,
    Option<std::sync::Arc<transcode_scaler::targets::local::LocalTarget>>,
);

/// The autoscaler's targets from `scaling.*`; one `local` target serves both levels when both
/// name it, so node and container counts agree.
fn build_targets(
    cfg: &Config,
    endpoints: &transcode_scaler::Endpoints,
    gossip: &std::net::SocketAddr,
) -> Result<Targets> {
    use std::sync::Arc;
    use transcode_scaler::targets::{command, local, nomad, Target};
    let sc = &cfg.scaling;
    let mut local_target: Option<Arc<local::LocalTarget>> = None;
    let mut make = |kind: &str| -> Result<Arc<dyn Target>> {
        Ok(match kind {
            "local" => {
                if let Some(t) = &local_target {
                    return Ok(t.clone() as Arc<dyn Target>);
                }
                let worker_bin = if sc.local.worker_bin.is_empty() {
                    std::env::current_exe()
                        .context("locating this binary")?
                        .with_file_name("transcode-worker")
                } else {
                    PathBuf::from(&sc.local.worker_bin)
                };
                let mut args = vec![
                    "--store".to_string(),
                    cfg.store.url.clone(),
                    "--dispatch".to_string(),
                    endpoints.dispatch.clone(),
                    "--events".to_string(),
                    endpoints.events_sub.clone(),
                    "--gossip-join".to_string(),
                    gossip.to_string(),
                ];
                if !sc.local.worker_config.is_empty() {
                    args.push("--config".into());
                    args.push(sc.local.worker_config.clone());
                }
                let t = Arc::new(
                    local::LocalTarget::new(local::LocalSettings {
                        worker_bin,
                        args,
                        containers_per_node: sc.local.containers_per_node,
                        slots: sc.local.slots,
                        node_prefix: sc.local.node_prefix.clone(),
                        log_dir: None,
                        drain_wait: Duration::from_secs(sc.container.drain_deadline_seconds),
                    })
                    .context("scaling.local")?,
                );
                local_target = Some(t.clone());
                t
            }
            "nomad" => Arc::new(
                nomad::NomadTarget::new(nomad::NomadSettings::from_config(&sc.nomad))
                    .context("scaling.nomad")?,
            ),
            "command" => Arc::new(command::CommandTarget::new(
                command::CommandSettings::from_config(&sc.command),
            )),
            other => anyhow::bail!("unknown scaling target {other:?}"),
        })
    };
    let node = make(&sc.node.target)?;
    let container = make(&sc.container.target)?;
    Ok((node, container, local_target))
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = load_config(&cli)?;
    init_logging(&cfg)?;
    let leadership = become_leader(&cfg).await?;
    let host = hostname();
    let settings = Settings {
        store_url: cfg.store.url.clone(),
        pool_size: cfg.store.pool_size as usize,
        migrate: cli.migrate,
        intake: cfg.scaler.intake.clone(),
        dispatch: cfg.scaler.dispatch.clone(),
        events_pub: cfg.scaler.events_pub.clone(),
        events_sub: cfg.scaler.events_sub.clone(),
        http: cfg.scaler.http.clone(),
        member: cli
            .id
            .clone()
            .unwrap_or_else(|| format!("scaler-{host}-{}", std::process::id())),
        node: cli.node.clone().unwrap_or(host),
        scan_interval: Duration::from_millis(cli.scan_interval_ms),
        sweep_interval: Duration::from_millis(cli.sweep_interval_ms),
        worker_timeout: Duration::from_millis(cli.worker_timeout_ms),
        redispatch_after: Duration::from_millis(cli.redispatch_after_ms),
        queue_capacity: transcode_scaler::server::QUEUE_CAPACITY,
    };
    let signals = tokio::spawn(wait_for_signal());
    let origin = transcode_core::Origin::new(settings.member.clone(), settings.node.clone());
    let scaler = Scaler::start(settings)
        .await
        .context("starting the scaler")?;
    let origin_for_scaling = origin.clone();
    let gossip = start_gossip(&cfg, &scaler, origin).await?;
    {
        let mut endpoints = scaler.endpoints().to_json();
        endpoints["gossip"] = serde_json::json!(gossip.local_addr().to_string());
        let mut out = std::io::stdout().lock();
        writeln!(out, "{endpoints}")
            .and_then(|()| out.flush())
            .context("writing the endpoints line")?;
    }
    let (autoscaler, local_target) = if cfg.scaling.enabled {
        let (node_target, container_target, local_target) =
            build_targets(&cfg, scaler.endpoints(), &gossip.local_addr())?;
        let zctx = zmq::Context::new();
        let (publisher, pub_socket) =
            transcode_core::bus::publisher(&zctx, &scaler.endpoints().events_sub)
                .context("autoscaler event publisher")?;
        let deps = transcode_scaler::autoscale::Deps {
            store: transcode_core::store::open(&cfg.store.url, 2)
                .await
                .context("opening the store for the autoscaler")?,
            dispatch: scaler.dispatcher(),
            metrics: scaler.metrics(),
            origin: origin_for_scaling.clone(),
            publisher,
            members: gossip.members_fn(),
            status: scaler.scaling_status(),
        };
        let settings = transcode_scaler::autoscale::Settings {
            node: cfg.scaling.node.clone(),
            container: cfg.scaling.container.clone(),
            node_target,
            container_target,
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(transcode_scaler::autoscale::run(settings, deps, stop_rx));
        (Some((stop, task, pub_socket, zctx)), local_target)
    } else {
        (None, None)
    };
    let outcome = tokio::select! {
        why = signals => {
            let why = why.context("signal handler")??;
            tracing::info!(signal = why, "shutting down");
            Ok(())
        }
        why = watch_leadership(leadership) => {
            tracing::error!(reason = %why, "leadership lost: stopping so the new leader alone acts");
            Err(anyhow::anyhow!("leadership lost: {why}"))
        }
    };
    if let Some((stop, task, pub_socket, zctx)) = autoscaler {
        let _ = stop.send(true);
        let _ = task.await;
        let _ = tokio::task::spawn_blocking(move || {
            pub_socket.close();
            drop(zctx);
        })
        .await;
    }
    if let Some(t) = local_target {
        // Workers this scaler started drain on SIGTERM like any other.
        t.terminate_all();
    }
    gossip.shutdown().await;
    scaler.shutdown().await;
    outcome
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("transcode-scaler: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging may not be set up yet (a config error), so the reason goes to stderr
            // directly as well as through tracing.
            tracing::error!(error = format!("{e:#}"), "scaler failed");
            eprintln!("transcode-scaler: {e:#}");
            ExitCode::FAILURE
        }
    }
}
