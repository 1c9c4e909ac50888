//! One call's life, whatever front it came through: who asks and what (the [`Call`]),
//! the access decision, where the work runs ([`Place`]), the audit record and its receipt,
//! and the answer or [`Refusal`] the front translates.
//!
//! Every call goes through [`run`] (or [`with_keyring`], which is `run` on the keyring with
//! its grants checked), which writes the call's audit record before the answer leaves: a
//! call whose record cannot be written fails with `audit log unavailable` and returns no
//! result. Calls that change stored state write their change and their record in one
//! transaction ([`Call`] is the keyring's [`Journal`]). The log line for every call is
//! written here too: the operation, the key, the outcome and the error's chain, never a
//! request or response body.

mod journal;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::deadline::{Begin, Deadline};
use super::error::{Refusal, ServiceError, is_audit_failure, log_error};
use super::op::{Op, SHARES_MIN_TIME_LEFT};
use super::{Caller, Service};
use crate::access::{Denied, Identity, Need, Roles};
use crate::audit::{AuditEvent, AuditLog, BatchSummary, GrantSummary};
use crate::keyring::{Change, Journal, Keyring, KeyringError};

/// What an answer is to the service layer: its size, for the record, and, for the changes a
/// caller may retry, how it is read back from the first attempt's stored answer. A front's
/// answer types implement it.
pub(crate) trait Reply: Send + 'static {
    /// The answer's size in bytes, as its front encodes it (the record's `output_bytes`).
    fn size(&self) -> u64;

    /// The answer to a retried change, from the bytes its front's
    /// [`Meta::answer_of`] made of the first attempt's change.
    fn from_replay(bytes: &[u8]) -> Option<Self>
    where
        Self: Sized;
}

/// Set once a call's record is the service layer's to write (a front's own layer, such as
/// the gRPC gate, records the calls for which it is still unset).
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorded(Arc<AtomicBool>);

impl Recorded {
    /// The service layer will record (or has recorded) this call.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether it will.
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The idempotency key a front read off a request.
pub(crate) enum Idempotency {
    /// None was given.
    None,
    /// One was given that is not a token ([`super::is_token`]).
    Bad,
    /// One was given.
    Given {
        /// The key.
        key: String,
        /// The request, as its front encodes it: a retry must repeat it exactly.
        request: zeroize::Zeroizing<Vec<u8>>,
    },
}

/// What a front read off a request, beside its body.
pub(crate) struct Meta {
    /// The request id (the caller's, if a sane token, else one the front made:
    /// [`super::request_id`]).
    pub request_id: String,
    /// The request's size in bytes, as its front encodes it.
    pub input_bytes: u64,
    /// The caller's idempotency key.
    pub idempotency: Idempotency,
    /// How the front encodes the answer of a change (a key or a grant): its size is the
    /// record's `output_bytes`, and a retry's answer is read back from it by
    /// [`Reply::from_replay`]. Without it a change's size is 0 and it is not retried.
    pub answer_of: Option<fn(Change<'_>) -> Vec<u8>>,
    /// The caller's deadline, shared with the front that answers when it passes.
    pub deadline: Option<Deadline>,
    /// The front's flag, set once this call's record is the service layer's to write.
    pub recorded: Option<Recorded>,
    /// The front counts this call (a caller without a certificate's Status or WhoAmI): no
    /// record of its own.
    pub counted: bool,
}

/// One call being served: who made it, what it needs, what its audit record will say, and
/// whether that was written yet.
pub(crate) struct Call {
    log: AuditLog,
    event: AuditEvent,
    recorded: AtomicBool,
    identity: Arc<Identity>,
    peer: Option<std::net::SocketAddr>,
    op: Op,
    need: Need,
    roles: Arc<Roles>,
    bad_name: bool,
    /// Why the secret path named is not one.
    bad_path: Option<&'static str>,
    /// The front's flag: set once this call's record is this layer's to write.
    front_recorded: Option<Recorded>,
    /// The front counts this call: no record of its own.
    counted: bool,
    /// The level of the "request served" line.
    request_log: tracing::Level,
    /// The caller's deadline, shared with its front.
    deadline: Option<Deadline>,
    /// A change the caller may retry with its idempotency key, once the keyring is known.
    retry: Option<Retry>,
    /// The caller sent an idempotency key that is not one.
    bad_idempotency_key: bool,
    /// See [`Meta::answer_of`].
    answer_of: Option<fn(Change<'_>) -> Vec<u8>>,
}

/// What a change sent with an idempotency key needs to be made once.
struct Retry {
    /// Where its first answer is kept ([`crate::keyring::requests::record_key`]).
    record_key: String,
    /// The request, as its front encodes it, which a retry must repeat.
    request: zeroize::Zeroizing<Vec<u8>>,
    /// The keyring, known once the call runs ([`with_keyring`]).
    keyring: std::sync::OnceLock<Arc<Keyring>>,
    /// The first attempt's answer and request id, when this call is a retry of it.
    answer: std::sync::Mutex<Option<(Vec<u8>, String)>>,
}

/// What the log and the audit record say instead of a name that is not one: its size only.
fn invalid_name(name: &str) -> String {
    format!("<invalid name, {} bytes>", name.len())
}

impl Call {
    /// A call of `op` by `caller`, described by what its front read off the request. Its
    /// [`Need`] is [`Op::need`]'s.
    pub(crate) fn new(service: &Service, caller: Caller, op: Op, meta: Meta) -> Self {
        let Caller {
            identity,
            peer,
            front,
        } = caller;
        let bad_idempotency_key = matches!(meta.idempotency, Idempotency::Bad);
        let retry = match meta.idempotency {
            Idempotency::Given { key, request } if op.is_retried_change() => {
                meta.answer_of.map(|_| Retry {
                    record_key: crate::keyring::requests::record_key(&identity.principal, &key),
                    request,
                    keyring: std::sync::OnceLock::new(),
                    answer: std::sync::Mutex::new(None),
                })
            }
            _ => None,
        };
        Self {
            log: service.audit.clone(),
            event: AuditEvent {
                request_id: meta.request_id,
                principal: identity.principal.clone(),
                peer: peer.map(|a| a.to_string()).unwrap_or_default(),
                service: op.group().record_name().to_owned(),
                operation: op.name().to_owned(),
                input_bytes: meta.input_bytes,
                front: front.record_name().map(str::to_owned),
                ..AuditEvent::default()
            },
            recorded: AtomicBool::new(false),
            identity,
            peer,
            op,
            need: op.need(),
            roles: Arc::clone(&service.roles),
            bad_name: false,
            bad_path: None,
            front_recorded: meta.recorded,
            counted: meta.counted,
            request_log: service.request_log,
            deadline: meta.deadline,
            retry,
            bad_idempotency_key,
            answer_of: meta.answer_of,
        }
    }

