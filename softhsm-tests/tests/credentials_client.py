"""A verifier of kms's JWT-SVIDs as services write one (credentials.rs): PyJWT's
`PyJWKClient` fetching the issuer's keys from its JWKS URL over TLS (no client
certificate), then `jwt.decode` with the audience and issuer it expects.

Run as `python3 credentials_client.py PHASE CONFIG_JSON`; prints one JSON object. Every
check is an `assert` (the script exits non-zero, and the Rust test fails, when one fails).

Phases: `verify` (tokens given in the config: the valid ones verify; one for another
audience, an altered one, one of another issuer's key and an expired one are refused),
`discovery` (the discovery document names the issuer and its keys), `vault` (hvac, over
mTLS, asks Vault's identity token path for a token, which PyJWT verifies; another caller
and an unknown issuer are refused).
"""

import base64
import json
import ssl
import sys
import urllib.error
import urllib.request

import jwt

phase = sys.argv[1]
cfg = json.loads(sys.argv[2])
ctx = ssl.create_default_context(cafile=cfg["ca"])
iss = cfg["issuer_url"]
out = {}


def refused(exc_type, f):
    try:
        f()
    except exc_type as e:
        return type(e).__name__
    raise AssertionError(f"expected {exc_type.__name__}")


def get(url):
    with urllib.request.urlopen(url, context=ctx) as r:
        return r.status, r.headers.get("Cache-Control", ""), json.loads(r.read())


if phase == "discovery":
    status, cache, doc = get(iss + "/.well-known/openid-configuration")
    assert status == 200, status
    assert doc["issuer"] == iss, doc
    assert doc["jwks_uri"] == iss + "/.well-known/keys", doc
    assert cache.startswith("public, max-age="), cache
    status, cache, keys = get(doc["jwks_uri"])
    assert cache.startswith("public, max-age="), cache
    assert status == 200 and keys["keys"], keys
    for k in keys["keys"]:
        # Public members only: no private part of any key.
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(k), k
        assert k["kid"] and k["alg"] and k["use"] == "sig", k
    out["kids"] = sorted(k["kid"] for k in keys["keys"])
    # An issuer that is not one: 404, as any unknown path.
    missing = iss.rsplit("/", 1)[0] + "/nobody/.well-known/keys"
    try:
        get(missing)
        raise AssertionError("an unknown issuer's keys were served")
    except urllib.error.HTTPError as e:
        out["unknown_issuer"] = e.code
    out["algs"] = doc["id_token_signing_alg_values_supported"]

elif phase == "vault":
    import hvac

    def vault(who):
        return hvac.Client(url=cfg["url"], cert=(cfg[who + "_cert"], cfg[who + "_key"]), verify=cfg["ca"])

    data = vault("app").secrets.identity.generate_signed_id_token(name="workloads")["data"]
    assert set(data) == {"client_id", "token", "ttl"}, sorted(data)
    assert data["client_id"] == "payments", data["client_id"]
    assert 0 < data["ttl"] <= 300, data["ttl"]
    client = jwt.PyJWKClient(iss + "/.well-known/keys", ssl_context=ctx, cache_keys=False)
    token = data["token"]
    claims = jwt.decode(
        token,
        client.get_signing_key_from_jwt(token).key,
        algorithms=[cfg["alg"]],
        audience="payments",
        issuer=iss,
        options={"require": ["exp", "iat", "sub", "aud", "iss", "jti"]},
    )
    out["subject"], out["jti"] = claims["sub"], claims["jti"]
    # For the Rust test to look for in the logs and the audit log.
    out["signature"] = token.rsplit(".", 1)[1]
    # Vault's answers to a caller the issuer does not list, and to a role (issuer) that is
    # not one: 400, as Vault's "role not found".
    out["other"] = refused(
        hvac.exceptions.Forbidden,
        lambda: vault("other").secrets.identity.generate_signed_id_token(name="workloads"),
    )
    out["unknown"] = refused(
        hvac.exceptions.InvalidRequest,
        lambda: vault("app").secrets.identity.generate_signed_id_token(name="nobody"),
    )
    # An audience the issuer does not list, named in the query (a kms addition).
    out["elsewhere"] = refused(
        hvac.exceptions.Forbidden,
        lambda: vault("app").adapter.get("/v1/identity/oidc/token/workloads", params={"audience": "elsewhere"}),
    )

elif phase == "verify":
    client = jwt.PyJWKClient(iss + "/.well-known/keys", ssl_context=ctx, cache_keys=False)

    def decode(token, audience=cfg["audience"]):
        key = client.get_signing_key_from_jwt(token)
        return jwt.decode(
            token,
            key.key,
            algorithms=[cfg["alg"]],
            audience=audience,
            issuer=iss,
            options={"require": ["exp", "iat", "sub", "aud", "iss", "jti"]},
        )

    claims = [decode(t) for t in cfg["valid"]]
    for c, t in zip(claims, cfg["valid"]):
        header = jwt.get_unverified_header(t)
        # JWT-SVID: the header holds alg, kid and typ, nothing else.
        assert set(header) == {"alg", "kid", "typ"} and header["typ"] == "JWT", header
        assert c["aud"] == [cfg["audience"]] and c["exp"] > c["iat"], c
    out["subjects"] = [c["sub"] for c in claims]
    out["actors"] = [c.get("act", {}).get("sub") for c in claims]
    out["jtis"] = [c["jti"] for c in claims]
    out["team"] = [c.get("team") for c in claims]
    first = cfg["valid"][0]
    out["other_audience"] = refused(jwt.InvalidAudienceError, lambda: decode(first, audience="elsewhere"))
    h, p, s = first.split(".")
    body = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    body["sub"] = "spiffe://test.kms/someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    out["altered"] = refused(jwt.InvalidSignatureError, lambda: decode(f"{h}.{forged}.{s}"))
    out["unknown_kid"] = refused(jwt.PyJWKClientError, lambda: decode(cfg["other_issuer"]))
    out["expired"] = refused(jwt.ExpiredSignatureError, lambda: decode(cfg["expired"]))

else:
    raise SystemExit(f"unknown phase {phase}")

print(json.dumps(out))
