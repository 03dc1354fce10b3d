//! `transcode-worker`: not built yet. It exits non-zero so nothing mistakes it for a working
//! worker; the work is tracked in the project's issues.

fn main() -> std::process::ExitCode {
    eprintln!(
        "transcode-worker {}: not implemented yet (see docs/status.md)",
        transcode_core::VERSION
    );
    std::process::ExitCode::from(70)
}
