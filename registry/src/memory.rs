//! In-process registry: the embedded single node (and tests of the contract).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::{NodeStatus, Registry, RegistryError};

#[derive(Default)]
struct State {
    nodes: HashMap<String, (NodeStatus, Instant)>,
    users: HashMap<String, HashMap<String, u64>>,
    /// Claimed one-time ids and when each may be forgotten.
    once: HashMap<String, Instant>,
    /// Per (channel, node): members (client -> user), until then.
    presence: HashMap<(String, String), PresenceEntry>,
    /// The backend's subscriptions (user, channel), until then.
    server_subs: HashMap<(String, String), Instant>,
    /// Per user: tokens issued before this are revoked, until then.
    revoked: HashMap<String, (u64, Instant)>,
    /// Per node: its channels with their local subscriber counts.
    channels: HashMap<String, Vec<(String, u64)>>,
}

/// One node's members of a channel (client -> user) and when they expire.
type PresenceEntry = (Vec<(String, String)>, Instant);

/// One-time ids held at most (a claim past it, with none expired, fails:
/// the credential is refused, never accepted twice).
const MAX_ONCE: usize = 100_000;

pub struct MemoryRegistry {
    ttl: Duration,
    state: Mutex<State>,
}

impl MemoryRegistry {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    fn alive(&self, s: &State, node: &str) -> bool {
        s.nodes
            .get(node)
            .is_some_and(|(_, at)| at.elapsed() <= self.ttl)
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn set_server_subscription(
        &self,
        user: &str,
        channel: &str,
        on: bool,
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        let key = (user.to_owned(), channel.to_owned());
        if !on {
            s.server_subs.remove(&key);
            return Ok(());
        }
        let now = Instant::now();
        if s.server_subs.len() >= MAX_ONCE {
            s.server_subs.retain(|_, until| *until > now);
            if s.server_subs.len() >= MAX_ONCE {
                return Err(RegistryError::Unavailable(
                    "too many server-side subscriptions".into(),
                ));
            }
        }
        s.server_subs.insert(key, now + ttl);
        Ok(())
    }

    async fn has_server_subscription(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<bool, RegistryError> {
        let s = self.state.lock();
        Ok(s.server_subs
            .get(&(user.to_owned(), channel.to_owned()))
            .is_some_and(|until| *until > Instant::now()))
    }

    async fn set_presence(
        &self,
        node: &str,
        channel: &str,
        members: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        let key = (channel.to_owned(), node.to_owned());
        if members.is_empty() {
            s.presence.remove(&key);
        } else {
            s.presence
                .insert(key, (members.to_vec(), Instant::now() + ttl));
        }
        Ok(())
    }

    async fn refresh_presence(
        &self,
        node: &str,
        channels: &[String],
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        for c in channels {
            if let Some(e) = s.presence.get_mut(&(c.clone(), node.to_owned())) {
                e.1 = Instant::now() + ttl;
            }
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<Vec<(String, String)>, RegistryError> {
        let s = self.state.lock();
        let now = Instant::now();
        Ok(s.presence
            .iter()
            .filter(|((c, node), (_, until))| c == channel && *until > now && self.alive(&s, node))
            .flat_map(|(_, (m, _))| m.iter().cloned())
            .collect())
    }

    async fn revoke(&self, user: &str, before: u64, ttl: Duration) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        let now = Instant::now();
        if s.revoked.len() >= MAX_ONCE {
            s.revoked.retain(|_, (_, until)| *until > now);
        }
        let e = s.revoked.entry(user.to_owned()).or_insert((0, now));
        if before >= e.0 {
            *e = (before, now + ttl);
        }
        Ok(())
    }

    async fn revoked_before(&self, user: &str) -> Result<Option<u64>, RegistryError> {
        let s = self.state.lock();
        Ok(s.revoked
            .get(user)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(before, _)| *before))
    }

    async fn set_channels(
        &self,
        node: &str,
        channels: &[(String, u64)],
    ) -> Result<(), RegistryError> {
        self.state
            .lock()
            .channels
            .insert(node.to_owned(), channels.to_vec());
        Ok(())
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let s = self.state.lock();
        let mut sum = std::collections::BTreeMap::<String, u64>::new();
        for (node, list) in &s.channels {
            if self.alive(&s, node) {
                for (c, n) in list {
                    *sum.entry(c.clone()).or_default() += n;
                }
            }
        }
        Ok(sum.into_iter().collect())
    }

    async fn claim_once(&self, id: &str, ttl: Duration) -> Result<bool, RegistryError> {
        let mut s = self.state.lock();
        let now = Instant::now();
        if let Some(until) = s.once.get(id) {
            if *until > now {
                return Ok(false);
            }
        }
        if s.once.len() >= MAX_ONCE {
            s.once.retain(|_, until| *until > now);
            if s.once.len() >= MAX_ONCE {
                return Err(RegistryError::Unavailable(
                    "too many one-time credentials in use".into(),
                ));
            }
        }
        s.once.insert(id.to_owned(), now + ttl);
        Ok(true)
    }

    async fn heartbeat(&self, status: &NodeStatus) -> Result<bool, RegistryError> {
        Ok(self
            .state
            .lock()
            .nodes
            .insert(status.id.clone(), (status.clone(), Instant::now()))
            .is_none())
    }

    async fn set_user(
        &self,
        user: &str,
        node: &str,
        connections: u64,
    ) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        if connections == 0 {
            if let Some(nodes) = s.users.get_mut(user) {
                nodes.remove(node);
                if nodes.is_empty() {
                    s.users.remove(user);
                }
            }
        } else {
            s.users
                .entry(user.to_owned())
                .or_default()
                .insert(node.to_owned(), connections);
        }
        Ok(())
    }

