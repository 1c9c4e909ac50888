//! The apiserver's three calls (`v2.KeyManagementService`), each a service-layer call on
//! the configured key (a `Decrypt`: on the key its `key_id` names): `Status` is
//! [`Op::CheckKey`], `Encrypt` and `Decrypt` are the keyring's, with the grants, the audit
//! record (the apiserver's `uid` as its request id) and the error mapping of every other
//! front.
//!
//! The apiserver's rules (k8s.io/apiserver, `kmsv2`): a `key_id` and a ciphertext are at
//! most 1 KiB and never empty; annotation keys are fully qualified domain names, keys and
//! values at most 32 KiB in all. kms's answers keep them (no annotations at all), and a
//! request that breaks them is refused `INVALID_ARGUMENT`.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kms_proto::kubernetes::v2 as pb;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::access::Identity;
use crate::keyring::{Keyring, KeyringError};
use crate::service::{Aad, Call, Caller, ErrorKind, Front, Idempotency, Meta, Op, Served, Service};

/// The API version `Status` answers.
const VERSION: &str = "v2";

/// The longest `key_id` and ciphertext the apiserver stores.
pub(crate) const MAX_KEY_ID: usize = 1024;

/// See [`MAX_KEY_ID`].
pub(crate) const MAX_CIPHERTEXT: usize = 1024;

/// The longest plaintext whose ciphertext fits [`MAX_CIPHERTEXT`] (the apiserver sends a
/// 32-byte seed).
pub(crate) const MAX_PLAINTEXT: usize = MAX_CIPHERTEXT - crate::keyring::ciphertext::OVERHEAD;

// The apiserver's seeds and data keys are 32 bytes.
const _: () = assert!(MAX_PLAINTEXT >= 32);

/// The most bytes of annotations (keys and values) the apiserver stores.
const MAX_ANNOTATIONS: usize = 32 * 1024;

/// How long a passed key check answers `Status` before the key is tried again.
pub(crate) const CHECK_FOR: Duration = Duration::from_secs(5);

/// The service name of the plugin's calls in the metrics (`kms_requests_total`).
const METRICS_SERVICE: &str = "v2.KeyManagementService";

/// Counts and times one answered call in the metrics, under its gRPC code's name (a
/// `Status` that is not ok under the code of why).
fn measured<R>(
    method: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
    answer: Result<Response<R>, Status>,
) -> Result<Response<R>, Status> {
    let code = code.unwrap_or_else(|| {
        answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok)
    });
    crate::metrics::metrics().request(
        METRICS_SERVICE,
        method,
        crate::grpc::code_name(code),
        started.elapsed(),
    );
    answer
}

/// What the plugin's key `key_id`s begin with: `kms:NAME:vVERSION`.
const KEY_ID_PREFIX: &str = "kms:";

/// The associated data of every ciphertext the plugin makes and opens: a ciphertext made
/// through another front (without it) is not a seed, and the plugin opens only seeds, under
/// whatever key a `key_id` names. A grant bound to one associated data may name it.
pub(crate) const AAD: &[u8] = b"k8s.io/kms/v2";

/// The plugin: the service, the key it encrypts with, and its last passed key check.
#[derive(Debug)]
pub(crate) struct Plugin {
    service: Service,
    key: String,
    checked: Arc<Mutex<Option<Checked>>>,
    /// The uid the kernel reports for a process whose uid does not map into this user
    /// namespace (`/proc/sys/kernel/overflowuid`): shared by many, so no one's.
    overflow_uid: u32,
}

/// A key check that passed: on which keyring (a reseal makes a new one), which version,
/// when.
#[derive(Debug)]
struct Checked {
    keyring: Weak<Keyring>,
    version: u32,
    at: Instant,
}

impl Plugin {
    pub(crate) fn new(service: Service, key: String) -> Self {
        Self {
            service,
            key,
            checked: Arc::new(Mutex::new(None)),
            overflow_uid: std::fs::read_to_string("/proc/sys/kernel/overflowuid")
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(65534),
        }
    }

