"""A Vault client, unchanged, against kms's Vault-compatible HTTPS front (vault_transit.rs).

The real `hvac` client over mTLS, and Python's `cryptography` to check what comes back.
Run as `python3 vault_transit_client.py PHASE CONFIG_JSON`; prints one JSON object. Every
check is an `assert` (the script exits non-zero, and the Rust test fails, when one fails);
the Rust test also checks the values printed.

Phases: `create` (keys, as an admin), `use` (every method, once the test granted the admin
every operation on the keys), `front` (what the front refuses before any call), `limits` (a server with low limits),
`sealed`
(the server was sealed).
"""

import base64
import hashlib
import http.client
import json
import ssl
import sys

import hvac
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

phase = sys.argv[1]
cfg = json.loads(sys.argv[2])
url, ca = cfg["url"], cfg["ca"]
admin = (cfg["admin_cert"], cfg["admin_key"])
app = (cfg["app_cert"], cfg["app_key"])

b64 = lambda b: base64.b64encode(b).decode()
unb64 = lambda s: base64.b64decode(s)


def client(cert=admin, token=None):
    return hvac.Client(url=url, cert=cert, verify=ca, token=token)


def refused(exc_type, f):
    """Runs f, which must raise exc_type; returns the exception."""
    try:
        f()
    except exc_type as e:
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


out = {}
c = client()
t = c.secrets.transit

if phase == "create":
    # Health and seal status: no certificate needed.
    anon = hvac.Client(url=url, verify=ca)
    health = anon.sys.read_health_status(method="GET")
    assert health["initialized"] is True and health["sealed"] is False, health
    seal = anon.sys.read_seal_status()
    assert seal["sealed"] is False and seal["t"] == 2 and seal["n"] == 3, seal
    out["health"] = health
    out["seal_status"] = seal
    # Without a certificate, anything else is refused (403), a token or not.
    refused(hvac.exceptions.Forbidden, lambda: anon.secrets.transit.list_keys())
    # Log in with the certificate: a token bound to it.
    login = c.auth.cert.login(cert_pem=admin[0], key_pem=admin[1])
    token = login["auth"]["client_token"]
    assert token.startswith("hvs.") and login["auth"]["lease_duration"] > 0, login
    assert c.token == token
    me = c.auth.token.lookup_self()["data"]
    assert me["id"] == token and me["ttl"] > 0 and me["meta"]["principal"] == cfg["admin_principal"], me
    out["login_ttl"] = login["auth"]["lease_duration"]
    # The token presented with another certificate, or none, is refused.
    refused(hvac.exceptions.Forbidden, lambda: client(app, token).secrets.transit.list_keys())
    refused(hvac.exceptions.Forbidden, lambda: hvac.Client(url=url, verify=ca, token=token).secrets.transit.list_keys())
    refused(hvac.exceptions.Forbidden, lambda: client(admin, "hvs.forged").secrets.transit.list_keys())
    # Keys of every type, with Vault's type names.
    for name, key_type in [("aes", "aes256-gcm96"), ("p256", "ecdsa-p256"), ("p384", "ecdsa-p384"),
                           ("ed", "ed25519"), ("rsa", "rsa-2048"), ("mac", "hmac")]:
        if key_type == "hmac":
            # hvac's create_key does not know Vault's hmac type (Vault 1.12+): its raw call.
            r = c.adapter.post(f"/v1/transit/keys/{name}", json={"type": "hmac", "key_size": 32})
        else:
            r = t.create_key(name, key_type=key_type)
        assert r["data"]["type"] == key_type and r["data"]["latest_version"] == 1, r
    again = t.create_key("aes", key_type="aes256-gcm96")
    assert "already existed" in " ".join(again["warnings"]), again
    # SPIRE's KeyManager: exactly its calls (pkg/server/common/vault/client.go CreateKey).
    for name, key_type in [("spire-ec", "ecdsa-p256"), ("spire-rsa", "rsa-2048")]:
        r = c.adapter.post(f"/v1/transit/keys/{name}",
                           json={"type": key_type, "exportable": False, "auto_rotate_period": 0})
        assert r["data"]["type"] == key_type, r
    # What kms does not offer is refused with a 400, never ignored.
    refusals = {}
    for label, f in [
        ("convergent", lambda: t.create_key("x1", convergent_encryption=True, derived=True)),
        ("derived", lambda: t.create_key("x2", derived=True)),
        ("exportable", lambda: t.create_key("x3", exportable=True)),
        ("plaintext_backup", lambda: t.create_key("x4", allow_plaintext_backup=True)),
        ("chacha", lambda: t.create_key("x5", key_type="chacha20-poly1305")),
        ("export", lambda: t.export_key("aes", key_type="encryption-key")),
    ]:
        e = refused(hvac.exceptions.InvalidRequest, f)
        refusals[label] = e.errors
    out["refusals"] = refusals
    keys = t.list_keys()["data"]["keys"]
    assert sorted(keys) == sorted(["aes", "p256", "p384", "ed", "rsa", "mac", "spire-ec", "spire-rsa"]), keys
    out["keys"] = keys
    out["token"] = token

