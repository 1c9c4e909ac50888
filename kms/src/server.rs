//! Starting and stopping the server process.
//!
//! Start-up opens the HSM (one login), the store, and the seal manager, in that order, and
//! fails with a typed [`StartError`] before listening if any of them fails. The server
//! always comes up sealed. On SIGINT or SIGTERM it stops taking calls, finishes the ones in
//! flight, and seals (zeroizing every key byte) before it exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use kms_proto::v1::system_server::SystemServer;
use tokio::net::TcpListener;

use crate::access::Roles;
use crate::access::limiter::{FailureLimiter, LimitKind, Limits, UnsealLimit};
use crate::access::tls::{ServerTls, TlsError};
use crate::audit::{AuditError, AuditLog, Signer};
use crate::config::Config;
use crate::grpc::{AccessService, AuditService, KeyManagementService, SystemService};
use crate::hsm::{Hsm, HsmError};
use crate::seal::{SealError, SealManager};
use crate::service::Service;
use crate::store::StoreError;
use kms_proto::v1::access_server::AccessServer;
use kms_proto::v1::audit_server::AuditServer;
use kms_proto::v1::credentials_server::CredentialsServer;
use kms_proto::v1::databases_server::DatabasesServer;
use kms_proto::v1::key_management_server::KeyManagementServer;
use kms_proto::v1::secrets_server::SecretsServer;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The HSM could not be opened (module, token, PIN).
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The seal record could not be loaded, or the master key is missing or unsafe.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log")]
    Audit(#[from] AuditError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The async runtime could not be built.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// A `kms backup restore` into this store did not finish.
    #[error(
        "the store holds an interrupted restore (kms backup restore did not finish): empty it (a new redb file, or drop the database's kms_* tables) and restore again"
    )]
    RestoreInterrupted,
    /// The Kubernetes KMS plugin's socket could not be made.
    #[error(transparent)]
    Kubernetes(#[from] crate::kubernetes::SocketError),
    /// The caller's step between binding and serving failed (`kms dev`'s bootstrap).
    #[error(transparent)]
    Ready(Box<dyn std::error::Error + Send + Sync>),
}

/// What [`run`] calls once the server is open and bound, before it serves: what was
/// opened and the bound addresses. It runs on a blocking thread (it may call the HSM).
pub(crate) type Ready =
    Box<dyn FnOnce(&Opened, Bound) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send>;

/// The addresses a started server listens on (a configured port 0 is the one it got).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The gRPC API.
    pub grpc: SocketAddr,
    /// The Vault-compatible HTTPS front, when `[http]` is on (and TLS is).
    pub http: Option<SocketAddr>,
}

