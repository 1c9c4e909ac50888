//! The first day of an operator and of an application developer, end to end against the
//! real `kms` binary and a SoftHSM token: an init that cannot write its shares loses none;
//! a second init on a token says it found a master key; deadlines are answered
//! `DEADLINE_EXCEEDED`, saying whether the work began; retried changes are made once;
//! every error carries a machine-readable reason (read by tonic-types and by Python's
//! grpcio-status); the CLI's defaults.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_proto::v1::ProtectionLevel;
use serde_json::Value;
use softhsm_tests::{
    KeysClient, Mount, Out, Server, TestHsm, age_decrypt, age_identity, python, start_unsealed,
};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

fn status(server: &Server) -> Value {
    server.kms(&["operator", "status", "--json"], "").json()
}

fn initialized(server: &Server) -> bool {
    status(server)["initialized"].as_bool().unwrap()
}

/// `kms operator init` with shares sealed to `recipients`, written to `out_dir`.
fn init_into(server: &Server, recipients: &[String], out_dir: &Path) -> Out {
    let n = recipients.len().to_string();
    let mut args: Vec<String> = ["operator", "init", "--shares", &n, "--threshold", "2"]
        .map(str::to_owned)
        .to_vec();
    for r in recipients {
        args.extend(["--recipient".to_owned(), r.clone()]);
    }
    args.extend(["--out-dir".to_owned(), out_dir.display().to_string()]);
    server.kms(&args.iter().map(String::as_str).collect::<Vec<_>>(), "")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn an_init_that_cannot_write_its_shares_loses_none() {
    let hsm = TestHsm::new("kms-init-dirs");
    let server = hsm.start();
    let dir = hsm.path().to_owned();
    let ids: Vec<PathBuf> = (1..=3)
        .map(|i| dir.join(format!("custodian-{i}.key")))
        .collect();
    let recipients: Vec<String> = ids.iter().map(|p| age_identity(p)).collect();
    let refused_unasked = |out: &Out, what: &str| {
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains(what), "{out:?}");
        assert!(
            out.stderr
                .contains("nothing was done: the server was not asked to make shares"),
            "{out:?}"
        );
        assert!(!initialized(&server), "the server must not be initialised");
    };

    // A read-only file system: refused before the server is asked.
    let read_only = Mount::with_options(&dir.join("ro"), "ro,size=1m");
    let out = init_into(&server, &recipients, &read_only.path().join("shares"));
    refused_unasked(&out, "Read-only file system");

    // A full one: the same, and nothing is left behind.
    let full = Mount::tmpfs(&dir.join("full"), "256k");
    let full_shares = full.path().join("shares");
    std::fs::create_dir(&full_shares).unwrap();
    full.fill();
    let out = init_into(&server, &recipients, &full_shares);
    refused_unasked(&out, "No space left on device");
    assert!(
        entries(&full_shares).is_empty(),
        "{:?}",
        entries(&full_shares)
    );

    // A share file there already: refused by name, and kept as it was.
    let taken = dir.join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("share-2.age"), "an older share").unwrap();
    let out = init_into(&server, &recipients, &taken);
    refused_unasked(&out, "share-2.age already exists");
    assert_eq!(entries(&taken), ["share-2.age"]);
    assert_eq!(
        std::fs::read_to_string(taken.join("share-2.age")).unwrap(),
        "an older share"
    );

    // A directory that does not exist yet (as docs/ceremony.md runs it): made 0700, and
    // every share lands in it, readable by its custodian only.
    let fresh = dir.join("ceremony").join("shares");
    let out = init_into(&server, &recipients, &fresh);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(initialized(&server));
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(
        entries(&fresh),
        ["share-1.age", "share-2.age", "share-3.age"]
    );
    assert!(
        out.stdout.contains("Audit checkpoint key fingerprint: "),
        "{out:?}"
    );
    let shares: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let file = fresh.join(format!("share-{}.age", i + 1));
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            age_decrypt(id, &file).unwrap()
        })
        .collect();
    server.unseal_with(&[shares[2].clone(), shares[0].clone()]);
    assert_eq!(status(&server)["sealed"], false);

    // A share given to an unsealed server was not needed, and the CLI says so.
    let out = server.custodian(&["operator", "unseal"], &format!("{}\n", shares[1]));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("already unsealed: your share was not needed, and was not sent"),
        "{out:?}"
    );
}

