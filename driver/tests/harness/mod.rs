//! A stand-in for the Nomad client: launches the real plugin binary the way go-plugin does
//! (cookie and protocol env, handshake line on stdout, gRPC over the announced unix socket),
//! encodes configuration the way go-cty does, and provides the test programs the driver runs
//! in place of `transcode-worker` (the driver is pointed at them through `worker_binary`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use nomad_driver_transcode::proto::base::base_plugin_client::BasePluginClient;
use nomad_driver_transcode::proto::drivers::driver_client::DriverClient;
use nomad_driver_transcode::proto::drivers::fingerprint_response::HealthState;
use nomad_driver_transcode::proto::grpc::health::v1::health_client::HealthClient;
use nomad_driver_transcode::proto::plugin::grpc_controller_client::GrpcControllerClient;
use nomad_driver_transcode::proto::structs::attribute;
use nomad_driver_transcode::proto::{base as bpb, drivers as pb};
use tonic::transport::{Channel, Endpoint, Uri};

pub const COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
pub const COOKIE: &str = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";

/// A cty value, enough of the type system for the driver's schemas.
#[derive(Clone, Debug)]
pub enum Cty {
    Null,
    Str(String),
    Num(i64),
    List(Vec<Cty>),
}

pub fn s(v: &str) -> Cty {
    Cty::Str(v.to_owned())
}

fn write_cty(out: &mut Vec<u8>, v: &Cty) {
    match v {
        Cty::Null => rmp::encode::write_nil(out).expect("nil"),
        Cty::Str(x) => rmp::encode::write_str(out, x).expect("str"),
        // go-cty uses compact encoding: the smallest integer format that holds the value.
        Cty::Num(n) if *n >= 0 => {
            rmp::encode::write_uint(out, *n as u64).expect("uint");
        }
        Cty::Num(n) => {
            rmp::encode::write_sint(out, *n).expect("sint");
        }
        Cty::List(items) => {
            rmp::encode::write_array_len(out, items.len() as u32).expect("array");
            for i in items {
                write_cty(out, i);
            }
        }
    }
}

/// Encodes an object exactly as go-cty's msgpack.Marshal does for an object type: a map with
/// every schema attribute, in sorted order, nil where absent.
pub fn cty_object(schema_keys: &[&str], set: &[(&str, Cty)]) -> Vec<u8> {
    let mut keys: Vec<&str> = schema_keys.to_vec();
    keys.sort_unstable();
    for (k, _) in set {
        assert!(keys.contains(k), "{k} is not in the schema");
    }
    let mut out = Vec::new();
    rmp::encode::write_map_len(&mut out, keys.len() as u32).expect("map");
    for k in keys {
        rmp::encode::write_str(&mut out, k).expect("key");
        let v = set
            .iter()
            .find(|(sk, _)| *sk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or(Cty::Null);
        write_cty(&mut out, &v);
    }
    out
}

pub const PLUGIN_KEYS: &[&str] = &[
    "worker_binary",
    "default_config_file",
    "cgroup_parent",
    "stats_interval",
    "state_dir",
];
pub const TASK_KEYS: &[&str] = &[
    "scaler_address",
    "events_address",
    "store_url",
    "s3_endpoint",
    "s3_region",
    "config_file",
    "slots",
    "node_label",
    "args",
    "drain_timeout",
];

/// The test stand-in for transcode-worker. Its behaviour comes from the task env
/// (FAKE_MODE), so one binary serves every scenario and the driver treats it like any worker.
pub const FAKE_WORKER: &str = r#"#!/bin/sh
out="${FAKE_OUT:?FAKE_OUT is required}"
mode="${FAKE_MODE:-drain}"
printf '%s\n' "$@" > "$out/argv"
env > "$out/env"
id -u > "$out/uid"
echo "worker started mode=$mode"
echo "worker stderr line" >&2
case "$mode" in
  cpu) while :; do :; done ;;
  mem) exec tail /dev/zero ;;
  exit-on-file) while [ ! -e "$out/go" ]; do sleep 0.1; done; exit 7 ;;
  stubborn) trap 'touch "$out/term-ignored"' TERM; touch "$out/ready"; while :; do sleep 0.1; done ;;
