//! The PostgreSQL build event store, for several gateway replicas behind one
//! load balancer sharing their events (`build-events.store: { postgres: URL }`).
//!
//! - The schema is migrated on start, under a transaction-scoped advisory lock
//!   so replicas starting together do not race (`bes_migrations` records the
//!   applied versions). Tables go into the first schema of the connection's
//!   `search_path`; choose another with `?options=-c%20search_path%3DNAME`.
//! - A publish runs in one transaction that locks the stream's row
//!   (`SELECT … FOR UPDATE`), so two replicas receiving retransmissions of one
//!   stream apply them one after the other: sequence checks see each other's
//!   commits, and the primary key `(stream, seq)` with `ON CONFLICT DO NOTHING`
//!   guarantees an event is never stored twice. A stream is created with
//!   `INSERT … ON CONFLICT DO NOTHING` on its unique key, so two replicas
//!   creating it at once agree on one row.
//! - [`EventStore::publish_events`] returns after `COMMIT`, so an
//!   acknowledged event is durable. PostgreSQL itself batches concurrent
//!   commits into shared WAL flushes.
//! - Connections come from a small deadpool pool (16). Connections are made
//!   without TLS (`NoTls`): use a local or otherwise protected network.

use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::{BoxFuture, FutureExt};
use regex::Regex;
use tokio_postgres::NoTls;

use super::{
    build_id_prefix, check_event, EventFilter, EventStore, InvocationQuery, Outcome, Published,
    Step, StoreError, StoreStats, StoredEvent, StreamInfo, Swept,
};
use crate::bes::event::{EventKind, Prepared, StreamKey};
use crate::bes::invocation::{model, Fact, InvocationKey};
use crate::proto::gridgate::v1 as gg;
use bytes::Bytes;
use prost::Message;

/// Connections in the pool.
const POOL_SIZE: usize = 16;

/// The schema, one entry per version; never edit an applied entry, add one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE bes_streams (
    id            BIGSERIAL PRIMARY KEY,
    build_id      TEXT NOT NULL,
    invocation_id TEXT NOT NULL,
    component     INTEGER NOT NULL,
    instance      TEXT NOT NULL,
    last_seq      BIGINT NOT NULL DEFAULT 0,
    finished      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (build_id, invocation_id, component)
);
CREATE INDEX bes_streams_instance ON bes_streams (instance);
CREATE TABLE bes_events (
    stream        BIGINT NOT NULL REFERENCES bes_streams (id) ON DELETE CASCADE,
    seq           BIGINT NOT NULL,
    kind          SMALLINT NOT NULL,
    event_time_us BIGINT,
    body          BYTEA NOT NULL,
    PRIMARY KEY (stream, seq)
);
"#,
    // Streams are keyed by their instance too, so two instances' streams of
    // one build id never collide. Existing rows were unique without it, so
    // they stay unique with it. `text_pattern_ops` lets build-id equality and
    // prefix (`LIKE 'p%'`) lookups use the index whatever the collation.
    r#"
ALTER TABLE bes_streams DROP CONSTRAINT bes_streams_build_id_invocation_id_component_key;
CREATE UNIQUE INDEX bes_streams_key
    ON bes_streams (build_id text_pattern_ops, invocation_id, component, instance);
"#,
    // Invocations, built from the events at ingest. Streams stored before
    // this have `indexed` false: their invocations are built from their
    // stored events by the first publish that touches them or by the
    // backfill that runs after start, whichever locks the stream first.
    // Identifiers and labels sort bytewise (COLLATE "C"), as in every store.
    r#"
ALTER TABLE bes_streams ADD COLUMN indexed BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX bes_streams_unindexed ON bes_streams (id) WHERE NOT indexed;
-- When the stream's last event was stored (ms since the epoch), for retention;
-- streams from before count from their creation.
ALTER TABLE bes_streams ADD COLUMN updated_ms BIGINT NOT NULL DEFAULT 0;
UPDATE bes_streams SET updated_ms = (extract(epoch FROM created_at) * 1000)::BIGINT;
CREATE INDEX bes_streams_updated ON bes_streams (updated_ms);
CREATE TABLE bes_invocations (
    instance      TEXT COLLATE "C" NOT NULL,
    invocation_id TEXT COLLATE "C" NOT NULL,
    build_id      TEXT NOT NULL,
    started_ms    BIGINT NOT NULL,
    state         SMALLINT NOT NULL,
    user_name     TEXT NOT NULL,
    command       TEXT NOT NULL,
    patterns      TEXT[] NOT NULL,
    metadata      TEXT[] NOT NULL,  -- build metadata as KEY=VALUE
    last_event_ms BIGINT NOT NULL,
    updated_ms    BIGINT NOT NULL,
    body          BYTEA NOT NULL,
    PRIMARY KEY (instance, invocation_id)
);
CREATE INDEX bes_invocations_listing ON bes_invocations (started_ms, instance, invocation_id);
CREATE INDEX bes_invocations_instance_listing
    ON bes_invocations (instance, started_ms, invocation_id);
CREATE INDEX bes_invocations_build ON bes_invocations (build_id);
CREATE INDEX bes_invocations_running ON bes_invocations (updated_ms) WHERE state = 1;
CREATE TABLE bes_targets (
    instance      TEXT COLLATE "C" NOT NULL,
    invocation_id TEXT COLLATE "C" NOT NULL,
    label         TEXT COLLATE "C" NOT NULL,
    body          BYTEA NOT NULL,
    PRIMARY KEY (instance, invocation_id, label)
);
CREATE TABLE bes_logs (
    instance      TEXT COLLATE "C" NOT NULL,
    invocation_id TEXT COLLATE "C" NOT NULL,
    byte_offset   BIGINT NOT NULL,
    data          BYTEA NOT NULL,
    PRIMARY KEY (instance, invocation_id, byte_offset)
);
"#,
    // Invocation pages are reached by id alone (Bazel's results URL has no
    // instance): find its instances without a scan.
    r#"
