//! Admission, stage by stage. Each stage is a function that returns what
//! the next needs, or a [`Refusal`]; [`admit`] runs them in order and
//! [`refuse`] is the one place a refusal becomes its audit line, its metric
//! and its response.
//!
//! ```text
//! 1. route:    path -> RPC name and where its instance lives; unknown -> UNIMPLEMENTED
//! 2. identify: credentials from the headers -> Identity. A caller refused here
//!              that cannot be exempt is answered at once: no body byte is read
//! 3. locate:   read the first message (the whole body of a unary call) within
//!              the pending-bytes budgets and the first-message timeout, decode
//!              it as the service will, and read the instance from it
//! 4. decide:   Gate::decide(instance, RPC, identity) -> allow, or PERMISSION_DENIED
//! 5. record:   the audit line, credentials stripped, the Admission for services
//! ```

use std::sync::Arc;

use http::{Request, Response};
use tonic::body::Body;
use tonic::Status;

use super::admission::Admission;
use super::audit::{bounded, Audit};
use super::authn::{self, Unauthenticated};
use super::decide::Verdict;
use super::frame::{self, Cardinality, Encoding};
use super::identity::{AuthMethod, Identity};
use super::policy::SharedStr;
use super::refusal::Refusal;
use super::route::{self, Locate, Openness, Route, StreamCheck};
use super::scan;
use super::shares::AnonymousPlace;
use super::Gate;
use crate::config::AuthMethod as Method;
use crate::conn::ConnInfo;
use crate::layers::observe::Observation;
use crate::reapi::resource::{self, Access};

/// An admitted request, and what it holds until its response ends.
pub(crate) struct Admitted {
    /// The request, ready for the service.
    pub request: Request<Body>,
    /// Its place under the anonymous share, for open routes and anonymous callers.
    pub place: Option<AnonymousPlace>,
    /// What the metrics are told, when anyone listens.
    pub observation: Option<Observation>,
}

/// A refused request, as it is answered.
pub(crate) struct Refused {
    /// The Trailers-Only response.
    pub response: Response<Body>,
    /// What the metrics are told.
    pub observation: Option<Observation>,
}

/// What the Gate knows of a request as it goes, for its metrics and audit line.
struct Context {
    audit: Audit,
    route: Option<Route>,
    identity: Option<Arc<Identity>>,
    /// The credentials that failed, for a caller that may still be exempt.
    unverified: Option<Unauthenticated>,
}

impl Context {
    fn observation(&self, admitted: bool) -> Option<Observation> {
        if !crate::metrics::enabled() {
            return None;
        }
        let route = self.route.as_ref()?;
        Some(Observation {
            service: route.service,
            method: route.rpc,
            instance: crate::metrics::instance_label(
                self.audit.instance.as_deref().unwrap_or(""),
                admitted,
            ),
        })
    }
}

/// The one place a refusal becomes its metric, its audit line and its response.
fn refuse(ctx: &Context, refusal: Refusal) -> Refused {
    let (outcome, reason) = refusal.labels();
    crate::metrics::gate_decision(outcome, reason);
    match (&refusal, &ctx.route) {
        (Refusal::Unrouted { path }, _) => ctx.audit.unrouted(path),
        (Refusal::Unauthenticated(why), Some(route)) => {
            ctx.audit.log(route, None, false, &why.to_string(), None)
        }
        (Refusal::Denied { reason, .. }, Some(route)) => {
            ctx.audit
                .log(route, ctx.identity.as_deref(), false, reason, None)
        }
        _ => {}
    }
    Refused {
        observation: ctx.observation(false),
        response: refusal.into_response(),
    }
}

/// Admits a request or refuses it.
pub(crate) async fn admit(gate: &Gate, req: Request<Body>) -> Result<Admitted, Refused> {
    let conn = req.extensions().get::<Arc<ConnInfo>>().cloned();
    let mut ctx = Context {
        audit: Audit::new(req.headers(), conn),
        route: None,
        identity: None,
        unverified: None,
    };
    match stages(gate, req, &mut ctx).await {
        Ok(admitted) => Ok(admitted),
        Err(refusal) => Err(refuse(&ctx, refusal)),
    }
}

