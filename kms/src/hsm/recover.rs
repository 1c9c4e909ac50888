//! Riding through an HSM that fails and comes back: the object registry behind
//! [`KeyHandle`], which failures mean "the session or the handle is gone", and recovery
//! (open the pool again, log in again, find every object again).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    Attribute, AttributeType, Hsm, HsmError, KeyHandle, KeyType, ObjectClass, ObjectHandle,
    RvError, Session, pk, token,
};

/// The sessions, and the recovery that opened them (a session of an earlier generation is
/// closed when it comes back to the pool).
pub(super) struct Pool {
    pub(super) generation: u64,
    pub(super) sessions: Vec<Session>,
    /// Sessions taken and not yet returned (of any generation).
    pub(super) out: usize,
    /// Threads waiting on `Hsm::available` (a returned session wakes them only if any).
    pub(super) waiting: usize,
}

/// How an object was found, to find it again, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lookup {
    pub(super) class: ObjectClass,
    /// Its key type, when known (checked again when it is found again).
    pub(super) key_type: Option<KeyType>,
    /// Whether it was generated in the token: always sensitive and never extractable.
    pub(super) generated: bool,
    pub(super) label: Vec<u8>,
    pub(super) id: Option<Vec<u8>>,
}

impl Lookup {
    pub(super) fn new(
        class: ObjectClass,
        key_type: Option<KeyType>,
        label: &str,
        id: Option<&[u8]>,
    ) -> Self {
        Self {
            class,
            key_type,
            generated: false,
            label: label.as_bytes().to_vec(),
            id: id.map(<[u8]>::to_vec),
        }
    }

    /// The same lookup, for an object generated in the token (or not).
    pub(super) fn generated(mut self, generated: bool) -> Self {
        self.generated = generated;
        self
    }

    /// Whether `h`, found by this lookup, is what kms made: its key type, and, for a secret
    /// or private key, sensitive and not extractable, and if generated in the token, always
    /// sensitive and never extractable too. `Err` names what differs.
    pub(super) fn check(&self, s: &Session, h: ObjectHandle) -> Result<(), &'static str> {
        let secret =
            self.class == ObjectClass::SECRET_KEY || self.class == ObjectClass::PRIVATE_KEY;
        if self.key_type.is_none() && !secret {
            return Ok(());
        }
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )
            .map_err(|_| "its attributes could not be read")?;
        let (mut typ, mut sensitive, mut extractable) = (None, false, true);
        let (mut always_sensitive, mut never_extractable) = (false, false);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => typ = Some(t),
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                Attribute::AlwaysSensitive(v) => always_sensitive = v,
                Attribute::NeverExtractable(v) => never_extractable = v,
                _ => {}
            }
        }
        if self.key_type.is_some() && typ != self.key_type {
            return Err("another key type");
        }
        if secret && (!sensitive || extractable) {
            return Err("not sensitive, or extractable");
        }
        if secret && self.generated && (!always_sensitive || !never_extractable) {
            return Err(
                "not always sensitive and never extractable, as a key generated in the token is: made from a value someone had",
            );
        }
        Ok(())
    }

    fn template(&self) -> Vec<Attribute> {
        let mut t = vec![
            Attribute::Class(self.class),
            Attribute::Label(self.label.clone()),
        ];
        if let Some(id) = &self.id {
            t.push(Attribute::Id(id.clone()));
        }
        t
    }
}

/// A registered object: its current handle (`None` once a recovery could not find it again
/// as kms made it: an old handle is never used again after the module was reloaded, where
/// its number may name another object) and its lookup.
pub(super) struct Registered {
    handle: Option<ObjectHandle>,
    lookup: Lookup,
}

/// The least time between two recoveries while the module keeps failing.
const BACKOFF: Duration = Duration::from_secs(1);

/// Whether an error means the session, the login or the object handle is gone (the module
/// restarted, failed over, or its token went away and came back), rather than a refusal of
/// this request.
pub(super) fn is_stale(e: &HsmError) -> bool {
    let HsmError::Pkcs11 {
        source: cryptoki::error::Error::Pkcs11(rv, _),
        ..
    } = e
    else {
        return false;
    };
    matches!(
        rv,
        RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::UserNotLoggedIn
            | RvError::GeneralError
    )
}

impl Hsm {
    /// Registers an object found or made by `lookup`; the same lookup gets the same entry.
    pub(super) fn register(&self, handle: ObjectHandle, lookup: Lookup) -> KeyHandle {
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = objects.iter().position(|o| o.lookup == lookup) {
            if let Some(o) = objects.get_mut(i) {
                o.handle = Some(handle);
            }
            return KeyHandle(i);
        }
        objects.push(Registered {
            handle: Some(handle),
            lookup,
        });
        KeyHandle(objects.len() - 1)
    }

    /// The object handle a key names now.
    pub(super) fn handle(&self, key: KeyHandle) -> Result<ObjectHandle, HsmError> {
        let objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let o = objects
            .get(key.0)
            .ok_or(HsmError::Misuse("a key handle this HSM never gave out"))?;
        o.handle.ok_or_else(|| HsmError::UnexpectedObject {
            label: String::from_utf8_lossy(&o.lookup.label).into_owned(),
            why: "not found again as kms made it when the HSM came back; a restart or unseal looks again",
        })
    }

    /// Follows the HSM's availability: `true` while the module answers, `false` from a
    /// session or handle failure until a recovery succeeds (status, health and metrics
    /// watch it).
    pub fn watch_available(&self) -> tokio::sync::watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Whether the module answered the last call.
    pub fn is_available(&self) -> bool {
        *self.up.borrow()
    }

