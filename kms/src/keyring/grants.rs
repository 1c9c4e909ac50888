//! Grants: which principal may use which key for which operations.
//!
//! A grant names one key, a grantee (a principal, or a prefix ending in `*`), a set of
//! [`Operation`]s and, optionally, the one associated data its requests must carry. It is
//! stored like key metadata: JSON with an HMAC under the metadata key (domain
//! `kms/v1/grant-record/`, bound to the grant's id), so that a grant written into the store
//! by anyone but the keyring is refused when it is read. The associated data of a
//! constrained grant is stored only as a keyed hash (domain `kms/v1/grant-aad/`, bound to
//! the key name). Revoked grants stay in the store, marked, as history.
//!
//! A key's grants are found through the index (`keyring::index`: `g/KEY/ID`), read and
//! authenticated at the key's first call, and kept in the keyring's bounded cache of grant
//! lists by key (`Keyring::grants`) until a change to one of them evicts the list.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::model::{open_record, record_mac, seal_record};
use super::{
    Change, Journal, Keyring, KeyringError, MAX_AAD, cache, check_size, hex, index, load, now,
    random,
};
use crate::policy::{Operation, Pattern};
use crate::store::Write;

/// The grant record's schema version.
pub(crate) const GRANT_SCHEMA: u32 = 1;

/// The most live grants per key.
pub(crate) const MAX_GRANTS_PER_KEY: usize = 1000;

const RECORD_DOMAIN: &str = "kms/v1/grant-record/";
const AAD_DOMAIN: &str = "kms/v1/grant-aad/";

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Schema version.
    pub schema: u32,
    /// 32 hex digits.
    pub id: String,
    /// The name of the key the grant is (or will be) on; it must exist.
    pub key: String,
    /// The grantee.
    pub principal: Pattern,
    /// What it allows.
    pub operations: BTreeSet<Operation>,
    /// The keyed hash of the one associated data allowed (hex), if constrained.
    pub associated_data_mac: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// The admin who made it.
    pub created_by: String,
    /// When it was revoked (Unix seconds), if it was.
    pub revoked_at: Option<u64>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
}

/// A grant to make. No `Debug`: it holds associated data.
pub struct NewGrant {
    /// The name of the key the grant is (or will be) on; it must exist.
    pub key: String,
    /// The grantee (principal or pattern).
    pub principal: String,
    /// What it allows.
    pub operations: Vec<Operation>,
    /// The one associated data allowed, if constrained.
    pub associated_data: Option<Zeroizing<Vec<u8>>>,
}

impl Grant {
    /// Whether this (live) grant lets `principal` do `operation` with associated data
    /// `aads` (every one must match a constrained grant).
    pub(super) fn allows(
        &self,
        principal: &str,
        operation: Operation,
        aads: &[&[u8]],
        mac_key: &[u8; 32],
    ) -> Result<bool, KeyringError> {
        if !self.operations.contains(&operation) || !self.principal.matches(principal) {
            return Ok(false);
        }
        let Some(want) = &self.associated_data_mac else {
            return Ok(true);
        };
        let Ok(want) = data_encoding::HEXLOWER.decode(want.as_bytes()) else {
            return Ok(false);
        };
        for aad in aads {
            let got = aad_mac(mac_key, &self.key, aad)?;
            if subtle::ConstantTimeEq::ct_eq(want.as_slice(), got.as_slice()).unwrap_u8() != 1 {
                return Ok(false);
            }
        }
        Ok(!aads.is_empty())
    }
}

/// The keyed hash a constrained grant keeps of its associated data.
pub(super) fn aad_mac(mac_key: &[u8; 32], key: &str, aad: &[u8]) -> Result<Vec<u8>, KeyringError> {
    record_mac(mac_key, AAD_DOMAIN, key, aad)
}

/// Checks a grant id's form (so that a bad one is INVALID_ARGUMENT, not NOT_FOUND).
pub(crate) fn check_id(id: &str) -> Result<(), KeyringError> {
    if id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(KeyringError::BadRequest(
            "a grant id is 32 lowercase hex digits (see `kms grant list`)",
        ))
    }
}

/// The stored bytes of a grant.
pub(super) fn encode(grant: &Grant, mac_key: &[u8; 32]) -> Result<Vec<u8>, KeyringError> {
    seal_record(grant, RECORD_DOMAIN, &grant.id, mac_key)
}

/// A stored grant, authenticated; `None` if it was altered or moved.
pub(super) fn decode(
    id: &str,
    bytes: &[u8],
    mac_key: &[u8; 32],
) -> Result<Option<Grant>, KeyringError> {
    Ok(open_record::<Grant>(bytes, RECORD_DOMAIN, id, mac_key)?
        .filter(|g| g.schema == GRANT_SCHEMA && g.id == id))
}

