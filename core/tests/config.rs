//! Config loading as binaries use it: file, then env, then flags; and the error messages an
//! operator sees, down to the line and column.

use std::path::{Path, PathBuf};

use transcode_core::config::{Config, ConfigError, LogFormat, PolicyConfig, ScalingConfig};
use transcode_core::retry::Jitter;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).expect("fixture exists")
}

fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<Vec<_>>()
        .into_iter()
}

fn file_error(src: &str) -> ConfigError {
    Config::from_hcl_str(src, "transcode.hcl").expect_err("should be refused")
}

#[test]
fn defaults_without_a_file_run_embedded() {
    let cfg = Config::from_hcl_str("", "empty.hcl").expect("empty file is fine");
    assert_eq!(cfg, Config::default());
    assert_eq!(cfg.store.url, "sqlite://.transcode/transcode.db");
    assert_eq!(cfg.store.pool_size, 8);
    assert_eq!(cfg.scaler.intake, "tcp://127.0.0.1:5570");
    assert_eq!(cfg.scaler.dispatch, "tcp://127.0.0.1:5571");
    assert_eq!(cfg.scaler.events_pub, "tcp://127.0.0.1:5572");
    assert_eq!(cfg.scaler.events_sub, "tcp://127.0.0.1:5573");
    assert_eq!(cfg.scaler.http, "127.0.0.1:8570");
    assert_eq!(cfg.worker.slots, 2);
    assert_eq!(cfg.worker.lease_seconds, 30);
    assert_eq!(cfg.worker.drain_timeout_seconds, 60);
    assert_eq!(cfg.worker.http, "127.0.0.1:0");
    assert_eq!(cfg.log.format, LogFormat::Text);
    assert_eq!(cfg.log.level, "info");
    assert!(cfg.objects.s3.force_path_style);
    assert_eq!(cfg.objects.s3.endpoint, None);
    cfg.validate().expect("defaults are valid");

    // load(None) reads the real environment, which may carry overrides; it must still work.
    Config::load(None).expect("no file at all is the embedded mode");
}

