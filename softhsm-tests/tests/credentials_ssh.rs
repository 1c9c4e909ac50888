//! OpenSSH certificates issued by the credentials engine (docs/credentials.md, "SSH
//! certificates") on a real server over a SoftHSM token, checked by OpenSSH itself: the
//! CLI writes `id-cert.pub`; `ssh-keygen -L` reads it; a real `sshd` (started here on
//! 127.0.0.1 with its own configuration, its TrustedUserCAKeys fetched from
//! `/v1/ssh/NAME/public_key` over HTTPS without a client certificate) lets `ssh` log in as
//! a principal of the certificate and refuses another user and an expired certificate;
//! `ssh` accepts sshd's host certificate through an `@cert-authority` line and refuses it
//! under another CA. The CA keys are HSM keys (ECDSA P-256, Ed25519 through CKM_EDDSA).
//! Refusals are typed and recorded with the issuances.
//!
//! Needs root (sshd logs in as root here) and OpenSSH's server and client (scripts/lib.sh
//! `ensure_openssh_server`). The test fails, never skips, when they are missing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use softhsm_tests::{ClientSpec, Out, TestHsm, free_port};

const SSHD: &str = "/usr/sbin/sshd";

fn ok(out: Out) -> Out {
    assert_eq!(out.code, Some(0), "{out:?}");
    out
}

/// Asserts the CLI failed with `reason` in its error and wrote no certificate.
fn refused(out: &Out, reason: &str) {
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(out.stderr.contains(reason), "expected {reason}: {out:?}");
}

/// Runs a program; its exit code, standard output and error.
fn run(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/lib.sh ensure_openssh_server)"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A new key pair at `path` (and `path.pub`), as a user makes one.
fn keygen(path: &Path, kind: &str) {
    let (code, _, err) = run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            kind,
            "-N",
            "",
            "-C",
            "user@laptop",
            "-f",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
}

/// `ssh-keygen -L`'s reading of a certificate.
fn show(cert: &Path) -> String {
    let (code, out, err) = run("ssh-keygen", &["-L", "-f", cert.to_str().unwrap()]);
    assert_eq!(code, 0, "ssh-keygen -L: {err}");
    out
}

