//! What a call asks: a domain operation, whatever front it came through, and the rule of
//! each ([`Op::need`]).
//!
//! Operations are grouped as the audit record names them ([`Group::record_name`]): the
//! record format predates the service layer, and records already written keep verifying,
//! so a group's name in records is stable (it is also our gRPC service's name). The gRPC
//! front maps its method paths onto these ([`crate::grpc`]); other fronts map their own
//! paths onto the same operations, so one rule and one record shape serve every front.

use crate::access::{Need, Role};
use crate::policy::{Operation, SecretOperation};

/// The groups of operations, as records name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// The seal lifecycle, ceremonies, backups.
    System,
    /// Keys and cryptography.
    Keys,
    /// The audit log, for auditors.
    Audit,
    /// Identity and grants.
    Access,
    /// Versioned secrets.
    Secrets,
    /// Short-lived machine credentials.
    Credentials,
    /// Dynamic database credentials and their leases.
    Databases,
    /// Liveness and readiness probes.
    Health,
}

impl Group {
    /// The group's name in audit records (`service`): stable, never renamed.
    pub(crate) fn record_name(self) -> &'static str {
        match self {
            Self::System => "kms.v1.System",
            Self::Keys => "kms.v1.KeyManagement",
            Self::Audit => "kms.v1.Audit",
            Self::Access => "kms.v1.Access",
            Self::Secrets => "kms.v1.Secrets",
            Self::Credentials => "kms.v1.Credentials",
            Self::Databases => "kms.v1.Databases",
            Self::Health => "grpc.health.v1.Health",
        }
    }
}

macro_rules! ops {
    ($($group:ident { $($op:ident),* $(,)? })*) => {
        /// A domain operation. Its name ([`Op::name`]) is what audit records and reports
        /// call it, and never changes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub(crate) enum Op {
            $($(
                #[doc = concat!("`", stringify!($op), "` (", stringify!($group), ").")]
                $op,
            )*)*
        }

        impl Op {
            /// Every operation.
            pub(crate) const ALL: &[Op] = &[$($(Op::$op,)*)*];

            /// The operation's name in audit records.
            pub(crate) fn name(self) -> &'static str {
                match self {
                    $($(Op::$op => stringify!($op),)*)*
                }
            }

            /// The operation's group.
            pub(crate) fn group(self) -> Group {
                match self {
                    $($(Op::$op => Group::$group,)*)*
                }
            }
        }
    };
}

ops! {
    System {
        Status, Init, Unseal, UnsealReset, Seal, CreateBackup, RekeyInit, RekeySubmit,
        RekeyCancel, VerifyShare, RotateMasterKey, TakeOver,
    }
    Keys {
        CreateKey, GetKey, ListKeys, RotateKey, GetImportParameters, ImportKeyMaterial,
        UpdateKey, EnableKeyVersion, DisableKeyVersion, ScheduleKeyVersionDestruction,
        CancelKeyVersionDestruction, Encrypt, Decrypt, ReEncrypt, GenerateDataKey,
        GenerateDataKeyWithoutPlaintext, Sign, Verify, GetPublicKey, AsymmetricDecrypt, Mac,
        VerifyMac, BatchEncrypt, BatchDecrypt, BatchSign, BatchReEncrypt, Random, Hash, CheckKey,
    }
    Audit { ExportAuditLog, KeyUsageReport, VerifyAuditLog }
    Access { WhoAmI, CreateGrant, RevokeGrant, ListGrants, CertLogin, LookupSelf }
    Secrets {
        PutSecret, GetSecret, PatchSecret, ListSecrets, GetSecretSubkeys, DeleteSecretVersions,
        UndeleteSecretVersions, DestroySecretVersions, GetSecretMetadata,
        UpdateSecretMetadata, DeleteSecret, GetSecretsConfig, UpdateSecretsConfig,
        CreateSecretGrant, RevokeSecretGrant, ListSecretGrants,
    }
    Credentials {
        CreateIssuer, GetIssuer, ListIssuers, UpdateIssuer, IssueJwt, ValidateJwt, RevokeJwt,
        IssueX509, GetIssuerCsr, SetIssuerCertificate, IssueSsh, RotateIssuer,
    }
    Databases {
        PutDatabaseConnection, GetDatabaseConnection, ListDatabaseConnections,
        DeleteDatabaseConnection, RotateDatabaseRoot, PutDatabaseRole, GetDatabaseRole,
        ListDatabaseRoles, DeleteDatabaseRole, GetDatabaseCredentials, RenewLease, RevokeLease,
        RevokeLeasePrefix, LookupLease, ListLeases, PutDatabaseStaticRole, GetDatabaseStaticRole,
        ListDatabaseStaticRoles, DeleteDatabaseStaticRole, GetDatabaseStaticCredentials,
        RotateDatabaseStaticRole,
    }
    Health { Check, Watch }
}

