//! The `hashicorp.nomad.plugins.base.proto.BasePlugin` service: what the plugin is
//! (PluginInfo), the HCL schema of its agent configuration (ConfigSchema), and applying that
//! configuration (SetConfig). Nomad calls SetConfig once without `nomad_config` only to
//! validate, and again on the long-lived instance; both decode and validate the same way.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::config::{self, PluginConfig};
use crate::proto::base::{self as pb, base_plugin_server::BasePlugin};
use crate::tasks::Shared;

/// The jobspec `driver = "…"` value; go-plugin's loader also requires it to match the binary
/// name after the `nomad-driver-` prefix.
pub const PLUGIN_NAME: &str = "transcode";
/// Nomad's plugin API version this driver implements.
pub const PLUGIN_API_VERSION: &str = "v0.1.0";

pub struct BaseService {
    shared: Arc<Shared>,
}

impl BaseService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl BasePlugin for BaseService {
    async fn plugin_info(
        &self,
        _: Request<pb::PluginInfoRequest>,
    ) -> Result<Response<pb::PluginInfoResponse>, Status> {
        Ok(Response::new(pb::PluginInfoResponse {
            r#type: pb::PluginType::Driver as i32,
            plugin_api_versions: vec![PLUGIN_API_VERSION.to_owned()],
            plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
            name: PLUGIN_NAME.to_owned(),
        }))
    }

    async fn config_schema(
        &self,
        _: Request<pb::ConfigSchemaRequest>,
    ) -> Result<Response<pb::ConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::ConfigSchemaResponse {
            spec: Some(config::plugin_schema()),
        }))
    }

    async fn set_config(
        &self,
        request: Request<pb::SetConfigRequest>,
    ) -> Result<Response<pb::SetConfigResponse>, Status> {
        let req = request.into_inner();
        if !req.plugin_api_version.is_empty() && req.plugin_api_version != PLUGIN_API_VERSION {
            return Err(Status::invalid_argument(format!(
                "plugin API version {:?} is not supported; this driver speaks {PLUGIN_API_VERSION}",
                req.plugin_api_version
            )));
        }
        let cfg = PluginConfig::from_msgpack(&req.msgpack_config).map_err(|e| {
            Status::invalid_argument(format!(
                "invalid plugin \"{PLUGIN_NAME}\" config block: {e}"
            ))
        })?;
        tracing::info!(
            worker_binary = %cfg.worker_binary,
            cgroup_parent = %cfg.cgroup_parent,
            state_dir = %cfg.state_dir.display(),
            stats_interval = ?cfg.stats_interval,
            cgroup = %match &self.shared.layout {
                Ok(l) => l.name().to_owned(),
                Err(e) => format!("none ({e})"),
            },
            validation_only = req.nomad_config.is_none(),
            "plugin configured"
        );
        *self.shared.config.write().await = Some(cfg);
        Ok(Response::new(pb::SetConfigResponse {}))
    }
}