CREATE INDEX bes_invocations_id ON bes_invocations (invocation_id);
"#,
];

/// The advisory lock key taken while migrating ("gridgate" in ASCII, folded).
const MIGRATION_LOCK: i64 = 0x6772_6964_6761_7465;

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
    stored: AtomicU64,
    /// Where the next retention batch starts looking (`updated_ms`): the
    /// newest age the last batch deleted. The rows it deleted stay in the
    /// index as dead entries until vacuum, and a scan from the oldest end
    /// would step over all of them for every batch. A hint only: a sweep
    /// that comes up short starts again from the oldest end.
    sweep_from: AtomicI64,
    duplicates: AtomicU64,
}

fn pg_error(what: &str, e: tokio_postgres::Error) -> StoreError {
    if e.as_db_error().is_some() {
        StoreError::Internal(format!("{what}: {e}"))
    } else {
        StoreError::Unavailable(format!("{what}: {e}"))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("no PostgreSQL connection: {e}"))
}

impl PostgresStore {
    /// Connects to `url` and migrates the schema. Fails if the database cannot
    /// be reached within a few seconds.
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Internal(format!("the PostgreSQL URL is not valid: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| StoreError::Internal(format!("PostgreSQL pool: {e}")))?;
        let store = PostgresStore {
            pool,
            stored: AtomicU64::new(0),
            sweep_from: AtomicI64::new(i64::MIN),
            duplicates: AtomicU64::new(0),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations not applied yet.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_error("migrating", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| pg_error("migration lock", e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS bes_migrations (
                 version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|e| pg_error("migrating", e))?;
        let applied: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM bes_migrations", &[])
            .await
            .map_err(|e| pg_error("migrating", e))?
            .get(0);
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i32 + 1;
            if version <= applied {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(|e| pg_error(&format!("migration {version}"), e))?;
            tx.execute(
                "INSERT INTO bes_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(|e| pg_error("migrating", e))?;
            tracing::info!(version, "build events: PostgreSQL schema migrated");
        }
        tx.commit().await.map_err(|e| pg_error("migrating", e))
    }

    async fn publish(&self, events: &[Prepared]) -> Result<Published, StoreError> {
        let mut out = Published::default();
        let Some(first) = events.first() else {
            return Ok(out);
        };
        let key = &first.stream;
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_error("publish", e))?;
        // Statements are prepared once per connection (saves a round trip each).
        let lock = tx
            .prepare_cached(
                "SELECT id, last_seq, finished, indexed FROM bes_streams
                 WHERE build_id = $1 AND invocation_id = $2 AND component = $3 AND instance = $4
                 FOR UPDATE",
            )
            .await
            .map_err(|e| pg_error("publish", e))?;
        let args: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [
            &key.build_id,
            &key.invocation_id,
            &key.component,
            &key.instance,
        ];
        let row = tx
            .query_opt(&lock, &args)
            .await
            .map_err(|e| pg_error("publish", e))?;
        let mut id: Option<i64> = row.as_ref().map(|r| r.get(0));
        let mut indexed: bool = row.as_ref().is_none_or(|r| r.get(3));
        let mut state = row.map(|r| StreamInfo {
            key: key.clone(),
            last_seq: r.get(1),
            finished: r.get(2),
        });
        let before = state.clone();

        let mut new: Vec<&Prepared> = Vec::new();
        let mut dups: Vec<(usize, i64)> = Vec::new();
        for event in events {
            if event.stream != *key {
                break; // The service sends one stream per call.
            }
            let step = loop {
                match check_event(&mut state, event) {
                    Ok(Step::Create) => {
                        let created = tx
                            .query_opt(
                                "INSERT INTO bes_streams (build_id, invocation_id, component, instance, indexed)
                                 VALUES ($1, $2, $3, $4, TRUE)
                                 ON CONFLICT (build_id, invocation_id, component, instance) DO NOTHING
                                 RETURNING id",
                                &args,
                            )
                            .await
                            .map_err(|e| pg_error("creating the stream", e))?;
                        if let Some(r) = created {
                            id = Some(r.get(0));
                            break Ok(Step::Create);
                        }
                        // Another replica created it meanwhile: lock its row
                        // (waiting for its commit) and check again.
                        let r = tx
                            .query_one(&lock, &args)
                            .await
                            .map_err(|e| pg_error("publish", e))?;
                        id = Some(r.get(0));
                        indexed = r.get(3);
                        state = Some(StreamInfo {
                            key: key.clone(),
                            last_seq: r.get(1),
                            finished: r.get(2),
                        });
                    }
                    other => break other,
                }
            };
            match step {
                Ok(Step::Create | Step::Append) => {
                    new.push(event);
                    out.outcomes.push(Outcome::Stored);
                }
                Ok(Step::Duplicate) => {
                    dups.push((out.outcomes.len(), event.seq));
                    out.outcomes.push(Outcome::Duplicate { identical: false });
                }
                Err(r) => {
                    out.rejection = Some(r);
                    break;
                }
            }
        }

        if let (Some(id), false) = (id, dups.is_empty()) {
            let seqs: Vec<i64> = dups.iter().map(|(_, s)| *s).collect();
            let rows = tx
                .query(
                    "SELECT seq, body FROM bes_events WHERE stream = $1 AND seq = ANY($2)",
                    &[&id, &seqs],
                )
                .await
                .map_err(|e| pg_error("reading stored events", e))?;
            for row in rows {
                let seq: i64 = row.get(0);
                let body: &[u8] = row.get(1);
                for (i, s) in &dups {
                    let Some(event) = events.get(*i) else {
                        continue;
                    };
                    if *s == seq && event.body.as_ref() == body {
                        out.outcomes[*i] = Outcome::Duplicate { identical: true };
                    }
                }
            }
        }

        if let (Some(id), Some(info), false) = (id, &state, new.is_empty()) {
            let seqs: Vec<i64> = new.iter().map(|e| e.seq).collect();
            let kinds: Vec<i16> = new.iter().map(|e| e.kind as i16).collect();
            let times: Vec<Option<i64>> = new.iter().map(|e| e.time_micros).collect();
            let bodies: Vec<&[u8]> = new.iter().map(|e| e.body.as_ref()).collect();
            let insert = tx
                .prepare_cached(
                    "INSERT INTO bes_events (stream, seq, kind, event_time_us, body)
                     SELECT $1, * FROM UNNEST($2::BIGINT[], $3::SMALLINT[], $4::BIGINT[], $5::BYTEA[])
                     ON CONFLICT (stream, seq) DO NOTHING",
                )
                .await
                .map_err(|e| pg_error("storing events", e))?;
            let inserted = tx
                .execute(&insert, &[&id, &seqs, &kinds, &times, &bodies])
                .await
                .map_err(|e| pg_error("storing events", e))?;
            if inserted as usize != new.len() {
                // Cannot happen while every writer holds the row lock; the
                // constraint still kept the events single.
                tracing::warn!(
                    stream = %key,
                    expected = new.len(),
                    inserted,
                    "build events: some events were already stored"
                );
            }
            if !indexed {
                // A stream stored before invocations were indexed: build
                // its invocation from its older events first.
                index_stream(&tx, id, key, new.first().map_or(i64::MAX, |e| e.seq)).await?;
                tx.execute(
                    "UPDATE bes_streams SET indexed = TRUE WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| pg_error("updating the stream", e))?;
            }
            update_invocation(&tx, key, &new).await?;
            if before.as_ref() != Some(info) {
                let update = tx
                    .prepare_cached(
                        "UPDATE bes_streams SET last_seq = $2, finished = $3, updated_ms = $4
                         WHERE id = $1",
                    )
                    .await
                    .map_err(|e| pg_error("updating the stream", e))?;
                tx.execute(
                    &update,
                    &[&id, &info.last_seq, &info.finished, &super::now_millis()],
                )
                .await
                .map_err(|e| pg_error("updating the stream", e))?;
            }
        }
        tx.commit().await.map_err(|e| pg_error("commit", e))?;
        self.stored.fetch_add(new.len() as u64, Ordering::Relaxed);
        self.duplicates
            .fetch_add(dups.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    async fn matching(
        &self,
        pattern: &Regex,
        instance: Option<&str>,
    ) -> Result<Vec<StreamInfo>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // A pattern anchored at the start with a literal prefix reads only
        // the build ids with that prefix (an index range); others read every
        // stream key. The regex decides in the end either way.
        let like = build_id_prefix(pattern.as_str()).map(|p| format!("{}%", like_escape(&p)));
        let rows = client
            .query(
                "SELECT build_id, invocation_id, component, instance, last_seq, finished
                 FROM bes_streams WHERE ($1::TEXT IS NULL OR instance = $1)
                   AND ($2::TEXT IS NULL OR build_id LIKE $2)",
                &[&instance, &like],
            )
            .await
            .map_err(|e| pg_error("listing streams", e))?;
        let mut out: Vec<StreamInfo> = rows
            .into_iter()
            .map(|r| StreamInfo {
                key: StreamKey {
                    build_id: r.get(0),
                    invocation_id: r.get(1),
                    component: r.get(2),
                    instance: r.get(3),
                },
                last_seq: r.get(4),
                finished: r.get(5),
            })
            .filter(|s| pattern.is_match(&s.key.query_key()))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn stream(&self, key: &StreamKey) -> Result<Option<StreamInfo>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                "SELECT last_seq, finished FROM bes_streams
                 WHERE build_id = $1 AND invocation_id = $2 AND component = $3 AND instance = $4",
                &[
                    &key.build_id,
                    &key.invocation_id,
                    &key.component,
                    &key.instance,
                ],
            )
            .await
            .map_err(|e| pg_error("reading a stream", e))?;
        Ok(row.map(|r| StreamInfo {
            key: key.clone(),
            last_seq: r.get(0),
            finished: r.get(1),
        }))
    }

    async fn events(
        &self,
        key: &StreamKey,
        filter: &EventFilter,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let kinds: Option<Vec<i16>> =
            (!filter.kinds.is_empty()).then(|| filter.kinds.iter().map(|k| *k as i16).collect());
        let rows = client
            .query(
                "SELECT e.seq, e.kind, e.event_time_us, e.body
                 FROM bes_events e JOIN bes_streams s ON s.id = e.stream
                 WHERE s.build_id = $1 AND s.invocation_id = $2 AND s.component = $3
                   AND s.instance = $9
                   AND e.seq >= $4 AND e.seq <= $5
                   AND ($6::SMALLINT[] IS NULL OR e.kind = ANY($6))
                   AND ($7::BIGINT IS NULL OR e.event_time_us >= $7)
                   AND ($8::BIGINT IS NULL OR e.event_time_us < $8)
                 ORDER BY e.seq",
                &[
                    &key.build_id,
                    &key.invocation_id,
                    &key.component,
                    &filter.min_seq.unwrap_or(1),
                    &filter.max_seq.unwrap_or(i64::MAX),
                    &kinds,
                    &filter.since_micros,
                    &filter.until_micros,
                    &key.instance,
                ],
            )
            .await
            .map_err(|e| pg_error("reading events", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let kind: i16 = r.get(1);
                Some(StoredEvent {
                    seq: r.get(0),
                    kind: EventKind::from_number(i32::from(kind))?,
                    time_micros: r.get(2),
                    body: bytes::Bytes::from(r.get::<_, Vec<u8>>(3)),
                })
            })
            .collect())
    }
}

/// `s` with LIKE's wildcards (and its escape character) escaped.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Applies newly stored events of `stream` to the invocation they feed, in
/// the publishing transaction. The invocation's row is locked first (created
/// empty if missing) so the tool stream and the controller stream of one
/// invocation, published at once through different connections, apply one
/// after the other.
async fn update_invocation(
    tx: &deadpool_postgres::Transaction<'_>,
    stream: &StreamKey,
    stored: &[&Prepared],
) -> Result<(), StoreError> {
    let Some(key) = InvocationKey::of(stream) else {
        return Ok(());
    };
    if stored.is_empty() {
        return Ok(());
    }
    let e = |e| pg_error("updating the invocation", e);
    let create = tx
        .prepare_cached(
            "INSERT INTO bes_invocations (instance, invocation_id, build_id, started_ms, state,
                 user_name, command, patterns, metadata, last_event_ms, updated_ms, body)
             VALUES ($1, $2, $3, 0, 0, '', '', '{}', '{}', 0, 0, '')
             ON CONFLICT (instance, invocation_id) DO NOTHING",
        )
        .await
        .map_err(e)?;
    tx.execute(
        &create,
        &[&key.instance, &key.invocation_id, &stream.build_id],
    )
    .await
    .map_err(e)?;
    let lock = tx
        .prepare_cached(
            "SELECT body FROM bes_invocations WHERE instance = $1 AND invocation_id = $2 FOR UPDATE",
        )
        .await
        .map_err(e)?;
    let row = tx
        .query_one(&lock, &[&key.instance, &key.invocation_id])
        .await
        .map_err(e)?;
    let body: &[u8] = row.get(0);
    let summary = if body.is_empty() {
        None
    } else {
        Some(
            gg::Invocation::decode(body)
                .map_err(|e| StoreError::Internal(format!("corrupt invocation record: {e}")))?,
        )
    };
    // A new invocation has no stored targets to read.
    let labels = match summary {
        Some(_) => model::labels(stored.iter().copied()),
        None => Vec::new(),
    };
    let mut touched = std::collections::HashMap::new();
    if !labels.is_empty() {
        let read = tx
            .prepare_cached(
                "SELECT label, body FROM bes_targets
                 WHERE instance = $1 AND invocation_id = $2 AND label = ANY($3)",
            )
            .await
            .map_err(e)?;
        for r in tx
            .query(&read, &[&key.instance, &key.invocation_id, &labels])
            .await
            .map_err(e)?
        {
            let t = gg::Target::decode(r.get::<_, &[u8]>(1))
                .map_err(|e| StoreError::Internal(format!("corrupt target record: {e}")))?;
            touched.insert(r.get::<_, String>(0), t);
        }
    }
    let Some(update) = model::apply(stream, summary, touched, stored.iter().copied()) else {
        return Ok(());
    };
    let inv = &update.invocation;
    let metadata = metadata_words(&inv.build_metadata);
    let write = tx
        .prepare_cached(
            "UPDATE bes_invocations SET build_id = $3, started_ms = $4, state = $5, user_name = $6,
                 command = $7, patterns = $8, metadata = $9, last_event_ms = $10, body = $11,
                 updated_ms = $12
             WHERE instance = $1 AND invocation_id = $2",
        )
        .await
        .map_err(e)?;
    let upsert = tx
        .prepare_cached(
            "INSERT INTO bes_targets (instance, invocation_id, label, body)
             SELECT $1, $2, * FROM UNNEST($3::TEXT[], $4::BYTEA[])
             ON CONFLICT (instance, invocation_id, label) DO UPDATE SET body = EXCLUDED.body",
        )
        .await
        .map_err(e)?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO bes_logs (instance, invocation_id, byte_offset, data)
             SELECT $1, $2, * FROM UNNEST($3::BIGINT[], $4::BYTEA[])
             ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(e)?;
    let (state, body, now) = (inv.state as i16, inv.encode_to_vec(), super::now_millis());
    let labels: Vec<&str> = update.targets.iter().map(|t| t.label.as_str()).collect();
    let bodies: Vec<Vec<u8>> = update.targets.iter().map(Message::encode_to_vec).collect();
    let offsets: Vec<i64> = update.log.iter().map(|(o, _)| *o).collect();
    let texts: Vec<&[u8]> = update.log.iter().map(|(_, t)| t.as_ref()).collect();
    // The three writes are independent: sent together, they share one
    // round trip (tokio-postgres pipelines the statements of one connection).
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
        &key.instance,
        &key.invocation_id,
        &inv.build_id,
        &inv.start_time_millis,
        &state,
        &inv.user,
        &inv.command,
        &inv.patterns,
        &metadata,
        &inv.last_event_millis,
        &body,
        &now,
    ];
    let summary = tx.execute(&write, &params);
    let targets = async {
        if labels.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &upsert,
            &[&key.instance, &key.invocation_id, &labels, &bodies],
        )
        .await
    };
    let log = async {
        if offsets.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &insert,
            &[&key.instance, &key.invocation_id, &offsets, &texts],
        )
        .await
    };
    futures_util::try_join!(summary, targets, log).map_err(e)?;
    Ok(())
}

