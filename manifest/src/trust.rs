//! Signed image versions: the master signs (identity, version, expiry) with ed25519; hosts
//! accept a manifest only under a key they trust, before it expires, and never older than what
//! they have already applied.
//!
//! The signed message is a fixed-layout byte string with a domain separator, so a signature
//! made here can never be mistaken for one over anything else:
//! `"golden-image-sync manifest v1\0" ‖ identity (32) ‖ version (u64 BE) ‖ expires_unix (u64 BE)`.
//! The identity hash covers every entry and the root's metadata (see [`crate::Manifest::identity`]),
//! so the signature covers the whole tree.
//!
//! A manifest with files rendered for one host (its identity covers them like any entry) is
//! signed over a second layout, which also binds the host and the serial of the data rendered:
//! `"golden-image-sync rendered manifest v1\0" ‖ identity ‖ version ‖ expires_unix ‖
//! render_serial (u64 BE) ‖ host length (u32 BE) ‖ host`. One host's render cannot pass for
//! another's, and an older render of a version cannot replace a newer one ([`RenderBinding`]).

use std::fmt;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signer, Verifier};

use crate::Hash;

const DOMAIN: &[u8] = b"golden-image-sync manifest v1\0";
const DOMAIN_RENDERED: &[u8] = b"golden-image-sync rendered manifest v1\0";
const SECRET_PREFIX: &str = "golden-image-sync ed25519 secret key:";
const PUBLIC_PREFIX: &str = "ed25519:";

/// A signature over one manifest version, as carried in the manifest header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionSignature {
    pub public_key: [u8; 32],
    pub expires_unix: u64,
    pub signature: [u8; 64],
}

/// What the signature of a manifest with files rendered for one host also covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderBinding {
    /// The host the files were rendered for.
    pub host: String,
    /// Goes up with every reload of the master's render data: among renders of one version, a
    /// host takes only a newer one.
    pub serial: u64,
}

fn message(identity: &Hash, version: u64, expires_unix: u64, binding: Option<&RenderBinding>) -> Vec<u8> {
    let domain = if binding.is_some() { DOMAIN_RENDERED } else { DOMAIN };
    let mut m = Vec::with_capacity(domain.len() + 64);
    m.extend_from_slice(domain);
    m.extend_from_slice(&identity.0);
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(&expires_unix.to_be_bytes());
    if let Some(b) = binding {
        m.extend_from_slice(&b.serial.to_be_bytes());
        m.extend_from_slice(&(b.host.len() as u32).to_be_bytes());
        m.extend_from_slice(b.host.as_bytes());
    }
    m
}

/// The master's signing key.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> SigningKey {
        let seed: [u8; 32] = rand::random();
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Reads a key written by [`SigningKey::save`]. Refuses a file others can read.
    pub fn load(path: &Path) -> Result<SigningKey, String> {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(path).map_err(|e| format!("cannot read signing key {}: {e}", path.display()))?;
        if md.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "signing key {} is readable by others (mode {:o}); refusing it (hint: chmod 600 {})",
                path.display(),
                md.permissions().mode() & 0o777,
                path.display()
            ));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read signing key {}: {e}", path.display()))?;
        let hex = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| format!("{} is not a signing key made by `syncmaster keygen`", path.display()))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hex.trim(), &mut seed)
            .map_err(|_| format!("signing key {} is damaged (bad hex)", path.display()))?;
        Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// Writes the key to a new file (mode 0600; an existing file is never overwritten).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        writeln!(f, "{SECRET_PREFIX} {}", hex::encode(self.0.to_bytes()))?;
        f.sync_all()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, identity: &Hash, version: u64, expires_unix: u64) -> VersionSignature {
        self.sign_bound(identity, version, expires_unix, None)
    }

    /// Signs a manifest; with `binding`, one with files rendered for that host.
    pub fn sign_bound(
        &self,
        identity: &Hash,
        version: u64,
        expires_unix: u64,
        binding: Option<&RenderBinding>,
    ) -> VersionSignature {
        VersionSignature {
            public_key: self.0.verifying_key().to_bytes(),
            expires_unix,
            signature: self.0.sign(&message(identity, version, expires_unix, binding)).to_bytes(),
        }
    }
}