    /// Marks the HSM unavailable (a call failed as [`is_stale`] says).
    pub(super) fn mark_unavailable(&self) {
        if self.up.send_replace(false) {
            tracing::warn!(token = %self.token_label, "the HSM is unavailable: recovering");
            crate::metrics::metrics().hsm_available.set(0);
        }
    }

    /// Tries a recovery now if the HSM is unavailable (the server's background task calls
    /// it every second, so the HSM's return is seen without waiting for a call).
    pub fn try_recover(&self) {
        if self.is_available() {
            return;
        }
        let generation = self.pool.lock().map(|p| p.generation).unwrap_or_default();
        let _ = self.recover(generation);
    }

    /// Opens the pool again, logs in again and finds every registered object again, unless
    /// another caller did since the failure seen in `generation`, or a recovery failed less
    /// than [`BACKOFF`] ago.
    pub(super) fn recover(&self, generation: u64) -> Result<(), HsmError> {
        let mut last_failed = self.recovery.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.pool.lock().map(|p| p.generation).unwrap_or_default();
        if current != generation {
            return Ok(());
        }
        if last_failed.is_some_and(|t| t.elapsed() < BACKOFF) {
            return Err(HsmError::Unavailable);
        }
        match self.reopen() {
            Ok(()) => {
                *last_failed = None;
                if !self.up.send_replace(true) {
                    tracing::info!(token = %self.token_label, "the HSM is available again");
                }
                crate::metrics::metrics().hsm_available.set(1);
                Ok(())
            }
            Err(e) => {
                *last_failed = Some(Instant::now());
                self.mark_unavailable();
                tracing::warn!(error = %crate::error_chain(&e), "HSM recovery failed");
                Err(e)
            }
        }
    }

    /// New sessions, a new login, every registered object found again; if the module
    /// cannot even find the token (SoftHSM after its token's files went away and came back
    /// answers CKR_GENERAL_ERROR until it is initialised again), the module is finalised and
    /// loaded again first.
    fn reopen(&self) -> Result<(), HsmError> {
        match self.reopen_sessions() {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(&e), "reopening sessions failed: loading the module again");
                self.reinitialize()?;
                self.reopen_sessions()
            }
        }
    }

    /// C_Finalize, then C_Initialize: once every session of the old context is closed (a
    /// session closed after the new C_Initialize could close a new session's handle).
    fn reinitialize(&self) -> Result<(), HsmError> {
        {
            let mut pool = self
                .pool
                .lock()
                .map_err(|_| HsmError::Misuse("session pool poisoned"))?;
            pool.generation += 1;
            pool.sessions.clear();
            let deadline = Instant::now() + Duration::from_secs(5);
            while pool.out > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HsmError::Unavailable);
                }
                pool.waiting += 1;
                pool = self
                    .available
                    .wait_timeout(pool, left)
                    .map_err(|_| HsmError::Misuse("session pool poisoned"))?
                    .0;
                pool.waiting -= 1;
            }
        }
        let mut context = self.pkcs11.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = context.take() {
            let _ = old.finalize();
        }
        *context = Some(token::load(&self.module)?);
        Ok(())
    }

    /// New sessions on the token (found again by label: its slot may have changed), a new
    /// login, every registered object found again; then the pool is replaced.
    fn reopen_sessions(&self) -> Result<(), HsmError> {
        let context = self
            .pkcs11
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(HsmError::Unavailable)?;
        let slot = token::find_token(&context, &self.token_label)?;
        let mut fresh = Vec::with_capacity(self.sessions);
        for _ in 0..self.sessions {
            fresh.push(
                context
                    .open_rw_session(slot)
                    .map_err(pk("open a session"))?,
            );
        }
        let first = fresh.first().ok_or(HsmError::Misuse("no sessions"))?;
        if self.logged_in.load(Ordering::SeqCst) {
            if self.pin_in_shares() {
                // The PIN is not kept: it travels in the shares.
                return Err(HsmError::NeedsUnseal);
            }
            let pin = self.pin_source.read()?;
            self.login_on(first, &pin)?;
        }
        {
            let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
            for o in objects.iter_mut() {
                let found = first
                    .find_objects(&o.lookup.template())
                    .map_err(pk("find a key again"))?;
                // Exactly one, and still what kms made; else the entry is unusable (never
                // the old handle number: after a reload it may name another object).
                let checked = match found.as_slice() {
                    [one] => o.lookup.check(first, *one).map(|()| *one),
                    [] => Err("not in the token"),
                    _ => Err("several objects answer to it"),
                };
                o.handle = match checked {
                    Ok(h) => Some(h),
                    Err(why) => {
                        if o.handle.is_some() {
                            tracing::error!(
                                label = %String::from_utf8_lossy(&o.lookup.label),
                                why,
                                "a key object was not found again as kms made it when the HSM came back: calls that need it fail until a restart or unseal finds it again"
                            );
                        }
                        None
                    }
                };
            }
        }
        if let Ok(mut s) = self.slot.lock() {
            *s = slot;
        }
        let mut pool = self
            .pool
            .lock()
            .map_err(|_| HsmError::Misuse("session pool poisoned"))?;
        pool.generation += 1;
        // The old sessions close as they drop; the new login holds while any session is
        // open.
        pool.sessions = fresh;
        self.available.notify_all();
        Ok(())
    }
}