/// Build metadata as the `KEY=VALUE` words the `metadata` column holds.
fn metadata_words<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> Vec<String> {
    pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Builds the invocation of a stream stored before invocations were indexed,
/// from its events below `before` (the stream's row is locked by the caller).
async fn index_stream(
    tx: &deadpool_postgres::Transaction<'_>,
    id: i64,
    key: &StreamKey,
    before: i64,
) -> Result<(), StoreError> {
    if InvocationKey::of(key).is_none() {
        return Ok(());
    }
    let mut next = 1;
    loop {
        let rows = tx
            .query(
                "SELECT seq, kind, event_time_us, body FROM bes_events
                 WHERE stream = $1 AND seq >= $2 AND seq < $3 ORDER BY seq LIMIT 1000",
                &[&id, &next, &before],
            )
            .await
            .map_err(|e| pg_error("reading events to index", e))?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(rows.len());
        for r in rows {
            let seq: i64 = r.get(0);
            next = seq + 1;
            let Some(kind) = EventKind::from_number(i32::from(r.get::<_, i16>(1))) else {
                continue;
            };
            let mut p = Prepared {
                stream: key.clone(),
                seq,
                kind,
                time_micros: r.get(2),
                body: Bytes::from(r.get::<_, Vec<u8>>(3)),
                fact: Fact::Nothing,
                publisher: None,
            };
            p.decode();
            batch.push(p);
        }
        let refs: Vec<&Prepared> = batch.iter().collect();
        update_invocation(tx, key, &refs).await?;
    }
}

impl PostgresStore {
    /// Builds the invocations of streams stored before they were indexed, a
    /// few streams per transaction; returns how many streams it indexed.
    /// Runs after start; a publish to such a stream indexes it itself.
    pub async fn backfill(&self) -> Result<u64, StoreError> {
        let mut done = 0;
        loop {
            let client = self.pool.get().await.map_err(pool_error)?;
            let ids: Vec<i64> = client
                .query(
                    "SELECT id FROM bes_streams WHERE NOT indexed ORDER BY id LIMIT 50",
                    &[],
                )
                .await
                .map_err(|e| pg_error("backfill", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            drop(client);
            if ids.is_empty() {
                return Ok(done);
            }
            for id in ids {
                let mut client = self.pool.get().await.map_err(pool_error)?;
                let tx = client
                    .transaction()
                    .await
                    .map_err(|e| pg_error("backfill", e))?;
                let row = tx
                    .query_opt(
                        "SELECT build_id, invocation_id, component, instance, indexed
                         FROM bes_streams WHERE id = $1 FOR UPDATE",
                        &[&id],
                    )
                    .await
                    .map_err(|e| pg_error("backfill", e))?;
                let Some(row) = row.filter(|r| !r.get::<_, bool>(4)) else {
                    continue;
                };
                let key = StreamKey {
                    build_id: row.get(0),
                    invocation_id: row.get(1),
                    component: row.get(2),
                    instance: row.get(3),
                };
                index_stream(&tx, id, &key, i64::MAX).await?;
                tx.execute(
                    "UPDATE bes_streams SET indexed = TRUE WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| pg_error("backfill", e))?;
                tx.commit().await.map_err(|e| pg_error("backfill", e))?;
                done += 1;
            }
        }
    }

    /// [`EventStore::sweep`]: one transaction per step, rows taken with
    /// `SKIP LOCKED` so a stream being published is left for the next sweep.
    async fn sweep_once(
        &self,
        expire_before: Option<i64>,
        abandon_before: Option<i64>,
        batch: usize,
    ) -> Result<Swept, StoreError> {
        let mut out = Swept::default();
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let e = |e| pg_error("retention", e);
        if let Some(before) = expire_before {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(e)?;
            let from = self.sweep_from.load(Ordering::Relaxed);
            let gone = tx
                .query(
                    "WITH victims AS (
                         SELECT id FROM bes_streams WHERE updated_ms >= $3 AND updated_ms < $1
                         ORDER BY updated_ms LIMIT $2 FOR UPDATE SKIP LOCKED)
                     DELETE FROM bes_streams s USING victims v WHERE s.id = v.id
                     RETURNING s.instance, s.invocation_id, s.updated_ms",
                    &[&before, &limit, &from],
                )
                .await
                .map_err(e)?;
            out.deleted_streams = gone.len() as u64;
            let next = if gone.len() < batch {
                i64::MIN
            } else {
                gone.iter()
                    .map(|r| r.get::<_, i64>(2))
                    .max()
                    .unwrap_or(i64::MIN)
            };
            let (insts, ids): (Vec<String>, Vec<String>) = gone
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .filter(|(_, id)| !id.is_empty())
                .unzip();
            if !ids.is_empty() {
                for table in ["bes_invocations", "bes_targets", "bes_logs"] {
                    tx.execute(
                        &format!(
                            "DELETE FROM {table} t USING UNNEST($1::TEXT[], $2::TEXT[]) AS k(i, id)
                             WHERE t.instance = k.i AND t.invocation_id = k.id"
                        ),
                        &[&insts, &ids],
                    )
                    .await
                    .map_err(e)?;
                }
            }
            tx.commit().await.map_err(e)?;
            self.sweep_from.store(next, Ordering::Relaxed);
        }
        if let Some(before) = abandon_before {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(e)?;
            let rows = tx
                .query(
                    "SELECT instance, invocation_id, body FROM bes_invocations
                     WHERE state = 1 AND updated_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[&before, &limit],
                )
                .await
                .map_err(e)?;
            for r in rows {
                let mut inv = gg::Invocation::decode(r.get::<_, &[u8]>(2))
                    .map_err(|e| StoreError::Internal(format!("corrupt invocation record: {e}")))?;
                if !model::abandon(&mut inv) {
                    continue;
                }
                tx.execute(
                    "UPDATE bes_invocations SET state = $3, body = $4
                     WHERE instance = $1 AND invocation_id = $2",
                    &[
                        &r.get::<_, String>(0),
                        &r.get::<_, String>(1),
                        &(inv.state as i16),
                        &inv.encode_to_vec(),
                    ],
                )
                .await
                .map_err(e)?;
                out.abandoned += 1;
            }
            tx.commit().await.map_err(e)?;
        }
        Ok(out)
    }

    async fn invocations(
        &self,
        q: &InvocationQuery,
        limit: usize,
    ) -> Result<Vec<gg::Invocation>, StoreError> {
        use tokio_postgres::types::ToSql;
        let client = self.pool.get().await.map_err(pool_error)?;
        // Only the filters that are set go into the statement, so the
        // planner sees plain conditions it can match to an index.
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut conds: Vec<String> = Vec::new();
        let p = |v: Box<dyn ToSql + Sync + Send>, params: &mut Vec<_>| {
            params.push(v);
            format!("${}", params.len())
        };
        if let Some(i) = &q.instance {
            conds.push(format!(
                "instance = {}",
                p(Box::new(i.clone()), &mut params)
            ));
        }
        if let Some(b) = &q.build_id {
            conds.push(format!(
                "build_id = {}",
                p(Box::new(b.clone()), &mut params)
            ));
        }
        if let Some(u) = &q.user {
            conds.push(format!(
                "user_name = {}",
                p(Box::new(u.clone()), &mut params)
            ));
        }
        if let Some(s) = q.state {
            conds.push(format!("state = {}", p(Box::new(s as i16), &mut params)));
        }
        if let Some(c) = &q.command {
            conds.push(format!("command = {}", p(Box::new(c.clone()), &mut params)));
        }
        if let Some(pat) = &q.pattern {
            conds.push(format!(
                "EXISTS (SELECT 1 FROM unnest(patterns) x WHERE strpos(x, {}) > 0)",
                p(Box::new(pat.clone()), &mut params)
            ));
        }
        if !q.metadata.is_empty() {
            let words = metadata_words(q.metadata.iter().map(|(k, v)| (k, v)));
            conds.push(format!(
                "metadata @> {}::TEXT[]",
                p(Box::new(words), &mut params)
            ));
        }
        if let Some(t) = q.started_after {
            conds.push(format!("started_ms >= {}", p(Box::new(t), &mut params)));
        }
        if let Some(t) = q.started_before {
            conds.push(format!("started_ms < {}", p(Box::new(t), &mut params)));
        }
        if let Some(c) = &q.after {
            let a = p(Box::new(c.start_millis), &mut params);
            let b = p(Box::new(c.instance.clone()), &mut params);
            let d = p(Box::new(c.invocation_id.clone()), &mut params);
            conds.push(format!(
                "(started_ms, instance, invocation_id) < ({a}, {b}, {d})"
            ));
        }
        // Rows still being created by a publish (empty body) are not listed.
        conds.push("body <> ''".into());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let l = p(Box::new(limit), &mut params);
        let sql = format!(
            "SELECT body FROM bes_invocations WHERE {}              ORDER BY started_ms DESC, instance DESC, invocation_id DESC LIMIT {l}",
            conds.join(" AND ")
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = client
            .query(&sql, &refs)
            .await
            .map_err(|e| pg_error("listing invocations", e))?;
        rows.iter()
            .map(|r| {
                gg::Invocation::decode(r.get::<_, &[u8]>(0))
                    .map_err(|e| StoreError::Internal(format!("corrupt invocation record: {e}")))
            })
            .collect()
    }

    async fn invocation(&self, key: &InvocationKey) -> Result<Option<gg::Invocation>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client
            .query_opt(
                "SELECT body FROM bes_invocations
                 WHERE instance = $1 AND invocation_id = $2 AND body <> ''",
                &[&key.instance, &key.invocation_id],
            )
            .await
            .map_err(|e| pg_error("reading an invocation", e))?;
        row.map(|r| {
            gg::Invocation::decode(r.get::<_, &[u8]>(0))
                .map_err(|e| StoreError::Internal(format!("corrupt invocation record: {e}")))
        })
        .transpose()
    }

    async fn instances_of(&self, invocation_id: &str) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT instance FROM bes_invocations
                 WHERE invocation_id = $1 AND body <> '' ORDER BY instance",
                &[&invocation_id],
            )
            .await
            .map_err(|e| pg_error("finding an invocation", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn targets(
        &self,
        key: &InvocationKey,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<gg::Target>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let e = |e| pg_error("reading targets", e);
        // Two statements, not one with `$3 IS NULL OR label > $3`: a generic
        // plan of that reads every label before the page's first and filters
        // them out, so each page cost more than the one before.
        let rows = match after {
            None => {
                let first = client
                    .prepare_cached(
                        "SELECT body FROM bes_targets WHERE instance = $1 AND invocation_id = $2
                         ORDER BY label LIMIT $3",
                    )
                    .await
                    .map_err(e)?;
                client
                    .query(&first, &[&key.instance, &key.invocation_id, &limit])
                    .await
                    .map_err(e)?
            }
            Some(after) => {
                let next = client
                    .prepare_cached(
                        "SELECT body FROM bes_targets
                         WHERE instance = $1 AND invocation_id = $2 AND label > $3
                         ORDER BY label LIMIT $4",
                    )
                    .await
                    .map_err(e)?;
                client
                    .query(&next, &[&key.instance, &key.invocation_id, &after, &limit])
                    .await
                    .map_err(e)?
            }
        };
        rows.iter()
            .map(|r| {
                gg::Target::decode(r.get::<_, &[u8]>(0))
                    .map_err(|e| StoreError::Internal(format!("corrupt target record: {e}")))
            })
            .collect()
    }

    async fn log(
        &self,
        key: &InvocationKey,
        offset: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Bytes)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        // The chunk holding `offset` starts at the greatest offset <= it.
        let rows = client
            .query(
                "SELECT byte_offset, data FROM bes_logs
                 WHERE instance = $1 AND invocation_id = $2
                   AND byte_offset >= COALESCE((SELECT max(byte_offset) FROM bes_logs
                       WHERE instance = $1 AND invocation_id = $2 AND byte_offset <= $3), $3)
                 ORDER BY byte_offset LIMIT 1000",
                &[&key.instance, &key.invocation_id, &offset],
            )
            .await
            .map_err(|e| pg_error("reading the log", e))?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in rows {
            if bytes >= limit {
                break;
            }
            let data: Vec<u8> = r.get(1);
            bytes += data.len();
            out.push((r.get(0), Bytes::from(data)));
        }
        Ok(out)
    }

    /// [`EventStore::query_events_many`] in one round trip.
    async fn events_many(
        &self,
        keys: &[StreamKey],
        filter: &EventFilter,
    ) -> Result<Vec<Vec<StoredEvent>>, StoreError> {
        let mut out = vec![Vec::new(); keys.len()];
        if keys.is_empty() {
            return Ok(out);
        }
        let client = self.pool.get().await.map_err(pool_error)?;
        let builds: Vec<&str> = keys.iter().map(|k| k.build_id.as_str()).collect();
        let invs: Vec<&str> = keys.iter().map(|k| k.invocation_id.as_str()).collect();
        let comps: Vec<i32> = keys.iter().map(|k| k.component).collect();
        let insts: Vec<&str> = keys.iter().map(|k| k.instance.as_str()).collect();
        let kinds: Option<Vec<i16>> =
            (!filter.kinds.is_empty()).then(|| filter.kinds.iter().map(|k| *k as i16).collect());
        let rows = client
            .query(
                "SELECT k.i, e.seq, e.kind, e.event_time_us, e.body
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::INTEGER[], $9::TEXT[])
                      WITH ORDINALITY AS k(b, inv, c, inst, i)
                 JOIN bes_streams s ON s.build_id = k.b AND s.invocation_id = k.inv
                      AND s.component = k.c AND s.instance = k.inst
                 JOIN bes_events e ON e.stream = s.id
                 WHERE e.seq >= $4 AND e.seq <= $5
                   AND ($6::SMALLINT[] IS NULL OR e.kind = ANY($6))
                   AND ($7::BIGINT IS NULL OR e.event_time_us >= $7)
                   AND ($8::BIGINT IS NULL OR e.event_time_us < $8)
                 ORDER BY k.i, e.seq",
                &[
                    &builds,
                    &invs,
                    &comps,
                    &filter.min_seq.unwrap_or(1),
                    &filter.max_seq.unwrap_or(i64::MAX),
                    &kinds,
                    &filter.since_micros,
                    &filter.until_micros,
                    &insts,
                ],
            )
            .await
            .map_err(|e| pg_error("reading events", e))?;
        for r in rows {
            let i: i64 = r.get(0);
            let kind: i16 = r.get(2);
            let (Some(list), Some(kind)) = (
                usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)),
                EventKind::from_number(i32::from(kind)),
            ) else {
                continue;
            };
            list.push(StoredEvent {
                seq: r.get(1),
                kind,
                time_micros: r.get(3),
                body: bytes::Bytes::from(r.get::<_, Vec<u8>>(4)),
            });
        }
        Ok(out)
    }
}

