//! Compiles the .proto files with protox (a pure-Rust protobuf compiler: no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["kms/v1/system.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        // Requests and responses that carry shares get a hand-written Debug that redacts them.
        .skip_debug([
            "kms.v1.InitRequest",
            "kms.v1.InitResponse",
            "kms.v1.UnsealRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
