"""Vault's database engine and lease clients, unchanged, against kms's HTTPS front (vault_database.rs).

The real `hvac` client over mTLS (`client.secrets.database`, `client.sys` lease methods), and
`psycopg` logging in to the real PostgreSQL with what kms issued. Run as
`python3 vault_database_client.py PHASE CONFIG_JSON`; prints one JSON object. Every check is an
`assert` (the script exits non-zero, and the Rust test fails, when one fails); the Rust test
also checks the values printed against the database and the audit log.

Phases: `admin` (connection and role definitions, their refusals), `app` (credentials, their
lease renewed, looked up and revoked by their holder), `other` (a principal the role does not
name, and who does not hold the app's lease), `prefix` (listing and revoking leases by prefix
as the admin), `rotate` (the root password rotated), `cleanup` (revoke-force, removals),
`static` (a static role: an existing login's password set, served, rotated), `sealed` (the
server was sealed: 503).
"""

import json
import re
import sys
import time

import hvac
import psycopg
import requests

phase = sys.argv[1]
cfg = json.loads(sys.argv[2])
url, ca = cfg["url"], cfg["ca"]
admin = (cfg["admin_cert"], cfg["admin_key"])
app = (cfg["app_cert"], cfg["app_key"])
other = (cfg["other_cert"], cfg["other_key"])
PG_PORT = cfg["pg_port"]
ROOT_PASSWORD = cfg["root_password"]
CONN_URL = f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{PG_PORT}/app?sslmode=disable"
CREATION = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    "GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{{name}}\";",
]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
LEASE = re.compile(r"database/creds/reader/[A-Za-z0-9]{24}")


def refused(exc_type, f):
    """Runs f, which must raise exc_type; returns the exception."""
    try:
        f()
    except exc_type as e:
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def raw(method, path, cert=admin, **kw):
    return requests.request(method, f"{url}/v1/{path}", cert=cert, verify=ca, **kw)


def client(cert):
    return hvac.Client(url=url, cert=cert, verify=ca)


def login(user, password):
    return psycopg.connect(host="127.0.0.1", port=PG_PORT, user=user, password=password,
                           dbname="app", sslmode="disable", connect_timeout=5)


def count_items(user, password):
    with login(user, password) as c:
        return c.execute("SELECT count(*) FROM items").fetchone()[0]


def cannot_login(user, password):
    refused(psycopg.OperationalError, lambda: login(user, password).close())


def issue(cert):
    r = client(cert).secrets.database.generate_credentials("reader")
    assert set(r) >= {"request_id", "lease_id", "renewable", "lease_duration", "data", "wrap_info",
                      "warnings", "auth"}, r
    assert LEASE.fullmatch(r["lease_id"]), r
    assert r["renewable"] is True and r["lease_duration"] == 3600, r
    assert r["wrap_info"] is None and r["warnings"] is None and r["auth"] is None, r
    assert set(r["data"]) == {"username", "password"}, r
    return r


out = {}

