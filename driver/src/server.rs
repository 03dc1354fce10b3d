//! go-plugin serving: the magic-cookie check, the unix socket in $TMPDIR, the handshake line on
//! stdout, and the gRPC services a go-plugin host expects next to the plugin's own (health
//! service "plugin" and the controller whose Shutdown stops the plugin). Tasks do not depend
//! on this process: stopping the server leaves them running for the next plugin instance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::base::BaseService;
use crate::driver::DriverService;
use crate::proto::base::base_plugin_server::BasePluginServer;
use crate::proto::drivers::driver_server::DriverServer;
use crate::proto::grpc::health::v1 as health;
use crate::proto::plugin as ctl;
use crate::tasks::Shared;

pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str =
    "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// go-plugin's own protocol version (the first handshake field).
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// Nomad's plugin protocol version (the second handshake field).
pub const APP_PROTOCOL_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "this is a Nomad task driver plugin and is not meant to be run directly.\n\
         Install it in the Nomad client's plugin_dir and use `driver = \"transcode\"` in a job.\n\
         (the {MAGIC_COOKIE_KEY} environment variable that Nomad sets is missing or wrong)"
    )]
    NoCookie,
    #[error("the host supports plugin protocol versions {0:?}, but this plugin speaks only version {APP_PROTOCOL_VERSION}")]
    Protocol(String),
    #[error("listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Checks what go-plugin's host puts in the environment before anything else happens.
pub fn check_env(get: impl Fn(&str) -> Option<String>) -> Result<(), ServeError> {
    if get(MAGIC_COOKIE_KEY).as_deref() != Some(MAGIC_COOKIE_VALUE) {
        return Err(ServeError::NoCookie);
    }
    if let Some(v) = get("PLUGIN_PROTOCOL_VERSIONS") {
        let ok = v
            .split(',')
            .any(|p| p.trim() == APP_PROTOCOL_VERSION.to_string());
        if !v.trim().is_empty() && !ok {
            return Err(ServeError::Protocol(v));
        }
    }
    Ok(())
}

pub fn handshake_line(socket: &Path) -> String {
    format!(
        "{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc|",
        socket.display()
    )
}

struct HealthService;

#[tonic::async_trait]
impl health::health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        // go-plugin's host checks the service named "plugin"; "" means the whole server.
        if service.is_empty() || service == "plugin" {
            Ok(Response::new(health::HealthCheckResponse {
                status: health::health_check_response::ServingStatus::Serving as i32,
            }))
        } else {
            Err(Status::not_found(format!("unknown service {service:?}")))
        }
    }

    type WatchStream = futures::stream::Empty<Result<health::HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<health::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "health Watch is not supported; go-plugin uses Check",
        ))
    }
}

struct ControllerService {
    stop: Arc<Notify>,
}

#[tonic::async_trait]
impl ctl::grpc_controller_server::GrpcController for ControllerService {
    async fn shutdown(&self, _: Request<ctl::Empty>) -> Result<Response<ctl::Empty>, Status> {
        tracing::info!("shutdown requested by the plugin host");
        self.stop.notify_one();
        Ok(Response::new(ctl::Empty {}))
    }
}

fn socket_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!("plugin{}{:09}", std::process::id(), nanos))
}

/// Serves until the host calls Shutdown or the process gets SIGTERM.
pub async fn serve(shared: Arc<Shared>) -> Result<(), ServeError> {
    let path = socket_path();
    let listener = UnixListener::bind(&path).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    let stop = Arc::new(Notify::new());
    let server = tonic::transport::Server::builder()
        .add_service(health::health_server::HealthServer::new(HealthService))
        .add_service(ctl::grpc_controller_server::GrpcControllerServer::new(
            ControllerService { stop: stop.clone() },
        ))
        .add_service(BasePluginServer::new(BaseService::new(shared.clone())))
        .add_service(DriverServer::new(DriverService::new(shared.clone())));

    // The socket is bound, so the host can connect as soon as it reads this line.
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{}", handshake_line(&path));
        let _ = out.flush();
    }
    tracing::info!(socket = %path.display(), "plugin serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let stop_wait = stop.clone();
    let shutdown_signal = async move {
        tokio::select! {
            _ = stop_wait.notified() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => tracing::info!("SIGTERM received"),
        }
    };
    // SIGINT goes to the whole foreground group when an operator presses Ctrl-C at the agent;
    // the host decides when plugins stop, so the plugin ignores it, as go-plugin servers do.
    tokio::spawn(async {
        if let Ok(mut int) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        {
            while int.recv().await.is_some() {
                tracing::debug!("ignoring SIGINT");
            }
        }
    });
    let stream_shutdown = shared.clone();
    let result = server
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown_signal.await;
            // Long-lived streams (Fingerprint, TaskEvents, TaskStats) must end or graceful
            // shutdown would wait for them forever.
            stream_shutdown.shutdown.send_replace(true);
            // Give in-flight calls (e.g. the Shutdown reply itself) a moment to finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await;
    let _ = std::fs::remove_file(&path);
    tracing::info!("plugin stopped; tasks keep running");
    result.map_err(ServeError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_and_protocol_checks() {
        let env = |pairs: Vec<(&'static str, &'static str)>| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(pk, _)| *pk == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(matches!(check_env(env(vec![])), Err(ServeError::NoCookie)));
        assert!(matches!(
            check_env(env(vec![(MAGIC_COOKIE_KEY, "nope")])),
            Err(ServeError::NoCookie)
        ));
        assert!(check_env(env(vec![(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)])).is_ok());
        assert!(check_env(env(vec![
            (MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE),
            ("PLUGIN_PROTOCOL_VERSIONS", "2")
        ]))
        .is_ok());
        assert!(matches!(
            check_env(env(vec![
                (MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE),
                ("PLUGIN_PROTOCOL_VERSIONS", "1,3")
            ])),
            Err(ServeError::Protocol(_))
        ));
        assert_eq!(
            handshake_line(Path::new("/tmp/plugin1")),
            "1|2|unix|/tmp/plugin1|grpc|"
        );
    }
}
