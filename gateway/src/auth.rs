//! Connection tokens (JWT) and API keys.
//!
//! A connection token names the user (`sub`), when it expires (`exp`) and the
//! channels it may subscribe to and publish on, as glob patterns (`*` any run
//! of characters, `?` one character):
//!
//! ```json
//! {"sub": "alice", "exp": 1767225600, "subscribe": ["news", "chat:*"], "publish": ["chat:*"]}
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use protocol::{ErrorCode, Position};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use wildmatch::WildMatch;

use crate::config::Config;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

/// Channel patterns a token grants.
#[derive(Debug, Clone)]
pub struct Patterns {
    any: bool,
    globs: Vec<WildMatch>,
    /// The patterns as given, carried into resume tokens.
    sources: Vec<String>,
}

impl Patterns {
    pub fn any() -> Self {
        Self {
            any: true,
            globs: Vec::new(),
            sources: vec!["*".into()],
        }
    }

    pub fn from_globs(globs: &[String]) -> Self {
        Self {
            any: false,
            globs: globs.iter().map(|g| WildMatch::new(g)).collect(),
            sources: globs.to_vec(),
        }
    }

    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    pub fn allows(&self, channel: &str) -> bool {
        self.any || self.globs.iter().any(|g| g.matches(channel))
    }
}

/// What a resume token restores: the identity, the subscriptions with
/// their positions, and the ticket the caller claims (single use).
pub type Resumed = (Identity, Vec<(String, Position)>, ResumeTicket);

/// Who a connection is and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Empty for an anonymous (dev mode) connection.
    pub user: String,
    /// Unix seconds.
    pub expires_at: Option<u64>,
    /// The connection token's `iat` (Unix seconds): a revocation
    /// (`/api/revoke`) refuses tokens issued before it.
    pub issued_at: Option<u64>,
    pub subscribe: Patterns,
    pub publish: Patterns,
}

impl Identity {
    pub fn anonymous() -> Self {
        Self {
            user: String::new(),
            expires_at: None,
            issued_at: None,
            subscribe: Patterns::any(),
            publish: Patterns::any(),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.user.is_empty()
    }
}

/// What an API key may do. `Publish`: publish, send, batch, history,
/// presence, channels, info. `Admin`: everything, drain and the control
/// calls (disconnect, revoke, server-side subscribe) included. Ordered:
/// admin includes publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Publish,
    Admin,
}

