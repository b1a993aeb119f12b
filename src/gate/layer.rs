//! The Gate as a tower layer: every request passes here before any service.
//!
//! ```text
//! 1. route:    path -> RPC name and where its instance lives; unknown -> UNIMPLEMENTED
//! 2. locate:   peek the first message (decompressing it if needed) for the instance
//! 3. identify: token / trusted headers / client certificate -> Identity
//! 4. decide:   policy(instance, RPC, identity) -> allow, or PERMISSION_DENIED with the reason
//! 5. record:   Admission into the request extensions, one audit line,
//!              credentials stripped and identity headers set from the verified caller
//! ```
//!
//! UNAUTHENTICATED means the credentials are missing, malformed, expired or
//! unverifiable; PERMISSION_DENIED means the caller is known (or anonymous on
//! an instance that admits anonymous callers) but no rule allows the call.
//! Messages say why and never contain a token.
//!
//! ```no_run
//! # fn f(
//! #     gate: std::sync::Arc<gridgate::gate::Gate>,
//! #     upstreams: std::sync::Arc<gridgate::reapi::upstream::Upstreams>,
//! #     routes: tonic::service::Routes,
//! # ) {
//! let server = tonic::transport::Server::builder()
//!     .layer(gridgate::gate::GateLayer::new(gate, upstreams))
//!     .add_routes(routes);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service, ServiceExt};

use super::admission::Admission;
use super::authn::{self, Unauthenticated};
use super::frame::{self, Encoding};
use super::identity::{AuthMethod, Identity};
use super::policy::SharedStr;
use super::route::{self, Openness, Route, StreamCheck};
use super::scan;
use super::Gate;
use super::{observe, request_id};
use crate::config::AuthMethod as Method;
use crate::conn::ConnInfo;
use crate::reapi::resource::{self, Access};
use crate::reapi::upstream::{Upstream, Upstreams};

/// Puts the [`Gate`] in front of a service. Admitted REAPI requests for an
/// instance with an `upstream:` go to that upstream instead of the service.
#[derive(Clone)]
pub struct GateLayer {
    gate: Arc<Gate>,
    upstreams: Arc<Upstreams>,
    in_flight: Arc<InFlight>,
}

impl GateLayer {
    /// The Gate with no limit on requests in progress.
    pub fn new(gate: Arc<Gate>, upstreams: Arc<Upstreams>) -> GateLayer {
        GateLayer {
            gate,
            upstreams,
            in_flight: Arc::new(InFlight::new(usize::MAX)),
        }
    }

    /// Refuses requests beyond `max` in progress at once, with
    /// RESOURCE_EXHAUSTED and without queueing (`limits.max-concurrent-requests`).
    pub fn with_max_in_flight(mut self, max: usize) -> GateLayer {
        self.in_flight = Arc::new(InFlight::new(max));
        self
    }
}

/// Counts requests in progress against a limit.
pub(crate) struct InFlight {
    count: AtomicUsize,
    max: usize,
}

impl InFlight {
    fn new(max: usize) -> InFlight {
        InFlight {
            count: AtomicUsize::new(0),
            max,
        }
    }

    /// A permit, held until the response ends; `None` at the limit.
    fn try_acquire(self: &Arc<Self>) -> Option<InFlightPermit> {
        if self.max == usize::MAX {
            return None;
        }
        let before = self.count.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlightPermit(self.clone()))
    }

    fn unlimited(&self) -> bool {
        self.max == usize::MAX
    }
}

/// One request in progress; released on drop.
pub(crate) struct InFlightPermit(Arc<InFlight>);

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = GateService<S>;
    fn layer(&self, inner: S) -> GateService<S> {
        GateService {
            gate: self.gate.clone(),
            upstreams: self.upstreams.clone(),
            in_flight: self.in_flight.clone(),
            inner,
        }
    }
}

