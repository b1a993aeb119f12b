//! The Gate as a tower layer: every request passes here before any service.
//!
//! ```text
//! 1. route:    path -> RPC name and where its instance lives; unknown -> UNIMPLEMENTED
//! 2. identify: credentials from the headers -> Identity. A caller refused here
//!              that cannot be exempt is answered at once: no body byte is read
//! 3. locate:   read the first message (the whole body of a unary call) within
//!              the pending-bytes budgets and the first-message timeout, decode
//!              it as the service will, and read the instance from it
//! 4. decide:   policy(instance, RPC, identity) -> allow, or PERMISSION_DENIED with the reason
//! 5. record:   Admission into the request extensions, one audit line,
//!              credentials stripped
//! ```
//!
//! UNAUTHENTICATED means the credentials are missing, malformed, expired or
//! unverifiable; PERMISSION_DENIED means the caller is known (or anonymous on
//! an instance that admits anonymous callers) but no rule allows the call.
//! Messages say why and never contain a token. Open routes and anonymous
//! callers draw on their own share of requests in progress, and every byte
//! buffered before a decision on a budget (see [`super::shares`]).
//!
//! ```no_run
//! # fn f(
//! #     gate: std::sync::Arc<gridgate::gate::Gate>,
//! #     upstreams: std::sync::Arc<gridgate::reapi::upstream::Upstreams>,
//! #     routes: tonic::service::Routes,
//! # ) {
//! let stack = tower::ServiceBuilder::new()
//!     .layer(gridgate::gate::GateLayer::new(gate, upstreams))
//!     .service(routes);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service, ServiceExt};

use super::admission::Admission;
use super::authn::{self, Unauthenticated};
use super::frame::{self, Cardinality, Encoding};
use super::identity::{AuthMethod, Identity};
use super::policy::SharedStr;
use super::refusal::Refusal;
use super::route::{self, Openness, Route, StreamCheck};
use super::scan;
use super::shares::AnonymousPlace;
use super::Gate;
use super::{observe, request_id};
use crate::budget::{Budget, Held};
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
    in_flight: Option<Arc<Budget>>,
}

impl GateLayer {
    /// The Gate with no limit on requests in progress.
    pub fn new(gate: Arc<Gate>, upstreams: Arc<Upstreams>) -> GateLayer {
        GateLayer {
            gate,
            upstreams,
            in_flight: None,
        }
    }

