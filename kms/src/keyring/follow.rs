//! Following a shared store: what other servers committed (keys, versions, grants) is
//! reloaded from the store, checked as at unseal, and published, so that every server
//! uses it within the time a notification takes; and what a call meets that this server
//! does not know yet (a key, a newer version) is looked up at once.

use super::*;
use crate::store::Change as StoreChange;

impl Keyring {
    /// Applies the changes another server (or this one) committed; `Resync` reloads all.
    pub(crate) fn follow(&self, changes: &[StoreChange]) -> Result<(), KeyringError> {
        if changes.contains(&StoreChange::Resync) {
            return self.reload_all();
        }
        for change in changes {
            match change {
                StoreChange::Entry(Table::Keys, name) => {
                    self.reload_key(name)?;
                }
                StoreChange::Entry(Table::Grants, id) => self.reload_grant(id)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads `name`'s record from the store and publishes it (reusing the material of
    /// unchanged versions, their nonce counters included). Returns whether the store has
    /// the key. Serialised with this server's own changes (the admin lock).
    pub(super) fn reload_key(&self, name: &str) -> Result<bool, KeyringError> {
        // This process's lock only: reading what is committed needs no lock across servers.
        let _g = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        self.reload_key_locked(name)
    }

    /// As [`Keyring::reload_key`], the admin lock held by the caller.
    pub(super) fn reload_key_locked(&self, name: &str) -> Result<bool, KeyringError> {
        let Some(bytes) = self.store.get(Table::Keys, name)? else {
            return Ok(false);
        };
        self.apply_key_record(name, &bytes)?;
        Ok(true)
    }

    /// Checks a stored key record and publishes it (or refuses the key by name when the
    /// record fails authentication). The admin lock is held by the caller.
    fn apply_key_record(&self, name: &str, bytes: &[u8]) -> Result<(), KeyringError> {
        match model::decode(name, bytes, &self.mac_key) {
            Ok(meta) => {
                let old = read_lock(&self.keys)?.get(name).cloned();
                let entry = self.build_entry(meta, old.as_deref(), None)?;
                write_lock(&self.keys)?.insert(name.to_owned(), Arc::new(entry));
                write_lock(&self.tampered)?.remove(name);
                Ok(())
            }
            Err(KeyringError::Tampered(_)) => {
                tracing::error!(key = %name, "key metadata failed authentication: the store was altered; key refused");
                write_lock(&self.keys)?.remove(name);
                write_lock(&self.tampered)?.insert(name.to_owned(), ());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads grant `id` from the store: live, it is (re)published; revoked, missing or
    /// failing authentication, it no longer allows anything here.
    fn reload_grant(&self, id: &str) -> Result<(), KeyringError> {
        let _g = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        let stored = match self.store.get(Table::Grants, id)? {
            Some(bytes) => grants::decode(id, &bytes, &self.mac_key)?,
            None => None,
        };
        let mut live = write_lock(&self.grants)?;
        live.remove(id);
        match stored {
            Some(g) if g.revoked_at.is_none() => live.insert(g),
            Some(_) => {}
            None => {
                tracing::error!(grant = %id, "grant record missing or failed authentication: grant refused");
            }
        }
        Ok(())
    }

    /// Reloads every key and grant (after the change feed was interrupted), page by page
    /// from the records themselves (no read per key), holding this process's admin lock
    /// throughout so that no change of its own interleaves; changes other servers commit
    /// meanwhile are announced and applied after.
    fn reload_all(&self) -> Result<(), KeyringError> {
        let _g = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        let mut kept = std::collections::HashSet::new();
        load::each_page(self.store.as_ref(), Table::Keys, |name, bytes| {
            self.apply_key_record(&name, &bytes)?;
            kept.insert(name);
            Ok(())
        })?;
        write_lock(&self.keys)?.retain(|name, _| kept.contains(name));
        let mut live = grants::LiveGrants::default();
        load::each_page(self.store.as_ref(), Table::Grants, |id, bytes| {
            if let Some(g) = grants::decode(&id, &bytes, &self.mac_key)?
                && g.revoked_at.is_none()
            {
                live.insert(g);
            }
            Ok(())
        })?;
        *write_lock(&self.grants)? = live;
        tracing::info!(keys = kept.len(), "keyring reloaded from the shared store");
        Ok(())
    }
}