    /// A call of `op` by the process at the other end of the socket.
    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op, uid: &str) -> Call {
        let cred = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred);
        let process = cred.map_or_else(String::new, |c| {
            let pid = c.pid().map_or_else(|| "?".to_owned(), |p| p.to_string());
            format!("pid={pid} gid={}", c.gid())
        });
        Call::new(
            &self.service,
            Caller {
                identity: Arc::new(identity(cred.map(|c| c.uid()), self.overflow_uid)),
                peer: None,
                front: Front::Kubernetes,
            },
            op,
            Meta {
                request_id: crate::service::request_id(Some(uid)),
                input_bytes: req.get_ref().encoded_len() as u64,
                idempotency: Idempotency::None,
                answer_of: None,
                deadline: crate::grpc::deadline::of(req.metadata().as_ref()),
                recorded: None,
                counted: false,
            },
        )
        .peer_described(process)
    }
}

/// Who a process is, by the user id the kernel gives for it (`SO_PEERCRED`): `unix:uid=N`.
/// A process without credentials (never on Linux), or with the `overflow` uid (of another
/// user namespace, whose uid does not map into this one: many processes share it), is no
/// one: `unix:unknown`, refused `UNAUTHENTICATED` by `access::check` as a caller without a
/// certificate on a TLS listener is (`tls` is set for that rule, not because a handshake
/// happened).
pub(crate) fn identity(uid: Option<u32>, overflow: u32) -> Identity {
    match uid.filter(|u| *u != overflow) {
        Some(u) => Identity {
            principal: format!("unix:uid={u}"),
            authenticated: true,
            tls: false,
            not_after: None,
        },
        None => Identity {
            principal: "unix:unknown".to_owned(),
            authenticated: false,
            tls: true,
            not_after: None,
        },
    }
}

/// The `key_id` of a key version.
pub(crate) fn key_id(key: &str, version: u32) -> String {
    format!("{KEY_ID_PREFIX}{key}:v{version}")
}

/// The key and version a `key_id` names, if kms gave it (exactly as [`key_id`] writes it).
pub(crate) fn parse_key_id(key_id: &str) -> Option<(&str, u32)> {
    if key_id.len() > MAX_KEY_ID {
        return None;
    }
    let rest = key_id.strip_prefix(KEY_ID_PREFIX)?;
    let (key, version) = rest.rsplit_once(":v")?;
    crate::keyring::model::check_name(key).ok()?;
    let version: u32 = version.parse().ok().filter(|v| *v > 0)?;
    (self::key_id(key, version) == key_id).then_some((key, version))
}

/// Whether `s` is a fully qualified domain name as the apiserver checks annotation keys
/// (`IsFullyQualifiedDomainName`): two labels or more, each a lowercase RFC 1123 label,
/// 253 bytes at most.
pub(crate) fn is_fqdn(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    s.len() <= 253 && s.split('.').count() >= 2 && s.split('.').all(label)
}