    /// Refuses requests beyond `max` in progress at once, with
    /// RESOURCE_EXHAUSTED and without queueing (`limits.max-concurrent-requests`).
    pub fn with_max_in_flight(mut self, max: usize) -> GateLayer {
        self.in_flight = Some(Budget::new(max));
        self
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
    in_flight: Option<Arc<Budget>>,
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a request holds until its response ends.
pub(crate) struct Permits {
    _in_flight: Option<Held>,
    _anonymous: Option<AnonymousPlace>,
}

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
        let in_flight = match &self.in_flight {
            None => None,
            Some(budget) => match budget.try_take(1) {
                Some(held) => Some(held),
                None => {
                    // Shed at once: queueing would only grow latency and memory.
                    let refusal = Refusal::Shed { max: budget.max() };
                    let mut outcome = Outcome {
                        route: gate.routes.get(req.uri().path()).copied(),
                        ..Outcome::default()
                    };
                    outcome.decision = refusal.labels();
                    crate::metrics::gate_decision(outcome.decision.0, outcome.decision.1);
                    let mut resp = refusal.into_response();
                    resp.headers_mut()
                        .insert(request_id::HEADER, request_id.clone());
                    return Box::pin(std::future::ready(Ok(observe::observe(
                        resp, outcome, started, request_id, None,
                    ))));
                }
            },
        };
        Box::pin(async move {
            let mut outcome = Outcome::default();
            let admitted = admit(&gate, req, &mut outcome, &request_id).await;
            crate::metrics::gate_decision(outcome.decision.0, outcome.decision.1);
            let (mut resp, anonymous) = match admitted {
                Ok((req, anonymous)) => match upstream_for(&upstreams, &req) {
                    Some(upstream) => {
                        outcome.upstream = true;
                        match upstream.oneshot(req).await {
                            Ok(resp) => (resp, anonymous),
                            Err(never) => match never {},
                        }
                    }
                    None => (inner.call(req).await?, anonymous),
                },
                Err(refusal) => (refusal.into_response(), None),
            };
            resp.headers_mut()
                .insert(request_id::HEADER, request_id.clone());
            let permits = (in_flight.is_some() || anonymous.is_some()).then_some(Permits {
                _in_flight: in_flight,
                _anonymous: anonymous,
            });
            Ok(observe::observe(
                resp, outcome, started, request_id, permits,
            ))
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

/// The longest client-controlled value written on a log line, in bytes.
pub const MAX_LOGGED_VALUE: usize = 256;

/// `value` cut to [`MAX_LOGGED_VALUE`] bytes (on a character boundary), with
/// a note of how long it was: one request never writes more than a few KiB
/// of log, whatever it sends.
pub fn bounded(value: &str) -> std::borrow::Cow<'_, str> {
    if value.len() <= MAX_LOGGED_VALUE {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut end = MAX_LOGGED_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…({} bytes)", &value[..end], value.len()))
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
            actor = %bounded(actor),
            subject = %bounded(subject),
            workflow = %bounded(workflow),
            cert = %bounded(cert),
            instance = %bounded(self.instance.unwrap_or("")),
            rpc = self.route.rpc,
            decision,
            reason = %bounded(reason),
            rule = rule.unwrap_or(""),
            "{decision} {}",
            self.route.rpc,
        );
    }
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113,
/// section 6.5.2: name, value and 32 bytes per field, pseudo-headers too).
fn header_list_size(req: &Request<Body>) -> usize {
    let pseudo = 32 * 4
        + ":method".len()
        + req.method().as_str().len()
        + ":scheme".len()
        + req.uri().scheme_str().map_or(0, str::len)
        + ":authority".len()
        + req.uri().authority().map_or(0, |a| a.as_str().len())
        + ":path".len()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    req.headers()
        .iter()
        .fold(pseudo, |n, (k, v)| n + k.as_str().len() + v.len() + 32)
}

/// Admits a request (returning it, ready for the service, with the share it
/// holds if it is anonymous) or refuses it.
async fn admit(
    gate: &Gate,
    mut req: Request<Body>,
    outcome: &mut Outcome,
    request_id: &http::HeaderValue,
) -> Result<(Request<Body>, Option<AnonymousPlace>), Refusal> {
    // 1. Route.
    let Some(route) = gate.routes.get(req.uri().path()).copied() else {
        let shown: String = req.uri().path().chars().take(200).collect();
        tracing::info!(
            target: "gridgate::audit",
            request_id = request_id.to_str().unwrap_or(""),
            path = %shown,
            decision = "deny",
            "unrouted RPC"
        );
        return Err(Refusal::Unrouted { path: shown });
    };
    outcome.route = Some(route);
    let refused = |outcome: &mut Outcome, refusal: Refusal| {
        outcome.decision = refusal.labels();
        refusal
    };
    let size = header_list_size(&req);
    if size > gate.max_header_list {
        return Err(refused(
            outcome,
            Refusal::HeaderList {
                size,
                max: gate.max_header_list,
            },
        ));
    }
    let encoding = Encoding::from_headers(req.headers())
        .map_err(|s| refused(outcome, Refusal::UnsupportedEncoding(s)))?;
    let conn = req.extensions().get::<Arc<ConnInfo>>().cloned();
    let certificate = conn.as_ref().and_then(|c| c.certificate.clone());
    let cardinality = match route.stream {
        StreamCheck::Single => Cardinality::One,
        _ => Cardinality::Many,
    };

    let open = match route.open {
        Openness::Gated => false,
        Openness::Health => gate.open_health,
        Openness::Reflection => gate.open_reflection,
    };
    if open {
        let place = gate
            .shares
            .anonymous_place(conn.as_deref())
            .map_err(|r| refused(outcome, r))?;
        outcome.decision = ("allow", "open_route");
        let identity = Arc::new(Identity::anonymous(certificate));
        req = req.map(|body| {
            Body::new(frame::Checked::new(
                body,
                encoding,
                gate.limits,
                cardinality,
                None,
            ))
        });
        req.extensions_mut().insert(Admission {
            identity,
            instance: None,
            rpc: route.rpc,
            authorizer: gate.clone_authorizer(),
        });
        return Ok((req, Some(place)));
    }

    // 2. Identify, from the headers alone.
    let local = conn.as_ref().is_some_and(|c| c.local);
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
    // A caller whose credentials failed may still be exempt: loopback with
    // allow-localhost-requests, or an instance open to anonymous callers
    // (known only from the first message). Anyone else is refused now,
    // before a single body byte is read.
    let (identity, ignored) = match identified {
        Ok(identity) => (identity, None),
        Err(why)
            if (gate.allow_localhost && local) || !gate.unauthenticated_instances.is_empty() =>
        {
            (
                Arc::new(Identity::anonymous(certificate.clone())),
                Some(why),
            )
        }
        Err(why) => {
            let audit = Audit {
                route: &route,
                conn: conn.as_ref(),
                instance: None,
                request_id,
                headers: req.headers(),
            };
            audit.log(None, false, &why.to_string(), None);
            outcome.set_instance(None, false);
            return Err(refused(outcome, Refusal::Unauthenticated(why)));
        }
    };
    let anonymous = ignored.is_some();
    let place = match anonymous {
        true => Some(
            gate.shares
                .anonymous_place(conn.as_deref())
                .map_err(|r| refused(outcome, r))?,
        ),
        false => None,
    };

    // 3. Locate the instance.
    let instance = if route.locate == route::Locate::None {
        req = req.map(|body| {
            Body::new(frame::Checked::new(
                body,
                encoding,
                gate.limits,
                cardinality,
                None,
            ))
        });
        None
    } else {
        let (parts, body) = req.into_parts();
        let mut pending = gate.shares.pending(conn.as_ref(), anonymous);
        let mut over_budget = None;
        let read = frame::read_first(body, encoding, gate.limits, cardinality, |n| {
            pending.take(n).map_err(|r| {
                let status = Status::resource_exhausted(r.to_string());
                over_budget = Some(r);
                status
            })
        });
        let first = match tokio::time::timeout(gate.first_message_timeout, read).await {
            Err(_) => {
                return Err(refused(
                    outcome,
                    Refusal::FirstMessageTimeout {
                        seconds: gate.first_message_timeout.as_secs(),
                    },
                ))
            }
            Ok(Err(status)) => {
                let refusal = over_budget
                    .take()
                    .unwrap_or_else(|| Refusal::from_frame_status(status));
                return Err(refused(outcome, refusal));
            }
            Ok(Ok(first)) => first,
        };
        let message = first.message.as_deref().unwrap_or(&[]);
        let instance = route::locate(&route, message).map_err(|e| {
            refused(
                outcome,
                Refusal::Malformed(Status::invalid_argument(e.to_string())),
            )
        })?;
        if let Some(name) = &instance {
            if name.len() > gate.max_instance_name {
                return Err(refused(
                    outcome,
                    Refusal::InstanceNameTooLong {
                        len: name.len(),
                        max: gate.max_instance_name,
                    },
                ));
            }
        }
        let check = match (route.stream, &first.message) {
            (StreamCheck::WriteResource, Some(m)) => Some(write_check(m)),
            (StreamCheck::BuildEventStream, Some(m)) => {
                Some(build_event_check(m).map_err(|e| {
                    refused(
                        outcome,
                        Refusal::Malformed(Status::invalid_argument(e.to_string())),
                    )
                })?)
            }
            _ => None,
        };
        let slot = (cardinality == Cardinality::Many).then(frame::RefusalSlot::default);
        req = Request::from_parts(parts, first.into_body(check, slot.clone()));
        if let Some(slot) = slot {
            req.extensions_mut().insert(slot);
        }
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
    if let Some(why) = &ignored {
        let exempt = (gate.allow_localhost && local)
            || decide_on.is_some_and(|i| gate.unauthenticated_instances.contains(i));
        if !exempt {
            audit.log(None, false, &why.to_string(), None);
            outcome.set_instance(instance.as_deref(), false);
            return Err(refused(outcome, Refusal::Unauthenticated(why.clone())));
        }
    }

    // 4. Decide.
    let verdict = gate.decide(decide_on, route.rpc, &identity);
    if let Some(would) = &verdict.dry_run_denied {
        tracing::warn!(
            target: "gridgate::audit",
            rpc = route.rpc,
            instance = %bounded(decide_on.unwrap_or("")),
            actor = %bounded(identity.actor.as_deref().unwrap_or("")),
            "dry-run policy would deny: {}",
            bounded(would)
        );
    }
    if verdict.allowed {
        outcome.decision = ("allow", verdict.label);
    }
    let (allowed, reason, rule) = (verdict.allowed, verdict.reason, verdict.rule);
    let reason = match &ignored {
        Some(why) => SharedStr::from(format!("{reason} (credentials not used: {why})")),
        None => reason,
    };
    audit.log(Some(&identity), allowed, &reason, rule.as_deref());
    outcome.set_instance(instance.as_deref(), allowed);
    if !allowed {
        return Err(refused(
            outcome,
            Refusal::Denied {
                reason,
                anonymous: identity.method == AuthMethod::Anonymous,
            },
        ));
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
    Ok((req, place))
}

/// Holds every later ByteStream Write message to the first's resource name
/// (REAPI lets later messages leave it empty): another instance is
/// PERMISSION_DENIED, another resource on the same instance INVALID_ARGUMENT.
fn write_check(first: &[u8]) -> frame::Check {
    let expected = scan::string_at(first, &[1]).unwrap_or("").to_string();
    let expected_instance = resource::instance_of(&expected, Access::Write)
        .unwrap_or("")
        .to_string();
    Box::new(move |msg: &[u8]| {
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
    })
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
fn build_event_check(first: &[u8]) -> Result<frame::Check, scan::ScanError> {
    let (project, stream) = build_event_key(first)?;
    Ok(Box::new(move |msg: &[u8]| {
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
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_for_logs_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_LOGGED_VALUE + 32, "{}", cut.len());
        assert!(cut.ends_with("…(2000 bytes)"), "{cut}");
    }
}
