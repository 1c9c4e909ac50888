//! The init / unseal / seal ceremony, end to end: the real `kms` binary, a real SoftHSM
//! token, the CLI and gRPC.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use softhsm_tests::{Server, TRANSCRIPT, TestHsm, forge_share, run_kms};

fn init(server: &Server, shares: u32, threshold: u32) -> (Vec<String>, String) {
    let out = server.init(shares, threshold, "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let v = out.json();
    let shares = out.shares();
    (shares, v["share_set_id"].as_str().unwrap().to_owned())
}

fn status(server: &Server) -> serde_json::Value {
    server.kms(&["operator", "status", "--json"], "").json()
}

fn unseal(server: &Server, share: &str) -> softhsm_tests::Out {
    server.custodian(&["operator", "unseal"], &format!("{share}\n"))
}

#[test]
fn the_whole_ceremony() {
    let hsm = TestHsm::new("kms-ceremony");
    let mut server = hsm.start();

    // Uninitialised: status works, reports it, and exits 2 (sealed).
    let out = server.kms(&["operator", "status", "--json"], "");
    assert_eq!(out.code, Some(2));
    assert_eq!(out.json()["initialized"], false);
    let out = unseal(&server, "kms1-AAAA");
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("FAILED_PRECONDITION") && out.stderr.contains("not initialised"),
        "{out:?}"
    );

    // Bad numbers are refused, and the server stays uninitialised.
    for (n, t) in [(5, 1), (2, 3), (300, 2), (0, 0)] {
        let out = server.kms(
            &[
                "operator",
                "init",
                "--shares",
                &n.to_string(),
                "--threshold",
                &t.to_string(),
            ],
            "",
        );
        assert_eq!(out.code, Some(1), "{n}/{t}: {out:?}");
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:?}");
    }
    assert_eq!(status(&server)["initialized"], false);

    let (shares, set) = init(&server, 5, 3);
    assert_eq!(shares.len(), 5);
    let st = status(&server);
    assert_eq!(st["initialized"], true);
    assert_eq!(st["sealed"], true);
    assert_eq!(st["threshold"], 3);
    assert_eq!(st["shares"], 5);
    assert_eq!(st["share_set_id"], set.as_str());

    // A second init is refused.
    let out = server.kms(
        &["operator", "init", "--shares", "3", "--threshold", "2"],
        "",
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("FAILED_PRECONDITION: the server is already initialised"),
        "{out:?}"
    );

    // The master key in the token is sensitive and never extractable: ask the token.
    let attrs = hsm.inspect_key("kms-master-key");
    assert_eq!(attrs["sensitive"], true, "{attrs}");
    assert_eq!(attrs["always_sensitive"], true, "{attrs}");
    assert_eq!(attrs["extractable"], false, "{attrs}");
    assert_eq!(attrs["never_extractable"], true, "{attrs}");
    assert_eq!(attrs["token"], true, "{attrs}");
    assert_eq!(attrs["value_readable"], false, "{attrs}");
    assert_eq!(attrs["wrap"], false, "{attrs}");
    assert_eq!(attrs["unwrap"], false, "{attrs}");
    assert_eq!(attrs["derive"], false, "{attrs}");
    assert_eq!(attrs["value_len"], 32, "{attrs}");

    // First share: progress 1/3 and an attempt nonce.
    let out = unseal(&server, &shares[0]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("Unseal progress: 1/3"), "{out:?}");
    let nonce = status(&server)["nonce"].as_str().unwrap().to_owned();
    assert_eq!(nonce.len(), 32);

    // Each bad share is refused with its own message, and progress is kept.
    let mut typo = shares[1].clone();
    let pos = typo.len() - 10;
    let c = typo.as_bytes()[pos];
    let r = if c == b'A' { "B" } else { "A" };
    typo.replace_range(pos..pos + 1, r);
    let other = TestHsm::new("kms-other");
    let other_server = other.start();
    let (foreign, _) = init(&other_server, 3, 3);
    let cases: [(&str, String, &str); 5] = [
        (
            "malformed",
            "this is not a share".into(),
            "malformed share: not a kms share",
        ),
        ("truncated", shares[1][..40].to_owned(), "malformed share"),
        ("typo", typo, "checksum does not match"),
        ("foreign", foreign[0].clone(), "from another init"),
        (
            "duplicate",
            shares[0].clone(),
            "was already given in this attempt",
        ),
    ];
    for (name, share, want) in &cases {
        let out = unseal(&server, share);
        assert_eq!(out.code, Some(1), "{name}: {out:?}");
        assert!(out.stderr.contains("INVALID_ARGUMENT"), "{name}: {out:?}");
        assert!(out.stderr.contains(want), "{name}: {out:?}");
        let st = status(&server);
        assert_eq!(st["progress"], 1, "{name} lost progress");
        assert_eq!(st["nonce"], nonce.as_str(), "{name} changed the attempt");
    }

    // A share for another attempt (by nonce) is refused without loss.
    let out = server.custodian(
        &["operator", "unseal", "--nonce", "00ff"],
        &format!("{}\n", shares[1]),
    );
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("FAILED_PRECONDITION"), "{out:?}");
    assert_eq!(status(&server)["progress"], 1);

    // Reset forgets the progress.
    let out = server.custodian(&["operator", "unseal", "--reset"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(status(&server)["progress"], 0);
    assert_eq!(status(&server)["nonce"], "");

    // Three good shares (with the right nonce on the second) unseal.
    assert_eq!(unseal(&server, &shares[4]).code, Some(0));
    let nonce = status(&server)["nonce"].as_str().unwrap().to_owned();
    let out = server.custodian(
        &["operator", "unseal", "--nonce", &nonce],
        &format!("{}\n", shares[2]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = unseal(&server, &shares[0]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("unsealed"), "{out:?}");
    let st = server.kms(&["operator", "status", "--json"], "");
    assert_eq!(st.code, Some(0));
    assert_eq!(st.json()["sealed"], false);

    // Seal forgets; sealing again is fine.
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    assert_eq!(status(&server)["sealed"], true);
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));

    // A restart always comes up sealed, and any three shares, in any order, unseal it.
    let exit = server.terminate();
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    let server = hsm.start();
    assert_eq!(status(&server)["sealed"], true);
    assert_eq!(status(&server)["initialized"], true);
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n{}\n", shares[3], shares[1], shares[2]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(status(&server)["sealed"], false);

    // Nothing secret in the logs, the CLI outputs, or the store file.
    let logs = hsm.logs();
    assert!(
        logs.contains("System/Unseal"),
        "the server logs its calls: {logs}"
    );
    let transcript = TRANSCRIPT.lock().unwrap().clone();
    let store_bytes = std::fs::read(hsm.path().join("kms.redb")).unwrap();
    // Every form of every share: text, body without dashes, the secret bytes raw, in hex
    // and base64.
    let every: Vec<String> = shares.iter().chain(foreign.iter()).cloned().collect();
    softhsm_tests::assert_no_share_in("server log", logs.as_bytes(), &every);
    softhsm_tests::assert_no_share_in("CLI output", transcript.as_bytes(), &every);
    softhsm_tests::assert_no_share_in("store", &store_bytes, &every);
    let export = server.kms_as(Some(&server.auditor), &["audit", "export"], "");
    assert_eq!(export.code, Some(0), "{export:?}");
    assert!(export.stdout.contains("\"Unseal\""), "{export:?}");
    softhsm_tests::assert_no_share_in("audit export", export.stdout.as_bytes(), &every);
    for text in [&logs, &transcript] {
        assert!(!text.contains(&hsm.pin), "the PIN appears in the output");
    }
    drop(other_server);
}

/// A share altered (or forged from the public set id and threshold) with a valid checksum:
/// the checksum has no key, so before share commitments it counted towards the quorum, and
/// the wrong quorum was charged to the custodian who completed it. Now the commitment
/// stored at init refuses it when submitted, and the other custodians' progress is kept.
#[test]
fn a_forged_share_with_a_valid_checksum_is_refused_and_never_counts() {
    let hsm = TestHsm::new("kms-forged");
    let server = hsm.start();
    let (shares, _) = init(&server, 3, 2);
    let forged = forge_share(&shares[1]);
    assert_ne!(forged.replace('-', ""), shares[1].replace('-', ""));
    assert_eq!(unseal(&server, &shares[0]).code, Some(0));
    let out = unseal(&server, &forged);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("INVALID_ARGUMENT")
            && out
                .stderr
                .contains("share 2 is not one of the shares made at init")
            && out.stderr.contains("progress is kept"),
        "{out:?}"
    );
    let st = status(&server);
    assert_eq!(st["sealed"], true);
    assert_eq!(
        st["progress"], 1,
        "the forged share is not counted; progress is kept"
    );
    // The real second share completes the quorum.
    assert_eq!(unseal(&server, &shares[1]).code, Some(0));
    assert_eq!(status(&server)["sealed"], false);
    // The refusal is in the audit log, as a custodian's failed share.
    let log = hsm.logs();
    assert!(log.contains("not one of the shares made at init"), "{log}");
}

