//! Init: the unseal key and the root key made, the root key wrapped twice, the shares and
//! their commitments, the audit key, all committed with the audit record.

use super::{
    HsmError, HsmKeyKind, InitCommit, InitOutput, Inner, InstanceId, KEY_LEN, KeyHandle,
    MAX_SHARED_PIN_LEN, Ownership, SEAL_RECORD_KEY, SEAL_SCHEMA, SealError, SealManager,
    SealRecord, SecretString, Share, ShareSetId, State, Table, Write, Zeroizing, check_master_key,
    key_check, random_key, record, unix_now, unwrap_root, wrap_root,
};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

/// What init wraps and records, in one place. No `Debug`: it holds the keys.
#[derive(Clone, Copy)]
struct SealMaterial<'a> {
    master_key: KeyHandle,
    record_key: KeyHandle,
    set: ShareSetId,
    unseal_key: &'a [u8; KEY_LEN],
    root_key: &'a [u8; KEY_LEN],
    pin_bytes: &'a [u8],
}

impl SealManager {
    /// Initialises the server: see the module docs. Returns the shares; they are not
    /// stored anywhere. The server stays sealed. `hsm_pin` is required when the PIN
    /// travels in the shares, and refused otherwise.
    ///
    /// `commit` makes the seal record durable together with the request's audit record (see
    /// [`crate::audit`]); if it fails, init fails and nothing is stored.
    pub fn init(
        &self,
        shares: u32,
        threshold: u32,
        hsm_pin: Option<&SecretString>,
        recipients: &[String],
        commit: &InitCommit<'_>,
    ) -> Result<InitOutput, SealError> {
        let (n, t) = kms_unseal::check_parameters(shares, threshold)?;
        let recipients = super::recipients::parse_recipients(recipients, n)?;
        let pin = match (self.hsm.pin_in_shares(), hsm_pin) {
            (true, Some(p)) if (1..=MAX_SHARED_PIN_LEN).contains(&p.expose_secret().len()) => {
                Some(p)
            }
            (true, _) => return Err(SealError::PinRequired),
            (false, None) => None,
            (false, Some(_)) => return Err(SealError::PinNotExpected),
        };
        // Another server sharing the store may have initialised it already.
        self.adopt_record()?;
        let mut inner = self.lock();
        if !matches!(inner.state, State::Uninitialized) {
            return Err(SealError::AlreadyInitialized);
        }
        if let Some(pin) = pin {
            self.hsm.login(pin).map_err(|e| match e {
                HsmError::Login { reason, .. } => SealError::InitPinRejected(reason),
                other => SealError::Hsm(other),
            })?;
        }
        let result = self.init_logged_in(&mut inner, n, t, pin, &recipients, commit);
        if pin.is_some() {
            // The server stays sealed: with the PIN in the shares, sealed means logged out.
            let _ = self.hsm.logout();
            inner.master_key = None;
            self.audit.signer().set(None);
        }
        result
    }

    fn init_logged_in(
        &self,
        inner: &mut Inner,
        n: u8,
        t: u8,
        pin: Option<&SecretString>,
        recipients: &[age::x25519::Recipient],
        commit: &InitCommit<'_>,
    ) -> Result<InitOutput, SealError> {
        // This instance's identity: every object it makes carries it.
        let instance = InstanceId::random().ok_or(SealError::Randomness)?;
        self.hsm.set_ownership(Ownership {
            instance: Some(instance),
            ..Ownership::default()
        });
        let result = self
            .hsm
            .find_or_generate_master_key()
            .map_err(SealError::from)
            .and_then(|(master_key, found)| {
                check_master_key(&self.hsm, master_key, self.hsm.master_key_label())?;
                let mut out = self.init_records(inner, master_key, n, t, pin, recipients, commit)?;
                if found {
                    // Said in the answer and the log: a store emptied to start over does
                    // this, and an operator who did not expect it must hear of it.
                    let id = out.master_key_id.clone().unwrap_or_default();
                    tracing::warn!(
                        label = self.hsm.master_key_label(),
                        id = %id,
                        "init found a master key already in the token and wraps the new root key under it"
                    );
                    out.master_key_reused = true;
                }
                Ok(out)
            });
        if result.is_err() {
            self.hsm.set_ownership(Ownership::default());
        }
        result
    }

    /// The seal record key (see `record.rs`): the token's, if an earlier init on it made
    /// one (a store emptied to start over), else a new one; and whether it is new.
    fn record_key(&self) -> Result<(KeyHandle, bool), SealError> {
        if let Some(key) = record::find_record_key(&self.hsm)? {
            return Ok((key, false));
        }
        let id = self.hsm.new_object_id()?;
        let (key, _) = self.hsm.generate_key(
            HsmKeyKind::HmacSha256,
            &record::record_key_label(&self.hsm),
            &id,
        )?;
        Ok((key, true))
    }

