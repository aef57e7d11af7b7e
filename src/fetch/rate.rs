//! How fast the low classes may fetch: token buckets that a flight must pass
//! before it takes a slot, and the adaptive controller behind
//! `--fill-rate auto` that lets background fill (and, above a floor, profile
//! streaming) use the link only while guests are not waiting on it.
//!
//! The controller's rule, applied every [`TICK`] (LEDBAT and TCP-LP in
//! spirit: a scavenger that yields at the first sign of the foreground):
//!
//! 1. Guests waiting (a demand fetch queued, running or finished during the
//!    tick), or a demand fetch slower than its idle baseline: both rates
//!    halve (fill down to [`MIN_FILL`], profile down to its floor, a share of
//!    the link's measured capacity), and neither grows again until [`HOLD`]
//!    has passed without a waiting guest (a boot's misses come in bursts).
//! 2. Otherwise, if most low-class fetches of the tick took well over their
//!    baseline and fill no longer gets the bytes its rate allows, the link
//!    is full (throughput flat while latency rises) and more rate only
//!    builds a queue that the next guest miss would wait behind: both shrink
//!    gently (x 7/8). Late fetches while fill still gets what its rate
//!    allows are a slow server or a busy CPU (latency rising with fill's own
//!    concurrency while throughput still rises): no reason to yield, since
//!    no guest is waiting, so fill keeps growing.
//! 3. Otherwise both grow: fill doubles per tick while none of its fetches
//!    is late (slow start: from 4 MB/s to 1 GB/s in under a second, which
//!    matters at 1 Gbit/s, where a whole image fills in seconds), and grows
//!    by a quarter plus [`STEP`] once some are; fill never to more than
//!    twice the bytes per second the link delivered over the last few
//!    ticks, so a halving bites at once.
//!
//! The baseline of a fetch of `n` bytes is `rtt + n * per_byte`: the
//! smallest latency, and the smallest latency per byte of fetches of at
//! least [`PER_BYTE_MIN_BYTES`], seen over the last one to two
//! [`BASE_WINDOW`]s (chunks differ in stored size, so a plain minimum
//! latency would call every large chunk late; the per-byte figure includes a
//! share of the round trip, which errs on the generous side).

use std::time::Duration;

use tokio::time::Instant;

use super::Class;

/// How often the controller looks at what the fetches saw.
pub const TICK: Duration = Duration::from_millis(100);
/// The least background fill keeps while guests wait: about one 256 KiB chunk a second.
pub const MIN_FILL: f64 = 256.0 * 1024.0;
/// Where adaptive fill starts.
pub const START_FILL: f64 = 4e6;
/// The profile stream never yields below this share of the link's capacity.
pub const PROFILE_FLOOR_SHARE: f64 = 0.5;
/// ... nor below this, whatever was measured.
pub const MIN_PROFILE: f64 = 1e6;
/// A rate beyond any link: no limit in practice.
pub const MAX_RATE: f64 = 100e9;
/// Added on each increase, so growth does not stall near the minimum.
pub const STEP: f64 = 256.0 * 1024.0;
/// How long after the last waiting guest the rates stay down.
pub const HOLD: Duration = Duration::from_secs(1);
/// A fetch is late when it takes over this many times its baseline ...
pub const LATE_FACTOR: f64 = 2.0;
/// ... plus this much (timer and scheduling noise).
pub const LATE_SLACK: Duration = Duration::from_millis(5);
/// Minima older than one to two of these are forgotten (routes and servers change).
pub const BASE_WINDOW: Duration = Duration::from_secs(60);
/// Fetches smaller than this teach the baseline's round trip, not its per-byte cost.
pub const PER_BYTE_MIN_BYTES: u64 = 64 << 10;
/// Capacity estimate: the peak of throughput, halving every this many seconds.
const CAPACITY_HALF_LIFE_SECS: f64 = 300.0;
/// Throughput is averaged over about this long.
const THROUGHPUT_SECS: f64 = 1.0;
/// ... and, for fill's growth and whether fill gets its rate, over about this long.
const RECENT_SECS: f64 = 0.2;
/// Fill gets its rate (more rate still brings more bytes) while its
/// fetches bring at least this share of the bytes the rate allows.
pub const KEEPS_UP: f64 = 0.8;