#[test]
fn an_acknowledged_init_survives_kill_9() {
    let hsm = TestHsm::new("kms-kill9");
    let mut server = hsm.start();
    let (shares, set) = init(&server, 2, 2);
    server.kill9();
    let server = hsm.start();
    let st = status(&server);
    assert_eq!(st["initialized"], true);
    assert_eq!(st["sealed"], true);
    assert_eq!(st["share_set_id"], set.as_str());
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[1], shares[0]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
}

#[test]
fn start_up_errors_are_clear_and_hold_no_secret() {
    let hsm = TestHsm::new("kms-startup");
    let module = hsm.module.display().to_string();
    let pin_file = format!("pin_file = \"{}\"", hsm.pin_file.display());

    // Wrong PIN, from an environment variable: named source, no PIN.
    let config = hsm.config_with(
        "env.toml",
        &hsm.hsm_table_with(&module, &hsm.label, "pin_env = \"KMS_TEST_PIN\""),
    );
    let wrong_pin = "0123456789wrongpin";
    let (status, stderr) = hsm.start_failure(&config, &[("KMS_TEST_PIN", wrong_pin)]);
    // EX_CONFIG: the packaged unit does not try the same wrong PIN again (a real HSM
    // locks its token after a few).
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("refused the PIN from environment variable KMS_TEST_PIN"),
        "{stderr}"
    );
    assert!(stderr.contains("wrong PIN"), "{stderr}");
    assert!(!stderr.contains(wrong_pin), "the PIN leaked: {stderr}");
    // The right PIN through the same variable works.
    let server = hsm
        .try_start(&config, &[("KMS_TEST_PIN", hsm.pin.as_str())])
        .unwrap();
    drop(server);
    // The variable not set at all.
    let (status, stderr) = hsm.start_failure(&config, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("environment variable KMS_TEST_PIN is not set"),
        "{stderr}"
    );

    // A PIN file others can read is refused.
    let open_pin = hsm.path().join("open-pin");
    std::fs::write(&open_pin, &hsm.pin).unwrap();
    let config = hsm.config_with(
        "open.toml",
        &hsm.hsm_table_with(
            &module,
            &hsm.label,
            &format!("pin_file = \"{}\"", open_pin.display()),
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, stderr) = hsm.start_failure(&config, &[]);
    assert!(!status.success());
    assert!(stderr.contains("readable by group or others"), "{stderr}");
    assert!(!stderr.contains(&hsm.pin));

    // A missing module: the path is named.
    let config = hsm.config_with(
        "nomodule.toml",
        &hsm.hsm_table_with("/usr/lib/no-such-pkcs11.so", &hsm.label, &pin_file),
    );
    let (status, stderr) = hsm.start_failure(&config, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("no PKCS#11 module at /usr/lib/no-such-pkcs11.so"),
        "{stderr}"
    );

    // A file that is not a PKCS#11 module.
    let not_a_module = hsm.pin_file.display().to_string();
    let config = hsm.config_with(
        "badmodule.toml",
        &hsm.hsm_table_with(&not_a_module, &hsm.label, &pin_file),
    );
    let (status, stderr) = hsm.start_failure(&config, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("cannot load the PKCS#11 module"),
        "{stderr}"
    );

    // An unknown token label: the label is named, and the tokens present are listed.
    let config = hsm.config_with(
        "notoken.toml",
        &hsm.hsm_table_with(&module, "no-such-token", &pin_file),
    );
    let (status, stderr) = hsm.start_failure(&config, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("no token labelled \"no-such-token\""),
        "{stderr}"
    );
    assert!(stderr.contains("\"kms-startup\""), "{stderr}");

    // An unknown key in the config file.
    let config = hsm.config_with("typo.toml", &format!("{}pin = \"1234\"\n", hsm.hsm_table()));
    let (status, stderr) = hsm.start_failure(&config, &[]);
    assert!(!status.success());
    assert!(stderr.contains("unknown field `pin`"), "{stderr}");
}

