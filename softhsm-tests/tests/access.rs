//! Who may do what, over real mTLS against a real server and SoftHSM token: every RPC
//! tried by every kind of caller, certificates the handshake must refuse, grants revoked
//! and constrained, the limit on failed unseal shares, and certificate rotation without a
//! restart while a client keeps calling.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use kms_proto::v1::access_client::AccessClient;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::credentials_client::CredentialsClient;
use kms_proto::v1::databases_client::DatabasesClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_proto::v1::secrets_client::SecretsClient;
use kms_proto::v1::system_client::SystemClient;
use softhsm_tests::{ClientSpec, Cred, Pki, Server, TestHsm, spiffe, start_unsealed, try_channel};
use tonic::Code;
use tonic::transport::Channel;

/// Every RPC of the API.
const RPCS: &[&str] = &[
    "System/Status",
    "System/Unseal",
    "System/Init",
    "Access/WhoAmI",
    "Access/CreateGrant",
    "Access/ListGrants",
    "Access/RevokeGrant",
    "KeyManagement/CreateKey",
    "KeyManagement/GetKey",
    "KeyManagement/ListKeys",
    "KeyManagement/RotateKey",
    "KeyManagement/GetImportParameters",
    "KeyManagement/ImportKeyMaterial",
    "KeyManagement/UpdateKey",
    "KeyManagement/DisableKeyVersion",
    "KeyManagement/EnableKeyVersion",
    "KeyManagement/ScheduleKeyVersionDestruction",
    "KeyManagement/CancelKeyVersionDestruction",
    "KeyManagement/Encrypt",
    "KeyManagement/Decrypt",
    "KeyManagement/ReEncrypt",
    "KeyManagement/GenerateDataKey",
    "KeyManagement/GenerateDataKeyWithoutPlaintext",
    "KeyManagement/Sign",
    "KeyManagement/Verify",
    "KeyManagement/GetPublicKey",
    "KeyManagement/AsymmetricDecrypt",
    "KeyManagement/Mac",
    "KeyManagement/VerifyMac",
    "KeyManagement/BatchEncrypt",
    "KeyManagement/BatchDecrypt",
    "KeyManagement/BatchSign",
    "KeyManagement/BatchReEncrypt",
    "Secrets/PutSecret",
    "Secrets/GetSecret",
    "Secrets/PatchSecret",
    "Secrets/ListSecrets",
    "Secrets/GetSecretSubkeys",
    "Secrets/DeleteSecretVersions",
    "Secrets/UndeleteSecretVersions",
    "Secrets/DestroySecretVersions",
    "Secrets/GetSecretMetadata",
    "Secrets/UpdateSecretMetadata",
    "Secrets/DeleteSecret",
    "Secrets/GetSecretsConfig",
    "Secrets/UpdateSecretsConfig",
    "Secrets/CreateSecretGrant",
    "Secrets/ListSecretGrants",
    "Secrets/RevokeSecretGrant",
    "Credentials/CreateIssuer",
    "Credentials/GetIssuer",
    "Credentials/ListIssuers",
    "Credentials/UpdateIssuer",
    "Credentials/IssueJwt",
    "Credentials/ValidateJwt",
    "Credentials/RevokeJwt",
    "Credentials/IssueX509",
    "Credentials/GetIssuerCsr",
    "Credentials/SetIssuerCertificate",
    "Credentials/RotateIssuer",
    "Credentials/IssueSsh",
    "Databases/PutDatabaseConnection",
    "Databases/GetDatabaseConnection",
    "Databases/ListDatabaseConnections",
    "Databases/DeleteDatabaseConnection",
    "Databases/RotateDatabaseRoot",
    "Databases/PutDatabaseRole",
    "Databases/GetDatabaseRole",
    "Databases/ListDatabaseRoles",
    "Databases/DeleteDatabaseRole",
    "Databases/GetDatabaseCredentials",
    "Databases/RenewLease",
    "Databases/RevokeLease",
    "Databases/RevokeLeasePrefix",
    "Databases/LookupLease",
    "Databases/ListLeases",
    "Databases/PutDatabaseStaticRole",
    "Databases/GetDatabaseStaticRole",
    "Databases/ListDatabaseStaticRoles",
    "Databases/DeleteDatabaseStaticRole",
    "Databases/GetDatabaseStaticCredentials",
    "Databases/RotateDatabaseStaticRole",
    "Audit/ExportAuditLog",
    "Audit/KeyUsageReport",
    "Audit/VerifyAuditLog",
    "System/CreateBackup",
    "System/RekeyInit",
    "System/RekeySubmit",
    "System/RekeyCancel",
    "System/VerifyShare",
    "System/RotateMasterKey",
    "System/TakeOver",
    // Last: it seals the server.
    "System/Seal",
];

/// A public key to certify (IssueSsh): Ed25519, as ssh-keygen writes id.pub.
const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH me@host";

/// A connection URL to a port where no database listens: the matrix's calls never reach
/// one (connections are stored with `skip_verify`).
const NO_DATABASE: &str = "postgresql://{{username}}:{{password}}@127.0.0.1:1/app?sslmode=disable";

/// A lease id of the right form that no lease has.
const NO_LEASE: &str = "database/creds/app/NoSuchLease0000000000000";

/// What the matrix needs that was made beforehand.
struct Fixture {
    ciphertext: Vec<u8>,
    /// Made with the `rsa` key's public key by openssl.
    rsa_ciphertext: Vec<u8>,
    signature: Vec<u8>,
    mac: Vec<u8>,
    grant_to_revoke: String,
    secret_grant_to_revoke: String,
}

