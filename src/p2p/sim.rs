//! A discrete-event simulator of a fleet booting one image with P2P, for
//! 1 to 10,000 hosts. It owns the model (links, the store, each host's
//! fetch scheduler, upload slots and boot replay) and an event loop on a
//! simulated clock; every decision about where a chunk comes from is made
//! by the daemon's own code: `hrw::ranked` places chunks,
//! `policy::candidates` picks whom to ask, `policy::redirect` /
//! `policy::source` / `policy::served` with the daemon's `Directory` decide
//! at the home (which names a member once its upload to it is sent, or
//! once the member announces it verified the chunk, `policy::announce_to`),
//! `policy::starts_prefetch` / `Prefetched` / `home_profile_chunks` decide
//! a home's profile prefetch, `policy::Requester` decides what a requester does with
//! each answer, and `fetch::fleet_order` shuffles the profile. It models
//! links, not CPUs: no TLS, no hashing, no syscalls.
//!
//! Model: each host has an uplink and a downlink, FIFO at `host_rate`; a
//! chunk goes through the sender's uplink and then the receiver's
//! downlink (cut-through: it ends when the slower of the two is done). A
//! message costs half the RTT each way. The store has one FIFO uplink at
//! `store_rate` and adds `store_delay` to each request; it sends the
//! stored (compressed) bytes, and so do peers: a host keeps the stored
//! form of what it fetched or was sent (`fetch`'s 64 MiB LRU, more than a
//! boot's working set), and sends it. Per host, as the daemon: fetches
//! single-flighted per chunk, `FetchConfig`'s 8 workers (a flight waiting
//! on peers holds none), at most 4 profile/background flights on the store
//! and 16 waiting on peers (`fetch::PEER_WINDOW`), taken as the scheduler
//! takes them (`fetch::SCAN`); the profile streamed 4 at a time in a 64 MiB
//! window ahead of the reads; the peer server's load (`policy::Load`: a
//! request from its arrival until its upload is sent), 4 upload slots granted by class, at most 64
//! waiting, a 64 MiB upload buffer, answers within the requester's wait
//! (1.5 s) or 503; a busy home asked again until the fetch's deadline less
//! one request's budgets (26 s), then the store, not the next candidate; a
//! refusing peer skipped for 250 ms (a reset connection is not a refusal);
//! a host among a chunk's candidates asks the member ranked after it
//! whether it holds the chunk (as a holder: it neither fetches nor
//! redirects), as the client does. Demand reads are closed-loop, one at a
//! time, as the fleet benchmark's client.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::client::REFUSED_DOWN_FOR;
use super::directory::Directory;
use super::policy::{self, Hop, Load, LoadGuard, Reply, Requester, Source, Step, CANDIDATES};
use super::slots::MAX_WAITING;
use super::{hrw, PeerTimeouts, ServerLimits};
use crate::fetch::{fleet_order, Class, FetchConfig, PEER_WINDOW, SCAN};
use crate::store::Digest;

/// Simulated time, nanoseconds since the start.
type Ns = u64;

fn ns(d: Duration) -> Ns {
    d.as_nanos() as Ns
}

/// The daemon's default profile window (`--profile-window-mib` 64).
const PROFILE_WINDOW_BYTES: u64 = 64 << 20;

/// What is simulated.
#[derive(Clone, Debug)]
pub struct Config {
    pub hosts: usize,
    /// Each host's uplink and downlink, bits per second.
    pub host_rate: u64,
    /// The store's uplink, bits per second.
    pub store_rate: u64,
    pub rtt: Duration,
    /// Added by the store to each request.
    pub store_delay: Duration,
    /// Stream the boot profile ahead of the reads.
    pub profile: bool,
    /// `--p2p-upload-slots`.
    pub upload_slots: usize,
    /// A what-if, not the daemon yet (fix 1): a request for a chunk its
    /// home is fetching waits for the fetch without reserving upload
    /// buffer, and once the chunk is there it is redirected if the home
    /// knows holders and has as many requests before it as slots.
    pub park_cold: bool,
    /// A home prefetches the profile chunks it is home for on the first
    /// profile request (with the profile on), as the daemon does.
    pub home_prefetch: bool,
    /// Kill, at this time, the member that is home for the most chunks
    /// from 30% of the profile on (as a SIGKILL: connections refused).
    pub kill_at: Option<Duration>,
    pub seed: u64,
}

impl Config {
    /// The fleet benchmark's setting: store 100 Mbit/s, hosts 1 Gbit/s.
    pub fn fleet(hosts: usize) -> Config {
        Config {
            hosts,
            host_rate: 1_000_000_000,
            store_rate: 100_000_000,
            rtt: Duration::from_micros(200),
            store_delay: Duration::from_millis(1),
            profile: false,
            upload_slots: 4,
            park_cold: false,
            home_prefetch: false,
            kill_at: None,
            seed: 1,
        }
    }
}

/// One chunk of the image.
#[derive(Clone, Debug)]
pub struct ChunkSpec {
    pub digest: Digest,
    /// Plaintext bytes (what peers send).
    pub len: u32,
    /// Stored bytes (what the store sends).
    pub stored: u32,
}

