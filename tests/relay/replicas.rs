//! Several replicas on one PostgreSQL server (started by the test, on loopback): each stream
//! read by one replica at a time, each event delivered once, a dead or paused replica's work
//! taken over within its lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::postgres::{PASSWORD, PostgresServer};
use sse_relay_fixtures::sink::Sink;

use crate::support::{DEADLINE, LoggedRelay, eventually, quiet_upstream};

const TOKEN: &str = "replica-admin-token";

/// One replica test at a time: each runs a PostgreSQL server and up to three relays, which on
/// a 2-core machine would otherwise crowd the timing of the other tests.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Ten participants and ten chats, every event to the sink's `/hook`, which is retried often
/// and long enough that no test's outage makes a dead letter, however slow the machine.
fn twenty_streams(upstream: &Upstream, sink: &Sink, target_extra: &str) -> String {
    format!(
        r#"
streams:
  participant:
    url: {participant}
    event_type: [/eventType]
    keepalive: [KEEP_ALIVE]
    ids: ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"]
  chat:
    url: {chat}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    ids: ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]
targets:
  hook:
    url: {hook}
    retry: {{ initial_delay: 20ms, max_delay: 200ms, max_attempts: 1000 }}
    {target_extra}
routes:
  - stream: "*"
    targets: [hook]
"#,
        participant = upstream.participant_url("{id}"),
        chat = upstream.chat_url("{id}"),
        hook = sink.url("/hook"),
    )
}

/// A dynamic chat template (with `stream_extra` lines), every event to `hook`.
fn dynamic_chats(upstream: &Upstream, sink: &Sink, stream_extra: &str) -> String {
    format!(
        r#"
streams:
  chat:
    url: {chat}
    event_type: [/type]
    default_event_type: workflow_update
    keepalive: [keepalive]
    dynamic: true
{stream_extra}targets:
  hook: {{ url: "{hook}" }}
routes:
  - stream: chat
    targets: [hook]
"#,
        chat = upstream.chat_url("{id}"),
        hook = sink.url("/hook"),
    )
}

/// Whether `replicas` hold `n_leases` of `kind` together, and each holds one at least.
async fn held_by_each(replicas: &[LoggedRelay], kind: &str, n_leases: f64) -> bool {
    let mut held = Vec::new();
    for replica in replicas {
        held.push(replica.metric("sse_relay_leases_held", &[("kind", kind)]).await);
    }
    held.iter().sum::<f64>() == n_leases && held.iter().all(|&n| n >= 1.0)
}

fn entities() -> Vec<(Api, String)> {
    (0..10)
        .map(|n| (Api::Participant, format!("p{n}")))
        .chain((0..10).map(|n| (Api::Chat, format!("c{n}"))))
        .collect()
}

fn storage(name: &str) -> String {
    format!("{{ mode: postgres, url: \"${{DATABASE_URL}}\", lease_ttl: 2s, replica: {name} }}")
}

async fn replica(postgres: &PostgresServer, name: &str, yaml: &str) -> LoggedRelay {
    let url = postgres.url();
    LoggedRelay::start_replica(
        &storage(name),
        yaml,
        &[("DATABASE_URL", url.as_str()), ("ADMIN_TOKEN", TOKEN)],
    )
    .await
}

/// Every entity has exactly one connection open.
fn each_connected_once(upstream: &Upstream) -> bool {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for api in [Api::Participant, Api::Chat] {
        for entity in upstream.connected_entities(api) {
            *counts.entry(entity).or_default() += 1;
        }
    }
    counts.len() == 20 && counts.values().all(|&n| n == 1)
}