/// One finished fetch, as the controller sees it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub class: Class,
    pub latency: Duration,
    /// Stored bytes fetched (0 for a failed fetch).
    pub bytes: u64,
}

/// What happened during one tick.
#[derive(Debug, Default)]
pub struct Tick {
    pub dt: Duration,
    /// A guest waited on a fetch at some point of the tick.
    pub demand_waiting: bool,
    pub samples: Vec<Sample>,
}

/// A minimum over a sliding window, kept as two half windows.
#[derive(Clone, Copy, Debug, Default)]
struct WindowedMin {
    current: Option<f64>,
    previous: Option<f64>,
    since: Option<Instant>,
}

impl WindowedMin {
    const fn new() -> Self {
        WindowedMin {
            current: None,
            previous: None,
            since: None,
        }
    }

    fn observe(&mut self, v: f64, now: Instant) {
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= BASE_WINDOW {
            self.previous = self.current;
            self.current = None;
            self.since = Some(now);
        }
        self.current = Some(self.current.map_or(v, |c| c.min(v)));
    }

    fn get(&self) -> Option<f64> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What an unloaded fetch of `n` bytes takes: `rtt + n * per_byte`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Baseline {
    rtt: WindowedMin,
    per_byte: WindowedMin,
}

impl Baseline {
    pub const fn new() -> Self {
        Baseline {
            rtt: WindowedMin::new(),
            per_byte: WindowedMin::new(),
        }
    }

    pub fn observe(&mut self, s: &Sample, now: Instant) {
        if s.bytes == 0 {
            return;
        }
        let secs = s.latency.as_secs_f64();
        self.rtt.observe(secs, now);
        if s.bytes >= PER_BYTE_MIN_BYTES {
            self.per_byte.observe(secs / s.bytes as f64, now);
        }
    }

    /// The baseline for `bytes`, once anything was seen.
    pub fn expected(&self, bytes: u64) -> Option<Duration> {
        let rtt = self.rtt.get()?;
        let per_byte = self.per_byte.get().unwrap_or(0.0);
        Some(Duration::from_secs_f64(rtt + per_byte * bytes as f64))
    }

    /// The sample took well over its baseline.
    pub fn is_late(&self, s: &Sample) -> bool {
        self.expected(s.bytes)
            .is_some_and(|e| s.latency > e.mul_f64(LATE_FACTOR) + LATE_SLACK)
    }
}

/// What the controller did on a tick, and why (for the logs and the tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Guests waited, or a guest's fetch was late: both rates halved.
    Yield,
    /// Guests waited less than [`HOLD`] ago: no growth yet.
    Hold,
    /// Most low-class fetches were late and fill did not get its rate: a full link.
    Shrink,
    /// Fill's fetches were on time: doubled (to at most twice what the link delivers).
    SlowStart,
    /// Some of fill's fetches were late (a slow server, a busy CPU), but
    /// fill still got the bytes its rate allowed: grew by a quarter.
    Grow,
}

/// The adaptive rates of background fill and profile streaming.
#[derive(Debug)]
pub struct RateController {
    fill: f64,
    profile: f64,
    baseline: Baseline,
    hold_until: Option<Instant>,
    /// Bytes per second fetched (all classes), averaged over about a second.
    throughput: f64,
    /// The same over about [`RECENT_SECS`]: fill's ceiling follows it.
    recent: f64,
    /// Background bytes per second fetched, and allowed by fill's rate,
    /// over about [`RECENT_SECS`].
    fill_got: f64,
    fill_allowed: f64,
    /// The peak of `throughput`, slowly forgotten: the link's capacity as far as seen.
    capacity: f64,
}

impl Default for RateController {
    fn default() -> Self {
        Self::new()
    }
}