/// The image's chunks, in first-access (profile) order, and the boot's
/// reads, each naming the chunk it falls in.
#[derive(Clone, Debug)]
pub struct Workload {
    pub chunks: Vec<ChunkSpec>,
    pub reads: Vec<u32>,
    pub what: String,
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Workload {
    /// A synthetic boot with the recorded Debian boot's shape: 271 chunks
    /// of 256 KiB (67.75 MiB plaintext), 19.3 MiB as stored (sizes skewed
    /// as zstd leaves them: most compress well, a few not at all), read in
    /// 2,355 reads (36.8 MiB of distinct 4 KiB blocks at 16 KiB a read):
    /// each chunk's first read, then re-reads of the last few chunks.
    pub fn debian_like() -> Workload {
        Workload::synthetic(271, 256 << 10, (19.3 * (1 << 20) as f64) as u64, 2355)
    }

    /// `chunks` chunks of `len` bytes, `stored` bytes in all, `reads` reads.
    pub fn synthetic(chunks: usize, len: u32, stored: u64, reads: usize) -> Workload {
        let mut rng = Rng(0x5eed_b007);
        let raw: Vec<f64> = (0..chunks).map(|_| rng.unit().powi(2) + 0.02).collect();
        let scale = stored as f64 / raw.iter().sum::<f64>();
        let chunks: Vec<ChunkSpec> = raw
            .iter()
            .enumerate()
            .map(|(i, r)| ChunkSpec {
                digest: Digest::of(format!("sim chunk {i}").as_bytes()),
                len,
                stored: ((r * scale) as u32).clamp(512, len),
            })
            .collect();
        let per_chunk = reads.saturating_sub(chunks.len()) as f64 / chunks.len().max(1) as f64;
        let mut out = Vec::with_capacity(reads);
        let mut owed = 0.0;
        for c in 0..chunks.len() as u32 {
            out.push(c);
            owed += per_chunk;
            while owed >= 1.0 {
                out.push(c.saturating_sub((rng.next() % 8) as u32));
                owed -= 1.0;
            }
        }
        Workload {
            what: format!(
                "synthetic: {} chunks, {:.1} MiB plaintext, {:.1} MiB stored, {} reads",
                chunks.len(),
                chunks.iter().map(|c| c.len as f64).sum::<f64>() / (1 << 20) as f64,
                chunks.iter().map(|c| c.stored as f64).sum::<f64>() / (1 << 20) as f64,
                out.len()
            ),
            chunks,
            reads: out,
        }
    }

    /// Stored bytes of the chunks the reads touch: what one host alone
    /// fetches from the store.
    pub fn working_set(&self) -> u64 {
        let mut seen = vec![false; self.chunks.len()];
        self.reads.iter().for_each(|&c| seen[c as usize] = true);
        self.chunks
            .iter()
            .zip(seen)
            .filter(|(_, s)| *s)
            .map(|(c, _)| c.stored as u64)
            .sum()
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub hosts: usize,
    pub working_set: u64,
    /// Stored bytes the store sent.
    pub store_bytes: u64,
    /// Store fetches per chunk.
    pub store_fetches: Vec<u32>,
    /// Bytes hosts got from peers (the stored form).
    pub peer_bytes: u64,
    /// Per live host: attach to its last read.
    pub times: Vec<Duration>,
    /// Per host: bytes uploaded to peers.
    pub uploads: Vec<u64>,
    /// Every demand read's wait (zero for a chunk already local).
    pub p99_read: Duration,
    pub redirects: u64,
    /// 503 answers (busy home, full slot queue, still fetching).
    pub busy: u64,
    /// Requests a holder or home could not serve (404, refused, reset).
    pub failed: u64,
    /// Profile prefetches homes started, and the chunks they wanted.
    pub prefetches: u64,
    pub prefetched: u64,
    /// The host killed, and the chunks it was home for.
    pub killed: Option<(usize, Vec<u32>)>,
    /// Every live host holds every chunk its reads touched.
    pub complete: bool,
    pub events: u64,
    pub wall: Duration,
}

impl Report {
    pub fn egress(&self) -> f64 {
        self.store_bytes as f64 / self.working_set as f64
    }

    pub fn median_time(&self) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        t[t.len() / 2]
    }

    pub fn max_time(&self) -> Duration {
        self.times.iter().copied().max().unwrap_or_default()
    }

    /// Upload max/mean over hosts (None without uploads).
    pub fn upload_balance(&self) -> Option<f64> {
        let sum: u64 = self.uploads.iter().sum();
        let max = self.uploads.iter().copied().max()?;
        (sum > 0).then(|| max as f64 * self.uploads.len() as f64 / sum as f64)
    }
}

/// A member's address in the simulation: 10.x.y.z:7070.
fn addr(h: u32) -> SocketAddr {
    SocketAddr::from(([10, (h >> 16) as u8, (h >> 8) as u8, h as u8], 7070))
}

fn host_of(a: SocketAddr) -> u32 {
    match a {
        SocketAddr::V4(v4) => {
            let o = v4.ip().octets();
            (u32::from(o[1]) << 16) | (u32::from(o[2]) << 8) | u32::from(o[3])
        }
        SocketAddr::V6(_) => unreachable!("the simulation's members are IPv4"),
    }
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    /// A host's next demand reads.
    Read(u32),
    /// A requester sends the request its flight decided on.
    Send(u32),
    /// A request reaches its server.
    Arrive(u32),
    /// An answer without a chunk reaches the requester.
    Answer(u32),
    /// The requester's wait is over: the server answers busy if still working.
    Deadline(u32, u32),
    /// The server's uplink has sent the chunk: slot and buffer are free.
    Sent(u32),
    /// The chunk reached the requester.
    ChunkIn(u32),
    /// A store fetch reached its host.
    StoreIn(u32),
    /// A holder's word reaches a home (home, chunk, holder): it verified
    /// the chunk (`policy::announce_to`).
    Have(u32, u32, u32),
    Kill(u32),
}

/// Who waits on a flight.
#[derive(Clone, Copy)]
enum Waiter {
    Demand,
    Stream,
    /// The home's profile prefetch.
    Prefetch,
    Server(u32, u32),
}

struct Flight {
    host: u32,
    chunk: u32,
    class: Class,
    taken_as: Option<Class>,
    started: bool,
    peers_tried: bool,
    demand: bool,
    streams: usize,
    prefetches: usize,
    servers: Vec<(u32, u32)>,
    /// Taken into the peer window (profile, background), not the store's.
    on_peers: bool,
    /// Whom to ask, and whether only as a holder (ranked after this host).
    candidates: Vec<(SocketAddr, bool)>,
    /// Asking a candidate only as a holder: one request, no `Requester`.
    holder_ask: bool,
    next_candidate: usize,
    requester: Option<Requester>,
    /// The class peers are asked at (the flight's when asking began).
    ask_class: Class,
    /// Busy homes are asked again until then.
    deadline: Ns,
    pending: (SocketAddr, Hop),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReqState {
    Fetching,
    WaitingSlot,
    Uploading,
    Over,
}

struct Req {
    flight: u32,
    from: u32,
    to: u32,
    chunk: u32,
    class: Class,
    hop: Hop,
    state: ReqState,
    /// Reused slots carry a new generation: stale deadlines are ignored.
    gen: u32,
    deadline: Ns,
    reply: Reply,
    /// The server did not take it (refused, or reset by a kill).
    refused: bool,
    /// Reset by a kill, not refused: the requester does not mark it down.
    reset: bool,
    /// The server's queue depth in its answer.
    queue: u64,
    /// Its place in the server's load, until answered or uploaded.
    load: Option<LoadGuard>,
    buffer: u64,
}

struct Host {
    alive: bool,
    up_free: Ns,
    dn_free: Ns,
    held: Vec<bool>,
    flights: HashMap<u32, u32>,
    queues: [VecDeque<u32>; 3],
    running_low: usize,
    running_peer: usize,
    store_fetches: usize,
    // The peer server.
    active: Load,
    slots_free: usize,
    slot_queue: [VecDeque<(u32, u32)>; 3],
    slot_waiting: usize,
    buffer_free: u64,
    directory: Directory<Duration>,
    // The peer client's view of others.
    peer_queue: HashMap<u32, u64>,
    down_until: HashMap<u32, Ns>,
    // The boot.
    next_read: usize,
    read_at: Ns,
    progress: u32,
    order: Vec<u32>,
    stream_next: usize,
    stream_running: usize,
    done_at: Option<Ns>,
    uploaded: u64,
    // The home's profile prefetch.
    prefetched: policy::Prefetched<Duration>,
    prefetch: Vec<u32>,
    prefetch_next: usize,
    prefetch_running: usize,
}

impl Host {
    /// A profile or background flight ends or goes back to the queue: its
    /// window has room again (`State::release_low`).
    fn release_low(&mut self, on_peers: bool) {
        if on_peers {
            self.running_peer -= 1;
        } else {
            self.running_low -= 1;
        }
    }
}

/// The one image every simulated host boots.
const SIM_IMAGE: crate::store::ImageId = Digest([7; 32]);

struct Sim<'a> {
    cfg: Config,
    w: &'a Workload,
    ranked: Vec<Vec<SocketAddr>>,
    /// Chunk index by digest.
    by_digest: HashMap<Digest, u32>,
    hosts: Vec<Host>,
    flights: Vec<Option<Flight>>,
    free_flights: Vec<u32>,
    reqs: Vec<Req>,
    free_reqs: Vec<u32>,
    heap: BinaryHeap<Reverse<(Ns, u64, EvKey)>>,
    events: Vec<Ev>,
    free_events: Vec<u32>,
    seq: u64,
    now: Ns,
    store_free: Ns,
    killed_at: Vec<Option<Ns>>,
    latencies: Vec<u32>,
    zero_reads: u64,
    r: Report,
    // Settings from the daemon's defaults.
    concurrency: usize,
    low: usize,
    window: usize,
    server_wait: Ns,
    client_deadline: Ns,
    refused_for: Ns,
}

/// An index into `Sim::events` (the heap holds only ordering keys).
type EvKey = u32;

/// Runs one storm: every host attaches at time 0 with an empty cache.
pub fn run(cfg: &Config, w: &Workload) -> Report {
    let wall = Instant::now();
    let members: Vec<SocketAddr> = (0..cfg.hosts as u32).map(addr).collect();
    // The placement: the daemon's HRW over the same member list every host
    // has, computed once per chunk (each host would get the same).
    let ranked: Vec<Vec<SocketAddr>> = w
        .chunks
        .iter()
        .map(|c| hrw::ranked(&c.digest, &members, CANDIDATES))
        .collect();
    let fc = FetchConfig::default();
    let limits = ServerLimits::default();
    let timeouts = PeerTimeouts::default();
    let n = w.chunks.len();
    let chunk_len = w.chunks.iter().map(|c| c.len as u64).max().unwrap_or(1);
    let hosts = (0..cfg.hosts as u64)
        .map(|h| Host {
            alive: true,
            up_free: 0,
            dn_free: 0,
            held: vec![false; n],
            flights: HashMap::new(),
            queues: Default::default(),
            running_low: 0,
            running_peer: 0,
            store_fetches: 0,
            active: Load::default(),
            slots_free: cfg.upload_slots.max(1),
            slot_queue: Default::default(),
            slot_waiting: 0,
            buffer_free: limits.upload_buffer.max(crate::store::manifest::MAX_CHUNK as u64) / 1024,
            directory: Directory::default(),
            peer_queue: HashMap::new(),
            down_until: HashMap::new(),
            next_read: 0,
            read_at: 0,
            progress: 0,
            // The daemon shuffles only with peers.
            order: if cfg.hosts > 1 {
                fleet_order(
                    n,
                    cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (h + 1).wrapping_mul(0xd1b5_4a32_d192_ed03),
                    cfg.hosts,
                )
            } else {
                (0..n as u32).collect()
            },
            stream_next: 0,
            stream_running: 0,
            done_at: None,
            uploaded: 0,
            prefetched: policy::Prefetched::default(),
            prefetch: Vec::new(),
            prefetch_next: 0,
            prefetch_running: 0,
        })
        .collect();
    let mut sim = Sim {
        cfg: cfg.clone(),
        w,
        ranked,
        by_digest: w.chunks.iter().enumerate().map(|(i, c)| (c.digest, i as u32)).collect(),
        hosts,
        flights: Vec::new(),
        free_flights: Vec::new(),
        reqs: Vec::new(),
        free_reqs: Vec::new(),
        heap: BinaryHeap::new(),
        events: Vec::new(),
        free_events: Vec::new(),
        seq: 0,
        now: 0,
        store_free: 0,
        killed_at: vec![None; cfg.hosts],
        latencies: Vec::new(),
        zero_reads: 0,
        r: Report {
            hosts: cfg.hosts,
            working_set: w.working_set(),
            store_fetches: vec![0; n],
            ..Report::default()
        },
        concurrency: fc.concurrency.max(1),
        low: fc.low_concurrency.max(1),
        window: (PROFILE_WINDOW_BYTES / chunk_len).max(1) as usize,
        server_wait: ns(timeouts.server_wait()),
        // The client's time for a home: the fetch's deadline (its `timeout`),
        // less room for one last request.
        client_deadline: ns(fc.deadline.saturating_sub(timeouts.first_byte + timeouts.idle)),
        refused_for: ns(REFUSED_DOWN_FOR),
    };
    if let Some(at) = cfg.kill_at {
        let from = n * 3 / 10;
        let mut homed: HashMap<u32, Vec<u32>> = HashMap::new();
        for c in from..n {
            homed.entry(host_of(sim.ranked[c][0])).or_default().push(c as u32);
        }
        let victim = homed
            .iter()
            .max_by_key(|(h, cs)| (cs.len(), Reverse(**h)))
            .map(|(h, _)| *h)
            .unwrap_or(0);
        let all: Vec<u32> = (0..n as u32)
            .filter(|&c| host_of(sim.ranked[c as usize][0]) == victim)
            .collect();
        sim.r.killed = Some((victim as usize, all));
        sim.at(ns(at), Ev::Kill(victim));
    }
    for h in 0..cfg.hosts as u32 {
        sim.at(0, Ev::Read(h));
    }
    while let Some(Reverse((t, _, key))) = sim.heap.pop() {
        sim.now = t;
        let ev = sim.events[key as usize];
        sim.free_events.push(key);
        sim.r.events += 1;
        sim.handle(ev);
    }
    sim.finish_report(wall)
}

impl Sim<'_> {
    fn at(&mut self, t: Ns, ev: Ev) {
        let key = match self.free_events.pop() {
            Some(k) => {
                self.events[k as usize] = ev;
                k
            }
            None => {
                self.events.push(ev);
                (self.events.len() - 1) as u32
            }
        };
        self.seq += 1;
        self.heap.push(Reverse((t.max(self.now), self.seq, key)));
    }

