//! The kms gRPC API: the generated tonic/prost types and services.
//!
//! Architecture invariant: this is the only crate that knows protobuf types. The server
//! converts them to domain types at the edge (`kms::wire`).
//!
//! Messages that carry secrets (shares) have a `Debug` that prints lengths, not contents.

#![forbid(unsafe_code)]

/// The encoded `FileDescriptorSet` of every kms .proto file, for the server reflection
/// service (grpcurl, Postman and evans list and call the API with it).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");

/// Version 1 of the API, package `kms.v1`.
pub mod v1 {
    #![allow(
        missing_docs,
        clippy::all,
        clippy::unwrap_used,
        clippy::indexing_slicing
    )]
    tonic::include_proto!("kms.v1");

    /// A `Debug` that prints the named public fields and, for the secret ones, their
    /// length only.
    macro_rules! redacted_debug {
        ($ty:ident { $($public:ident),* } secret { $($secret:ident),* }) => {
            impl core::fmt::Debug for $ty {
                fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    let mut d = f.debug_struct(stringify!($ty));
                    $( d.field(stringify!($public), &self.$public); )*
                    $( d.field(stringify!($secret), &format_args!("<{} bytes redacted>", self.$secret.len())); )*
                    d.finish()
                }
            }
        };
    }

    redacted_debug!(EncryptRequest { key } secret { plaintext, associated_data });
    redacted_debug!(DecryptRequest { key } secret { ciphertext, associated_data });
    redacted_debug!(DecryptResponse { key_version } secret { plaintext });
    redacted_debug!(AsymmetricDecryptResponse { key_version } secret { plaintext });
    redacted_debug!(ImportKeyMaterialRequest { key, wrapping_algorithm, public_key_pem } secret { import_token, wrapped_material });
    redacted_debug!(GetImportParametersResponse { wrapping_public_key_pem, expire_time, wrapping_algorithms } secret { import_token });
    redacted_debug!(ReEncryptRequest { key, destination_key } secret { ciphertext, associated_data });
    redacted_debug!(GenerateDataKeyRequest { key, length_bytes } secret { associated_data });
    redacted_debug!(GenerateDataKeyResponse { key_version } secret { plaintext, ciphertext });
    redacted_debug!(VerifyRequest { key, key_version } secret { signature });
    redacted_debug!(MacRequest { key } secret { message });
    redacted_debug!(VerifyMacRequest { key, key_version } secret { message, mac });
    redacted_debug!(EncryptItem {} secret { plaintext, associated_data });
    redacted_debug!(DecryptItem {} secret { ciphertext, associated_data });
    redacted_debug!(ReEncryptItem {} secret { ciphertext, associated_data });
    redacted_debug!(SignRequest { key, format } secret {});
    redacted_debug!(SignItem {} secret {});
    redacted_debug!(IssueJwtResponse { jti, subject, expires_unix, key_version, kid } secret { token });
    redacted_debug!(ValidateJwtRequest { issuer, audience } secret { token });
    redacted_debug!(PutDatabaseConnectionRequest { connection, skip_verify } secret { password });
    redacted_debug!(GetDatabaseStaticCredentialsResponse { username, last_rotated_unix, rotation_period_seconds, ttl_seconds } secret { password });
    redacted_debug!(GetDatabaseCredentialsResponse { lease_id, lease_duration_seconds, renewable, username, expires_unix } secret { password });

    /// A secret's values in a `Debug`: how many, never their names or values.
    struct RedactedValues(usize);

    impl core::fmt::Debug for RedactedValues {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "<{} values redacted>", self.0)
        }
    }

    impl core::fmt::Debug for PutSecretRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("PutSecretRequest")
                .field("path", &self.path)
                .field("data", &RedactedValues(self.data.len()))
                .field("cas", &self.cas)
                .finish()
        }
    }

    impl core::fmt::Debug for GetSecretResponse {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("GetSecretResponse")
                .field("data", &RedactedValues(self.data.len()))
                .field("version", &self.version)
                .field("custom_metadata", &self.custom_metadata)
                .finish()
        }
    }

    impl core::fmt::Debug for GetSecretSubkeysResponse {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("GetSecretSubkeysResponse")
                .field("names", &RedactedValues(self.names.len()))
                .field("version", &self.version)
                .finish()
        }
    }

    impl core::fmt::Debug for PatchSecretRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("PatchSecretRequest")
                .field("path", &self.path)
                .field("set", &RedactedValues(self.set.len()))
                .field("remove", &RedactedValues(self.remove.len()))
                .field("cas", &self.cas)
                .finish()
        }
    }

    impl core::fmt::Debug for CreateGrantRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("CreateGrantRequest")
                .field("key", &self.key)
                .field("principal", &self.principal)
                .field("operations", &self.operations)
                .field(
                    "associated_data",
                    &self
                        .associated_data
                        .as_ref()
                        .map(|a| format!("<{} bytes redacted>", a.len())),
                )
                .finish()
        }
    }

    impl core::fmt::Debug for InitRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("InitRequest")
                .field("shares", &self.shares)
                .field("threshold", &self.threshold)
                .field("hsm_pin", &"<redacted>")
                .field("recipients", &self.recipients)
                .finish()
        }
    }

    impl core::fmt::Debug for InitResponse {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("InitResponse")
                .field(
                    "shares",
                    &format_args!("<{} shares redacted>", self.shares.len()),
                )
                .field("share_set_id", &self.share_set_id)
                .field("threshold", &self.threshold)
                .field("audit_key_fingerprint", &self.audit_key_fingerprint)
                .field("shares_sealed", &self.shares_sealed)
                .field("master_key_reused", &self.master_key_reused)
                .field("master_key_label", &self.master_key_label)
                .field("master_key_id", &self.master_key_id)
                .finish()
        }
    }

    impl core::fmt::Debug for RekeySubmitRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("RekeySubmitRequest")
                .field("share", &"<redacted>")
                .field("nonce", &self.nonce)
                .finish()
        }
    }

    impl core::fmt::Debug for RekeySubmitResponse {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("RekeySubmitResponse")
                .field("status", &self.status)
                .field(
                    "shares",
                    &format_args!("<{} shares redacted>", self.shares.len()),
                )
                .field("shares_sealed", &self.shares_sealed)
                .field("committed_share_set_id", &self.committed_share_set_id)
                .field("recipients", &self.recipients)
                .finish()
        }
    }

    impl core::fmt::Debug for VerifyShareRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("VerifyShareRequest")
                .field("share", &"<redacted>")
                .finish()
        }
    }

    impl core::fmt::Debug for UnsealRequest {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("UnsealRequest")
                .field("share", &"<redacted>")
                .field("reset", &self.reset)
                .field("nonce", &self.nonce)
                .finish()
        }
    }
}