esac
trap 'echo usr1 > "$out/usr1"' USR1
trap 'echo draining; touch "$out/drained"; sleep 0.3; exit 0' TERM
touch "$out/ready"
while :; do sleep 0.1; done
"#;

pub fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Polls `cond` until it holds; panics with `what` after `limit`. A bound on waiting, not an
/// assertion about speed.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn wait_until_async(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running plugin process and gRPC clients on its socket.
pub struct Plugin {
    pub child: Child,
    pub socket: PathBuf,
    pub channel: Channel,
    pub stderr_log: PathBuf,
}

impl Plugin {
    /// Launches the plugin the way go-plugin's client does and connects to it.
    pub async fn launch(tmp: &Path) -> Plugin {
        let stderr_log = tmp.join(format!("plugin-stderr-{}.log", rand_suffix()));
        let stderr = std::fs::File::create(&stderr_log).expect("stderr log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nomad-driver-transcode"))
            .env(COOKIE_KEY, COOKIE)
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .env("PLUGIN_PROTOCOL_VERSIONS", "2")
            .env("TMPDIR", tmp)
            .env("NOMAD_DRIVER_TRANSCODE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn plugin");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("handshake line");
        // Keep draining stdout as go-plugin does, so the plugin never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let parts: Vec<&str> = line.trim_end().split('|').collect();
        assert_eq!(parts.len(), 6, "handshake line {line:?}");
        assert_eq!(parts[0], "1", "core protocol version");
        assert_eq!(parts[1], "2", "Nomad app protocol version");
        assert_eq!(parts[2], "unix", "network");
        assert_eq!(parts[4], "grpc", "protocol");
        assert_eq!(parts[5], "", "no server certificate");
        let socket = PathBuf::from(parts[3]);
        assert!(socket.starts_with(tmp), "socket {socket:?} is in TMPDIR");
        let channel = connect(&socket).await;
        Plugin {
            child,
            socket,
            channel,
            stderr_log,
        }
    }

    pub fn base(&self) -> BasePluginClient<Channel> {
        BasePluginClient::new(self.channel.clone())
    }
    pub fn driver(&self) -> DriverClient<Channel> {
        DriverClient::new(self.channel.clone())
    }
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }
    pub fn controller(&self) -> GrpcControllerClient<Channel> {
        GrpcControllerClient::new(self.channel.clone())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// What go-plugin's client does after launch 3: PluginInfo, ConfigSchema, SetConfig.
    pub async fn configure(&self, config: &[u8]) {
        let info = self
            .base()
            .plugin_info(bpb::PluginInfoRequest {})
            .await
            .expect("PluginInfo")
            .into_inner();
        assert_eq!(info.name, "transcode");
        self.base()
            .set_config(bpb::SetConfigRequest {
                msgpack_config: config.to_vec(),
                nomad_config: Some(bpb::NomadConfig {
                    driver: Some(bpb::NomadDriverConfig {
                        client_max_port: 14000,
                        client_min_port: 14000,
                    }),
                }),
                plugin_api_version: "v0.1.0".into(),
            })
            .await
            .expect("SetConfig");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}-{n}", std::process::id())
}

async fn connect(socket: &Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::try_from("http://[::]:0")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect to plugin socket")
}

/// Plugin config for a test: worker binary, a private cgroup parent and state dir.
pub fn plugin_config(worker: &Path, cgroup_parent: &str, state_dir: &Path) -> Vec<u8> {
    cty_object(
        PLUGIN_KEYS,
        &[
            ("worker_binary", s(worker.to_str().expect("utf8"))),
            ("cgroup_parent", s(cgroup_parent)),
            ("stats_interval", s("1s")),
            ("state_dir", s(state_dir.to_str().expect("utf8"))),
        ],
    )
}

/// A task config block with the worker settings every scenario uses.
pub fn task_block(extra_args: &[&str]) -> Vec<u8> {
    cty_object(
        TASK_KEYS,
        &[
            ("scaler_address", s("tcp://127.0.0.1:5571")),
            ("events_address", s("tcp://127.0.0.1:5573")),
            ("store_url", s("sqlite:///tmp/transcode.db")),
            ("s3_endpoint", s("http://127.0.0.1:8333")),
            ("s3_region", s("eu-west-1")),
            ("slots", Cty::Num(2)),
            ("node_label", s("node-a")),
            ("args", Cty::List(extra_args.iter().map(|a| s(a)).collect())),
            ("drain_timeout", s("10s")),
        ],
    )
}

