//! The daemon's settings: defaults, overridden by the config file, overridden
//! by the command line; and the config file itself (TOML, keys named like the
//! long options, one `[[disk]]` table per disk).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::learn::{LearnConfig, LEARN_MAX_BYTES};
use super::spec::{DiskSource, DiskSpec, Scalar};
use crate::fetch::{FetchConfig, FillRate};
use crate::p2p::etcd::EtcdUrl;
use crate::p2p::membership::Zone;
use crate::p2p::P2pConfig;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/streamblk/control.sock";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/streamblk";
/// Most recorded boots `learn-boots` may wait for.
const MAX_LEARN_BOOTS: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("config file {0}, line {1}: [[disk]] {2}")]
    Disk(PathBuf, usize, String),
    #[error("--{0} {1}: {2}")]
    Option(&'static str, String, &'static str),
    #[error("two disks are named {0}")]
    SameName(String),
    #[error("two disks use socket {0}")]
    SameSocket(PathBuf),
    #[error("two disks use overlay {0}: each guest needs its own")]
    SameOverlay(PathBuf),
}

/// Every serve option, each unset unless given; the config file's keys
/// and the command line's long options are the same names.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Options {
    pub store: Option<String>,
    pub store_proxy: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub cache_size_mib: Option<u64>,
    pub fill_rate: Option<FillRate>,
    pub profile_rate: Option<f64>,
    pub fetch_deadline: Option<f64>,
    pub fetch_timeout: Option<f64>,
    pub fetch_concurrency: Option<usize>,
    pub poll_us: Option<u64>,
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub socket_group: Option<String>,
    pub profile_window_mib: Option<u64>,
    pub learn_boots: Option<u32>,
    pub learn_secs: Option<f64>,
    pub publish_profiles: Option<bool>,
    pub p2p_listen: Option<SocketAddr>,
    pub peers: Option<PeerList>,
    pub peers_file: Option<PathBuf>,
    pub membership: Option<EtcdUrl>,
    pub zone: Option<Zone>,
    pub p2p_token_file: Option<PathBuf>,
    pub p2p_upload_rate: Option<f64>,
    pub p2p_upload_slots: Option<usize>,
    pub p2p_prefetch: Option<bool>,
}

/// `--peers ADDR:PORT,...`: on the command line and in the config file a
/// comma-separated string; in the config file also an array of strings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerList(pub Vec<SocketAddr>);

impl std::str::FromStr for PeerList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        crate::p2p::membership::parse_list(s).map(PeerList)
    }
}

impl<'de> Deserialize<'de> for PeerList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let text = match Raw::deserialize(d)? {
            Raw::One(s) => s,
            Raw::Many(v) => v.join(","),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Options {
    /// `self` with every option that `over` sets replaced by its value.
    pub fn overridden_by(self, over: &Options) -> Options {
        macro_rules! pick {
            ($($f:ident),*) => { Options { $($f: over.$f.clone().or(self.$f)),* } };
        }
        pick!(
            store,
            store_proxy,
            cache_dir,
            cache_size_mib,
            fill_rate,
            profile_rate,
            fetch_deadline,
            fetch_timeout,
            fetch_concurrency,
            poll_us,
            metrics_listen,
            control_socket,
            control_group,
            socket_group,
            profile_window_mib,
            learn_boots,
            learn_secs,
            publish_profiles,
            p2p_listen,
            peers,
            peers_file,
            membership,
            zone,
            p2p_token_file,
            p2p_upload_rate,
            p2p_upload_slots,
            p2p_prefetch
        )
    }
}

impl Options {
    /// The keys whose values differ between `self` and `other`.
    pub fn changed_keys(&self, other: &Options) -> Vec<&'static str> {
        let mut keys = Vec::new();
        macro_rules! cmp {
            ($($f:ident => $k:literal),*) => { $(if self.$f != other.$f { keys.push($k); })* };
        }
        cmp!(
            store => "store",
            store_proxy => "store-proxy",
            cache_dir => "cache-dir",
            cache_size_mib => "cache-size-mib",
            fill_rate => "fill-rate",
            profile_rate => "profile-rate",
            fetch_deadline => "fetch-deadline",
            fetch_timeout => "fetch-timeout",
            fetch_concurrency => "fetch-concurrency",
            poll_us => "poll-us",
            metrics_listen => "metrics-listen",
            control_socket => "control-socket",
            control_group => "control-group",
            socket_group => "socket-group",
            profile_window_mib => "profile-window-mib",
            learn_boots => "learn-boots",
            learn_secs => "learn-secs",
            publish_profiles => "publish-profiles",
            p2p_listen => "p2p-listen",
            peers => "peers",
            peers_file => "peers-file",
            membership => "membership",
            zone => "zone",
            p2p_token_file => "p2p-token-file",
            p2p_upload_rate => "p2p-upload-rate",
            p2p_upload_slots => "p2p-upload-slots",
            p2p_prefetch => "p2p-prefetch"
        );
        keys
    }
}

