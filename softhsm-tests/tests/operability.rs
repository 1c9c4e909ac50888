//! What operators point at a running server: the standard health service (probed by
//! Python's `grpcio-health-checking`), server reflection (listed and called through by
//! Python's `grpcio-reflection`, and v1 by tonic's reflection client), the Prometheus
//! endpoint (scraped by a real Prometheus, queried through its HTTP API), and the log's
//! format and per-call line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use softhsm_tests::{TestHsm, free_port, http_get, python, start_unsealed};

const HEALTH_AND_REFLECTION: &str = r#"
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf import message_factory

addr, ca, admin_cert, admin_key, auditor_cert, auditor_key = sys.argv[1:7]
read = lambda p: open(p, "rb").read()

def channel(cert=None, key=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    return grpc.secure_channel(addr, creds)

name = health_pb2.HealthCheckResponse.ServingStatus.Name
# A load balancer has no client certificate.
health = health_pb2_grpc.HealthStub(channel())
def check(service):
    try:
        return name(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)
    except grpc.RpcError as e:
        return e.code().name

out = {}
out["sealed"] = {s: check(s) for s in ["", "kms.v1.System", "kms.v1.KeyManagement", "no.such.Service"]}
watch = health.Watch(health_pb2.HealthCheckRequest(service="kms.v1.KeyManagement"), timeout=60)
seen = [name(next(watch).status)]
print("WATCHING", flush=True)
seen.append(name(next(watch).status))
watch.cancel()
out["watch"] = seen
out["unsealed"] = {s: check(s) for s in ["", "kms.v1.KeyManagement"]}

# Reflection, as the admin: list the services, read a service's methods, and call one with
# messages built from the reflected descriptors alone (no generated code).
db = ProtoReflectionDescriptorDatabase(channel(admin_cert, admin_key))
out["services"] = sorted(db.get_services())
pool = DescriptorPool(db)
out["key_methods"] = sorted(m.name for m in pool.FindServiceByName("kms.v1.KeyManagement").methods)
request = message_factory.GetMessageClass(pool.FindMessageTypeByName("kms.v1.StatusRequest"))
response = message_factory.GetMessageClass(pool.FindMessageTypeByName("kms.v1.SealStatus"))
status = channel(admin_cert, admin_key).unary_unary(
    "/kms.v1.System/Status",
    request_serializer=request.SerializeToString,
    response_deserializer=response.FromString,
)(request(), timeout=10)
out["reflected_status"] = {"initialized": status.initialized, "sealed": status.sealed}

def services_as(cert, key):
    try:
        return sorted(ProtoReflectionDescriptorDatabase(channel(cert, key)).get_services())
    except grpc.RpcError as e:
        return e.code().name
out["reflection_anonymous"] = services_as(None, None)
out["reflection_auditor"] = services_as(auditor_cert, auditor_key)
print(json.dumps(out), flush=True)
"#;

#[test]
fn health_and_reflection_answer_standard_clients_and_probes_are_recorded_in_aggregate() {
    let hsm = TestHsm::new("kms-health");
    let config = hsm.config();
    let mut server = hsm.start();
    let init = server.init(3, 2, "");
    assert_eq!(init.code, Some(0), "{init:?}");
    let shares = init.shares();

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("health.py");
    std::fs::write(&script, HEALTH_AND_REFLECTION).unwrap();
    let mut client = Command::new(python())
        .arg(&script)
        .arg(server.addr.trim_start_matches("https://"))
        .arg(&server.ca)
        .args([
            &hsm.admin.cert,
            &hsm.admin.key,
            &hsm.auditor.cert,
            &hsm.auditor.key,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    if first != "WATCHING" {
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut stderr).unwrap();
        panic!("the Python client stopped early: {first}\n{stderr}");
    }
    // The watch has seen NOT_SERVING; unsealing must reach it as SERVING.
    server.unseal_with(&shares);
    let last = lines.next().and_then(Result::ok).unwrap_or_default();
    let status = client.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut client.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.success(),
        "the Python client failed: {last}\n{stderr}"
    );
    let out: serde_json::Value = serde_json::from_str(&last).unwrap();

    assert_eq!(
        out["sealed"],
        serde_json::json!({
            "": "SERVING",
            "kms.v1.System": "SERVING",
            "kms.v1.KeyManagement": "NOT_SERVING",
            "no.such.Service": "NOT_FOUND",
        }),
        "{out}"
    );
    assert_eq!(
        out["watch"],
        serde_json::json!(["NOT_SERVING", "SERVING"]),
        "{out}"
    );
    assert_eq!(
        out["unsealed"],
        serde_json::json!({"": "SERVING", "kms.v1.KeyManagement": "SERVING"}),
        "{out}"
    );
    let services: Vec<&str> = out["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "kms.v1.System",
        "kms.v1.KeyManagement",
        "kms.v1.Audit",
        "kms.v1.Access",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&s), "{s} not listed: {services:?}");
    }
    let methods = out["key_methods"].as_array().unwrap();
    for m in ["Encrypt", "Decrypt", "Sign", "CreateKey"] {
        assert!(methods.contains(&serde_json::json!(m)), "{m}: {methods:?}");
    }
    assert_eq!(
        out["reflected_status"],
        serde_json::json!({"initialized": true, "sealed": false})
    );
    assert_eq!(out["reflection_anonymous"], "UNAUTHENTICATED", "{out}");
    assert_eq!(out["reflection_auditor"], "PERMISSION_DENIED", "{out}");

    // Reflection v1, from tonic's own reflection client: the admin lists the services.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed = rt.block_on(reflection_v1_services(&server));
    assert!(
        listed.contains(&"kms.v1.KeyManagement".to_owned()),
        "{listed:?}"
    );

    // Probes are recorded as one summary at the latest at shutdown, never one by one.
    assert!(server.terminate().success());
    let server = hsm.try_start(&config, &[]).unwrap();
    let export = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(export.code, Some(0), "{export:?}");
    let mut probes: BTreeMap<String, u64> = BTreeMap::new();
    let mut reflection: BTreeMap<String, u64> = BTreeMap::new();
    for line in export.stdout.lines().skip(1) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let e = &v["event"];
        if e.is_null() {
            continue;
        }
        assert_ne!(
            e["service"], "grpc.health.v1.Health",
            "a probe recorded alone: {e}"
        );
        if e["service"] == "kms.Gate" && e["operation"] == "HealthChecks" {
            for (outcome, n) in e["batch"]["outcomes"].as_object().unwrap() {
                *probes.entry(outcome.clone()).or_default() += n.as_u64().unwrap();
            }
        }
        if e["service"]
            .as_str()
            .unwrap()
            .starts_with("grpc.reflection.")
        {
            *reflection
                .entry(e["outcome"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    // Six Checks and one Watch: five answered, one NOT_FOUND... as the server answered them.
    assert_eq!(
        probes,
        BTreeMap::from([("NOT_FOUND".to_owned(), 1), ("OK".to_owned(), 6)]),
        "{}",
        export.stdout
    );
    assert_eq!(
        reflection.get("UNAUTHENTICATED"),
        Some(&1),
        "{reflection:?}"
    );
    assert_eq!(
        reflection.get("PERMISSION_DENIED"),
        Some(&1),
        "{reflection:?}"
    );
    assert!(
        reflection.get("OK").is_some_and(|n| *n >= 2),
        "{reflection:?}"
    );
}

/// The services the v1 reflection service lists, asked as the admin.
async fn reflection_v1_services(server: &softhsm_tests::Server) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = server.channel(Some(&server.admin)).await;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    }
}

