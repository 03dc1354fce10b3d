//! Generated protobuf and gRPC code for every service the plugin speaks: Nomad's BasePlugin and
//! Driver (with hclspec and shared structs), grpc.health.v1 and go-plugin's controller. The
//! module tree mirrors the proto package names so that cross-package references resolve.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod hashicorp {
    pub mod nomad {
        pub mod plugins {
            pub mod base {
                pub mod proto {
                    tonic::include_proto!("hashicorp.nomad.plugins.base.proto");
                }
            }
            pub mod drivers {
                pub mod proto {
                    tonic::include_proto!("hashicorp.nomad.plugins.drivers.proto");
                }
            }
            pub mod shared {
                pub mod hclspec {
                    tonic::include_proto!("hashicorp.nomad.plugins.shared.hclspec");
                }
                pub mod structs {
                    tonic::include_proto!("hashicorp.nomad.plugins.shared.structs");
                }
            }
        }
    }
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

pub mod plugin {
    tonic::include_proto!("plugin");
}

pub use hashicorp::nomad::plugins::base::proto as base;
pub use hashicorp::nomad::plugins::drivers::proto as drivers;
pub use hashicorp::nomad::plugins::shared::hclspec;
pub use hashicorp::nomad::plugins::shared::structs;
