//! `kms-load`: a gRPC load generator for kms (and for `kms-echo`, the transport ceiling).
//!
//! Concurrent tonic clients over N channels call one operation for a duration after a
//! warm-up, and it prints ops/s, latency percentiles (HdrHistogram), errors, and the
//! server's CPU seconds per 1,000 calls (from `/proc/PID/stat`, when `--server-pid` is
//! given), as a table or as JSON.
//!
//! ```text
//! kms-load --addr https://127.0.0.1:8200 --ca ca.pem --cert app.pem --cert-key app-key.pem \
//!     --op encrypt --key payments --payload 1024 --concurrency 16 --duration 10s
//! ```
//!
//! `--api transit` sends the same Encrypt or Decrypt as Vault's Transit API to kms's
//! HTTPS front (`[http] listen`, docs/vault-transit.md): JSON over HTTP/1.1 with mTLS, one
//! keep-alive connection per caller (what Vault clients do), so that the two fronts can be
//! measured in one run (`scripts/bench-transit`).
//!
//! `--api kubernetes --socket PATH` sends Encrypt or Decrypt as kube-apiserver does to
//! kms's Kubernetes KMS v2 plugin socket (`[kubernetes_kms]`, docs/kubernetes.md): the
//! apiserver's `v2` messages over HTTP/2 on the unix socket (`scripts/bench-kubernetes`).
//!
//! `--populate N` (with an admin's certificate) instead creates N AES keys `scale-000000`...
//! with one grant each for `--grantee`, `--concurrency` at a time, and prints how long it
//! took: the key-scale bench's set-up (`scripts/bench-scale`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use kms_proto::v1 as pb;
use kms_proto::v1::credentials_client::CredentialsClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_proto::v1::secrets_client::SecretsClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The operation under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Op {
    Encrypt,
    Decrypt,
    Sign,
    Mac,
    Datakey,
    BatchEncrypt,
    /// One `ListKeys` page of `--batch` keys (an admin's certificate).
    ListKeys,
    /// `GetSecret` of the secret at `--key` (written once first with one value of
    /// `--payload` bytes, by the caller's certificate: it needs secret-write and
    /// secret-read); with `--spread`, of the secrets `--populate-secrets` wrote.
    GetSecret,
    /// `PutSecret` of a new version of one value of `--payload` bytes at `--key`.
    PutSecret,
    /// One `ListSecrets` page of `--batch` names under the prefix `--key`.
    ListSecrets,
    /// `IssueJwt` from the issuer `--key` for the audience `--audience` (the caller's
    /// certificate is one of the issuer's principals).
    IssueJwt,
    /// `IssueX509` from the x509 issuer `--key` for the request in `--csr` (the caller's
    /// certificate is one of the issuer's principals; the request names no SAN or its
    /// SPIFFE ID).
    IssueX509,
}

/// The API under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Api {
    /// kms.v1.KeyManagement over gRPC.
    Grpc,
    /// Vault's Transit paths over HTTPS (encrypt and decrypt).
    Transit,
    /// The Kubernetes KMS v2 plugin on its unix socket (`--socket`; encrypt and decrypt).
    Kubernetes,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "kms-load", about = "gRPC load generator for kms")]