impl EventStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn publish_events<'a>(
        &'a self,
        events: &'a [Prepared],
    ) -> BoxFuture<'a, Result<Published, StoreError>> {
        self.publish(events).boxed()
    }

    fn get_stream<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StreamInfo>, StoreError>> {
        self.stream(key).boxed()
    }

    fn get_matching_streams<'a>(
        &'a self,
        pattern: &'a Regex,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>, StoreError>> {
        self.matching(pattern, instance).boxed()
    }

    fn query_events<'a>(
        &'a self,
        key: &'a StreamKey,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        self.events(key, filter).boxed()
    }

    fn query_events_many<'a>(
        &'a self,
        keys: &'a [StreamKey],
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<Vec<StoredEvent>>, StoreError>> {
        self.events_many(keys, filter).boxed()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            stored_events: self.stored.load(Ordering::Relaxed),
            duplicate_events: self.duplicates.load(Ordering::Relaxed),
            ..StoreStats::default()
        }
    }

    fn list_invocations<'a>(
        &'a self,
        query: &'a InvocationQuery,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Invocation>, StoreError>> {
        self.invocations(query, limit).boxed()
    }

    fn sweep<'a>(
        &'a self,
        expire_before: Option<i64>,
        abandon_before: Option<i64>,
        batch: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>> {
        self.sweep_once(expire_before, abandon_before, batch)
            .boxed()
    }

    fn get_invocation<'a>(
        &'a self,
        key: &'a InvocationKey,
    ) -> BoxFuture<'a, Result<Option<gg::Invocation>, StoreError>> {
        self.invocation(key).boxed()
    }

    fn get_targets<'a>(
        &'a self,
        key: &'a InvocationKey,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Target>, StoreError>> {
        self.targets(key, after, limit).boxed()
    }

    fn get_log<'a>(
        &'a self,
        key: &'a InvocationKey,
        offset: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(i64, Bytes)>, StoreError>> {
        self.log(key, offset, limit).boxed()
    }

    fn find_invocation<'a>(
        &'a self,
        invocation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        self.instances_of(invocation_id).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bes::store::tests::postgres_schema;

    /// A database at schema 1 (streams keyed without their instance) keeps
    /// its streams and events through the migration, each under its owner,
    /// and another instance can then use the same build id.
    #[tokio::test]
    async fn a_schema_1_database_is_migrated() {
        let Some((url, _schema)) = postgres_schema("migrate1").await else {
            return;
        };
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "CREATE TABLE bes_migrations (version INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
                 {}
                 INSERT INTO bes_migrations (version) VALUES (1);
                 INSERT INTO bes_streams (build_id, invocation_id, component, instance, last_seq, finished)
                     VALUES ('b1', 'inv', 3, 'team-a', 2, TRUE);
                 INSERT INTO bes_events (stream, seq, kind, event_time_us, body)
                     SELECT id, s, 60, s, ('old ' || s)::BYTEA FROM bes_streams, generate_series(1, 2) s;",
                MIGRATIONS[0]
            ))
            .await
            .unwrap();
        let store = PostgresStore::connect(&url).await.unwrap();
        let key = |i: &str| StreamKey {
            build_id: "b1".into(),
            invocation_id: "inv".into(),
            component: 3,
            instance: i.into(),
        };
        let a = store.get_stream(&key("team-a")).await.unwrap().unwrap();
        assert_eq!((a.last_seq, a.finished), (2, true));
        let events = store
            .query_events(&key("team-a"), &EventFilter::default())
            .await
            .unwrap();
        assert_eq!(events[1].body.as_ref(), b"old 2");
        assert!(store.get_stream(&key("team-b")).await.unwrap().is_none());
        let p = store
            .publish_events(&[Prepared {
                stream: key("team-b"),
                seq: 1,
                kind: EventKind::BazelEvent,
                time_micros: None,
                body: bytes::Bytes::from_static(b"new"),
                fact: crate::bes::invocation::Fact::Nothing,
                publisher: None,
            }])
            .await
            .unwrap();
        assert_eq!(p.outcomes, vec![Outcome::Stored]);
        let versions: i64 = client
            .query_one("SELECT COUNT(*) FROM bes_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(versions as usize, MIGRATIONS.len());
    }
}

