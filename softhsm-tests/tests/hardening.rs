//! What an outside review and a stranger's attacks found, each tried again against a real
//! server over real TLS: a flood of oversized names from callers without a certificate,
//! oversized and malformed requests, refused calls from one address, idle connections
//! that hold the handshake slots, and connections that outlive a removed CA. Strangers
//! connect from 127.0.0.2, the harness's own clients from 127.0.0.1, so that per-address
//! limits can be told apart from global ones.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_proto::v1::system_client::SystemClient;
use softhsm_tests::{ClientSpec, Pki, Server, TestHsm, start_unsealed, try_channel_from};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

const STRANGER: &str = "127.0.0.2";

fn stranger_ip() -> Option<IpAddr> {
    Some(STRANGER.parse().unwrap())
}

fn socket_addr(server: &Server) -> SocketAddr {
    server.addr.trim_start_matches("https://").parse().unwrap()
}

/// Sends `msg` to `path`, whatever the method's own request type: a client that does not
/// play by the .proto.
async fn raw<M: prost::Message + Default + Send + Sync + 'static>(
    ch: Channel,
    path: &'static str,
    msg: M,
) -> Result<pb::SealStatus, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(msg),
        PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<M, pb::SealStatus>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The audit export's records (not the header or checkpoints), as JSON.
fn records(server: &Server, hsm: &TestHsm) -> Vec<serde_json::Value> {
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{}", &out.stderr);
    out.stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"].is_object())
        .collect()
}

