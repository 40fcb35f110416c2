#![no_main]
//! Route text comes from deployment manifests: parsing and evaluating any of it must not panic.
use libfuzzer_sys::fuzz_target;
use verge_core::message::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut msg = Message::new(r#"{"a":{"b":[1,"x",null,true]},"c":"d\u0041"}"#);
    msg.system.content_type = Some("application/json".into());
    msg.system.content_encoding = Some("utf-8".into());
    msg.system.connection_module_id = Some("m".into());
    msg.system.output_name = Some("o".into());
    msg.properties.insert("p", "1");
    let mut scratch = verge_route::Scratch::new();
    if let Ok(route) = verge_route::parse_route(text) {
        let _ = route.source.matches(&msg);
        if let Some(expr) = route.condition {
            // Whatever parses prints back to the same tree.
            let printed = expr.to_string();
            let again = verge_route::parse_condition(&printed).expect("printed condition parses");
            assert_eq!(again, expr);
            let _ = verge_route::Condition::from_expr(expr).matches(&msg, &mut scratch);
        }
    }
    if let Ok(cond) = verge_route::Condition::parse(text) {
        let _ = cond.matches(&msg, &mut scratch);
    }
    // The text as a body, too.
    let mut body_msg = msg.clone();
    body_msg.body = bytes::Bytes::copy_from_slice(data);
    if let Ok(cond) = verge_route::Condition::parse("is_defined($body.a.b[1]) OR $body.c = 'x'") {
        let _ = cond.matches(&body_msg, &mut scratch);
    }
});
