//! Backups (docs/operations.md): one file holding a consistent snapshot of the whole store
//! (the wrapped root key, keys, grants, counters, the audit log and its checkpoints), taken
//! online, and its restore into an empty store of either backend.
//!
//! The file is JSON lines: a header, one line per entry (table, key, value in base64), and a
//! trailer with the entry count, the SHA-256 of every byte before it, and an Ed25519
//! signature of that digest by the audit key in the HSM. A check or restore verifies all
//! three before it writes anything, so a damaged, cut or altered file is refused whole.
//!
//! The file itself names its public key (in the seal record it holds), and whoever can write
//! the backup storage can replace that key and sign again. So a file proves where it came
//! from only against a key the operator names: [`check`] and [`restore`] take the audit key's
//! fingerprint (the one `kms operator init` printed, as `kms audit verify --public-key`
//! does) and refuse a file another key signed; [`restore`] needs it, and [`check`] without
//! it says the file was checked only against itself ([`Checked::pinned`]).
//!
//! A restore appends one audit record after the backup's last one (`RestoreBackup`, naming
//! the backup's SHA-256), and leaves [`RESTORED_MARKER`], on which the restored copy takes
//! an instance identity of its own at its first start (see `seal::record`). The file is as
//! secret as the store and no more: without the HSM master key and a quorum of shares it
//! decrypts nothing.

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, Signer};
use crate::store::{Removal, Store, StoreError, Table, Write};

/// The format's name, in every backup's header.
pub const FORMAT: &str = "kms-backup/v1";

/// What the signature covers: this domain, then the hex SHA-256 of the body.
const SIGNATURE_DOMAIN: &str = "kms/v1/backup/";

/// Set in the System table while a restore writes; a server refuses to start on it.
pub const RESTORE_MARKER: &str = "restore-in-progress";

/// Left in the System table by a finished restore, until the restored copy takes its own
/// instance identity (JSON: the backup's `sha256`, `created_unix_ms`, `server`). A hint
/// written offline, not an authority: all it can make a server do is take a new identity,
/// which destroys nothing (see `seal::record`).
pub const RESTORED_MARKER: &str = "restored-from-backup";

/// The seal record's key in the System table (where the audit public key is named).
const SEAL_RECORD_KEY: &str = "seal";

/// The longest line a restore reads (a malformed file cannot make it buffer more).
const MAX_LINE: usize = 16 << 20;

/// Entries written per transaction at restore.
const RESTORE_BATCH: usize = 2048;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    created_unix_ms: u64,
    /// The server that made it (host name and address).
    server: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    table: String,
    key: String,
    /// The stored bytes, base64.
    value: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    entries: u64,
    /// Hex SHA-256 of every byte before this line.
    sha256: String,
    /// The audit key's fingerprint.
    key_fingerprint: String,
    /// Hex Ed25519 signature of `SIGNATURE_DOMAIN | sha256`.
    signature: String,
}

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit key is not available to sign (not initialised, or sealed with the PIN in
    /// the shares).
    #[error(
        "the audit signing key is not available: initialise the server (and, with the PIN in the shares, unseal it) first"
    )]
    NoSigner,
    /// The HSM refused to sign.
    #[error("the backup could not be signed")]
    Sign(#[source] AuditError),
    /// Writing the output or reading the file failed.
    #[error("backup file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not an intact kms backup.
    #[error("the backup is damaged or not a kms backup: {0}")]
    Damaged(String),
    /// The target store already holds data.
    #[error("the store is not empty (its {0} table has entries): restore only into an empty store")]
    NotEmpty(&'static str),
    /// The file is intact, but signed by another key than the one the operator trusts.
    #[error(
        "the backup was signed by the key with fingerprint {found}, not by the audit key you trust ({trusted}): it is not from your server, or its seal record was replaced"
    )]
    NotTrustedKey {
        /// The fingerprint of the key that signed it.
        found: String,
        /// The fingerprint the operator named.
        trusted: String,
    },
    /// `--public-key` is neither a fingerprint (32 hex digits) nor a public key (64).
    #[error(
        "the trusted key is neither a fingerprint (32 hex digits) nor an Ed25519 public key (64 hex digits)"
    )]
    BadTrustedKey,
    /// The restore's audit record could not be written.
    #[error("the restore's audit record could not be written")]
    Audit(#[source] Box<AuditError>),
}