    /// Makes the audit checkpoint key of the share set `set`, labelled with the set's id so
    /// that an init never touches another init's key (two servers may share a token).
    fn generate_audit_key(
        &self,
        set: ShareSetId,
    ) -> Result<(KeyHandle, Vec<u8>, String), SealError> {
        let label = format!("{}-audit-{set}", self.hsm.master_key_label());
        let id = self.hsm.new_object_id()?;
        let (key, public) = self.hsm.generate_key(HsmKeyKind::Ed25519, &label, &id)?;
        match public {
            Some(public) => Ok((key, public, label)),
            None => {
                let _ = self.hsm.destroy(key);
                Err(SealError::Hsm(HsmError::Misuse(
                    "the token returned no public key",
                )))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn init_records(
        &self,
        inner: &mut Inner,
        master_key: KeyHandle,
        n: u8,
        t: u8,
        pin: Option<&SecretString>,
        recipients: &[age::x25519::Recipient],
        commit: &InitCommit<'_>,
    ) -> Result<InitOutput, SealError> {
        let unseal_key = random_key()?;
        let root_key = random_key()?;
        let pin_bytes = pin
            .map(|p| p.expose_secret().as_bytes())
            .unwrap_or_default();
        let mut secret = Zeroizing::new(Vec::with_capacity(KEY_LEN + pin_bytes.len()));
        secret.extend_from_slice(unseal_key.as_slice());
        secret.extend_from_slice(pin_bytes);
        let (set, split) = kms_unseal::split(&secret, u32::from(n), u32::from(t))?;
        let (record_key, record_key_new) = self.record_key()?;
        let (audit_key, audit_public, audit_key_label) = match self.generate_audit_key(set) {
            Ok(made) => made,
            Err(e) => {
                if record_key_new {
                    let _ = self.hsm.destroy(record_key);
                }
                return Err(e);
            }
        };
        let sealed = SealMaterial {
            record_key,
            master_key,
            set,
            unseal_key: &unseal_key,
            root_key: &root_key,
            pin_bytes,
        };
        let result = self.store_init(
            inner,
            &sealed,
            n,
            t,
            &split,
            recipients,
            commit,
            &audit_key_label,
            &audit_public,
        );
        match &result {
            Ok(_) => self.audit.signer().set(Some((audit_key, audit_public))),
            Err(_) => {
                // This init's own keys, by handle: nothing else is touched.
                let _ = self.hsm.destroy(audit_key);
                if record_key_new {
                    let _ = self.hsm.destroy(record_key);
                }
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn store_init(
        &self,
        inner: &mut Inner,
        m: &SealMaterial<'_>,
        n: u8,
        t: u8,
        split: &[Share],
        recipients: &[age::x25519::Recipient],
        commit: &InitCommit<'_>,
        audit_key_label: &str,
        audit_public: &[u8],
    ) -> Result<InitOutput, SealError> {
        let SealMaterial {
            master_key,
            record_key,
            set,
            unseal_key,
            root_key,
            pin_bytes,
        } = *m;
        let outer = wrap_root(&self.hsm, master_key, set, unseal_key, root_key)?;
        let record = SealRecord {
            schema: SEAL_SCHEMA,
            share_set_id: set.to_string(),
            shares: n,
            threshold: t,
            token_label: self.hsm.token_label().to_owned(),
            master_key_label: self.hsm.master_key_label().to_owned(),
            unseal_key_check: data_encoding::HEXLOWER
                .encode(&key_check(unseal_key, set, pin_bytes)?),
            wrapped_root_key: data_encoding::HEXLOWER.encode(&outer),
            pin_in_shares: !pin_bytes.is_empty(),
            audit_key_label: audit_key_label.to_owned(),
            audit_public_key: data_encoding::HEXLOWER.encode(audit_public),
            created_at: unix_now(),
            share_commitments: split
                .iter()
                .map(|s| data_encoding::HEXLOWER.encode(&s.commitment()))
                .collect(),
            pending_rekey: None,
            retired_share_sets: Vec::new(),
            master_key_id: Some(self.hsm.key_id(master_key)?)
                .filter(|id| !id.is_empty())
                .map(|id| data_encoding::HEXLOWER.encode(&id)),
            retired_master_keys: Vec::new(),
            instance: self.hsm.ownership().instance.map(|i| i.to_string()),
            owns_untagged: false,
            adopted_instances: Vec::new(),
            restored_from: None,
            location: Some(record::location_of(self.store.as_ref())?),
            mac: None,
        };
        // Prove the round trip through the HSM before anything is stored, so a broken HSM
        // set-up fails init instead of leaving an unrecoverable store.
        let back = unwrap_root(&self.hsm, master_key, &record, unseal_key)?;
        if back.0.as_slice().ct_eq(root_key.as_slice()).unwrap_u8() != 1 {
            return Err(SealError::RootKeyUnwrap);
        }
        let record = record::sign(&self.hsm, record_key, record)?;
        let bytes = serde_json::to_vec(&record).map_err(|_| SealError::CorruptRecord)?;
        // The state lock is held and the state is Uninitialized, and the seal record is
        // what makes it anything else: no other init of this server can be writing it. On
        // a shared store, the change lock keeps another server's init from writing it
        // between this check and this commit (two share sets, one overwritten).
        let _other_servers = self.store.lock_changes()?;
        if self.store.get(Table::System, SEAL_RECORD_KEY)?.is_some() {
            return Err(SealError::AlreadyInitialized);
        }
        let output = InitOutput {
            share_set_id: set,
            threshold: t,
            shares: super::recipients::share_texts(split, recipients)?,
            sealed: !recipients.is_empty(),
            audit_key_fingerprint: crate::audit::fingerprint(audit_public),
            master_key_label: record.master_key_label.clone(),
            master_key_id: record.master_key_id.clone(),
            master_key_reused: false,
        };
        commit(
            &output,
            vec![Write {
                table: Table::System,
                key: SEAL_RECORD_KEY.to_owned(),
                value: bytes,
            }],
        )?;
        inner.record = Some(record);
        inner.authentic = true;
        inner.master_key = Some(master_key);
        inner.state = State::Sealed(None);
        Ok(output)
    }
}
