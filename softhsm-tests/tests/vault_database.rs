//! Vault's database engine (`/v1/database/...`) and lease paths (`/v1/sys/leases/...`) on
//! the Vault-compatible HTTPS front (docs/vault-database.md), driven by the real `hvac`
//! client over mTLS against a real server on a SoftHSM token, making logins on a real
//! PostgreSQL that the script logs in to with `psycopg`: connections and roles and their
//! refusals, credentials issued, renewed, looked up and revoked by their holder, a caller
//! the role does not name and who does not hold the lease, leases listed and revoked by
//! prefix and by force, the root password rotated; the logins in `pg_roles` after each
//! step, the audit records the calls leave (`front: http`), and no password (issued or
//! root) in the server's log or the audit export.
//!
//! The script is `vault_database_client.py` beside this file; the interpreter is
//! `KMS_TEST_PYTHON`, else `target/pyenv` (scripts/test installs hvac and psycopg there).
//! The test fails, never skips, when neither is there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{ClientSpec, Server, TestHsm};

/// Runs a phase of the client script; its JSON output.
fn client(phase: &str, config: &serde_json::Value) -> serde_json::Value {
    softhsm_tests::python_phase("vault_database_client.py", phase, config)
}

/// Every record the audit log holds, as the auditor exports them.
fn audit_events(server: &Server, hsm: &TestHsm) -> Vec<serde_json::Value> {
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .collect()
}