/// The keyring's grant methods: grants are changed through the same [`super::Journal`]
/// as keys, and checked at every call (`Keyring::permits`).
impl Keyring {
    /// Makes a grant on an existing key. `by` is the admin's principal.
    pub fn create_grant(
        &self,
        req: NewGrant,
        by: &str,
        journal: &dyn Journal,
    ) -> Result<Grant, KeyringError> {
        let principal = crate::policy::Pattern::new(&req.principal)?;
        let operations: std::collections::BTreeSet<_> = req.operations.iter().copied().collect();
        if operations.is_empty() {
            return Err(KeyringError::BadRequest(
                "a grant needs at least one operation",
            ));
        }
        if operations.contains(&crate::policy::Operation::Reencrypt) {
            return Err(KeyringError::BadRequest(
                "the operation reencrypt was split: grant reencrypt-from on the source key and reencrypt-to on the destination key",
            ));
        }
        if req.associated_data.is_some() && !operations.iter().all(|o| o.has_associated_data()) {
            return Err(KeyringError::BadRequest(
                "an associated-data constraint applies only to encrypt, decrypt, reencrypt-from, reencrypt-to and generate-data-key",
            ));
        }
        if let Some(aad) = &req.associated_data {
            check_size("associated data", aad.len(), MAX_AAD, "")?;
        }
        let _g = self.admin()?;
        journal.admit()?;
        self.entry_locked(&req.key)?;
        let live_on_key = self.read_grants(&req.key)?.len();
        if live_on_key >= MAX_GRANTS_PER_KEY {
            return Err(KeyringError::NotAllowed(
                "the key has the most grants allowed (1000): revoke some first",
            ));
        }
        let associated_data_mac = match &req.associated_data {
            Some(aad) => Some(hex(&aad_mac(&self.mac_key, &req.key, aad)?)),
            None => None,
        };
        let grant = Grant {
            schema: GRANT_SCHEMA,
            id: hex(&random::<16>()?),
            key: req.key,
            principal,
            operations,
            associated_data_mac,
            created_at: now(),
            created_by: by.to_owned(),
            revoked_at: None,
            revoked_by: None,
        };
        self.commit_grant(&grant, journal)?;
        Ok(grant)
    }

    /// Revokes a live grant: the next call it would have allowed is refused.
    pub fn revoke_grant(
        &self,
        id: &str,
        by: &str,
        journal: &dyn Journal,
    ) -> Result<Grant, KeyringError> {
        check_id(id)?;
        let _g = self.admin()?;
        journal.admit()?;
        let mut grant = match self.store.get(crate::keyring::GRANTS, id)? {
            Some(bytes) => decode(id, &bytes, &self.mac_key)?,
            None => None,
        }
        .filter(|g| g.revoked_at.is_none())
        .ok_or_else(|| KeyringError::GrantNotFound(id.to_owned()))?;
        grant.revoked_at = Some(now());
        grant.revoked_by = Some(by.to_owned());
        self.commit_grant(&grant, journal)?;
        Ok(grant)
    }

    /// Writes a grant (and its index entry) with its audit record, then evicts its key's
    /// cached grants: the next call reads them again.
    fn commit_grant(&self, grant: &Grant, journal: &dyn Journal) -> Result<(), KeyringError> {
        let bytes = encode(grant, &self.mac_key)?;
        let written = journal.commit(
            Change::Grant(grant),
            vec![
                Write {
                    table: crate::keyring::GRANTS,
                    key: grant.id.clone(),
                    value: bytes,
                },
                index::grant_write(grant),
            ],
        );
        // Evicted even if the commit failed: it may have been written all the same.
        self.grants.evict(&grant.key);
        written
    }

    /// The live grants on `key`: cached, or read through the index and authenticated now.
    fn grants_on(&self, key: &str) -> Result<Arc<[Grant]>, KeyringError> {
        if let Some(cache::Cached::Found(g)) = self.grants.get(key) {
            return Ok(g);
        }
        let epoch = self.grants.epoch();
        let list = self.read_grants(key)?;
        self.grants
            .insert_loaded(key, cache::Cached::Found(Arc::clone(&list)), epoch);
        Ok(list)
    }

