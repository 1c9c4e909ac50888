//! The seal record's authentication, and the instance identity it carries.
//!
//! Whoever can write the store (a DBA, the database role, the disk of the redb file, a
//! forged backup) must never make kms destroy or swap key material in the HSM. The seal
//! record is what kms acts on before an unseal, so it carries an HMAC-SHA256 made inside
//! the HSM with the **seal record key**: a 256-bit generic secret token object (sensitive,
//! never extractable, sign and verify only), labelled after the configured master key label
//! (`MASTER_KEY_LABEL-seal-record`) and made at init. It is found by that label, never by
//! anything the record says, and no API of kms computes a MAC with it. A record that does
//! not verify is refused whole (the server does not start, or does not take up another
//! server's change) and nothing is done with it.
//!
//! A record without a MAC is accepted only while the token holds no seal record key (a
//! store made before records were authenticated); nothing destructive is done with it, and
//! at its first unseal, once the root key has unwrapped, it is authenticated: a seal record
//! key is made, the record gets an instance identity and its MAC, and the retired master
//! keys it lists (never authenticated) are dropped from it with a warning naming them.
//!
//! The record also names the instance ([`InstanceId`]) and what it owns in the token
//! ([`Ownership`]). A copy restored from a backup (`kms backup restore` leaves the
//! [`crate::backup::RESTORED_MARKER`]) takes a new identity at its first start, or first
//! unseal with the PIN in the shares, remembering its predecessor, whose objects it destroys
//! only after `kms operator take-over`.

use super::rekey::CeremonyCommit;
use super::{
    Deserialize, Hsm, HsmKeyKind, Inner, InstanceId, KeyHandle, Ownership, Predecessor,
    SEAL_RECORD_KEY, SealError, SealManager, SealRecord, Sha256, State, Store, Table, Write,
    read_record, rotate, take_up, unix_now,
};
use crate::audit::{AuditEvent, CeremonySummary, SYSTEM_PRINCIPAL};
use crate::backup::RESTORED_MARKER;
use crate::store::Removal;
use subtle::ConstantTimeEq;

/// The seal record key's label: the configured master key label, then this.
const RECORD_KEY_SUFFIX: &str = "-seal-record";
/// What the record's MAC covers: this, then the record's JSON without its `mac`.
const RECORD_MAC_DOMAIN: &[u8] = b"kms/v1/seal-record\0";
/// The service named in the records of what the seal does by itself.
const SERVICE: &str = "kms.v1.System";

/// What `take-over` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeOver {
    /// This instance (hex).
    pub instance: String,
    /// Every instance whose objects it now owns besides its own (hex).
    pub adopted: Vec<String>,
    /// Whether it owns untagged objects now.
    pub untagged: bool,
}

/// How a stored record stands against the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Authenticity {
    /// Its MAC verifies with the seal record key.
    Authentic,
    /// No MAC, and no seal record key in the token: made before records were authenticated.
    Legacy,
}

/// The restore's marker, as `kms backup restore` writes it.
#[derive(Debug, Default, Deserialize)]
struct Restored {
    #[serde(default)]
    sha256: String,
}

/// The label of the seal record key of this configuration.
pub(super) fn record_key_label(hsm: &Hsm) -> String {
    format!("{}{RECORD_KEY_SUFFIX}", hsm.master_key_label())
}

/// The seal record key: the one HMAC key with its label (class, type, sensitive and never
/// extractable checked), if the token has one.
pub(super) fn find_record_key(hsm: &Hsm) -> Result<Option<KeyHandle>, SealError> {
    Ok(hsm.find_key(
        HsmKeyKind::HmacSha256,
        crate::hsm::Provenance::Generated,
        &record_key_label(hsm),
        None,
    )?)
}