/// The request's annotations, checked against the apiserver's rules (kms gives none, so
/// any there came from elsewhere: they are read by no one, but must be what the apiserver
/// could have stored).
fn check_annotations(
    annotations: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<(), KeyringError> {
    if annotations.keys().any(|k| !is_fqdn(k)) {
        return Err(KeyringError::BadRequest(
            "annotations: a key is not a fully qualified domain name",
        ));
    }
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ANNOTATIONS {
        return Err(KeyringError::BadRequest(
            "annotations: more than 32 KiB of keys and values",
        ));
    }
    Ok(())
}

/// What every call of the plugin is about, for the grant check: the plugin's seeds, whose
/// associated data is [`AAD`] (a grant bound to it answers Status, Encrypt and Decrypt).
/// The request itself travels in the work's closure.
struct Seeds;

impl Aad for Seeds {
    fn aads(&self) -> Vec<&[u8]> {
        vec![AAD]
    }
}

#[tonic::async_trait]
impl pb::key_management_service_server::KeyManagementService for Plugin {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let started = Instant::now();
        let call = self.call(&request, Op::CheckKey, "").key(&self.key);
        let current = self.service.seal.keyring().ok();
        let checked = Arc::clone(&self.checked);
        let key = self.key.clone();
        let answer =
            crate::service::with_keyring(&self.service, call, Seeds, move |k, _, Seeds| {
                let version = check(k, current.as_ref(), &key, &checked)?;
                Ok(Served::new(pb::StatusResponse {
                    version: VERSION.to_owned(),
                    healthz: "ok".to_owned(),
                    key_id: key_id(&key, version),
                })
                .version(version))
            })
            .await;
        match &answer.result {
            // The apiserver shows `healthz` on its own health endpoint: the reason kms is
            // not serving, for its operators. A caller refused the key learns nothing.
            Err(r)
                if !matches!(
                    r.kind,
                    ErrorKind::PermissionDenied
                        | ErrorKind::Unauthenticated
                        | ErrorKind::InvalidArgument
                ) =>
            {
                let code = crate::grpc::code_of(r.kind);
                let status = Ok(Response::new(pb::StatusResponse {
                    version: VERSION.to_owned(),
                    healthz: format!("{}: {}", r.reason, r.message),
                    key_id: String::new(),
                }));
                measured("Status", started, Some(code), status)
            }
            _ => measured("Status", started, None, crate::grpc::respond(answer)),
        }
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let started = Instant::now();
        let uid = request.get_ref().uid.clone();
        let call = self.call(&request, Op::Encrypt, &uid).key(&self.key);
        let key = self.key.clone();
        let mut r = request.into_inner();
        let answer = crate::grpc::respond(
            crate::service::with_keyring(&self.service, call, Seeds, move |k, _, Seeds| {
                let plaintext = Zeroizing::new(std::mem::take(&mut r.plaintext));
                if plaintext.len() > MAX_PLAINTEXT {
                    return Err(KeyringError::BadRequest(
                        "plaintext: too long for a ciphertext the apiserver stores (1 KiB)",
                    ));
                }
                let (ciphertext, version) = k.encrypt(&key, &plaintext, AAD)?;
                Ok(Served::new(pb::EncryptResponse {
                    ciphertext,
                    key_id: key_id(&key, version),
                    annotations: Default::default(),
                })
                .version(version))
            })
            .await,
        );
        measured("Encrypt", started, None, answer)
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let started = Instant::now();
        let r = request.get_ref();
        // The key the ciphertext was made with, as its key_id says: the configured key
        // may have changed since (the grant on that key is checked all the same).
        let named = parse_key_id(&r.key_id);
        let key = named.map_or_else(|| self.key.clone(), |(k, _)| k.to_owned());
        let uid = r.uid.clone();
        let call = self.call(&request, Op::Decrypt, &uid).key(&key);
        let r = request.into_inner();
        let answer = crate::grpc::respond(
            crate::service::with_keyring(&self.service, call, Seeds, move |k, _, Seeds| {
                let Some((_, version)) = parse_key_id(&r.key_id) else {
                    return Err(KeyringError::BadRequest(
                        "key_id: not one kms gave (kms:KEY:vVERSION, at most 1 KiB)",
                    ));
                };
                if r.ciphertext.is_empty() || r.ciphertext.len() > MAX_CIPHERTEXT {
                    return Err(KeyringError::BadRequest(
                        "ciphertext: 1 byte to 1 KiB, as the apiserver stores it",
                    ));
                }
                check_annotations(&r.annotations)?;
                let (mut plaintext, made_with) = k.decrypt(&key, &r.ciphertext, AAD)?;
                // A ciphertext of another version than its key_id says was not made as
                // the apiserver stored it.
                if made_with != version {
                    return Err(KeyringError::DecryptionFailed);
                }
                // Moved out, not copied (the answer itself is prost's, not zeroized).
                Ok(Served::new(pb::DecryptResponse {
                    plaintext: std::mem::take(&mut *plaintext),
                })
                .version(made_with))
            })
            .await,
        );
        measured("Decrypt", started, None, answer)
    }
}

