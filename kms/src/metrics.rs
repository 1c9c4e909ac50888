//! Prometheus metrics (docs/operations.md): what the server counts and times, and the
//! listener that serves them.
//!
//! The metrics are process-wide (one server per process), kept with the Prometheus
//! project's own client, and served as OpenMetrics text on their own plaintext listener
//! (`[metrics] listen`, off by default), never on the gRPC port.
//!
//! **Invariant:** no label holds caller-controlled text. Services and methods are labelled
//! only when the API defines them (from the compiled descriptors, plus the health and
//! reflection services); anything else is `unknown`. No key name, principal, address or
//! payload is a label or a value.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

/// A call's service, method and status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    service: String,
    method: String,
    code: &'static str,
}

/// A call's service and method.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodLabels {
    service: String,
    method: String,
}

/// A `[limits]` limit, by its key.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LimitLabels {
    limit: &'static str,
}

/// One kind of HSM operation (`encrypt`, `sign`, `find`, ...).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HsmLabels {
    operation: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The kinds of HSM operation (`Hsm::with_session`'s names).
const HSM_OPERATIONS: [&str; 10] = [
    "login",
    "logout",
    "find",
    "encrypt",
    "decrypt",
    "sign",
    "generate",
    "list",
    "destroy",
    "attributes",
];

/// Every metric the server keeps.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<MethodLabels>,
    /// Seconds to chain and durably write one group of records.
    pub(crate) audit_commit_duration: Histogram,
    /// Records made durable.
    pub(crate) audit_records: Counter,
    /// Records that could not be made durable (their calls were refused).
    pub(crate) audit_write_failures: Counter,
    /// Records per durable commit.
    pub(crate) audit_commit_batch: Histogram,
    /// Records archived to segments and removed from the store.
    pub(crate) audit_archived_records: Counter,
    /// The store file's size.
    pub(crate) store_bytes: Gauge,
    /// Free space where the store lives.
    pub(crate) store_free_bytes: Gauge,
    hsm_duration: HistogramFamily<HsmLabels>,
    hsm_errors: Family<HsmLabels, Counter>,
    /// PKCS#11 sessions taken from the pool.
    pub(crate) hsm_sessions_in_use: Gauge,
    /// PKCS#11 sessions in the pool (`[hsm] sessions`).
    pub(crate) hsm_sessions: Gauge,
    /// 1 while the HSM answers, 0 from a session or handle failure until it recovers.
    pub(crate) hsm_available: Gauge,
    sealed: Gauge,
    keys: Gauge,
    /// Key and grant records that failed authentication in the keyring's last walk.
    keyring_tampered_records: Gauge,
    /// Database leases whose revocation the database refused too often.
    database_leases_irrevocable: Gauge,
    /// Changes other servers made that this one heard of and has not applied.
    keyring_changes_unapplied: Gauge,
    /// 1 while this server refuses keys because it has not applied another server's change.
    keyring_behind: Gauge,
    /// Attempts to apply other servers' changes that left some unapplied.
    pub(crate) keyring_follow_failures: Counter,
    /// Times the change feed held more distinct hints than its bound (a resync instead).
    pub(crate) change_feed_overflows: Counter,
    limit_reached: Family<LimitLabels, Counter>,
    /// Client connections open on the gRPC listener (handshakes included).
    pub(crate) connections: Gauge,
    /// Of those, connections without a client certificate.
    pub(crate) anonymous_connections: Gauge,
    /// The process's soft open-file limit.
    pub(crate) open_files_limit: Gauge,
}

fn latency_histogram() -> Histogram {
    // 50 us to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.5, 14))
}