impl RateController {
    /// Fill starts low and grows; the profile starts unlimited (it measures
    /// the link for its own floor) and yields once guests wait.
    pub fn new() -> Self {
        RateController {
            fill: START_FILL,
            profile: MAX_RATE,
            baseline: Baseline::new(),
            hold_until: None,
            throughput: 0.0,
            recent: 0.0,
            fill_got: 0.0,
            fill_allowed: 0.0,
            capacity: 0.0,
        }
    }

    /// Background fill's rate now, bytes per second.
    pub fn fill(&self) -> f64 {
        self.fill
    }

    /// Profile streaming's rate now, bytes per second.
    pub fn profile(&self) -> f64 {
        self.profile
    }

    /// The link's capacity as far as seen, bytes per second.
    #[cfg(test)]
    fn capacity(&self) -> f64 {
        self.capacity
    }

    fn profile_floor(&self) -> f64 {
        (self.capacity * PROFILE_FLOOR_SHARE).max(MIN_PROFILE)
    }

    /// Applies the rule of the module's documentation to one tick.
    pub fn update(&mut self, tick: &Tick, now: Instant) -> Decision {
        let secs = tick.dt.as_secs_f64().max(1e-3);
        let bytes: u64 = tick.samples.iter().map(|s| s.bytes).sum();
        let fill_bytes: u64 = tick
            .samples
            .iter()
            .filter(|s| s.class == Class::Background)
            .map(|s| s.bytes)
            .sum();
        let average = |v: &mut f64, x: f64, over: f64| *v += (secs / over).min(1.0) * (x - *v);
        average(&mut self.throughput, bytes as f64 / secs, THROUGHPUT_SECS);
        average(&mut self.recent, bytes as f64 / secs, RECENT_SECS);
        // `fill` is still the rate that was in force during the tick.
        average(&mut self.fill_got, fill_bytes as f64 / secs, RECENT_SECS);
        average(&mut self.fill_allowed, self.fill, RECENT_SECS);
        self.capacity = (self.capacity * 0.5f64.powf(secs / CAPACITY_HALF_LIFE_SECS)).max(self.throughput);

        // Judge the tick against the baseline from before it, then learn from it.
        let late = |s: &Sample| self.baseline.is_late(s);
        let demand_late = tick.samples.iter().any(|s| s.class == Class::Demand && late(s));
        let low: Vec<&Sample> = tick
            .samples
            .iter()
            .filter(|s| s.class < Class::Demand && s.bytes > 0)
            .collect();
        let n_late = low.iter().filter(|s| late(s)).count();
        let low_late = n_late * 2 > low.len();
        for s in &tick.samples {
            self.baseline.observe(s, now);
        }
        // More rate still brings more bytes: whatever makes fetches late, it
        // is not a full link.
        let keeps_up = self.fill_got >= KEEPS_UP * self.fill_allowed;

        if tick.demand_waiting || demand_late {
            self.fill = (self.fill * 0.5).max(MIN_FILL);
            self.profile = (self.profile * 0.5).max(self.profile_floor());
            self.hold_until = Some(now + HOLD);
            Decision::Yield
        } else if self.hold_until.is_some_and(|t| now < t) {
            // Guests were just waiting: more may come.
            Decision::Hold
        } else if low_late && !keeps_up {
            self.fill = (self.fill * 0.875).max(MIN_FILL);
            self.profile = (self.profile * 0.875).max(self.profile_floor());
            Decision::Shrink
        } else {
            let delivered = (bytes as f64 / secs).max(self.recent).max(self.throughput);
            let ceiling = (2.0 * delivered).max(START_FILL);
            let (grown, decision) = if n_late == 0 {
                (self.fill * 2.0, Decision::SlowStart)
            } else {
                (self.fill * 1.25 + STEP, Decision::Grow)
            };
            self.fill = self.fill.max(grown.min(ceiling)).min(MAX_RATE);
            self.profile = (self.profile * 1.25 + STEP).min(MAX_RATE);
            decision
        }
    }
}

