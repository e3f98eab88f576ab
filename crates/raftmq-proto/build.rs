//! Compiles `proto/**/*.proto` with a vendored `protoc`, so no system protobuf compiler is needed.
fn config() -> Result<prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    Ok(config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_with_config(
        config()?,
        &[
            "../../proto/raftmq/state/v1/state.proto",
            "../../proto/raftmq/raft/v1/raft.proto",
        ],
        &["../../proto"],
    )?;
    // `raftmq.forward.v1` imports `raftmq.state.v1`, generated above into `crate::state` (the
    // packages are flattened into `crate::state`, `crate::raft`, `crate::forward`).
    let mut forward = config()?;
    forward.extern_path(".raftmq.state.v1", "crate::state");
    tonic_prost_build::configure().compile_with_config(
        forward,
        &["../../proto/raftmq/forward/v1/forward.proto"],
        &["../../proto"],
    )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
