//! The engines, listed once: what the seal opens at unseal, and every table of the store.
//!
//! A new engine is a folder (`kms/src/<engine>/`, implementing `crate::engine::Engine`)
//! and one line in `ENGINES` (docs/ARCHITECTURE.md, "How to add an engine").

use std::sync::LazyLock;

use crate::store::Table;

/// Every engine's tables, in the order a backup writes them.
const ENGINES: &[&[Table]] = &[crate::keyring::TABLES];

/// Every table of the store: the seal's, each engine's, the audit log's; in the order a
/// backup writes them. PostgreSQL creates a `kms_<name>` table for each at open, the
/// change hints name only those that are followed, a backup holds them all.
pub fn tables() -> &'static [Table] {
    static ALL: LazyLock<Vec<Table>> = LazyLock::new(|| {
        let mut all = vec![crate::store::SYSTEM];
        for engine in ENGINES {
            all.extend_from_slice(engine);
        }
        all.extend_from_slice(crate::audit::TABLES);
        all
    });
    &ALL
}

#[cfg(test)]
mod tests {
    use super::*;

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
