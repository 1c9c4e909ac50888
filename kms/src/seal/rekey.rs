//! Rekey: new shares for the same root key, and verify-share.
//!
//! ```text
//! RekeyInit(n, t, recipients) --> collecting --current shares x T--> new shares made,
//!   pending (stored) --new shares x T'--> committed: the new share set replaces the old
//! ```
//!
//! Every step that changes what unseals is one write of the seal record, in the same
//! transaction as its audit record: the new shares are stored only as a *pending* share set
//! (the same root key wrapped under a new unseal key, its key check value and commitments)
//! beside the current one, which stays in force until a quorum of the new shares has come
//! back, proving the custodians hold them. A crash at any point therefore leaves the old
//! shares valid (before the commit) or the new ones, whose holders have proved them (after
//! it), never neither; a pending share set outlives a restart, so its verification can go
//! on. The collecting phase is in memory only, as unseal progress is.

use super::recipients::share_texts;
use super::unseal::{admit, check_quorum, combine};
use super::{
    Inner, KEY_LEN, KeyHandle, PendingRekey, RekeyAttempt, RekeyStatus, RetiredShareSet, SealError,
    SealManager, SealRecord, SealStatus, Share, ShareSetId, State, Verifying, Write, Zeroizing,
    key_check, random_key, random_nonce, status_of, unix_now, unwrap_root, wrap_root,
};
use crate::audit::CeremonySummary;
use subtle::ConstantTimeEq;

/// What makes a ceremony's change of the seal record durable together with its audit
/// record (summarised by the [`CeremonySummary`]).
pub(crate) type CeremonyCommit<'a> =
    dyn Fn(CeremonySummary, Vec<Write>) -> Result<(), SealError> + 'a;

/// What a rekey submission returns.
pub struct RekeyStep {
    /// The status after the share.
    pub status: SealStatus,
    /// The new shares, once, when this share completed the current quorum (text form, or
    /// armored age files when sealed to recipients).
    pub new_shares: Vec<Zeroizing<String>>,
    /// Whether `new_shares` are sealed to recipients.
    pub sealed: bool,
    /// The recipient of each sealed share, in order.
    pub recipients: Vec<String>,
    /// The share set now in force, when this share completed the verification.
    pub committed: Option<ShareSetId>,
}

/// A share proved intact by [`SealManager::verify_share`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedShare {
    /// Its share set (the current one).
    pub share_set: ShareSetId,
    /// Its index.
    pub index: u8,
    /// Its set's threshold.
    pub threshold: u8,
}

/// The rekey part of `Status`.
pub(super) fn status(inner: &Inner) -> Option<RekeyStatus> {
    let record = inner.record.as_ref()?;
    if let Some(p) = &record.pending_rekey {
        let progress = inner
            .verifying
            .as_ref()
            .filter(|v| v.nonce == p.nonce)
            .map_or(0, |v| v.given.len());
        return Some(RekeyStatus {
            verifying: true,
            nonce: p.nonce.clone(),
            new_share_set_id: ShareSetId::from_hex(&p.share_set_id)?,
            new_shares: p.shares,
            new_threshold: p.threshold,
            progress: u8::try_from(progress).unwrap_or(u8::MAX),
            required: p.threshold,
            sealed_to_recipients: !p.recipients.is_empty(),
        });
    }
    inner.rekey.as_ref().map(|r| RekeyStatus {
        verifying: false,
        nonce: r.nonce.clone(),
        new_share_set_id: r.new_set,
        new_shares: r.shares,
        new_threshold: r.threshold,
        progress: u8::try_from(r.given.len()).unwrap_or(u8::MAX),
        required: record.threshold,
        sealed_to_recipients: !r.recipients.is_empty(),
    })
}