/// The service the [`GateLayer`] produces.
#[derive(Clone)]
pub struct GateService<S> {
    gate: Arc<Gate>,
    upstreams: Arc<Upstreams>,
    in_flight: Arc<InFlight>,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for GateService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one we call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        let upstreams = self.upstreams.clone();
        let started = Instant::now();
        let request_id = request_id::assign(req.headers_mut());
        let permit = self.in_flight.try_acquire();
        if permit.is_none() && !self.in_flight.unlimited() {
            // Shed at once: queueing would only grow latency and memory.
            let max = self.in_flight.max;
            return Box::pin(async move {
                let outcome = Outcome {
                    route: gate.routes.get(req.uri().path()).copied(),
                    decision: ("shed", "max_concurrent_requests"),
                    ..Outcome::default()
                };
                crate::metrics::gate_decision(outcome.decision.0, outcome.decision.1);
                let mut resp = refuse(Status::resource_exhausted(format!(
                    "gridgate is at its limit of {max} requests in progress; retry with backoff"
                )));
                resp.headers_mut()
                    .insert(request_id::HEADER, request_id.clone());
                Ok(observe::observe(resp, outcome, started, request_id, None))
            });
        }
        Box::pin(async move {
            let mut outcome = Outcome::default();
            let admitted = admit(&gate, req, &mut outcome, &request_id).await;
            crate::metrics::gate_decision(outcome.decision.0, outcome.decision.1);
            let mut resp = match admitted {
                Ok(req) => match upstream_for(&upstreams, &req) {
                    Some(upstream) => {
                        outcome.upstream = true;
                        match upstream.oneshot(req).await {
                            Ok(resp) => resp,
                            Err(never) => match never {},
                        }
                    }
                    None => inner.call(req).await?,
                },
                Err(refusal) => refusal,
            };
            resp.headers_mut()
                .insert(request_id::HEADER, request_id.clone());
            Ok(observe::observe(resp, outcome, started, request_id, permit))
        })
    }
}

/// The upstream an admitted REAPI request is forwarded to, if its instance has one.
fn upstream_for(upstreams: &Upstreams, req: &Request<Body>) -> Option<Upstream> {
    if upstreams.is_empty() {
        return None;
    }
    let admission = req.extensions().get::<Admission>()?;
    let service = req.uri().path().trim_start_matches('/').split('/').next()?;
    if !route::RouteTable::is_reapi(service) {
        return None;
    }
    upstreams.get(admission.instance.as_deref()?)
}

/// The fixed reasons of decisions made without a policy, built once.
struct Reasons {
    authorization_none: SharedStr,
    no_acl: SharedStr,
    query_scope: SharedStr,
}

fn reasons() -> &'static Reasons {
    static REASONS: std::sync::OnceLock<Reasons> = std::sync::OnceLock::new();
    REASONS.get_or_init(|| Reasons {
        authorization_none: "authorization none".into(),
        no_acl: "no ACL configured: authenticated callers are allowed".into(),
        query_scope: "query over every instance the caller may query".into(),
    })
}

/// Refusal as a gRPC response (Trailers-Only).
fn refuse(status: Status) -> Response<Body> {
    let unimplemented_encoding = status.code() == tonic::Code::Unimplemented
        && status.message().starts_with("grpc-encoding");
    let mut resp = status.into_http::<Body>();
    if unimplemented_encoding {
        resp.headers_mut().insert(
            "grpc-accept-encoding",
            http::HeaderValue::from_static(frame::ACCEPT_ENCODING),
        );
    }
    resp
}

/// What admission found out about a request, for its metrics and log lines.
pub(crate) struct Outcome {
    /// The route, once the path was found in the table.
    pub route: Option<Route>,
    /// The instance's metric label (bounded: see [`crate::metrics::instance_label`]).
    pub instance: metrics::SharedString,
    /// (outcome, reason) of the Gate's decision, as metric labels.
    pub decision: (&'static str, &'static str),
    /// Whether the request was forwarded to an upstream.
    pub upstream: bool,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            route: None,
            instance: metrics::SharedString::const_str(""),
            decision: ("unrouted", "no_route"),
            upstream: false,
        }
    }
}

