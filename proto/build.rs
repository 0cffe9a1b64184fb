//! Compiles `proto/sync.proto` with protox (pure Rust), so the build never needs a system `protoc`.

fn main() {
    let fds = protox::compile(["sync.proto"], ["proto"]).expect("proto/sync.proto failed to compile");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(fds)
        .expect("generating tonic code from proto/sync.proto failed");
    println!("cargo:rerun-if-changed=proto/sync.proto");
}