/// The logins kms made that PostgreSQL still has.
fn kms_logins(pg: &TestPostgres) -> Vec<String> {
    pg.sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'kms\\_%' ORDER BY rolname")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The root login's password the test gives kms (then rotated away).
const ROOT_PASSWORD: &str = "root-password-3b9e7c21";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_database_clients_work_unchanged_against_the_database_mount() {
    let pg = TestPostgres::start_empty();
    // The root login kms makes logins with: not a superuser, only CREATEROLE, as Vault
    // advises (the default revocation must end a login's sessions and take what it owns
    // as such a login); and a database with a table the logins may read.
    pg.sql(&format!(
        "CREATE ROLE kmsroot LOGIN CREATEROLE PASSWORD '{ROOT_PASSWORD}'"
    ));
    pg.sql("CREATE DATABASE app OWNER kmsroot");
    pg.sql_in(
        "app",
        "CREATE TABLE public.items (id int); INSERT INTO public.items VALUES (1), (2), (3); ALTER TABLE public.items OWNER TO kmsroot;",
    );

    let hsm = TestHsm::new("vault-db");
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, "");
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    let mut cfg = serde_json::json!({
        "url": format!("https://127.0.0.1:{port}"),
        "ca": server.ca,
        "admin_cert": hsm.admin.cert,
        "admin_key": hsm.admin.key,
        "admin_principal": hsm.admin.principal,
        "app_cert": app.cert,
        "app_key": app.key,
        "app_principal": app.principal,
        "other_cert": other.cert,
        "other_key": other.key,
        "pg_port": pg.port,
        "root_password": ROOT_PASSWORD,
    });
    let mut passwords: Vec<String> = vec![ROOT_PASSWORD.to_owned()];
    let mut keep = |out: &serde_json::Value| {
        for p in out["passwords"].as_array().into_iter().flatten() {
            passwords.push(p.as_str().unwrap().to_owned());
        }
    };

    let admin = client("admin", &cfg);
    keep(&admin);
    assert!(
        admin["wrong_password"][0]
            .as_str()
            .unwrap()
            .contains("28P01"),
        "{admin}"
    );
    assert_eq!(admin["role"]["max_ttl"], 7200);
    assert_eq!(kms_logins(&pg).len(), 1, "the admin's login");

    let app_out = client("app", &cfg);
    keep(&app_out);
    let revoked_user = app_out["revoked"]["username"].as_str().unwrap();
    let kept_user = app_out["kept"]["username"].as_str().unwrap();
    let logins = kms_logins(&pg);
    assert!(!logins.iter().any(|l| l == revoked_user), "{logins:?}");
    assert!(logins.iter().any(|l| l == kept_user), "{logins:?}");
    assert_eq!(logins.len(), 2, "{logins:?}");
    // The renewals moved the login's validity in the database to the lease's end, as
    // lookup said it.
    let revoked_until = app_out["renewed_until"].as_str().unwrap();
    let kept_until = pg.sql(&format!(
        "SELECT to_char(rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM pg_roles WHERE rolname = '{kept_user}'"
    ));
    let kept_lease_until = app_out["kept"]["expire_time"].as_str().unwrap();
    assert_eq!(kept_until.trim(), kept_lease_until, "{app_out}");
    assert!(revoked_until > kept_lease_until, "{app_out}");

    cfg["kept"] = app_out["kept"].clone();
    cfg["admin_lease"] = admin["admin_lease"].clone();
    let other_out = client("other", &cfg);
    assert!(
        other_out["denied"][0]
            .as_str()
            .unwrap()
            .contains("principals"),
        "{other_out}"
    );
    assert!(kms_logins(&pg).iter().any(|l| l == kept_user));

    let prefix = client("prefix", &cfg);
    keep(&prefix);
    assert_eq!(kms_logins(&pg), Vec::<String>::new());

    let rotate = client("rotate", &cfg);
    keep(&rotate);
    assert_eq!(
        kms_logins(&pg),
        vec![rotate["username"].as_str().unwrap().to_owned()]
    );
    pg.sql("CREATE ROLE legacy LOGIN PASSWORD 'Legacy-Before-kms-0123'");
    let statics = client("static", &cfg);
    keep(&statics);
    cfg["lease"] = rotate["lease"].clone();
    client("cleanup", &cfg);
    assert_eq!(kms_logins(&pg), Vec::<String>::new());

    // The records: one per call through the front, naming the connection, role or lease.
    let events = audit_events(&server, &hsm);
    let of = |principal: &str, operation: &str, outcome: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| {
                e["principal"] == principal
                    && e["operation"] == operation
                    && e["outcome"] == outcome
                    && e["front"] == "http"
            })
            .collect()
    };
    let (admin_p, app_p, other_p) = (
        hsm.admin.principal.as_str(),
        app.principal.as_str(),
        other.principal.as_str(),
    );
    for e in of(admin_p, "PutDatabaseConnection", "OK") {
        assert_eq!(e["service"], "kms.v1.Databases", "{e}");
        assert_eq!(e["database"]["connection"], "pg", "{e}");
    }
    // Three in the admin phase, one to allow the static role.
    assert_eq!(of(admin_p, "PutDatabaseConnection", "OK").len(), 4);
    // The six refusals of the front and the wrong password.
    assert_eq!(
        of(admin_p, "PutDatabaseConnection", "INVALID_ARGUMENT").len(),
        6
    );
    assert_eq!(
        of(admin_p, "PutDatabaseConnection", "FAILED_PRECONDITION").len(),
        1
    );
    // Issued: the admin's, the app's two, three for the prefix, one after the rotation.
    assert_eq!(of(app_p, "GetDatabaseCredentials", "OK").len(), 6);
    assert_eq!(of(admin_p, "GetDatabaseCredentials", "OK").len(), 1);
    let denied = of(other_p, "GetDatabaseCredentials", "PERMISSION_DENIED");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["database"]["role"], "reader");
    let renewed = of(app_p, "RenewLease", "OK");
    assert_eq!(renewed.len(), 2);
    assert_eq!(
        renewed[0]["database"]["lease_id"],
        app_out["revoked"]["lease"]
    );
    assert_eq!(of(app_p, "RevokeLease", "OK").len(), 1);
    assert_eq!(of(app_p, "RevokeLease", "NOT_FOUND").len(), 1);
    // The other principal's revocation of the app's lease: recorded, and nothing done.
    assert_eq!(of(other_p, "RevokeLease", "NOT_FOUND").len(), 1);
    assert_eq!(of(app_p, "ListLeases", "PERMISSION_DENIED").len(), 1);
    assert_eq!(of(app_p, "PutDatabaseRole", "PERMISSION_DENIED").len(), 2);
    // Revoked by prefix: one record per lease revoked in the call (four, then one by
    // force), the prefix that matched nothing, the one scheduled for the revoker (whose
    // revocation is the server's own record).
    assert_eq!(of(admin_p, "RevokeLeasePrefix", "OK").len(), 4 + 1 + 1 + 1);
    let scheduled = of(admin_p, "RevokeLeasePrefix", "OK")
        .into_iter()
        .filter(|e| e["database"]["leases"] == 1 && e["database"]["username"].is_null())
        .count();
    assert_eq!(scheduled, 1, "{events:?}");
    assert_eq!(
        of(admin_p, "RevokeLeasePrefix", "INVALID_ARGUMENT").len(),
        1
    );
    assert_eq!(of(admin_p, "RotateDatabaseRoot", "OK").len(), 1);
    assert_eq!(of(admin_p, "DeleteDatabaseRole", "NOT_FOUND").len(), 1);

    // No password anywhere: the root password given (and the one it was rotated to, which
    // no one knows), every login's password issued, in the server's log or the export.
    let exported = serde_json::to_string(&events).unwrap();
    let logs = hsm.logs();
    assert_eq!(passwords.len(), 10, "{passwords:?}");
    for p in &passwords {
        assert!(
            !exported.contains(p.as_str()),
            "a password in the audit export"
        );
        assert!(!logs.contains(p.as_str()), "a password in the server log");
    }
    // The test would see one: the export names the logins' leases, and the log the
    // database's refusal of the wrong root password (without it).
    assert!(exported.contains(app_out["kept"]["lease"].as_str().unwrap()));
    assert!(logs.contains("28P01"), "{logs}");

    // Sealed: 503, as Vault's.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let sealed = client("sealed", &cfg);
    assert_eq!(sealed["codes"], serde_json::json!([503, 503, 503]));
}
