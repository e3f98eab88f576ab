//! Compiles `proto/**/*.proto` with a vendored `protoc`, so no system protobuf compiler is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    // The packages are flattened into `crate::state`, `crate::raft`, `crate::forward`.
    config.extern_path(".raftmq.state.v1", "crate::state");
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "../../proto/raftmq/state/v1/state.proto",
            "../../proto/raftmq/raft/v1/raft.proto",
            "../../proto/raftmq/forward/v1/forward.proto",
        ],
        &["../../proto"],
    )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