/// The resolved settings the daemon runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub store: Option<String>,
    /// An HTTP proxy every store request goes through.
    pub store_proxy: Option<String>,
    pub cache_dir: PathBuf,
    pub cache_limit: Option<u64>,
    pub fetch: FetchConfig,
    pub profile_window: u64,
    /// Profiles learned at run time.
    pub learn: LearnConfig,
    pub control_socket: PathBuf,
    pub control_group: Option<String>,
    /// Group given the disks' sockets (mode 0660); None: as created.
    pub socket_group: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub poll: Duration,
    /// P2P, if on (`--p2p-listen`, `--peers` or `--peers-file`).
    pub p2p: Option<P2pConfig>,
}

impl TryFrom<&Options> for Settings {
    type Error = ConfigError;

    fn try_from(o: &Options) -> Result<Self, ConfigError> {
        let secs = |what: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e6 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ConfigError::Option(
                    what,
                    v.to_string(),
                    "must be a positive number of seconds",
                ))
            }
        };
        let fill_rate = o.fill_rate.unwrap_or_default();
        let fill_cap = fill_rate
            .bytes_per_sec()
            .map_err(|why| ConfigError::Option("fill-rate", fill_rate.to_string(), why))?;
        let profile_rate = o.profile_rate.unwrap_or(200.0);
        if !(profile_rate.is_finite() && profile_rate >= 0.0) {
            return Err(ConfigError::Option(
                "profile-rate",
                profile_rate.to_string(),
                "must be a number of MB/s, 0 or more",
            ));
        }
        let poll_us = o.poll_us.unwrap_or(crate::vhost::DEFAULT_POLL_US);
        if poll_us > crate::vhost::MAX_POLL_US {
            return Err(ConfigError::Option("poll-us", poll_us.to_string(), "too large"));
        }
        let concurrency = o.fetch_concurrency.unwrap_or(8);
        if concurrency == 0 || concurrency > 256 {
            return Err(ConfigError::Option(
                "fetch-concurrency",
                concurrency.to_string(),
                "must be from 1 to 256",
            ));
        }
        let fetch = FetchConfig {
            concurrency,
            low_concurrency: (concurrency / 2).max(1),
            fill_rate: fill_cap,
            profile_rate: (profile_rate > 0.0).then_some((profile_rate * 1e6) as u64),
            attempt_timeout: secs("fetch-timeout", o.fetch_timeout.unwrap_or(10.0))?,
            deadline: secs("fetch-deadline", o.fetch_deadline.unwrap_or(30.0))?,
            background_fill: fill_rate.is_on(),
        };
        let learn_boots = o.learn_boots.unwrap_or(1);
        if learn_boots > MAX_LEARN_BOOTS {
            return Err(ConfigError::Option(
                "learn-boots",
                learn_boots.to_string(),
                "must be from 0 (off) to 100",
            ));
        }
        let learn = LearnConfig {
            boots: learn_boots,
            window: secs("learn-secs", o.learn_secs.unwrap_or(120.0))?,
            max_bytes: LEARN_MAX_BYTES,
            publish: o.publish_profiles.unwrap_or(false),
        };
        let cache_size = o.cache_size_mib.unwrap_or(0);
        let p2p = p2p_config(o)?;
        if let Some(proxy) = &o.store_proxy {
            if !(proxy.starts_with("http://") || proxy.starts_with("https://")) {
                return Err(ConfigError::Option(
                    "store-proxy",
                    proxy.clone(),
                    "must be an http:// or https:// URL",
                ));
            }
            let remote = o
                .store
                .as_deref()
                .is_some_and(|s| ["http://", "https://", "s3://"].iter().any(|p| s.starts_with(p)));
            if !remote {
                return Err(ConfigError::Option(
                    "store-proxy",
                    proxy.clone(),
                    "needs an http(s):// or s3:// --store",
                ));
            }
        }
        Ok(Settings {
            store: o.store.clone(),
            store_proxy: o.store_proxy.clone(),
            cache_dir: o.cache_dir.clone().unwrap_or_else(|| DEFAULT_CACHE_DIR.into()),
            cache_limit: (cache_size > 0).then_some(cache_size << 20),
            fetch,
            profile_window: o.profile_window_mib.unwrap_or(64).max(1) << 20,
            learn,
            control_socket: o
                .control_socket
                .clone()
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            control_group: o.control_group.clone(),
            socket_group: o.socket_group.clone(),
            metrics_listen: o.metrics_listen,
            poll: Duration::from_micros(poll_us),
            p2p,
        })
    }
}

