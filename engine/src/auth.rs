//! Who a connection is: tenants from the configuration and the JWT a HELLO carries.
//!
//! Owns token verification only (HS256 with per-tenant secrets, rotation by `kid`); it does not
//! decide what a verified identity may do with a conversation (that is the customer-service
//! layer's `access` rules). With no tenant configured the engine runs open: every connection is
//! tenant `default` and tokens are not read, which is what `switchboard serve` does on its
//! embedded defaults.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use switchboard_protocol::Text;

use crate::config::TenantConfig;

/// The tenant of every connection when no tenant is configured.
pub const OPEN_TENANT: Text = Text::from_static("default");

/// What a connection may act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An edge gateway acting for many end users of one tenant.
    Gateway,
    /// One customer.
    Customer,
    /// One agent.
    Agent,
    /// A supervisor of the tenant.
    Supervisor,
}

/// A verified connection identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The tenant; every session key of the connection is scoped to it.
    pub tenant: Text,
    /// The role.
    pub role: Role,
    /// The subject (gateway, customer or agent id).
    pub subject: Text,
    /// When the token expires, seconds since the Unix epoch (`None` when running open).
    pub expires_at_s: Option<u64>,
}

/// Why a token was refused. The message goes back in ERROR(AuthFailed); it names the problem,
/// never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or not a JWT.
    #[error("a JWT is required in HELLO's token")]
    Missing,
    /// The header names no key this engine knows (`kid` absent or unknown).
    #[error("unknown signing key (kid)")]
    UnknownKey,
    /// Signature, algorithm or claims are wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// The `tenant` claim is not the tenant whose key signed it.
    #[error("token tenant does not match its signing key")]
    TenantMismatch,
}

#[derive(Debug, Deserialize)]
struct Claims {
    tenant: String,
    role: Role,
    sub: String,
    exp: u64,
}

/// Verifies HELLO tokens against the configured tenants' keys.
pub struct Authenticator {
    /// kid → (tenant, key).
    keys: HashMap<String, (Text, DecodingKey)>,
    validation: Validation,
}

impl Authenticator {
    /// Builds the key table; `None` when no tenant is configured (the engine runs open).
    pub fn new(tenants: &[TenantConfig], leeway_s: u64) -> Option<Authenticator> {
        if tenants.is_empty() {
            return None;
        }
        let mut keys = HashMap::new();
        for tenant in tenants {
            for key in &tenant.keys {
                keys.insert(key.kid.clone(), (Text::from(tenant.id.as_str()), DecodingKey::from_secret(key.secret.as_bytes())));
            }
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_s;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Some(Authenticator { keys, validation })
    }

    /// Verifies a token: known `kid`, HS256 signature, not expired, tenant claim matching the
    /// key's tenant.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Missing)?;
        let (tenant, key) = header.kid.as_deref().and_then(|kid| self.keys.get(kid)).ok_or(AuthError::UnknownKey)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                other => AuthError::Invalid(format!("{other:?}")),
            })?
            .claims;
        if claims.tenant != tenant.as_str() {
            return Err(AuthError::TenantMismatch);
        }
        if claims.sub.is_empty() || claims.sub.len() > switchboard_protocol::limits::ID_BYTES_MAX {
            return Err(AuthError::Invalid("sub must be 1 to 128 bytes".into()));
        }
        Ok(Identity { tenant: tenant.clone(), role: claims.role, subject: Text::from(claims.sub), expires_at_s: Some(claims.exp) })
    }
}
