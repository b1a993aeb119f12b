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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::{BoxFuture, FutureExt};
use regex::Regex;
use tokio_postgres::NoTls;

use super::{
    check_event, EventFilter, EventStore, Outcome, Published, Step, StoreError, StoreStats,
    StoredEvent, StreamInfo,
};
use crate::bes::event::{EventKind, Prepared, StreamKey};

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
];

/// The advisory lock key taken while migrating ("gridgate" in ASCII, folded).
const MIGRATION_LOCK: i64 = 0x6772_6964_6761_7465;

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
    stored: AtomicU64,
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
                "SELECT id, last_seq, finished FROM bes_streams
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
                                "INSERT INTO bes_streams (build_id, invocation_id, component, instance)
                                 VALUES ($1, $2, $3, $4)
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
            if before.as_ref() != Some(info) {
                let update = tx
                    .prepare_cached(
                        "UPDATE bes_streams SET last_seq = $2, finished = $3 WHERE id = $1",
                    )
                    .await
                    .map_err(|e| pg_error("updating the stream", e))?;
                tx.execute(&update, &[&id, &info.last_seq, &info.finished])
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
        let rows = client
            .query(
                "SELECT build_id, invocation_id, component, instance, last_seq, finished
                 FROM bes_streams WHERE $1::TEXT IS NULL OR instance = $1",
                &[&instance],
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

impl PostgresStore {
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