/// Most upload slots `p2p-upload-slots` may ask for.
const MAX_UPLOAD_SLOTS: usize = 64;

/// The P2P settings, if any P2P option is set: a fleet needs its token.
fn p2p_config(o: &Options) -> Result<Option<P2pConfig>, ConfigError> {
    let peers = o.peers.clone().unwrap_or_default().0;
    if o.p2p_listen.is_none() && peers.is_empty() && o.peers_file.is_none() && o.membership.is_none() {
        return Ok(None);
    }
    if let Some(url) = o
        .membership
        .as_ref()
        .filter(|_| !peers.is_empty() || o.peers_file.is_some())
    {
        return Err(ConfigError::Option(
            "membership",
            url.to_string(),
            "cannot be given with --peers or --peers-file: the members come from etcd or from a static list, not both",
        ));
    }
    if let Some(listen) = o.p2p_listen.filter(|a| a.ip().is_unspecified() || a.port() == 0) {
        // The peer list names this host by this address: it must be one
        // that peers reach, or the host would ask itself for its own chunks.
        return Err(ConfigError::Option(
            "p2p-listen",
            listen.to_string(),
            "must be this host's address as the peer list names it (not 0.0.0.0, ::, or port 0)",
        ));
    }
    let token_file = o.p2p_token_file.clone().ok_or(ConfigError::Option(
        "p2p-token-file",
        String::new(),
        "is needed with --p2p-listen, --peers, --peers-file or --membership (peers refuse requests without the cluster token)",
    ))?;
    let rate = o.p2p_upload_rate.unwrap_or(0.0);
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(ConfigError::Option(
            "p2p-upload-rate",
            rate.to_string(),
            "must be a number of MB/s, 0 (no cap) or more",
        ));
    }
    let slots = o.p2p_upload_slots.unwrap_or(4);
    if slots == 0 || slots > MAX_UPLOAD_SLOTS {
        return Err(ConfigError::Option(
            "p2p-upload-slots",
            slots.to_string(),
            "must be from 1 to 64",
        ));
    }
    Ok(Some(P2pConfig {
        listen: o.p2p_listen,
        peers,
        peers_file: o.peers_file.clone(),
        membership: o.membership.clone(),
        zone: o.zone.clone(),
        token_file,
        upload_rate: (rate > 0.0).then_some((rate * 1e6) as u64),
        upload_slots: slots,
        prefetch: o.p2p_prefetch.unwrap_or(false),
        timeouts: Default::default(),
    }))
}