/// The key's primary version, once a round trip through it worked: encrypts random bytes
/// and decrypts them, at most once every [`CHECK_FOR`] on one keyring (a check that
/// failed is tried again at the next call).
fn check(
    k: &Keyring,
    current: Option<&Arc<Keyring>>,
    key: &str,
    checked: &Mutex<Option<Checked>>,
) -> Result<u32, KeyringError> {
    let meta = k.get_key(key)?;
    let primary = meta.primary;
    let same_keyring = |w: &Weak<Keyring>| w.upgrade().is_some_and(|c| std::ptr::eq(&*c, k));
    // What is known without a round trip, checked at every call: the primary version is
    // enabled, and an HSM key's token answers.
    let usable = meta
        .version(primary)
        .is_some_and(|v| v.state == crate::keyring::model::VersionState::Enabled)
        && (meta.protection != crate::keyring::model::Protection::Hsm || k.hsm().is_available());
    if usable
        && let Ok(last) = checked.lock()
        && let Some(c) = last.as_ref()
        && c.version == primary
        && c.at.elapsed() < CHECK_FOR
        && same_keyring(&c.keyring)
    {
        return Ok(primary);
    }
    let mut probe = Zeroizing::new([0u8; 32]);
    getrandom::fill(probe.as_mut_slice()).map_err(|_| KeyringError::Randomness)?;
    let (ciphertext, version) = k.encrypt(key, probe.as_slice(), b"kms kubernetes key check")?;
    let (back, _) = k.decrypt(key, &ciphertext, b"kms kubernetes key check")?;
    if back.as_slice() != probe.as_slice() {
        return Err(KeyringError::Internal(
            "the key check's round trip did not give back what it encrypted",
        ));
    }
    if let (Ok(mut last), Some(current)) = (checked.lock(), current) {
        *last = Some(Checked {
            keyring: Arc::downgrade(current),
            version,
            at: Instant::now(),
        });
    }
    Ok(version)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_name_the_key_and_version_and_nothing_else_parses() {
        assert_eq!(key_id("k8s-secrets", 3), "kms:k8s-secrets:v3");
        assert_eq!(parse_key_id("kms:k8s-secrets:v3"), Some(("k8s-secrets", 3)));
        assert_eq!(parse_key_id("kms:a.b_c-d:v12"), Some(("a.b_c-d", 12)));
        for bad in [
            "",
            "kms:",
            "kms:k:v",
            "kms:k:v0",
            "kms:k:v-1",
            "kms:k:v1x",
            "kms::v1",
            "kms:a b:v1",
            "vault:k:v1",
            "kms:k:v99999999999",
            "kms:k:v01",
            "kms:k:v+1",
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad}");
        }
        let long = key_id(&"k".repeat(128), u32::MAX);
        assert!(long.len() <= MAX_KEY_ID);
    }

    #[test]
    fn annotation_keys_are_fully_qualified_names_within_32_kib() {
        for good in ["version.kms.example.com", "a.b", "x-1.y-2.", "kms.io"] {
            assert!(is_fqdn(good), "{good}");
        }
        for bad in [
            "",
            "kms",
            "Kms.io",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            &"a".repeat(64),
        ] {
            assert!(!is_fqdn(bad), "{bad}");
        }
        assert!(!is_fqdn(&format!("{}.io", "a.".repeat(126))));
        let mut a = std::collections::BTreeMap::new();
        a.insert("v.kms.io".to_owned(), vec![0; 100]);
        assert!(check_annotations(&a).is_ok());
        a.insert("big.kms.io".to_owned(), vec![0; MAX_ANNOTATIONS]);
        assert!(check_annotations(&a).is_err());
        let mut b = std::collections::BTreeMap::new();
        b.insert("not_a_name".to_owned(), vec![]);
        assert!(check_annotations(&b).is_err());
    }

    #[test]
    fn callers_are_named_by_their_uid() {
        let root = identity(Some(0), 65534);
        assert_eq!(root.principal, "unix:uid=0");
        assert!(root.authenticated && !root.tls);
        for no_one in [identity(None, 65534), identity(Some(65534), 65534)] {
            assert_eq!(no_one.principal, "unix:unknown");
            // Refused as a caller without a certificate is.
            assert!(matches!(
                crate::access::check(
                    crate::access::Need::Grant(crate::policy::Operation::Decrypt),
                    &no_one,
                    &crate::access::Roles::default(),
                    0
                ),
                Err(crate::access::Denied::Unauthenticated)
            ));
        }
    }
}
