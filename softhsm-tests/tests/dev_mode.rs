//! `kms dev`: one command gives a provisioned SoftHSM token, an initialised and unsealed
//! server, and printed shares; a restart on the same directory comes up sealed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use std::path::PathBuf;

use softhsm_tests::{bin, run_kms, run_kms_env, sigterm};

struct Dev {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(bin("kms"))
            .arg("dev")
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one contains `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no line with {needle:?}; saw {:?}", self.seen));
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        sigterm(&self.child).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Dev {
    /// A failing test must not leave a server running: stop it (SIGTERM, so it cleans up).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = sigterm(&self.child);
            let _ = self.child.wait();
        }
    }
}

fn addr_of(line: &str, scheme: &str) -> String {
    format!(
        "{scheme}://{}",
        line.trim_start_matches("kms listening on ").trim()
    )
}

/// The environment `kms dev` tells the admin to export: KMS_CACERT, KMS_CLIENT_CERT,
/// KMS_CLIENT_KEY.
fn admin_env(dev: &mut Dev) -> Vec<(&'static str, PathBuf)> {
    let ca = dev.wait_for("export KMS_CACERT=");
    let ca = ca
        .trim()
        .trim_start_matches("export KMS_CACERT=")
        .to_owned();
    let line = dev.wait_for("export KMS_CLIENT_CERT=");
    let mut words = line.trim().trim_start_matches("export ").split(' ');
    let cert = words.next().unwrap().trim_start_matches("KMS_CLIENT_CERT=");
    let key = words.next().unwrap().trim_start_matches("KMS_CLIENT_KEY=");
    vec![
        ("KMS_CACERT", PathBuf::from(ca)),
        ("KMS_CLIENT_CERT", PathBuf::from(cert)),
        ("KMS_CLIENT_KEY", PathBuf::from(key)),
    ]
}

/// `env` with the client certificate swapped for `who`'s (files beside the admin's).
fn as_client(env: &[(&'static str, PathBuf)], who: &str) -> Vec<(&'static str, PathBuf)> {
    let dir = env[1].1.parent().unwrap();
    vec![
        env[0].clone(),
        ("KMS_CLIENT_CERT", dir.join(format!("{who}.pem"))),
        ("KMS_CLIENT_KEY", dir.join(format!("{who}-key.pem"))),
    ]
}

#[test]
fn dev_mode_initialises_unseals_and_restarts_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("state");
    let d = d.to_str().unwrap();

    let mut dev = Dev::start(&["--dir", d]);
    let addr = addr_of(&dev.wait_for("kms listening on"), "https");
    let mut shares = Vec::new();
    for i in 1..=5 {
        let line = dev.wait_for(&format!("Unseal share {i}: "));
        shares.push(line.split(": ").nth(1).unwrap().to_owned());
    }
    dev.wait_for("WARNING: these shares are shown once");
    dev.wait_for("unsealed with shares 1-3 and serving mTLS");
    let env = admin_env(&mut dev);
    // The admin's lines work as pasted into a shell whose PATH has no kms on it.
    dev.wait_for("  kms whoami");
    let start = dev
        .seen
        .iter()
        .rposition(|l| l.contains("export KMS_ADDR="))
        .unwrap();
    let pasted: Vec<&str> = dev.seen[start..].iter().map(|l| l.trim()).collect();
    assert!(
        pasted.iter().any(|l| l.starts_with("export PATH=")),
        "{pasted:?}"
    );
    let shell = Command::new("bash")
        .arg("-c")
        .arg(pasted.join("\n"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&shell.stdout).contains("spiffe://kms.dev/admin"),
        "{pasted:?}: {shell:?}"
    );
    let st = run_kms_env(&addr, &env, &["operator", "status", "--json"], "");
    assert_eq!(st.code, Some(0), "{st:?}");
    assert_eq!(st.json()["sealed"], false);
    assert_eq!(st.json()["threshold"], 3);
    assert_eq!(st.json()["shares"], 5);
    // The printed commands work: the admin makes a key and grants the application.
    let who = run_kms_env(&addr, &env, &["whoami", "--json"], "").json();
    assert_eq!(who["principal"], "spiffe://kms.dev/admin");
    assert_eq!(who["roles"], serde_json::json!(["admin"]));
    let kms = |env: &[(&'static str, PathBuf)], args: &[&str], stdin: &str| {
        let out = run_kms_env(&addr, env, args, stdin);
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
        out
    };
    kms(
        &env,
        &["key", "create", "payments", "--algorithm", "aes-256-gcm"],
        "",
    );
    kms(
        &env,
        &[
            "grant",
            "create",
            "payments",
            "spiffe://kms.dev/app",
            "--operations",
            "encrypt,decrypt",
        ],
        "",
    );
    let app = as_client(&env, "app");
    // What the application's `kms decrypt --base64` makes of a base64 ciphertext.
    let decrypted = |name: &str, ct_b64: &str| {
        let ct_file = dir.path().join(name);
        std::fs::write(&ct_file, ct_b64).unwrap();
        let pt = kms(
            &app,
            &[
                "decrypt",
                "--key",
                "payments",
                "--base64",
                "--in",
                ct_file.to_str().unwrap(),
            ],
            "",
        );
        data_encoding::BASE64
            .decode(pt.stdout.trim().as_bytes())
            .unwrap()
    };
    let ct = kms(&app, &["encrypt", "--key", "payments", "--base64"], "hello").stdout;
    assert_eq!(decrypted("ct.b64", &ct), b"hello");
    // The Vault-compatible front's lines work as pasted too: curl, and hvac (with the
    // python that has it first on PATH), each answers a Transit ciphertext of "hello".
    dev.wait_for("pip install hvac");
    let python_dir = softhsm_tests::python().parent().unwrap().to_owned();
    for program in ["curl -sS", "python3 -c"] {
        let line = dev
            .seen
            .iter()
            .find(|l| l.trim_start().starts_with(program))
            .unwrap_or_else(|| panic!("no {program} line: {:?}", dev.seen))
            .trim()
            .to_owned();
        let shell = Command::new("bash")
            .arg("-c")
            .arg(&line)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", python_dir.display()))
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&shell.stdout);
        assert!(
            shell.status.success() && printed.contains("vault:v1:"),
            "{line}: {shell:?}"
        );
        // The documented form: `vault:v<N>:` and the base64 of kms's own ciphertext,
        // which the gRPC API decrypts.
        let ours = printed
            .split('"')
            .find_map(|s| s.strip_prefix("vault:v1:"))
            .unwrap_or_else(|| printed.trim().trim_start_matches("vault:v1:"))
            .to_owned();
        assert_eq!(decrypted("transit.b64", &ours), b"hello", "{line}");
    }
    let out = kms(&as_client(&env, "auditor"), &["audit", "verify"], "");
    assert!(out.stdout.starts_with("intact"), "{out:?}");
    // The PIN file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(format!("{d}/hsm-pin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "hsm-pin mode {mode:o}");
    assert!(dev.stop().success());

    // The same directory again: same token and store, sealed, unsealable with old shares.
    let mut dev = Dev::start(&["--dir", d]);
    let addr = addr_of(&dev.wait_for("kms listening on"), "https");
    // Says where it serves on every run, not only the first.
    let line = dev.wait_for("the server is sealed");
    assert!(line.contains(&format!("serving mTLS on {addr},")), "{line}");
    let env = admin_env(&mut dev);
    let st = run_kms_env(&addr, &env, &["operator", "status", "--json"], "");
    assert_eq!(st.json()["sealed"], true);
    assert_eq!(st.json()["initialized"], true);
    // The admin may not unseal: shares come from a custodian's certificate, as printed.
    let out = run_kms_env(
        &addr,
        &env,
        &["operator", "unseal"],
        &format!("{}\n", shares[4]),
    );
    assert!(
        out.stderr.contains("does not have the custodian role"),
        "{out:?}"
    );
    let line = dev.wait_for("kms operator unseal");
    let mut words = line.split_whitespace();
    let cert = words.next().unwrap().trim_start_matches("KMS_CLIENT_CERT=");
    let key = words.next().unwrap().trim_start_matches("KMS_CLIENT_KEY=");
    let custodian = vec![
        env[0].clone(),
        ("KMS_CLIENT_CERT", PathBuf::from(cert)),
        ("KMS_CLIENT_KEY", PathBuf::from(key)),
    ];
    assert_eq!(custodian, as_client(&env, "custodian"));
    let out = run_kms_env(
        &addr,
        &custodian,
        &["operator", "unseal"],
        &format!("{}\n{}\n{}\n", shares[4], shares[3], shares[0]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(dev.stop().success());
}

#[test]
fn dev_mode_without_dir_cleans_up_its_temporary_directory() {
    let mut dev = Dev::start(&[]);
    let addr = addr_of(&dev.wait_for("kms listening on"), "https");
    let env = admin_env(&mut dev);
    let state = dev.wait_for("State: ");
    let path = state
        .trim_start_matches("State: ")
        .split(" (config")
        .next()
        .unwrap()
        .to_owned();
    assert!(
        std::path::Path::new(&path).join("kms.redb").exists(),
        "{path}"
    );
    assert_eq!(
        run_kms_env(&addr, &env, &["operator", "status", "--json"], "").json()["sealed"],
        false
    );
    assert!(dev.stop().success());
    assert!(
        !std::path::Path::new(&path).exists(),
        "{path} was not removed"
    );
}

#[test]
fn plaintext_dev_mode_warns_and_names_every_caller_loopback() {
    let mut dev = Dev::start(&["--plaintext"]);
    let addr = addr_of(&dev.wait_for("kms listening on"), "http");
    dev.wait_for("WARNING: plaintext gRPC");
    dev.wait_for("serving PLAINTEXT gRPC");
    let who = run_kms(&addr, &["whoami", "--json"], "").json();
    assert_eq!(who["principal"], "loopback");
    assert_eq!(who["tls"], false);
    assert_eq!(who["roles"], serde_json::json!(["admin", "auditor"]));
    // Shares are never accepted in plaintext. (`operator unseal` sends none to this
    // server, which is unsealed already: verify-share does send its share.)
    let out = run_kms(&addr, &["operator", "verify-share"], "kms1-AAAA\n");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("PERMISSION_DENIED: permission denied: shares are accepted over TLS only"),
        "{out:?}"
    );
    // An address without a scheme is https, never plaintext: the CLI sends nothing in
    // clear unless `http://` is written (it used to fall back to plaintext without --ca).
    // (The CLI stops before it connects: nothing reaches the server.)
    let bare = addr.trim_start_matches("http://").to_owned();
    let out = run_kms(&bare, &["operator", "unseal"], "kms1-AAAA\n");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("an https address needs the CA"),
        "{out:?}"
    );
    assert!(dev.stop().success());
}

