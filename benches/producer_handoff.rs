//! Shard-to-producer handoff (ADR-002): what it costs to hand an accepted event from a
//! shard thread to the one shared rdkafka producer, measured against a real broker.
//!
//! Three handoffs, each with 1 and 2 sending threads standing in for shards:
//!
//! - `direct`: every sending thread calls `ThreadedProducer::send` itself, as
//!   `src/kafka/producer.rs` does. librdkafka's produce is thread-safe: it copies the
//!   record and appends it to the partition's queue under a lock.
//! - `channel`: each record goes into one bounded crossbeam channel and a single
//!   forwarding thread calls `send`.
//! - `channel_batch`: as `channel`, but one channel message carries a whole request's
//!   records, the cheapest form a channel handoff can take.
//!
//! Two baselines produce nothing: `build_only` (the sending threads build the records and
//! drop them) and `channel_only` (as `channel`, but the forwarder drops them).
//!
//! Everywhere the sending thread builds owned records (key and 200-byte JSON body), as the
//! ingest handler does, and the records of one request share one `Arc` delivery counter,
//! as `RequestAck` does. The producer is configured like production: idempotent, lz4,
//! `linger.ms=5`, with a queue large enough never to refuse a record here.
//!
//! Three measurements:
//!
//! 1. criterion, `handoff/<kind>/<threads>`: wall time per record from the first send until
//!    every record is inside librdkafka's queue (for the channels: until the forwarding
//!    thread's last `send` returned). librdkafka compresses and ships batches during the
//!    timing, as in production; after each sample the bench waits for every delivery
//!    report, outside the timing, so each sample starts with an empty queue. A line after
//!    each benchmark gives the time the sending threads were busy per record (what a
//!    shard pays, including any wait on a full channel) and the CPU the whole process
//!    used per record until the last delivery report.
//! 2. end to end: from the first send until the delivery report of the last of N records
//!    (default 200,000) in runs that interleave the handoffs: median records/s and
//!    process CPU per record.
//! 3. paced: a fixed rate (default 100,000 events/s, the service's target) for 3 s;
//!    request latency from due time to last delivery report, and process CPU in cores.
//!
//! Start a broker on loopback, then
//! `BENCH_KAFKA_BROKERS=127.0.0.1:PORT cargo bench --bench producer_handoff`.
//! The bench deletes and recreates its topic, `fanfinity.bench.handoff`, at start. Without
//! the variable it says so and exits 0.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use crossbeam_channel::bounded;
use futures_lite::future::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

// The service runs on mimalloc; records are allocated on one thread and may be freed on
// another, so the allocator is part of what a channel handoff costs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BROKERS_ENV: &str = "BENCH_KAFKA_BROKERS";
const E2E_RECORDS_ENV: &str = "FANFINITY_BENCH_E2E_RECORDS";
const E2E_RUNS_ENV: &str = "FANFINITY_BENCH_E2E_RUNS";
const PACED_RATE_ENV: &str = "FANFINITY_BENCH_PACED_RATE";
const PACED_RUNS_ENV: &str = "FANFINITY_BENCH_PACED_RUNS";

const TOPIC: &str = "fanfinity.bench.handoff";
const PARTITIONS: i32 = 3;

/// Events per simulated HTTP request; they share one delivery counter.
const REQUEST_EVENTS: usize = 100;
/// Records the handoff channel holds before a sending thread blocks: a few milliseconds of
/// the forwarding thread's work, enough to absorb a burst without hiding a slow consumer.
const CHANNEL_RECORDS: usize = 8192;
/// Distinct partition keys (match ids) the records are spread over.
const MATCHES: usize = 48;

const PAYLOAD_BYTES: usize = 200;
/// An event body with placeholder slots; `EventSource` fills them per event so that lz4
/// sees about as much variety as in real events, not one repeated body.
const TEMPLATE: &str = "{\"event_id\":\"IIIIIIIIIIIIIIIIIIIIIIIIIIIIIIII\",\
\"match_id\":\"MMMMMMMMMMMMMMMMMMMMM\",\"user_id\":\"fan-UUUUUUU\",\"type\":\"TTTTTTTT\",\
\"ts\":SSSSSSSSSSSSS,\"data\":{\"minute\":NN,\"client\":\"ios-5.2.1\"}}";
const _: () = assert!(TEMPLATE.len() <= PAYLOAD_BYTES);
/// Event types of equal length, so they fit one slot.
const TYPES: [&[u8; 8]; 4] = [b"reaction", b"pollvote", b"chatline", b"cheering"];