#[test]
fn a_full_file_sets_every_key() {
    let cfg = Config::load(Some(&fixture("full.hcl"))).expect("full file loads");
    // The process env may hold overrides; compare against the file alone for exact values.
    let cfg_file = Config::from_hcl_str(&read_fixture("full.hcl"), "full.hcl").expect("parses");
    assert_eq!(cfg.worker.node, cfg_file.worker.node);
    let c = cfg_file;
    assert_eq!(
        c.store.url,
        "postgres://transcode:secret@127.0.0.1:5432/transcode"
    );
    assert_eq!(c.store.pool_size, 16);
    let s3 = &c.objects.s3;
    assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
    assert_eq!(s3.region.as_deref(), Some("eu-west-1"));
    assert_eq!(s3.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
    assert_eq!(s3.secret_access_key.as_deref(), Some("wJalrXUtnFEMI"));
    assert_eq!(s3.session_token.as_deref(), Some("token"));
    assert_eq!(s3.allow_http, Some(true));
    assert!(!s3.force_path_style);
    assert_eq!(s3.timeout_secs, 120);
    assert_eq!(s3.connect_timeout_secs, 3);
    assert_eq!(c.scaler.intake, "tcp://0.0.0.0:6570");
    assert_eq!(c.scaler.dispatch, "tcp://0.0.0.0:6571");
    assert_eq!(c.scaler.events_pub, "tcp://0.0.0.0:6572");
    assert_eq!(c.scaler.events_sub, "tcp://0.0.0.0:6573");
    assert_eq!(c.scaler.http, "0.0.0.0:9570");
    assert_eq!(c.worker.id, "worker-a");
    assert_eq!(c.worker.node, "node-1");
    assert_eq!(c.worker.slots, 4);
    assert_eq!(c.worker.scratch_dir, "/var/tmp/transcode");
    assert_eq!(c.worker.lease_seconds, 45);
    assert_eq!(c.worker.drain_timeout_seconds, 0);
    assert_eq!(c.worker.http, "127.0.0.1:9571");
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "debug,transcode_core=trace");
    // Secrets stay out of Debug output, which ends up in logs.
    assert!(!format!("{c:?}").contains("wJalrXUtnFEMI"));
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let mut cfg = Config::from_hcl_str(&read_fixture("full.hcl"), "full.hcl").expect("parses");
    cfg.apply_env(env(&[
        ("TRANSCODE_WORKER_SLOTS", "6"),
        ("TRANSCODE_STORE_URL", "sqlite:///tmp/x.db"),
        ("TRANSCODE_OBJECTS_S3_ENDPOINT", "http://127.0.0.1:9000"),
        ("TRANSCODE_OBJECTS_S3_ALLOW_HTTP", "false"),
        ("TRANSCODE_LOG_FORMAT", "text"),
        // Not config: the test harness's and other tools' variables pass untouched.
        ("TRANSCODE_TEST_S3_ENDPOINT", "http://elsewhere"),
        ("TRANSCODE_REQUIRE_SERVICES", "1"),
        ("TRANSCODE_CONFIG", "/etc/transcode.hcl"),
        ("PATH", "/usr/bin"),
    ]))
    .expect("overrides apply");
    assert_eq!(cfg.worker.slots, 6);
    assert_eq!(cfg.store.url, "sqlite:///tmp/x.db");
    assert_eq!(
        cfg.objects.s3.endpoint.as_deref(),
        Some("http://127.0.0.1:9000")
    );
    assert_eq!(cfg.objects.s3.allow_http, Some(false));
    assert_eq!(cfg.log.format, LogFormat::Text);
    // Keys the env did not name keep the file's values.
    assert_eq!(cfg.worker.node, "node-1");
    assert_eq!(cfg.store.pool_size, 16);

    // Flags come last.
    cfg.set("worker.slots", "9").expect("flag applies");
    cfg.set("objects.s3.region", "ap-south-1")
        .expect("flag applies");
    assert_eq!(cfg.worker.slots, 9);
    assert_eq!(cfg.objects.s3.region.as_deref(), Some("ap-south-1"));
    // An empty value clears an optional setting.
    cfg.set("objects.s3.endpoint", "").expect("flag applies");
    assert_eq!(cfg.objects.s3.endpoint, None);
    cfg.validate().expect("still valid");

    let err = cfg.set("worker.slot", "1").expect_err("unknown flag key");
    assert_eq!(err.to_string(), "worker.slot: unknown setting");
    let err = cfg.set("worker.slots", "0").expect_err("out of range");
    assert_eq!(err.to_string(), "worker.slots: must be at least 1, found 0");

    // Fields changed directly are caught by validate().
    cfg.store.url = "mysql://x".into();
    let err = cfg.validate().expect_err("bad scheme");
    assert!(
        err.to_string()
            .starts_with("store.url: expected a URL starting with sqlite://"),
        "{err}"
    );
}

#[test]
fn bad_env_values_name_the_variable() {
    let mut cfg = Config::default();
    let err = cfg
        .apply_env(env(&[("TRANSCODE_WORKER_SLOTS", "two")]))
        .expect_err("not a number");
    assert!(
        matches!(&err, ConfigError::Env { var, .. } if var == "TRANSCODE_WORKER_SLOTS"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "TRANSCODE_WORKER_SLOTS: worker.slots: expected a number, found \"two\""
    );

    let err = cfg
        .apply_env(env(&[("TRANSCODE_LOG_FORMAT", "xml")]))
        .expect_err("not a format");
    assert_eq!(
        err.to_string(),
        "TRANSCODE_LOG_FORMAT: log.format: expected one of \"text\", \"json\", found \"xml\""
    );

    let err = cfg
        .apply_env(env(&[("TRANSCODE_OBJECTS_S3_ALLOW_HTTP", "maybe")]))
        .expect_err("not a bool");
    assert!(
        err.to_string()
            .starts_with("TRANSCODE_OBJECTS_S3_ALLOW_HTTP: "),
        "{err}"
    );

    // A typo in a variable under a known section is an error, not silently ignored.
    let err = cfg
        .apply_env(env(&[("TRANSCODE_WORKER_SLOT", "2")]))
        .expect_err("unknown var");
    assert!(
        err.to_string()
            .starts_with("TRANSCODE_WORKER_SLOT: unknown setting (known: "),
        "{err}"
    );
    assert!(err.to_string().contains("TRANSCODE_WORKER_SLOTS"), "{err}");

    // A failed apply leaves the config as it was.
    assert_eq!(cfg, Config::default());
}

#[test]
fn unknown_key_is_reported_with_its_position() {
    let err = file_error(&read_fixture("unknown_key.hcl"));
    assert_eq!(err.position(), Some((3, 5)));
    assert_eq!(
        err.to_string(),
        "transcode.hcl:3:5: unknown key \"slot\" in block worker (expected one of: id, node, \
         slots, scratch_dir, lease_seconds, drain_timeout_seconds, http)"
    );
}

#[test]
fn wrong_type_is_reported_at_the_value() {
    let err = file_error(&read_fixture("wrong_type.hcl"));
    assert_eq!(err.position(), Some((2, 15)));
    assert_eq!(
        err.to_string(),
        "transcode.hcl:2:15: store.pool_size: expected a number, found a string"
    );
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let err = file_error(&read_fixture("syntax_error.hcl"));
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert_eq!(err.position(), Some((3, 14)));
    assert!(
        err.to_string()
            .starts_with("transcode.hcl:3:14: syntax error: "),
        "{err}"
    );
}

#[test]
fn load_names_the_file_it_read() {
    let path = fixture("unknown_key.hcl");
    let err = Config::load(Some(&path)).expect_err("refused");
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3:5: unknown key", path.display())),
        "{err}"
    );

    let missing = fixture("no_such_file.hcl");
    let err = Config::load(Some(&missing)).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
}