impl Scope {
    /// An entry of `api_keys`: `admin:<key>`, `publish:<key>`, or a bare
    /// key (publish).
    pub fn parse_entry(entry: &str) -> (Scope, String) {
        if let Some(k) = entry.strip_prefix("admin:") {
            (Scope::Admin, k.to_owned())
        } else if let Some(k) = entry.strip_prefix("publish:") {
            (Scope::Publish, k.to_owned())
        } else {
            (Scope::Publish, entry.to_owned())
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Publish => "publish",
            Scope::Admin => "admin",
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required")]
    Missing,
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("missing or unknown API key")]
    BadApiKey,
    #[error("this API key's scope is {has}; this needs {needs}")]
    Scope { has: Scope, needs: Scope },
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Expired => ErrorCode::TokenExpired,
            Self::Scope { .. } => ErrorCode::PermissionDenied,
            _ => ErrorCode::Unauthorized,
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The monotonic instant of a Unix time in seconds (a token's `exp`),
/// through one anchor taken when first asked: the same `exp` gives the
/// same instant every time, so a connection's timer built from it does not
/// move on every wake-up. `None` past the clock's range. The wall clock may
/// drift from the anchor; users re-check `exp` against [`now_secs`] when
/// the timer fires.
pub fn instant_of(unix_secs: u64) -> Option<std::time::Instant> {
    static ANCHOR: std::sync::LazyLock<(std::time::Instant, u64)> =
        std::sync::LazyLock::new(|| (std::time::Instant::now(), now_secs()));
    let (at, secs) = *ANCHOR;
    match unix_secs.checked_sub(secs) {
        Some(ahead) => at.checked_add(Duration::from_secs(ahead)),
        None => at
            .checked_sub(Duration::from_secs(secs - unix_secs))
            .or(Some(at)),
    }
}

/// A resume token's claims: who the client is, what it may do, and where it
/// was in each channel when its node told it to reconnect.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResumeClaims {
    pub sub: String,
    /// Always `resume`: a connection token is never accepted as a resume
    /// token or the other way round.
    pub typ: String,
    pub exp: u64,
    /// The connection token's own expiry, which the resumed session keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tok_exp: Option<u64>,
    /// The connection token's `iat`, which the resumed session keeps (a
    /// revocation is checked against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tok_iat: Option<u64>,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
    /// (channel, epoch, seq) of every subscription, the user's stream included.
    pub channels: Vec<(String, String, u64)>,
    /// The token's id: a resume token is accepted once, cluster-wide (the
    /// registry records its use). Absent only in tokens of versions before
    /// it was added, which live at most `resume_token_ttl_ms` after an
    /// upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// A verified resume token's id and its expiry (Unix seconds), to claim it
/// once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeTicket {
    pub id: Option<String>,
    pub exp: u64,
}

const RESUME_TYP: &str = "resume";
const DEV_RESUME_KEY: &str = "gateway development resume key (dev mode only)";

/// Verifies tokens and API keys with the node's configured keys.
pub struct Auth {
    verifiers: Vec<(DecodingKey, Validation)>,
    minting: Option<EncodingKey>,
    resume: (EncodingKey, DecodingKey, Validation),
    dev: bool,
    api_keys: Vec<(Scope, String)>,
    /// `token_exp_required`.
    exp_required: bool,
    /// `max_token_lifetime_secs`.
    max_lifetime: u64,
}

/// Why the node's token keys could not be set up (at start).
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("reading jwt_public_key_file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("jwt_public_key_file {path}: not a {algorithm} public key in PEM: {source}")]
    Parse {
        path: std::path::PathBuf,
        algorithm: &'static str,
        source: jsonwebtoken::errors::Error,
    },
}

/// Why a token could not be minted.
#[derive(Debug, Error)]
pub enum MintError {
    #[error("minting tokens needs GATEWAY_JWT_SECRET (HS256)")]
    NoSecret,
    #[error("encoding the token: {0}")]
    Encode(#[from] jsonwebtoken::errors::Error),
}

impl Auth {
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let mut verifiers = Vec::new();
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = 0;
            // `exp` is checked when present; whether it must be is
            // `token_exp_required` (checked in `verify`, with a clear error).
            v.required_spec_claims = ["sub".to_owned()].into_iter().collect();
            v.validate_exp = true;
            v.validate_nbf = true;
            v
        };
        let mut minting = None;
        if let Some(secret) = &config.jwt_secret {
            verifiers.push((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(Algorithm::HS256),
            ));
            minting = Some(EncodingKey::from_secret(secret.as_bytes()));
        }
        if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
            let parsed = match config.jwt_algorithm.as_str() {
                "ES256" => DecodingKey::from_ec_pem(&pem).map(|k| (k, Algorithm::ES256)),
                _ => DecodingKey::from_rsa_pem(&pem).map(|k| (k, Algorithm::RS256)),
            };
            let (key, alg) = parsed.map_err(|source| KeyError::Parse {
                path: path.clone(),
                algorithm: if config.jwt_algorithm == "ES256" {
                    "ES256 (EC)"
                } else {
                    "RS256 (RSA)"
                },
                source,
            })?;
            verifiers.push((key, validation(alg)));
        }
        // Resume tokens use their own key, so one can never pass for a
        // connection token even where the types would line up.
        let resume_key = match (&config.resume_secret, &config.jwt_secret) {
            (Some(k), _) => k.clone(),
            (None, Some(secret)) => format!("{secret}/resume"),
            (None, None) if config.dev => DEV_RESUME_KEY.to_owned(),
            // A single node verifies only its own tokens: a key of its own
            // will do. (Config validation demands a shared one in a cluster.)
            (None, None) => crate::ids::new_secret(),
        };
        let mut resume_validation = validation(Algorithm::HS256);
        resume_validation.required_spec_claims =
            ["sub".to_owned(), "exp".to_owned()].into_iter().collect();
        let resume = (
            EncodingKey::from_secret(resume_key.as_bytes()),
            DecodingKey::from_secret(resume_key.as_bytes()),
            resume_validation,
        );
        Ok(Self {
            verifiers,
            minting,
            resume,
            dev: config.dev,
            api_keys: config
                .api_keys()
                .iter()
                .map(|e| Scope::parse_entry(e))
                .collect(),
            exp_required: config.token_exp_required,
            max_lifetime: config.max_token_lifetime_secs,
        })
    }