/// How long a sample or an end-to-end run may wait for its delivery reports.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// One event as the ingest handler holds it: partition key and encoded body.
struct Event {
    key: String,
    payload: Vec<u8>,
}

/// Where each placeholder of [`TEMPLATE`] starts.
struct Slots {
    event_id: usize,
    match_id: usize,
    user_id: usize,
    kind: usize,
    ts: usize,
    minute: usize,
}

/// Builds the events: 200-byte JSON bodies keyed by match id, with a distinct event id
/// and pseudo-random user, type, time and minute.
struct EventSource {
    keys: Vec<String>,
    template: Vec<u8>,
    slots: Slots,
}

impl EventSource {
    fn new() -> Self {
        let keys: Vec<String> = (0..MATCHES)
            .map(|m| format!("wc2026-m{m:03}-home-away"))
            .collect();
        let mut template = TEMPLATE.as_bytes().to_vec();
        template.resize(PAYLOAD_BYTES, b' ');
        let slot = |marker: &str| TEMPLATE.find(marker).expect("template has every slot");
        let slots = Slots {
            event_id: slot("IIII"),
            match_id: slot("MMMM"),
            user_id: slot("UUUU"),
            kind: slot("TTTT"),
            ts: slot("SSSS"),
            minute: slot("NN"),
        };
        assert_eq!(keys[0].len(), 21, "match ids fill their slot exactly");
        Self {
            keys,
            template,
            slots,
        }
    }

    /// The events of one request: one match, consecutive sequence numbers.
    fn request(&self, request: usize, first_seq: u64, events: usize) -> Vec<Event> {
        let key = &self.keys[request % MATCHES];
        (first_seq..first_seq + events as u64)
            .map(|seq| Event {
                key: key.clone(),
                payload: self.body(key, seq),
            })
            .collect()
    }

    fn body(&self, key: &str, seq: u64) -> Vec<u8> {
        let slots = &self.slots;
        let bits = splitmix64(seq);
        let mut body = self.template.clone();
        write_digits(&mut body[slots.event_id..slots.event_id + 16], bits, 16);
        write_digits(&mut body[slots.event_id + 16..slots.event_id + 32], seq, 16);
        body[slots.match_id..slots.match_id + key.len()].copy_from_slice(key.as_bytes());
        write_digits(&mut body[slots.user_id..slots.user_id + 7], bits >> 8, 10);
        body[slots.kind..slots.kind + 8].copy_from_slice(TYPES[(bits >> 60) as usize % 4]);
        write_digits(
            &mut body[slots.ts..slots.ts + 13],
            1_781_280_000_000 + seq * 7,
            10,
        );
        write_digits(
            &mut body[slots.minute..slots.minute + 2],
            (bits >> 40) % 90,
            10,
        );
        body
    }
}

/// Writes `value`'s lowest digits in `radix` (10 or 16) into `slot`, zero-padded.
fn write_digits(slot: &mut [u8], mut value: u64, radix: u64) {
    for byte in slot.iter_mut().rev() {
        *byte = b"0123456789abcdef"[(value % radix) as usize];
        value /= radix;
    }
}

/// A cheap, well-mixed hash of a sequence number (Steele, Lea and Flood's SplitMix64).
fn splitmix64(seq: u64) -> u64 {
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Delivery bookkeeping of one request, like `RequestAck` without the waker.
struct RequestAck {
    remaining: AtomicUsize,
    /// When the request was due to be sent; its latency is measured from here.
    due: Instant,
}

impl RequestAck {
    fn new(records: usize, due: Instant) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(records),
            due,
        })
    }
}