/// One value of an instant query to Prometheus's HTTP API, if the query has a result.
fn prometheus_value(prometheus: &str, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = http_get(&format!("{prometheus}/api/v1/query?query={encoded}"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

#[test]
fn a_real_prometheus_scrapes_the_metrics_endpoint() {
    let hsm = TestHsm::new("kms-metrics");
    let config = hsm.config_full(
        "metrics.toml",
        &hsm.hsm_table(),
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let (server, _shares) = start_unsealed(&hsm, &config);
    let metrics_url = server
        .metrics
        .clone()
        .expect("the server names its metrics URL");

    // Some traffic: encryptions with a software key, signatures with an HSM key, and a
    // refused call whose key name must not appear anywhere in the metrics.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut keys = server.keys().await;
        for (name, algorithm, protection) in [
            (
                "payments",
                pb::Algorithm::Aes256Gcm,
                pb::ProtectionLevel::Software,
            ),
            (
                "signer",
                pb::Algorithm::EcdsaP256Sha256,
                pb::ProtectionLevel::Hsm,
            ),
        ] {
            keys.create_key(pb::CreateKeyRequest {
                name: name.into(),
                algorithm: algorithm as i32,
                protection_level: protection as i32,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        server.grant_all("payments").await;
        server.grant_all("signer").await;
        for _ in 0..25 {
            keys.encrypt(pb::EncryptRequest {
                key: "payments".into(),
                plaintext: b"four score".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        for _ in 0..5 {
            keys.sign(pb::SignRequest {
                key: "signer".into(),
                input: Some(pb::sign_request::Input::Message(b"a document".to_vec())),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let err = keys
            .encrypt(pb::EncryptRequest {
                key: "secret-project-name".into(),
                plaintext: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        // Refused before the keyring is asked: a caller learns nothing of which keys exist.
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    });

    // The exposition itself: OpenMetrics, no key names, no principals.
    let (code, text) = http_get(&metrics_url);
    assert_eq!(code, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics: {text}");
    for secret in [
        "secret-project-name",
        "payments",
        "signer",
        &hsm.admin.principal,
    ] {
        assert!(!text.contains(secret), "{secret:?} in the metrics:\n{text}");
    }
    assert!(
        text.contains(
            r#"kms_requests_total{service="kms.v1.KeyManagement",method="Encrypt",code="OK"} 25"#
        ),
        "{text}"
    );

    // The alerts docs/operations.md recommends: valid rules (promtool), and every metric
    // they name is one the server exposes.
    let dir = tempfile::tempdir().unwrap();
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let rules = docs
        .split("```yaml\n")
        .filter_map(|block| block.split_once("```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.starts_with("groups:"))
        .expect("docs/operations.md has the alert rules");
    let rules_file = dir.path().join("rules.yml");
    std::fs::write(&rules_file, rules).unwrap();
    let checked = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "promtool refuses the documented alerts: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(metric) = word.strip_prefix("kms_") {
            // The family's name: a counter's samples end in _total, a histogram's in
            // _bucket, _count and _sum; a family without samples yet still has its TYPE.
            let family = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|s| metric.strip_suffix(s))
                .unwrap_or(metric);
            assert!(
                text.contains(&format!("# TYPE kms_{family} ")),
                "the alerts name kms_{metric}, which the server does not expose"
            );
            named += 1;
        }
    }
    assert!(named >= 8, "{named}");

    // A real Prometheus, on loopback, scraping every second.
    let target = metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    let prom_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kms\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let start = |port: u16| {
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("prometheus.log")).unwrap(),
            ))
            .spawn()
            .expect("prometheus is installed (scripts/test installs it)")
    };
    let mut port = free_port();
    let mut prometheus = start(port);
    let mut tries = 1;
    let mut api = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let encrypts = loop {
        // A free port is free only until someone else binds it: a Prometheus that could not
        // bind it exits, and starts again on another.
        if let Some(exit) = prometheus.try_wait().unwrap() {
            let log =
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
            assert!(
                tries < 5 && log.contains("address already in use"),
                "Prometheus exited ({exit}): {log}"
            );
            port = free_port();
            prometheus = start(port);
            tries += 1;
            api = format!("http://127.0.0.1:{port}");
            continue;
        }
        let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        let value = if ready {
            prometheus_value(
                &api,
                r#"kms_requests_total{job="kms",method="Encrypt",code="OK"}"#,
            )
        } else {
            None
        };
        if let Some(v) = value {
            break v;
        }
        if Instant::now() > deadline {
            let _ = prometheus.kill();
            panic!(
                "Prometheus never scraped kms: {}",
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let up = prometheus_value(&api, r#"up{job="kms"}"#);
    let sealed = prometheus_value(&api, "kms_sealed");
    let keys = prometheus_value(&api, "kms_keys");
    let signs = prometheus_value(
        &api,
        r#"kms_hsm_operation_duration_seconds_count{operation="sign"}"#,
    );
    let denied = prometheus_value(
        &api,
        r#"kms_requests_total{method="Encrypt",code="PERMISSION_DENIED"}"#,
    );
    let audited = prometheus_value(&api, "kms_audit_records_total");
    let build = prometheus_value(&api, "kms_build_info");
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert_eq!(encrypts, 25.0);
    assert_eq!(up, Some(1.0));
    assert_eq!(sealed, Some(0.0));
    assert_eq!(keys, Some(2.0));
    // Each signature is one timed C_Sign (audit checkpoints are signed in the HSM too).
    assert!(signs.is_some_and(|n| n >= 5.0), "{signs:?}");
    assert_eq!(denied, Some(1.0));
    assert!(audited.is_some_and(|n| n >= 30.0), "{audited:?}");
    assert_eq!(build, Some(1.0));
}

/// One `WhoAmI` call (open to anyone, answered sealed or not).
fn who_am_i(rt: &tokio::runtime::Runtime, server: &softhsm_tests::Server) {
    rt.block_on(async {
        server
            .access()
            .await
            .who_am_i(pb::WhoAmIRequest {})
            .await
            .unwrap()
    });
}

#[test]
fn json_logs_and_the_per_call_line_at_the_level_configured() {
    let hsm = TestHsm::new("kms-logs");
    // Default: text, and no line per served call at info.
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let rt = tokio::runtime::Runtime::new().unwrap();
    who_am_i(&rt, &server);
    drop(server);
    let default_logs = hsm.logs();
    assert!(default_logs.contains("listening"), "{default_logs}");
    assert!(
        !default_logs.contains("request served"),
        "a line per call at the default level:\n{default_logs}"
    );

    // JSON, with the per-call line at info.
    let before = hsm.logs().len();
    let config = hsm.config_full(
        "json.toml",
        &hsm.hsm_table(),
        "[log]\nformat = \"json\"\nrequests = \"info\"\n",
    );
    let server = hsm.try_start(&config, &[]).unwrap();
    who_am_i(&rt, &server);
    drop(server);
    let logs = hsm.logs();
    let lines: Vec<serde_json::Value> = logs[before..]
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{logs}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    let served: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request served")
        .collect();
    assert!(
        served
            .iter()
            .any(|l| l["fields"]["rpc"] == "kms.v1.Access/WhoAmI" && l["level"] == "INFO"),
        "{served:?}"
    );

    // A bad value is a clear start-up error.
    let bad = hsm.config_full("bad.toml", &hsm.hsm_table(), "[log]\nformat = \"xml\"\n");
    let (status, stderr) = hsm.start_failure(&bad, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("log.format: \"xml\" is not one of text, json"),
        "{stderr}"
    );
    let bad = hsm.config_full(
        "bad2.toml",
        &hsm.hsm_table(),
        "[metrics]\nlisten = \"nowhere\"\n",
    );
    let (status, stderr) = hsm.start_failure(&bad, &[]);
    assert!(!status.success());
    assert!(stderr.contains("metrics.listen: \"nowhere\""), "{stderr}");
}

#[test]
fn shell_completions_complete_subcommands_and_flags() {
    let kms = softhsm_tests::bin("kms");
    // Bash, as a shell would use it: source the script, then ask its function.
    let script = r#"
source <("$KMS" completions bash)
complete -p kms
COMP_WORDS=(kms au); COMP_CWORD=1; _kms kms au kms; echo "1:${COMPREPLY[*]}"
COMP_WORDS=(kms audit re); COMP_CWORD=2; _kms kms re audit; echo "2:${COMPREPLY[*]}"
COMP_WORDS=(kms audit report --pe); COMP_CWORD=3; _kms kms --pe report; echo "3:${COMPREPLY[*]}"
"#;
    let out = Command::new("bash")
        .args(["-c", script])
        .env("KMS", &kms)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("-F _kms kms"), "{text}");
    assert!(text.contains("1:audit\n"), "{text}");
    assert!(text.contains("2:report\n"), "{text}");
    assert!(text.contains("3:--period\n"), "{text}");
    // zsh and fish: scripts for their own loaders, naming the commands.
    for (shell, marker) in [("zsh", "#compdef kms"), ("fish", "complete -c kms")] {
        let out = Command::new(&kms)
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(marker),
            "{shell}: {text}"
        );
        assert!(text.contains("audit"), "{shell}");
    }
    // A shell that does not exist is a usage error, not a panic.
    let out = Command::new(&kms)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
