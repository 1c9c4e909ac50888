//! Who may do what: identities from client certificates, roles from the configuration,
//! and the check of each operation's rule
//! ([`crate::service::Op::need`]). Deny by default.
//!
//! A caller's [`Identity`] is fixed at the TLS handshake ([`tls`]): the principal is the
//! client certificate's URI SAN (`spiffe://...`) or, without one, its subject CN; a caller
//! without a certificate is [`ANONYMOUS`]; on a plaintext loopback
//! listener every caller is [`LOOPBACK`]. Each operation has one [`Need`]. Per-key grants are kept by the keyring
//! ([`crate::keyring::grants`]), authenticated like key metadata, because they are only
//! meaningful (and only checkable) while it is unsealed.

pub(crate) mod limiter;
pub(crate) mod tls;

use crate::policy::{ANONYMOUS, LOOPBACK, Operation, Pattern, SecretOperation};

use std::collections::BTreeSet;

/// A role from the configuration's `[roles]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Key administration, grants, init and seal.
    Admin,
    /// The audit service, read-only.
    Auditor,
    /// Unseal shares: submit one, reset an attempt; give one to a rekey; verify one.
    Custodian,
}

impl Role {
    /// `admin`, `auditor`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Auditor => "auditor",
            Self::Custodian => "custodian",
        }
    }
}

/// `[roles]`: who holds which role.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// Patterns of administrators.
    pub admin: Vec<Pattern>,
    /// Patterns of auditors.
    pub auditor: Vec<Pattern>,
    /// Patterns of key custodians.
    pub custodian: Vec<Pattern>,
}

impl Roles {
    /// The roles `principal` holds. An unauthenticated caller holds none, whatever the
    /// patterns say.
    pub fn of(&self, identity: &Identity) -> BTreeSet<Role> {
        let mut roles = BTreeSet::new();
        if !identity.authenticated && identity.principal != LOOPBACK {
            return roles;
        }
        if self.admin.iter().any(|p| p.matches(&identity.principal)) {
            roles.insert(Role::Admin);
        }
        if self.auditor.iter().any(|p| p.matches(&identity.principal)) {
            roles.insert(Role::Auditor);
        }
        if self
            .custodian
            .iter()
            .any(|p| p.matches(&identity.principal))
        {
            roles.insert(Role::Custodian);
        }
        roles
    }
}

/// Who is calling, as fixed at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The principal (URI SAN, CN, `anonymous` or `loopback`).
    pub principal: String,
    /// Whether a verified client certificate named it.
    pub authenticated: bool,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The certificate's end of validity (Unix seconds), checked at every call because a
    /// connection can outlive its certificate.
    pub not_after: Option<i64>,
}

impl Identity {
    /// A caller without a certificate on a TLS listener.
    pub fn anonymous() -> Self {
        Self {
            principal: ANONYMOUS.to_owned(),
            authenticated: false,
            tls: true,
            not_after: None,
        }
    }

    /// A caller on a plaintext loopback listener.
    pub fn loopback() -> Self {
        Self {
            principal: LOOPBACK.to_owned(),
            authenticated: false,
            tls: false,
            not_after: None,
        }
    }
}

/// What an RPC needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing (`Status`, `WhoAmI`, the health service).
    Nothing,
    /// A client certificate, and nothing more (the HTTPS front's random bytes, hashes and
    /// session tokens, which touch no key).
    Certificate,
    /// A custodian's certificate over TLS (`Unseal`, `UnsealReset`, `RekeySubmit`,
    /// `VerifyShare`); failed shares are rate-limited too.
    Custodian,
    /// A role.
    Role(Role),
    /// A grant on the call's key(s) for this operation.
    Grant(Operation),
    /// A grant on the call's secret path (or the prefix listed) for this operation.
    Secret(SecretOperation),
}

/// A refusal. Its message names what was missing, never what exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    /// No client certificate, and the call needs one.
    #[error("this call needs a client certificate (mTLS); none was presented")]
    Unauthenticated,
    /// The certificate expired while its connection stayed open.
    #[error("the client certificate has expired: reconnect with a current one")]
    Expired,
    /// The call needs a role.
    #[error("permission denied: {principal:?} does not have the {} role", role.name())]
    Role {
        /// Who asked.
        principal: String,
        /// The role needed.
        role: Role,
    },
    /// The call needs a grant.
    #[error("permission denied: {principal:?} has no grant to {operation} with key {key:?}")]
    Grant {
        /// Who asked.
        principal: String,
        /// The operation needed.
        operation: Operation,
        /// The key named in the request.
        key: String,
    },
    /// The call needs a grant on a secret's path.
    #[error("permission denied: {principal:?} has no grant to {operation} on secret path {path:?}")]
    SecretGrant {
        /// Who asked.
        principal: String,
        /// The operation needed.
        operation: SecretOperation,
        /// The path (or prefix) named in the request.
        path: String,
    },
    /// A share over plaintext.
    #[error("permission denied: shares are accepted over TLS only")]
    NotTls,
}