/// Counts delivery reports (the runs wait on `reports`) and, while `record_latency` is
/// set, records each request's latency once its last report arrived.
#[derive(Default)]
struct Deliveries {
    reports: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    record_latency: AtomicBool,
    /// Microseconds from a request's due time to its last delivery report.
    latencies_us: Mutex<Vec<u64>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<RequestAck>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Arc<RequestAck>) {
        if let Err((err, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut slot) = self.first_error.lock() {
                slot.get_or_insert_with(|| err.to_string());
            }
        }
        let last = ack.remaining.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && self.record_latency.load(Ordering::Relaxed) {
            let latency_us = ack.due.elapsed().as_micros() as u64;
            if let Ok(mut latencies) = self.latencies_us.lock() {
                latencies.push(latency_us);
            }
        }
        self.reports.fetch_add(1, Ordering::Release);
    }
}

type BenchProducer = ThreadedProducer<Deliveries>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Handoff {
    /// Baseline: the sending threads build events and drop them; nothing is produced.
    BuildOnly,
    /// Baseline: as `Channel`, but the forwarding thread drops each record unsent. What a
    /// shard pays for the channel alone while the forwarder keeps up.
    ChannelOnly,
    Direct,
    Channel,
    ChannelBatch,
}

impl Handoff {
    /// The handoffs that produce, in the order they are reported.
    const PRODUCING: [Handoff; 3] = [Handoff::Direct, Handoff::Channel, Handoff::ChannelBatch];
    /// The baselines, which produce nothing.
    const BASELINES: [Handoff; 2] = [Handoff::BuildOnly, Handoff::ChannelOnly];

    fn name(self) -> &'static str {
        match self {
            Handoff::BuildOnly => "build_only",
            Handoff::ChannelOnly => "channel_only",
            Handoff::Direct => "direct",
            Handoff::Channel => "channel",
            Handoff::ChannelBatch => "channel_batch",
        }
    }
}

/// What one run of a handoff took.
struct HandoffTimes {
    /// When the first sending thread started.
    start: Instant,
    /// From `start` until every record was inside librdkafka's queue.
    enqueued: Duration,
    /// Time the sending threads spent in their loops, summed over threads.
    shard_busy: Duration,
}

/// The shared producer and what every run needs besides it.
struct Bench {
    producer: BenchProducer,
    source: EventSource,
    /// Times librdkafka refused a record with a full queue and it was retried.
    queue_full_retries: AtomicU64,
}

