//! The routes of the web listener, and the one place every response gets
//! its security headers ([`secure`]).
//!
//! | route | what |
//! |---|---|
//! | `GET /`, `GET /invocations` | the list, with filters ([`pages::list`]) |
//! | `GET /invocation/<id>` | one invocation ([`pages::invocation`]) |
//! | `GET /invocation/<id>/live`, `GET /invocations/live` | server-sent events: "it changed" |
//! | `GET /invocation/<id>/log` | the whole console output, as text |
//! | `GET /blob?uri=bytestream://…` | a test log or action output from gridgate's CAS (`Read` on its instance) |
//! | `GET /auth/sign-in`, `GET /auth/callback`, `POST /auth/sign-out` | OpenID Connect sign-in ([`super::oidc`]) |
//! | `GET /api/v1/…` | JSON ([`super::api`]) |
//! | `GET /static/…` | the stylesheet and the script ([`super::assets`]) |
//!
//! Each request is identified first ([`viewer::identify`]); every decision
//! after that is the Gate's. An invocation the viewer may not see gets the
//! same answer as one that does not exist.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use maud::Markup;
use tokio::sync::watch;
use tonic::Code;

use super::live::Changes;
use super::oidc::{self, Oidc, SignInState};
use super::pages::{self, invocation::Snippet};
use super::session::{self, Sealer, SESSION, SIGN_IN};
use super::viewer::{self, SessionCookie, SignedIn, Viewer, WebAuthorizer, QUERY_RPC};
use super::{api, assets, WebConn};
use crate::bes::invocation::service::InvocationsService;
use crate::bes::invocation::InvocationKey;
use crate::bes::store::EventStore;
use crate::gate::audit::bounded;
use crate::proto::gridgate::v1 as gg;
use crate::proto::gridgate::v1::invocations_server::Invocations as _;
use crate::reapi::digest::BlobKey;
use crate::reapi::resource::{self, Access};

/// A response body: whole, or a stream of events.
pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The end of the console output the page shows.
const CONSOLE_TAIL: i64 = 256 * 1024;
/// The end of a test log or stderr shown inline.
const SNIPPET_TAIL: u64 = 16 * 1024;
/// The most of a blob the blob page shows.
const BLOB_MAX: u64 = 4 << 20;
/// Longest invocation id accepted in a path.
const MAX_ID: usize = 256;
/// Largest request body read (the sign-out form).
const MAX_FORM: usize = 4096;
/// A comment on idle event streams, so proxies keep them open.
const KEEPALIVE: Duration = Duration::from_secs(45);
/// The ACL name of a CAS read.
const READ_RPC: &str = "Read";

/// Everything the routes need, built once.
pub(super) struct App {
    pub(super) authorizer: Arc<WebAuthorizer>,
    pub(super) service: InvocationsService,
    pub(super) store: Arc<dyn EventStore>,
    pub(super) cas: Option<Arc<crate::reapi::Instances>>,
    pub(super) sealer: Option<Sealer>,
    pub(super) oidc: Option<Oidc>,
    pub(super) changes: Arc<Changes>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) tls: bool,
    pub(super) connect_src: String,
    /// How often a live page reads its invocation again (a store shared
    /// with other replicas); None: only when told.
    pub(super) recheck: Option<Duration>,
}

/// What a live page watches: a version of its data, and whether it is over.
type Version = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, (u64, bool)> + Send + Sync>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn html(status: StatusCode, page: Markup) -> Response<Body> {
    respond(status, "text/html; charset=utf-8", page.into_string())
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

fn redirect(to: &str) -> Response<Body> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The security headers of every response: no inline script or style, no
/// framing, no sniffing, no caching of private pages, no referrer to other sites.
fn secure(headers: &mut http::HeaderMap, tls: bool, connect_src: &str) {
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{connect_src}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    if tls {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
}

/// The query string's pairs (the first of each name).
fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(q) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
    }
    out
}

