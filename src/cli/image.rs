//! `streamblk image ...`: import, inspect, set-profile.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::fetch::pct;
use crate::profile::learned::LearnedDir;
use crate::profile::Profile;
use crate::store::{self, ChunkIdx, ImageStore};
use crate::DisplayChain;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a raw or qcow2 file into a store; prints the image id.
    Import(ImportArgs),
    /// Show an image's size, chunks, stored bytes and profile.
    Inspect(InspectArgs),
    /// Store a boot profile (from `profile build`) with an image.
    SetProfile(SetProfileArgs),
}

#[derive(Debug, Args)]
pub struct SetProfileArgs {
    /// Image name or id.
    pub image: String,
    /// The profile file.
    pub profile: PathBuf,
    #[arg(long)]
    pub store: String,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The raw or qcow2 image file.
    pub src: PathBuf,
    /// The store: a directory, file://, http(s):// or s3://bucket/prefix.
    #[arg(long)]
    pub store: String,
    /// A name for the image in the store.
    #[arg(long)]
    pub name: Option<String>,
    /// Chunk size in bytes: a power of two from 65536 to 4194304.
    #[arg(long, default_value_t = store::manifest::DEFAULT_CHUNK as u64)]
    pub chunk_size: u64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Image name or id.
    pub image: String,
    #[arg(long)]
    pub store: String,
    /// A daemon's cache directory: also show the profile it learned for
    /// the image, if any.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the I/O runtime")?;
    match cmd {
        ImageCommand::Import(a) => rt.block_on(import(a)),
        ImageCommand::Inspect(a) => rt.block_on(inspect(a)),
        ImageCommand::SetProfile(a) => rt.block_on(set_profile(a)),
    }
}

fn err(e: impl std::error::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", DisplayChain(&e))
}

async fn import(a: ImportArgs) -> anyhow::Result<()> {
    let store = ImageStore::open(&a.store, true).map_err(err)?;
    let tty = std::io::stderr().is_terminal();
    let progress = |done: u64, total: u64| {
        let line = format!(
            "importing {}: {} / {} MiB ({:.0}%)",
            a.src.display(),
            done >> 20,
            total >> 20,
            pct(done, total)
        );
        if tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    };
    let r = store::import(&a.src, &store, a.name.as_deref(), Some(a.chunk_size), progress)
        .await
        .map_err(err)?;
    if tty {
        eprintln!();
    }
    eprintln!(
        "{} chunks ({} zero), {} new chunks, {} new bytes stored{}",
        r.manifest.chunk_count(),
        r.manifest.zero_chunks(),
        r.new_chunks,
        r.new_bytes,
        if r.new_manifest {
            ""
        } else {
            "; image already in the store"
        }
    );
    println!("{}", r.id);
    Ok(())
}

async fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let store = ImageStore::open(&a.store, false).map_err(err)?;
    let (id, m) = store.manifest(&a.image).await.map_err(err)?;
    println!("image:        {id}");
    println!("size:         {} bytes ({} MiB)", m.size, m.size >> 20);
    println!("chunk size:   {} bytes", m.chunk_size);
    println!(
        "chunks:       {} ({} all-zero, never fetched)",
        m.chunk_count(),
        m.zero_chunks()
    );
    println!(
        "stored bytes: {} ({:.1}% of the image)",
        m.stored_bytes(),
        pct(m.stored_bytes(), m.size)
    );
    let describe = |p: &Profile| {
        let bytes: u64 = p.chunks.iter().map(|&c| m.chunk_len(ChunkIdx(c))).sum();
        format!(
            "{} chunks, {} bytes ({:.1}% of the image)",
            p.chunks.len(),
            bytes,
            pct(bytes, m.size)
        )
    };
    let stored = store.profile(&id).await.map_err(err)?;
    match &stored {
        Some(bytes) => {
            let p = Profile::parse(bytes, m.chunk_size, m.chunk_count()).map_err(err)?;
            println!("profile:      {} (store)", describe(&p));
        }
        None => println!("profile:      none in the store"),
    }
    if let Some(cache_dir) = &a.cache_dir {
        let dir = LearnedDir::new(cache_dir, &id.to_hex());
        let traces = dir.traces().len();
        let published = stored
            .as_ref()
            .is_some_and(|b| dir.published().as_deref() == Some(store::Digest::of(b).to_hex().as_str()));
        match dir.profile(m.chunk_size, m.chunk_count()) {
            Ok(Some(p)) => println!(
                "learned:      {} from {traces} recorded boot{} in {}{}",
                describe(&p),
                if traces == 1 { "" } else { "s" },
                dir.root().display(),
                if published {
                    "; the store's profile is this one"
                } else {
                    ""
                }
            ),
            Ok(None) if traces > 0 => println!(
                "learned:      none yet; {traces} boot{} recorded in {}",
                if traces == 1 { "" } else { "s" },
                dir.root().display()
            ),
            Ok(None) => println!("learned:      none in {}", cache_dir.display()),
            Err(e) => println!("learned:      unusable: {}", DisplayChain(&e)),
        }
    }
    Ok(())
}

async fn set_profile(a: SetProfileArgs) -> anyhow::Result<()> {
    let store = ImageStore::open(&a.store, false).map_err(err)?;
    let (id, m) = store.manifest(&a.image).await.map_err(err)?;
    let bytes = std::fs::read(&a.profile).with_context(|| format!("read {}", a.profile.display()))?;
    let p = Profile::parse(&bytes, m.chunk_size, m.chunk_count())
        .map_err(|e| anyhow::anyhow!("{}: {}", a.profile.display(), DisplayChain(&e)))?;
    store.put_profile(&id, bytes.into()).await.map_err(err)?;
    eprintln!("profile of {} chunks stored with image {id}", p.chunks.len());
    Ok(())
}