/// Runs a server on `config` until SIGINT or SIGTERM, the one start-up sequence of
/// `kms server` and `kms dev`: open (TLS files, HSM, store, seal), install the signal
/// handlers, bind (printing `kms listening on ADDR`), `ready`, serve, seal and stop. The
/// runtime, and with it the last reference to the HSM, is dropped before this returns, on
/// this thread: the PKCS#11 module is finalised before the process exits.
pub fn run(config: Config, ready: Option<Ready>) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let served = rt.block_on(async move {
        let listen = config.listen;
        let opened = tokio::task::spawn_blocking(move || open(&config))
            .await
            .map_err(|_| StartError::Ready("a start-up task panicked".into()))??;
        let stop = shutdown_signal();
        let metrics = match opened.metrics_listen {
            Some(addr) => Some(
                crate::metrics::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let listener = bind(listen).await?;
        // The HTTPS front serves mTLS only: without TLS (a plaintext loopback listener) it
        // is not started.
        let http = match (&opened.http, &opened.tls) {
            (Some(settings), Some(_)) => {
                Some(crate::http::bind(settings.listen).await.map_err(|source| {
                    StartError::Bind {
                        addr: settings.listen,
                        source,
                    }
                })?)
            }
            _ => None,
        };
        let kubernetes = match &opened.kubernetes {
            Some(settings) => Some(crate::kubernetes::bind(settings).await?),
            None => None,
        };
        if let Some(ready) = ready {
            let bound = Bound {
                grpc: listener.local_addr().map_err(|source| StartError::Bind {
                    addr: listen,
                    source,
                })?,
                http: http.as_ref().and_then(|l| l.local_addr().ok()),
            };
            let for_ready = opened.clone();
            tokio::task::spawn_blocking(move || ready(&for_ready, bound))
                .await
                .map_err(|_| StartError::Ready("a start-up task panicked".into()))?
                .map_err(StartError::Ready)?;
        }
        serve(listener, http, kubernetes, metrics, opened, stop).await
    });
    drop(rt);
    served
}

/// What a started server runs on.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The seal (and through it, the keyring).
    pub seal: Arc<SealManager>,
    /// The audit log.
    pub audit: AuditLog,
    /// The TLS configuration (`None`: plaintext loopback).
    pub tls: Option<Arc<ServerTls>>,
    /// How often the TLS files are checked for changes.
    pub tls_reload_check: std::time::Duration,
    /// Who holds which role.
    pub roles: Arc<Roles>,
    /// The limit on failed unseal shares.
    pub unseal_limit: UnsealLimit,
    /// Seconds between keyring maintenance runs.
    pub maintenance_interval: std::time::Duration,
    /// `[limits]`.
    pub limits: Limits,
    /// The level of the line each served call writes.
    pub request_log: tracing::Level,
    /// Where the Prometheus endpoint is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// `[audit]` retention, if any.
    pub retention: Option<crate::audit::archive::RetentionPolicy>,
    /// The store file, if it is one (its size and free space are watched).
    pub store_path: Option<std::path::PathBuf>,
    /// `[http]`: the Vault-compatible HTTPS front, if on.
    pub http: Option<crate::http::config::HttpSettings>,
    /// `[kubernetes_kms]`: the Kubernetes KMS v2 plugin, if on.
    pub kubernetes: Option<crate::kubernetes::KubernetesSettings>,
}

/// Loads the TLS files, opens the HSM, the store, the audit log and the seal manager.
/// Blocking.
pub fn open(config: &Config) -> Result<Opened, StartError> {
    let tls = match &config.tls {
        Some(files) => {
            let tls = ServerTls::load(files.clone())?;
            tracing::info!(cert = %files.cert.display(), client_ca = %files.client_ca.display(), "TLS certificate and client CA bundle loaded");
            Some(Arc::new(tls))
        }
        None => {
            tracing::warn!(
                "PLAINTEXT gRPC on loopback (tls.plaintext_loopback): no TLS, no client certificates; every caller is the principal `loopback`. Development only."
            );
            None
        }
    };
    if config.roles.admin.is_empty() {
        tracing::warn!(
            "[roles] admin names no one: keys, grants and the seal cannot be administered"
        );
    }
    let hsm = Arc::new(Hsm::open(&config.hsm)?);
    tracing::info!(token = hsm.token_label(), "HSM token opened and logged in");
    let store = config.storage.open(crate::engines::tables())?;
    if store
        .get(crate::store::SYSTEM, crate::backup::RESTORE_MARKER)?
        .is_some()
    {
        return Err(StartError::RestoreInterrupted);
    }
    match config.storage.file() {
        Some(path) => tracing::info!(path = %path.display(), "store opened"),
        None => tracing::info!("database connected, schema current"),
    }
    let signer = Arc::new(Signer::new(Arc::clone(&hsm)));
    let audit = AuditLog::open(store.clone(), signer, config.checkpoints)?;
    let seal = Arc::new(SealManager::load(
        hsm,
        store,
        audit.clone(),
        config.engines,
    )?);
    let status = seal.status();
    tracing::info!(
        initialized = status.initialized,
        sealed = status.sealed,
        "seal state loaded"
    );
    Ok(Opened {
        seal,
        audit,
        tls,
        tls_reload_check: config.tls_reload_check,
        roles: Arc::new(config.roles.clone()),
        unseal_limit: config.unseal_limit,
        maintenance_interval: config.maintenance_interval,
        limits: config.limits,
        request_log: config.log.requests,
        metrics_listen: config.metrics_listen,
        retention: config.retention.clone(),
        store_path: config.storage.file().map(std::path::Path::to_owned),
        http: config.http.clone(),
        kubernetes: config.kubernetes.clone(),
    })
}

