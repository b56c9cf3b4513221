//! Failures stay where they belong: an open circuit holds only its own destination's events, a
//! dead letter can keep its aggregate blocked for strict consumers, a bad destination fails the
//! start, and readiness follows the database, never the failed-event count.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use inventory_outbox::delivery::Engine;
use inventory_outbox::event::inventory::Stockout;
use inventory_outbox::event::{DomainEvent, NewEvent, cloudevents};
use inventory_outbox::publisher::InventoryEventPublisher;
use inventory_outbox::relay::config::RelayConfig;
use inventory_outbox::store::{SchemaName, Store};
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::{eventually, relay_config, start_relay};
use crate::event_core::{publisher, stock_changed};
use crate::support::postgres::TestDatabase;
use crate::support::{amqp_url, database_url, unique_name};

fn rabbit_broker(exchange: &str, queue: &str, binding_key: &str, extra: Value) -> Value {
    let mut broker = json!({"urlEnv": "AMQP_URL", "exchange": exchange, "mode": "structured",
                            "queues": [{"name": queue, "bindingKey": binding_key}]});
    if let (Some(broker), Some(extra)) = (broker.as_object_mut(), extra.as_object()) {
        broker.extend(extra.clone());
    }
    json!({"rabbitmq": broker})
}

async fn publish(publisher: &InventoryEventPublisher, db: &TestDatabase, draft: NewEvent) -> DomainEvent {
    let mut tx = db.pool.begin().await.expect("begin");
    let event = publisher.publish_event(&mut tx, draft).await.expect("publish");
    tx.commit().await.expect("commit");
    event
}

fn stockout(item: Uuid) -> NewEvent {
    NewEvent::from_payload(&Stockout {
        inventory_item_id: item,
        warehouse_id: Uuid::nil(),
        unfulfilled_quantity: Some(1),
    })
    .expect("serialize payload")
}

/// Everything a consumer saw, with when it arrived.
type Arrivals = Arc<Mutex<Vec<(DomainEvent, Instant)>>>;

