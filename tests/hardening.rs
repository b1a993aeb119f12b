//! Limits that keep the gateway responsive under pressure: requests beyond
//! `limits.max-concurrent-requests` are shed at once, connections beyond
//! `limits.max-connections` are closed at once, and both recover when load
//! goes down.

mod common;

use std::time::Duration;

use common::*;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn config(limits: &str) -> String {
    loopback_config(
        "",
        &format!("authorization:\n  method: none\nlimits:\n{limits}"),
    )
}

/// Opens a Health Watch stream (it stays open until dropped) and waits for
/// its first message, so that it is surely in progress.
async fn open_watch(
    addr: std::net::SocketAddr,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut client = HealthClient::new(plain_channel(addr).await);
    let mut watch = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.next().await.unwrap().unwrap();
    watch
}

#[tokio::test]
async fn requests_beyond_the_limit_are_shed_at_once_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&config("  max-concurrent-requests: 2\n"), dir.path()).await;
    let addr = server.tcp();
    let first = open_watch(addr).await;
    let second = open_watch(addr).await;

    // A third call is refused without waiting for a slot.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        health_check(plain_channel(addr).await),
    )
    .await
    .expect("shed at once, not queued")
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("limit of 2"), "{refused:?}");
    assert!(refused.metadata().get("x-request-id").is_some());

    // Ending one stream frees its place.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match health_check(plain_channel(addr).await).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(std::time::Instant::now() < deadline, "never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(second);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&config("  max-connections: 2\n"), dir.path()).await;
    let addr = server.tcp();
    let one = plain_channel(addr).await;
    let two = plain_channel(addr).await;
    health_check(one.clone()).await.unwrap();
    health_check(two.clone()).await.unwrap();

    // A third connection is closed before HTTP/2 starts.
    let third = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    match third {
        Err(_) => {}
        Ok(ch) => {
            // The client sees its connection closed under it.
            let e = health_check(ch).await.unwrap_err();
            assert!(
                matches!(e.code(), Code::Unavailable | Code::Cancelled),
                "{e:?}"
            );
        }
    }
    // The connections already open keep working.
    health_check(one.clone()).await.unwrap();

    // Closing one makes room.
    drop(two);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(1))
            .connect()
            .await;
        if let Ok(ch) = attempt {
            if health_check(ch).await.is_ok() {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}
