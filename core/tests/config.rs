//! Config loading as binaries use it: file, then env, then flags; and the error messages an
//! operator sees, down to the line and column.

use std::path::{Path, PathBuf};

use transcode_core::config::{Config, ConfigError, LogFormat};
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
             of: store, objects, scaler, worker, membership, retry, log)",
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
    // store, objects.s3, scaler, worker, membership, retry.pull + retry.push, log.
    assert_eq!(keys.len(), 2 + 9 + 5 + 7 + 7 + 2 * 5 + 2);
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