if phase == "admin":
    db = client(admin).secrets.database
    # Refused, each with a 400 that says why, and nothing made.
    for kwargs, words in [
        (dict(plugin_name="mysql-database-plugin"), "postgresql-database-plugin"),
        (dict(root_rotation_statements=["ALTER USER x"]), "root_rotation_statements"),
        (dict(password_policy="strong"), "password_policy"),
        (dict(max_connection_lifetime="5s"), "max_connection_lifetime"),
        (dict(username_template="{{random}}"), "per role"),
        (dict(connection_url="postgresql://kmsroot:pw@127.0.0.1/app"), "{{password}}"),
    ]:
        args = dict(name="pg", plugin_name="postgresql-database-plugin", connection_url=CONN_URL,
                    username="kmsroot", password=ROOT_PASSWORD, allowed_roles="reader")
        args.update(kwargs)
        e = refused(hvac.exceptions.InvalidRequest, lambda: db.configure(**args))
        assert any(words in m for m in e.errors), (kwargs, e.errors)
    refused(hvac.exceptions.InvalidPath, lambda: db.read_connection("pg"))
    # A wrong root password: verified, refused, nothing made; no password in the message.
    e = refused(hvac.exceptions.InvalidRequest, lambda: db.configure(
        name="pg", plugin_name="postgresql-database-plugin", connection_url=CONN_URL,
        username="kmsroot", password="wrong-root-password-4d1c", allowed_roles="reader"))
    assert not any("wrong-root-password" in m for m in e.errors), e.errors
    out["wrong_password"] = e.errors
    refused(hvac.exceptions.InvalidPath, lambda: db.read_connection("pg"))

    r = db.configure(name="pg", plugin_name="postgresql-database-plugin", connection_url=CONN_URL,
                     username="kmsroot", password=ROOT_PASSWORD, allowed_roles="reader,writer",
                     max_open_connections=3)
    assert r.status_code == 204, (r.status_code, r.text)
    conn = db.read_connection("pg")["data"]
    assert conn == {
        "allowed_roles": ["reader", "writer"],
        "connection_details": {"connection_url": CONN_URL, "username": "kmsroot", "max_open_connections": 3},
        "password_policy": "",
        "plugin_name": "postgresql-database-plugin",
        "plugin_version": "",
        "root_credentials_rotate_statements": [],
    }, conn
    out["connection"] = conn
    # An update gives only what changes: the rest is kept (the password too).
    r = db.configure(name="pg", plugin_name="postgresql-database-plugin", allowed_roles=["reader"])
    assert r.status_code == 204, (r.status_code, r.text)
    conn = db.read_connection("pg")["data"]
    assert conn["allowed_roles"] == ["reader"] and conn["connection_details"]["username"] == "kmsroot", conn
    assert db.list_connections()["data"]["keys"] == ["pg"]
    r = raw("GET", "database/config?list=true")
    assert r.status_code == 200 and r.json()["data"]["keys"] == ["pg"], r.text
    # An unknown parameter: Vault's warning, and 200 rather than 204.
    r = raw("POST", "database/config/pg", json={"plugin_name": "postgresql-database-plugin", "bogus": 1})
    assert r.status_code == 200 and "bogus" in r.json()["warnings"][0], r.text

    # Roles: refusals first, nothing made.
    refused(hvac.exceptions.InvalidPath, lambda: db.list_roles())
    for kwargs, words in [
        (dict(rollback_statements=["DROP ROLE x"]), "rollback_statements"),
        (dict(db_name="nope"), "nope"),
        (dict(default_ttl="2h", max_ttl="1h"), "default_ttl"),
        (dict(creation_statements=["Q1JFQVRFIFJPTEUgeA=="]), "base64"),
    ]:
        args = dict(name="reader", db_name="pg", creation_statements=CREATION, default_ttl="1h",
                    max_ttl=7200)
        args.update(kwargs)
        e = refused(hvac.exceptions.InvalidRequest, lambda: db.create_role(**args))
        assert any(words in m for m in e.errors), (kwargs, e.errors)
    refused(hvac.exceptions.InvalidPath, lambda: db.read_role("reader"))
    # A role the connection does not allow.
    e = refused(hvac.exceptions.InvalidRequest, lambda: db.create_role(
        name="writer", db_name="pg", creation_statements=CREATION))
    assert any("allowed_roles" in m for m in e.errors), e.errors

    r = db.create_role(name="reader", db_name="pg", creation_statements=CREATION, default_ttl="1h",
                       max_ttl=7200)
    assert r.status_code == 204, (r.status_code, r.text)
    # kms's own field: who may get credentials (a role without principals issues to no one).
    r = raw("POST", "database/roles/reader", json={"principals": f"{cfg['app_principal']}, {cfg['admin_principal']}"})
    assert r.status_code == 204, (r.status_code, r.text)
    role = db.read_role("reader")["data"]
    assert role["db_name"] == "pg" and role["creation_statements"] == CREATION, role
    assert role["default_ttl"] == 3600 and role["max_ttl"] == 7200, role
    assert role["revocation_statements"] == [] and role["rollback_statements"] == [], role
    assert role["principals"] == [cfg["app_principal"], cfg["admin_principal"]], role
    assert role["credential_type"] == "password", role
    out["role"] = role
    assert db.list_roles()["data"]["keys"] == ["reader"]

    # Vault's paths kms does not offer, and what is not a path or a method.
    assert raw("POST", "database/reset/pg").status_code == 400
    assert raw("POST", "database/static-roles/s", json={}).status_code == 400
    assert raw("GET", "database/nothing").status_code == 404
    assert raw("POST", "database/creds/reader").status_code == 405
    r = raw("POST", "database/roles/reader", data=b"{not json")
    assert r.status_code == 400, r.text
    r = raw("GET", "database/roles/none")
    assert r.status_code == 404 and r.json() == {"errors": []}, r.text

    # The admin's own login works, and reads the table.
    creds = issue(admin)
    assert count_items(creds["data"]["username"], creds["data"]["password"]) == 3
    out["admin_lease"] = creds["lease_id"]
    out["passwords"] = [creds["data"]["password"]]