#[test]
fn other_schema_mistakes_have_positions() {
    let cases: &[(&str, &str)] = &[
        (
            "worker {\n  slots = 0\n}\n",
            "transcode.hcl:2:11: worker.slots: must be at least 1, found 0",
        ),
        (
            "worker {\n  slots = -1\n}\n",
            "transcode.hcl:2:11: worker.slots: must be at least 1, found -1",
        ),
        (
            "worker {\n  slots = 1.5\n}\n",
            "transcode.hcl:2:11: worker.slots: expected a whole number, found 1.5",
        ),
        (
            "store {\n  pool_size = 0\n}\n",
            "transcode.hcl:2:15: store.pool_size: must be at least 1, found 0",
        ),
        (
            "log {\n  format = \"xml\"\n}\n",
            "transcode.hcl:2:12: log.format: expected one of \"text\", \"json\", found \"xml\"",
        ),
        (
            "store {\n  url = \"mysql://h/db\"\n}\n",
            "transcode.hcl:2:9: store.url: expected a URL starting with sqlite://, postgres:// \
             or postgresql://, found \"mysql://h/db\"",
        ),
        (
            "cluster {\n}\n",
            "transcode.hcl:1:1: unknown block \"cluster\" at the top level (expected one \
             of: store, objects, scaler, worker, membership, retry, utilization, scaling, log)",
        ),
        (
            "objects {\n  s3 {\n    endpont = \"http://x\"\n  }\n}\n",
            "transcode.hcl:3:5: unknown key \"endpont\" in block objects.s3 (expected one of: \
             endpoint, region, access_key_id, secret_access_key, session_token, allow_http, \
             force_path_style, timeout_secs, connect_timeout_secs)",
        ),
        (
            "worker {\n  slots = 2\n  slots = 3\n}\n",
            // The HCL parser itself refuses a repeated attribute.
            "transcode.hcl:3:3: syntax error: invalid attribute; expected unique attribute key; \
             found redefined attribute",
        ),
        (
            "worker {\n}\nworker {\n}\n",
            "transcode.hcl:3:1: duplicate block \"worker\" at the top level (first set at 1:1)",
        ),
        (
            "worker \"a\" {\n}\n",
            "transcode.hcl:1:8: block worker takes no labels",
        ),
        (
            "store = \"sqlite://x\"\n",
            "transcode.hcl:1:1: store is a block: write store { … }, not store = …",
        ),
        (
            "worker {\n  slots {\n  }\n}\n",
            "transcode.hcl:2:3: worker.slots: expected a number, found a block",
        ),
        (
            "worker {\n  node = \"${var.x}\"\n}\n",
            "transcode.hcl:2:10: worker.node: expected a string, found a template \
             (interpolation is not supported)",
        ),
        (
            "worker {\n  slots = var.n\n}\n",
            "transcode.hcl:2:11: worker.slots: expected a number, found an expression",
        ),
        (
            "objects {\n  s3 {\n    allow_http = \"yes\"\n  }\n}\n",
            "transcode.hcl:3:18: objects.s3.allow_http: expected a bool, found a string",
        ),
    ];
    for (src, want) in cases {
        let err = file_error(src);
        assert_eq!(&err.to_string(), want, "for input {src:?}");
    }
}

