//! `nomad-driver-transcode`: entry point of the Nomad task driver plugin. Run by Nomad (with
//! its magic cookie) it serves go-plugin gRPC; run as `nomad-driver-transcode shim <spec>` by
//! the plugin itself it is a task shim (see the library's `shim` module). Run by a human it
//! explains what it is and exits 1.

use std::process::ExitCode;

use nomad_driver_transcode::{cgroup, logging, server, shim, tasks};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "shim") {
        let Some(spec) = args.get(2) else {
            eprintln!("usage: nomad-driver-transcode shim <spec.json>");
            return ExitCode::from(2);
        };
        return shim::run(std::path::Path::new(spec));
    }
    if args
        .get(1)
        .is_some_and(|a| a == "--version" || a == "version")
    {
        println!("nomad-driver-transcode {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = server::check_env(|k| std::env::var(k).ok()) {
        eprintln!("{e}");
        return ExitCode::from(1);
    }
    logging::init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "plugin failed");
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<()> {
    use anyhow::Context;
    let layout = cgroup::Layout::detect().map_err(|e| e.to_string());
    match &layout {
        Ok(l) => tracing::info!(cgroup = l.name(), layout = ?l, "cgroup hierarchy selected"),
        Err(e) => tracing::warn!(error = %e, "no usable cgroup hierarchy; tasks cannot start"),
    }
    let exe = std::env::current_exe().context("locate own executable for the task shim")?;
    let shared = tasks::Shared::new(layout, exe);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start async runtime")?;
    rt.block_on(server::serve(shared))
        .context("serve go-plugin gRPC")?;
    // Background tasks (monitors, streams) hold nothing that must outlive the process.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