fn mac_input(record: &SealRecord) -> Result<Vec<u8>, SealError> {
    let mut bare = record.clone();
    bare.mac = None;
    let mut input = RECORD_MAC_DOMAIN.to_vec();
    serde_json::to_writer(&mut input, &bare).map_err(|_| SealError::CorruptRecord)?;
    Ok(input)
}

/// `record` with its MAC made by `key` in the HSM.
pub(super) fn sign(
    hsm: &Hsm,
    key: KeyHandle,
    mut record: SealRecord,
) -> Result<SealRecord, SealError> {
    record.mac = None;
    let tag = hsm.sign(HsmKeyKind::HmacSha256, key, &mac_input(&record)?)?;
    record.mac = Some(data_encoding::HEXLOWER.encode(&tag));
    Ok(record)
}

/// Checks `record`'s MAC with the token's seal record key (the HSM must be logged in).
pub(super) fn authenticate(hsm: &Hsm, record: &SealRecord) -> Result<Authenticity, SealError> {
    Ok(match authenticated_by(hsm, record)? {
        Some(_) => Authenticity::Authentic,
        None => Authenticity::Legacy,
    })
}

/// As [`authenticate`], with the seal record key that vouched for `record` (`None`: a record
/// of before, and no key in the token).
fn authenticated_by(hsm: &Hsm, record: &SealRecord) -> Result<Option<KeyHandle>, SealError> {
    // Logged out, the token hides its private objects: "no record key" would be a lie.
    if !hsm.is_logged_in() {
        return Err(SealError::Sealed);
    }
    let key = find_record_key(hsm)?;
    match (&record.mac, key) {
        (Some(mac), Some(key)) => {
            let want = hsm.sign(HsmKeyKind::HmacSha256, key, &mac_input(record)?)?;
            let got = data_encoding::HEXLOWER
                .decode(mac.as_bytes())
                .map_err(|_| SealError::RecordNotAuthentic)?;
            if want.as_slice().ct_eq(got.as_slice()).unwrap_u8() == 1 {
                Ok(Some(key))
            } else {
                Err(SealError::RecordNotAuthentic)
            }
        }
        (Some(_), None) => Err(SealError::RecordKeyMissing(record_key_label(hsm))),
        // The token has a record key: every record this deployment writes carries a MAC, so
        // one without is altered (a MAC stripped to pass as a record of before).
        (None, Some(_)) => Err(SealError::RecordNotAuthentic),
        (None, None) => Ok(None),
    }
}

impl SealRecord {
    /// What this record's instance owns in the token.
    pub(super) fn ownership(&self) -> Result<Ownership, SealError> {
        let parse = |s: &String| InstanceId::from_hex(s).ok_or(SealError::CorruptRecord);
        Ok(Ownership {
            instance: self.instance.as_ref().map(parse).transpose()?,
            adopted: self
                .adopted_instances
                .iter()
                .map(parse)
                .collect::<Result<_, _>>()?,
            untagged: self.owns_untagged,
        })
    }
}

impl SealManager {
    /// The store write of `next` with its MAC (when the token has a seal record key: a
    /// store of before keeps writing records without one until its first unseal), and the
    /// record as written. The HSM must be logged in. `base`, the record `next` was made from,
    /// must be the stored record exactly (its MAC included), and that must be authentic:
    /// nothing is signed that grew out of a record someone altered (with the PIN in the
    /// shares, a sealed server took another server's record up without checking it). Called
    /// under the store's change lock, this is also what refuses a step another server
    /// sharing the store overtook (`RecordChanged`).
    pub(super) fn signed_write(
        &self,
        base: &SealRecord,
        next: SealRecord,
    ) -> Result<(SealRecord, Write), SealError> {
        let stored = read_record(self.store.as_ref())?.ok_or(SealError::NotInitialized)?;
        if !same(&stored, base) {
            return Err(SealError::RecordChanged);
        }
        let record = match authenticated_by(&self.hsm, &stored)? {
            Some(key) => sign(&self.hsm, key, next)?,
            None => next,
        };
        let write = Write {
            table: Table::System,
            key: SEAL_RECORD_KEY.to_owned(),
            value: serde_json::to_vec(&record).map_err(|_| SealError::CorruptRecord)?,
        };
        Ok((record, write))
    }