/// The seal state, key count and how far the keyring is behind the shared store, read for
/// a metrics scrape. Takes no lock a ceremony holds (an unseal loading every key, a
/// rotation waiting on the store): the seal state is the one published to watchers, the
/// keyring the published one.
fn live(seal: &SealManager) -> crate::metrics::Live {
    let keyring = seal.keyring().ok();
    let following = keyring.as_ref().map(|k| k.following());
    crate::metrics::Live {
        sealed: !seal.is_unsealed(),
        keys: keyring.as_ref().map_or(0, |k| k.key_count()),
        tampered: keyring.as_ref().map_or(0, |k| k.tampered_records()),
        unapplied: following.map_or(0, |f| f.unapplied),
        behind: following.is_some_and(|f| f.behind),
        irrevocable: seal.databases().map_or(0, |d| d.irrevocable()),
    }
}

/// Binds the listen address; call it once the server is ready to serve. The bound address is printed on stdout as
/// `kms listening on ADDR` (tests and scripts read it; port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    crate::node::bound(local);
    println!("kms listening on {local}");
    tracing::info!(addr = %local, "listening");
    Ok(listener)
}

/// Serves the gRPC API on `listener` (TLS unless the configuration opted out), the
/// Vault-compatible HTTPS front on `http` (with `[http]` and TLS), and the metrics on
/// `metrics` when given, until `shutdown` completes, then seals. While unsealed,
/// a maintenance task rotates keys whose period is due and destroys versions whose
/// destruction time has come, every `maintenance_interval`. The TLS files are reloaded on
/// SIGHUP and when they change. Beside the API: the standard health service (the server
/// `SERVING`; `kms.v1.KeyManagement` `SERVING` only while unsealed) and server reflection.
pub(crate) async fn serve(
    listener: TcpListener,
    http: Option<TcpListener>,
    kubernetes: Option<crate::kubernetes::Socket>,
    metrics: Option<TcpListener>,
    opened: Opened,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let ctx = Service {
        seal: Arc::clone(&opened.seal),
        audit: opened.audit.clone(),
        roles: Arc::clone(&opened.roles),
        unseal_limiter: Arc::new(FailureLimiter::new(opened.unseal_limit)),
        request_log: opened.request_log,
        issuer_base: match (&opened.http, &http) {
            (Some(settings), Some(listener)) => settings
                .public_url
                .clone()
                // A wildcard address is no place a client can reach: no default then.
                .or_else(|| {
                    listener
                        .local_addr()
                        .ok()
                        .filter(|a| !a.ip().is_unspecified())
                        .map(|a| format!("https://{a}"))
                })
                .map(Arc::from),
            _ => None,
        },
    };
    let seal = Arc::clone(&opened.seal);
    let limits = opened.limits;
    let gate_state = Arc::new(crate::grpc::gate::GateState::new(
        opened.audit.clone(),
        Arc::clone(&opened.roles),
        &limits,
    ));
    let gate = crate::grpc::gate::GateLayer::new(Arc::clone(&gate_state));
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = reflection()?;
    let reflection_v1alpha = reflection_v1alpha()?;
    let (stop_rx, deadline) = stop_plan(shutdown);
    let background = Background::start(&opened, &gate_state, &health, metrics, &stop_rx);
    let caps = connection_caps(&limits);
    let admission = crate::access::tls::Admission::new(limits, caps);
    let http = match (http, &opened.http, &opened.tls) {
        (Some(listener), Some(settings), Some(tls)) => {
            let front = crate::http::Front::new(ctx.clone(), settings, Arc::clone(&gate_state));
            Some(tokio::spawn(crate::http::serve(
                listener,
                Arc::clone(tls),
                limits,
                admission.clone(),
                front,
                stopped(stop_rx.clone()),
            )))
        }
        _ => None,
    };
    let kubernetes = match (kubernetes, &opened.kubernetes) {
        (Some(socket), Some(settings)) => Some(tokio::spawn(crate::kubernetes::serve(
            socket,
            ctx.clone(),
            settings.key.clone(),
            stopped(stop_rx.clone()),
        ))),
        _ => None,
    };
    let incoming = crate::access::tls::incoming(
        listener,
        opened.tls.clone(),
        limits,
        admission,
        crate::access::tls::Protocol::Grpc,
    );
    // A connection is asked to close (GOAWAY) at `max_connection_age`, so a removed CA or
    // an expired certificate loses its open connections in a bounded time; calls in flight
    // may finish, and the connection is closed 30 s later whatever they do (`tls::Conn`).
    // (Not tonic's `max_connection_age_grace`: with it set, tonic 0.14 skips the GOAWAY and
    // only closes at age + grace.) Idle peers are probed and dropped when they do not answer.
    let serving = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_connection_age(limits.max_connection_age)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .layer(gate)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(SystemServer::new(SystemService::new(ctx.clone())))
        .add_service(
            KeyManagementServer::new(KeyManagementService::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AuditServer::new(AuditService::new(ctx.clone())))
        .add_service(AccessServer::new(AccessService::new(ctx.clone())))
        .add_service(
            SecretsServer::new(crate::grpc::SecretsService::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(CredentialsServer::new(
            crate::grpc::CredentialsService::new(ctx.clone()),
        ))
        .add_service(DatabasesServer::new(crate::grpc::DatabasesService::new(
            ctx,
        )))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx));
    let result = tokio::select! {
        r = serving => r.map_err(StartError::Serve),
        () = deadline => Ok(()),
    };
    if let Some(http) = http {
        // It stops with the gRPC server (the same signal); what it has in flight is cut.
        http.abort();
        let _ = http.await;
    }
    if let Some(kubernetes) = kubernetes {
        // Stopping with the gRPC server; its socket file is removed as it ends.
        kubernetes.abort();
        let _ = kubernetes.await;
    }
    background.stop().await;
    // The calls counted since the last summary are recorded before the log stops.
    gate_state.record_counts().await;
    // Forget every key byte before the process exits.
    let _ = seal.seal();
    // End the audit writer (it holds the HSM) before the process exits; the caller drops
    // the runtime, and with it the last reference to the HSM, which finalises the module.
    opened.audit.stop();
    tracing::info!("sealed and stopped");
    result
}

/// On `shutdown`, the server stops accepting and lets calls in flight finish, but waits at
/// most [`SHUTDOWN_GRACE`] for clients that keep idle connections open. Returns the stop
/// signal (`true` once `shutdown` completed) and the deadline: a future that completes
/// `SHUTDOWN_GRACE` after it.
fn stop_plan(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (tokio::sync::watch::Receiver<bool>, impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace_rx = stop_rx.clone();
    let deadline = async move {
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let grace = async move {
            stopped(grace_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::warn!("clients did not close their connections in time: stopping anyway");
        };
        tokio::join!(signal, grace);
    };
    (stop_rx, deadline)
}

/// Completes once `rx` says the server is stopping.
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopped| *stopped).await;
}

/// The tasks beside the gRPC server: keyring maintenance, TLS reload, the health statuses,
/// the probe summaries, and the metrics listener.
struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    metrics: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Background {
    fn start(
        opened: &Opened,
        gate: &Arc<crate::grpc::gate::GateState>,
        health: &tonic_health::server::HealthReporter,
        metrics: Option<TcpListener>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let seal = &opened.seal;
        let mut tasks = vec![
            tokio::spawn(maintain(Arc::clone(seal), opened.maintenance_interval)),
            tokio::spawn(record_counts(Arc::clone(gate))),
            tokio::spawn(report_health(health.clone(), seal.watch_unsealed())),
            tokio::spawn(report_hsm(health.clone(), Arc::clone(seal))),
            tokio::spawn(keep_storage(
                opened.audit.clone(),
                opened.retention.clone(),
                opened.store_path.clone(),
            )),
        ];
        if let Some(t) = opened.tls.clone() {
            tasks.push(tokio::spawn(t.watch(opened.tls_reload_check)));
        }
        if let Some(changes) = seal.changes() {
            tasks.push(tokio::spawn(follow_changes(Arc::clone(seal), changes)));
        }
        // Load balancers see the server leave before it stops answering.
        let (leaving, leaving_health) = (stop.clone(), health.clone());
        tasks.push(tokio::spawn(async move {
            stopped(leaving).await;
            leaving_health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }));
        let metrics = metrics.map(|listener| {
            crate::metrics::metrics().limits_known(LimitKind::ALL);
            let seal = Arc::clone(seal);
            tokio::spawn(crate::metrics::serve(
                listener,
                move || live(&seal),
                stopped(stop.clone()),
            ))
        });
        Self { tasks, metrics }
    }

    /// Ends the tasks; lets the metrics listener finish its answers in flight.
    async fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
        if let Some(m) = self.metrics {
            let _ = m.await;
        }
    }
}

