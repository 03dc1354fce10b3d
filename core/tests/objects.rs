//! Object access against `file://` (always) and a real S3 server (when the harness provides
//! one through `TRANSCODE_TEST_S3_ENDPOINT`). With `TRANSCODE_REQUIRE_SERVICES=1` a missing
//! server fails the S3 tests instead of skipping them, so CI cannot pass by accident.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use transcode_core::objects::{ObjectError, Objects, ObjectsConfig, S3Config};
use transcode_core::url::ObjectUrl;

fn url(raw: &str) -> ObjectUrl {
    ObjectUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
}

fn file_url(path: &Path) -> ObjectUrl {
    url(&format!("file://{}", path.display()))
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Names of files in `dir`, to prove a failed pull left nothing behind (no temp files either).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A port with nothing listening: bind, note the port, close.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------- file://

#[tokio::test]
async fn file_round_trip_hashes_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = random_bytes(3 * 1024 * 1024 + 17, 7);
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &data).expect("write");
    let objects = Objects::new(ObjectsConfig::default());

    let stored = file_url(&dir.path().join("store/nested/obj.bin"));
    let up = objects.put_file(&src, &stored).await.expect("put");
    assert_eq!(up.bytes, data.len() as u64);
    assert_eq!(up.sha256, sha256_hex(&data));

    let info = objects.head(&stored).await.expect("head").expect("exists");
    assert_eq!(info.size, data.len() as u64);

    let dest = dir.path().join("pulled/copy.bin");
    let down = objects.get_to_file(&stored, &dest).await.expect("get");
    assert_eq!(down, up);
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    // Only the final files, no temp files left beside them.
    assert_eq!(entries(&dir.path().join("pulled")), vec!["copy.bin"]);
    assert_eq!(entries(&dir.path().join("store/nested")), vec!["obj.bin"]);
}

#[tokio::test]
async fn file_small_objects_head_and_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::new(ObjectsConfig::default());
    let u = file_url(&dir.path().join("manifest.json"));

    assert!(objects.head(&u).await.expect("head").is_none());
    let t = objects
        .put_bytes(&u, Bytes::from_static(b"{\"ok\":true}"))
        .await
        .expect("put");
    assert_eq!(t.bytes, 11);
    assert_eq!(t.sha256, sha256_hex(b"{\"ok\":true}"));
    let got = objects.get_bytes(&u, 1024).await.expect("get");
    assert_eq!(&got[..], b"{\"ok\":true}");
    // Exactly at the limit is fine; one byte under is not.
    objects.get_bytes(&u, 11).await.expect("exact limit");
    let err = objects.get_bytes(&u, 10).await.expect_err("too large");
    assert!(
        matches!(
            err,
            ObjectError::TooLarge {
                size: 11,
                max: 10,
                ..
            }
        ),
        "{err:?}"
    );

    objects.delete(&u).await.expect("delete");
    assert!(objects.head(&u).await.expect("head").is_none());
    objects.delete(&u).await.expect("deleting again is fine");
    // A directory is not an object.
    assert!(objects
        .head(&file_url(dir.path()))
        .await
        .expect("head")
        .is_none());
}