fn http_status(code: Code) -> StatusCode {
    match code {
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn grpc_status_name(code: Code) -> &'static str {
    match code {
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::NotFound => "NOT_FOUND",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unavailable => "UNAVAILABLE",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        _ => "INTERNAL",
    }
}

/// What a page or API call ends with when it does not show its data.
enum Refusal {
    /// Credentials sent and refused (401, the reason).
    Credentials(String),
    /// Nothing the viewer may see here (anonymous: the sign-in page; else 403).
    NotVisible,
    /// The Gate said no to an instance the viewer named (403, the reason).
    Denied(String),
    /// A bad request (400).
    Bad(String),
    /// The service or store failed.
    Status(tonic::Status),
}

impl From<tonic::Status> for Refusal {
    fn from(s: tonic::Status) -> Refusal {
        match s.code() {
            Code::PermissionDenied => Refusal::Denied(s.message().to_string()),
            Code::InvalidArgument => Refusal::Bad(s.message().to_string()),
            _ => Refusal::Status(s),
        }
    }
}

/// The answer for an invocation the viewer cannot see: the same whether
/// it exists or not.
const NOT_VISIBLE: &str = "There is no invocation with this id that you may see: it does not \
    exist, or no rule lets you query its instance (QueryEventStreams).";

impl App {
    /// Answers one request.
    pub(super) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<WebConn>,
    ) -> Response<Body> {
        let mut r = self.route(req, &conn).await;
        secure(r.headers_mut(), self.tls, &self.connect_src);
        r
    }

    async fn route(&self, req: Request<Incoming>, conn: &WebConn) -> Response<Body> {
        let path = req.uri().path().to_string();
        if let Some((content_type, text)) = assets::get(&path) {
            let mut r = respond(StatusCode::OK, content_type, text);
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400"),
            );
            return r;
        }
        let api = path.starts_with("/api/");
        let post = req.method() == Method::POST;
        if !(req.method() == Method::GET
            || req.method() == Method::HEAD
            || (post && path == "/auth/sign-out"))
        {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "method not allowed\n",
            );
        }
        let viewer = match viewer::identify(
            &self.authorizer,
            self.sealer.as_ref(),
            self.oidc.as_ref(),
            req.headers(),
            conn,
        )
        .await
        {
            Ok(v) => v,
            Err(why) => {
                return self.refused(None, api, &path, Refusal::Credentials(why.to_string()))
            }
        };
        let q = query(&req);
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let result = match (post, segments.as_slice()) {
            (false, [""]) | (false, ["invocations"]) => self.list_page(&viewer, &q).await,
            (false, ["invocations", "live"]) => self.listing_events(&viewer),
            (false, ["invocation", id]) => self.invocation_page(&viewer, id, &q).await,
            (false, ["invocation", id, "live"]) => self.invocation_events(&viewer, id, &q).await,
            (false, ["invocation", id, "log"]) => self.whole_log(&viewer, id, &q).await,
            (false, ["blob"]) => self.blob_page(&viewer, &q).await,
            (false, ["auth", "sign-in"]) => Ok(self.sign_in(&viewer, &q).await),
            (false, ["auth", "callback"]) => Ok(self.callback(&req, &q).await),
            (true, ["auth", "sign-out"]) => Ok(self.sign_out(req, &viewer).await),
            (false, ["api", "v1", "invocations"]) => self.api_list(&viewer, &q).await,
            (false, ["api", "v1", "invocations", id]) => self.api_get(&viewer, id, &q).await,
            (false, ["api", "v1", "invocations", id, "log"]) => self.api_log(&viewer, id, &q).await,
            _ => {
                return if api {
                    json(
                        StatusCode::NOT_FOUND,
                        &api::error(404, "NOT_FOUND", "no such API path"),
                    )
                } else {
                    html(
                        StatusCode::NOT_FOUND,
                        pages::layout(
                            "Not found",
                            Some(&viewer),
                            None,
                            pages::sign_in::message("Not found", "There is no page here."),
                        ),
                    )
                }
            }
        };
        match result {
            Ok(r) => r,
            Err(refusal) => self.refused(Some(&viewer), api, &path, refusal),
        }
    }

    /// The one place a refusal becomes its response (and its audit line).
    fn refused(
        &self,
        viewer: Option<&Viewer>,
        api: bool,
        path: &str,
        refusal: Refusal,
    ) -> Response<Body> {
        let anonymous = viewer.is_none_or(Viewer::is_anonymous);
        let (status, name, reason) = match &refusal {
            Refusal::Credentials(why) => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", why.clone()),
            Refusal::NotVisible
                if self.authorizer.gate().method == crate::config::AuthMethod::None =>
            {
                (
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "There is no invocation with this id.".to_string(),
                )
            }
            Refusal::NotVisible if anonymous => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "sign in to see this".to_string(),
            ),
            Refusal::NotVisible => (
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                NOT_VISIBLE.to_string(),
            ),
            Refusal::Denied(why) => (StatusCode::FORBIDDEN, "PERMISSION_DENIED", why.clone()),
            Refusal::Bad(why) => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", why.clone()),
            Refusal::Status(s) => (
                http_status(s.code()),
                grpc_status_name(s.code()),
                s.message().to_string(),
            ),
        };
        if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
            tracing::info!(
                target: "gridgate::audit",
                path = %bounded(path),
                viewer = %bounded(&viewer.map(Viewer::display_name).unwrap_or_default()),
                status = status.as_u16(),
                "web: refused: {}",
                bounded(&reason)
            );
        }
        if api {
            let mut r = json(status, &api::error(status.as_u16(), name, &reason));
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return r;
        }
        let page = if status == StatusCode::UNAUTHORIZED {
            let note = match (&refusal, viewer.is_some_and(|v| v.session_ended)) {
                (Refusal::Credentials(why), _) => Some(why.as_str()),
                (_, true) => Some("Your session has ended: sign in again."),
                _ => None,
            };
            pages::layout(
                "Sign in",
                viewer,
                None,
                pages::sign_in::render(path, self.oidc.as_ref().map(Oidc::issuer), note),
            )
        } else {
            let title = match status {
                StatusCode::FORBIDDEN => "Not permitted",
                StatusCode::NOT_FOUND => "Not found",
                StatusCode::BAD_REQUEST => "Bad request",
                _ => "Unavailable",
            };
            pages::layout(title, viewer, None, pages::sign_in::message(title, &reason))
        };
        let mut r = html(status, page);
        if viewer.is_some_and(|v| v.session_ended) {
            if let Some(s) = &self.sealer {
                if let Ok(v) = HeaderValue::from_str(&s.clear_cookie(SESSION, "/")) {
                    r.headers_mut().append(header::SET_COOKIE, v);
                }
            }
        }
        r
    }

    // ---- data, through gridgate.v1.Invocations ----

    fn request<T>(viewer: &Viewer, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.extensions_mut().insert(viewer.admission());
        r
    }

    /// The invocation `id` as the viewer may see it: in `instance` when
    /// named, else in the first instance holding it that the viewer may query.
    async fn locate(
        &self,
        viewer: &Viewer,
        id: &str,
        instance: Option<&String>,
    ) -> Result<InvocationKey, Refusal> {
        if id.is_empty() || id.len() > MAX_ID {
            return Err(Refusal::Bad(format!(
                "an invocation id is 1 to {MAX_ID} bytes"
            )));
        }
        if let Some(instance) = instance {
            if !viewer.may(instance, QUERY_RPC) {
                return Err(if viewer.is_anonymous() {
                    Refusal::NotVisible
                } else {
                    Refusal::Denied(viewer.reason(instance, QUERY_RPC))
                });
            }
            return Ok(InvocationKey {
                instance: instance.clone(),
                invocation_id: id.to_string(),
            });
        }
        let instances = self
            .store
            .find_invocation(id)
            .await
            .map_err(|e| Refusal::Status(crate::bes::publish::store_status(&e)))?;
        instances
            .into_iter()
            .find(|i| viewer.may(i, QUERY_RPC))
            .map(|instance| InvocationKey {
                instance,
                invocation_id: id.to_string(),
            })
            .ok_or(Refusal::NotVisible)
    }

    /// The invocation with every target (all pages of GetInvocation).
    async fn whole(
        &self,
        viewer: &Viewer,
        key: &InvocationKey,
    ) -> Result<(gg::Invocation, Vec<gg::Target>), Refusal> {
        let mut targets = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = self
                .service
                .get_invocation(Self::request(
                    viewer,
                    gg::GetInvocationRequest {
                        instance_name: key.instance.clone(),
                        invocation_id: key.invocation_id.clone(),
                        page_size: 10_000,
                        page_token,
                    },
                ))
                .await
                .map_err(|s| {
                    if s.code() == Code::NotFound {
                        Refusal::NotVisible
                    } else {
                        s.into()
                    }
                })?
                .into_inner();
            targets.extend(r.targets);
            if r.next_page_token.is_empty() {
                let inv = r.invocation.ok_or(Refusal::NotVisible)?;
                return Ok((inv, targets));
            }
            page_token = r.next_page_token;
        }
    }

    async fn log(
        &self,
        viewer: &Viewer,
        key: &InvocationKey,
        offset: i64,
        limit: i32,
    ) -> Result<gg::GetLogResponse, Refusal> {
        Ok(self
            .service
            .get_log(Self::request(
                viewer,
                gg::GetLogRequest {
                    instance_name: key.instance.clone(),
                    invocation_id: key.invocation_id.clone(),
                    offset,
                    limit,
                },
            ))
            .await
            .map_err(|s| {
                if s.code() == Code::NotFound {
                    Refusal::NotVisible
                } else {
                    s.into()
                }
            })?
            .into_inner())
    }

    // ---- pages ----

    async fn invocation_page(
        &self,
        viewer: &Viewer,
        id: &str,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let key = self.locate(viewer, id, q.get("instance")).await?;
        let (inv, targets) = self.whole(viewer, &key).await?;
        let log_bytes = inv.counts.as_ref().map_or(0, |c| c.log_bytes);
        let from = (log_bytes - CONSOLE_TAIL).max(0);
        let console = self.log(viewer, &key, from, CONSOLE_TAIL as i32).await?;
        let console_text = String::from_utf8_lossy(&console.data);
        let mut snippets = HashMap::new();
        for uri in pages::invocation::inline_uris(&targets) {
            if let Ok(Some(s)) = self.blob_text(viewer, &uri, SNIPPET_TAIL, true).await {
                snippets.insert(uri, s);
            }
        }
        let filter = pages::invocation::TargetFilter {
            text: q.get("target").cloned().unwrap_or_default(),
            status: q.get("status").cloned().unwrap_or_else(|| "all".into()),
            page: q
                .get("target_page")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            tests_page: q.get("test_page").and_then(|p| p.parse().ok()).unwrap_or(0),
        };
        let view = pages::invocation::View {
            inv: &inv,
            targets: &targets,
            filter: &filter,
            snippets: &snippets,
            console: &console_text,
            console_from: from,
        };
        let running = matches!(
            inv.state(),
            gg::InvocationState::Running | gg::InvocationState::Unspecified
        );
        let live = running.then(|| {
            format!(
                "/invocation/{}/live?instance={}",
                pages::q(&key.invocation_id),
                pages::q(&key.instance)
            )
        });
        let title = format!("{} {}", pages::state(inv.state()).0, inv.command);
        Ok(html(
            StatusCode::OK,
            pages::layout(
                &title,
                Some(viewer),
                live.as_deref(),
                pages::invocation::render(&view),
            ),
        ))
    }

    async fn whole_log(
        &self,
        viewer: &Viewer,
        id: &str,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let key = self.locate(viewer, id, q.get("instance")).await?;
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let r = self.log(viewer, &key, offset, 0).await?;
            out.extend_from_slice(&r.data);
            if r.data.is_empty() || r.next_offset <= offset || out.len() > 256 << 20 {
                break;
            }
            offset = r.next_offset;
        }
        Ok(respond(StatusCode::OK, "text/plain; charset=utf-8", out))
    }

    async fn list_page(
        &self,
        viewer: &Viewer,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        let f = pages::list::Filters {
            instance: get("instance"),
            user: get("user"),
            state: get("state"),
            command: get("command"),
            pattern: get("pattern"),
            metadata: get("metadata"),
            since: get("since"),
            page_token: get("page_token"),
        };
        let since = match f.since.as_str() {
            "1h" => 3_600_000,
            "24h" => 86_400_000,
            "7d" => 7 * 86_400_000,
            "30d" => 30 * 86_400_000,
            _ => 0,
        };
        let req = gg::ListInvocationsRequest {
            instance_name: f.instance.clone(),
            user: f.user.clone(),
            state: pages::list::state_of(&f.state) as i32,
            command: f.command.clone(),
            pattern: f.pattern.clone(),
            metadata: if f.metadata.is_empty() {
                vec![]
            } else {
                vec![f.metadata.clone()]
            },
            started_after_millis: if since > 0 {
                crate::bes::store::now_millis() - since
            } else {
                0
            },
            page_size: 50,
            page_token: f.page_token.clone(),
            ..Default::default()
        };
        if !f.instance.is_empty() && !viewer.may(&f.instance, QUERY_RPC) {
            return Err(if viewer.is_anonymous() {
                Refusal::NotVisible
            } else {
                Refusal::Denied(viewer.reason(&f.instance, QUERY_RPC))
            });
        }
        let r = self
            .service
            .list_invocations(Self::request(viewer, req))
            .await?
            .into_inner();
        if r.invocations.is_empty()
            && viewer.is_anonymous()
            && f.page_token.is_empty()
            && !self.anonymous_sees_anything(viewer)
        {
            return Err(Refusal::NotVisible);
        }
        let live = r
            .invocations
            .iter()
            .any(|i| i.state() == gg::InvocationState::Running)
            .then_some("/invocations/live");
        Ok(html(
            StatusCode::OK,
            pages::layout(
                "Invocations",
                Some(viewer),
                live,
                pages::list::render(&f, &r.invocations, &r.next_page_token),
            ),
        ))
    }

    /// Whether some instance is open to this anonymous viewer.
    fn anonymous_sees_anything(&self, viewer: &Viewer) -> bool {
        let gate = self.authorizer.gate();
        gate.method == crate::config::AuthMethod::None
            || gate
                .unauthenticated_instances
                .iter()
                .any(|i| viewer.may(i, QUERY_RPC))
    }

    /// The text of a CAS blob named by a `bytestream://` URI, when the viewer
    /// may `Read` its instance: its end (`tail`) or its start.
    async fn blob_text(
        &self,
        viewer: &Viewer,
        uri: &str,
        max: u64,
        tail: bool,
    ) -> Result<Option<Snippet>, Refusal> {
        let Some(rest) = uri.strip_prefix("bytestream://") else {
            return Err(Refusal::Bad(
                "only bytestream:// URIs of gridgate's CAS can be opened".into(),
            ));
        };
        // bytestream://HOST[:PORT]/RESOURCE: the host is Bazel's name for
        // its remote cache; the resource names the instance and the blob.
        let resource_name = rest.split_once('/').map_or("", |(_, r)| r);
        let name = resource::parse(resource_name, Access::Read)
            .map_err(|e| Refusal::Bad(e.to_string()))?;
        if name.compressor.is_some() || name.digest_function.is_some() {
            return Err(Refusal::Bad(
                "compressed or non-SHA-256 blobs are not shown".into(),
            ));
        }
        if !viewer.may(name.instance, READ_RPC) {
            return Err(if viewer.is_anonymous() {
                Refusal::NotVisible
            } else {
                Refusal::Denied(viewer.reason(name.instance, READ_RPC))
            });
        }
        let key = BlobKey::parse(name.hash, name.size).map_err(|e| Refusal::Bad(e.to_string()))?;
        let Some(instance) = self.cas.as_ref().and_then(|c| c.get(name.instance).ok()) else {
            return Ok(None);
        };
        let (offset, limit) = if tail {
            (key.size.saturating_sub(max), max.min(key.size))
        } else {
            (0, max.min(key.size))
        };
        let Some(mut stream) = instance
            .store
            .read(&key, offset, limit)
            .await
            .map_err(|e| Refusal::Status(tonic::Status::unavailable(e.to_string())))?
        else {
            return Ok(None);
        };
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| Refusal::Status(tonic::Status::unavailable(e.to_string())))?;
            data.extend_from_slice(&chunk);
            if data.len() as u64 >= limit {
                break;
            }
        }
        Ok(Some(Snippet {
            text: String::from_utf8_lossy(&data).into_owned(),
            truncated: key.size > limit,
        }))
    }

    async fn blob_page(
        &self,
        viewer: &Viewer,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let uri = q.get("uri").cloned().unwrap_or_default();
        let Some(s) = self.blob_text(viewer, &uri, BLOB_MAX, false).await? else {
            return Err(Refusal::Status(tonic::Status::not_found(
                "that blob is not in gridgate's CAS (it may have been evicted)",
            )));
        };
        let body = maud::html! {
            h1 { "Blob" }
            p.mono.muted { (uri) }
            @if s.truncated { p.muted { "The first " (BLOB_MAX) " bytes:" } }
            pre.log { (pages::ansi::render(&s.text)) }
        };
        Ok(html(
            StatusCode::OK,
            pages::layout("Blob", Some(viewer), None, body),
        ))
    }

    // ---- live updates ----

    /// Server-sent events: `update` when `rx` changes (at most once a
    /// second) or, on a shared store, when `version` shows events stored by
    /// another replica; `done` when the invocation is over; a comment every
    /// [`KEEPALIVE`] so proxies keep the stream open. Nothing else runs while
    /// nothing happens.
    fn events(&self, mut rx: watch::Receiver<u64>, version: Version) -> Response<Body> {
        let mut stop = self.stop.clone();
        let recheck = self.recheck;
        let stream = async_events(move |tx| async move {
            let _ = tx.send(Bytes::from_static(b"retry: 5000\n\n")).await;
            let (mut seen, _) = version().await;
            let tick = recheck.unwrap_or(KEEPALIVE);
            let mut idle = Duration::ZERO;
            loop {
                let told = tokio::select! {
                    r = rx.changed() => match r { Ok(()) => true, Err(_) => break },
                    _ = tokio::time::sleep(tick) => false,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let (now, done) = if told || recheck.is_some() {
                    version().await
                } else {
                    (seen, false)
                };
                let msg: &'static [u8] = if done {
                    b"event: done\ndata: 1\n\n"
                } else if told || now != seen {
                    b"event: update\ndata: 1\n\n"
                } else {
                    idle += tick;
                    if idle < KEEPALIVE {
                        continue;
                    }
                    b": keepalive\n\n"
                };
                idle = Duration::ZERO;
                seen = now;
                if tx.send(Bytes::from_static(msg)).await.is_err() || done {
                    break;
                }
                // A burst of events makes one update: what arrives in this
                // second wakes the next `changed` at once.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut r = Response::new(stream);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    async fn invocation_events(
        &self,
        viewer: &Viewer,
        id: &str,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let key = self.locate(viewer, id, q.get("instance")).await?;
        let rx = self.changes.watch(&key);
        let store = self.store.clone();
        let version: Version = Arc::new(move || {
            let store = store.clone();
            let key = key.clone();
            Box::pin(async move {
                match store.get_invocation(&key).await {
                    Ok(Some(inv)) => (
                        inv.counts.as_ref().map_or(0, |c| c.events as u64),
                        !matches!(
                            inv.state(),
                            gg::InvocationState::Running | gg::InvocationState::Unspecified
                        ),
                    ),
                    _ => (0, true),
                }
            })
        });
        Ok(self.events(rx, version))
    }

    /// The list's stream says only "something changed" (no id, no
    /// instance: the page fetched again is what is authorized), and only to
    /// a viewer who may see some instance.
    fn listing_events(&self, viewer: &Viewer) -> Result<Response<Body>, Refusal> {
        if viewer.is_anonymous() && !self.anonymous_sees_anything(viewer) {
            return Err(Refusal::NotVisible);
        }
        Ok(self.events(
            self.changes.watch_listing(),
            Arc::new(|| Box::pin(async { (0, false) })),
        ))
    }

    // ---- sign-in ----

    async fn sign_in(&self, viewer: &Viewer, q: &HashMap<String, String>) -> Response<Body> {
        let next = oidc::local_path(q.get("next").map_or("/", String::as_str)).to_string();
        let (Some(oidc), Some(sealer)) = (&self.oidc, &self.sealer) else {
            return html(
                StatusCode::OK,
                pages::layout(
                    "Sign in",
                    Some(viewer),
                    None,
                    pages::sign_in::render(&next, None, None),
                ),
            );
        };
        match oidc.begin(&next).await {
            Ok((state, url)) => {
                let payload = serde_json::to_vec(&state).unwrap_or_default();
                let value = sealer.seal(SIGN_IN, &payload);
                let expires = crate::bes::store::now_millis() / 1000 + oidc::SIGN_IN_SECONDS;
                let mut r = redirect(&url);
                if let Ok(v) =
                    HeaderValue::from_str(&sealer.set_cookie(SIGN_IN, value, "/auth", expires))
                {
                    r.headers_mut().append(header::SET_COOKIE, v);
                }
                r
            }
            Err(e) => html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::layout(
                    "Sign in",
                    Some(viewer),
                    None,
                    pages::sign_in::message("Sign-in is unavailable", &e.to_string()),
                ),
            ),
        }
    }

    async fn callback(
        &self,
        req: &Request<Incoming>,
        q: &HashMap<String, String>,
    ) -> Response<Body> {
        let (Some(oidc), Some(sealer)) = (&self.oidc, &self.sealer) else {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "no sign-in configured\n",
            );
        };
        let failed = |status: StatusCode, why: String| {
            tracing::info!(target: "gridgate::audit", "web: sign-in failed: {}", bounded(&why));
            let mut r = html(
                status,
                pages::layout(
                    "Sign in",
                    None,
                    None,
                    pages::sign_in::message("Sign-in failed", &why),
                ),
            );
            if let Ok(v) = HeaderValue::from_str(&sealer.clear_cookie(SIGN_IN, "/auth")) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        };
        if let Some(e) = q.get("error") {
            return failed(
                StatusCode::UNAUTHORIZED,
                format!("the OpenID provider said: {}", bounded(e)),
            );
        }
        let kept: Option<SignInState> = session::cookie_value(req.headers(), SIGN_IN)
            .and_then(|v| sealer.open(SIGN_IN, &v))
            .and_then(|p| serde_json::from_slice(&p).ok());
        let (Some(kept), Some(code), Some(state)) = (kept, q.get("code"), q.get("state")) else {
            return failed(
                StatusCode::BAD_REQUEST,
                oidc::SignInError::State.to_string(),
            );
        };
        match oidc.finish(&kept, code, state).await {
            Ok((id_token, identity, exp)) => {
                let Some(csrf) = session::random_token(24) else {
                    return failed(StatusCode::SERVICE_UNAVAILABLE, "no randomness".into());
                };
                let payload = serde_json::to_vec(&SessionCookie {
                    t: id_token,
                    c: csrf,
                })
                .unwrap_or_default();
                let value = sealer.seal(SESSION, &payload);
                tracing::info!(
                    target: "gridgate::audit",
                    actor = %bounded(identity.actor.as_deref().unwrap_or("")),
                    "web: signed in"
                );
                let mut r = redirect(oidc::local_path(&kept.next));
                for c in [
                    sealer.set_cookie(SESSION, value, "/", exp),
                    sealer.clear_cookie(SIGN_IN, "/auth"),
                ] {
                    if let Ok(v) = HeaderValue::from_str(&c) {
                        r.headers_mut().append(header::SET_COOKIE, v);
                    }
                }
                r
            }
            Err(e) => failed(StatusCode::UNAUTHORIZED, e.to_string()),
        }
    }

    /// Sign-out: a POST from one of our pages (same origin) with the
    /// session's CSRF token.
    async fn sign_out(&self, req: Request<Incoming>, viewer: &Viewer) -> Response<Body> {
        let cross_site = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "same-origin" && v != "none");
        let body = http_body_util::Limited::new(req.into_body(), MAX_FORM)
            .collect()
            .await;
        let token = body.ok().and_then(|b| {
            form_urlencoded::parse(&b.to_bytes())
                .find(|(k, _)| k == "csrf")
                .map(|(_, v)| v.into_owned())
        });
        let ok = match (&viewer.how, token) {
            (SignedIn::Session { csrf }, Some(t)) => !cross_site && session::same_secret(csrf, &t),
            _ => false,
        };
        if !ok {
            return html(
                StatusCode::FORBIDDEN,
                pages::layout(
                    "Sign out",
                    Some(viewer),
                    None,
                    pages::sign_in::message(
                        "Not signed out",
                        "This sign-out did not come from a page of this site.",
                    ),
                ),
            );
        }
        let mut r = redirect("/");
        if let Some(s) = &self.sealer {
            if let Ok(v) = HeaderValue::from_str(&s.clear_cookie(SESSION, "/")) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        r
    }

    // ---- JSON API ----

    async fn api_list(
        &self,
        viewer: &Viewer,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let get = |k: &str| q.get(k).cloned().unwrap_or_default();
        let num = |k: &str| -> Result<i64, Refusal> {
            match q.get(k) {
                None => Ok(0),
                Some(v) => v
                    .parse()
                    .map_err(|_| Refusal::Bad(format!("{k} is not a number"))),
            }
        };
        let state = match q.get("state") {
            None => 0,
            Some(s) => gg::InvocationState::from_str_name(s)
                .or_else(|| {
                    gg::InvocationState::from_str_name(&format!(
                        "INVOCATION_STATE_{}",
                        s.to_ascii_uppercase()
                    ))
                })
                .map(|s| s as i32)
                .ok_or_else(|| {
                    Refusal::Bad(format!("state {:?} is not an InvocationState", bounded(s)))
                })?,
        };
        let metadata = match q.get("metadata") {
            None => vec![],
            Some(m) => vec![m.clone()],
        };
        let req = gg::ListInvocationsRequest {
            instance_name: get("instance"),
            user: get("user"),
            state,
            command: get("command"),
            pattern: get("pattern"),
            metadata,
            started_after_millis: num("startedAfter")?,
            started_before_millis: num("startedBefore")?,
            page_size: i32::try_from(num("pageSize")?)
                .map_err(|_| Refusal::Bad("pageSize is too large".into()))?,
            page_token: get("pageToken"),
            build_id: get("buildId"),
        };
        let r = self
            .service
            .list_invocations(Self::request(viewer, req))
            .await?
            .into_inner();
        Ok(json(StatusCode::OK, &api::list(&r)))
    }

    async fn api_get(
        &self,
        viewer: &Viewer,
        id: &str,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let key = self.locate(viewer, id, q.get("instance")).await?;
        let page_size = q.get("pageSize").map_or(Ok(0), |p| {
            p.parse()
                .map_err(|_| Refusal::Bad("pageSize is not a number".into()))
        })?;
        let r = self
            .service
            .get_invocation(Self::request(
                viewer,
                gg::GetInvocationRequest {
                    instance_name: key.instance,
                    invocation_id: key.invocation_id,
                    page_size,
                    page_token: q.get("pageToken").cloned().unwrap_or_default(),
                },
            ))
            .await
            .map_err(|s| {
                if s.code() == Code::NotFound {
                    Refusal::NotVisible
                } else {
                    s.into()
                }
            })?
            .into_inner();
        Ok(json(StatusCode::OK, &api::get(&r)))
    }

    async fn api_log(
        &self,
        viewer: &Viewer,
        id: &str,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let key = self.locate(viewer, id, q.get("instance")).await?;
        let offset = q.get("offset").map_or(Ok(0), |p| {
            p.parse()
                .map_err(|_| Refusal::Bad("offset is not a number".into()))
        })?;
        let limit = q.get("limit").map_or(Ok(0), |p| {
            p.parse()
                .map_err(|_| Refusal::Bad("limit is not a number".into()))
        })?;
        let r = self.log(viewer, &key, offset, limit).await?;
        Ok(json(StatusCode::OK, &api::log(&r)))
    }
}

/// A streamed body fed by a task: `produce` gets a sender of chunks; the
/// body ends when it returns or the client goes away.
fn async_events<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(produce(tx));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    StreamBody::new(stream).boxed_unsync()
}
