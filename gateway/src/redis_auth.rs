//! Redis credentials and database number: the settings `redis_username`,
//! `redis_password`, `redis_db` (the Redis servers) and
//! `redis_sentinel_username`, `redis_sentinel_password` (the sentinels),
//! composed into the `redis://` URLs the node's Redis clients are given.
//!
//! A Kubernetes Secret hands a password over as an environment variable,
//! not inside a URL: the settings fill in what a URL leaves out, and a URL
//! that names another user, password or database than the setting is
//! refused at start (which one is meant would be a guess).
//!
//! Passwords never reach a log: [`Secret`] prints as `<redacted>`, errors
//! name the setting and never the value, and [`registry::redact_url`]
//! hides the password of a URL that is printed.

use serde::{Deserialize, Serialize};

/// A password from the config: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The password itself, for a client handshake only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a client says when it connects to one kind of server: `AUTH
/// [user] password` and `SELECT db`. Empty: nothing (the URL's own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub db: Option<u32>,
    /// The settings these come from, for error messages
    /// (`redis_username`, ...).
    pub names: [&'static str; 3],
}

impl Credentials {
    /// `url` with the user, password and database these name filled in;
    /// an error (naming `setting`, never a password) when the URL already
    /// names different ones, or is no `redis://` URL.
    pub fn apply(&self, url: &str, setting: &str) -> Result<String, String> {
        let mut u = url::Url::parse(url).map_err(|e| {
            format!(
                "{setting}: {} is not a redis://host:port URL ({e})",
                registry::redact_url(url)
            )
        })?;
        if !matches!(u.scheme(), "redis" | "rediss") || u.host_str().is_none_or(str::is_empty) {
            return Err(format!(
                "{setting}: {} is not a redis://host:port URL",
                registry::redact_url(url)
            ));
        }
        let [user_name, password_name, db_name] = self.names;
        let clash = |what: &str| {
            Err(format!(
                "{setting} names a {what} and {} sets another: set it in one place only",
                match what {
                    "user" => user_name,
                    "password" => password_name,
                    _ => db_name,
                }
            ))
        };
        if let Some(user) = &self.username {
            let mut ours = u.clone();
            ours.set_username(&escape_percent(user))
                .map_err(|()| format!("{setting}: this URL cannot carry a user"))?;
            match u.username() {
                "" => u = ours,
                theirs if theirs != ours.username() => return clash("user"),
                _ => {}
            }
        }
        if let Some(password) = &self.password {
            let mut ours = u.clone();
            ours.set_password(Some(&escape_percent(password.expose())))
                .map_err(|()| format!("{setting}: this URL cannot carry a password"))?;
            match u.password() {
                None | Some("") => u = ours,
                Some(theirs) if Some(theirs) != ours.password() => return clash("password"),
                Some(_) => {}
            }
        }
        if let Some(db) = self.db {
            match u.path().trim_start_matches('/') {
                "" => u.set_path(&format!("/{db}")),
                theirs if theirs.parse::<u32>().ok() != Some(db) => return clash("database"),
                _ => {}
            }
        }
        Ok(u.into())
    }

    /// The redis crate's form of these, for the connections the crate
    /// makes itself (the sentinel lookups, the master's `ROLE` check).
    pub fn connection_info(&self) -> redis::RedisConnectionInfo {
        redis::RedisConnectionInfo {
            db: i64::from(self.db.unwrap_or(0)),
            username: self.username.clone(),
            password: self.password.as_ref().map(|p| p.expose().to_owned()),
            ..redis::RedisConnectionInfo::default()
        }
    }
}

/// `url` percent-encodes a user part's delimiters but leaves `%` alone,
/// and the redis crate percent-decodes what it reads: a password with
/// `%41` in it would arrive as `A`.
fn escape_percent(s: &str) -> String {
    s.replace('%', "%25")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: Option<&str>, password: Option<&str>, db: Option<u32>) -> Credentials {
        Credentials {
            username: user.map(str::to_owned),
            password: password.map(Secret::new),
            db,
            names: ["redis_username", "redis_password", "redis_db"],
        }
    }

    #[test]
    fn settings_fill_in_what_the_url_leaves_out() {
        let none = creds(None, None, None);
        assert_eq!(
            none.apply("redis://10.0.0.1:6379", "redis_url").unwrap(),
            "redis://10.0.0.1:6379"
        );
        let all = creds(Some("gw"), Some("s3cret"), Some(3));
        assert_eq!(
            all.apply("redis://10.0.0.1:6379", "redis_url").unwrap(),
            "redis://gw:s3cret@10.0.0.1:6379/3"
        );
        // Only a password (`requirepass`): the default user.
        assert_eq!(
            creds(None, Some("pw"), None)
                .apply("redis://h:1", "redis_url")
                .unwrap(),
            "redis://:pw@h:1"
        );
        // A password with URL delimiters in it is percent-encoded, and the
        // redis crate reads back the same password.
        let odd = creds(None, Some("a@b:c/d?e#f%"), Some(0));
        let url = odd.apply("redis://h:1", "redis_url").unwrap();
        assert_eq!(url, "redis://:a%40b%3Ac%2Fd%3Fe%23f%25@h:1/0");
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        assert_eq!(info.redis.password.as_deref(), Some("a@b:c/d?e#f%"));
        assert_eq!(info.redis.db, 0);
        // A query (protocol=resp3) survives.
        assert_eq!(
            all.apply("redis://h:1?protocol=resp3", "x").unwrap(),
            "redis://gw:s3cret@h:1/3?protocol=resp3"
        );
    }

    #[test]
    fn a_url_that_says_the_same_is_kept_and_one_that_differs_is_refused() {
        let all = creds(Some("gw"), Some("pw"), Some(2));
        assert_eq!(
            all.apply("redis://gw:pw@h:1/2", "redis_url").unwrap(),
            "redis://gw:pw@h:1/2"
        );
        let err = all.apply("redis://gw:zz9@h:1", "redis_url").unwrap_err();
        assert!(err.contains("redis_url names a password and redis_password sets another"));
        assert!(!err.contains("zz9") && !err.contains(":pw"), "{err}");
        let err = all.apply("redis://bob@h:1", "redis_url").unwrap_err();
        assert!(err.contains("redis_username"), "{err}");
        let err = all.apply("redis://h:1/5", "redis_url").unwrap_err();
        assert!(
            err.contains("database") && err.contains("redis_db"),
            "{err}"
        );
        let err = Credentials {
            names: ["a_user", "a_pass", "a_db"],
            ..all
        }
        .apply("redis://:x@h:1", "redis_sentinels")
        .unwrap_err();
        assert!(
            err.contains("redis_sentinels names a password and a_pass"),
            "{err}"
        );
    }

    #[test]
    fn bad_urls_are_named_without_their_password() {
        let c = creds(None, Some("pw"), None);
        let err = c.apply("http://u:hidden@h:1", "redis_url").unwrap_err();
        assert!(err.contains("not a redis://host:port URL"), "{err}");
        assert!(!err.contains("hidden"), "{err}");
        assert!(c.apply("h:1", "redis_url").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let c = creds(Some("gw"), Some("hunter2"), None);
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(Secret::new("hunter2").to_string(), "<redacted>");
        let info = c.connection_info();
        assert_eq!(info.password.as_deref(), Some("hunter2"));
        assert_eq!(info.username.as_deref(), Some("gw"));
    }
}