/// How long shutdown waits for calls in flight and open connections.
pub(crate) const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The largest header block a client may send (request id, path, grpc headers).
pub(crate) const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The largest gRPC request: a batch of 64 KiB items.
pub(crate) const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

// The HTTPS front's largest body is this largest message in base64, and room for its JSON.
const _: () = assert!(crate::http::MAX_BODY == MAX_MESSAGE_BYTES / 3 * 4 + 64 * 1024);

/// Watches the store's size and free space (metrics; a warning under 10% free) and, with
/// `[audit]` retention, archives the records past the window, forever (the caller aborts
/// it).
async fn keep_storage(
    audit: AuditLog,
    retention: Option<crate::audit::archive::RetentionPolicy>,
    store_path: Option<std::path::PathBuf>,
) {
    let every = retention
        .as_ref()
        .map_or(STORAGE_CHECK, |p| p.check_every.min(STORAGE_CHECK));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_archive: Option<std::time::Instant> = None;
    let mut alarm = SpaceAlarm::default();
    loop {
        tick.tick().await;
        let due = retention.as_ref().filter(|p| {
            last_archive
                .is_none_or(|t| t.elapsed() + std::time::Duration::from_millis(50) >= p.check_every)
        });
        if due.is_some() {
            last_archive = Some(std::time::Instant::now());
        }
        let (audit, due, path) = (audit.clone(), due.cloned(), store_path.clone());
        let space = tokio::task::spawn_blocking(move || {
            if let Some(policy) = due
                && let Err(e) = audit.archive_due(&policy, MAX_SEGMENTS_PER_RUN)
            {
                tracing::warn!(error = %crate::error_chain(&e), "audit retention: nothing more archived this time; the records stay in the store");
            }
            path.and_then(|p| storage_metrics(&p))
        })
        .await;
        if let Ok(Some((free, total))) = space {
            match alarm.check(free, total, std::time::Instant::now()) {
                Some(SpaceNote::Low) => tracing::warn!(
                    free_bytes = free,
                    total_bytes = total,
                    "the store's file system is over 90% full: when it fills, the audit log fails closed and every call is refused. Free space, or set [audit] retention (docs/operations.md); said again hourly while it lasts"
                ),
                Some(SpaceNote::Recovered) => tracing::info!(
                    free_bytes = free,
                    total_bytes = total,
                    "the store's file system has more than 10% free again"
                ),
                None => {}
            }
        }
    }
}