#[test]
fn a_second_server_on_the_same_store_is_refused() {
    let hsm = TestHsm::new("kms-twice");
    let _first = hsm.start();
    let (status, stderr) = hsm.start_failure(&hsm.config(), &[]);
    assert!(!status.success());
    assert!(stderr.contains("in use by another kms process"), "{stderr}");
}

#[test]
fn an_extractable_master_key_is_refused() {
    let hsm = TestHsm::new("kms-weak");
    let out = hsm.tool(&["weak-key"], &["kms-master-key"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = hsm.start();
    let out = server.kms(
        &["operator", "init", "--shares", "2", "--threshold", "2"],
        "",
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("FAILED_PRECONDITION") && out.stderr.contains("extractable"),
        "{out:?}"
    );
    assert_eq!(status(&server)["initialized"], false);
}

/// A master key made outside kms that is sensitive and never extractable, but could
/// derive other keys (which could be extractable), wrap keys out of the token, or is
/// visible without login: refused, each with its reason.
#[test]
fn a_master_key_that_derives_wraps_or_is_public_is_refused() {
    for (weakness, reason) in [
        ("derive", "can derive keys"),
        ("wrap", "can wrap keys"),
        ("public", "not private"),
    ] {
        let hsm = TestHsm::new(&format!("kms-loose-{weakness}"));
        let out = hsm.tool(&["loose-key"], &["kms-master-key", weakness]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = hsm.start();
        let out = server.kms(
            &["operator", "init", "--shares", "2", "--threshold", "2"],
            "",
        );
        assert_eq!(out.code, Some(1), "{weakness}: {out:?}");
        assert!(
            out.stderr.contains("FAILED_PRECONDITION") && out.stderr.contains(reason),
            "{weakness}: {out:?}"
        );
        assert_eq!(status(&server)["initialized"], false);
    }
}

#[test]
fn the_master_key_deleted_from_the_token_stops_start_up() {
    let hsm = TestHsm::new("kms-lostkey");
    let mut server = hsm.start();
    init(&server, 2, 2);
    server.terminate();
    let out = hsm.tool(&["destroy"], &["kms-master-key"]);
    assert!(out.status.success(), "{out:?}");
    let (status, stderr) = hsm.start_failure(&hsm.config(), &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("no master key labelled \"kms-master-key\""),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_server_is_reported() {
    let out = run_kms("http://127.0.0.1:1", &["operator", "status"], "");
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("cannot reach the kms server at http://127.0.0.1:1"),
        "{out:?}"
    );
}

#[test]
fn probe_lists_the_token_and_mechanisms() {
    let hsm = TestHsm::new("kms-probe");
    let out = std::process::Command::new(softhsm_tests::bin("kms"))
        .args(["pkcs11", "probe", "--config"])
        .arg(hsm.config())
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("token \"kms-probe\"  <- configured token"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("CKM_AES_GCM") && l.contains(" ok ")),
        "{stdout}"
    );
    assert!(stdout.contains("verdict: usable by kms"), "{stdout}");

    let module = hsm.module.display().to_string();
    let pin_file = format!("pin_file = \"{}\"", hsm.pin_file.display());
    let config = hsm.config_with(
        "missing.toml",
        &hsm.hsm_table_with(&module, "absent", &pin_file),
    );
    let out = std::process::Command::new(softhsm_tests::bin("kms"))
        .args(["pkcs11", "probe", "--config"])
        .arg(config)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("configured token \"absent\": NOT FOUND"),
        "{stdout}"
    );
}

/// Two instances on one token (each with its own store): the second's init used to destroy
/// every object labelled `<master>-audit`, the first's audit checkpoint key among them.
/// Each init's audit key is now labelled with its share set id, and init touches no other.
#[test]
fn a_second_init_on_a_shared_token_leaves_the_first_intact() {
    let hsm = TestHsm::new("kms-shared");
    let config_for = |name: &str| {
        let path = hsm.path().join(format!("{name}.toml"));
        softhsm_tests::write_private(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\n[hsm]\n{}\n{}",
                hsm.path().join(format!("{name}.redb")).display(),
                hsm.hsm_table(),
                hsm.tls_tables(),
            ),
        );
        path
    };
    let (first, second) = (config_for("first"), config_for("second"));
    let mut a = hsm.try_start(&first, &[]).unwrap();
    let (shares_a, set_a) = init(&a, 2, 2);
    assert!(a.terminate().success());
    let mut b = hsm.try_start(&second, &[]).unwrap();
    let (_, set_b) = init(&b, 2, 2);
    assert_ne!(set_a, set_b);
    assert!(b.terminate().success());
    // Both audit keys are in the token, each under its own share set's label.
    assert_eq!(hsm.count(&format!("kms-master-key-audit-{set_a}")), 1);
    assert_eq!(hsm.count(&format!("kms-master-key-audit-{set_b}")), 1);
    // The first instance starts, unseals and signs with its own key.
    let a = hsm.try_start(&first, &[]).unwrap();
    let out = a.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares_a[0], shares_a[1]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = a.kms_as(Some(&hsm.auditor), &["audit", "verify"], "");
    assert_eq!(out.code, Some(0), "{out:?}");
}
