"""A relying party of kms's X.509-SVIDs and SPIFFE bundle (credentials_x509.rs), with what
such parties use: `cryptography` to read a leaf, the `spiffe` package to read the bundle
and validate a JWT-SVID against it, plain HTTPS without a client certificate to fetch the
CA certificates.

Run as `python3 credentials_x509.py PHASE CONFIG_JSON`; prints one JSON object. Every check
is an `assert` (the script exits non-zero, and the Rust test fails, when one fails).

Phases: `leaf` (the certificate in `leaf` follows the X509-SVID profile for `spiffe_id`),
`published` (`/v1/pki/NAME/ca/pem`, `ca_chain` and `/v1/identity/spiffe/bundle` answer
with cache headers; unknown issuers and other kinds are 404; the bundle parses with the
`spiffe` package, its X.509 authorities are the issuer's CA certificates and the JWT-SVID
in `token` validates against its JWT authorities).
"""

import base64
import json
import ssl
import sys
import urllib.error
import urllib.request

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

phase = sys.argv[1]
cfg = json.loads(sys.argv[2])
out = {}


def get(url):
    ctx = ssl.create_default_context(cafile=cfg["ca"])
    with urllib.request.urlopen(url, context=ctx) as r:
        return r.status, r.headers, r.read()


def status_of(url):
    try:
        return get(url)[0]
    except urllib.error.HTTPError as e:
        return e.code


if phase == "leaf":
    leaf = x509.load_pem_x509_certificate(cfg["leaf"].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [cfg["spiffe_id"]], uris
    assert len(list(san)) == 1, list(san)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical, ku
    assert ku.value.digital_signature and not ku.value.key_cert_sign, ku
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False, bc
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.serial_number > 0 and leaf.serial_number.bit_length() >= 64
    out["serial"] = format(leaf.serial_number, "x")
    out["lifetime"] = int(
        (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    )

elif phase == "published":
    from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle

    base = cfg["base"]
    status, headers, body = get(f"{base}/v1/pki/{cfg['issuer']}/ca/pem")
    assert status == 200, status
    assert headers.get("Cache-Control", "").startswith("public, max-age="), headers
    assert headers.get("Content-Type") == "application/pem-certificate-chain", headers
    ca = x509.load_pem_x509_certificate(body)
    assert ca.subject.rfc4514_string() == f"CN={cfg['issuer']},O=kms", ca.subject
    status, headers, body = get(f"{base}/v1/pki/{cfg['issuer']}/ca_chain")
    assert status == 200 and headers.get("Cache-Control", "").startswith("public, max-age=")
    chain = x509.load_pem_x509_certificates(body)
    assert ca in chain, chain
    out["ca_chain"] = len(chain)
    out["unknown"] = status_of(f"{base}/v1/pki/nobody/ca/pem")
    out["other_kind"] = status_of(f"{base}/v1/pki/{cfg['jwt_issuer']}/ca_chain")

    status, headers, body = get(f"{base}/v1/identity/spiffe/bundle")
    assert status == 200 and headers.get("Cache-Control", "").startswith("public, max-age=")
    doc = json.loads(body)
    assert doc["spiffe_refresh_hint"] > 0, doc
    for k in doc["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(k), k
        assert k["use"] in ("jwt-svid", "x509-svid"), k
    td = TrustDomain(cfg["trust_domain"])
    # spiffe 0.3.2's JwtBundle.parse reads every key of the document as a JWT authority
    # (and refuses one without a kid, as x509-svid keys are, SPIRE's too); its next
    # version keeps the `jwt-svid` keys only. Do here what that version does.
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert all(k["kid"] for k in jwt_keys), jwt_keys
    jwt_bundle = JwtBundle.parse(td, json.dumps({"keys": jwt_keys}).encode())
    out["jwt_authorities"] = len(jwt_bundle.jwt_authorities)
    svid = JwtSvid.parse_and_validate(cfg["token"], jwt_bundle, {cfg["audience"]})
    assert str(svid.spiffe_id) == cfg["spiffe_id"], svid.spiffe_id
    # SPIFFE's bundle format: an x509-svid key carries exactly one certificate, x5c.
    ders = []
    for k in doc["keys"]:
        if k["use"] == "x509-svid":
            assert len(k["x5c"]) == 1 and "kid" not in k, k
            ders.append(base64.b64decode(k["x5c"][0]))
    x509_bundle = X509Bundle.parse_raw(td, b"".join(ders))
    authorities = x509_bundle.x509_authorities
    assert ca in authorities, authorities
    out["x509_authorities"] = len(authorities)
    # A JWT-SVID altered in its claims does not validate against the bundle.
    head, claims, sig = cfg["token"].split(".")
    forged = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    forged["sub"] = cfg["spiffe_id"] + "x"
    forged = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    try:
        JwtSvid.parse_and_validate(f"{head}.{forged}.{sig}", jwt_bundle, {cfg["audience"]})
        raise AssertionError("an altered token validated")
    except AssertionError:
        raise
    except Exception as e:  # the package's own error types
        out["altered"] = type(e).__name__

else:
    raise SystemExit(f"unknown phase {phase}")

print(json.dumps(out))