/// When the store's free space is worth a log line: on falling under 10% free, then once
/// an hour while it stays under (the metric says it every minute), and once when it is
/// over again. Checked every minute or more often, a warning each time was noise.
#[derive(Debug, Default)]
struct SpaceAlarm {
    /// When the last warning was logged, while space is low.
    warned: Option<std::time::Instant>,
}

/// What [`SpaceAlarm::check`] says to log.
#[derive(Debug, PartialEq, Eq)]
enum SpaceNote {
    Low,
    Recovered,
}

impl SpaceAlarm {
    const REPEAT: std::time::Duration = std::time::Duration::from_secs(3600);

    fn check(&mut self, free: u64, total: u64, now: std::time::Instant) -> Option<SpaceNote> {
        let low = total > 0 && free.saturating_mul(10) < total;
        match (low, self.warned) {
            (true, Some(t)) if now.saturating_duration_since(t) < Self::REPEAT => None,
            (true, _) => {
                self.warned = Some(now);
                Some(SpaceNote::Low)
            }
            (false, Some(_)) => {
                self.warned = None;
                Some(SpaceNote::Recovered)
            }
            (false, None) => None,
        }
    }
}

/// How often the store's size and free space are read.
const STORAGE_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// Segments archived per retention run at most (the next run goes on).
const MAX_SEGMENTS_PER_RUN: usize = 16;

/// Sets the store size and free space metrics; returns the file system's free and total
/// bytes (what [`SpaceAlarm`] judges), if it could read them.
fn storage_metrics(store: &std::path::Path) -> Option<(u64, u64)> {
    let metrics = crate::metrics::metrics();
    if let Ok(meta) = std::fs::metadata(store) {
        metrics
            .store_bytes
            .set(i64::try_from(meta.len()).unwrap_or(i64::MAX));
    }
    let dir = store.parent().unwrap_or(std::path::Path::new("."));
    let fs = rustix::fs::statvfs(dir).ok()?;
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    metrics
        .store_free_bytes
        .set(i64::try_from(free).unwrap_or(i64::MAX));
    Some((free, total))
}