    /// Authenticates the record held now, if this process has not yet (the HSM must be
    /// logged in), and takes up the ownership it gives.
    pub(super) fn ensure_authentic(&self, inner: &mut Inner) -> Result<Authenticity, SealError> {
        let record = inner.record.as_ref().ok_or(SealError::NotInitialized)?;
        if inner.authentic {
            return Ok(Authenticity::Authentic);
        }
        let authenticity = authenticate(&self.hsm, record)?;
        if authenticity == Authenticity::Authentic {
            self.hsm.set_ownership(record.ownership()?);
            inner.authentic = true;
        }
        Ok(authenticity)
    }

    /// Brings the record held now to what this instance acts on: authenticated (a record of
    /// before is authenticated only `unwrapped`, once the root key has unwrapped at an
    /// unseal), with its own identity after a restore, and with the master keys its
    /// rotations retired destroyed when a crash left them in the token. The HSM must be
    /// logged in.
    pub(super) fn settle_record(
        &self,
        inner: &mut Inner,
        unwrapped: bool,
    ) -> Result<(), SealError> {
        match self.ensure_authentic(inner)? {
            Authenticity::Legacy if unwrapped => self.upgrade(inner)?,
            Authenticity::Legacy => {
                tracing::warn!(
                    "the seal record was made before seal records were authenticated: nothing in the HSM is destroyed on its word; it is authenticated at the next unseal"
                );
                return Ok(());
            }
            Authenticity::Authentic => {
                let here = location_of(self.store.as_ref())?;
                let moved = inner
                    .record
                    .as_ref()
                    .and_then(|r| r.location.as_ref())
                    .is_some_and(|there| *there != here);
                if moved || self.store.get(Table::System, RESTORED_MARKER)?.is_some() {
                    self.renew_after_restore(inner, here)?;
                }
            }
        }
        if let (Some(record), Some(in_force)) = (inner.record.as_ref(), inner.master_key) {
            rotate::destroy_retired(&self.hsm, record, in_force);
        }
        Ok(())
    }

    /// Under the store's change lock: whether another server sharing the store changed the
    /// record meanwhile (then it is taken up, authenticated, and `true` returned).
    fn taken_up_meanwhile(&self, inner: &mut Inner, ours: &SealRecord) -> Result<bool, SealError> {
        let Some(stored) = read_record(self.store.as_ref())? else {
            return Err(SealError::NotInitialized);
        };
        if same(&stored, ours) {
            return Ok(false);
        }
        if authenticate(&self.hsm, &stored)? == Authenticity::Authentic {
            self.hsm.set_ownership(stored.ownership()?);
            inner.authentic = true;
        }
        take_up(inner, stored);
        Ok(true)
    }

    /// Authenticates a record of before: a seal record key made (this instance's), an
    /// identity given, the record MAC'd; the retired master keys it listed are dropped, as
    /// nothing vouches for them. A restored copy's record of before becomes a restored copy.
    fn upgrade(&self, inner: &mut Inner) -> Result<(), SealError> {
        let current = inner.record.clone().ok_or(SealError::NotInitialized)?;
        let _other_servers = self.store.lock_changes()?;
        if self.taken_up_meanwhile(inner, &current)? {
            return Ok(());
        }
        let restored = self.store.get(Table::System, RESTORED_MARKER)?;
        let instance = InstanceId::random().ok_or(SealError::Randomness)?;
        let mut next = current.clone();
        next.instance = Some(instance.to_string());
        next.adopted_instances.clear();
        next.owns_untagged = restored.is_none();
        next.location = Some(location_of(self.store.as_ref())?);
        next.restored_from = restored.as_deref().map(|m| Predecessor {
            instances: Vec::new(),
            untagged: true,
            backup_sha256: restored_sha256(m),
            renewed_at: unix_now(),
        });
        for dropped in std::mem::take(&mut next.retired_master_keys) {
            tracing::warn!(
                label = %dropped.label,
                id = %dropped.id,
                "the seal record listed this master key as retired before records were authenticated: kms does not destroy it on that word; an HSM administrator should check and destroy it"
            );
        }
        self.hsm.set_ownership(next.ownership()?);
        let result = self.write_upgrade(inner, next, restored.is_some());
        if result.is_err() {
            self.hsm.set_ownership(Ownership::default());
        }
        result
    }

