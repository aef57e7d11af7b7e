//! `streamblk serve`: the options, into a [`ServeRequest`] for the daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::daemon::{self, DiskSpec, Options, ServeRequest};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config file: every option below as a key named like it
    /// (`cache-dir = "..."`) and one `[[disk]]` table per disk with the SPEC
    /// fields as keys. Command-line options override it; SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A disk to serve (repeatable):
    /// name=N,socket=PATH,overlay=DIR,(image=IMAGE|base=RAWFILE)[,queues=Q][,readonly][,serial=S]
    /// [,record-trace=PATH[,trace-secs=N][,trace-mib=M]]
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// The image store for image= disks: a directory, file://, http(s):// or s3://bucket/prefix.
    #[arg(long)]
    pub store: Option<String>,
    /// An HTTP proxy for every store request (a site's P2P proxy such as
    /// Dragonfly's dfdaemon, or a caching proxy), for http(s):// and s3:// stores.
    #[arg(long, value_name = "URL")]
    pub store_proxy: Option<String>,
    /// The Local Cache: the host's chunk store, every chunk once whichever
    /// images hold it [default: /var/cache/streamblk].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// The chunk store's cap in MiB: beyond it the least recently used
    /// chunks are evicted, whichever images hold them (0: no cap) [default: 0].
    #[arg(long)]
    pub cache_size_mib: Option<u64>,
    /// Background fill rate: auto (use the link only while guests are not
    /// waiting on it, backing off when their fetches appear or slow down),
    /// or a fixed cap in MB/s (0: no background fill). Demand fetching is
    /// never capped [default: auto].
    #[arg(long, value_name = "auto|MBPS")]
    pub fill_rate: Option<crate::fetch::FillRate>,
    /// Boot profile streaming rate cap in MB/s (0: no cap) [default: 200].
    #[arg(long)]
    pub profile_rate: Option<f64>,
    /// Seconds a guest read of a missing chunk keeps retrying before it
    /// fails with IOERR [default: 30].
    #[arg(long)]
    pub fetch_deadline: Option<f64>,
    /// Seconds one fetch attempt may take [default: 10].
    #[arg(long)]
    pub fetch_timeout: Option<f64>,
    /// Chunk fetches in flight at once [default: 8].
    #[arg(long)]
    pub fetch_concurrency: Option<usize>,
    /// Microseconds a queue worker polls its ring for more requests before
    /// sleeping (0: never poll). Adapts downwards while polls find nothing.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The control socket that `streamblk status` and `streamblk disk` use
    /// [default: /run/streamblk/control.sock].
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Group (name or id) that may use the control socket besides root;
    /// the socket is created mode 0660 with this group.
    #[arg(long)]
    pub control_group: Option<String>,
    /// Group (name or id) given every disk socket, created mode 0660: the
    /// group QEMU runs as (e.g. libvirt-qemu). Without it a socket keeps the
    /// mode the daemon's umask gives it.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// How far (MiB) boot profile streaming runs ahead of the guest [default: 64].
    #[arg(long)]
    pub profile_window_mib: Option<u64>,
    /// Boot profiles learned at run time: a disk of an image without a
    /// profile records its first boot, and after this many recorded boots
    /// on the host the daemon builds the image's profile from them and
    /// uses it for later boots (0: off) [default: 1].
    #[arg(long, value_name = "N")]
    pub learn_boots: Option<u32>,
    /// How long after attach a learned boot trace records [default: 120].
    #[arg(long, value_name = "SECS")]
    pub learn_secs: Option<f64>,
    /// Also store learned profiles in the store, next to the image's
    /// manifest (its id does not change), for every host to use.
    #[arg(long)]
    pub publish_profiles: bool,
    /// Serve the chunks of this host's Local Cache to peers over HTTP on
    /// this address (P2P). Name the same address in the peer list.
    #[arg(long, value_name = "ADDR:PORT")]
    pub p2p_listen: Option<std::net::SocketAddr>,
    /// The fleet's members, this host included or not: each chunk's home is
    /// chosen among them by rendezvous hashing; every host should get the
    /// same list.
    #[arg(long, value_name = "ADDR:PORT,...")]
    pub peers: Option<daemon::PeerList>,
    /// More members, one ADDR:PORT a line (# comments); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub peers_file: Option<PathBuf>,
    /// Fleet membership kept in etcd instead of --peers/--peers-file: this
    /// host holds a leased key under PREFIX and follows the others'.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]/PREFIX")]
    pub membership: Option<crate::p2p::etcd::EtcdUrl>,
    /// This host's zone: each chunk's home is chosen in the zone first, and
    /// the zone's home asks the chunk's home in the whole fleet.
    #[arg(long, value_name = "NAME")]
    pub zone: Option<crate::p2p::membership::Zone>,
    /// The cluster token (one line, at least 16 characters) that peer
    /// requests carry and the peer server requires. Needed for P2P.
    #[arg(long, value_name = "FILE")]
    pub p2p_token_file: Option<PathBuf>,
    /// Cap on uploads to peers in MB/s (0: no cap) [default: 0].
    #[arg(long, value_name = "MBPS")]
    pub p2p_upload_rate: Option<f64>,
    /// Uploads to peers at once; more wait, demand first [default: 4].
    #[arg(long, value_name = "N")]
    pub p2p_upload_slots: Option<usize>,
    /// As a chunk's home, prefetch the profile chunks this host is home
    /// for on an open image's first profile request from a peer (off: in
    /// a storm where every host boots the image it reorders the store's
    /// reads and slows the boot).
    #[arg(long)]
    pub p2p_prefetch: bool,
}