fn damaged(why: impl Into<String>) -> BackupError {
    BackupError::Damaged(why.into())
}

/// Writes a backup of `store` to `out`, line by line; returns the number of entries.
/// Refuses before writing anything when the audit key cannot sign.
pub fn create(
    store: &dyn Store,
    signer: &Signer,
    server: &str,
    out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<u64, BackupError> {
    let public = signer.public_key().ok_or(BackupError::NoSigner)?;
    let mut hash = Sha256::new();
    let mut emit = |line: Vec<u8>, hash: &mut Sha256| -> Result<(), BackupError> {
        hash.update(&line);
        out(&line).map_err(BackupError::Io)
    };
    let header = Header {
        format: FORMAT.to_owned(),
        created_unix_ms: crate::audit::now_ms(),
        server: server.to_owned(),
    };
    emit(json_line(&header)?, &mut hash)?;
    let mut entries = 0u64;
    let mut failed: Option<BackupError> = None;
    store
        .snapshot(crate::engines::tables(), &mut |table, key, value| {
            let entry = Entry {
                table: table.name().to_owned(),
                key: key.to_owned(),
                value: data_encoding::BASE64.encode(value),
            };
            match json_line(&entry).and_then(|line| emit(line, &mut hash)) {
                Ok(()) => {
                    entries += 1;
                    Ok(())
                }
                Err(e) => {
                    failed = Some(e);
                    Err(StoreError::Settings("the backup's output failed".into()))
                }
            }
        })
        .map_err(|e| failed.take().unwrap_or(BackupError::Store(e)))?;
    let digest = data_encoding::HEXLOWER.encode(&hash.finalize());
    let (signature, key_fingerprint) = signer
        .sign_backup(&signed_message(&digest))
        .ok_or(BackupError::NoSigner)?
        .map_err(BackupError::Sign)?;
    debug_assert_eq!(key_fingerprint, crate::audit::fingerprint(&public));
    let trailer = Trailer {
        entries,
        sha256: digest,
        key_fingerprint,
        signature: data_encoding::HEXLOWER.encode(&signature),
    };
    out(&json_line(&trailer)?)?;
    Ok(entries)
}

fn signed_message(digest: &str) -> Vec<u8> {
    format!("{SIGNATURE_DOMAIN}{digest}").into_bytes()
}

fn json_line<T: Serialize>(value: &T) -> Result<Vec<u8>, BackupError> {
    let mut line = serde_json::to_vec(value).map_err(|_| damaged("cannot encode"))?;
    line.push(b'\n');
    Ok(line)
}

/// What a checked backup holds.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Entries in the file.
    pub entries: u64,
    /// When it was made (Unix ms).
    pub created_unix_ms: u64,
    /// The server that made it.
    pub server: String,
    /// The hex SHA-256 of its body.
    pub sha256: String,
    /// The fingerprint of the key that signed it.
    pub key_fingerprint: String,
    /// Whether that key is the one the caller trusts; `false`: checked only against the key
    /// the file names itself, which proves it intact but not where it came from.
    pub pinned: bool,
}