/// The first wait before changes that could not be applied are tried again; it doubles
/// after each failed attempt, up to [`FOLLOW_RETRY_MAX`].
const FOLLOW_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(250);

/// The longest wait between two attempts at changes that could not be applied.
const FOLLOW_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(4);

/// At most one reload of everything per this long (a flood of notifications, from any
/// database role, collapses into resyncs: see `store::ChangeFeed`).
const RESYNC_SPACING: std::time::Duration = std::time::Duration::from_secs(1);

/// When the follow task next tries the changes that wait.
#[derive(Debug)]
struct FollowSchedule {
    /// The wait after the next failed attempt.
    retry: std::time::Duration,
    /// No attempt before this (after a failure: the backoff).
    not_before: std::time::Instant,
    /// When the last attempt ended.
    last_end: Option<std::time::Instant>,
    /// When the last reload of everything started.
    last_resync: Option<std::time::Instant>,
    /// Changes were heard since the last attempt started.
    news: bool,
}

impl FollowSchedule {
    fn new(now: std::time::Instant) -> Self {
        Self {
            retry: FOLLOW_RETRY_FIRST,
            not_before: now,
            last_end: None,
            last_resync: None,
            news: false,
        }
    }

    /// When to try `waiting`: at once, unless the last attempt failed (then after the
    /// backoff, or [`FOLLOW_RETRY_FIRST`] after it when new changes were heard), and never
    /// a resync sooner than [`RESYNC_SPACING`] after the last.
    fn at(&self, waiting: &std::collections::BTreeSet<crate::store::Change>) -> std::time::Instant {
        let mut at = self.not_before;
        if self.news
            && let Some(end) = self.last_end
        {
            at = at.min(end + FOLLOW_RETRY_FIRST);
        }
        if waiting.contains(&crate::store::Change::Resync)
            && let Some(last) = self.last_resync
        {
            at = at.max(last + RESYNC_SPACING);
        }
        at
    }

    fn started(&mut self, now: std::time::Instant, resync: bool) {
        if resync {
            self.last_resync = Some(now);
        }
        self.news = false;
    }

    fn ended(&mut self, now: std::time::Instant, failed: bool) {
        self.last_end = Some(now);
        if failed {
            self.not_before = now + self.retry;
            self.retry = self.retry.saturating_mul(2).min(FOLLOW_RETRY_MAX);
        } else {
            self.not_before = now;
            self.retry = FOLLOW_RETRY_FIRST;
        }
    }
}

/// Applies the changes other servers sharing the store commit, as they are heard, forever
/// (the caller aborts it). Each change is noted by the keyring the moment it is heard
/// (`Keyring::heard`: a live grant it names is suspended, and its key is refused if it is
/// not applied soon), even while an earlier attempt runs; what arrives meanwhile is tried
/// next. A change that could not be applied is kept and tried again, with backoff, until
/// it is (`keyring_follow_failures_total` counts the failed attempts; the keyring logs the
/// start and the end of a period behind).
async fn follow_changes(seal: Arc<SealManager>, mut feed: crate::store::ChangeFeed) {
    use crate::store::Change;
    let mut waiting = std::collections::BTreeSet::new();
    let mut schedule = FollowSchedule::new(std::time::Instant::now());
    let hear = |news: Vec<Change>,
                waiting: &mut std::collections::BTreeSet<Change>,
                schedule: &mut FollowSchedule| {
        seal.heard(&news);
        waiting.extend(news);
        bound_waiting(waiting);
        schedule.news = true;
    };
    loop {
        let now = std::time::Instant::now();
        let at = (!waiting.is_empty()).then(|| schedule.at(&waiting));
        if at.is_none_or(|at| at > now) {
            let news = match at {
                None => feed.next().await,
                Some(at) => tokio::select! {
                    news = feed.next() => news,
                    () = tokio::time::sleep_until(at.into()) => Some(Vec::new()),
                },
            };
            let Some(news) = news else { return };
            if !news.is_empty() {
                hear(news, &mut waiting, &mut schedule);
            }
            continue;
        }
        let batch: Vec<Change> = std::mem::take(&mut waiting).into_iter().collect();
        schedule.started(now, batch.contains(&Change::Resync));
        let attempt = tokio::task::spawn_blocking({
            let (seal, batch) = (Arc::clone(&seal), batch.clone());
            move || seal.follow(&batch)
        });
        tokio::pin!(attempt);
        let mut open = true;
        let left = loop {
            tokio::select! {
                done = &mut attempt => break done.unwrap_or(batch),
                news = feed.next(), if open => match news {
                    Some(news) => hear(news, &mut waiting, &mut schedule),
                    None => open = false,
                },
            }
        };
        let failed = !left.is_empty();
        if failed {
            crate::metrics::metrics().keyring_follow_failures.inc();
        }
        waiting.extend(left);
        bound_waiting(&mut waiting);
        schedule.ended(std::time::Instant::now(), failed);
        if !open {
            return;
        }
    }
}

