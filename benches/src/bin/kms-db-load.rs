//! `kms-db-load`: load for the databases engine (`scripts/bench-databases`).
//!
//! - `--op creds`: `GetDatabaseCredentials` of the role `--role`, `--concurrency` calls in
//!   flight, for `--duration`: each call is a new PostgreSQL login under a lease.
//! - `--op create-role`: what PostgreSQL alone does for one (the role's creation statements,
//!   one transaction, a fresh name and password each), straight to the database at
//!   `--pg-url` over `--concurrency` connections: the share of a credential that is the
//!   database's own.
//! - `--issue N`: N credentials, `--concurrency` at a time, then the time it took (the
//!   revocation benchmark's set-up).
//!
//! It prints one JSON line: calls, errors, ops/s, p50/p99 latency, and the server's CPU
//! seconds per 1,000 calls when `--server-pid` is given.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use kms_proto::v1 as pb;
use kms_proto::v1::databases_client::DatabasesClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Op {
    /// GetDatabaseCredentials through kms.
    Creds,
    /// The creation statements straight to PostgreSQL.
    CreateRole,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "kms-db-load", about = "load for kms's databases engine")]
struct Args {
    #[arg(long, value_enum, default_value = "creds")]
    op: Op,
    /// The server: https://HOST:PORT.
    #[arg(long, default_value = "https://127.0.0.1:8200")]
    addr: String,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    cert_key: Option<PathBuf>,
    /// The database role to ask credentials of.
    #[arg(long, default_value = "bench")]
    role: String,
    /// The lease's duration (0: the role's default).
    #[arg(long, default_value_t = 0)]
    ttl: u64,
    /// `--op create-role`: the database (a URL with its root login and password).
    #[arg(long)]
    pg_url: Option<String>,
    /// `--op create-role`: the statements, `{{name}}`, `{{password}}`, `{{expiration}}`
    /// as the role has them, separated by newlines.
    #[arg(long, default_value = "")]
    statements: String,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    #[arg(long)]
    server_pid: Option<u32>,
    /// Issue this many credentials, then print how long it took.
    #[arg(long)]
    issue: Option<u64>,
    /// With an admin's certificate: create the connection `bench` to this URL (with
    /// `{{username}}` and `{{password}}`) and the role `--role` (`--statements`, for
    /// `--principal`, default lease `--ttl`), then exit.
    #[arg(long)]
    setup: Option<String>,
    /// `--setup`: the root login.
    #[arg(long, default_value = "kmsroot")]
    root_user: String,
    /// `--setup`: the file holding the root login's password.
    #[arg(long)]
    root_password_file: Option<PathBuf>,
    /// `--setup`: who may ask the role.
    #[arg(long, default_value = "spiffe://kms.dev/app")]
    principal: String,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    op: Op,
    concurrency: usize,
    seconds: f64,
    calls: u64,
    errors: u64,
    ops_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    server_cpu_seconds_per_1000: Option<f64>,
    first_error: Option<String>,
}

fn main() -> Result<(), BoxError> {
    let args = Arc::new(Args::parse());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(url) = &args.setup {
        return rt.block_on(setup(&args, url));
    }
    if let Some(n) = args.issue {
        let started = Instant::now();
        let report = rt.block_on(issue(Arc::clone(&args), n))?;
        println!(
            "{}",
            serde_json::json!({"issued": report.0, "errors": report.1, "seconds": started.elapsed().as_secs_f64(), "first_error": report.2})
        );
        return Ok(());
    }
    let report = rt.block_on(run(Arc::clone(&args)))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn connect(args: &Args) -> Result<Channel, BoxError> {
    let read = |p: &Option<PathBuf>, what: &str| -> Result<Vec<u8>, BoxError> {
        Ok(std::fs::read(
            p.as_ref().ok_or(format!("--{what} is required"))?,
        )?)
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&args.ca, "ca")?))
        .identity(Identity::from_pem(
            read(&args.cert, "cert")?,
            read(&args.cert_key, "cert-key")?,
        ));
    Ok(Channel::from_shared(args.addr.clone())?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// One caller of `--op`: makes its own connection(s), then calls until told to stop.
enum Caller {
    Kms(DatabasesClient<Channel>),
    Pg(tokio_postgres::Client),
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Caller {
    async fn new(args: &Args, channel: Option<&Channel>) -> Result<Self, BoxError> {
        match args.op {
            Op::Creds => Ok(Self::Kms(DatabasesClient::new(
                channel.ok_or("no channel")?.clone(),
            ))),
            Op::CreateRole => {
                let url = args.pg_url.as_deref().ok_or("--pg-url is required")?;
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                Ok(Self::Pg(client))
            }
        }
    }

    async fn call(&mut self, args: &Args) -> Result<(), String> {
        match self {
            Self::Kms(c) => c
                .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                    role: args.role.clone(),
                    ttl_seconds: args.ttl,
                })
                .await
                .map(drop)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            Self::Pg(client) => {
                let i = NEXT.fetch_add(1, Ordering::Relaxed);
                let name = format!("bench_{}_{i}", std::process::id());
                let password = format!("Bench-Password-{i:020}");
                // As kms does: a transaction that lost a race with another (concurrent
                // GRANTs on one table) is run again, up to 5 times.
                let mut tries = 0;
                loop {
                    let tx = client.transaction().await.map_err(|e| e.to_string())?;
                    let mut done = Ok(());
                    for s in args.statements.lines().filter(|l| !l.trim().is_empty()) {
                        let s = s
                            .replace("{{name}}", &name)
                            .replace("{{password}}", &password)
                            .replace("{{expiration}}", "2100-01-01 00:00:00+00");
                        done = tx.batch_execute(&s).await;
                        if done.is_err() {
                            break;
                        }
                    }
                    let done = match done {
                        Ok(()) => tx.commit().await,
                        Err(e) => Err(e),
                    };
                    match done {
                        Err(e)
                            if tries < 5
                                && e.as_db_error().is_some_and(|d| {
                                    d.message().contains("concurrently updated")
                                        || matches!(d.code().code(), "40001" | "40P01")
                                }) =>
                        {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                        }
                        other => return other.map_err(|e| e.to_string()),
                    }
                }
            }
        }
    }
}