/// The review's attack: twenty `Encrypt` calls with no client certificate and a 4 MiB key
/// name grew the server log by 84 MB, and one made `kms audit report` fail for every
/// auditor (`OUT_OF_RANGE: decoded message length too large`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_flood_the_log_or_blind_the_auditors() {
    let hsm = TestHsm::new("kms-flood");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let log_before = hsm.logs().len();
    let store_before = std::fs::metadata(hsm.path().join("kms.redb"))
        .unwrap()
        .len();
    let huge = "a".repeat(4 * 1024 * 1024);

    let encrypt_huge = |ch: Channel| {
        let key = huge.clone();
        async move {
            KeyManagementClient::new(ch)
                .max_encoding_message_size(usize::MAX)
                .encrypt(pb::EncryptRequest {
                    key,
                    plaintext: b"x".to_vec(),
                    associated_data: Vec::new(),
                })
                .await
                .unwrap_err()
        }
    };
    let anonymous = server.channel(None).await;
    for _ in 0..20 {
        let e = encrypt_huge(anonymous.clone()).await;
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    // An authenticated caller's invalid name is refused too, and recorded by size only.
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let e = encrypt_huge(server.channel(Some(&app)).await).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("key name"), "{e:?}");
    assert!(e.message().len() < 512, "{}", e.message().len());

    let grown = hsm.logs().len() - log_before;
    assert!(grown < 64 * 1024, "the log grew by {grown} bytes");
    assert!(!hsm.logs().contains(&"a".repeat(1000)));
    let store_grown = std::fs::metadata(hsm.path().join("kms.redb"))
        .unwrap()
        .len()
        - store_before;
    assert!(
        store_grown < 4 * 1024 * 1024,
        "the store grew by {store_grown} bytes"
    );

    // Every call is recorded, bounded.
    let recs = records(&server, &hsm);
    let strangers: Vec<_> = recs
        .iter()
        .filter(|r| r["event"]["principal"] == "anonymous" && r["event"]["operation"] == "Encrypt")
        .collect();
    assert_eq!(strangers.len(), 20);
    assert!(
        strangers
            .iter()
            .all(|r| r["event"]["outcome"] == "UNAUTHENTICATED")
    );
    let invalid = recs
        .iter()
        .find(|r| r["event"]["principal"] == app.principal.as_str())
        .unwrap();
    assert_eq!(invalid["event"]["key"], "<invalid name, 4194304 bytes>");
    assert_eq!(invalid["event"]["outcome"], "INVALID_ARGUMENT");
    for r in &recs {
        assert!(r.to_string().len() < 4096, "{r}");
    }
    // The auditors still get their report, in every format.
    for format in ["table", "json", "csv", "html"] {
        let out = server.kms_as(
            Some(&hsm.auditor),
            &["audit", "report", "--format", format],
            "",
        );
        assert_eq!(out.code, Some(0), "{format}: {}", out.stderr);
    }
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_send_little_and_their_refused_calls_are_limited_per_address() {
    let hsm = TestHsm::new("kms-limits");
    let tables = hsm.tls_tables().replace(
        "refused_calls_per_minute = 100000",
        "refused_calls_per_minute = 10\nanonymous_max_request_bytes = 4096",
    );
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &tables);
    let (server, _shares) = start_unsealed(&hsm, &config);

    // Without a certificate, Status is open, but only for small requests (extra bytes a
    // real client never sends are unknown fields to the server).
    let anonymous = server.channel(None).await;
    let small = raw(
        anonymous.clone(),
        "/kms.v1.System/Status",
        pb::EncryptRequest {
            plaintext: vec![7; 1024],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(small.initialized);
    let e = raw(
        anonymous.clone(),
        "/kms.v1.System/Status",
        pb::EncryptRequest {
            plaintext: vec![7; 64 * 1024],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limited to 4096 bytes"), "{e:?}");

    // A stranger at another address: 10 refusals, then refused unread.
    let stranger = try_channel_from(&server.addr, &server.ca, None, stranger_ip())
        .await
        .unwrap();
    let mut codes = Vec::new();
    for _ in 0..30 {
        let e = KeyManagementClient::new(stranger.clone())
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err();
        codes.push(e.code());
    }
    assert!(
        codes[..10].iter().all(|c| *c == Code::Unauthenticated),
        "{codes:?}"
    );
    assert!(
        codes[10..].iter().all(|c| *c == Code::ResourceExhausted),
        "{codes:?}"
    );
    // Status too, from that address, for the rest of the minute.
    let e = SystemClient::new(stranger)
        .status(pb::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // The harness's clients, at 127.0.0.1, are not affected.
    let mut admin = server.keys().await;
    admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();

    // Recorded: the 10 refusals and the first call the limit refused; the rest counted.
    let recs = records(&server, &hsm);
    let from_stranger: Vec<_> = recs
        .iter()
        .filter(|r| {
            r["event"]["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(&format!("{STRANGER}:")))
        })
        .collect();
    let count = |outcome: &str| {
        from_stranger
            .iter()
            .filter(|r| r["event"]["outcome"] == outcome)
            .count()
    };
    assert_eq!(count("UNAUTHENTICATED"), 10, "{from_stranger:?}");
    assert_eq!(count("RESOURCE_EXHAUSTED"), 1, "{from_stranger:?}");
    assert_eq!(from_stranger.len(), 11);
    // The oversized anonymous Status (refused before a handler ran) is recorded too.
    assert!(recs.iter().any(|r| r["event"]["operation"] == "Status"
        && r["event"]["outcome"] == "RESOURCE_EXHAUSTED"
        && r["event"]["principal"] == "anonymous"));
}

/// Calls tonic itself refuses (unknown method, a body that does not decode, a message over
/// the size limit) never reach a handler; they are recorded all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_any_handler_are_recorded() {
    let hsm = TestHsm::new("kms-unhandled");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let admin = server.channel(Some(&hsm.admin)).await;
    let e = raw(
        admin.clone(),
        "/kms.v1.KeyManagement/Exfiltrate",
        pb::StatusRequest {},
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // EncryptRequest's field 2 is bytes where CreateKeyRequest's is an enum: it does not
    // decode.
    let e = raw(
        admin.clone(),
        "/kms.v1.KeyManagement/CreateKey",
        pb::EncryptRequest {
            key: "k".into(),
            plaintext: b"not an algorithm".to_vec(),
            associated_data: Vec::new(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    // Over the 4 MiB default of the System service.
    let e = raw(
        admin,
        "/kms.v1.System/Status",
        pb::EncryptRequest {
            plaintext: vec![0; 5 * 1024 * 1024],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    let recs = records(&server, &hsm);
    let admin_said = |op: &str, outcome: &str| {
        recs.iter().any(|r| {
            r["event"]["principal"] == hsm.admin.principal.as_str()
                && r["event"]["operation"] == op
                && r["event"]["outcome"] == outcome
        })
    };
    assert!(admin_said("Exfiltrate", "UNIMPLEMENTED"), "{recs:?}");
    assert!(admin_said("CreateKey", "INTERNAL"), "{recs:?}");
    assert!(admin_said("Status", "OUT_OF_RANGE"), "{recs:?}");
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// The review's attack: a few dozen idle TCP connections stalled every new client (the
/// handshake slots were taken before `accept`, and a handshake could take 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_stall_new_clients() {
    let hsm = TestHsm::new("kms-idle");
    let tables = format!("{}handshake_timeout_seconds = 2\n", hsm.tls_tables());
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &tables);
    let server = hsm.try_start(&config, &[]).unwrap();
    let target = socket_addr(&server);
    let mut idle = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(STRANGER.parse().unwrap(), 0))
            .unwrap();
        idle.push(socket.connect(target).await.unwrap());
    }
    // A new client at another address gets its answer at once.
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        let ch = server.channel(Some(&hsm.admin)).await;
        SystemClient::new(ch).status(pb::StatusRequest {}).await
    })
    .await
    .expect("a new client waited behind idle connections")
    .unwrap();
    assert!(!status.into_inner().initialized);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The idle connections are closed: those over the per-address limit at once, the
    // others when the handshake timeout (2 s) ends.
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        use tokio::io::AsyncReadExt;
        let mut n = 0;
        for s in &mut idle {
            let mut buf = [0u8; 1];
            if matches!(s.read(&mut buf).await, Ok(0) | Err(_)) {
                n += 1;
            }
        }
        n
    })
    .await
    .expect("idle connections were kept open past the handshake timeout");
    assert_eq!(closed, 300);
}

/// A client whose CA is removed from the bundle keeps its open connection only until the
/// connection's maximum age: then it must connect again, and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_ca_loses_its_open_connections_within_the_maximum_age() {
    let hsm = TestHsm::new("kms-age");
    let partner = Pki::new(&hsm.path().join("partner"), "partner");
    let tables = format!("{}max_connection_age_seconds = 2\n", hsm.tls_tables());
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &tables);
    // The bundle trusts the partner CA too, at first.
    let ours = std::fs::read_to_string(&hsm.pki.ca).unwrap();
    let theirs = std::fs::read_to_string(&partner.ca).unwrap();
    std::fs::write(&hsm.pki.ca, format!("{ours}{theirs}")).unwrap();
    let server = hsm.try_start(&config, &[]).unwrap();
    let client = partner.client("partner-app", &ClientSpec::spiffe("partner-app"));
    let ch = softhsm_tests::try_channel(&server.addr, &server.ca, Some(&client))
        .await
        .unwrap();
    let mut access = kms_proto::v1::access_client::AccessClient::new(ch);
    let who = access.who_am_i(pb::WhoAmIRequest {}).await.unwrap();
    assert_eq!(who.into_inner().principal, client.principal);
    // The partner CA is removed (the reload is picked up within a second).
    std::fs::write(&hsm.pki.ca, &ours).unwrap();
    server.sighup();
    // Within the maximum age (2 s) the connection is asked to close; the client has to
    // connect again, and the server refuses the partner's certificate. (A call in flight as
    // the connection closes may fail otherwise first.)
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        match access.who_am_i(pb::WhoAmIRequest {}).await {
            Err(e) if format!("{e:?}").contains("UnknownCA") => break,
            _ if std::time::Instant::now() > deadline => {
                panic!(
                    "the open connection outlived its removed CA by 8 s: {}",
                    hsm.logs()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // And it stays out (each try is a new handshake, refused).
    for _ in 0..5 {
        assert!(access.who_am_i(pb::WhoAmIRequest {}).await.is_err());
    }
    assert!(hsm.logs().contains("TLS handshake refused"));
    // Our own clients reconnect and go on.
    let ch = server.channel(Some(&hsm.admin)).await;
    SystemClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .unwrap();
}

/// The review's attack: `UnsealReset` needed only a TLS connection and skipped the failure
/// limit, so a peer with no certificate reset a custodian's progress. Now unseal and reset
/// need a custodian's certificate, and one address's failures lock out only that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_stall_the_unseal_ceremony() {
    let hsm = TestHsm::new("kms-stall");
    let tables = hsm
        .tls_tables()
        .replace("max_failed_shares = 1000", "max_failed_shares = 3");
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &tables);
    let server = hsm.try_start(&config, &[]).unwrap();
    let shares = server.init(3, 2, "").shares();
    let progress = || server.kms(&["operator", "status", "--json"], "").json()["progress"].clone();
    let out = server.custodian(&["operator", "unseal"], &format!("{}\n", shares[0]));
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(progress(), 1);

    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let reset = pb::UnsealRequest {
        reset: true,
        ..Default::default()
    };
    let bad_share = pb::UnsealRequest {
        share: "kms1-AAAA-BBBB".into(),
        ..Default::default()
    };
    for (cred, code) in [
        (None, Code::Unauthenticated),
        (Some(&app), Code::PermissionDenied),
    ] {
        let ch = try_channel_from(&server.addr, &server.ca, cred, stranger_ip())
            .await
            .unwrap();
        let mut sys = SystemClient::new(ch);
        for req in std::iter::once(reset.clone()).chain(std::iter::repeat_n(bad_share.clone(), 20))
        {
            let e = sys.unseal(req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
        }
    }
    assert_eq!(progress(), 1, "a stranger changed the custodians' progress");

    // A custodian's certificate used from another address, failing: that address is
    // limited; the custodians at theirs are not.
    let ch = try_channel_from(
        &server.addr,
        &server.ca,
        Some(&hsm.custodian),
        stranger_ip(),
    )
    .await
    .unwrap();
    let mut far = SystemClient::new(ch);
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(far.unseal(bad_share.clone()).await.unwrap_err().code());
    }
    assert_eq!(
        codes,
        [
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ]
    );
    assert_eq!(progress(), 1);
    let out = server.custodian(&["operator", "unseal"], &format!("{}\n", shares[1]));
    assert_eq!(out.code, Some(0), "{out:?}");
    // Every refusal is on record, under its principal.
    let recs = records(&server, &hsm);
    let count = |principal: &str, outcome: &str| {
        recs.iter()
            .filter(|r| r["event"]["principal"] == principal && r["event"]["outcome"] == outcome)
            .count()
    };
    assert_eq!(count("anonymous", "UNAUTHENTICATED"), 21);
    assert_eq!(count(&app.principal, "PERMISSION_DENIED"), 21);
}