#[test]
fn every_key_has_an_env_name() {
    let keys = Config::keys();
    let find = |p: &str| keys.iter().find(|k| k.path == p).map(|k| k.env.clone());
    assert_eq!(find("store.url").as_deref(), Some("TRANSCODE_STORE_URL"));
    assert_eq!(
        find("objects.s3.endpoint").as_deref(),
        Some("TRANSCODE_OBJECTS_S3_ENDPOINT")
    );
    assert_eq!(
        find("worker.drain_timeout_seconds").as_deref(),
        Some("TRANSCODE_WORKER_DRAIN_TIMEOUT_SECONDS")
    );
    // store, objects.s3, scaler, worker, membership, retry.pull + retry.push, utilization,
    // scaling (enabled, node + container, local, nomad, command), log.
    assert_eq!(
        keys.len(),
        2 + 9 + 5 + 7 + 7 + 2 * 5 + 4 + (1 + 2 * 13 + 5 + 7 + 6) + 2
    );
    // Env names are derived from paths; two keys must never collapse onto one variable.
    let mut envs: Vec<&str> = keys.iter().map(|k| k.env.as_str()).collect();
    envs.sort_unstable();
    envs.dedup();
    assert_eq!(envs.len(), keys.len());
    assert_eq!(
        find("scaling.node.cpu_high").as_deref(),
        Some("TRANSCODE_SCALING_NODE_CPU_HIGH")
    );
    assert_eq!(
        find("scaling.nomad.node_class").as_deref(),
        Some("TRANSCODE_SCALING_NOMAD_NODE_CLASS")
    );
    assert_eq!(
        find("retry.push.base_delay_ms").as_deref(),
        Some("TRANSCODE_RETRY_PUSH_BASE_DELAY_MS")
    );
}

#[test]
fn retry_policies_from_file_env_and_flags() {
    let src = "retry {\n  pull {\n    max_attempts = 3\n    multiplier = 1.5\n    jitter = \"full\"\n  }\n  push {\n    base_delay_ms = 50\n    max_delay_ms = 400\n  }\n}\n";
    let mut cfg = Config::from_hcl_str(src, "retry.hcl").expect("valid");
    assert_eq!(cfg.retry.pull.max_attempts, 3);
    assert!((cfg.retry.pull.multiplier - 1.5).abs() < f64::EPSILON);
    assert_eq!(cfg.retry.pull.jitter, Jitter::Full);
    // Keys left out keep the defaults: 500 ms doubling to 30 s, 5 attempts.
    assert_eq!(cfg.retry.pull.base_delay_ms, 500);
    assert_eq!(cfg.retry.push.base_delay_ms, 50);
    assert_eq!(cfg.retry.push.max_delay_ms, 400);
    assert_eq!(cfg.retry.push.max_attempts, 5);
    assert!((cfg.retry.push.multiplier - 2.0).abs() < f64::EPSILON);

    cfg.apply_env(env(&[
        ("TRANSCODE_RETRY_PUSH_MAX_ATTEMPTS", "7"),
        ("TRANSCODE_RETRY_PULL_MULTIPLIER", "3"),
    ]))
    .expect("env applies");
    assert_eq!(cfg.retry.push.max_attempts, 7);
    assert!((cfg.retry.pull.multiplier - 3.0).abs() < f64::EPSILON);
    cfg.set("retry.pull.jitter", "none").expect("flag applies");
    assert_eq!(cfg.retry.pull.jitter, Jitter::None);
    cfg.validate().expect("still valid");

    let err = cfg
        .set("retry.pull.multiplier", "0.5")
        .expect_err("shrinking delays");
    assert_eq!(
        err.to_string(),
        "retry.pull.multiplier: must be at least 1, found 0.5"
    );
    let err = cfg
        .set("retry.push.max_attempts", "0")
        .expect_err("no attempt at all");
    assert_eq!(
        err.to_string(),
        "retry.push.max_attempts: must be at least 1, found 0"
    );
    let err = Config::from_hcl_str(
        "retry {\n  pull {\n    jitter = \"some\"\n  }\n}\n",
        "r.hcl",
    )
    .expect_err("unknown jitter");
    assert_eq!(err.position(), Some((3, 14)), "{err}");
    let err = Config::from_hcl_str(
        "retry {\n  pull {\n    base_delay_ms = 1.5\n  }\n}\n",
        "r.hcl",
    )
    .expect_err("fractional milliseconds");
    assert!(err.to_string().contains("expected a whole number"), "{err}");
}