impl SealRecord {
    /// The record as it will be once `pending` is committed: the new share set in force,
    /// the current one retired.
    fn with_pending(&self, pending: &PendingRekey, now: u64) -> SealRecord {
        let mut next = self.clone();
        next.share_set_id = pending.share_set_id.clone();
        next.shares = pending.shares;
        next.threshold = pending.threshold;
        next.unseal_key_check = pending.unseal_key_check.clone();
        next.wrapped_root_key = pending.wrapped_root_key.clone();
        next.share_commitments = pending.share_commitments.clone();
        next.pending_rekey = None;
        next.retired_share_sets.push(RetiredShareSet {
            share_set_id: self.share_set_id.clone(),
            retired_at: now,
        });
        next
    }
}

impl SealManager {
    /// Starts a rekey to `shares` new shares of threshold `threshold`, sealed to
    /// `recipients` (one per share) if any. Returns the status, whose `rekey` names the new
    /// share set and the nonce.
    pub fn rekey_init(
        &self,
        shares: u32,
        threshold: u32,
        recipients: &[String],
    ) -> Result<SealStatus, SealError> {
        let (n, t) = kms_unseal::check_parameters(shares, threshold)?;
        let recipients = super::recipients::parse_recipients(recipients, n)?;
        self.adopt_record()?;
        let mut inner = self.lock();
        let Some(record) = &inner.record else {
            return Err(SealError::NotInitialized);
        };
        if let Some(p) = &record.pending_rekey {
            return Err(SealError::RekeyInProgress(
                ShareSetId::from_hex(&p.share_set_id).ok_or(SealError::CorruptRecord)?,
            ));
        }
        if let Some(r) = &inner.rekey {
            return Err(SealError::RekeyInProgress(r.new_set));
        }
        inner.rekey = Some(RekeyAttempt {
            nonce: random_nonce()?,
            new_set: ShareSetId::random().map_err(|_| SealError::Randomness)?,
            shares: n,
            threshold: t,
            recipients,
            given: Vec::new(),
        });
        Ok(status_of(&inner, self.hsm.pin_in_shares()))
    }

    /// Forgets a rekey that is collecting shares (its start could not be recorded).
    pub(crate) fn rekey_forget(&self) {
        self.lock().rekey = None;
    }

    /// Cancels the rekey in progress, and a pending new share set (never valid, then).
    /// Idempotent: `Ok(None)` when there was nothing to cancel.
    pub fn rekey_cancel(
        &self,
        commit: &CeremonyCommit<'_>,
    ) -> Result<(SealStatus, bool), SealError> {
        self.adopt_record()?;
        let mut inner = self.lock();
        let Some(record) = inner.record.clone() else {
            return Err(SealError::NotInitialized);
        };
        let mut cancelled = inner.rekey.take().is_some();
        inner.verifying = None;
        if let Some(pending) = &record.pending_rekey {
            let mut next = record.clone();
            next.pending_rekey = None;
            let _other_servers = self.store.lock_changes()?;
            let (next, write) = self.signed_write(&record, next)?;
            commit(
                CeremonySummary {
                    share_set: record.share_set_id.clone(),
                    step: "cancelled".to_owned(),
                    new_share_set: pending.share_set_id.clone(),
                    ..CeremonySummary::default()
                },
                vec![write],
            )?;
            inner.record = Some(next);
            cancelled = true;
        }
        Ok((status_of(&inner, self.hsm.pin_in_shares()), cancelled))
    }