#[tokio::test]
async fn file_missing_source_is_not_found_and_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::new(ObjectsConfig::default());
    let missing = file_url(&dir.path().join("nope.mp4"));
    let dest = dir.path().join("out/dest.mp4");

    let err = objects
        .get_to_file(&missing, &dest)
        .await
        .expect_err("missing");
    assert!(matches!(err, ObjectError::NotFound { .. }), "{err:?}");
    assert_eq!(err.code(), "not_found");
    assert!(!err.is_transient());
    assert!(!dest.exists());
    assert!(entries(&dir.path().join("out")).is_empty());

    let err = objects.get_bytes(&missing, 10).await.expect_err("missing");
    assert!(matches!(err, ObjectError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn local_disk_errors_keep_the_io_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.bin");
    std::fs::write(&src, b"data").expect("write");
    // A regular file where a folder should be: the destination cannot be created.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"").expect("write");
    let objects = Objects::new(ObjectsConfig::default());

    let err = objects
        .get_to_file(&file_url(&src), &blocker.join("dest.bin"))
        .await
        .expect_err("cannot write");
    match &err {
        ObjectError::LocalIo { source, .. } => {
            assert!(matches!(
                source.kind(),
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory
            ));
        }
        other => panic!("expected LocalIo, got {other:?}"),
    }
    assert_eq!(err.code(), "local_io");

    let err = objects
        .put_file(
            &dir.path().join("absent.bin"),
            &file_url(&dir.path().join("x")),
        )
        .await
        .expect_err("no source");
    assert!(matches!(err, ObjectError::LocalIo { .. }), "{err:?}");
}

#[tokio::test]
async fn prefix_urls_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::new(ObjectsConfig::default());
    let prefix =
        ObjectUrl::parse_prefix(&format!("file://{}/", dir.path().display())).expect("prefix");
    let err = objects.head(&prefix).await.expect_err("a prefix");
    assert!(matches!(err, ObjectError::Other { .. }), "{err:?}");
    let s3_prefix = ObjectUrl::parse_prefix("s3://transcode-test/out/").expect("prefix");
    let err = objects
        .put_bytes(&s3_prefix, Bytes::from_static(b"x"))
        .await
        .expect_err("a prefix");
    assert!(matches!(err, ObjectError::Other { .. }), "{err:?}");
}

// ---------------------------------------------------------------- S3, no server needed