const SCALING_FULL: &str = r#"
utilization {
  sample_interval_ms  = 1000
  smoothing           = 0.5
  publish_interval_ms = 3000
  source              = "file:/tmp/synthetic.json"
}

scaling {
  enabled = true
  node {
    target                 = "command"
    evaluation_interval_ms = 20000
    cooldown_up_ms         = 90000
    cooldown_down_ms       = 600000
    min                    = 2
    max                    = 20
    cpu_high               = 75.5
    cpu_low                = 25
    mem_high               = 85.0
    within_bounds_trigger  = 4
    backlog_per_slot       = 2.5
    drain_deadline_seconds = 900
    dry_run                = true
  }
  container {
    target                 = "nomad"
    evaluation_interval_ms = 2000
    cooldown_up_ms         = 10000
    cooldown_down_ms       = 60000
    min                    = 0
    max                    = 6
    cpu_high               = 70
    cpu_low                = 20
    mem_high               = 80
    within_bounds_trigger  = 2
    backlog_per_slot       = 0.5
    drain_deadline_seconds = 300
    dry_run                = false
  }
  local {
    worker_bin          = "/opt/transcode/bin/transcode-worker"
    worker_config       = "/etc/transcode/worker.hcl"
    containers_per_node = 2
    slots               = 3
    node_prefix         = "dev-"
  }
  nomad {
    address    = "https://nomad.example:4646"
    token      = "s3cr3t-acl-token"
    namespace  = "media"
    region     = "eu"
    job        = "tw"
    group      = "workers"
    node_class = "transcode"
  }
  command {
    add_node        = "terraform apply -auto-approve -var worker_nodes=$TRANSCODE_SCALE_COUNT"
    remove_node     = "./remove.sh"
    start_container = "./start.sh"
    stop_container  = "./stop.sh"
    list_nodes      = "./list.sh"
    timeout_seconds = 1200
  }
}
"#;

#[test]
fn scaling_defaults_match_the_documented_ones() {
    let cfg = Config::default();
    let u = &cfg.utilization;
    assert_eq!(u.sample_interval_ms, 2000);
    assert!((u.smoothing - 0.3).abs() < f64::EPSILON);
    assert_eq!(u.publish_interval_ms, 5000);
    assert_eq!(u.source, "procfs");
    let s = &cfg.scaling;
    assert!(!s.enabled);
    assert_eq!(s.node, PolicyConfig::node_default());
    assert_eq!(s.container, PolicyConfig::container_default());
    let n = &s.node;
    assert_eq!(n.target, "local");
    assert_eq!(
        (
            n.evaluation_interval_ms,
            n.cooldown_up_ms,
            n.cooldown_down_ms
        ),
        (10_000, 60_000, 300_000)
    );
    assert_eq!((n.min, n.max, n.within_bounds_trigger), (1, 10, 3));
    assert_eq!((n.cpu_high, n.cpu_low, n.mem_high), (80.0, 30.0, 90.0));
    assert_eq!(n.backlog_per_slot, 1.0);
    assert_eq!(n.drain_deadline_seconds, 600);
    assert!(!n.dry_run);
    let c = &s.container;
    assert_eq!(c.target, "local");
    assert_eq!(
        (
            c.evaluation_interval_ms,
            c.cooldown_up_ms,
            c.cooldown_down_ms
        ),
        (5_000, 30_000, 120_000)
    );
    assert_eq!((c.min, c.max), (1, 4));
    assert_eq!(c.drain_deadline_seconds, 600);
    assert_eq!(s.local.containers_per_node, 1);
    assert_eq!(s.local.slots, 2);
    assert_eq!(s.local.node_prefix, "local-");
    assert_eq!(s.nomad.address, "http://127.0.0.1:4646");
    assert_eq!(s.nomad.namespace, "default");
    assert_eq!(s.nomad.job, "transcode-worker");
    assert_eq!(s.nomad.group, "worker");
    assert_eq!(s.command.timeout_seconds, 600);
    cfg.validate().expect("defaults are valid");
}

