//! `transcode`: the operator's command line. It talks to the store named by the config (the
//! embedded SQLite file by default) and prints either tables for people or JSON for scripts.
//! Errors are one line on stderr with a documented exit code (docs/cli.md).

mod dev;
mod follow;
mod members;
mod output;
mod scaling;

use anyhow::{anyhow, bail, Context, Result};
use clap::{ArgGroup, Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use transcode_core::config::{Config, ConfigError};
use transcode_core::events::{EventBody, Origin, TaskCancelled, TaskQueued, TaskResolved};
use transcode_core::spec::{CodecPreset, Container, Rendition, SpecError, TaskSpec};
use transcode_core::store::{self, EventFilter, Fence, Patch, Store, StoreError, TaskFilter};
use transcode_core::{TaskId, TaskStatus};

/// Exit codes, documented in docs/cli.md.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const INVALID_INPUT: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const UNAVAILABLE: u8 = 5;
    pub const CONFLICT: u8 = 6;
    pub const TASK_FAILED: u8 = 7;
}

#[derive(Parser)]
#[command(
    name = "transcode",
    version,
    about = "Operate a nomad-transcode farm: submit videos, follow tasks and events"
)]
struct Cli {
    /// HCL config file (default: none; embedded defaults, then TRANSCODE_* env).
    #[arg(long, global = true, value_name = "FILE", env = "TRANSCODE_CONFIG")]
    config: Option<PathBuf>,
    /// Store URL: sqlite://PATH or postgres://USER@HOST:PORT/DB (overrides config and env).
    #[arg(long, global = true, value_name = "URL")]
    store: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the database schema.
    Migrate,
    /// Submit a video: a spec from a JSON file, or from flags. Prints the new task id.
    Submit(SubmitArgs),
    /// List tasks, newest first.
    Tasks(TasksArgs),
    /// Show one task and its events.
    Task {
        id: TaskId,
        #[arg(long)]
        json: bool,
    },
    /// Read the event log.
    Events(EventsArgs),
    /// Run a local cluster (scaler + workers) on embedded defaults; --demo transcodes a clip.
    Dev(DevCmd),
    /// Resolve an escalated task: back to the queue (--retry) or failed for good (--fail).
    Resolve(ResolveArgs),
    /// List gossip members (workers and scalers) with their state and load.
    Members {
        #[arg(long)]
        json: bool,
    },
    /// Inspect the autoscaler of the leading scaler.
    #[command(subcommand)]
    Scaling(ScalingCmd),
    /// Cancel a queued, running or escalated task.
    Cancel {
        id: TaskId,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Check a config file and/or a spec file without running anything.
    Validate {
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ScalingCmd {
    /// Policies, current inputs, streaks, cooldowns and recent decisions (`/v1/scaling`).
    Status {
        /// The scaler's HTTP address; defaults to `scaler.http` from the config.
        #[arg(long, value_name = "ADDR")]
        scaler_http: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct DevCmd {
    /// Folder for the database, objects, scratch space and logs.
    #[arg(long, default_value = ".transcode/dev")]
    dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    workers: u32,
    #[arg(long, default_value_t = 2)]
    slots: u32,
    /// Make a test clip, transcode it with the hd ladder, show the events and the outputs.
    #[arg(long)]
    demo: bool,
}

#[derive(Args)]
struct SubmitArgs {
    /// A JSON spec file ("-" for stdin). Flags given as well override its fields.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Source object: s3://bucket/key or file:///path.
    #[arg(long)]
    source: Option<String>,
    /// The source's sha256, when known: the worker refuses a source that does not match.
    #[arg(long, value_name = "HEX")]
    source_sha256: Option<String>,
    /// Output prefix, ending in '/': s3://bucket/prefix/ or file:///dir/.
    #[arg(long)]
    output: Option<String>,
    /// Ladder preset: hd or sd.
    #[arg(long)]
    preset: Option<String>,
    /// A rendition NAME:WIDTHxHEIGHT:VIDEO_KBPS[:AUDIO_KBPS]; repeat for a ladder.
    #[arg(long = "rendition", value_name = "SPEC")]
    renditions: Vec<String>,
    #[arg(long)]
    priority: Option<i32>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// x264 speed preset (ultrafast … slow).
    #[arg(long)]
    codec_preset: Option<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Print the task as JSON instead of its id.
    #[arg(long)]
    json: bool,
    /// Submit through the scaler's intake (dispatched at once) instead of writing the row
    /// directly (picked up by the scaler's next scan).
    #[arg(long)]
    intake: bool,
    /// Submit through the intake and follow the task until it ends; exit 0 only on success.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
#[command(group(ArgGroup::new("action").required(true).args(["retry", "fail"])))]
struct ResolveArgs {
    id: TaskId,
    /// Send the task back to `queued`: the scaler dispatches it again and processing resumes
    /// (renditions already uploaded are not uploaded again).
    #[arg(long)]
    retry: bool,
    /// Mark the task `failed` for good; needs --reason.
    #[arg(long, requires = "reason")]
    fail: bool,
    /// Why; recorded with your OS user in the TaskResolved event (and, with --fail, as the
    /// task's error message).
    #[arg(long)]
    reason: Option<String>,
    /// Print the task as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TasksArgs {
    #[arg(long)]
    status: Option<TaskStatus>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Page: only tasks older than this id.
    #[arg(long)]
    before: Option<TaskId>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EventsArgs {
    #[arg(long)]
    task: Option<TaskId>,
    /// An event type, e.g. VideoTranscoded.
    #[arg(long = "type")]
    event_type: Option<transcode_core::EventType>,
    /// Only events after this sequence number (the cursor printed in the SEQ column).
    #[arg(long)]
    since: Option<i64>,
    #[arg(long, default_value_t = 200)]
    limit: u32,
    #[arg(long)]
    json: bool,
    /// Stream events from the bus as they happen instead of reading the log.
    #[arg(long)]
    follow: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRANSCODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("transcode: error: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<SpecError>() || cause.is::<ConfigError>() {
            return exit::INVALID_INPUT;
        }
        if let Some(se) = cause.downcast_ref::<StoreError>() {
            return match se {
                StoreError::NotFound(_) => exit::NOT_FOUND,
                StoreError::InvalidSpec(_) | StoreError::BadUrl(_) => exit::INVALID_INPUT,
                StoreError::Unavailable(_) => exit::UNAVAILABLE,
                StoreError::WrongStatus { .. }
                | StoreError::Illegal(_)
                | StoreError::StaleToken { .. }
                | StoreError::IdempotencyConflict { .. }
                | StoreError::LostLeadership(_) => exit::CONFLICT,
                StoreError::Backend(_) | StoreError::Corrupt(_) => exit::FAILURE,
            };
        }
        if cause.is::<serde_json::Error>() {
            return exit::INVALID_INPUT;
        }
        if let Some(r) = cause.downcast_ref::<follow::IntakeRefused>() {
            return match r.code.as_str() {
                "not_found" => exit::NOT_FOUND,
                "unavailable" => exit::UNAVAILABLE,
                "not_queued" => exit::CONFLICT,
                _ => exit::INVALID_INPUT,
            };
        }
        if cause.is::<TaskEnded>() {
            return exit::TASK_FAILED;
        }
        if cause.is::<transcode_core::bus::BusError>() || cause.is::<scaling::Unreachable>() {
            return exit::UNAVAILABLE;
        }
    }
    exit::FAILURE
}

fn load_config(cli: &Cli) -> Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.store {
        cfg.set("store.url", url)?;
    }
    Ok(cfg)
}

async fn open_store(cfg: &Config) -> Result<Arc<dyn Store>> {
    let pool = usize::try_from(cfg.store.pool_size).unwrap_or(4).min(4);
    store::open(&cfg.store.url, pool)
        .await
        .with_context(|| format!("opening store {}", redact(&cfg.store.url)))
}

/// Hides a password in a postgres URL before it is printed.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The OS user running the command, for the record of who did what. The name comes from the
/// real uid (via /etc/passwd), because `$USER` can be unset (cron, containers) or stale (`su`);
/// under sudo the invoking user is named too.
fn os_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .and_then(|r| r.split_whitespace().next().map(str::to_string))
            })
        });
    let by_uid = uid.as_deref().and_then(|uid| {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid).then(|| name.to_string())
        })
    });
    let name = by_uid
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .or_else(|| uid.map(|u| format!("uid:{u}")))
        .unwrap_or_else(|| "unknown".into());
    match std::env::var("SUDO_USER") {
        Ok(s) if !s.is_empty() && s != name => format!("{name} (sudo by {s})"),
        _ => name,
    }
}