/// Keeps the changes waiting to be applied bounded whatever a flood of notifications
/// brings (any role with CONNECT can send them): past [`crate::store::MAX_HINTS`], or once a
/// resync waits, one resync stands for them all (it re-reads everything, the seal record
/// too; every change was already heard, so the keys concerned stay refused until then).
fn bound_waiting(waiting: &mut std::collections::BTreeSet<crate::store::Change>) {
    use crate::store::Change;
    if waiting.len() > crate::store::MAX_HINTS
        || (waiting.len() > 1 && waiting.contains(&Change::Resync))
    {
        waiting.clear();
        waiting.insert(Change::Resync);
    }
}

/// Records the calls the gate counted (health probes, and Status and WhoAmI without a
/// certificate) every minute, forever (the caller aborts it).
async fn record_counts(gate: Arc<crate::grpc::gate::GateState>) {
    let mut tick = tokio::time::interval(COUNT_SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        gate.record_counts().await;
    }
}

/// How often the counted calls are recorded (in one record per kind, method and source).
const COUNT_SUMMARY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The bounds on client connections under this process's open-file limit (which the `kms`
/// binary raised to its hard limit before the server started), said in the log and the
/// metrics.
fn connection_caps(limits: &Limits) -> crate::access::limiter::ConnectionCaps {
    let open_files = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| crate::access::limiter::open_file_limit(&text));
    let caps = limits.connection_caps(open_files);
    crate::metrics::metrics()
        .open_files_limit
        .set(open_files.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    tracing::info!(
        open_files =
            open_files.map_or_else(|| "unlimited or unknown".to_owned(), |n| n.to_string()),
        max_connections = caps.total,
        max_connections_per_address = caps.per_address,
        max_anonymous_connections = caps.anonymous,
        max_anonymous_connections_per_address = caps.anonymous_per_address,
        anonymous_idle_timeout_seconds = limits.anonymous_idle_timeout.as_secs(),
        "client connection limits"
    );
    if caps.over_open_files {
        tracing::warn!(
            open_files,
            max_connections = caps.total,
            reserved = crate::access::limiter::FILES_RESERVED,
            "[limits] max_connections leaves fewer than the reserved open files for the store, the HSM and the database: raise the open-file limit (LimitNOFILE) or lower max_connections"
        );
    }
    caps
}

/// Keeps the health service's statuses true: the server and the services that work sealed
/// are `SERVING`; `kms.v1.KeyManagement` and `kms.v1.Secrets` are `SERVING` only while
/// unsealed.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    mut unsealed: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    for service in ["", "kms.v1.System", "kms.v1.Audit", "kms.v1.Access"] {
        health.set_service_status(service, Serving).await;
    }
    loop {
        let status = if *unsealed.borrow_and_update() {
            Serving
        } else {
            NotServing
        };
        for service in ["kms.v1.KeyManagement", "kms.v1.Secrets"] {
            health.set_service_status(service, status).await;
        }
        if unsealed.changed().await.is_err() {
            return;
        }
    }
}

/// The health service's name for the HSM: `SERVING` while it answers.
pub const HSM_HEALTH: &str = "kms.hsm";

