//! The membership view: the fleet's members (and their zones) in force,
//! which the HRW ranking of the client and server reads, whatever keeps it.
//! A static source fills it from the peers given on the command line
//! (`--peers`) and in a file (`--peers-file`, re-read on SIGHUP); the etcd
//! task (`etcd`) replaces it as etcd's keys change. The list may name this
//! host itself, recognised by its `--p2p-listen` address; every host should
//! get the same list, so that they agree on each chunk's home. This module
//! does not talk to etcd.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::Error;

/// Most members a list may hold: ranking a chunk's candidates hashes every
/// member, and a static list is meant for up to about a thousand hosts.
pub const MAX_MEMBERS: usize = 4096;
/// Largest peers file read.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest zone name.
const MAX_ZONE: usize = 64;

/// A zone (`--zone`, `zone=` in a peers file, `zone` in etcd): homes are
/// chosen among the members of the requester's zone first. 1 to 64 ASCII
/// letters, digits, `.`, `_` or `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Zone(String);

impl Zone {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Zone {
    type Err = String;

    fn from_str(s: &str) -> Result<Zone, String> {
        let ok =
            !s.is_empty() && s.len() <= MAX_ZONE && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(Zone(s.to_string()))
        } else {
            Err(format!(
                "zone {:?} is not 1 to {MAX_ZONE} letters, digits, '.', '_' or '-'",
                s.chars().take(80).collect::<String>()
            ))
        }
    }
}

impl<'de> serde::Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One member: where peers reach it, and its zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub addr: SocketAddr,
    pub zone: Option<Zone>,
}

impl From<SocketAddr> for Member {
    fn from(addr: SocketAddr) -> Member {
        Member { addr, zone: None }
    }
}

/// One view of the fleet: the members sorted, each once, and their zones.
#[derive(Debug, Default)]
pub struct View {
    addrs: Arc<Vec<SocketAddr>>,
    zones: HashMap<SocketAddr, Zone>,
}

impl View {
    /// The view of `members`; an address listed twice keeps its last zone.
    pub fn new(members: impl IntoIterator<Item = Member>) -> Result<View, Error> {
        let mut zones = HashMap::new();
        let mut addrs = Vec::new();
        for m in members {
            addrs.push(m.addr);
            match m.zone {
                Some(z) => zones.insert(m.addr, z),
                None => zones.remove(&m.addr),
            };
        }
        addrs.sort();
        addrs.dedup();
        if addrs.len() > MAX_MEMBERS {
            return Err(Error::TooManyMembers(addrs.len()));
        }
        Ok(View {
            addrs: Arc::new(addrs),
            zones,
        })
    }

    pub fn addrs(&self) -> &Arc<Vec<SocketAddr>> {
        &self.addrs
    }

    pub fn zone(&self, member: &SocketAddr) -> Option<&Zone> {
        self.zones.get(member)
    }

    fn same(&self, other: &View) -> bool {
        self.addrs == other.addrs && self.zones == other.zones
    }
}

/// Where the view comes from.
#[derive(Debug)]
enum Source {
    Static {
        listed: Vec<Member>,
        file: Option<PathBuf>,
    },
    /// Kept up to date by the etcd task; `name` is its URL, for status.
    Etcd {
        name: String,
    },
}

/// The members in force, and this host.
pub struct Membership {
    source: Source,
    self_addr: Option<SocketAddr>,
    self_zone: Option<Zone>,
    current: RwLock<Arc<View>>,
    /// Times the view changed after the first.
    changes: AtomicU64,
    /// The etcd task holds a live session (always false for a static list).
    connected: AtomicBool,
}

impl Membership {
    /// The members of `listed` and of `file` (read now), without zones
    /// but those the file gives.
    #[cfg(test)]
    pub fn new(listed: Vec<SocketAddr>, file: Option<PathBuf>, self_addr: Option<SocketAddr>) -> Result<Self, Error> {
        Self::with_zone(listed.into_iter().map(Member::from).collect(), file, self_addr, None)
    }

