//! Channel namespaces: per-prefix rules. A channel `chat:room1` is in the
//! namespace `chat` (the part before its first `:`); a `[[namespace]]`
//! block of the config file with that name sets, for its channels, the
//! replay window and size, and whether clients may publish, anonymous
//! clients may subscribe, and clients may read history. Channels of no
//! configured namespace (and users' own streams) follow the top-level
//! settings. Validated at start: a bad block stops the node with a message
//! naming it and the key.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One `[[namespace]]` block of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Matches the channels `<name>:*`.
    pub name: String,
    /// How long its messages stay resumable (default: `replay_window_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_window_ms: Option<u64>,
    /// How many of a channel's messages stay resumable (default:
    /// `replay_max_messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_max_messages: Option<usize>,
    /// Whether clients may publish to its channels (their token must allow
    /// it too). Default true.
    #[serde(default = "yes")]
    pub publish: bool,
    /// Whether anonymous clients (dev mode) may subscribe. Default true.
    #[serde(default = "yes")]
    pub anonymous: bool,
    /// Whether clients may read its channels' history over the WebSocket
    /// (the backend's `/api/history` always may). Default true.
    #[serde(default = "yes")]
    pub history: bool,
    /// Whether its channels keep presence (who is subscribed, cluster-wide:
    /// `presence` / `presence_stats`). Default false.
    #[serde(default)]
    pub presence: bool,
    /// With `presence`: send `join` and `leave` frames to a channel's
    /// subscribers (only while the channel has at most
    /// `presence_events_max_members` members on the node where the change
    /// happens). Default false.
    #[serde(default)]
    pub join_leave: bool,
}

fn yes() -> bool {
    true
}

/// What applies to a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub replay_window: Duration,
    pub replay_max_messages: usize,
    pub publish: bool,
    pub anonymous: bool,
    pub history: bool,
    pub presence: bool,
    pub join_leave: bool,
}

/// The configured namespaces and the top-level rules.
#[derive(Debug, Clone)]
pub struct Namespaces {
    by_name: HashMap<String, Rules>,
    default: Rules,
}

impl Namespaces {
    /// Checks the blocks; the error names the block and the key.
    pub fn new(
        blocks: &[NamespaceConfig],
        replay_window_ms: u64,
        replay_max_messages: usize,
        stream_meta_ttl_ms: u64,
    ) -> Result<Self, String> {
        let default = Rules {
            replay_window: Duration::from_millis(replay_window_ms),
            replay_max_messages,
            publish: true,
            anonymous: true,
            history: true,
            presence: false,
            join_leave: false,
        };
        let mut by_name = HashMap::new();
        for (i, b) in blocks.iter().enumerate() {
            let at = format!("namespace[{i}] ({:?})", b.name);
            let valid = !b.name.is_empty()
                && b.name.len() <= 64
                && b.name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c));
            if !valid {
                return Err(format!(
                    "{at}: name must be 1 to 64 of A-Z a-z 0-9 _ - . (a channel prefix before ':')"
                ));
            }
            let window = b.replay_window_ms.unwrap_or(replay_window_ms);
            if window == 0 || window > stream_meta_ttl_ms {
                return Err(format!(
                    "{at}: replay_window_ms must be greater than 0 and at most stream_meta_ttl_ms ({stream_meta_ttl_ms})"
                ));
            }
            let max = b.replay_max_messages.unwrap_or(replay_max_messages);
            if max == 0 {
                return Err(format!("{at}: replay_max_messages must be greater than 0"));
            }
            let rules = Rules {
                replay_window: Duration::from_millis(window),
                replay_max_messages: max,
                publish: b.publish,
                anonymous: b.anonymous,
                history: b.history,
                presence: b.presence,
                join_leave: b.presence && b.join_leave,
            };
            if by_name.insert(b.name.clone(), rules).is_some() {
                return Err(format!(
                    "{at}: name: a namespace of that name is already configured"
                ));
            }
        }
        Ok(Self { by_name, default })
    }

    /// The rules of `channel`'s namespace, or the top-level ones.
    pub fn rules(&self, channel: &str) -> &Rules {
        channel
            .split_once(':')
            .and_then(|(ns, _)| self.by_name.get(ns))
            .unwrap_or(&self.default)
    }

    /// The longest replay window of any namespace (how long a store keeps
    /// anything at most).
    pub fn longest_window(&self) -> Duration {
        self.by_name
            .values()
            .map(|r| r.replay_window)
            .chain(std::iter::once(self.default.replay_window))
            .max()
            .unwrap_or_default()
    }

    /// The shortest replay window (how often a store's sweeper runs).
    pub fn shortest_window(&self) -> Duration {
        self.by_name
            .values()
            .map(|r| r.replay_window)
            .chain(std::iter::once(self.default.replay_window))
            .min()
            .unwrap_or_default()
    }

    /// Top-level rules only (tests, tools).
    pub fn uniform(replay_window: Duration, replay_max_messages: usize) -> Self {
        Self {
            by_name: HashMap::new(),
            default: Rules {
                replay_window,
                replay_max_messages,
                publish: true,
                anonymous: true,
                history: true,
                presence: false,
                join_leave: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(name: &str) -> NamespaceConfig {
        NamespaceConfig {
            name: name.into(),
            replay_window_ms: Some(500),
            replay_max_messages: None,
            publish: false,
            anonymous: true,
            history: true,
            presence: false,
            join_leave: false,
        }
    }

    #[test]
    fn a_channel_takes_its_prefix_rules_or_the_defaults() {
        let ns = Namespaces::new(&[block("chat")], 60_000, 100, 86_400_000).unwrap();
        let chat = ns.rules("chat:room1");
        assert_eq!(chat.replay_window, Duration::from_millis(500));
        assert_eq!(chat.replay_max_messages, 100);
        assert!(!chat.publish);
        assert!(ns.rules("news").publish);
        assert!(ns.rules("chatter:x").publish, "a prefix, not a substring");
        assert_eq!(
            ns.rules("$user:chat").replay_window,
            Duration::from_secs(60)
        );
        assert_eq!(ns.longest_window(), Duration::from_secs(60));
        assert_eq!(ns.shortest_window(), Duration::from_millis(500));
    }

    #[test]
    fn bad_blocks_are_named() {
        let e =
            Namespaces::new(&[block("chat"), block("chat")], 60_000, 100, 86_400_000).unwrap_err();
        assert!(e.contains("namespace[1] (\"chat\"): name"), "{e}");
        let mut zero = block("z");
        zero.replay_window_ms = Some(0);
        let e = Namespaces::new(&[zero], 60_000, 100, 86_400_000).unwrap_err();
        assert!(e.contains("namespace[0] (\"z\"): replay_window_ms"), "{e}");
        let e = Namespaces::new(&[block("a:b")], 60_000, 100, 86_400_000).unwrap_err();
        assert!(e.contains("name must be"), "{e}");
    }
}