impl TryFrom<ServeArgs> for ServeRequest {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        let disks = a
            .disks
            .iter()
            .map(|s| s.parse::<DiskSpec>().with_context(|| format!("--disk {s}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ServeRequest {
            options: Options {
                store: a.store,
                store_proxy: a.store_proxy,
                cache_dir: a.cache_dir,
                cache_size_mib: a.cache_size_mib,
                fill_rate: a.fill_rate,
                profile_rate: a.profile_rate,
                fetch_deadline: a.fetch_deadline,
                fetch_timeout: a.fetch_timeout,
                fetch_concurrency: a.fetch_concurrency,
                poll_us: a.poll_us,
                metrics_listen: a.metrics_listen,
                control_socket: a.control_socket,
                control_group: a.control_group,
                socket_group: a.socket_group,
                profile_window_mib: a.profile_window_mib,
                learn_boots: a.learn_boots,
                learn_secs: a.learn_secs,
                publish_profiles: a.publish_profiles.then_some(true),
                p2p_listen: a.p2p_listen,
                peers: a.peers,
                peers_file: a.peers_file,
                membership: a.membership,
                zone: a.zone,
                p2p_token_file: a.p2p_token_file,
                p2p_upload_rate: a.p2p_upload_rate,
                p2p_upload_slots: a.p2p_upload_slots,
                p2p_prefetch: a.p2p_prefetch.then_some(true),
            },
            disks,
            config: a.config,
        })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let request = ServeRequest::try_from(args)?;
    daemon::run(request).map_err(|e| anyhow::anyhow!("{}", crate::DisplayChain(&e)))?;
    // Worker threads may be blocked on their frontends: do not wait for them.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: ServeArgs,
        }
        <P as clap::Parser>::parse_from([&["serve"], argv].concat()).a
    }

    #[test]
    fn serve_args_become_a_request() {
        let r = ServeRequest::try_from(args(&[
            "--disk",
            "name=a,socket=s1,overlay=o1,base=b",
            "--fill-rate",
            "3",
            "--control-group",
            "kvm",
        ]))
        .unwrap();
        assert_eq!(r.disks.len(), 1);
        assert_eq!(r.options.fill_rate, Some(crate::fetch::FillRate::Cap(3.0)));
        let auto = ServeRequest::try_from(args(&["--fill-rate", "auto"])).unwrap();
        assert_eq!(auto.options.fill_rate, Some(crate::fetch::FillRate::Auto));
        assert_eq!(r.options.control_group.as_deref(), Some("kvm"));
        assert_eq!(r.options.store, None);
        assert_eq!(r.options.publish_profiles, None, "unset: the config file decides");
        let learn =
            ServeRequest::try_from(args(&["--learn-boots", "2", "--learn-secs", "5", "--publish-profiles"])).unwrap();
        assert_eq!(
            (
                learn.options.learn_boots,
                learn.options.learn_secs,
                learn.options.publish_profiles
            ),
            (Some(2), Some(5.0), Some(true))
        );
        let p2p = ServeRequest::try_from(args(&[
            "--p2p-listen",
            "127.0.0.1:7000",
            "--peers",
            "127.0.0.1:7000,127.0.0.1:7001",
            "--p2p-token-file",
            "/t",
            "--p2p-upload-rate",
            "12.5",
        ]))
        .unwrap();
        let p = p2p.resolve().unwrap().0.p2p.unwrap();
        assert_eq!(p.peers.len(), 2);
        assert_eq!(p.upload_rate, Some(12_500_000));
        let e = ServeRequest::try_from(args(&["--disk", "name=a"])).unwrap_err();
        assert!(format!("{e:#}").contains("needs socket="), "{e:#}");
        let e = ServeRequest::try_from(args(&["--disk", "name=a,socket=s1,overlay=o1,image=debian"]))
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("need a store"), "{e}");
    }
}
