//! Configuration: the one place that knows every setting, its type, its default and how it is
//! spelled in the HCL file, in `TRANSCODE_*` environment variables and in `set()` calls made by
//! binaries for their CLI flags. Layers apply in that order (file, env, flags), each later layer
//! overriding the earlier. With no file at all the defaults run the embedded mode (SQLite, local
//! endpoints). Mistakes in the file are reported with `file:line:column`, because an operator
//! editing a config on a server has nothing else to go on.
//!
//! The file is checked by walking the `hcl-edit` syntax tree (which keeps spans) against
//! [`SCHEMA`]; the checked literal values are then assembled into a JSON tree and deserialized
//! into [`Config`] with serde. Env vars and flags go through the same schema, so a setting
//! added to the schema (and to its struct) is available in all three layers at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hcl_edit::expr::{Expression, UnaryOperator};
use hcl_edit::structure::{Body, Structure};
use hcl_edit::Span;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::objects::ObjectsConfig;
use crate::retry::RetryConfig;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "TRANSCODE_";

/// Env vars with this prefix belong to the test harness, never to the config.
const ENV_IGNORED_PREFIXES: &[&str] = &["TRANSCODE_TEST_"];
/// Env vars that look like config keys but belong to something else.
const ENV_IGNORED_NAMES: &[&str] = &["TRANSCODE_REQUIRE_SERVICES"];

/// The complete configuration of any nomad-transcode process. Every section and every key has a
/// default, so `Config::default()` is a working embedded setup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub store: StoreConfig,
    pub objects: ObjectsConfig,
    pub scaler: ScalerConfig,
    pub worker: WorkerConfig,
    pub membership: MembershipConfig,
    /// Retry policies for the worker's object transfers (`crate::retry`).
    pub retry: RetryConfig,
    /// How each member samples and shares its CPU and memory use (ARCHITECTURE §8).
    pub utilization: UtilizationConfig,
    /// The scaler's autoscaling policies and the targets that carry them out.
    pub scaling: ScalingConfig,
    pub log: LogConfig,
}

/// Where task and event rows live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://path` (relative paths are relative to the working directory) or
    /// `postgres://user:pw@host:port/db` (`postgresql://` is accepted too).
    pub url: String,
    /// Connections in the pool.
    pub pool_size: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://.transcode/transcode.db".into(),
            pool_size: 8,
        }
    }
}

/// The scaler's sockets. ZeroMQ endpoints are `tcp://host:port` (or `ipc://`), HTTP is
/// `host:port`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalerConfig {
    pub intake: String,
    pub dispatch: String,
    pub events_pub: String,
    pub events_sub: String,
    pub http: String,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            intake: "tcp://127.0.0.1:5570".into(),
            dispatch: "tcp://127.0.0.1:5571".into(),
            events_pub: "tcp://127.0.0.1:5572".into(),
            events_sub: "tcp://127.0.0.1:5573".into(),
            http: "127.0.0.1:8570".into(),
        }
    }
}

/// One worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Member id; empty means the worker makes one up at start.
    pub id: String,
    /// Node name; empty means the host name.
    pub node: String,
    /// Tasks this worker runs at once.
    pub slots: u32,
    /// Where sources and outputs are staged; empty means a folder under the system temp dir.
    pub scratch_dir: String,
    /// Length of a task lease; the worker renews well before it runs out.
    pub lease_seconds: u64,
    /// How long a draining worker waits for running tasks before it gives them back.
    pub drain_timeout_seconds: u64,
    /// Health and metrics listener; port 0 picks a free port.
    pub http: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: String::new(),
            node: String::new(),
            slots: 2,
            scratch_dir: String::new(),
            lease_seconds: 30,
            drain_timeout_seconds: 60,
            http: "127.0.0.1:0".into(),
        }
    }
}

/// Gossip membership (ARCHITECTURE §7): every scaler and worker is a member. Addresses are
/// `host:port`; UDP and TCP share the port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipConfig {
    /// Where this member listens for gossip. Unset means `127.0.0.1:0` (a free port, which the
    /// scaler reports in its start-up line as `gossip`).
    pub bind: Option<String>,
    /// The address other members are told to use, when it differs from `bind` (NAT, 0.0.0.0).
    pub advertise: Option<String>,
    /// Members to join at start (usually the scaler's gossip address); retried until one
    /// answers.
    pub join: Vec<String>,
    /// Base64 of a 32-byte AES-256-GCM key (as `serf keygen` prints). Unset means plaintext.
    pub encrypt_key: Option<String>,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    /// At most one HeartbeatReceived row per member per this many seconds reaches the
    /// database (the bus gets every heartbeat); a state change always writes a row.
    pub event_row_interval_seconds: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            bind: None,
            advertise: None,
            join: Vec::new(),
            encrypt_key: None,
            // Go Serf's LAN defaults.
            probe_interval_ms: 1000,
            probe_timeout_ms: 500,
            event_row_interval_seconds: 60,
        }
    }
}

/// How a member measures its own CPU and memory use and shares it through gossip tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UtilizationConfig {
    /// How often procfs (or the cgroup, inside a container) is sampled.
    pub sample_interval_ms: u64,
    /// EWMA alpha in (0, 1]: the weight of the newest sample. 1 means no smoothing.
    pub smoothing: f64,
    /// Gossip tags are rewritten at most this often, so a busy cluster's gossip is not spent
    /// on every wobble of a percentage.
    pub publish_interval_ms: u64,
    /// `procfs`, or `file:/path/to/synthetic.json` to read fixed values (deterministic tests).
    pub source: String,
}

impl Default for UtilizationConfig {
    fn default() -> Self {
        UtilizationConfig {
            sample_interval_ms: 2000,
            smoothing: 0.3,
            publish_interval_ms: 5000,
            source: UTILIZATION_PROCFS.into(),
        }
    }
}

/// `utilization.source` for real measurements.
pub const UTILIZATION_PROCFS: &str = "procfs";
/// Prefix of `utilization.source` for a file of synthetic values.
pub const UTILIZATION_FILE_PREFIX: &str = "file:";

