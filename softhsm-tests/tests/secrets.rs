//! The secrets engine (`kms.v1.Secrets`, Vault KV v2 semantics) end to end: a real `kms`
//! server on a real SoftHSM token, driven by the `kms secret` CLI as an operator would,
//! and by gRPC where a test needs many calls. On redb: every command, deny by default,
//! bad input refused with nothing changed, kill -9 after acknowledged writes, a backup
//! restored, the audit trail naming paths and versions and holding no value. On
//! PostgreSQL: two servers on one database see each other's writes at once, check-and-set
//! is atomic across them, and a grant revoked on one is refused on the other at once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use kms_proto::v1 as pb;
use kms_proto::v1::secrets_client::SecretsClient;
use serde_json::Value;
use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{ClientSpec, Cred, Out, Server, TestHsm, start_unsealed};
use tonic::transport::Channel;

/// `[secrets] max_secret_bytes` of these tests' servers: small, to test the limit cheaply.
const MAX_SECRET_BYTES: usize = 4096;

/// Values no output but `get`'s, no error, no log, no audit file and no store file may
/// hold in clear.
const VALUES: [&str; 4] = [
    "correct-horse-battery-staple",
    "tok-from-standard-input-7f3a",
    "-----BEGIN FAKE KEY-----",
    "patched-value-91c2",
];

fn config(hsm: &TestHsm, storage: &str) -> PathBuf {
    hsm.config_full(
        "secrets.toml",
        &hsm.hsm_table(),
        &format!("{storage}[secrets]\nmax_secret_bytes = {MAX_SECRET_BYTES}\n"),
    )
}

/// A gRPC client of `kms.v1.Secrets` as `cred`.
async fn secrets(server: &Server, cred: &Cred) -> SecretsClient<Channel> {
    SecretsClient::new(server.channel(Some(cred)).await)
}

/// Asserts the CLI succeeded; its output.
fn ok(out: Out) -> Out {
    assert_eq!(out.code, Some(0), "{out:?}");
    out
}

/// Asserts the CLI failed (exit 1) with `code` and `text` in its error, and printed nothing
/// on standard output, nor any value.
fn refused(out: &Out, code: &str, text: &str) {
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr.contains(code) && out.stderr.contains(text),
        "expected {code} and {text:?}: {out:?}"
    );
    no_value_in(&format!("{out:?}"));
}

fn no_value_in(text: &str) {
    for v in VALUES {
        assert!(!text.contains(v), "a value is in: {text}");
    }
}

/// `kms secret metadata get PATH --json` as the admin.
fn metadata(server: &Server, path: &str) -> Value {
    ok(server.kms(&["secret", "metadata", "get", path, "--json"], "")).json()
}

/// Grants the harness's admin every secret operation on every path (deny by default
/// holds for the admin role too); the grant's id.
fn grant_admin_everything(server: &Server) -> String {
    let out = ok(server.kms(
        &[
            "secret",
            "grant",
            "create",
            "*",
            &server.admin.principal,
            "--operations",
            "secret-read,secret-write,secret-list,secret-delete,secret-destroy,secret-read-metadata",
            "--json",
        ],
        "",
    ));
    out.json()["id"].as_str().unwrap().to_owned()
}

async fn put(c: &mut SecretsClient<Channel>, path: &str, pairs: &[(&str, &str)]) -> u64 {
    c.put_secret(pb::PutSecretRequest {
        path: path.to_owned(),
        data: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        cas: None,
    })
    .await
    .unwrap()
    .into_inner()
    .version
}

