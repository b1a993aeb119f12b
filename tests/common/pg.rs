//! A fresh PostgreSQL schema per test, on the development/CI server.
//!
//! URL from `GRIDGATE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When the server cannot be
//! reached: panics if `GRIDGATE_REQUIRE_POSTGRES=1`, else returns None after
//! printing why (the caller skips).

use std::time::Duration;

/// A schema dropped when this is dropped; `url` points into it (search_path).
pub(crate) struct Schema {
    pub url: String,
    base: String,
    name: String,
}

/// Makes a schema named after `test` plus a unique suffix.
pub(crate) async fn fresh_schema(test: &str) -> Option<Schema> {
    let base = std::env::var("GRIDGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let required = std::env::var("GRIDGATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&base, tokio_postgres::NoTls),
    )
    .await;
    let (client, conn) = match connected {
        Ok(Ok(c)) => c,
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer in 5 s".to_string(),
            };
            if required {
                panic!("PostgreSQL at {base} is required (GRIDGATE_REQUIRE_POSTGRES=1): {why}");
            }
            eprintln!("skipping {test}: PostgreSQL at {base} unreachable: {why}");
            return None;
        }
    };
    tokio::spawn(conn);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("it_{test}_{}_{nanos}", std::process::id());
    client
        .batch_execute(&format!("CREATE SCHEMA {name}"))
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(Schema {
        url: format!("{base}{sep}options=-c%20search_path%3D{name}"),
        base,
        name,
    })
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        // Best effort, on its own thread and runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA {name} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}