impl Outcome {
    fn set_instance(&mut self, instance: Option<&str>, admitted: bool) {
        if crate::metrics::enabled() {
            self.instance = crate::metrics::instance_label(instance.unwrap_or(""), admitted);
        }
    }
}

/// What the audit line says about a request.
struct Audit<'a> {
    route: &'a Route,
    conn: Option<&'a Arc<ConnInfo>>,
    instance: Option<&'a str>,
    request_id: &'a http::HeaderValue,
    headers: &'a http::HeaderMap,
}

impl Audit<'_> {
    fn log(&self, identity: Option<&Identity>, allowed: bool, reason: &str, rule: Option<&str>) {
        if !tracing::enabled!(target: "gridgate::audit", tracing::Level::INFO) {
            return;
        }
        let peer = self.conn.map(|c| c.peer.to_string()).unwrap_or_default();
        let (method, actor, subject, workflow, cert) = match identity {
            Some(i) => (
                i.method.as_str(),
                i.actor.as_deref().unwrap_or(""),
                i.subject.as_deref().unwrap_or(""),
                i.workflow.as_deref().unwrap_or(""),
                i.certificate
                    .as_deref()
                    .map(|c| c.subject.as_str())
                    .unwrap_or(""),
            ),
            None => ("none", "", "", "", ""),
        };
        let decision = if allowed { "allow" } else { "deny" };
        let metadata = request_id::RequestMetadata::from_headers(self.headers);
        tracing::info!(
            target: "gridgate::audit",
            request_id = self.request_id.to_str().unwrap_or(""),
            tool = metadata.tool.as_str(),
            invocation = metadata.invocation.as_str(),
            peer = %peer,
            auth = method,
            actor,
            subject,
            workflow,
            cert,
            instance = self.instance.unwrap_or(""),
            rpc = self.route.rpc,
            decision,
            reason,
            rule = rule.unwrap_or(""),
            "{decision} {} on {:?}",
            self.route.rpc,
            self.instance.unwrap_or(""),
        );
    }
}

