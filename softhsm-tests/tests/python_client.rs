//! A client in another language, generated from our .proto files by the reference
//! compiler: Python's `grpcio-tools` (protoc inside) makes the stubs, and Python's `grpcio`
//! calls a real server over mTLS. A .proto file that only our own compiler (protox) accepts
//! fails here, as it failed for the outside reviewer.
//!
//! The Python interpreter is `KMS_TEST_PYTHON`, else the virtual environment
//! `target/pyenv` that scripts/test makes (with grpcio-tools from pip). The test fails,
//! never skips, when neither is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

use softhsm_tests::{TestHsm, python, python_stubs, start_unsealed};

const CLIENT: &str = r#"
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
from kms.v1 import system_pb2, system_pb2_grpc, access_pb2, access_pb2_grpc
from kms.v1 import audit_pb2, audit_pb2_grpc

addr, ca, admin_cert, admin_key, auditor_cert, auditor_key = sys.argv[2:8]
read = lambda p: open(p, "rb").read()

def channel(cert=None, key=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    return grpc.secure_channel(addr, creds)

out = {}
# Status is open: no client certificate.
status = system_pb2_grpc.SystemStub(channel()).Status(system_pb2.StatusRequest(), timeout=10)
out["status"] = {"initialized": status.initialized, "sealed": status.sealed,
                 "threshold": status.threshold, "shares": status.shares,
                 "share_set_id": status.share_set_id}
who = access_pb2_grpc.AccessStub(channel(admin_cert, admin_key)).WhoAmI(
    access_pb2.WhoAmIRequest(), timeout=10)
out["whoami"] = {"principal": who.principal, "roles": list(who.roles)}
# The usage report is streamed in parts; merging them gives the report.
report = audit_pb2.KeyUsageReportResponse()
parts = 0
for part in audit_pb2_grpc.AuditStub(channel(auditor_cert, auditor_key)).KeyUsageReport(
        audit_pb2.KeyUsageReportRequest(), timeout=10):
    report.MergeFrom(part)
    parts += 1
out["report"] = {"parts": parts, "records": report.records,
                 "operations": sorted({r.operation for r in report.rows}),
                 "principals": sorted({r.principal for r in report.rows})}
# Without a certificate, anything else is refused with UNAUTHENTICATED.
try:
    access_pb2_grpc.AccessStub(channel()).ListGrants(access_pb2.ListGrantsRequest(), timeout=10)
    out["anonymous_list_grants"] = "OK"
except grpc.RpcError as e:
    out["anonymous_list_grants"] = e.code().name
print(json.dumps(out))
"#;

#[test]
fn a_python_client_generated_by_protoc_calls_the_server() {
    let python = python();
    let stubs = tempfile::tempdir().unwrap();
    python_stubs(stubs.path());
    for service in ["system", "keys", "audit", "access"] {
        assert!(
            stubs
                .path()
                .join(format!("kms/v1/{service}_pb2_grpc.py"))
                .is_file()
        );
    }

    let hsm = TestHsm::new("kms-python");
    let config = hsm.config();
    let (server, _shares) = start_unsealed(&hsm, &config);
    let script = stubs.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let addr = server.addr.trim_start_matches("https://");
    let run = Command::new(&python)
        .arg(&script)
        .arg(stubs.path())
        .arg(addr)
        .arg(&server.ca)
        .args([
            &hsm.admin.cert,
            &hsm.admin.key,
            &hsm.auditor.cert,
            &hsm.auditor.key,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(out["status"]["initialized"], true, "{out}");
    assert_eq!(out["status"]["sealed"], false, "{out}");
    assert_eq!(out["status"]["threshold"], 2, "{out}");
    assert_eq!(out["status"]["shares"], 3, "{out}");
    assert_eq!(out["status"]["share_set_id"].as_str().unwrap().len(), 16);
    assert_eq!(out["whoami"]["principal"], hsm.admin.principal.as_str());
    assert_eq!(out["whoami"]["roles"], serde_json::json!(["admin"]));
    assert!(out["report"]["parts"].as_u64().unwrap() >= 1, "{out}");
    // Init, the unseal shares, Status and WhoAmI were recorded before the report.
    assert!(out["report"]["records"].as_u64().unwrap() >= 4, "{out}");
    assert_eq!(out["anonymous_list_grants"], "UNAUTHENTICATED", "{out}");
}
