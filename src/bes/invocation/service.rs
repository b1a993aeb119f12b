//! `gridgate.v1.Invocations`: invocations read back (list with filters, one
//! invocation with its targets and tests, console output).
//!
//! Every RPC is authorized as `QueryEventStreams` (the Gate routes the three
//! methods under that ACL name, so policies written for event queries carry
//! over). `ListInvocations` without an instance returns only invocations of
//! instances the caller may query: the store lists in order and rows of other
//! instances are dropped, reading on until the page is full, a bounded number
//! of rounds (the page token then resumes where the reading stopped, so a
//! page may come back short but nothing is skipped). `GetInvocation` and
//! `GetLog` name their instance.
//!
//! Page tokens are opaque to clients (base64url of a small message) and are
//! checked like any input: a token that does not decode is INVALID_ARGUMENT;
//! one naming an instance the caller may not query yields nothing of it.

use std::sync::Arc;

use base64::Engine;
use prost::Message;
use tonic::{Request, Response, Status};

use super::InvocationKey;
use crate::bes::event::{check_id, check_instance, EventError};
use crate::bes::publish::store_status;
use crate::bes::query::QUERY_RPC;
use crate::bes::store::{Cursor, EventStore, InvocationQuery};
use crate::gate::Admission;
use crate::proto::gridgate::v1 as gg;

/// Default and largest invocations per ListInvocations page.
const LIST_DEFAULT: usize = 50;
const LIST_MAX: usize = 1000;
/// Rounds of reading a listing takes to fill a page before it returns it short.
const LIST_ROUNDS: usize = 8;
/// Default and largest targets per GetInvocation page.
const TARGETS_DEFAULT: usize = 1000;
const TARGETS_MAX: usize = 10_000;
/// Default and largest bytes per GetLog answer.
const LOG_MAX: usize = 1 << 20;
/// Longest filter string accepted.
const MAX_FILTER: usize = 4096;

/// The Invocations service.
pub struct InvocationsService {
    store: Arc<dyn EventStore>,
}

impl InvocationsService {
    /// The service over `store`.
    pub fn new(store: Arc<dyn EventStore>) -> InvocationsService {
        InvocationsService { store }
    }
}

/// A listing position, as page tokens carry it.
#[derive(Clone, PartialEq, Message)]
struct ListToken {
    #[prost(int64, tag = "1")]
    start_millis: i64,
    #[prost(string, tag = "2")]
    instance: String,
    #[prost(string, tag = "3")]
    invocation_id: String,
}

/// A target page position.
#[derive(Clone, PartialEq, Message)]
struct TargetToken {
    #[prost(string, tag = "1")]
    after_label: String,
}

fn encode_token(m: &impl Message) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m.encode_to_vec())
}

fn decode_token<M: Message + Default>(token: &str) -> Result<Option<M>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token is not one this server gave out");
    if token.len() > 8 * 1024 {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    M::decode(bytes.as_slice()).map(Some).map_err(|_| bad())
}

/// The caller's admission, or allow-all when no Gate set one.
fn admission<T>(request: &Request<T>) -> Admission {
    request
        .extensions()
        .get::<Admission>()
        .cloned()
        .unwrap_or_else(|| Admission::anonymous_allow_all(None, QUERY_RPC))
}

fn may(admission: &Admission, instance: &str) -> Result<(), Status> {
    if admission.may(instance, QUERY_RPC) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "no rule allows {QUERY_RPC} on instance {instance:?}"
        )))
    }
}

fn filter(s: &str, field: &str) -> Result<Option<String>, Status> {
    if s.len() > MAX_FILTER {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {MAX_FILTER}",
            s.len()
        )));
    }
    Ok((!s.is_empty()).then(|| s.to_string()))
}

fn page_size(n: i32, default: usize, max: usize, field: &str) -> Result<usize, Status> {
    match n {
        0 => Ok(default),
        n if n < 0 => Err(Status::invalid_argument(format!("{field} is negative"))),
        n => Ok((n as usize).min(max)),
    }
}

/// An id or instance from a request, within its limit
/// ([`check_id`], [`check_instance`]).
fn bounded_id(
    check: fn(&'static str, &str) -> Result<(), EventError>,
    s: &str,
    field: &'static str,
) -> Result<Option<String>, Status> {
    check(field, s).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((!s.is_empty()).then(|| s.to_string()))
}

/// The invocation named by a Get request, checked against the caller.
fn named(admission: &Admission, instance: &str, id: &str) -> Result<InvocationKey, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("invocation_id is empty"));
    }
    bounded_id(check_id, id, "invocation_id")?;
    bounded_id(check_instance, instance, "instance_name")?;
    may(admission, instance)?;
    Ok(InvocationKey {
        instance: instance.to_string(),
        invocation_id: id.to_string(),
    })
}

