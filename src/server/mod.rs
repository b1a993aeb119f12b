//! The gateway server: binds every channel, assembles the services behind the
//! gate, serves until told to stop, then drains within a grace period.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = gridgate::config::Config::embedded_default()?;
//! let gateway = gridgate::server::Gateway::bind(config).await?;
//! for addr in gateway.local_addrs() {
//!     println!("listening on {addr}");
//! }
//! gateway.serve(gridgate::server::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

pub mod http2;
pub mod listener;
pub(crate) mod socket;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tonic::service::RoutesBuilder;

use crate::config::{AuthMethod, Config};
pub use crate::conn::{ConnInfo, Peer};
use crate::gate::{Gate, GateLayer};
use crate::layers::{deadline, observe, request_id, shed};
use crate::reapi::upstream::DispatchLayer;
pub use listener::BoundAddr;

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A channel could not be opened.
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    /// A subsystem could not be built from its config section.
    #[error("setting up {what}: {reason}")]
    Setup {
        /// The subsystem, e.g. `metrics` or `REAPI instances`.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The authorization section does not make a Gate (named with its file).
    #[error("{file}: {source}")]
    Gate {
        /// The config file.
        file: String,
        /// Why.
        source: crate::gate::GateError,
    },
    /// The web listener could not start.
    #[error(transparent)]
    Web(#[from] crate::web::WebError),
}

/// A gateway whose channels are bound and whose services are built.
pub struct Gateway {
    config: Arc<Config>,
    gate: Arc<Gate>,
    upstreams: Arc<crate::reapi::upstream::Upstreams>,
    channels: Vec<listener::BoundChannel>,
    routes: tonic::service::Routes,
    health: tonic_health::server::HealthReporter,
    /// What the health service said at bind time (SERVING unless JWKS key
    /// sets are still to be fetched).
    ready: bool,
    /// The metrics outputs, when the config asks for any.
    telemetry: Option<crate::metrics::Telemetry>,
    /// Sets the metrics that are read rather than counted.
    sample: Arc<dyn Fn() + Send + Sync>,
    /// The web listener, when `web:` is configured.
    web: Option<crate::web::WebServer>,
}

impl Gateway {
    /// Binds every channel and builds the services. Nothing is served until
    /// [`Gateway::serve`]; any problem (a port in use, a bad certificate) is
    /// reported here, before a single request is taken.
    pub async fn bind(config: Config) -> Result<Gateway, ServerError> {
        let gate = Arc::new(
            Gate::from_config(&config).map_err(|source| ServerError::Gate {
                file: config.source.clone(),
                source,
            })?,
        );
        let config = Arc::new(config);
        let mut channels = Vec::new();
        for c in &config.channels {
            channels.push(listener::BoundChannel::bind(c).await?);
        }

        let telemetry = crate::metrics::Telemetry::install(&config)
            .await
            .map_err(|e| ServerError::Setup {
                what: "metrics",
                reason: e.to_string(),
            })?;
        let (health, health_service) = tonic_health::server::health_reporter();
        // JWKS key sets are fetched once serving starts: NOT_SERVING until
        // they arrive (the readiness task reports the change).
        let ready = gate.subscribe_ready().is_none_or(|r| *r.borrow());
        if !ready {
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
        let mut served: Vec<&'static str> = vec!["grpc.health.v1.Health"];
        let mut routes = RoutesBuilder::default();
        routes.add_service(compressed!(health_service, config.compression));

        let reapi =
            crate::reapi::ReapiServices::new(&config.instances, &config.limits).map_err(|e| {
                ServerError::Setup {
                    what: "REAPI instances",
                    reason: e.to_string(),
                }
            })?;
        let reapi_instances = reapi.instances().clone();
        served.extend(reapi.add_to(&mut routes, config.compression));
        let upstreams = Arc::new(
            crate::reapi::upstream::Upstreams::new(&config.instances, &config.limits).map_err(
                |e| ServerError::Setup {
                    what: "upstream instances",
                    reason: e.to_string(),
                },
            )?,
        );
        let bes_error = |e: crate::bes::store::StoreError| ServerError::Setup {
            what: "the build event store (build-events)",
            reason: e.to_string(),
        };
        let changes = Arc::new(crate::web::live::Changes::default());
        let bes = match &config.web {
            None => crate::bes::BesServices::open(&config)
                .await
                .map_err(bes_error)?,
            // The web pages are told when an invocation gets new events.
            Some(_) => {
                let store = crate::bes::store::open(&config.build_events)
                    .await
                    .map_err(bes_error)?;
                let store = crate::web::live::Notifying::wrap(store, changes.clone());
                crate::bes::retention::spawn(&store, config.build_events_limits);
                crate::bes::BesServices::with_store(store, &config)
            }
        };
        let bes_store = bes.store();
        let web = match &config.web {
            None => None,
            Some(w) => Some(
                crate::web::WebServer::bind(
                    w,
                    gate.clone(),
                    bes_store.clone(),
                    changes,
                    Some(reapi_instances.clone()),
                )
                .await?,
            ),
        };
        served.extend(bes.add_to(&mut routes, config.compression));
        // Gauges and counters read from their owners before each push or scrape.
        let sampled_gate = gate.clone();
        let sample: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(jwt) = sampled_gate.jwt() {
                jwt.sample_metrics();
            }
            crate::metrics::bes_evictions(bes_store.backend(), bes_store.stats().evicted_streams);
            for name in reapi_instances.names() {
                if let Ok(instance) = reapi_instances.get(name) {
                    crate::metrics::cas_evictions(name, instance.store.evictions());
                }
            }
        });

        if config.server_reflection {
            served.push("grpc.reflection.v1.ServerReflection");
            served.push("grpc.reflection.v1alpha.ServerReflection");
            let reflection = || {
                let mut b = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
                for name in &served {
                    b = b.with_service_name(*name);
                }
                b
            };
            let setup = |e: tonic_reflection::server::Error| ServerError::Setup {
                what: "server reflection",
                reason: e.to_string(),
            };
            routes.add_service(compressed!(
                reflection().build_v1().map_err(setup)?,
                config.compression
            ));
            routes.add_service(compressed!(
                reflection().build_v1alpha().map_err(setup)?,
                config.compression
            ));
        }

        Ok(Gateway {
            config,
            gate,
            upstreams,
            channels,
            routes: routes.routes().prepare(),
            health,
            ready,
            telemetry,
            sample,
            web,
        })
    }

    /// The web listener's address, when `web:` is configured.
    pub fn web_addr(&self) -> Option<BoundAddr> {
        self.web.as_ref().map(|w| w.local_addr())
    }

    /// The Prometheus endpoint's address, when `metrics:` is configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.telemetry.as_ref().and_then(|t| t.prometheus_addr())
    }

    /// The addresses the channels listen on, in config order.
    pub fn local_addrs(&self) -> Vec<BoundAddr> {
        self.channels.iter().map(|c| c.addr.clone()).collect()
    }

    /// The health reporter (to mark services serving or not).
    pub fn health(&self) -> tonic_health::server::HealthReporter {
        self.health.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight
    /// RPCs finish for at most the configured grace period, and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Gateway {
            config,
            gate,
            upstreams,
            channels,
            routes,
            health,
            ready,
            telemetry,
            sample,
            web,
        } = self;
        let limits = &config.limits;

        for c in &channels {
            let security = match (c.is_tls(), c.mtls) {
                (true, true) => "TLS, client certificates required",
                (true, false) => "TLS",
                _ => "plaintext",
            };
            tracing::info!("listening on {} ({security})", c.addr);
        }
        if config.authorization.method == AuthMethod::None {
            let addrs: Vec<String> = channels.iter().map(|c| c.addr.to_string()).collect();
            tracing::warn!(
                "authorization is `none`: this endpoint is open, any client that can reach {} may call every RPC",
                addrs.join(", ")
            );
        }
        for (key, note) in &config.ignored {
            tracing::warn!("{}: {key}: not used by gridgate: {note}", config.source);
        }

        gate.start().await;
        let mut background: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        if config.authorization.jwks_required_at_start && gate.jwt().is_some_and(|j| !j.ready()) {
            for t in background {
                t.abort();
            }
            return Err(ServerError::Setup {
                what: "authorization.jwks-url",
                reason: "no usable key after the first fetch (see the warnings above) and \
                         jwks-required-at-start is true"
                    .into(),
            });
        }
        background.push(spawn_readiness(&gate, health.clone(), ready));
        if let Some(telemetry) = telemetry {
            if let Some(policy) = gate.policy() {
                crate::metrics::policy_version(None, policy.current().version());
            }
            background.extend(telemetry.start(sample));
        }
        // One reloader: SIGHUP and file changes, for the policy and every TLS channel.
        let mut live: Vec<Arc<dyn crate::live::Reload>> = Vec::new();
        if let Some(policy) = gate.policy() {
            live.push(policy.clone());
        }
        live.extend(
            channels
                .iter()
                .filter_map(|c| c.live_tls().map(|t| -> Arc<dyn crate::live::Reload> { t })),
        );
        background.push(crate::live::spawn_reloader(live));

        let labels = gate.clone();
        let stack = tower::ServiceBuilder::new()
            // Every request gets an id, on its audit line and its response.
            .layer(request_id::RequestIdLayer)
            // Metrics and the request log, measured to the end of the response.
            .layer(observe::ObserveLayer::new(move |path| labels.labels(path)))
            // At most max-concurrent-requests in progress; more are shed at once.
            .layer(shed::ShedLayer::new(limits.max_concurrent_requests))
            // The caller's grpc-timeout, over the Gate's wait and the service.
            .layer(deadline::DeadlineLayer)
            // The Gate: admission, and nothing else.
            .layer(GateLayer::new(gate.clone()))
            // Admitted REAPI requests of upstream instances go to their upstream.
            .layer(DispatchLayer::new(upstreams))
            // The local services.
            .service(routes);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (alive, mut all_closed) = mpsc::channel::<()>(1);
        let serving = listener::Serving {
            service: stack,
            http2: Arc::new(http2::Http2Settings {
                handshake_timeout: limits.tls_handshake_timeout,
                idle_timeout: limits.idle_connection_timeout,
                keepalive_interval: limits.keepalive_interval,
                keepalive_timeout: limits.keepalive_timeout,
                max_concurrent_streams: limits.max_concurrent_streams,
                max_header_list_size: http2::header_list_ceiling(limits.max_header_list_size),
                max_frame_size: limits.max_frame_size,
            }),
            conn_limits: conn_limits(limits),
            slots: listener::ConnSlots::new(limits.max_connections),
            alive,
        };
        let mut acceptors = Vec::new();
        for c in channels {
            acceptors.push(tokio::spawn(
                c.accept_loop(serving.clone(), stop_rx.clone()),
            ));
        }
        drop(serving);
        let web = web.map(|w| {
            let scheme = if w.is_tls() { "https" } else { "http" };
            tracing::info!(
                "web pages on {scheme}://{}{}",
                w.local_addr(),
                config
                    .web
                    .as_ref()
                    .and_then(|c| c.public_url.as_deref())
                    .map(|u| format!(" (public URL {u}; Bazel: --bes_results_url={u}/invocation/)"))
                    .unwrap_or_default()
            );
            let mut stop = stop_rx.clone();
            tokio::spawn(w.serve(async move {
                let _ = stop.wait_for(|s| *s).await;
            }))
        });

        shutdown.await;
        stop_background(background);
        tracing::info!(
            grace_seconds = limits.shutdown_grace.as_secs(),
            "shutting down: no new connections; waiting for in-flight requests"
        );
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stop_tx.send(true);
        for a in acceptors {
            let _ = a.await;
        }
        if let Some(w) = web {
            let _ = w.await;
        }
        // Every connection has been sent GOAWAY; each ends when its streams do.
        match tokio::time::timeout(limits.shutdown_grace, all_closed.recv()).await {
            Ok(_) => {
                tracing::info!("all requests finished; stopped");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    "grace period of {}s is over; closing the remaining connections",
                    limits.shutdown_grace.as_secs()
                );
                Ok(())
            }
        }
    }
}

