//! `streamblk status`: what a running daemon serves, and how its images fill.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = super::serve::DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// Print the raw JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let s = crate::control::read_status(&a.control_socket)
        .with_context(|| format!("read status from {}", a.control_socket.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    for d in s["disks"].as_array().into_iter().flatten() {
        println!(
            "disk {:<16} {:<8} {}",
            d["name"].as_str().unwrap_or("?"),
            if d["connected"].as_bool() == Some(true) {
                "attached"
            } else {
                "waiting"
            },
            d["socket"].as_str().unwrap_or("?")
        );
    }
    for i in s["images"].as_array().into_iter().flatten() {
        println!(
            "image {} cached {}/{} chunks ({:.1}%), {} hits, {} misses",
            i["id"].as_str().unwrap_or("?"),
            i["filled"],
            i["chunks"],
            i["percent"].as_f64().unwrap_or(0.0),
            i["hits"],
            i["misses"]
        );
        let p = &i["profile"];
        if !p.is_null() {
            println!(
                "  profile {} chunks: {} streamed, {} guest hits, {} guest stalls, first read {} ms, streamed by {} ms",
                p["chunks"], p["streamed"], p["hits"], p["stalls"], p["first_read_ms"], p["done_ms"]
            );
        }
    }
    let f = &s["fetch"];
    if !f.is_null() {
        println!(
            "store {}: {} chunks, {} bytes fetched; {} corrupt, {} failed attempts; guests waited {} times, {} ms",
            f["store"].as_str().unwrap_or("?"),
            f["store_chunks"],
            f["store_bytes"],
            f["corrupt_chunks"],
            f["failed_attempts"],
            f["guest_waits"],
            f["guest_wait_ms"]
        );
    }
    Ok(())
}