    /// Who is calling.
    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The caller's address.
    pub(crate) fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// The caller's roles.
    pub(crate) fn roles(&self) -> std::collections::BTreeSet<crate::access::Role> {
        self.roles.of(&self.identity)
    }

    /// Who the caller is to the databases engine, which keeps a lease its holder's (or an
    /// administrator's), whatever front asks.
    pub(crate) fn database_who(&self) -> crate::databases::Who<'_> {
        crate::databases::Who {
            principal: &self.identity.principal,
            admin: self.roles().contains(&crate::access::Role::Admin),
        }
    }

    /// Describes the caller's end for its record when it has no address: a process on a
    /// unix socket (`pid=N gid=N`).
    pub(crate) fn peer_described(mut self, text: String) -> Self {
        self.event.peer = text;
        self
    }

    /// Names the key the call is about. A name that is not one (too long, or characters a
    /// key name cannot have) is recorded and logged as a bounded placeholder, never as
    /// given, and the call is refused with `INVALID_ARGUMENT` once its caller is known.
    pub(crate) fn key(mut self, key: &str) -> Self {
        self.event.key = self.checked_name(key);
        self
    }

    /// Names ReEncrypt's destination key (whose grant is checked too); checked as
    /// [`Call::key`] checks.
    pub(crate) fn destination(mut self, key: &str) -> Self {
        self.event.destination_key = self.checked_name(key);
        self
    }

    fn checked_name(&mut self, key: &str) -> Option<String> {
        if key.is_empty() {
            return None;
        }
        if crate::keyring::model::check_name(key).is_ok() {
            return Some(key.to_owned());
        }
        self.bad_name = true;
        Some(invalid_name(key))
    }

    /// Names the secret path the call is about (a prefix for a listing, a path pattern for
    /// a grant: `check` says which). A path that is not one is recorded and logged as a
    /// bounded placeholder, and the call refused with `INVALID_ARGUMENT` once its caller is
    /// known.
    pub(crate) fn secret(
        mut self,
        path: &str,
        check: fn(&str) -> Result<(), crate::secrets::SecretsError>,
    ) -> Self {
        let recorded = match check(path) {
            Ok(()) => path.to_owned(),
            Err(e) => {
                self.bad_path = Some(match e {
                    crate::secrets::SecretsError::BadPath(why) => why,
                    _ => "a path pattern is a path, a path followed by `/*` or `*`, or `*` alone",
                });
                invalid_name(path)
            }
        };
        self.event.secret = Some(crate::audit::SecretSummary {
            path: recorded,
            versions: Vec::new(),
            dropped: Vec::new(),
        });
        self
    }