struct Args {
    /// The API: gRPC, or Vault's Transit on kms's HTTPS front (`--addr` is then its
    /// address).
    #[arg(long, value_enum, default_value = "grpc")]
    api: Api,
    /// The server: https://HOST:PORT.
    #[arg(long, default_value = "https://127.0.0.1:8200")]
    addr: String,
    /// `--api kubernetes`: the plugin's socket (`--key` is then unused: the server's
    /// `[kubernetes_kms] key` is).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The CA that signed the server's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// The client certificate (the identity whose grants are used).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    cert_key: PathBuf,
    /// The operation.
    #[arg(long, value_enum, default_value = "encrypt")]
    op: Op,
    /// The key to use.
    #[arg(long, default_value = "payments")]
    key: String,
    /// Payload bytes (plaintext, message; per item for batches).
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Items per BatchEncrypt call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// How long to measure (after the warm-up).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// How long to run before measuring.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// The server's process id: its CPU time per 1,000 calls is reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// At most this many calls per second in all (0: as fast as the server answers). Each
    /// of the `--concurrency` callers keeps its share of the rate on a fixed schedule.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Spread the calls over N keys, `KEY000000` to `KEY` N-1 (`--key` is then the prefix,
    /// as `--populate` names them): each call takes the next of them in a fixed shuffled
    /// order, so that a run of fewer than N calls uses every key once (a key not used since
    /// the unseal: the lazy keyring's cold path).
    #[arg(long)]
    spread: Option<u64>,
    /// Where in `--spread`'s order this run starts (another run's keys are then not
    /// reused, as long as the two runs' calls do not overlap).
    #[arg(long, default_value_t = 0)]
    spread_start: u64,
    /// Create this many keys with a grant each, then exit (see above).
    #[arg(long)]
    populate: Option<usize>,
    /// The audience of `--op issue-jwt`'s tokens.
    #[arg(long, default_value = "bench")]
    audience: String,
    /// The PKCS#10 request (PEM or DER) every `--op issue-x509` call sends.
    #[arg(long)]
    csr: Option<std::path::PathBuf>,
    /// The grantee of `--populate`'s grants.
    #[arg(long, default_value = "spiffe://kms.dev/app")]
    grantee: String,
    /// Write this many secrets `KEY000000`... (`--key` is the prefix, as `--spread` names
    /// them), one value of `--payload` bytes each, `--concurrency` at a time, then exit (the caller needs
    /// secret-write on them).
    #[arg(long)]
    populate_secrets: Option<usize>,
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
struct Report {
    api: Api,
    op: Op,
    payload: usize,
    concurrency: usize,
    channels: usize,
    seconds: f64,
    calls: u64,
    errors: u64,
    ops_per_second: f64,
    /// Items per second (calls times items per call).
    items_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    /// The server's CPU seconds (user + system) per 1,000 calls, if its pid was given.
    server_cpu_seconds_per_1000: Option<f64>,
    first_error: Option<String>,
}

fn main() -> Result<(), BoxError> {
    let args = Arc::new(Args::parse());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(n) = args.populate {
        return rt.block_on(populate(&args, n));
    }
    if let Some(n) = args.populate_secrets {
        return rt.block_on(populate_secrets(&args, n));
    }
    let report = rt.block_on(run(Arc::clone(&args)))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn connect(args: &Args) -> Result<Channel, BoxError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&args.ca)?))
        .identity(Identity::from_pem(
            std::fs::read(&args.cert)?,
            std::fs::read(&args.cert_key)?,
        ));
    Ok(Channel::from_shared(args.addr.clone())?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// Creates `n` keys with a grant each, `--concurrency` at a time.
async fn populate(args: &Args, n: usize) -> Result<(), BoxError> {
    use kms_proto::v1::access_client::AccessClient;
    let channel = connect(args).await?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (channel, next, grantee) = (channel.clone(), Arc::clone(&next), args.grantee.clone());
        tasks.push(tokio::spawn(async move {
            let keys = KeyManagementClient::new(channel.clone());
            let access = AccessClient::new(channel);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return Ok::<(), tonic::Status>(());
                }
                let name = format!("scale-{i:06}");
                // A call cut off when the server closes an old connection (GOAWAY at its
                // max_connection_age) is sent again: a key made by the first attempt answers
                // ALREADY_EXISTS to the second, a grant may be made twice (harmless here).
                let key = pb::CreateKeyRequest {
                    name: name.clone(),
                    algorithm: pb::Algorithm::Aes256Gcm as i32,
                    ..Default::default()
                };
                retried(key, true, |r| {
                    let mut keys = keys.clone();
                    async move { keys.create_key(r).await }
                })
                .await?;
                let grant = pb::CreateGrantRequest {
                    key: name.clone(),
                    principal: grantee.clone(),
                    operations: vec![pb::Operation::Encrypt as i32],
                    associated_data: None,
                };
                retried(grant, false, |r| {
                    let mut access = access.clone();
                    async move { access.create_grant(r).await }
                })
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await?
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "created {n} keys with a grant each in {seconds:.1} s ({:.0} keys/s)",
        n as f64 / seconds
    );
    Ok(())
}

async fn populate_secrets(args: &Args, n: usize) -> Result<(), BoxError> {
    let channel = connect(args).await?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let value: std::collections::BTreeMap<String, String> =
        [("value".to_owned(), "x".repeat(args.payload))].into();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (next, prefix, value) = (Arc::clone(&next), args.key.clone(), value.clone());
        let secrets = SecretsClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return Ok::<(), tonic::Status>(());
                }
                let put = pb::PutSecretRequest {
                    path: format!("{prefix}{i:06}"),
                    data: value.clone(),
                    // Made once: a second attempt of a write that landed is refused.
                    cas: Some(0),
                };
                let r = retried(put, false, |r| {
                    let mut secrets = secrets.clone();
                    async move { secrets.put_secret(r).await }
                })
                .await;
                match r {
                    Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                    other => other?,
                }
            }
        }));
    }
    for t in tasks {
        t.await?
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "wrote {n} secrets in {seconds:.1} s ({:.0} secrets/s)",
        n as f64 / seconds
    );
    Ok(())
}

