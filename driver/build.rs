//! Generates the gRPC server and client code from the hand-written protos under `proto/`.
//! Clients are generated too because the integration tests act as the Nomad client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/hashicorp/nomad/plugins/base/proto/base.proto",
        "proto/hashicorp/nomad/plugins/drivers/proto/driver.proto",
        "proto/hashicorp/nomad/plugins/shared/hclspec/hcl_spec.proto",
        "proto/hashicorp/nomad/plugins/shared/structs/proto/attribute.proto",
        "proto/hashicorp/nomad/plugins/shared/structs/proto/recoverable_error.proto",
        "proto/grpc/health/v1/health.proto",
        "proto/plugin/grpc_controller.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