    /// Names the database connection, role or lease (or lease prefix) the call is about,
    /// so that its record names them whatever its outcome (a name that is not one as a
    /// bounded placeholder; the engine refuses it).
    pub(crate) fn database(mut self, connection: &str, role: &str, lease: &str) -> Self {
        use crate::databases::model::{LEASE_PREFIX, check_lease_id, check_name};
        let name = |what: &str, s: &str| match check_name(what, s) {
            _ if s.is_empty() => String::new(),
            Ok(()) => s.to_owned(),
            Err(_) => invalid_name(s),
        };
        let lease = if lease.is_empty()
            || check_lease_id(lease).is_ok()
            || (lease.starts_with(LEASE_PREFIX)
                && lease.len() <= 200
                && lease
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b)))
        {
            lease.to_owned()
        } else {
            invalid_name(lease)
        };
        self.event.database = Some(crate::audit::DatabaseSummary {
            connection: name("connection", connection),
            role: name("role", role),
            lease_id: lease,
            ..crate::audit::DatabaseSummary::default()
        });
        self
    }

    /// Names the credential issuer the call is about, so that its record names it whatever
    /// its outcome (a name that is not one as a bounded placeholder; the engine refuses it).
    pub(crate) fn credential(mut self, issuer: &str) -> Self {
        let recorded = match crate::keyring::model::check_name(issuer) {
            Ok(()) => issuer.to_owned(),
            Err(_) if issuer.is_empty() => String::new(),
            Err(_) => invalid_name(issuer),
        };
        self.event.credential = Some(crate::audit::CredentialSummary {
            issuer: recorded,
            ..crate::audit::CredentialSummary::default()
        });
        self
    }

    /// Names the subject and audience a request for a token asks for, so that a refusal's
    /// record says whom it was for (a subject that is not a SPIFFE ID, an audience with
    /// control or invisible characters or over 256 bytes, as a bounded placeholder).
    pub(crate) fn credential_request(mut self, subject: &str, audience: &str) -> Self {
        let caller = self.event.principal.clone();
        if let Some(c) = &mut self.event.credential {
            c.subject = if subject.is_empty() || crate::access::tls::is_spiffe_id(subject) {
                subject.to_owned()
            } else {
                invalid_name(subject)
            };
            // Asked on another's behalf: the caller is the delegator, refused or not.
            if !subject.is_empty() && subject != caller {
                c.actor = Some(caller);
            }
            c.audience = if audience.is_empty() || crate::policy::is_label(audience, 256) {
                audience.to_owned()
            } else {
                invalid_name(audience)
            };
        }
        self
    }

    /// Names the SSH principals a request for a certificate asks for, so that a refusal's
    /// record says what it asked (one that is not an SSH principal as a bounded
    /// placeholder; at most [`crate::credentials::model::MAX_LIST`], as an issuer names).
    pub(crate) fn credential_principals(mut self, principals: &[String]) -> Self {
        if let Some(c) = &mut self.event.credential {
            c.principals = principals
                .iter()
                .take(crate::credentials::model::MAX_LIST)
                .map(|p| {
                    if crate::credentials::model::check_ssh_principal(p).is_ok() {
                        p.clone()
                    } else {
                        invalid_name(p)
                    }
                })
                .collect();
        }
        self
    }

    /// Names the token a call concerns by its `jti` (one that is not one kms makes, 32 hex
    /// digits, as a bounded placeholder; the engine refuses it).
    pub(crate) fn credential_jti(mut self, jti: &str) -> Self {
        if let Some(c) = &mut self.event.credential {
            let hex = jti.len() == 32 && jti.bytes().all(|b| b.is_ascii_hexdigit());
            c.jti = if hex {
                jti.to_owned()
            } else {
                invalid_name(jti)
            };
        }
        self
    }

    /// Records the versions the call asks for (0, the current version, is not one), so
    /// that its record names them whatever its outcome; an answer that names the versions
    /// it concerned replaces them ([`Served::secret_versions`]). At most
    /// [`crate::secrets::model::MAX_VERSIONS_LIMIT`] are recorded: no secret keeps more.
    pub(crate) fn secret_versions_asked(mut self, versions: &[u64]) -> Self {
        if let Some(s) = &mut self.event.secret {
            s.versions = versions
                .iter()
                .copied()
                .filter(|&v| v != 0)
                .take(crate::secrets::model::MAX_VERSIONS_LIMIT as usize)
                .collect();
        }
        self
    }