impl Bench {
    fn new(brokers: &str) -> Self {
        let producer: BenchProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", "fanfinity-bench-handoff")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.size", "1048576")
            .set("message.timeout.ms", "60000")
            // Never refuse a record: criterion's largest samples queue a few hundred thousand.
            .set("queue.buffering.max.messages", "4000000")
            .set("queue.buffering.max.kbytes", "4194304")
            .create_with_context(Deliveries::default())
            .unwrap_or_else(|err| panic!("cannot create the producer: {err}"));
        Self {
            producer,
            source: EventSource::new(),
            queue_full_retries: AtomicU64::new(0),
        }
    }

    fn deliveries(&self) -> &Deliveries {
        self.producer.context()
    }

    /// Enqueues one record, retrying while librdkafka's queue is full.
    fn send(&self, ack: &Arc<RequestAck>, event: &Event) {
        let mut record = BaseRecord::with_opaque_to(TOPIC, Arc::clone(ack))
            .key(event.key.as_bytes())
            .payload(&event.payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    self.queue_full_retries.fetch_add(1, Ordering::Relaxed);
                    record = back;
                    thread::sleep(Duration::from_micros(100));
                }
                Err((err, _)) => panic!("enqueue failed: {err}"),
            }
        }
    }

    /// Delivery reports received so far, failed ones included.
    fn reports(&self) -> u64 {
        self.deliveries().reports.load(Ordering::Acquire)
    }

    /// Waits until `target` delivery reports have arrived, then checks that none failed: a
    /// failed delivery makes the numbers meaningless.
    ///
    /// `Producer::flush` is not used: it polls in steps of up to 100 ms while the
    /// producer's own thread takes the reports, which distorted criterion's warm-up.
    fn drain(&self, target: u64, since: Instant) {
        while self.reports() < target {
            assert!(
                since.elapsed() < DELIVERY_TIMEOUT,
                "{} delivery reports missing after {DELIVERY_TIMEOUT:?}",
                target - self.reports()
            );
            thread::sleep(Duration::from_micros(100));
        }

        let deliveries = self.deliveries();
        let failed = deliveries.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let reason = deliveries.first_error.lock().ok().and_then(|e| e.clone());
            panic!("{failed} deliveries failed, first: {reason:?}");
        }
    }

    /// Runs `records` events through `handoff` from `threads` sending threads and returns
    /// once all of them are inside librdkafka's queue (not yet delivered). With `pace`,
    /// each sending thread starts a request every `pace`; without, back to back.
    fn run(
        &self,
        handoff: Handoff,
        threads: usize,
        records: usize,
        pace: Option<Duration>,
    ) -> HandoffTimes {
        let barrier = Barrier::new(threads + 1);
        let share = |t: usize| records / threads + usize::from(t < records % threads);

        thread::scope(|s| match handoff {
            Handoff::BuildOnly | Handoff::Direct => {
                let senders: Vec<_> = (0..threads)
                    .map(|t| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            self.shard_loop(t, share(t), pace, |ack, events| match handoff {
                                Handoff::Direct => {
                                    for event in &events {
                                        self.send(&ack, event);
                                    }
                                }
                                _ => drop(black_box(events)),
                            })
                        })
                    })
                    .collect();

                barrier.wait();
                let (start, last_end, shard_busy) = join_all(senders);
                HandoffTimes {
                    start,
                    enqueued: last_end - start,
                    shard_busy,
                }
            }
            Handoff::Channel | Handoff::ChannelOnly => {
                let (tx, rx) = bounded::<(Arc<RequestAck>, Event)>(CHANNEL_RECORDS);
                let forwarder = s.spawn(move || {
                    for (ack, event) in rx {
                        match handoff {
                            Handoff::Channel => self.send(&ack, &event),
                            _ => drop(black_box((ack, event))),
                        }
                    }
                    Instant::now()
                });
                let senders: Vec<_> = (0..threads)
                    .map(|t| {
                        let (barrier, tx) = (&barrier, tx.clone());
                        s.spawn(move || {
                            barrier.wait();
                            self.shard_loop(t, share(t), pace, |ack, events| {
                                for event in events {
                                    tx.send((Arc::clone(&ack), event))
                                        .expect("the forwarding thread outlives the senders");
                                }
                            })
                        })
                    })
                    .collect();
                // The forwarder stops once the last sender's handle is dropped.
                drop(tx);

                barrier.wait();
                let (start, _, shard_busy) = join_all(senders);
                let done = forwarder.join().expect("forwarding thread panicked");
                HandoffTimes {
                    start,
                    enqueued: done - start,
                    shard_busy,
                }
            }
            Handoff::ChannelBatch => {
                let (tx, rx) =
                    bounded::<(Arc<RequestAck>, Vec<Event>)>(CHANNEL_RECORDS / REQUEST_EVENTS);
                let forwarder = s.spawn(move || {
                    for (ack, events) in rx {
                        for event in &events {
                            self.send(&ack, event);
                        }
                    }
                    Instant::now()
                });
                let senders: Vec<_> = (0..threads)
                    .map(|t| {
                        let (barrier, tx) = (&barrier, tx.clone());
                        s.spawn(move || {
                            barrier.wait();
                            self.shard_loop(t, share(t), pace, |ack, events| {
                                tx.send((ack, events))
                                    .expect("the forwarding thread outlives the senders");
                            })
                        })
                    })
                    .collect();
                drop(tx);

                barrier.wait();
                let (start, _, shard_busy) = join_all(senders);
                let done = forwarder.join().expect("forwarding thread panicked");
                HandoffTimes {
                    start,
                    enqueued: done - start,
                    shard_busy,
                }
            }
        })
    }

    /// One sending thread: builds `records` events in requests of [`REQUEST_EVENTS`] and
    /// hands each request to `hand_off`, every `pace` or back to back. Returns when the
    /// loop started and how long it took.
    ///
    /// A paced request that is late is sent at once but keeps its due time, so a stall
    /// shows up in the latencies instead of being hidden by a later start.
    fn shard_loop(
        &self,
        shard: usize,
        records: usize,
        pace: Option<Duration>,
        mut hand_off: impl FnMut(Arc<RequestAck>, Vec<Event>),
    ) -> (Instant, Duration) {
        let start = Instant::now();
        let first_seq = (shard as u64) << 40;
        let mut sent = 0;
        let mut request = 0;
        while sent < records {
            let due = match pace {
                Some(pace) => {
                    let due = start + pace * request as u32;
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    due
                }
                None => Instant::now(),
            };
            let events = REQUEST_EVENTS.min(records - sent);
            let batch = self
                .source
                .request(shard * 7 + request, first_seq + sent as u64, events);
            hand_off(RequestAck::new(events, due), batch);
            sent += events;
            request += 1;
        }
        (start, start.elapsed())
    }

    /// Runs `records` events and waits for every delivery report. Expects an empty
    /// producer queue.
    fn run_end_to_end(&self, handoff: Handoff, threads: usize, records: usize) -> EndToEnd {
        let target = self.reports() + records as u64;
        let cpu_before = process_cpu();

        let times = self.run(handoff, threads, records, None);
        self.drain(target, times.start);

        EndToEnd {
            enqueued: times.enqueued,
            delivered: times.start.elapsed(),
            cpu: process_cpu() - cpu_before,
        }
    }

    /// Sends `rate` events/s in requests of [`REQUEST_EVENTS`] for `duration`, spread over
    /// `threads` sending threads, and waits for every delivery report.
    fn run_paced(
        &self,
        handoff: Handoff,
        threads: usize,
        rate: usize,
        duration: Duration,
    ) -> Paced {
        let records = (rate as f64 * duration.as_secs_f64()) as usize;
        let pace = Duration::from_secs_f64((threads * REQUEST_EVENTS) as f64 / rate as f64);
        let deliveries = self.deliveries();
        if let Ok(mut latencies) = deliveries.latencies_us.lock() {
            latencies.clear();
        }
        deliveries.record_latency.store(true, Ordering::Relaxed);
        let target = self.reports() + records as u64;
        let cpu_before = process_cpu();

        let times = self.run(handoff, threads, records, Some(pace));
        self.drain(target, times.start);

        let cpu = process_cpu() - cpu_before;
        let wall = times.start.elapsed();
        deliveries.record_latency.store(false, Ordering::Relaxed);
        let mut latencies_us = deliveries
            .latencies_us
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        latencies_us.sort_unstable();
        let quantile = |q: f64| {
            let rank = ((latencies_us.len() as f64 * q).ceil() as usize).max(1);
            latencies_us
                .get(rank - 1)
                .map_or(0.0, |&us| us as f64 / 1000.0)
        };
        Paced {
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            max_ms: quantile(1.0),
            cpu_share: cpu.as_secs_f64() / wall.as_secs_f64(),
        }
    }
}

