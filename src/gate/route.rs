//! The route table: every gRPC path gridgate serves, the RPC name ACLs use for
//! it, and where its instance name lives.
//!
//! A path that is not in this table is refused with UNIMPLEMENTED before any
//! handler runs, so adding a service without a route entry cannot open a hole.
//! RPC names are BuildGrid's: the bare method name (`FindMissingBlobs`, `Write`).

use std::collections::HashMap;

use crate::reapi::resource::{self, Access};

use super::scan::{self, ScanError};

/// Where a request's instance name is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locate {
    /// A string field of the request message (REAPI `instance_name` = 1,
    /// ListOperations `name` = 4, BES `project_id` = 6).
    Field(u32),
    /// An operation name `{instance}/{id}`: the instance is everything before
    /// the last `/` ("" when there is none), as BuildGrid parses it.
    OperationName(u32),
    /// A ByteStream `resource_name` (field 1) read with the REAPI grammar.
    Resource(Access),
    /// A query over instances: the optional instance in this field narrows it;
    /// when empty, the service returns only what the caller may see.
    QueryScope(u32),
    /// No instance: health checks and reflection.
    None,
}

/// How the later messages of a client stream are held to the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCheck {
    /// Unary or server-streaming: one request message.
    Single,
    /// ByteStream Write: every later `resource_name` is the first's or empty.
    WriteResource,
    /// PublishBuildToolEventStream: `project_id` and `stream_id` as in the first.
    BuildEventStream,
    /// Client streams the Gate does not look into (health, reflection).
    Unchecked,
}

/// Whether a route is served without credentials when so configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Openness {
    /// Every call needs admission.
    Gated,
    /// grpc.health.v1: open when `open-health` (default).
    Health,
    /// Server reflection: open when `open-reflection` (default).
    Reflection,
}

/// One routed RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The name ACLs use.
    pub rpc: &'static str,
    /// The fully-qualified service.
    pub service: &'static str,
    /// Where its instance name is read.
    pub locate: Locate,
    /// How a client stream's later messages are checked against the first.
    pub stream: StreamCheck,
    /// Whether it may be served without credentials.
    pub open: Openness,
}

const REAPI: &str = "build.bazel.remote.execution.v2";

/// Every route gridgate knows, as (service, method, locate, stream check, openness).
#[rustfmt::skip]
const ROUTES: &[(&str, &str, Locate, StreamCheck, Openness)] = {
    use Locate::*;
    use Openness::*;
    use StreamCheck::*;
    &[
        // REAPI v2
        ("build.bazel.remote.execution.v2.Capabilities", "GetCapabilities", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "FindMissingBlobs", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "BatchUpdateBlobs", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "BatchReadBlobs", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "GetTree", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "SplitBlob", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", "SpliceBlob", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ActionCache", "GetActionResult", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.ActionCache", "UpdateActionResult", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.Execution", "Execute", Field(1), Single, Gated),
        ("build.bazel.remote.execution.v2.Execution", "WaitExecution", OperationName(1), Single, Gated),
        // google.longrunning (ListOperations' `name` is the instance itself, as BuildGrid reads it)
        ("google.longrunning.Operations", "GetOperation", OperationName(1), Single, Gated),
        ("google.longrunning.Operations", "CancelOperation", OperationName(1), Single, Gated),
        ("google.longrunning.Operations", "DeleteOperation", OperationName(1), Single, Gated),
        ("google.longrunning.Operations", "WaitOperation", OperationName(1), Single, Gated),
        ("google.longrunning.Operations", "ListOperations", Field(4), Single, Gated),
        // ByteStream
        ("google.bytestream.ByteStream", "Read", Resource(Access::Read), Single, Gated),
        ("google.bytestream.ByteStream", "Write", Resource(Access::Write), WriteResource, Gated),
        ("google.bytestream.ByteStream", "QueryWriteStatus", Resource(Access::Write), Single, Gated),
        // Build Event Service (gridgate.v1's filtered query needs the same permission)
        ("google.devtools.build.v1.PublishBuildEvent", "PublishLifecycleEvent", Field(6), Single, Gated),
        ("google.devtools.build.v1.PublishBuildEvent", "PublishBuildToolEventStream", Field(6), BuildEventStream, Gated),
        ("build.buildgrid.QueryBuildEvents", "QueryEventStreams", QueryScope(2), Single, Gated),
        ("gridgate.v1.BuildEvents", "QueryEventStreams", QueryScope(2), Single, Gated),
        ("gridgate.v1.Invocations", "ListInvocations", QueryScope(1), Single, Gated),
        ("gridgate.v1.Invocations", "GetInvocation", QueryScope(1), Single, Gated),
        ("gridgate.v1.Invocations", "GetLog", QueryScope(1), Single, Gated),
        // Health and reflection
        ("grpc.health.v1.Health", "Check", None, Single, Health),
        ("grpc.health.v1.Health", "Watch", None, Single, Health),
        ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", None, Unchecked, Reflection),
        ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", None, Unchecked, Reflection),
    ]
};

