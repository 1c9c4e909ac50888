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

use softhsm_tests::{bin, run_kms, sigterm};

struct Dev {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(bin("kms"))
            .arg("dev")
            .args(["--listen", "127.0.0.1:0"])
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

fn addr_of(line: &str) -> String {
    format!(
        "http://{}",
        line.trim_start_matches("kms listening on ").trim()
    )
}

#[test]
fn dev_mode_initialises_unseals_and_restarts_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("state");
    let d = d.to_str().unwrap();

    let mut dev = Dev::start(&["--dir", d]);
    let addr = addr_of(&dev.wait_for("kms listening on"));
    let mut shares = Vec::new();
    for i in 1..=5 {
        let line = dev.wait_for(&format!("Unseal share {i}: "));
        shares.push(line.split(": ").nth(1).unwrap().to_owned());
    }
    dev.wait_for("WARNING: these shares are shown once");
    dev.wait_for("unsealed with shares 1-3");
    let st = run_kms(&addr, &["operator", "status", "--json"], "");
    assert_eq!(st.code, Some(0), "{st:?}");
    assert_eq!(st.json()["sealed"], false);
    assert_eq!(st.json()["threshold"], 3);
    assert_eq!(st.json()["shares"], 5);
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
    let addr = addr_of(&dev.wait_for("kms listening on"));
    dev.wait_for("the server is sealed");
    let st = run_kms(&addr, &["operator", "status", "--json"], "");
    assert_eq!(st.json()["sealed"], true);
    assert_eq!(st.json()["initialized"], true);
    let out = run_kms(
        &addr,
        &["operator", "unseal"],
        &format!("{}\n{}\n{}\n", shares[4], shares[3], shares[0]),
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(dev.stop().success());
}

#[test]
fn dev_mode_without_dir_cleans_up_its_temporary_directory() {
    let mut dev = Dev::start(&[]);
    let addr = addr_of(&dev.wait_for("kms listening on"));
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
        run_kms(&addr, &["operator", "status", "--json"], "").json()["sealed"],
        false
    );
    assert!(dev.stop().success());
    assert!(
        !std::path::Path::new(&path).exists(),
        "{path} was not removed"
    );
}