/// One paced run: request latency from due time to last delivery report.
struct Paced {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Process CPU time over wall time: 1.0 is one core busy.
    cpu_share: f64,
}

/// One end-to-end run, times from the first send.
struct EndToEnd {
    /// Until every record was inside librdkafka's queue.
    enqueued: Duration,
    /// Until the last delivery report arrived.
    delivered: Duration,
    /// CPU the whole process used meanwhile: sending, forwarding and librdkafka threads.
    cpu: Duration,
}

/// CPU time this process has used so far, user and system, over all its threads.
fn process_cpu() -> Duration {
    // SAFETY: `rusage` is plain integers and timevals; all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `getrusage` only writes into the struct it is handed.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) fails only on bad arguments");
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Joins the sending threads. Returns the first start, the last end and the busy time
/// summed over threads.
fn join_all(
    handles: Vec<thread::ScopedJoinHandle<'_, (Instant, Duration)>>,
) -> (Instant, Instant, Duration) {
    let loops: Vec<(Instant, Duration)> = handles
        .into_iter()
        .map(|h| h.join().expect("sending thread panicked"))
        .collect();
    let busy = loops.iter().map(|&(_, busy)| busy).sum();
    let first_start = loops.iter().map(|&(start, _)| start).min();
    let last_end = loops.iter().map(|&(start, busy)| start + busy).max();
    match (first_start, last_end) {
        (Some(first_start), Some(last_end)) => (first_start, last_end, busy),
        _ => unreachable!("there is always at least one sending thread"),
    }
}

/// Creates the bench topic afresh with [`PARTITIONS`] partitions, then waits until the
/// producer sees all of them.
///
/// A topic left by an earlier run is deleted first: one run writes tens of millions of
/// records, and a memory-only broker (Tansu's memory store) keeps them all until the
/// topic goes, so a few runs would fill the machine's memory.
fn create_topic(brokers: &str, producer: &BenchProducer) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap_or_else(|err| panic!("cannot create the admin client: {err}"));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));

    let results = block_on(admin.delete_topics(&[TOPIC], &options))
        .unwrap_or_else(|err| panic!("cannot delete topic {TOPIC} on {brokers}: {err}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => panic!("cannot delete topic {name}: {code}"),
        }
    }

    let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
    let results = block_on(admin.create_topics([&topic], &options))
        .unwrap_or_else(|err| panic!("cannot create topic {TOPIC} on {brokers}: {err}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => panic!("cannot create topic {name}: {code}"),
        }
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partitions = producer
            .client()
            .fetch_metadata(Some(TOPIC), Duration::from_secs(5))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()));
        if partitions == Some(PARTITIONS as usize) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "topic {TOPIC} has {partitions:?} partitions, expected {PARTITIONS}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The criterion part: wall time per record until librdkafka holds every record.
