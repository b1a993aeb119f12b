//! The web listener (`web:`): the page Bazel links to with
//! `--bes_results_url=<public-url>/invocation/`, the list of invocations with
//! search, live updates while a build runs, plain JSON for scripts, and
//! sign-in, all decided by the Gate.
//!
//! ```text
//! accept (TCP or Unix socket) -> TLS (client certificate optional/required)
//!   -> HTTP/1.1 or HTTP/2 (hyper)          listener.rs
//!   -> who is looking: Bearer token, session cookie (OpenID Connect),
//!      client certificate, or anonymous    viewer.rs, session.rs, oidc.rs
//!   -> route                               app.rs
//!   -> Gate::decide(instance, QueryEventStreams | Read, identity)
//!   -> gridgate.v1.Invocations (the same service gRPC callers use)
//!   -> HTML (pages/, escaped by maud) or JSON (api.rs); security headers
//! ```
//!
//! The pages are server-rendered and work without JavaScript; the one
//! script ([`assets`]) only swaps in a fresh page when the build changes
//! ([`live`]). Static files are embedded in the binary.

mod api;
mod app;
pub mod assets;
mod listener;
pub mod live;
pub mod oidc;
pub mod pages;
pub mod session;
pub mod viewer;

use std::sync::Arc;

use tokio::sync::watch;

pub use listener::WebError;

use crate::bes::invocation::service::InvocationsService;
use crate::bes::store::EventStore;
use crate::config::WebConfig;
use crate::gate::identity::PeerCertificate;
use crate::gate::Gate;
use crate::server::BoundAddr;

/// What is known about one web connection.
#[derive(Debug)]
pub struct WebConn {
    /// The peer, for logs.
    pub peer: String,
    /// The verified client certificate, if the browser sent one.
    pub certificate: Option<Arc<PeerCertificate>>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// A bound web listener with its routes, not yet serving.
pub struct WebServer {
    listener: listener::Listener,
    app: Arc<app::App>,
    stop: watch::Sender<bool>,
}

impl WebServer {
    /// Binds `config`'s address and builds the routes over `store` (wrapped
    /// by [`live::Notifying`] with `changes`), deciding with `gate`;
    /// `cas` serves blobs of gridgate's own instances.
    pub async fn bind(
        config: &WebConfig,
        gate: Arc<Gate>,
        store: Arc<dyn EventStore>,
        changes: Arc<live::Changes>,
        cas: Option<Arc<crate::reapi::Instances>>,
    ) -> Result<WebServer, WebError> {
        let listener = listener::Listener::bind(config).await?;
        let tls = listener.is_tls();
        let secure = tls
            || config
                .public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"));
        let sealer = config
            .session_key
            .as_ref()
            .map(|k| session::Sealer::new(&k.0, secure));
        let oidc = match (&config.oidc, &config.public_url) {
            (Some(o), Some(url)) => Some(oidc::Oidc::new(o, url).map_err(WebError::Setup)?),
            _ => None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let recheck = (store.backend() == "postgres").then_some(live::RECHECK);
        let app = Arc::new(app::App {
            authorizer: viewer::WebAuthorizer::new(gate),
            service: InvocationsService::new(store.clone()),
            store,
            cas,
            sealer,
            oidc,
            changes,
            stop: stop_rx,
            tls,
            connect_src: String::new(),
            recheck,
        });
        Ok(WebServer {
            listener,
            app,
            stop,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> BoundAddr {
        self.listener.addr.clone()
    }

    /// Whether it serves TLS.
    pub fn is_tls(&self) -> bool {
        self.listener.is_tls()
    }

    /// Serves until `shutdown` completes, then ends the event streams and
    /// gives open connections a moment to finish.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let WebServer {
            listener,
            app,
            stop,
        } = self;
        let rx = stop.subscribe();
        let serving = tokio::spawn(listener.serve(app, rx));
        shutdown.await;
        let _ = stop.send(true);
        let _ = serving.await;
    }
}
