//! A real PostgreSQL for the tests: Debian's `postgresql` package, `initdb` in a temporary
//! directory (as the unprivileged `nobody` when the tests run as root, since PostgreSQL
//! refuses to run as root), password authentication (SCRAM) on 127.0.0.1 only, on a free
//! port, stopped when dropped. Never a mock.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running PostgreSQL cluster with a database `kms` owned by the role `kms`.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The `kms` role's password.
    pub password: String,
    /// A 0600 file holding it (for `password_file`).
    pub password_file: PathBuf,
    /// The superuser's password.
    superuser_password: String,
}

/// The directory of the PostgreSQL server programs (the newest installed major version).
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/test installs Debian's postgresql)")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/initdb (apt-get install postgresql)")
}

fn random_word() -> String {
    let mut bytes = [0u8; 18];
    getrandom_fill(&mut bytes);
    data_encoding::HEXLOWER.encode(&bytes)
}

fn getrandom_fill(bytes: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(bytes))
        .expect("/dev/urandom");
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs a PostgreSQL program as the cluster's owner.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "nobody", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestPostgres {
    /// Makes and starts a cluster, and a role and database `kms`.
    pub fn start() -> Self {
        let pg = Self::start_with(None);
        pg.sql(&format!("CREATE ROLE kms LOGIN PASSWORD '{}'", pg.password));
        pg.sql("CREATE DATABASE kms OWNER kms");
        pg
    }

    /// Makes and starts a cluster with its superuser only (no `kms` role or database:
    /// [`TestPostgres::password`] and [`TestPostgres::password_file`] are then unused), for
    /// a test that makes them as an operator would.
    pub fn start_empty() -> Self {
        Self::start_with(None)
    }

    /// As [`TestPostgres::start`], serving TLS only (`hostssl`: plaintext connections are
    /// refused) with this certificate and key (PEM).
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        let pg = Self::start_with(Some((cert, key)));
        pg.sql(&format!("CREATE ROLE kms LOGIN PASSWORD '{}'", pg.password));
        pg.sql("CREATE DATABASE kms OWNER kms");
        pg
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Self {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("kms-pg-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = dir.path().join("data");
        let superuser_password = random_word();
        let su_file = dir.path().join("su.pass");
        std::fs::write(&su_file, &superuser_password).unwrap();
        if is_root() {
            let out = Command::new("chown")
                .args(["-R", "nobody:"])
                .arg(dir.path())
                .output()
                .unwrap();
            check("chown", out);
        }
        let out = as_owner(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", su_file.display()))
            .output()
            .unwrap();
        check("initdb", out);
        if let Some((cert, key)) = tls {
            std::fs::copy(cert, data.join("server.crt")).unwrap();
            std::fs::copy(key, data.join("server.key")).unwrap();
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            let hba = data.join("pg_hba.conf");
            let text = std::fs::read_to_string(&hba).unwrap();
            let only_tls: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            std::fs::write(&hba, only_tls).unwrap();
            std::fs::write(
                data.join("postgresql.auto.conf"),
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            )
            .unwrap();
            if is_root() {
                let out = Command::new("chown")
                    .args(["-R", "nobody:"])
                    .arg(&data)
                    .output()
                    .unwrap();
                check("chown", out);
            }
        }
        let password = random_word();
        let password_file = dir.path().join("kms.pass");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut pg = Self {
            dir,
            bin,
            port: 0,
            password,
            password_file,
            superuser_password,
        };
        // A free port is free only until someone else binds it: another test's server may
        // take it between `free_port` and PostgreSQL's bind. Then try another.
        for attempt in 1..=5 {
            pg.port = crate::free_port();
            match pg.try_ctl_start() {
                Ok(()) => return pg,
                Err(log) if attempt < 5 && log.contains("could not bind") => continue,
                Err(log) => panic!("pg_ctl start failed: {log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The data directory, which holds `postgresql.conf` and `pg_hba.conf`.
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// The directory of the PostgreSQL programs (`psql`, `pg_ctl`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The password of the superuser `postgres`.
    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// The operating-system user the cluster runs as (`nobody` when the tests run as root).
    pub fn os_user() -> String {
        if is_root() {
            "nobody".to_owned()
        } else {
            std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| rustix::process::geteuid().as_raw().to_string())
        }
    }

    fn ctl_start(&self) {
        if let Err(log) = self.try_ctl_start() {
            panic!("pg_ctl start failed: {log}");
        }
    }

    /// Starts the server on its port; `Err` with its log when it does not start.
    fn try_ctl_start(&self) -> Result<(), String> {
        let out = as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on -c synchronous_commit=on",
                self.port,
                self.dir.path().display()
            ))
            .args(["-w", "-t", "60", "start"])
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        Err(format!(
            "{}{}\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Stops the server now (`immediate`: as a crash would), keeping its data.
    pub fn stop(&self) {
        let out = as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .unwrap();
        check("pg_ctl stop", out);
    }

    /// Starts it again after [`TestPostgres::stop`], on the same port.
    pub fn restart(&self) {
        self.ctl_start();
    }

    /// The URL kms connects with (no password in it).
    pub fn url(&self) -> String {
        format!(
            "postgresql://kms@127.0.0.1:{}/kms?sslmode=disable",
            self.port
        )
    }

    /// A `[storage]` table for kms on this database, the password from the file.
    pub fn storage_table(&self) -> String {
        format!(
            "[storage]\nbackend = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\ntimeout_seconds = 2\n",
            self.url(),
            self.password_file.display()
        )
    }

    /// Runs SQL as the superuser on database `postgres`; returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// Runs SQL as the superuser on `database`; returns psql's unaligned output.
    pub fn sql_in(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", database, "-c", sql])
            .env("PGPASSWORD", &self.superuser_password)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        check("psql", out);
        text
    }

    /// Opens an interactive `psql` session as the superuser on `database`, for SQL that
    /// must hold something (a transaction, a lock) while the test goes on.
    pub fn session(&self, database: &str) -> PsqlSession {
        self.session_as("postgres", &self.superuser_password.clone(), database)
    }

    /// As [`TestPostgres::session`], as `role` with `password`.
    pub fn session_as(&self, role: &str, password: &str, database: &str) -> PsqlSession {
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", role, "-d", database])
            .env("PGPASSWORD", password)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        PsqlSession {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    /// Makes a role that may log in (and so, like every role, connect to `kms` and
    /// `NOTIFY` on it) and holds no privilege on kms's tables; returns its password.
    pub fn stranger_role(&self, role: &str) -> String {
        let password = random_word();
        self.sql(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"));
        password
    }

    /// Makes another empty database owned by `kms`; returns its URL.
    pub fn new_database(&self, name: &str) -> String {
        self.sql(&format!("CREATE DATABASE {name} OWNER kms;"));
        format!(
            "postgresql://kms@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }
}

/// An interactive `psql` (see [`TestPostgres::session`]): SQL is sent without waiting for
/// it to finish; [`PsqlSession::sync`] waits until everything sent so far has run.
pub struct PsqlSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line psql wrote so far (results and errors).
    pub seen: Vec<String>,
}

impl PsqlSession {
    /// Sends `sql` (one or more statements, each ending in `;`) and returns at once.
    pub fn send(&mut self, sql: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{sql}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits, at most `within`, until everything sent so far has run; returns the lines
    /// psql wrote meanwhile.
    pub fn sync(&mut self, within: std::time::Duration) -> Vec<String> {
        let mark = format!("-- synced {} --", random_word());
        self.send(&format!("\\echo '{mark}'"));
        let deadline = std::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == mark => return out,
                Ok(line) => {
                    self.seen.push(line.clone());
                    out.push(line);
                }
                Err(_) => panic!("psql did not finish within {within:?}; it wrote {out:?}"),
            }
        }
    }
}

impl PsqlSession {
    /// Waits, at most `within`, for psql to end (its connection closed by the server);
    /// the lines it wrote meanwhile, or `None` if it is still running.
    pub fn ended(&mut self, within: std::time::Duration) -> Option<Vec<String>> {
        let deadline = std::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    out.push(line);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Some(out),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return None,
            }
        }
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