/// Makes one call of `rpc` on `ch`; its code.
async fn call(rpc: &str, ch: Channel, f: &Fixture, n: usize) -> Code {
    let mut sys = SystemClient::new(ch.clone());
    let mut acc = AccessClient::new(ch.clone());
    let mut keys = KeyManagementClient::new(ch.clone());
    let mut sec = SecretsClient::new(ch.clone());
    let mut cred = CredentialsClient::new(ch.clone());
    let mut db = DatabasesClient::new(ch.clone());
    let mut aud = AuditClient::new(ch);
    let fresh = format!("made-{n}");
    let one = |k: &str| -> BTreeMap<String, String> { [(k.to_owned(), "v".to_owned())].into() };
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |()| Code::Ok);
    let enc = |pt: &[u8]| pb::EncryptRequest {
        key: "enc".into(),
        plaintext: pt.to_vec(),
        associated_data: b"ctx".to_vec(),
    };
    let version = |name: &str| pb::KeyVersionRequest {
        name: name.into(),
        version: 1,
    };
    code(match rpc {
        "System/Status" => sys.status(pb::StatusRequest {}).await.map(drop),
        "System/Unseal" => sys
            .unseal(pb::UnsealRequest {
                share: "kms1-NOTASHARE".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "System/Init" => sys
            .init(pb::InitRequest {
                shares: 3,
                threshold: 2,
                hsm_pin: String::new(),
                recipients: Vec::new(),
            })
            .await
            .map(drop),
        "System/Seal" => sys.seal(pb::SealRequest {}).await.map(drop),
        "System/RekeyInit" => sys
            .rekey_init(pb::RekeyInitRequest {
                shares: 3,
                threshold: 2,
                recipients: Vec::new(),
            })
            .await
            .map(drop),
        "System/RekeySubmit" => sys
            .rekey_submit(pb::RekeySubmitRequest {
                share: "kms1-NOTASHARE".into(),
                nonce: String::new(),
            })
            .await
            .map(drop),
        "System/RekeyCancel" => sys.rekey_cancel(pb::RekeyCancelRequest {}).await.map(drop),
        "System/RotateMasterKey" => sys
            .rotate_master_key(pb::RotateMasterKeyRequest::default())
            .await
            .map(drop),
        "System/TakeOver" => sys.take_over(pb::TakeOverRequest {}).await.map(drop),
        "System/VerifyShare" => sys
            .verify_share(pb::VerifyShareRequest {
                share: "kms1-NOTASHARE".into(),
            })
            .await
            .map(drop),
        "Access/WhoAmI" => acc.who_am_i(pb::WhoAmIRequest {}).await.map(drop),
        "Access/CreateGrant" => acc
            .create_grant(pb::CreateGrantRequest {
                key: "enc".into(),
                principal: spiffe("someone"),
                operations: vec![pb::Operation::Encrypt as i32],
                associated_data: None,
            })
            .await
            .map(drop),
        "Access/ListGrants" => acc
            .list_grants(pb::ListGrantsRequest::default())
            .await
            .map(drop),
        "Access/RevokeGrant" => acc
            .revoke_grant(pb::RevokeGrantRequest {
                id: f.grant_to_revoke.clone(),
            })
            .await
            .map(drop),
        "KeyManagement/CreateKey" => keys
            .create_key(pb::CreateKeyRequest {
                name: fresh,
                algorithm: pb::Algorithm::Aes256Gcm as i32,
                ..Default::default()
            })
            .await
            .map(drop),
        "KeyManagement/GetKey" => keys
            .get_key(pb::GetKeyRequest { name: "enc".into() })
            .await
            .map(drop),
        "KeyManagement/ListKeys" => keys
            .list_keys(pb::ListKeysRequest::default())
            .await
            .map(drop),
        "KeyManagement/RotateKey" => keys
            .rotate_key(pb::RotateKeyRequest { name: "tmp".into() })
            .await
            .map(drop),
        "KeyManagement/UpdateKey" => keys
            .update_key(pb::UpdateKeyRequest {
                name: "tmp".into(),
                update_labels: true,
                labels: [("owner".to_owned(), "ops".to_owned())].into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "KeyManagement/DisableKeyVersion" => {
            keys.disable_key_version(version("tmp")).await.map(drop)
        }
        "KeyManagement/EnableKeyVersion" => keys.enable_key_version(version("tmp")).await.map(drop),
        "KeyManagement/ScheduleKeyVersionDestruction" => keys
            .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
                name: "tmp".into(),
                version: 1,
                pending_days: 7,
            })
            .await
            .map(drop),
        "KeyManagement/CancelKeyVersionDestruction" => keys
            .cancel_key_version_destruction(version("tmp"))
            .await
            .map(drop),
        "KeyManagement/Encrypt" => keys.encrypt(enc(b"matrix")).await.map(drop),
        "KeyManagement/Decrypt" => keys
            .decrypt(pb::DecryptRequest {
                key: "enc".into(),
                ciphertext: f.ciphertext.clone(),
                associated_data: b"ctx".to_vec(),
            })
            .await
            .map(drop),
        "KeyManagement/ReEncrypt" => keys
            .re_encrypt(pb::ReEncryptRequest {
                key: "enc".into(),
                ciphertext: f.ciphertext.clone(),
                associated_data: b"ctx".to_vec(),
                destination_key: String::new(),
            })
            .await
            .map(drop),
        "KeyManagement/GenerateDataKey" => keys
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "enc".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "KeyManagement/GenerateDataKeyWithoutPlaintext" => keys
            .generate_data_key_without_plaintext(pb::GenerateDataKeyRequest {
                key: "enc".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "KeyManagement/Sign" => keys
            .sign(pb::SignRequest {
                key: "sig".into(),
                input: Some(pb::sign_request::Input::Message(b"doc".to_vec())),
                ..Default::default()
            })
            .await
            .map(drop),
        "KeyManagement/Verify" => keys
            .verify(pb::VerifyRequest {
                key: "sig".into(),
                key_version: 1,
                input: Some(pb::verify_request::Input::Message(b"doc".to_vec())),
                signature: f.signature.clone(),
            })
            .await
            .map(drop),
        "KeyManagement/GetPublicKey" => keys
            .get_public_key(pb::GetPublicKeyRequest {
                key: "sig".into(),
                key_version: 0,
            })
            .await
            .map(drop),
        "KeyManagement/GetImportParameters" => keys
            .get_import_parameters(pb::GetImportParametersRequest {
                key: "ext".into(),
                valid_for_seconds: 0,
            })
            .await
            .map(drop),
        // A token that is none: the admin gets past access control to INVALID_ARGUMENT.
        "KeyManagement/ImportKeyMaterial" => keys
            .import_key_material(pb::ImportKeyMaterialRequest {
                key: "ext".into(),
                import_token: b"not a token".to_vec(),
                wrapping_algorithm: pb::WrappingAlgorithm::RsaAesKeyWrapSha256 as i32,
                wrapped_material: vec![0; 600],
                public_key_pem: String::new(),
            })
            .await
            .map(drop),
        "KeyManagement/AsymmetricDecrypt" => keys
            .asymmetric_decrypt(pb::AsymmetricDecryptRequest {
                key: "rsa".into(),
                key_version: 0,
                ciphertext: f.rsa_ciphertext.clone(),
            })
            .await
            .map(drop),
        "KeyManagement/Mac" => keys
            .mac(pb::MacRequest {
                key: "mac".into(),
                message: b"m".to_vec(),
            })
            .await
            .map(drop),
        "KeyManagement/VerifyMac" => keys
            .verify_mac(pb::VerifyMacRequest {
                key: "mac".into(),
                key_version: 1,
                message: b"m".to_vec(),
                mac: f.mac.clone(),
            })
            .await
            .map(drop),
        "KeyManagement/BatchEncrypt" => keys
            .batch_encrypt(pb::BatchEncryptRequest {
                key: "enc".into(),
                items: vec![pb::EncryptItem {
                    plaintext: b"b".to_vec(),
                    associated_data: b"ctx".to_vec(),
                }],
            })
            .await
            .map(drop),
        "KeyManagement/BatchDecrypt" => keys
            .batch_decrypt(pb::BatchDecryptRequest {
                key: "enc".into(),
                items: vec![pb::DecryptItem {
                    ciphertext: f.ciphertext.clone(),
                    associated_data: b"ctx".to_vec(),
                }],
            })
            .await
            .map(drop),
        "KeyManagement/BatchSign" => keys
            .batch_sign(pb::BatchSignRequest {
                key: "sig".into(),
                items: vec![pb::SignItem {
                    input: Some(pb::sign_item::Input::Message(b"d".to_vec())),
                }],
                ..Default::default()
            })
            .await
            .map(drop),
        "KeyManagement/BatchReEncrypt" => keys
            .batch_re_encrypt(pb::BatchReEncryptRequest {
                key: "enc".into(),
                items: vec![pb::ReEncryptItem {
                    ciphertext: f.ciphertext.clone(),
                    associated_data: b"ctx".to_vec(),
                }],
                destination_key: String::new(),
            })
            .await
            .map(drop),
        "Audit/ExportAuditLog" => match aud
            .export_audit_log(pb::ExportAuditLogRequest::default())
            .await
        {
            Ok(r) => {
                let mut s = r.into_inner();
                let mut out = Ok(());
                while let Some(chunk) = s.message().await.transpose() {
                    if let Err(e) = chunk {
                        out = Err(e);
                        break;
                    }
                }
                out
            }
            Err(e) => Err(e),
        },
        "System/CreateBackup" => match sys.create_backup(pb::CreateBackupRequest {}).await {
            Ok(r) => {
                let mut s = r.into_inner();
                let mut out = Ok(());
                while let Some(chunk) = s.message().await.transpose() {
                    if let Err(e) = chunk {
                        out = Err(e);
                        break;
                    }
                }
                out
            }
            Err(e) => Err(e),
        },
        "Secrets/PutSecret" => sec
            .put_secret(pb::PutSecretRequest {
                path: format!("app/{fresh}"),
                data: one("k"),
                cas: None,
            })
            .await
            .map(drop),
        "Secrets/GetSecret" => sec
            .get_secret(pb::GetSecretRequest {
                path: "app/read".into(),
                version: 0,
            })
            .await
            .map(drop),
        "Secrets/PatchSecret" => sec
            .patch_secret(pb::PatchSecretRequest {
                path: "app/patch".into(),
                set: one("k2"),
                ..Default::default()
            })
            .await
            .map(drop),
        "Secrets/ListSecrets" => sec
            .list_secrets(pb::ListSecretsRequest {
                prefix: "app/".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Secrets/GetSecretSubkeys" => sec
            .get_secret_subkeys(pb::GetSecretSubkeysRequest {
                path: "app/read".into(),
                version: 0,
            })
            .await
            .map(drop),
        "Secrets/DeleteSecretVersions" => sec
            .delete_secret_versions(pb::SecretVersionsRequest {
                path: "app/del".into(),
                versions: Vec::new(),
            })
            .await
            .map(drop),
        "Secrets/UndeleteSecretVersions" => sec
            .undelete_secret_versions(pb::SecretVersionsRequest {
                path: "app/del".into(),
                versions: vec![1],
            })
            .await
            .map(drop),
        "Secrets/DestroySecretVersions" => sec
            .destroy_secret_versions(pb::SecretVersionsRequest {
                path: "app/destroy".into(),
                versions: vec![1],
            })
            .await
            .map(drop),
        "Secrets/GetSecretMetadata" => sec
            .get_secret_metadata(pb::GetSecretMetadataRequest {
                path: "app/read".into(),
            })
            .await
            .map(drop),
        "Secrets/UpdateSecretMetadata" => sec
            .update_secret_metadata(pb::UpdateSecretMetadataRequest {
                path: format!("app/{fresh}"),
                max_versions: Some(3),
                ..Default::default()
            })
            .await
            .map(drop),
        "Secrets/DeleteSecret" => sec
            .delete_secret(pb::DeleteSecretRequest {
                path: "app/gone".into(),
            })
            .await
            .map(drop),
        "Credentials/CreateIssuer" => cred
            .create_issuer(pb::CreateIssuerRequest {
                issuer: Some(pb::Issuer {
                    name: fresh.clone(),
                    key: "jwt".into(),
                    principals: vec![spiffe("payments-api")],
                    audiences: vec!["payments".into()],
                    ..Default::default()
                }),
            })
            .await
            .map(drop),
        "Credentials/GetIssuer" => cred
            .get_issuer(pb::GetIssuerRequest {
                name: "workloads".into(),
            })
            .await
            .map(drop),
        "Credentials/ListIssuers" => cred.list_issuers(pb::ListIssuersRequest {}).await.map(drop),
        "Credentials/UpdateIssuer" => cred
            .update_issuer(pb::UpdateIssuerRequest {
                name: "workloads".into(),
                max_ttl_seconds: Some(900),
                ..Default::default()
            })
            .await
            .map(drop),
        "Credentials/IssueJwt" => cred
            .issue_jwt(pb::IssueJwtRequest {
                issuer: "workloads".into(),
                audience: "payments".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Credentials/IssueSsh" => cred
            .issue_ssh(pb::IssueSshRequest {
                issuer: "ssh-users".into(),
                public_key: SSH_KEY.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Credentials/ValidateJwt" => cred
            .validate_jwt(pb::ValidateJwtRequest {
                issuer: "workloads".into(),
                token: "a.b.c".into(),
                audience: "payments".into(),
            })
            .await
            .map(drop),
        "Credentials/RevokeJwt" => cred
            .revoke_jwt(pb::RevokeJwtRequest {
                issuer: "workloads".into(),
                jti: format!("{n:032x}"),
            })
            .await
            .map(drop),
        "Credentials/IssueX509" => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            cred.issue_x509(pb::IssueX509Request {
                issuer: "certs".into(),
                csr: csr.der().to_vec(),
                ..Default::default()
            })
            .await
            .map(drop)
        }
        "Credentials/GetIssuerCsr" => cred
            .get_issuer_csr(pb::GetIssuerCsrRequest {
                issuer: "certs".into(),
                key_version: 0,
            })
            .await
            .map(drop),
        // The issuer signs its own CA certificates: a valid caller is refused the change.
        "Credentials/SetIssuerCertificate" => cred
            .set_issuer_certificate(pb::SetIssuerCertificateRequest {
                issuer: "certs".into(),
                key_version: 1,
                chain_pem: String::new(),
            })
            .await
            .map(drop),
        "Credentials/RotateIssuer" => cred
            .rotate_issuer(pb::RotateIssuerRequest {
                name: "certs".into(),
            })
            .await
            .map(drop),
        "Databases/PutDatabaseConnection" => db
            .put_database_connection(pb::PutDatabaseConnectionRequest {
                connection: Some(pb::DatabaseConnection {
                    name: fresh.clone(),
                    connection_url: NO_DATABASE.into(),
                    username: "root".into(),
                    ..Default::default()
                }),
                password: "matrix-root-password".into(),
                skip_verify: true,
            })
            .await
            .map(drop),
        "Databases/GetDatabaseConnection" => db
            .get_database_connection(pb::GetDatabaseConnectionRequest { name: "pg".into() })
            .await
            .map(drop),
        "Databases/ListDatabaseConnections" => db
            .list_database_connections(pb::ListDatabaseConnectionsRequest {})
            .await
            .map(drop),
        "Databases/DeleteDatabaseConnection" => db
            .delete_database_connection(pb::DeleteDatabaseConnectionRequest {
                name: "spare".into(),
                force: false,
            })
            .await
            .map(drop),
        // A connection that does not exist: the admin gets past access control to
        // NOT_FOUND, before any database.
        "Databases/RotateDatabaseRoot" => db
            .rotate_database_root(pb::RotateDatabaseRootRequest {
                name: "nosuch".into(),
            })
            .await
            .map(drop),
        "Databases/PutDatabaseRole" => db
            .put_database_role(pb::PutDatabaseRoleRequest {
                role: Some(pb::DatabaseRole {
                    name: fresh.clone(),
                    connection: "pg".into(),
                    creation_statements: vec!["CREATE ROLE \"{{name}}\"".into()],
                    ..Default::default()
                }),
            })
            .await
            .map(drop),
        "Databases/GetDatabaseRole" => db
            .get_database_role(pb::GetDatabaseRoleRequest { name: "app".into() })
            .await
            .map(drop),
        "Databases/ListDatabaseRoles" => db
            .list_database_roles(pb::ListDatabaseRolesRequest {})
            .await
            .map(drop),
        "Databases/DeleteDatabaseRole" => db
            .delete_database_role(pb::DeleteDatabaseRoleRequest {
                name: "spare-role".into(),
                force: false,
            })
            .await
            .map(drop),
        // Longer than the role allows: its principal gets past the role's check to
        // INVALID_ARGUMENT, before any lease is stored or database reached.
        "Databases/GetDatabaseCredentials" => db
            .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                role: "app".into(),
                ttl_seconds: 1_000_000_000,
            })
            .await
            .map(drop),
        "Databases/RenewLease" => db
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: NO_LEASE.into(),
                increment_seconds: 0,
            })
            .await
            .map(drop),
        "Databases/RevokeLease" => db
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: NO_LEASE.into(),
                force: false,
            })
            .await
            .map(drop),
        "Databases/RevokeLeasePrefix" => db
            .revoke_lease_prefix(pb::RevokeLeasePrefixRequest {
                prefix: "database/creds/app/".into(),
            })
            .await
            .map(drop),
        "Databases/LookupLease" => db
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: NO_LEASE.into(),
            })
            .await
            .map(drop),
        "Databases/ListLeases" => db
            .list_leases(pb::ListLeasesRequest::default())
            .await
            .map(drop),
        // Static roles of a connection or name that does not exist: the admin gets past
        // access control to NOT_FOUND, before any database.
        "Databases/PutDatabaseStaticRole" => db
            .put_database_static_role(pb::PutDatabaseStaticRoleRequest {
                role: Some(pb::DatabaseStaticRole {
                    name: fresh.clone(),
                    connection: "nosuch".into(),
                    username: "legacy".into(),
                    ..Default::default()
                }),
            })
            .await
            .map(drop),
        "Databases/GetDatabaseStaticRole" => db
            .get_database_static_role(pb::GetDatabaseStaticRoleRequest {
                name: "nosuch".into(),
            })
            .await
            .map(drop),
        "Databases/ListDatabaseStaticRoles" => db
            .list_database_static_roles(pb::ListDatabaseStaticRolesRequest {})
            .await
            .map(drop),
        "Databases/DeleteDatabaseStaticRole" => db
            .delete_database_static_role(pb::DeleteDatabaseStaticRoleRequest {
                name: "nosuch".into(),
            })
            .await
            .map(drop),
        "Databases/GetDatabaseStaticCredentials" => db
            .get_database_static_credentials(pb::GetDatabaseStaticCredentialsRequest {
                name: "nosuch".into(),
            })
            .await
            .map(drop),
        "Databases/RotateDatabaseStaticRole" => db
            .rotate_database_static_role(pb::RotateDatabaseStaticRoleRequest {
                name: "nosuch".into(),
            })
            .await
            .map(drop),
        "Secrets/GetSecretsConfig" => sec
            .get_secrets_config(pb::GetSecretsConfigRequest {})
            .await
            .map(drop),
        "Secrets/UpdateSecretsConfig" => sec
            .update_secrets_config(pb::UpdateSecretsConfigRequest {
                max_versions: Some(20),
                ..Default::default()
            })
            .await
            .map(drop),
        "Secrets/CreateSecretGrant" => sec
            .create_secret_grant(pb::CreateSecretGrantRequest {
                path: format!("{fresh}/*"),
                principal: spiffe("reader"),
                operations: vec![pb::SecretOperation::Read as i32],
            })
            .await
            .map(drop),
        "Secrets/ListSecretGrants" => sec
            .list_secret_grants(pb::ListSecretGrantsRequest::default())
            .await
            .map(drop),
        "Secrets/RevokeSecretGrant" => sec
            .revoke_secret_grant(pb::RevokeSecretGrantRequest {
                id: f.secret_grant_to_revoke.clone(),
            })
            .await
            .map(drop),
        "Audit/KeyUsageReport" => aud
            .key_usage_report(pb::KeyUsageReportRequest::default())
            .await
            .map(drop),
        "Audit/VerifyAuditLog" => aud
            .verify_audit_log(pb::VerifyAuditLogRequest::default())
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    })
}