/// Methods whose ACL name is not their own: (service, method, ACL name). The
/// invocation API reads what the events say, so the rules that allow
/// `QueryEventStreams` allow it too.
const ACL_NAMES: &[(&str, &str, &str)] = &[
    (
        "gridgate.v1.Invocations",
        "ListInvocations",
        "QueryEventStreams",
    ),
    (
        "gridgate.v1.Invocations",
        "GetInvocation",
        "QueryEventStreams",
    ),
    ("gridgate.v1.Invocations", "GetLog", "QueryEventStreams"),
];

/// The ACL name of a routed method.
fn acl_name(service: &str, method: &'static str) -> &'static str {
    ACL_NAMES
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map_or(method, |(_, _, acl)| acl)
}

/// The route table, keyed by gRPC path (`/package.Service/Method`).
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: HashMap<String, Route>,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::new()
    }
}

impl RouteTable {
    /// The table of every RPC gridgate serves or forwards.
    pub fn new() -> RouteTable {
        let routes = ROUTES
            .iter()
            .map(|&(service, method, locate, stream, open)| {
                (
                    format!("/{service}/{method}"),
                    Route {
                        rpc: acl_name(service, method),
                        service,
                        locate,
                        stream,
                        open,
                    },
                )
            })
            .collect();
        RouteTable { routes }
    }

    /// The route for a request path.
    pub fn get(&self, path: &str) -> Option<&Route> {
        self.routes.get(path)
    }

    /// Every RPC name, for `policy check`'s unknown-name warnings.
    pub fn rpc_names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = ROUTES.iter().map(|r| acl_name(r.0, r.1)).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Whether a service is a REAPI service (for upstream forwarding).
    pub fn is_reapi(service: &str) -> bool {
        service.starts_with(REAPI)
            || service == "google.bytestream.ByteStream"
            || service == "google.longrunning.Operations"
    }
}

/// Why the instance could not be read from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocateError {
    /// The request message does not decode far enough to read the field.
    Malformed(ScanError),
    /// The ByteStream resource name does not follow REAPI's grammar.
    Resource(resource::ResourceError),
}

impl std::fmt::Display for LocateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocateError::Malformed(e) => write!(f, "malformed request: {e}"),
            LocateError::Resource(e) => e.fmt(f),
        }
    }
}

/// The instance named by a request message (the first message of a stream).
///
/// Returns `None` for routes without an instance, and for a [`Locate::QueryScope`]
/// request that names none.
pub fn locate(route: &Route, message: &[u8]) -> Result<Option<String>, LocateError> {
    let s = |field: u32| scan::string_at(message, &[field]).map_err(LocateError::Malformed);
    Ok(match route.locate {
        Locate::None => None,
        Locate::Field(f) => Some(s(f)?.to_string()),
        Locate::OperationName(f) => {
            let name = s(f)?;
            Some(name.rsplit_once('/').map_or("", |(i, _)| i).to_string())
        }
        Locate::Resource(access) => {
            let name = s(1)?;
            Some(
                resource::instance_of(name, access)
                    .map_err(LocateError::Resource)?
                    .to_string(),
            )
        }
        Locate::QueryScope(f) => {
            let name = s(f)?;
            (!name.is_empty()).then(|| name.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::google::longrunning as lro;
    use prost::Message;

    #[test]
    fn every_route_is_reachable_and_unknown_paths_are_not() {
        let t = RouteTable::new();
        let r = t
            .get("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs")
            .unwrap();
        assert_eq!(r.rpc, "FindMissingBlobs");
        assert!(t.get("/build.bazel.remote.execution.v2.Foo/Bar").is_none());
        assert!(t.get("").is_none());
        assert_eq!(t.routes.len(), ROUTES.len(), "no duplicate paths");
    }

    #[test]
    fn operation_names_and_list_operations() {
        let t = RouteTable::new();
        let get = t
            .get("/google.longrunning.Operations/GetOperation")
            .unwrap();
        let msg = lro::GetOperationRequest {
            name: "team-a/sub/1234".into(),
        }
        .encode_to_vec();
        assert_eq!(locate(get, &msg).unwrap().as_deref(), Some("team-a/sub"));
        let msg = lro::GetOperationRequest {
            name: "1234".into(),
        }
        .encode_to_vec();
        assert_eq!(locate(get, &msg).unwrap().as_deref(), Some(""));
        let list = t
            .get("/google.longrunning.Operations/ListOperations")
            .unwrap();
        let msg = lro::ListOperationsRequest {
            name: "team-a".into(),
            filter: "x".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(locate(list, &msg).unwrap().as_deref(), Some("team-a"));
    }

    #[test]
    fn the_invocation_api_is_authorized_as_queryeventstreams() {
        let t = RouteTable::new();
        for m in ["ListInvocations", "GetInvocation", "GetLog"] {
            let r = t.get(&format!("/gridgate.v1.Invocations/{m}")).unwrap();
            assert_eq!(
                (r.rpc, r.locate),
                ("QueryEventStreams", Locate::QueryScope(1))
            );
        }
        assert!(!RouteTable::rpc_names().contains(&"ListInvocations"));
    }

    #[test]
    fn rpc_names_are_buildgrids() {
        let names = RouteTable::rpc_names();
        for n in [
            "Write",
            "Read",
            "GetActionResult",
            "PublishBuildToolEventStream",
            "QueryEventStreams",
        ] {
            assert!(names.contains(&n), "{n}");
        }
    }
}
