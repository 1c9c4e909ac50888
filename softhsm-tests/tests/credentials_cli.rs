//! `kms issuer` and `kms credential` (docs/credentials.md, "The CLI") end to end: a real
//! server over a SoftHSM token with the HTTPS front (a server without it issues no token),
//! driven through the CLI only. An admin defines an issuer of an HSM P-256 key, lists and
//! shows it, changes its longest lifetime; the application asks for a token (printed alone,
//! so `TOKEN=$(kms credential jwt ...)` works) and validates it (exit 0) and for another
//! audience (exit 1); a refused issuance exits 1 with its code and never prints a token.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

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

#[test]
fn issuers_and_jwt_svids_through_the_cli() {
    let hsm = TestHsm::new("credentials-cli");
    let (server, _shares, _port) = softhsm_tests::start_with_http(&hsm, "");
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let as_app = |args: &[&str], stdin: &str| server.kms_as(Some(&app), args, stdin);

    ok(server.kms(
        &[
            "key",
            "create",
            "jwt-signer",
            "--algorithm",
            "ecdsa-p256-sha256",
            "--protection",
            "hsm",
        ],
        "",
    ));

    // The admin defines the issuer; the answer is the issuer as stored.
    let created = ok(server.kms(
        &[
            "issuer",
            "create",
            "workloads",
            "--key",
            "jwt-signer",
            "--principal",
            &app.principal,
            "--audience",
            "payments",
            "--audience",
            "ledger",
            "--default-ttl",
            "2m",
            "--max-ttl",
            "10m",
            "--claim",
            "team=platform",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(created["name"], "workloads");
    assert_eq!(created["default_ttl_seconds"], 120);
    assert_eq!(created["max_ttl_seconds"], 600);
    assert_eq!(created["claims"]["team"], "platform");
    let url = created["issuer_url"].as_str().unwrap().to_owned();
    assert!(
        url.ends_with("/v1/identity/oidc/provider/workloads"),
        "{url}"
    );

    // A claim given twice is refused before any call.
    let twice = server.kms(
        &[
            "issuer",
            "create",
            "other",
            "--key",
            "jwt-signer",
            "--audience",
            "a",
            "--claim",
            "t=1",
            "--claim",
            "t=2",
        ],
        "",
    );
    refused(&twice, "error", "the claim \"t\" is given twice");

    // Anyone with a certificate reads the issuers: JSON, and the table.
    let listed = ok(as_app(&["issuer", "list", "--json"], "")).json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["key"], "jwt-signer");
    assert_eq!(listed[0]["audiences"][1], "ledger");
    let table = ok(server.kms(&["issuer", "list"], "")).stdout;
    assert!(
        table.contains("NAME") && table.contains("ISSUER URL"),
        "{table}"
    );
    assert!(
        table.contains("workloads") && table.contains("payments,ledger") && table.contains("10m"),
        "{table}"
    );
    let got = ok(as_app(&["issuer", "get", "workloads", "--json"], "")).json();
    assert_eq!(got, created);
    let shown = ok(server.kms(&["issuer", "get", "workloads"], "")).stdout;
    assert!(
        shown.contains(&url) && shown.contains("team=platform"),
        "{shown}"
    );

    // The application's token: alone on standard output, then a newline.
    let issued = ok(as_app(
        &[
            "credential",
            "jwt",
            "--issuer",
            "workloads",
            "--audience",
            "payments",
        ],
        "",
    ));
    let token = issued.stdout.strip_suffix('\n').unwrap().to_owned();
    assert_eq!(token.split('.').count(), 3, "{issued:?}");
    assert!(!token.contains(char::is_whitespace));
    assert!(!issued.stderr.contains(&token));
    let issued_json = ok(as_app(
        &[
            "credential",
            "jwt",
            "--issuer",
            "workloads",
            "--audience",
            "ledger",
            "--ttl",
            "1m",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(issued_json["subject"], app.principal.as_str());
    assert_eq!(issued_json["key_version"], 1);
    assert_eq!(issued_json["token"].as_str().unwrap().split('.').count(), 3);
    assert!(!issued_json["kid"].as_str().unwrap().is_empty());
    assert!(!issued_json["jti"].as_str().unwrap().is_empty());

    // Validation, from standard input and from the argument: exit 0, the subject.
    let valid = ok(server.kms(
        &[
            "credential",
            "validate",
            "--issuer",
            "workloads",
            "--audience",
            "payments",
        ],
        &format!("{token}\n"),
    ));
    assert!(valid.stdout.starts_with("valid\n"), "{valid:?}");
    assert!(valid.stdout.contains(&app.principal), "{valid:?}");
    let valid = ok(as_app(
        &[
            "credential",
            "validate",
            "--issuer",
            "workloads",
            "--audience",
            "payments",
            "--json",
            &token,
        ],
        "",
    ))
    .json();
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["subject"], app.principal.as_str());
    assert_eq!(valid["actor"], "");

    // Another audience: not valid, exit 1, the reason and never the token.
    let other = as_app(
        &[
            "credential",
            "validate",
            "--issuer",
            "workloads",
            "--audience",
            "ledger",
            "-",
        ],
        &token,
    );
    assert_eq!(other.code, Some(1), "{other:?}");
    assert!(other.stdout.starts_with("not valid: "), "{other:?}");
    assert!(other.stdout.contains("audience"), "{other:?}");
    assert!(!other.stdout.contains(&token) && !other.stderr.contains(&token));
    let other = as_app(
        &[
            "credential",
            "validate",
            "--issuer",
            "workloads",
            "--audience",
            "ledger",
            "--json",
        ],
        &token,
    );
    assert_eq!(other.code, Some(1), "{other:?}");
    assert_eq!(other.json()["valid"], false);

    // Revoked by its jti (admin role): validation refuses it; the app may not revoke.
    let jti = issued_json["jti"].as_str().unwrap();
    refused(
        &as_app(&["credential", "revoke", "--issuer", "workloads", jti], ""),
        "PERMISSION_DENIED",
        "admin",
    );
    let revoked = ok(server.kms(&["credential", "revoke", "--issuer", "workloads", jti], ""));
    assert!(revoked.stdout.starts_with("revoked"), "{revoked:?}");
    let after = as_app(
        &[
            "credential",
            "validate",
            "--issuer",
            "workloads",
            "--audience",
            "ledger",
        ],
        issued_json["token"].as_str().unwrap(),
    );
    assert_eq!(after.code, Some(1), "{after:?}");
    assert!(after.stdout.contains("revoked"), "{after:?}");

    // Refused issuances: an audience the issuer does not list, a lifetime over its
    // maximum, a caller it does not list. Nothing on standard output.
    refused(
        &as_app(
            &[
                "credential",
                "jwt",
                "--issuer",
                "workloads",
                "--audience",
                "elsewhere",
            ],
            "",
        ),
        "PERMISSION_DENIED",
        "audience",
    );
    refused(
        &as_app(
            &[
                "credential",
                "jwt",
                "--issuer",
                "workloads",
                "--audience",
                "payments",
                "--ttl",
                "11m",
            ],
            "",
        ),
        "INVALID_ARGUMENT",
        "",
    );
    let other = hsm.pki.client("other", &ClientSpec::spiffe("other"));
    refused(
        &server.kms_as(
            Some(&other),
            &[
                "credential",
                "jwt",
                "--issuer",
                "workloads",
                "--audience",
                "payments",
            ],
            "",
        ),
        "PERMISSION_DENIED",
        "",
    );

    // The admin lengthens the longest lifetime: get shows it, the rest stays, and the
    // longer token is issued.
    let updated = ok(server.kms(
        &[
            "issuer",
            "update",
            "workloads",
            "--max-ttl",
            "30m",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(updated["max_ttl_seconds"], 1800);
    let got = ok(server.kms(&["issuer", "get", "workloads", "--json"], "")).json();
    assert_eq!(got["max_ttl_seconds"], 1800);
    assert_eq!(got["default_ttl_seconds"], 120);
    assert_eq!(got["audiences"], created["audiences"]);
    assert_eq!(got["claims"], created["claims"]);
    ok(as_app(
        &[
            "credential",
            "jwt",
            "--issuer",
            "workloads",
            "--audience",
            "payments",
            "--ttl",
            "11m",
        ],
        "",
    ));
    // A list given replaces that list.
    let updated = ok(server.kms(
        &[
            "issuer",
            "update",
            "workloads",
            "--audience",
            "ledger",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(updated["audiences"], serde_json::json!(["ledger"]));
    refused(
        &as_app(
            &[
                "credential",
                "jwt",
                "--issuer",
                "workloads",
                "--audience",
                "payments",
            ],
            "",
        ),
        "PERMISSION_DENIED",
        "audience",
    );

    // --clear empties a list: the claims go; tokens no longer carry them.
    let cleared = ok(server.kms(
        &[
            "issuer",
            "update",
            "workloads",
            "--clear",
            "claims",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(cleared["claims"], serde_json::json!({}));
    assert_eq!(cleared["audiences"], serde_json::json!(["ledger"]));

    // Rotation (admin role): the new version is published at once and signs once it has
    // been published for the issuer's publish-ahead time (2 minutes by default).
    refused(
        &as_app(&["issuer", "rotate", "workloads"], ""),
        "PERMISSION_DENIED",
        "admin",
    );
    refused(
        &server.kms(&["issuer", "rotate", "nobody"], ""),
        "NOT_FOUND",
        "no issuer \"nobody\"",
    );
    let rotated = ok(server.kms(&["issuer", "rotate", "workloads", "--json"], "")).json();
    assert_eq!(rotated["signing_version"], 1);
    assert_eq!(rotated["publish_ahead_seconds"], 120);
    let shown = ok(server.kms(&["issuer", "get", "workloads"], "")).stdout;
    assert!(
        shown.contains("Signing version")
            && shown.contains("Publish ahead")
            && shown.contains("2m"),
        "{shown}"
    );
    ok(server.kms(
        &["issuer", "update", "workloads", "--publish-ahead", "0s"],
        "",
    ));
    let issued = ok(as_app(
        &[
            "credential",
            "jwt",
            "--issuer",
            "workloads",
            "--audience",
            "ledger",
            "--json",
        ],
        "",
    ))
    .json();
    assert_eq!(issued["key_version"], 2);
}

/// Runs `openssl ARGS` in `dir`. Fails the test when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// X.509-SVIDs through the CLI: a self-signed issuer's certificate for an `openssl req`
/// request, written with its chain and verified by `openssl verify`; an outside CA's
/// issuer: `issuer csr`, openssl signs, `issuer set-certificate`, then a certificate.
#[test]
fn x509_svids_through_the_cli() {
    let hsm = TestHsm::new("credentials-cli-x509");
    let (server, _shares) = start_unsealed(&hsm, &hsm.config());
    let app = hsm.pki.client("app", &ClientSpec::spiffe("app"));
    let as_app = |args: &[&str]| server.kms_as(Some(&app), args, "");
    let dir = hsm.path().join("cli-x509");
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    for key in ["ca-hsm", "ca-corp"] {
        ok(server.kms(
            &[
                "key",
                "create",
                key,
                "--algorithm",
                "ecdsa-p256-sha256",
                "--protection",
                "hsm",
            ],
            "",
        ));
    }
    let shown = ok(server.kms(
        &[
            "issuer",
            "create",
            "workloads",
            "--kind",
            "x509",
            "--self-signed",
            "--key",
            "ca-hsm",
            "--principal",
            &app.principal,
        ],
        "",
    ));
    assert!(
        shown.stdout.contains("key version 1: certified"),
        "{shown:?}"
    );
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "app.key",
            "-out",
            "app.csr",
            "-subj",
            "/CN=app",
            "-addext",
            &format!("subjectAltName=URI:{}", app.principal),
        ],
    );
    let out = ok(as_app(&[
        "credential",
        "x509",
        "--issuer",
        "workloads",
        "--csr",
        &path("app.csr"),
        "--out",
        &path("app.pem"),
        "--chain-out",
        &path("ca.pem"),
        "--ttl",
        "10m",
    ]));
    assert!(out.stdout.contains(&app.principal), "{out:?}");
    openssl(
        &dir,
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslclient",
            "app.pem",
        ],
    );
    let json = ok(as_app(&[
        "credential",
        "x509",
        "--issuer",
        "workloads",
        "--csr",
        &path("app.csr"),
        "--out",
        &path("app2.pem"),
        "--json",
    ]))
    .json();
    assert_eq!(json["spiffe_id"], app.principal.as_str());
    assert_eq!(json["key_version"], 1);
    // Another caller's SPIFFE ID in the request: refused, nothing written.
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "db.key",
            "-out",
            "db.csr",
            "-subj",
            "/CN=db",
            "-addext",
            "subjectAltName=URI:spiffe://test.kms/db",
        ],
    );
    refused(
        &as_app(&[
            "credential",
            "x509",
            "--issuer",
            "workloads",
            "--csr",
            &path("db.csr"),
            "--out",
            &path("db.pem"),
        ]),
        "INVALID_ARGUMENT",
        "another SPIFFE ID",
    );
    assert!(!dir.join("db.pem").exists());

    // An outside CA.
    ok(server.kms(
        &[
            "issuer",
            "create",
            "corp",
            "--kind",
            "x509",
            "--key",
            "ca-corp",
            "--principal",
            &app.principal,
        ],
        "",
    ));
    ok(server.kms(&["issuer", "csr", "corp", "--out", &path("corp.csr")], ""));
    std::fs::write(
        dir.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nx509_extensions = root\nprompt = no\n\
         [dn]\nCN = Corp Root\n\
         [root]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign\n\
         subjectKeyIdentifier = hash\n\
         [inter]\nbasicConstraints = critical,CA:TRUE,pathlen:0\n\
         keyUsage = critical,keyCertSign\nsubjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-config",
            "ca.cnf",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-days",
            "2",
        ],
    );
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "corp.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ca.cnf",
            "-extensions",
            "inter",
            "-out",
            "corp.pem",
        ],
    );
    let chain = std::fs::read_to_string(dir.join("corp.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root.pem")).unwrap();
    std::fs::write(dir.join("corp-chain.pem"), chain).unwrap();
    refused(
        &server.kms(
            &[
                "issuer",
                "set-certificate",
                "corp",
                "--version",
                "1",
                "--chain",
                &path("root.pem"),
            ],
            "",
        ),
        "INVALID_ARGUMENT",
        "public key",
    );
    let shown = ok(server.kms(
        &[
            "issuer",
            "set-certificate",
            "corp",
            "--version",
            "1",
            "--chain",
            &path("corp-chain.pem"),
        ],
        "",
    ));
    assert!(
        shown.stdout.contains("key version 1: certified"),
        "{shown:?}"
    );
    ok(as_app(&[
        "credential",
        "x509",
        "--issuer",
        "corp",
        "--csr",
        &path("app.csr"),
        "--out",
        &path("corp-app.pem"),
        "--chain-out",
        &path("corp-app-chain.pem"),
    ]));
    openssl(
        &dir,
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "corp-app-chain.pem",
            "corp-app.pem",
        ],
    );
}
