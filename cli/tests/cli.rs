//! Runs the real `transcode` binary: the submit/list/show path on SQLite and, when the test
//! services are up, on PostgreSQL; and the promise that a bad spec is one clear line on stderr,
//! a non-zero exit, and no row.

use std::process::{Command, Output};

fn transcode(store: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_transcode"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("TRANSCODE_CONFIG")
        .output()
        .expect("run transcode")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stores(tag: &str) -> Vec<(String, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = vec![(
        format!("sqlite://{}", dir.path().join("cli.db").display()),
        Some(dir),
    )];
    match std::env::var("TRANSCODE_TEST_PG_URL") {
        Ok(url) => {
            // A database of its own: other tests share the server.
            let db = format!("cli_{tag}_{}", std::process::id());
            let (base, _) = url.rsplit_once('/').expect("url has a database");
            for sql in [
                format!("DROP DATABASE IF EXISTS {db}"),
                format!("CREATE DATABASE {db}"),
            ] {
                let admin = Command::new("psql")
                    .arg(&url)
                    .args(["-qc", &sql])
                    .output()
                    .expect("psql");
                assert!(admin.status.success(), "{}", stderr(&admin));
            }
            v.push((format!("{base}/{db}"), None));
        }
        Err(_) if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("TRANSCODE_TEST_PG_URL missing with TRANSCODE_REQUIRE_SERVICES=1")
        }
        Err(_) => eprintln!("SKIPPED postgres half: no TRANSCODE_TEST_PG_URL"),
    }
    v
}

fn task_count(store: &str) -> usize {
    let o = transcode(store, &["tasks", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    v.as_array().expect("array").len()
}

const CAT: [&str; 9] = [
    "submit",
    "--source",
    "s3://media/in/cat.mp4",
    "--output",
    "s3://media/out/cat/",
    "--preset",
    "hd",
    "--idempotency-key",
    "cat-v1",
];

#[test]
fn submit_list_show_on_every_store() {
    for (store, _guard) in stores("flow") {
        let m = transcode(&store, &["migrate"]);
        assert!(m.status.success(), "{}", stderr(&m));
        let s = transcode(&store, &CAT);
        assert!(s.status.success(), "{}", stderr(&s));
        let id = stdout(&s).trim().to_string();
        assert_eq!(id.len(), 36, "prints the id: {id:?}");
        // Same key, same spec: the same task, and a note.
        let again = transcode(&store, &CAT);
        assert_eq!(stdout(&again).trim(), id);
        assert!(stderr(&again).contains("idempotency key matched"));
        let list = transcode(&store, &["tasks", "--status", "queued"]);
        assert!(stdout(&list).contains(&id), "{}", stdout(&list));
        let show = transcode(&store, &["task", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&show)).expect("json");
        assert_eq!(v["task"]["status"], "queued");
        assert_eq!(v["events"][0]["type"], "TaskQueued");
        assert_eq!(v["events"][0]["subject"], id.as_str());
        let ev = transcode(&store, &["events", "--type", "TaskQueued", "--json"]);
        assert_eq!(stdout(&ev).lines().count(), 1);
        let cancel = transcode(&store, &["cancel", &id]);
        assert!(stdout(&cancel).contains("cancelled"), "{}", stderr(&cancel));
        let cancel2 = transcode(&store, &["cancel", &id]);
        assert_eq!(cancel2.status.code(), Some(6), "{}", stderr(&cancel2));
        assert_eq!(task_count(&store), 1);
    }
}

#[test]
fn invalid_spec_is_one_line_and_writes_nothing() {
    for (store, _guard) in stores("bad") {
        assert!(transcode(&store, &["migrate"]).status.success());
        let cases: [(&[&str], &str); 4] = [
            (
                &[
                    "--source",
                    "s3://media/a.mp4",
                    "--output",
                    "s3://media/o/",
                    "--rendition",
                    "720p:1281x720:3000",
                ],
                "renditions[0].width",
            ),
            (
                &[
                    "--source",
                    "ftp://media/a.mp4",
                    "--output",
                    "s3://media/o/",
                    "--preset",
                    "hd",
                ],
                "source",
            ),
            (
                &[
                    "--source",
                    "s3://media/a.mp4",
                    "--output",
                    "s3://media/../o/",
                    "--preset",
                    "hd",
                ],
                "output",
            ),
            (
                &[
                    "--source",
                    "s3://media/a.mp4",
                    "--output",
                    "s3://media/o/",
                    "--preset",
                    "4k",
                ],
                "preset",
            ),
        ];
        for (args, field) in cases {
            let mut full = vec!["submit"];
            full.extend_from_slice(args);
            let o = transcode(&store, &full);
            assert_eq!(o.status.code(), Some(3), "{field}: {}", stderr(&o));
            let err = stderr(&o);
            assert_eq!(err.lines().count(), 1, "one line: {err:?}");
            assert!(
                err.starts_with(&format!("transcode: error: {field}:")),
                "{err}"
            );
            assert!(stdout(&o).is_empty());
        }
        assert_eq!(task_count(&store), 0, "no row written for a bad spec");
    }
}

#[test]
fn spec_file_and_unknown_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("sqlite://{}", dir.path().join("x.db").display());
    assert!(transcode(&store, &["migrate"]).status.success());
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        r#"{"source":"file:///v/a.mp4","output":"file:///v/out/","renditions":[{"name":"small","width":320,"height":180,"video_kbps":300}],"priority":5}"#,
    )
    .expect("write spec");
    let path = spec.to_str().expect("utf8");
    let o = transcode(&store, &["submit", "--spec", path, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v["priority"], 5);
    assert_eq!(v["spec"]["renditions"][0]["audio_kbps"], 128);
    std::fs::write(
        &spec,
        r#"{"source":"file:///v/a.mp4","output":"file:///v/out/","presett":"hd"}"#,
    )
    .expect("write");
    let bad = transcode(&store, &["submit", "--spec", path]);
    assert_eq!(bad.status.code(), Some(3));
    assert!(stderr(&bad).contains("presett"), "{}", stderr(&bad));
    let missing = transcode(&store, &["task", "01900000-0000-7000-8000-000000000000"]);
    assert_eq!(missing.status.code(), Some(4));
    let unreachable = transcode("postgres://nobody@127.0.0.1:1/x", &["tasks"]);
    assert_eq!(
        unreachable.status.code(),
        Some(5),
        "{}",
        stderr(&unreachable)
    );
    assert_eq!(stderr(&unreachable).lines().count(), 1);
}
