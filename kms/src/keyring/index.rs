//! The keyring's index (table [`super::INDEX`]): what finds a key's grants, and an HSM
//! key's name from the key id in its token objects' labels, without reading every record.
//!
//! Entries are hints, written in the same transaction as the records they point at and
//! never trusted: a record found through the index is read from its own table and
//! authenticated there (a grant must name the key it was found under; a key record must
//! carry the key id it was found by). An entry removed or altered by someone who can write
//! the store can only hide a grant (a refusal) or an orphan object (kept, never destroyed).
//!
//! - `g/KEY/GRANT_ID` -> `live` or `revoked` (a revoked grant is not read again);
//! - `h/KEY_ID` -> the key's name, for keys of HSM protection;
//! - `v` -> `1` once the index is complete (built from the records by the first unseal of
//!   a store written before it existed).

use super::{INDEX, KeyMeta, Keyring, KeyringError, Protection, Store, Write, grants, load, model};

/// The marker of a complete index, and its value.
const COMPLETE: (&str, &[u8]) = ("v", b"1");
const LIVE: &[u8] = b"live";
const REVOKED: &[u8] = b"revoked";

/// The prefix of the entries of `key`'s grants.
pub(super) fn grants_prefix(key: &str) -> String {
    format!("g/{key}/")
}

/// The entry of a grant: under its key, live or revoked.
pub(super) fn grant_write(grant: &grants::Grant) -> Write {
    Write {
        table: INDEX,
        key: format!("{}{}", grants_prefix(&grant.key), grant.id),
        value: if grant.revoked_at.is_none() {
            LIVE
        } else {
            REVOKED
        }
        .to_vec(),
    }
}

/// Whether an entry's value says its grant may be live (anything but `revoked` does: the
/// grant's own record decides).
pub(super) fn maybe_live(value: &[u8]) -> bool {
    value != REVOKED
}

/// The entry that finds an HSM key by its key id, if `meta` is one.
pub(super) fn hsm_write(meta: &KeyMeta) -> Option<Write> {
    (meta.protection == Protection::Hsm).then(|| Write {
        table: INDEX,
        key: format!("h/{}", meta.key_id),
        value: meta.name.as_bytes().to_vec(),
    })
}

impl Keyring {
    /// Builds the index from the records if the store does not have a complete one (a
    /// store written before it existed, or restored from such a backup): once, at the
    /// unseal, at the cost of reading every record.
    pub(super) fn complete_index(&self) -> Result<(), KeyringError> {
        if self.store.get(INDEX, COMPLETE.0)?.is_some() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (mut grants_found, mut hsm_keys) = (0usize, 0usize);
        let mut page: Vec<Write> = Vec::new();
        let flush = |page: &mut Vec<Write>, store: &dyn Store| -> Result<(), KeyringError> {
            if !page.is_empty() {
                store.write_all(page)?;
                page.clear();
            }
            Ok(())
        };
        load::each_page(self.store.as_ref(), super::GRANTS, |id, bytes| {
            // An altered record is not indexed: it is refused anyway.
            if let Some(g) = grants::decode(&id, &bytes, &self.mac_key)? {
                page.push(grant_write(&g));
                grants_found += 1;
            }
            if page.len() >= 1024 {
                flush(&mut page, self.store.as_ref())?;
            }
            Ok(())
        })?;
        load::each_page(self.store.as_ref(), super::KEYS, |name, bytes| {
            if let Ok(meta) = model::decode(&name, &bytes, &self.mac_key)
                && let Some(w) = hsm_write(&meta)
            {
                page.push(w);
                hsm_keys += 1;
            }
            if page.len() >= 1024 {
                flush(&mut page, self.store.as_ref())?;
            }
            Ok(())
        })?;
        page.push(Write {
            table: INDEX,
            key: COMPLETE.0.to_owned(),
            value: COMPLETE.1.to_vec(),
        });
        flush(&mut page, self.store.as_ref())?;
        tracing::info!(
            grants = grants_found,
            hsm_keys,
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "keyring index built from the records (once, for a store written before it)"
        );
        Ok(())
    }

    /// The key whose HSM objects carry `key_id`, authenticated; `None` if the index does
    /// not name one or names one whose record does not carry that id.
    pub(super) fn hsm_key_by_id(&self, key_id: &str) -> Result<Option<KeyMeta>, KeyringError> {
        let Some(name) = self.store.get(INDEX, &format!("h/{key_id}"))? else {
            return Ok(None);
        };
        let Ok(name) = String::from_utf8(name) else {
            return Ok(None);
        };
        if model::check_name(&name).is_err() {
            return Ok(None);
        }
        let Some(bytes) = self.store.get(super::KEYS, &name)? else {
            return Ok(None);
        };
        Ok(model::decode(&name, &bytes, &self.mac_key)
            .ok()
            .filter(|m| m.key_id == key_id))
    }
}