/// Reads the file line by line (none longer than [`MAX_LINE`], each ending in a newline):
/// `f` gets every line but the last, numbered from 0 (the header, then the entries), and
/// their SHA-256 is taken as they go; returns it (hex) and the last line (the trailer).
fn each_body_line(
    path: &Path,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), BackupError>,
) -> Result<(String, Option<Vec<u8>>), BackupError> {
    let file = std::fs::File::open(path)?;
    let mut reader = std::io::BufReader::new(file);
    let mut hash = Sha256::new();
    let (mut line, mut held) = (Vec::new(), None::<Vec<u8>>);
    let mut number = 0u64;
    loop {
        line.clear();
        let n =
            std::io::Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok((data_encoding::HEXLOWER.encode(&hash.finalize()), held));
        }
        if line.len() > MAX_LINE || line.last() != Some(&b'\n') {
            return Err(damaged("a line is too long or the file was cut short"));
        }
        // A line is known to be a body line once another follows it.
        if let Some(prev) = held.replace(line.clone()) {
            hash.update(&prev);
            f(number, &prev)?;
            number += 1;
        }
    }
}

/// Checks a backup file whole: its header, every entry's form, the count, the SHA-256
/// and the audit key's signature, and, with `trusted` (the audit key's fingerprint, or its
/// public key in hex), that this key signed it. Without `trusted` the signature is checked
/// against the key the file's own seal record names ([`Checked::pinned`] is `false`).
/// Writes nothing.
pub fn check(path: &Path, trusted: Option<&str>) -> Result<Checked, BackupError> {
    let trusted = trusted
        .map(crate::audit::verify::trusted_fingerprint)
        .transpose()
        .map_err(|_| BackupError::BadTrustedKey)?;
    let mut header: Option<Header> = None;
    let mut entries = 0u64;
    let mut audit_key: Option<Vec<u8>> = None;
    let (digest, last) = each_body_line(path, |number, line| {
        if number == 0 {
            let h: Header = serde_json::from_slice(line)
                .map_err(|_| damaged("the first line is not a backup header"))?;
            if h.format != FORMAT {
                return Err(damaged(format!("format {:?}, not {FORMAT}", h.format)));
            }
            header = Some(h);
        } else {
            let (table, key, value) = parse_entry(line)?;
            if table == crate::store::SYSTEM && key == SEAL_RECORD_KEY {
                audit_key = Some(audit_public_key(&value)?);
            }
            entries += 1;
        }
        Ok(())
    })?;
    let header = header.ok_or_else(|| damaged("empty, or no header"))?;
    let trailer: Trailer = last
        .as_deref()
        .and_then(|t| serde_json::from_slice(t).ok())
        .ok_or_else(|| damaged("no trailer: the file was cut short"))?;
    if trailer.entries != entries || trailer.sha256 != digest {
        return Err(damaged("its contents do not match its checksum"));
    }
    let public = audit_key.ok_or_else(|| damaged("it holds no seal record"))?;
    let found = crate::audit::fingerprint(&public);
    if found != trailer.key_fingerprint {
        return Err(damaged("signed by another key than its seal record names"));
    }
    if let Some(trusted) = &trusted
        && *trusted != found
    {
        return Err(BackupError::NotTrustedKey {
            found,
            trusted: trusted.clone(),
        });
    }
    let signature = data_encoding::HEXLOWER
        .decode(trailer.signature.as_bytes())
        .ok()
        .and_then(|s| ed25519_dalek::Signature::from_slice(&s).ok())
        .ok_or_else(|| damaged("the signature is malformed"))?;
    let key = <[u8; 32]>::try_from(public.as_slice())
        .ok()
        .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
        .ok_or_else(|| damaged("the seal record's audit key is malformed"))?;
    key.verify_strict(&signed_message(&digest), &signature)
        .map_err(|_| damaged("the signature does not verify"))?;
    Ok(Checked {
        entries,
        created_unix_ms: header.created_unix_ms,
        server: header.server,
        sha256: digest,
        pinned: trusted.is_some(),
        key_fingerprint: found,
    })
}

fn parse_entry(line: &[u8]) -> Result<(Table, String, Vec<u8>), BackupError> {
    let e: Entry = serde_json::from_slice(line).map_err(|_| damaged("a malformed entry"))?;
    let table = crate::engines::tables()
        .iter()
        .copied()
        .find(|t| t.name() == e.table)
        .ok_or_else(|| damaged(format!("an entry of an unknown table {:?}", e.table)))?;
    let value = data_encoding::BASE64
        .decode(e.value.as_bytes())
        .map_err(|_| damaged("an entry's value is not base64"))?;
    Ok((table, e.key, value))
}