    fn half_rtt(&self) -> Ns {
        ns(self.cfg.rtt) / 2
    }

    fn tx(bytes: u64, rate: u64) -> Ns {
        (bytes as u128 * 8 * 1_000_000_000 / rate as u128) as Ns
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Read(h) => self.read(h),
            Ev::Send(f) => self.send(f),
            Ev::Arrive(r) => self.arrive(r),
            Ev::Answer(r) => self.answer(r),
            Ev::Deadline(r, gen) => self.deadline(r, gen),
            Ev::Sent(r) => self.sent(r),
            Ev::ChunkIn(r) => self.chunk_in(r),
            Ev::StoreIn(f) => self.store_in(f),
            Ev::Have(home, c, holder) => self.have(home, c, holder),
            Ev::Kill(h) => self.kill(h),
        }
    }

    // The boot: demand reads and the profile stream.

    fn read(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        if !host.alive {
            return;
        }
        while host.next_read < self.w.reads.len() {
            let c = self.w.reads[host.next_read];
            host.progress = host.progress.max(c + 1);
            if !host.held[c as usize] {
                host.read_at = self.now;
                self.stream(h);
                self.want(h, c, Class::Demand, Waiter::Demand);
                return;
            }
            self.zero_reads += 1;
            host.next_read += 1;
        }
        host.done_at = Some(self.now);
        self.stream(h);
    }

    fn stream(&mut self, h: u32) {
        if !self.cfg.profile {
            return;
        }
        loop {
            let host = &mut self.hosts[h as usize];
            let n = host.order.len();
            if !host.alive
                || host.stream_running >= self.low
                || host.stream_next >= n
                || host.stream_next >= host.progress as usize + self.window
            {
                return;
            }
            let c = host.order[host.stream_next];
            host.stream_next += 1;
            if !host.held[c as usize] {
                host.stream_running += 1;
                self.want(h, c, Class::Profile, Waiter::Stream);
            }
        }
    }

    // The fetch scheduler.

    /// Joins the chunk's flight at `class`, or starts one.
    fn want(&mut self, h: u32, c: u32, class: Class, waiter: Waiter) {
        let existing = self.hosts[h as usize].flights.get(&c).copied();
        let f = match existing {
            Some(f) => {
                let fl = self.flights[f as usize].as_mut().expect("a live flight");
                if class > fl.class {
                    fl.class = class;
                    if !fl.started {
                        self.hosts[h as usize].queues[class as usize].push_back(f);
                    }
                }
                f
            }
            None => {
                let fl = Flight {
                    host: h,
                    chunk: c,
                    class,
                    taken_as: None,
                    started: false,
                    peers_tried: false,
                    demand: false,
                    streams: 0,
                    prefetches: 0,
                    servers: Vec::new(),
                    on_peers: false,
                    candidates: Vec::new(),
                    holder_ask: false,
                    next_candidate: 0,
                    requester: None,
                    ask_class: class,
                    deadline: 0,
                    pending: (addr(h), Hop::Home),
                };
                let f = match self.free_flights.pop() {
                    Some(f) => {
                        self.flights[f as usize] = Some(fl);
                        f
                    }
                    None => {
                        self.flights.push(Some(fl));
                        (self.flights.len() - 1) as u32
                    }
                };
                let host = &mut self.hosts[h as usize];
                host.flights.insert(c, f);
                host.queues[class as usize].push_back(f);
                f
            }
        };
        let fl = self.flights[f as usize].as_mut().expect("a live flight");
        match waiter {
            Waiter::Demand => fl.demand = true,
            Waiter::Stream => fl.streams += 1,
            Waiter::Prefetch => fl.prefetches += 1,
            Waiter::Server(r, gen) => fl.servers.push((r, gen)),
        }
        self.pump(h);
    }

    /// Starts what the scheduler would (`Fetcher::take`): the oldest
    /// flight of the highest class, while a worker is free; below demand,
    /// one whose window has room (the store's 4, or the 16 of flights
    /// waiting on peers), looking up to `SCAN` flights down the queue.
    fn pump(&mut self, h: u32) {
        'take: loop {
            let host = &self.hosts[h as usize];
            if !host.alive || host.store_fetches >= self.concurrency {
                return;
            }
            for class in [Class::Demand, Class::Profile, Class::Background] {
                let low = class < Class::Demand;
                let host = &self.hosts[h as usize];
                let store_full = low && host.running_low >= self.low;
                let peers_full = low && host.running_peer >= PEER_WINDOW;
                if store_full && (peers_full || self.cfg.hosts < 2) {
                    break;
                }
                let mut i = 0;
                while i < self.hosts[h as usize].queues[class as usize].len() && i < SCAN {
                    let f = self.hosts[h as usize].queues[class as usize][i];
                    let live = self.flights[f as usize]
                        .as_ref()
                        .is_some_and(|fl| fl.host == h && !fl.started && fl.class == class);
                    if !live {
                        self.hosts[h as usize].queues[class as usize].remove(i);
                        continue;
                    }
                    let cands = self.peer_candidates(f);
                    let to_peers = !cands.is_empty();
                    if low && ((to_peers && peers_full) || (!to_peers && store_full)) {
                        i += 1;
                        continue;
                    }
                    let host = &mut self.hosts[h as usize];
                    host.queues[class as usize].remove(i);
                    if low {
                        if to_peers {
                            host.running_peer += 1;
                        } else {
                            host.running_low += 1;
                        }
                    }
                    let fl = self.flights[f as usize].as_mut().expect("a live flight");
                    fl.started = true;
                    fl.taken_as = Some(class);
                    fl.on_peers = low && to_peers;
                    self.start(f, cands);
                    continue 'take;
                }
            }
            return;
        }
    }

    /// Whom a flight asks before the store (`policy::candidates`, then, if
    /// this host ranks among the chunk's candidates, the members after it,
    /// as holders, `policy::holders_after`: the client's `candidates`);
    /// empty once asked.
    fn peer_candidates(&self, f: u32) -> Vec<(SocketAddr, bool)> {
        let fl = self.flights[f as usize].as_ref().expect("a live flight");
        if fl.peers_tried || self.cfg.hosts < 2 {
            return Vec::new();
        }
        let (h, c) = (fl.host, fl.chunk as usize);
        let me = addr(h);
        let ranked = &self.ranked[c];
        let mut out: Vec<(SocketAddr, bool)> = policy::candidates(ranked, Some(me), |m| self.skip(h, m))
            .into_iter()
            .map(|m| (m, false))
            .collect();
        out.extend(
            policy::holders_after(ranked, me, |m| self.skip(h, m))
                .into_iter()
                .map(|m| (m, true)),
        );
        out
    }

    fn skip(&self, h: u32, m: SocketAddr) -> bool {
        self.hosts[h as usize]
            .down_until
            .get(&host_of(m))
            .is_some_and(|&t| t > self.now)
    }

    fn start(&mut self, f: u32, cands: Vec<(SocketAddr, bool)>) {
        let fl = self.flights[f as usize].as_mut().expect("a live flight");
        if !fl.peers_tried {
            fl.peers_tried = true;
            if !cands.is_empty() {
                fl.candidates = cands;
                fl.next_candidate = 0;
                fl.ask_class = fl.class;
                self.next_candidate(f);
                return;
            }
        }
        self.fetch_from_store(f);
    }

    /// Asks the flight's next candidate, or goes back to the queue for
    /// the store when none is left.
    fn next_candidate(&mut self, f: u32) {
        let fl = self.flights[f as usize].as_mut().expect("a live flight");
        let Some(&(home, holder_only)) = fl.candidates.get(fl.next_candidate) else {
            // Requeued at the head of its class, for a worker to fetch from the store.
            let (h, class, taken, on_peers) = (fl.host, fl.class, fl.taken_as.take(), fl.on_peers);
            fl.started = false;
            fl.on_peers = false;
            let host = &mut self.hosts[h as usize];
            if taken.is_some_and(|t| t < Class::Demand) {
                host.release_low(on_peers);
            }
            host.queues[class as usize].push_front(f);
            self.pump(h);
            return;
        };
        fl.next_candidate += 1;
        fl.deadline = self.now + self.client_deadline;
        fl.holder_ask = holder_only;
        if holder_only {
            // The client's `get` for a member ranked after this host.
            self.step(
                f,
                Step::Ask {
                    peer: home,
                    hop: Hop::Redirected,
                    after: Duration::ZERO,
                },
            );
            return;
        }
        let (requester, step) = Requester::new(home, Some(addr(fl.host)));
        fl.requester = Some(requester);
        self.step(f, step);
    }

    fn step(&mut self, f: u32, step: Step) {
        match step {
            Step::Ask { peer, hop, after } => {
                self.flights[f as usize].as_mut().expect("a live flight").pending = (peer, hop);
                self.at(self.now + ns(after), Ev::Send(f));
            }
            Step::GiveUp => self.next_candidate(f),
            Step::Store => {
                // No other candidate: the store (`fetch`'s `StillBusy`).
                let fl = self.flights[f as usize].as_mut().expect("a live flight");
                fl.next_candidate = fl.candidates.len();
                self.next_candidate(f);
            }
            Step::Got(_) => self.done(f),
        }
    }

    fn fetch_from_store(&mut self, f: u32) {
        let (h, c) = {
            let fl = self.flights[f as usize].as_ref().expect("a live flight");
            (fl.host, fl.chunk)
        };
        let stored = self.w.chunks[c as usize].stored as u64;
        self.hosts[h as usize].store_fetches += 1;
        self.r.store_bytes += stored;
        self.r.store_fetches[c as usize] += 1;
        let asked = self.now + self.half_rtt() + ns(self.cfg.store_delay);
        let start = asked.max(self.store_free);
        self.store_free = start + Self::tx(stored, self.cfg.store_rate);
        let end = self.through_downlink(h, start, self.store_free, stored);
        self.at(end, Ev::StoreIn(f));
    }

    /// When bytes that leave their sender's uplink from `start` to
    /// `up_end` have all reached `h` through its FIFO downlink.
    fn through_downlink(&mut self, h: u32, start: Ns, up_end: Ns, bytes: u64) -> Ns {
        let half = self.half_rtt();
        let host = &mut self.hosts[h as usize];
        let begin = (start + half).max(host.dn_free);
        let end = (begin + Self::tx(bytes, self.cfg.host_rate)).max(up_end + half);
        host.dn_free = end;
        end
    }

    fn store_in(&mut self, f: u32) {
        let h = self.flights[f as usize].as_ref().expect("a live flight").host;
        self.hosts[h as usize].store_fetches -= 1;
        self.done(f);
    }

    /// A flight brought its chunk: the cache holds it, its waiters go on.
    fn done(&mut self, f: u32) {
        let fl = self.flights[f as usize].take().expect("a live flight");
        self.free_flights.push(f);
        let h = fl.host;
        let host = &mut self.hosts[h as usize];
        host.flights.remove(&fl.chunk);
        if fl.taken_as.is_some_and(|t| t < Class::Demand) {
            host.release_low(fl.on_peers);
        }
        if !host.alive {
            return;
        }
        host.held[fl.chunk as usize] = true;
        host.stream_running -= fl.streams;
        host.prefetch_running -= fl.prefetches;
        if fl.demand {
            let waited = self.now - host.read_at;
            self.latencies.push((waited / 1000).min(u32::MAX as u64) as u32);
            host.next_read += 1;
            self.read(h);
        }
        for (r, gen) in fl.servers {
            let req = &self.reqs[r as usize];
            if req.gen == gen && req.state == ReqState::Fetching {
                if self.cfg.park_cold && req.buffer == 0 {
                    self.unpark(r);
                } else {
                    self.take_slot(r);
                }
            }
        }
        self.stream(h);
        self.prefetch(h);
        self.pump(h);
    }

    // Requests between hosts.

    fn send(&mut self, f: u32) {
        let Some(fl) = self.flights[f as usize].as_ref() else {
            return;
        };
        if !self.hosts[fl.host as usize].alive {
            return;
        }
        let (peer, hop) = fl.pending;
        let req = Req {
            flight: f,
            from: fl.host,
            to: host_of(peer),
            chunk: fl.chunk,
            class: fl.ask_class,
            hop,
            state: ReqState::Fetching,
            gen: 0,
            deadline: 0,
            reply: Reply::Failed,
            refused: false,
            reset: false,
            queue: 0,
            load: None,
            buffer: 0,
        };
        let r = match self.free_reqs.pop() {
            Some(r) => {
                let gen = self.reqs[r as usize].gen + 1;
                self.reqs[r as usize] = Req { gen, ..req };
                r
            }
            None => {
                self.reqs.push(req);
                (self.reqs.len() - 1) as u32
            }
        };
        self.at(self.now + self.half_rtt(), Ev::Arrive(r));
    }

    /// Answers `r` without a chunk; the answer reaches the requester half
    /// an RTT later.
    fn reply(&mut self, r: u32, reply: Reply) {
        let to = self.reqs[r as usize].to as usize;
        let req = &mut self.reqs[r as usize];
        if req.state != ReqState::Over && !req.refused {
            // The server's load: the request is in it until answered.
            req.queue = self.hosts[to].active.get();
            req.load = None;
            self.hosts[to].buffer_free += req.buffer;
            req.buffer = 0;
        }
        match &reply {
            Reply::Busy => self.r.busy += 1,
            Reply::Redirect(_) => self.r.redirects += 1,
            Reply::Failed => self.r.failed += 1,
            Reply::Chunk => {}
        }
        req.reply = reply;
        req.state = ReqState::Over;
        self.at(self.now + self.half_rtt(), Ev::Answer(r));
    }

    fn arrive(&mut self, r: u32) {
        let Req {
            from,
            to,
            chunk,
            hop,
            class,
            ..
        } = self.reqs[r as usize];
        if !self.hosts[to as usize].alive {
            // A killed daemon: the connection is refused.
            self.reqs[r as usize].refused = true;
            self.reply(r, Reply::Failed);
            return;
        }
        self.start_prefetch(to, class, hop);
        let digest = self.w.chunks[chunk as usize].digest;
        let slots = self.cfg.upload_slots.max(1);
        let now = Duration::from_nanos(self.now);
        let server = &mut self.hosts[to as usize];
        let (before, load) = server.active.arrive();
        self.reqs[r as usize].load = Some(load);
        if let Some(holders) = policy::redirect(
            &mut server.directory,
            &digest,
            hop,
            Some(addr(from)),
            before,
            slots,
            now,
        ) {
            self.reply(r, Reply::Redirect(holders));
            return;
        }
        let need = (self.w.chunks[chunk as usize].len as u64).div_ceil(1024);
        let held = server.held[chunk as usize];
        let park = self.cfg.park_cold && policy::source(held, hop, true) == Source::Fetch;
        if !park {
            if server.buffer_free < need {
                self.reply(r, Reply::Busy);
                return;
            }
            server.buffer_free -= need;
            self.reqs[r as usize].buffer = need;
        }
        let req = &mut self.reqs[r as usize];
        // The requester's wait: a fetch and a slot must come within it.
        req.deadline = self.now + self.server_wait;
        let (gen, class, deadline) = (req.gen, req.class, req.deadline);
        self.at(deadline, Ev::Deadline(r, gen));
        match policy::source(held, hop, true) {
            Source::Held => self.take_slot(r),
            Source::NotHere => self.reply(r, Reply::Failed),
            Source::Fetch => self.want(to, chunk, class, Waiter::Server(r, gen)),
        }
    }

    /// The server's `prefetch_profile`: every host has the image open with
    /// its profile (the workload's chunks, in profile order), so the first
    /// profile request a home takes starts its prefetch.
    fn start_prefetch(&mut self, h: u32, class: Class, hop: Hop) {
        if !self.cfg.profile || !self.cfg.home_prefetch {
            return;
        }
        let Some(id) = policy::starts_prefetch(class, hop, Some(SIM_IMAGE)) else {
            return;
        };
        let now = Duration::from_nanos(self.now);
        if !self.hosts[h as usize].prefetched.first(id, now) {
            return;
        }
        let me = addr(h);
        let (ranked, by_digest) = (&self.ranked, &self.by_digest);
        let profile: Vec<u32> = (0..self.w.chunks.len() as u32).collect();
        // `ranked` is `hrw::ranked` over the members: its first is the
        // home `hrw::is_zone_home` names without zones (unit-tested).
        let chunks = policy::home_profile_chunks(
            &profile,
            |c| Some(self.w.chunks[c as usize].digest),
            |d| by_digest.get(d).is_some_and(|&c| ranked[c as usize][0] == me),
        );
        self.r.prefetches += 1;
        let host = &mut self.hosts[h as usize];
        host.prefetch = chunks;
        host.prefetch_next = 0;
        self.prefetch(h);
    }

    /// Wants the prefetch's chunks, `PREFETCH_WINDOW` at a time.
    fn prefetch(&mut self, h: u32) {
        loop {
            let host = &mut self.hosts[h as usize];
            if !host.alive
                || host.prefetch_running >= policy::PREFETCH_WINDOW
                || host.prefetch_next >= host.prefetch.len()
            {
                return;
            }
            let c = host.prefetch[host.prefetch_next];
            host.prefetch_next += 1;
            if !host.held[c as usize] {
                host.prefetch_running += 1;
                self.r.prefetched += 1;
                self.want(h, c, Class::Profile, Waiter::Prefetch);
            }
        }
    }

    /// The what-if `park_cold`: the chunk a parked request waited for is
    /// here: redirected as on arrival (the home may know holders now),
    /// else it reserves upload buffer and waits for a slot.
    fn unpark(&mut self, r: u32) {
        let Req {
            from, to, chunk, hop, ..
        } = self.reqs[r as usize];
        let digest = self.w.chunks[chunk as usize].digest;
        let slots = self.cfg.upload_slots.max(1);
        let now = Duration::from_nanos(self.now);
        let server = &mut self.hosts[to as usize];
        let before = server.active.get().saturating_sub(1);
        if let Some(holders) = policy::redirect(
            &mut server.directory,
            &digest,
            hop,
            Some(addr(from)),
            before,
            slots,
            now,
        ) {
            self.reply(r, Reply::Redirect(holders));
            return;
        }
        let need = (self.w.chunks[chunk as usize].len as u64).div_ceil(1024);
        if server.buffer_free < need {
            self.reply(r, Reply::Busy);
            return;
        }
        server.buffer_free -= need;
        self.reqs[r as usize].buffer = need;
        self.take_slot(r);
    }

    fn take_slot(&mut self, r: u32) {
        let Req { to, class, gen, .. } = self.reqs[r as usize];
        let server = &mut self.hosts[to as usize];
        if server.slots_free > 0 {
            server.slots_free -= 1;
            self.upload(r);
        } else if server.slot_waiting >= MAX_WAITING {
            self.reply(r, Reply::Busy);
        } else {
            // Its deadline event is set since its arrival.
            server.slot_waiting += 1;
            server.slot_queue[class as usize].push_back((r, gen));
            self.reqs[r as usize].state = ReqState::WaitingSlot;
        }
    }

    fn deadline(&mut self, r: u32, gen: u32) {
        let req = &self.reqs[r as usize];
        if req.gen != gen || self.now < req.deadline {
            return;
        }
        match req.state {
            ReqState::Fetching => self.reply(r, Reply::Busy),
            ReqState::WaitingSlot => {
                self.hosts[req.to as usize].slot_waiting -= 1;
                self.reply(r, Reply::Busy);
            }
            ReqState::Uploading | ReqState::Over => {}
        }
    }

    /// Sends the chunk (the home names the requester once it is sent).
    fn upload(&mut self, r: u32) {
        let Req { from, to, chunk, .. } = self.reqs[r as usize];
        // The stored form goes over the wire (see the module's comment).
        let len = self.w.chunks[chunk as usize].stored as u64;
        let server = &mut self.hosts[to as usize];
        let req = &mut self.reqs[r as usize];
        req.queue = server.active.get();
        req.state = ReqState::Uploading;
        server.uploaded += len;
        let start = self.now.max(server.up_free);
        server.up_free = start + Self::tx(len, self.cfg.host_rate);
        let up_end = server.up_free;
        let end = self.through_downlink(from, start, up_end, len);
        self.at(up_end, Ev::Sent(r));
        self.at(end, Ev::ChunkIn(r));
    }

    fn sent(&mut self, r: u32) {
        let Req { to, buffer, .. } = self.reqs[r as usize];
        self.reqs[r as usize].buffer = 0;
        // The last byte is out: the request leaves the server's load.
        self.reqs[r as usize].load = None;
        let server = &mut self.hosts[to as usize];
        if !server.alive {
            return;
        }
        // Sent: the home names the requester to later ones.
        let Req { from, chunk, .. } = self.reqs[r as usize];
        let digest = self.w.chunks[chunk as usize].digest;
        let now = Duration::from_nanos(self.now);
        policy::served(&mut server.directory, digest, Some(addr(from)), true, now);
        server.buffer_free += buffer;
        server.slots_free += 1;
        for class in [Class::Demand, Class::Profile, Class::Background] {
            while let Some((w, gen)) = self.hosts[to as usize].slot_queue[class as usize].pop_front() {
                let waiter = &self.reqs[w as usize];
                if waiter.gen != gen || waiter.state != ReqState::WaitingSlot {
                    continue;
                }
                let server = &mut self.hosts[to as usize];
                server.slot_waiting -= 1;
                server.slots_free -= 1;
                self.upload(w);
                return;
            }
        }
    }

    fn chunk_in(&mut self, r: u32) {
        // The sender sends the stored form (see the module's comment).
        let Req {
            flight,
            from,
            to,
            chunk,
            hop,
            ..
        } = self.reqs[r as usize];
        self.free_reqs.push(r);
        if !self.hosts[from as usize].alive {
            return;
        }
        // A sender killed before the last byte: the connection was reset.
        let reply = if self.killed_at[to as usize].is_some() {
            self.r.failed += 1;
            Reply::Failed
        } else {
            self.r.peer_bytes += self.w.chunks[chunk as usize].stored as u64;
            // Verified (bytes are never bad here): a holder's chunk is
            // announced to the home asked, as the client does.
            if let Some(fl) = self.flights[flight as usize].as_ref() {
                let asked = fl.candidates.get(fl.next_candidate.wrapping_sub(1)).map(|c| c.0);
                if let Some(home) = asked.and_then(|a| policy::announce_to(a, addr(to))) {
                    self.at(self.now + self.half_rtt(), Ev::Have(host_of(home), chunk, from));
                }
            }
            Reply::Chunk
        };
        self.decide(flight, to, hop, reply);
    }

    fn answer(&mut self, r: u32) {
        let Req {
            flight,
            from,
            to,
            hop,
            refused,
            reset,
            queue,
            ..
        } = self.reqs[r as usize];
        let reply = std::mem::replace(&mut self.reqs[r as usize].reply, Reply::Failed);
        self.free_reqs.push(r);
        let host = &mut self.hosts[from as usize];
        if !host.alive {
            return;
        }
        if refused && !reset {
            host.down_until.insert(to, self.now + self.refused_for);
        } else if !refused {
            host.peer_queue.insert(to, queue);
        }
        self.decide(flight, to, hop, reply);
    }

    /// The requester's next step, as `policy::Requester` decides it.
    fn decide(&mut self, f: u32, to: u32, hop: Hop, reply: Reply) {
        let Some(fl) = self.flights[f as usize].as_mut() else {
            return;
        };
        if fl.holder_ask {
            // Asked only whether it holds the chunk: else the next candidate.
            return match reply {
                Reply::Chunk => self.done(f),
                _ => self.next_candidate(f),
            };
        }
        let mut requester = fl.requester.take().expect("a flight asking peers");
        let (h, deadline) = (fl.host, fl.deadline);
        let left = Duration::from_nanos(deadline.saturating_sub(self.now));
        let host = &self.hosts[h as usize];
        let step = requester.on_reply(
            addr(to),
            hop,
            reply,
            left,
            |p| host.peer_queue.get(&host_of(p)).copied().unwrap_or(0),
            |p| host.down_until.get(&host_of(p)).is_some_and(|&t| t > self.now),
        );
        self.flights[f as usize].as_mut().expect("a live flight").requester = Some(requester);
        self.step(f, step);
    }

    /// A holder's word reaches a home: it names the holder from now on.
    fn have(&mut self, home: u32, c: u32, holder: u32) {
        let now = Duration::from_nanos(self.now);
        let digest = self.w.chunks[c as usize].digest;
        let server = &mut self.hosts[home as usize];
        if server.alive {
            policy::served(&mut server.directory, digest, Some(addr(holder)), true, now);
        }
    }

    fn kill(&mut self, k: u32) {
        self.hosts[k as usize].alive = false;
        self.killed_at[k as usize] = Some(self.now);
        // Requests it was working on: their connections are reset.
        for r in 0..self.reqs.len() as u32 {
            let req = &self.reqs[r as usize];
            if req.to == k && matches!(req.state, ReqState::Fetching | ReqState::WaitingSlot) {
                self.reqs[r as usize].refused = true;
                self.reqs[r as usize].reset = true;
                self.reqs[r as usize].load = None;
                self.reqs[r as usize].state = ReqState::Over;
                self.r.failed += 1;
                self.at(self.now + self.half_rtt(), Ev::Answer(r));
            }
        }
    }

    fn finish_report(mut self, wall: Instant) -> Report {
        let live: Vec<&Host> = self.hosts.iter().filter(|h| h.alive).collect();
        self.r.times = live
            .iter()
            .map(|h| Duration::from_nanos(h.done_at.unwrap_or(self.now)))
            .collect();
        self.r.complete = live
            .iter()
            .all(|h| h.done_at.is_some() && self.w.reads.iter().all(|&c| h.held[c as usize]));
        self.r.uploads = self.hosts.iter().map(|h| h.uploaded).collect();
        let total = self.latencies.len() + self.zero_reads as usize;
        let rank = (total * 99 / 100).min(total.saturating_sub(1));
        // The reads that waited are the slowest; zero waits come first.
        self.r.p99_read = match rank.checked_sub(self.zero_reads as usize) {
            Some(i) if !self.latencies.is_empty() => {
                let (_, v, _) = self.latencies.select_nth_unstable(i);
                Duration::from_micros(*v as u64)
            }
            _ => Duration::ZERO,
        };
        self.r.wall = wall.elapsed();
        self.r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Workload {
        Workload::synthetic(12, 256 << 10, 12 * 80_000, 40)
    }

    #[test]
    fn fifty_hosts_get_every_chunk_with_the_store_serving_each_once() {
        for profile in [false, true] {
            let cfg = Config {
                profile,
                ..Config::fleet(50)
            };
            let r = run(&cfg, &small());
            assert!(r.complete, "profile {profile}: a host is missing chunks");
            assert_eq!(r.times.len(), 50);
            assert_eq!(
                r.store_fetches,
                vec![1; 12],
                "profile {profile}: a chunk was fetched twice or never"
            );
            assert!((r.egress() - 1.0).abs() < 1e-9, "egress {}", r.egress());
            // 49 hosts got every chunk from peers, as stored.
            let stored: u64 = small().chunks.iter().map(|c| c.stored as u64).sum();
            assert_eq!(r.peer_bytes, 49 * stored);
        }
    }

    #[test]
    fn one_host_alone_fetches_everything_from_the_store_in_link_time() {
        let w = small();
        let r = run(&Config::fleet(1), &w);
        assert!(r.complete);
        assert_eq!(r.store_bytes, w.working_set());
        assert_eq!(r.peer_bytes, 0);
        // Sequential misses: each costs an RTT, the store's delay and its bytes at 100 Mbit/s.
        let floor = Duration::from_nanos(w.working_set() * 80) + Duration::from_micros(1200) * 12;
        let t = r.max_time();
        assert!(
            t + Duration::from_micros(1) >= floor && t < floor + Duration::from_millis(5),
            "{t:?} vs {floor:?}"
        );
    }

    #[test]
    fn a_killed_homes_chunks_are_fetched_from_the_store_at_most_once_more() {
        let cfg = Config {
            kill_at: Some(Duration::from_millis(40)),
            ..Config::fleet(50)
        };
        let w = Workload::synthetic(40, 256 << 10, 40 * 80_000, 120);
        let r = run(&cfg, &w);
        let (victim, homed) = r.killed.clone().expect("a host was killed");
        assert!(!homed.is_empty(), "the victim was home for nothing");
        assert!(r.complete, "a live host is missing chunks");
        assert_eq!(r.times.len(), 49, "host {victim} still counted");
        for (c, &n) in r.store_fetches.iter().enumerate() {
            let most = if homed.contains(&(c as u32)) { 2 } else { 1 };
            assert!(n >= 1 && n <= most, "chunk {c}: {n} store fetches");
        }
        assert!(r.failed > 0, "nobody noticed the kill");
    }

    #[test]
    fn redirected_requesters_find_holders_that_hold_the_chunk_not_ones_still_receiving_it() {
        // Every host reads the same chunks in the same order, no profile:
        // waves of requests meet busy homes, which redirect.
        let w = small();
        let r = run(&Config::fleet(300), &w);
        assert!(r.complete);
        assert!(r.redirects > 300, "only {} redirects", r.redirects);
        // What fails is the holder asks (a home asks the candidates after
        // it whether they hold a chunk, at most twice a chunk), never a
        // holder a home named before its upload to it was sent.
        assert!(
            r.failed <= 2 * w.chunks.len() as u64,
            "{} failed requests for {} chunks: holders named before they held the chunk",
            r.failed,
            w.chunks.len()
        );
    }

    #[test]
    fn a_busy_home_redirects_to_holders_so_uploads_spread() {
        // Slow store, many hosts: requests pile up at homes, which redirect.
        let cfg = Config {
            profile: true,
            ..Config::fleet(200)
        };
        let r = run(&cfg, &small());
        assert!(r.complete);
        assert!(r.redirects > 0, "no home redirected");
        let homes = r.uploads.iter().filter(|&&u| u > 0).count();
        assert!(homes > 12, "only {homes} hosts uploaded: no fan-out beyond the homes");
    }

    #[test]
    fn homes_prefetch_only_their_own_profile_chunks_once_each_and_only_with_a_profile() {
        let w = Workload::synthetic(40, 256 << 10, 40 * 80_000, 120);
        for (profile, prefetch) in [(true, true), (true, false), (false, true)] {
            let cfg = Config {
                profile,
                home_prefetch: prefetch,
                ..Config::fleet(8)
            };
            let r = run(&cfg, &w);
            assert!(r.complete, "profile {profile}, prefetch {prefetch}");
            assert_eq!(r.store_fetches, vec![1; 40], "profile {profile}, prefetch {prefetch}");
            if profile && prefetch {
                // One prefetch per home asked for a profile chunk; each chunk
                // has one home, so no chunk is wanted by two prefetches.
                assert!((1..=8).contains(&r.prefetches), "{} prefetches", r.prefetches);
                assert!(r.prefetched <= 40, "{} chunks prefetched", r.prefetched);
            } else {
                assert_eq!((r.prefetches, r.prefetched), (0, 0));
            }
        }
    }
}
