//! Fleet membership kept in etcd (`--membership etcd://HOST:PORT,.../PREFIX`).
//! Each daemon holds a leased key `<PREFIX>/members/<its --p2p-listen>`
//! whose value is `{"addr", "zone", "load"}`, keeps the lease alive, and
//! watches the prefix, replacing the [`Membership`] view as members come
//! and go (a dead member's key goes when its lease expires; a member that
//! leaves revokes its lease, so it goes at once). etcd being unreachable
//! never stops the daemon: it keeps its last view (the store is always a
//! source), logs once per change of state, and reconnects with backoff,
//! granting a new lease and reading the prefix again. Other members'
//! values are untrusted: a malformed one is ignored with a warning. This
//! module owns the etcd session only; the HRW ranking reads `Membership`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use super::lock;
use super::membership::{Member, Membership, Zone, MAX_MEMBERS};

/// A member's key lives this long (seconds) after its last keep-alive: how
/// long a dead member stays in the views.
pub const LEASE_TTL: i64 = 10;
/// Keep-alives go this often (a third of the TTL: two may be lost).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(3);
/// This host's load is looked at this often and put when it changed.
const LOAD_EVERY: Duration = Duration::from_secs(3);
/// Longest wait for one etcd call; a connection idle this long is probed.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long leaving (revoking the lease) may hold up a shutdown.
const LEAVE_WAIT: Duration = Duration::from_secs(3);
/// Largest member value accepted.
const MAX_VALUE_BYTES: usize = 1024;
const MAX_ENDPOINTS: usize = 16;
const MAX_PREFIX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to etcd")]
    Connect(#[source] etcd_client::Error),
    #[error("grant this host's lease")]
    Grant(#[source] etcd_client::Error),
    #[error("put this host's key")]
    Put(#[source] etcd_client::Error),
    #[error("read the members")]
    Get(#[source] etcd_client::Error),
    #[error("watch the members")]
    Watch(#[source] etcd_client::Error),
    #[error("keep this host's lease alive")]
    KeepAlive(#[source] etcd_client::Error),
    #[error("this host's lease expired")]
    LeaseExpired,
    #[error("the {0} stream ended")]
    Ended(&'static str),
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    #[error("etcd did not answer within {RPC_TIMEOUT:?} ({0})")]
    TimedOut(&'static str),
}

/// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    endpoints: Vec<String>,
    /// `/PREFIX`, without a trailing slash.
    prefix: String,
}

impl EtcdUrl {
    /// Where the members' keys are: `<PREFIX>/members/`.
    pub fn members_prefix(&self) -> String {
        format!("{}/members/", self.prefix)
    }

    pub fn key(&self, addr: SocketAddr) -> String {
        format!("{}{addr}", self.members_prefix())
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self.endpoints.iter().map(|e| &e["http://".len()..]).collect();
        write!(f, "etcd://{}{}", hosts.join(","), self.prefix)
    }
}

impl std::str::FromStr for EtcdUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<EtcdUrl, String> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or("must be etcd://HOST:PORT[,HOST:PORT...]/PREFIX")?;
        let (hosts, prefix) = rest.split_once('/').ok_or("has no /PREFIX after the hosts")?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() || prefix.len() > MAX_PREFIX {
            return Err(format!(
                "needs a PREFIX of 1 to {MAX_PREFIX} characters after the hosts"
            ));
        }
        if !prefix.bytes().all(|b| b.is_ascii_graphic()) || prefix.contains("//") {
            return Err("PREFIX must be visible ASCII without empty path segments".into());
        }
        let endpoints = hosts
            .split(',')
            .map(|h| {
                let (host, port) = h.rsplit_once(':').ok_or(format!("{h:?} is not HOST:PORT"))?;
                let host_ok = !host.is_empty()
                    && (host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b))
                        || (host.starts_with('[')
                            && host.ends_with(']')
                            && host[1..host.len() - 1].parse::<std::net::Ipv6Addr>().is_ok()));
                if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("{h:?} is not HOST:PORT"));
                }
                Ok(format!("http://{h}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(format!("more than {MAX_ENDPOINTS} hosts"));
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }
}

impl<'de> Deserialize<'de> for EtcdUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A member's value in etcd.
#[derive(Debug, Serialize, Deserialize)]
struct Value {
    addr: String,
    #[serde(default)]
    zone: Option<String>,
    /// The member's upload queue depth when it last put its value.
    #[serde(default)]
    load: u64,
}

fn encode(addr: SocketAddr, zone: Option<&Zone>, load: u64) -> String {
    let v = Value {
        addr: addr.to_string(),
        zone: zone.map(|z| z.to_string()),
        load,
    };
    serde_json::to_string(&v).expect("a value serializes")
}

/// The member a key and its value name. The key must end in the address
/// the value gives, so one member cannot speak for another's key.
fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Result<Member, String> {
    let name = key
        .strip_prefix(prefix.as_bytes())
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or("the key is not a member's")?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("{} bytes, more than {MAX_VALUE_BYTES}", value.len()));
    }
    let v: Value = serde_json::from_slice(value).map_err(|e| format!("not a member's JSON value: {e}"))?;
    let addr: SocketAddr = v
        .addr
        .parse()
        .map_err(|_| format!("addr {:?} is not ADDR:PORT", v.addr))?;
    if addr.to_string() != name || addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!("addr {addr} is not the key's, or not one peers can reach"));
    }
    let zone = v.zone.map(|z| z.parse()).transpose()?;
    Ok(Member { addr, zone })
}

