//! `kms db` and `kms lease` (docs/databases.md) end to end: a real server over a SoftHSM
//! token and a real PostgreSQL, driven through the CLI only. An admin puts a connection
//! (the root password from a 0600 file) and a role; the application asks for credentials,
//! logs in with them and can do what the creation statements granted and nothing more;
//! it looks the lease up and renews it (the lease's expiry and the login's `VALID UNTIL`
//! both move); it revokes it (the login is gone from `pg_roles`). Bad input is refused
//! with a clear error and leaves nothing behind; no password reaches the server's log or
//! the audit log. A second test takes a lease whose revocation the database refuses to
//! irrevocable, and drops its record with `--force`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{ClientSpec, Out, TestHsm, start_unsealed};

/// Asserts the CLI succeeded; its output.
fn ok(out: Out) -> Out {
    assert_eq!(out.code, Some(0), "{out:?}");
    out
}

/// Asserts the CLI failed (exit 1) with `code` and `text` in its error, and printed nothing
/// on standard output.
fn refused(out: &Out, code: &str, text: &str) {
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        out.stderr.contains(code) && out.stderr.contains(text),
        "expected {code} and {text:?}: {out:?}"
    );
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The logins whose name starts with `prefix`, as the superuser sees them.
fn logins(pg: &TestPostgres, prefix: &str) -> Vec<String> {
    pg.sql(&format!(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE '{prefix}%' ORDER BY 1"
    ))
    .lines()
    .map(str::to_owned)
    .collect()
}

/// A login's `VALID UNTIL`, Unix seconds.
fn valid_until(pg: &TestPostgres, login: &str) -> u64 {
    pg.sql(&format!(
        "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles WHERE rolname = '{login}'"
    ))
    .trim()
    .parse()
    .unwrap()
}

