#![no_main]
//! Deployment manifests come from the cloud or a local file: any text must
//! give a typed error or a valid deployment, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = verge_core::manifest::Deployment::parse(s);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(s) {
            let _ = verge_core::manifest::EdgeAgentDesired::from_value(&v);
            let _ = verge_core::manifest::EdgeHubDesired::from_value(&v);
        }
    }
});