/// Admits a request (returning it, ready for the service) or refuses it
/// (returning the gRPC error response).
async fn admit(
    gate: &Gate,
    mut req: Request<Body>,
    outcome: &mut Outcome,
    request_id: &http::HeaderValue,
) -> Result<Request<Body>, Response<Body>> {
    // 1. Route.
    let Some(route) = gate.routes.get(req.uri().path()).copied() else {
        let path = req.uri().path();
        let shown: String = path.chars().take(200).collect();
        tracing::info!(
            target: "gridgate::audit",
            request_id = request_id.to_str().unwrap_or(""),
            path = %shown,
            decision = "deny",
            "unrouted RPC"
        );
        return Err(refuse(Status::unimplemented(format!(
            "gridgate does not route {shown}"
        ))));
    };
    outcome.route = Some(route);
    outcome.decision = ("invalid", "malformed_request");
    let conn = req.extensions().get::<Arc<ConnInfo>>().cloned();
    let certificate = conn.as_ref().and_then(|c| c.certificate.clone());

    let open = match route.open {
        Openness::Gated => false,
        Openness::Health => gate.open_health,
        Openness::Reflection => gate.open_reflection,
    };
    if open {
        outcome.decision = ("allow", "open_route");
        let identity = Arc::new(Identity::anonymous(certificate));
        req.extensions_mut().insert(Admission {
            identity,
            instance: None,
            rpc: route.rpc,
            authorizer: gate.clone_authorizer(),
        });
        return Ok(req);
    }

    // 2. Locate the instance.
    let encoding = Encoding::from_headers(req.headers()).map_err(refuse)?;
    let instance = if route.locate == route::Locate::None {
        None
    } else {
        let (parts, body) = req.into_parts();
        let peeked = tokio::time::timeout(
            gate.first_message_timeout,
            frame::peek_first(body, encoding, gate.limits),
        )
        .await
        .map_err(|_| {
            refuse(Status::deadline_exceeded(format!(
                "the first request message was not complete within {}s",
                gate.first_message_timeout.as_secs()
            )))
        })?
        .map_err(refuse)?;
        let instance = match &peeked.message {
            Some(msg) => route::locate(&route, msg)
                .map_err(|e| refuse(Status::invalid_argument(e.to_string())))?,
            // An empty request stream: the default (empty) message.
            None => route::locate(&route, &[])
                .map_err(|e| refuse(Status::invalid_argument(e.to_string())))?,
        };
        let body = match (route.stream, &peeked.message) {
            (StreamCheck::WriteResource, Some(first)) => {
                guard_write(peeked.body, encoding, gate.limits, first)
            }
            (StreamCheck::BuildEventStream, Some(first)) => {
                guard_build_events(peeked.body, encoding, gate.limits, first)
                    .map_err(|e| refuse(Status::invalid_argument(e.to_string())))?
            }
            _ => peeked.body,
        };
        req = Request::from_parts(parts, body);
        instance
    };
    // The instance the policy decides on: routes without one (health and
    // reflection when gated) are decided on the unnamed instance "". A query
    // that names no instance is narrowed per result by the service.
    let decide_on: Option<&str> = match (route.locate, instance.as_deref()) {
        (route::Locate::QueryScope(_), None) => None,
        (_, inst) => Some(inst.unwrap_or("")),
    };
    let audit = Audit {
        route: &route,
        conn: conn.as_ref(),
        instance: instance.as_deref(),
        request_id,
        headers: req.headers(),
    };

    // 3. Identify.
    let exempt = (gate.allow_localhost && conn.as_ref().is_some_and(|c| c.local))
        || decide_on.is_some_and(|i| gate.unauthenticated_instances.contains(i));
    let identified = match gate.method {
        Method::None => Ok(Arc::new(Identity::anonymous(certificate.clone()))),
        Method::Jwt => match &gate.jwt {
            Some(jwt) => {
                let slot = conn.as_ref().map(|c| &c.token);
                authn::identify_jwt(jwt, req.headers(), certificate.as_ref(), slot).await
            }
            None => Err(Unauthenticated::Malformed("no token verifier configured")),
        },
        Method::Headers => {
            authn::identify_headers(req.headers(), certificate.as_ref()).map(Arc::new)
        }
    };
    let (identity, ignored) = match identified {
        Ok(identity) => (identity, None),
        Err(why) if exempt => (
            Arc::new(Identity::anonymous(certificate.clone())),
            Some(why),
        ),
        Err(why) => {
            outcome.decision = ("unauthenticated", why.metric_label());
            outcome.set_instance(instance.as_deref(), false);
            audit.log(None, false, &why.to_string(), None);
            return Err(refuse(Status::unauthenticated(why.to_string())));
        }
    };

    // 4. Decide.
    let (allowed, reason, rule): (bool, SharedStr, Option<SharedStr>) =
        if gate.method == Method::None {
            outcome.decision = ("allow", "authorization_none");
            (true, reasons().authorization_none.clone(), None)
        } else {
            match (&gate.policy, decide_on) {
                (None, _) => {
                    outcome.decision = ("allow", "no_acl");
                    (true, reasons().no_acl.clone(), None)
                }
                (Some(_), None) => {
                    outcome.decision = ("allow", "query_scope");
                    (true, reasons().query_scope.clone(), None)
                }
                (Some(live), Some(inst)) => {
                    let d = live.current().decide(inst, route.rpc, &identity);
                    if let Some(would) = &d.dry_run_denied {
                        tracing::warn!(
                            target: "gridgate::audit",
                            rpc = route.rpc,
                            instance = inst,
                            actor = identity.actor.as_deref().unwrap_or(""),
                            "dry-run policy would deny: {would}"
                        );
                    }
                    outcome.decision = match (d.allowed, identity.method == AuthMethod::Anonymous) {
                        (true, _) => ("allow", "rule"),
                        (false, true) => ("deny", "anonymous_no_rule"),
                        (false, false) => ("deny", "no_rule"),
                    };
                    (d.allowed, d.reason, d.rule)
                }
            }
        };
    let reason = match &ignored {
        Some(why) => SharedStr::from(format!("{reason} (credentials not used: {why})")),
        None => reason,
    };
    audit.log(Some(&identity), allowed, &reason, rule.as_deref());
    outcome.set_instance(instance.as_deref(), allowed);
    if !allowed {
        let who = if identity.method == AuthMethod::Anonymous {
            "anonymous caller: "
        } else {
            ""
        };
        return Err(refuse(Status::permission_denied(format!("{who}{reason}"))));
    }

    // 5. Record. The caller's token and self-asserted identity go no
    // further: services read the verified identity from the Admission, and an
    // upstream is sent it as x-request-* headers (see reapi::upstream).
    authn::strip_caller_credentials(req.headers_mut());
    req.extensions_mut().insert(Admission {
        identity,
        instance,
        rpc: route.rpc,
        authorizer: gate.clone_authorizer(),
    });
    Ok(req)
}