/// Who the CLI acts as, for the events it writes: `cli-<os user>` on this host.
fn origin() -> Origin {
    let user = os_user();
    let user = user.split_whitespace().next().unwrap_or("unknown");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    Origin::new(format!("cli-{user}"), host)
}

/// Pairs each escalated task with its last `ContainerErrorEscalation` event: the failing
/// operation, how many attempts were made, and the last error.
async fn with_escalations(
    store: &dyn Store,
    tasks: Vec<transcode_core::Task>,
) -> Result<Vec<output::Escalated>> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        let events = store
            .events(&EventFilter {
                task_id: Some(task.id),
                event_type: Some(transcode_core::EventType::ContainerErrorEscalation.to_string()),
                after_seq: None,
                limit: 10_000,
            })
            .await?;
        let escalation = events.last().map(|e| output::Escalation {
            time: e.time,
            operation: e.data["operation"].as_str().unwrap_or("").to_string(),
            attempts: e.data["attempts"].as_u64().unwrap_or(0),
            class: e.data["class"].as_str().unwrap_or("").to_string(),
            message: e.data["message"].as_str().unwrap_or("").to_string(),
        });
        out.push(output::Escalated { task, escalation });
    }
    Ok(out)
}

/// `transcode resolve`: escalated → queued (`--retry`) or escalated → failed (`--fail`), with a
/// `TaskResolved` event naming the OS user and the reason, in one fenced transaction that
/// refuses any task not escalated at that moment (exit 6, nothing written).
async fn resolve(cfg: &Config, args: ResolveArgs) -> Result<()> {
    let store = open_store(cfg).await?;
    let (action, to) = if args.retry {
        ("retry", TaskStatus::Queued)
    } else {
        ("fail", TaskStatus::Failed)
    };
    let reason = args.reason.unwrap_or_default();
    let by = os_user();
    let ev = origin().event(
        Some(args.id),
        EventBody::TaskResolved(TaskResolved {
            by: by.clone(),
            action: action.into(),
            reason: reason.clone(),
        }),
    );
    let patch = if to == TaskStatus::Failed {
        Patch {
            error_code: Some("operator_failed".into()),
            error_message: Some(reason.clone()),
            ..Patch::default()
        }
    } else {
        Patch::default()
    };
    let task = store
        .transition(
            args.id,
            Fence::Status(TaskStatus::Escalated),
            to,
            &patch,
            &[ev],
        )
        .await
        .map_err(|e| match e {
            StoreError::WrongStatus { .. } => anyhow::Error::new(e)
                .context("only an escalated task can be resolved; nothing was changed"),
            other => anyhow::Error::new(other),
        })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&task)?);
    } else {
        println!("{} {} (resolved by {by}: {action})", task.id, task.status);
    }
    if to == TaskStatus::Queued {
        // The scaler's periodic scan picks up queued rows anyway; going through the intake
        // only makes the dispatch immediate, so a scaler that does not answer is no error.
        let payload =
            serde_json::to_vec(&serde_json::json!({"v": 1, "op": "submit", "task_id": task.id}))?;
        let intake = &cfg.scaler.intake;
        match follow::submit_via_intake_within(intake, payload, std::time::Duration::from_secs(3))
            .await
        {
            Ok(_) => eprintln!("transcode: dispatched through the scaler's intake at {intake}"),
            Err(e)
                if e
                    .downcast_ref::<follow::IntakeRefused>()
                    .is_some_and(|r| r.code == "not_queued") =>
            {
                eprintln!("transcode: the scaler has already dispatched it")
            }
            Err(e) => eprintln!(
                "transcode: note: the scaler's intake at {intake} did not take it ({}); its periodic scan will dispatch the task",
                one_line(&e)
            ),
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = load_config(&cli)?;
    match cli.command {
        Command::Migrate => {
            let store = open_store(&cfg).await?;
            let v = store.migrate().await?;
            println!("schema at version {v} ({})", redact(&cfg.store.url));
        }
        Command::Validate { spec } => {
            if let Some(path) = spec {
                let spec = read_spec(&path)?;
                let valid = spec.validate()?;
                println!(
                    "spec ok: {} rendition(s) from {}",
                    valid.renditions.len(),
                    valid.source
                );
            }
            println!("config ok (store {})", redact(&cfg.store.url));
        }
        Command::Dev(d) => {
            let store_url =
                if cli.store.is_some() || std::env::var_os("TRANSCODE_STORE_URL").is_some() {
                    cfg.store.url.clone()
                } else {
                    format!(
                        "sqlite://{}",
                        std::path::absolute(&d.dir)?.join("transcode.db").display()
                    )
                };
            dev::run(dev::DevArgs {
                dir: d.dir,
                workers: d.workers.max(1),
                slots: d.slots.max(1),
                demo: d.demo,
                store_url,
                intake: cfg.scaler.intake.clone(),
                dispatch: cfg.scaler.dispatch.clone(),
                events_pub: cfg.scaler.events_pub.clone(),
                events_sub: cfg.scaler.events_sub.clone(),
                http: cfg.scaler.http.clone(),
                config: cli.config.clone(),
            })
            .await?;
        }
        Command::Submit(args) if args.intake || args.wait => {
            let spec = build_spec(&args)?;
            spec.validate()?;
            let payload =
                serde_json::to_vec(&serde_json::json!({"v": 1, "op": "submit", "spec": spec}))?;
            let store = if args.wait {
                Some(open_store(&cfg).await?)
            } else {
                None
            };
            let sub = if args.wait {
                Some(follow::subscribe(&cfg.scaler.events_pub)?)
            } else {
                None
            };
            let (id, created) = follow::submit_via_intake(&cfg.scaler.intake, payload).await?;
            if !created {
                eprintln!("transcode: note: idempotency key matched existing task {id}");
            }
            if let (Some(store), Some(sub)) = (store, sub) {
                eprintln!("{id}: submitted; waiting");
                let t = follow::wait_for_task(store, sub, id, false).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&t)?);
                } else {
                    println!("{} {}", t.id, t.status);
                }
                if t.status != TaskStatus::Succeeded {
                    bail!(TaskEnded {
                        id,
                        status: t.status,
                        error: format!(
                            "{} {}",
                            t.error_code.unwrap_or_default(),
                            t.error_message.unwrap_or_default()
                        ),
                    });
                }
            } else {
                println!("{id}");
            }
        }
        Command::Submit(args) => {
            let spec = build_spec(&args)?;
            // Validate before connecting, so a bad spec never needs (or touches) the store.
            spec.validate()?;
            let store = open_store(&cfg).await?;
            let queued = origin().event(
                None,
                EventBody::TaskQueued(TaskQueued {
                    priority: spec.priority,
                    via: "cli".into(),
                }),
            );
            let ins = store.insert_task(&spec, &[queued]).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&ins.task)?);
            } else {
                println!("{}", ins.task.id);
            }
            if !ins.created {
                eprintln!(
                    "transcode: note: idempotency key matched existing task {} ({})",
                    ins.task.id, ins.task.status
                );
            }
        }
        Command::Tasks(args) => {
            let store = open_store(&cfg).await?;
            let tasks = store
                .list_tasks(&TaskFilter {
                    status: args.status,
                    limit: args.limit,
                    before: args.before,
                })
                .await?;
            if args.status == Some(TaskStatus::Escalated) {
                let escalated = with_escalations(store.as_ref(), tasks).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&escalated)?);
                } else {
                    print!("{}", output::escalated_table(&escalated));
                }
            } else if args.json {
                println!("{}", serde_json::to_string_pretty(&tasks)?);
            } else {
                print!("{}", output::tasks_table(&tasks));
            }
        }
        Command::Resolve(args) => resolve(&cfg, args).await?,
        Command::Task { id, json } => {
            let store = open_store(&cfg).await?;
            let task = store.get_task(id).await?;
            let events = store
                .events(&EventFilter {
                    task_id: Some(id),
                    limit: 10_000,
                    ..EventFilter::default()
                })
                .await?;
            if json {
                let ev: Vec<_> = events.iter().map(|e| e.to_cloudevent()).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"task": task, "events": ev}))?
                );
            } else {
                print!("{}", output::task_details(&task, &events));
            }
        }
        Command::Members { json } => {
            let store = open_store(&cfg).await?;
            members::run(store, json).await?;
        }
        Command::Scaling(ScalingCmd::Status { scaler_http, json }) => {
            let addr = scaler_http.unwrap_or_else(|| cfg.scaler.http.clone());
            scaling::status(&addr, json).await?;
        }
        Command::Events(args) if args.follow => {
            follow::follow_bus(
                &cfg.scaler.events_pub,
                args.event_type.map(|t| t.to_string()),
                args.json,
            )
            .await?;
        }
        Command::Events(args) => {
            let store = open_store(&cfg).await?;
            let events = store
                .events(&EventFilter {
                    task_id: args.task,
                    event_type: args.event_type.map(|t| t.to_string()),
                    after_seq: args.since,
                    limit: args.limit,
                })
                .await?;
            if args.json {
                for e in &events {
                    let mut ce = e.to_cloudevent();
                    if let Some(o) = ce.as_object_mut() {
                        o.insert("seq".into(), serde_json::json!(e.seq));
                    }
                    println!("{}", serde_json::to_string(&ce)?);
                }
            } else {
                print!("{}", output::events_table(&events));
            }
        }
        Command::Cancel { id, reason } => {
            let store = open_store(&cfg).await?;
            let o = origin();
            let ev = o.event(
                Some(id),
                EventBody::TaskCancelled(TaskCancelled {
                    by: o.member.clone(),
                    reason: reason.clone(),
                }),
            );
            let t = store
                .transition(
                    id,
                    Fence::Admin,
                    TaskStatus::Cancelled,
                    &Patch {
                        error_code: Some("cancelled".into()),
                        error_message: Some(reason),
                        ..Patch::default()
                    },
                    &[ev],
                )
                .await?;
            println!("{} {}", t.id, t.status);
        }
    }
    Ok(())
}

