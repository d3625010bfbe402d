//! Renders shard snapshots as Prometheus (OpenMetrics) text with prometheus-client.
//!
//! Shards keep plain single-threaded counters; the control thread asks each for a snapshot
//! per scrape and builds a fresh registry from them, so the hot path never touches an atomic
//! shared with another core.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::shard::{DeskMetrics, ShardSnapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabels {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    shard: String,
    peer: String,
    ring: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    shard: String,
    slot_bytes: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    shard: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

// Desk label sets. Bounded: tenants come from the configuration, queues from the tenant's
// policy (at most `DeskLimits::queues_max`), groups from its experiment (at most
// `DeskLimits::variants_max`, plus "none"); presences, states, operations and outcomes are
// fixed sets.

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PresenceLabels {
    tenant: String,
    presence: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    tenant: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    tenant: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    tenant: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    tenant: String,
    group: String,
    outcome: String,
}

struct Builder {
    registry: Registry,
}

impl Builder {
    fn counter<L>(&mut self, name: &str, help: &str, values: impl IntoIterator<Item = (L, u64)>)
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let family = Family::<L, Counter>::default();
        for (labels, value) in values {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    fn gauge<L>(&mut self, name: &str, help: &str, values: impl IntoIterator<Item = (L, i64)>)
    where
        L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let family = Family::<L, Gauge>::default();
        for (labels, value) in values {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }
}

fn shard(s: &ShardSnapshot) -> ShardLabels {
    ShardLabels { shard: s.shard.to_string() }
}

fn gauge_i64(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// The /metrics body: shard snapshots, and the desks (each reported by its desk shard).
pub fn render(snapshots: &[ShardSnapshot], desks: &[DeskMetrics]) -> String {
    let mut b = Builder { registry: Registry::with_prefix("switchboard") };
    render_desks(&mut b, desks);
    b.gauge("connections", "Open connections", snapshots.iter().map(|s| (shard(s), gauge_i64(s.connections))));
    b.gauge("sessions", "Sessions owned by the shard", snapshots.iter().map(|s| (shard(s), gauge_i64(s.sessions))));
    b.gauge("subscribed_sessions", "Sessions with subscribers on the shard", snapshots.iter().map(|s| (shard(s), gauge_i64(s.subscribed_sessions))));
    let c = |f: fn(&ShardSnapshot) -> u64| snapshots.iter().map(move |s| (shard(s), f(s))).collect::<Vec<_>>();
    b.counter("connections_accepted", "Connections accepted", c(|s| s.counters.connections_accepted_total));
    b.counter("connections_refused", "Connections refused at the limit", c(|s| s.counters.connections_refused_total));
    b.counter("publishes", "Messages appended", c(|s| s.counters.publishes_total));
    b.counter("publishes_duplicate", "Publishes answered as duplicates", c(|s| s.counters.publishes_duplicate_total));
    b.counter("deliveries", "Frames queued to subscribers by fan-out", c(|s| s.counters.deliveries_total));
    b.counter("delivery_bytes", "Bytes queued to subscribers by fan-out", c(|s| s.counters.delivery_bytes_total));
    b.counter("received_bytes", "Bytes read from connections", c(|s| s.counters.bytes_received_total));
    b.counter("slow_consumer_disconnects", "Connections closed as slow consumers", c(|s| s.counters.slow_consumer_disconnects_total));
    b.counter("protocol_errors", "Connections closed for protocol errors", c(|s| s.counters.protocol_errors_total));
    b.counter("request_errors", "Requests answered with ERROR", c(|s| s.counters.request_errors_total));
    b.counter("pool_fallbacks", "Frames encoded into heap buffers because the pool was exhausted", c(|s| s.counters.pool_fallbacks_total));
    b.counter("sessions_dropped_idle", "Sessions dropped by the idle sweep (limits.session_idle_ms)", c(|s| s.counters.sessions_dropped_idle_total));
    b.counter("session_limit_refusals", "Sessions refused at sessions_per_shard_max (the shard's or a tenant's)", c(|s| s.counters.session_limit_refusals_total));

    let links = |pick: fn(&crate::mesh::LinkStats) -> u64| {
        snapshots
            .iter()
            .flat_map(move |s| {
                let requests = s.request_links.iter().map(move |(peer, stats)| (PeerLabels { shard: s.shard.to_string(), peer: peer.to_string(), ring: "requests".into() }, pick(stats)));
                let events = s.event_links.iter().map(move |(peer, stats)| (PeerLabels { shard: s.shard.to_string(), peer: peer.to_string(), ring: "events".into() }, pick(stats)));
                requests.chain(events)
            })
            .collect::<Vec<_>>()
    };
    b.counter("mesh_sent", "Messages moved into a mesh ring", links(|l| l.sent_total));
    b.counter("mesh_ring_full", "Times a mesh ring was full", links(|l| l.ring_full_total));
    b.counter("mesh_backlogged", "Times a producer waited for a mesh link's backlog", links(|l| l.backlogged_total));
    b.gauge("mesh_backlog_messages", "Messages waiting for a mesh ring", links(|l| l.backlog_messages).into_iter().map(|(l, v)| (l, gauge_i64(v))));
    b.gauge("mesh_backlog_messages_peak", "Most messages ever waiting for a mesh ring", links(|l| l.backlog_messages_peak).into_iter().map(|(l, v)| (l, gauge_i64(v))));

    let classes = |pick: fn(&crate::pool::ClassStats) -> u64| {
        snapshots
            .iter()
            .flat_map(move |s| s.pool.classes.iter().map(move |class| (ClassLabels { shard: s.shard.to_string(), slot_bytes: class.slot_bytes.to_string() }, pick(class))))
            .collect::<Vec<_>>()
    };
    b.gauge("pool_slots", "Slots in a pool class", classes(|c| c.slots as u64).into_iter().map(|(l, v)| (l, gauge_i64(v))));
    b.gauge("pool_in_use", "Slots leased now", classes(|c| c.in_use as u64).into_iter().map(|(l, v)| (l, gauge_i64(v))));
    b.counter("pool_leases", "Leases handed out", classes(|c| c.leases_total));
    b.counter("pool_exhausted", "Leases refused: class and all bigger ones empty", classes(|c| c.exhausted_total));

    b.counter("uring_submits", "io_uring_enter calls that submitted sends", c(|s| s.sender.submits_total));
    b.counter("uring_sqes", "Send operations submitted", c(|s| s.sender.sqes_total));
    b.counter("uring_fixed_sends", "Sends issued as WRITEV_FIXED from the registered buffer pool", c(|s| s.sender.fixed_sends_total));
    b.counter("uring_zc_sends", "Sends issued as zero-copy SEND_ZC from the registered buffer pool (large frames)", c(|s| s.sender.zc_sends_total));
    b.counter("uring_zc_copied", "Zero-copy notifications saying the kernel copied after all", c(|s| s.sender.zc_copied_total));
    b.gauge("uring_zc_held", "Buffers of zero-copy sends waiting for the kernel's notification", c(|s| s.sender.zc_held).into_iter().map(|(l, v)| (l, gauge_i64(v))));
    b.counter("uring_completions", "Completions reaped", c(|s| s.sender.completions_total));
    b.counter("uring_short_writes", "Sends that wrote part of their buffers", c(|s| s.sender.short_writes_total));
    b.counter("uring_eagain", "Sends that found the socket full", c(|s| s.sender.eagain_total));
    b.counter("uring_errors", "Sends that failed and closed their connection", c(|s| s.sender.errors_total));
    b.counter("uring_sent_bytes", "Bytes written to sockets", c(|s| s.sender.bytes_sent_total));
    b.gauge("uring_sqes_per_submit_max", "Most sends in one submission", c(|s| s.sender.max_sqes_per_submit).into_iter().map(|(l, v)| (l, gauge_i64(v))));

    b.counter("journal_refusals", "Publishes refused because the journal could not take them", c(|s| s.counters.journal_refusals_total));
    b.gauge("journal_acks_pending", "Journaled publishes waiting for their acknowledgement", snapshots.iter().map(|s| (shard(s), gauge_i64(s.acks_pending))));
    let journaled: Vec<&ShardSnapshot> = snapshots.iter().filter(|s| s.journal.is_some()).collect();
    if !journaled.is_empty() {
        let j = |f: fn(&crate::journal::JournalStats) -> u64| {
            journaled.iter().filter_map(move |s| s.journal.as_ref().map(|(_, stats)| (shard(s), f(stats)))).collect::<Vec<_>>()
        };
        let healthy = journaled.iter().filter_map(|s| s.journal.as_ref().map(|(health, _)| (shard(s), i64::from(*health == crate::journal::Health::Healthy))));
        b.gauge("journal_healthy", "1 while the shard's journal appends and acknowledges; 0 when failed, full or closed", healthy);
        b.counter("journal_appends", "Records appended to the journal", j(|s| s.appends));
        b.counter("journal_commits", "Journal writes (one group-commit batch each)", j(|s| s.commits));
        b.counter("journal_fdatasyncs", "fdatasyncs of journal segments", j(|s| s.fdatasyncs));
        b.counter("journal_written_bytes", "Bytes written to journal segments, padding included", j(|s| s.bytes_written));
        b.counter("journal_backpressure", "Appends refused because too much was pending", j(|s| s.backpressure));
        b.counter("journal_segments_deleted", "Segments deleted by retention", j(|s| s.segments_deleted));
        b.counter("journal_snapshots", "Index snapshots written", j(|s| s.snapshots));
    }

    let quantiles = [("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99), ("0.999", 0.999), ("1", 1.0)];
    let latency = snapshots
        .iter()
        .flat_map(|s| {
            quantiles.iter().map(move |(name, q)| {
                (QuantileLabels { shard: s.shard.to_string(), quantile: (*name).to_string() }, gauge_i64(s.latency_ns.value_at_quantile(*q)))
            })
        })
        .collect::<Vec<_>>();
    b.gauge("publish_to_enqueue_latency_ns", "Publish decoded to frame queued on each subscriber's socket, by quantile", latency);
    b.counter("publish_to_enqueue_latency_samples", "Samples in the latency histogram", c(|s| s.latency_ns.len()));

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &b.registry).expect("writing to a String cannot fail");
    out
}

fn render_desks(b: &mut Builder, desks: &[DeskMetrics]) {
    let tenant = |d: &DeskMetrics| TenantLabels { tenant: d.tenant.clone() };
    let presence = desks.iter().flat_map(|d| {
        ["online", "away", "offline"]
            .iter()
            .zip(d.agents_by_presence)
            .map(move |(name, count)| (PresenceLabels { tenant: d.tenant.clone(), presence: (*name).to_owned() }, gauge_i64(count)))
    });
    b.gauge("desk_agents", "Agents known to the tenant's desk, by presence", presence);
    b.gauge("desk_agents_connected", "Agents with a connection reporting their status", desks.iter().map(|d| (tenant(d), gauge_i64(d.agents_connected))));
    b.gauge("desk_agent_capacity", "Capacity of online agents, summed", desks.iter().map(|d| (tenant(d), gauge_i64(d.capacity_online))));
    b.gauge("desk_agent_load", "Conversations assigned to agents, summed", desks.iter().map(|d| (tenant(d), gauge_i64(d.load))));
    let queues = |pick: fn(&crate::shard::QueueView) -> u64| {
        desks
            .iter()
            .flat_map(move |d| d.queues.iter().map(move |q| (QueueLabels { tenant: d.tenant.clone(), queue: q.name.clone() }, gauge_i64(pick(q)))))
            .collect::<Vec<_>>()
    };
    b.gauge("desk_queue_length", "Conversations waiting in the queue", queues(|q| q.length as u64));
    b.gauge("desk_queue_oldest_wait_ms", "How long the longest-waiting conversation of the queue has waited, in milliseconds", queues(|q| q.oldest_wait_ms));
    let states = desks.iter().flat_map(|d| {
        let c = d.conversations;
        [("queued", c.queued), ("offered", c.offered), ("active", c.active)]
            .into_iter()
            .map(move |(name, count)| (StateLabels { tenant: d.tenant.clone(), state: name.to_owned() }, gauge_i64(count)))
    });
    b.gauge("desk_conversations", "Open conversations, by state", states);
    let groups = desks.iter().flat_map(|d| {
        d.groups.iter().flat_map(move |g| {
            let group = if g.group.is_empty() { "none".to_owned() } else { g.group.clone() };
            [("opened", g.opened), ("assigned", g.assigned), ("closed", g.closed), ("abandoned", g.abandoned), ("offline", g.offline)]
                .into_iter()
                .map(move |(outcome, count)| (GroupLabels { tenant: d.tenant.clone(), group: group.clone(), outcome: outcome.to_owned() }, count))
        })
    });
    b.counter("desk_group_conversations", "Conversations per A/B group (\"none\": no experiment), by outcome", groups.collect::<Vec<_>>());
    let stat = |pick: fn(&crate::cs::DeskStats) -> u64| desks.iter().map(move |d| (tenant(d), pick(&d.stats))).collect::<Vec<_>>();
    b.counter("desk_offers", "Offers made to agents", stat(|s| s.offers));
    b.counter("desk_offer_timeouts", "Offers that timed out", stat(|s| s.offer_timeouts));
    b.counter("desk_declines", "Offers declined", stat(|s| s.declines));
    b.counter("desk_overflows", "Conversations moved to an overflow queue", stat(|s| s.overflows));
    b.counter("desk_strategy_misses", "Times a strategy broke its contract and least-load was used", stat(|s| s.strategy_misses));
    let requests = |refusals: bool| {
        desks
            .iter()
            .flat_map(move |d| {
                d.requests.iter().map(move |(op, n, refused)| (OpLabels { tenant: d.tenant.clone(), op: (*op).to_owned() }, if refusals { *refused } else { *n }))
            })
            .collect::<Vec<_>>()
    };
    b.counter("desk_requests", "Desk requests handled (access checks included), by operation", requests(false));
    b.counter("desk_refusals", "Desk requests refused, by operation", requests(true));
    b.gauge("desk_policy_version", "Version of the desk policy in force on the tenant's desk shard", desks.iter().map(|d| (tenant(d), gauge_i64(d.policy_version))));
}