    /// Adds one share to the rekey: a current share while it collects them (at the quorum the
    /// new shares are made, stored pending and returned), a new share while it verifies
    /// them (at the new quorum they replace the current ones).
    pub fn rekey_submit(
        &self,
        share_text: &str,
        expected_nonce: Option<&str>,
        commit: &CeremonyCommit<'_>,
    ) -> Result<RekeyStep, SealError> {
        self.adopt_record()?;
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(record) = inner.record.clone() else {
            return Err(SealError::NotInitialized);
        };
        if let Some(pending) = &record.pending_rekey {
            return self.verify_new_share(
                inner,
                &record,
                pending,
                share_text,
                expected_nonce,
                commit,
            );
        }
        let Some(attempt) = inner.rekey.as_mut() else {
            return Err(SealError::NoRekey);
        };
        if expected_nonce.is_some_and(|n| n != attempt.nonce) {
            return Err(SealError::AttemptMismatch);
        }
        let share = admit(&record, &attempt.given, share_text)?;
        attempt.given.push(share);
        if attempt.given.len() < usize::from(record.threshold) {
            return Ok(self.step(inner));
        }
        // The quorum is in: whatever happens next, this attempt is over.
        let Some(attempt) = inner.rekey.take() else {
            return Err(SealError::NoRekey);
        };
        let secret = combine(&attempt.given)?;
        let (unseal_key, pin) = check_quorum(&record, &secret)?;
        let (master_key, logged_in_here) = match inner.master_key {
            Some(k) => (k, false),
            None => (self.login_from_shares(&record, pin)?, true),
        };
        let made = self.make_pending(&record, &attempt, master_key, &unseal_key, pin, commit);
        if logged_in_here {
            // Sealed with the PIN in the shares: sealed means logged out.
            let _ = self.hsm.logout();
        }
        let (next, new_shares) = made?;
        inner.record = Some(next);
        let mut step = self.step(inner);
        step.sealed = !attempt.recipients.is_empty();
        step.recipients = attempt.recipients.iter().map(|r| r.to_string()).collect();
        step.new_shares = new_shares;
        Ok(step)
    }

    fn step(&self, inner: &Inner) -> RekeyStep {
        RekeyStep {
            status: status_of(inner, self.hsm.pin_in_shares()),
            new_shares: Vec::new(),
            sealed: false,
            recipients: Vec::new(),
            committed: None,
        }
    }

    /// Makes the new unseal key and shares, wraps the same root key under it, proves the
    /// round trip, and stores it as the pending share set.
    fn make_pending(
        &self,
        record: &SealRecord,
        attempt: &RekeyAttempt,
        master_key: KeyHandle,
        unseal_key: &[u8; KEY_LEN],
        pin: &[u8],
        commit: &CeremonyCommit<'_>,
    ) -> Result<(SealRecord, Vec<Zeroizing<String>>), SealError> {
        let root = unwrap_root(&self.hsm, master_key, record, unseal_key)?;
        let new_key = random_key()?;
        let mut secret = Zeroizing::new(Vec::with_capacity(KEY_LEN + pin.len()));
        secret.extend_from_slice(new_key.as_slice());
        secret.extend_from_slice(pin);
        let (set, split) = kms_unseal::split_into(
            attempt.new_set,
            &secret,
            u32::from(attempt.shares),
            u32::from(attempt.threshold),
        )?;
        let wrapped = wrap_root(&self.hsm, master_key, set, &new_key, &root.0)?;
        let recipients: Vec<String> = attempt.recipients.iter().map(|r| r.to_string()).collect();
        let pending = PendingRekey {
            nonce: attempt.nonce.clone(),
            share_set_id: set.to_string(),
            shares: attempt.shares,
            threshold: attempt.threshold,
            unseal_key_check: data_encoding::HEXLOWER.encode(&key_check(&new_key, set, pin)?),
            wrapped_root_key: data_encoding::HEXLOWER.encode(&wrapped),
            share_commitments: split
                .iter()
                .map(|s| data_encoding::HEXLOWER.encode(&s.commitment()))
                .collect(),
            recipients: recipients.clone(),
            made_at: unix_now(),
        };
        // Prove the new wrapping opens to the same root key before anything is stored.
        let back = unwrap_root(
            &self.hsm,
            master_key,
            &record.with_pending(&pending, 0),
            &new_key,
        )?;
        if back.0.as_slice().ct_eq(root.0.as_slice()).unwrap_u8() != 1 {
            return Err(SealError::RootKeyUnwrap);
        }
        let texts = share_texts(&split, &attempt.recipients)?;
        let mut next = record.clone();
        next.pending_rekey = Some(pending);
        let _other_servers = self.store.lock_changes()?;
        let (next, write) = self.signed_write(record, next)?;
        commit(
            CeremonySummary {
                share_set: record.share_set_id.clone(),
                step: "made".to_owned(),
                new_share_set: set.to_string(),
                new_shares: Some(attempt.shares),
                new_threshold: Some(attempt.threshold),
                recipients,
                ..CeremonySummary::default()
            },
            vec![write],
        )?;
        Ok((next, texts))
    }