/// Reads `queue` on the shared RabbitMQ into a list of (event, arrival) until stopped.
fn consume(queue: &str) -> (Arrivals, Arc<AtomicBool>) {
    let arrivals: Arrivals = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let (out, flag, queue) = (arrivals.clone(), running.clone(), queue.to_owned());
    tokio::spawn(async move {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        while flag.load(Ordering::SeqCst) {
            match channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
            {
                Ok(Some(m)) => {
                    let doc: Value = serde_json::from_slice(&m.delivery.data).expect("JSON body");
                    let e = cloudevents::from_structured(&doc).expect("CloudEvent");
                    out.lock().await.push((e, Instant::now()));
                }
                // The queue is declared by the relay at start.
                Ok(None) | Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let _ = conn.close(200, "done".into()).await;
    });
    (arrivals, running)
}

async fn delete_rabbit(exchange: &str, queues: &[&str]) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.expect("channel");
    for q in queues {
        let _ = channel.queue_delete((*q).into(), QueueDeleteOptions::default()).await;
    }
    let _ = channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

fn circuit_gauge(relay: &Engine, destination: &str) -> Option<i64> {
    let needle = format!("destination=\"{destination}\"}} ");
    relay
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with("outbox_relay_circuit_state{"))
        .find_map(|l| {
            l.split_once(needle.as_str())
                .map(|(_, v)| v.trim().parse().unwrap_or(-1))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_circuit_holds_only_its_own_destination() {
    const CONSUMER: &str = "isolation-circuit";
    let (db, publisher) = publisher("relay_isolation").await;
    let exchange = unique_name("isolation");
    let queue = format!("{exchange}-stock");
    // No queue is bound for Stockout: every send there is returned unroutable, a failure of
    // that destination only.
    let broker = rabbit_broker(
        &exchange,
        &queue,
        "inventory.StockLevelChanged",
        json!({"confirmTimeoutMs": 2000}),
    );
    let routing = json!({"strategy": "perEventType", "template": "inventory.{eventType}"});
    let mut config = relay_config(CONSUMER, broker, routing);
    config.retry.max_attempts = 1000;
    let relay = start_relay(&db, config, "c1").await;
    eventually(Duration::from_secs(15), "relay ready", async || {
        relay.relay.health().ready().is_ok()
    })
    .await;
    let (arrivals, consuming) = consume(&queue);

    // Interleave events of the failing destination with healthy ones for 8 s.
    let failing: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let healthy: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let mut committed: HashMap<Uuid, Instant> = HashMap::new();
    let mut sent = Vec::new();
    let started = Instant::now();
    let mut sequence = 0;
    let mut saw_open = false;
    while started.elapsed() < Duration::from_secs(8) {
        sequence += 1;
        for (f, h) in failing.iter().zip(&healthy) {
            publish(&publisher, &db, stockout(*f)).await;
            let e = publish(&publisher, &db, stock_changed(*h, sequence)).await;
            committed.insert(e.event_id, Instant::now());
            sent.push(e);
        }
        saw_open |= circuit_gauge(&relay.relay, "inventory.Stockout") == Some(2);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually(Duration::from_secs(15), "every healthy event", async || {
        let got = arrivals.lock().await;
        sent.iter().all(|e| got.iter().any(|(g, _)| g.event_id == e.event_id))
    })
    .await;
    consuming.store(false, Ordering::SeqCst);
    let got = arrivals.lock().await.clone();
    let mut latency: Vec<Duration> = got
        .iter()
        .filter_map(|(e, at)| committed.get(&e.event_id).map(|c| at.saturating_duration_since(*c)))
        .collect();
    latency.sort();
    let p50 = latency[latency.len() / 2];
    let within_2s = latency.iter().filter(|l| **l <= Duration::from_secs(2)).count();
    eprintln!(
        "healthy destination while the other's circuit was open: {} events, p50 {p50:?}, {within_2s} within 2 s, max {:?}",
        latency.len(),
        latency.last()
    );
    assert!(saw_open, "the failing destination's circuit never opened");
    assert!(p50 <= Duration::from_millis(500), "healthy events waited p50 {p50:?}");
    assert!(
        within_2s * 100 >= latency.len() * 95,
        "only {within_2s} of {} healthy events arrived within 2 s",
        latency.len()
    );
    let received: Vec<DomainEvent> = got.into_iter().map(|(e, _)| e).collect();
    super::assert_delivered(&sent, &received, true);
    // The failing destination's events wait without counted attempts once its circuit opened.
    let (max_attempts, dead): (i32, i64) = sqlx::query_as(
        "SELECT coalesce(max(attempts), 0), count(*) FILTER (WHERE status = 'dead_lettered') \
         FROM outbox.failed_events WHERE consumer = $1",
    )
    .bind(CONSUMER)
    .fetch_one(&db.pool)
    .await
    .expect("failed events");
    eprintln!("failing destination: max attempts {max_attempts}, dead-lettered {dead}");
    assert_eq!(dead, 0);
    assert!(
        max_attempts <= 6,
        "probes of the open circuit counted attempts: {max_attempts}"
    );

    relay.stop().await;
    delete_rabbit(&exchange, &[&queue, &format!("{exchange}.dlq")]).await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_keeps_its_aggregate_blocked_when_block_aggregate_is_set() {
    const CONSUMER: &str = "isolation-block";
    let (db, publisher) = publisher("relay_block_aggregate").await;
    let exchange = unique_name("block");
    let queue = format!("{exchange}-all");
    let broker = rabbit_broker(&exchange, &queue, "inventory.#", json!({"maxMessageBytes": 2048}));
    let routing = json!({"strategy": "perEventType", "template": "inventory.{eventType}"});
    let mut config = relay_config(CONSUMER, broker, routing);
    config.dead_letter.block_aggregate = true;
    let relay = start_relay(&db, config, "b1").await;
    eventually(Duration::from_secs(15), "relay ready", async || {
        relay.relay.health().ready().is_ok()
    })
    .await;
    let (arrivals, consuming) = consume(&queue);

    let x = Uuid::now_v7();
    let mut big = stock_changed(x, 1);
    big.payload["note"] = json!("x".repeat(4096));
    let big = publish(&publisher, &db, big).await;
    let after_big = publish(&publisher, &db, stock_changed(x, 2)).await;
    let other = Uuid::now_v7();
    let mut sent = Vec::new();
    for sequence in 1..=3 {
        sent.push(publish(&publisher, &db, stock_changed(other, sequence)).await);
    }
    eventually(Duration::from_secs(10), "the other aggregate's events", async || {
        let got = arrivals.lock().await;
        sent.iter().all(|e| got.iter().any(|(g, _)| g.event_id == e.event_id))
    })
    .await;
    let status = |id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT status FROM outbox.failed_events WHERE consumer = $1 AND event_id = $2",
            )
            .bind(CONSUMER)
            .bind(id)
            .fetch_optional(&pool)
            .await
            .expect("failed event status")
        }
    };
    eventually(
        Duration::from_secs(10),
        "the oversized event dead-lettered",
        async || status(big.event_id).await.as_deref() == Some("dead_lettered"),
    )
    .await;
    // Give the relay rounds to (wrongly) send the successor; it must stay held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = status(after_big.event_id).await;
    let leaked = arrivals
        .lock()
        .await
        .iter()
        .any(|(e, _)| e.event_id == after_big.event_id);
    assert!(
        !leaked,
        "the successor of a dead letter was published (status {held:?})"
    );
    assert_eq!(
        held.as_deref(),
        Some("held"),
        "the successor waits behind the dead letter"
    );

    consuming.store(false, Ordering::SeqCst);
    relay.stop().await;
    delete_rabbit(&exchange, &[&queue, &format!("{exchange}.dlq")]).await;
    db.drop().await;
}

#[test]
fn a_bad_routing_destination_fails_start_naming_the_field() {
    let kafka = json!({"kafka": {"bootstrapServers": "127.0.0.1:9", "deadLetterTopic": "dlq"}});
    let cases = [
        (
            kafka.clone(),
            json!({"strategy": "single", "destination": "bad topic!"}),
            "routing.destination",
        ),
        (
            kafka,
            json!({"strategy": "perEventType", "template": "inv/{eventType}"}),
            "routing.template",
        ),
        (
            json!({"rabbitmq": {"urlEnv": "AMQP_URL", "exchange": "x"}}),
            json!({"strategy": "single", "destination": "k".repeat(300)}),
            "routing.destination",
        ),
        (
            json!({"snsSqs": {"region": "us-east-1", "target": "sqs"}}),
            json!({"strategy": "single", "destination": "orders.fifo"}),
            "routing.destination",
        ),
        (
            json!({"snsSqs": {"region": "us-east-1", "target": "sns"}}),
            json!({"strategy": "single", "destination": "t".repeat(300)}),
            "routing.destination",
        ),
    ];
    for (broker, routing, field) in cases {
        let doc = json!({
            "publisher": "p",
            "outbox": {},
            "broker": broker,
            "routing": routing,
        });
        let config: RelayConfig = serde_json::from_value(doc).expect("parses");
        let error = config.validate().expect_err("a bad destination is refused").to_string();
        assert!(error.contains(field), "{error}");
    }
}

/// A TCP relay to PostgreSQL that the test can cut, as a network outage between the relay and
/// its database (the shared PostgreSQL itself must keep running for other tests).
struct CuttableLink {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl CuttableLink {
    async fn to(host: String, port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let local = listener.local_addr().expect("local address").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (flag, list) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue;
                }
                let target = format!("{host}:{port}");
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().expect("connection list").push(task);
            }
        });
        Self {
            port: local,
            up,
            connections,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.connections.lock().expect("connection list").drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_makes_the_worker_unready_and_failed_events_do_not() {
    const CONSUMER: &str = "isolation-ready";
    let (db, _publisher) = publisher("relay_readiness").await;
    let admin: PgConnectOptions = database_url().parse().expect("DATABASE_URL");
    let link = CuttableLink::to(admin.get_host().to_owned(), admin.get_port()).await;
    let options = admin.host("127.0.0.1").port(link.port).database(&db.name);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(options)
        .await
        .expect("connect through the link");
    let exchange = unique_name("ready");
    let queue = format!("{exchange}-all");
    let broker = rabbit_broker(&exchange, &queue, "inventory.#", json!({}));
    let mut config = relay_config(
        CONSUMER,
        broker,
        json!({"strategy": "single", "destination": "inventory.stock"}),
    );
    // Dead letters far above the threshold must not make the worker unready.
    config.health.failed_event_threshold = 0;
    let store = Store::from_pool(pool, SchemaName::default());
    let broker = config.broker.connect().await.expect("connect broker");
    let relay = Arc::new(Engine::new(config, store, broker, "r1"));
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(relay.clone().run(shutdown));
    let health = relay.health();
    eventually(Duration::from_secs(15), "ready", async || health.ready().is_ok()).await;
    let event = publish(&_publisher, &db, stock_changed(Uuid::now_v7(), 1)).await;
    sqlx::query(
        "INSERT INTO outbox.failed_events (consumer, event_id, position, event_type, aggregate_type, aggregate_id, \
             status, attempts) SELECT $1, event_id, position, event_type, aggregate_type, aggregate_id, 'dead_lettered', 10 \
         FROM outbox.events WHERE event_id = $2",
    )
    .bind(CONSUMER)
    .bind(event.event_id)
    .execute(&db.pool)
    .await
    .expect("a dead letter");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        health.ready().is_ok(),
        "a dead letter above failedEventThreshold made the worker unready: {:?}",
        health.ready()
    );

    let cut_at = Instant::now();
    link.cut();
    eventually(
        Duration::from_secs(10),
        "unready during the database outage",
        async || {
            health
                .ready()
                .is_err_and(|r| r.0.iter().any(|l| l.contains("database")))
        },
    )
    .await;
    eprintln!("unready {:?} after the database link was cut", cut_at.elapsed());
    assert!(health.live(), "a database outage must not fail liveness");
    link.restore();
    let restored_at = Instant::now();
    eventually(
        Duration::from_secs(15),
        "ready after the database returned",
        async || health.ready().is_ok(),
    )
    .await;
    eprintln!("ready {:?} after the database link was restored", restored_at.elapsed());

    let _ = stop.send(true);
    let _ = task.await;
    delete_rabbit(&exchange, &[&queue, &format!("{exchange}.dlq")]).await;
    db.drop().await;
}