#[test]
fn scaling_and_utilization_blocks_round_trip_through_hcl() {
    let cfg = Config::from_hcl_str(SCALING_FULL, "scaling.hcl").expect("valid");
    cfg.validate().expect("consistent");
    let u = &cfg.utilization;
    assert_eq!(u.sample_interval_ms, 1000);
    assert!((u.smoothing - 0.5).abs() < f64::EPSILON);
    assert_eq!(u.publish_interval_ms, 3000);
    assert_eq!(u.source, "file:/tmp/synthetic.json");
    let s = &cfg.scaling;
    assert!(s.enabled);
    assert_eq!(
        s.node,
        PolicyConfig {
            target: "command".into(),
            evaluation_interval_ms: 20_000,
            cooldown_up_ms: 90_000,
            cooldown_down_ms: 600_000,
            min: 2,
            max: 20,
            cpu_high: 75.5,
            cpu_low: 25.0,
            mem_high: 85.0,
            within_bounds_trigger: 4,
            backlog_per_slot: 2.5,
            drain_deadline_seconds: 900,
            dry_run: true,
        }
    );
    assert_eq!(s.container.target, "nomad");
    assert_eq!((s.container.min, s.container.max), (0, 6));
    assert_eq!(s.container.backlog_per_slot, 0.5);
    assert_eq!(s.local.worker_bin, "/opt/transcode/bin/transcode-worker");
    assert_eq!(s.local.worker_config, "/etc/transcode/worker.hcl");
    assert_eq!((s.local.containers_per_node, s.local.slots), (2, 3));
    assert_eq!(s.local.node_prefix, "dev-");
    assert_eq!(s.nomad.address, "https://nomad.example:4646");
    assert_eq!(s.nomad.token, "s3cr3t-acl-token");
    assert_eq!(
        (s.nomad.namespace.as_str(), s.nomad.region.as_str()),
        ("media", "eu")
    );
    assert_eq!(
        (s.nomad.job.as_str(), s.nomad.group.as_str()),
        ("tw", "workers")
    );
    assert_eq!(s.nomad.node_class, "transcode");
    assert!(s.command.add_node.contains("$TRANSCODE_SCALE_COUNT"));
    assert_eq!(s.command.list_nodes, "./list.sh");
    assert_eq!(s.command.timeout_seconds, 1200);
    // The Nomad ACL token stays out of Debug output, which ends up in logs.
    assert!(!format!("{cfg:?}").contains("s3cr3t-acl-token"));

    // Every value survives the env/flag path, which rebuilds the config from its own
    // serialization: a lossy field would show up as a difference here.
    let mut again = cfg.clone();
    again.set("log.level", "info").expect("flag applies");
    assert_eq!(again.scaling, cfg.scaling);
    assert_eq!(again.utilization, cfg.utilization);
}