#[tokio::test]
async fn closed_port_is_unreachable_not_not_found() {
    let objects = Objects::new(ObjectsConfig {
        s3: S3Config {
            endpoint: Some(format!("http://127.0.0.1:{}", closed_port())),
            region: Some("us-east-1".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            connect_timeout_secs: 2,
            ..S3Config::default()
        },
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let u = url("s3://transcode-test/some/key.mp4");
    let dest = dir.path().join("dest.mp4");

    let err = objects.get_to_file(&u, &dest).await.expect_err("no server");
    assert!(matches!(err, ObjectError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(err.code(), "unreachable");
    assert!(entries(dir.path()).is_empty(), "partial file left behind");

    // head must not say "missing" when it could not ask.
    let err = objects.head(&u).await.expect_err("no server");
    assert!(matches!(err, ObjectError::Unreachable { .. }), "{err:?}");
    let err = objects
        .put_bytes(&u, Bytes::from_static(b"x"))
        .await
        .expect_err("no server");
    assert!(matches!(err, ObjectError::Unreachable { .. }), "{err:?}");
}

#[tokio::test]
async fn plain_http_endpoint_with_http_disallowed_is_a_config_error() {
    let objects = Objects::new(ObjectsConfig {
        s3: S3Config {
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: Some(false),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..S3Config::default()
        },
    });
    let err = objects
        .head(&url("s3://transcode-test/k"))
        .await
        .expect_err("refused");
    assert!(matches!(err, ObjectError::Config { .. }), "{err:?}");
}

// ---------------------------------------------------------------- S3, real server

struct S3Env {
    endpoint: String,
    bucket: String,
}

/// The test S3 server, or `None` to skip. Skipping is loud, and refused under
/// `TRANSCODE_REQUIRE_SERVICES=1`.
fn s3_env(test: &str) -> Option<S3Env> {
    let endpoint = std::env::var("TRANSCODE_TEST_S3_ENDPOINT")
        .ok()
        .filter(|s| !s.is_empty());
    let Some(endpoint) = endpoint else {
        if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!(
                "{test}: TRANSCODE_REQUIRE_SERVICES=1 but TRANSCODE_TEST_S3_ENDPOINT is not set; \
                 start the services (scripts/services.sh start DIR, then source DIR/env)"
            );
        }
        // Straight to stderr: the test harness captures print macros, and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "!!! {test}: skipped: no S3 (set TRANSCODE_TEST_S3_ENDPOINT to run it) !!!"
        );
        return None;
    };
    let bucket = std::env::var("TRANSCODE_TEST_S3_BUCKET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "transcode-test".into());
    Some(S3Env { endpoint, bucket })
}

/// Objects configured like production: endpoint from the harness, credentials and region from
/// the AWS variables.
fn s3_objects(env: &S3Env) -> Objects {
    Objects::new(ObjectsConfig {
        s3: S3Config {
            endpoint: Some(env.endpoint.clone()),
            ..S3Config::default()
        },
    })
}

/// A key prefix no other run or test shares.
fn unique_prefix(env: &S3Env, test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "s3://{}/core-tests/{test}-{}-{nanos}-{}/",
        env.bucket,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[tokio::test]
async fn s3_multipart_round_trip_of_20_mib() {
    let Some(env) = s3_env("s3_multipart_round_trip_of_20_mib") else {
        return;
    };
    let objects = s3_objects(&env);
    let dir = tempfile::tempdir().expect("tempdir");
    // Not a multiple of the part size, so the last part is short.
    let data = random_bytes(20 * 1024 * 1024 + 12_345, 42);
    let expected = sha256_hex(&data);
    let src = dir.path().join("source.bin");
    std::fs::write(&src, &data).expect("write");
    let u = url(&format!("{}big.bin", unique_prefix(&env, "multipart")));

    let up = objects.put_file(&src, &u).await.expect("put_file");
    assert_eq!(up.bytes, data.len() as u64);
    assert_eq!(up.sha256, expected);

    let info = objects.head(&u).await.expect("head").expect("exists");
    assert_eq!(info.size, data.len() as u64);
    // S3 marks a multipart object's ETag with its part count: 20 MiB in 8 MiB parts is 3.
    let etag = info.e_tag.unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with("-3"),
        "not multipart? etag {etag}"
    );

    let dest = dir.path().join("pulled.bin");
    let down = objects.get_to_file(&u, &dest).await.expect("get_to_file");
    assert_eq!(down.bytes, data.len() as u64);
    assert_eq!(down.sha256, expected);
    assert_eq!(sha256_hex(&std::fs::read(&dest).expect("read")), expected);

    objects.delete(&u).await.expect("delete");
    assert!(objects.head(&u).await.expect("head").is_none());
}

#[tokio::test]
async fn s3_small_objects_and_missing_keys() {
    let Some(env) = s3_env("s3_small_objects_and_missing_keys") else {
        return;
    };
    let objects = s3_objects(&env);
    let prefix = unique_prefix(&env, "small");
    let u = url(&format!("{prefix}manifest.json"));
    let body = Bytes::from_static(b"{\"renditions\":[\"720p\"]}");

    let t = objects.put_bytes(&u, body.clone()).await.expect("put");
    assert_eq!(t.sha256, sha256_hex(&body));
    assert_eq!(objects.get_bytes(&u, 1024).await.expect("get"), body);
    let err = objects.get_bytes(&u, 4).await.expect_err("over limit");
    assert!(matches!(err, ObjectError::TooLarge { .. }), "{err:?}");

    // A small file goes up in a single PUT and comes back intact.
    let dir = tempfile::tempdir().expect("tempdir");
    let small = random_bytes(1000, 3);
    let src = dir.path().join("small.bin");
    std::fs::write(&src, &small).expect("write");
    let su = url(&format!("{prefix}small.bin"));
    let up = objects.put_file(&src, &su).await.expect("put small");
    assert_eq!(up.sha256, sha256_hex(&small));
    assert_eq!(objects.get_bytes(&su, 4096).await.expect("get"), small);

    let missing = url(&format!("{prefix}missing.mp4"));
    assert!(objects.head(&missing).await.expect("head").is_none());
    let dest = dir.path().join("dest.mp4");
    let err = objects
        .get_to_file(&missing, &dest)
        .await
        .expect_err("missing");
    assert!(matches!(err, ObjectError::NotFound { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(!dest.exists());
    assert_eq!(
        entries(dir.path()),
        vec!["small.bin"],
        "no partial file left"
    );
    let err = objects.get_bytes(&missing, 10).await.expect_err("missing");
    assert!(matches!(err, ObjectError::NotFound { .. }), "{err:?}");

    objects.delete(&u).await.expect("delete");
    objects.delete(&su).await.expect("delete");
    objects
        .delete(&missing)
        .await
        .expect("deleting a missing key is fine");
}

#[tokio::test]
async fn s3_wrong_secret_is_permission_denied() {
    let Some(env) = s3_env("s3_wrong_secret_is_permission_denied") else {
        return;
    };
    let good = s3_objects(&env);
    let prefix = unique_prefix(&env, "denied");
    let u = url(&format!("{prefix}exists.bin"));
    good.put_bytes(&u, Bytes::from_static(b"payload"))
        .await
        .expect("put with good credentials");

    let bad = Objects::new(ObjectsConfig {
        s3: S3Config {
            endpoint: Some(env.endpoint.clone()),
            secret_access_key: Some("definitely-not-the-secret".into()),
            ..S3Config::default()
        },
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("dest.bin");
    let err = bad.get_to_file(&u, &dest).await.expect_err("denied");
    assert!(
        matches!(err, ObjectError::PermissionDenied { .. }),
        "{err:?}"
    );
    assert_eq!(err.code(), "permission_denied");
    assert!(!err.is_transient());
    assert!(entries(dir.path()).is_empty());

    let err = bad
        .put_bytes(&url(&format!("{prefix}new.bin")), Bytes::from_static(b"x"))
        .await
        .expect_err("denied");
    assert!(
        matches!(err, ObjectError::PermissionDenied { .. }),
        "{err:?}"
    );
    let err = bad.head(&u).await.expect_err("denied");
    assert!(
        matches!(err, ObjectError::PermissionDenied { .. }),
        "{err:?}"
    );

    good.delete(&u).await.expect("cleanup");
}

// ---------------------------------------------------------------- S3, misbehaving server

/// Builds the raw HTTP response for a request head.
type Responder = fn(&str) -> Vec<u8>;

/// A loopback HTTP server that answers each request with `respond(request head)`, for at most
/// `max` connections, then stops. It exists to produce failures a healthy S3 server will not.
fn fake_server(respond: Responder, max: usize) -> u16 {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            // Read the request head; requests here have no body worth waiting for.
            let mut buf = [0u8; 8192];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(&respond(&String::from_utf8_lossy(&seen)));
            let _ = stream.flush();
            // Dropping the stream closes the connection, cutting short any promised body.
        }
    });
    port
}

fn status_only(status: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
}

fn objects_at(port: u16) -> Objects {
    Objects::new(ObjectsConfig {
        s3: S3Config {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: Some("us-east-1".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            timeout_secs: 5,
            ..S3Config::default()
        },
    })
}

#[tokio::test]
async fn server_errors_and_throttling_are_transient() {
    let cases: [(Responder, &str); 3] = [
        (|_| status_only("503 Service Unavailable"), "503"),
        (|_| status_only("500 Internal Server Error"), "500"),
        (|_| status_only("429 Too Many Requests"), "429"),
    ];
    for (respond, name) in cases {
        let objects = objects_at(fake_server(respond, 16));
        let u = url("s3://transcode-test/k.bin");
        let err = objects.head(&u).await.expect_err(name);
        assert!(
            matches!(err, ObjectError::Transient { .. }),
            "{name}: {err:?}"
        );
        assert!(err.is_transient());
        let err = objects
            .put_bytes(&u, Bytes::from_static(b"x"))
            .await
            .expect_err(name);
        assert!(
            matches!(err, ObjectError::Transient { .. }),
            "{name}: {err:?}"
        );
    }
}

/// Promises 1000 bytes, sends a few and hangs up. object_store's resume (a Range request) is
/// answered the way S3 would answer it, and cut short too.
fn truncating(req: &str) -> Vec<u8> {
    let head = "Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\nETag: \"abc\"\r\nConnection: close";
    let range_start = req.lines().find_map(|l| {
        let l = l.to_ascii_lowercase();
        let spec = l.strip_prefix("range: bytes=")?;
        spec.split('-').next()?.trim().parse::<u64>().ok()
    });
    match range_start {
        None => {
            format!("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n{head}\r\n\r\nonly-a-few-bytes")
        }
        Some(start) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
             Content-Range: bytes {start}-999/1000\r\n{head}\r\n\r\nabc",
            1000 - start
        ),
    }
    .into_bytes()
}

#[tokio::test]
async fn truncated_body_is_transient_and_leaves_no_file() {
    let objects = objects_at(fake_server(truncating, 16));
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("dest.bin");
    let err = objects
        .get_to_file(&url("s3://transcode-test/k.bin"), &dest)
        .await
        .expect_err("truncated");
    assert!(matches!(err, ObjectError::Transient { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(entries(dir.path()).is_empty(), "partial file left behind");

    let err = objects
        .get_bytes(&url("s3://transcode-test/k.bin"), 4096)
        .await
        .expect_err("truncated");
    assert!(matches!(err, ObjectError::Transient { .. }), "{err:?}");
}