#[test]
fn the_matrix_names_every_rpc() {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(kms_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut defined: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .flat_map(|s| {
            s.method
                .iter()
                .map(move |m| format!("{}/{}", s.name(), m.name()))
        })
        .collect();
    let mut named: Vec<String> = RPCS.iter().map(|r| (*r).to_owned()).collect();
    defined.sort();
    named.sort();
    assert_eq!(named, defined);
}

/// What `who` may do with `rpc`: `Ok` unless the cell is a refusal.
fn expected(who: &str, rpc: &str) -> Code {
    let (service, method) = rpc.split_once('/').unwrap();
    let open = matches!(rpc, "System/Status" | "Access/WhoAmI");
    let use_of_key = service == "KeyManagement"
        && !matches!(
            method,
            "CreateKey"
                | "GetKey"
                | "ListKeys"
                | "RotateKey"
                | "GetImportParameters"
                | "ImportKeyMaterial"
                | "UpdateKey"
                | "DisableKeyVersion"
                | "EnableKeyVersion"
                | "ScheduleKeyVersionDestruction"
                | "CancelKeyVersionDestruction"
        );
    if rpc == "System/Unseal" {
        // Custodians only (an unsealed server takes no share but answers its status).
        return match who {
            "custodian" => Code::Ok,
            "no-certificate" => Code::Unauthenticated,
            _ => Code::PermissionDenied,
        };
    }
    if matches!(rpc, "System/RekeySubmit" | "System/VerifyShare") {
        // Custodians only: no rekey is in progress when they call; the share is malformed.
        return match who {
            "custodian" if method == "RekeySubmit" => Code::FailedPrecondition,
            "custodian" => Code::InvalidArgument,
            "no-certificate" => Code::Unauthenticated,
            _ => Code::PermissionDenied,
        };
    }
    if open {
        return Code::Ok;
    }
    if service == "Credentials" {
        // Issuers: defined (and their CA certificates set) by the admin role, read by any
        // certificate. Tokens and certificates: the issuer's principals (the granted
        // service); no token is issued or validated without an HTTPS front to publish the
        // keys on (certificates need none).
        let allowed = match method {
            "CreateIssuer"
            | "UpdateIssuer"
            | "RevokeJwt"
            | "GetIssuerCsr"
            | "SetIssuerCertificate"
            | "RotateIssuer" => who == "admin",
            "IssueJwt" | "IssueX509" | "IssueSsh" => who == "granted-service",
            _ => who != "no-certificate",
        };
        return match (allowed, who) {
            (true, _) if matches!(method, "IssueJwt" | "ValidateJwt") => Code::FailedPrecondition,
            // The issuer signs its own CA certificates: it takes none, and makes no request
            // for an outside CA.
            (true, _) if matches!(method, "SetIssuerCertificate" | "GetIssuerCsr") => {
                Code::InvalidArgument
            }
            (true, _) => Code::Ok,
            (false, "no-certificate") => Code::Unauthenticated,
            (false, _) => Code::PermissionDenied,
        };
    }
    if service == "Databases" {
        // Connections, roles, listing and revoking by prefix: the admin role. A lease's
        // calls: any certificate passes the access layer, then the engine decides: the role
        // names only the granted service (the others are refused PERMISSION_DENIED, the
        // admin too: it is not among the role's principals), and a lease that is not the
        // caller's reads as absent (here no lease exists: NOT_FOUND for everyone).
        return match (method, who) {
            (_, "no-certificate") => Code::Unauthenticated,
            ("GetDatabaseCredentials", "granted-service") => Code::InvalidArgument,
            ("GetDatabaseCredentials", _) => Code::PermissionDenied,
            ("RenewLease" | "RevokeLease" | "LookupLease" | "GetDatabaseStaticCredentials", _) => {
                Code::NotFound
            }
            (
                "RotateDatabaseRoot"
                | "PutDatabaseStaticRole"
                | "GetDatabaseStaticRole"
                | "DeleteDatabaseStaticRole"
                | "RotateDatabaseStaticRole",
                "admin",
            ) => Code::NotFound,
            (_, "admin") => Code::Ok,
            _ => Code::PermissionDenied,
        };
    }
    if service == "Secrets" {
        // The engine's settings: any certificate. Its settings and grants: the admin role.
        // Everything else: a grant on the path (the admin role holds none).
        let allowed = match method {
            "GetSecretsConfig" => who != "no-certificate",
            "UpdateSecretsConfig"
            | "CreateSecretGrant"
            | "RevokeSecretGrant"
            | "ListSecretGrants" => who == "admin",
            _ => who == "granted-service",
        };
        return match (allowed, who) {
            (true, _) => Code::Ok,
            (false, "no-certificate") => Code::Unauthenticated,
            (false, _) => Code::PermissionDenied,
        };
    }
    let allowed = match who {
        "admin" => !use_of_key && service != "Audit",
        "auditor" => service == "Audit",
        "granted-service" => use_of_key,
        _ => false,
    };
    match (allowed, who) {
        // The server is initialised already.
        (true, _) if rpc == "System/Init" => Code::FailedPrecondition,
        (true, _) if rpc == "KeyManagement/ImportKeyMaterial" => Code::InvalidArgument,
        // This instance was not restored from a backup: nothing to take over.
        (true, _) if rpc == "System/TakeOver" => Code::FailedPrecondition,
        (true, _) => Code::Ok,
        (false, "no-certificate") => Code::Unauthenticated,
        (false, _) => Code::PermissionDenied,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_by_every_kind_of_caller() {
    let hsm = TestHsm::new("kms-matrix");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let app = hsm.pki.client("app", &ClientSpec::spiffe("payments-api"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("reports"));
    let stranger = hsm.pki.client("stranger", &ClientSpec::spiffe("stranger"));

    // Keys and grants, as the admin: the app may use enc, sig and mac; `other` may use
    // only a key of its own.
    let mut admin_keys = server.keys().await;
    for (name, alg) in [
        ("enc", pb::Algorithm::Aes256Gcm),
        ("sig", pb::Algorithm::Ed25519),
        ("mac", pb::Algorithm::HmacSha256),
        ("rsa", pb::Algorithm::RsaDecryptOaep2048Sha256),
        ("ext", pb::Algorithm::Aes256Gcm),
        ("tmp", pb::Algorithm::Aes256Gcm),
        ("reports", pb::Algorithm::Aes256Gcm),
        ("jwt", pb::Algorithm::EcdsaP256Sha256),
        ("x509", pb::Algorithm::EcdsaP256Sha256),
        ("ssh", pb::Algorithm::EcdsaP256Sha256),
    ] {
        admin_keys
            .create_key(pb::CreateKeyRequest {
                name: name.into(),
                algorithm: alg as i32,
                // `ext` awaits an import (GetImportParameters, ImportKeyMaterial).
                origin: if name == "ext" {
                    pb::KeyOrigin::External as i32
                } else {
                    0
                },
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for key in ["enc", "sig", "mac", "rsa"] {
        server.grant(key, &app.principal).await;
    }
    server.grant("reports", &other.principal).await;
    let grant_to_revoke = server.grant("tmp", &spiffe("short-lived")).await;

    let mut app_keys = server.keys_as(Some(&app)).await;
    let ciphertext = app_keys
        .encrypt(pb::EncryptRequest {
            key: "enc".into(),
            plaintext: b"p".to_vec(),
            associated_data: b"ctx".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let signature = app_keys
        .sign(pb::SignRequest {
            key: "sig".into(),
            input: Some(pb::sign_request::Input::Message(b"doc".to_vec())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .signature;
    let mac = app_keys
        .mac(pb::MacRequest {
            key: "mac".into(),
            message: b"m".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .mac;
    let pem = app_keys
        .get_public_key(pb::GetPublicKeyRequest {
            key: "rsa".into(),
            key_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .pem;
    std::fs::write(hsm.path().join("rsa.pem"), pem).unwrap();
    std::fs::write(hsm.path().join("rsa.pt"), b"p").unwrap();
    let made = std::process::Command::new("openssl")
        .current_dir(hsm.path())
        .args([
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            "rsa.pem",
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
            "-in",
            "rsa.pt",
            "-out",
            "rsa.ct",
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    // Secrets: the app may do everything under `app/`; one grant for the admin to revoke.
    let mut admin_secrets = SecretsClient::new(server.channel(Some(&hsm.admin)).await);
    let all: Vec<i32> = (1..=6).collect();
    admin_secrets
        .create_secret_grant(pb::CreateSecretGrantRequest {
            path: "app/*".into(),
            principal: app.principal.clone(),
            operations: all,
        })
        .await
        .unwrap();
    let secret_grant_to_revoke = admin_secrets
        .create_secret_grant(pb::CreateSecretGrantRequest {
            path: "tmp/*".into(),
            principal: spiffe("short-lived"),
            operations: vec![pb::SecretOperation::Read as i32],
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    // Credentials: issuers of tokens and of certificates for the app.
    for issuer in [
        pb::Issuer {
            name: "workloads".into(),
            key: "jwt".into(),
            principals: vec![app.principal.clone()],
            audiences: vec!["payments".into()],
            ..Default::default()
        },
        pb::Issuer {
            name: "certs".into(),
            key: "x509".into(),
            kind: pb::CredentialKind::X509 as i32,
            self_signed: true,
            principals: vec![app.principal.clone()],
            ..Default::default()
        },
        pb::Issuer {
            name: "ssh-users".into(),
            kind: pb::CredentialKind::SshUser as i32,
            key: "ssh".into(),
            principals: vec![app.principal.clone()],
            ssh_principals: vec!["deploy".into()],
            ..Default::default()
        },
    ] {
        CredentialsClient::new(server.channel(Some(&hsm.admin)).await)
            .create_issuer(pb::CreateIssuerRequest {
                issuer: Some(issuer),
            })
            .await
            .unwrap();
    }
    // Databases: connections stored without trying them (no database listens), a role for
    // the app, and a connection and a role for the admin to delete.
    let mut admin_db = DatabasesClient::new(server.channel(Some(&hsm.admin)).await);
    for name in ["pg", "spare"] {
        admin_db
            .put_database_connection(pb::PutDatabaseConnectionRequest {
                connection: Some(pb::DatabaseConnection {
                    name: name.into(),
                    connection_url: NO_DATABASE.into(),
                    username: "root".into(),
                    allowed_roles: vec!["*".into()],
                    ..Default::default()
                }),
                password: "matrix-root-password".into(),
                skip_verify: true,
            })
            .await
            .unwrap();
    }
    for name in ["app", "spare-role"] {
        admin_db
            .put_database_role(pb::PutDatabaseRoleRequest {
                role: Some(pb::DatabaseRole {
                    name: name.into(),
                    connection: "pg".into(),
                    creation_statements: vec!["CREATE ROLE \"{{name}}\"".into()],
                    max_ttl_seconds: 3600,
                    principals: vec![app.principal.clone()],
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let mut app_secrets = SecretsClient::new(server.channel(Some(&app)).await);
    for path in [
        "app/read",
        "app/patch",
        "app/del",
        "app/destroy",
        "app/gone",
    ] {
        app_secrets
            .put_secret(pb::PutSecretRequest {
                path: path.into(),
                data: [("k".to_owned(), "v".to_owned())].into(),
                cas: None,
            })
            .await
            .unwrap();
    }
    let fixture = Fixture {
        secret_grant_to_revoke,
        rsa_ciphertext: std::fs::read(hsm.path().join("rsa.ct")).unwrap(),
        ciphertext,
        signature,
        mac,
        grant_to_revoke,
    };

    // The refusals name the missing permission.
    let mut c = server.keys_as(Some(&stranger)).await;
    let e = c
        .encrypt(pb::EncryptRequest {
            key: "enc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        format!(
            "permission denied: \"{}\" has no grant to encrypt with key \"enc\"",
            stranger.principal
        )
    );

    // Admin last: it seals at the end.
    let callers: Vec<(&str, Option<&Cred>)> = vec![
        ("granted-service", Some(&app)),
        ("service-granted-else", Some(&other)),
        ("unknown-principal", Some(&stranger)),
        ("no-certificate", None),
        ("custodian", Some(&hsm.custodian)),
        ("auditor", Some(&hsm.auditor)),
        ("admin", Some(&hsm.admin)),
    ];
    // (The refusal above counts too.)
    let mut denied: BTreeMap<String, usize> = BTreeMap::from([(stranger.principal.clone(), 1)]);
    let mut cells = 0;
    for (who, cred) in &callers {
        let ch = server.channel(*cred).await;
        for (n, rpc) in RPCS.iter().enumerate() {
            let got = call(rpc, ch.clone(), &fixture, n).await;
            let want = expected(who, rpc);
            assert_eq!(got, want, "{who} calling {rpc}");
            cells += 1;
            if matches!(got, Code::PermissionDenied | Code::Unauthenticated) {
                let principal = cred.map_or("anonymous".to_owned(), |c| c.principal.clone());
                *denied.entry(principal).or_default() += 1;
            }
        }
    }
    assert_eq!(cells, RPCS.len() * callers.len());

    // Every refusal is in the audit log, under the caller's principal: a certificate
    // holder's one by one, those of the caller without a certificate counted (their records
    // are written every minute and at shutdown, so the server is restarted). (The admin
    // sealed the server; the audit service reads the log while sealed.)
    let mut server = server;
    assert!(server.terminate().success());
    let server = hsm.try_start(&hsm.config(), &[]).unwrap();
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut recorded: BTreeMap<String, usize> = BTreeMap::new();
    for line in out.stdout.lines().skip(1) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let e = &v["event"];
        let outcome = &e["outcome"];
        if outcome == "PERMISSION_DENIED" || outcome == "UNAUTHENTICATED" {
            let counted = e["batch"].is_object() && e["key"].is_null();
            assert_eq!(counted, e["principal"] == "anonymous", "{e}");
            let calls = if counted {
                e["batch"]["items"].as_u64().unwrap() as usize
            } else {
                1
            };
            *recorded
                .entry(e["principal"].as_str().unwrap().to_owned())
                .or_default() += calls;
        }
    }
    assert_eq!(recorded, denied);
}

/// Creates AES-256-GCM keys as the admin (no grants).
async fn create_aes_keys(server: &Server, names: &[&str]) {
    let mut admin = server.keys().await;
    for name in names {
        admin
            .create_key(pb::CreateKeyRequest {
                name: (*name).into(),
                algorithm: pb::Algorithm::Aes256Gcm as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Whether a fresh connection as `cred` gets an answer to Status.
async fn can_call(
    server: &Server,
    ca: &std::path::Path,
    cred: Option<&Cred>,
) -> Result<(), String> {
    let ch = try_channel(&server.addr, ca, cred)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    SystemClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .map(drop)
        .map_err(|e| format!("call: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_the_handshake_must_refuse() {
    let hsm = TestHsm::new("kms-certs");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let ca = &hsm.pki.ca;
    let day = time::Duration::days(1);

    // A certificate from a CA the server does not trust.
    let rogue = Pki::new(&hsm.path().join("rogue"), "rogue");
    let untrusted = rogue.client("untrusted", &ClientSpec::spiffe("admin"));
    // Expired, and not yet valid.
    let expired = hsm.pki.client(
        "expired",
        &ClientSpec {
            valid: (-day * 2, -day),
            ..ClientSpec::spiffe("admin")
        },
    );
    let early = hsm.pki.client(
        "early",
        &ClientSpec {
            valid: (day, day * 2),
            ..ClientSpec::spiffe("admin")
        },
    );
    // For servers, not clients.
    let wrong_usage = hsm.pki.client(
        "wrong-usage",
        &ClientSpec {
            usage: rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            ..ClientSpec::spiffe("admin")
        },
    );
    // Two identities at once, and a URI SAN that is not a SPIFFE ID.
    let two_sans = hsm.pki.client(
        "two-sans",
        &ClientSpec {
            uris: vec![spiffe("admin"), spiffe("auditor")],
            ..ClientSpec::spiffe("admin")
        },
    );
    let not_spiffe = hsm.pki.client(
        "not-spiffe",
        &ClientSpec {
            uris: vec!["https://test.kms/admin".into()],
            ..ClientSpec::spiffe("admin")
        },
    );
    for (what, cred) in [
        ("untrusted CA", &untrusted),
        ("expired", &expired),
        ("not yet valid", &early),
        ("server-only usage", &wrong_usage),
        ("two URI SANs", &two_sans),
        ("non-SPIFFE URI SAN", &not_spiffe),
    ] {
        let r = can_call(&server, ca, Some(cred)).await;
        assert!(r.is_err(), "{what}: accepted");
    }
    let logs = hsm.logs();
    assert!(logs.matches("TLS handshake refused").count() >= 4, "{logs}");
    assert!(
        logs.contains("client certificate refused") && logs.contains("more than one URI SAN"),
        "{logs}"
    );
    // The server keeps serving: the admin still gets in.
    can_call(&server, ca, Some(&hsm.admin)).await.unwrap();

    // A SPIFFE ID from another trust domain, signed by the trusted CA: it connects, but
    // holds no role; a CN-only certificate is named by its CN.
    let foreign = hsm.pki.client(
        "foreign",
        &ClientSpec {
            uris: vec!["spiffe://evil.example/admin".into()],
            ..ClientSpec::spiffe("admin")
        },
    );
    let out = server.kms_as(Some(&foreign), &["key", "list"], "");
    assert!(
        out.stderr.contains(
            "PERMISSION_DENIED: permission denied: \"spiffe://evil.example/admin\" does not have the admin role"
        ),
        "{out:?}"
    );
    let cn_only = hsm.pki.client(
        "cn-only",
        &ClientSpec {
            uris: vec![],
            cn: Some("billing-batch".into()),
            ..ClientSpec::spiffe("x")
        },
    );
    let who = server
        .kms_as(Some(&cn_only), &["whoami", "--json"], "")
        .json();
    assert_eq!(who["principal"], "cn:billing-batch");
    assert_eq!(who["authenticated"], true);
    // A CN that spells the admin's SPIFFE ID (no URI SAN) is not the admin: CNs live in
    // their own namespace (an outside review got admin this way).
    let forged = hsm.pki.client(
        "cn-spiffe",
        &ClientSpec {
            uris: vec![],
            cn: Some(hsm.admin.principal.clone()),
            ..ClientSpec::spiffe("x")
        },
    );
    let who = server
        .kms_as(Some(&forged), &["whoami", "--json"], "")
        .json();
    assert_eq!(who["principal"], format!("cn:{}", hsm.admin.principal));
    assert_eq!(who["roles"], serde_json::json!([]), "{who}");
    let out = server.kms_as(
        Some(&forged),
        &["key", "create", "stolen", "--algorithm", "aes-256-gcm"],
        "",
    );
    assert!(
        out.code != Some(0) && out.stderr.contains("PERMISSION_DENIED"),
        "{out:?}"
    );
    // A CN with a control character or a bidirectional override is refused at connect.
    for (stem, cn) in [("cn-ctl", "ops\u{7}x"), ("cn-bidi", "ops\u{202e}nimda")] {
        let odd = hsm.pki.client(
            stem,
            &ClientSpec {
                uris: vec![],
                cn: Some(cn.into()),
                ..ClientSpec::spiffe("x")
            },
        );
        assert!(
            can_call(&server, ca, Some(&odd)).await.is_err(),
            "{cn:?} accepted"
        );
    }
    let anon = server.kms_as(None, &["whoami", "--json"], "").json();
    assert_eq!(anon["principal"], "anonymous");
    assert_eq!(anon["authenticated"], false);
    // A client that does not trust the server's CA does not get in either.
    let r = can_call(&server, &rogue.ca, Some(&hsm.admin)).await;
    assert!(r.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_checked_at_every_call() {
    let hsm = TestHsm::new("kms-grants");
    let config = hsm.config();
    let (mut server, shares) = start_unsealed(&hsm, &config);
    create_aes_keys(&server, &["orders", "ledger"]).await;
    let app = hsm
        .pki
        .client("app", &ClientSpec::spiffe("team/orders-api"));
    let tenant = hsm.pki.client("tenant", &ClientSpec::spiffe("tenant-7"));
    let mut access = server.access().await;
    let create = |key: &str, principal: &str, ops: &[pb::Operation], aad: Option<&[u8]>| {
        pb::CreateGrantRequest {
            key: key.into(),
            principal: principal.into(),
            operations: ops.iter().map(|o| *o as i32).collect(),
            associated_data: aad.map(<[u8]>::to_vec),
        }
    };
    // A prefix grant.
    let team = access
        .create_grant(create(
            "orders",
            &spiffe("team/*"),
            &[pb::Operation::Encrypt, pb::Operation::Decrypt],
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    // A grant constrained to one associated data.
    access
        .create_grant(create(
            "ledger",
            &tenant.principal,
            &[pb::Operation::Encrypt],
            Some(b"tenant=7"),
        ))
        .await
        .unwrap();

    let mut c = server.keys_as(Some(&app)).await;
    let enc = |key: &str, aad: &[u8]| pb::EncryptRequest {
        key: key.into(),
        plaintext: b"x".to_vec(),
        associated_data: aad.to_vec(),
    };
    c.encrypt(enc("orders", b"")).await.unwrap();
    let e = c.encrypt(enc("ledger", b"")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Re-encryption needs `reencrypt-from` on the source (and `reencrypt-to` on the
    // destination), which the grant does not name.
    let e = c
        .re_encrypt(pb::ReEncryptRequest {
            key: "orders".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("no grant to reencrypt-from"), "{e:?}");

    // The constrained grant: only that associated data, in every batch item too.
    let mut t = server.keys_as(Some(&tenant)).await;
    t.encrypt(enc("ledger", b"tenant=7")).await.unwrap();
    let e = t.encrypt(enc("ledger", b"tenant=8")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let item = |aad: &[u8]| pb::EncryptItem {
        plaintext: b"x".to_vec(),
        associated_data: aad.to_vec(),
    };
    t.batch_encrypt(pb::BatchEncryptRequest {
        key: "ledger".into(),
        items: vec![item(b"tenant=7"), item(b"tenant=7")],
    })
    .await
    .unwrap();
    let e = t
        .batch_encrypt(pb::BatchEncryptRequest {
            key: "ledger".into(),
            items: vec![item(b"tenant=7"), item(b"tenant=8")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Listing: by key, by principal (a pattern grant matches the principals it covers);
    // the associated data is never shown.
    let listed = access
        .list_grants(pb::ListGrantsRequest {
            key: String::new(),
            principal: app.principal.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, team.id);
    let out = server.kms(&["grant", "list", "--key", "ledger", "--json"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let g: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(g["requires_associated_data"], true);
    assert_eq!(g["operations"], serde_json::json!(["encrypt"]));
    assert!(!out.stdout.contains("tenant=7"));

    // Grants survive a restart; revocation takes effect on the next call of the same
    // connection, and survives a restart too.
    server.terminate();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys_as(Some(&app)).await;
    c.encrypt(enc("orders", b"")).await.unwrap();
    let out = server.kms(&["grant", "revoke", &team.id], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let e = c.encrypt(enc("orders", b"")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let out = server.kms(&["grant", "revoke", &team.id], "");
    assert!(out.stderr.contains("NOT_FOUND"), "{out:?}");
    // ... and the revocation survives a restart.
    drop(c);
    let mut server = server;
    server.terminate();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys_as(Some(&app)).await;
    let e = c.encrypt(enc("orders", b"")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Bad grants get clear errors.
    let mut access = server.access().await;
    for (req, code, text) in [
        (
            create("nope", &app.principal, &[pb::Operation::Encrypt], None),
            Code::NotFound,
            "no key named \"nope\"",
        ),
        (
            create("orders", "*", &[pb::Operation::Encrypt], None),
            Code::InvalidArgument,
            "would match every certificate",
        ),
        (
            create("orders", &app.principal, &[], None),
            Code::InvalidArgument,
            "at least one operation",
        ),
        (
            create("orders", &app.principal, &[pb::Operation::Sign], Some(b"a")),
            Code::InvalidArgument,
            "applies only to encrypt",
        ),
        (
            create("orders", &app.principal, &[pb::Operation::Reencrypt], None),
            Code::InvalidArgument,
            "reencrypt was split",
        ),
        (
            pb::CreateGrantRequest {
                operations: vec![99],
                ..create("orders", &app.principal, &[], None)
            },
            Code::InvalidArgument,
            "unknown operation",
        ),
    ] {
        let e = access.create_grant(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(text), "{e:?}");
    }
    let e = access
        .revoke_grant(pb::RevokeGrantRequest {
            id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let out = server.kms(
        &["grant", "create", "orders", "x", "--operations", "fly"],
        "",
    );
    assert!(out.stderr.contains("unknown operation \"fly\""), "{out:?}");

    // Grants and revocations are in the audit log with the grantee; never the AAD.
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    let grants: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"]["grant"].is_object())
        .collect();
    assert_eq!(grants.len(), 3, "{grants:?}");
    assert_eq!(grants[2]["event"]["operation"], "RevokeGrant");
    assert_eq!(grants[2]["event"]["key"], "orders");
    assert_eq!(grants[2]["event"]["grant"]["principal"], spiffe("team/*"));
    assert!(!out.stdout.contains("tenant=7"));
    assert!(!hsm.logs().contains("tenant=7"));
    let store = std::fs::read(hsm.path().join("kms.redb")).unwrap();
    assert!(!store.windows(8).any(|w| w == b"tenant=7"));
}

/// The review's attack: a service allowed to re-encrypt into key A, and to re-encrypt and
/// decrypt with key B, but not to decrypt with A, must not read A's plaintext by
/// re-encrypting A's ciphertext into B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_needs_from_on_the_source_and_to_on_the_destination() {
    let hsm = TestHsm::new("kms-reencrypt");
    let config = hsm.config();
    let (server, _shares) = start_unsealed(&hsm, &config);
    create_aes_keys(&server, &["secret-a", "open-b"]).await;
    let owner = hsm.pki.client("owner", &ClientSpec::spiffe("owner"));
    let mover = hsm.pki.client("mover", &ClientSpec::spiffe("mover"));
    let grant = |key: &str, who: &str, ops: &[pb::Operation]| pb::CreateGrantRequest {
        key: key.into(),
        principal: who.into(),
        operations: ops.iter().map(|o| *o as i32).collect(),
        associated_data: None,
    };
    let mut access = server.access().await;
    for req in [
        grant("secret-a", &owner.principal, &[pb::Operation::Encrypt]),
        grant("secret-a", &mover.principal, &[pb::Operation::ReencryptTo]),
        grant(
            "open-b",
            &mover.principal,
            &[pb::Operation::ReencryptFrom, pb::Operation::Decrypt],
        ),
    ] {
        access.create_grant(req).await.unwrap();
    }
    let ct_a = server
        .keys_as(Some(&owner))
        .await
        .encrypt(pb::EncryptRequest {
            key: "secret-a".into(),
            plaintext: b"the secret".to_vec(),
            associated_data: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let mut m = server.keys_as(Some(&mover)).await;
    let out_of_a = pb::ReEncryptRequest {
        key: "secret-a".into(),
        ciphertext: ct_a.clone(),
        destination_key: "open-b".into(),
        ..Default::default()
    };
    let e = m.re_encrypt(out_of_a.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("no grant to reencrypt-from with key \"secret-a\""),
        "{e:?}"
    );
    // Into A is what the mover may do: from B (which it may leave) to A.
    let ct_b = server
        .keys()
        .await
        .encrypt(pb::EncryptRequest {
            key: "open-b".into(),
            plaintext: b"public".to_vec(),
            associated_data: Vec::new(),
        })
        .await;
    // The admin holds no grant on open-b: refused, as separation of duties wants.
    assert_eq!(ct_b.unwrap_err().code(), Code::PermissionDenied);
    access
        .create_grant(grant("open-b", &owner.principal, &[pb::Operation::Encrypt]))
        .await
        .unwrap();
    let ct_b = server
        .keys_as(Some(&owner))
        .await
        .encrypt(pb::EncryptRequest {
            key: "open-b".into(),
            plaintext: b"public".to_vec(),
            associated_data: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    m.re_encrypt(pb::ReEncryptRequest {
        key: "open-b".into(),
        ciphertext: ct_b,
        destination_key: "secret-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Holding reencrypt-to on B does not let it re-encrypt into B from A either way round.
    access
        .create_grant(grant(
            "open-b",
            &mover.principal,
            &[pb::Operation::ReencryptTo],
        ))
        .await
        .unwrap();
    let e = m.re_encrypt(out_of_a).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Both refusals are in the audit log under the mover's name.
    let out = server.kms_as(
        Some(&hsm.auditor),
        &["audit", "export", "--principal", &mover.principal],
        "",
    );
    assert_eq!(
        out.stdout.matches("PERMISSION_DENIED").count(),
        2,
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_unseal_shares_are_limited_per_address() {
    let hsm = TestHsm::new("kms-unseal-limit");
    let tls = hsm.tls_tables().replace(
        "max_failed_shares = 1000",
        "max_failed_shares = 3\nfailure_window_seconds = 3",
    );
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &tls);
    let server = hsm.try_start(&config, &[]).unwrap();
    let shares = server.init(3, 2, "").shares();
    for bad in ["kms1-NOTASHARE", "kms1-AAAA", "not a share"] {
        let out = server.custodian(&["operator", "unseal"], &format!("{bad}\n"));
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    }
    // The fourth try, even with a good share, waits.
    let out = server.custodian(&["operator", "unseal"], &format!("{}\n", shares[0]));
    assert!(
        out.stderr
            .contains("RESOURCE_EXHAUSTED: too many failed unseal shares from this address"),
        "{out:?}"
    );
    let status = server.kms(&["operator", "status", "--json"], "").json();
    assert_eq!(status["progress"], 0);
    // Once the window has passed, the custodians unseal.
    std::thread::sleep(Duration::from_secs(3));
    server.unseal_with(&shares);
    let status = server.kms(&["operator", "status", "--json"], "").json();
    assert_eq!(status["sealed"], false);
    // The refusal is recorded.
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert!(
        out.stdout.contains("\"outcome\":\"RESOURCE_EXHAUSTED\""),
        "{}",
        out.stdout
    );
}

/// Replaces the server's certificate files with `new`'s (key first, each by rename).
fn install(new: &Cred, at: &Cred) {
    for (from, to) in [(&new.key, &at.key), (&new.cert, &at.cert)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart_while_a_client_calls() {
    let hsm = TestHsm::new("kms-rotate");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let ca1 = hsm.pki.ca.clone();
    let ca2 = Pki::new(&hsm.path().join("ca2"), "ca2");

    // A client calls all along on one connection.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut sys = SystemClient::new(server.channel(Some(&hsm.admin)).await);
    let caller = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match sys.status(pb::StatusRequest {}).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Rotate the server certificate to one from a new CA, and trust client certificates
    // from both CAs: no restart, the files just change.
    assert!(can_call(&server, &ca2.ca, Some(&hsm.admin)).await.is_err());
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(&ca1).unwrap(),
        std::fs::read_to_string(&ca2.ca).unwrap()
    );
    let tmp = ca1.with_extension("new");
    std::fs::write(&tmp, bundle).unwrap();
    std::fs::rename(&tmp, &ca1).unwrap();
    install(&ca2.server, &hsm.pki.server);
    let client2 = ca2.client("client2", &ClientSpec::spiffe("admin"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while can_call(&server, &ca2.ca, Some(&client2)).await.is_err() {
        assert!(Instant::now() < deadline, "not reloaded: {}", hsm.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections get the new certificate: a client trusting only the old CA fails.
    assert!(
        can_call(&server, &hsm.pki.ca, Some(&hsm.admin))
            .await
            .is_ok()
    );
    let only_old = hsm.path().join("only-old-ca.pem");
    std::fs::write(
        &only_old,
        std::fs::read_to_string(&ca1)
            .unwrap()
            .split_inclusive("-----END CERTIFICATE-----\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        can_call(&server, &only_old, Some(&hsm.admin))
            .await
            .is_err()
    );

    // A broken file is not taken: the server keeps its current certificate.
    std::fs::write(&hsm.pki.server.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    can_call(&server, &ca2.ca, Some(&client2)).await.unwrap();
    assert!(hsm.logs().contains("TLS reload failed"), "{}", hsm.logs());

    // SIGHUP reloads at once (here: back to the first CA's certificate).
    let back = hsm
        .pki
        .server_cert("kms-server-again", time::Duration::days(1));
    install(&back, &hsm.pki.server);
    server.sighup();
    let deadline = Instant::now() + Duration::from_secs(15);
    while can_call(&server, &only_old, Some(&hsm.admin))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "not reloaded: {}", hsm.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hsm.logs().contains("SIGHUP: reloading the TLS files"));

    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 10, "{ok:?}");
}

#[test]
fn bad_tls_configuration_stops_start_up_with_a_clear_error() {
    let hsm = TestHsm::new("kms-tls-config");
    let table = hsm.hsm_table();
    let missing = hsm.tls_tables().replace(
        &hsm.pki.server.cert.display().to_string(),
        "/nonexistent/server.pem",
    );
    let cases = [
        (missing, "tls.cert: cannot read /nonexistent/server.pem"),
        (
            // The key of another certificate.
            hsm.tls_tables().replace(
                &hsm.pki.server.key.display().to_string(),
                &hsm.admin.key.display().to_string(),
            ),
            "tls: ",
        ),
        (
            "[tls]\nplaintext_loopback = true\ncert = \"x.pem\"\n".to_owned(),
            "plaintext_loopback = true and TLS files exclude each other",
        ),
        (
            "[tls]\nkey = \"k.pem\"\n".to_owned(),
            "cert, key and client_ca are all needed",
        ),
        (
            format!(
                "{}\n",
                hsm.tls_tables()
                    .replace("auditor = [", "auditor = [\"a*b\", ")
            ),
            "roles.auditor: principal pattern \"a*b\"",
        ),
    ];
    for (tables, want) in cases {
        let config = hsm.config_full("bad.toml", &table, &tables);
        let (status, stderr) = hsm.start_failure(&config, &[]);
        // EX_CONFIG: a restart cannot help (the unit does not restart on it).
        assert_eq!(status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(want), "want {want:?} in {stderr}");
    }
    // Plaintext is refused off loopback.
    let path = hsm.path().join("open.toml");
    softhsm_tests::write_private(
        &path,
        format!(
            "listen = \"0.0.0.0:0\"\n[storage]\npath = \"x.redb\"\n[hsm]\n{table}\n[tls]\nplaintext_loopback = true\n"
        ),
    );
    let (_, stderr) = hsm.start_failure(&path, &[]);
    assert!(
        stderr.contains("is not a loopback address; plaintext is allowed on loopback only"),
        "{stderr}"
    );
}