/// The server's CPU seconds so far (user + system), from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

async fn run(args: Arc<Args>) -> Result<Report, BoxError> {
    let channel = match args.op {
        Op::Creds => Some(connect(&args).await?),
        Op::CreateRole => None,
    };
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let mut caller = Caller::new(&args, channel.as_ref()).await?;
        let (args, measuring, stop) =
            (Arc::clone(&args), Arc::clone(&measuring), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = caller.call(&args).await;
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    match r {
                        Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    tokio::time::sleep(args.warmup).await;
    let cpu0 = args.server_pid.and_then(cpu_seconds);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu1 = args.server_pid.and_then(cpu_seconds);
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (l, e, f) = t.await?;
        all.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let calls = all.len() as u64;
    Ok(Report {
        op: args.op,
        concurrency: args.concurrency,
        seconds,
        calls,
        errors,
        ops_per_second: calls as f64 / seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        server_cpu_seconds_per_1000: cpu0
            .zip(cpu1)
            .filter(|_| calls > 0)
            .map(|(a, b)| (b - a) * 1000.0 / calls as f64),
        first_error,
    })
}

/// Issues `n` credentials, `--concurrency` at a time: (issued, errors, first error).
async fn issue(args: Arc<Args>, n: u64) -> Result<(u64, u64, Option<String>), BoxError> {
    let channel = connect(&args).await?;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let mut caller = Caller::new(&args, Some(&channel)).await?;
        let (args, next) = (Arc::clone(&args), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut first) = (0u64, 0u64, None);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match caller.call(&args).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert(e);
                    }
                }
            }
            (ok, errors, first)
        }));
    }
    let (mut ok, mut errors, mut first) = (0, 0, None);
    for t in tasks {
        let (o, e, f) = t.await?;
        ok += o;
        errors += e;
        if first.is_none() {
            first = f;
        }
    }
    Ok((ok, errors, first))
}

/// Creates the connection `bench` and the role `--role`.
async fn setup(args: &Args, url: &str) -> Result<(), BoxError> {
    let password = std::fs::read_to_string(
        args.root_password_file
            .as_ref()
            .ok_or("--root-password-file is required")?,
    )?;
    let mut c = DatabasesClient::new(connect(args).await?);
    c.put_database_connection(pb::PutDatabaseConnectionRequest {
        connection: Some(pb::DatabaseConnection {
            name: "bench".into(),
            connection_url: url.to_owned(),
            username: args.root_user.clone(),
            allowed_roles: vec!["*".into()],
            max_open_connections: 16,
            ..Default::default()
        }),
        password: password.trim().to_owned(),
        skip_verify: false,
    })
    .await?;
    c.put_database_role(pb::PutDatabaseRoleRequest {
        role: Some(pb::DatabaseRole {
            name: args.role.clone(),
            connection: "bench".into(),
            creation_statements: args
                .statements
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect(),
            default_ttl_seconds: args.ttl.max(1),
            max_ttl_seconds: 86_400,
            principals: vec![args.principal.clone()],
            ..Default::default()
        }),
    })
    .await?;
    Ok(())
}