#[test]
fn a_partial_policy_block_keeps_its_own_levels_defaults() {
    let cfg = Config::from_hcl_str("scaling {\n  container {\n    max = 8\n  }\n}\n", "p.hcl")
        .expect("valid");
    assert_eq!(
        cfg.scaling.container,
        PolicyConfig {
            max: 8,
            ..PolicyConfig::container_default()
        }
    );
    assert_eq!(cfg.scaling.node, PolicyConfig::node_default());

    let cfg =
        Config::from_hcl_str("scaling {\n  node {\n    min = 0\n  }\n}\n", "p.hcl").expect("valid");
    assert_eq!(
        cfg.scaling.node,
        PolicyConfig {
            min: 0,
            ..PolicyConfig::node_default()
        }
    );
    assert_eq!(cfg.scaling.container, PolicyConfig::container_default());

    // The same holds for anyone deserializing the struct directly with serde.
    let direct: ScalingConfig =
        serde_json::from_str(r#"{"container": {"cooldown_up_ms": 1}}"#).expect("serde");
    assert_eq!(direct.container.max, 4);
    assert_eq!(direct.container.evaluation_interval_ms, 5_000);
    assert_eq!(direct.container.cooldown_up_ms, 1);
    let err = serde_json::from_str::<ScalingConfig>(r#"{"node": {"cpu_hi": 1}}"#)
        .expect_err("unknown field");
    assert!(err.to_string().contains("cpu_hi"), "{err}");
}

#[test]
fn scaling_env_overrides_and_flags() {
    let mut cfg = Config::default();
    cfg.apply_env(env(&[
        ("TRANSCODE_SCALING_NODE_CPU_HIGH", "90"),
        ("TRANSCODE_SCALING_CONTAINER_DRY_RUN", "true"),
        ("TRANSCODE_SCALING_ENABLED", "1"),
        ("TRANSCODE_SCALING_NOMAD_TOKEN", "t"),
        ("TRANSCODE_UTILIZATION_SMOOTHING", "1"),
        ("TRANSCODE_UTILIZATION_SOURCE", "file:/x.json"),
    ]))
    .expect("env applies");
    assert_eq!(cfg.scaling.node.cpu_high, 90.0);
    // Only the named key moved.
    assert_eq!(cfg.scaling.container.cpu_high, 80.0);
    assert_eq!(cfg.scaling.node.cpu_low, 30.0);
    assert!(cfg.scaling.container.dry_run);
    assert!(cfg.scaling.enabled);
    assert_eq!(cfg.scaling.nomad.token, "t");
    assert_eq!(cfg.utilization.smoothing, 1.0);
    assert_eq!(cfg.utilization.source, "file:/x.json");
    cfg.validate().expect("still valid");

    cfg.set("scaling.container.max", "12")
        .expect("flag applies");
    assert_eq!(cfg.scaling.container.max, 12);
    assert_eq!(cfg.scaling.container.evaluation_interval_ms, 5_000);

    let err = Config::default()
        .apply_env(env(&[("TRANSCODE_SCALING_NODE_CPU_HIGH", "120")]))
        .expect_err("over 100 percent");
    assert_eq!(
        err.to_string(),
        "TRANSCODE_SCALING_NODE_CPU_HIGH: scaling.node.cpu_high: must be at most 100, found 120"
    );
    let err = Config::default()
        .apply_env(env(&[("TRANSCODE_SCALING_NODE_CPU_HGH", "70")]))
        .expect_err("typo");
    assert!(
        err.to_string()
            .starts_with("TRANSCODE_SCALING_NODE_CPU_HGH: unknown setting"),
        "{err}"
    );
    let err = Config::default()
        .set("utilization.smoothing", "0")
        .expect_err("alpha 0 never moves");
    assert_eq!(
        err.to_string(),
        "utilization.smoothing: must be at least 0.001, found 0"
    );
}

#[test]
fn scaling_value_mistakes_have_positions() {
    let cases: &[(&str, &str)] = &[
        (
            "scaling {\n  node {\n    cpu_hgh = 70\n  }\n}\n",
            "transcode.hcl:3:5: unknown key \"cpu_hgh\" in block scaling.node (expected one of: \
             target, evaluation_interval_ms, cooldown_up_ms, cooldown_down_ms, min, max, \
             cpu_high, cpu_low, mem_high, within_bounds_trigger, backlog_per_slot, \
             drain_deadline_seconds, dry_run)",
        ),
        (
            "scaling {\n  container {\n    target = \"k8s\"\n  }\n}\n",
            "transcode.hcl:3:14: scaling.container.target: expected one of \"local\", \"nomad\", \
             \"command\", found \"k8s\"",
        ),
        (
            "scaling {\n  node {\n    mem_high = 101\n  }\n}\n",
            "transcode.hcl:3:16: scaling.node.mem_high: must be at most 100, found 101",
        ),
        (
            "scaling {\n  node {\n    within_bounds_trigger = 0\n  }\n}\n",
            "transcode.hcl:3:29: scaling.node.within_bounds_trigger: must be at least 1, found 0",
        ),
        (
            "scaling {\n  node {\n    max = 0\n  }\n}\n",
            "transcode.hcl:3:11: scaling.node.max: must be at least 1, found 0",
        ),
        (
            "utilization {\n  source = \"sysfs\"\n}\n",
            "transcode.hcl:2:12: utilization.source: expected \"procfs\" or \"file:…\", \
             found \"sysfs\"",
        ),
        (
            "utilization {\n  source = \"file:\"\n}\n",
            "transcode.hcl:2:12: utilization.source: expected \"procfs\" or \"file:…\", \
             found \"file:\"",
        ),
        (
            "utilization {\n  smoothing = 1.5\n}\n",
            "transcode.hcl:2:15: utilization.smoothing: must be at most 1, found 1.5",
        ),
        (
            "scaling {\n  enabled = \"yes\"\n}\n",
            "transcode.hcl:2:13: scaling.enabled: expected a bool, found a string",
        ),
    ];
    for (src, want) in cases {
        let err = file_error(src);
        assert_eq!(&err.to_string(), want, "for input {src:?}");
    }
}

/// Each inconsistent combination is refused by `validate()`, naming the key to fix.
#[test]
fn inconsistent_scaling_settings_name_the_key() {
    type Edit = fn(&mut Config);
    let cases: &[(&str, Edit, &str)] = &[
        (
            "cpu_low above cpu_high",
            |c| {
                c.scaling.node.cpu_low = 80.0;
                c.scaling.node.cpu_high = 70.0;
            },
            "scaling.node: cpu_low (80) must be below cpu_high (70)",
        ),
        (
            "cpu_low equal to cpu_high leaves no band to hold in",
            |c| {
                c.scaling.container.cpu_low = 50.0;
                c.scaling.container.cpu_high = 50.0;
            },
            "scaling.container: cpu_low (50) must be below cpu_high (50)",
        ),
        (
            "min above max",
            |c| {
                c.scaling.container.min = 5;
                c.scaling.container.max = 4;
            },
            "scaling.container: min (5) must not be above max (4)",
        ),
        (
            "nomad cannot create machines",
            |c| {
                c.scaling.enabled = true;
                c.scaling.node.target = "nomad".into();
            },
            "scaling.node.target: \"nomad\" cannot add nodes: Nomad's API schedules onto \
             machines but cannot create them; use \"command\" (e.g. terraform) for the node \
             level",
        ),
        (
            "command node target without its commands",
            |c| {
                c.scaling.enabled = true;
                c.scaling.node.target = "command".into();
                c.scaling.command.remove_node = "./rm.sh".into();
            },
            "scaling.node.target: \"command\" needs scaling.command.add_node, \
             scaling.command.list_nodes (empty)",
        ),
        (
            "command container target without its commands",
            |c| {
                c.scaling.enabled = true;
                c.scaling.container.target = "command".into();
                c.scaling.command.start_container = "./start.sh".into();
                c.scaling.command.stop_container = "  ".into();
            },
            "scaling.container.target: \"command\" needs scaling.command.stop_container (empty)",
        ),
        (
            "nomad container target without a job",
            |c| {
                c.scaling.enabled = true;
                c.scaling.container.target = "nomad".into();
                c.scaling.nomad.job = String::new();
            },
            "scaling.container.target: \"nomad\" needs scaling.nomad.job (empty)",
        ),
        (
            "utilization source set directly",
            |c| c.utilization.source = "proc".into(),
            "utilization.source: expected \"procfs\" or \"file:…\", found \"proc\"",
        ),
    ];
    for (what, edit, want) in cases {
        let mut cfg = Config::default();
        edit(&mut cfg);
        let err = cfg.validate().expect_err(what);
        assert!(matches!(err, ConfigError::Value { .. }), "{what}: {err:?}");
        assert_eq!(&err.to_string(), want, "{what}");
    }
}

#[test]
fn target_checks_wait_for_scaling_to_be_enabled() {
    // A half-written target is fine while the autoscaler is off: an operator can prepare the
    // file before switching it on.
    let mut cfg = Config::default();
    cfg.scaling.node.target = "nomad".into();
    cfg.scaling.container.target = "command".into();
    cfg.validate().expect("not checked while disabled");
    cfg.scaling.enabled = true;
    assert!(cfg.validate().is_err());

    // Bounds are checked regardless.
    let mut cfg = Config::default();
    cfg.scaling.node.min = 11;
    let err = cfg
        .validate()
        .expect_err("min above max even when disabled");
    assert_eq!(
        err.to_string(),
        "scaling.node: min (11) must not be above max (10)"
    );

    // And a file can be wrong only in combination: load-time validation catches it.
    let cfg = Config::from_hcl_str(
        "scaling {\n  enabled = true\n  node {\n    target = \"command\"\n  }\n}\n",
        "s.hcl",
    )
    .expect("each value is fine on its own");
    let err = cfg.validate().expect_err("commands missing");
    assert!(
        err.to_string()
            .starts_with("scaling.node.target: \"command\" needs"),
        "{err}"
    );
}