/// A followed task ended in a status other than `succeeded`.
#[derive(Debug, thiserror::Error)]
#[error("task {id} ended {status}: {error}")]
struct TaskEnded {
    id: TaskId,
    status: TaskStatus,
    error: String,
}

fn read_spec(path: &std::path::Path) -> Result<TaskSpec> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading spec from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("spec {}", path.display()))
}

fn parse_rendition(s: &str) -> Result<Rendition> {
    let parts: Vec<&str> = s.split(':').collect();
    let (name, size, vk, ak) = match parts.as_slice() {
        [n, sz, v] => (*n, *sz, *v, None),
        [n, sz, v, a] => (*n, *sz, *v, Some(*a)),
        _ => bail!("--rendition {s:?}: expected NAME:WIDTHxHEIGHT:VIDEO_KBPS[:AUDIO_KBPS]"),
    };
    let (w, h) = size
        .split_once('x')
        .ok_or_else(|| anyhow!("--rendition {s:?}: size must be WIDTHxHEIGHT"))?;
    let num = |v: &str, what: &str| -> Result<u32> {
        v.parse()
            .map_err(|_| anyhow!("--rendition {s:?}: {what} {v:?} is not a number"))
    };
    Ok(Rendition {
        name: name.to_string(),
        width: num(w, "width")?,
        height: num(h, "height")?,
        video_kbps: num(vk, "video kbps")?,
        audio_kbps: ak.map(|a| num(a, "audio kbps")).transpose()?.unwrap_or(128),
    })
}