impl Need {
    /// Whether the call needs a client certificate (everything but `Nothing`): a caller
    /// without one is refused before its request is read.
    pub(crate) fn needs_certificate(self) -> bool {
        !matches!(self, Need::Nothing)
    }
}

/// Checks a [`Need`] that does not involve grants. `Grant` needs pass here only if
/// the caller is authenticated (or loopback); their grants are checked with the keyring.
pub(crate) fn check(
    need: Need,
    identity: &Identity,
    roles: &Roles,
    now: i64,
) -> Result<(), Denied> {
    if let Some(t) = identity.not_after
        && now > t
    {
        return Err(Denied::Expired);
    }
    if need.needs_certificate() && !identity.authenticated && identity.tls {
        return Err(Denied::Unauthenticated);
    }
    let has = |role| roles.of(identity).contains(&role);
    match need {
        Need::Nothing | Need::Certificate | Need::Grant(_) | Need::Secret(_) => Ok(()),
        // Shares travel over TLS only, from a custodian's certificate.
        Need::Custodian if !identity.tls => Err(Denied::NotTls),
        Need::Custodian if has(Role::Custodian) => Ok(()),
        Need::Custodian => Err(Denied::Role {
            principal: identity.principal.clone(),
            role: Role::Custodian,
        }),
        Need::Role(role) if has(role) => Ok(()),
        Need::Role(role) => Err(Denied::Role {
            principal: identity.principal.clone(),
            role,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn who(p: &str) -> Identity {
        Identity {
            principal: p.to_owned(),
            authenticated: true,
            tls: true,
            not_after: None,
        }
    }

    #[test]
    fn checks_deny_by_default() {
        let roles = Roles {
            admin: vec![Pattern::new("spiffe://corp/ops/*").unwrap()],
            auditor: vec![Pattern::new("audit").unwrap()],
            custodian: Vec::new(),
        };
        let admin = who("spiffe://corp/ops/alice");
        let auditor = who("audit");
        let app = who("spiffe://corp/app");
        let anon = Identity::anonymous();
        let admin_need = Need::Role(super::Role::Admin);
        let audit_need = Need::Role(super::Role::Auditor);
        assert!(check(admin_need, &admin, &roles, 0).is_ok());
        assert!(check(admin_need, &auditor, &roles, 0).is_err());
        assert!(check(audit_need, &auditor, &roles, 0).is_ok());
        assert!(check(audit_need, &admin, &roles, 0).is_err());
        assert_eq!(
            check(admin_need, &app, &roles, 0).unwrap_err().to_string(),
            "permission denied: \"spiffe://corp/app\" does not have the admin role"
        );
        assert_eq!(
            check(Need::Grant(Operation::Encrypt), &anon, &roles, 0),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            check(Need::Custodian, &anon, &roles, 0),
            Err(Denied::Unauthenticated)
        );
        assert!(matches!(
            check(Need::Custodian, &admin, &roles, 0),
            Err(Denied::Role {
                role: super::Role::Custodian,
                ..
            })
        ));
        let keeper = Roles {
            custodian: vec![Pattern::new("spiffe://corp/custodians/*").unwrap()],
            ..roles.clone()
        };
        assert!(
            check(
                Need::Custodian,
                &who("spiffe://corp/custodians/ann"),
                &keeper,
                0
            )
            .is_ok()
        );
        assert_eq!(
            check(Need::Custodian, &Identity::loopback(), &roles, 0),
            Err(Denied::NotTls)
        );
        assert!(check(Need::Nothing, &anon, &roles, 0).is_ok());
        let mut expired = admin.clone();
        expired.not_after = Some(10);
        assert_eq!(
            check(Need::Nothing, &expired, &roles, 11),
            Err(Denied::Expired)
        );
        // Loopback callers hold a role only if it names them exactly.
        let lo = Roles {
            admin: vec![Pattern::new(LOOPBACK).unwrap()],
            ..Roles::default()
        };
        assert!(check(admin_need, &Identity::loopback(), &lo, 0).is_ok());
        assert!(check(admin_need, &Identity::loopback(), &roles, 0).is_err());
    }
}