/// The SHA256 fingerprint of the first key of an authorized_keys file, as ssh-keygen
/// prints it.
fn fingerprint(file: &Path) -> String {
    let (code, out, err) = run("ssh-keygen", &["-l", "-f", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// `GET https://127.0.0.1:PORT/PATH` without a client certificate: status, content type,
/// cache-control and body.
fn https_get(port: u16, ca: &Path, path: &str) -> (u16, String, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            ca.to_str().unwrap(),
            "-D",
            "-",
            &format!("https://127.0.0.1:{port}{path}"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        header("content-type"),
        header("cache-control"),
        body.to_owned(),
    )
}

/// An sshd of the test's own, stopped when dropped.
struct Sshd {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Sshd {
    fn start(dir: &Path, trusted_ca: &Path, host_key: &Path, host_cert: &Path) -> Self {
        // The privilege-separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nHostCertificate {}\n\
                 TrustedUserCAKeys {}\nAuthorizedKeysFile none\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n\
                 StrictModes no\nPidFile {}\nLogLevel VERBOSE\n",
                host_key.display(),
                host_cert.display(),
                trusted_ca.display(),
                dir.join("sshd.pid").display(),
            ),
        )
        .unwrap();
        let (code, _, err) = run(SSHD, &["-t", "-f", config.to_str().unwrap()]);
        assert_eq!(code, 0, "sshd -t: {err}");
        let log = dir.join("sshd.log");
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sshd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, log, port }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ssh -i key -o CertificateFile=cert USER@127.0.0.1 true`, the host checked against
    /// `known_hosts` (strictly) or not checked: the exit code and standard error.
    fn login(
        &self,
        key: &Path,
        cert: &Path,
        user: &str,
        known_hosts: Option<&Path>,
    ) -> (i32, String) {
        let port = self.port.to_string();
        let cert_option = format!("CertificateFile={}", cert.display());
        let (strict, hosts) = match known_hosts {
            Some(k) => (
                "StrictHostKeyChecking=yes",
                format!("UserKnownHostsFile={}", k.display()),
            ),
            None => (
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null".to_owned(),
            ),
        };
        let target = format!("{user}@127.0.0.1");
        let (code, _, err) = run(
            "ssh",
            &[
                "-F",
                "/dev/null",
                "-i",
                key.to_str().unwrap(),
                "-o",
                &cert_option,
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "IdentityAgent=none",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                "-o",
                strict,
                "-o",
                &hosts,
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-p",
                &port,
                &target,
                "true",
            ],
        );
        (code, err)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = softhsm_tests::sigterm(&self.child);
        let _ = self.child.wait();
    }
}

#[test]
fn ssh_certificates_from_hsm_keys_log_in_to_a_real_sshd() {
    assert!(
        run("id", &["-u"]).1.trim() == "0",
        "this test starts sshd and logs in as root: run it as root (scripts/test does)"
    );
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: scripts/lib.sh ensure_openssh_server"
    );
    let hsm = TestHsm::new("credentials-ssh");
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, "");
    let user = hsm.pki.client("alice", &ClientSpec::spiffe("people/alice"));
    let as_user = |args: &[&str]| server.kms_as(Some(&user), args, "");
    let dir = hsm.path().join("ssh");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str| dir.join(name);
    let path = |name: &str| file(name).to_str().unwrap().to_owned();

    // The CA keys, in the HSM: P-256 and Ed25519 (SoftHSM's CKM_EDDSA).
    for (name, algorithm) in [
        ("user-ca", "ecdsa-p256-sha256"),
        ("user-ca-ed", "ed25519"),
        ("host-ca", "ed25519"),
        ("token-signer", "ecdsa-p256-sha256"),
    ] {
        ok(server.kms(
            &[
                "key",
                "create",
                name,
                "--algorithm",
                algorithm,
                "--protection",
                "hsm",
            ],
            "",
        ));
    }
    let created = ok(server.kms(
        &[
            "issuer",
            "create",
            "users",
            "--kind",
            "ssh-user",
            "--key",
            "user-ca",
            "--principal",
            &user.principal,
            "--ssh-principal",
            "root",
            "--ssh-principal",
            "alice",
            "--ssh-option",
            "source-address=127.0.0.1/32,::1",
            "--max-ttl",
            "2h",
            "--json",
        ],
        "",
    ))
    .json();
    // No extension given: ssh-keygen's five.
    assert_eq!(
        created["ssh_extensions"].as_array().unwrap().len(),
        5,
        "{created}"
    );
    assert_eq!(created["default_ttl_seconds"], 3600);
    for (name, kind, key) in [
        ("users-ed", "ssh-user", "user-ca-ed"),
        ("hosts", "ssh-host", "host-ca"),
    ] {
        ok(server.kms(
            &[
                "issuer",
                "create",
                name,
                "--kind",
                kind,
                "--key",
                key,
                "--principal",
                &user.principal,
                "--ssh-principal",
                "root",
                "--ssh-principal",
                "127.0.0.1",
            ],
            "",
        ));
    }
    // A key that cannot be an SSH CA's, and settings OpenSSH would not read.
    ok(server.kms(
        &["key", "create", "p384", "--algorithm", "ecdsa-p384-sha384"],
        "",
    ));
    for (args, reason) in [
        (
            vec!["--key", "p384", "--ssh-principal", "root"],
            "FAILED_PRECONDITION: the issuer's key cannot sign",
        ),
        (
            vec!["--key", "user-ca", "--ssh-principal", "a b"],
            "INVALID_ARGUMENT",
        ),
        (
            vec![
                "--key",
                "user-ca",
                "--ssh-principal",
                "root",
                "--ssh-extension",
                "permit-all",
            ],
            "INVALID_ARGUMENT",
        ),
        (
            vec![
                "--key",
                "user-ca",
                "--ssh-principal",
                "root",
                "--ssh-option",
                "source-address=10.0.0.1/8",
            ],
            "INVALID_ARGUMENT",
        ),
    ] {
        let mut all = vec![
            "issuer",
            "create",
            "bad",
            "--kind",
            "ssh-user",
            "--principal",
            &user.principal,
        ];
        all.extend(args);
        let out = server.kms(&all, "");
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.contains(reason), "{reason}: {out:?}");
    }

    // The user's keys and certificates, through the CLI.
    keygen(&file("id"), "ed25519");
    keygen(&file("id_ecdsa"), "ecdsa");
    let issued = ok(as_user(&[
        "credential",
        "ssh",
        "--issuer",
        "users",
        "--public-key",
        &path("id.pub"),
        "--out",
        &path("id-cert.pub"),
        "--principal",
        "root",
        "--ttl",
        "10m",
        "--json",
    ]))
    .json();
    let serial = issued["serial"].as_str().unwrap().to_owned();
    assert_eq!(issued["key_id"], user.principal.as_str());
    assert_eq!(issued["principals"], serde_json::json!(["root"]));
    assert_eq!(issued["key_version"], 1);
    // `--out -`: the certificate alone on standard output, what it says on standard error.
    let piped = ok(as_user(&[
        "credential",
        "ssh",
        "--issuer",
        "users-ed",
        "--public-key",
        &path("id_ecdsa.pub"),
        "--out",
        "-",
    ]));
    assert!(
        piped
            .stdout
            .starts_with("ecdsa-sha2-nistp256-cert-v01@openssh.com AAAA"),
        "{piped:?}"
    );
    assert_eq!(piped.stdout.lines().count(), 1);
    assert!(piped.stderr.contains("Serial"), "{piped:?}");
    std::fs::write(file("id_ecdsa-cert.pub"), &piped.stdout).unwrap();

    // The CA keys, public over HTTPS: an authorized_keys file, cacheable.
    let ca = &hsm.pki.ca;
    let mut trusted = String::new();
    for name in ["users", "users-ed"] {
        let (code, content_type, cache, body) =
            https_get(port, ca, &format!("/v1/ssh/{name}/public_key"));
        assert_eq!(code, 200, "{body}");
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert!(cache.contains("max-age="), "{cache}");
        assert_eq!(body.lines().count(), 1, "{body}");
        trusted.push_str(&body);
    }
    std::fs::write(file("trusted_user_ca_keys"), &trusted).unwrap();
    std::fs::write(file("users-ca.pub"), trusted.lines().next().unwrap()).unwrap();
    for path in [
        "/v1/ssh/nobody/public_key",
        "/v1/identity/oidc/provider/users/.well-known/keys",
    ] {
        assert_eq!(https_get(port, ca, path).0, 404, "{path}");
    }
    // A JWT issuer's keys are not an ssh issuer's, and the other way round; its JWKS is
    // still JSON.
    ok(server.kms(
        &[
            "issuer",
            "create",
            "tokens",
            "--key",
            "token-signer",
            "--principal",
            &user.principal,
            "--audience",
            "a",
        ],
        "",
    ));
    assert_eq!(https_get(port, ca, "/v1/ssh/tokens/public_key").0, 404);
    let (code, content_type, _, jwks) = https_get(
        port,
        ca,
        "/v1/identity/oidc/provider/tokens/.well-known/keys",
    );
    assert_eq!(code, 200, "{jwks}");
    assert_eq!(content_type, "application/json");
    assert!(jwks.contains("\"kty\":\"EC\""), "{jwks}");
    let (code, _, _, discovery) = https_get(
        port,
        ca,
        "/v1/identity/oidc/provider/tokens/.well-known/openid-configuration",
    );
    assert_eq!(code, 200, "{discovery}");
    assert!(discovery.contains("jwks_uri"), "{discovery}");
    let (_, _, _, host_ca) = https_get(port, ca, "/v1/ssh/hosts/public_key");
    assert!(host_ca.starts_with("ssh-ed25519 "), "{host_ca}");

    // ssh-keygen reads the certificate as kms meant it.
    let listing = show(&file("id-cert.pub"));
    for line in [
        "Type: ssh-ed25519-cert-v01@openssh.com user certificate".to_owned(),
        format!("Key ID: \"{}\"", user.principal),
        format!("Serial: {serial}"),
        format!(
            "Signing CA: ECDSA {} (using ecdsa-sha2-nistp256)",
            fingerprint(&file("users-ca.pub"))
        ),
        "source-address 127.0.0.1/32,::1".to_owned(),
        "permit-X11-forwarding".to_owned(),
        "permit-agent-forwarding".to_owned(),
        "permit-port-forwarding".to_owned(),
        "permit-pty".to_owned(),
        "permit-user-rc".to_owned(),
    ] {
        assert!(listing.contains(&line), "{line:?} not in:\n{listing}");
    }
    let principals: Vec<&str> = listing
        .split("Principals:")
        .nth(1)
        .unwrap()
        .split("Critical Options:")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(principals, ["root"], "{listing}");
    let valid = listing
        .lines()
        .find(|l| l.trim_start().starts_with("Valid:"))
        .unwrap();
    assert!(valid.contains("from ") && valid.contains(" to "), "{valid}");
    assert!(show(&file("id_ecdsa-cert.pub")).contains("(using ssh-ed25519)"));

    // The host: its own key, certified by the host CA for 127.0.0.1.
    keygen(&file("host_key"), "ed25519");
    ok(as_user(&[
        "credential",
        "ssh",
        "--issuer",
        "hosts",
        "--public-key",
        &path("host_key.pub"),
        "--out",
        &path("host_key-cert.pub"),
        "--principal",
        "127.0.0.1",
    ]));
    let host_listing = show(&file("host_key-cert.pub"));
    assert!(
        host_listing.contains("Type: ssh-ed25519-cert-v01@openssh.com host certificate"),
        "{host_listing}"
    );
    assert!(
        host_listing.contains("Critical Options: (none)"),
        "{host_listing}"
    );
    assert!(
        host_listing.contains("Extensions: (none)"),
        "{host_listing}"
    );

    let sshd = Sshd::start(
        &dir,
        &file("trusted_user_ca_keys"),
        &file("host_key"),
        &file("host_key-cert.pub"),
    );
    // In as root, a principal of the certificate; and with the Ed25519 CA's certificate.
    let (code, err) = sshd.login(&file("id"), &file("id-cert.pub"), "root", None);
    assert_eq!(code, 0, "ssh: {err}\nsshd: {}", sshd.log());
    let (code, err) = sshd.login(&file("id_ecdsa"), &file("id_ecdsa-cert.pub"), "root", None);
    assert_eq!(code, 0, "ssh: {err}\nsshd: {}", sshd.log());
    // Not as another user the certificate does not name.
    let (code, _) = sshd.login(&file("id"), &file("id-cert.pub"), "daemon", None);
    assert_ne!(code, 0, "daemon is not a principal of the certificate");
    assert!(
        sshd.log().contains("name is not a listed principal"),
        "{}",
        sshd.log()
    );
    // The host certificate, checked by ssh under the host CA, and refused under another.
    std::fs::write(file("known_hosts"), format!("@cert-authority * {host_ca}")).unwrap();
    let (code, err) = sshd.login(
        &file("id"),
        &file("id-cert.pub"),
        "root",
        Some(&file("known_hosts")),
    );
    assert_eq!(code, 0, "ssh with @cert-authority: {err}");
    std::fs::write(
        file("other_known_hosts"),
        format!("@cert-authority * {}", trusted.lines().nth(1).unwrap()),
    )
    .unwrap();
    let (code, err) = sshd.login(
        &file("id"),
        &file("id-cert.pub"),
        "root",
        Some(&file("other_known_hosts")),
    );
    assert_ne!(code, 0, "a host certificate of another CA accepted: {err}");
    // An expired certificate: 2 s after its 60 s of backdating.
    ok(as_user(&[
        "credential",
        "ssh",
        "--issuer",
        "users",
        "--public-key",
        &path("id.pub"),
        "--out",
        &path("short-cert.pub"),
        "--ttl",
        "2s",
    ]));
    std::thread::sleep(Duration::from_secs(4));
    let (code, _) = sshd.login(&file("id"), &file("short-cert.pub"), "root", None);
    assert_ne!(code, 0, "an expired certificate logged in");
    assert!(sshd.log().contains("expired"), "{}", sshd.log());
    drop(sshd);

    // Refusals, each with its reason.
    std::fs::write(file("garbage.pub"), "ssh-ed25519 not-base64!\n").unwrap();
    std::fs::write(
        file("two.pub"),
        format!("{0}{0}", std::fs::read_to_string(file("id.pub")).unwrap()),
    )
    .unwrap();
    let rsa_small = file("rsa1024");
    let (code, _, err) = run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "rsa",
            "-b",
            "1024",
            "-N",
            "",
            "-f",
            rsa_small.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let ask = |issuer: &str, key: &str, extra: &[&str]| {
        let mut args = vec![
            "credential",
            "ssh",
            "--issuer",
            issuer,
            "--public-key",
            key,
            "--out",
            "-",
        ];
        args.extend_from_slice(extra);
        as_user(&args)
    };
    let refusals = [
        (
            ask("users", &path("id-cert.pub"), &[]),
            "INVALID_ARGUMENT: public_key is a certificate",
        ),
        (
            ask("users", &path("garbage.pub"), &[]),
            "INVALID_ARGUMENT: public_key's key is not base64",
        ),
        (
            ask("users", &path("two.pub"), &[]),
            "INVALID_ARGUMENT: public_key is one line",
        ),
        (
            ask("users", &path("rsa1024.pub"), &[]),
            "INVALID_ARGUMENT: an RSA public key is 2048 to 16384 bits, not 1024",
        ),
        (
            ask("users", &path("id.pub"), &["--principal", "daemon"]),
            "PERMISSION_DENIED",
        ),
        (
            ask("users", &path("id.pub"), &["--ttl", "3h"]),
            "INVALID_ARGUMENT",
        ),
        (ask("nobody", &path("id.pub"), &[]), "NOT_FOUND"),
        (
            server.kms(
                &[
                    "credential",
                    "ssh",
                    "--issuer",
                    "users",
                    "--public-key",
                    &path("id.pub"),
                    "--out",
                    "-",
                ],
                "",
            ),
            "PERMISSION_DENIED",
        ),
    ];
    for (out, reason) in &refusals {
        refused(out, reason);
    }

    // The records: each certificate with its serial, key id and principals; each refusal.
    let out = server.kms_as(Some(&hsm.auditor), &["audit", "export"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].clone())
        .filter(|e| e["operation"] == "IssueSsh")
        .collect();
    let ok_records: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["outcome"] == "OK").collect();
    assert_eq!(ok_records.len(), 4, "{events:#?}");
    let first = ok_records
        .iter()
        .find(|e| e["credential"]["jti"] == serial.as_str())
        .expect("the first certificate is recorded by its serial");
    assert_eq!(first["credential"]["issuer"], "users");
    assert_eq!(first["credential"]["kind"], "ssh_user");
    assert_eq!(first["credential"]["subject"], user.principal.as_str());
    assert_eq!(
        first["credential"]["principals"],
        serde_json::json!(["root"])
    );
    assert_eq!(first["credential"]["key_version"], 1);
    let outcomes: Vec<&str> = events
        .iter()
        .filter(|e| e["outcome"] != "OK")
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "INVALID_ARGUMENT",
            "NOT_FOUND",
            "PERMISSION_DENIED"
        ],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| {
        !e["credential"]["issuer"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    }));
    // A refused request's record says which principal it asked for.
    assert!(
        events.iter().any(|e| e["outcome"] == "PERMISSION_DENIED"
            && e["credential"]["principals"] == serde_json::json!(["daemon"])),
        "{events:#?}"
    );
}