    /// A static list, this host in `self_zone`.
    pub fn with_zone(
        listed: Vec<Member>,
        file: Option<PathBuf>,
        self_addr: Option<SocketAddr>,
        self_zone: Option<Zone>,
    ) -> Result<Self, Error> {
        let m = Membership {
            source: Source::Static { listed, file },
            self_addr,
            self_zone,
            current: RwLock::new(Arc::default()),
            changes: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        };
        m.reload()?;
        m.changes.store(0, Ordering::Relaxed);
        Ok(m)
    }

    /// A view that the etcd task at `name` keeps; until it reads etcd, this
    /// host alone (if it listens): the store is always a source.
    pub fn dynamic(name: String, self_addr: Option<SocketAddr>, self_zone: Option<Zone>) -> Self {
        let me = self_addr.map(|addr| Member {
            addr,
            zone: self_zone.clone(),
        });
        let view = View::new(me).expect("one member is under the cap");
        Membership {
            source: Source::Etcd { name },
            self_addr,
            self_zone,
            current: RwLock::new(Arc::new(view)),
            changes: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    /// Re-reads the peers file; on an error the members stay as they were.
    /// Returns the number of members. A view kept by etcd is left alone.
    pub fn reload(&self) -> Result<usize, Error> {
        let Source::Static { listed, file } = &self.source else {
            return Ok(self.members().len());
        };
        let mut all = listed.clone();
        if let Some(path) = file {
            all.extend(read_file(path)?);
        }
        self.set(all)
    }

    /// Replaces the view (the etcd task, or a reload); counts a change if
    /// it differs. Returns the number of members.
    pub fn set(&self, members: Vec<Member>) -> Result<usize, Error> {
        let view = View::new(members)?;
        let n = view.addrs.len();
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if !current.same(&view) {
            self.changes.fetch_add(1, Ordering::Relaxed);
            *current = Arc::new(view);
        }
        Ok(n)
    }

    pub fn members(&self) -> Arc<Vec<SocketAddr>> {
        self.view().addrs.clone()
    }

    pub fn view(&self) -> Arc<View> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// This host's address as members know it (its `--p2p-listen`).
    pub fn self_addr(&self) -> Option<SocketAddr> {
        self.self_addr
    }

    /// This host's zone (`--zone`).
    pub fn self_zone(&self) -> Option<&Zone> {
        self.self_zone.as_ref()
    }

    pub fn file(&self) -> Option<&Path> {
        match &self.source {
            Source::Static { file, .. } => file.as_deref(),
            Source::Etcd { .. } => None,
        }
    }

    /// `static`, or the etcd URL the view follows.
    pub fn source_name(&self) -> String {
        match &self.source {
            Source::Static { .. } => "static".into(),
            Source::Etcd { name } => name.clone(),
        }
    }

    pub fn is_etcd(&self) -> bool {
        matches!(self.source, Source::Etcd { .. })
    }

    /// Times the view changed since the start.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }
}

/// Parses `ADDR:PORT,ADDR:PORT,...` (spaces around entries allowed).
pub fn parse_list(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().map_err(|_| format!("{p:?} is not ADDR:PORT")))
        .collect()
}

/// One `ADDR:PORT [zone=NAME]` a line; `#` starts a comment; blank lines
/// are skipped.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Member>, Error> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let entry = line.split('#').next().unwrap_or("").trim();
            (!entry.is_empty()).then_some((i + 1, entry))
        })
        .map(|(line, entry)| {
            parse_entry(entry).map_err(|why| Error::PeersFile {
                path: path.to_path_buf(),
                line,
                why,
            })
        })
        .collect()
}

fn parse_entry(entry: &str) -> Result<Member, String> {
    let mut words = entry.split_whitespace();
    let first = words.next().unwrap_or("");
    let addr = first.parse().map_err(|_| format!("{first:?} is not ADDR:PORT"))?;
    let mut zone = None;
    for w in words {
        match w.strip_prefix("zone=") {
            Some(z) if zone.is_none() => zone = Some(z.parse()?),
            _ => return Err(format!("{w:?}: expected one zone=NAME after the address")),
        }
    }
    Ok(Member { addr, zone })
}