impl Metrics {
    /// One function on purpose: it is the list of every metric, one registration each, read
    /// top to bottom against docs/operations.md's table.
    fn new() -> Self {
        let mut registry = Registry::with_prefix("kms");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC calls answered, by service, method and status code",
            requests.clone(),
        );
        let request_duration: HistogramFamily<MethodLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from a call's arrival to its answer",
            Unit::Seconds,
            request_duration.clone(),
        );
        let audit_commit_duration = latency_histogram();
        registry.register_with_unit(
            "audit_commit_duration",
            "Time to chain and durably write one group of audit records (with the changes they record)",
            Unit::Seconds,
            audit_commit_duration.clone(),
        );
        let audit_records = Counter::default();
        registry.register(
            "audit_records",
            "Audit records made durable",
            audit_records.clone(),
        );
        let audit_write_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Audit records that could not be made durable: their calls were refused UNAVAILABLE",
            audit_write_failures.clone(),
        );
        let audit_commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "audit_commit_batch_size",
            "Audit records per durable commit (group commit)",
            audit_commit_batch.clone(),
        );
        let audit_archived_records = Counter::default();
        registry.register(
            "audit_archived_records",
            "Audit records archived to segment files and removed from the store",
            audit_archived_records.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register_with_unit(
            "store",
            "The store file's size",
            Unit::Bytes,
            store_bytes.clone(),
        );
        let store_free_bytes = Gauge::default();
        registry.register_with_unit(
            "store_free",
            "Free space on the store's file system (for unprivileged writers)",
            Unit::Bytes,
            store_free_bytes.clone(),
        );
        let hsm_duration: HistogramFamily<HsmLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "hsm_operation_duration",
            "Time of one PKCS#11 operation, by kind",
            Unit::Seconds,
            hsm_duration.clone(),
        );
        let hsm_errors = Family::<HsmLabels, Counter>::default();
        // Every kind exists from the start at 0, so an alert on its rate has a series.
        for operation in HSM_OPERATIONS {
            drop(hsm_errors.get_or_create(&HsmLabels { operation }));
        }
        registry.register(
            "hsm_errors",
            "PKCS#11 operations the module failed (not wrong ciphertexts), by kind",
            hsm_errors.clone(),
        );
        let hsm_sessions_in_use = Gauge::default();
        registry.register(
            "hsm_sessions_in_use",
            "PKCS#11 sessions taken from the pool",
            hsm_sessions_in_use.clone(),
        );
        let hsm_sessions = Gauge::default();
        registry.register(
            "hsm_sessions",
            "PKCS#11 sessions in the pool ([hsm] sessions)",
            hsm_sessions.clone(),
        );
        let hsm_available = Gauge::default();
        hsm_available.set(1);
        registry.register(
            "hsm_available",
            "1 while the HSM answers, 0 from a session or handle failure until kms has recovered (reopened its sessions, logged in, found its keys again)",
            hsm_available.clone(),
        );
        let sealed = Gauge::default();
        registry.register(
            "sealed",
            "1 while the server is sealed (or not initialised), 0 while unsealed",
            sealed.clone(),
        );
        let keys = Gauge::default();
        registry.register(
            "keys",
            "Keys in the keyring as its verification walk counted them, plus those created since (0 while sealed)",
            keys.clone(),
        );
        let keyring_tampered_records = Gauge::default();
        registry.register(
            "keyring_tampered_records",
            "Key and grant records that failed authentication (the store was altered) in the keyring's last verification walk; each is refused",
            keyring_tampered_records.clone(),
        );
        let database_leases_irrevocable = Gauge::default();
        registry.register(
            "database_leases_irrevocable",
            "Database leases marked irrevocable: their login may still exist (kms lease list --irrevocable); alert on any",
            database_leases_irrevocable.clone(),
        );
        let keyring_changes_unapplied = Gauge::default();
        registry.register(
            "keyring_changes_unapplied",
            "Changes other servers sharing the store made that this server heard of and has not applied yet",
            keyring_changes_unapplied.clone(),
        );
        let keyring_behind = Gauge::default();
        registry.register(
            "keyring_behind",
            "1 while this server refuses keys (UNAVAILABLE) because it could not apply, or has not applied within 200 ms, another server's change to them",
            keyring_behind.clone(),
        );
        let keyring_follow_failures = Counter::default();
        registry.register(
            "keyring_follow_failures",
            "Attempts to apply other servers' changes that left some unapplied (retried with backoff)",
            keyring_follow_failures.clone(),
        );
        let change_feed_overflows = Counter::default();
        registry.register(
            "change_feed_overflows",
            "Times more distinct change notifications waited than the feed holds: everything was reloaded instead",
            change_feed_overflows.clone(),
        );
        let limit_reached = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_reached",
            "Connections closed and calls refused because a [limits] limit was reached, by its key",
            limit_reached.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Client connections open on the gRPC listener, handshakes included",
            connections.clone(),
        );
        let anonymous_connections = Gauge::default();
        registry.register(
            "anonymous_connections",
            "Client connections without a client certificate",
            anonymous_connections.clone(),
        );
        let open_files_limit = Gauge::default();
        registry.register(
            "open_files_limit",
            "The process's soft open-file limit (RLIMIT_NOFILE), 0 when unlimited or unknown",
            open_files_limit.clone(),
        );
        registry.register(
            "build",
            "The running kms version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry,
            requests,
            request_duration,
            audit_commit_duration,
            audit_records,
            audit_write_failures,
            audit_commit_batch,
            audit_archived_records,
            store_bytes,
            store_free_bytes,
            hsm_duration,
            hsm_errors,
            hsm_sessions_in_use,
            hsm_sessions,
            hsm_available,
            sealed,
            keys,
            keyring_tampered_records,
            database_leases_irrevocable,
            keyring_changes_unapplied,
            keyring_behind,
            keyring_follow_failures,
            change_feed_overflows,
            limit_reached,
            connections,
            anonymous_connections,
            open_files_limit,
        }
    }

    /// Counts a connection closed, or a call refused, by `limit`.
    pub(crate) fn limit_reached(&self, limit: impl LimitLabel) {
        self.limit_reached
            .get_or_create(&LimitLabels {
                limit: limit.label(),
            })
            .inc();
    }

    /// Makes every limit's count present, at 0, before any is reached (the server names
    /// them before it serves the metrics).
    pub(crate) fn limits_known(&self, limits: impl IntoIterator<Item = impl LimitLabel>) {
        for limit in limits {
            drop(self.limit_reached.get_or_create(&LimitLabels {
                limit: limit.label(),
            }));
        }
    }

    /// Counts and times one answered call. `service` and `method` are labelled only when
    /// the API defines them.
    pub(crate) fn request(&self, service: &str, method: &str, code: &'static str, took: Duration) {
        let (service, method) = if is_known(service, method) {
            (service.to_owned(), method.to_owned())
        } else {
            ("unknown".to_owned(), "unknown".to_owned())
        };
        self.request_duration
            .get_or_create(&MethodLabels {
                service: service.clone(),
                method: method.clone(),
            })
            .observe(took.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                service,
                method,
                code,
            })
            .inc();
    }

    /// Times one HSM operation; `failed` when the module failed it.
    pub(crate) fn hsm(&self, operation: &'static str, took: Duration, failed: bool) {
        let labels = HsmLabels { operation };
        self.hsm_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if failed {
            self.hsm_errors.get_or_create(&labels).inc();
        }
    }

    /// The exposition, with the seal state, key count and how far the keyring is behind
    /// the shared store as `live` reads them now.
    pub(crate) fn encode(&self, live: &Live) -> String {
        self.sealed.set(i64::from(live.sealed));
        self.keys.set(i64::try_from(live.keys).unwrap_or(i64::MAX));
        self.keyring_tampered_records
            .set(i64::try_from(live.tampered).unwrap_or(i64::MAX));
        self.keyring_changes_unapplied
            .set(i64::try_from(live.unapplied).unwrap_or(i64::MAX));
        self.keyring_behind.set(i64::from(live.behind));
        self.database_leases_irrevocable
            .set(i64::try_from(live.irrevocable).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A limit, as `kms_limit_reached_total` labels it (its `[limits]` key). The limits are
/// access control's; metrics takes them through this trait and imports nothing above it.
pub(crate) trait LimitLabel {
    /// The label value.
    fn label(self) -> &'static str;
}

/// What a scrape reads from the seal and the keyring at the moment it is made. Metrics
/// import neither: the server hands [`serve`] a function that reads them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Live {
    /// Sealed, or not initialised.
    pub(crate) sealed: bool,
    /// Keys in the keyring (0 while sealed).
    pub(crate) keys: usize,
    /// Records that failed authentication in the keyring's last verification walk.
    pub(crate) tampered: usize,
    /// Changes of a shared store heard and not applied yet.
    pub(crate) unapplied: usize,
    /// The keyring refuses calls until it has caught up.
    pub(crate) behind: bool,
    /// Database leases marked irrevocable, as the revoker last counted them.
    pub(crate) irrevocable: usize,
}

/// The process's metrics.
pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// Every `service/method` the server answers: the API's, from its descriptors, and the
/// standard health and reflection services'.
fn is_known(service: &str, method: &str) -> bool {
    known_rpc(service, method).is_some()
}

/// `service` and `method` as the server's own names when it answers that method (the API's,
/// from its descriptors, and the standard health and reflection services'); `None` for any
/// other.
pub(crate) fn known_rpc(service: &str, method: &str) -> Option<(&'static str, &'static str)> {
    /// Sorted, for a binary search.
    static KNOWN: LazyLock<Vec<(String, String)>> = LazyLock::new(|| {
        let mut known: Vec<(String, String)> = [
            ("grpc.health.v1.Health", "Check"),
            ("grpc.health.v1.Health", "Watch"),
            (
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo",
            ),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ),
            // The Kubernetes KMS plugin's socket (kube-apiserver's API).
            ("v2.KeyManagementService", "Status"),
            ("v2.KeyManagementService", "Encrypt"),
            ("v2.KeyManagementService", "Decrypt"),
        ]
        .map(|(s, m)| (s.to_owned(), m.to_owned()))
        .into();
        let set: prost_types::FileDescriptorSet =
            prost::Message::decode(kms_proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
        for file in &set.file {
            for s in &file.service {
                for m in &s.method {
                    known.push((
                        format!("{}.{}", file.package(), s.name()),
                        m.name().to_owned(),
                    ));
                }
            }
        }
        known.sort_unstable();
        known.dedup();
        known
    });
    let known: &'static [(String, String)] = &KNOWN;
    known
        .binary_search_by(|(s, m)| (s.as_str(), m.as_str()).cmp(&(service, method)))
        .ok()
        .and_then(|i| known.get(i))
        .map(|(s, m)| (s.as_str(), m.as_str()))
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; each scrape calls `live`
/// (on a blocking thread) for the seal and keyring state.
pub(crate) async fn serve(
    listener: TcpListener,
    live: impl Fn() -> Live + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let live = Arc::new(live);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let live = Arc::clone(&live);
            async move {
                let body = tokio::task::spawn_blocking(move || metrics().encode(&live()))
                    .await
                    .unwrap_or_default();
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener and says where (`kms metrics on ADDR`).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("kms metrics on http://{local}/metrics");
    tracing::info!(addr = %local, "metrics listening");
    Ok(listener)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apis_methods_become_labels() {
        assert!(is_known("kms.v1.KeyManagement", "Encrypt"));
        assert!(is_known("kms.v1.System", "Status"));
        assert!(is_known("grpc.health.v1.Health", "Check"));
        assert!(!is_known("kms.v1.KeyManagement", "Exfiltrate"));
        assert!(!is_known("<unknown service, 5000 bytes>", "Encrypt"));
        let m = Metrics::new();
        for i in 0..100 {
            m.request(
                "kms.v1.KeyManagement",
                &format!("Attack{i}"),
                "UNIMPLEMENTED",
                Duration::from_millis(1),
            );
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(!out.contains("Attack"), "{out}");
        assert!(
            out.contains(
                r#"kms_requests_total{service="unknown",method="unknown",code="UNIMPLEMENTED"} 100"#
            ),
            "{out}"
        );
        assert!(out.contains(r#"kms_build_info{version=""#), "{out}");
    }
}
