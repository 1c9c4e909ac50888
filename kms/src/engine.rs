//! The interface every engine implements: what the seal and the server ask of it once it
//! is open (DESIGN.md, "Engines and fronts").
//!
//! An engine (the keyring today; versioned secrets, machine credentials and database
//! leases to come) is opened at unseal with the [`crate::barrier::Barrier`] (its subkeys
//! and sealed records: it never sees the root key), the HSM and the store, as OpenBao
//! mounts a backend over a storage view the barrier already encrypts; `crate::engines`
//! lists how each is opened and its tables. Once open, through this trait only:
//! - it hears changes other servers committed to its tables, at once ([`Engine::heard`]),
//!   and applies them when the follow task asks ([`Engine::follow`]);
//! - it does what it does by itself (rotations, expiries, leases) at each maintenance tick
//!   ([`Engine::maintain`]), and logs what it did.
//!
//! The seal routes a change to the engines whose tables it names (a `Resync` to all);
//! sealing drops every engine, and with the last one the barrier and the root key.

use std::any::Any;
use std::sync::Arc;

use crate::store::{Change, Table};

/// An open engine. Its methods block (store and HSM calls): call them from a blocking
/// thread.
pub(crate) trait Engine: Send + Sync + 'static {
    /// The engine's name, as `crate::engines` lists it (log fields, errors).
    fn name(&self) -> &'static str;

    /// The tables the engine owns: the changes the seal routes to it are those that name
    /// one of them (and every `Resync`).
    fn tables(&self) -> &'static [Table];

    /// Notes `changes` as heard, before they are applied, without waiting on the store
    /// (what it serves meanwhile must not be stale: the keyring refuses the keys they
    /// concern until they are applied).
    fn heard(&self, changes: &[Change]);

    /// Applies `changes` (and every change heard and not applied yet); returns those still
    /// not applied, for the follow task to try again with backoff.
    fn follow(&self, changes: &[Change]) -> Vec<Change>;

    /// Does what is due at `now` (Unix seconds): the server calls it every maintenance
    /// interval while unsealed. The engine logs and audits what it did.
    fn maintain(&self, now: u64);

    /// The engine as `Any`, so that the seal can hand out the keyring typed (its callers
    /// need its own API) while it holds every engine alike.
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// Whether `change` concerns an engine owning `tables`: an entry of one of them, or a
/// resync (reload everything).
pub(crate) fn concerns(tables: &[Table], change: &Change) -> bool {
    match change {
        Change::Resync => true,
        Change::Entry(table, _) => tables.contains(table),
    }
}

/// The changes of `changes` that concern an engine owning `tables`.
pub(crate) fn routed(tables: &[Table], changes: &[Change]) -> Vec<Change> {
    changes
        .iter()
        .filter(|c| concerns(tables, c))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Follow, SYSTEM};

    #[test]
    fn a_change_goes_to_the_owner_of_its_table_and_a_resync_to_all() {
        const MINE: Table = Table::new("mine", Follow::Changes);
        let changes = [
            Change::Entry(MINE, "a".into()),
            Change::Entry(SYSTEM, "seal".into()),
            Change::Resync,
        ];
        assert_eq!(
            routed(&[MINE], &changes),
            [Change::Entry(MINE, "a".into()), Change::Resync]
        );
        assert_eq!(routed(&[], &changes), [Change::Resync]);
    }
}