    /// Signs a resume token for `identity` at `channels`, valid for `ttl_secs`.
    pub fn mint_resume(
        &self,
        identity: &Identity,
        channels: Vec<(String, String, u64)>,
        ttl_secs: u64,
    ) -> String {
        let claims = ResumeClaims {
            sub: identity.user.clone(),
            typ: RESUME_TYP.into(),
            exp: now_secs() + ttl_secs.max(1),
            tok_exp: identity.expires_at,
            tok_iat: identity.issued_at,
            subscribe: identity.subscribe.sources().to_vec(),
            publish: identity.publish.sources().to_vec(),
            channels,
            jti: Some(crate::ids::new_secret()),
        };
        // HS256 over serializable claims cannot fail.
        encode(&Header::new(Algorithm::HS256), &claims, &self.resume.0).unwrap_or_default()
    }

    /// Checks a resume token and returns the identity it restores, the
    /// subscriptions with their positions, and its ticket (the caller claims
    /// it: a token is used once).
    pub fn verify_resume(&self, token: &str) -> Result<Resumed, AuthError> {
        let data = decode::<ResumeClaims>(token, &self.resume.1, &self.resume.2).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(format!("resume token: {e}")),
            }
        })?;
        let c = data.claims;
        if c.typ != RESUME_TYP {
            return Err(AuthError::Invalid("not a resume token".into()));
        }
        if c.tok_exp.is_some_and(|exp| exp <= now_secs()) {
            return Err(AuthError::Expired);
        }
        let identity = if c.sub.is_empty() {
            if !self.dev {
                return Err(AuthError::Invalid(
                    "anonymous resume outside dev mode".into(),
                ));
            }
            Identity::anonymous()
        } else {
            Identity {
                user: c.sub,
                expires_at: c.tok_exp,
                issued_at: c.tok_iat,
                subscribe: Patterns::from_globs(&c.subscribe),
                publish: Patterns::from_globs(&c.publish),
            }
        };
        let channels = c
            .channels
            .into_iter()
            .map(|(ch, epoch, seq)| (ch, Position::new(seq, epoch)))
            .collect();
        let ticket = ResumeTicket {
            id: c.jti,
            exp: c.exp,
        };
        Ok((identity, channels, ticket))
    }

    pub fn dev(&self) -> bool {
        self.dev
    }

    /// The identity a connection token grants; no token is anonymous in dev
    /// mode and refused otherwise.
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token.filter(|t| !t.is_empty()) {
            None if self.dev => Ok(Identity::anonymous()),
            None => Err(AuthError::Missing),
            Some(token) => self.verify(token),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let mut last = AuthError::Invalid(format!("no key configured for {:?} tokens", header.alg));
        for (key, validation) in &self.verifiers {
            if !validation.algorithms.contains(&header.alg) {
                continue;
            }
            match decode::<Claims>(token, key, validation) {
                Ok(data) => {
                    let c = data.claims;
                    if c.typ.as_deref() == Some(RESUME_TYP) {
                        return Err(AuthError::Invalid(
                            "a resume token is not a connection token".into(),
                        ));
                    }
                    protocol::validate_user(&c.sub)
                        .map_err(|e| AuthError::Invalid(e.to_string()))?;
                    match c.exp {
                        None if self.exp_required => {
                            return Err(AuthError::Invalid(
                                "the token has no exp (token_exp_required)".into(),
                            ))
                        }
                        Some(exp) if exp > now_secs().saturating_add(self.max_lifetime) => {
                            return Err(AuthError::Invalid(format!(
                                "the token expires more than {} s from now (max_token_lifetime_secs)",
                                self.max_lifetime
                            )))
                        }
                        _ => {}
                    }
                    return Ok(Identity {
                        user: c.sub,
                        expires_at: c.exp,
                        issued_at: c.iat,
                        subscribe: Patterns::from_globs(&c.subscribe),
                        publish: Patterns::from_globs(&c.publish),
                    });
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                    return Err(AuthError::Expired)
                }
                Err(e) => last = AuthError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }

    /// Checks an `Authorization` header value against the API keys, for an
    /// operation that needs `needs`. Open in dev mode when no key is
    /// configured.
    pub fn check_api_key(
        &self,
        authorization: Option<&str>,
        needs: Scope,
    ) -> Result<(), AuthError> {
        if self.api_keys.is_empty() && self.dev {
            return Ok(());
        }
        let presented = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(AuthError::BadApiKey)?;
        // Every key is compared (constant time each), so the time taken
        // says nothing of which matched.
        let mut found = None;
        for (scope, key) in &self.api_keys {
            if constant_time_eq(key.as_bytes(), presented.as_bytes()) {
                found = Some(*scope);
            }
        }
        match found {
            None => Err(AuthError::BadApiKey),
            Some(has) if has < needs => Err(AuthError::Scope { has, needs }),
            Some(_) => Ok(()),
        }
    }

    /// Mints an HS256 connection token (for `gateway token` and tests).
    pub fn mint(&self, claims: &Claims) -> Result<String, MintError> {
        let key = self.minting.as_ref().ok_or(MintError::NoSecret)?;
        Ok(encode(&Header::new(Algorithm::HS256), claims, key)?)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    /// A token's `exp` maps to one instant, whenever asked: later times to
    /// later instants, a second to a second, the past to the past, and
    /// what the clock cannot hold to `None`.
    #[test]
    fn instant_of_is_stable_and_follows_the_wall_clock() {
        let now = super::now_secs();
        let a = super::instant_of(now + 100).expect("in range");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(super::instant_of(now + 100), Some(a));
        let b = super::instant_of(now + 101).expect("in range");
        assert_eq!(b - a, std::time::Duration::from_secs(1));
        let past = super::instant_of(now.saturating_sub(10)).expect("in range");
        assert!(past <= std::time::Instant::now());
        assert_eq!(super::instant_of(u64::MAX), None);
    }

    use super::*;

    /// Signs any claims with the test secret.
    fn signed(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123"),
        )
        .expect("encode")
    }

    #[test]
    fn token_lifetimes_are_bounded() {
        let a = auth();
        let now = now_secs();
        // No exp: refused by default (it would never expire).
        let e = a
            .verify(&signed(serde_json::json!({"sub": "u"})))
            .unwrap_err();
        assert!(e.to_string().contains("token_exp_required"), "{e}");
        // Further ahead than max_token_lifetime_secs (7 days), up to u64::MAX.
        for exp in [now + 8 * 24 * 3600, u64::MAX] {
            let e = a
                .verify(&signed(serde_json::json!({"sub": "u", "exp": exp})))
                .unwrap_err();
            assert!(e.to_string().contains("max_token_lifetime_secs"), "{e}");
        }
        // Not yet valid (nbf in the future).
        let e = a
            .verify(&signed(
                serde_json::json!({"sub": "u", "exp": now + 60, "nbf": now + 600}),
            ))
            .unwrap_err();
        assert!(matches!(e, AuthError::Invalid(_)), "{e}");
        assert!(a
            .verify(&signed(
                serde_json::json!({"sub": "u", "exp": now + 60, "nbf": now - 1})
            ))
            .is_ok());
        // Configurable: a node may accept tokens without exp.
        let lax = Auth::from_config(&Config {
            jwt_secret: Some("0123456789abcdef0123".into()),
            token_exp_required: false,
            ..Config::default()
        })
        .expect("auth");
        assert!(lax.verify(&signed(serde_json::json!({"sub": "u"}))).is_ok());
    }

    fn auth() -> Auth {
        let config = Config {
            jwt_secret: Some("0123456789abcdef0123".into()),
            api_keys: "k1, k2, admin:boss, publish:k3".into(),
            ..Config::default()
        };
        Auth::from_config(&config).expect("auth")
    }

    #[test]
    fn tokens_verify_and_grant_patterns() {
        let a = auth();
        let claims = Claims {
            sub: "alice".into(),
            exp: Some(now_secs() + 60),
            iat: None,
            subscribe: vec!["news".into(), "chat:*".into()],
            publish: vec![],
            typ: None,
        };
        let id = a.verify(&a.mint(&claims).expect("mint")).expect("verify");
        assert_eq!(id.user, "alice");
        assert!(id.subscribe.allows("chat:1"));
        assert!(!id.subscribe.allows("secret"));
        assert!(!id.publish.allows("chat:1"));
        let expired = Claims {
            exp: Some(now_secs() - 10),
            ..claims
        };
        assert_eq!(
            a.verify(&a.mint(&expired).expect("mint")).unwrap_err(),
            AuthError::Expired
        );
        assert!(matches!(a.verify("not-a-jwt"), Err(AuthError::Invalid(_))));
        assert_eq!(a.identify(None).unwrap_err(), AuthError::Missing);
    }

    #[test]
    fn resume_tokens() {
        let a = auth();
        let claims = Claims {
            sub: "alice".into(),
            exp: Some(now_secs() + 60),
            iat: None,
            subscribe: vec!["news".into()],
            publish: vec!["chat:*".into()],
            typ: None,
        };
        let id = a.verify(&a.mint(&claims).expect("mint")).expect("verify");
        let t = a.mint_resume(&id, vec![("news".into(), "E1".into(), 7)], 60);
        let (back, channels, ticket) = a.verify_resume(&t).expect("resume verifies");
        assert!(ticket.id.as_ref().is_some_and(|id| id.len() >= 16));
        assert_eq!(back.user, "alice");
        assert!(back.publish.allows("chat:x") && !back.publish.allows("news"));
        assert_eq!(channels, vec![("news".to_owned(), Position::new(7, "E1"))]);
        // Neither kind passes for the other; tampering and expiry are refused.
        assert!(a.verify(&t).is_err());
        assert!(a.verify_resume(&a.mint(&claims).expect("mint")).is_err());
        let mut tampered = t.clone();
        tampered.insert(tampered.len() - 3, 'x');
        assert!(a.verify_resume(&tampered).is_err());
        let expired = Identity {
            expires_at: Some(now_secs() - 1),
            ..back
        };
        let t = a.mint_resume(&expired, vec![], 60);
        assert_eq!(a.verify_resume(&t).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn api_keys() {
        let a = auth();
        assert!(a.check_api_key(Some("Bearer k2"), Scope::Publish).is_ok());
        assert_eq!(
            a.check_api_key(Some("Bearer nope"), Scope::Publish),
            Err(AuthError::BadApiKey)
        );
        assert_eq!(
            a.check_api_key(None, Scope::Publish),
            Err(AuthError::BadApiKey)
        );
        // Scopes: an unprefixed key publishes; only an admin key drains.
        assert_eq!(
            a.check_api_key(Some("Bearer k2"), Scope::Admin),
            Err(AuthError::Scope {
                has: Scope::Publish,
                needs: Scope::Admin
            })
        );
        assert!(a.check_api_key(Some("Bearer boss"), Scope::Admin).is_ok());
        assert!(a.check_api_key(Some("Bearer boss"), Scope::Publish).is_ok());
        assert!(a.check_api_key(Some("Bearer k3"), Scope::Publish).is_ok());
        assert!(a
            .check_api_key(Some("Bearer admin:boss"), Scope::Publish)
            .is_err());
    }
}