elif phase == "use":
    # Encrypt / decrypt, with associated data.
    pt = b"attack at dawn"
    enc = t.encrypt_data("aes", b64(pt), associated_data=b64(b"ctx"))["data"]
    assert enc["ciphertext"].startswith("vault:v1:") and enc["key_version"] == 1, enc
    dec = t.decrypt_data("aes", enc["ciphertext"], associated_data=b64(b"ctx"))["data"]
    assert unb64(dec["plaintext"]) == pt
    # A ciphertext made by gRPC Encrypt decrypts here, in the documented form.
    grpc_ct = cfg["grpc_ciphertext"]
    out["from_grpc"] = unb64(t.decrypt_data("aes", grpc_ct)["data"]["plaintext"]).decode()
    # The wrong associated data: the opaque 400.
    refused(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data("aes", enc["ciphertext"], associated_data=b64(b"other")))
    # Derivation and convergence are refused, not ignored.
    e = refused(hvac.exceptions.InvalidRequest, lambda: t.encrypt_data("aes", b64(pt), context=b64(b"c")))
    out["context_refused"] = e.errors
    # A body that is not JSON: Vault's 400.
    bad = requests.post(f"{url}/v1/transit/encrypt/aes", data=b"{not json", cert=admin, verify=ca)
    assert bad.status_code == 400 and bad.json()["errors"] == ["failed to parse JSON input"], bad.text
    # A ciphertext whose prefix names another version than the one inside.
    forged = "vault:v2:" + enc["ciphertext"].split(":", 2)[2]
    e = refused(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data("aes", forged))
    out["prefix_mismatch"] = e.errors
    # Batches, with references; a failed item makes the batch a 400, as Vault's.
    items = [{"plaintext": b64(b"one"), "reference": "a"}, {"plaintext": b64(b"two"), "reference": "b"},
             {"plaintext": b64(b"three"), "associated_data": b64(b"x"), "reference": "c"}]
    made = t.encrypt_data("aes", plaintext=None, batch_input=items)
    # hvac sends "plaintext": null beside batch_input: no warning of an unknown parameter.
    assert not made.get("warnings"), made.get("warnings")
    batch = made["data"]["batch_results"]
    assert [r["reference"] for r in batch] == ["a", "b", "c"] and all(r["ciphertext"].startswith("vault:v1:") for r in batch), batch
    back = t.decrypt_data("aes", ciphertext=None, batch_input=[
        {"ciphertext": batch[0]["ciphertext"]}, {"ciphertext": batch[1]["ciphertext"]},
        {"ciphertext": batch[2]["ciphertext"], "associated_data": b64(b"x")}])["data"]["batch_results"]
    assert [unb64(r["plaintext"]) for r in back] == [b"one", b"two", b"three"], back
    e = refused(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data("aes", ciphertext=None, batch_input=[
        {"ciphertext": batch[0]["ciphertext"], "reference": "good"}, {"ciphertext": "vault:v1:AAAA", "reference": "bad"}]))
    results = e.json["data"]["batch_results"]
    assert unb64(results[0]["plaintext"]) == b"one" and "error" in results[1] and results[1]["reference"] == "bad", results
    out["batch_partial"] = results[1]["error"]
    # Rotate, then rewrap to the new version; the old ciphertext still decrypts.
    rot = t.rotate_key("aes")["data"]
    assert rot["latest_version"] == 2, rot
    rew = c.adapter.post("/v1/transit/rewrap/aes", json={"ciphertext": enc["ciphertext"], "associated_data": b64(b"ctx")})["data"]
    assert rew["ciphertext"].startswith("vault:v2:") and rew["key_version"] == 2, rew
    assert unb64(t.decrypt_data("aes", rew["ciphertext"], associated_data=b64(b"ctx"))["data"]["plaintext"]) == pt
    rew_batch = t.rewrap_data("aes", ciphertext=None, batch_input=[{"ciphertext": batch[0]["ciphertext"]}])["data"]["batch_results"]
    assert rew_batch[0]["ciphertext"].startswith("vault:v2:"), rew_batch
    # Config: min_decryption_version, then the v1 ciphertext is refused.
    conf = t.update_key_configuration("aes", min_decryption_version=2)["data"]
    assert conf["min_decryption_version"] == 2, conf
    refused(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data("aes", batch[1]["ciphertext"]))
    refused(hvac.exceptions.InvalidRequest, lambda: t.update_key_configuration("aes", exportable=True))
    read = t.read_key("aes")["data"]
    assert read["type"] == "aes256-gcm96" and set(read["keys"]) == {"1", "2"} and read["min_decryption_version"] == 2, read
    out["read_aes"] = read
    # Data keys.
    dk = t.generate_data_key("aes", key_type="plaintext", bits=256)["data"]
    assert len(unb64(dk["plaintext"])) == 32
    assert unb64(t.decrypt_data("aes", dk["ciphertext"])["data"]["plaintext"]) == unb64(dk["plaintext"])
    wrapped = t.generate_data_key("aes", key_type="wrapped", bits=512)["data"]
    assert "plaintext" not in wrapped and len(unb64(t.decrypt_data("aes", wrapped["ciphertext"])["data"]["plaintext"])) == 64
    # Signatures: each key type, verified by kms and by `cryptography`.
    msg = b"to be signed"
    digest = hashlib.sha256(msg).digest()
    pems = {n: t.read_key(n)["data"]["keys"]["1"]["public_key"] for n in ["p256", "p384", "rsa", "spire-ec", "spire-rsa"]}
    s = t.sign_data("p256", b64(msg), hash_algorithm="sha2-256")["data"]["signature"]
    checked = t.verify_signed_data("p256", b64(msg), signature=s, hash_algorithm="sha2-256")
    assert checked["data"]["valid"] is True
    # hvac's verify sends the key's name in the body too: no warning.
    assert not checked.get("warnings"), checked.get("warnings")
    assert t.verify_signed_data("p256", b64(b"other"), signature=s)["data"]["valid"] is False
    serialization.load_pem_public_key(pems["p256"].encode()).verify(unb64(s.split(":", 2)[2]), msg, ec.ECDSA(hashes.SHA256()))
    s = t.sign_data("p256", b64(digest), prehashed=True, marshaling_algorithm="jws")["data"]["signature"]
    raw = base64.urlsafe_b64decode(s.split(":", 2)[2] + "==")
    assert len(raw) == 64
    serialization.load_pem_public_key(pems["p256"].encode()).verify(
        utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
        digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert t.verify_signed_data("p256", b64(digest), signature=s, prehashed=True, marshaling_algorithm="jws")["data"]["valid"] is True
    s = t.sign_data("p384", b64(msg), hash_algorithm="sha2-384")["data"]["signature"]
    serialization.load_pem_public_key(pems["p384"].encode()).verify(unb64(s.split(":", 2)[2]), msg, ec.ECDSA(hashes.SHA384()))
    refused(hvac.exceptions.InvalidRequest, lambda: t.sign_data("p384", b64(msg), hash_algorithm="sha2-256"))
    ed_pub = t.read_key("ed")["data"]["keys"]["1"]["public_key"]
    s = t.sign_data("ed", b64(msg))["data"]["signature"]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    Ed25519PublicKey.from_public_bytes(unb64(ed_pub)).verify(unb64(s.split(":", 2)[2]), msg)
    s = t.sign_data("rsa", b64(msg), hash_algorithm="sha2-256", signature_algorithm="pkcs1v15")["data"]["signature"]
    serialization.load_pem_public_key(pems["rsa"].encode()).verify(unb64(s.split(":", 2)[2]), msg, padding.PKCS1v15(), hashes.SHA256())
    assert t.verify_signed_data("rsa", b64(msg), signature=s, signature_algorithm="pkcs1v15")["data"]["valid"] is True
    e = refused(hvac.exceptions.InvalidRequest, lambda: t.sign_data("rsa", b64(msg), signature_algorithm="pss"))
    out["pss_on_pkcs1_refused"] = e.errors
    sb = t.sign_data("p256", hash_input=None, batch_input=[{"input": b64(b"a")}, {"input": b64(b"b")}])["data"]["batch_results"]
    assert len(sb) == 2 and all(r["signature"].startswith("vault:v1:") for r in sb), sb
    # SPIRE's KeyManager: GET keys/:name for the public key, then sign/:name/sha2-256 with
    # prehashed and asn1 (and pkcs1v15 for RSA), exactly its body; verified by `cryptography`.
    spire = {}
    for name, extra in [("spire-ec", {}), ("spire-rsa", {"signature_algorithm": "pkcs1v15"})]:
        key = c.adapter.get(f"/v1/transit/keys/{name}")["data"]
        latest = str(key["latest_version"])
        pem = key["keys"][latest]["public_key"]
        tbs = hashlib.sha256(b"a certificate's TBS bytes " + name.encode()).digest()
        body = {"input": b64(tbs), "marshaling_algorithm": "asn1", "prehashed": True, **extra}
        sig = c.adapter.post(f"/v1/transit/sign/{name}/sha2-256", json=body)["data"]["signature"]
        assert sig.startswith("vault:v1:"), sig
        der = base64.b64decode(sig[len("vault:v1:"):])
        pub = serialization.load_pem_public_key(pem.encode())
        if name == "spire-ec":
            pub.verify(der, tbs, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            pub.verify(der, tbs, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        spire[name] = {"key_type": key["type"], "signature_bytes": len(der)}
    out["spire"] = spire
    # HMAC, and its verification.
    h = t.generate_hmac("mac", b64(msg))["data"]["hmac"]
    assert h.startswith("vault:v1:") and len(unb64(h.split(":", 2)[2])) == 32
    assert t.verify_signed_data("mac", b64(msg), hmac=h)["data"]["valid"] is True
    assert t.verify_signed_data("mac", b64(b"x"), hmac=h)["data"]["valid"] is False
    refused(hvac.exceptions.InvalidRequest, lambda: t.generate_hmac("mac", b64(msg), algorithm="sha2-512"))
    # (hvac's generate_hmac takes no batch_input: Vault's raw call.)
    hb = c.adapter.post("/v1/transit/hmac/mac", json={"batch_input": [{"input": b64(b"a")}, {"input": b64(b"b")}]})["data"]["batch_results"]
    assert len(hb) == 2 and hb[0]["hmac"] != hb[1]["hmac"], hb
    # Random bytes and hashes.
    r = t.generate_random_bytes(n_bytes=48, output_format="hex")["data"]["random_bytes"]
    assert len(bytes.fromhex(r)) == 48
    assert len(unb64(t.generate_random_bytes()["data"]["random_bytes"])) == 32
    sums = t.hash_data(b64(msg), algorithm="sha2-512")["data"]["sum"]
    assert sums == hashlib.sha512(msg).hexdigest()
    assert t.hash_data(b64(msg), output_format="base64")["data"]["sum"] == b64(hashlib.sha256(msg).digest())
    # (hvac does not send sha3-*: Vault's raw call, path form.)
    e = refused(hvac.exceptions.InvalidRequest, lambda: c.adapter.post("/v1/transit/hash/sha3-256", json={"input": b64(msg)}))
    out["sha3_refused"] = e.errors
    # And one made here, for the test to decrypt with gRPC.
    out["for_grpc"] = t.encrypt_data("aes", b64(b"from transit"))["data"]["ciphertext"]
    # A caller without a grant on the key: 403 permission denied.
    e = refused(hvac.exceptions.Forbidden, lambda: client(app).secrets.transit.encrypt_data("aes", b64(pt)))
    out["no_grant"] = e.errors
    e = refused(hvac.exceptions.Forbidden, lambda: client(app).secrets.transit.decrypt_data("aes", rew["ciphertext"]))
    # A caller without the admin role cannot create keys.
    refused(hvac.exceptions.Forbidden, lambda: client(app).secrets.transit.create_key("app-key"))
    # Delete: refused until deletion is allowed, then every version goes (p384 has two:
    # 1 is scheduled for destruction, 2, the primary, disabled).
    t.rotate_key("p384")
    refused(hvac.exceptions.InvalidRequest, lambda: t.delete_key("p384"))
    assert t.update_key_configuration("p384", deletion_allowed=True)["data"]["deletion_allowed"] is True
    gone = t.delete_key("p384")
    assert gone.status_code == 204, gone
    refused(hvac.exceptions.InvalidRequest, lambda: t.sign_data("p384", b64(msg), hash_algorithm="sha2-384"))
    # A missing key reads as Vault's 404.
    refused(hvac.exceptions.InvalidPath, lambda: t.read_key("nope"))

elif phase == "front":
    # What the front refuses itself, before any call, as a certificate holder without
    # grants (`probe`): each answer, and (vault_transit.rs) each record.
    probe = (cfg["probe_cert"], cfg["probe_key"])
    codes = {}
    secret_path = "transit/no-such-path-" + "s3cr3t"
    codes["unknown"] = requests.get(f"{url}/v1/{secret_path}", cert=probe, verify=ca).status_code
    codes["outside"] = requests.get(f"{url}/not-v1", cert=probe, verify=ca).status_code
    codes["method"] = requests.delete(f"{url}/v1/sys/health", cert=probe, verify=ca).status_code
    codes["login_json"] = requests.post(f"{url}/v1/auth/cert/login", data=b"{not json", cert=probe, verify=ca).status_code
    codes["export"] = requests.get(f"{url}/v1/transit/export/encryption-key/aes", cert=probe, verify=ca).status_code
    codes["token"] = requests.post(f"{url}/v1/transit/encrypt/aes", json={"plaintext": b64(b"x")},
                                   headers={"X-Vault-Token": "hvs.not-a-token"}, cert=probe, verify=ca).status_code
    # A body declared larger than the front takes: refused before it is sent.
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(*probe)
    host, port = url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx)
    conn.putrequest("POST", "/v1/transit/encrypt/aes")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    codes["too_large"] = conn.getresponse().status
    conn.close()
    # Parameters refused before the call, on a key the caller has no grant on: 403 (the
    # grant is checked first, `verify-mac` for a verification of a MAC), whatever they are.
    nogrant = requests.post(f"{url}/v1/transit/verify/mac", json={"hmac": "vault:v1:AAAA", "input": "not base64!"},
                            cert=probe, verify=ca)
    codes["no_grant_bad_params"] = nogrant.status_code
    # Hash input is bounded as every message (64 KiB).
    codes["hash_max"] = requests.post(f"{url}/v1/transit/hash", json={"input": b64(b"h" * 65536)},
                                      cert=admin, verify=ca).status_code
    codes["hash_over"] = requests.post(f"{url}/v1/transit/hash", json={"input": b64(b"h" * 65537)},
                                       cert=admin, verify=ca).status_code
    # A batch whose answer could be over the bound is refused before any item is done.
    items = [{"plaintext": b64(b"p" * 4608)} for _ in range(1000)]
    over = requests.post(f"{url}/v1/transit/encrypt/aes", json={"batch_input": items}, cert=admin, verify=ca)
    codes["batch_over"] = over.status_code
    out["batch_over"] = over.json().get("errors")
    # Unknown parameters are named in a bounded warning.
    many = {f"unknown{i:03}": 1 for i in range(200)}
    many["plaintext"] = b64(b"x")
    warned = requests.post(f"{url}/v1/transit/encrypt/aes", json=many, cert=admin, verify=ca)
    assert warned.status_code == 200, warned.text
    out["warnings"] = warned.json()["warnings"]
    out["codes"] = codes
    # A caller without a certificate: the open paths only; a method they do not take is
    # refused (and counted, never recorded one by one).
    anon = requests.post(f"{url}/v1/sys/health", verify=ca)
    out["anonymous_method"] = anon.status_code
    # A health code outside 200..=599 is refused, as Vault refuses it.
    out["health_600"] = requests.get(f"{url}/v1/sys/health?activecode=600", verify=ca).status_code
    out["health_503"] = requests.get(f"{url}/v1/sys/health?activecode=503", verify=ca).status_code

elif phase == "limits":
    # A server with low limits: a certificate holder's refusals by the front count against
    # its limit of refused calls; a caller without a certificate over its limit of calls
    # waits before its 429.
    import time
    probe = (cfg["probe_cert"], cfg["probe_key"])
    out["holder"] = [requests.get(f"{url}/v1/nope", cert=probe, verify=ca).status_code for _ in range(8)]
    anonymous = []
    for _ in range(5):
        started = time.monotonic()
        status = requests.get(f"{url}/v1/sys/health", verify=ca).status_code
        anonymous.append([status, time.monotonic() - started])
    out["anonymous"] = anonymous

elif phase == "sealed":
    anon = hvac.Client(url=url, verify=ca)
    health = anon.sys.read_health_status(method="GET")
    assert health.status_code == 503 and health.json()["sealed"] is True, health
    assert anon.sys.read_seal_status()["sealed"] is True
    e = refused(hvac.exceptions.VaultDown, lambda: t.encrypt_data("aes", b64(b"x")))
    out["sealed_encrypt"] = e.errors
    out["sealed_health"] = health.status_code

print(json.dumps(out))
