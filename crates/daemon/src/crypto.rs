//! The workload API's `encrypt`/`decrypt`.
//!
//! Scheme (verge-specific; aziot's format is not reproduced):
//! * key: `HMAC-SHA256(device_key, "verge-workload-encrypt/{moduleId}/{generationId}")`
//!   — 32 bytes, so AES-256; tied to the module identity's generation;
//! * cipher: AES-256-GCM with a fresh random 96-bit nonce per call;
//! * the caller's `initializationVector` is bound as associated data (the same
//!   IV must be given to decrypt);
//! * ciphertext bytes = `0x01 (version) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom as _;
use verge_core::sas::SharedAccessKey;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// Encryption failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Ciphertext malformed, or wrong key/IV.
    #[error(
        "decryption failed: the ciphertext is malformed or was not produced for this module and initialization vector"
    )]
    Decrypt,
    /// Internal crypto failure.
    #[error("encryption failed")]
    Encrypt,
}

fn key_for(
    device_key: &SharedAccessKey,
    module_id: &str,
    generation_id: &str,
) -> Result<LessSafeKey, CryptoError> {
    let k = device_key.derive(&format!(
        "verge-workload-encrypt/{module_id}/{generation_id}"
    ));
    let unbound = UnboundKey::new(&AES_256_GCM, k.as_bytes()).map_err(|_| CryptoError::Encrypt)?;
    Ok(LessSafeKey::new(unbound))
}

/// Encrypts `plaintext` for the module; `iv` is bound as associated data.
pub fn encrypt(
    device_key: &SharedAccessKey,
    module_id: &str,
    generation_id: &str,
    plaintext: &[u8],
    iv: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let key = key_for(device_key, module_id, generation_id)?;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| CryptoError::Encrypt)?;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(iv), &mut buf)
        .map_err(|_| CryptoError::Encrypt)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    Ok(out)
}

/// Reverses [`encrypt`].
pub fn decrypt(
    device_key: &SharedAccessKey,
    module_id: &str,
    generation_id: &str,
    ciphertext: &[u8],
    iv: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if ciphertext.len() < 1 + NONCE_LEN + 16 || ciphertext[0] != VERSION {
        return Err(CryptoError::Decrypt);
    }
    let key = key_for(device_key, module_id, generation_id).map_err(|_| CryptoError::Decrypt)?;
    let nonce = Nonce::try_assume_unique_for_key(&ciphertext[1..1 + NONCE_LEN])
        .map_err(|_| CryptoError::Decrypt)?;
    let mut buf = ciphertext[1 + NONCE_LEN..].to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(iv), &mut buf)
        .map_err(|_| CryptoError::Decrypt)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SharedAccessKey {
        SharedAccessKey::from_bytes(vec![1u8; 32])
    }

    #[test]
    fn round_trip_and_binding() {
        let c = encrypt(&key(), "modA", "1", b"secret", b"iv").unwrap();
        assert_eq!(decrypt(&key(), "modA", "1", &c, b"iv").unwrap(), b"secret");
        assert_eq!(
            decrypt(&key(), "modB", "1", &c, b"iv"),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(
            decrypt(&key(), "modA", "2", &c, b"iv"),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(
            decrypt(&key(), "modA", "1", &c, b"other"),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(
            decrypt(&key(), "modA", "1", &c[..10], b"iv"),
            Err(CryptoError::Decrypt)
        );
        let c2 = encrypt(&key(), "modA", "1", b"secret", b"iv").unwrap();
        assert_ne!(c, c2, "fresh nonce each time");
    }

    proptest! {
        #[test]
        fn round_trips(data in proptest::collection::vec(any::<u8>(), 0..512), iv in proptest::collection::vec(any::<u8>(), 0..32)) {
            let c = encrypt(&key(), "m", "g", &data, &iv).unwrap();
            prop_assert_eq!(decrypt(&key(), "m", "g", &c, &iv).unwrap(), data);
        }
    }
}
