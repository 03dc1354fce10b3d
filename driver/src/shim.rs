//! The task shim: a small process (this same binary, run as `nomad-driver-transcode shim
//! <spec.json>`) that sits between the plugin and the worker. Tasks must outlive the plugin, and
//! only a parent can learn a child's exit status, so the plugin does not parent workers itself:
//! it starts a shim in its own session, the shim starts the worker (joining the task cgroup and
//! dropping to the task user before exec), waits for it, and writes the exit status (code,
//! signal, OOM kill) atomically to an exit file in the task's state directory. Any plugin
//! process (the original, or a fresh one after a restart) learns the result from that file.
//!
//! The shim reports the worker's pid and start time (or the spawn error) as one JSON line on
//! its stdout, then detaches stdout so that a dead plugin cannot break it with SIGPIPE.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;
use crate::procfs::ProcId;

/// The task's user, resolved by the plugin (so lookup errors surface in StartTask).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Everything the shim needs to start the worker; written by the plugin as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShimSpec {
    /// argv[0] is the absolute path of the worker binary.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub stdout_path: Option<PathBuf>,
    pub stderr_path: Option<PathBuf>,
    pub user: Option<TaskUser>,
    pub cgroup: Option<Cgroup>,
    pub exit_file: PathBuf,
}

/// The first (and only) line the shim prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimReport {
    Started(ProcId),
    Failed { error: String },
}

/// The persisted exit status of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    /// Unix time in nanoseconds when the shim reaped the worker.
    pub finished_at_ns: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad exit file {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl ExitRecord {
    /// Reads an exit file; `Ok(None)` when the worker has not exited (no file yet).
    pub fn load(path: &Path) -> Result<Option<Self>, ShimError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| ShimError::Json {
                        path: path.to_owned(),
                        source,
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ShimError::Io {
                what: "read",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes via a temporary file, fsync and rename, so a reader sees all of it or nothing,
    /// even across a crash.
    pub fn store(&self, path: &Path) -> Result<(), ShimError> {
        let io = |what: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| ShimError::Io {
                what,
                path: p,
                source,
            }
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(self).map_err(|source| ShimError::Json {
            path: path.to_owned(),
            source,
        })?;
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename", path))?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

fn open_log(path: Option<&Path>) -> std::io::Result<Stdio> {
    match path {
        // Nomad's stdout/stderr paths are FIFOs read by logmon; opening one for writing waits
        // for its reader, which Nomad starts before StartTask.
        Some(p) => Ok(OpenOptions::new().create(true).append(true).open(p)?.into()),
        None => Ok(Stdio::null()),
    }
}

fn report(r: &ShimReport) {
    let line = serde_json::to_string(r).unwrap_or_else(|_| "{}".into());
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs in the shim process (no async runtime: it must stay single-threaded because it forks).
pub fn run(spec_path: &Path) -> ExitCode {
    // Own session: signals aimed at the plugin's process group never reach the shim or worker.
    let _ = nix::unistd::setsid();
    let spec: ShimSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            report(&ShimReport::Failed {
                error: format!("read shim spec {}: {e}", spec_path.display()),
            });
            return ExitCode::from(1);
        }
    };
    match spawn_and_wait(&spec) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shim: {e}");
            ExitCode::from(1)
        }
    }
}

fn spawn_and_wait(spec: &ShimSpec) -> Result<(), String> {
    let fail = |error: String| {
        report(&ShimReport::Failed {
            error: error.clone(),
        });
        error
    };
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(fail("empty argv".into()));
    };
    let stdout = open_log(spec.stdout_path.as_deref())
        .map_err(|e| fail(format!("open task stdout {:?}: {e}", spec.stdout_path)))?;
    let stderr = open_log(spec.stderr_path.as_deref())
        .map_err(|e| fail(format!("open task stderr {:?}: {e}", spec.stderr_path)))?;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let procs = spec
        .cgroup
        .as_ref()
        .map(Cgroup::procs_files)
        .unwrap_or_default();
    let user = spec.user.clone();
    let user_cname = match &user {
        Some(u) => Some(
            std::ffi::CString::new(u.name.clone())
                .map_err(|_| fail(format!("user name {:?} contains NUL", u.name)))?,
        ),
        None => None,
    };
    // SAFETY: the shim is single-threaded, so the forked child may allocate; the closure only
    // joins the cgroup and changes credentials before exec. Joining happens here, in the child,
    // so that the worker is limited from its first instruction. Credentials are dropped here
    // rather than with Command::uid, because std applies uid before pre_exec runs and a
    // non-root process could no longer join the cgroup.
    unsafe {
        cmd.pre_exec(move || {
            let me = std::process::id().to_string();
            for f in &procs {
                std::fs::write(f, &me)?;
            }
            if let (Some(u), Some(cname)) = (&user, &user_cname) {
                let gid = nix::unistd::Gid::from_raw(u.gid);
                nix::unistd::initgroups(cname, gid).map_err(std::io::Error::from)?;
                nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(u.uid))
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("start {program}: {e}")))?;
    let pid = child.id() as i32;
    let id = ProcId::of(pid).map_err(|e| fail(format!("identify worker pid {pid}: {e}")))?;
    report(&ShimReport::Started(id));
    // Detach from the plugin's pipe: the plugin may die, and writes would then raise SIGPIPE.
    if let Ok(devnull) = File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&devnull);
    }
    // The worker has its default dispositions already (set before spawn); the shim itself
    // ignores the usual termination signals so that only the worker reacts to them.
    for s in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe {
            let _ = nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("wait for worker {pid}: {e}"))?;
    let signal = status.signal().unwrap_or(0);
    // Same convention as Nomad's own executor: a signalled process exits with 128+signal.
    let exit_code = status.code().unwrap_or(128 + signal);
    let oom_killed = spec.cgroup.as_ref().is_some_and(|cg| match cg.oom_kills() {
        Some(n) => n > 0,
        // Without an oom_kill counter, a SIGKILL after hitting the limit is the best evidence.
        None => {
            signal == nix::sys::signal::Signal::SIGKILL as i32 && cg.limit_hits().unwrap_or(0) > 0
        }
    });
    let record = ExitRecord {
        exit_code,
        signal,
        oom_killed,
        finished_at_ns: chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
    };
    record
        .store(&spec.exit_file)
        .map_err(|e| format!("record exit status: {e}"))?;
    eprintln!("shim: worker {pid} exited: {record:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_record_round_trip() {
        let dir = std::env::temp_dir().join(format!("shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join("exit.json");
        assert_eq!(ExitRecord::load(&p).expect("load"), None);
        let r = ExitRecord {
            exit_code: 137,
            signal: 9,
            oom_killed: true,
            finished_at_ns: 5,
        };
        r.store(&p).expect("store");
        assert_eq!(ExitRecord::load(&p).expect("load"), Some(r));
        std::fs::write(&p, b"{").expect("write");
        assert!(ExitRecord::load(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn report_lines_are_tagged() {
        let s = serde_json::to_string(&ShimReport::Started(ProcId {
            pid: 5,
            start_time: 7,
        }))
        .expect("json");
        assert_eq!(s, r#"{"started":{"pid":5,"start_time":7}}"#);
    }
}
