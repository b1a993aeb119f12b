//! The Build Event Service behind the Gate: one endpoint many teams' Bazel
//! clients stream to, each team's events private to the team.
//!
//! - [`publish`]: `google.devtools.build.v1.PublishBuildEvent` (lifecycle
//!   events and tool event streams, acknowledged after storing);
//! - [`query`]: BuildGrid's `build.buildgrid.QueryBuildEvents` and gridgate's
//!   `gridgate.v1.BuildEvents` (filters, streamed results);
//! - [`store`]: the store interface and its memory, file and PostgreSQL backends;
//! - [`event`]: stream keys, event kinds and the checks on every event;
//! - [`redact`]: credentials overwritten before an event is stored;
//! - [`retention`]: old streams deleted, silent invocations marked abandoned;
//! - [`invocation`]: the Build Event Protocol decoded into invocations;
//! - [`cli`]: `gridgate events query`.
//!
//! For the Gate's route table (gRPC path → ACL name, where the instance is):
//!
//! | path | ACL name | instance |
//! |---|---|---|
//! | `/google.devtools.build.v1.PublishBuildEvent/PublishLifecycleEvent` | `PublishLifecycleEvent` | `project_id` (field 6, string) |
//! | `/google.devtools.build.v1.PublishBuildEvent/PublishBuildToolEventStream` | `PublishBuildToolEventStream` | `project_id` (field 6) of the first message |
//! | `/build.buildgrid.QueryBuildEvents/QueryEventStreams` | `QueryEventStreams` | `instance_name` (field 2, string); empty = every instance the caller may query |
//! | `/gridgate.v1.BuildEvents/QueryEventStreams` | `QueryEventStreams` | `instance_name` (field 2, string); same rule |
//! | `/gridgate.v1.Invocations/{ListInvocations,GetInvocation,GetLog}` | `QueryEventStreams` | `instance_name` (field 1, string); same rule |

pub mod cli;
pub mod event;
pub mod invocation;
pub mod publish;
pub mod query;
pub mod redact;
pub mod retention;
pub mod store;

use std::sync::Arc;

use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

use crate::config::{Compression, Config};
use crate::proto::build::buildgrid::query_build_events_server::QueryBuildEventsServer;
use crate::proto::google::devtools::build::v1::publish_build_event_server::PublishBuildEventServer;
use crate::proto::gridgate::v1::build_events_server::BuildEventsServer;
use crate::proto::gridgate::v1::invocations_server::InvocationsServer;
use store::{EventStore, StoreError};

/// Room for a request's fields around its event when limiting message sizes.
const REQUEST_SLACK: usize = 64 * 1024;

/// The BES services over one opened store, ready to be added to the router.
pub struct BesServices {
    store: Arc<dyn EventStore>,
    max_event_bytes: usize,
    max_message_bytes: usize,
}

impl BesServices {
    /// Opens the configured store (`build-events:`).
    pub async fn open(config: &Config) -> Result<BesServices, StoreError> {
        let store = store::open(&config.build_events).await?;
        retention::spawn(&store, config.build_events_limits);
        Ok(BesServices::with_store(store, config))
    }

    /// The services over an already opened store.
    pub fn with_store(store: Arc<dyn EventStore>, config: &Config) -> BesServices {
        BesServices {
            store,
            max_event_bytes: config.build_events_limits.max_event_bytes,
            max_message_bytes: config.limits.max_message_bytes,
        }
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }

    /// Adds PublishBuildEvent, QueryBuildEvents, gridgate's BuildEvents and Invocations to
    /// `routes`; returns their service names (for reflection).
    pub fn add_to(self, routes: &mut RoutesBuilder, compression: Compression) -> Vec<&'static str> {
        let publish = PublishBuildEventServer::new(publish::PublishService::new(
            self.store.clone(),
            self.max_event_bytes,
        ))
        // Let oversized events through decoding so they get a clear
        // INVALID_ARGUMENT naming the limit instead of tonic's OUT_OF_RANGE.
        .max_decoding_message_size(
            self.max_event_bytes.max(self.max_message_bytes) + REQUEST_SLACK,
        );
        routes.add_service(compressed!(publish, compression));
        routes.add_service(compressed!(
            QueryBuildEventsServer::new(query::QueryService::new(
                self.store.clone(),
                self.max_message_bytes,
            )),
            compression
        ));
        routes.add_service(compressed!(
            BuildEventsServer::new(query::EventsService::new(self.store.clone())),
            compression
        ));
        routes.add_service(compressed!(
            InvocationsServer::new(invocation::service::InvocationsService::new(self.store)),
            compression
        ));
        vec![
            <PublishBuildEventServer<publish::PublishService> as NamedService>::NAME,
            <QueryBuildEventsServer<query::QueryService> as NamedService>::NAME,
            <BuildEventsServer<query::EventsService> as NamedService>::NAME,
            <InvocationsServer<invocation::service::InvocationsService> as NamedService>::NAME,
        ]
    }
}
