//! Static membership: the peers given on the command line (`--peers`) and
//! in a file (`--peers-file`, re-read on SIGHUP). The list may name this
//! host itself, recognised by its `--p2p-listen` address; every host should
//! get the same list, so that they agree on each chunk's home.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::Error;

/// Most members a list may hold: ranking a chunk's candidates hashes every
/// member, and a static list is meant for up to about a thousand hosts.
pub const MAX_MEMBERS: usize = 4096;
/// Largest peers file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The members in force, sorted, each once.
pub struct Membership {
    listed: Vec<SocketAddr>,
    file: Option<PathBuf>,
    self_addr: Option<SocketAddr>,
    current: RwLock<Arc<Vec<SocketAddr>>>,
}

impl Membership {
    /// The members of `listed` and of `file` (read now).
    pub fn new(listed: Vec<SocketAddr>, file: Option<PathBuf>, self_addr: Option<SocketAddr>) -> Result<Self, Error> {
        let m = Membership {
            listed,
            file,
            self_addr,
            current: RwLock::new(Arc::default()),
        };
        m.reload()?;
        Ok(m)
    }

    /// Re-reads the peers file; on an error the members stay as they were.
    /// Returns the number of members.
    pub fn reload(&self) -> Result<usize, Error> {
        let mut all = self.listed.clone();
        if let Some(path) = &self.file {
            all.extend(read_file(path)?);
        }
        all.sort();
        all.dedup();
        if all.len() > MAX_MEMBERS {
            return Err(Error::TooManyMembers(all.len()));
        }
        let n = all.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(all);
        Ok(n)
    }

    pub fn members(&self) -> Arc<Vec<SocketAddr>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// This host's address as members know it (its `--p2p-listen`).
    pub fn self_addr(&self) -> Option<SocketAddr> {
        self.self_addr
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
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

/// One `ADDR:PORT` a line; `#` starts a comment; blank lines are skipped.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<SocketAddr>, Error> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let entry = line.split('#').next().unwrap_or("").trim();
            (!entry.is_empty()).then_some((i + 1, entry))
        })
        .map(|(line, entry)| {
            entry.parse().map_err(|_| Error::PeersFile {
                path: path.to_path_buf(),
                line,
                why: format!("{entry:?} is not ADDR:PORT"),
            })
        })
        .collect()
}

fn read_file(path: &Path) -> Result<Vec<SocketAddr>, Error> {
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
}