#[test]
fn starting_over_on_the_same_token_says_it_found_a_master_key() {
    let hsm = TestHsm::new("kms-start-over");
    let mut server = hsm.start();
    let first = server.init(3, 2, "");
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(first.json()["master_key_reused"], false, "{first:?}");
    assert!(
        !first.stderr.contains("already held a master key"),
        "{first:?}"
    );
    server.terminate();

    // The shares are lost: the store is emptied, as docs/ceremony.md says.
    let store = hsm.path().join("kms.redb");
    std::fs::remove_file(&store).unwrap();
    let _ = std::fs::remove_file(hsm.path().join("kms.redb.id"));
    std::fs::remove_dir_all(hsm.path().join("kms.redb.audit")).unwrap();
    let server = hsm.start();
    let again = server.init(3, 2, "");
    assert_eq!(again.code, Some(0), "{again:?}");
    assert_eq!(again.json()["master_key_reused"], true, "{again:?}");
    assert!(
        again
            .stderr
            .contains("Note: the token already held a master key labelled"),
        "{again:?}"
    );
    assert!(
        hsm.logs()
            .contains("init found a master key already in the token"),
        "{}",
        hsm.logs()
    );
    server.unseal_with(&again.shares());
    assert_eq!(status(&server)["sealed"], false);
}

/// A call with the caller's own request id and a deadline, sent as raw HTTP/2: tonic's
/// client would give up by itself at the deadline (and say `CANCELLED`), hiding the
/// server's answer, which is what these tests are about. The answer: the decoded response,
/// or the status; and the request id the answer carries.
async fn call_with_deadline<R: prost::Message + Default>(
    server: &Server,
    path: &str,
    message: &impl prost::Message,
    id: &str,
    idempotency_key: Option<&str>,
    timeout: Duration,
) -> (Result<R, Status>, String) {
    let mut headers = vec![
        ("x-request-id", id.to_owned()),
        ("grpc-timeout", format!("{}u", timeout.as_micros())),
    ];
    if let Some(key) = idempotency_key {
        headers.push(("idempotency-key", key.to_owned()));
    }
    let (meta, body) = softhsm_tests::raw_unary(
        server,
        &server.admin,
        path,
        message.encode_to_vec(),
        &headers,
    )
    .await;
    let request_id = meta
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let status = Status::from_header_map(&meta).unwrap_or_else(|| panic!("no status: {meta:?}"));
    if status.code() != Code::Ok {
        return (Err(status), request_id);
    }
    assert!(body.len() >= 5, "{body:?}");
    (Ok(R::decode(&body[5..]).unwrap()), request_id)
}

/// `msg` with the caller's own request id.
fn with_request_id<T>(msg: T, id: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("x-request-id", id.parse().unwrap());
    r
}

/// `msg` with an idempotency key, and a request id of its own for each attempt
/// (`KEY.N`), so that the audit log tells the attempts apart.
fn with_key<T>(msg: T, key: &str) -> Request<T> {
    static ATTEMPT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    with_request_id_and_key(msg, &format!("{key}.{n}"), key)
}

/// The records of the attempts `with_key` made with `key`, in order.
fn attempts<'a>(records: &'a [Value], key: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|e| {
            e["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with(&format!("{key}.")))
        })
        .collect()
}

/// Whether an answer says it is a first attempt's (an idempotent retry).
fn replayed(meta: &tonic::metadata::MetadataMap) -> bool {
    meta.get("idempotent-replayed")
        .is_some_and(|v| v.to_str().unwrap() == "true")
}

/// The `google.rpc.ErrorInfo` reason of an error (its domain checked).
fn reason(s: &Status) -> String {
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {s:?}"));
    assert_eq!(info.domain, "kms", "{s:?}");
    info.reason
}