/// README.md's "Keys and crypto" block, run as written (the block is read from the README,
/// not copied) in a shell against `kms dev`, with `DIR` the dev directory: the admin makes
/// the keys and grants, the application encrypts, decrypts, signs and gets the public key,
/// and openssl verifies the signature.
#[test]
fn the_readme_keys_and_crypto_block_runs_as_written() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    let after = readme
        .split_once("Keys and crypto (")
        .expect("README has a \"Keys and crypto\" section")
        .1;
    let block = after
        .split_once("```sh\n")
        .unwrap()
        .1
        .split_once("```")
        .unwrap()
        .0;
    assert!(block.contains("kms sign --key signer"), "{block}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("state");
    let mut dev = Dev::start(&["--dir", d.to_str().unwrap()]);
    let addr = addr_of(&dev.wait_for("kms listening on"), "https");
    dev.wait_for("unsealed with shares 1-3 and serving mTLS");
    let env = admin_env(&mut dev);
    // DIR/tls/admin.pem: DIR is where `kms dev` keeps its state.
    let state = env[1].1.parent().unwrap().parent().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("document.pdf"), b"%PDF-1.4 a contract to sign\n").unwrap();
    let script = format!(
        "set -euo pipefail\nexport KMS_ADDR={addr} KMS_CACERT={} KMS_CLIENT_CERT={} KMS_CLIENT_KEY={}\n{}",
        env[0].1.display(),
        env[1].1.display(),
        env[2].1.display(),
        block.replace("DIR/", &format!("{}/", state.display())),
    );
    let kms_dir = bin("kms").parent().unwrap().to_owned();
    let shell = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", kms_dir.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&shell.stdout);
    assert!(
        shell.status.success(),
        "{script}\n{stdout}\n{}",
        String::from_utf8_lossy(&shell.stderr)
    );
    assert!(stdout.contains("card 4111..."), "{stdout}");
    assert!(stdout.contains("Verified OK"), "{stdout}");
    assert!(stdout.contains("sk_test_51Hx..."), "{stdout}");
    assert!(
        stdout.contains("valid\nSubject  spiffe://kms.dev/app"),
        "{stdout}"
    );
    assert!(dev.stop().success());
}