fn audit_public_key(seal_record: &[u8]) -> Result<Vec<u8>, BackupError> {
    serde_json::from_slice::<serde_json::Value>(seal_record)
        .ok()
        .and_then(|v| v.get("audit_public_key")?.as_str().map(str::to_owned))
        .and_then(|h| data_encoding::HEXLOWER.decode(h.as_bytes()).ok())
        .ok_or_else(|| damaged("its seal record names no audit key"))
}

/// Restores the backup at `path` into `store`, which must be empty: checks the file
/// whole first, against `trusted` (the audit key's fingerprint or public key: a restore
/// never trusts the key a file names itself), then writes its entries in batches under a
/// marker that keeps a server from starting on a half-restored store; last, in one
/// transaction, the restore's audit record (after the backup's last record), the
/// [`RESTORED_MARKER`], and the marker's removal. Returns what it restored.
pub fn restore(path: &Path, store: Arc<dyn Store>, trusted: &str) -> Result<Checked, BackupError> {
    let checked = check(path, Some(trusted))?;
    for &table in crate::engines::tables() {
        if store.last(table)?.is_some() {
            return Err(BackupError::NotEmpty(table.name()));
        }
    }
    if !store.insert_new(crate::store::SYSTEM, RESTORE_MARKER, b"1")? {
        return Err(BackupError::NotEmpty("system"));
    }
    let mut batch = Vec::with_capacity(RESTORE_BATCH);
    // Hashed again as it is written: a file changed since `check` leaves the marker.
    let (digest, _) = each_body_line(path, |number, line| {
        if number == 0 {
            return Ok(());
        }
        let (table, key, value) = parse_entry(line)?;
        batch.push(Write { table, key, value });
        if batch.len() >= RESTORE_BATCH {
            store.write_all(&batch)?;
            batch.clear();
        }
        Ok(())
    })?;
    if digest != checked.sha256 {
        return Err(damaged(
            "the file changed while it was restored: the store is left marked as an interrupted restore",
        ));
    }
    store.write_all(&batch)?;
    record_restore(store, &checked)?;
    Ok(checked)
}

/// The restore's audit record, chained after the backup's last record (written by a log
/// of its own with no signer: the next checkpoint the server signs covers it), with the
/// [`RESTORED_MARKER`] written and the in-progress marker removed in its transaction.
fn record_restore(store: Arc<dyn Store>, checked: &Checked) -> Result<(), BackupError> {
    let log = crate::audit::AuditLog::open(
        Arc::clone(&store),
        Arc::new(Signer::disabled()),
        crate::audit::CheckpointPolicy::default(),
    )
    .map_err(|e| BackupError::Audit(Box::new(e)))?;
    let marker = serde_json::json!({
        "sha256": checked.sha256,
        "created_unix_ms": checked.created_unix_ms,
        "server": checked.server,
    });
    let event = crate::audit::AuditEvent {
        ceremony: Some(crate::audit::CeremonySummary {
            step: "restored".to_owned(),
            backup_sha256: checked.sha256.clone(),
            ..crate::audit::CeremonySummary::default()
        }),
        ..crate::audit::AuditEvent::internal(
            crate::audit::SYSTEM_PRINCIPAL,
            "kms.v1.System",
            "RestoreBackup",
        )
    };
    let written = log.append_removing(
        event,
        vec![Write {
            table: crate::store::SYSTEM,
            key: RESTORED_MARKER.to_owned(),
            value: serde_json::to_vec(&marker).map_err(|_| damaged("cannot encode"))?,
        }],
        vec![Removal {
            table: crate::store::SYSTEM,
            from: RESTORE_MARKER.to_owned(),
            to: RESTORE_MARKER.to_owned(),
        }],
    );
    log.stop();
    written
        .map(|_| ())
        .map_err(|e| BackupError::Audit(Box::new(e)))
}