fn bench_enqueue(criterion: &mut Criterion, bench: &Bench) {
    let mut group = criterion.benchmark_group("handoff");
    // One iteration is one record, so criterion's throughput is records/s.
    group.throughput(Throughput::Elements(1));

    for threads in [1, 2] {
        let handoffs = Handoff::BASELINES.into_iter().chain(Handoff::PRODUCING);
        for handoff in handoffs {
            let mut records = 0u64;
            let mut shard_busy = Duration::ZERO;
            let mut cpu = Duration::ZERO;
            let retries_before = bench.queue_full_retries.load(Ordering::Relaxed);

            let id = BenchmarkId::new(handoff.name(), threads);
            group.bench_with_input(id, &threads, |b, &threads| {
                b.iter_custom(|iters| {
                    let produced = if Handoff::BASELINES.contains(&handoff) {
                        0
                    } else {
                        iters
                    };
                    let target = bench.reports() + produced;
                    let cpu_before = process_cpu();

                    let times = bench.run(handoff, threads, iters as usize, None);
                    bench.drain(target, times.start);

                    records += iters;
                    shard_busy += times.shard_busy;
                    cpu += process_cpu() - cpu_before;
                    times.enqueued
                });
            });

            if records == 0 {
                // Filtered out on the command line.
                continue;
            }
            let retries = bench.queue_full_retries.load(Ordering::Relaxed) - retries_before;
            let per_record = |d: Duration| d.as_nanos() as f64 / records.max(1) as f64;
            println!(
                "handoff/{}/{threads}: sending threads busy {:.0} ns/record, process CPU \
                 {:.0} ns/record (sending to last report), {records} records, queue-full \
                 retries {retries}\n",
                handoff.name(),
                per_record(shard_busy),
                per_record(cpu),
            );
        }
    }
    group.finish();
}

