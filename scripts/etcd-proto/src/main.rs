//! Compiles etcd's API (`proto/etcd/*.proto`) into the gRPC clients and
//! messages ferry commits under `src/agent/etcd/gen/`.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let protos = root.join("proto/etcd");
    let out = root.join("src/agent/etcd/gen");
    let files = ["rpc.proto", "kv.proto", "auth.proto"].map(|f| protos.join(f));
    let fds = protox::compile(files, [&protos])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .out_dir(&out)
        .compile_fds(fds)?;
    println!("wrote {}", out.display());
    Ok(())
}
