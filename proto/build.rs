//! Compiles the .proto files with protox (a pure-Rust protobuf compiler: no system protoc).

/// Messages that carry shares, PINs, plaintext, associated data, or messages to sign or
/// MAC: their `Debug` is written by hand in src/lib.rs and prints sizes, not contents.
const REDACTED: &[&str] = &[
    "kms.v1.InitRequest",
    "kms.v1.InitResponse",
    "kms.v1.UnsealRequest",
    "kms.v1.RekeySubmitRequest",
    "kms.v1.RekeySubmitResponse",
    "kms.v1.VerifyShareRequest",
    "kms.v1.EncryptRequest",
    "kms.v1.DecryptRequest",
    "kms.v1.DecryptResponse",
    "kms.v1.AsymmetricDecryptResponse",
    "kms.v1.ImportKeyMaterialRequest",
    "kms.v1.GetImportParametersResponse",
    "kms.v1.ReEncryptRequest",
    "kms.v1.GenerateDataKeyRequest",
    "kms.v1.GenerateDataKeyResponse",
    "kms.v1.SignRequest",
    "kms.v1.VerifyRequest",
    "kms.v1.MacRequest",
    "kms.v1.VerifyMacRequest",
    "kms.v1.EncryptItem",
    "kms.v1.DecryptItem",
    "kms.v1.ReEncryptItem",
    "kms.v1.SignItem",
    "kms.v1.CreateGrantRequest",
    "kms.v1.PutSecretRequest",
    "kms.v1.GetSecretResponse",
    "kms.v1.PatchSecretRequest",
    "kms.v1.GetSecretSubkeysResponse",
    "kms.v1.IssueJwtResponse",
    "kms.v1.ValidateJwtRequest",
    "kms.v1.PutDatabaseConnectionRequest",
    "kms.v1.GetDatabaseCredentialsResponse",
    "kms.v1.GetDatabaseStaticCredentialsResponse",
    // The Kubernetes KMS v2 plugin's messages: the apiserver's data-encryption-key seeds.
    "v2.EncryptRequest",
    "v2.DecryptResponse",
];

/// kube-apiserver's KMS v2 plugin API, as published in k8s.io/kms (`apis/v2/api.proto`),
/// copied unchanged: package, names and field numbers are the apiserver's client's.
const KUBERNETES_KMS: &str = "k8s/kms/apis/v2/api.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "kms/v1/system.proto",
        "kms/v1/keys.proto",
        "kms/v1/audit.proto",
        "kms/v1/access.proto",
        "kms/v1/secrets.proto",
        "kms/v1/credentials.proto",
        "kms/v1/databases.proto",
    ];
    for p in protos.iter().chain([&KUBERNETES_KMS]) {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    // The descriptors themselves, for the server reflection service (grpcurl, Postman).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("kms_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Maps as BTreeMaps: a message encodes the same way every time (a retried change's
    // request is compared by its encoding: kms::grpc, RETRIED_CHANGES).
    tonic_prost_build::configure()
        .btree_map(".")
        .skip_debug(REDACTED)
        .compile_fds(fds)?;
    // Apart from ours: no reflection for it (the socket serves the apiserver only).
    tonic_prost_build::configure()
        .btree_map(".")
        .skip_debug(REDACTED)
        .compile_fds(protox::compile([KUBERNETES_KMS], ["."])?)?;
    Ok(())
}
