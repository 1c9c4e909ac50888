//! `hsm.pin_in_shares = true`: no PIN on disk or in the environment; the PIN is given once at
//! init, travels inside the Shamir secret, and logs the server in at every unseal.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use softhsm_tests::{TestHsm, forge_share};

fn shares_config(hsm: &TestHsm) -> std::path::PathBuf {
    let module = hsm.module.display().to_string();
    hsm.config_with(
        "shares.toml",
        &hsm.hsm_table_with(&module, &hsm.label, "pin_in_shares = true"),
    )
}

#[test]
fn the_pin_travels_in_the_shares() {
    let hsm = TestHsm::new("kms-pin-shares");
    let config = shares_config(&hsm);
    let mut server = hsm.try_start(&config, &[]).unwrap();

    let st = server.kms(&["operator", "status", "--json"], "").json();
    assert_eq!(st["initialized"], false);
    assert_eq!(st["hsm_pin_in_shares"], true);

    // Init needs the PIN; a wrong one is refused by the token and nothing is stored.
    let out = server.kms(
        &["operator", "init", "--shares", "3", "--threshold", "2"],
        "",
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("give the PIN on standard input"),
        "{out:?}"
    );
    let wrong = "not-the-pin-4711";
    let out = server.kms(
        &["operator", "init", "--shares", "3", "--threshold", "2"],
        &format!("{wrong}\n"),
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("INVALID_ARGUMENT")
            && out
                .stderr
                .contains("refused the PIN given for init (wrong PIN)"),
        "{out:?}"
    );
    assert_eq!(
        server.kms(&["operator", "status", "--json"], "").json()["initialized"],
        false
    );

    let out = server.init(3, 2, &format!("{}\n", hsm.pin));
    assert_eq!(out.code, Some(0), "{out:?}");
    let shares = out.shares();
    // The shares carry the PIN too: longer than plain 32-byte-key shares.
    assert!(shares[0].len() > 100, "{}", shares[0]);

    // The master key was made while logged in with the PIN from init.
    let attrs = hsm.inspect_key("kms-master-key");
    assert_eq!(attrs["sensitive"], true);
    assert_eq!(attrs["extractable"], false);

    // A forged share (valid checksum) is refused by its commitment and never counts.
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[0], forge_share(&shares[1])),
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("not one of the shares made at init"),
        "{out:?}"
    );

    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[2], shares[0]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(server.kms(&["operator", "seal"], "").code, Some(0));
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[1], shares[2]),
    );
    assert_eq!(
        out.code,
        Some(0),
        "unseal after seal (login again): {out:?}"
    );

    // A restart comes up sealed and unseals from the shares alone.
    server.terminate();
    let mut server = hsm.try_start(&config, &[]).unwrap();
    assert_eq!(
        server.kms(&["operator", "status", "--json"], "").json()["sealed"],
        true
    );
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[0], shares[1]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    server.terminate();

    // The same store with a config that names a PIN file is refused at start-up.
    let (status, stderr) = hsm.start_failure(&hsm.config(), &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("initialised with the HSM PIN in the unseal shares"),
        "{stderr}"
    );

    // The token's PIN changed behind the server's back: a clear refusal, progress reset.
    let out = hsm.tool(&["set-pin"], &["a-brand-new-pin-0000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = hsm.try_start(&config, &[]).unwrap();
    let out = server.custodian(
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[0], shares[1]),
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("FAILED_PRECONDITION")
            && out.stderr.contains("refused the PIN carried in the shares"),
        "{out:?}"
    );
    assert_eq!(
        server.kms(&["operator", "status", "--json"], "").json()["progress"],
        0
    );

    // No PIN anywhere: not in the logs, the store, or the config.
    let logs = hsm.logs();
    let store =
        String::from_utf8_lossy(&std::fs::read(hsm.path().join("kms.redb")).unwrap()).into_owned();
    let config_text = std::fs::read_to_string(&config).unwrap();
    for (what, text) in [("log", &logs), ("store", &store), ("config", &config_text)] {
        assert!(!text.contains(&hsm.pin), "the PIN is in the {what}");
        assert!(!text.contains(wrong), "the wrong PIN is in the {what}");
    }
}