/// The end-to-end part: records/s from the first send to the last delivery report.
fn bench_end_to_end(bench: &Bench, records: usize, runs: usize) {
    let configs: Vec<(Handoff, usize)> = [1, 2]
        .into_iter()
        .flat_map(|t| Handoff::PRODUCING.map(|h| (h, t)))
        .collect();
    let mut delivered: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut enqueued: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];

    // Interleaved, so drift in the machine's load spreads over every configuration.
    for _ in 0..runs {
        for (i, &(handoff, threads)) in configs.iter().enumerate() {
            let run = bench.run_end_to_end(handoff, threads, records);
            delivered[i].push(records as f64 / run.delivered.as_secs_f64());
            enqueued[i].push(records as f64 / run.enqueued.as_secs_f64());
            cpu[i].push(run.cpu.as_nanos() as f64 / records as f64);
        }
    }

    println!("end to end: {records} records per run, {runs} runs each, interleaved");
    println!(
        "| handoff | threads | delivered rec/s: median | min | max \
         | enqueued rec/s: median | process CPU ns/record: median |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, &(handoff, threads)) in configs.iter().enumerate() {
        let (median_rate, min, max) = spread(&mut delivered[i]);
        println!(
            "| {} | {threads} | {median_rate:.0} | {min:.0} | {max:.0} | {:.0} | {:.0} |",
            handoff.name(),
            spread(&mut enqueued[i]).0,
            spread(&mut cpu[i]).0,
        );
    }
}

/// The paced part: request latency and process CPU at a fixed event rate, the load the
/// service actually sees, far below what the handoffs can take.
fn bench_paced(bench: &Bench, rate: usize, duration: Duration, runs: usize) {
    let configs: Vec<(Handoff, usize)> = [1, 2]
        .into_iter()
        .flat_map(|t| Handoff::PRODUCING.map(|h| (h, t)))
        .collect();
    let mut results: Vec<Vec<Paced>> = configs.iter().map(|_| Vec::new()).collect();

    for _ in 0..runs {
        for (i, &(handoff, threads)) in configs.iter().enumerate() {
            results[i].push(bench.run_paced(handoff, threads, rate, duration));
        }
    }

    println!(
        "paced: {rate} events/s in requests of {REQUEST_EVENTS} for {duration:?}, {runs} runs \
         each, interleaved; request latency from due time to last delivery report"
    );
    println!("| handoff | threads | p50 ms | p99 ms | max ms | process CPU, cores |");
    println!("|---|---|---|---|---|---|");
    for (i, &(handoff, threads)) in configs.iter().enumerate() {
        let column =
            |f: fn(&Paced) -> f64| spread(&mut results[i].iter().map(f).collect::<Vec<_>>()).0;
        println!(
            "| {} | {threads} | {:.2} | {:.2} | {:.2} | {:.3} |",
            handoff.name(),
            column(|p| p.p50_ms),
            column(|p| p.p99_ms),
            column(|p| p.max_ms),
            column(|p| p.cpu_share),
        );
    }
}

/// Median, minimum and maximum of a non-empty sample.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    let median = if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    };
    (median, values[0], values[values.len() - 1])
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {value:?}")),
        Err(_) => default,
    }
}

fn main() {
    let Ok(brokers) = std::env::var(BROKERS_ENV) else {
        eprintln!(
            "producer_handoff: skipped, {BROKERS_ENV} is not set. Start a broker on \
             loopback and set it to HOST:PORT (docs/benchmarks.md)."
        );
        return;
    };
    // `cargo test --benches` runs this binary without `--bench`: criterion then runs each
    // benchmark once, and the end-to-end part is skipped.
    let bench_mode = std::env::args().any(|arg| arg == "--bench");

    let bench = Bench::new(&brokers);
    create_topic(&brokers, &bench.producer);
    // The first records wait for the idempotent producer id and the partition leaders.
    bench.run_end_to_end(Handoff::Direct, 1, 20_000);

    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_enqueue(&mut criterion, &bench);
    criterion.final_summary();

    let runs = env_usize(E2E_RUNS_ENV, 7);
    if bench_mode && runs > 0 {
        bench_end_to_end(&bench, env_usize(E2E_RECORDS_ENV, 200_000), runs);
    }
    let runs = env_usize(PACED_RUNS_ENV, 2);
    if bench_mode && runs > 0 {
        let rate = env_usize(PACED_RATE_ENV, 100_000);
        bench_paced(&bench, rate, Duration::from_secs(3), runs);
    }
}