async fn stages(gate: &Gate, req: Request<Body>, ctx: &mut Context) -> Result<Admitted, Refusal> {
    let route = route(gate, &req)?;
    ctx.route = Some(route);
    let headers = authn::scan(req.headers());
    check_headers(gate, &req, &headers)?;
    let encoding = match headers.encoding {
        None => Encoding::Identity,
        Some(_) => Encoding::from_headers(req.headers()).map_err(Refusal::UnsupportedEncoding)?,
    };
    let strip = headers.caller_headers;
    let token = headers.bearer();
    let conn = ctx.audit.conn.clone();
    let certificate = conn.as_ref().and_then(|c| c.certificate.clone());

    if let Some(open) = open_route(gate, &route) {
        let place = gate.shares.anonymous_place(conn.as_deref())?;
        let mut req =
            req.map(|body| Body::new(frame::Checked::new(body, encoding, gate.limits, open, None)));
        gate.count_allowed("open_route");
        let observation = ctx.observation(true);
        req.extensions_mut().insert(Admission {
            identity: Arc::new(Identity::anonymous(certificate)),
            instance: None,
            rpc: route.rpc,
            authorizer: gate.clone_authorizer(),
        });
        return Ok(Admitted {
            request: req,
            place: Some(place),
            observation,
        });
    }

    let identity = identify(gate, req.headers(), token, conn.as_ref(), ctx).await?;
    let place = match ctx.unverified {
        Some(_) => Some(gate.shares.anonymous_place(conn.as_deref())?),
        None => None,
    };
    let (mut req, instance) = locate(gate, req, &route, encoding, conn.as_ref(), ctx).await?;
    ctx.audit.instance = instance.clone();
    // A query that names no instance is decided as a query over every
    // instance and narrowed per result; other routes without one (health and
    // reflection when gated) are decided on the unnamed instance "".
    let decide_on: Option<&str> = match (route.locate, instance.as_deref()) {
        (Locate::QueryScope(_), None) => None,
        (_, inst) => Some(inst.unwrap_or("")),
    };
    exempt(gate, conn.as_deref(), decide_on, ctx)?;
    let verdict = decide(gate, &route, decide_on, &identity)?;
    record(
        gate, &mut req, &route, identity, instance, verdict, strip, ctx,
    );
    Ok(Admitted {
        request: req,
        place,
        observation: ctx.observation(true),
    })
}

/// Stage 1: the route of the path; a path without one is UNIMPLEMENTED.
fn route(gate: &Gate, req: &Request<Body>) -> Result<Route, Refusal> {
    gate.routes
        .get(req.uri().path())
        .copied()
        .ok_or_else(|| Refusal::Unrouted {
            path: req.uri().path().chars().take(200).collect(),
        })
}

/// Headers over `limits.max-header-list-bytes` are RESOURCE_EXHAUSTED.
fn check_headers(
    gate: &Gate,
    req: &Request<Body>,
    headers: &authn::Scanned<'_>,
) -> Result<(), Refusal> {
    let pseudo = 32 * 4
        + ":method".len()
        + req.method().as_str().len()
        + ":scheme".len()
        + req.uri().scheme_str().map_or(0, str::len)
        + ":authority".len()
        + req.uri().authority().map_or(0, |a| a.as_str().len())
        + ":path".len()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let size = headers.size + pseudo;
    if size > gate.max_header_list {
        return Err(Refusal::HeaderList {
            size,
            max: gate.max_header_list,
        });
    }
    Ok(())
}

fn cardinality(route: &Route) -> Cardinality {
    match route.stream {
        StreamCheck::Single => Cardinality::One,
        _ => Cardinality::Many,
    }
}

/// The cardinality of an open route's messages, when the route is open.
fn open_route(gate: &Gate, route: &Route) -> Option<Cardinality> {
    let open = match route.open {
        Openness::Gated => false,
        Openness::Health => gate.open_health,
        Openness::Reflection => gate.open_reflection,
    };
    open.then(|| cardinality(route))
}

/// Stage 2: who is calling, from the headers alone. A caller whose
/// credentials fail may still be exempt (loopback with
/// `allow-localhost-requests`, or an instance open to anonymous callers,
/// known only from the first message): it goes on as anonymous with the
/// failure noted. Anyone else is refused here, before a body byte is read.
async fn identify(
    gate: &Gate,
    headers: &http::HeaderMap,
    token: Result<Option<&str>, Unauthenticated>,
    conn: Option<&Arc<ConnInfo>>,
    ctx: &mut Context,
) -> Result<Arc<Identity>, Refusal> {
    let certificate = conn.and_then(|c| c.certificate.clone());
    let identified = match gate.method {
        Method::None => Ok(Arc::new(Identity::anonymous(certificate.clone()))),
        Method::Jwt => match &gate.jwt {
            Some(jwt) => {
                authn::identify_jwt(jwt, token, certificate.as_ref(), conn.map(|c| &c.token)).await
            }
            None => Err(Unauthenticated::Malformed("no token verifier configured")),
        },
        Method::Headers => authn::identify_headers(headers, certificate.as_ref()).map(Arc::new),
    };
    let local = conn.is_some_and(|c| c.local);
    let identity = match identified {
        Ok(identity) => identity,
        Err(why)
            if (gate.allow_localhost && local) || !gate.unauthenticated_instances.is_empty() =>
        {
            ctx.unverified = Some(why);
            Arc::new(Identity::anonymous(certificate))
        }
        Err(why) => return Err(Refusal::Unauthenticated(why)),
    };
    ctx.identity = Some(identity.clone());
    Ok(identity)
}

