//! Dynamic database credentials (docs/databases.md) on a real server over a SoftHSM token,
//! against a real PostgreSQL (Debian's package, `initdb`/`pg_ctl`) whose root login is a
//! `CREATEROLE` login, not a superuser, as an operator would make it: logins made, used
//! (`psql`), renewed (`VALID UNTIL` moves), revoked with their open sessions ended and
//! their tables handed over, revoked at expiry by the server; a database stopped during
//! expiries; refusals retried, then irrevocable, then forced; the reconcile pass; two
//! servers on one store revoking each expiry once. No password reaches the server's log or
//! the audit log.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use pb::databases_client::DatabasesClient;
use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{ClientSpec, Cred, Server, TestHsm, expect_code, start_unsealed};
use tonic::Code;
use tonic::transport::Channel;

/// The root login kms manages logins with, and its password.
const ROOT: &str = "kmsroot";

/// Makes the application's database `app` with a table `items`, and the root login
/// (CREATEROLE, granted what the roles grant on). Returns the root password.
fn prepare(pg: &TestPostgres) -> String {
    let password = "Root-Pass-0123456789";
    pg.sql(&format!(
        "CREATE ROLE {ROOT} LOGIN CREATEROLE PASSWORD '{password}'"
    ));
    pg.sql(&format!("CREATE DATABASE app OWNER {ROOT}"));
    pg.sql_in(
        "app",
        &format!(
            "SET ROLE {ROOT}; CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2), (3);"
        ),
    );
    password.to_owned()
}

fn connection(pg: &TestPostgres, name: &str, roles: &[&str]) -> pb::DatabaseConnection {
    pb::DatabaseConnection {
        name: name.into(),
        connection_url: format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/app?sslmode=disable",
            pg.port
        ),
        username: ROOT.into(),
        allowed_roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        ..pb::DatabaseConnection::default()
    }
}

fn role(name: &str, principals: &[&str]) -> pb::DatabaseRole {
    pb::DatabaseRole {
        name: name.into(),
        connection: "app".into(),
        creation_statements: vec![
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';".into(),
            "GRANT SELECT ON items TO \"{{name}}\";".into(),
            "GRANT CREATE ON SCHEMA public TO \"{{name}}\";".into(),
        ],
        default_ttl_seconds: 60,
        max_ttl_seconds: 600,
        principals: principals.iter().map(|p| (*p).to_owned()).collect(),
        ..pb::DatabaseRole::default()
    }
}

async fn client(server: &Server, cred: &Cred) -> DatabasesClient<Channel> {
    DatabasesClient::new(server.channel(Some(cred)).await)
}