/// A parsed config file.
#[derive(Debug, Default, PartialEq)]
pub struct ConfigFile {
    pub options: Options,
    pub disks: Vec<DiskSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(flatten)]
    options: Options,
    #[serde(default)]
    disk: Vec<BTreeMap<toml::Spanned<String>, toml::Value>>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Self::parse(path, &text)
    }

    /// Parses `text`; errors name the file, the line and the key.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        let options: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_path_buf(), one_line(&e.to_string())))?;
        // serde's flatten loses deny_unknown_fields' line: check the
        // top-level keys here, with the line of each.
        const KEYS: [&str; 28] = [
            "store",
            "store-proxy",
            "cache-dir",
            "cache-size-mib",
            "fill-rate",
            "profile-rate",
            "fetch-deadline",
            "fetch-timeout",
            "fetch-concurrency",
            "poll-us",
            "metrics-listen",
            "control-socket",
            "control-group",
            "socket-group",
            "profile-window-mib",
            "learn-boots",
            "learn-secs",
            "publish-profiles",
            "p2p-listen",
            "peers",
            "peers-file",
            "membership",
            "zone",
            "p2p-token-file",
            "p2p-upload-rate",
            "p2p-upload-slots",
            "p2p-prefetch",
            "disk",
        ];
        for key in options.keys() {
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::Parse(
                    path.to_path_buf(),
                    format!("line {}: unknown key {key:?}", key_line(text, key)),
                ));
            }
        }
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            // serde's flatten hides which option was wrong: find it.
            let msg = options
                .iter()
                .filter(|(k, _)| k.as_str() != "disk")
                .find_map(|(k, v)| {
                    let one: toml::Table = [(k.clone(), v.clone())].into_iter().collect();
                    one.try_into::<Options>()
                        .err()
                        .map(|e| format!("line {}: key {k:?}: {}", key_line(text, k), one_line(&e.to_string())))
                })
                .unwrap_or_else(|| one_line(&e.to_string()));
            ConfigError::Parse(path.to_path_buf(), msg)
        })?;
        let mut disks = Vec::new();
        for table in raw.disk {
            let line = table.keys().map(|k| line_of(text, k.span().start)).min().unwrap_or(1);
            for (k, v) in &table {
                if !matches!(
                    v,
                    toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Boolean(_)
                ) {
                    return Err(ConfigError::Disk(
                        path.to_path_buf(),
                        line_of(text, k.span().start),
                        format!("key {:?}: a string, number or boolean", k.get_ref()),
                    ));
                }
            }
            let spec = DiskSpec::from_table(table.iter().map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => Scalar::Str(s.clone()),
                    toml::Value::Integer(n) => Scalar::Int(*n),
                    toml::Value::Boolean(b) => Scalar::Bool(*b),
                    _ => Scalar::Other,
                };
                (k.get_ref().as_str(), s)
            }))
            .map_err(|e| {
                // Point at the offending key's line where the error names one.
                let at = table
                    .keys()
                    .find(|k| e.field() == Some(k.get_ref().as_str()))
                    .map_or(line, |k| line_of(text, k.span().start));
                ConfigError::Disk(path.to_path_buf(), at, e.to_string())
            })?;
            disks.push(spec);
        }
        Ok(ConfigFile {
            options: raw.options,
            disks,
        })
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of a top-level `key = ...` (1 if not found).
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")))
                .is_some_and(|r| r.trim_start().starts_with('=') || r.starts_with(']'))
        })
        .map_or(1, |i| i + 1)
}

/// toml's errors draw the line with a caret over several lines: keep them
/// readable in one log line.
fn one_line(e: &str) -> String {
    e.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(": ")
}

/// Checks that no two disks share a name, socket or overlay, and that
/// image= disks have a store.
pub fn check_disks<'a>(disks: impl IntoIterator<Item = &'a DiskSpec>) -> Result<(), ConfigError> {
    let (mut names, mut sockets, mut overlays) = (HashSet::new(), HashSet::new(), HashSet::new());
    for d in disks {
        if !names.insert(&d.name) {
            return Err(ConfigError::SameName(d.name.clone()));
        }
        if !sockets.insert(&d.socket) {
            return Err(ConfigError::SameSocket(d.socket.clone()));
        }
        if !overlays.insert(&d.overlay) {
            return Err(ConfigError::SameOverlay(d.overlay.clone()));
        }
    }
    Ok(())
}