fn build_spec(a: &SubmitArgs) -> Result<TaskSpec> {
    let mut spec = match &a.spec {
        Some(path) => read_spec(path)?,
        None => TaskSpec {
            source: String::new(),
            output: String::new(),
            preset: None,
            renditions: None,
            container: Container::Mp4,
            codec_preset: CodecPreset::default(),
            priority: 0,
            idempotency_key: None,
            max_attempts: None,
            source_sha256: None,
        },
    };
    if let Some(v) = &a.source {
        spec.source = v.clone();
    }
    if let Some(v) = &a.source_sha256 {
        spec.source_sha256 = Some(v.clone());
    }
    if let Some(v) = &a.output {
        spec.output = v.clone();
    }
    if let Some(v) = &a.preset {
        spec.preset = Some(v.clone());
    }
    if !a.renditions.is_empty() {
        spec.renditions = Some(
            a.renditions
                .iter()
                .map(|r| parse_rendition(r))
                .collect::<Result<_>>()?,
        );
    }
    if let Some(v) = a.priority {
        spec.priority = v;
    }
    if let Some(v) = &a.idempotency_key {
        spec.idempotency_key = Some(v.clone());
    }
    if let Some(v) = &a.codec_preset {
        spec.codec_preset = serde_json::from_value(serde_json::json!(v))
            .map_err(|_| anyhow!("--codec-preset {v:?}: expected ultrafast, superfast, veryfast, faster, fast, medium or slow"))?;
    }
    if let Some(v) = a.max_attempts {
        spec.max_attempts = Some(v);
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendition_flag_parses() {
        let r = parse_rendition("720p:1280x720:3000").expect("valid");
        assert_eq!(
            (r.width, r.height, r.video_kbps, r.audio_kbps),
            (1280, 720, 3000, 128)
        );
        assert_eq!(
            parse_rendition("a:2x2:50:64").expect("valid").audio_kbps,
            64
        );
        for bad in [
            "720p",
            "720p:1280:3000",
            "720p:axb:3000",
            "a:2x2:x",
            "a:2x2:1:2:3",
        ] {
            assert!(parse_rendition(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