    fn write_upgrade(
        &self,
        inner: &mut Inner,
        next: SealRecord,
        restored: bool,
    ) -> Result<(), SealError> {
        let key = match find_record_key(&self.hsm)? {
            Some(key) => key,
            None => {
                let id = self.hsm.new_object_id()?;
                self.hsm
                    .generate_key(HsmKeyKind::HmacSha256, &record_key_label(&self.hsm), &id)?
                    .0
            }
        };
        let next = sign(&self.hsm, key, next)?;
        let value = serde_json::to_vec(&next).map_err(|_| SealError::CorruptRecord)?;
        let event = system_event("AuthenticateSealRecord", &next);
        let removals = restored.then(restored_removal).into_iter().collect();
        let written = self.audit.append_removing(
            event,
            vec![Write {
                table: Table::System,
                key: SEAL_RECORD_KEY.to_owned(),
                value,
            }],
            removals,
        );
        if written.is_err() {
            // Never named by a stored record: the next unseal makes another.
            let _ = self.hsm.destroy(key);
            return Err(SealError::AuditUnavailable);
        }
        tracing::info!(
            instance = next.instance.as_deref().unwrap_or_default(),
            "the seal record is authenticated by the HSM from now on"
        );
        inner.record = Some(next);
        inner.authentic = true;
        Ok(())
    }

    /// A copy (restored from a backup, or a record found in another store than the one it
    /// was written for) takes its own identity: what the instance it came from owned becomes
    /// its predecessor's, to take over only when the operator says that instance is gone.
    /// One write, with its audit record, removing the restore's marker.
    fn renew_after_restore(&self, inner: &mut Inner, here: String) -> Result<(), SealError> {
        let current = inner.record.clone().ok_or(SealError::NotInitialized)?;
        let _other_servers = self.store.lock_changes()?;
        if self.taken_up_meanwhile(inner, &current)? {
            return Ok(());
        }
        let marker = self.store.get(Table::System, RESTORED_MARKER)?;
        let moved = current
            .location
            .as_ref()
            .is_some_and(|there| *there != here);
        if marker.is_none() && !moved {
            return Ok(());
        }
        let instance = InstanceId::random().ok_or(SealError::Randomness)?;
        let mut next = current.clone();
        next.restored_from = Some(Predecessor {
            instances: current
                .instance
                .iter()
                .chain(&current.adopted_instances)
                .cloned()
                .collect(),
            untagged: current.owns_untagged,
            backup_sha256: marker.as_deref().map(restored_sha256).unwrap_or_default(),
            renewed_at: unix_now(),
        });
        next.instance = Some(instance.to_string());
        next.adopted_instances.clear();
        next.owns_untagged = false;
        next.location = Some(here);
        let (next, write) = self.signed_write(&current, next)?;
        self.audit
            .append_removing(
                system_event("RenewInstance", &next),
                vec![write],
                vec![restored_removal()],
            )
            .map_err(|_| SealError::AuditUnavailable)?;
        tracing::warn!(
            instance = %instance,
            moved,
            "a copy of another instance's store (restored from a backup, or found in another store than the one its seal record was written for): it took its own instance identity, and destroys nothing the instance it came from made until `kms operator take-over`"
        );
        self.hsm.set_ownership(next.ownership()?);
        inner.record = Some(next);
        Ok(())
    }

