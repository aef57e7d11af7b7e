//! The command line: clap definitions, one file per subcommand.

mod disk;
mod image;
mod profile;
mod serve;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub(crate) use serve::ServeArgs;

/// Serve VM disks over vhost-user-blk from lazily streamed images, each
/// with a per-guest redirect-on-write overlay.
#[derive(Debug, Parser)]
#[command(name = "streamblk", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve disks to QEMU over vhost-user-blk sockets.
    Serve(Box<ServeArgs>),
    /// Manage images in a store.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Build boot profiles from traces.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    /// Add, remove and list the disks of a running daemon.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Show a running daemon's disks, cache fill and fetch counters.
    Status(status::StatusArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Image(cmd) => image::run(cmd),
        Command::Profile(cmd) => profile::run(cmd),
        Command::Disk(cmd) => disk::run(cmd),
        Command::Status(a) => status::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}
