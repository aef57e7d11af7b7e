//! `streamblk profile build`: merge boot traces into a boot profile.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::profile::{read_trace, Profile};
use crate::DisplayChain;

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Merge traces of boots of one image into a profile: the chunks read,
    /// each once, ordered by their median first access.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Trace files recorded with a disk's record-trace=.
    #[arg(required = true)]
    pub traces: Vec<PathBuf>,
    /// Where to write the profile.
    #[arg(short, long)]
    pub output: PathBuf,
    /// The image's chunk size in bytes (see `image inspect`).
    #[arg(long, default_value_t = crate::store::manifest::DEFAULT_CHUNK as u64)]
    pub chunk_size: u64,
}

pub fn run(cmd: ProfileCommand) -> anyhow::Result<()> {
    let ProfileCommand::Build(a) = cmd;
    let cs = a.chunk_size;
    if !cs.is_power_of_two()
        || !(crate::store::manifest::MIN_CHUNK as u64..=crate::store::manifest::MAX_CHUNK as u64).contains(&cs)
    {
        anyhow::bail!("--chunk-size {cs}: must be a power of two from 64 KiB to 4 MiB");
    }
    let traces = a
        .traces
        .iter()
        .map(|t| read_trace(t).map_err(|e| anyhow::anyhow!("{}", DisplayChain(&e))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let records: usize = traces.iter().map(|t| t.len()).sum();
    let p = Profile::build(&traces, cs as u32);
    std::fs::write(&a.output, p.to_bytes()).with_context(|| format!("write {}", a.output.display()))?;
    eprintln!(
        "{} traces, {records} reads -> {} chunks ({} MiB) in {}",
        traces.len(),
        p.chunks.len(),
        (p.chunks.len() as u64 * cs) >> 20,
        a.output.display()
    );
    Ok(())
}
