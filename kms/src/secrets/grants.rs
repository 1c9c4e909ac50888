//! Grants on secrets: which principals may do which operations on which paths.
//!
//! A grant names a path pattern (`payments/*`), a grantee (a principal, or a prefix ending
//! in `*`) and operations ([`SecretOperation`]); deny by default. Grants are few and read
//! at every decision, so the engine keeps them all in memory (read at open, and again
//! after any change, its own or another server's). Each is a record sealed by the barrier
//! and named by its id: one written into the store by anyone but kms does not open, and
//! allows nothing (it is left out, and logged at each reading as an error for the
//! operators: a grant only ever allows, so leaving one out fails closed). A revoked grant
//! is removed; the audit log keeps its history. Every change of the grants writes the
//! engine's configuration record too, unchanged: the other servers sharing the store hear
//! of it, and see it at their next decision ([`Secrets::kept`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::path::PathPattern;
use super::{
    ANNOUNCE_KEY, CONFIG, Committed, GRANTS, Journal, Secrets, SecretsError, model, now_ms,
    open_json, seal_json,
};
use crate::barrier::Barrier;
use crate::policy::{Pattern, SecretOperation};
use crate::store::{Removal, Store, Write};

/// The most grants on secrets.
pub(crate) const MAX_GRANTS: usize = 10_000;

/// A grant on secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretGrant {
    /// [`model::SCHEMA`].
    pub schema: u32,
    /// 32 hex digits.
    pub id: String,
    /// The paths it covers.
    pub path: PathPattern,
    /// The grantee.
    pub principal: Pattern,
    /// What it allows.
    pub operations: BTreeSet<SecretOperation>,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// The administrator who made it.
    pub created_by: String,
}

/// A grant to make.
#[derive(Debug, Clone)]
pub(crate) struct NewSecretGrant {
    /// The path pattern.
    pub path: String,
    /// The grantee (principal or pattern).
    pub principal: String,
    /// What it allows.
    pub operations: Vec<SecretOperation>,
}

impl SecretGrant {
    /// Whether the grant lets `principal` do `operation` on `path`.
    pub(crate) fn allows(&self, principal: &str, path: &str, operation: SecretOperation) -> bool {
        self.operations.contains(&operation)
            && self.principal.matches(principal)
            && self.path.matches(path)
    }
}

/// Reads every grant. A record that does not open (the store was altered) is left out and
/// logged: it allows nothing.
pub(super) fn load(barrier: &Barrier, store: &dyn Store) -> Result<Vec<SecretGrant>, SecretsError> {
    let mut grants = Vec::new();
    for (id, sealed) in store.scan(GRANTS)? {
        match open_json::<SecretGrant>(barrier, model::GRANT, &id, &sealed) {
            Ok(grant) if grant.id == id => grants.push(grant),
            _ => {
                // The id is the store's key, which whoever altered the store chose: shown
                // escaped and cut.
                let shown: String = id.chars().take(64).collect();
                tracing::error!(id = ?shown, "a grant record of the secrets engine is not authentic (the store was altered): it allows nothing");
            }
        }
    }
    Ok(grants)
}

impl Secrets {
    /// Makes a grant.
    pub(crate) fn create_grant(
        &self,
        journal: &dyn Journal,
        new: NewSecretGrant,
        by: &str,
    ) -> Result<SecretGrant, SecretsError> {
        let path = PathPattern::new(&new.path)?;
        let principal =
            Pattern::new(&new.principal).map_err(|e| SecretsError::BadPattern(e.to_string()))?;
        if new.operations.is_empty() {
            return Err(SecretsError::BadRequest(
                "a grant allows at least one operation".to_owned(),
            ));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| SecretsError::Randomness)?;
        let grant = SecretGrant {
            schema: model::SCHEMA,
            id: data_encoding::HEXLOWER.encode(&id),
            path,
            principal,
            operations: new.operations.into_iter().collect(),
            created_ms: now_ms(),
            created_by: by.to_owned(),
        };
        let _locks = self.lock(None)?;
        if load(&self.barrier, self.store.as_ref())?.len() >= MAX_GRANTS {
            return Err(SecretsError::BadRequest(format!(
                "at most {MAX_GRANTS} grants on secrets: revoke some first"
            )));
        }
        let write = Write {
            table: GRANTS,
            key: grant.id.clone(),
            value: seal_json(&self.barrier, model::GRANT, &grant.id, &grant)?,
        };
        journal.commit(
            Committed {
                path: grant.path.as_str(),
                versions: &[],
                dropped: &[],
                grant: Some(&grant),
            },
            vec![write, self.announcement()?],
            Vec::new(),
        )?;
        self.reload_after_commit();
        Ok(grant)
    }

    /// Revokes grant `id`: the next call it allowed is refused.
    pub(crate) fn revoke_grant(
        &self,
        journal: &dyn Journal,
        id: &str,
    ) -> Result<SecretGrant, SecretsError> {
        let well_formed = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
        if !well_formed {
            return Err(SecretsError::GrantNotFound(id.chars().take(64).collect()));
        }
        let _locks = self.lock(None)?;
        let sealed = self
            .store
            .get(GRANTS, id)?
            .ok_or_else(|| SecretsError::GrantNotFound(id.to_owned()))?;
        let grant: SecretGrant = open_json(&self.barrier, model::GRANT, id, &sealed)?;
        // A shared store announces writes to the other servers, never removals
        // (`store::Follow`): without the announcement, the others would go on allowing
        // what the grant allowed.
        let announce = self.announcement()?;
        journal.commit(
            Committed {
                path: grant.path.as_str(),
                versions: &[],
                dropped: &[],
                grant: Some(&grant),
            },
            vec![announce],
            vec![Removal {
                table: GRANTS,
                from: id.to_owned(),
                to: id.to_owned(),
            }],
        )?;
        self.reload_after_commit();
        Ok(grant)
    }

    /// The grants' announcement: random bytes under [`ANNOUNCE_KEY`], written with every
    /// change of the grants, so that the other servers sharing the store hear of it (a
    /// removal is not announced) and see at their next decision that the grants changed
    /// ([`Secrets::kept`]). Nothing is read from it but whether it changed, so it depends
    /// on nothing else stored: a settings record removed or damaged in the store does not
    /// keep a grant from being revoked.
    fn announcement(&self) -> Result<Write, SecretsError> {
        let mut changed = [0u8; 16];
        getrandom::fill(&mut changed).map_err(|_| SecretsError::Randomness)?;
        Ok(Write {
            table: CONFIG,
            key: ANNOUNCE_KEY.to_owned(),
            value: changed.to_vec(),
        })
    }

    /// The grants, optionally only those whose pattern is `path` or whose grantee is
    /// `principal` (as written).
    pub(crate) fn list_grants(
        &self,
        path: &str,
        principal: &str,
    ) -> Result<Vec<SecretGrant>, SecretsError> {
        Ok(self
            .kept()?
            .grants
            .iter()
            .filter(|g| path.is_empty() || g.path.as_str() == path)
            .filter(|g| principal.is_empty() || g.principal.as_str() == principal)
            .cloned()
            .collect())
    }
}