elif phase == "app":
    sys_ = client(app).sys
    creds = issue(app)
    user, password, lease = creds["data"]["username"], creds["data"]["password"], creds["lease_id"]
    assert user.startswith("kms_reader_app_"), user
    assert count_items(user, password) == 3
    # The grants are the role's: SELECT only.
    with login(user, password) as c:
        refused(psycopg.errors.InsufficientPrivilege, lambda: c.execute("INSERT INTO items VALUES (9)"))

    looked = sys_.read_lease(lease)["data"]
    assert set(looked) == {"id", "issue_time", "expire_time", "last_renewal", "renewable", "ttl"}, looked
    assert looked["id"] == lease and looked["last_renewal"] is None and looked["renewable"] is True, looked
    assert TIME.fullmatch(looked["issue_time"]) and TIME.fullmatch(looked["expire_time"]), looked
    assert 3590 <= looked["ttl"] <= 3600, looked
    time.sleep(1.1)
    renewed = sys_.renew_lease(lease, increment=600)
    assert renewed["lease_id"] == lease and renewed["renewable"] is True, renewed
    assert 595 <= renewed["lease_duration"] <= 600 and renewed["data"] is None, renewed
    looked = sys_.read_lease(lease)["data"]
    assert TIME.fullmatch(looked["last_renewal"]) and looked["ttl"] <= 600, looked
    # Past the role's max_ttl (7200 s): the lease ends at it.
    renewed = sys_.renew_lease(lease, increment="5h")
    assert 7190 <= renewed["lease_duration"] <= 7200 and renewed["renewable"] is False, renewed
    # The database follows the lease: VALID UNTIL moved with it.
    out["renewed_until"] = sys_.read_lease(lease)["data"]["expire_time"]
    with login(user, password) as c:
        until = c.execute("SELECT to_char(rolvaliduntil AT TIME ZONE 'UTC', "
                          "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM pg_roles "
                          "WHERE rolname = current_user").fetchone()[0]
    assert until == out["renewed_until"], (until, out["renewed_until"])

    # Bad input: 400; not the app's to do: 403.
    for f in [lambda: sys_.read_lease("database/creds/reader/nosuchlease"),
              lambda: sys_.read_lease("aws/creds/x/y"),
              lambda: sys_.renew_lease(lease, increment="soon")]:
        refused(hvac.exceptions.InvalidRequest, f)
    refused(hvac.exceptions.Forbidden, lambda: sys_.list_leases("database/creds/reader"))
    refused(hvac.exceptions.Forbidden, lambda: sys_.revoke_prefix("database/creds/reader"))
    refused(hvac.exceptions.Forbidden, lambda: client(app).secrets.database.read_connection("pg"))
    refused(hvac.exceptions.Forbidden, lambda: client(app).secrets.database.create_role(
        name="reader", db_name="pg", creation_statements=CREATION))
    r = raw("POST", "database/roles/reader", cert=app, data=b"{not json")
    assert r.status_code == 403, r.text

    # A second login, which the other principal will try to revoke.
    kept = issue(app)
    out["kept"] = {"lease": kept["lease_id"], "username": kept["data"]["username"],
                   "password": kept["data"]["password"],
                   "expire_time": sys_.read_lease(kept["lease_id"])["data"]["expire_time"]}

    # Revoked by its holder: 204, the login gone at once and its open session ended (by a
    # root login that is not a superuser).
    held = login(user, password)
    held.autocommit = True
    held.execute("CREATE TEMPORARY TABLE scratch (i int)")
    r = sys_.revoke_lease(lease)
    assert r.status_code == 204, (r.status_code, r.text)
    refused(psycopg.OperationalError, lambda: held.execute("SELECT 1"))
    held.close()
    cannot_login(user, password)
    refused(hvac.exceptions.InvalidRequest, lambda: sys_.read_lease(lease))
    # Again: nothing to revoke, as Vault answers.
    assert raw("PUT", f"sys/leases/revoke/{lease}", cert=app).status_code == 204
    out["revoked"] = {"lease": lease, "username": user}
    out["passwords"] = [password, kept["data"]["password"]]

