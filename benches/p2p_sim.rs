//! The P2P fleet simulator (`src/p2p/sim.rs`) over 1 to 10,000 hosts: a
//! cold boot storm per N, and a home killed at 30% of one host's time, for
//! each store rate and with and without the boot profile. The placement
//! and redirect decisions are the daemon's own code; links are simulated.
//! Prints a markdown table.
//!
//! Environment: `SIM_HOSTS` (default "1 8 1000 10000"; the first is the
//! baseline), `SIM_KILL_HOSTS` (default "1000"), `SIM_STORE_MBIT`
//! (default "100 1000"), `SIM_PROFILE` (default "off on"),
//! `SIM_UPLOAD_SLOTS` (default 4), `SIM_PARK_COLD` (1: the what-if of
//! `Config::park_cold`), `SIM_HOME_PREFETCH` (default 0, as the daemon;
//! 1: homes prefetch their profile chunks, as with `--p2p-prefetch`).

use streamblk::p2p_sim::{run, Config, Report, Workload};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn numbers(name: &str, default: &str) -> Vec<u64> {
    env(name, default)
        .split_whitespace()
        .map(|n| n.parse().unwrap_or_else(|_| panic!("{name}: numbers")))
        .collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn row(store: u64, profile: bool, what: &str, r: &Report, base: &Report) {
    let (med, max) = (r.median_time(), r.max_time());
    let base_t = base.median_time().as_secs_f64();
    println!(
        "| {store} Mbit/s | {} | {what} | {} | {:.3}x | {:.3} s | {:.3} s | {:.2}x / {:.2}x | {} | {:.1} ms | {:.1} MiB | {:.0} MiB | {} | {} | {:.1} s | {} ({}) |",
        if profile { "on" } else { "off" },
        r.hosts,
        r.egress(),
        med.as_secs_f64(),
        max.as_secs_f64(),
        med.as_secs_f64() / base_t,
        max.as_secs_f64() / base_t,
        r.upload_balance().map_or("-".into(), |b| format!("{b:.2}")),
        r.p99_read.as_secs_f64() * 1e3,
        mib(r.store_bytes),
        mib(r.peer_bytes),
        r.redirects,
        r.busy,
        r.wall.as_secs_f64(),
        r.prefetches,
        r.prefetched,
    );
    // Not in the table: requests a holder or home could not serve (404 from
    // a holder that does not hold the chunk yet, refused, reset).
    eprintln!(
        "{store} Mbit/s, profile {profile}, {what}, {} hosts: {} failed requests",
        r.hosts, r.failed
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let hosts = numbers("SIM_HOSTS", "1 8 1000 10000");
    let kill_hosts = numbers("SIM_KILL_HOSTS", "1000");
    let stores = numbers("SIM_STORE_MBIT", "100 1000");
    let slots: usize = env("SIM_UPLOAD_SLOTS", "4")
        .parse()
        .expect("SIM_UPLOAD_SLOTS: a number");
    let profiles: Vec<bool> = env("SIM_PROFILE", "off on")
        .split_whitespace()
        .map(|p| p == "on")
        .collect();
    let w = Workload::debian_like();
    println!(
        "P2P fleet simulation: every host boots at once with an empty cache; {}; hosts 1 Gbit/s up and down, RTT 0.2 ms, store 1 ms a request; {slots} upload slots; reads one at a time, as the fleet benchmark.\n",
        w.what
    );
    println!("| store | profile | scenario | hosts | store egress / working set | replay median | max | vs one host (median / max) | upload max / mean | p99 read | from store | from peers | redirects | busy (503) | sim wall time | home prefetches (chunks) |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &store in &stores {
        for &profile in &profiles {
            let cfg = |n: u64| Config {
                store_rate: store * 1_000_000,
                profile,
                upload_slots: slots,
                park_cold: env("SIM_PARK_COLD", "0") == "1",
                home_prefetch: env("SIM_HOME_PREFETCH", "0") == "1",
                ..Config::fleet(n as usize)
            };
            let base = run(&cfg(hosts[0]), &w);
            for &n in &hosts {
                let r = if n == hosts[0] { base.clone() } else { run(&cfg(n), &w) };
                assert!(r.complete, "N={n}: a host did not get its chunks");
                row(store, profile, "cold storm", &r, &base);
            }
            for &n in &kill_hosts {
                let at = base.median_time().mul_f64(0.3);
                let r = run(
                    &Config {
                        kill_at: Some(at),
                        ..cfg(n)
                    },
                    &w,
                );
                assert!(r.complete, "N={n}, home killed: a host did not get its chunks");
                let (victim, homed) = r.killed.clone().expect("a host was killed");
                let refetched = homed.iter().filter(|&&c| r.store_fetches[c as usize] > 1).count();
                let what = format!(
                    "home killed at {:.0} ms (host {victim}, home of {} chunks, {refetched} fetched again)",
                    at.as_secs_f64() * 1e3,
                    homed.len()
                );
                row(store, profile, &what, &r, &base);
            }
        }
    }
    println!(
        "\nstore egress: stored bytes the store sent, over the working set as stored (what one host alone fetches). Replay: attach to last read, per host; vs one host: over the first row's median. Killed runs leave the killed host out of the times."
    );
}
