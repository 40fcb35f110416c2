#![no_main]
//! Stored bytes can be corrupted on disk; decoding must fail cleanly, never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = verge_core::message::decode(bytes::Bytes::copy_from_slice(data)) {
        let again = verge_core::message::encode(&m);
        assert_eq!(verge_core::message::decode(again).expect("re-encoded message decodes"), m);
    }
});
