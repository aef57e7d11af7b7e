//! `streamblk status`: what a running daemon serves, and how its images fill.

use anyhow::Context;
use clap::Args;

use super::disk::ControlArgs;
use crate::control::status::{FetchStatus, P2pStatus, PeerStatus, ProfileStatus};
use crate::control::{DiskState, DiskStatus, ImageStatus, Op, Status};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print the JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let v = crate::control::request(&a.control.control_socket, Op::Status)
        .map_err(|e| anyhow::anyhow!("{}", crate::DisplayChain(&e)))
        .with_context(|| format!("read status from {}", a.control.control_socket.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s: Status = serde_json::from_value(v).context("the daemon's status document")?;
    for d in &s.disks {
        println!("{}", disk_line(d));
        println!("  {}", io_line(d));
    }
    for i in &s.images {
        println!("{}", image_line(i));
        if let Some(p) = &i.profile {
            println!("  {}", profile_line(p));
        }
    }
    if let Some(c) = &s.cache {
        let limit = c.limit.map_or("no cap".to_string(), |l| format!("cap {} MiB", l >> 20));
        println!(
            "cache {}: {} chunks, {} MiB ({limit}); {} written, {} evicted",
            c.dir.display(),
            c.chunks,
            c.bytes >> 20,
            c.inserted,
            c.evicted
        );
    }
    if let Some(f) = &s.fetch {
        println!(
            "store {}: {} chunks, {} fetched; {} corrupt, {} failed attempts; guests waited {} times, {} ms",
            f.store,
            f.store_chunks,
            bytes(f.store_bytes as f64),
            f.corrupt_chunks,
            f.failed_attempts,
            f.guest_waits,
            f.guest_wait_ms
        );
        let q = |h: &crate::metrics::HistogramSnapshot| match (h.quantile(0.5), h.quantile(0.99)) {
            (Some(a), Some(b)) => format!("p50 <= {} p99 <= {}", secs(a), secs(b)),
            _ => "-".into(),
        };
        println!(
            "  fetch time: demand {}; profile {}; background {}; guest stalls {}",
            q(&f.latency.demand),
            q(&f.latency.profile),
            q(&f.latency.background),
            q(&f.guest_wait)
        );
        println!("  {}", rates_line(f));
        if f.peer_chunks + f.peer_failures + f.bad_peer_chunks > 0 {
            println!(
                "  from peers: {} chunks, {}; {} peer failures, {} bad chunks from peers",
                f.peer_chunks,
                bytes(f.peer_bytes as f64),
                f.peer_failures,
                f.bad_peer_chunks
            );
        }
    }
    if let Some(p) = &s.p2p {
        println!("{}", p2p_line(p));
        println!("  {}", membership_line(p));
        for peer in &p.peers {
            println!("  {}", peer_line(peer));
        }
    }
    Ok(())
}

/// `p2p on 10.0.0.1:7000, member of 3: uploaded 120 chunks (30.0 MiB), queue 0, ...`
pub fn p2p_line(p: &P2pStatus) -> String {
    format!(
        "p2p on {}, {} of {} members: uploaded {} chunks ({}), queue {}, {} fetched as home, {} kept in memory, \
         {} redirected, told of {} holders, {} profile prefetches ({} chunks); \
         refused {} unauthorized, {} bad, {} unknown, {} busy, {} failed",
        p.listen.as_deref().unwrap_or("(not serving)"),
        if p.is_member { "one" } else { "not one" },
        p.members.len(),
        p.uploads,
        bytes(p.upload_bytes as f64),
        p.upload_queue,
        p.home_fetches,
        p.loose_chunks,
        p.redirects,
        p.holders_told,
        p.prefetches,
        p.prefetched_chunks,
        p.refused_unauthorized,
        p.bad_requests,
        p.not_found,
        p.busy,
        p.failed
    )
}

/// `membership etcd://10.0.0.9:2379/fleet (connected), zone a, 3 members, 5 changes`
pub fn membership_line(p: &P2pStatus) -> String {
    format!(
        "membership {}{}, zone {}, {} members, {} changes",
        if p.membership.is_empty() {
            "static"
        } else {
            &p.membership
        },
        match p.membership_connected {
            Some(true) => " (connected)",
            Some(false) => " (not connected: last view kept)",
            None => "",
        },
        p.zone.as_deref().unwrap_or("(none)"),
        p.members.len(),
        p.membership_changes
    )
}

/// `peer 10.0.0.2:7000: 80 chunks (20.0 MiB) of 82 requests, 2 failures, 0 bad, queue 1`
pub fn peer_line(p: &PeerStatus) -> String {
    format!(
        "peer {}{}: {} chunks ({}) of {} requests, {} failures, {} bad, queue {}",
        p.addr,
        if p.down { " (down)" } else { "" },
        p.served,
        bytes(p.bytes as f64),
        p.requests,
        p.failures,
        p.bad_chunks,
        p.queue
    )
}

/// `profile (learned) 118 chunks: ...` or `profile none; learning: 0 of 1 boots recorded, 1 recording`
pub fn profile_line(p: &ProfileStatus) -> String {
    let mut l = if p.source == "none" {
        "profile none".to_string()
    } else {
        format!(
            "profile ({}) {} chunks: {} streamed, {} guest hits, {} guest stalls, first read {}, streamed by {}",
            p.source,
            p.chunks,
            p.streamed,
            p.hits,
            p.stalls,
            p.first_read_ms.map_or("-".into(), |m| format!("{m} ms")),
            p.done_ms.map_or("-".into(), |m| format!("{m} ms")),
        )
    };
    if p.learned_traces > 0 || p.recording > 0 {
        l += &format!(
            "; learning: {} boot{} recorded, {} recording",
            p.learned_traces,
            if p.learned_traces == 1 { "" } else { "s" },
            p.recording
        );
    }
    l
}

/// `fill auto, now 11.9 MiB/s; profile stream now no limit`
pub fn rates_line(f: &FetchStatus) -> String {
    let rate = |r: Option<u64>| r.map_or("no limit".to_string(), |r| format!("{}/s", bytes(r as f64)));
    format!(
        "fill {}, now {}; profile stream now {}",
        if f.fill_auto { "auto" } else { "capped" },
        rate(f.fill_rate_now),
        rate(f.profile_rate_now)
    )
}

pub fn disk_line(d: &DiskStatus) -> String {
    let state = match d.state {
        DiskState::Attached => "attached",
        DiskState::Waiting => "waiting",
        DiskState::Stopping => "stopping",
    };
    format!(
        "disk {:<16} {:<8} {} ({}, {} queue{}{}, {} in flight)",
        d.name,
        state,
        d.socket.display(),
        d.source,
        d.queues,
        if d.queues == 1 { "" } else { "s" },
        if d.readonly { ", read-only" } else { "" },
        d.inflight
    )
}

/// `reads 1200 (4.7 MiB, p50 <= 100us p99 <= 25ms), writes ..., flushes ..., 0 errors`
pub fn io_line(d: &DiskStatus) -> String {
    let io = &d.io;
    let op = |name: &str, o: &crate::metrics::OpSnapshot, with_bytes: bool| {
        let mut s = format!("{name} {}", o.requests);
        let mut detail = Vec::new();
        if with_bytes {
            detail.push(bytes(o.bytes as f64));
        }
        if let (Some(a), Some(b)) = (o.latency.quantile(0.5), o.latency.quantile(0.99)) {
            detail.push(format!("p50 <= {} p99 <= {}", secs(a), secs(b)));
        }
        if !detail.is_empty() {
            s += &format!(" ({})", detail.join(", "));
        }
        s
    };
    let errors = io.read.errors + io.write.errors + io.flush.errors + io.other.errors;
    format!(
        "{}; {}; {}; {} other; {errors} errors, {} bad requests",
        op("reads", &io.read, true),
        op("writes", &io.write, true),
        op("flushes", &io.flush, false),
        io.other.requests,
        io.bad_requests
    )
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut n = n;
    let mut u = 0;
    while n >= 1024.0 && u < UNITS.len() - 1 {
        n /= 1024.0;
        u += 1;
    }
    format!("{n:.1} {}", UNITS[u])
}

/// A histogram bound: `250us`, `25ms`, `2.5s`.
fn secs(s: f64) -> String {
    if s.is_infinite() {
        "inf".into()
    } else if s < 1e-3 {
        format!("{}us", (s * 1e6).round())
    } else if s < 1.0 {
        format!("{}ms", s * 1e3)
    } else {
        format!("{s}s")
    }
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `image ID [#####.....]  42.0%  1.2 MiB/s  ETA 3m10s`
pub fn image_line(i: &ImageStatus) -> String {
    const WIDTH: usize = 30;
    let filled = ((i.percent / 100.0) * WIDTH as f64).round().clamp(0.0, WIDTH as f64) as usize;
    let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH - filled));
    let id = i.id.get(..12).unwrap_or(&i.id);
    let names = if i.names.is_empty() {
        String::new()
    } else {
        format!(" ({})", i.names.join(", "))
    };
    let eta = match (i.filled >= i.chunks, i.eta_secs) {
        (true, _) => "complete".to_string(),
        (false, Some(s)) => format!("ETA {}", duration(s)),
        (false, None) => "ETA -".to_string(),
    };
    format!(
        "image {id}{names} [{bar}] {:5.1}% {}/{} chunks {}/s {eta}; {} hits, {} misses, {} disk{}",
        i.percent,
        i.filled,
        i.chunks,
        bytes(i.fill_rate),
        i.hits,
        i.misses,
        i.users,
        if i.users == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_line_shows_bar_rate_and_eta() {
        let i = ImageStatus {
            id: "0123456789abcdef".into(),
            names: vec!["debian".into()],
            chunk_size: 1 << 20,
            chunks: 100,
            filled: 50,
            percent: 50.0,
            fill_rate: 2.0 * 1024.0 * 1024.0,
            eta_secs: Some(125.0),
            hits: 1,
            misses: 2,
            users: 1,
            profile: None,
        };
        let l = image_line(&i);
        assert!(l.contains("[###############...............]"), "{l}");
        assert!(
            l.contains("2.0 MiB/s") && l.contains("ETA 2m05s") && l.contains("(debian)"),
            "{l}"
        );
        let done = ImageStatus {
            filled: 100,
            percent: 100.0,
            eta_secs: None,
            ..i
        };
        assert!(image_line(&done).contains("complete"));
    }

    #[test]
    fn profile_line_says_where_the_profile_came_from_and_how_learning_goes() {
        let none = ProfileStatus {
            source: "none".into(),
            recording: 1,
            ..ProfileStatus::default()
        };
        assert_eq!(
            profile_line(&none),
            "profile none; learning: 0 boots recorded, 1 recording"
        );
        let learned = ProfileStatus {
            source: "learned".into(),
            chunks: 12,
            streamed: 10,
            learned_traces: 1,
            ..ProfileStatus::default()
        };
        let l = profile_line(&learned);
        assert!(l.starts_with("profile (learned) 12 chunks: 10 streamed"), "{l}");
        assert!(l.ends_with("learning: 1 boot recorded, 0 recording"), "{l}");
        let f = FetchStatus {
            fill_auto: true,
            fill_rate_now: Some(2 << 20),
            ..FetchStatus::default()
        };
        assert_eq!(rates_line(&f), "fill auto, now 2.0 MiB/s; profile stream now no limit");
    }

    #[test]
    fn p2p_lines_show_the_membership_and_each_peer() {
        let p = P2pStatus {
            listen: Some("127.0.0.1:7000".into()),
            members: vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()],
            is_member: true,
            uploads: 3,
            upload_bytes: 3 << 20,
            prefetches: 1,
            prefetched_chunks: 40,
            ..P2pStatus::default()
        };
        let l = p2p_line(&p);
        assert!(
            l.starts_with("p2p on 127.0.0.1:7000, one of 2 members: uploaded 3 chunks (3.0 MiB)"),
            "{l}"
        );
        assert!(l.contains(", 1 profile prefetches (40 chunks); "), "{l}");
        assert_eq!(
            membership_line(&p),
            "membership static, zone (none), 2 members, 0 changes"
        );
        let etcd = P2pStatus {
            membership: "etcd://127.0.0.1:2379/fleet".into(),
            membership_connected: Some(false),
            zone: Some("a".into()),
            membership_changes: 4,
            ..p.clone()
        };
        assert_eq!(
            membership_line(&etcd),
            "membership etcd://127.0.0.1:2379/fleet (not connected: last view kept), zone a, 2 members, 4 changes"
        );
        let peer = PeerStatus {
            addr: "127.0.0.1:7001".into(),
            served: 2,
            requests: 3,
            failures: 1,
            bad_chunks: 1,
            down: true,
            ..PeerStatus::default()
        };
        assert_eq!(
            peer_line(&peer),
            "peer 127.0.0.1:7001 (down): 2 chunks (0.0 B) of 3 requests, 1 failures, 1 bad, queue 0"
        );
    }
}
