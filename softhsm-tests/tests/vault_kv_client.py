"""Vault's KV v2 client, unchanged, against kms's Vault-compatible HTTPS front (vault_kv.rs).

The real `hvac` client over mTLS: every method of `client.secrets.kv.v2`, and Vault's raw
API (`requests`) for what hvac does not send (a JSON merge patch of data and of metadata,
subkeys, a body that is not JSON). Run as `python3 vault_kv_client.py PHASE CONFIG_JSON`;
prints one JSON object. Every check is an `assert` (the script exits non-zero, and the Rust
test fails, when one fails); the Rust test also checks the values printed.

Phases: `kv` (every method, as the admin holding a grant on `*`), `nogrant` (a principal
without a grant: 403 whatever it sends), `writeonly` (a principal with secret-write alone:
no custom metadata in its answers), `sealed` (the server was sealed).
"""

import json
import re
import sys
import warnings

import hvac
import requests

phase = sys.argv[1]
cfg = json.loads(sys.argv[2])
url, ca = cfg["url"], cfg["ca"]
admin = (cfg["admin_cert"], cfg["admin_key"])
app = (cfg["app_cert"], cfg["app_key"])
# The values written, which the Rust test looks for in the logs and the audit log's files.
V1, V2, V3 = cfg["values"]
CUSTOM = cfg["custom_value"]
MERGE = {"Content-Type": "application/merge-patch+json"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
VERSION_FIELDS = {"created_time", "custom_metadata", "deletion_time", "destroyed", "version"}
METADATA_FIELDS = {"cas_required", "created_time", "current_version", "custom_metadata",
                   "delete_version_after", "max_versions", "oldest_version", "updated_time", "versions"}

# hvac warns that raise_on_deleted_version's default will change; its `patch` reads without it.
warnings.simplefilter("ignore", DeprecationWarning)


def refused(exc_type, f):
    """Runs f, which must raise exc_type; returns the exception."""
    try:
        f()
    except exc_type as e:
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def raw(method, path, cert=admin, **kw):
    return requests.request(method, f"{url}/v1/{path}", cert=cert, verify=ca, **kw)


out = {}
kv = hvac.Client(url=url, cert=admin, verify=ca).secrets.kv.v2

if phase == "kv":
    # The engine's configuration, as Vault prints it (Go durations).
    r = kv.configure(max_versions=5, cas_required=False, delete_version_after="3h25m19s")
    assert r.status_code == 204, r
    conf = kv.read_configuration()["data"]
    assert conf == {"cas_required": False, "delete_version_after": "3h25m19s", "max_versions": 5}, conf
    out["config"] = conf
    assert kv.configure(max_versions=10, delete_version_after="0s").status_code == 204
    assert kv.read_configuration()["data"]["delete_version_after"] == "0s"

    # Writes: without check-and-set, with it, and a mismatch (hvac's InvalidRequest, a 400).
    w1 = kv.create_or_update_secret("app/db", {"password": V1, "user": "app"})["data"]
    assert set(w1) == VERSION_FIELDS and w1["version"] == 1 and w1["deletion_time"] == "", w1
    assert w1["custom_metadata"] is None and w1["destroyed"] is False and TIME.fullmatch(w1["created_time"]), w1
    w2 = kv.create_or_update_secret("app/db", {"password": V2, "user": "app"}, cas=1)["data"]
    assert w2["version"] == 2, w2
    e = refused(hvac.exceptions.InvalidRequest,
                lambda: kv.create_or_update_secret("app/db", {"password": "nope"}, cas=1))
    assert any(m.startswith("check-and-set parameter did not match the current version") for m in e.errors), e.errors
    out["cas_mismatch"] = e.errors
    refused(hvac.exceptions.InvalidRequest, lambda: kv.create_or_update_secret("app/db", {"a": "b"}, cas=0))
    assert kv.create_or_update_secret("app/api", {"token": "t"}, cas=0)["data"]["version"] == 1
    # A value that is not a string is refused, never converted.
    e = refused(hvac.exceptions.InvalidRequest, lambda: kv.create_or_update_secret("app/api", {"port": 5432}))
    assert any("values must be strings" in m for m in e.errors), e.errors
    out["not_strings"] = e.errors

    # Reads: the latest, a version, read_secret.
    r = kv.read_secret_version("app/db", raise_on_deleted_version=True)["data"]
    assert r["data"] == {"password": V2, "user": "app"} and r["metadata"]["version"] == 2, r
    assert set(r["metadata"]) == VERSION_FIELDS, r
    r = kv.read_secret_version("app/db", version=1, raise_on_deleted_version=True)["data"]
    assert r["data"]["password"] == V1 and r["metadata"]["version"] == 1, r
    assert kv.read_secret("app/db", raise_on_deleted_version=True)["data"]["data"]["password"] == V2
    # What does not exist: Vault's 404 with no message (hvac's InvalidPath).
    refused(hvac.exceptions.InvalidPath, lambda: kv.read_secret_version("app/none", raise_on_deleted_version=True))
    for path in ["secret/data/app/none", "secret/data/app/db?version=9", "secret/metadata/app/none"]:
        r = raw("GET", path)
        assert r.status_code == 404 and r.json() == {"errors": []}, (path, r.status_code, r.text)

    # hvac's patch: a read, then a write with check-and-set.
    assert kv.patch("app/db", {"password": V3})["data"]["version"] == 3
    r = kv.read_secret_version("app/db", raise_on_deleted_version=True)["data"]
    assert r["data"] == {"password": V3, "user": "app"}, r
    # Vault's PATCH: a JSON merge patch, `null` removes a name; other content types: 415.
    r = raw("PATCH", "secret/data/app/db", headers=MERGE,
            json={"data": {"user": None, "role": "ro"}, "options": {"cas": 3}})
    assert r.status_code == 200 and r.json()["data"]["version"] == 4, r.text
    assert set(r.json()["data"]) == VERSION_FIELDS, r.text
    r = kv.read_secret_version("app/db", raise_on_deleted_version=True)["data"]
    assert r["data"] == {"password": V3, "role": "ro"}, r
    r = raw("PATCH", "secret/data/app/db", json={"data": {"role": "rw"}})
    assert r.status_code == 415, (r.status_code, r.text)
    out["patch_json"] = r.status_code
    r = raw("PATCH", "secret/data/app/none", headers=MERGE, json={"data": {"a": "b"}})
    assert r.status_code == 404, (r.status_code, r.text)

    # Subkeys: every value is a string, so every subkey is null.
    r = raw("GET", "secret/subkeys/app/db?depth=1")
    assert r.status_code == 200, r.text
    d = r.json()["data"]
    assert d["subkeys"] == {"password": None, "role": None} and d["metadata"]["version"] == 4, d
    assert set(d["metadata"]) == VERSION_FIELDS, d
    d = raw("GET", "secret/subkeys/app/db?version=1").json()["data"]
    assert d["subkeys"] == {"password": None, "user": None} and d["metadata"]["version"] == 1, d
    assert raw("GET", "secret/subkeys/app/db?version=x").status_code == 400

    # Delete the latest: its read is Vault's 404 carrying its metadata.
    assert kv.delete_latest_version_of_secret("app/db").status_code == 204
    refused(hvac.exceptions.InvalidPath, lambda: kv.read_secret_version("app/db", raise_on_deleted_version=True))
    gone = kv.read_secret_version("app/db", raise_on_deleted_version=False)["data"]
    assert gone["data"] is None and gone["metadata"]["version"] == 4, gone
    assert TIME.fullmatch(gone["metadata"]["deletion_time"]) and gone["metadata"]["destroyed"] is False, gone
    r = raw("GET", "secret/data/app/db")
    assert r.status_code == 404 and r.json()["data"]["data"] is None, r.text
    assert r.json()["data"]["metadata"]["version"] == 4, r.text
    out["deleted_read"] = r.json()["data"]
    # Delete, undelete and destroy versions.
    assert kv.delete_secret_versions("app/db", [1, 2]).status_code == 204
    assert kv.undelete_secret_versions("app/db", [2, 4]).status_code == 204
    assert kv.read_secret_version("app/db", version=2, raise_on_deleted_version=True)["data"]["data"]["password"] == V2
    assert kv.read_secret_version("app/db", raise_on_deleted_version=True)["data"]["metadata"]["version"] == 4
    refused(hvac.exceptions.InvalidPath,
            lambda: kv.read_secret_version("app/db", version=1, raise_on_deleted_version=True))
    assert kv.destroy_secret_versions("app/db", [3]).status_code == 204
    # A destroyed version that was never deleted: hvac raises even with raise_on_deleted_version False.
    refused(hvac.exceptions.InvalidPath,
            lambda: kv.read_secret_version("app/db", version=3, raise_on_deleted_version=False))
    r = raw("GET", "secret/data/app/db?version=3")
    assert r.status_code == 404 and r.json()["data"]["metadata"]["destroyed"] is True, r.text
    r = raw("POST", "secret/delete/app/db", json={})
    assert r.status_code == 400 and r.json()["errors"] == ["no version number provided"], r.text

    # Metadata, in Vault's shape.
    m = kv.read_secret_metadata("app/db")["data"]
    assert set(m) == METADATA_FIELDS, m
    assert m["current_version"] == 4 and m["oldest_version"] == 1 and m["max_versions"] == 0, m
    assert m["cas_required"] is False and m["delete_version_after"] == "0s" and m["custom_metadata"] is None, m
    assert sorted(m["versions"]) == ["1", "2", "3", "4"], m
    assert m["versions"]["3"]["destroyed"] is True and m["versions"]["1"]["deletion_time"] != "", m
    assert m["versions"]["2"]["deletion_time"] == "" and TIME.fullmatch(m["updated_time"]), m
    out["metadata"] = m
    # update_metadata: only what is given changes; custom_metadata is replaced; a lower
    # max_versions drops the oldest at once.
    r = kv.update_metadata("app/db", max_versions=3, cas_required=True,
                           custom_metadata={"owner": CUSTOM, "team": "payments"})
    assert r.status_code == 204, r
    m = kv.read_secret_metadata("app/db")["data"]
    assert m["max_versions"] == 3 and m["cas_required"] is True and m["oldest_version"] == 2, m
    assert m["custom_metadata"] == {"owner": CUSTOM, "team": "payments"}, m
    assert sorted(m["versions"]) == ["2", "3", "4"], m
    # The secret's custom metadata comes with a read of its data, as Vault's.
    r = kv.read_secret_version("app/db", raise_on_deleted_version=True)["data"]
    assert r["metadata"]["custom_metadata"] == {"owner": CUSTOM, "team": "payments"}, r
    e = refused(hvac.exceptions.InvalidRequest, lambda: kv.create_or_update_secret("app/db", {"password": "x"}))
    assert any(m.startswith("check-and-set parameter required for this call") for m in e.errors), e.errors
    # PATCH metadata: merged, a null custom value removes its name, other fields stay.
    r = raw("PATCH", "secret/metadata/app/db", headers=MERGE,
            json={"cas_required": False, "custom_metadata": {"team": None, "tier": "1"}})
    assert r.status_code == 204, r.text
    m = kv.read_secret_metadata("app/db")["data"]
    assert m["custom_metadata"] == {"owner": CUSTOM, "tier": "1"} and m["cas_required"] is False, m
    assert m["max_versions"] == 3, m
    assert raw("PATCH", "secret/metadata/app/none", headers=MERGE, json={"max_versions": 2}).status_code == 404
    assert raw("PATCH", "secret/metadata/app/db", json={"max_versions": 2}).status_code == 415
    # POST metadata makes a secret with no version; delete_version_after as a Go duration.
    assert kv.update_metadata("app/ttl", delete_version_after="1h").status_code == 204
    m = kv.read_secret_metadata("app/ttl")["data"]
    assert m["current_version"] == 0 and m["versions"] == {} and m["delete_version_after"] == "1h0m0s", m
    w = kv.create_or_update_secret("app/ttl", {"k": "v"})["data"]
    assert TIME.fullmatch(w["deletion_time"]), w
    assert kv.read_secret_version("app/ttl", raise_on_deleted_version=True)["data"]["data"] == {"k": "v"}

    # Listing: names one level down, folders with `/`; none is a 404.
    assert kv.create_or_update_secret("app/nested/deep", {"k": "v"})["data"]["version"] == 1
    keys = kv.list_secrets("app")["data"]["keys"]
    assert keys == ["api", "db", "nested/", "ttl"], keys
    out["listed"] = keys
    assert kv.list_secrets("")["data"]["keys"] == ["app/"]
    r = raw("GET", "secret/metadata/app/?list=true")
    assert r.status_code == 200 and r.json()["data"]["keys"] == keys, r.text
    refused(hvac.exceptions.InvalidPath, lambda: kv.list_secrets("nothing"))

    # Delete a secret and every version.
    assert kv.delete_metadata_and_all_versions("app/api").status_code == 204
    refused(hvac.exceptions.InvalidPath, lambda: kv.read_secret_metadata("app/api"))
    assert kv.list_secrets("app")["data"]["keys"] == ["db", "nested/", "ttl"]

    # What the mount does not have or take, parameters it does not know, bodies that are
    # not JSON.
    codes = {}
    codes["unknown"] = raw("GET", "secret/export/app/db").status_code
    codes["method"] = raw("DELETE", "secret/config").status_code
    codes["get_delete"] = raw("GET", "secret/delete/app/db").status_code
    codes["list_data"] = raw("LIST", "secret/data/app").status_code
    codes["not_json"] = raw("POST", "secret/data/app/db", data=b"{not json").status_code
    codes["bad_path"] = raw("GET", "secret/data/app/a@b").status_code
    out["codes"] = codes
    r = raw("POST", "secret/data/app/warn", json={"data": {"a": "b"}, "bogus": 1})
    assert r.status_code == 200, r.text
    out["warnings"] = r.json()["warnings"]

elif phase == "nogrant":
    other = hvac.Client(url=url, cert=app, verify=ca).secrets.kv.v2
    # The engine's settings say nothing secret: a certificate reads them.
    assert other.read_configuration()["data"]["max_versions"] == 10
    forbidden = {}
    for label, f in [
        ("configure", lambda: other.configure(max_versions=3)),
        ("read", lambda: other.read_secret_version("app/db", raise_on_deleted_version=True)),
        ("read_missing", lambda: other.read_secret("app/none", raise_on_deleted_version=True)),
        ("write", lambda: other.create_or_update_secret("app/db", {"password": "mine"})),
        # Parameters the front refuses: 403 all the same, the grant first.
        ("write_not_strings", lambda: other.create_or_update_secret("app/db", {"n": 1})),
        ("patch", lambda: other.patch("app/db", {"password": "mine"})),
        ("delete_latest", lambda: other.delete_latest_version_of_secret("app/db")),
        ("delete", lambda: other.delete_secret_versions("app/db", [2])),
        ("undelete", lambda: other.undelete_secret_versions("app/db", [2])),
        ("destroy", lambda: other.destroy_secret_versions("app/db", [2])),
        ("list", lambda: other.list_secrets("app")),
        ("metadata", lambda: other.read_secret_metadata("app/db")),
        ("update_metadata", lambda: other.update_metadata("app/db", max_versions=1)),
        ("delete_all", lambda: other.delete_metadata_and_all_versions("app/db")),
    ]:
        e = refused(hvac.exceptions.Forbidden, f)
        forbidden[label] = e.errors
    out["forbidden"] = forbidden
    codes = {}
    codes["patch_json"] = raw("PATCH", "secret/data/app/db", cert=app, json={"data": {"a": "b"}}).status_code
    codes["patch_merge"] = raw("PATCH", "secret/data/app/db", cert=app, headers=MERGE, json={"data": {"a": "b"}}).status_code
    codes["subkeys"] = raw("GET", "secret/subkeys/app/db", cert=app).status_code
    codes["not_json"] = raw("POST", "secret/data/app/db", cert=app, data=b"{not json").status_code
    codes["metadata_patch"] = raw("PATCH", "secret/metadata/app/db", cert=app, headers=MERGE, json={}).status_code
    out["codes"] = codes

elif phase == "writeonly":
    # The app holds secret-write alone on app/w: its answers do not show the custom
    # metadata (reading metadata needs secret-read-metadata).
    kv.update_metadata("app/w", custom_metadata={"owner": "team-w"})
    writer = hvac.Client(url=url, cert=app, verify=ca).secrets.kv.v2
    w = writer.create_or_update_secret("app/w", {"k": "v"})["data"]
    assert w["version"] == 1 and w["custom_metadata"] is None, w
    # (hvac's `patch` reads the secret first: Vault's own PATCH does not.)
    r = raw("PATCH", "secret/data/app/w", cert=app, headers=MERGE, json={"data": {"k2": "v2"}})
    assert r.status_code == 200, r.text
    p = r.json()["data"]
    assert p["version"] == 2 and p["custom_metadata"] is None, p
    r = raw("POST", "secret/data/app/w", cert=app, json={"data": {"k": "v3"}})
    assert r.status_code == 200 and "team-w" not in r.text, r.text
    refused(hvac.exceptions.Forbidden, lambda: writer.read_secret_metadata("app/w"))
    # The admin's answers do.
    a = kv.create_or_update_secret("app/w", {"k": "v4"})["data"]
    assert a["custom_metadata"] == {"owner": "team-w"}, a
    out["versions"] = [w["version"], p["version"], a["version"]]

elif phase == "sealed":
    r = raw("GET", "secret/data/app/db")
    out["sealed_read"] = r.status_code
    e = refused(hvac.exceptions.VaultDown, lambda: kv.read_secret("app/db", raise_on_deleted_version=True))
    out["sealed_errors"] = e.errors

else:
    raise SystemExit(f"unknown phase {phase}")

print(json.dumps(out))