/// The autoscaler: one policy per level and the settings of every target a policy may name.
/// All targets' blocks are always present (with defaults) so switching `target` needs no other
/// edit; only the chosen targets' settings are checked for completeness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingConfig {
    /// The scaler runs the autoscaler only when this is true.
    pub enabled: bool,
    /// Worker nodes (machines).
    #[serde(deserialize_with = "node_policy")]
    pub node: PolicyConfig,
    /// Worker containers on each node; `min` and `max` count per node.
    #[serde(deserialize_with = "container_policy")]
    pub container: PolicyConfig,
    pub local: LocalTargetConfig,
    pub nomad: NomadTargetConfig,
    pub command: CommandTargetConfig,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            enabled: false,
            node: PolicyConfig::node_default(),
            container: PolicyConfig::container_default(),
            local: LocalTargetConfig::default(),
            nomad: NomadTargetConfig::default(),
            command: CommandTargetConfig::default(),
        }
    }
}

/// One level's scaling policy (`scaling.node`, `scaling.container`); the scaler's `policy`
/// module turns it into decisions. There is deliberately no `Default`: the two levels have
/// different defaults, and a shared one would silently give a partly written `container`
/// block the node's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// `local`, `nomad` or `command`.
    pub target: String,
    pub evaluation_interval_ms: u64,
    /// Least time from the last action (either direction) to the next scale-up.
    pub cooldown_up_ms: u64,
    /// Least time from the last action (either direction) to the next scale-down. Longer than
    /// the up cooldown by default, so new capacity gets time to take the backlog before its
    /// now lower average CPU can argue for removing it.
    pub cooldown_down_ms: u64,
    pub min: u32,
    pub max: u32,
    /// Percent; smoothed CPU above this (with a backlog) votes to scale up.
    pub cpu_high: f64,
    /// Percent; smoothed CPU below this (with no backlog) votes to scale down.
    pub cpu_low: f64,
    /// Percent; memory above this votes up (with a backlog) and forbids scaling down.
    pub mem_high: f64,
    /// Consecutive evaluations that must agree before an action is taken.
    pub within_bounds_trigger: u32,
    /// Queued tasks per free slot at or above which there is a backlog.
    pub backlog_per_slot: f64,
    /// How long a node or container being removed may finish its running tasks.
    pub drain_deadline_seconds: u64,
    /// Decide and report, but never act.
    pub dry_run: bool,
}

impl PolicyConfig {
    /// `scaling.node` defaults: slow and conservative, since a node is a machine to pay for
    /// and takes minutes to boot.
    pub fn node_default() -> Self {
        PolicyConfig {
            target: "local".into(),
            evaluation_interval_ms: 10_000,
            cooldown_up_ms: 60_000,
            cooldown_down_ms: 300_000,
            min: 1,
            max: 10,
            cpu_high: 80.0,
            cpu_low: 30.0,
            mem_high: 90.0,
            within_bounds_trigger: 3,
            backlog_per_slot: 1.0,
            drain_deadline_seconds: 600,
            dry_run: false,
        }
    }

    /// `scaling.container` defaults: quicker than nodes, as a container starts in seconds on a
    /// machine already paid for.
    pub fn container_default() -> Self {
        PolicyConfig {
            target: "local".into(),
            evaluation_interval_ms: 5_000,
            cooldown_up_ms: 30_000,
            cooldown_down_ms: 120_000,
            min: 1,
            max: 4,
            ..PolicyConfig::node_default()
        }
    }
}

/// Keys written in a policy block override the level's own defaults: serde's `default`
/// attribute would fill them from one `Default` impl shared by both levels.
fn node_policy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PolicyConfig, D::Error> {
    over_defaults(d, PolicyConfig::node_default())
}

fn container_policy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PolicyConfig, D::Error> {
    over_defaults(d, PolicyConfig::container_default())
}

fn over_defaults<'de, D, T>(d: D, defaults: T) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Serialize + serde::de::DeserializeOwned,
{
    use serde::de::Error as _;
    let given = Map::<String, Value>::deserialize(d)?;
    let mut merged = match serde_json::to_value(defaults) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(D::Error::custom("defaults are not a map")),
        Err(e) => return Err(D::Error::custom(e)),
    };
    merged.extend(given);
    serde_json::from_value(Value::Object(merged)).map_err(D::Error::custom)
}

/// The `local` target: worker processes on this machine, grouped into named nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalTargetConfig {
    /// Empty: `transcode-worker` next to the scaler's own binary.
    pub worker_bin: String,
    /// An HCL file passed to each worker with `--config`; empty: none.
    pub worker_config: String,
    /// Workers started with each new node.
    pub containers_per_node: u32,
    /// `--slots` for each worker.
    pub slots: u32,
    pub node_prefix: String,
}

impl Default for LocalTargetConfig {
    fn default() -> Self {
        LocalTargetConfig {
            worker_bin: String::new(),
            worker_config: String::new(),
            containers_per_node: 1,
            slots: 2,
            node_prefix: "local-".into(),
        }
    }
}

/// The `nomad` target: the job scale API for containers, node drain and eligibility for nodes.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NomadTargetConfig {
    pub address: String,
    /// `X-Nomad-Token`; empty: none (`NOMAD_TOKEN` in the environment is the usual way).
    pub token: String,
    pub namespace: String,
    /// Empty: the agent's own region.
    pub region: String,
    pub job: String,
    pub group: String,
    /// Only nodes of this class are worker nodes; empty: all.
    pub node_class: String,
}

impl Default for NomadTargetConfig {
    fn default() -> Self {
        NomadTargetConfig {
            address: "http://127.0.0.1:4646".into(),
            token: String::new(),
            namespace: "default".into(),
            region: String::new(),
            job: "transcode-worker".into(),
            group: "worker".into(),
            node_class: String::new(),
        }
    }
}

// Hand-written so the ACL token never reaches a log line through `{:?}`.
impl fmt::Debug for NomadTargetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.token.is_empty() {
            ""
        } else {
            "<redacted>"
        };
        f.debug_struct("NomadTargetConfig")
            .field("address", &self.address)
            .field("token", &token)
            .field("namespace", &self.namespace)
            .field("region", &self.region)
            .field("job", &self.job)
            .field("group", &self.group)
            .field("node_class", &self.node_class)
            .finish()
    }
}

