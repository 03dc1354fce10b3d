//! `nomad-driver-transcode`: the Nomad task driver plugin. Not built yet: it exits non-zero so
//! that no Nomad agent mistakes it for a working driver.

fn main() -> std::process::ExitCode {
    eprintln!("nomad-driver-transcode: not implemented yet (see docs/status.md)");
    std::process::ExitCode::from(70)
}