/// True if the disk needs an image store.
pub fn needs_store(d: &DiskSpec) -> bool {
    matches!(d.source, DiskSource::Image(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# streamblk
store = "/srv/store"
cache-dir = "/var/cache/sb"
fill-rate = 20.5
fetch-concurrency = 4

[[disk]]
name = "vm1"
socket = "/run/streamblk/vm1.sock"
overlay = "/var/lib/streamblk/vm1"
image = "debian"
queues = 2
readonly = true

[[disk]]
name = "vm2"
socket = "/run/streamblk/vm2.sock"
overlay = "/var/lib/streamblk/vm2"
base = "/images/b.raw"
"#;

    #[test]
    fn config_file_gives_options_and_disks() {
        let c = ConfigFile::parse(Path::new("f.toml"), FILE).unwrap();
        assert_eq!(c.options.store.as_deref(), Some("/srv/store"));
        assert_eq!(c.options.fill_rate, Some(FillRate::Cap(20.5)));
        assert_eq!(c.options.fetch_concurrency, Some(4));
        assert_eq!(c.disks.len(), 2);
        let want: DiskSpec =
            "name=vm1,socket=/run/streamblk/vm1.sock,overlay=/var/lib/streamblk/vm1,image=debian,queues=2,readonly"
                .parse()
                .unwrap();
        assert_eq!(c.disks[0], want);
        assert_eq!(c.disks[1].source, DiskSource::Base("/images/b.raw".into()));
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../packaging/streamblk.toml");
        let c = ConfigFile::parse(Path::new("streamblk.toml"), text).unwrap();
        assert_eq!(c.disks.len(), 2);
        check_disks(&c.disks).unwrap();
        Settings::try_from(&c.options).unwrap();
    }

    #[test]
    fn config_errors_name_the_key_and_line() {
        let e = ConfigFile::parse(Path::new("f.toml"), "store = \"s\"\ncolour = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("colour"), "{e}");
        let bad_disk = FILE.replace("queues = 2", "queues = 2\ncolour = \"red\"");
        let e = ConfigFile::parse(Path::new("f.toml"), &bad_disk)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 13") && e.contains("colour"), "{e}");
        let bad_queues = FILE.replace("queues = 2", "queues = 0");
        let e = ConfigFile::parse(Path::new("f.toml"), &bad_queues)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 12") && e.contains("queues"), "{e}");
        let e = ConfigFile::parse(Path::new("f.toml"), "fill-rate = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("fill-rate"), "{e}");
        let e = ConfigFile::parse(Path::new("f.toml"), "store = [\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn command_line_overrides_the_file() {
        let file = ConfigFile::parse(Path::new("f.toml"), FILE).unwrap().options;
        let cli = Options {
            fill_rate: Some(FillRate::Cap(1.0)),
            control_socket: Some("/tmp/c.sock".into()),
            ..Options::default()
        };
        let s = Settings::try_from(&file.overridden_by(&cli)).unwrap();
        assert_eq!(s.fetch.fill_rate, Some(1_000_000));
        // auto is the default, and a value of the file too.
        let d = Settings::try_from(&Options::default()).unwrap();
        assert_eq!((d.fetch.fill_rate, d.fetch.background_fill), (None, true));
        let auto = ConfigFile::parse(Path::new("f.toml"), "fill-rate = \"auto\"\n").unwrap();
        assert_eq!(auto.options.fill_rate, Some(FillRate::Auto));
        let off = Settings::try_from(&Options {
            fill_rate: Some(FillRate::Cap(0.0)),
            ..Options::default()
        })
        .unwrap();
        assert!(!off.fetch.background_fill);
        assert_eq!(s.fetch.concurrency, 4);
        assert_eq!(s.store.as_deref(), Some("/srv/store"));
        assert_eq!(s.control_socket, PathBuf::from("/tmp/c.sock"));
        assert_eq!(s.cache_dir, PathBuf::from("/var/cache/sb"));
    }

    #[test]
    fn learning_is_on_after_one_boot_by_default_and_its_keys_parse() {
        let d = Settings::try_from(&Options::default()).unwrap();
        assert_eq!(d.learn.boots, 1);
        assert_eq!(d.learn.window, Duration::from_secs(120));
        assert!(!d.learn.publish);
        let f = ConfigFile::parse(
            Path::new("f.toml"),
            "learn-boots = 3\nlearn-secs = 2.5\npublish-profiles = true\n",
        )
        .unwrap();
        let s = Settings::try_from(&f.options).unwrap();
        assert_eq!(
            (s.learn.boots, s.learn.window, s.learn.publish),
            (3, Duration::from_millis(2500), true)
        );
        let off = Settings::try_from(&Options {
            learn_boots: Some(0),
            ..Options::default()
        })
        .unwrap();
        assert_eq!(off.learn.boots, 0);
        for bad in ["learn-secs = 0\n", "learn-boots = -1\n", "publish-profiles = 1\n"] {
            let r = ConfigFile::parse(Path::new("f.toml"), bad).and_then(|f| Settings::try_from(&f.options));
            assert!(r.is_err(), "{bad}");
        }
        assert_eq!(
            f.options.changed_keys(&Options::default()),
            vec!["learn-boots", "learn-secs", "publish-profiles"]
        );
    }

    #[test]
    fn settings_refuse_bad_values() {
        for (o, why) in [
            (
                Options {
                    fetch_concurrency: Some(0),
                    ..Default::default()
                },
                "fetch-concurrency",
            ),
            (
                Options {
                    fill_rate: Some(FillRate::Cap(-1.0)),
                    ..Default::default()
                },
                "fill-rate",
            ),
            (
                Options {
                    fetch_timeout: Some(0.0),
                    ..Default::default()
                },
                "fetch-timeout",
            ),
        ] {
            let e = Settings::try_from(&o).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn p2p_keys_parse_and_a_fleet_needs_its_token() {
        let f = ConfigFile::parse(
            Path::new("f.toml"),
            "p2p-listen = \"127.0.0.1:7000\"\npeers = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]\n\
             peers-file = \"/etc/streamblk/peers\"\np2p-token-file = \"/etc/streamblk/token\"\n\
             p2p-upload-rate = 50\np2p-upload-slots = 2\n",
        )
        .unwrap();
        let p = Settings::try_from(&f.options).unwrap().p2p.unwrap();
        assert_eq!(p.listen, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(p.peers.len(), 2);
        assert_eq!(p.peers_file.as_deref(), Some(Path::new("/etc/streamblk/peers")));
        assert_eq!((p.upload_rate, p.upload_slots), (Some(50_000_000), 2));
        // A string, as on the command line.
        let one = ConfigFile::parse(Path::new("f.toml"), "peers = \"127.0.0.1:1,127.0.0.1:2\"\n").unwrap();
        assert_eq!(one.options.peers.unwrap().0.len(), 2);
        let e = ConfigFile::parse(Path::new("f.toml"), "peers = \"nohost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("peers") && e.contains("line 1"), "{e}");
        // No P2P option: no P2P.
        assert!(Settings::try_from(&Options::default()).unwrap().p2p.is_none());
        let e = Settings::try_from(&Options {
            p2p_listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Options::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("p2p-token-file"), "{e}");
        for listen in ["0.0.0.0:7000", "[::]:7000", "127.0.0.1:0"] {
            let e = Settings::try_from(&Options {
                p2p_listen: Some(listen.parse().unwrap()),
                p2p_token_file: Some("t".into()),
                ..Options::default()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("p2p-listen"), "{listen}: {e}");
        }
        for bad in ["p2p-upload-slots = 0\n", "p2p-upload-rate = -1\n"] {
            let text = format!("{bad}peers = \"127.0.0.1:1\"\np2p-token-file = \"t\"\n");
            let r = ConfigFile::parse(Path::new("f.toml"), &text).and_then(|f| Settings::try_from(&f.options));
            assert!(r.is_err(), "{bad}");
        }
    }

    #[test]
    fn membership_in_etcd_takes_a_zone_and_refuses_a_static_list_too() {
        let text = "membership = \"etcd://127.0.0.1:2379/fleet\"\nzone = \"a\"\np2p-listen = \"127.0.0.1:7000\"\n\
                    p2p-token-file = \"t\"\n";
        let f = ConfigFile::parse(Path::new("f.toml"), text).unwrap();
        let p = Settings::try_from(&f.options).unwrap().p2p.unwrap();
        assert_eq!(p.membership.unwrap().to_string(), "etcd://127.0.0.1:2379/fleet");
        assert_eq!(p.zone.unwrap().as_str(), "a");
        for extra in ["peers = \"127.0.0.1:1\"\n", "peers-file = \"/etc/streamblk/peers\"\n"] {
            let f = ConfigFile::parse(Path::new("f.toml"), &format!("{text}{extra}")).unwrap();
            let e = Settings::try_from(&f.options).unwrap_err().to_string();
            assert!(e.contains("--membership") && e.contains("not both"), "{e}");
        }
        for bad in [
            "membership = \"etcd://127.0.0.1:2379\"\n",
            "membership = \"http://h:1/p\"\n",
            "zone = \"a b\"\n",
        ] {
            let e = ConfigFile::parse(Path::new("f.toml"), bad).unwrap_err().to_string();
            assert!(e.contains("line 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn disks_may_not_share_sockets_or_overlays() {
        let d = |s: &str| s.parse::<DiskSpec>().unwrap();
        let e = check_disks(&[
            d("name=a,socket=s,overlay=o1,base=b"),
            d("name=b,socket=s,overlay=o2,base=b"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("socket"), "{e}");
        let e = check_disks(&[
            d("name=a,socket=s1,overlay=o,base=b"),
            d("name=b,socket=s2,overlay=o,base=b"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("own"), "{e}");
        let e = check_disks(&[
            d("name=a,socket=s1,overlay=o1,base=b"),
            d("name=a,socket=s2,overlay=o2,base=b"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("named a"), "{e}");
        check_disks(&[
            d("name=a,socket=s1,overlay=o1,base=b"),
            d("name=b,socket=s2,overlay=o2,base=b"),
        ])
        .unwrap();
    }
}