/// The `command` target: shell commands the operator supplies (Terraform, cloud CLIs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandTargetConfig {
    pub add_node: String,
    pub remove_node: String,
    pub start_container: String,
    pub stop_container: String,
    /// Prints one node name per line, optionally followed by its container count.
    pub list_nodes: String,
    /// A command still running after this long is killed and counts as failed.
    pub timeout_seconds: u64,
}

impl Default for CommandTargetConfig {
    fn default() -> Self {
        CommandTargetConfig {
            add_node: String::new(),
            remove_node: String::new(),
            start_container: String::new(),
            stop_container: String::new(),
            list_nodes: String::new(),
            timeout_seconds: 600,
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `info,transcode_core=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Why a configuration was refused. Every variant names where the bad value came from: a file
/// position, an env var, or a key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid HCL.
    #[error("{origin}:{line}:{column}: syntax error: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file is valid HCL but does not fit the schema (unknown key, wrong type, bad value).
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// An environment override was unknown or held a bad value.
    #[error("{var}: {message}")]
    Env { var: String, message: String },
    /// A value given through [`Config::set`] or found by [`Config::validate`] was bad.
    #[error("{key}: {message}")]
    Value { key: String, message: String },
}

impl ConfigError {
    /// `(line, column)` for errors that come from a file, both one-based.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Syntax { line, column, .. }
            | ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }
}

/// What a key holds. The checks here are the value checks: they run for the file, for env vars,
/// for `set()` and again in `validate()`.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    /// A string where empty (or HCL `null`) means "not set".
    OptStr,
    Bool,
    /// A bool where HCL `null` (or an empty env var) means "derive it".
    OptBool,
    Int {
        min: u64,
        max: u64,
    },
    /// A number that may have a fraction (`1.5`); whole numbers are accepted too.
    Float {
        min: f64,
        max: f64,
    },
    Enum(&'static [&'static str]),
    /// A URL that must start with one of these prefixes.
    Url(&'static [&'static str]),
    /// Like `Url`, but may be left unset.
    OptUrl(&'static [&'static str]),
    /// `host:port`.
    Addr,
    /// `host:port`, or unset.
    OptAddr,
    /// A list of `host:port`; in env vars and flags, comma-separated.
    AddrList,
    /// One of `exact`, or a prefix from `prefixes` followed by something (`file:/x.json`).
    Choice {
        exact: &'static [&'static str],
        prefixes: &'static [&'static str],
    },
}

impl Kind {
    /// The noun used in "expected …" messages.
    fn expected(self) -> &'static str {
        match self {
            Kind::Str
            | Kind::OptStr
            | Kind::Enum(_)
            | Kind::Url(_)
            | Kind::OptUrl(_)
            | Kind::Addr
            | Kind::OptAddr
            | Kind::Choice { .. } => "a string",
            Kind::AddrList => "a list of strings",
            Kind::Bool | Kind::OptBool => "a bool",
            Kind::Int { .. } | Kind::Float { .. } => "a number",
        }
    }
}

struct Key {
    name: &'static str,
    kind: Kind,
}

/// A block of the file. Nested blocks are sections of sections (`objects { s3 { … } }`).
struct BlockSchema {
    name: &'static str,
    keys: &'static [Key],
    blocks: &'static [BlockSchema],
}

const fn key(name: &'static str, kind: Kind) -> Key {
    Key { name, kind }
}

const U32: u64 = u32::MAX as u64;
/// One day, in milliseconds: the most any single retry delay may be.
const DAY_MS: u64 = 86_400_000;
const DAY_S: u64 = 86_400;
const HOUR_MS: u64 = 3_600_000;
/// The most nodes, or containers per node, a policy may ask for.
const MAX_SCALE: u64 = 10_000;
const PERCENT: Kind = Kind::Float {
    min: 0.0,
    max: 100.0,
};
const ZMQ: &[&str] = &["tcp://", "ipc://", "inproc://"];

/// Every block and key the file may hold. To add a setting: add the field (with its default) to
/// the struct, and its key here; the file, env and `set()` pick it up from this table.
static SCHEMA: BlockSchema = BlockSchema {
    name: "",
    keys: &[],
    blocks: &[
        BlockSchema {
            name: "store",
            keys: &[
                key(
                    "url",
                    Kind::Url(&["sqlite://", "postgres://", "postgresql://"]),
                ),
                key("pool_size", Kind::Int { min: 1, max: 1024 }),
            ],
            blocks: &[],
        },
        BlockSchema {
            name: "objects",
            keys: &[],
            blocks: &[BlockSchema {
                name: "s3",
                keys: &[
                    key("endpoint", Kind::OptUrl(&["http://", "https://"])),
                    key("region", Kind::OptStr),
                    key("access_key_id", Kind::OptStr),
                    key("secret_access_key", Kind::OptStr),
                    key("session_token", Kind::OptStr),
                    key("allow_http", Kind::OptBool),
                    key("force_path_style", Kind::Bool),
                    key("timeout_secs", Kind::Int { min: 1, max: U32 }),
                    key("connect_timeout_secs", Kind::Int { min: 1, max: U32 }),
                ],
                blocks: &[],
            }],
        },
        BlockSchema {
            name: "scaler",
            keys: &[
                key("intake", Kind::Url(ZMQ)),
                key("dispatch", Kind::Url(ZMQ)),
                key("events_pub", Kind::Url(ZMQ)),
                key("events_sub", Kind::Url(ZMQ)),
                key("http", Kind::Addr),
            ],
            blocks: &[],
        },
        BlockSchema {
            name: "worker",
            keys: &[
                key("id", Kind::Str),
                key("node", Kind::Str),
                key("slots", Kind::Int { min: 1, max: 1024 }),
                key("scratch_dir", Kind::Str),
                key("lease_seconds", Kind::Int { min: 1, max: U32 }),
                key("drain_timeout_seconds", Kind::Int { min: 0, max: U32 }),
                key("http", Kind::Addr),
            ],
            blocks: &[],
        },
        BlockSchema {
            name: "membership",
            keys: &[
                key("bind", Kind::OptAddr),
                key("advertise", Kind::OptAddr),
                key("join", Kind::AddrList),
                key("encrypt_key", Kind::OptStr),
                key("probe_interval_ms", Kind::Int { min: 10, max: U32 }),
                key("probe_timeout_ms", Kind::Int { min: 5, max: U32 }),
                key("event_row_interval_seconds", Kind::Int { min: 0, max: U32 }),
            ],
            blocks: &[],
        },
        BlockSchema {
            name: "retry",
            keys: &[],
            blocks: &[
                BlockSchema {
                    name: "pull",
                    keys: RETRY_KEYS,
                    blocks: &[],
                },
                BlockSchema {
                    name: "push",
                    keys: RETRY_KEYS,
                    blocks: &[],
                },
            ],
        },
        BlockSchema {
            name: "utilization",
            keys: &[
                key(
                    "sample_interval_ms",
                    Kind::Int {
                        min: 100,
                        max: HOUR_MS,
                    },
                ),
                // An alpha of 0 would never move off the first sample.
                key(
                    "smoothing",
                    Kind::Float {
                        min: 0.001,
                        max: 1.0,
                    },
                ),
                key(
                    "publish_interval_ms",
                    Kind::Int {
                        min: 100,
                        max: HOUR_MS,
                    },
                ),
                key(
                    "source",
                    Kind::Choice {
                        exact: &[UTILIZATION_PROCFS],
                        prefixes: &[UTILIZATION_FILE_PREFIX],
                    },
                ),
            ],
            blocks: &[],
        },
        BlockSchema {
            name: "scaling",
            keys: &[key("enabled", Kind::Bool)],
            blocks: &[
                BlockSchema {
                    name: "node",
                    keys: POLICY_KEYS,
                    blocks: &[],
                },
                BlockSchema {
                    name: "container",
                    keys: POLICY_KEYS,
                    blocks: &[],
                },
                BlockSchema {
                    name: "local",
                    keys: &[
                        key("worker_bin", Kind::Str),
                        key("worker_config", Kind::Str),
                        key("containers_per_node", Kind::Int { min: 1, max: 1024 }),
                        key("slots", Kind::Int { min: 1, max: 1024 }),
                        key("node_prefix", Kind::Str),
                    ],
                    blocks: &[],
                },
                BlockSchema {
                    name: "nomad",
                    keys: &[
                        key("address", Kind::Url(&["http://", "https://"])),
                        key("token", Kind::Str),
                        key("namespace", Kind::Str),
                        key("region", Kind::Str),
                        key("job", Kind::Str),
                        key("group", Kind::Str),
                        key("node_class", Kind::Str),
                    ],
                    blocks: &[],
                },
                BlockSchema {
                    name: "command",
                    keys: &[
                        key("add_node", Kind::Str),
                        key("remove_node", Kind::Str),
                        key("start_container", Kind::Str),
                        key("stop_container", Kind::Str),
                        key("list_nodes", Kind::Str),
                        key("timeout_seconds", Kind::Int { min: 1, max: DAY_S }),
                    ],
                    blocks: &[],
                },
            ],
        },
        BlockSchema {
            name: "log",
            keys: &[
                key("format", Kind::Enum(&["text", "json"])),
                key("level", Kind::Str),
            ],
            blocks: &[],
        },
    ],
};

/// The keys of one retry policy (`retry.pull`, `retry.push`); see `crate::retry`.
static RETRY_KEYS: &[Key] = &[
    key("max_attempts", Kind::Int { min: 1, max: 100 }),
    key(
        "base_delay_ms",
        Kind::Int {
            min: 0,
            max: DAY_MS,
        },
    ),
    key(
        "multiplier",
        Kind::Float {
            min: 1.0,
            max: 10.0,
        },
    ),
    key(
        "max_delay_ms",
        Kind::Int {
            min: 0,
            max: DAY_MS,
        },
    ),
    key("jitter", Kind::Enum(&["equal", "full", "none"])),
];

/// The keys of one scaling policy (`scaling.node`, `scaling.container`). Bounds that relate
/// two keys (`cpu_low < cpu_high`, `min <= max`) are checked by `validate_scaling`.
static POLICY_KEYS: &[Key] = &[
    key("target", Kind::Enum(&["local", "nomad", "command"])),
    key(
        "evaluation_interval_ms",
        Kind::Int {
            min: 100,
            max: DAY_MS,
        },
    ),
    key(
        "cooldown_up_ms",
        Kind::Int {
            min: 0,
            max: DAY_MS,
        },
    ),
    key(
        "cooldown_down_ms",
        Kind::Int {
            min: 0,
            max: DAY_MS,
        },
    ),
    key(
        "min",
        Kind::Int {
            min: 0,
            max: MAX_SCALE,
        },
    ),
    // A level that may never have anything running is a mistake, not a way to switch it off.
    key(
        "max",
        Kind::Int {
            min: 1,
            max: MAX_SCALE,
        },
    ),
    key("cpu_high", PERCENT),
    key("cpu_low", PERCENT),
    key("mem_high", PERCENT),
    key("within_bounds_trigger", Kind::Int { min: 1, max: 1000 }),
    key(
        "backlog_per_slot",
        Kind::Float {
            min: 0.0,
            max: 1000.0,
        },
    ),
    key("drain_deadline_seconds", Kind::Int { min: 0, max: DAY_S }),
    key("dry_run", Kind::Bool),
];

/// One settable key, as the CLI and docs want to list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Dotted path, as `set()` takes it: `worker.slots`.
    pub path: String,
    /// The env override: `TRANSCODE_WORKER_SLOTS`.
    pub env: String,
}

impl Config {
    /// Loads the file at `path` (none: defaults), then applies `TRANSCODE_*` env overrides from
    /// the process environment, then validates. Flags are the caller's: use [`Config::set`] or
    /// mutate the fields, then call [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(path) => {
                let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_hcl_str(&src, &path.display().to_string())?
            }
            None => Config::default(),
        };
        cfg.apply_env(process_env()?.into_iter())?;
        cfg.validate()?;
        tracing::debug!(file = ?path, "configuration loaded");
        Ok(cfg)
    }

    /// Parses and checks an HCL document. `origin` names it in error messages (usually the file
    /// name). Keys the document leaves out keep their defaults.
    pub fn from_hcl_str(src: &str, origin: &str) -> Result<Config, ConfigError> {
        let lines = LineIndex::new(src);
        let body = hcl_edit::parser::parse_body(src).map_err(|e| {
            let loc = e.location();
            ConfigError::Syntax {
                origin: origin.to_string(),
                line: loc.line(),
                column: loc.column(),
                message: e.message().to_string(),
            }
        })?;
        let walker = Walker {
            origin,
            lines: &lines,
        };
        let tree = walker.body(&body, &SCHEMA, "")?;
        let cfg: Config =
            serde_json::from_value(Value::Object(tree)).map_err(|e| ConfigError::Value {
                key: origin.to_string(),
                message: e.to_string(),
            })?;
        Ok(cfg)
    }

    /// Applies `TRANSCODE_<SECTION>_<KEY>` overrides. Variables under a known section that name
    /// no key are an error (a typo would otherwise be silently ignored); variables of the test
    /// harness and those outside any section are left alone.
    pub fn apply_env(
        &mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let keys = env_keys();
        let sections: Vec<String> = SCHEMA
            .blocks
            .iter()
            .map(|b| format!("{ENV_PREFIX}{}_", b.name.to_uppercase()))
            .collect();
        // Sorted so that, with several bad variables, the same one is reported every time.
        let mut relevant: Vec<(String, String)> = vars
            .filter(|(name, _)| name.starts_with(ENV_PREFIX) && !env_ignored(name))
            .collect();
        relevant.sort();
        let mut tree = self.to_tree()?;
        for (name, raw) in relevant {
            if let Some((path, kind)) = keys.get(&name) {
                let value = parse_raw(*kind, &raw).map_err(|m| ConfigError::Env {
                    var: name.clone(),
                    message: format!("{path}: {m}"),
                })?;
                put(&mut tree, path, value);
            } else if let Some(section) = sections.iter().find(|s| name.starts_with(s.as_str())) {
                let known: Vec<&str> = keys
                    .keys()
                    .filter(|k| k.starts_with(section.as_str()))
                    .map(String::as_str)
                    .collect();
                return Err(ConfigError::Env {
                    var: name,
                    message: format!("unknown setting (known: {})", known.join(", ")),
                });
            }
        }
        *self = from_tree(tree)?;
        tracing::trace!("environment overrides applied");
        Ok(())
    }

    /// Sets one key from its text form, as a CLI flag gives it: `set("worker.slots", "4")`.
    /// The value is checked the same way an env var is.
    pub fn set(&mut self, path: &str, raw: &str) -> Result<(), ConfigError> {
        let Some(kind) = lookup(path) else {
            return Err(ConfigError::Value {
                key: path.to_string(),
                message: "unknown setting".into(),
            });
        };
        let value = parse_raw(kind, raw).map_err(|message| ConfigError::Value {
            key: path.to_string(),
            message,
        })?;
        let mut tree = self.to_tree()?;
        put(&mut tree, path, value);
        *self = from_tree(tree)?;
        Ok(())
    }

    /// Checks every value against the schema. `load` calls it; call it again after changing
    /// fields directly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let tree = self.to_tree()?;
        validate_tree(&tree, &SCHEMA, "")?;
        validate_scaling(&self.scaling)
    }

    /// Every settable key with its env var name.
    pub fn keys() -> Vec<KeyInfo> {
        let mut out = Vec::new();
        each_key(&SCHEMA, "", &mut |path, _| {
            out.push(KeyInfo {
                env: env_name(&path),
                path,
            })
        });
        out
    }

    fn to_tree(&self) -> Result<Map<String, Value>, ConfigError> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(internal("config did not serialize to an object")),
            Err(e) => Err(internal(&e.to_string())),
        }
    }
}

fn internal(message: &str) -> ConfigError {
    ConfigError::Value {
        key: "config".into(),
        message: format!("internal error: {message}"),
    }
}

fn from_tree(tree: Map<String, Value>) -> Result<Config, ConfigError> {
    serde_json::from_value(Value::Object(tree)).map_err(|e| internal(&e.to_string()))
}

/// The process environment as UTF-8 pairs. `std::env::vars` would panic on a non-UTF-8 value;
/// a non-UTF-8 value in one of our variables is an error, elsewhere it is none of our business.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(ENV_PREFIX) || env_ignored(name) {
            continue;
        }
        match value.into_string() {
            Ok(v) => out.push((name.to_string(), v)),
            Err(_) => {
                return Err(ConfigError::Env {
                    var: name.to_string(),
                    message: "value is not valid UTF-8".into(),
                })
            }
        }
    }
    Ok(out)
}

fn env_ignored(name: &str) -> bool {
    ENV_IGNORED_NAMES.contains(&name) || ENV_IGNORED_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn env_name(path: &str) -> String {
    format!("{ENV_PREFIX}{}", path.replace('.', "_").to_uppercase())
}

fn each_key(block: &BlockSchema, prefix: &str, f: &mut dyn FnMut(String, Kind)) {
    for k in block.keys {
        f(format!("{prefix}{}", k.name), k.kind);
    }
    for b in block.blocks {
        each_key(b, &format!("{prefix}{}.", b.name), f);
    }
}

/// Env var name → (dotted path, kind).
fn env_keys() -> BTreeMap<String, (String, Kind)> {
    let mut map = BTreeMap::new();
    each_key(&SCHEMA, "", &mut |path, kind| {
        map.insert(env_name(&path), (path, kind));
    });
    map
}

fn lookup(path: &str) -> Option<Kind> {
    let mut found = None;
    each_key(&SCHEMA, "", &mut |p, kind| {
        if p == path {
            found = Some(kind);
        }
    });
    found
}

/// The checks that relate several scaling keys. Bounds that make a policy meaningless run
/// always, so a wrong file is caught before someone turns scaling on; whether the chosen
/// targets are usable matters only once the autoscaler runs.
fn validate_scaling(s: &ScalingConfig) -> Result<(), ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Value {
        key: key.into(),
        message,
    };
    for (key, p) in [
        ("scaling.node", &s.node),
        ("scaling.container", &s.container),
    ] {
        if p.cpu_low >= p.cpu_high {
            return Err(bad(
                key,
                format!(
                    "cpu_low ({}) must be below cpu_high ({})",
                    p.cpu_low, p.cpu_high
                ),
            ));
        }
        if p.min > p.max {
            return Err(bad(
                key,
                format!("min ({}) must not be above max ({})", p.min, p.max),
            ));
        }
    }
    if !s.enabled {
        return Ok(());
    }
    if s.node.target == "nomad" {
        return Err(bad(
            "scaling.node.target",
            "\"nomad\" cannot add nodes: Nomad's API schedules onto machines but cannot create \
             them; use \"command\" (e.g. terraform) for the node level"
                .into(),
        ));
    }
    let c = &s.command;
    let n = &s.nomad;
    let node_needs: &[(&str, &str)] = match s.node.target.as_str() {
        "command" => &[
            ("command.add_node", &c.add_node),
            ("command.remove_node", &c.remove_node),
            ("command.list_nodes", &c.list_nodes),
        ],
        _ => &[],
    };
    let container_needs: &[(&str, &str)] = match s.container.target.as_str() {
        "command" => &[
            ("command.start_container", &c.start_container),
            ("command.stop_container", &c.stop_container),
        ],
        "nomad" => &[("nomad.job", &n.job), ("nomad.group", &n.group)],
        _ => &[],
    };
    for (level, target, needs) in [
        ("node", &s.node.target, node_needs),
        ("container", &s.container.target, container_needs),
    ] {
        let missing: Vec<String> = needs
            .iter()
            .filter(|(_, v)| v.trim().is_empty())
            .map(|(k, _)| format!("scaling.{k}"))
            .collect();
        if !missing.is_empty() {
            return Err(bad(
                &format!("scaling.{level}.target"),
                format!("{target:?} needs {} (empty)", missing.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Writes `value` at a dotted path, creating intermediate objects.
fn put(tree: &mut Map<String, Value>, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = tree;
    for p in parts {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else { return };
        cur = next;
    }
    cur.insert(last.to_string(), value);
}

fn validate_tree(
    tree: &Map<String, Value>,
    block: &BlockSchema,
    prefix: &str,
) -> Result<(), ConfigError> {
    for k in block.keys {
        let path = format!("{prefix}{}", k.name);
        let lit = match tree.get(k.name) {
            None | Some(Value::Null) => Lit::Null,
            Some(Value::String(s)) => Lit::Str(s.clone()),
            Some(Value::Bool(b)) => Lit::Bool(*b),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map_or(Lit::Other("a list of non-strings"), Lit::List),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Lit::Uint(u),
                (None, Some(i), _) => Lit::Neg(i),
                (None, None, Some(f)) => Lit::Float(f),
                _ => Lit::Other("a number out of range"),
            },
            Some(_) => Lit::Other("a structured value"),
        };
        if let Err(message) = check(k.kind, lit) {
            return Err(ConfigError::Value { key: path, message });
        }
    }
    for b in block.blocks {
        let sub = match tree.get(b.name) {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        validate_tree(&sub, b, &format!("{prefix}{}.", b.name))?;
    }
    Ok(())
}

/// A literal as found in the file (or rebuilt from the struct), before it is checked.
#[derive(Debug, Clone)]
enum Lit {
    Null,
    Str(String),
    Bool(bool),
    Uint(u64),
    Neg(i64),
    Float(f64),
    /// A list of strings.
    List(Vec<String>),
    /// Not a literal; the text says what it is instead.
    Other(&'static str),
}

impl Lit {
    fn describe(&self) -> String {
        match self {
            Lit::Null => "null".into(),
            Lit::Str(_) => "a string".into(),
            Lit::Bool(_) => "a bool".into(),
            Lit::Uint(_) | Lit::Neg(_) | Lit::Float(_) => "a number".into(),
            Lit::List(_) => "a list".into(),
            Lit::Other(what) => (*what).into(),
        }
    }
}

/// Checks a literal against a kind and turns it into the JSON value serde will read.
fn check(kind: Kind, lit: Lit) -> Result<Value, String> {
    let wrong = |lit: &Lit| format!("expected {}, found {}", kind.expected(), lit.describe());
    match (kind, lit) {
        (Kind::OptStr | Kind::OptBool | Kind::OptUrl(_) | Kind::OptAddr, Lit::Null) => {
            Ok(Value::Null)
        }
        (Kind::OptAddr, Lit::Str(s)) if s.is_empty() => Ok(Value::Null),
        (Kind::AddrList, Lit::List(items)) => {
            for s in &items {
                if !valid_addr(s) {
                    return Err(format!("expected host:port, found {s:?}"));
                }
            }
            Ok(Value::from(items))
        }
        (Kind::OptStr, Lit::Str(s)) if s.is_empty() => Ok(Value::Null),
        (Kind::OptUrl(_), Lit::Str(s)) if s.is_empty() => Ok(Value::Null),
        (Kind::Str | Kind::OptStr, Lit::Str(s)) => Ok(Value::String(s)),
        (Kind::Bool | Kind::OptBool, Lit::Bool(b)) => Ok(Value::Bool(b)),
        (Kind::Int { min, max }, Lit::Uint(n)) => {
            if n < min {
                Err(format!("must be at least {min}, found {n}"))
            } else if n > max {
                Err(format!("must be at most {max}, found {n}"))
            } else {
                Ok(Value::from(n))
            }
        }
        (Kind::Int { min, .. }, Lit::Neg(n)) => Err(format!("must be at least {min}, found {n}")),
        (Kind::Int { .. }, Lit::Float(f)) => Err(format!("expected a whole number, found {f}")),
        (Kind::Float { min, max }, Lit::Uint(n)) => float_in(n as f64, min, max),
        (Kind::Float { min, max }, Lit::Neg(n)) => float_in(n as f64, min, max),
        (Kind::Float { min, max }, Lit::Float(f)) => float_in(f, min, max),
        (Kind::Enum(allowed), Lit::Str(s)) => {
            if allowed.contains(&s.as_str()) {
                Ok(Value::String(s))
            } else {
                Err(format!(
                    "expected one of {}, found {s:?}",
                    quoted_list(allowed)
                ))
            }
        }
        (Kind::Url(prefixes) | Kind::OptUrl(prefixes), Lit::Str(s)) => {
            if prefixes
                .iter()
                .any(|p| s.starts_with(p) && s.len() > p.len())
            {
                Ok(Value::String(s))
            } else {
                Err(format!(
                    "expected a URL starting with {}, found {s:?}",
                    or_list(prefixes)
                ))
            }
        }
        (Kind::Choice { exact, prefixes }, Lit::Str(s)) => {
            let prefixed = prefixes
                .iter()
                .any(|p| s.starts_with(p) && s.len() > p.len());
            if exact.contains(&s.as_str()) || prefixed {
                Ok(Value::String(s))
            } else {
                let prefixes: Vec<String> = prefixes.iter().map(|p| format!("{p}…")).collect();
                let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
                Err(format!(
                    "expected {} or {}, found {s:?}",
                    quoted_list(exact),
                    quoted_list(&prefixes)
                ))
            }
        }
        (Kind::Addr | Kind::OptAddr, Lit::Str(s)) => {
            if valid_addr(&s) {
                Ok(Value::String(s))
            } else {
                Err(format!("expected host:port, found {s:?}"))
            }
        }
        (_, lit) => Err(wrong(&lit)),
    }
}

fn float_in(f: f64, min: f64, max: f64) -> Result<Value, String> {
    if !f.is_finite() {
        return Err(format!("expected a finite number, found {f}"));
    }
    if f < min {
        return Err(format!("must be at least {min}, found {f}"));
    }
    if f > max {
        return Err(format!("must be at most {max}, found {f}"));
    }
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("expected a finite number, found {f}"))
}

fn valid_addr(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Parses the text form of a value (env var or flag) for a kind.
fn parse_raw(kind: Kind, raw: &str) -> Result<Value, String> {
    let lit = match kind {
        Kind::Int { .. } => {
            let t = raw.trim();
            if let Ok(n) = t.parse::<u64>() {
                Lit::Uint(n)
            } else if let Ok(n) = t.parse::<i64>() {
                Lit::Neg(n)
            } else {
                return Err(format!("expected a number, found {raw:?}"));
            }
        }
        Kind::Float { .. } => match raw.trim().parse::<f64>() {
            Ok(f) => Lit::Float(f),
            Err(_) => return Err(format!("expected a number, found {raw:?}")),
        },
        Kind::Bool | Kind::OptBool => match raw.trim().to_ascii_lowercase().as_str() {
            "" if matches!(kind, Kind::OptBool) => Lit::Null,
            "true" | "1" | "yes" | "on" => Lit::Bool(true),
            "false" | "0" | "no" | "off" => Lit::Bool(false),
            _ => return Err(format!("expected true or false, found {raw:?}")),
        },
        Kind::AddrList => Lit::List(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        _ => Lit::Str(raw.to_string()),
    };
    check(kind, lit)
}

/// Byte offset → one-based line and column (in characters, as editors count them).
struct LineIndex<'a> {
    src: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(src: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { src, starts }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let col = self
            .src
            .get(start..offset.min(self.src.len()))
            .map_or(offset - start, |s| s.chars().count());
        (line, col + 1)
    }
}

struct Walker<'a> {
    origin: &'a str,
    lines: &'a LineIndex<'a>,
}

impl Walker<'_> {
    fn err(&self, span: Option<std::ops::Range<usize>>, message: String) -> ConfigError {
        let (line, column) = self.lines.position(span.map_or(0, |r| r.start));
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line,
            column,
            message,
        }
    }

    fn at(&self, offset: usize) -> String {
        let (l, c) = self.lines.position(offset);
        format!("{l}:{c}")
    }

    fn body(
        &self,
        body: &Body,
        schema: &BlockSchema,
        prefix: &str,
    ) -> Result<Map<String, Value>, ConfigError> {
        let mut out = Map::new();
        // Name → byte offset of its first occurrence, for "first set at" notes.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let place = if schema.name.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in block {}", prefix.trim_end_matches('.'))
        };
        for structure in body.iter() {
            let (name, span) = match structure {
                Structure::Attribute(a) => (a.key.as_str(), a.key.span()),
                Structure::Block(b) => (b.ident.as_str(), b.ident.span()),
            };
            let offset = span.as_ref().map_or(0, |r| r.start);
            if let Some(first) = seen.get(name) {
                return Err(self.err(
                    span,
                    format!(
                        "duplicate {} {name:?} {place} (first set at {})",
                        if structure.is_block() { "block" } else { "key" },
                        self.at(*first)
                    ),
                ));
            }
            seen.insert(name.to_string(), offset);
            let path = format!("{prefix}{name}");
            let key = schema.keys.iter().find(|k| k.name == name);
            let sub = schema.blocks.iter().find(|b| b.name == name);
            match (structure, key, sub) {
                (Structure::Attribute(a), Some(k), _) => {
                    let lit = literal(&a.value);
                    let value = check(k.kind, lit)
                        .map_err(|m| self.err(a.value.span(), format!("{path}: {m}")))?;
                    out.insert(name.to_string(), value);
                }
                (Structure::Block(b), None, Some(s)) => {
                    if let Some(label) = b.labels.first() {
                        return Err(self.err(label.span(), format!("block {path} takes no labels")));
                    }
                    let inner = self.body(&b.body, s, &format!("{path}."))?;
                    out.insert(name.to_string(), Value::Object(inner));
                }
                (Structure::Attribute(_), None, Some(_)) => {
                    return Err(self.err(
                        span,
                        format!("{path} is a block: write {name} {{ … }}, not {name} = …"),
                    ));
                }
                (Structure::Block(_), Some(k), _) => {
                    return Err(self.err(
                        span,
                        format!("{path}: expected {}, found a block", k.kind.expected()),
                    ));
                }
                (_, None, None) => {
                    let kind = if structure.is_block() { "block" } else { "key" };
                    return Err(self.err(
                        span,
                        format!(
                            "unknown {kind} {name:?} {place} (expected one of: {})",
                            expected_names(schema)
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }
}

fn expected_names(schema: &BlockSchema) -> String {
    schema
        .keys
        .iter()
        .map(|k| k.name)
        .chain(schema.blocks.iter().map(|b| b.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reduces an expression to a literal. Config values are data, so anything that would need
/// evaluating (variables, functions, interpolation) is refused rather than half-supported.
fn literal(expr: &Expression) -> Lit {
    match expr {
        Expression::Null(_) => Lit::Null,
        Expression::Bool(b) => Lit::Bool(*b.value()),
        Expression::Number(n) => {
            let n = n.value();
            if let Some(u) = n.as_u64() {
                Lit::Uint(u)
            } else if let Some(i) = n.as_i64() {
                Lit::Neg(i)
            } else {
                Lit::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Expression::String(s) => Lit::Str(s.value().clone()),
        Expression::Parenthesis(p) => literal(p.inner()),
        Expression::UnaryOp(op) if *op.operator.value() == UnaryOperator::Neg => {
            match literal(&op.expr) {
                Lit::Uint(u) => Lit::Neg(i64::try_from(u).map_or(i64::MIN, |i| -i)),
                Lit::Float(f) => Lit::Float(-f),
                _ => Lit::Other("an expression"),
            }
        }
        Expression::Array(items) => items
            .iter()
            .map(|e| match literal(e) {
                Lit::Str(s) => Some(s),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map_or(Lit::Other("a list of non-strings"), Lit::List),
        Expression::Object(_) => Lit::Other("an object"),
        Expression::StringTemplate(_) | Expression::HeredocTemplate(_) => {
            Lit::Other("a template (interpolation is not supported)")
        }
        _ => Lit::Other("an expression"),
    }
}

impl fmt::Display for KeyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path, self.env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
store {
  url = "postgres://u:p@127.0.0.1:5432/t"
  pool_size = 4
}
objects {
  s3 {
    endpoint = "http://127.0.0.1:8333"
    region = "eu-west-1"
    access_key_id = "k"
    secret_access_key = "s"
    allow_http = true
    force_path_style = false
    timeout_secs = 10
    connect_timeout_secs = 2
  }
}
scaler { http = "0.0.0.0:9000" }
worker {
  id = "w1"
  slots = 3
}
membership {
  bind = "0.0.0.0:7946"
  join = ["10.0.0.1:7946", "10.0.0.2:7946"]
  encrypt_key = "k"
  probe_interval_ms = 500
}
utilization { smoothing = 0.5 }
scaling {
  container {
    max = 8
    cpu_low = 10.5
  }
}
log { format = "json" }
"#;

    /// The walker and hcl-rs's serde support must read the same document the same way, so
    /// the serde derives stay usable by anyone who deserializes with hcl-rs directly.
    #[test]
    fn walker_agrees_with_hcl_rs() {
        let ours = Config::from_hcl_str(FULL, "t.hcl").expect("valid");
        let theirs: Config = hcl::from_str(FULL).expect("hcl-rs reads it");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn every_schema_key_round_trips_through_set() {
        for info in Config::keys() {
            let kind = lookup(&info.path).expect("listed key");
            // Values chosen to differ from the defaults, so a key that set() silently drops
            // shows up as "changed nothing". Where a key has two candidates, the first may equal
            // the default (bools) or break a cross-key rule (cpu_high at its minimum is below
            // cpu_low), so the first that changes something and still validates is used.
            let candidates: Vec<String> = match kind {
                Kind::Str | Kind::OptStr => vec!["x".into()],
                Kind::Bool | Kind::OptBool => vec!["false".into(), "true".into()],
                Kind::Int { min, max } => vec![min.to_string(), max.to_string()],
                Kind::Float { min, max } => vec![min.to_string(), max.to_string()],
                Kind::Enum(v) => vec![v[v.len() - 1].to_string()],
                Kind::Url(p) | Kind::OptUrl(p) => vec![format!("{}x", p[p.len() - 1])],
                Kind::Addr | Kind::OptAddr | Kind::AddrList => vec!["127.0.0.1:1".into()],
                Kind::Choice { prefixes, .. } => vec![format!("{}x", prefixes[0])],
            };
            let works = candidates.iter().any(|raw| {
                let mut cfg = Config::default();
                cfg.set(&info.path, raw)
                    .unwrap_or_else(|e| panic!("{}: {e}", info.path));
                cfg != Config::default() && cfg.validate().is_ok()
            });
            assert!(works, "{}: no candidate changed it validly", info.path);
        }
    }

    #[test]
    fn membership_join_list_in_file_env_and_flags() {
        let cfg = Config::from_hcl_str(FULL, "t.hcl").expect("valid");
        assert_eq!(cfg.membership.join, ["10.0.0.1:7946", "10.0.0.2:7946"]);
        assert_eq!(cfg.membership.probe_timeout_ms, 500);
        let mut cfg = Config::default();
        cfg.apply_env(
            [(
                "TRANSCODE_MEMBERSHIP_JOIN".to_string(),
                "127.0.0.1:1, 127.0.0.1:2".to_string(),
            )]
            .into_iter(),
        )
        .expect("env list");
        assert_eq!(cfg.membership.join, ["127.0.0.1:1", "127.0.0.1:2"]);
        let err = cfg
            .set("membership.join", "127.0.0.1:1,nope")
            .expect_err("bad address");
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let err = Config::from_hcl_str("membership {\n  join = [1]\n}\n", "m.hcl")
            .expect_err("not strings");
        assert_eq!(err.position(), Some((2, 10)), "{err}");
    }

    #[test]
    fn positions_count_characters() {
        let idx = LineIndex::new("ab\nçd\n");
        assert_eq!(idx.position(0), (1, 1));
        assert_eq!(idx.position(3), (2, 1));
        assert_eq!(idx.position(5), (2, 2));
    }
}