/// Stage 3: the instance, read from the first message (the whole body of a
/// unary call) as the service will decode it; the body handed on is what
/// the Gate decoded, and later messages of a stream are held to the first.
async fn locate(
    gate: &Gate,
    req: Request<Body>,
    route: &Route,
    encoding: Encoding,
    conn: Option<&Arc<ConnInfo>>,
    ctx: &Context,
) -> Result<(Request<Body>, Option<String>), Refusal> {
    let cardinality = cardinality(route);
    if route.locate == Locate::None {
        let req = req.map(|body| {
            Body::new(frame::Checked::new(
                body,
                encoding,
                gate.limits,
                cardinality,
                None,
            ))
        });
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let mut pending = gate.shares.pending(conn, ctx.unverified.is_some());
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
            return Err(Refusal::FirstMessageTimeout {
                seconds: gate.first_message_timeout.as_secs(),
            })
        }
        Ok(Err(status)) => {
            return Err(over_budget
                .take()
                .unwrap_or_else(|| Refusal::from_frame_status(status)))
        }
        Ok(Ok(first)) => first,
    };
    let malformed =
        |e: &dyn std::fmt::Display| Refusal::Malformed(Status::invalid_argument(e.to_string()));
    let message = first.message.as_deref().unwrap_or(&[]);
    let instance = route::locate(route, message).map_err(|e| malformed(&e))?;
    if let Some(name) = &instance {
        if name.len() > gate.max_instance_name {
            return Err(Refusal::InstanceNameTooLong {
                len: name.len(),
                max: gate.max_instance_name,
            });
        }
    }
    let check = match (route.stream, &first.message) {
        (StreamCheck::WriteResource, Some(m)) => Some(write_check(m)),
        (StreamCheck::BuildEventStream, Some(m)) => {
            Some(build_event_check(m).map_err(|e| malformed(&e))?)
        }
        _ => None,
    };
    let slot = (cardinality == Cardinality::Many).then(frame::RefusalSlot::default);
    let mut req = Request::from_parts(parts, first.into_body(check, slot.clone()));
    if let Some(slot) = slot {
        req.extensions_mut().insert(slot);
    }
    Ok((req, instance))
}

/// A caller whose credentials failed goes on only where it is exempt.
fn exempt(
    gate: &Gate,
    conn: Option<&ConnInfo>,
    decide_on: Option<&str>,
    ctx: &Context,
) -> Result<(), Refusal> {
    let Some(why) = &ctx.unverified else {
        return Ok(());
    };
    let exempt = (gate.allow_localhost && conn.is_some_and(|c| c.local))
        || decide_on.is_some_and(|i| gate.unauthenticated_instances.contains(i));
    if exempt {
        Ok(())
    } else {
        Err(Refusal::Unauthenticated(why.clone()))
    }
}

/// Stage 4: the decision.
fn decide(
    gate: &Gate,
    route: &Route,
    decide_on: Option<&str>,
    identity: &Identity,
) -> Result<Verdict, Refusal> {
    let verdict = gate.decide(decide_on, route.rpc, identity);
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
        Ok(verdict)
    } else {
        Err(Refusal::Denied {
            reason: verdict.reason,
            anonymous: identity.method == AuthMethod::Anonymous,
        })
    }
}

/// Stage 5: the audit line, the caller's credentials stripped, the
/// Admission for services. The caller's token and self-asserted identity go
/// no further: services read the verified identity from the Admission, and an
/// upstream is sent it as x-request-* headers (see reapi::upstream).
#[allow(clippy::too_many_arguments)]
fn record(
    gate: &Gate,
    req: &mut Request<Body>,
    route: &Route,
    identity: Arc<Identity>,
    instance: Option<String>,
    verdict: Verdict,
    strip: bool,
    ctx: &Context,
) {
    gate.count_allowed(verdict.label);
    if ctx.audit.on {
        let reason = match &ctx.unverified {
            Some(why) => {
                SharedStr::from(format!("{} (credentials not used: {why})", verdict.reason))
            }
            None => verdict.reason,
        };
        ctx.audit.log(
            route,
            Some(&identity),
            true,
            &reason,
            verdict.rule.as_deref(),
        );
    }
    if strip {
        authn::strip_caller_credentials(req.headers_mut());
    }
    req.extensions_mut().insert(Admission {
        identity,
        instance,
        rpc: route.rpc,
        authorizer: gate.clone_authorizer(),
    });
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