elif phase == "other":
    o = client(other)
    e = refused(hvac.exceptions.Forbidden, lambda: o.secrets.database.generate_credentials("reader"))
    out["denied"] = e.errors
    kept = cfg["kept"]
    # Not its lease: as if it did not exist.
    refused(hvac.exceptions.InvalidRequest, lambda: o.sys.read_lease(kept["lease"]))
    refused(hvac.exceptions.InvalidRequest, lambda: o.sys.renew_lease(kept["lease"], increment=60))
    assert o.sys.revoke_lease(kept["lease"]).status_code == 204
    # ... and it still is: the login works.
    assert count_items(kept["username"], kept["password"]) == 3
    assert client(app).sys.read_lease(kept["lease"])["data"]["id"] == kept["lease"]

elif phase == "prefix":
    sys_ = client(admin).sys
    one, two = issue(app), issue(app)
    ids = sorted([cfg["kept"]["lease"], cfg["admin_lease"], one["lease_id"], two["lease_id"]])
    keys = sys_.list_leases("database/creds/reader")["data"]["keys"]
    assert keys == [i.rsplit("/", 1)[1] for i in ids], (keys, ids)
    assert sys_.list_leases("database/creds/")["data"]["keys"] == ["reader/"]
    assert sys_.list_leases("database")["data"]["keys"] == ["creds/"]
    assert raw("LIST", "sys/leases/lookup").json()["data"]["keys"] == ["database/"]
    r = raw("LIST", "sys/leases/lookup/database/creds/nothing")
    assert r.status_code == 404 and r.json() == {"errors": []}, r.text
    # Deleting the connection while leases live: refused, it stays.
    e = refused(hvac.exceptions.InvalidRequest, lambda: client(admin).secrets.database.delete_connection("pg"))
    assert any("live lease" in m for m in e.errors), e.errors
    # A prefix that is not a path of leases: 400; `database/creds/read` is not `reader`.
    refused(hvac.exceptions.InvalidRequest, lambda: sys_.revoke_prefix("aws/creds"))
    assert sys_.revoke_prefix("database/creds/read").status_code == 204
    assert count_items(one["data"]["username"], one["data"]["password"]) == 3
    # Revoked by prefix (Vault's default, synchronous): every login gone when it answers.
    assert sys_.revoke_prefix("database/creds/reader").status_code == 204
    for c in [one, two]:
        cannot_login(c["data"]["username"], c["data"]["password"])
    cannot_login(cfg["kept"]["username"], cfg["kept"]["password"])
    refused(hvac.exceptions.InvalidPath, lambda: sys_.list_leases("database/creds/reader"))
    # With sync=false: scheduled for the revoker, which drops the login within seconds.
    three = issue(app)
    r = raw("PUT", "sys/leases/revoke-prefix/database/creds/reader", json={"sync": False})
    assert r.status_code == 204, (r.status_code, r.text)
    deadline = time.time() + 30
    while True:
        try:
            sys_.list_leases("database/creds/reader")
        except hvac.exceptions.InvalidPath:
            break
        assert time.time() < deadline, "the revoker did not revoke the lease"
        time.sleep(0.2)
    cannot_login(three["data"]["username"], three["data"]["password"])
    out["usernames"] = [one["data"]["username"], two["data"]["username"], three["data"]["username"]]
    out["passwords"] = [one["data"]["password"], two["data"]["password"], three["data"]["password"]]