/// The request's filters as a store query.
fn query(req: &gg::ListInvocationsRequest) -> Result<InvocationQuery, Status> {
    let mut metadata = Vec::new();
    for m in &req.metadata {
        let (k, v) = m.split_once('=').ok_or_else(|| {
            Status::invalid_argument(format!(
                "metadata filter {:?} is not KEY=VALUE",
                m.chars().take(64).collect::<String>()
            ))
        })?;
        filter(m, "metadata")?;
        metadata.push((k.to_string(), v.to_string()));
    }
    let state = match gg::InvocationState::try_from(req.state) {
        Ok(gg::InvocationState::Unspecified) => None,
        Ok(s) => Some(s),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "state {} is not an InvocationState",
                req.state
            )))
        }
    };
    let token: Option<ListToken> = decode_token(&req.page_token)?;
    Ok(InvocationQuery {
        instance: bounded_id(check_instance, &req.instance_name, "instance_name")?,
        build_id: bounded_id(check_id, &req.build_id, "build_id")?,
        user: filter(&req.user, "user")?,
        state,
        command: filter(&req.command, "command")?,
        pattern: filter(&req.pattern, "pattern")?,
        metadata,
        started_after: (req.started_after_millis != 0).then_some(req.started_after_millis),
        started_before: (req.started_before_millis != 0).then_some(req.started_before_millis),
        after: token.map(|t| Cursor {
            start_millis: t.start_millis,
            instance: t.instance,
            invocation_id: t.invocation_id,
        }),
    })
}

#[tonic::async_trait]
impl gg::invocations_server::Invocations for InvocationsService {
    async fn list_invocations(
        &self,
        request: Request<gg::ListInvocationsRequest>,
    ) -> Result<Response<gg::ListInvocationsResponse>, Status> {
        let admission = admission(&request);
        let req = request.into_inner();
        let limit = page_size(req.page_size, LIST_DEFAULT, LIST_MAX, "page_size")?;
        let mut q = query(&req)?;
        if let Some(i) = &q.instance {
            may(&admission, i)?;
        }
        let mut out = Vec::with_capacity(limit);
        let mut last: Option<Cursor> = None;
        let mut more = false;
        for _ in 0..LIST_ROUNDS {
            let want = limit - out.len();
            let rows = self
                .store
                .list_invocations(&q, want)
                .await
                .map_err(|e| store_status(&e))?;
            more = rows.len() == want;
            for inv in rows {
                last = Some(Cursor::of(&inv));
                if admission.may(&inv.instance_name, QUERY_RPC) {
                    out.push(inv);
                }
            }
            if out.len() >= limit || !more {
                break;
            }
            q.after.clone_from(&last);
        }
        let next_page_token = match (more, last) {
            (true, Some(c)) => encode_token(&ListToken {
                start_millis: c.start_millis,
                instance: c.instance,
                invocation_id: c.invocation_id,
            }),
            _ => String::new(),
        };
        Ok(Response::new(gg::ListInvocationsResponse {
            invocations: out,
            next_page_token,
        }))
    }

    async fn get_invocation(
        &self,
        request: Request<gg::GetInvocationRequest>,
    ) -> Result<Response<gg::GetInvocationResponse>, Status> {
        let admission = admission(&request);
        let req = request.into_inner();
        let key = named(&admission, &req.instance_name, &req.invocation_id)?;
        let limit = page_size(req.page_size, TARGETS_DEFAULT, TARGETS_MAX, "page_size")?;
        let token: Option<TargetToken> = decode_token(&req.page_token)?;
        let Some(invocation) = self
            .store
            .get_invocation(&key)
            .await
            .map_err(|e| store_status(&e))?
        else {
            return Err(Status::not_found(format!(
                "no invocation {:?} in instance {:?}",
                key.invocation_id, key.instance
            )));
        };
        let after = token.map(|t| t.after_label);
        let targets = self
            .store
            .get_targets(&key, after.as_deref(), limit)
            .await
            .map_err(|e| store_status(&e))?;
        let next_page_token = match targets.last() {
            Some(t) if targets.len() == limit => encode_token(&TargetToken {
                after_label: t.label.clone(),
            }),
            _ => String::new(),
        };
        Ok(Response::new(gg::GetInvocationResponse {
            invocation: Some(invocation),
            targets,
            next_page_token,
        }))
    }

    async fn get_log(
        &self,
        request: Request<gg::GetLogRequest>,
    ) -> Result<Response<gg::GetLogResponse>, Status> {
        let admission = admission(&request);
        let req = request.into_inner();
        let key = named(&admission, &req.instance_name, &req.invocation_id)?;
        if req.offset < 0 {
            return Err(Status::invalid_argument("offset is negative"));
        }
        let limit = page_size(req.limit, LOG_MAX, LOG_MAX, "limit")?;
        let Some(inv) = self
            .store
            .get_invocation(&key)
            .await
            .map_err(|e| store_status(&e))?
        else {
            return Err(Status::not_found(format!(
                "no invocation {:?} in instance {:?}",
                key.invocation_id, key.instance
            )));
        };
        let chunks = self
            .store
            .get_log(&key, req.offset, limit)
            .await
            .map_err(|e| store_status(&e))?;
        let mut data = Vec::with_capacity(limit.min(64 * 1024));
        for (offset, text) in chunks {
            let end = offset + text.len() as i64;
            if end <= req.offset {
                continue;
            }
            let skip = usize::try_from(req.offset - offset)
                .unwrap_or(0)
                .min(text.len());
            let room = limit - data.len();
            let piece = &text[skip..];
            data.extend_from_slice(&piece[..piece.len().min(room)]);
            if data.len() >= limit {
                break;
            }
        }
        let next_offset = req.offset + data.len() as i64;
        let over = !matches!(
            inv.state(),
            gg::InvocationState::Running | gg::InvocationState::Unspecified
        );
        let log_bytes = inv.counts.map_or(0, |c| c.log_bytes);
        Ok(Response::new(gg::GetLogResponse {
            data: data.into(),
            offset: req.offset,
            next_offset,
            complete: over && next_offset >= log_bytes,
        }))
    }
}
