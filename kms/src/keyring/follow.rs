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
        match model::decode(name, &bytes, &self.mac_key) {
            Ok(meta) => {
                let old = read_lock(&self.keys)?.get(name).cloned();
                let entry = self.build_entry(meta, old.as_deref(), None)?;
                write_lock(&self.keys)?.insert(name.to_owned(), Arc::new(entry));
                write_lock(&self.tampered)?.remove(name);
                Ok(true)
            }
            Err(KeyringError::Tampered(_)) => {
                tracing::error!(key = %name, "key metadata failed authentication: the store was altered; key refused");
                write_lock(&self.keys)?.remove(name);
                write_lock(&self.tampered)?.insert(name.to_owned(), ());
                Ok(true)
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

    /// Reloads every key and grant (after the change feed was interrupted).
    fn reload_all(&self) -> Result<(), KeyringError> {
        let mut names = Vec::new();
        load::each_page(self.store.as_ref(), Table::Keys, |name, _| {
            names.push(name);
            Ok(())
        })?;
        for name in &names {
            self.reload_key(name)?;
        }
        let kept: std::collections::BTreeSet<&String> = names.iter().collect();
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
        let _g = self
            .admin
            .lock()
            .map_err(|_| KeyringError::Internal(LOCK))?;
        *write_lock(&self.grants)? = live;
        tracing::info!(keys = names.len(), "keyring reloaded from the shared store");
        Ok(())
    }
}