/// Holds every later ByteStream Write message to the first's resource name
/// (REAPI lets later messages leave it empty): another instance is
/// PERMISSION_DENIED, another resource on the same instance INVALID_ARGUMENT.
fn guard_write(body: Body, encoding: Encoding, limits: frame::Limits, first: &[u8]) -> Body {
    let expected = scan::string_at(first, &[1]).unwrap_or("").to_string();
    let expected_instance = resource::instance_of(&expected, Access::Write)
        .unwrap_or("")
        .to_string();
    let check: frame::Check = Box::new(move |msg: &[u8]| {
        let name = scan::string_at(msg, &[1])
            .map_err(|e| Status::invalid_argument(format!("malformed WriteRequest: {e}")))?;
        if name.is_empty() || name == expected {
            return Ok(());
        }
        match resource::instance_of(name, Access::Write) {
            Ok(instance) if instance == expected_instance => Err(Status::invalid_argument(
                "a later WriteRequest names a different resource than the first",
            )),
            _ => Err(Status::permission_denied(
                "a later WriteRequest names a different instance than the first",
            )),
        }
    });
    Body::new(frame::Guarded::new(body, encoding, limits, check))
}

/// The (project_id, stream id) of a PublishBuildToolEventStream message.
fn build_event_key(msg: &[u8]) -> Result<(String, (String, String, u64)), scan::ScanError> {
    Ok((
        scan::string_at(msg, &[6])?.to_string(),
        (
            scan::string_at(msg, &[4, 1, 1])?.to_string(),
            scan::string_at(msg, &[4, 1, 6])?.to_string(),
            scan::varint_at(msg, &[4, 1, 3])?,
        ),
    ))
}

/// Holds every later PublishBuildToolEventStream message to the first's
/// `project_id` (PERMISSION_DENIED: another instance) and `stream_id`
/// (INVALID_ARGUMENT: one call carries one stream).
fn guard_build_events(
    body: Body,
    encoding: Encoding,
    limits: frame::Limits,
    first: &[u8],
) -> Result<Body, scan::ScanError> {
    let (project, stream) = build_event_key(first)?;
    let check: frame::Check = Box::new(move |msg: &[u8]| {
        let (p, s) = build_event_key(msg).map_err(|e| {
            Status::invalid_argument(format!("malformed PublishBuildToolEventStreamRequest: {e}"))
        })?;
        if p != project {
            return Err(Status::permission_denied(
                "a later message of the stream names a different project_id than the first",
            ));
        }
        if s != stream {
            return Err(Status::invalid_argument(
                "a later message of the stream names a different stream_id than the first",
            ));
        }
        Ok(())
    });
    Ok(Body::new(frame::Guarded::new(
        body, encoding, limits, check,
    )))
}
