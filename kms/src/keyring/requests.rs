//! Changes made once: the first answer to a change that a caller sent with an
//! `idempotency-key`, kept [`KEPT_MS`] so that a retry of it gets that answer instead of
//! changing anything again (docs/api.md, "Retries and idempotency").
//!
//! A record is written in the transaction of the change it answers, and looked up by the
//! next change with the same caller and idempotency key while that holds the keyring's change
//! lock ([`super::Journal::admit`]): two attempts of one change, on one server or on two
//! sharing the store, never both act. Records are authenticated as key records are (a store
//! writer cannot make a change answer from a forged record instead of being made), and hold
//! the request only as a MAC under the keyring's metadata key (a request may carry
//! associated data, which the store must not show).

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::model::{open_record, record_mac, seal_record};
use super::{Keyring, KeyringError};
use crate::store::{Removal, Write};

/// How long a first answer is kept: a day, in milliseconds.
pub(crate) const KEPT_MS: u64 = 24 * 3600 * 1000;

/// The MAC domain of request records.
const DOMAIN: &str = "kms/v1/request-record/";

/// The MAC domain of the request a record answers.
const REQUEST_DOMAIN: &str = "kms/v1/request/";

/// Expired records removed per transaction.
const SWEEP_BATCH: usize = 500;

/// The first answer to a change.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestRecord {
    /// The operation (`RotateKey`).
    pub operation: String,
    /// HMAC-SHA256 (hex) of the operation and the request's protobuf encoding: a retry
    /// must be the same request.
    pub request: String,
    /// The answer (protobuf, base64).
    pub answer: String,
    /// The request id of the attempt that made the change (its audit record's).
    pub request_id: String,
    /// When the change committed (Unix ms).
    pub at_ms: u64,
}

/// Where the record of `principal`'s change with `idempotency_key` is stored: the principal
/// as 32 hex digits of its SHA-256 (a SPIFFE ID may be 2 KiB), then the key (at most 128
/// characters of `[A-Za-z0-9-_.:]`).
pub(crate) fn record_key(principal: &str, idempotency_key: &str) -> String {
    let digest = sha2::Sha256::digest(principal.as_bytes());
    let hex = data_encoding::HEXLOWER.encode(&digest);
    format!("{}/{idempotency_key}", &hex[..32])
}

impl Keyring {
    /// The MAC a [`RequestRecord`] holds of `request` (a protobuf encoding) to `operation`.
    pub(crate) fn request_mac(
        &self,
        operation: &str,
        request: &[u8],
    ) -> Result<String, KeyringError> {
        Ok(data_encoding::HEXLOWER.encode(&record_mac(
            &self.mac_key,
            REQUEST_DOMAIN,
            operation,
            request,
        )?))
    }

    /// The record stored under `key`, unless expired at `now_ms`. A record that fails
    /// authentication is an error ([`KeyringError::Tampered`]): the change is refused, not
    /// made twice nor answered from it.
    pub(crate) fn request_record(
        &self,
        key: &str,
        now_ms: u64,
    ) -> Result<Option<RequestRecord>, KeyringError> {
        let Some(bytes) = self.store.get(crate::keyring::REQUESTS, key)? else {
            return Ok(None);
        };
        let record: RequestRecord = open_record(&bytes, DOMAIN, key, &self.mac_key)?
            .ok_or_else(|| KeyringError::Tampered(format!("request record {key}")))?;
        Ok(Some(record).filter(|r| r.at_ms.saturating_add(KEPT_MS) > now_ms))
    }

    /// The write that stores `record` under `key`, authenticated.
    pub(crate) fn request_write(
        &self,
        key: &str,
        record: &RequestRecord,
    ) -> Result<Write, KeyringError> {
        Ok(Write {
            table: crate::keyring::REQUESTS,
            key: key.to_owned(),
            value: seal_record(record, DOMAIN, key, &self.mac_key)?,
        })
    }

    /// Removes the records kept past [`KEPT_MS`] at `now_ms` (and any that fail
    /// authentication: they answer nothing). Returns how many.
    pub(crate) fn forget_requests(&self, now_ms: u64) -> Result<usize, KeyringError> {
        let mut expired = Vec::new();
        super::load::each_page(
            self.store.as_ref(),
            crate::keyring::REQUESTS,
            |key, bytes| {
                let live = open_record::<RequestRecord>(&bytes, DOMAIN, &key, &self.mac_key)?
                    .is_some_and(|r| r.at_ms.saturating_add(KEPT_MS) > now_ms);
                if !live {
                    expired.push(Removal {
                        table: crate::keyring::REQUESTS,
                        from: key.clone(),
                        to: key,
                    });
                }
                Ok(())
            },
        )?;
        for chunk in expired.chunks(SWEEP_BATCH) {
            self.store.write_all_removing(&[], chunk)?;
        }
        Ok(expired.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::record_key;

    #[test]
    fn record_keys_are_bounded_and_distinct() {
        let long = format!("spiffe://corp.example/{}", "a".repeat(2000));
        let a = record_key(&long, "id-1");
        assert_eq!(a.len(), 32 + 1 + 4);
        assert_ne!(a, record_key("spiffe://corp.example/b", "id-1"));
        assert_ne!(a, record_key(&long, "id-2"));
    }
}