#[cfg(test)]
mod backfill_tests {
    use super::*;
    use crate::bes::invocation::tests::{build, recorded, tool_stream_of};
    use crate::bes::store::tests::postgres_schema;

    /// Streams stored before invocations were indexed get their invocations
    /// built: by the next publish to the stream, or by the backfill.
    #[tokio::test]
    async fn streams_stored_before_indexing_get_their_invocations_built() {
        let Some((url, _schema)) = postgres_schema("backfill").await else {
            return;
        };
        let store = PostgresStore::connect(&url).await.unwrap();
        let stream = |inv: &str| StreamKey {
            build_id: "b".into(),
            invocation_id: inv.into(),
            component: 3,
            instance: "team-a".into(),
        };
        let (one, two) = (stream("one"), stream("two"));
        let payloads = recorded("bazel-4.2.3/test.bin");
        let events_one = tool_stream_of(&one, &payloads, 1_700_000_000);
        let events_two = tool_stream_of(&two, &payloads, 1_700_000_000);
        let half = events_one.len() / 2;
        store.publish_events(&events_one[..half]).await.unwrap();
        store.publish_events(&events_two).await.unwrap();
        // As migration 3 leaves a store written before it.
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "UPDATE bes_streams SET indexed = FALSE;
                 TRUNCATE bes_invocations, bes_targets, bes_logs;",
            )
            .await
            .unwrap();
        // The rest of stream one: its publish indexes the first half too.
        store.publish_events(&events_one[half..]).await.unwrap();
        let key = InvocationKey::of(&one).unwrap();
        let (inv, _) = build(&events_one, events_one.len());
        assert_eq!(store.get_invocation(&key).await.unwrap(), Some(inv));
        // Stream two waits for the backfill.
        let key = InvocationKey::of(&two).unwrap();
        assert_eq!(store.get_invocation(&key).await.unwrap(), None);
        assert_eq!(store.backfill().await.unwrap(), 1);
        let (inv, targets) = build(&events_two, events_two.len());
        assert_eq!(store.get_invocation(&key).await.unwrap(), Some(inv));
        assert_eq!(
            store.get_targets(&key, None, 1000).await.unwrap(),
            targets.into_values().collect::<Vec<_>>()
        );
        assert_eq!(store.backfill().await.unwrap(), 0, "nothing left");
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::*;