/// Keeps [`HSM_HEALTH`] true, and while the HSM is unavailable tries to recover it every
/// second (so its return is seen without waiting for a call that needs it).
async fn report_hsm(health: tonic_health::server::HealthReporter, seal: Arc<SealManager>) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let mut available = seal.watch_hsm();
    loop {
        let up = *available.borrow_and_update();
        health
            .set_service_status(HSM_HEALTH, if up { Serving } else { NotServing })
            .await;
        if up {
            if available.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let s = Arc::clone(&seal);
        let _ = tokio::task::spawn_blocking(move || s.recover_hsm()).await;
    }
}

/// The reflection service (v1) over every kms service and the health service.
fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    StartError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Ready(Box::new(e)))
}

/// The same under its older name, `v1alpha`, which grpcio-reflection and older grpcurl
/// versions call.
fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    StartError,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kms_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| StartError::Ready(Box::new(e)))
}

/// Runs every engine's maintenance forever (the caller aborts it): each engine, in the
/// order listed, does what is due and logs it (`Engine::maintain`), on a blocking thread.
async fn maintain(seal: Arc<SealManager>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(engines) = seal.engines() else {
            continue;
        };
        let _ = tokio::task::spawn_blocking(move || {
            for engine in engines {
                engine.maintain(crate::keyring::now());
            }
        })
        .await;
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: call it before `bind` prints "kms listening", so that a
/// SIGTERM sent as soon as the server says it listens seals and stops it cleanly instead of
/// killing it. Must be called inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot install the SIGTERM/SIGINT handlers: waiting for Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutdown signal received");
    }
}

#[cfg(test)]
mod tests {
    use super::{
        FOLLOW_RETRY_FIRST, FOLLOW_RETRY_MAX, FollowSchedule, RESYNC_SPACING, SpaceAlarm, SpaceNote,
    };
    use crate::store::Change;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    /// Failed changes are tried again with a doubling backoff, new changes are not held up
    /// by a long one, and reloads of everything are spaced.
    #[test]
    fn unapplied_changes_are_retried_with_backoff_and_resyncs_are_spaced() {
        let t0 = Instant::now();
        let key: BTreeSet<Change> = [Change::Entry(crate::keyring::KEYS, "a".into())].into();
        let resync: BTreeSet<Change> = [Change::Resync].into();
        let mut s = FollowSchedule::new(t0);
        assert_eq!(s.at(&key), t0);
        let mut end = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            s.started(end, false);
            s.ended(end, true);
            waits.push(s.at(&key) - end);
            end = s.at(&key);
        }
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 4000].map(Duration::from_millis)
        );
        assert_eq!(waits.first(), Some(&FOLLOW_RETRY_FIRST));
        assert_eq!(waits.last(), Some(&FOLLOW_RETRY_MAX));
        // A change heard during a long backoff is tried soon after the last attempt.
        s.news = true;
        assert_eq!(s.at(&key), end - FOLLOW_RETRY_MAX + FOLLOW_RETRY_FIRST);
        // Success: at once again, and the backoff starts over.
        s.started(end, true);
        s.ended(end, false);
        assert_eq!(s.at(&key), end);
        assert_eq!(s.retry, FOLLOW_RETRY_FIRST);
        // A resync right after one waits for the spacing.
        assert_eq!(s.at(&resync), end + RESYNC_SPACING);
    }

    /// Low space is said when it starts, then hourly, not at every check; its end once.
    #[test]
    fn the_free_space_warning_is_not_repeated_at_every_check() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut a = SpaceAlarm::default();
        // Exactly 10% free is not low; an unreadable (zero) total never is.
        assert_eq!(a.check(10, 100, at(0)), None);
        assert_eq!(a.check(0, 0, at(0)), None);
        assert_eq!(a.check(50, 100, at(0)), None);
        assert_eq!(a.check(5, 100, at(60)), Some(SpaceNote::Low));
        for s in (120..3660).step_by(60) {
            assert_eq!(a.check(5, 100, at(s)), None, "at {s} s");
        }
        assert_eq!(a.check(5, 100, at(3660)), Some(SpaceNote::Low));
        assert_eq!(a.check(5, 100, at(3720)), None);
        assert_eq!(a.check(50, 100, at(3780)), Some(SpaceNote::Recovered));
        assert_eq!(a.check(50, 100, at(3840)), None);
        // Low again: said at once, not an hour after the last warning.
        assert_eq!(a.check(5, 100, at(3900)), Some(SpaceNote::Low));
    }
}
