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
}

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
        let nodes = s.users.entry(user.to_owned()).or_default();
        if connections == 0 {
            nodes.remove(node);
        } else {
            nodes.insert(node.to_owned(), connections);
        }
        Ok(())
    }

    async fn deregister(&self, node: &str) -> Result<(), RegistryError> {
        let mut s = self.state.lock();
        s.nodes.remove(node);
        for nodes in s.users.values_mut() {
            nodes.remove(node);
        }
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
