//! The engines, listed once: what the seal opens at unseal, and every table of the store.
//!
//! A new engine is a folder (`kms/src/<engine>/`, implementing `crate::engine::Engine`)
//! and one entry in `ENGINES` (docs/ARCHITECTURE.md, "How to add an engine").

use std::error::Error;
use std::sync::{Arc, LazyLock};

use crate::audit::AuditLog;
use crate::barrier::Barrier;
use crate::engine::Engine;
use crate::hsm::Hsm;
use crate::store::{Store, Table};

/// What an engine is opened with at unseal.
pub(crate) struct Opening<'a> {
    /// The root key's holder: subkeys and sealed records.
    pub(crate) barrier: &'a Arc<Barrier>,
    pub(crate) hsm: &'a Arc<Hsm>,
    pub(crate) store: &'a Arc<dyn Store>,
    /// Where what the engine does by itself is recorded.
    pub(crate) audit: &'a AuditLog,
    /// The engines' sections of the configuration.
    pub(crate) settings: Settings,
}

/// The engines' settings, each from its section of the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// `[keyring]`.
    pub keyring: crate::keyring::Settings,
    /// `[secrets]`.
    pub secrets: crate::secrets::Settings,
    /// `[databases]`.
    pub databases: crate::databases::Settings,
}

/// Why an engine could not be opened: its own error (the keyring's `KeyringError`), or
/// the store's or the HSM's, which the seal reports as such.
pub(crate) type OpenError = Box<dyn Error + Send + Sync + 'static>;

/// One engine: its name, its tables, how it is opened.
pub(crate) struct Kind {
    /// As [`Engine::name`] says it.
    pub(crate) name: &'static str,
    /// Its tables, in the order a backup writes them.
    pub(crate) tables: &'static [Table],
    /// Opens it (at unseal: loads what it keeps in memory, checks what it stored).
    pub(crate) open: fn(&Opening<'_>) -> Result<Arc<dyn Engine>, OpenError>,
}

/// Every engine, in the order they are opened at unseal: **the one place engines are
/// listed**.
pub(crate) const ENGINES: &[Kind] = &[
    Kind {
        name: "keyring",
        tables: crate::keyring::TABLES,
        open: |o| {
            let keyring = Arc::new(crate::keyring::Keyring::load(
                Arc::clone(o.barrier),
                Arc::clone(o.hsm),
                Arc::clone(o.store),
                Arc::new(o.audit.clone()),
                o.settings.keyring,
            )?);
            keyring.start_walk();
            Ok(keyring)
        },
    },
    Kind {
        name: "secrets",
        tables: crate::secrets::TABLES,
        open: |o| {
            Ok(Arc::new(crate::secrets::Secrets::open(
                Arc::clone(o.barrier),
                Arc::clone(o.store),
                o.settings.secrets,
            )?))
        },
    },
    Kind {
        name: "credentials",
        tables: crate::credentials::TABLES,
        open: |o| {
            Ok(Arc::new(crate::credentials::Credentials::open(
                Arc::clone(o.barrier),
                Arc::clone(o.store),
            )))
        },
    },
    Kind {
        name: "databases",
        tables: crate::databases::TABLES,
        open: |o| {
            Ok(crate::databases::Databases::open(
                Arc::clone(o.barrier),
                Arc::clone(o.store),
                o.audit.clone(),
                o.settings.databases,
            )?)
        },
    },
];

/// Every table of the store: the seal's, each engine's, the audit log's; in the order a
/// backup writes them. PostgreSQL creates a `kms_<name>` table for each at open, the
/// change hints name only those that are followed, a backup holds them all.
pub fn tables() -> &'static [Table] {
    static ALL: LazyLock<Vec<Table>> = LazyLock::new(|| {
        let mut all = vec![crate::store::SYSTEM];
        for engine in ENGINES {
            all.extend_from_slice(engine.tables);
        }
        all.extend_from_slice(crate::audit::TABLES);
        all
    });
    &ALL
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each engine's entry names it as its engine does.
    #[test]
    fn the_keyring_is_listed_first() {
        assert_eq!(ENGINES.first().map(|k| k.name), Some("keyring"));
        assert_eq!(
            ENGINES.first().map(|k| k.tables),
            Some(crate::keyring::TABLES)
        );
    }

    /// Two owners never declare one name: they would share a table.
    #[test]
    fn every_table_has_its_own_name() {
        let mut names: Vec<&str> = tables().iter().map(|t| t.name()).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all);
        // Today's tables, so that a database or backup of before is read as it was.
        for name in [
            "system",
            "keys",
            "grants",
            "counters",
            "audit",
            "audit_checkpoints",
            "requests",
        ] {
            assert!(names.contains(&name), "{name}");
        }
    }
}
