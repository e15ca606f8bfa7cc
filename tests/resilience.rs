//! Crashes, shutdowns and lost connections: no job lost, none started twice.

use std::time::Duration;

use k8s_job_worker::{amqp::publisher::header_str, domain::event::JobState};
use k8s_job_worker_testkit::{proxy::Proxy, *};

#[tokio::test]
async fn broker_connection_loss_is_survived_without_losing_events() {
    let mut h = Harness::new("r-netcut").await;
    let proxy = Proxy::start(proxy::target(&amqp_url())).await;
    h.worker_amqp_url = proxy.url(&amqp_url());
    h.start_worker().await;
    h.submit(&request("1", "sleep 3; echo survived")).await;
    h.events_until("1", Duration::from_secs(30), |e| e.iter().any(|e| e.state == JobState::Running)).await;

    proxy.cut();
    wait_for("readyz not ready", Duration::from_secs(20), || async { h.readyz().await == Some(503) }).await;
    // The job finishes while the worker cannot publish; its event must come after reconnection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.restore();
    wait_for("readyz ready again", Duration::from_secs(30), || async { h.readyz().await == Some(200) }).await;

    let events = h.until_terminal("1").await;
    let last = events.last().unwrap();
    assert_eq!(last.state, JobState::Succeeded);
    assert_eq!(last.log_tail.as_deref(), Some("survived\n"));
    // Consuming resumed too.
    h.submit(&request("2", "true")).await;
    assert_eq!(h.until_terminal("2").await.last().unwrap().state, JobState::Succeeded);
    assert!(h.metrics().await.contains("k8s_job_worker_broker_reconnects_total 1"), "{}", h.metrics().await);
    h.finish().await;
}

#[tokio::test]
async fn sigterm_stops_cleanly_within_the_grace_period_and_loses_nothing() {
    let mut h = Harness::new("r-sigterm").await;
    h.extra_args = vec!["--shutdown-grace-seconds".into(), "10".into()];
    h.start_worker().await;
    for i in 0..10 {
        h.submit(&request(&format!("t{i}"), "sleep 1")).await;
    }
    let (took, status) = h.terminate_worker();
    assert!(status.success(), "clean exit, got {status:?}");
    assert!(took < Duration::from_secs(12), "exited within the grace period, took {took:?}");
    // Whatever was not acked went back to the queue: a new worker finishes every job.
    h.start_worker().await;
    for i in 0..10 {
        let events = h.until_terminal(&format!("t{i}")).await;
        assert_eq!(events.last().unwrap().state, JobState::Succeeded, "{events:#?}");
    }
    let names = h.job_names().await;
    assert!(names.len() <= 10, "never more than one Job per request: {names:?}");
    h.finish().await;
}

#[tokio::test]
async fn two_replicas_report_each_outcome_once() {
    let mut a = Harness::new("r-replicas").await;
    a.extra_args = vec!["--lease-seconds".into(), "4".into()];
    a.start_worker().await;
    // A second replica of the same instance on the same queues and namespace.
    let mut b = a.second_replica("b").await;
    for i in 0..6 {
        a.submit(&request(&format!("j{i}"), "sleep 1")).await;
    }
    for i in 0..6 {
        let id = format!("j{i}");
        a.until_terminal(&id).await;
        let all = a.settle(&id, Duration::from_millis(200)).await;
        assert_eq!(all.iter().filter(|e| e.state.is_terminal()).count(), 1, "{all:#?}");
    }
    // The reporting replica dies: the other takes over and reports what finishes next.
    a.kill_worker();
    a.submit(&request("after", "sleep 1; echo still reported")).await;
    let events = a.events_until("after", Duration::from_secs(60), |e| e.iter().any(|e| e.state.is_terminal())).await;
    assert_eq!(events.last().unwrap().log_tail.as_deref(), Some("still reported\n"));
    b.kill();
    a.finish().await;
}

#[tokio::test]
async fn a_poison_request_is_parked_after_the_delivery_limit() {
    use futures::StreamExt;
    use lapin::options::BasicConsumeOptions;
    let mut h = Harness::new("r-poison").await;
    h.extra_args = vec!["--delivery-limit".into(), "2".into()];
    h.start_worker().await; // declares the topology
    h.kill_worker();
    // A consumer that crashes on the message every time (its channel dies with the message
    // unacked): it goes back to the queue...
    h.submit(&request("poison", "true")).await;
    for _ in 0..3 {
        let ch = h.galaxy.conn.create_channel().await.unwrap();
        let queue = h.names.request_queue.clone().into();
        let mut consumer = ch
            .basic_consume(queue, "crasher".into(), BasicConsumeOptions::default(), Default::default())
            .await
            .unwrap();
        let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await else { break };
        let _ = ch.close(200, "crashed".into()).await;
    }
    // ...until the quorum queue's delivery limit parks it: the broker dead-letters it without
    // a word. A worker gives it its reason on its way to the dead-letter queue, and Galaxy
    // hears of it (item 2: nothing is parked without a reason and a `failed` event).
    h.start_worker().await;
    let parked = h.dead_letters(1).await;
    assert_eq!(parked.len(), 1, "poison message dead-lettered");
    assert!(String::from_utf8_lossy(&parked[0].delivery.data).contains("poison"));
    let reason = header_str(parked[0].delivery.properties.headers(), "x-k8s-job-worker-reason").unwrap_or_default();
    assert!(reason.contains("delivery_limit") && reason.contains("more than 2 times"), "{reason}");
    let failed = h.until_terminal("poison").await.pop().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.reason.contains("parked by the broker"), "{}", failed.reason);
    h.finish().await;
}