/// kube-apiserver's KMS v2 plugin API (package `v2`, `k8s.io/kms/apis/v2/api.proto`, copied
/// unchanged under `k8s/`): what kms serves on the Kubernetes plugin's unix socket.
pub mod kubernetes {
    /// The apiserver's package `v2`.
    pub mod v2 {
        #![allow(
            missing_docs,
            clippy::all,
            clippy::unwrap_used,
            clippy::indexing_slicing
        )]
        tonic::include_proto!("v2");

        impl core::fmt::Debug for EncryptRequest {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_struct("EncryptRequest")
                    .field("uid", &self.uid)
                    .field(
                        "plaintext",
                        &format_args!("<{} bytes redacted>", self.plaintext.len()),
                    )
                    .finish()
            }
        }

        impl core::fmt::Debug for DecryptResponse {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_struct("DecryptResponse")
                    .field(
                        "plaintext",
                        &format_args!("<{} bytes redacted>", self.plaintext.len()),
                    )
                    .finish()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{
        InitRequest, InitResponse, RekeySubmitRequest, RekeySubmitResponse, UnsealRequest,
        VerifyShareRequest,
    };

    #[test]
    fn debug_redacts_shares() {
        let req = UnsealRequest {
            share: "kms1-SECRETSHARE".into(),
            reset: false,
            nonce: "ab".into(),
        };
        let resp = InitResponse {
            shares: vec!["kms1-SECRETSHARE".into()],
            share_set_id: "00".into(),
            threshold: 2,
            audit_key_fingerprint: "ff".into(),
            shares_sealed: false,
            ..Default::default()
        };
        let init = InitRequest {
            shares: 3,
            threshold: 2,
            hsm_pin: "SECRETPIN".into(),
            recipients: vec![],
        };
        let rekey = RekeySubmitRequest {
            share: "kms1-SECRETSHARE".into(),
            nonce: "ab".into(),
        };
        let rekeyed = RekeySubmitResponse {
            shares: vec!["kms1-SECRETSHARE".into()],
            ..Default::default()
        };
        let verify = VerifyShareRequest {
            share: "kms1-SECRETSHARE".into(),
        };
        let printed = format!("{req:?} {resp:?} {init:?} {rekey:?} {rekeyed:?} {verify:?}");
        assert!(!printed.contains("SECRETPIN"), "{printed}");
        let enc = super::v1::EncryptRequest {
            key: "k".into(),
            plaintext: b"SECRETPLAINTEXT".to_vec(),
            associated_data: b"SECRETAAD".to_vec(),
        };
        let sign = super::v1::SignRequest {
            key: "k".into(),
            input: Some(super::v1::sign_request::Input::Message(
                b"SECRETMSG".to_vec(),
            )),
            format: 0,
        };
        let asym = super::v1::AsymmetricDecryptResponse {
            plaintext: b"SECRETRSAPT".to_vec(),
            key_version: 1,
        };
        let import = super::v1::ImportKeyMaterialRequest {
            key: "k".into(),
            import_token: b"SECRETTOKEN".to_vec(),
            wrapping_algorithm: 1,
            wrapped_material: b"SECRETWRAPPED".to_vec(),
            public_key_pem: String::new(),
        };
        let params = super::v1::GetImportParametersResponse {
            import_token: b"SECRETTOKEN2".to_vec(),
            ..Default::default()
        };
        let printed = format!("{enc:?} {sign:?} {asym:?} {import:?} {params:?}");
        for secret in [
            "SECRETPLAINTEXT",
            "SECRETAAD",
            "SECRETMSG",
            "83, 69, 67",
            "SECRETRSAPT",
            "SECRETTOKEN",
            "SECRETWRAPPED",
        ] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("<15 bytes redacted>"), "{printed}");
        assert!(!printed.contains("SECRETSHARE"), "{printed}");
        assert!(printed.contains("redacted"));
    }
}