/// This host as it registers: its address, zone, and current load.
pub struct Registration {
    pub addr: SocketAddr,
    pub zone: Option<Zone>,
    pub load: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// The etcd task of a daemon.
pub struct Etcd {
    leave: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Etcd {
    /// Starts following `url` on `runtime`, registering `me` if given.
    pub fn start(
        url: EtcdUrl,
        membership: Arc<Membership>,
        me: Option<Registration>,
        runtime: &tokio::runtime::Handle,
    ) -> Etcd {
        let (leave, rx) = tokio::sync::watch::channel(false);
        let task = runtime.spawn(run(url, membership, me, rx));
        Etcd {
            leave,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Leaves the fleet: revokes this host's lease, so the others drop it
    /// at once (bounded: a down etcd lets the lease expire instead).
    pub async fn leave(&self) {
        let _ = self.leave.send(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if tokio::time::timeout(LEAVE_WAIT, task).await.is_err() {
                tracing::warn!("etcd: could not revoke this host's lease in time; it expires in {LEASE_TTL} s");
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Sessions, one after another with backoff, until told to leave.
async fn run(
    url: EtcdUrl,
    membership: Arc<Membership>,
    me: Option<Registration>,
    mut leave: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_FIRST;
    // Logged once per change of state, not once per attempt.
    let mut down_logged = false;
    loop {
        let mut up = false;
        let r = session(&url, &membership, me.as_ref(), &mut leave, || {
            up = true;
        })
        .await;
        membership.set_connected(false);
        if up {
            backoff = BACKOFF_FIRST;
            down_logged = false;
        }
        match r {
            Ok(()) => return,
            Err(e) if !down_logged => {
                down_logged = true;
                tracing::warn!(
                    etcd = %url,
                    members = membership.members().len(),
                    "etcd unreachable, keeping the last membership view and retrying: {}",
                    crate::DisplayChain(&e)
                );
            }
            Err(e) => tracing::debug!(etcd = %url, "etcd still unreachable: {}", crate::DisplayChain(&e)),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = leave.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Bounds one etcd call.
async fn bounded<T>(what: &'static str, f: impl std::future::Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout(RPC_TIMEOUT, f)
        .await
        .map_err(|_| Error::TimedOut(what))
}

/// One session: register, read the members, follow them until an error
/// (`Err`) or until told to leave (`Ok`, the lease revoked).
async fn session(
    url: &EtcdUrl,
    membership: &Membership,
    me: Option<&Registration>,
    leave: &mut tokio::sync::watch::Receiver<bool>,
    on_up: impl FnOnce(),
) -> Result<(), Error> {
    if *leave.borrow_and_update() {
        return Ok(());
    }
    let options = ConnectOptions::new()
        .with_connect_timeout(RPC_TIMEOUT)
        .with_timeout(RPC_TIMEOUT)
        .with_keep_alive(RPC_TIMEOUT, RPC_TIMEOUT);
    let mut client = bounded("connect", Client::connect(&url.endpoints, Some(options)))
        .await?
        .map_err(Error::Connect)?;
    let prefix = url.members_prefix();
    let mut lease = None;
    let mut load = 0;
    if let Some(me) = me {
        let id = bounded("lease grant", client.lease_grant(LEASE_TTL, None))
            .await?
            .map_err(Error::Grant)?
            .id();
        lease = Some(id);
        load = (me.load)();
        put(&mut client, url, me, id, load).await?;
    }
    let got = bounded(
        "get",
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?
    .map_err(Error::Get)?;
    let revision = got.header().map_or(0, |h| h.revision());
    let mut known = Known::default();
    for kv in got.kvs() {
        known.put(&prefix, kv.key(), kv.value());
    }
    // From the revision read on: no change between the read and the watch is lost.
    let watch_options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut watch = bounded("watch", client.watch(prefix.as_str(), Some(watch_options)))
        .await?
        .map_err(Error::Watch)?;
    let mut keeper = match lease {
        Some(id) => Some(
            bounded("lease keep-alive", client.lease_keep_alive(id))
                .await?
                .map_err(Error::KeepAlive)?,
        ),
        None => None,
    };
    known.publish(membership, me);
    membership.set_connected(true);
    on_up();
    tracing::info!(etcd = %url, members = membership.members().len(), "etcd connected, following the membership");

    let mut keep_tick = tokio::time::interval(KEEPALIVE_EVERY);
    let mut load_tick = tokio::time::interval(LOAD_EVERY);
    let ended = loop {
        tokio::select! {
            _ = leave.changed() => break Ok(()),
            _ = keep_tick.tick(), if keeper.is_some() => {
                if let Some((k, _)) = &mut keeper {
                    if let Err(e) = bounded("keep-alive", k.keep_alive()).await? {
                        break Err(Error::KeepAlive(e));
                    }
                }
            }
            answer = keep_alive_answer(&mut keeper) => match answer {
                Ok(Some(a)) if a.ttl() > 0 => {}
                Ok(Some(_)) => break Err(Error::LeaseExpired),
                Ok(None) => break Err(Error::Ended("keep-alive")),
                Err(e) => break Err(Error::KeepAlive(e)),
            },
            _ = load_tick.tick(), if me.is_some() => {
                if let (Some(me), Some(id)) = (me, lease) {
                    let now = (me.load)();
                    if now != load {
                        put(&mut client, url, me, id, now).await?;
                        load = now;
                    }
                }
            }
            event = watch.message() => match event {
                Ok(Some(w)) if w.canceled() => break Err(Error::Cancelled(w.cancel_reason().chars().take(200).collect())),
                Ok(Some(w)) => {
                    for e in w.events() {
                        let Some(kv) = e.kv() else { continue };
                        match e.event_type() {
                            EventType::Put => known.put(&prefix, kv.key(), kv.value()),
                            EventType::Delete => known.delete(kv.key()),
                        }
                    }
                    known.publish(membership, me);
                }
                Ok(None) => break Err(Error::Ended("watch")),
                Err(e) => break Err(Error::Watch(e)),
            },
        }
    };
    if let (Ok(()), Some(id)) = (&ended, lease) {
        match bounded("lease revoke", client.lease_revoke(id)).await {
            Ok(Ok(_)) => tracing::info!(etcd = %url, "left the fleet: lease revoked"),
            Ok(Err(e)) => {
                tracing::warn!(etcd = %url, "could not revoke this host's lease: {}", crate::DisplayChain(&e))
            }
            Err(e) => tracing::warn!(etcd = %url, "{e}"),
        }
    }
    ended
}

async fn put(client: &mut Client, url: &EtcdUrl, me: &Registration, lease: i64, load: u64) -> Result<(), Error> {
    let value = encode(me.addr, me.zone.as_ref(), load);
    bounded(
        "put",
        client.put(url.key(me.addr), value, Some(PutOptions::new().with_lease(lease))),
    )
    .await?
    .map_err(Error::Put)?;
    Ok(())
}

/// The next keep-alive answer; never, without a lease.
async fn keep_alive_answer(
    keeper: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
) -> Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error> {
    match keeper {
        Some((_, stream)) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// The members' keys as read and watched: each valid one's member.
#[derive(Default)]
struct Known {
    members: BTreeMap<Vec<u8>, Member>,
    /// Warned this session that there are more keys than MAX_MEMBERS.
    warned_full: bool,
}

impl Known {
    fn put(&mut self, prefix: &str, key: &[u8], value: &[u8]) {
        match decode(prefix, key, value) {
            Ok(m) => {
                if self.members.len() >= MAX_MEMBERS && !self.members.contains_key(key) {
                    if !std::mem::replace(&mut self.warned_full, true) {
                        tracing::warn!("etcd names more than {MAX_MEMBERS} members; the others are ignored");
                    }
                    return;
                }
                self.members.insert(key.to_vec(), m);
            }
            Err(why) => {
                // Untrusted input: a bad key drops out of the view.
                self.members.remove(key);
                let key: String = String::from_utf8_lossy(key).chars().take(200).collect();
                tracing::warn!(key, "ignored a malformed member in etcd: {why}");
            }
        }
    }

    fn delete(&mut self, key: &[u8]) {
        self.members.remove(key);
    }

    /// The view: the members known, this host always among them.
    fn publish(&self, membership: &Membership, me: Option<&Registration>) {
        let mut v: Vec<Member> = self.members.values().cloned().collect();
        if let Some(me) = me {
            if !v.iter().any(|m| m.addr == me.addr) {
                if v.len() >= MAX_MEMBERS {
                    v.pop();
                }
                v.push(Member {
                    addr: me.addr,
                    zone: me.zone.clone(),
                });
            }
        }
        let before = membership.members().len();
        match membership.set(v) {
            Ok(n) if n != before => tracing::info!(members = n, "membership changed"),
            Ok(_) => {}
            Err(e) => tracing::warn!("membership from etcd not applied: {}", crate::DisplayChain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_urls_parse_and_malformed_ones_say_why() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379,etcd.example:2379,[::1]:2379/fleet/a/"
            .parse()
            .unwrap();
        assert_eq!(u.endpoints.len(), 3);
        assert_eq!(u.members_prefix(), "/fleet/a/members/");
        assert_eq!(
            u.key("10.0.0.1:7000".parse().unwrap()),
            "/fleet/a/members/10.0.0.1:7000"
        );
        assert_eq!(
            u.to_string(),
            "etcd://127.0.0.1:2379,etcd.example:2379,[::1]:2379/fleet/a"
        );
        for bad in [
            "http://127.0.0.1:2379/p",
            "etcd://127.0.0.1:2379",
            "etcd://127.0.0.1:2379/",
            "etcd://127.0.0.1/p",
            "etcd://127.0.0.1:0/p",
            "etcd://a b:1/p",
            "etcd://,/p",
            "etcd://h:1/a//b",
            "etcd://h:1/a b",
        ] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn member_values_are_checked_against_their_key() {
        let p = "/f/members/";
        let v = encode("10.0.0.1:7000".parse().unwrap(), Some(&"a".parse().unwrap()), 3);
        let m = decode(p, b"/f/members/10.0.0.1:7000", v.as_bytes()).unwrap();
        assert_eq!(m.addr, "10.0.0.1:7000".parse().unwrap());
        assert_eq!(m.zone.unwrap().as_str(), "a");
        let no_zone = decode(p, b"/f/members/10.0.0.2:1", br#"{"addr":"10.0.0.2:1"}"#).unwrap();
        assert_eq!(no_zone.zone, None);
        for (key, value) in [
            (&b"/f/members/10.0.0.9:7000"[..], v.as_bytes()),
            (b"/f/members/10.0.0.1:7000", b"{"),
            (b"/f/members/10.0.0.1:7000", br#"{"addr":"10.0.0.1:7000","zone":"a b"}"#),
            (b"/f/members/10.0.0.1:7000", br#"{"addr":"10.0.0.1:7000","load":-1}"#),
            (b"/f/members/0.0.0.0:7000", br#"{"addr":"0.0.0.0:7000"}"#),
            (b"/other/10.0.0.1:7000", v.as_bytes()),
        ] {
            assert!(decode(p, key, value).is_err(), "{}", String::from_utf8_lossy(value));
        }
        let big = format!(r#"{{"addr":"10.0.0.1:7000","pad":"{}"}}"#, "x".repeat(2000));
        assert!(decode(p, b"/f/members/10.0.0.1:7000", big.as_bytes()).is_err());
    }

    #[test]
    fn a_malformed_put_drops_the_key_and_this_host_stays_in_the_view() {
        let p = "/f/members/";
        let me = Registration {
            addr: "10.0.0.5:1".parse().unwrap(),
            zone: None,
            load: Arc::new(|| 0),
        };
        let m = Membership::dynamic("etcd://h:1/f".into(), Some(me.addr), None);
        let mut k = Known::default();
        k.put(p, b"/f/members/10.0.0.1:1", br#"{"addr":"10.0.0.1:1"}"#);
        k.put(p, b"/f/members/10.0.0.2:1", br#"{"addr":"10.0.0.2:1"}"#);
        k.publish(&m, Some(&me));
        assert_eq!(m.members().len(), 3);
        k.put(p, b"/f/members/10.0.0.2:1", b"garbage");
        k.delete(b"/f/members/10.0.0.1:1");
        k.publish(&m, Some(&me));
        assert_eq!(*m.members(), vec![me.addr]);
    }
}