async fn get(
    c: &mut SecretsClient<Channel>,
    path: &str,
    version: u64,
) -> Result<pb::GetSecretResponse, tonic::Status> {
    c.get_secret(pb::GetSecretRequest {
        path: path.to_owned(),
        version,
    })
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_writes_reads_and_versions_secrets() {
    let hsm = TestHsm::new("kms-secrets-cli");
    let (server, _) = start_unsealed(&hsm, &config(&hsm, ""));
    // Deny by default, for the admin as for anyone: no grant, no secret.
    let denied = server.kms(&["secret", "put", "app/db", "user=alice"], "");
    refused(&denied, "PERMISSION_DENIED", "secret-write");
    let grant = grant_admin_everything(&server);
    let listed = ok(server.kms(&["secret", "grant", "list", "--json"], "")).json_lines();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], grant.as_str());
    assert_eq!(listed[0]["path"], "*");
    assert_eq!(listed[0]["operations"].as_array().unwrap().len(), 6);

    // put: a value from an argument, one from a file, one from standard input, each kept
    // byte for byte.
    let pem = hsm.path().join("key.pem");
    let pem_text = format!("{}\nAAAA\n-----END FAKE KEY-----\n", VALUES[2]);
    std::fs::write(&pem, &pem_text).unwrap();
    let stdin_value = format!("{}\n", VALUES[1]);
    let out = ok(server.kms(
        &[
            "secret",
            "put",
            "app/db",
            "user=alice",
            &format!("password={}", VALUES[0]),
            &format!("key=@{}", pem.display()),
            "token=-",
            "--json",
        ],
        &stdin_value,
    ));
    no_value_in(&out.stdout);
    let written = out.json();
    assert_eq!(written["path"], "app/db");
    assert_eq!(written["version"], 1);
    assert_eq!(written["destroyed"], false);
    let read = ok(server.kms(&["secret", "get", "app/db", "--json"], "")).json();
    assert_eq!(read["version"]["version"], 1);
    assert_eq!(read["data"]["user"], "alice");
    assert_eq!(read["data"]["password"], VALUES[0]);
    assert_eq!(read["data"]["key"], pem_text.as_str());
    assert_eq!(read["data"]["token"], stdin_value.as_str());
    // --field prints the value alone, as stored (piped: no newline added, as Vault does).
    let field = ok(server.kms(&["secret", "get", "app/db", "--field", "key"], ""));
    assert_eq!(field.stdout, pem_text);
    let field = ok(server.kms(&["secret", "get", "app/db", "--field", "user"], ""));
    assert_eq!(field.stdout, "alice");
    let missing = server.kms(&["secret", "get", "app/db", "--field", "nope"], "");
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(
        missing.stderr.contains("no value named \"nope\""),
        "{missing:?}"
    );
    // The table names and shows the values (get is the one command that prints them).
    let table = ok(server.kms(&["secret", "get", "app/db"], ""));
    assert!(table.stdout.contains("Version  1"), "{table:?}");
    assert!(table.stdout.contains(VALUES[0]), "{table:?}");

    // A name given twice is refused before anything is sent; the value is not echoed.
    let twice = server.kms(
        &[
            "secret",
            "put",
            "app/db",
            "user=bob",
            &format!("user={}", VALUES[0]),
        ],
        "",
    );
    assert_eq!(twice.code, Some(1), "{twice:?}");
    assert!(
        twice.stderr.contains("\"user\" is given twice"),
        "{twice:?}"
    );
    no_value_in(&twice.stderr);
    let forgot = server.kms(&["secret", "put", "app/db", VALUES[0]], "");
    assert_eq!(forgot.code, Some(1), "{forgot:?}");
    assert!(forgot.stderr.contains("has no `=`"), "{forgot:?}");
    no_value_in(&forgot.stderr);
    assert_eq!(metadata(&server, "app/db")["current_version"], 1);

    // patch: set one, remove one, as version 2; version 1 still reads as it was.
    let out = ok(server.kms(
        &[
            "secret",
            "patch",
            "app/db",
            &format!("password={}", VALUES[3]),
            "--remove",
            "token",
        ],
        "",
    ));
    assert!(out.stdout.contains("version 2 written"), "{out:?}");
    no_value_in(&out.stdout);
    let v2 = ok(server.kms(&["secret", "get", "app/db", "--json"], "")).json();
    assert_eq!(v2["version"]["version"], 2);
    assert_eq!(v2["data"]["password"], VALUES[3]);
    assert_eq!(v2["data"]["user"], "alice");
    assert!(v2["data"].get("token").is_none(), "{v2}");
    let v1 = ok(server.kms(&["secret", "get", "app/db", "--version", "1", "--json"], "")).json();
    assert_eq!(v1["data"]["password"], VALUES[0]);

    // Check-and-set: the right version writes, a wrong one changes nothing.
    let out = ok(server.kms(&["secret", "put", "app/db", "user=carol", "--cas", "2"], ""));
    assert!(out.stdout.contains("version 3 written"), "{out:?}");
    let before = metadata(&server, "app/db");
    let wrong = server.kms(&["secret", "put", "app/db", "user=dave", "--cas", "2"], "");
    refused(
        &wrong,
        "FAILED_PRECONDITION",
        "did not match the current version (3",
    );
    let wrong = server.kms(
        &["secret", "patch", "app/db", "user=dave", "--cas", "1"],
        "",
    );
    refused(&wrong, "FAILED_PRECONDITION", "did not match");
    let absent_only = server.kms(&["secret", "put", "app/db", "user=dave", "--cas", "0"], "");
    refused(&absent_only, "FAILED_PRECONDITION", "did not match");
    assert_eq!(
        metadata(&server, "app/db"),
        before,
        "a refused write changed nothing"
    );
    // cas 0 writes a secret that is absent.
    ok(server.kms(&["secret", "put", "app/new", "a=1", "--cas", "0"], ""));

    // delete (the current version by default), undelete, destroy.
    let out = ok(server.kms(&["secret", "delete", "app/db"], ""));
    assert!(out.stdout.contains("version(s) 3 deleted"), "{out:?}");
    let gone = server.kms(&["secret", "get", "app/db"], "");
    refused(&gone, "NOT_FOUND", "version 3 of this secret is deleted");
    // A deleted current version cannot be patched: nothing is written.
    let before = metadata(&server, "app/db");
    let patch = server.kms(&["secret", "patch", "app/db", "user=eve"], "");
    refused(
        &patch,
        "FAILED_PRECONDITION",
        "a patch needs one to apply to",
    );
    assert_eq!(metadata(&server, "app/db"), before);
    ok(server.kms(&["secret", "undelete", "app/db", "--versions", "3"], ""));
    let v3 = ok(server.kms(&["secret", "get", "app/db", "--field", "user"], ""));
    assert_eq!(v3.stdout, "carol");
    ok(server.kms(&["secret", "delete", "app/db", "--versions", "1,2"], ""));
    let out = ok(server.kms(&["secret", "destroy", "app/db", "--versions", "1"], ""));
    assert!(out.stdout.contains("version(s) 1 destroyed"), "{out:?}");
    let destroyed = server.kms(&["secret", "get", "app/db", "--version", "1"], "");
    refused(
        &destroyed,
        "NOT_FOUND",
        "version 1 of this secret is destroyed",
    );
    // Undelete brings back a deleted version, not a destroyed one.
    ok(server.kms(&["secret", "undelete", "app/db", "--versions", "1,2"], ""));
    let still = server.kms(&["secret", "get", "app/db", "--version", "1"], "");
    refused(&still, "NOT_FOUND", "destroyed");
    let back = ok(server.kms(
        &[
            "secret",
            "get",
            "app/db",
            "--version",
            "2",
            "--field",
            "password",
        ],
        "",
    ));
    assert_eq!(back.stdout, VALUES[3]);
    let m = metadata(&server, "app/db");
    assert_eq!(m["current_version"], 3);
    let states: Vec<(u64, bool, bool)> = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["deleted"].as_bool().unwrap(),
                v["destroyed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [(1, false, true), (2, false, false), (3, false, false)]
    );
    no_value_in(&m.to_string());

    // A version that does not exist: refused, nothing changed.
    let before = metadata(&server, "app/db");
    let none = server.kms(&["secret", "get", "app/db", "--version", "99"], "");
    refused(
        &none,
        "NOT_FOUND",
        "version 99 of this secret does not exist",
    );
    for verb in ["delete", "undelete", "destroy"] {
        let none = server.kms(&["secret", verb, "app/db", "--versions", "2,99"], "");
        refused(
            &none,
            "NOT_FOUND",
            "version 99 of this secret does not exist",
        );
    }
    assert_eq!(metadata(&server, "app/db"), before, "nothing changed");
    let none = server.kms(&["secret", "get", "app/nothing"], "");
    refused(&none, "NOT_FOUND", "no secret at this path");

    // Metadata: versions kept, check-and-set required, deletion after a time, custom.
    let out = ok(server.kms(
        &[
            "secret",
            "metadata",
            "put",
            "app/db",
            "--max-versions",
            "2",
            "--cas-required",
            "true",
            "--delete-version-after",
            "1h",
            "--custom",
            "owner=payments-team",
            "--custom",
            "ticket=OPS-1",
            "--json",
        ],
        "",
    ));
    let m = out.json();
    assert_eq!(m["max_versions"], 2);
    assert_eq!(m["cas_required"], true);
    assert_eq!(m["delete_version_after_seconds"], 3600);
    assert_eq!(m["custom_metadata"]["owner"], "payments-team");
    // A lower max_versions drops the oldest version at once.
    assert_eq!(m["oldest_version"], 2, "{m}");
    assert_eq!(m["versions"].as_array().unwrap().len(), 2, "{m}");
    let pruned = server.kms(&["secret", "get", "app/db", "--version", "1"], "");
    refused(&pruned, "NOT_FOUND", "does not exist");
    let no_cas = server.kms(&["secret", "put", "app/db", "user=frank"], "");
    refused(
        &no_cas,
        "FAILED_PRECONDITION",
        "check-and-set parameter required",
    );
    let out = ok(server.kms(
        &[
            "secret",
            "put",
            "app/db",
            "user=frank",
            "--cas",
            "3",
            "--json",
        ],
        "",
    ));
    let v4 = out.json();
    assert_eq!(v4["version"], 4);
    // Deleted an hour after it was written.
    let (created, deletion) = (
        v4["create_time"].as_i64().unwrap(),
        v4["deletion_time"].as_i64().unwrap(),
    );
    assert_eq!(deletion - created, 3_600_000, "{v4}");
    let table = ok(server.kms(&["secret", "metadata", "get", "app/db"], ""));
    assert!(table.stdout.contains("owner=payments-team"), "{table:?}");
    assert!(
        table.stdout.contains("Delete version after  1h"),
        "{table:?}"
    );
    let read = ok(server.kms(&["secret", "get", "app/db", "--json"], "")).json();
    assert_eq!(read["custom_metadata"]["ticket"], "OPS-1");

    // list: one level down, folders ending in `/`, every page (more than one).
    let mut c = secrets(&server, &server.admin).await;
    for i in 0..1_050 {
        put(&mut c, &format!("many/s{i:04}"), &[("v", "x")]).await;
    }
    put(&mut c, "many/sub/deeper", &[("v", "x")]).await;
    let top = ok(server.kms(&["secret", "list", "--json"], "")).json();
    assert_eq!(top, serde_json::json!(["app/", "many/"]));
    let app = ok(server.kms(&["secret", "list", "app"], ""));
    assert_eq!(app.stdout, "db\nnew\n");
    let many = ok(server.kms(&["secret", "list", "many/", "--json"], "")).json();
    let many: Vec<&str> = many
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(many.len(), 1_051, "every page");
    assert_eq!(many[0], "s0000");
    assert_eq!(many[1_049], "s1049");
    assert_eq!(many[1_050], "sub/");

    // metadata delete: the secret and every version are gone.
    let out = ok(server.kms(&["secret", "metadata", "delete", "app/db"], ""));
    assert!(
        out.stdout.contains("deleted, with every version"),
        "{out:?}"
    );
    let gone = server.kms(&["secret", "get", "app/db"], "");
    refused(&gone, "NOT_FOUND", "no secret at this path");
    let app = ok(server.kms(&["secret", "list", "app"], ""));
    assert_eq!(app.stdout, "new\n");

    // The engine's configuration: anyone with a certificate reads it, the admin sets it.
    let cfg = ok(server.kms(&["secret", "config", "get", "--json"], "")).json();
    assert_eq!(
        cfg,
        serde_json::json!({"max_versions": 10, "cas_required": false, "delete_version_after_seconds": 0})
    );
    let set = ok(server.kms(
        &[
            "secret",
            "config",
            "set",
            "--max-versions",
            "3",
            "--delete-version-after",
            "30d",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(set["max_versions"], 3);
    assert_eq!(set["delete_version_after_seconds"], 30 * 86_400);
    let app_cred = hsm.pki.client("app", &ClientSpec::spiffe("payments-api"));
    let seen = ok(server.kms_as(Some(&app_cred), &["secret", "config", "get", "--json"], ""));
    assert_eq!(seen.json()["max_versions"], 3);
    let not_admin = server.kms_as(
        Some(&app_cred),
        &["secret", "config", "set", "--cas-required", "true"],
        "",
    );
    refused(&not_admin, "PERMISSION_DENIED", "");
    ok(server.kms(
        &[
            "secret",
            "config",
            "set",
            "--max-versions",
            "0",
            "--delete-version-after",
            "0",
        ],
        "",
    ));
    let cfg = ok(server.kms(&["secret", "config", "get", "--json"], "")).json();
    assert_eq!(cfg["max_versions"], 10, "0 sets the default again");
    assert_eq!(cfg["delete_version_after_seconds"], 0);

    // Revoking the admin's grant: the next call is refused.
    let out = ok(server.kms(&["secret", "grant", "revoke", &grant], ""));
    assert!(out.stdout.contains("revoked"), "{out:?}");
    let denied = server.kms(&["secret", "get", "app/new"], "");
    refused(&denied, "PERMISSION_DENIED", "secret-read");
    let again = server.kms(&["secret", "grant", "revoke", &grant], "");
    refused(&again, "NOT_FOUND", "no secret grant");

    // No value in the server's log.
    no_value_in(&hsm.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_deny_by_default_and_bad_input_changes_nothing() {
    let hsm = TestHsm::new("kms-secrets-deny");
    let (server, _) = start_unsealed(&hsm, &config(&hsm, ""));
    grant_admin_everything(&server);
    ok(server.kms(&["secret", "put", "payments/x", "k=payments"], ""));
    ok(server.kms(&["secret", "put", "hr/x", "k=hr"], ""));
    let app = hsm.pki.client("app", &ClientSpec::spiffe("payments-api"));
    let as_app = |args: &[&str]| server.kms_as(Some(&app), args, "");

    // No grant: every call refused, with the operation and path named.
    for args in [
        &["secret", "get", "payments/x"][..],
        &["secret", "put", "payments/x", "k=v"],
        &["secret", "list", "payments"],
        &["secret", "metadata", "get", "payments/x"],
        &["secret", "delete", "payments/x"],
        &["secret", "destroy", "payments/x", "--versions", "1"],
    ] {
        refused(&as_app(args), "PERMISSION_DENIED", "payments");
    }
    // Grants are the admin's: the app cannot give itself one.
    let own = as_app(&[
        "secret",
        "grant",
        "create",
        "*",
        &app.principal,
        "--operations",
        "secret-read",
    ]);
    refused(&own, "PERMISSION_DENIED", "");
    // secret-read and secret-list on payments/*: reads and lists payments, nothing else.
    let out = ok(server.kms(
        &[
            "secret",
            "grant",
            "create",
            "payments/*",
            &app.principal,
            "--operations",
            "secret-read,secret-list",
        ],
        "",
    ));
    assert!(out.stdout.contains("Grant "), "{out:?}");
    assert!(out.stdout.contains("secret-read,secret-list"), "{out:?}");
    let id = out.stdout.split_whitespace().nth(1).unwrap().to_owned();
    let read = ok(as_app(&["secret", "get", "payments/x", "--field", "k"]));
    assert_eq!(read.stdout, "payments");
    assert_eq!(ok(as_app(&["secret", "list", "payments"])).stdout, "x\n");
    refused(
        &as_app(&["secret", "get", "hr/x"]),
        "PERMISSION_DENIED",
        "hr/x",
    );
    refused(
        &as_app(&["secret", "list"]),
        "PERMISSION_DENIED",
        "secret-list",
    );
    refused(
        &as_app(&["secret", "list", "hr"]),
        "PERMISSION_DENIED",
        "hr/",
    );
    for args in [
        &["secret", "put", "payments/x", "k=mine"][..],
        &["secret", "patch", "payments/x", "k=mine"],
        &["secret", "delete", "payments/x"],
        &["secret", "destroy", "payments/x", "--versions", "1"],
        &[
            "secret",
            "metadata",
            "put",
            "payments/x",
            "--max-versions",
            "1",
        ],
        &["secret", "metadata", "delete", "payments/x"],
        &["secret", "metadata", "get", "payments/x"],
    ] {
        refused(&as_app(args), "PERMISSION_DENIED", "payments/x");
    }
    let m = metadata(&server, "payments/x");
    assert_eq!(m["current_version"], 1);
    assert_eq!(m["versions"][0]["deleted"], false);
    // secret-write on the path: a new version, and a max_versions that keeps both; one that
    // would drop a version needs secret-destroy too, and changes nothing without it.
    ok(server.kms(
        &[
            "secret",
            "grant",
            "create",
            "payments/x",
            &app.principal,
            "--operations",
            "secret-write",
        ],
        "",
    ));
    ok(as_app(&["secret", "put", "payments/x", "k=second"]));
    // Its answers do not show the custom metadata (secret-read-metadata does).
    ok(server.kms(
        &[
            "secret",
            "metadata",
            "put",
            "payments/x",
            "--custom",
            "owner=payments-team",
        ],
        "",
    ));
    let answer = ok(as_app(&[
        "secret",
        "metadata",
        "put",
        "payments/x",
        "--max-versions",
        "2",
        "--json",
    ]))
    .json();
    assert_eq!(answer["max_versions"], 2, "{answer}");
    assert!(!answer.to_string().contains("payments-team"), "{answer}");
    refused(
        &as_app(&[
            "secret",
            "metadata",
            "put",
            "payments/x",
            "--max-versions",
            "1",
        ]),
        "PERMISSION_DENIED",
        "secret-destroy",
    );
    let m = metadata(&server, "payments/x");
    assert_eq!(m["current_version"], 2);
    assert_eq!(m["max_versions"], 2);
    assert_eq!(m["versions"].as_array().unwrap().len(), 2);
    // The grant list filters by pattern and grantee.
    let by_path = ok(server.kms(
        &["secret", "grant", "list", "--path", "payments/*", "--json"],
        "",
    ))
    .json_lines();
    assert_eq!(by_path.len(), 1);
    assert_eq!(by_path[0]["principal"], app.principal.as_str());
    let by_other = ok(server.kms(
        &[
            "secret",
            "grant",
            "list",
            "--principal",
            "spiffe://test.kms/nobody",
        ],
        "",
    ));
    assert_eq!(by_other.stdout, "");
    ok(server.kms(&["secret", "grant", "revoke", &id], ""));
    refused(
        &as_app(&["secret", "get", "payments/x"]),
        "PERMISSION_DENIED",
        "payments/x",
    );
    // Bad grants: an unknown operation (the CLI), a pattern that is not one (the server).
    let bad = server.kms(
        &[
            "secret",
            "grant",
            "create",
            "payments/*",
            &app.principal,
            "--operations",
            "read",
        ],
        "",
    );
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(bad.stderr.contains("unknown operation"), "{bad:?}");
    for pattern in ["pay*ments/*", "/payments", "a b"] {
        let bad = server.kms(
            &[
                "secret",
                "grant",
                "create",
                pattern,
                &app.principal,
                "--operations",
                "secret-read",
            ],
            "",
        );
        refused(&bad, "INVALID_ARGUMENT", "pattern");
    }

    // Bad input: each refused with a clear error, and nothing changed.
    let before = metadata(&server, "payments/x");
    let big = hsm.path().join("big");
    std::fs::write(&big, "x".repeat(MAX_SECRET_BYTES + 1)).unwrap();
    let too_big = server.kms(
        &[
            "secret",
            "put",
            "payments/x",
            &format!("k=@{}", big.display()),
        ],
        "",
    );
    refused(&too_big, "INVALID_ARGUMENT", "max_secret_bytes");
    assert!(
        too_big.stderr.contains("nothing was written"),
        "{too_big:?}"
    );
    let too_big = server.kms(
        &[
            "secret",
            "patch",
            "payments/x",
            &format!("k2=@{}", big.display()),
        ],
        "",
    );
    refused(&too_big, "INVALID_ARGUMENT", "max_secret_bytes");
    // Exactly at the limit (names and values) is accepted; at the limit + 1 it is not.
    let at_limit = hsm.path().join("at-limit");
    std::fs::write(&at_limit, "y".repeat(MAX_SECRET_BYTES - 1)).unwrap();
    ok(server.kms(
        &[
            "secret",
            "put",
            "limits/x",
            &format!("k=@{}", at_limit.display()),
        ],
        "",
    ));
    // Read back whole: a version this big is read on a thread of its own, not the async
    // worker (kms/src/service/call.rs, `with_secrets`).
    let back = ok(server.kms(&["secret", "get", "limits/x", "--field", "k"], ""));
    assert_eq!(back.stdout, "y".repeat(MAX_SECRET_BYTES - 1));
    std::fs::write(&at_limit, "y".repeat(MAX_SECRET_BYTES)).unwrap();
    refused(
        &server.kms(
            &[
                "secret",
                "put",
                "limits/x",
                &format!("k=@{}", at_limit.display()),
            ],
            "",
        ),
        "INVALID_ARGUMENT",
        "max_secret_bytes",
    );
    let long = format!("{}/x", "a".repeat(511));
    for (path, why) in [
        ("pay ments/x", "segments of A-Z a-z 0-9 _ . -"),
        ("payments/../hr/x", "no `.` or `..` segment"),
        ("payments//x", "no empty segment"),
        ("/payments/x", "no empty segment"),
        ("payments/x@1", "segments of A-Z a-z 0-9 _ . -"),
        ("payments/\u{202e}x", "segments of A-Z a-z 0-9 _ . -"),
        (long.as_str(), "at most 512 bytes"),
    ] {
        for args in [
            &["secret", "put", path, "k=v"][..],
            &["secret", "get", path],
            &["secret", "metadata", "put", path, "--max-versions", "1"],
        ] {
            let out = server.kms(args, "");
            refused(&out, "INVALID_ARGUMENT", "invalid secret path");
            assert!(out.stderr.contains(why), "{why}: {out:?}");
        }
    }
    let deep = vec!["a"; 33].join("/");
    refused(
        &server.kms(&["secret", "put", &deep, "k=v"], ""),
        "INVALID_ARGUMENT",
        "at most 32 segments",
    );
    let over = server.kms(
        &[
            "secret",
            "metadata",
            "put",
            "payments/x",
            "--max-versions",
            "1001",
        ],
        "",
    );
    refused(&over, "INVALID_ARGUMENT", "max_versions is at most 1000");
    assert_eq!(metadata(&server, "payments/x"), before, "nothing changed");
    let top = ok(server.kms(&["secret", "list", "--json"], "")).json();
    assert_eq!(top, serde_json::json!(["hr/", "limits/", "payments/"]));
    no_value_in(&hsm.logs());
}

/// Writes `n` secrets by gRPC, each with a value naming it; returns their paths.
async fn write_many(c: &mut SecretsClient<Channel>, prefix: &str, n: usize) -> Vec<String> {
    let mut paths = Vec::new();
    for i in 0..n {
        let path = format!("{prefix}/s{i}");
        let v = put(c, &path, &[("v", &format!("value {i} of {prefix}"))]).await;
        assert_eq!(v, 1);
        paths.push(path);
    }
    paths
}

/// Reads back what [`write_many`] wrote at `paths`.
async fn reads_back(c: &mut SecretsClient<Channel>, prefix: &str, paths: &[String]) {
    for path in paths {
        let i = path.rsplit_once("/s").unwrap().1;
        let r = get(c, path, 0)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        assert_eq!(r.data["v"], format!("value {i} of {prefix}"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write_and_a_restore_reads_every_secret() {
    let hsm = TestHsm::new("kms-secrets-crash");
    let config = config(&hsm, "");
    let (mut server, shares) = start_unsealed(&hsm, &config);
    grant_admin_everything(&server);
    let mut c = secrets(&server, &server.admin).await;
    // Writes on two connections at once, each acknowledged, then kill -9 at once.
    let (a, b) = tokio::join!(
        {
            let mut c = c.clone();
            async move { write_many(&mut c, "crash-a", 60).await }
        },
        {
            let mut c = c.clone();
            async move { write_many(&mut c, "crash-b", 60).await }
        }
    );
    let patched = c
        .patch_secret(pb::PatchSecretRequest {
            path: "crash-a/s0".into(),
            set: [("w".to_owned(), VALUES[3].to_owned())].into(),
            remove: vec![],
            cas: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(patched.version, 2);
    c.delete_secret_versions(pb::SecretVersionsRequest {
        path: "crash-b/s0".into(),
        versions: vec![],
    })
    .await
    .unwrap();
    server.kill9();
    let server = hsm.try_start(&config, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = secrets(&server, &server.admin).await;
    reads_back(&mut c, "crash-a", &a).await;
    reads_back(&mut c, "crash-b", &b[1..]).await;
    assert_eq!(
        get(&mut c, "crash-a/s0", 0).await.unwrap().data["w"],
        VALUES[3]
    );
    let deleted = get(&mut c, "crash-b/s0", 0).await.unwrap_err();
    assert_eq!(deleted.code(), tonic::Code::NotFound, "{deleted:?}");
    // The CLI agrees.
    let via_cli = ok(server.kms(&["secret", "get", "crash-b/s7", "--field", "v"], ""));
    assert_eq!(via_cli.stdout, "value 7 of crash-b");

    // A backup, restored into a fresh store, unsealed with the same shares, decrypts every
    // secret (the values are sealed under the barrier, whose root key the shares open).
    let file = hsm.path().join("secrets.backup");
    let out = ok(server.kms(&["backup", "create", "--out", file.to_str().unwrap()], ""));
    let audit_key = out.stdout.split("audit key ").nth(1).unwrap()[..32].to_owned();
    let text = std::fs::read_to_string(&file).unwrap();
    for v in VALUES.iter().copied().chain(["value 7 of crash-b"]) {
        assert!(!text.contains(v), "a value in clear in the backup");
    }
    drop(server);
    let restored_dir = hsm.path().join("restored");
    let restored = hsm.config_full(
        "restored.toml",
        &hsm.hsm_table(),
        &format!(
            "[storage]\npath = \"{}\"\n[secrets]\nmax_secret_bytes = {MAX_SECRET_BYTES}\n",
            restored_dir.join("kms.redb").display()
        ),
    );
    ok(softhsm_tests::run_kms(
        "https://127.0.0.1:1",
        &[
            "backup",
            "restore",
            "--in",
            file.to_str().unwrap(),
            "--config",
            restored.to_str().unwrap(),
            "--public-key",
            &audit_key,
        ],
        "",
    ));
    let server = hsm.try_start(&restored, &[]).unwrap();
    server.unseal_with(&shares);
    let mut c = secrets(&server, &server.admin).await;
    reads_back(&mut c, "crash-a", &a).await;
    reads_back(&mut c, "crash-b", &b[1..]).await;
    assert_eq!(
        get(&mut c, "crash-a/s0", 0).await.unwrap().data["w"],
        VALUES[3]
    );
    let m = ok(server.kms(&["secret", "metadata", "get", "crash-b/s0", "--json"], "")).json();
    assert_eq!(m["versions"][0]["deleted"], true, "{m}");
    // The restored server goes on: the grants came along, and it writes.
    ok(server.kms(&["secret", "put", "crash-a/s1", "v=after the restore"], ""));
    assert_eq!(
        ok(server.kms(&["secret", "get", "crash-a/s1", "--field", "v"], "")).stdout,
        "after the restore"
    );
}

/// Every file of a redb store and its audit log under `dir`, read.
fn store_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kms.redb"))
                || path.parent().is_some_and(|p| p.ends_with("kms.redb.audit"))
            {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_names_paths_and_versions_and_holds_no_value() {
    let hsm = TestHsm::new("kms-secrets-audit");
    let (server, _) = start_unsealed(&hsm, &config(&hsm, ""));
    grant_admin_everything(&server);
    ok(server.kms(
        &[
            "secret",
            "put",
            "audit/db",
            &format!("password={}", VALUES[0]),
        ],
        "",
    ));
    ok(server.kms(&["secret", "put", "audit/db", "token=-"], VALUES[1]));
    ok(server.kms(
        &[
            "secret",
            "patch",
            "audit/db",
            &format!("password={}", VALUES[3]),
        ],
        "",
    ));
    ok(server.kms(&["secret", "get", "audit/db", "--version", "2"], ""));
    ok(server.kms(&["secret", "delete", "audit/db", "--versions", "1,2"], ""));
    ok(server.kms(&["secret", "destroy", "audit/db", "--versions", "1"], ""));
    let refused_read = server.kms(&["secret", "get", "audit/db", "--version", "1"], "");
    assert_eq!(refused_read.code, Some(1));
    ok(server.kms(
        &[
            "secret",
            "metadata",
            "put",
            "audit/db",
            "--custom",
            &format!("note={}", VALUES[2]),
        ],
        "",
    ));
    let app = hsm.pki.client("app", &ClientSpec::spiffe("payments-api"));
    let denied = server.kms_as(Some(&app), &["secret", "get", "audit/db"], "");
    assert_eq!(denied.code, Some(1));
    let denied = server.kms_as(
        Some(&app),
        &["secret", "destroy", "audit/db", "--versions", "2"],
        "",
    );
    assert_eq!(denied.code, Some(1));

    let export = hsm.path().join("audit.jsonl");
    ok(server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", export.to_str().unwrap()],
        "",
    ));
    let text = std::fs::read_to_string(&export).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r.get("seq").is_some() && r["event"]["service"] == "kms.v1.Secrets")
        .collect();
    let find = |operation: &str, outcome: &str, versions: &[u64]| {
        records
            .iter()
            .find(|r| {
                r["event"]["operation"] == operation
                    && r["event"]["outcome"] == outcome
                    && r["event"]["secret"]["path"] == "audit/db"
                    && r["event"]["secret"]
                        .get("versions")
                        .map_or(Vec::new(), |v| {
                            v.as_array()
                                .unwrap()
                                .iter()
                                .map(|n| n.as_u64().unwrap())
                                .collect()
                        })
                        == versions
            })
            .unwrap_or_else(|| {
                panic!("no {operation} {outcome} record of audit/db {versions:?}: {records:#?}")
            })
    };
    find("PutSecret", "OK", &[1]);
    find("PutSecret", "OK", &[2]);
    find("PatchSecret", "OK", &[3]);
    find("GetSecret", "OK", &[2]);
    find("DeleteSecretVersions", "OK", &[1, 2]);
    find("DestroySecretVersions", "OK", &[1]);
    find("UpdateSecretMetadata", "OK", &[]);
    let denied = records
        .iter()
        .find(|r| {
            r["event"]["operation"] == "GetSecret"
                && r["event"]["principal"] == app.principal.as_str()
        })
        .expect("the refused read is recorded");
    assert_eq!(denied["event"]["outcome"], "PERMISSION_DENIED", "{denied}");
    assert_eq!(denied["event"]["secret"]["path"], "audit/db", "{denied}");
    // Calls that fail are recorded with the versions they asked for.
    find("GetSecret", "NOT_FOUND", &[1]);
    find("DestroySecretVersions", "PERMISSION_DENIED", &[2]);
    // The auditors' report names the secret the refused read asked for, and makes no key of
    // it.
    let report = ok(server.kms_as(
        Some(&server.auditor),
        &["audit", "report", "--format", "json"],
        "",
    ))
    .json();
    let row = report["refused"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["operation"] == "GetSecret" && f["principal"] == app.principal.as_str())
        .unwrap_or_else(|| panic!("no refused GetSecret row: {report:#}"));
    assert_eq!(row["secret_path"], "audit/db", "{row}");
    assert_eq!(row["key"], Value::Null, "{row}");
    assert_eq!(row["outcome"], "PERMISSION_DENIED", "{row}");
    assert!(
        report["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["key"] != "audit/db"),
        "{report:#}"
    );
    let created = records
        .iter()
        .find(|r| r["event"]["operation"] == "CreateSecretGrant")
        .unwrap();
    assert_eq!(created["event"]["secret"]["path"], "*", "{created}");
    // No value anywhere: the export, every file of the store and its audit log on disk,
    // the server's log.
    let mut places = vec![
        ("the export".to_owned(), text.into_bytes()),
        ("the server log".to_owned(), hsm.logs().into_bytes()),
    ];
    let files = store_files(hsm.path());
    assert!(
        files
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "log")),
        "the audit log's files are read too: {:?}",
        files.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    places.extend(
        files
            .into_iter()
            .map(|(p, bytes)| (p.display().to_string(), bytes)),
    );
    for (what, bytes) in &places {
        for v in VALUES {
            assert!(
                !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
                "{v:?} found in {what}"
            );
        }
    }
    // The paths and versions are there (the check above looks at the right bytes).
    assert!(places[0].1.windows(8).any(|w| w == b"audit/db"));
}

/// Two servers on one PostgreSQL database, unsealed, the admin granted everything.
fn two_servers(pg: &TestPostgres, hsm: &TestHsm) -> (Server, Server) {
    let config = config(hsm, &pg.storage_table());
    let (a, shares) = start_unsealed(hsm, &config);
    let b = hsm.try_start(&config, &[]).unwrap();
    b.unseal_with(&shares);
    grant_admin_everything(&a);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_two_servers_share_secrets_and_check_and_set_is_atomic() {
    let pg = TestPostgres::start();
    let hsm = TestHsm::new("kms-secrets-pg");
    let (a, b) = two_servers(&pg, &hsm);
    let (mut ca, mut cb) = (secrets(&a, &a.admin).await, secrets(&b, &b.admin).await);
    // B uses A's grant at once.
    let none = get(&mut cb, "none/yet", 0).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::NotFound, "{none:?}");
    // A write on A is read on B by B's very next call: the engine reads the store at each
    // call.
    for i in 1..=5u64 {
        let v = format!("written on A, round {i}");
        assert_eq!(put(&mut ca, "shared/x", &[("v", &v)]).await, i);
        let r = get(&mut cb, "shared/x", 0).await.unwrap();
        assert_eq!(r.version.unwrap().version, i);
        assert_eq!(r.data["v"], v);
    }
    // And through the CLI on B.
    let out = ok(b.kms(&["secret", "get", "shared/x", "--field", "v"], ""));
    assert_eq!(out.stdout, "written on A, round 5");

    // Check-and-set across servers: each round both write `cas = current` at once; exactly
    // one wins, the other is told the version moved.
    let mut current = 5;
    let rounds = 40;
    let (mut a_won, mut b_won) = (0, 0);
    for round in 0..rounds {
        let req = |who: &str| pb::PutSecretRequest {
            path: "shared/x".into(),
            data: [("v".to_owned(), format!("{who} round {round}"))].into(),
            cas: Some(current),
        };
        let (ra, rb) = tokio::join!(ca.put_secret(req("A")), cb.put_secret(req("B")));
        let outcomes = [ra, rb].map(|r| r.map(|v| v.into_inner().version));
        let won: Vec<usize> = (0..2).filter(|i| outcomes[*i].is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {outcomes:?}");
        let loser = &outcomes[1 - won[0]];
        let e = loser.as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("did not match"), "{e:?}");
        assert_eq!(*outcomes[won[0]].as_ref().unwrap(), current + 1);
        current += 1;
        if won[0] == 0 {
            a_won += 1;
        } else {
            b_won += 1;
        }
        let winner = if won[0] == 0 { "A" } else { "B" };
        let r = get(&mut ca, "shared/x", 0).await.unwrap();
        assert_eq!(r.version.unwrap().version, current);
        assert_eq!(r.data["v"], format!("{winner} round {round}"));
    }
    eprintln!("check-and-set: A won {a_won}, B won {b_won} of {rounds} rounds");
    let m = ok(a.kms(&["secret", "metadata", "get", "shared/x", "--json"], "")).json();
    assert_eq!(m["current_version"], current);

    // A grant revoked on A is refused on B at once.
    let app = hsm.pki.client("app", &ClientSpec::spiffe("payments-api"));
    let out = ok(a.kms(
        &[
            "secret",
            "grant",
            "create",
            "shared/*",
            &app.principal,
            "--operations",
            "secret-read",
            "--json",
        ],
        "",
    ));
    let id = out.json()["id"].as_str().unwrap().to_owned();
    let mut capp = secrets(&b, &app).await;
    get(&mut capp, "shared/x", 0)
        .await
        .expect("B allows the grant made on A at once");
    // Revoked on A: the very next call on B is refused (B reads the record every change of
    // the grants writes at each decision; before, B went on allowing the grant for good,
    // since a removal is never announced).
    // (By gRPC, so that nothing but the network lies between the two calls.)
    ca.revoke_secret_grant(pb::RevokeSecretGrantRequest { id })
        .await
        .unwrap();
    let e = get(&mut capp, "shared/x", 0)
        .await
        .expect_err("the first call on B after the revocation on A is refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // And a grant made on A is used on B at once, too.
    ok(a.kms(
        &[
            "secret",
            "grant",
            "create",
            "shared/*",
            &app.principal,
            "--operations",
            "secret-read",
        ],
        "",
    ));
    get(&mut capp, "shared/x", 0)
        .await
        .expect("the first call on B after the grant on A is allowed");
    no_value_in(&hsm.logs());
}