impl Op {
    /// What the operation needs of its caller. Every operation is named: a new one does
    /// not compile until someone decides its rule here.
    pub(crate) fn need(self) -> Need {
        use Operation as O;
        use SecretOperation as S;
        match self {
            Op::Status | Op::WhoAmI | Op::Check | Op::Watch => Need::Nothing,
            // The HTTPS front's calls that touch no key (Transit's random bytes and hashes,
            // Vault's session tokens): any certificate holder.
            Op::Random | Op::Hash | Op::CertLogin | Op::LookupSelf => Need::Certificate,
            // Calls that take a share. Starting and cancelling a rekey need the admin role.
            Op::Unseal | Op::UnsealReset | Op::RekeySubmit | Op::VerifyShare => Need::Custodian,
            Op::ExportAuditLog | Op::KeyUsageReport | Op::VerifyAuditLog => {
                Need::Role(Role::Auditor)
            }
            // CheckKey (the Kubernetes plugin's Status) says whether the key encrypts and
            // names its primary version: for those who may encrypt with it.
            Op::Encrypt | Op::BatchEncrypt | Op::CheckKey => Need::Grant(O::Encrypt),
            Op::Decrypt | Op::BatchDecrypt | Op::AsymmetricDecrypt => Need::Grant(O::Decrypt),
            // And ReencryptTo on the destination ([`Operation::on_destination`]).
            Op::ReEncrypt | Op::BatchReEncrypt => Need::Grant(O::ReencryptFrom),
            Op::GenerateDataKey | Op::GenerateDataKeyWithoutPlaintext => {
                Need::Grant(O::GenerateDataKey)
            }
            Op::Sign | Op::BatchSign => Need::Grant(O::Sign),
            Op::Verify => Need::Grant(O::Verify),
            Op::GetPublicKey => Need::Grant(O::GetPublicKey),
            Op::Mac => Need::Grant(O::Mac),
            Op::VerifyMac => Need::Grant(O::VerifyMac),
            Op::PutSecret | Op::PatchSecret | Op::UpdateSecretMetadata => {
                Need::Secret(S::SecretWrite)
            }
            Op::GetSecret => Need::Secret(S::SecretRead),
            Op::GetSecretSubkeys | Op::GetSecretMetadata => Need::Secret(S::SecretReadMetadata),
            Op::ListSecrets => Need::Secret(S::SecretList),
            Op::DeleteSecretVersions | Op::UndeleteSecretVersions => Need::Secret(S::SecretDelete),
            Op::DestroySecretVersions | Op::DeleteSecret => Need::Secret(S::SecretDestroy),
            // The engine's settings say nothing secret.
            Op::GetSecretsConfig => Need::Certificate,
            // Issuers say nothing secret; who may ask an issuer for a token is the issuer's
            // to say (its principals and delegators), as a key's grants are the key's.
            Op::GetIssuer
            | Op::ListIssuers
            | Op::IssueJwt
            | Op::ValidateJwt
            | Op::IssueX509
            | Op::IssueSsh => Need::Certificate,
            // Who may ask a role for a login is the role's to say (its principals); a
            // lease is its holder's to renew, revoke and look up (or an administrator's).
            Op::GetDatabaseCredentials
            | Op::GetDatabaseStaticCredentials
            | Op::RenewLease
            | Op::RevokeLease
            | Op::LookupLease => Need::Certificate,
            Op::Init
            | Op::Seal
            | Op::CreateBackup
            | Op::RekeyInit
            | Op::RekeyCancel
            | Op::RotateMasterKey
            | Op::TakeOver
            | Op::CreateKey
            | Op::GetKey
            | Op::ListKeys
            | Op::RotateKey
            | Op::GetImportParameters
            | Op::ImportKeyMaterial
            | Op::UpdateKey
            | Op::EnableKeyVersion
            | Op::DisableKeyVersion
            | Op::ScheduleKeyVersionDestruction
            | Op::CancelKeyVersionDestruction
            | Op::CreateGrant
            | Op::RevokeGrant
            | Op::ListGrants
            | Op::UpdateSecretsConfig
            | Op::CreateSecretGrant
            | Op::RevokeSecretGrant
            | Op::ListSecretGrants
            | Op::CreateIssuer
            | Op::UpdateIssuer
            | Op::RevokeJwt
            | Op::GetIssuerCsr
            | Op::SetIssuerCertificate
            | Op::RotateIssuer
            | Op::PutDatabaseConnection
            | Op::GetDatabaseConnection
            | Op::ListDatabaseConnections
            | Op::DeleteDatabaseConnection
            | Op::RotateDatabaseRoot
            | Op::PutDatabaseRole
            | Op::GetDatabaseRole
            | Op::ListDatabaseRoles
            | Op::DeleteDatabaseRole
            | Op::RevokeLeasePrefix
            | Op::ListLeases
            | Op::PutDatabaseStaticRole
            | Op::GetDatabaseStaticRole
            | Op::ListDatabaseStaticRoles
            | Op::DeleteDatabaseStaticRole
            | Op::RotateDatabaseStaticRole => Need::Role(Role::Admin),
        }
    }