/// A token bucket that may run into debt: a flight passes while the bucket
/// is not in debt and takes its bytes, so a chunk larger than the burst
/// still passes and the rate holds on average.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(now: Instant) -> Self {
        Bucket { tokens: 0.0, last: now }
    }

    /// Takes `bytes` at `rate` bytes per second, or says when to try again.
    pub fn try_take(&mut self, bytes: u64, rate: f64, now: Instant) -> Result<(), Instant> {
        let rate = rate.max(1.0);
        // Up to a quarter second of burst.
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate / 4.0);
        self.last = now;
        if self.tokens >= 0.0 {
            self.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((-self.tokens / rate).min(3600.0)))
        }
    }
}

/// The `fill-rate` option: `auto` (adaptive, the default) or a fixed cap in
/// MB/s (0: no background fill). Parsed from the command line and from the
/// config file (a number or the string "auto").
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum FillRate {
    #[default]
    Auto,
    /// MB/s; 0 turns background fill off.
    Cap(f64),
}

impl FillRate {
    /// The fetcher's cap in bytes per second (None: adaptive), or an error
    /// for a rate that is not a number of MB/s, 0 or more.
    pub fn bytes_per_sec(self) -> Result<Option<u64>, &'static str> {
        match self {
            FillRate::Auto => Ok(None),
            FillRate::Cap(v) if v.is_finite() && v >= 0.0 => Ok(Some((v * 1e6) as u64)),
            FillRate::Cap(_) => Err("must be auto or a number of MB/s, 0 or more"),
        }
    }

    /// Background fill runs at all.
    pub fn is_on(self) -> bool {
        self != FillRate::Cap(0.0)
    }
}

impl std::str::FromStr for FillRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(FillRate::Auto);
        }
        s.parse::<f64>()
            .map(FillRate::Cap)
            .map_err(|_| format!("{s:?} is neither auto nor a number of MB/s"))
    }
}