pub struct TaskOpts<'a> {
    pub id: &'a str,
    pub mode: &'a str,
    pub out: &'a Path,
    pub memory_mb: i64,
    pub cpu_quota: Option<(i64, i64)>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

pub fn task_config(o: &TaskOpts<'_>) -> pb::TaskConfig {
    let mut env = std::collections::HashMap::new();
    env.insert("FAKE_MODE".to_owned(), o.mode.to_owned());
    env.insert("FAKE_OUT".to_owned(), o.out.display().to_string());
    env.insert("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned());
    // The typed config must win over a same-named task env variable.
    env.insert("TRANSCODE_WORKER_SLOTS".to_owned(), "99".to_owned());
    let (cpu_period, cpu_quota) = o.cpu_quota.map(|(q, p)| (p, q)).unwrap_or((0, 0));
    pb::TaskConfig {
        id: o.id.to_owned(),
        name: "worker".into(),
        msgpack_driver_config: task_block(&["--http", "127.0.0.1:0"]),
        env,
        resources: Some(pb::Resources {
            allocated_resources: Some(pb::AllocatedTaskResources {
                cpu: Some(pb::AllocatedCpuResources { cpu_shares: 500 }),
                memory: Some(pb::AllocatedMemoryResources {
                    memory_mb: o.memory_mb,
                    memory_max_mb: 0,
                }),
                networks: vec![],
            }),
            linux_resources: Some(pb::LinuxResources {
                cpu_period,
                cpu_quota,
                cpu_shares: 500,
                memory_limit_bytes: o.memory_mb * 1024 * 1024,
                ..Default::default()
            }),
            ports: vec![],
        }),
        alloc_dir: String::new(),
        stdout_path: o.stdout_path.display().to_string(),
        stderr_path: o.stderr_path.display().to_string(),
        task_group_name: "workers".into(),
        job_name: "transcode".into(),
        alloc_id: "alloc-1".into(),
        node_name: "client-1".into(),
        ..Default::default()
    }
}

pub fn attr_str(fp: &pb::FingerprintResponse, key: &str) -> Option<String> {
    match fp.attributes.get(key)?.value.as_ref()? {
        attribute::Value::StringVal(s) => Some(s.clone()),
        _ => None,
    }
}

/// The first fingerprint, which must be HEALTHY with a cgroup hierarchy. A host where cgroups
/// are not writable fails here with the driver's reason, on purpose.
pub async fn healthy_fingerprint(p: &Plugin) -> pb::FingerprintResponse {
    let mut fps = p
        .driver()
        .fingerprint(pb::FingerprintRequest {})
        .await
        .expect("Fingerprint")
        .into_inner();
    let fp = fps
        .next()
        .await
        .expect("a first fingerprint")
        .expect("fingerprint ok");
    let cgroup = attr_str(&fp, "driver.transcode.cgroup").unwrap_or_default();
    assert!(
        cgroup == "v1" || cgroup == "v2",
        "CGROUPS NOT WRITABLE: the driver found no writable cgroup v2 or v1 hierarchy \
         (these tests need root and cgroups): {}",
        fp.health_description
    );
    assert_eq!(
        fp.health,
        HealthState::Healthy as i32,
        "driver unhealthy: {}",
        fp.health_description
    );
    fp
}

/// Removes a test's cgroup parent from every hierarchy (best effort, after the test).
pub fn remove_cgroup_parent(parent: &str) {
    for root in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu,cpuacct",
    ] {
        let dir = Path::new(root).join(parent);
        // A failed test may leave task cgroups behind: kill what is in them, then remove.
        if let Ok(children) = std::fs::read_dir(&dir) {
            for c in children.flatten().filter(|c| c.path().is_dir()) {
                let procs =
                    std::fs::read_to_string(c.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                for _ in 0..50 {
                    if std::fs::remove_dir(c.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}