#[cfg(test)]
mod secret_tests {
    use super::v1::{GetSecretResponse, PatchSecretRequest, PutSecretRequest};

    /// No `Debug` of a message that carries a secret's values shows a name or a value.
    #[test]
    fn debug_redacts_secret_values() {
        let data: std::collections::BTreeMap<String, String> =
            [("api-key".to_owned(), "sk_live_SECRETVALUE".to_owned())].into();
        let shown = [
            format!(
                "{:?}",
                PutSecretRequest {
                    path: "payments/stripe".into(),
                    data: data.clone(),
                    cas: Some(1),
                }
            ),
            format!(
                "{:?}",
                GetSecretResponse {
                    data: data.clone(),
                    ..GetSecretResponse::default()
                }
            ),
            format!(
                "{:?}",
                PatchSecretRequest {
                    set: data,
                    ..PatchSecretRequest::default()
                }
            ),
        ];
        for s in shown {
            assert!(!s.contains("SECRETVALUE") && !s.contains("api-key"), "{s}");
            assert!(s.contains("<1 values redacted>"), "{s}");
        }
    }
}

#[cfg(test)]
mod kubernetes_tests {
    use super::kubernetes::v2;

    #[test]
    fn the_apiserver_seeds_never_print() {
        let request = v2::EncryptRequest {
            plaintext: b"SECRETSEED".to_vec(),
            uid: "u-1".into(),
        };
        let response = v2::DecryptResponse {
            plaintext: b"SECRETSEED".to_vec(),
        };
        let printed = format!("{request:?} {response:?}");
        assert!(!printed.contains("SECRETSEED"), "{printed}");
        assert!(!printed.contains("83, 69, 67"), "{printed}");
        assert!(printed.contains("<10 bytes redacted>"), "{printed}");
        assert!(printed.contains("u-1"), "{printed}");
    }
}
