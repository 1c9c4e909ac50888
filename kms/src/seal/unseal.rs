//! Unseal: shares collected per attempt, each checked (set, threshold, commitment), the
//! unseal key recombined and checked, the root key unwrapped into the barrier, the engines
//! opened over it.

use super::{
    Arc, Attempt, CombineError, HsmError, Inner, KEY_LEN, KeyHandle, KeyringError, Opened,
    SealError, SealManager, SealRecord, SealStatus, SecretString, Share, State, Unsealed,
    Zeroizing, check_master_key, find_audit_key, find_recorded_master_key, key_check, random_nonce,
    status_of, to_key, unwrap_root,
};
use subtle::ConstantTimeEq;

impl SealManager {
    /// Adds one share to the unseal attempt; unseals when the threshold is reached.
    /// `expected_nonce`, when given, must name the attempt in progress.
    pub fn unseal(
        &self,
        share_text: &str,
        expected_nonce: Option<&str>,
    ) -> Result<SealStatus, SealError> {
        self.adopt_record()?;
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(record) = &inner.record else {
            return Err(SealError::NotInitialized);
        };
        let attempt = match &mut inner.state {
            State::Uninitialized => return Err(SealError::NotInitialized),
            State::Unsealed(_) => return Ok(status_of(inner, self.hsm.pin_in_shares())),
            State::Sealed(attempt) => attempt,
        };
        if let Some(want) = expected_nonce
            && attempt.as_ref().is_none_or(|a| a.nonce != want)
        {
            return Err(SealError::AttemptMismatch);
        }
        let given = attempt.as_ref().map_or(&[][..], |a| a.shares.as_slice());
        let share = admit(record, given, share_text)?;
        let current = match attempt {
            Some(a) => a,
            None => attempt.insert(Attempt {
                nonce: random_nonce()?,
                shares: Vec::new(),
            }),
        };
        current.shares.push(share);
        if current.shares.len() < usize::from(record.threshold) {
            return Ok(status_of(inner, self.hsm.pin_in_shares()));
        }

        // The threshold is reached: whatever happens next, this attempt is over.
        let shares = std::mem::take(&mut current.shares);
        *attempt = None;
        let secret = combine(&shares)?;
        drop(shares);
        let record = record.clone();
        let (unseal_key, pin_part) = check_quorum(&record, &secret)?;
        let master_key = match inner.master_key {
            Some(k) => k,
            None => self.login_from_shares(&record, pin_part)?,
        };
        inner.master_key = Some(master_key);
        let engines = match self.open_engines(inner, master_key, &record, &unseal_key) {
            Ok(e) => e,
            Err(e) => {
                if record.pin_in_shares {
                    inner.master_key = None;
                    inner.authentic = false;
                    self.hsm.set_ownership(crate::hsm::Ownership::default());
                }
                return Err(e);
            }
        };
        inner.state = State::Unsealed(Unsealed {
            engines: engines.clone(),
        });
        self.publish(Some(engines));
        self.unsealed.send_replace(true);
        Ok(status_of(inner, self.hsm.pin_in_shares()))
    }

    /// Authenticates the record (with the PIN in the shares, the HSM is logged in only
    /// now), unwraps the root key, settles the record (see `record.rs`: a record of before
    /// is authenticated, a restored copy takes its identity, retired master keys left by a
    /// crash are destroyed) and opens every engine (`crate::engines::ENGINES`, the keyring
    /// first) over the barrier that now holds it. With `pin_in_shares`, the audit key is
    /// found first, and on any failure the session logs out again and the signer forgets
    /// the key: a failed unseal leaves nothing logged in.
    fn open_engines(
        &self,
        inner: &mut Inner,
        master_key: KeyHandle,
        record: &SealRecord,
        unseal_key: &[u8; KEY_LEN],
    ) -> Result<Opened, SealError> {
        let loaded = self
            .ensure_authentic(inner)
            .and_then(|_| unwrap_root(&self.hsm, master_key, record, unseal_key))
            .and_then(|root| {
                if record.pin_in_shares {
                    self.audit
                        .signer()
                        .set(Some(find_audit_key(&self.hsm, record)?));
                }
                self.settle_record(inner, true)?;
                // From here the barrier is the root key's only holder.
                let barrier = Arc::new(crate::barrier::Barrier::new(root.0));
                self.open_each(&barrier)
            });
        if loaded.is_err() && record.pin_in_shares {
            let _ = self.hsm.logout();
            self.audit.signer().set(None);
        }
        loaded
    }

    /// Opens every engine in the order listed, over `barrier`; the first that fails stops
    /// the unseal (those opened already are dropped).
    fn open_each(&self, barrier: &Arc<crate::barrier::Barrier>) -> Result<Opened, SealError> {
        let opening = crate::engines::Opening {
            barrier,
            hsm: &self.hsm,
            store: &self.store,
            audit: &self.audit,
            settings: self.settings,
        };
        let mut all = Vec::with_capacity(crate::engines::ENGINES.len());
        for kind in crate::engines::ENGINES {
            let engine = (kind.open)(&opening).map_err(|e| open_error(kind.name, e))?;
            debug_assert_eq!(
                engine.name(),
                kind.name,
                "the list names the engine it opens"
            );
            all.push(engine);
        }
        Ok(Opened {
            keyring: typed(&all, "the keyring")?,
            secrets: typed(&all, "the secrets engine")?,
            credentials: typed(&all, "the credentials engine")?,
            databases: typed(&all, "the databases engine")?,
            all,
        })
    }