    /// Reads the live grants on `key` from the store: each one the index names (and does not
    /// say revoked), authenticated, on that key, not revoked.
    fn read_grants(&self, key: &str) -> Result<Arc<[Grant]>, KeyringError> {
        let prefix = index::grants_prefix(key);
        let mut from = prefix.clone();
        let mut live = Vec::new();
        'pages: loop {
            let page = self.store.range(crate::keyring::INDEX, &from, 256)?;
            let full = page.len() == 256;
            for (entry, value) in page {
                let Some(id) = entry.strip_prefix(&prefix) else {
                    break 'pages;
                };
                if index::maybe_live(&value)
                    && let Some(bytes) = self.store.get(crate::keyring::GRANTS, id)?
                {
                    match decode(id, &bytes, &self.mac_key)? {
                        Some(g) if g.key == key && g.revoked_at.is_none() => live.push(g),
                        Some(_) => {}
                        None => {
                            tracing::error!(grant = %id, "grant record failed authentication: the store was altered; grant refused");
                        }
                    }
                }
                // Ids have no NUL: this is the next possible entry.
                from = format!("{entry}\0");
            }
            if !full {
                break;
            }
        }
        Ok(live.into())
    }

    /// The live grants, optionally only those on `key` and those whose grantee is or
    /// matches `principal` (empty: all, read from the store page by page).
    pub fn list_grants(&self, key: &str, principal: &str) -> Result<Vec<Grant>, KeyringError> {
        let wanted = |g: &Grant| {
            principal.is_empty()
                || g.principal.as_str() == principal
                || g.principal.matches(principal)
        };
        // Never a revoked grant listed as live while a change is unapplied.
        if !key.is_empty() {
            self.refuse_if_behind(key)?;
            return Ok(self
                .grants_on(key)?
                .iter()
                .filter(|g| wanted(g))
                .cloned()
                .collect());
        }
        self.refuse_if_any_behind()?;
        let mut all = Vec::new();
        load::each_page(self.store.as_ref(), crate::keyring::GRANTS, |id, bytes| {
            if let Some(g) = decode(&id, &bytes, &self.mac_key)?
                && g.revoked_at.is_none()
                && wanted(&g)
            {
                all.push(g);
            }
            Ok(())
        })?;
        Ok(all)
    }

    /// Whether a live grant lets `principal` do `operation` with `key`, with the
    /// request's associated data `aads` (all of them must satisfy a constrained grant).
    /// Refuses (`KeyBehind`, `Behind`) while a change to the key or its grants that this
    /// server heard of is not applied: a revoked grant is never served stale.
    pub(crate) fn permits(
        &self,
        principal: &str,
        key: &str,
        operation: crate::policy::Operation,
        aads: &[&[u8]],
    ) -> Result<bool, KeyringError> {
        self.refuse_if_behind(key)?;
        for g in self.grants_on(key)?.iter() {
            if g.allows(principal, operation, aads, &self.mac_key)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn grant(mac_key: &[u8; 32], aad: Option<&[u8]>) -> Grant {
        Grant {
            schema: GRANT_SCHEMA,
            id: "00112233445566778899aabbccddeeff".into(),
            key: "payments".into(),
            principal: Pattern::new("spiffe://corp/app/*").unwrap(),
            operations: [Operation::Encrypt, Operation::Decrypt].into(),
            associated_data_mac: aad
                .map(|a| data_encoding::HEXLOWER.encode(&aad_mac(mac_key, "payments", a).unwrap())),
            created_at: 1,
            created_by: "admin".into(),
            revoked_at: None,
            revoked_by: None,
        }
    }

    #[test]
    fn allows_only_what_it_names() {
        let k = [7u8; 32];
        let g = grant(&k, None);
        assert!(
            g.allows("spiffe://corp/app/a", Operation::Encrypt, &[b""], &k)
                .unwrap()
        );
        assert!(
            !g.allows("spiffe://corp/app/a", Operation::Sign, &[], &k)
                .unwrap()
        );
        assert!(
            !g.allows("spiffe://corp/other", Operation::Encrypt, &[b""], &k)
                .unwrap()
        );
        let c = grant(&k, Some(b"tenant=1"));
        assert!(
            c.allows(
                "spiffe://corp/app/a",
                Operation::Decrypt,
                &[b"tenant=1"],
                &k
            )
            .unwrap()
        );
        assert!(
            !c.allows(
                "spiffe://corp/app/a",
                Operation::Decrypt,
                &[b"tenant=2"],
                &k
            )
            .unwrap()
        );
        assert!(
            !c.allows(
                "spiffe://corp/app/a",
                Operation::Decrypt,
                &[b"tenant=1", b"x"],
                &k
            )
            .unwrap()
        );
    }

    #[test]
    fn stored_grants_are_authenticated() {
        let k = [7u8; 32];
        let g = grant(&k, None);
        let bytes = encode(&g, &k).unwrap();
        assert_eq!(decode(&g.id, &bytes, &k).unwrap(), Some(g.clone()));
        // Another id (a record copied over another), another key, a changed byte.
        assert_eq!(
            decode("ffffffffffffffffffffffffffffffff", &bytes, &k).unwrap(),
            None
        );
        assert_eq!(decode(&g.id, &bytes, &[8u8; 32]).unwrap(), None);
        let text = String::from_utf8(bytes).unwrap().replace("encrypt", "sign");
        assert_eq!(decode(&g.id, text.as_bytes(), &k).unwrap(), None);
    }
}