    async fn deregister(&self, node: &str) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        s.nodes.remove(node);
        s.users.retain(|_, nodes| {
            nodes.remove(node);
            !nodes.is_empty()
        });
        Ok(())
    }

    async fn add_user(&self, user: &str, node: &str) -> Result<(), RegistryError> {
        *self
            .state
            .lock()
            .users
            .entry(user.to_owned())
            .or_default()
            .entry(node.to_owned())
            .or_default() += 1;
        Ok(())
    }

    async fn remove_user(&self, user: &str, node: &str) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        if let Some(nodes) = s.users.get_mut(user) {
            if let Some(n) = nodes.get_mut(node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    nodes.remove(node);
                }
            }
            if nodes.is_empty() {
                s.users.remove(user);
            }
        }
        Ok(())
    }

    async fn nodes_for_user(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        let s = self.state.lock();
        let Some(nodes) = s.users.get(user) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<String> = nodes
            .keys()
            .filter(|n| self.alive(&s, n))
            .cloned()
            .collect();
        out.sort();
        Ok(out)
    }

    async fn live_nodes(&self) -> Result<Vec<NodeStatus>, RegistryError> {
        let s = self.state.lock();
        let mut out: Vec<NodeStatus> = s
            .nodes
            .values()
            .filter(|(_, at)| at.elapsed() <= self.ttl)
            .map(|(st, _)| st.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str) -> NodeStatus {
        NodeStatus {
            id: id.into(),
            ..NodeStatus::default()
        }
    }

    /// The memory registry's futures never wait: poll once.
    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the memory registry never waits"),
        }
    }

    #[test]
    fn users_are_counted_per_node_and_only_live_nodes_are_named() {
        let r = MemoryRegistry::new(Duration::from_secs(60));
        assert!(block(r.heartbeat(&status("a"))).unwrap(), "a new node");
        assert!(!block(r.heartbeat(&status("a"))).unwrap(), "known now");
        block(r.heartbeat(&status("b"))).unwrap();
        for node in ["a", "a", "b"] {
            block(r.add_user("u", node)).unwrap();
        }
        block(r.add_user("u", "ghost")).unwrap(); // never heartbeated
        assert_eq!(block(r.nodes_for_user("u")).unwrap(), ["a", "b"]);
        block(r.remove_user("u", "a")).unwrap();
        assert_eq!(
            block(r.nodes_for_user("u")).unwrap(),
            ["a", "b"],
            "a still has one"
        );
        block(r.remove_user("u", "a")).unwrap();
        block(r.remove_user("u", "a")).unwrap(); // one too many: no underflow
        assert_eq!(block(r.nodes_for_user("u")).unwrap(), ["b"]);
        block(r.deregister("b")).unwrap();
        assert!(block(r.nodes_for_user("u")).unwrap().is_empty());
        assert_eq!(block(r.live_nodes()).unwrap(), [status("a")]);
    }

    #[test]
    fn re_announcing_sets_counts_and_empty_entries_go() {
        let r = MemoryRegistry::new(Duration::from_secs(60));
        block(r.heartbeat(&status("a"))).unwrap();
        block(r.set_user("u", "a", 3)).unwrap();
        block(r.remove_user("u", "a")).unwrap();
        assert_eq!(block(r.nodes_for_user("u")).unwrap(), ["a"]);
        block(r.set_user("u", "a", 0)).unwrap();
        assert!(block(r.nodes_for_user("u")).unwrap().is_empty());
        block(r.add_user("v", "a")).unwrap();
        block(r.deregister("a")).unwrap();
        assert!(
            r.state.lock().users.is_empty(),
            "no empty user entries kept"
        );
    }

    #[test]
    fn a_node_that_stops_heartbeating_is_dead_after_the_ttl() {
        let r = MemoryRegistry::new(Duration::from_millis(30));
        block(r.heartbeat(&status("a"))).unwrap();
        block(r.add_user("u", "a")).unwrap();
        assert_eq!(block(r.nodes_for_user("u")).unwrap(), ["a"]);
        std::thread::sleep(Duration::from_millis(60));
        assert!(block(r.nodes_for_user("u")).unwrap().is_empty());
        assert!(block(r.live_nodes()).unwrap().is_empty());
        block(r.heartbeat(&status("a"))).unwrap();
        assert_eq!(block(r.nodes_for_user("u")).unwrap(), ["a"], "alive again");
    }
}