    /// One new share given back to a pending rekey; at its quorum, the commit.
    fn verify_new_share(
        &self,
        inner: &mut Inner,
        record: &SealRecord,
        pending: &PendingRekey,
        share_text: &str,
        expected_nonce: Option<&str>,
        commit: &CeremonyCommit<'_>,
    ) -> Result<RekeyStep, SealError> {
        if expected_nonce.is_some_and(|n| n != pending.nonce) {
            return Err(SealError::AttemptMismatch);
        }
        let next = record.with_pending(pending, unix_now());
        let share = Share::parse(share_text)?;
        let new_set = next.share_set()?;
        if share.share_set() != new_set {
            return Err(SealError::NotNewShare {
                expected: new_set,
                got: share.share_set(),
            });
        }
        let verifying = match &mut inner.verifying {
            Some(v) if v.nonce == pending.nonce => v,
            slot => slot.insert(Verifying {
                nonce: pending.nonce.clone(),
                given: Vec::new(),
            }),
        };
        let share = admit(&next, &verifying.given, share_text)?;
        verifying.given.push(share);
        if verifying.given.len() < usize::from(next.threshold) {
            return Ok(self.step(inner));
        }
        let given = inner.verifying.take().map(|v| v.given).unwrap_or_default();
        let secret = combine(&given)?;
        let (_, pin) = check_quorum(&next, &secret)?;
        // Sealed with the PIN in the shares, the new quorum's PIN logs in to MAC the record.
        let logged_in_here = match inner.master_key {
            Some(_) => false,
            None => {
                self.login_from_shares(&next, pin)?;
                true
            }
        };
        let written = self.commit_new_set(record, next, commit);
        if logged_in_here {
            let _ = self.hsm.logout();
        }
        let next = written?;
        tracing::info!(share_set = %new_set, "rekey committed: the new share set is in force");
        inner.record = Some(next);
        // Unseal progress with the retired shares is void.
        if let State::Sealed(attempt) = &mut inner.state {
            *attempt = None;
        }
        let mut step = self.step(inner);
        step.committed = Some(new_set);
        Ok(step)
    }

    /// Commits a rekey's new share set (`next`, the record with it in force).
    fn commit_new_set(
        &self,
        record: &SealRecord,
        next: SealRecord,
        commit: &CeremonyCommit<'_>,
    ) -> Result<SealRecord, SealError> {
        let _other_servers = self.store.lock_changes()?;
        let (next, write) = self.signed_write(record, next)?;
        commit(
            CeremonySummary {
                share_set: record.share_set_id.clone(),
                step: "committed".to_owned(),
                new_share_set: next.share_set_id.clone(),
                new_shares: Some(next.shares),
                new_threshold: Some(next.threshold),
                ..CeremonySummary::default()
            },
            vec![write],
        )?;
        Ok(next)
    }

    /// Checks that a share is intact and of the current share set (or of a pending rekey's
    /// new one), against the commitment recorded for its index. Touches no unseal or rekey
    /// progress, and no HSM.
    pub fn verify_share(&self, share_text: &str) -> Result<VerifiedShare, SealError> {
        self.adopt_record()?;
        let inner = self.lock();
        let Some(record) = &inner.record else {
            return Err(SealError::NotInitialized);
        };
        let share = Share::parse(share_text)?;
        let pending = record
            .pending_rekey
            .as_ref()
            .filter(|p| p.share_set_id == share.share_set().to_string())
            .map(|p| record.with_pending(p, 0));
        let against = pending.as_ref().unwrap_or(record);
        if share.share_set() != against.share_set()? {
            return Err(record.foreign_share(share.share_set())?);
        }
        if against.share_commitments.is_empty() {
            return Err(SealError::NoCommitments);
        }
        admit(against, &[], share_text)?;
        Ok(VerifiedShare {
            share_set: share.share_set(),
            index: share.index(),
            threshold: share.threshold(),
        })
    }
}