    /// Whether no method of our gRPC API is the operation (only another front serves it:
    /// the HTTPS front, or the Kubernetes plugin's socket).
    pub(crate) fn grpc_has_none(self) -> bool {
        matches!(
            self,
            Op::Random | Op::Hash | Op::CertLogin | Op::LookupSelf | Op::CheckKey
        )
    }

    /// Whether the operation hands out shares once: an answer cut off by the caller's
    /// deadline after it committed is a keyring no one can unseal, so it begins only with
    /// [`SHARES_MIN_TIME_LEFT`] left.
    pub(crate) fn hands_out_shares(self) -> bool {
        matches!(self, Op::Init | Op::RekeySubmit)
    }

    /// Whether a retry with the caller's idempotency key is answered from the first attempt
    /// (docs/api.md, "Retries and idempotency"): the changes that answer a key or a grant,
    /// built from what they committed.
    pub(crate) fn is_retried_change(self) -> bool {
        matches!(
            self,
            Op::CreateKey
                | Op::RotateKey
                | Op::UpdateKey
                | Op::EnableKeyVersion
                | Op::DisableKeyVersion
                | Op::ScheduleKeyVersionDestruction
                | Op::CancelKeyVersionDestruction
                | Op::ImportKeyMaterial
                | Op::CreateGrant
                | Op::RevokeGrant
        )
    }
}

/// See [`Op::hands_out_shares`].
pub(crate) const SHARES_MIN_TIME_LEFT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Group, Op};
    use crate::access::{Need, Role};
    use crate::policy::Operation;

    #[test]
    fn every_operation_has_the_intended_rule() {
        assert_eq!(Op::Status.need(), Need::Nothing);
        assert_eq!(Op::Check.need(), Need::Nothing);
        assert_eq!(Op::Unseal.need(), Need::Custodian);
        assert_eq!(Op::Init.need(), Need::Role(Role::Admin));
        assert_eq!(Op::RekeySubmit.need(), Need::Custodian);
        assert_eq!(Op::VerifyShare.need(), Need::Custodian);
        assert_eq!(Op::RekeyInit.need(), Need::Role(Role::Admin));
        assert_eq!(Op::RekeyCancel.need(), Need::Role(Role::Admin));
        assert_eq!(Op::Seal.need(), Need::Role(Role::Admin));
        assert_eq!(Op::ExportAuditLog.need(), Need::Role(Role::Auditor));
        assert_eq!(Op::CreateKey.need(), Need::Role(Role::Admin));
        assert_eq!(
            Op::GenerateDataKeyWithoutPlaintext.need(),
            Need::Grant(Operation::GenerateDataKey)
        );
        assert_eq!(Op::BatchSign.need(), Need::Grant(Operation::Sign));
        assert_eq!(Op::CheckKey.need(), Need::Grant(Operation::Encrypt));
        assert!(Op::CheckKey.grpc_has_none());
        assert_eq!(
            Op::BatchReEncrypt.need(),
            Need::Grant(Operation::ReencryptFrom)
        );
        assert_eq!(Op::ListGrants.need(), Need::Role(Role::Admin));
    }

    #[test]
    fn names_and_groups_are_those_records_have_always_used() {
        assert_eq!(Op::Encrypt.name(), "Encrypt");
        assert_eq!(Op::Encrypt.group().record_name(), "kms.v1.KeyManagement");
        assert_eq!(Op::UnsealReset.group(), Group::System);
        assert_eq!(Op::Watch.group().record_name(), "grpc.health.v1.Health");
        let mut names: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
    }
}