/// A public key a host trusts, written `ed25519:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    pub fn parse(s: &str) -> Result<PublicKey, String> {
        let hex = s.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            format!("{s:?} is not a public key (hint: the `ed25519:…` line `syncmaster keygen` prints)")
        })?;
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex, &mut b).map_err(|_| format!("{s:?} is not a public key: expected 64 hex digits"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&b)
            .map(PublicKey)
            .map_err(|_| format!("{s:?} is not a valid ed25519 public key"))
    }

    pub fn bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", hex::encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Seconds since the Unix epoch, the clock signatures expire by.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("the manifest is not signed, and this host requires a signature from a trusted key (hint: give syncmaster --signing-key)")]
    Unsigned,
    #[error("the manifest is signed by ed25519:{0}, which is not among this host's trusted keys (hint: add it to trusted_keys if the master's key changed)")]
    UnknownKey(String),
    #[error(
        "the manifest's signature does not verify: it was altered or forged (version {version}, identity {identity})"
    )]
    BadSignature { version: u64, identity: String },
    #[error("the manifest (version {version}) expired at {expired_at} (Unix time), now is {now}: the master or something between us is serving a frozen image; this host is stale (hint: check the master's clock and that it is publishing)")]
    Expired { version: u64, expired_at: u64, now: u64 },
    #[error("the master offers version {offered}, lower than version {highest} already applied here: refusing a rollback (hint: for a deliberate downgrade run `syncd sync --allow-downgrade` once)")]
    Rollback { offered: u64, highest: u64 },
    #[error("the master offers version {version} with identity {offered}, but version {version} applied here had identity {applied}: refusing a different tree under the same number")]
    Substituted { version: u64, offered: String, applied: String },
    #[error("the master offers files rendered for host {offered:?}, and this host is {this:?}: refusing another host's files (hint: check host_id and the master's inventory)")]
    OtherHost { offered: String, this: String },
    #[error("the master offers a render of version {version} with serial {offered}, but this host applied a render of it with serial {applied}: refusing a render that is not newer (hint: check the master's clock; the serial is the time its inventory was loaded)")]
    OlderRender { version: u64, offered: u64, applied: u64 },
}

impl TrustError {
    /// A freeze (expired signature) rather than a forgery.
    pub fn is_stale(&self) -> bool {
        matches!(self, TrustError::Expired { .. })
    }
}

/// Checks that `sig` is a valid, unexpired signature by one of `trusted` over (identity, version).
pub fn verify(
    trusted: &[PublicKey],
    sig: Option<&VersionSignature>,
    identity: &Hash,
    version: u64,
    now_unix: u64,
) -> Result<(), TrustError> {
    verify_bound(trusted, sig, identity, version, None, now_unix)
}

/// [`verify`], for a manifest with files rendered for `binding.host` when `binding` is set (its
/// signature covers the binding too).
pub fn verify_bound(
    trusted: &[PublicKey],
    sig: Option<&VersionSignature>,
    identity: &Hash,
    version: u64,
    binding: Option<&RenderBinding>,
    now_unix: u64,
) -> Result<(), TrustError> {
    let sig = sig.ok_or(TrustError::Unsigned)?;
    let key = trusted
        .iter()
        .find(|k| k.bytes() == sig.public_key)
        .ok_or_else(|| TrustError::UnknownKey(hex::encode(sig.public_key)))?;
    let s = ed25519_dalek::Signature::from_bytes(&sig.signature);
    key.0
        .verify(&message(identity, version, sig.expires_unix, binding), &s)
        .map_err(|_| TrustError::BadSignature { version, identity: identity.to_hex() })?;
    if now_unix >= sig.expires_unix {
        return Err(TrustError::Expired { version, expired_at: sig.expires_unix, now: now_unix });
    }
    Ok(())
}