/// Whether `login` can connect to database `app` with `password` (psql, as a client would).
fn can_log_in(pg: &TestPostgres, login: &str, password: &str) -> bool {
    std::process::Command::new(pg.bin_dir().join("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", login, "-d", "app", "-c", "SELECT 1"])
        .env("PGPASSWORD", password)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn database_credentials_through_the_cli() {
    let hsm = TestHsm::new("databases-cli");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    let as_app = |args: &[&str]| server.kms_as(Some(&app), args, "");
    let as_other = |args: &[&str]| server.kms_as(Some(&other), args, "");

    // The database: a root login with CREATEROLE, which owns a table in database `app`.
    let pg = TestPostgres::start();
    let root_password = format!("Root-{}", &pg.password[..20]);
    pg.sql(&format!(
        "CREATE ROLE kms_root LOGIN CREATEROLE PASSWORD '{root_password}'"
    ));
    pg.sql("CREATE DATABASE app OWNER kms_root");
    pg.sql_in(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, item text); \
         INSERT INTO orders VALUES (1, 'tea'), (2, 'cake'); \
         ALTER TABLE orders OWNER TO kms_root",
    );
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("root-password");
    std::fs::write(&password_file, format!("{root_password}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let url = format!(
        "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    let put_connection = |name: &str, url: &str| {
        server.kms(
            &[
                "db",
                "connection",
                "put",
                name,
                "--url",
                url,
                "--username",
                "kms_root",
                "--password-file",
                password_file.to_str().unwrap(),
                "--allowed-role",
                "app",
                "--json",
            ],
            "",
        )
    };

    // A password file others can read is refused before any call; then 0600.
    refused(&put_connection("pg", &url), "error", "chmod 600");
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A password is never an argument: there is no such flag.
    let argument = server.kms(
        &[
            "db",
            "connection",
            "put",
            "pg",
            "--url",
            &url,
            "--username",
            "kms_root",
            "--password",
            &root_password,
        ],
        "",
    );
    assert_eq!(argument.code, Some(2), "{argument:?}");
    assert!(
        argument.stderr.contains("unexpected argument '--password'"),
        "{argument:?}"
    );
    // A URL without {{password}}: refused by the server, nothing stored.
    let no_placeholder = format!(
        "postgresql://{{{{username}}}}@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    let bad = put_connection("nopw", &no_placeholder);
    refused(&bad, "INVALID_ARGUMENT", "{{password}}");
    assert!(!bad.stderr.contains(&root_password), "{bad:?}");

    let created = ok(put_connection("pg", &url)).json();
    assert_eq!(created["name"], "pg");
    assert_eq!(created["connection_url"], url.as_str());
    assert_eq!(created["username"], "kms_root");
    assert_eq!(created["allowed_roles"][0], "app");
    assert_eq!(created["created_by"], server.admin.principal.as_str());
    let listed = ok(server.kms(&["db", "connection", "list", "--json"], "")).json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0], created);
    // Put again: the password from standard input, then none (no terminal: the stored one
    // is kept); the rest replaced.
    let again = |extra: &[&str], stdin: &str| {
        let mut args = vec![
            "db",
            "connection",
            "put",
            "pg",
            "--url",
            &url,
            "--username",
            "kms_root",
            "--allowed-role",
            "app",
            "--json",
        ];
        args.extend_from_slice(extra);
        ok(server.kms(&args, stdin)).json()
    };
    let from_stdin = again(
        &["--password-stdin", "--max-open-connections", "2"],
        &format!("{root_password}\n"),
    );
    assert_eq!(from_stdin["max_open_connections"], 2);
    assert_eq!(from_stdin["created_unix_ms"], created["created_unix_ms"]);
    let kept = again(&[], "");
    assert_eq!(kept["max_open_connections"], 4);
    refused(
        &server.kms(
            &[
                "db",
                "connection",
                "put",
                "pg",
                "--url",
                &url,
                "--username",
                "kms_root",
                "--password-stdin",
            ],
            "",
        ),
        "error",
        "--password-stdin: no password",
    );
    let shown = ok(server.kms(&["db", "connection", "get", "pg"], "")).stdout;
    assert!(
        shown.contains("kms_root") && shown.contains("app"),
        "{shown}"
    );
    // Only administrators read connections.
    refused(
        &as_app(&["db", "connection", "get", "pg"]),
        "PERMISSION_DENIED",
        "",
    );

    // The role: SELECT on the table, 10 minutes by default, at most an hour, for `app`.
    let create = "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' \
                  VALID UNTIL '{{expiration}}'; \
                  GRANT SELECT ON orders TO \"{{name}}\";";
    let role = ok(server.kms(
        &[
            "db",
            "role",
            "put",
            "app",
            "--connection",
            "pg",
            "--creation-statement",
            create,
            "--default-ttl",
            "10m",
            "--max-ttl",
            "1h",
            "--principal",
            &app.principal,
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(role["connection"], "pg");
    assert_eq!(role["default_ttl_seconds"], 600);
    assert_eq!(role["max_ttl_seconds"], 3600);
    assert_eq!(role["principals"][0], app.principal.as_str());
    assert_eq!(role["creation_statements"][0], create);
    // A role the connection does not allow: refused, nothing stored.
    refused(
        &server.kms(
            &[
                "db",
                "role",
                "put",
                "intruder",
                "--connection",
                "pg",
                "--creation-statement",
                create,
            ],
            "",
        ),
        "FAILED_PRECONDITION",
        "intruder",
    );
    let roles = ok(server.kms(&["db", "role", "list", "--json"], "")).json();
    assert_eq!(roles.as_array().unwrap().len(), 1, "{roles}");
    assert_eq!(roles[0]["name"], "app");
    // A duration under a second is refused by the CLI, not rounded to 0 ("the default").
    let short = as_app(&["db", "creds", "app", "--ttl", "500ms"]);
    assert_eq!(short.code, Some(2), "{short:?}");
    assert!(short.stderr.contains("at least 1s"), "{short:?}");

    // (The stored password was kept: a login is made with it below.)
    // Refusals leave no lease and no login.
    refused(
        &as_app(&["db", "creds", "app", "--ttl", "2h"]),
        "INVALID_ARGUMENT",
        "max_ttl_seconds 3600",
    );
    refused(
        &as_other(&["db", "creds", "app"]),
        "PERMISSION_DENIED",
        "principals",
    );
    refused(&as_app(&["db", "creds", "nosuch"]), "NOT_FOUND", "nosuch");
    assert_eq!(
        ok(server.kms(&["lease", "list", "--json"], "")).json(),
        serde_json::json!([])
    );
    assert_eq!(logins(&pg, "kms_app_"), Vec::<String>::new());

    // The application's credentials, as Vault shapes them.
    let before = now();
    let creds = ok(as_app(&["db", "creds", "app", "--json"])).json();
    let lease_id = creds["lease_id"].as_str().unwrap().to_owned();
    let username = creds["data"]["username"].as_str().unwrap().to_owned();
    let password = creds["data"]["password"].as_str().unwrap().to_owned();
    assert!(lease_id.starts_with("database/creds/app/"), "{creds}");
    assert_eq!(creds["lease_duration"], 600);
    assert_eq!(creds["renewable"], true);
    assert_eq!(creds["username"], username.as_str());
    assert_eq!(creds["password"], password.as_str());
    assert!(username.starts_with("kms_app_app_"), "{username}");
    assert_eq!(password.len(), 32);
    assert_eq!(logins(&pg, "kms_app_"), vec![username.clone()]);

    // The login can read the table, and only read it.
    let mut session = pg.session_as(&username, &password, "app");
    session.send("SELECT item FROM orders ORDER BY id;");
    assert_eq!(session.sync(Duration::from_secs(10)), ["tea", "cake"]);
    session.send("INSERT INTO orders VALUES (3, 'pie');");
    // psql writes the error on standard error, which may come after the sync mark.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !session
        .seen
        .iter()
        .any(|l| l.contains("permission denied for table orders"))
    {
        assert!(Instant::now() < deadline, "{:?}", session.seen);
        session.sync(Duration::from_secs(10));
    }
    assert_eq!(
        pg.sql_in(
            "app",
            &format!(
                "SELECT has_table_privilege('{username}', 'orders', 'SELECT'), \
                 has_table_privilege('{username}', 'orders', 'INSERT')"
            )
        )
        .trim(),
        "t|f"
    );
    // (The session stays open: the revocation must end it.)
    assert_eq!(pg.sql_in("app", "SELECT count(*) FROM orders").trim(), "2");

    // Lookup: the holder sees it; another caller does not (NOT_FOUND, as if absent).
    let looked = ok(as_app(&["lease", "lookup", &lease_id, "--json"])).json();
    assert_eq!(looked["username"], username.as_str());
    assert_eq!(looked["principal"], app.principal.as_str());
    assert_eq!(looked["state"], "active");
    assert_eq!(looked["role"], "app");
    let expires = looked["expires_unix"].as_u64().unwrap();
    assert!((before + 600..=now() + 600).contains(&expires), "{looked}");
    assert_eq!(
        looked["max_expires_unix"].as_u64().unwrap(),
        looked["issued_unix"].as_u64().unwrap() + 3600
    );
    assert_eq!(valid_until(&pg, &username), expires);
    refused(&as_other(&["lease", "lookup", &lease_id]), "NOT_FOUND", "");
    refused(&as_other(&["lease", "renew", &lease_id]), "NOT_FOUND", "");
    refused(&as_other(&["lease", "revoke", &lease_id]), "NOT_FOUND", "");

    // Renew by 30 minutes: the lease and the login's VALID UNTIL move together.
    let renewed = ok(as_app(&[
        "lease",
        "renew",
        &lease_id,
        "--increment",
        "30m",
        "--json",
    ]))
    .json();
    let new_expires = renewed["expires_unix"].as_u64().unwrap();
    assert!(new_expires >= expires + 1200, "{renewed}");
    assert!(new_expires <= now() + 1800, "{renewed}");
    assert!(renewed["last_renewal_unix"].as_u64().unwrap() >= before);
    assert_eq!(valid_until(&pg, &username), new_expires);
    // Never past the role's maximum.
    let capped = ok(as_app(&[
        "lease",
        "renew",
        &lease_id,
        "--increment",
        "5h",
        "--json",
    ]))
    .json();
    assert_eq!(
        capped["expires_unix"], capped["max_expires_unix"],
        "{capped}"
    );
    assert_eq!(capped["renewable"], false, "{capped}");
    assert_eq!(
        valid_until(&pg, &username),
        capped["expires_unix"].as_u64().unwrap()
    );
    // The table of leases, for the administrator.
    let table = ok(server.kms(&["lease", "list"], "")).stdout;
    assert!(
        table.contains("LEASE ID") && table.contains(&lease_id) && table.contains(&username),
        "{table}"
    );
    refused(&as_app(&["lease", "list"]), "PERMISSION_DENIED", "");

    // A second login, printed for people: the password once, with a word about it.
    let human = ok(as_app(&["db", "creds", "app", "--ttl", "15m"])).stdout;
    assert!(human.contains("shown once"), "{human}");
    assert!(
        human.contains("Lease duration") && human.contains("15m"),
        "{human}"
    );
    let second_user = human
        .lines()
        .find_map(|l| l.strip_prefix("Username"))
        .unwrap()
        .trim()
        .to_owned();
    let second_password = human
        .lines()
        .find_map(|l| l.strip_prefix("Password"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(second_password.len(), 32, "{human}");
    let mut second = pg.session_as(&second_user, &second_password, "app");
    second.send("SELECT count(*) FROM orders;");
    assert_eq!(second.sync(Duration::from_secs(10)), ["2"]);
    drop(second);

    assert!(can_log_in(&pg, &username, &password));
    // The holder revokes the first: the login is gone, its open session ended (the root
    // login has CREATEROLE and no superuser), the lease gone too.
    let sessions = |login: &str| {
        pg.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{login}'"
        ))
        .trim()
        .to_owned()
    };
    assert_eq!(sessions(&username), "1");
    let revoked = ok(as_app(&["lease", "revoke", &lease_id])).stdout;
    assert!(revoked.contains("revoked"), "{revoked}");
    assert_eq!(logins(&pg, &username), Vec::<String>::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions(&username) != "0" {
        assert!(Instant::now() < deadline, "the login's session outlived it");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(session);
    assert!(!can_log_in(&pg, &username, &password));
    refused(&as_app(&["lease", "lookup", &lease_id]), "NOT_FOUND", "");
    // Only an administrator forces.
    let second_lease = ok(server.kms(&["lease", "list", "--json"], "")).json();
    assert_eq!(second_lease.as_array().unwrap().len(), 1, "{second_lease}");
    assert_eq!(second_lease[0]["username"], second_user.as_str());
    let second_id = second_lease[0]["lease_id"].as_str().unwrap().to_owned();
    refused(
        &as_app(&["lease", "revoke", &second_id, "--force"]),
        "PERMISSION_DENIED",
        "administrator",
    );
    // A role with a live lease is not deleted without --force.
    refused(
        &server.kms(&["db", "role", "delete", "app"], ""),
        "FAILED_PRECONDITION",
        "has 1 live lease(s)",
    );

    // The root password, rotated: only kms knows it now (the old one is refused), and
    // kms uses the new one (the revocation below).
    let before_rotation = now();
    assert!(can_log_in(&pg, "kms_root", &root_password));
    let rotated = ok(server.kms(&["db", "connection", "rotate-root", "pg", "--json"], "")).json();
    assert!(
        rotated["root_rotated_unix"].as_u64().unwrap() >= before_rotation,
        "{rotated}"
    );
    assert!(!can_log_in(&pg, "kms_root", &root_password));

    // Revoke by prefix: scheduled now, revoked by the server.
    let scheduled = ok(server.kms(&["lease", "revoke-prefix", "database/creds/app/"], "")).stdout;
    assert!(scheduled.starts_with("1 lease(s) scheduled"), "{scheduled}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logins(&pg, &second_user).is_empty() || {
        let left = ok(server.kms(&["lease", "list", "--json"], "")).json();
        !left.as_array().unwrap().is_empty()
    } {
        assert!(
            Instant::now() < deadline,
            "the second login was not revoked"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(logins(&pg, "kms_app_"), Vec::<String>::new());
    assert_eq!(
        ok(server.kms(&["lease", "list", "--json"], "")).json(),
        serde_json::json!([])
    );
    assert_eq!(
        ok(server.kms(&["lease", "list"], ""))
            .stdout
            .lines()
            .count(),
        1
    );

    // Now the role and the connection go without --force.
    let deleted = ok(server.kms(&["db", "role", "delete", "app"], "")).stdout;
    assert!(deleted.contains("0 lease(s)"), "{deleted}");
    ok(server.kms(&["db", "connection", "delete", "pg"], ""));
    assert_eq!(
        ok(server.kms(&["db", "connection", "list", "--json"], "")).json(),
        serde_json::json!([])
    );

    // No password in the server's log or the audit log.
    let export = ok(server.kms_as(Some(&hsm.auditor), &["audit", "export"], "")).stdout;
    assert!(export.contains("GetDatabaseCredentials"), "no record?");
    assert!(export.contains(&lease_id), "no record of the lease?");
    let log = hsm.logs();
    for secret in [&root_password, &password, &second_password] {
        assert!(
            !export.contains(secret.as_str()),
            "a password in the audit log"
        );
        assert!(
            !log.contains(secret.as_str()),
            "a password in the server's log"
        );
    }
}

/// The value of the gauge `kms_database_leases_irrevocable` the server exposes.
fn irrevocable_gauge(metrics: &str) -> String {
    let (code, text) = softhsm_tests::http_get(metrics);
    assert_eq!(code, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("kms_database_leases_irrevocable "))
        .unwrap_or_else(|| panic!("no gauge in:\n{text}"))
        .trim()
        .to_owned()
}

/// A lease whose revocation the database refuses: retried, then irrevocable (listed,
/// counted by the metric, not renewable); `lease revoke` still refused; `--force` drops
/// the record (the login is then the operator's to drop).
#[test]
fn an_irrevocable_lease_is_listed_counted_and_forced() {
    let hsm = TestHsm::new("databases-irrevocable");
    let config = hsm.config_full(
        "kms.toml",
        &hsm.hsm_table(),
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[databases]\nmax_attempts = 2\nretry_seconds = 1\n",
    );
    let (server, _shares) = start_unsealed(&hsm, &config);
    let metrics = server.metrics.clone().expect("the metrics URL");
    assert_eq!(irrevocable_gauge(&metrics), "0");

    let pg = TestPostgres::start();
    let root_password = format!("Root-{}", &pg.password[..20]);
    pg.sql(&format!(
        "CREATE ROLE kms_root LOGIN CREATEROLE PASSWORD '{root_password}'"
    ));
    pg.sql("CREATE DATABASE app OWNER kms_root");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("root-password");
    std::fs::write(&password_file, &root_password).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!(
        "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    ok(server.kms(
        &[
            "db",
            "connection",
            "put",
            "pg",
            "--url",
            &url,
            "--username",
            "kms_root",
            "--password-file",
            password_file.to_str().unwrap(),
            "--allowed-role",
            "flaky",
        ],
        "",
    ));
    // A revocation the database always refuses (division by zero: SQLSTATE 22012).
    ok(server.kms(
        &[
            "db",
            "role",
            "put",
            "flaky",
            "--connection",
            "pg",
            "--creation-statement",
            "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            "--revocation-statement",
            "SELECT 1/0;",
            "--default-ttl",
            "1s",
            "--max-ttl",
            "1m",
            "--principal",
            &server.admin.principal,
        ],
        "",
    ));
    let creds = ok(server.kms(&["db", "creds", "flaky", "--json"], "")).json();
    let lease_id = creds["lease_id"].as_str().unwrap().to_owned();
    let username = creds["username"].as_str().unwrap().to_owned();
    assert_eq!(creds["lease_duration"], 1);

    // Expired, refused twice (1 s apart), then irrevocable.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let listed = ok(server.kms(&["lease", "list", "--irrevocable", "--json"], "")).json();
        if !listed.as_array().unwrap().is_empty() {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "the lease never became irrevocable"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["lease_id"], lease_id.as_str());
    assert_eq!(listed[0]["state"], "irrevocable");
    assert_eq!(listed[0]["revocation_attempts"], 2);
    assert_eq!(listed[0]["renewable"], false);
    assert!(
        listed[0]["last_error"].as_str().unwrap().contains("22012"),
        "{listed}"
    );
    // The login is still there: that is what irrevocable means.
    assert_eq!(logins(&pg, &username), vec![username.clone()]);
    let table = ok(server.kms(&["lease", "list", "--irrevocable"], "")).stdout;
    assert!(
        table.contains("irrevocable") && table.contains(&lease_id),
        "{table}"
    );
    let shown = ok(server.kms(&["lease", "lookup", &lease_id], "")).stdout;
    assert!(
        shown.contains("Revocation attempts") && shown.contains("22012"),
        "{shown}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while irrevocable_gauge(&metrics) != "1" {
        assert!(Instant::now() < deadline, "the gauge never counted it");
        std::thread::sleep(Duration::from_millis(250));
    }

    // Not renewable; a plain revocation is refused as the database refuses it.
    refused(
        &server.kms(&["lease", "renew", &lease_id], ""),
        "FAILED_PRECONDITION",
        "expired",
    );
    refused(
        &server.kms(&["lease", "revoke", &lease_id], ""),
        "FAILED_PRECONDITION",
        "22012",
    );
    assert_eq!(
        ok(server.kms(&["lease", "list", "--irrevocable", "--json"], ""))
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The operator drops the login by hand, then the record with --force.
    pg.sql(&format!("DROP ROLE \"{username}\""));
    let forced = ok(server.kms(&["lease", "revoke", &lease_id, "--force"], "")).stdout;
    assert!(forced.contains("record dropped"), "{forced}");
    assert_eq!(
        ok(server.kms(&["lease", "list", "--json"], "")).json(),
        serde_json::json!([])
    );
    refused(
        &server.kms(&["lease", "lookup", &lease_id], ""),
        "NOT_FOUND",
        "",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while irrevocable_gauge(&metrics) != "0" {
        assert!(Instant::now() < deadline, "the gauge still counts it");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!hsm.logs().contains(&root_password));
}

#[test]
fn a_static_role_through_the_cli() {
    let hsm = TestHsm::new("databases-static-cli");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let pg = TestPostgres::start();
    let root_password = format!("Root-{}", &pg.password[..20]);
    pg.sql(&format!(
        "CREATE ROLE kms_root LOGIN CREATEROLE PASSWORD '{root_password}'"
    ));
    pg.sql("CREATE DATABASE app OWNER kms_root");
    pg.sql("CREATE ROLE reporting LOGIN PASSWORD 'Before-kms-0123456789'");
    let url = format!(
        "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    ok(server.kms(
        &[
            "db",
            "connection",
            "put",
            "app",
            "--url",
            &url,
            "--username",
            "kms_root",
            "--password-stdin",
            "--allowed-role",
            "reporting",
        ],
        &format!("{root_password}\n"),
    ));
    let put = ok(server.kms(
        &[
            "db",
            "static-role",
            "put",
            "reporting",
            "--connection",
            "app",
            "--username",
            "reporting",
            "--rotation-period",
            "1h",
            "--principal",
            &app.principal,
            "--json",
        ],
        "",
    ));
    let made: serde_json::Value = serde_json::from_str(&put.stdout).unwrap();
    assert_eq!(made["rotation_period_seconds"], 3600);
    assert!(!put.stdout.contains("password\""), "{put:?}");
    assert!(!can_log_in(&pg, "reporting", "Before-kms-0123456789"));
    let creds = |who: Option<&softhsm_tests::Cred>| {
        let out = ok(server.kms_as(who, &["db", "static-creds", "reporting", "--json"], ""));
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["data"].clone()
    };
    let first = creds(Some(&app));
    assert_eq!(first["username"], "reporting");
    let first = first["password"].as_str().unwrap().to_owned();
    assert!(can_log_in(&pg, "reporting", &first));
    // The admin is not among the static role's principals.
    refused(
        &server.kms(&["db", "static-creds", "reporting"], ""),
        "PERMISSION_DENIED",
        "does not name this caller",
    );
    ok(server.kms(&["db", "static-role", "rotate", "reporting"], ""));
    let second = creds(Some(&app))["password"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    assert!(can_log_in(&pg, "reporting", &second));
    assert!(!can_log_in(&pg, "reporting", &first));
    let listed = ok(server.kms(&["db", "static-role", "list"], ""));
    assert!(listed.stdout.contains("reporting"), "{listed:?}");
    refused(
        &server.kms(
            &[
                "db",
                "static-role",
                "put",
                "bad",
                "--connection",
                "app",
                "--username",
                "x",
                "--rotation-period",
                "30s",
            ],
            "",
        ),
        "INVALID_ARGUMENT",
        "rotation_period_seconds",
    );
    ok(server.kms(&["db", "static-role", "delete", "reporting"], ""));
    // No longer managed: the password it had stays.
    assert!(can_log_in(&pg, "reporting", &second));
    let logs = hsm.logs();
    for secret in [&first, &second, &root_password] {
        assert!(!logs.contains(secret.as_str()), "a password was logged");
    }
}