    /// Takes over the objects of the instance this copy was restored from (disaster
    /// recovery: that instance is gone): this instance destroys them from now on, as
    /// scheduled destructions, sweeps and rotations call for. Admin; unsealed.
    pub fn take_over(&self, commit: &CeremonyCommit<'_>) -> Result<TakeOver, SealError> {
        self.adopt_record()?;
        let mut inner = self.lock();
        let Some(record) = inner.record.clone() else {
            return Err(SealError::NotInitialized);
        };
        if !matches!(inner.state, State::Unsealed(_)) {
            return Err(SealError::Sealed);
        }
        if self.ensure_authentic(&mut inner)? != Authenticity::Authentic {
            return Err(SealError::RecordNotAuthentic);
        }
        let Some(predecessor) = record.restored_from.clone() else {
            return Err(SealError::NothingToTakeOver);
        };
        let mut next = record.clone();
        for instance in predecessor.instances {
            if !next.adopted_instances.contains(&instance)
                && next.instance.as_ref() != Some(&instance)
            {
                next.adopted_instances.push(instance);
            }
        }
        next.owns_untagged |= predecessor.untagged;
        next.restored_from = None;
        let _other_servers = self.store.lock_changes()?;
        let (next, write) = self.signed_write(&record, next)?;
        commit(
            CeremonySummary {
                share_set: record.share_set_id.clone(),
                step: "take-over".to_owned(),
                instance: next.instance.clone().unwrap_or_default(),
                ..CeremonySummary::default()
            },
            vec![write],
        )?;
        self.hsm.set_ownership(next.ownership()?);
        let done = TakeOver {
            instance: next.instance.clone().unwrap_or_default(),
            adopted: next.adopted_instances.clone(),
            untagged: next.owns_untagged,
        };
        tracing::info!(adopted = ?done.adopted, untagged = done.untagged, "took over the objects of the instance this copy was restored from");
        inner.record = Some(next);
        Ok(done)
    }
}

/// The record of what the seal did by itself to the record `next`.
fn system_event(operation: &str, next: &SealRecord) -> AuditEvent {
    AuditEvent {
        ceremony: Some(CeremonySummary {
            share_set: next.share_set_id.clone(),
            step: operation.to_owned(),
            instance: next.instance.clone().unwrap_or_default(),
            backup_sha256: next
                .restored_from
                .as_ref()
                .map(|p| p.backup_sha256.clone())
                .unwrap_or_default(),
            ..CeremonySummary::default()
        }),
        ..AuditEvent::internal(SYSTEM_PRINCIPAL, SERVICE, operation)
    }
}

/// The backup's SHA-256 the restore's marker names (hex; empty if unreadable: the marker is
/// a hint written offline, never an authority).
fn restored_sha256(marker: &[u8]) -> String {
    serde_json::from_slice::<Restored>(marker)
        .map(|r| r.sha256)
        .ok()
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_default()
}

/// Where `store` lives, as the seal record names it (hex SHA-256 of [`Store::location`]).
/// A store that cannot say fails the step that asked (a start, an unseal, an init): an
/// unreadable location is never taken for a move, nor written over a known one.
pub(super) fn location_of(store: &dyn Store) -> Result<String, SealError> {
    let location = store.location()?;
    let mut h = <Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, b"kms/v1/store-location\0");
    sha2::Digest::update(&mut h, location.as_bytes());
    Ok(data_encoding::HEXLOWER.encode(&sha2::Digest::finalize(h)))
}

/// Whether two records are the same, field for field and MAC for MAC.
pub(super) fn same(a: &SealRecord, b: &SealRecord) -> bool {
    match (serde_json::to_vec(a), serde_json::to_vec(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn restored_removal() -> Removal {
    Removal {
        table: Table::System,
        from: RESTORED_MARKER.to_owned(),
        to: RESTORED_MARKER.to_owned(),
    }
}