impl std::fmt::Display for FillRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillRate::Auto => write!(f, "auto"),
            FillRate::Cap(v) => write!(f, "{v}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for FillRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FillRate;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "\"auto\" or a number of MB/s")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<FillRate, E> {
                if s.eq_ignore_ascii_case("auto") {
                    Ok(FillRate::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<FillRate, E> {
                Ok(FillRate::Cap(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FillRate, E> {
                Ok(FillRate::Cap(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FillRate, E> {
                Ok(FillRate::Cap(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn sample(class: Class, ms: u64, bytes: u64) -> Sample {
        Sample {
            class,
            latency: Duration::from_millis(ms),
            bytes,
        }
    }

    /// Ticks of `TICK` from `*now`, each with `samples` and `waiting`.
    fn run(c: &mut RateController, now: &mut Instant, ticks: u32, waiting: bool, samples: &[Sample]) {
        for _ in 0..ticks {
            *now += TICK;
            let tick = Tick {
                dt: TICK,
                demand_waiting: waiting,
                samples: samples.to_vec(),
            };
            c.update(&tick, *now);
        }
    }

    /// Background chunks of 256 KiB that take their unloaded 12 ms: a link
    /// that has room (30 of them per tick is 78 MB/s).
    fn idle_fill() -> Vec<Sample> {
        vec![sample(Class::Background, 12, 256 << 10); 30]
    }

    #[test]
    fn fill_ramps_up_while_guests_are_idle() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        assert_eq!(c.fill(), START_FILL);
        run(&mut c, &mut now, 10, false, &idle_fill());
        assert!(c.fill() > 4.0 * START_FILL, "{}", c.fill());
        // And to whatever the link delivers, not beyond twice that.
        run(&mut c, &mut now, 100, false, &idle_fill());
        let delivered = 30.0 * (256 << 10) as f64 / TICK.as_secs_f64();
        assert!(
            c.fill() > delivered && c.fill() <= 2.0 * delivered + 1.0,
            "{}",
            c.fill()
        );
    }

    #[test]
    fn fill_halves_each_tick_guests_wait_and_holds_after() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        run(&mut c, &mut now, 30, false, &idle_fill());
        let before = c.fill();
        run(&mut c, &mut now, 1, true, &[]);
        assert_eq!(c.fill(), before / 2.0);
        run(&mut c, &mut now, 20, true, &[]);
        assert_eq!(c.fill(), MIN_FILL, "down to the minimum, never below");
        // No growth for HOLD after the last waiting guest, then growth again.
        run(&mut c, &mut now, 9, false, &idle_fill());
        assert_eq!(c.fill(), MIN_FILL);
        run(&mut c, &mut now, 3, false, &idle_fill());
        assert!(c.fill() > MIN_FILL);
    }

    #[test]
    fn a_demand_fetch_slower_than_its_baseline_halves_fill_without_a_waiting_guest() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        run(&mut c, &mut now, 30, false, &idle_fill());
        let before = c.fill();
        // A guest's 256 KiB miss took 60 ms where 12 ms is the baseline.
        run(&mut c, &mut now, 1, false, &[sample(Class::Demand, 60, 256 << 10)]);
        assert_eq!(c.fill(), before / 2.0);
    }

    #[test]
    fn fill_shrinks_gently_when_its_own_fetches_queue_on_a_full_link() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        run(&mut c, &mut now, 30, false, &idle_fill());
        let before = c.fill();
        run(
            &mut c,
            &mut now,
            1,
            false,
            &[sample(Class::Background, 80, 256 << 10); 30],
        );
        assert_eq!(c.fill(), before * 0.875);
    }

    /// Ticks of background fill, guests idle, over a pipeline (link, server
    /// and CPU) that delivers at most `max` bytes per second: each tick
    /// brings `min(fill, max)` in 64 KiB chunks, each of which took
    /// `latency_ms(delivered, fill)`. Returns the decisions and the bytes
    /// per second delivered, per tick.
    fn fill_over(
        c: &mut RateController,
        now: &mut Instant,
        ticks: u32,
        max: f64,
        latency_ms: impl Fn(f64, f64) -> u64,
    ) -> Vec<(Decision, f64)> {
        const CHUNK: u64 = 64 << 10;
        let mut seen = Vec::new();
        for _ in 0..ticks {
            *now += TICK;
            let delivered = c.fill().min(max);
            let n = (delivered * TICK.as_secs_f64() / CHUNK as f64).round() as usize;
            let ms = latency_ms(delivered, c.fill());
            let tick = Tick {
                dt: TICK,
                demand_waiting: false,
                samples: vec![sample(Class::Background, ms, CHUNK); n],
            };
            seen.push((c.update(&tick, *now), n as f64 * CHUNK as f64 / TICK.as_secs_f64()));
        }
        seen
    }

    /// The mean of the delivered rates of the last `n` ticks.
    fn last_mean(seen: &[(Decision, f64)], n: usize) -> f64 {
        seen[seen.len() - n..].iter().map(|s| s.1).sum::<f64>() / n as f64
    }

    #[test]
    fn fill_doubles_per_tick_while_its_fetches_are_on_time() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        // 1 Gbit/s, every fetch in its unloaded 2 ms.
        let seen = fill_over(&mut c, &mut now, 7, 125.0 * MB, |_, _| 2);
        assert!(seen.iter().all(|s| s.0 == Decision::SlowStart), "{seen:?}");
        // From 4 MB/s to the link in 0.6 s: at 1 Gbit/s, a 150 MB image fills in under 2 s.
        assert!(seen[6].1 >= 0.9 * 125.0 * MB, "{seen:?}");
    }

    /// A fill fetch's latency that rises with the bytes per second fill
    /// moves: 2 ms unloaded, late (over twice that, plus the slack) from a
    /// quarter of 100 MB/s on.
    fn rising_with_load(delivered: f64, _fill: f64) -> u64 {
        2 + (40.0 * delivered / (100.0 * MB)) as u64
    }

    #[test]
    fn fill_keeps_growing_while_a_slow_servers_latency_rises_with_its_throughput() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        // A server (or a busy CPU) that takes longer per request the more
        // fill asks of it, but still delivers all of it, up to 100 MB/s.
        let seen = fill_over(&mut c, &mut now, 60, 100.0 * MB, rising_with_load);
        let got = last_mean(&seen, 30);
        assert!(got >= 0.8 * 100.0 * MB, "{got} of 100 MB/s: {seen:?}");
        assert!(seen.iter().any(|s| s.0 == Decision::Grow), "late, and grew: {seen:?}");
    }

    #[test]
    fn fill_yields_to_a_full_link_with_the_same_latencies() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        // The same latencies, but the link is full at 20 MB/s: throughput
        // stays flat while the rate rises, so the latency is a queue.
        let full = |d: f64, fill: f64| rising_with_load(d.max(fill), fill);
        let seen = fill_over(&mut c, &mut now, 60, 20.0 * MB, full);
        let shrinks = seen[30..].iter().filter(|s| s.0 == Decision::Shrink).count();
        assert!(shrinks >= 3, "keeps yielding: {seen:?}");
        // ... without starving itself.
        let got = last_mean(&seen, 30);
        assert!(got >= 0.8 * 20.0 * MB, "{got} of 20 MB/s: {seen:?}");
    }

    #[test]
    fn small_chunks_set_no_baseline_that_large_ones_miss() {
        let mut b = Baseline::new();
        let now = Instant::now();
        // 2 ms of round trip, 10 ns per byte (100 MB/s).
        b.observe(&sample(Class::Background, 2, 1), now);
        b.observe(&sample(Class::Background, 12, 1_000_000), now);
        assert!(!b.is_late(&sample(Class::Background, 14, 1_000_000)));
        assert!(!b.is_late(&sample(Class::Background, 3, 4096)));
        assert!(b.is_late(&sample(Class::Background, 40, 1_000_000)));
    }

    #[test]
    fn profile_yields_to_waiting_guests_down_to_its_floor_never_below() {
        let (mut c, mut now) = (RateController::new(), Instant::now());
        assert_eq!(c.profile(), MAX_RATE, "unlimited until guests wait");
        // The profile alone measures the link: 100 MB/s.
        let profile = vec![sample(Class::Profile, 12, 1_000_000); 10];
        run(&mut c, &mut now, 60, false, &profile);
        assert!((c.capacity() - 100.0 * MB).abs() < MB, "{}", c.capacity());
        run(&mut c, &mut now, 50, true, &[]);
        assert!(
            (c.profile() - PROFILE_FLOOR_SHARE * c.capacity()).abs() < 1.0,
            "{}",
            c.profile()
        );
        assert_eq!(c.fill(), MIN_FILL);
    }

    #[test]
    fn a_bucket_in_debt_says_when_to_come_back() {
        let t = Instant::now();
        let mut b = Bucket::new(t);
        // 1 MB/s: the first 256 KiB chunk passes, the next waits for its debt.
        b.try_take(262_144, MB, t).unwrap();
        let again = b.try_take(262_144, MB, t).unwrap_err();
        assert_eq!(again - t, Duration::from_secs_f64(0.262144));
        b.try_take(262_144, MB, again).unwrap();
    }

    #[test]
    fn fill_rate_is_auto_or_a_number_of_mb_per_second() {
        assert_eq!("auto".parse::<FillRate>().unwrap(), FillRate::Auto);
        assert_eq!("12.5".parse::<FillRate>().unwrap(), FillRate::Cap(12.5));
        assert!("fast".parse::<FillRate>().is_err());
        assert_eq!(FillRate::Auto.bytes_per_sec(), Ok(None));
        assert_eq!(FillRate::Cap(2.5).bytes_per_sec(), Ok(Some(2_500_000)));
        assert!(FillRate::Cap(-1.0).bytes_per_sec().is_err());
        assert!(!FillRate::Cap(0.0).is_on() && FillRate::Auto.is_on());
        #[derive(serde::Deserialize)]
        struct T {
            r: FillRate,
        }
        let t = |s: &str| toml::from_str::<T>(s).map(|t| t.r);
        assert_eq!(t("r = \"auto\"").unwrap(), FillRate::Auto);
        assert_eq!(t("r = 0").unwrap(), FillRate::Cap(0.0));
        assert_eq!(t("r = 20.5").unwrap(), FillRate::Cap(20.5));
        assert!(t("r = \"fast\"").is_err());
    }
}