fn request_id_of(meta: &tonic::metadata::MetadataMap) -> String {
    meta.get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id in {meta:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

async fn get_key(c: &mut KeysClient, name: &str) -> pb::Key {
    c.get_key(pb::GetKeyRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The audit records, exported by the auditor (the export verified first).
fn audit_records(server: &Server) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.jsonl");
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", path.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an export is as private as a backup");
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("event").is_some())
        .map(|v| v["event"].clone())
        .collect()
}

fn records_of<'a>(records: &'a [Value], request_id: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|e| e["request_id"] == request_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_answered_deadline_exceeded_saying_whether_the_work_began() {
    let hsm = TestHsm::new("kms-deadlines");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    server
        .create_aes_key("rotated", ProtectionLevel::Software)
        .await;
    let mut c = server.keys().await;
    let before = get_key(&mut c, "rotated").await.versions.len();

    // As the developer saw it: RotateKey with deadlines of 0.1-0.5 ms (and some of a few
    // ms, which may be met).
    let mut ok = Vec::new();
    let mut not_begun = Vec::new();
    let mut maybe = Vec::new();
    let rotate = pb::RotateKeyRequest {
        name: "rotated".into(),
    };
    for i in 0..60u64 {
        let id = format!("deadline-{i}");
        let micros = if i % 3 == 2 {
            1000 * (i % 7 + 1)
        } else {
            100 * (i % 5 + 1)
        };
        let (answer, answered_id) = call_with_deadline::<pb::Key>(
            &server,
            "/kms.v1.KeyManagement/RotateKey",
            &rotate,
            &id,
            None,
            Duration::from_micros(micros),
        )
        .await;
        assert_eq!(answered_id, id);
        match answer {
            Ok(_) => ok.push(id),
            Err(s) => {
                assert_eq!(s.code(), Code::DeadlineExceeded, "never CANCELLED: {s:?}");
                assert_eq!(reason(&s), "DEADLINE_EXCEEDED");
                if s.message().contains("before it began: nothing was done") {
                    not_begun.push(id);
                } else {
                    assert!(s.message().contains("it may have completed"), "{s:?}");
                    maybe.push(id);
                }
            }
        }
    }
    eprintln!(
        "60 RotateKey with deadlines: {} OK, {} not begun, {} may have completed",
        ok.len(),
        not_begun.len(),
        maybe.len()
    );
    assert!(
        not_begun.len() >= 40,
        "a deadline under a millisecond is exceeded before the work begins: {} of 60",
        not_begun.len()
    );
    let records = audit_records(&server);
    // What was said not to have begun did nothing: its one record says so.
    for id in &not_begun {
        let r = records_of(&records, id);
        assert_eq!(r.len(), 1, "{id}: {r:?}");
        assert_eq!(r[0]["outcome"], "DEADLINE_EXCEEDED", "{id}: {r:?}");
    }
    // Every rotation made is an OK record, of an answer that was OK or "may have
    // completed".
    let rotated: Vec<&str> = records
        .iter()
        .filter(|e| e["operation"] == "RotateKey" && e["outcome"] == "OK")
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    for id in &ok {
        assert!(rotated.contains(&id.as_str()), "{id}");
    }
    for id in &rotated {
        assert!(
            ok.iter().chain(&maybe).any(|o| o == id),
            "{id} rotated but was answered 'nothing was done'"
        );
    }
    let after = get_key(&mut c, "rotated").await.versions.len();
    assert_eq!(after - before, rotated.len());

    // A call that is still working when its deadline passes: an HSM RSA-4096 key takes
    // SoftHSM far longer than 50 ms to make.
    let create = pb::CreateKeyRequest {
        name: "slow".into(),
        algorithm: pb::Algorithm::RsaSignPss4096Sha256 as i32,
        protection_level: ProtectionLevel::Hsm as i32,
        ..Default::default()
    };
    let (answer, answered_id) = call_with_deadline::<pb::Key>(
        &server,
        "/kms.v1.KeyManagement/CreateKey",
        &create,
        "make-slow-1",
        Some("make-slow"),
        Duration::from_millis(50),
    )
    .await;
    let s = answer.unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(
        s.message().contains("while it ran: it may have completed"),
        "{s:?}"
    );
    assert_eq!(answered_id, "make-slow-1");
    // It completed.
    let made = loop {
        match c
            .get_key(pb::GetKeyRequest {
                name: "slow".into(),
            })
            .await
        {
            Ok(k) => break k.into_inner(),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // The retry with the same idempotency key is answered from the first attempt: the
    // same key, not ALREADY_EXISTS, and nothing is made again.
    let again = c
        .create_key(with_request_id_and_key(
            create.clone(),
            "make-slow-2",
            "make-slow",
        ))
        .await
        .unwrap();
    assert!(replayed(again.metadata()));
    assert_eq!(again.into_inner(), made);
    // A new idempotency key is a new request.
    let s = c
        .create_key(with_key(create, "make-slow-other"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    assert_eq!(reason(&s), "KEY_EXISTS");
    let records = audit_records(&server);
    let first = records_of(&records, "make-slow-1");
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["outcome"], "OK");
    assert!(first[0].get("replay_of").is_none(), "{first:?}");
    let retry = records_of(&records, "make-slow-2");
    assert_eq!(retry.len(), 1, "{retry:?}");
    assert_eq!(retry[0]["outcome"], "OK");
    assert_eq!(retry[0]["replay_of"], "make-slow-1", "{retry:?}");
}

/// `msg` with the request id `id` and the idempotency key `key`.
fn with_request_id_and_key<T>(msg: T, id: &str, key: &str) -> Request<T> {
    let mut r = with_request_id(msg, id);
    r.metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    r
}

/// Sends `request` to `client.method` twice with the idempotency key `key`: the second
/// answer must be the first's, and say so. The first answer.
macro_rules! twice {
    ($client:ident . $method:ident ( $request:expr ), $key:expr) => {{
        let request = $request;
        let first = $client
            .$method(with_key(request.clone(), $key))
            .await
            .unwrap();
        assert!(!replayed(first.metadata()), "{}", $key);
        let second = $client.$method(with_key(request, $key)).await.unwrap();
        assert!(replayed(second.metadata()), "{}", $key);
        let first = first.into_inner();
        assert_eq!(first, second.into_inner(), "{}", $key);
        first
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_changes_are_made_once() {
    let hsm = TestHsm::new("kms-retries");
    let config = hsm.config();
    let (mut server, shares) = start_unsealed(&hsm, &config);
    let mut c = server.keys().await;
    let mut a = server.access().await;

    // CreateKey, twice with one idempotency key: one key, the same answer, and the second
    // says it is the first's.
    let create = pb::CreateKeyRequest {
        name: "retried".into(),
        algorithm: pb::Algorithm::Aes256Gcm as i32,
        ..Default::default()
    };
    let first = c
        .create_key(with_key(create.clone(), "create-1"))
        .await
        .unwrap();
    assert!(!replayed(first.metadata()));
    let second = c
        .create_key(with_key(create.clone(), "create-1"))
        .await
        .unwrap();
    assert!(replayed(second.metadata()));
    assert_eq!(first.into_inner(), second.into_inner());
    // A key that is not a token is refused, not ignored.
    let mut bad = Request::new(create.clone());
    bad.metadata_mut()
        .insert("idempotency-key", "not a key!".parse().unwrap());
    let s = c.create_key(bad).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(reason(&s), "INVALID_IDEMPOTENCY_KEY");
    // The same x-request-id on two different changes (a mesh passing one id on to every
    // call) is no idempotency key: both are made.
    let other = pb::CreateKeyRequest {
        name: "retried-other".into(),
        ..create.clone()
    };
    c.create_key(with_request_id(other.clone(), "mesh-id"))
        .await
        .unwrap();
    c.rotate_key(with_request_id(
        pb::RotateKeyRequest {
            name: "retried-other".into(),
        },
        "mesh-id",
    ))
    .await
    .unwrap();
    assert_eq!(get_key(&mut c, "retried-other").await.versions.len(), 2);

    // RotateKey, twice: one new version; both answers name it.
    let rotate = || {
        with_key(
            pb::RotateKeyRequest {
                name: "retried".into(),
            },
            "rotate-1",
        )
    };
    let r1 = c.rotate_key(rotate()).await.unwrap().into_inner();
    let r2 = c.rotate_key(rotate()).await.unwrap().into_inner();
    assert_eq!(r1, r2);
    assert_eq!(r1.primary_version, 2);
    assert_eq!(get_key(&mut c, "retried").await.versions.len(), 2);

    // Eight attempts in flight at once: one rotation.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.rotate_key(with_key(
                pb::RotateKeyRequest {
                    name: "retried".into(),
                },
                "rotate-together",
            ))
            .await
            .map(tonic::Response::into_inner)
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    assert!(answers.iter().all(|k| *k == answers[0]), "{answers:?}");
    assert_eq!(answers[0].primary_version, 3);
    assert_eq!(get_key(&mut c, "retried").await.versions.len(), 3);

    // UpdateKey and the version state changes, twice each.
    let update = pb::UpdateKeyRequest {
        name: "retried".into(),
        labels: [("team".to_owned(), "payments".to_owned())].into(),
        update_labels: true,
        ..Default::default()
    };
    twice!(c.update_key(update), "update-1");
    let version = |v: u32| pb::KeyVersionRequest {
        name: "retried".into(),
        version: v,
    };
    twice!(c.disable_key_version(version(1)), "disable-1");
    let schedule = pb::ScheduleKeyVersionDestructionRequest {
        name: "retried".into(),
        version: 1,
        ..Default::default()
    };
    twice!(c.schedule_key_version_destruction(schedule), "destroy-1");
    twice!(c.cancel_key_version_destruction(version(1)), "cancel-1");
    twice!(c.enable_key_version(version(1)), "enable-1");

    // CreateGrant and RevokeGrant, twice each: one grant.
    let grant = pb::CreateGrantRequest {
        key: "retried".into(),
        principal: "spiffe://corp.example/app".into(),
        operations: vec![pb::Operation::Encrypt as i32],
        associated_data: None,
    };
    let made = twice!(a.create_grant(grant.clone()), "grant-1");
    let live = a
        .list_grants(pb::ListGrantsRequest {
            key: "retried".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(live.len(), 1, "{live:?}");
    twice!(
        a.revoke_grant(pb::RevokeGrantRequest {
            id: made.id.clone()
        }),
        "revoke-1"
    );

    // The same id for another request is refused, and nothing is done.
    let other = pb::CreateGrantRequest {
        principal: "spiffe://corp.example/other".into(),
        ..grant.clone()
    };
    let s = a
        .create_grant(with_key(other, "grant-1"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(reason(&s), "IDEMPOTENCY_KEY_REUSED");
    let s = c
        .rotate_key(with_key(
            pb::RotateKeyRequest {
                name: "retried".into(),
            },
            "create-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&s), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(get_key(&mut c, "retried").await.versions.len(), 3);
    // Without an id of the caller's own, every call is a new one.
    c.rotate_key(pb::RotateKeyRequest {
        name: "retried".into(),
    })
    .await
    .unwrap();
    c.rotate_key(pb::RotateKeyRequest {
        name: "retried".into(),
    })
    .await
    .unwrap();
    assert_eq!(get_key(&mut c, "retried").await.versions.len(), 5);

    // The audit log: each retry is recorded, naming the attempt that made the change.
    let records = audit_records(&server);
    for id in [
        "create-1",
        "rotate-1",
        "update-1",
        "disable-1",
        "destroy-1",
        "cancel-1",
        "enable-1",
        "grant-1",
        "revoke-1",
    ] {
        let r: Vec<&Value> = attempts(&records, id)
            .into_iter()
            .filter(|e| e["outcome"] == "OK")
            .collect();
        assert_eq!(r.len(), 2, "{id}: {r:?}");
        assert!(r[0].get("replay_of").is_none(), "{id}: {r:?}");
        assert_eq!(r[1]["replay_of"], r[0]["request_id"], "{id}: {r:?}");
    }
    let together: Vec<&Value> = attempts(&records, "rotate-together");
    assert_eq!(together.len(), 8);
    let made: Vec<&&Value> = together
        .iter()
        .filter(|e| e.get("replay_of").is_none())
        .collect();
    assert_eq!(made.len(), 1, "{together:?}");
    for e in &together {
        assert!(
            e.get("replay_of").is_none() || e["replay_of"] == made[0]["request_id"],
            "{e}"
        );
    }

    // Records with `replay_of` hash as docs/audit.md says: the independent verifier agrees.
    softhsm_tests::audit_export_verifies_independently(&server, &hsm, "retries.jsonl");

    // The first answer is durable with the change: after kill -9, a retry still finds it.
    let r3 = c
        .rotate_key(with_key(
            pb::RotateKeyRequest {
                name: "retried".into(),
            },
            "rotate-before-crash",
        ))
        .await
        .unwrap()
        .into_inner();
    server.kill9();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    let r4 = c
        .rotate_key(with_key(
            pb::RotateKeyRequest {
                name: "retried".into(),
            },
            "rotate-before-crash",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r3, r4);
    assert_eq!(get_key(&mut c, "retried").await.versions.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_carries_a_reason_and_the_request_id() {
    let hsm = TestHsm::new("kms-reasons");
    let (server, shares) = start_unsealed(&hsm, &hsm.config());
    server
        .create_aes_key("payments", ProtectionLevel::Software)
        .await;
    let app = hsm
        .pki
        .client("app", &softhsm_tests::ClientSpec::spiffe("no-grant"));
    let mut stranger = server.keys_as(Some(&app)).await;
    let encrypt = |key: &str| pb::EncryptRequest {
        key: key.into(),
        plaintext: b"x".to_vec(),
        ..Default::default()
    };
    // No grant, and no such key: told apart by neither code nor reason.
    for key in ["payments", "no-such-key"] {
        let s = stranger.encrypt(encrypt(key)).await.unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert_eq!(reason(&s), "NO_GRANT");
        assert_eq!(request_id_of(s.metadata()).len(), 32, "a server-made id");
    }
    // A request id that is not a sane token is replaced, and the answer says by what.
    let mut c = server.keys().await;
    let mut req = Request::new(encrypt("payments"));
    req.metadata_mut()
        .insert("x-request-id", "not a token!".parse().unwrap());
    let ok = c.encrypt(req).await.unwrap();
    let given = request_id_of(ok.metadata());
    assert_eq!(given.len(), 32, "{given}");
    // A request tonic refuses before any handler (too large) has both too.
    let mut big = c.clone().max_encoding_message_size(64 << 20);
    let s = big
        .encrypt(pb::EncryptRequest {
            key: "payments".into(),
            plaintext: vec![0; 17 << 20],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{s:?}"
    );
    assert_eq!(reason(&s), "REQUEST_TOO_LARGE");
    assert_eq!(request_id_of(s.metadata()).len(), 32);

    // Sealed: UNAVAILABLE (standard retry policies retry it), reason SEALED.
    let out = server.kms(&["operator", "seal"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let s = c
        .encrypt(with_request_id(encrypt("payments"), "while-sealed"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(reason(&s), "SEALED");
    assert_eq!(request_id_of(s.metadata()), "while-sealed");
    // ... as a Python client reads it, with grpcio-status.
    let seen = python_reads_the_reason(&server);
    assert_eq!(seen["code"], "UNAVAILABLE", "{seen}");
    assert_eq!(seen["reason"], "SEALED", "{seen}");
    assert_eq!(seen["domain"], "kms", "{seen}");
    assert_eq!(seen["request_id"], "python-1", "{seen}");
    // A sealed server refusing calls is not an error in its log.
    assert!(
        !hsm.logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("sealed")),
        "{}",
        hsm.logs()
    );
    server.unseal_with(&shares);
}

const PY_REASON: &str = r#"
import json, sys
import grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
sys.path.insert(0, sys.argv[1])
from kms.v1 import keys_pb2, keys_pb2_grpc
addr, ca, cert, key = sys.argv[2:6]
read = lambda p: open(p, "rb").read()
creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
stub = keys_pb2_grpc.KeyManagementStub(grpc.secure_channel(addr, creds))
try:
    stub.Encrypt(keys_pb2.EncryptRequest(key="payments", plaintext=b"x"), timeout=10,
                 metadata=[("x-request-id", "python-1")])
    print(json.dumps({"code": "OK"}))
except grpc.RpcError as e:
    info = error_details_pb2.ErrorInfo()
    status = rpc_status.from_call(e)
    status.details[0].Unpack(info)
    trailers = dict(e.trailing_metadata())
    print(json.dumps({"code": e.code().name, "reason": info.reason, "domain": info.domain,
                      "request_id": trailers.get("x-request-id")}))
"#;

/// A Python client generated from our .proto files calls `Encrypt` and reads the error's
/// reason with grpcio-status.
fn python_reads_the_reason(server: &Server) -> Value {
    let python = python();
    let stubs = tempfile::tempdir().unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let made = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg(proto.join("kms/v1/keys.proto"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let out = Command::new(&python)
        .args(["-c", PY_REASON])
        .arg(stubs.path())
        .arg(server.addr.trim_start_matches("https://"))
        .arg(&server.ca)
        .arg(&server.admin.cert)
        .arg(&server.admin.key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_cli_defaults_a_missing_port_and_names_what_it_refuses() {
    let hsm = TestHsm::new("kms-cli-defaults");
    let mut server = hsm.start();
    // `KMS_ADDR=127.0.0.1` dials port 8200, not https's 443.
    let out =
        softhsm_tests::run_kms_tls("127.0.0.1", &server.ca, None, &["operator", "status"], "");
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("https://127.0.0.1:8200"), "{out:?}");
    assert!(!out.stderr.contains(":443"), "{out:?}");

    // A restore into a store that is not empty names the store.
    let out = server.init(3, 2, "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let fingerprint = out.json()["audit_key_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let backup = hsm.path().join("kms.backup");
    let made = server.kms(&["backup", "create", "--out", backup.to_str().unwrap()], "");
    assert_eq!(made.code, Some(0), "{made:?}");
    server.terminate();
    let out = Command::new(softhsm_tests::bin("kms"))
        .args(["backup", "restore", "--in"])
        .arg(&backup)
        .arg("--config")
        .arg(hsm.config())
        .args(["--public-key", &fingerprint])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let store = hsm.path().join("kms.redb");
    assert!(
        stderr.contains(&format!("the redb file {}", store.display()))
            && stderr.contains("is not empty")
            && stderr.contains("nothing was restored"),
        "{stderr}"
    );
}

/// Where `principal`'s first answer to a change with `idempotency_key` is stored (as kms::keyring::requests
/// names it).
fn record_key(principal: &str, idempotency_key: &str) -> String {
    use sha2::Digest as _;
    let hex = data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(principal.as_bytes()));
    format!("{}/{idempotency_key}", &hex[..32])
}

/// A store writer cannot make a change answer from a record it wrote instead of being made:
/// a first answer moved to another idempotency key, or made up, is refused `DATA_LOSS` and
/// nothing is done; the genuine one still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_answer_written_by_someone_else_is_refused_not_replayed() {
    let hsm = TestHsm::new("kms-retry-forged");
    let config = hsm.config();
    let (mut server, shares) = start_unsealed(&hsm, &config);
    server
        .create_aes_key("forged", ProtectionLevel::Software)
        .await;
    let rotate = |id: &str| {
        with_key(
            pb::RotateKeyRequest {
                name: "forged".into(),
            },
            id,
        )
    };
    let mut c = server.keys().await;
    let first = c.rotate_key(rotate("made")).await.unwrap().into_inner();
    assert_eq!(first.primary_version, 2);
    let admin = server.admin.principal.clone();
    server.terminate();

    let store = hsm.path().join("kms.redb");
    let genuine = softhsm_tests::store_get(&store, "requests", &record_key(&admin, "made"));
    softhsm_tests::store_put(&store, "requests", &record_key(&admin, "moved"), &genuine);
    softhsm_tests::store_put(
        &store,
        "requests",
        &record_key(&admin, "made-up"),
        br#"{"record":"{}","mac":"00"}"#,
    );
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = server.keys().await;
    for id in ["moved", "made-up"] {
        let s = c.rotate_key(rotate(id)).await.unwrap_err();
        assert_eq!(s.code(), Code::DataLoss, "{id}: {s:?}");
        assert_eq!(reason(&s), "STORE_TAMPERED", "{id}");
    }
    assert_eq!(get_key(&mut c, "forged").await.versions.len(), 2);
    let again = c.rotate_key(rotate("made")).await.unwrap().into_inner();
    assert_eq!(again, first);
    assert_eq!(get_key(&mut c, "forged").await.versions.len(), 2);
}

/// A call whose deadline passes before it begins did nothing, but is recorded: it counts
/// as a refused call of its caller, so that a caller cannot have such records written past
/// `refused_calls_per_minute`. Init, which hands out shares once, refuses a deadline that
/// leaves it less than 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_calls_count_as_refused_and_init_needs_time_before_its_deadline() {
    let hsm = TestHsm::new("kms-deadline-limit");
    let tables = hsm.tls_tables().replace(
        "refused_calls_per_minute = 100000",
        "refused_calls_per_minute = 5",
    );
    assert!(tables.contains("refused_calls_per_minute = 5"));
    let config = hsm.config_full("limited.toml", &hsm.hsm_table(), &tables);
    let server = hsm.try_start(&config, &[]).unwrap();

    let init = pb::InitRequest {
        shares: 3,
        threshold: 2,
        ..Default::default()
    };
    let (answer, _) = call_with_deadline::<pb::InitResponse>(
        &server,
        "/kms.v1.System/Init",
        &init,
        "init-in-a-hurry",
        None,
        Duration::from_secs(5),
    )
    .await;
    let s = answer.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(reason(&s), "DEADLINE_TOO_SHORT");
    assert!(s.message().contains("nothing was done"), "{s:?}");
    assert!(!initialized(&server));
    let (answer, _) = call_with_deadline::<pb::InitResponse>(
        &server,
        "/kms.v1.System/Init",
        &init,
        "init-with-time",
        None,
        Duration::from_secs(60),
    )
    .await;
    let shares = answer.unwrap().shares;
    assert_eq!(shares.len(), 3);
    server.unseal_with(&shares);
    server
        .create_aes_key("limited", ProtectionLevel::Software)
        .await;

    let rotate = pb::RotateKeyRequest {
        name: "limited".into(),
    };
    let mut limited_at = None;
    for i in 0..10 {
        let (answer, _) = call_with_deadline::<pb::Key>(
            &server,
            "/kms.v1.KeyManagement/RotateKey",
            &rotate,
            &format!("hurried-{i}"),
            None,
            Duration::from_micros(100),
        )
        .await;
        let s = answer.unwrap_err();
        if s.code() == Code::ResourceExhausted {
            assert_eq!(reason(&s), "TOO_MANY_REFUSED_CALLS");
            limited_at = Some(i);
            break;
        }
        assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
        assert!(s.message().contains("nothing was done"), "{s:?}");
    }
    let limited_at = limited_at.expect("the refused-calls limit must engage");
    assert!((5..=6).contains(&limited_at), "{limited_at}");
    // Past the limit, the caller's other calls are refused unread too.
    let mut c = server.keys().await;
    let s = c
        .get_key(pb::GetKeyRequest {
            name: "limited".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
}
