#![no_main]
//! The MQTT property-bag decoder takes attacker-controlled topic text.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok((sys, app)) = verge_core::message::decode_bag(s) {
            // Whatever decodes must re-encode and decode to the same properties.
            let again = verge_core::message::encode_bag(&sys, &app);
            // The length the hub checks at ingest is the length it encodes.
            assert_eq!(
                verge_core::message::encoded_bag_len(&sys, &app),
                again.len()
            );
            let (sys2, app2) =
                verge_core::message::decode_bag(&again).expect("re-encoded bag decodes");
            assert_eq!(sys, sys2);
            assert_eq!(app, app2);
        }
    }
});