elif phase == "rotate":
    db = client(admin).secrets.database
    assert count_items("kmsroot", ROOT_PASSWORD) == 3
    r = db.rotate_root_credentials("pg")
    assert r.status_code == 204, (r.status_code, r.text)
    # The old root password no longer logs in; kms still issues.
    cannot_login("kmsroot", ROOT_PASSWORD)
    creds = issue(app)
    assert count_items(creds["data"]["username"], creds["data"]["password"]) == 3
    assert db.read_connection("pg")["data"]["connection_details"]["username"] == "kmsroot"
    out["lease"] = creds["lease_id"]
    out["username"] = creds["data"]["username"]
    out["passwords"] = [creds["data"]["password"]]

elif phase == "static":
    db = client(admin).secrets.database
    r = db.configure(name="pg", plugin_name="postgresql-database-plugin",
                     allowed_roles=["reader", "legacy"])
    assert r.status_code == 204, (r.status_code, r.text)
    before = "Legacy-Before-kms-0123"
    r = db.create_static_role(name="legacy", db_name="pg", username="legacy",
                              rotation_statements=[], rotation_period=3600)
    assert r.status_code == 204, (r.status_code, r.text)
    # Set at once: the password it had no longer logs in.
    cannot_login("legacy", before)
    # kms's own field: who may read it (an update that keeps the login: no rotation).
    r = raw("POST", "database/static-roles/legacy", json={"principals": [cfg["app_principal"]]})
    assert r.status_code == 204, r.text
    role = db.read_static_role("legacy")["data"]
    assert role["db_name"] == "pg" and role["username"] == "legacy", role
    assert role["rotation_period"] == 3600 and TIME.fullmatch(role["last_vault_rotation"]), role
    assert "password" not in role, role
    assert db.list_static_roles()["data"]["keys"] == ["legacy"]
    first = client(app).secrets.database.get_static_credentials("legacy")["data"]
    assert first["username"] == "legacy" and first["rotation_period"] == 3600, first
    assert 3500 < first["ttl"] <= 3600, first
    login("legacy", first["password"]).close()
    refused(hvac.exceptions.Forbidden,
            lambda: client(other).secrets.database.get_static_credentials("legacy"))
    r = db.rotate_static_role_credentials("legacy")
    assert r.status_code == 204, (r.status_code, r.text)
    second = client(app).secrets.database.get_static_credentials("legacy")["data"]
    assert second["password"] != first["password"]
    login("legacy", second["password"]).close()
    cannot_login("legacy", first["password"])
    e = refused(hvac.exceptions.InvalidRequest,
                lambda: db.create_static_role(name="x", db_name="pg", username="legacy",
                                              rotation_statements=[], rotation_period=30))
    assert any("rotation_period" in m for m in e.errors), e.errors
    assert raw("POST", "database/static-roles/x",
               json={"db_name": "pg", "username": "legacy", "rotation_schedule": "0 * * * *"}
               ).status_code == 400
    assert db.delete_static_role("legacy").status_code == 204
    refused(hvac.exceptions.InvalidPath, lambda: db.read_static_role("legacy"))
    # No longer managed: the password in force stays.
    login("legacy", second["password"]).close()
    out["passwords"] = [first["password"], second["password"]]

elif phase == "cleanup":
    db = client(admin).secrets.database
    assert client(admin).sys.revoke_force("database/creds/reader").status_code == 204
    refused(hvac.exceptions.InvalidRequest, lambda: client(admin).sys.read_lease(cfg["lease"]))
    assert db.delete_role("reader").status_code == 204
    refused(hvac.exceptions.InvalidPath, lambda: db.read_role("reader"))
    assert db.delete_role("reader").status_code == 204
    assert db.delete_connection("pg").status_code == 204
    refused(hvac.exceptions.InvalidPath, lambda: db.read_connection("pg"))
    refused(hvac.exceptions.InvalidPath, lambda: db.list_connections())

elif phase == "sealed":
    out["codes"] = [
        raw("GET", "database/creds/reader", cert=app).status_code,
        raw("PUT", "sys/leases/lookup", cert=app, json={"lease_id": "database/creds/reader/x"}).status_code,
        raw("GET", "database/config/pg").status_code,
    ]

else:
    raise SystemExit(f"unknown phase {phase}")

print(json.dumps(out))