/// A change, sent again (up to 5 times) when the transport cut it off (CANCELLED,
/// UNAVAILABLE); with `exists_ok`, ALREADY_EXISTS to a second attempt is the first's success.
async fn retried<Q: Clone, R, F, Fut>(
    request: Q,
    exists_ok: bool,
    mut send: F,
) -> Result<(), tonic::Status>
where
    F: FnMut(tonic::Request<Q>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let mut attempt = 0;
    loop {
        match send(tonic::Request::new(request.clone())).await {
            Ok(_) => return Ok(()),
            Err(s) if attempt > 0 && exists_ok && s.code() == tonic::Code::AlreadyExists => {
                return Ok(());
            }
            Err(s)
                if attempt < 5
                    && matches!(s.code(), tonic::Code::Cancelled | tonic::Code::Unavailable) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// One call of the operation; `Err` carries the status text.
async fn call(
    c: &mut KeyManagementClient<Channel>,
    secrets: &mut SecretsClient<Channel>,
    credentials: &mut CredentialsClient<Channel>,
    args: &Args,
    input: &Input,
) -> Result<(), String> {
    let key = match args.spread {
        Some(n) if n > 0 => {
            // A multiplier prime to every N this takes (not a multiple of 7919): i -> i * P
            // mod N visits every key once in N calls.
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let i = NEXT.fetch_add(1, Ordering::Relaxed) + args.spread_start;
            format!("{}{:06}", args.key, i.wrapping_mul(7919) % n)
        }
        _ => args.key.clone(),
    };
    let r = match args.op {
        Op::Encrypt => c
            .encrypt(pb::EncryptRequest {
                key,
                plaintext: input.payload.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::Decrypt => c
            .decrypt(pb::DecryptRequest {
                key,
                ciphertext: input.ciphertext.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::IssueJwt => credentials
            .issue_jwt(pb::IssueJwtRequest {
                issuer: key,
                audience: args.audience.clone(),
                subject: String::new(),
                ttl_seconds: 0,
            })
            .await
            .map(drop),
        Op::IssueX509 => credentials
            .issue_x509(pb::IssueX509Request {
                issuer: key,
                csr: input.csr.clone(),
                subject: String::new(),
                ttl_seconds: 0,
            })
            .await
            .map(drop),
        Op::Sign => c
            .sign(pb::SignRequest {
                key,
                input: Some(pb::sign_request::Input::Message(input.payload.clone())),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::Mac => c
            .mac(pb::MacRequest {
                key,
                message: input.payload.clone(),
            })
            .await
            .map(drop),
        Op::Datakey => c
            .generate_data_key(pb::GenerateDataKeyRequest {
                key,
                length_bytes: 32,
                ..Default::default()
            })
            .await
            .map(drop),
        Op::BatchEncrypt => c
            .batch_encrypt(pb::BatchEncryptRequest {
                key,
                items: (0..args.batch)
                    .map(|_| pb::EncryptItem {
                        plaintext: input.payload.clone(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .map(drop),
        Op::ListKeys => c
            .list_keys(pb::ListKeysRequest {
                page_size: u32::try_from(args.batch).unwrap_or(u32::MAX),
                page_token: String::new(),
            })
            .await
            .map(drop),
        Op::GetSecret => secrets
            .get_secret(pb::GetSecretRequest {
                path: key,
                version: 0,
            })
            .await
            .map(drop),
        Op::ListSecrets => secrets
            .list_secrets(pb::ListSecretsRequest {
                prefix: key,
                page_size: u32::try_from(args.batch).unwrap_or(u32::MAX),
                page_token: String::new(),
            })
            .await
            .map(drop),
        Op::PutSecret => secrets
            .put_secret(pb::PutSecretRequest {
                path: key,
                data: input.secret.clone(),
                cas: None,
            })
            .await
            .map(drop),
    };
    r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// What every call sends: the payload, and for Decrypt a ciphertext made once; over
/// Transit, the JSON body of the request.
struct Input {
    payload: Vec<u8>,
    /// GetSecret and PutSecret: one value of the payload's size.
    secret: std::collections::BTreeMap<String, String>,
    ciphertext: Vec<u8>,
    transit_body: Vec<u8>,
    /// IssueX509: the request.
    csr: Vec<u8>,
    /// The Kubernetes plugin's Decrypt: the key_id its Encrypt gave.
    key_id: String,
}

/// The latency histogram: 1 us to 60 s, 3 significant digits.
fn histogram() -> Result<Histogram<u64>, BoxError> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// What every call sends, made once: for Decrypt, a ciphertext of the payload.
async fn make_input(args: &Args, channel: Option<Channel>) -> Result<Input, BoxError> {
    let payload = vec![0x5a; args.payload];
    if args.api == Api::Kubernetes {
        return kubernetes::input(args, payload).await;
    }
    let Some(channel) = channel else {
        return transit::input(args, payload).await;
    };
    // One value of the payload's size (printable: a secret's values are strings).
    let secret: std::collections::BTreeMap<String, String> =
        [("value".to_owned(), "x".repeat(args.payload))].into();
    // Over `--spread`, the secrets are there already (`--populate-secrets`).
    if args.op == Op::GetSecret && args.spread.is_none() {
        SecretsClient::new(channel.clone())
            .put_secret(pb::PutSecretRequest {
                path: args.key.clone(),
                data: secret.clone(),
                cas: None,
            })
            .await?;
    }
    let ciphertext = if args.op == Op::Decrypt {
        KeyManagementClient::new(channel)
            .encrypt(pb::EncryptRequest {
                key: args.key.clone(),
                plaintext: payload.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .ciphertext
    } else {
        Vec::new()
    };
    let csr = match (&args.csr, args.op) {
        (Some(path), _) => std::fs::read(path)?,
        (None, Op::IssueX509) => return Err("--op issue-x509 needs --csr FILE".into()),
        (None, _) => Vec::new(),
    };
    Ok(Input {
        payload,
        secret,
        ciphertext,
        transit_body: Vec::new(),
        csr,
        key_id: String::new(),
    })
}

/// When one caller calls: from the start (after the warm-up, calls are measured) to the
/// end, back to back or every `interval` from `first_at`.
struct Schedule {
    measure_from: Instant,
    end: Instant,
    interval: Option<Duration>,
    first_at: Option<Instant>,
}

/// Where one caller puts what it measured.
struct Outcome {
    hist: Histogram<u64>,
    errors: Arc<AtomicU64>,
    first_error: Arc<std::sync::Mutex<Option<String>>>,
}

/// One caller: calls until the end of the run and returns its latency histogram.
async fn caller(
    mut client: Client,
    args: Arc<Args>,
    input: Arc<Input>,
    schedule: Schedule,
    mut outcome: Outcome,
) -> Histogram<u64> {
    let mut next_at = schedule.first_at;
    loop {
        if let (Some(at), Some(iv)) = (next_at.as_mut(), schedule.interval) {
            tokio::time::sleep_until((*at).into()).await;
            *at += iv;
        }
        let t = Instant::now();
        if t >= schedule.end {
            break;
        }
        let r = match &mut client {
            Client::Grpc(clients) => {
                let (c, s, j) = &mut **clients;
                call(c, s, j, &args, &input).await
            }
            Client::Transit(c) => transit::call(c, &args, &input).await,
            Client::Kubernetes(c) => kubernetes::call(c, &args, &input).await,
        };
        let done = Instant::now();
        if t < schedule.measure_from {
            continue;
        }
        match r {
            Ok(()) => {
                let us = u64::try_from(done.duration_since(t).as_micros()).unwrap_or(u64::MAX);
                let _ = outcome.hist.record(us.max(1));
            }
            Err(e) => {
                outcome.errors.fetch_add(1, Ordering::Relaxed);
                outcome
                    .first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
        }
    }
    outcome.hist
}

/// One caller's client.
/// The gRPC services a caller calls.
type Clients = (
    KeyManagementClient<Channel>,
    SecretsClient<Channel>,
    CredentialsClient<Channel>,
);

enum Client {
    Grpc(Box<Clients>),
    Transit(Box<transit::Connection>),
    Kubernetes(Box<kubernetes::Client>),
}

async fn run(args: Arc<Args>) -> Result<Report, BoxError> {
    let mut channels = Vec::new();
    if args.api == Api::Grpc {
        for _ in 0..args.channels.max(1) {
            channels.push(connect(&args).await?);
        }
    }
    let mut sockets = Vec::new();
    if args.api == Api::Kubernetes {
        for _ in 0..args.channels.max(1) {
            sockets.push(kubernetes::connect(&args).await?);
        }
    }
    let input = Arc::new(make_input(&args, channels.first().cloned()).await?);
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let cpu_before = Arc::new(std::sync::Mutex::new(None));
    // Samples the server's CPU time once the warm-up is over.
    let sampler = {
        let (cpu_before, args) = (Arc::clone(&cpu_before), Arc::clone(&args));
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            *cpu_before.lock().unwrap_or_else(|p| p.into_inner()) =
                args.server_pid.and_then(cpu_seconds);
        })
    };
    let mut tasks = Vec::new();
    for i in 0..args.concurrency.max(1) {
        let client = match channels.get(i % channels.len().max(1)) {
            Some(channel) => Client::Grpc(Box::new((
                KeyManagementClient::new(channel.clone())
                    .max_decoding_message_size(64 * 1024 * 1024),
                SecretsClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024),
                CredentialsClient::new(channel.clone()),
            ))),
            None => match sockets.get(i % sockets.len().max(1)) {
                Some(channel) => {
                    Client::Kubernetes(Box::new(kubernetes::Client::new(channel.clone())))
                }
                None => Client::Transit(Box::new(transit::Connection::open(&args).await?)),
            },
        };
        // Paced callers start spread over one interval, so the calls do not come in bursts.
        let interval = (args.rate > 0.0)
            .then(|| Duration::from_secs_f64(args.concurrency.max(1) as f64 / args.rate));
        let schedule = Schedule {
            measure_from,
            end,
            interval,
            first_at: interval
                .map(|iv| start + iv.mul_f64(i as f64 / args.concurrency.max(1) as f64)),
        };
        let outcome = Outcome {
            hist: histogram()?,
            errors: Arc::clone(&errors),
            first_error: Arc::clone(&first_error),
        };
        tasks.push(tokio::spawn(caller(
            client,
            Arc::clone(&args),
            Arc::clone(&input),
            schedule,
            outcome,
        )));
    }
    let mut all = histogram()?;
    for t in tasks {
        all.add(t.await?)?;
    }
    let _ = sampler.await;
    let cpu_after = args.server_pid.and_then(cpu_seconds);
    let cpu_before = *cpu_before.lock().unwrap_or_else(|p| p.into_inner());
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(report(
        &args,
        &all,
        errors.load(Ordering::Relaxed),
        first_error,
        cpu_before.zip(cpu_after),
    ))
}

/// The run's report from its merged histogram, its errors and the server's CPU time before
/// and after the measured part.
fn report(
    args: &Args,
    all: &Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    cpu: Option<(f64, f64)>,
) -> Report {
    let seconds = args.duration.as_secs_f64();
    let calls = all.len();
    let cpu = cpu
        .filter(|_| calls > 0)
        .map(|(b, a)| (a - b) * 1000.0 / calls as f64);
    let items = if args.op == Op::BatchEncrypt {
        args.batch as f64
    } else {
        1.0
    };
    Report {
        api: args.api,
        op: args.op,
        payload: args.payload,
        concurrency: args.concurrency,
        channels: args.channels,
        seconds,
        calls,
        errors,
        ops_per_second: calls as f64 / seconds,
        items_per_second: calls as f64 * items / seconds,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        max_us: all.max(),
        server_cpu_seconds_per_1000: cpu,
        first_error,
    }
}

/// A process's CPU time (user + system), in seconds, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A minimal Vault Transit client: HTTP/1.1 over rustls with a client certificate, one
/// keep-alive connection, `Content-Length` bodies (what kms's front answers).
/// The Kubernetes KMS v2 plugin's socket, as kube-apiserver calls it: HTTP/2 on a unix
/// socket, `localhost` as the authority.
mod kubernetes {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use kms_proto::kubernetes::v2 as k8s;
    use tonic::transport::{Channel, Endpoint, Uri};

    use super::{Args, BoxError, Input, Op};

    pub(super) type Client =
        k8s::key_management_service_client::KeyManagementServiceClient<Channel>;

    /// Connects every channel to the same socket.
    #[derive(Clone)]
    struct Socket(std::path::PathBuf);

    impl tower_service::Service<Uri> for Socket {
        type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            let path = self.0.clone();
            Box::pin(async move {
                Ok(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            })
        }
    }

    pub(super) async fn connect(args: &Args) -> Result<Channel, BoxError> {
        let socket = args
            .socket
            .clone()
            .ok_or("--api kubernetes needs --socket PATH")?;
        Ok(Endpoint::try_from("http://localhost")?
            .connect_with_connector(Socket(socket))
            .await?)
    }

    /// For Decrypt: a ciphertext of the payload, and its key_id, made once.
    pub(super) async fn input(args: &Args, payload: Vec<u8>) -> Result<Input, BoxError> {
        let (ciphertext, key_id) = match args.op {
            Op::Decrypt => {
                let r = Client::new(connect(args).await?)
                    .encrypt(k8s::EncryptRequest {
                        plaintext: payload.clone(),
                        uid: "bench-setup".to_owned(),
                    })
                    .await?
                    .into_inner();
                (r.ciphertext, r.key_id)
            }
            Op::Encrypt => (Vec::new(), String::new()),
            _ => return Err("--api kubernetes: --op encrypt or decrypt".into()),
        };
        Ok(Input {
            payload,
            secret: Default::default(),
            ciphertext,
            transit_body: Vec::new(),
            csr: Vec::new(),
            key_id,
        })
    }

    pub(super) async fn call(c: &mut Client, args: &Args, input: &Input) -> Result<(), String> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // A fresh uid a call, as the apiserver sends.
        let uid = format!(
            "bench-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let r = match args.op {
            Op::Decrypt => c
                .decrypt(k8s::DecryptRequest {
                    ciphertext: input.ciphertext.clone(),
                    uid,
                    key_id: input.key_id.clone(),
                    annotations: Default::default(),
                })
                .await
                .map(drop),
            _ => c
                .encrypt(k8s::EncryptRequest {
                    plaintext: input.payload.clone(),
                    uid,
                })
                .await
                .map(drop),
        };
        r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }
}

mod transit {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls;

    use super::{Args, BoxError, Input, Op};

    /// One connection to the front.
    pub(super) struct Connection {
        stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        host: String,
        path: String,
        buf: Vec<u8>,
    }

    fn config(args: &Args) -> Result<Arc<rustls::ClientConfig>, BoxError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&args.ca)? {
            roots.add(ca?)?;
        }
        let chain = CertificateDer::pem_file_iter(&args.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&args.cert_key)?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    impl Connection {
        /// Connects to `--addr` (https://HOST:PORT) for `--op` on `--key`.
        pub(super) async fn open(args: &Args) -> Result<Self, BoxError> {
            let host_port = args
                .addr
                .strip_prefix("https://")
                .ok_or("--addr: https://HOST:PORT")?
                .trim_end_matches('/')
                .to_owned();
            let host = host_port
                .rsplit_once(':')
                .map_or(host_port.as_str(), |(h, _)| h)
                .to_owned();
            let tcp = tokio::net::TcpStream::connect(&host_port).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone())?;
            let stream = tokio_rustls::TlsConnector::from(config(args)?)
                .connect(name, tcp)
                .await?;
            let verb = match args.op {
                Op::Encrypt => "encrypt",
                Op::Decrypt => "decrypt",
                _ => return Err("--api transit: --op encrypt or decrypt".into()),
            };
            Ok(Self {
                stream,
                host: host_port,
                path: format!("/v1/transit/{verb}/{}", args.key),
                buf: Vec::new(),
            })
        }

        /// POSTs `body` to the connection's path; the status and the response body.
        pub(super) async fn post(&mut self, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
            let head = format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.path,
                self.host,
                body.len()
            );
            let e = |e: std::io::Error| e.to_string();
            self.stream.write_all(head.as_bytes()).await.map_err(e)?;
            self.stream.write_all(body).await.map_err(e)?;
            self.stream.flush().await.map_err(e)?;
            // Headers, then Content-Length bytes of body.
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 16 * 1024];
                let n = self.stream.read(&mut chunk).await.map_err(e)?;
                if n == 0 {
                    return Err("connection closed".to_owned());
                }
                self.buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default());
            };
            let headers =
                String::from_utf8_lossy(self.buf.get(..end).unwrap_or_default()).into_owned();
            let status: u16 = headers
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or("no status")?;
            let length: usize = headers
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while self.buf.len() < end + length {
                let mut chunk = [0u8; 16 * 1024];
                let n = self.stream.read(&mut chunk).await.map_err(e)?;
                if n == 0 {
                    return Err("connection closed".to_owned());
                }
                self.buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
            let body = self.buf.get(end..end + length).unwrap_or_default().to_vec();
            self.buf.drain(..end + length);
            Ok((status, body))
        }
    }

    /// The JSON body every call sends: for Decrypt, a ciphertext made once.
    pub(super) async fn input(args: &Args, payload: Vec<u8>) -> Result<Input, BoxError> {
        let plaintext = data_encoding::BASE64.encode(&payload);
        let encrypt = serde_json::json!({ "plaintext": plaintext })
            .to_string()
            .into_bytes();
        let transit_body = if args.op == Op::Decrypt {
            let mut c = Connection::open(&Args {
                op: Op::Encrypt,
                ..args.clone()
            })
            .await?;
            let (status, body) = c.post(&encrypt).await?;
            if status != 200 {
                return Err(
                    format!("encrypt: {status}: {}", String::from_utf8_lossy(&body)).into(),
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            serde_json::json!({ "ciphertext": v.pointer("/data/ciphertext") })
                .to_string()
                .into_bytes()
        } else {
            encrypt
        };
        Ok(Input {
            secret: std::collections::BTreeMap::new(),
            payload,
            ciphertext: Vec::new(),
            transit_body,
            csr: Vec::new(),
            key_id: String::new(),
        })
    }

    /// One Transit call; `Err` carries the status and Vault's errors.
    pub(super) async fn call(c: &mut Connection, _: &Args, input: &Input) -> Result<(), String> {
        let (status, body) = c.post(&input.transit_body).await?;
        if status == 200 {
            Ok(())
        } else {
            Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
        }
    }
}

fn print_table(r: &Report) {
    println!(
        "{:<14} {:>7} {:>5} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7} {:>12}",
        "OP",
        "PAYLOAD",
        "CONC",
        "OPS/S",
        "ERRORS",
        "P50 us",
        "P99 us",
        "P99.9 us",
        "CALLS",
        "CPU s/1000"
    );
    println!(
        "{:<14} {:>7} {:>5} {:>10.0} {:>8} {:>9} {:>9} {:>9} {:>7} {:>12}",
        format!("{:?}", r.op).to_lowercase(),
        r.payload,
        r.concurrency,
        r.ops_per_second,
        r.errors,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.calls,
        r.server_cpu_seconds_per_1000
            .map_or("-".to_owned(), |c| format!("{c:.3}"))
    );
    if let Some(e) = &r.first_error {
        println!("first error: {e}");
    }
}