    #[test]
    fn anchored_patterns_give_the_build_id_prefix_they_require() {
        let p = |s: &str| build_id_prefix(s);
        assert_eq!(p("^5f1c"), Some("5f1c".into()));
        assert_eq!(
            p("^abc\\.3\\."),
            Some("abc".into()),
            "stops at the key's first dot"
        );
        assert_eq!(p("^a\\-b_c.*"), Some("a-b_c".into()));
        assert_eq!(
            p("^abc?"),
            Some("ab".into()),
            "an optional character is not required"
        );
        assert_eq!(p("^ab*"), Some("a".into()));
        assert_eq!(p("^ab{2}"), Some("a".into()));
        assert_eq!(p("^[ab]c"), None);
        assert_eq!(p("^\\dabc"), None);
        assert_eq!(p("abc"), None, "not anchored");
        assert_eq!(p("^abc|^x"), None, "alternation");
        assert_eq!(p("(?i)^abc"), None);
        assert_eq!(p("^"), None);
        assert_eq!(like_escape("a%b_c\\d"), "a\\%b\\_c\\\\d");
    }

    /// The prefix condition can be answered from the stream key index.
    #[tokio::test]
    async fn a_build_id_prefix_query_can_use_the_index() {
        let Some((url, _schema)) = crate::bes::store::tests::postgres_schema("prefix").await else {
            return;
        };
        let _store = PostgresStore::connect(&url).await.unwrap();
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("SET enable_seqscan = off")
            .await
            .unwrap();
        let plan: Vec<String> = client
            .query(
                "EXPLAIN SELECT build_id FROM bes_streams
                 WHERE ($1::TEXT IS NULL OR instance = $1) AND ($2::TEXT IS NULL OR build_id LIKE $2)",
                &[&None::<String>, &Some("abc%")],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            plan.iter().any(|l| l.contains("bes_streams_key")),
            "{plan:#?}"
        );
    }
}