/// Sets up the connection `app` and the role `reader` for `principals`.
async fn set_up(
    admin: &mut DatabasesClient<Channel>,
    pg: &TestPostgres,
    root_password: &str,
    principals: &[&str],
) {
    let made = admin
        .put_database_connection(pb::PutDatabaseConnectionRequest {
            connection: Some(connection(pg, "app", &["reader", "fails-*"])),
            password: root_password.into(),
            skip_verify: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.plugin, "postgresql");
    assert_eq!(made.max_open_connections, 4);
    admin
        .put_database_role(pb::PutDatabaseRoleRequest {
            role: Some(role("reader", principals)),
        })
        .await
        .unwrap();
}

/// The logins of the cluster whose name starts with `kms_`.
fn kms_logins(pg: &TestPostgres) -> Vec<String> {
    pg.sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'kms\\_%' ORDER BY 1")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `VALID UNTIL` of `login`, as Unix seconds.
fn valid_until(pg: &TestPostgres, login: &str) -> u64 {
    pg.sql(&format!(
        "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles WHERE rolname = '{login}'"
    ))
    .trim()
    .parse()
    .unwrap()
}

/// Waits until `f` holds, at most `limit`.
fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The audit records of `server` (as its auditor exports them).
fn records(server: &Server, hsm: &TestHsm) -> Vec<serde_json::Value> {
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_made_used_renewed_and_dropped() {
    let pg = TestPostgres::start_empty();
    let root_password = prepare(&pg);
    let hsm = TestHsm::new("databases");
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), "");
    let (server, _shares) = start_unsealed(&hsm, &config);
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    let mut admin = client(&server, &server.admin).await;
    set_up(&mut admin, &pg, &root_password, &[&app.principal]).await;
    // The root password is never shown.
    let shown = admin
        .get_database_connection(pb::GetDatabaseConnectionRequest { name: "app".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{shown:?}").contains(&root_password));
    assert!(shown.connection_url.contains("{{password}}"));
    // The stored root password goes only where it was given for: pointing the connection
    // elsewhere without giving it again is refused (an administrator could otherwise read
    // it with a server of theirs), and nothing changes.
    let mut elsewhere = connection(&pg, "app", &["reader", "fails-*"]);
    elsewhere.connection_url =
        "postgresql://{{username}}:{{password}}@127.0.0.1:1/x?sslmode=disable".into();
    expect_code(
        admin
            .put_database_connection(pb::PutDatabaseConnectionRequest {
                connection: Some(elsewhere),
                password: String::new(),
                skip_verify: true,
            })
            .await,
        Code::InvalidArgument,
        "give the root password again",
    );
    let kept = admin
        .get_database_connection(pb::GetDatabaseConnectionRequest { name: "app".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.connection_url, shown.connection_url);

    // A login for the app: it logs in, reads what it was granted, makes a table.
    let mut as_app = client(&server, &app).await;
    let before = kms_logins(&pg);
    let creds = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "reader".into(),
            ttl_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        creds.lease_id.starts_with("database/creds/reader/"),
        "{creds:?}"
    );
    assert_eq!(creds.lease_duration_seconds, 120);
    assert!(creds.renewable);
    assert!(
        creds.username.starts_with("kms_reader_app_"),
        "{}",
        creds.username
    );
    assert_eq!(creds.password.len(), 32);
    assert_eq!(kms_logins(&pg).len(), before.len() + 1);
    let until = valid_until(&pg, &creds.username);
    assert!(
        until.abs_diff(creds.expires_unix) <= 1,
        "{until} {}",
        creds.expires_unix
    );
    let mut session = pg.session_as(&creds.username, &creds.password, "app");
    session.send("SELECT count(*) FROM items; CREATE TABLE mine (x int); SELECT 'made';");
    let seen = session.sync(Duration::from_secs(10));
    assert!(seen.contains(&"3".to_owned()), "{seen:?}");
    assert!(seen.contains(&"made".to_owned()), "{seen:?}");

    // Lookup and renewal by the holder: VALID UNTIL follows the lease.
    let lease = as_app
        .lookup_lease(pb::LookupLeaseRequest {
            lease_id: creds.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.username, creds.username);
    assert_eq!(lease.principal, app.principal);
    assert_eq!(lease.state, pb::LeaseState::Active as i32);
    let renewed = as_app
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: creds.lease_id.clone(),
            increment_seconds: 300,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        renewed.expires_unix >= creds.expires_unix + 170,
        "{renewed:?}"
    );
    assert!(renewed.last_renewal_unix > 0);
    assert!(valid_until(&pg, &creds.username).abs_diff(renewed.expires_unix) <= 1);
    // Never past the role's max_ttl (600 s from issue).
    let capped = as_app
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: creds.lease_id.clone(),
            increment_seconds: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capped.expires_unix, capped.max_expires_unix);
    assert!(!capped.renewable);

    // Another caller: no credentials from a role that does not name it, and the app's
    // lease reads as not found to it.
    let mut as_other = client(&server, &other).await;
    expect_code(
        as_other
            .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                role: "reader".into(),
                ttl_seconds: 0,
            })
            .await,
        Code::PermissionDenied,
        "does not name this caller",
    );
    for r in [
        as_other
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: creds.lease_id.clone(),
                increment_seconds: 0,
            })
            .await
            .map(drop),
        as_other
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: creds.lease_id.clone(),
                force: false,
            })
            .await
            .map(drop),
        as_other
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: creds.lease_id.clone(),
            })
            .await
            .map(drop),
    ] {
        expect_code(r, Code::NotFound, "no lease");
    }
    expect_code(
        as_other.list_leases(pb::ListLeasesRequest::default()).await,
        Code::PermissionDenied,
        "",
    );

    // Revocation by the holder: the open session is ended, the table it made is handed to
    // the root login, the login is gone.
    let revoked = as_app
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: creds.lease_id.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    assert_eq!(kms_logins(&pg), before);
    session.send("SELECT 'still here';");
    let after = session
        .ended(Duration::from_secs(10))
        .expect("the revoked login's session was not ended");
    assert!(!after.contains(&"still here".to_owned()), "{after:?}");
    assert!(
        after.iter().any(|l| l.contains("terminating connection")),
        "{after:?}"
    );
    assert_eq!(
        pg.sql_in(
            "app",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'mine'"
        )
        .trim(),
        ROOT
    );
    expect_code(
        as_app
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: creds.lease_id.clone(),
            })
            .await,
        Code::NotFound,
        "no lease",
    );

    // Bad input: clear errors, nothing made.
    let logins = kms_logins(&pg);
    expect_code(
        as_app
            .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                role: "reader".into(),
                ttl_seconds: 601,
            })
            .await,
        Code::InvalidArgument,
        "over role \"reader\"'s max_ttl_seconds 600",
    );
    let mut no_password = connection(&pg, "bad", &["reader"]);
    no_password.connection_url = format!(
        "postgresql://{{{{username}}}}@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    expect_code(
        admin
            .put_database_connection(pb::PutDatabaseConnectionRequest {
                connection: Some(no_password),
                password: root_password.clone(),
                skip_verify: false,
            })
            .await,
        Code::InvalidArgument,
        "must hold {{username}} and {{password}}",
    );
    let mut wrong = connection(&pg, "wrong", &["reader"]);
    wrong.username = "nobody_here".into();
    let refused = admin
        .put_database_connection(pb::PutDatabaseConnectionRequest {
            connection: Some(wrong),
            password: "not-the-password".into(),
            skip_verify: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("28P01"), "{refused:?}");
    assert!(
        !refused.message().contains("not-the-password"),
        "{refused:?}"
    );
    let mut unlisted = role("writer", &[&app.principal]);
    unlisted.connection = "app".into();
    expect_code(
        admin
            .put_database_role(pb::PutDatabaseRoleRequest {
                role: Some(unlisted),
            })
            .await,
        Code::FailedPrecondition,
        "does not allow role \"writer\"",
    );
    let mut failing = role("fails-grant", &[&app.principal]);
    failing
        .creation_statements
        .push("GRANT SELECT ON no_such_table TO \"{{name}}\";".into());
    admin
        .put_database_role(pb::PutDatabaseRoleRequest {
            role: Some(failing),
        })
        .await
        .unwrap();
    let failed = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "fails-grant".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::FailedPrecondition, "{failed:?}");
    assert!(failed.message().contains("42P01"), "{failed:?}");
    assert_eq!(kms_logins(&pg), logins, "a refused creation left a login");
    let listed = admin
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.leases.is_empty(), "{listed:?}");

    // Expiry: the server drops the login, once, and records it.
    let short = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "reader".into(),
            ttl_seconds: 2,
        })
        .await
        .unwrap()
        .into_inner();
    wait_until(Duration::from_secs(20), "the expired login dropped", || {
        !kms_logins(&pg).contains(&short.username)
    });
    wait_until(Duration::from_secs(10), "the expired lease gone", || {
        let r = records(&server, &hsm);
        r.iter().any(|e| {
            e["operation"] == "RevokeExpiredLease"
                && e["database"]["lease_id"] == short.lease_id.as_str()
        })
    });
    let all = records(&server, &hsm);
    let issued: Vec<_> = all
        .iter()
        .filter(|e| e["operation"] == "GetDatabaseCredentials" && e["outcome"] == "OK")
        .collect();
    assert_eq!(issued.len(), 2, "{issued:#?}");
    assert_eq!(issued[0]["database"]["username"], creds.username.as_str());
    assert_eq!(issued[0]["database"]["role"], "reader");
    let refusals = all
        .iter()
        .filter(|e| e["operation"] == "GetDatabaseCredentials" && e["outcome"] != "OK")
        .count();
    assert_eq!(refusals, 3, "denied, over the max, refused by the database");

    // No password anywhere: not the root's, not an issued one.
    let text = all
        .iter()
        .map(serde_json::Value::to_string)
        .collect::<String>()
        + &hsm.logs();
    for secret in [&root_password, &creds.password, &short.password] {
        assert!(!text.contains(secret.as_str()), "a password was written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiries_wait_for_the_database_and_refusals_end_irrevocable() {
    let pg = TestPostgres::start_empty();
    let root_password = prepare(&pg);
    let hsm = TestHsm::new("databases-fail");
    let config = hsm.config_full(
        "kms.toml",
        &hsm.hsm_table(),
        "[databases]\nmax_attempts = 2\nretry_seconds = 1\nreconcile_seconds = 1\n",
    );
    let (server, _shares) = start_unsealed(&hsm, &config);
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let mut admin = client(&server, &server.admin).await;
    set_up(&mut admin, &pg, &root_password, &[&app.principal]).await;
    let mut as_app = client(&server, &app).await;

    // The database stops while three leases expire: they wait, and are revoked once it is
    // back. Issuance meanwhile fails with UNAVAILABLE and makes nothing.
    let mut names = Vec::new();
    for _ in 0..3 {
        let c = as_app
            .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                role: "reader".into(),
                ttl_seconds: 3,
            })
            .await
            .unwrap()
            .into_inner();
        names.push(c.username);
    }
    pg.stop();
    let down = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "reader".into(),
            ttl_seconds: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    std::thread::sleep(Duration::from_secs(6));
    let waiting = admin
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.leases.len(), 3, "{waiting:?}");
    pg.restart();
    wait_until(Duration::from_secs(60), "the backlog revoked", || {
        let now = kms_logins(&pg);
        names.iter().all(|n| !now.contains(n))
    });
    wait_until(Duration::from_secs(10), "the leases gone", || {
        let r = records(&server, &hsm);
        r.iter()
            .filter(|e| e["operation"] == "RevokeExpiredLease")
            .count()
            == 3
    });

    // A revocation the database refuses: retried, then irrevocable; listed, counted;
    // dropped with force by an administrator only.
    let mut stubborn = role("fails-revoke", &[&app.principal]);
    stubborn.revocation_statements = vec!["SELECT 1/0;".into()];
    admin
        .put_database_role(pb::PutDatabaseRoleRequest {
            role: Some(stubborn),
        })
        .await
        .unwrap();
    let kept = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "fails-revoke".into(),
            ttl_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut irrevocable = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "the lease marked irrevocable",
        || {
            let page = futures_lite(admin.list_leases(pb::ListLeasesRequest {
                irrevocable_only: true,
                ..pb::ListLeasesRequest::default()
            }));
            irrevocable = page.leases;
            !irrevocable.is_empty()
        },
    );
    assert_eq!(irrevocable.len(), 1);
    let lease = &irrevocable[0];
    assert_eq!(lease.lease_id, kept.lease_id);
    assert_eq!(lease.state, pb::LeaseState::Irrevocable as i32);
    assert_eq!(lease.revocation_attempts, 2);
    assert!(lease.last_error.contains("22012"), "{lease:?}");
    assert!(kms_logins(&pg).contains(&kept.username));
    expect_code(
        as_app
            .renew_lease(pb::RenewLeaseRequest {
                lease_id: kept.lease_id.clone(),
                increment_seconds: 0,
            })
            .await,
        Code::FailedPrecondition,
        "has expired",
    );
    expect_code(
        as_app
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: kept.lease_id.clone(),
                force: true,
            })
            .await,
        Code::PermissionDenied,
        "only an administrator",
    );
    let forced = admin
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: kept.lease_id.clone(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !forced.revoked,
        "the database refused: the record only was dropped"
    );
    let left = admin
        .list_leases(pb::ListLeasesRequest {
            irrevocable_only: true,
            ..pb::ListLeasesRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(left.leases.is_empty(), "{left:?}");
    let all = records(&server, &hsm);
    assert!(
        all.iter().any(|e| e["operation"] == "MarkLeaseIrrevocable"
            && e["database"]["lease_id"] == kept.lease_id.as_str()
            && e["database"]["forced"] == true),
        "{all:#?}"
    );
    assert!(all.iter().any(|e| {
        e["operation"] == "RevokeLease"
            && e["database"]["forced"] == true
            && e["database"]["error"]
                .as_str()
                .unwrap_or("")
                .contains("22012")
    }));

    // The reconcile pass. An orphan kms made: a reader login whose lease an administrator
    // dropped with force while the database refused to revoke it (the root login had lost
    // CREATEROLE). Once its validity has long ended, the pass drops it; a login of the same
    // shape that kms did not make (no mark), one still valid, and one of another shape stay.
    let orphan = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "reader".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    pg.sql(&format!("ALTER ROLE {ROOT} NOCREATEROLE"));
    let forced = admin
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: orphan.lease_id.clone(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!forced.revoked);
    pg.sql(&format!("ALTER ROLE {ROOT} CREATEROLE"));
    assert!(kms_logins(&pg).contains(&orphan.username));
    for sql in [
        format!(
            "ALTER ROLE \"{}\" VALID UNTIL '2000-01-01'",
            orphan.username
        ),
        format!("ALTER ROLE \"{}\" VALID UNTIL '2000-01-01'", kept.username),
        "CREATE ROLE kms_reader_app_0123456789abcdef LOGIN VALID UNTIL '2000-01-01'".to_owned(),
        "CREATE ROLE kms_reader_app_fedcba9876543210 LOGIN VALID UNTIL 'infinity'".to_owned(),
        "CREATE ROLE kms_reader_someone LOGIN VALID UNTIL '2000-01-01'".to_owned(),
    ] {
        pg.sql(&sql);
    }
    wait_until(Duration::from_secs(20), "the orphan dropped", || {
        !kms_logins(&pg).contains(&orphan.username)
    });
    let now = kms_logins(&pg);
    for kept_login in [
        "kms_reader_app_0123456789abcdef",
        "kms_reader_app_fedcba9876543210",
        "kms_reader_someone",
    ] {
        assert!(
            now.contains(&kept_login.to_owned()),
            "{kept_login}: {now:?}"
        );
    }
    // The forced lease's login of the role whose revocation always fails: it stays, and
    // the pass says so in its log (and tries again).
    assert!(now.contains(&kept.username));
    assert!(
        records(&server, &hsm)
            .iter()
            .any(|e| e["operation"] == "DropOrphanLogin"
                && e["database"]["username"] == orphan.username.as_str()),
        "no record of the orphan dropped"
    );

    // Removing a role with a live lease: refused with the count; with force, revoked.
    let live = as_app
        .get_database_credentials(pb::GetDatabaseCredentialsRequest {
            role: "reader".into(),
            ttl_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    expect_code(
        admin
            .delete_database_role(pb::DeleteDatabaseRoleRequest {
                name: "reader".into(),
                force: false,
            })
            .await,
        Code::FailedPrecondition,
        "has 1 live lease",
    );
    let gone = admin
        .delete_database_role(pb::DeleteDatabaseRoleRequest {
            name: "reader".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.leases_revoked, 1);
    assert!(!kms_logins(&pg).contains(&live.username));
}

/// Blocks on a list call (inside `wait_until`'s synchronous closure).
fn futures_lite(
    f: impl std::future::Future<Output = Result<tonic::Response<pb::ListLeasesResponse>, tonic::Status>>,
) -> pb::ListLeasesResponse {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_revoke_each_expiry_once() {
    let store = TestPostgres::start();
    let pg = TestPostgres::start_empty();
    let root_password = prepare(&pg);
    let hsm = TestHsm::new("databases-ha");
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &store.storage_table());
    let (a, shares) = start_unsealed(&hsm, &config);
    let b = hsm.try_start(&config, &[]).unwrap();
    b.unseal_with(&shares);
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let mut admin = client(&a, &a.admin).await;
    set_up(&mut admin, &pg, &root_password, &[&app.principal]).await;
    let on_a = client(&a, &app).await;
    let on_b = client(&b, &app).await;
    // All at once, ten on each server: their GRANTs on one table race in PostgreSQL ("tuple
    // concurrently updated"), and each is issued all the same.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = if i % 2 == 0 {
            on_a.clone()
        } else {
            on_b.clone()
        };
        tasks.push(tokio::spawn(async move {
            c.get_database_credentials(pb::GetDatabaseCredentialsRequest {
                role: "reader".into(),
                ttl_seconds: 3,
            })
            .await
            .map(|r| r.into_inner().lease_id)
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(ids.len(), 20);
    wait_until(Duration::from_secs(40), "every login dropped", || {
        kms_logins(&pg).is_empty()
    });
    wait_until(
        Duration::from_secs(10),
        "every lease recorded revoked",
        || {
            records(&a, &hsm)
                .iter()
                .filter(|e| e["operation"] == "RevokeExpiredLease")
                .count()
                >= 20
        },
    );
    let revoked: Vec<String> = records(&a, &hsm)
        .iter()
        .filter(|e| e["operation"] == "RevokeExpiredLease")
        .map(|e| e["database"]["lease_id"].as_str().unwrap().to_owned())
        .collect();
    let distinct: std::collections::BTreeSet<String> = revoked.iter().cloned().collect();
    assert_eq!(
        revoked.len(),
        20,
        "an expiry was revoked twice: {revoked:#?}"
    );
    assert_eq!(distinct, ids);
}

/// Whether `login` can log in to `app` with `password` (a query answered).
fn logs_in(pg: &TestPostgres, login: &str, password: &str) -> bool {
    let out = std::process::Command::new(pg.bin_dir().join("psql"))
        .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p"])
        .arg(pg.port.to_string())
        .args(["-U", login, "-d", "app", "-c", "SELECT 'in'"])
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "in"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_roles_rotate_and_serve_the_password_in_force() {
    let pg = TestPostgres::start_empty();
    let root_password = prepare(&pg);
    pg.sql("CREATE ROLE legacy_app LOGIN PASSWORD 'Initial-Password-1'");
    let hsm = TestHsm::new("databases-static");
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), "");
    let (server, _shares) = start_unsealed(&hsm, &config);
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    let mut admin = client(&server, &server.admin).await;
    admin
        .put_database_connection(pb::PutDatabaseConnectionRequest {
            connection: Some(connection(&pg, "app", &["legacy"])),
            password: root_password.clone(),
            skip_verify: false,
        })
        .await
        .unwrap();
    let made = admin
        .put_database_static_role(pb::PutDatabaseStaticRoleRequest {
            role: Some(pb::DatabaseStaticRole {
                name: "legacy".into(),
                connection: "app".into(),
                username: "legacy_app".into(),
                rotation_period_seconds: 3600,
                principals: vec![app.principal.clone()],
                ..pb::DatabaseStaticRole::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(made.last_rotated_unix > 0);
    assert_eq!(made.next_rotation_unix, made.last_rotated_unix + 3600);
    // Set at once: the password it had no longer works, kms's does.
    assert!(!logs_in(&pg, "legacy_app", "Initial-Password-1"));
    let mut as_app = client(&server, &app).await;
    let first = as_app
        .get_database_static_credentials(pb::GetDatabaseStaticCredentialsRequest {
            name: "legacy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.username, "legacy_app");
    assert_eq!(first.password.len(), 32);
    assert!(
        first.ttl_seconds > 3500 && first.ttl_seconds <= 3600,
        "{}",
        first.ttl_seconds
    );
    assert!(logs_in(&pg, "legacy_app", &first.password));
    expect_code(
        client(&server, &other)
            .await
            .get_database_static_credentials(pb::GetDatabaseStaticCredentialsRequest {
                name: "legacy".into(),
            })
            .await,
        Code::PermissionDenied,
        "does not name this caller",
    );

    // A rotation the database cannot take: refused, and the password in force is still
    // served and still works.
    pg.stop();
    let down = admin
        .rotate_database_static_role(pb::RotateDatabaseStaticRoleRequest {
            name: "legacy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    let still = as_app
        .get_database_static_credentials(pb::GetDatabaseStaticCredentialsRequest {
            name: "legacy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.password, first.password);
    pg.restart();
    wait_until(Duration::from_secs(30), "the database back", || {
        logs_in(&pg, "legacy_app", &first.password)
    });
    let shown = admin
        .get_database_static_role(pb::GetDatabaseStaticRoleRequest {
            name: "legacy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(shown.last_error.contains("cannot be reached"), "{shown:?}");

    // An administrator's rotation: a new password, the old one refused.
    admin
        .rotate_database_static_role(pb::RotateDatabaseStaticRoleRequest {
            name: "legacy".into(),
        })
        .await
        .unwrap();
    let second = as_app
        .get_database_static_credentials(pb::GetDatabaseStaticCredentialsRequest {
            name: "legacy".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(second.password, first.password);
    assert!(logs_in(&pg, "legacy_app", &second.password));
    assert!(!logs_in(&pg, "legacy_app", &first.password));

    // Bad input: a period under a minute, a quote in the login's name.
    for (period, user) in [(59, "legacy_app"), (3600, "leg\"acy")] {
        expect_code(
            admin
                .put_database_static_role(pb::PutDatabaseStaticRoleRequest {
                    role: Some(pb::DatabaseStaticRole {
                        name: "legacy".into(),
                        connection: "app".into(),
                        username: user.into(),
                        rotation_period_seconds: period,
                        ..pb::DatabaseStaticRole::default()
                    }),
                })
                .await,
            Code::InvalidArgument,
            "",
        );
    }
    let text = records(&server, &hsm)
        .iter()
        .map(serde_json::Value::to_string)
        .collect::<String>()
        + &hsm.logs();
    for secret in [&first.password, &second.password, &root_password] {
        assert!(!text.contains(secret.as_str()), "a password was written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_revocation_leaves_its_claims_to_another() {
    let store = TestPostgres::start();
    let pg = TestPostgres::start_empty();
    let root_password = prepare(&pg);
    let hsm = TestHsm::new("databases-kill");
    let config = hsm.config_full("kms.toml", &hsm.hsm_table(), &store.storage_table());
    let (mut a, shares) = start_unsealed(&hsm, &config);
    // B starts now and is unsealed only once A has claimed what is due.
    let b = hsm.try_start(&config, &[]).unwrap();
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let mut admin = client(&a, &a.admin).await;
    set_up(&mut admin, &pg, &root_password, &[&app.principal]).await;
    // A login that owns nothing, dropped slowly.
    let mut slow = role("fails-slow", &[&app.principal]);
    slow.creation_statements.truncate(1);
    slow.revocation_statements = vec![
        "SELECT pg_sleep(4);".into(),
        "DROP ROLE IF EXISTS \"{{name}}\";".into(),
    ];
    admin
        .put_database_role(pb::PutDatabaseRoleRequest { role: Some(slow) })
        .await
        .unwrap();
    let mut on_a = client(&a, &app).await;
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let made = on_a
            .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                role: "fails-slow".into(),
                ttl_seconds: 1,
            })
            .await
            .unwrap()
            .into_inner();
        ids.insert(made.lease_id);
    }
    // A claims the four at their expiry and is killed in the first revocation's sleep.
    std::thread::sleep(Duration::from_secs(3));
    let claimed = Instant::now();
    a.kill9();
    assert_eq!(
        kms_logins(&pg).len(),
        4,
        "A finished a revocation before it was killed"
    );
    b.unseal_with(&shares);
    // B waits for A's claims to lapse (60 s), then revokes each once.
    wait_until(Duration::from_secs(150), "every login dropped by B", || {
        kms_logins(&pg).is_empty()
    });
    assert!(
        claimed.elapsed() >= Duration::from_secs(50),
        "B did not wait for A's claims: {:?}",
        claimed.elapsed()
    );
    let revoked: Vec<String> = records(&b, &hsm)
        .iter()
        .filter(|e| e["operation"] == "RevokeExpiredLease")
        .map(|e| e["database"]["lease_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(revoked.len(), 4, "{revoked:#?}");
    assert_eq!(
        revoked
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>(),
        ids
    );
}