/// Each connection's own budgets, from `limits:`.
fn conn_limits(limits: &crate::config::LimitsConfig) -> listener::ConnLimits {
    listener::ConnLimits {
        anonymous_requests: limits.anonymous_share(limits.max_concurrent_streams as usize),
        pending_bytes: limits.max_pending_bytes_per_connection,
        anonymous_pending_bytes: limits.anonymous_share(limits.max_pending_bytes_per_connection),
    }
}

fn stop_background(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.abort();
    }
}

/// Reports NOT_SERVING on the health service until every JWKS has delivered
/// its first key set (and whenever the keys become unusable), SERVING otherwise.
fn spawn_readiness(
    gate: &Gate,
    health: tonic_health::server::HealthReporter,
    published: bool,
) -> tokio::task::JoinHandle<()> {
    let ready = gate.subscribe_ready();
    tokio::spawn(async move {
        use tonic_health::ServingStatus::{NotServing, Serving};
        // Without key sets to wait for, the reporter's SERVING stands.
        let Some(mut ready) = ready else {
            return;
        };
        // Publish changes only (from what `bind` published), so a Watch client
        // sees one message per change.
        let mut published = published;
        loop {
            let now = *ready.borrow_and_update();
            if published != now {
                if !now {
                    tracing::warn!("not ready: waiting for the JWKS key sets");
                }
                health
                    .set_service_status("", if now { Serving } else { NotServing })
                    .await;
                published = now;
            }
            if ready.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when
/// this is called, so a signal that arrives before the future is first polled
/// is not lost (and does not kill the process).
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