fn read_file(path: &Path) -> Result<Vec<Member>, Error> {
    let read_err = |e| Error::ReadPeersFile(path.to_path_buf(), e);
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(Error::PeersFile {
            path: path.to_path_buf(),
            line: 0,
            why: format!("{len} bytes, more than {MAX_FILE_BYTES}"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse_file(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_files_parse_and_name_the_bad_line() {
        assert_eq!(
            parse_list("127.0.0.1:1, 127.0.0.1:2,").unwrap(),
            vec![
                "127.0.0.1:1".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ]
        );
        assert!(parse_list("127.0.0.1").is_err());
        assert!(parse_list("host.example:80").is_err());
        let p = Path::new("peers");
        let got = parse_file(p, "# fleet\n10.0.0.1:7000\n\n [::1]:7000  # me\n").unwrap();
        assert_eq!(got.len(), 2);
        let e = parse_file(p, "10.0.0.1:7000\nnope\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("nope"), "{e}");
    }

    #[test]
    fn reload_reads_the_file_again_and_keeps_the_old_list_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("peers");
        std::fs::write(&file, "127.0.0.1:2\n127.0.0.1:1\n").unwrap();
        let listed = vec!["127.0.0.1:1".parse().unwrap()];
        let m = Membership::new(listed, Some(file.clone()), None).unwrap();
        assert_eq!(m.members().len(), 2, "duplicates count once");
        std::fs::write(&file, "127.0.0.1:3\n").unwrap();
        assert_eq!(m.reload().unwrap(), 2);
        assert!(m.members().contains(&"127.0.0.1:3".parse().unwrap()));
        std::fs::write(&file, "garbage\n").unwrap();
        assert!(m.reload().is_err());
        assert_eq!(m.members().len(), 2, "a bad file changed the members");
    }

    #[test]
    fn peers_file_entries_take_an_optional_zone_and_bad_zones_name_the_line() {
        let p = Path::new("peers");
        let got = parse_file(p, "10.0.0.1:7000 zone=a\n10.0.0.2:7000\n10.0.0.3:7000  zone=b-2 # c\n").unwrap();
        let zones: Vec<Option<&str>> = got.iter().map(|m| m.zone.as_ref().map(Zone::as_str)).collect();
        assert_eq!(zones, [Some("a"), None, Some("b-2")]);
        for bad in [
            "10.0.0.1:7000 zone=",
            "10.0.0.1:7000 zone=a zone=b",
            "10.0.0.1:7000 a",
            "10.0.0.1:7000 zone=a/b",
        ] {
            let e = parse_file(p, &format!("10.0.0.9:1\n{bad}\n")).unwrap_err().to_string();
            assert!(e.contains("line 2"), "{bad}: {e}");
        }
        assert!("x".repeat(65).parse::<Zone>().is_err());
    }

    #[test]
    fn a_view_set_again_counts_a_change_only_when_it_differs() {
        let me: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let m = Membership::dynamic("etcd://x/p".into(), Some(me), Some("a".parse().unwrap()));
        assert_eq!(*m.members(), vec![me], "a dynamic view starts with this host alone");
        assert_eq!(m.view().zone(&me).map(Zone::as_str), Some("a"));
        let two = || {
            vec![
                Member::from(me),
                Member {
                    addr: "127.0.0.1:2".parse().unwrap(),
                    zone: Some("b".parse().unwrap()),
                },
            ]
        };
        assert_eq!(m.set(two()).unwrap(), 2);
        assert_eq!(m.set(two()).unwrap(), 2);
        assert_eq!(m.changes(), 1);
        assert_eq!(m.view().zone(&me), None, "the new view's zone for this host is kept");
        let many = (0..=MAX_MEMBERS as u16).map(|i| Member::from(SocketAddr::from(([10, 0, 0, 1], i))));
        assert!(m.set(many.collect()).is_err());
        assert_eq!(m.members().len(), 2, "a view over the cap replaced the old one");
        assert_eq!(m.reload().unwrap(), 2, "reload touched a view kept by etcd");
    }
}
