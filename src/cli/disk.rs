//! `streamblk disk add|remove|list`: disks of a running daemon, through
//! its control socket.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::control::{self, DiskStatus, Op};
use crate::daemon::{DiskSpec, DEFAULT_CONTROL_SOCKET};

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Adds a disk to the running daemon; the others are not disturbed.
    /// Prints the disk once its socket is ready. A disk added here is gone
    /// after a daemon restart unless it is also in the config file.
    Add {
        /// Same as serve's --disk:
        /// name=N,socket=PATH,overlay=DIR,(image=IMAGE|base=RAWFILE)[,queues=Q][,readonly][,serial=S]
        spec: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Removes a disk: flushes it, removes its socket and releases its
    /// image. Refused while a guest is attached unless --force.
    Remove {
        name: String,
        /// Remove it even though a guest is attached: the frontend is
        /// disconnected once its requests in flight finish.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Lists the daemon's disks.
    List {
        /// Print the JSON document.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

fn call(control: &ControlArgs, op: Op) -> anyhow::Result<serde_json::Value> {
    control::request(&control.control_socket, op).map_err(|e| anyhow::anyhow!("{}", crate::DisplayChain(&e)))
}

pub fn run(cmd: DiskCommand) -> anyhow::Result<()> {
    match cmd {
        DiskCommand::Add { spec, control } => {
            // Parse here too, so a typo is caught before the daemon is asked.
            let parsed: DiskSpec = spec.parse().with_context(|| format!("disk spec {spec}"))?;
            let v = call(&control, Op::DiskAdd { spec: spec.into() })?;
            let d: DiskStatus = serde_json::from_value(v).context("the daemon's answer")?;
            println!("disk {} ready on {}", parsed.name, d.socket.display());
        }
        DiskCommand::Remove { name, force, control } => {
            call(
                &control,
                Op::DiskRemove {
                    name: name.clone(),
                    force,
                },
            )?;
            println!("disk {name} removed");
        }
        DiskCommand::List { json, control } => {
            let v = call(&control, Op::DiskList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let disks: Vec<DiskStatus> = serde_json::from_value(v).context("the daemon's answer")?;
            for d in disks {
                println!("{}", super::status::disk_line(&d));
            }
        }
    }
    Ok(())
}