/// Refuses going back: `offered` must not be lower than the highest version applied, and the
/// same version must be the same tree, or a newer render of it (`offered_serial`, the signed
/// render serial, above `applied_serial`; 0 for a manifest with nothing rendered).
pub fn check_not_rollback(
    applied: Option<(u64, &Hash, u64)>,
    offered: u64,
    identity: &Hash,
    offered_serial: u64,
    allow_downgrade: bool,
) -> Result<(), TrustError> {
    let Some((highest, applied_id, applied_serial)) = applied else { return Ok(()) };
    if allow_downgrade {
        return Ok(());
    }
    if offered < highest {
        return Err(TrustError::Rollback { offered, highest });
    }
    if offered == highest && applied_id != identity {
        if offered_serial == 0 {
            return Err(TrustError::Substituted {
                version: offered,
                offered: identity.to_hex(),
                applied: applied_id.to_hex(),
            });
        }
        if offered_serial <= applied_serial {
            return Err(TrustError::OlderRender { version: offered, offered: offered_serial, applied: applied_serial });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Hash {
        Hash([b; 32])
    }

    #[test]
    fn a_signature_verifies_only_for_what_was_signed() {
        let k = SigningKey::generate();
        let trusted = [k.public()];
        let sig = k.sign(&id(1), 7, 1000);
        assert_eq!(verify(&trusted, Some(&sig), &id(1), 7, 999), Ok(()));
        assert!(matches!(verify(&trusted, Some(&sig), &id(2), 7, 999), Err(TrustError::BadSignature { .. })));
        assert!(matches!(verify(&trusted, Some(&sig), &id(1), 8, 999), Err(TrustError::BadSignature { .. })));
        let mut later = sig.clone();
        later.expires_unix = 5000;
        assert!(matches!(verify(&trusted, Some(&later), &id(1), 7, 999), Err(TrustError::BadSignature { .. })));
        let mut flipped = sig.clone();
        flipped.signature[10] ^= 1;
        assert!(matches!(verify(&trusted, Some(&flipped), &id(1), 7, 999), Err(TrustError::BadSignature { .. })));
    }

    #[test]
    fn unknown_keys_unsigned_and_expired_are_refused() {
        let (k, other) = (SigningKey::generate(), SigningKey::generate());
        let sig = other.sign(&id(1), 7, 1000);
        assert!(matches!(verify(&[k.public()], Some(&sig), &id(1), 7, 1), Err(TrustError::UnknownKey(_))));
        assert_eq!(verify(&[k.public()], None, &id(1), 7, 1), Err(TrustError::Unsigned));
        let sig = k.sign(&id(1), 7, 1000);
        let e = verify(&[k.public()], Some(&sig), &id(1), 7, 1000).unwrap_err();
        assert!(e.is_stale(), "{e}");
    }

    #[test]
    fn rollback_and_substitution_are_refused_unless_overridden() {
        let a = id(1);
        assert!(check_not_rollback(None, 1, &a, 0, false).is_ok());
        assert!(check_not_rollback(Some((5, &a, 0)), 6, &id(2), 0, false).is_ok());
        assert!(check_not_rollback(Some((5, &a, 0)), 5, &a, 0, false).is_ok());
        assert_eq!(
            check_not_rollback(Some((5, &a, 0)), 4, &id(2), 0, false),
            Err(TrustError::Rollback { offered: 4, highest: 5 })
        );
        assert!(matches!(
            check_not_rollback(Some((5, &a, 0)), 5, &id(2), 0, false),
            Err(TrustError::Substituted { .. })
        ));
        assert!(check_not_rollback(Some((5, &a, 0)), 4, &id(2), 0, true).is_ok());
        // A newer render of the applied version is taken; the same or an older one is not.
        assert!(check_not_rollback(Some((5, &a, 100)), 5, &id(2), 101, false).is_ok());
        assert_eq!(
            check_not_rollback(Some((5, &a, 100)), 5, &id(2), 100, false),
            Err(TrustError::OlderRender { version: 5, offered: 100, applied: 100 })
        );
        assert!(check_not_rollback(Some((5, &a, 100)), 5, &a, 100, false).is_ok());
    }

    #[test]
    fn a_rendered_manifest_is_bound_to_its_host_and_serial() {
        let k = SigningKey::generate();
        let trusted = [k.public()];
        let b = RenderBinding { host: "web01".into(), serial: 7 };
        let sig = k.sign_bound(&id(1), 3, 1000, Some(&b));
        assert_eq!(verify_bound(&trusted, Some(&sig), &id(1), 3, Some(&b), 999), Ok(()));
        // Not as a plain manifest, not for another host, not under another serial.
        assert!(verify(&trusted, Some(&sig), &id(1), 3, 999).is_err());
        let other = RenderBinding { host: "web02".into(), serial: 7 };
        assert!(verify_bound(&trusted, Some(&sig), &id(1), 3, Some(&other), 999).is_err());
        let older = RenderBinding { host: "web01".into(), serial: 6 };
        assert!(verify_bound(&trusted, Some(&sig), &id(1), 3, Some(&older), 999).is_err());
        // And a plain signature does not pass for a rendered one.
        let plain = k.sign(&id(1), 3, 1000);
        assert!(verify_bound(&trusted, Some(&plain), &id(1), 3, Some(&b), 999).is_err());
    }

    #[test]
    fn keys_round_trip_through_files_and_text() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        let k = SigningKey::generate();
        k.save(&p).unwrap();
        assert!(k.save(&p).is_err(), "an existing key file was overwritten");
        let back = SigningKey::load(&p).unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(PublicKey::parse(&k.public().to_string()).unwrap(), k.public());
        for bad in ["", "ed25519:", "ed25519:zz", "rsa:00", &format!("ed25519:{}", "00".repeat(31))] {
            assert!(PublicKey::parse(bad).is_err(), "{bad:?} accepted");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(SigningKey::load(&p).err().unwrap().contains("chmod 600"));
    }
}