/// Samples the upstream's connections until stopped; counts the samples where an entity had
/// more than one connection open.
fn watch_for_doubles(upstream: &Upstream) -> (Arc<AtomicBool>, Arc<AtomicUsize>) {
    let (stop, doubles) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let (upstream, stop_flag, n_doubles) = (upstream.clone(), Arc::clone(&stop), Arc::clone(&doubles));
    tokio::spawn(async move {
        while !stop_flag.load(Ordering::Relaxed) {
            for api in [Api::Participant, Api::Chat] {
                let mut seen = std::collections::HashSet::new();
                if upstream
                    .connected_entities(api)
                    .into_iter()
                    .any(|entity| !seen.insert(entity))
                {
                    n_doubles.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (stop, doubles)
}

/// The `n` field of each delivered body, by entity.
fn delivered_by_entity(sink: &Sink) -> HashMap<String, Vec<u64>> {
    let mut delivered: HashMap<String, Vec<u64>> = HashMap::new();
    for request in sink.delivered("/hook") {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let entity = body["entity"].as_str().unwrap().to_owned();
        delivered.entry(entity).or_default().push(body["n"].as_u64().unwrap());
    }
    delivered
}

fn event(api: Api, entity: &str, n: u64) -> String {
    match api {
        Api::Participant => format!(r#"{{"eventType":"MESSAGE_SENT","entity":"{entity}","n":{n}}}"#),
        Api::Chat => format!(r#"{{"type":"node_update","entity":"{entity}","n":{n}}}"#),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_read_each_stream_once_and_deliver_each_event_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = twenty_streams(&upstream, &sink, "");
    let mut replicas = Vec::new();
    for name in ["r1", "r2", "r3"] {
        replicas.push(replica(&postgres, name, &yaml).await);
    }
    // Spread among the three: each stream connected once, by one replica.
    eventually("each stream connected once", DEADLINE, || async {
        if !each_connected_once(&upstream) {
            return false;
        }
        // Every replica reads some (rendezvous hashing spreads 20 over 3), 20 in all.
        held_by_each(&replicas, "stream", 20.0).await
    })
    .await;
    let (stop_watching, doubles) = watch_for_doubles(&upstream);

    let n_events = 25;
    for n in 0..n_events {
        for (api, entity) in entities() {
            assert_eq!(upstream.publish_event_to(api, &entity, &event(api, &entity, n)), 1);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sink.wait_for_delivered("/hook", 20 * n_events as usize, DEADLINE).await;
    // Copies, if any were stored, would still be queued somewhere.
    eventually("every queue drained", DEADLINE, || async {
        let mut n_queued = 0.0;
        for replica in &replicas {
            n_queued += replica.metric("sse_relay_queue_depth", &[("target", "hook")]).await;
        }
        n_queued == 0.0
    })
    .await;
    let delivered = delivered_by_entity(&sink);
    for (_, entity) in entities() {
        let mut got = delivered.get(&entity).cloned().unwrap_or_default();
        got.sort_unstable();
        let got = &got;
        let expected: Vec<u64> = (0..n_events).collect();
        assert_eq!(got, &expected, "{entity}: every event once; all: {delivered:?}");
    }
    stop_watching.store(true, Ordering::Relaxed);
    assert_eq!(doubles.load(Ordering::Relaxed), 0, "no stream had two connections open");

    // `GET /v1/streams` names each stream's replica; `/readyz` what this replica holds.
    let listing = replicas[0].get_with_token("/v1/streams", TOKEN).await;
    let listing: serde_json::Value = serde_json::from_str(&listing.1).unwrap();
    let owners: Vec<&str> = listing["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|stream| stream["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 20);
    assert!(
        owners.iter().all(|owner| ["r1", "r2", "r3"].contains(owner)),
        "{owners:?}"
    );
    let (status, ready) = replicas[1].get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("replica r2 reads"), "{ready}");
    for replica in &replicas {
        for line in replica.log_lines() {
            assert!(
                !line.contains(PASSWORD),
                "a log line shows the database password: {line}"
            );
        }
    }
}

/// Three replicas, twenty streams whose upstream replays from `Last-Event-ID`.
struct Fleet {
    postgres: PostgresServer,
    upstream: Upstream,
    sink: Sink,
    replicas: Vec<LoggedRelay>,
}

impl Fleet {
    async fn start(target_extra: &str) -> Fleet {
        let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
        let upstream = Upstream::start(quiet_upstream()).await.unwrap();
        let sink = Sink::start().await.unwrap();
        let yaml = twenty_streams(&upstream, &sink, target_extra);
        let mut replicas = Vec::new();
        for name in ["r1", "r2", "r3"] {
            replicas.push(replica(&postgres, name, &yaml).await);
        }
        let fleet = Fleet {
            postgres,
            upstream,
            sink,

            replicas,
        };
        fleet.wait_until_spread(DEADLINE).await;
        fleet
    }

    /// Waits until each stream is connected once and the live replicas hold all twenty.
    async fn wait_until_spread(&self, deadline: Duration) {
        eventually("each stream connected once, by the live replicas", deadline, || async {
            if !each_connected_once(&self.upstream) {
                return false;
            }
            held_by_each(&self.replicas, "stream", 20.0).await
        })
        .await;
    }

    /// Publishes round `n`: one event with id `n` to every entity.
    fn publish_round(&self, n: u64) {
        for (api, entity) in entities() {
            self.upstream
                .publish_event_with_id_to(api, &entity, n, &event(api, &entity, n));
        }
    }

    /// Waits until every event of rounds `0..n_rounds` was delivered at least once; asserts
    /// that every copy of an event carries the same Idempotency-Key (a redelivery).
    async fn assert_every_event_delivered(&self, n_rounds: u64) {
        eventually("every event delivered", DEADLINE, || async {
            let delivered = delivered_by_entity(&self.sink);
            entities().iter().all(|(_, entity)| {
                let got: std::collections::HashSet<u64> =
                    delivered.get(entity).into_iter().flatten().copied().collect();
                (0..n_rounds).all(|n| got.contains(&n))
            })
        })
        .await;
        let mut keys: HashMap<(String, u64), std::collections::HashSet<String>> = HashMap::new();
        for request in self.sink.delivered("/hook") {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            let event = (body["entity"].as_str().unwrap().to_owned(), body["n"].as_u64().unwrap());
            let key = request.header("idempotency-key").unwrap().to_owned();
            keys.entry(event).or_default().insert(key);
        }
        for (event, keys) in keys {
            assert_eq!(keys.len(), 1, "{event:?} was delivered under different keys: {keys:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_streams_resume_on_the_others_within_its_lease() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fleet = Fleet::start("").await;
    for n in 0..40 {
        fleet.publish_round(n);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = fleet.replicas.remove(0);
    let _ = killed.kill_keeping_storage().await;
    let killed_at = std::time::Instant::now();
    // Publishing goes on: the dead replica's streams keep their events for a Last-Event-ID.
    let publishing = {
        let upstream = fleet.upstream.clone();
        tokio::spawn(async move {
            for n in 40..200 {
                for (api, entity) in entities() {
                    upstream.publish_event_with_id_to(api, &entity, n, &event(api, &entity, n));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // lease_ttl is 2s: its streams are read again within that plus a reconnect.
    fleet.wait_until_spread(Duration::from_secs(2 + 5)).await;
    let failover = killed_at.elapsed();
    publishing.await.unwrap();
    fleet.assert_every_event_delivered(200).await;
    assert!(failover < Duration::from_secs(7), "took {failover:?}");
    println!("failover after kill -9: {failover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_stores_and_delivers_nothing_stale_and_rejoins() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::start("").await;
    // The paused one serves the target, and reads some streams.
    let serving = std::sync::Mutex::new(None);
    eventually("one replica serves the target", DEADLINE, || async {
        for (index, replica) in fleet.replicas.iter().enumerate() {
            if replica.metric("sse_relay_leases_held", &[("kind", "target")]).await == 1.0 {
                *serving.lock().unwrap() = Some(index);
                return true;
            }
        }
        false
    })
    .await;
    let paused = serving.into_inner().unwrap();
    let paused = &fleet.replicas[paused.expect("found")];
    for n in 0..20 {
        fleet.publish_round(n);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fleet.assert_every_event_delivered(20).await;
    let delivered_before = delivered_by(paused).await;

    paused.signal(libc::SIGSTOP);
    // Its connections stay open: what is published now reaches it too, and waits in its
    // sockets, while the others take its streams and the target over after lease_ttl.
    for n in 20..120 {
        fleet.publish_round(n);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    paused.signal(libc::SIGCONT);
    // Until it holds a lease again, it delivers nothing, and what it read while paused is
    // refused by the database (another replica holds its streams now).
    let resumed_at = std::time::Instant::now();
    while resumed_at.elapsed() < Duration::from_secs(1) {
        let held = paused.metric("sse_relay_leases_held", &[("kind", "target")]).await;
        if held > 0.0 {
            break;
        }
        assert_eq!(
            delivered_by(paused).await,
            delivered_before,
            "a delivery under the stale lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(
        "the paused replica's stale events refused and counted",
        DEADLINE,
        || async {
            paused
                .metric(
                    "sse_relay_deliveries_total",
                    &[("target", "hook"), ("outcome", "abandoned")],
                )
                .await
                > 0.0
        },
    )
    .await;
    for n in 120..140 {
        fleet.publish_round(n);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every event delivered, copies only under the same key: nothing the paused replica read
    // was stored a second time.
    fleet.assert_every_event_delivered(140).await;
    // It rejoins: the streams spread over all three again.
    fleet.wait_until_spread(DEADLINE).await;
    paused.wait_for_log("lease").await;
}

async fn delivered_by(replica: &LoggedRelay) -> f64 {
    replica
        .metric(
            "sse_relay_deliveries_total",
            &[("target", "hook"), ("outcome", "delivered")],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopping_hands_its_streams_over_without_losing_an_event_of_an_upstream_without_history() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut fleet = Fleet::start("").await;
    let publishing = {
        let upstream = fleet.upstream.clone();
        tokio::spawn(async move {
            // Events without ids, from an upstream that keeps nothing: one published while no
            // connection of its stream is open is lost for good.
            let mut n_unheard = 0;
            for n in 0..150 {
                for (api, entity) in entities() {
                    if upstream.publish_event_to(api, &entity, &event(api, &entity, n)) == 0 {
                        n_unheard += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n_unheard
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stopping = fleet.replicas.remove(0);
    stopping.signal(libc::SIGTERM);
    stopping.wait_exit().await;
    stopping.wait_for_log("streams handed over to other replicas").await;
    assert_eq!(
        publishing.await.unwrap(),
        0,
        "every event reached a connection of its stream"
    );
    fleet.wait_until_spread(DEADLINE).await;
    fleet.assert_every_event_delivered(150).await;
    let delivered = delivered_by_entity(&fleet.sink);
    for (_, entity) in entities() {
        let mut got = delivered[&entity].clone();
        got.sort_unstable();
        got.dedup();
        assert_eq!(
            got.len(),
            delivered[&entity].len(),
            "{entity}: an event delivered twice"
        );
    }
    // It comes back on the positions these id-less streams left (their last keys, no id).
    let yaml = twenty_streams(&fleet.upstream, &fleet.sink, "");
    fleet.replicas.push(replica(&fleet.postgres, "r1", &yaml).await);
    fleet.wait_until_spread(DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgresql_is_down_the_replicas_pause_and_then_resume_without_losing_an_event() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::start("").await;
    let publishing = {
        let upstream = fleet.upstream.clone();
        tokio::spawn(async move {
            for n in 0..300 {
                for (api, entity) in entities() {
                    upstream.publish_event_with_id_to(api, &entity, n, &event(api, &entity, n));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| fleet.postgres.stop()).expect("PostgreSQL stops");
    // Readiness says why; lease_ttl is 2s, so the replicas step down within it.
    for replica in &fleet.replicas {
        eventually("readyz fails with the reason", DEADLINE, || async {
            let (status, body) = replica.get("/readyz").await;
            status == 503
                && body.contains("cannot renew its leases in PostgreSQL")
                && body.contains("storage is failing")
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| fleet.postgres.start_again()).expect("PostgreSQL starts again");
    publishing.await.unwrap();
    fleet.wait_until_spread(DEADLINE).await;
    fleet.assert_every_event_delivered(300).await;
    for replica in &fleet.replicas {
        eventually("readyz answers 200 again", DEADLINE, || async {
            replica.get("/readyz").await.0 == 200
        })
        .await;
        replica.wait_for_log("storage recovered").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_targets_rate_limit_and_order_hold_across_three_replicas() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::start("rate_limit: 100/s\n    ordered: true").await;
    // Some attempts fail: an ordered target holds a stream's later events until it succeeds.
    fleet.sink.fail_at_random("/hook", 0.1, 500);
    let n_rounds = 15;
    for n in 0..n_rounds {
        fleet.publish_round(n);
    }
    fleet.assert_every_event_delivered(n_rounds).await;
    let delivered = fleet.sink.delivered("/hook");
    // Each stream's events in order, each once.
    let mut by_entity: HashMap<String, Vec<u64>> = HashMap::new();
    for request in &delivered {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        by_entity
            .entry(body["entity"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["n"].as_u64().unwrap());
    }
    for (entity, got) in by_entity {
        assert_eq!(got, (0..n_rounds).collect::<Vec<u64>>(), "{entity}");
    }
    // 300 requests and more at 100/s with a burst of 100: one limiter for the fleet takes at
    // least 2 s (three would take a third of that); no second holds more than burst + rate.
    let mut times: Vec<std::time::Instant> = fleet
        .sink
        .requests("/hook")
        .iter()
        .map(|request| request.received_at)
        .collect();
    times.sort();
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(1900),
        "{} requests in {span:?}",
        times.len()
    );
    for (index, start) in times.iter().enumerate() {
        let in_a_second = times[index..]
            .iter()
            .take_while(|time| **time - *start < Duration::from_secs(1))
            .count();
        assert!(in_a_second <= 205, "{in_a_second} requests within a second");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_instances_and_dead_letters_are_shared_by_the_replicas() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = dynamic_chats(&upstream, &sink, "");
    let first = replica(&postgres, "r1", &yaml).await;
    let second = replica(&postgres, "r2", &yaml).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let added = http
        .put(format!("http://{}/v1/streams/chat/c1", first.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(added.status().as_u16(), 201);
    // Read once, by whichever replica it falls to; both list it, with its owner.
    eventually("the instance read by one replica", DEADLINE, || async {
        upstream.connected_entities(Api::Chat) == ["c1"]
    })
    .await;
    eventually("the second replica lists it with its owner", DEADLINE, || async {
        let (_, body) = second.get_with_token("/v1/streams", TOKEN).await;
        let listing: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        listing["streams"]
            .as_array()
            .is_some_and(|streams| streams.len() == 1 && streams[0]["owner"].is_string())
    })
    .await;

    // A refused delivery is a dead letter that either replica's `dlq` sees and replays.
    sink.answer_by_default("/hook", 400);
    assert_eq!(
        upstream.publish_event_to(Api::Chat, "c1", r#"{"type":"node_update","n":1}"#),
        1
    );
    eventually("the dead letter listed", DEADLINE, || async {
        second.dlq(&["list"]).await.contains("1 dead letter(s)")
    })
    .await;
    sink.answer_by_default("/hook", 200);
    assert!(
        second
            .dlq(&["replay", "--all"])
            .await
            .contains("replayed 1 dead letter(s)")
    );
    let delivered = sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    assert_eq!(delivered.len(), 1);
    assert!(first.dlq(&["list"]).await.contains("0 dead letter(s)"));

    // Removed on the other replica: no replica reads it any more.
    let removed = http
        .delete(format!("http://{}/v1/streams/chat/c1", second.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status().as_u16(), 204);
    assert!(
        upstream.wait_for_clients(Api::Chat, 0, DEADLINE).await,
        "the instance stopped everywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_counts_the_deliveries_of_all_replicas_together() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    sink.answer_by_default("/hook", 503);
    // A target that recovers is probed again at once, so that the test measures the store.
    let yaml = twenty_streams(
        &upstream,
        &sink,
        "circuit_breaker: { open_delay: 100ms, max_open_delay: 200ms }",
    );
    let storage = |name: &str| {
        format!("{{ mode: postgres, url: \"${{DATABASE_URL}}\", lease_ttl: 2s, replica: {name}, max_pending: 50 }}")
    };
    let url = postgres.url();
    let env = [("DATABASE_URL", url.as_str()), ("ADMIN_TOKEN", TOKEN)];
    let first = LoggedRelay::start_replica(&storage("r1"), &yaml, &env).await;
    let second = LoggedRelay::start_replica(&storage("r2"), &yaml, &env).await;
    eventually("each stream connected once", DEADLINE, || async {
        each_connected_once(&upstream)
    })
    .await;
    for n in 0..10 {
        for (api, entity) in entities() {
            upstream.publish_event_to(api, &entity, &event(api, &entity, n));
        }
    }
    // 200 events wait for a target that answers 503: the store is full at 50, counted across
    // both replicas.
    for replica in [&first, &second] {
        eventually("readyz says the store is full", DEADLINE, || async {
            let (status, body) = replica.get("/readyz").await;
            status == 503 && body.contains("storage is full (max_pending)")
        })
        .await;
    }
    // The count lags by up to a second; what comes once it is known full waits.
    for (api, entity) in entities() {
        upstream.publish_event_to(api, &entity, &event(api, &entity, 10));
    }
    eventually("the last events received, and waiting for room", DEADLINE, || async {
        let mut n_received = 0.0;
        for replica in [&first, &second] {
            n_received += replica.metric("sse_relay_events_received_total", &[]).await;
        }
        n_received == 220.0
    })
    .await;
    sink.answer_by_default("/hook", 200);
    let delivered = sink.wait_for_delivered("/hook", 220, DEADLINE).await;
    assert_eq!(delivered.len(), 220, "every event delivered once the target recovered");
    let mut n_waited = 0.0;
    for replica in [&first, &second] {
        eventually("readyz answers 200 again", DEADLINE, || async {
            replica.get("/readyz").await.0 == 200
        })
        .await;
        n_waited += replica.metric("sse_relay_backpressure_total", &[]).await;
    }
    assert!(n_waited > 0.0, "the streams waited for room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_the_schema_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let url = postgres.url();
    let migrations = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let pool = sse_relay::queue::postgres::pool(&url, None, Duration::from_secs(10)).unwrap();
            sse_relay::queue::postgres::migrate(&pool).await
        })
    });
    for migrated in futures_util::future::join_all(migrations).await {
        migrated.unwrap().expect("every replica's migration succeeds");
    }
    let pool = sse_relay::queue::postgres::pool(&url, None, Duration::from_secs(10)).unwrap();
    let client = pool.get().await.unwrap();
    let versions: Vec<i32> = client
        .query("SELECT version FROM sse_relay.migrations ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, (1..=versions.len() as i32).collect::<Vec<_>>());
    assert!(versions.len() >= 2, "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_on_every_replica_adds_a_target_that_one_of_them_serves() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::start("").await;
    let with_second = twenty_streams(&fleet.upstream, &fleet.sink, "")
        .replace(
            "routes:\n",
            &format!("  second: {{ url: \"{}\" }}\nroutes:\n", fleet.sink.url("/second")),
        )
        .replace("    targets: [hook]", "    targets: [hook, second]");
    for replica in &fleet.replicas {
        replica.reload(&with_second).await;
    }
    eventually("one replica serves the new target", DEADLINE, || async {
        let mut n_targets = 0.0;
        for replica in &fleet.replicas {
            n_targets += replica.metric("sse_relay_leases_held", &[("kind", "target")]).await;
        }
        n_targets == 2.0
    })
    .await;
    for n in 0..5 {
        fleet.publish_round(n);
    }
    fleet.assert_every_event_delivered(5).await;
    let second = fleet.sink.wait_for_delivered("/second", 100, DEADLINE).await;
    assert_eq!(second.len(), 100, "every event once at the new target");
}

/// A transaction that holds the lock that orders appends, as a replica's writer does.
async fn hold_append_lock(client: &deadpool_postgres::Client) {
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&sse_relay::queue::postgres::APPEND_LOCK],
        )
        .await
        .unwrap();
}

fn stepped_down(fleet: &Fleet) -> bool {
    fleet.replicas.iter().any(|replica| {
        replica
            .log_lines()
            .iter()
            .any(|line| line.contains("cannot renew this replica's leases"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_outside_stalls_no_renewal_and_a_stalled_replicas_transaction_is_ended() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::start("").await;
    let url = fleet.postgres.url();
    for n in 0..5 {
        fleet.publish_round(n);
    }
    fleet.assert_every_event_delivered(5).await;

    // Appends wait for a lock held for longer than lease_ttl (2s) by a session that no relay
    // controls: the replicas' writers wait, and their lease renewals must not wait with them.
    let outside = sse_relay::queue::postgres::pool(&url, None, Duration::from_secs(3600)).unwrap();
    let outside = outside.get().await.unwrap();
    hold_append_lock(&outside).await;
    for n in 5..35 {
        fleet.publish_round(n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !stepped_down(&fleet),
        "a replica lost its leases while appends waited for a lock"
    );
    outside.batch_execute("COMMIT").await.unwrap();
    fleet.assert_every_event_delivered(35).await;

    // A replica stalled inside its append transaction (paused, frozen): its session holds the
    // lock and a stream's lease row. The server ends it a quarter of lease_ttl later, and the
    // others go on.
    let stalled = sse_relay::queue::postgres::pool(&url, None, Duration::from_secs(2)).unwrap();
    let stalled = stalled.get().await.unwrap();
    hold_append_lock(&stalled).await;
    stalled
        .query("SELECT name FROM sse_relay.leases WHERE kind = 'stream' FOR SHARE", &[])
        .await
        .unwrap();
    for n in 35..45 {
        fleet.publish_round(n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.assert_every_event_delivered(45).await;
    let ended = stalled.batch_execute("COMMIT").await;
    assert!(ended.is_err(), "the stalled session was not ended");
    assert!(!stepped_down(&fleet), "a replica lost its leases to a stalled session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_requires_tls_is_reached_as_the_urls_sslmode_asks() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    // The certificate names the database's host name, not 127.0.0.1, where the relay reaches
    // it: verify-ca (the chain) passes, verify-full (and the name) does not.
    let pki = crate::tls::TestPki::for_server(&["db.internal"]);
    let read = |name: &str| std::fs::read_to_string(pki.path(name)).unwrap();
    postgres.require_tls(&read("server.pem"), &read("server.key")).unwrap();
    let ca_file = pki.path("ca.pem");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = twenty_streams(&upstream, &sink, "");
    let storage =
        |tls: &str| format!("{{ mode: postgres, url: \"${{DATABASE_URL}}\", lease_ttl: 2s, replica: r1{tls} }}");
    let with_ca = format!(", tls: {{ ca_file: \"{ca_file}\" }}");

    // Refused: no TLS, an unknown authority, a certificate for another name.
    for (sslmode, tls, expected) in [
        ("disable", "", "no encryption"),
        ("verify-ca", "", "UnknownIssuer"),
        ("verify-full", with_ca.as_str(), "not valid for name"),
    ] {
        let directory = tempfile::tempdir().unwrap();
        let config = directory.path().join("relay.yaml");
        std::fs::write(&config, format!("storage: {}\n{yaml}", storage(tls))).unwrap();
        let url = format!("{}?sslmode={sslmode}", postgres.url());
        let run = crate::support::relay_binary()
            .run_command(&config)
            .env("DATABASE_URL", &url)
            .stderr(std::process::Stdio::piped())
            .output();
        let output = tokio::time::timeout(DEADLINE, run)
            .await
            .expect("the relay gives up")
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{sslmode}: the relay ran");
        assert!(said.contains(expected), "{sslmode}: {said}");
        assert!(!said.contains(PASSWORD), "{sslmode}: {said}");
    }

    // Reached: require takes any certificate (as libpq does), verify-ca checks the chain.
    for (sslmode, tls) in [("require", ""), ("verify-ca", with_ca.as_str())] {
        let url = format!("{}?sslmode={sslmode}", postgres.url());
        let relay = LoggedRelay::start_replica(
            &storage(tls),
            &yaml,
            &[("DATABASE_URL", url.as_str()), ("ADMIN_TOKEN", TOKEN)],
        )
        .await;
        eventually("the replica reads every stream", DEADLINE, || async {
            relay.metric("sse_relay_leases_held", &[("kind", "stream")]).await == 20.0 && each_connected_once(&upstream)
        })
        .await;
        let n_before = sink.delivered("/hook").len();
        upstream.publish_event_to(Api::Chat, "c0", &event(Api::Chat, "c0", 0));
        sink.wait_for_delivered("/hook", n_before + 1, DEADLINE).await;
        assert_eq!(sink.delivered("/hook").len(), n_before + 1, "{sslmode}: delivered");
        relay.signal(libc::SIGTERM);
        assert!(upstream.wait_for_clients(Api::Chat, 0, DEADLINE).await);
    }
}

/// How many of `replicas` report `target` paused (not closed).
async fn n_reporting_paused(replicas: &[LoggedRelay], target: &str) -> usize {
    let mut n = 0;
    for replica in replicas {
        if replica.metric("sse_relay_target_state", &[("target", target)]).await != 0.0 {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_moved_to_another_replica_is_reported_by_that_one_only() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    // Eight targets, all down: each one's breaker opens (and stays open) where it is served.
    // Their names spread them 4 and 4 over r1 and r2, and r3 takes two of r2's (rendezvous
    // hashing of fixed names is deterministic).
    let targets: Vec<String> = (0..8).map(|n| format!("hook{n}")).collect();
    let mut yaml = format!(
        "streams:\n  participant:\n    url: {}\n    event_type: [/eventType]\n    keepalive: [KEEP_ALIVE]\ntargets:\n",
        upstream.participant_url("p0")
    );
    for target in &targets {
        sink.answer_by_default(&format!("/{target}"), 503);
        yaml.push_str(&format!(
            "  {target}:\n    url: {}\n    retry: {{ initial_delay: 20ms, max_delay: 20ms, max_attempts: 1000 }}\n    circuit_breaker: {{ min_attempts: 3, open_delay: 1h, max_open_delay: 1h }}\n",
            sink.url(&format!("/{target}"))
        ));
    }
    yaml.push_str(&format!(
        "routes:\n  - stream: participant\n    targets: [{}]\n",
        targets.join(", ")
    ));
    let mut replicas = vec![
        replica(&postgres, "r1", &yaml).await,
        replica(&postgres, "r2", &yaml).await,
    ];
    eventually("both replicas serve targets", DEADLINE, || async {
        held_by_each(&replicas, "target", 8.0).await
    })
    .await;
    assert!(upstream.wait_for_clients(Api::Participant, 1, DEADLINE).await);
    upstream.publish_event_to(Api::Participant, "p0", &event(Api::Participant, "p0", 0));
    eventually(
        "every target paused, by the replica that serves it",
        DEADLINE,
        || async {
            for target in &targets {
                if n_reporting_paused(&replicas, target).await != 1 {
                    return false;
                }
            }
            true
        },
    )
    .await;
    // A third replica takes its share of the targets: the replicas that let them go no longer
    // report them paused (their alert would fire for a target they do not serve).
    replicas.push(replica(&postgres, "r3", &yaml).await);
    eventually("the third replica serves some targets", DEADLINE, || async {
        replicas[2].metric("sse_relay_leases_held", &[("kind", "target")]).await >= 1.0
    })
    .await;
    eventually("each paused target reported by one replica", DEADLINE, || async {
        for moved in ["hook0", "hook5"] {
            if replicas[2].metric("sse_relay_target_state", &[("target", moved)]).await == 0.0 {
                return false;
            }
        }
        for target in &targets {
            if n_reporting_paused(&replicas, target).await != 1 {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_instance_that_ended_is_not_read_again_by_another_replica() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = twenty_streams(&upstream, &sink, "").replace(
        "    default_event_type: workflow_update\n",
        "    default_event_type: workflow_update\n    stop_when: { events: [workflow_status], where: { /is_active: false } }\n",
    );
    assert!(yaml.contains("stop_when"));
    let mut replicas = vec![
        replica(&postgres, "r1", &yaml).await,
        replica(&postgres, "r2", &yaml).await,
    ];
    eventually("each stream connected once", DEADLINE, || async {
        each_connected_once(&upstream)
    })
    .await;
    // c3's workflow stops: its instance ends on the replica that reads it.
    upstream.publish_event_to(
        Api::Chat,
        "c3",
        r#"{"type":"workflow_status","is_active":false,"entity":"c3","n":0}"#,
    );
    sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    let c3_connected = || upstream.connected_entities(Api::Chat).contains(&"c3".to_owned());
    eventually("c3 no longer read", DEADLINE, || std::future::ready(!c3_connected())).await;
    // Observed for four rounds of leases and more (lease_ttl 2s, a round each 0.5 s): no
    // other replica takes the ended instance up.
    let observed = std::time::Instant::now();
    while observed.elapsed() < Duration::from_secs(4) {
        assert!(!c3_connected(), "another replica reads the ended instance again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nor when a third replica joins and the streams are spread again.
    replicas.push(replica(&postgres, "r3", &yaml).await);
    eventually("the other 19 spread over three replicas", DEADLINE, || async {
        held_by_each(&replicas, "stream", 19.0).await
    })
    .await;
    assert!(!c3_connected(), "the ended instance is read again after a rebalance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_instance_that_ended_is_not_taken_up_by_another_replica() {
    let _one = ONE_AT_A_TIME.lock().await;
    let postgres = PostgresServer::start().await.expect("PostgreSQL starts");
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let yaml = dynamic_chats(
        &upstream,
        &sink,
        "    stop_when: { events: [workflow_status], where: { /is_active: false } }\n",
    );
    let first = replica(&postgres, "r1", &yaml).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let chats: Vec<String> = (0..6).map(|n| format!("c{n}")).collect();
    for chat in &chats {
        let added = http
            .put(format!("http://{}/v1/streams/chat/{chat}", first.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(added.status().as_u16(), 201);
    }
    eventually("each chat read once", DEADLINE, || async {
        let mut connected = upstream.connected_entities(Api::Chat);
        connected.sort();
        connected == chats
    })
    .await;
    // A second replica joins, and before the instances it is to read are handed over, every
    // workflow stops: each instance ends on the first replica, and is forgotten.
    let _second = replica(&postgres, "r2", &yaml).await;
    for chat in &chats {
        upstream.publish_event_to(
            Api::Chat,
            chat,
            &format!(r#"{{"type":"workflow_status","is_active":false,"entity":"{chat}","n":0}}"#),
        );
    }
    sink.wait_for_delivered("/hook", chats.len(), DEADLINE).await;
    eventually("no chat read any more", DEADLINE, || async {
        upstream.connected_entities(Api::Chat).is_empty()
    })
    .await;
    // Observed for eight rounds of leases (lease_ttl 2s): neither replica takes one up again
    // before it has seen it forgotten.
    let observed = std::time::Instant::now();
    while observed.elapsed() < Duration::from_secs(4) {
        let connected = upstream.connected_entities(Api::Chat);
        assert!(connected.is_empty(), "ended instances read again: {connected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