    /// What the log line names: the key, else the secret's path (as recorded: a bounded
    /// placeholder for a name that is not one).
    fn subject(&self) -> &str {
        self.event
            .key
            .as_deref()
            .unwrap_or_else(|| self.secret_path())
    }

    /// The secret path (or prefix) the call names, as recorded.
    fn secret_path(&self) -> &str {
        self.event.secret.as_ref().map_or("", |s| s.path.as_str())
    }

    /// `service/operation`, for log lines.
    fn rpc(&self) -> String {
        format!("{}/{}", self.event.service, self.event.operation)
    }

    /// What a custodians' ceremony call concerns (the share it was given), for its record
    /// whatever the outcome.
    pub(crate) fn ceremony(mut self, c: crate::audit::CeremonySummary) -> Self {
        self.event.ceremony = Some(c);
        self
    }

    /// Names the key version the call is about (0: none).
    pub(crate) fn version(mut self, version: u32) -> Self {
        self.event.key_version = Some(version).filter(|v| *v != 0);
        self
    }

    /// Writes this call's record now, with outcome OK, `output_bytes`, and `writes` in the
    /// same transaction.
    pub(crate) fn commit(
        &self,
        version: Option<u32>,
        output_bytes: u64,
        grant: Option<(String, GrantSummary)>,
        ceremony: Option<crate::audit::CeremonySummary>,
        writes: Vec<crate::store::Write>,
    ) -> Result<(), crate::audit::AuditError> {
        let ceremony = ceremony.or_else(|| self.event.ceremony.clone());
        let (key, grant) = match grant {
            Some((key, g)) => (Some(key), Some(g)),
            None => (self.event.key.clone(), None),
        };
        let event = AuditEvent {
            outcome: "OK".to_owned(),
            key,
            key_version: self.event.key_version.or(version),
            output_bytes,
            grant,
            ceremony,
            ..self.event.clone()
        };
        if let Some(g) = &self.front_recorded {
            g.set();
        }
        self.log.append_with(event, writes)?;
        self.recorded.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Journal for Call {
    fn commit(
        &self,
        change: Change<'_>,
        writes: Vec<crate::store::Write>,
    ) -> Result<(), KeyringError> {
        let mut writes = writes;
        let answer = self.answer_of.map(|f| f(change)).unwrap_or_default();
        let size = answer.len() as u64;
        if let Some(write) = self.first_answer(&answer)? {
            writes.push(write);
        }
        let (version, grant) = match change {
            Change::Key(meta) => (Some(meta.primary), None),
            Change::Grant(g) => (
                None,
                Some((
                    g.key.clone(),
                    GrantSummary {
                        id: g.id.clone(),
                        principal: g.principal.to_string(),
                        operations: g.operations.iter().map(|o| o.name().to_owned()).collect(),
                        associated_data_constrained: g.associated_data_mac.is_some(),
                    },
                )),
            ),
        };
        Call::commit(self, version, size, grant, None, writes)
            .map_err(|_| KeyringError::AuditUnavailable)
    }

    fn admit(&self) -> Result<(), KeyringError> {
        let Some(retry) = &self.retry else {
            return Ok(());
        };
        let Some(keyring) = retry.keyring.get() else {
            return Ok(());
        };
        let Some(first) = keyring.request_record(&retry.record_key, now_ms())? else {
            return Ok(());
        };
        let request = keyring.request_mac(&self.event.operation, &retry.request)?;
        let same = first.operation == self.event.operation
            && subtle::ConstantTimeEq::ct_eq(first.request.as_bytes(), request.as_bytes()).into();
        if !same {
            return Err(KeyringError::IdempotencyKeyReused);
        }
        let answer = data_encoding::BASE64
            .decode(first.answer.as_bytes())
            .map_err(|_| KeyringError::Tampered(format!("request record {}", retry.record_key)))?;
        *retry
            .answer
            .lock()
            .map_err(|_| KeyringError::Internal("retry"))? = Some((answer, first.request_id));
        Err(KeyringError::Replayed)
    }
}

impl Call {
    /// The write that keeps `answer` as the first answer of this change, when the caller
    /// sent an idempotency key.
    fn first_answer(&self, answer: &[u8]) -> Result<Option<crate::store::Write>, KeyringError> {
        let Some(retry) = &self.retry else {
            return Ok(None);
        };
        let Some(keyring) = retry.keyring.get() else {
            return Ok(None);
        };
        let record = crate::keyring::requests::RequestRecord {
            operation: self.event.operation.clone(),
            request: keyring.request_mac(&self.event.operation, &retry.request)?,
            answer: data_encoding::BASE64.encode(answer),
            request_id: self.event.request_id.clone(),
            at_ms: now_ms(),
        };
        keyring.request_write(&retry.record_key, &record).map(Some)
    }

    /// The first attempt's answer and request id, when this call is a retry of a change
    /// made already.
    fn replayed_answer(&self) -> Option<(Vec<u8>, String)> {
        self.retry
            .as_ref()
            .and_then(|r| r.answer.lock().ok()?.take())
    }
}

/// The time in Unix milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A successful call's response and what its record says about it.
pub(crate) struct Served<R> {
    response: R,
    version: Option<u32>,
    destination: Option<(String, u32)>,
    batch: Option<BatchSummary>,
    ceremony: Option<crate::audit::CeremonySummary>,
    undo: Option<Box<dyn FnOnce() + Send>>,
    replay_of: Option<String>,
    secret_versions: Vec<u64>,
    credential: Option<crate::audit::CredentialSummary>,
    signed_with: Option<(String, u32)>,
    outcome: Option<super::ErrorKind>,
}

impl<R> Served<R> {
    /// A response.
    pub(crate) fn new(response: R) -> Self {
        Self {
            response,
            version: None,
            destination: None,
            batch: None,
            ceremony: None,
            undo: None,
            replay_of: None,
            secret_versions: Vec::new(),
            credential: None,
            signed_with: None,
            outcome: None,
        }
    }

    /// The key and version that signed what the call issued: its record names them, so that
    /// the auditors' report counts the issuance as a use of that key version.
    pub(crate) fn signed_with(mut self, key: String, version: u32) -> Self {
        self.signed_with = Some((key, version));
        self
    }

    /// The credential issued, for its record (never the token itself).
    pub(crate) fn credential(mut self, summary: crate::audit::CredentialSummary) -> Self {
        self.credential = Some(summary);
        self
    }

    /// The secret's versions the call read or concerned, for its record.
    pub(crate) fn secret_versions(mut self, versions: Vec<u64>) -> Self {
        self.secret_versions = versions;
        self
    }

    /// The answer carries a refusal with a body of its own (Vault's 404 for a deleted
    /// version, with its metadata): its record's outcome is `kind`, not `OK`.
    pub(crate) fn refused_as(mut self, kind: super::ErrorKind) -> Self {
        self.outcome = Some(kind);
        self
    }

    /// What a custodians' ceremony step did, for its record.
    pub(crate) fn ceremony(mut self, c: crate::audit::CeremonySummary) -> Self {
        self.ceremony = Some(c);
        self
    }

    /// What takes back an in-memory effect (unseal progress) if the record cannot be
    /// written.
    pub(crate) fn undo(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.undo = Some(Box::new(f));
        self
    }

    /// The key version used.
    pub(crate) fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    /// ReEncrypt's destination key and version.
    pub(crate) fn destination(mut self, key: String, v: u32) -> Self {
        self.destination = Some((key, v));
        self
    }

    /// A batch's items.
    pub(crate) fn batch(mut self, b: BatchSummary) -> Self {
        self.batch = Some(b);
        self
    }
}

/// Where a call's work runs.
#[derive(Debug, Clone)]
pub(crate) enum Place {
    /// On a blocking thread: it may wait on the HSM or the store.
    Blocking,
    /// On the async worker that polls the call: in-process crypto of a microsecond or
    /// two, where a hop to another thread and back would cost more than the work.
    InProcess,
    /// On one of the HSM's threads ([`crate::hsm::Hsm::run`]): a crypto call on an HSM key,
    /// whose work is a PKCS#11 call. A queue instead of a `spawn_blocking` thread per call.
    Hsm(Arc<crate::hsm::Hsm>),
}

/// The largest request whose crypto runs on the async worker: one item of the largest
/// plaintext or message and its fields. A bigger one (a batch of many megabytes, up to the
/// 16 MiB a caller may send) is milliseconds of AES-GCM, which would stall every other
/// call on that worker: it runs on a blocking thread.
const IN_PROCESS_MAX_INPUT: u64 = crate::keyring::MAX_PLAINTEXT as u64 + 16 * 1024;

/// A call's answer: the front's reply or the refusal it translates, with the request id
/// every answer carries, and whether it is a first attempt's answer to a retried change.
pub(crate) struct Answer<R> {
    /// The reply, or what the caller is told.
    pub result: Result<R, Refusal>,
    /// The call's request id.
    pub request_id: String,
    /// The answer is the first attempt's (an idempotent retry).
    pub replayed: bool,
}

/// Runs a call on a blocking thread ([`run_at`]).
pub(crate) async fn run<R: Reply>(
    call: Call,
    f: impl FnOnce(&Call) -> Result<Served<R>, ServiceError> + Send + 'static,
) -> Answer<R> {
    run_at(Place::Blocking, call, f).await
}

/// Runs a call's work at `place` after its access check, writes its audit record, logs its
/// outcome, maps its error. Either way the record is handed to the writer before the first
/// await after the work, so a caller that goes away cannot leave work done and unrecorded;
/// then the answer waits, without holding a thread, until the record is durable.
pub(crate) async fn run_at<R: Reply>(
    place: Place,
    call: Call,
    f: impl FnOnce(&Call) -> Result<Served<R>, ServiceError> + Send + 'static,
) -> Answer<R> {
    // Kept apart: a panic in the work loses `call`, and its answer carries the id too.
    let request_id = call.event.request_id.clone();
    let work = move || {
        // The work begins only before the caller's deadline; once the front has answered
        // it, it does nothing and records nothing.
        let min_left = if call.op.hands_out_shares() {
            SHARES_MIN_TIME_LEFT
        } else {
            std::time::Duration::ZERO
        };
        let late = match call.deadline.as_ref().map(|d| d.begin(min_left)) {
            Some(Begin::Abandoned) => return None,
            Some(Begin::Late) => Some(
                if call
                    .deadline
                    .as_ref()
                    .is_some_and(|d| std::time::Instant::now() < d.at())
                {
                    ServiceError::DeadlineTooShort(min_left.as_secs())
                } else {
                    ServiceError::DeadlineExceeded
                },
            ),
            Some(Begin::Go) | None => None,
        };
        let result = crate::access::check(
            call.need,
            &call.identity,
            &call.roles,
            i64::try_from(crate::keyring::now()).unwrap_or(i64::MAX),
        )
        .map_err(ServiceError::from)
        .and_then(|()| {
            if call.bad_name {
                return Err(KeyringError::BadName.into());
            }
            if let Some(why) = call.bad_path {
                return Err(crate::secrets::SecretsError::BadPath(why).into());
            }
            if call.bad_idempotency_key {
                return Err(ServiceError::BadIdempotencyKey);
            }
            if let Some(late) = late {
                return Err(late);
            }
            f(&call)
        });
        let settled = settle(&call, result);
        Some((call, settled))
    };
    // A panicked work (the blocking pool's `JoinError`, the HSM threads' `NoResult`) has
    // lost its call: the caller is told `INTERNAL`.
    let done = match place {
        Place::InProcess => Ok(work()),
        Place::Blocking => tokio::task::spawn_blocking(work).await.map_err(|_| ()),
        Place::Hsm(hsm) => hsm.run(work).await.map_err(|_| ()),
    };
    match done {
        Ok(Some((call, settled))) => {
            let replayed = settled.replayed;
            Answer {
                result: deliver(&call, settled).await,
                request_id,
                replayed,
            }
        }
        // The front answered the caller already.
        Ok(None) => Answer {
            result: Err(Refusal::from(&ServiceError::DeadlineExceeded)),
            request_id,
            replayed: false,
        },
        Err(_) => Answer {
            result: Err(Refusal::internal()),
            request_id,
            replayed: false,
        },
    }
}

/// A call's outcome with its record handed to the writer (if a commit had not written
/// it already).
struct Settled<R> {
    answer: Result<R, Refusal>,
    receipt: Option<crate::audit::Receipt>,
    undo: Option<Box<dyn FnOnce() + Send>>,
    refused_for_audit: bool,
    /// The answer is the first attempt's (an idempotent retry).
    replayed: bool,
}

/// Records the outcome (unless a commit already did) and turns it into the answer.
/// Does not wait for the record: [`deliver`] does.
fn settle<R: Reply>(call: &Call, result: Result<Served<R>, ServiceError>) -> Settled<R> {
    let key = call.subject();
    let mut event = call.event.clone();
    let mut undo = None;
    let mut replayed = false;
    let refused_for_audit = result.as_ref().is_err_and(is_audit_failure);
    let answer = match result {
        Ok(served) => {
            undo = served.undo;
            event.outcome = served.outcome.map_or("OK", |k| k.name()).to_owned();
            if let Some(s) = &mut event.secret
                && !served.secret_versions.is_empty()
            {
                s.versions = served.secret_versions;
            }
            if served.credential.is_some() {
                event.credential = served.credential;
            }
            event.key_version = served.version.or(event.key_version);
            if let Some((k, v)) = served.signed_with {
                event.key = Some(k);
                event.key_version = Some(v);
            }
            if let Some((k, v)) = served.destination {
                event.destination_key = Some(k);
                event.destination_key_version = Some(v);
            }
            event.batch = served.batch;
            replayed = served.replay_of.is_some();
            event.replay_of = served.replay_of;
            if served.ceremony.is_some() {
                event.ceremony = served.ceremony;
            }
            event.output_bytes = served.response.size();
            Ok(served.response)
        }
        Err(e) => {
            let kind = super::error::kind_of(&e);
            log_error(&call.rpc(), key, &e, kind);
            event.outcome = kind.name().to_owned();
            Err(Refusal::from(&e))
        }
    };
    if let Some(g) = &call.front_recorded {
        g.set();
    }
    // A change that committed its record with it is recorded; a failure after that commit
    // gets its own record too, so the log never shows OK for an answer that was an error.
    // A call its front counts has no record of its own.
    let receipt = (!call.counted && (!call.recorded.load(Ordering::Relaxed) || answer.is_err()))
        .then(|| call.log.submit(event));
    Settled {
        answer,
        receipt,
        undo,
        refused_for_audit,
        replayed,
    }
}

/// Waits until the call's record is durable, then gives its answer; if the record could
/// not be written, takes back what can be taken back and withholds the answer.
async fn deliver<R>(call: &Call, settled: Settled<R>) -> Result<R, Refusal> {
    let Settled {
        answer,
        receipt,
        undo,
        refused_for_audit,
        replayed: _,
    } = settled;
    let key = call.subject();
    if let Some(receipt) = receipt
        && let Err(e) = receipt.durable().await
    {
        if !refused_for_audit {
            tracing::error!(rpc = %call.rpc(), key, error = %crate::error_chain(&e), "audit record not written: answer withheld");
        }
        if let Some(undo) = undo {
            undo();
        }
        return Err(Refusal::audit_unavailable());
    }
    if answer.is_ok() {
        // Fields are built only when the line is written.
        if call.request_log == tracing::Level::INFO {
            tracing::info!(rpc = %call.rpc(), key = %key, code = "OK", "request served");
        } else {
            tracing::debug!(rpc = %call.rpc(), key = %key, code = "OK", "request served");
        }
    }
    answer
}

/// Runs `f` on the secrets engine (or fails with sealed / not initialised). A call that
/// needs a grant on secrets is checked here, before `f`, against the path (or prefix) it
/// names.
///
/// Where it runs: a read of a secret whose metadata and versions are small, on a store of
/// this server's, by a caller its grants allow, runs on the async worker, where a hop to
/// a blocking thread and back would cost more than the read
/// ([`crate::secrets::Secrets::reads_quickly`]; the reads are of the store's cache; the
/// grant is checked before the store is looked at, so a refusal takes the same path
/// whatever the path holds); every other call on a blocking thread (it writes, lists many
/// entries, or waits on a store over the network).
pub(crate) async fn with_secrets<R: Reply>(
    service: &Service,
    call: Call,
    f: impl FnOnce(&crate::secrets::Secrets, &Call) -> Result<Served<R>, crate::secrets::SecretsError>
    + Send
    + 'static,
) -> Answer<R> {
    let secrets = service.seal.secrets();
    let place = match (&secrets, call.need) {
        (Ok(s), Need::Secret(operation))
            if matches!(
                call.op,
                Op::GetSecret | Op::GetSecretSubkeys | Op::GetSecretMetadata
            ) && !s.shared()
                && s.permits(&call.identity.principal, call.secret_path(), operation)
                    .unwrap_or(false)
                && s.reads_quickly(call.secret_path(), IN_PROCESS_MAX_INPUT) =>
        {
            Place::InProcess
        }
        _ => Place::Blocking,
    };
    run_at(place, call, move |c| {
        let secrets = secrets?;
        if let Need::Secret(operation) = c.need {
            let path = c.secret_path();
            if !secrets.permits(&c.identity.principal, path, operation)? {
                return Err(Denied::SecretGrant {
                    principal: c.identity.principal.clone(),
                    operation,
                    path: path.to_owned(),
                }
                .into());
            }
        }
        Ok(f(&secrets, c)?)
    })
    .await
}

/// Runs `f` on the credentials engine and the keyring that signs for it (or fails with
/// sealed / not initialised), on a blocking thread (it reads the store and signs, in the
/// HSM for an HSM key).
pub(crate) async fn with_credentials<R: Reply>(
    service: &Service,
    call: Call,
    f: impl FnOnce(&crate::credentials::Credentials, &Keyring, &Call) -> Result<Served<R>, ServiceError>
    + Send
    + 'static,
) -> Answer<R> {
    let engines = service
        .seal
        .credentials()
        .and_then(|c| Ok((c, service.seal.keyring()?)));
    run_at(Place::Blocking, call, move |c| {
        let (credentials, keyring) = engines?;
        f(&credentials, &keyring, c)
    })
    .await
}

/// Runs `f` on the databases engine (or fails with sealed / not initialised), on a
/// blocking thread: it waits on the store and on the databases it makes logins on.
pub(crate) async fn with_databases<R: Reply>(
    service: &Service,
    call: Call,
    f: impl FnOnce(&crate::databases::Databases, &Call) -> Result<Served<R>, ServiceError>
    + Send
    + 'static,
) -> Answer<R> {
    let databases = service.seal.databases();
    run_at(Place::Blocking, call, move |c| {
        let databases = databases?;
        f(&databases, c)
    })
    .await
}

/// The associated data a request carries, which a constrained grant must match.
pub(crate) trait Aad {
    /// Every associated data in the request (one per batch item).
    fn aads(&self) -> Vec<&[u8]> {
        Vec::new()
    }
}

/// Runs `f` on the keyring (or fails with sealed / not initialised). A call that needs a
/// grant is checked here, before `f`, against every key it names (its key and, for
/// ReEncrypt, its destination) and every associated data in `req`.
pub(crate) async fn with_keyring<Q: Aad + Send + 'static, R: Reply>(
    service: &Service,
    call: Call,
    req: Q,
    f: impl FnOnce(&Keyring, &Call, Q) -> Result<Served<R>, KeyringError> + Send + 'static,
) -> Answer<R> {
    // Crypto calls of up to `IN_PROCESS_MAX_INPUT` bytes run on the async worker when their
    // keys are in-process keys, on the HSM's threads when one is an HSM key (and none needs
    // the store looked up first); bigger ones, administration (which commits to the store),
    // keys a shared store must be asked about and a sealed server run on a blocking thread.
    // (A crypto call may still wait on the store, rarely: when it reserves the next block
    // of its key's nonce budget, or rotates the key at 3/4 of it.)
    let keyring = service.seal.keyring();
    let place = match &keyring {
        Ok(k)
            if matches!(call.need, Need::Grant(_))
                && call.event.input_bytes <= IN_PROCESS_MAX_INPUT =>
        {
            let keys = || {
                [&call.event.key, &call.event.destination_key]
                    .into_iter()
                    .flatten()
            };
            if keys().all(|name| k.runs_in_process(name)) {
                Place::InProcess
            } else if keys().all(|name| k.runs_in_process(name) || k.is_hsm_key(name)) {
                Place::Hsm(Arc::clone(k.hsm()))
            } else {
                Place::Blocking
            }
        }
        _ => Place::Blocking,
    };
    run_at(place, call, move |c| {
        let keyring = keyring?;
        if let Need::Grant(on_key) = c.need {
            let aads = req.aads();
            // ReEncrypt: reencrypt-from on the source, reencrypt-to on the destination.
            let keys = [
                (c.event.key.as_deref(), on_key),
                (c.event.destination_key.as_deref(), on_key.on_destination()),
            ];
            for (key, operation) in keys
                .into_iter()
                .filter_map(|(k, o)| Some((k?, o)))
                .chain(c.event.key.is_none().then_some(("", on_key)))
            {
                if !keyring.permits(&c.identity.principal, key, operation, &aads)? {
                    return Err(Denied::Grant {
                        principal: c.identity.principal.clone(),
                        operation,
                        key: key.to_owned(),
                    }
                    .into());
                }
            }
        }
        if let Some(retry) = &c.retry {
            let _ = retry.keyring.set(Arc::clone(&keyring));
        }
        match f(&keyring, c, req) {
            // A retry of a change made already: the first attempt's answer.
            Err(KeyringError::Replayed) => {
                let (answer, first) = c
                    .replayed_answer()
                    .ok_or(KeyringError::Internal("replayed answer"))?;
                let response =
                    R::from_replay(&answer).ok_or(KeyringError::Internal("replayed answer"))?;
                Ok(Served {
                    replay_of: Some(first),
                    ..Served::new(response)
                })
            }
            other => Ok(other?),
        }
    })
    .await
}