    /// Logs in with the PIN recombined from the shares and finds the master key; logs out
    /// again if anything fails.
    pub(super) fn login_from_shares(
        &self,
        record: &SealRecord,
        pin: &[u8],
    ) -> Result<KeyHandle, SealError> {
        let pin = SecretString::from(std::str::from_utf8(pin).map_err(|_| SealError::WrongQuorum)?);
        self.hsm.login(&pin).map_err(|e| match e {
            HsmError::Login { reason, .. } => SealError::SharesPinRejected(reason),
            other => SealError::Hsm(other),
        })?;
        let found = find_recorded_master_key(&self.hsm, record).and_then(|k| {
            check_master_key(&self.hsm, k, &record.master_key_label)?;
            Ok(k)
        });
        if found.is_err() {
            let _ = self.hsm.logout();
        }
        found
    }
}

/// The seal's error for an engine that could not be opened: the keyring's own error, or
/// the store's or the HSM's, as they were before engines. Another engine's own error has
/// no `SealError` of its own yet (adding one means a line in `service::error`'s exhaustive
/// mapping): it is logged with the engine's name and reported as the keyring's internal
/// error.
fn open_error(engine: &'static str, e: crate::engines::OpenError) -> SealError {
    let e = match e.downcast::<KeyringError>() {
        Ok(k) => return SealError::Keyring(*k),
        Err(e) => e,
    };
    let e = match e.downcast::<crate::store::StoreError>() {
        Ok(s) => return SealError::Store(*s),
        Err(e) => e,
    };
    match e.downcast::<HsmError>() {
        Ok(h) => SealError::Hsm(*h),
        Err(e) => {
            tracing::error!(engine, error = %crate::error_chain(e.as_ref()), "an engine could not be opened");
            SealError::Keyring(KeyringError::Internal("an engine could not be opened"))
        }
    }
}

/// Recombines a quorum's secret.
pub(super) fn combine(shares: &[Share]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    kms_unseal::combine(shares).map_err(|e| match e {
        CombineError::DuplicateIndex(index) => SealError::DuplicateShare { index },
        _ => SealError::WrongQuorum,
    })
}

/// Parses one share and checks it against the record and the shares `given` so far: its
/// share set, its threshold, its commitment, and that its index was not given already.
pub(super) fn admit(record: &SealRecord, given: &[Share], text: &str) -> Result<Share, SealError> {
    let share = Share::parse(text)?;
    if share.share_set() != record.share_set()? {
        return Err(record.foreign_share(share.share_set())?);
    }
    if share.threshold() != record.threshold {
        return Err(SealError::WrongThreshold {
            expected: record.threshold,
            got: share.threshold(),
        });
    }
    check_commitment(record, &share)?;
    if given.iter().any(|s| s.index() == share.index()) {
        return Err(SealError::DuplicateShare {
            index: share.index(),
        });
    }
    Ok(share)
}

/// Splits the recombined secret into the unseal key and the PIN part, and checks the key
/// against the record's key check in constant time: a wrong quorum is refused here.
pub(super) fn check_quorum<'s>(
    record: &SealRecord,
    secret: &'s [u8],
) -> Result<(Zeroizing<[u8; KEY_LEN]>, &'s [u8]), SealError> {
    let (key_part, pin_part) = secret
        .split_at_checked(KEY_LEN)
        .ok_or(SealError::WrongQuorum)?;
    let unseal_key = to_key(key_part).ok_or(SealError::WrongQuorum)?;
    let stored_check = data_encoding::HEXLOWER
        .decode(record.unseal_key_check.as_bytes())
        .map_err(|_| SealError::CorruptRecord)?;
    let check = key_check(&unseal_key, record.share_set()?, pin_part)?;
    if check.as_slice().ct_eq(&stored_check).unwrap_u8() != 1 {
        return Err(SealError::WrongQuorum);
    }
    Ok((unseal_key, pin_part))
}

/// Refuses a share whose commitment is not the one recorded at init for its index (a
/// share altered or forged with a valid checksum). Records from before commitments pass.
fn check_commitment(record: &SealRecord, share: &Share) -> Result<(), SealError> {
    if record.share_commitments.is_empty() {
        return Ok(());
    }
    let index = share.index();
    let stored = record
        .share_commitments
        .get(usize::from(index).saturating_sub(1))
        .and_then(|c| data_encoding::HEXLOWER.decode(c.as_bytes()).ok())
        .ok_or(SealError::UnknownShare { index })?;
    if share.commitment().ct_eq(stored.as_slice()).unwrap_u8() != 1 {
        return Err(SealError::UnknownShare { index });
    }
    Ok(())
}

/// The engine of type `T` among `all` (its callers need its own API).
fn typed<T: std::any::Any + Send + Sync>(
    all: &[Arc<dyn crate::engine::Engine>],
    what: &'static str,
) -> Result<Arc<T>, SealError> {
    all.iter()
        .find_map(|e| Arc::clone(e).into_any().downcast::<T>().ok())
        .ok_or(SealError::Keyring(KeyringError::Internal(what)))
}
