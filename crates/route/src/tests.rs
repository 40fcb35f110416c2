use std::borrow::Cow;

use verge_core::manifest::{DEFAULT_ROUTE_PRIORITY, RouteSpec};
use verge_core::message::{Message, MessageKind};
use verge_core::time::Timestamp;

use crate::*;

fn msg() -> Message {
    let mut m = Message::new(
        r#"{"machine":{"pressure":5.5,"temp":40,"name":"press\u0041","on":true,"nil":null,"arr":[1,"two",{"x":3}]},"ambient":{"temperature":21}}"#,
    );
    m.system.content_type = Some("application/json".into());
    m.system.content_encoding = Some("utf-8".into());
    m.system.connection_device_id = Some("dev1".into());
    m.system.connection_module_id = Some("sensor".into());
    m.system.output_name = Some("out1".into());
    m.system.message_id = Some("mid-1".into());
    m.system.enqueued_time = Some(Timestamp::from_millis(0));
    m.properties.insert("temperature", "31.5");
    m.properties.insert("alert", "high");
    m.properties.insert("$messageId", "app-wins");
    m.properties.insert("empty", "");
    m
}

#[derive(Debug, PartialEq)]
enum V {
    U,
    N,
    B(bool),
    F(f64),
    S(&'static str),
    C,
}

fn eval(cond: &str, m: &Message) -> Value<'static> {
    let c = Condition::parse(cond).unwrap_or_else(|e| panic!("{cond}: {e}"));
    let mut s = Scratch::new();
    match c.evaluate(m, &mut s) {
        Value::Str(x) => Value::Str(Cow::Owned(x.into_owned())),
        Value::Undefined => Value::Undefined,
        Value::Null => Value::Null,
        Value::Bool(b) => Value::Bool(b),
        Value::Num(n) => Value::Num(n),
        Value::Complex => Value::Complex,
    }
}

fn check(cases: &[(&str, V)]) {
    let m = msg();
    for (cond, want) in cases {
        let got = eval(cond, &m);
        let ok = match (&got, want) {
            (Value::Undefined, V::U) | (Value::Null, V::N) | (Value::Complex, V::C) => true,
            (Value::Bool(a), V::B(b)) => a == b,
            (Value::Num(a), V::F(b)) => (a - b).abs() < 1e-9,
            (Value::Str(a), V::S(b)) => a == b,
            _ => false,
        };
        assert!(ok, "{cond}: got {got:?}, want {want:?}");
        // The printed form evaluates the same.
        let printed = parse_condition(cond).unwrap().to_string();
        assert_eq!(eval(&printed, &m), got, "{cond} printed as {printed}");
    }
}

use V::*;

#[test]
fn literals() {
    check(&[
        ("'a\\'b'", S("a'b")),
        ("\"x\\\"y\"", S("x\"y")),
        ("'\\u0041\\\\'", S("A\\")),
        ("42", F(42.0)),
        ("4.5", F(4.5)),
        (".5", F(0.5)),
        ("1e3", F(1000.0)),
        ("2.5E-1", F(0.25)),
        ("0x1F", F(31.0)),
        ("-3", F(-3.0)),
        ("true", B(true)),
        ("false", B(false)),
        ("null", N),
        ("undefined", U),
    ]);
}

#[test]
fn arithmetic_and_concat() {
    check(&[
        ("1 + 2 * 3", F(7.0)),
        ("(1 + 2) * 3", F(9.0)),
        ("10 - 4 - 3", F(3.0)),
        ("12 / 4 / 3", F(1.0)),
        ("7 % 4", F(3.0)),
        ("-(2 + 3)", F(-5.0)),
        ("- -2", F(2.0)),
        ("1 / 0 > 1000", B(true)),
        ("'a' || 'b' || 'c'", S("abc")),
        ("'a' + 'b'", U),
        ("1 || 'b'", U),
        ("temperature + 1", U),
        ("undefined + 1", U),
        ("-'x'", U),
        ("$body.machine.temp * 2", F(80.0)),
        ("$body.machine.temp % 7", F(5.0)),
    ]);
}

#[test]
fn comparisons_and_type_mismatch() {
    check(&[
        ("1 = 1", B(true)),
        ("1 != 1", B(false)),
        ("1 <> 2", B(true)),
        ("1 < 2", B(true)),
        ("2 <= 2", B(true)),
        ("3 > 2", B(true)),
        ("2 >= 3", B(false)),
        ("'a' < 'b'", B(true)),
        ("'B' < 'a'", B(true)),
        ("'a' = 'A'", B(false)),
        ("true = true", B(true)),
        ("true != false", B(true)),
        ("true < false", U),
        ("null = null", B(true)),
        ("null = 1", U),
        ("1 = '1'", U),
        // Application properties are strings: comparing with a number is undefined.
        ("temperature > 30", U),
        ("temperature = '31.5'", B(true)),
        ("as_number(temperature) > 30", B(true)),
        ("missing = 'x'", U),
        ("missing != 'x'", U),
        ("$body.machine = 1", U),
        ("$body.machine.nil = null", B(true)),
        ("$body.machine.on = true", B(true)),
        ("$body.machine.pressure < 10", B(true)),
        ("$body.machine.name = 'pressA'", B(true)),
    ]);
}

#[test]
fn logic_three_valued() {
    check(&[
        ("true AND true", B(true)),
        ("true and false", B(false)),
        ("false AND undefined", B(false)),
        ("undefined AND false", B(false)),
        ("undefined AND true", U),
        ("true OR undefined", B(true)),
        ("undefined or true", B(true)),
        ("false OR undefined", U),
        ("false OR false", B(false)),
        ("NOT true", B(false)),
        ("not undefined", U),
        ("NOT 1", U),
        ("NOT NOT true", B(true)),
        // NOT binds tighter than comparison (IoT Edge's grammar).
        ("NOT 1 = 1", U),
        ("NOT (1 = 1)", B(false)),
        ("1 AND true", U),
        ("null OR true", B(true)),
        ("null AND true", U),
        ("undefined ?? 5", F(5.0)),
        ("null ?? 5", N),
        ("missing ?? alert", S("high")),
        ("missing ?? other ?? 'd'", S("d")),
        ("1 = 1 OR 1 = 2 AND false", B(true)),
        ("true ?? false OR true", B(true)),
    ]);
}

#[test]
fn functions() {
    check(&[
        ("abs(-2)", F(2.0)),
        ("ABS('x')", U),
        ("exp(0)", F(1.0)),
        ("power(2, 10)", F(1024.0)),
        ("power(2, 'a')", U),
        ("square(3)", F(9.0)),
        ("ceiling(1.2)", F(2.0)),
        ("floor(-1.2)", F(-2.0)),
        ("sign(-4)", F(-1.0)),
        ("sign(0)", F(0.0)),
        ("sign(9)", F(1.0)),
        ("sqrt(16)", F(4.0)),
        ("sqrt(-1)", U),
        ("as_number('12.5')", F(12.5)),
        ("as_number(' 7 ')", F(7.0)),
        ("as_number('abc')", U),
        ("as_number('inf')", U),
        ("as_number(true)", U),
        ("as_number(3)", F(3.0)),
        ("is_bool(true)", B(true)),
        ("is_bool(1)", B(false)),
        ("is_defined(missing)", B(false)),
        ("is_defined(alert)", B(true)),
        ("is_defined($body.machine)", B(true)),
        ("is_null(null)", B(true)),
        ("is_null(undefined)", B(false)),
        ("is_null($body.machine.nil)", B(true)),
        ("is_number(1)", B(true)),
        ("is_number('1')", B(false)),
        ("is_string('1')", B(true)),
        ("is_string(undefined)", B(false)),
        ("concat('a', 'b', alert)", S("abhigh")),
        ("concat('a')", S("a")),
        ("concat('a', 1)", U),
        ("length('héllo')", F(5.0)),
        ("length(1)", U),
        ("lower('AbC')", S("abc")),
        ("upper('AbC')", S("ABC")),
        ("lower(1)", U),
        ("substring('hello', 1)", S("ello")),
        ("substring('hello', 1, 3)", S("ell")),
        ("substring('hello', 5)", S("")),
        ("substring('hello', 6)", U),
        ("substring('hello', 1, 9)", U),
        ("substring('hello', 1.5)", U),
        ("substring('hello', -1)", U),
        ("substring(concat('ab', 'cd'), 2)", S("cd")),
        ("index_of('hello', 'l')", F(2.0)),
        ("index_of('héllo', 'l')", F(2.0)),
        ("index_of('hello', 'z')", F(-1.0)),
        ("index_of(1, 'z')", U),
        ("starts_with('hello', 'he')", B(true)),
        ("starts_with('hello', 'He')", B(false)),
        ("ends_with('hello', 'lo')", B(true)),
        ("contains('hello', 'ell')", B(true)),
        ("contains('hello', 1)", U),
        ("CONTAINS($connectionModuleId, 'ens')", B(true)),
        ("Is_Defined($connectionModuleId)", B(true)),
    ]);
}

#[test]
fn properties() {
    check(&[
        ("alert", S("high")),
        ("Alert", U),
        ("$connectionModuleId", S("sensor")),
        ("$CONNECTIONMODULEID", S("sensor")),
        ("{$connectionModuleId}", S("sensor")),
        ("$connectionDeviceId = 'dev1'", B(true)),
        ("$iothub-connection-device-id", S("dev1")),
        ("$outputName", S("out1")),
        // An application property named `$messageId` wins over the system property …
        ("$messageId", S("app-wins")),
        // … unless the system property is forced.
        ("{$messageId}", S("mid-1")),
        ("$enqueuedTime", S("1970-01-01T00:00:00.000Z")),
        ("$nosuch", U),
        ("{$nosuch}", U),
        ("$contentType", S("application/json")),
        ("empty = ''", B(true)),
        ("$body.machine.arr[0]", F(1.0)),
        ("$body.machine.arr[1]", S("two")),
        ("$body.machine.arr[2].x", F(3.0)),
        ("$body.machine.arr[3]", U),
        ("$body.machine['temp']", F(40.0)),
        ("$BODY.machine.temp", F(40.0)),
        ("{$body.machine.temp}", F(40.0)),
        ("$body.machine.Temp", U),
        ("$body.machine.arr", C),
        ("$x[0]", U),
        ("$body.ambient.temperature + $body.machine.temp", F(61.0)),
    ]);
}

fn body_msg(body: Vec<u8>, ct: Option<&str>, ce: Option<&str>) -> Message {
    let mut m = Message::new(body);
    m.system.content_type = ct.map(Into::into);
    m.system.content_encoding = ce.map(Into::into);
    m
}

#[test]
fn body_requires_json_content_type_and_encoding() {
    let json = br#"{"a":{"b":7}}"#.to_vec();
    let q = "$body.a.b = 7";
    let ok = |m: &Message| eval(q, m) == Value::Bool(true);
    assert!(ok(&body_msg(
        json.clone(),
        Some("application/json"),
        Some("utf-8")
    )));
    assert!(ok(&body_msg(
        json.clone(),
        Some("APPLICATION/JSON"),
        Some("UTF-8")
    )));
    assert!(!ok(&body_msg(
        json.clone(),
        Some("text/plain"),
        Some("utf-8")
    )));
    assert!(!ok(&body_msg(json.clone(), Some("application/json"), None)));
    assert!(!ok(&body_msg(json.clone(), None, Some("utf-8"))));
    assert!(!ok(&body_msg(
        json.clone(),
        Some("application/json"),
        Some("latin1")
    )));
    // UTF-16 LE (default), UTF-16 BE with BOM, UTF-32 LE.
    let text = r#"{"a":{"b":7}}"#;
    let le16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert!(ok(&body_msg(
        le16,
        Some("application/json"),
        Some("utf-16")
    )));
    let mut be16 = vec![0xFE, 0xFF];
    be16.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    assert!(ok(&body_msg(
        be16,
        Some("application/json"),
        Some("UTF-16")
    )));
    let le32: Vec<u8> = text
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    assert!(ok(&body_msg(
        le32,
        Some("application/json"),
        Some("utf-32")
    )));
    // UTF-8 with BOM.
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(text.as_bytes());
    assert!(ok(&body_msg(bom, Some("application/json"), Some("utf-8"))));
    // Malformed JSON anywhere makes every body query undefined.
    for bad in [
        &br#"{"a":{"b":7}"#[..],
        br#"{"a":{"b":7}} x"#,
        br#"{"a":{"b":07}}"#,
        br#"{"a":{"b":7},}"#,
        br#"{"a":{"b":7},"c":"\q"}"#,
        b"",
        b"\xff",
    ] {
        let m = body_msg(bad.to_vec(), Some("application/json"), Some("utf-8"));
        assert_eq!(eval("$body.a.b", &m), Value::Undefined, "{bad:?}");
    }
    // Escaped keys and strings, duplicate keys (last wins).
    let m = body_msg(
        br#"{"k\u0065y":"v\n","d":1,"d":2}"#.to_vec(),
        Some("application/json"),
        Some("utf-8"),
    );
    assert_eq!(eval("$body.key", &m), Value::Str("v\n".into()));
    assert_eq!(eval("$body.d", &m), Value::Num(2.0));
    // Deep nesting is rejected, not a stack overflow.
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let m = body_msg(deep.into_bytes(), Some("application/json"), Some("utf-8"));
    assert_eq!(eval("$body[0]", &m), Value::Undefined);
}

#[test]
fn twin_change_includes() {
    let mut m = Message::new(r#"{"properties":{"reported":{"x":1,"gone":null}}}"#);
    m.kind = MessageKind::TwinChangeNotification;
    let c = |s: &str| eval(s, &m);
    assert_eq!(
        c("twin_change_includes(properties.reported.x)"),
        Value::Bool(true)
    );
    assert_eq!(
        c("TWIN_CHANGE_INCLUDES(properties.reported.gone)"),
        Value::Bool(true)
    );
    assert_eq!(
        c("twin_change_includes(properties.reported.y)"),
        Value::Bool(false)
    );
    assert_eq!(
        c("twin_change_includes('properties.reported.x')"),
        Value::Bool(true)
    );
    assert_eq!(c("$body.properties.reported.x = 1"), Value::Bool(true));
    let t = msg();
    assert_eq!(
        eval("twin_change_includes(machine.temp)", &t),
        Value::Undefined
    );
    assert!(Condition::parse("twin_change_includes(1 + 2)").is_err());
    assert!(Condition::parse("twin_change_includes(a, b)").is_err());
}

fn src_msg(kind: MessageKind, module: Option<&str>, output: Option<&str>) -> Message {
    let mut m = Message::new("x");
    m.kind = kind;
    m.system.connection_module_id = module.map(Into::into);
    m.system.output_name = output.map(Into::into);
    m
}

#[test]
fn sources() {
    use MessageKind::{Telemetry as T, TwinChangeNotification as W};
    let device = src_msg(T, None, None);
    let module = src_msg(T, Some("m"), None);
    let out_o = src_msg(T, Some("m"), Some("o"));
    let out_o2 = src_msg(T, Some("m"), Some("o2"));
    let other = src_msg(T, Some("mm"), Some("o"));
    let twin = src_msg(W, None, None);
    let all = [&device, &module, &out_o, &out_o2, &other, &twin];
    let cases: &[(&str, [bool; 6])] = &[
        ("/*", [true; 6]),
        ("/messages/*", [true, true, true, true, true, false]),
        ("/messages", [true, true, true, true, true, false]),
        (
            "/messages/modules/*",
            [false, true, true, true, true, false],
        ),
        (
            "/messages/modules/m/*",
            [false, true, true, true, false, false],
        ),
        (
            "/messages/modules/m",
            [false, true, true, true, false, false],
        ),
        (
            "/messages/modules/m/outputs/*",
            [false, false, true, true, false, false],
        ),
        (
            "/messages/modules/m/outputs/o",
            [false, false, true, false, false, false],
        ),
        (
            "/MESSAGES/Modules/M/OUTPUTS/O",
            [false, false, true, false, false, false],
        ),
        (
            "/messages/modules/m/outputs/o2",
            [false, false, false, true, false, false],
        ),
        (
            "/twinChangeNotifications",
            [false, false, false, false, false, true],
        ),
        (
            "/TWINCHANGENOTIFICATIONS/*",
            [false, false, false, false, false, true],
        ),
        ("/unknown", [false; 6]),
    ];
    for (src, want) in cases {
        let s = Source::new(src);
        for (m, w) in all.iter().zip(want) {
            assert_eq!(s.matches(m), *w, "{src} vs {:?}", m.system);
            // The route set's form: one path per message, a prefix compare per route.
            let mut path = Vec::new();
            crate::route::source_path(m, &mut path);
            assert_eq!(s.matches_path(&path), *w, "{src} vs path {path:?}");
        }
    }
}

#[test]
fn sinks() {
    let ok = |r: &str| parse_route(r).map(|p| p.endpoint);
    assert_eq!(ok("FROM /* INTO $upstream"), Ok(Endpoint::Upstream));
    assert_eq!(ok("from /* into $UPSTREAM"), Ok(Endpoint::Upstream));
    let mi = Endpoint::ModuleInput {
        module: "filter".into(),
        input: "in1".into(),
    };
    assert_eq!(
        ok(r#"FROM /* INTO BrokeredEndpoint("/modules/filter/inputs/in1")"#),
        Ok(mi.clone())
    );
    assert_eq!(
        ok(r#"FROM /* INTO brokeredendpoint('/modules/filter/inputs/in1')"#),
        Ok(mi.clone())
    );
    assert_eq!(mi.id(), "modules/filter/inputs/in1");
    assert_eq!(Endpoint::Upstream.id(), "$upstream");
    assert!(Endpoint::Upstream < mi);
    for bad in [
        "FROM /* INTO $downstream",
        "FROM /* INTO upstream",
        r#"FROM /* INTO BrokeredEndpoint("/modules/filter/inputs")"#,
        r#"FROM /* INTO BrokeredEndpoint("/modules/filter/inputs/in1/x")"#,
        r#"FROM /* INTO BrokeredEndpoint("/devices/filter/inputs/in1")"#,
        r#"FROM /* INTO BrokeredEndpoint("/modules//inputs/in1")"#,
        r#"FROM /* INTO OtherEndpoint("/modules/filter/inputs/in1")"#,
        r#"FROM /* INTO BrokeredEndpoint(/modules/filter/inputs/in1)"#,
        r#"FROM /* INTO BrokeredEndpoint("/modules/filter/inputs/in1""#,
        "FROM /* INTO $upstream extra",
        "FROM /* INTO",
    ] {
        assert!(parse_route(bad).is_err(), "{bad}");
    }
}

#[test]
fn route_syntax() {
    for good in [
        "FROM /messages/* INTO $upstream",
        "SELECT * FROM /messages/* INTO $upstream",
        "select * from /messages/* where true into $upstream",
        "FROM /messages/modules/sensor/outputs/* WHERE $body.x > 1 AND alert = 'high' INTO $upstream",
        "/* lead */ FROM /* /* c */ WHERE /* c */ true /* c */ INTO /* c */ $upstream /* end */",
        "FROM /messages/*\n  WHERE NOT IS_DEFINED($connectionModuleId)\n  INTO $upstream",
    ] {
        assert!(parse_route(good).is_ok(), "{good}: {:?}", parse_route(good));
    }
}

fn err(route: &str) -> String {
    let specs = [RouteSpec {
        name: "r1".into(),
        route: route.into(),
        priority: 0,
        time_to_live_secs: 0,
    }];
    match RouteSet::new(&specs) {
        Ok(_) => panic!("{route} parsed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn error_positions() {
    let cases = [
        (
            "FROM /messages/* WHERE a = 1 $upstream",
            "route \"r1\" 1:30: expected INTO, found `$upstream`",
        ),
        (
            "FROM /messages/* $upstream",
            "route \"r1\" 1:18: expected WHERE or INTO, found `$upstream`",
        ),
        (
            "SELECT FROM /* INTO $upstream",
            "route \"r1\" 1:8: expected `*` after SELECT, found `FROM`",
        ),
        (
            "INTO $upstream",
            "route \"r1\" 1:1: expected FROM, found `INTO`",
        ),
        (
            "FROM messages INTO $upstream",
            "route \"r1\" 1:6: expected a source path starting with `/`",
        ),
        (
            "FROM /*\nWHERE a = \nINTO $upstream",
            "route \"r1\" 3:1: expected an expression, found keyword `INTO`",
        ),
        (
            "FROM /* WHERE (a = 1 INTO $upstream",
            "route \"r1\" 1:22: expected `)`, found `INTO`",
        ),
        (
            "FROM /* WHERE a = 'x INTO $upstream",
            "route \"r1\" 1:19: unterminated string",
        ),
        (
            "FROM /* WHERE nope(1) INTO $upstream",
            "route \"r1\" 1:15: unknown function `nope`",
        ),
        (
            "FROM /* WHERE abs(1, 2) INTO $upstream",
            "route \"r1\" 1:15: abs() takes 1 argument(s), got 2",
        ),
        (
            "FROM /* WHERE a ! b INTO $upstream",
            "route \"r1\" 1:17: unexpected character `!`",
        ),
        (
            "FROM /* WHERE 12abc INTO $upstream",
            "route \"r1\" 1:15: invalid number",
        ),
        (
            "FROM /* WHERE $twin.tags.x = 1 INTO $upstream",
            "route \"r1\" 1:15: `$twin` queries are not supported on IoT Edge",
        ),
        (
            "FROM /* WHERE $body.a[x] INTO $upstream",
            "route \"r1\" 1:15: invalid body path `$body.a[x]`",
        ),
        (
            "FROM /* WHERE /* open INTO $upstream",
            "route \"r1\" 1:15: unterminated comment",
        ),
    ];
    for (route, want) in cases {
        assert_eq!(err(route), want, "{route}");
    }
    let deep = format!(
        "FROM /* WHERE {}1{} INTO $upstream",
        "(".repeat(500),
        ")".repeat(500)
    );
    assert!(err(&deep).contains("nested too deeply"));
    let long = format!("FROM /* WHERE 1{} INTO $upstream", " + 1".repeat(500));
    assert!(err(&long).contains("nested too deeply"));
}

fn spec(name: &str, route: &str, priority: u32, ttl: u32) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        route: route.into(),
        priority,
        time_to_live_secs: ttl,
    }
}

#[test]
fn priority_and_ttl_resolution() {
    let set = RouteSet::new(&[
        spec(
            "low",
            "FROM /messages/* INTO $upstream",
            DEFAULT_ROUTE_PRIORITY,
            0,
        ),
        spec(
            "high",
            "FROM /messages/modules/sensor/* INTO $upstream",
            1,
            60,
        ),
        spec(
            "higher-but-no-match",
            "FROM /messages/* WHERE alert = 'low' INTO $upstream",
            0,
            5,
        ),
        spec(
            "b",
            r#"FROM /* INTO BrokeredEndpoint("/modules/f/inputs/i")"#,
            3,
            10,
        ),
        spec(
            "a",
            r#"FROM /* INTO BrokeredEndpoint("/modules/f/inputs/i")"#,
            3,
            20,
        ),
        spec(
            "twin",
            r#"FROM /twinChangeNotifications INTO BrokeredEndpoint("/modules/t/inputs/i")"#,
            0,
            0,
        ),
    ])
    .unwrap();
    assert_eq!(set.len(), 6);
    assert_eq!(set.endpoints().len(), 3);
    let m = msg();
    let got: Vec<_> = set
        .route(&m)
        .into_iter()
        .map(|r| {
            (
                r.endpoint.id(),
                r.priority,
                r.ttl_secs,
                r.route_name.to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("$upstream".into(), 1, 60, "high".into()),
            ("modules/f/inputs/i".into(), 3, 20, "a".into()),
        ]
    );
    // A device message only matches the default-priority route.
    let mut d = msg();
    d.system.connection_module_id = None;
    let r = set.route(&d);
    let up = r
        .iter()
        .find(|m| *m.endpoint == Endpoint::Upstream)
        .unwrap();
    assert_eq!(up.route_name, "low");
    assert_eq!(up.priority, DEFAULT_ROUTE_PRIORITY);
    // Reusing buffers gives the same answer and clears old results.
    let mut scratch = Scratch::new();
    let mut out = Vec::new();
    set.evaluate(&m, &mut scratch, &mut out);
    set.evaluate(&m, &mut scratch, &mut out);
    assert_eq!(out.len(), 2);
    let mut t = Message::new("{}");
    t.kind = MessageKind::TwinChangeNotification;
    set.evaluate(&t, &mut scratch, &mut out);
    let names: Vec<_> = out.iter().map(|r| r.route_name).collect();
    assert_eq!(names, ["twin", "a"]);
}

#[test]
fn route_set_rejects_all_bad_routes() {
    let e = RouteSet::new(&[
        spec("ok", "FROM /* INTO $upstream", 0, 0),
        spec("bad1", "FROM /* INTO nowhere", 0, 0),
        spec("bad2", "FROM /* WHERE INTO $upstream", 0, 0),
    ])
    .unwrap_err();
    assert_eq!(e.errors.len(), 2);
    assert_eq!(e.errors[0].route, "bad1");
    assert_eq!(e.errors[1].route, "bad2");
    assert!(
        e.to_string()
            .starts_with("route \"bad1\" 1:14: expected $upstream")
    );
}

#[test]
fn body_routes_share_one_scan() {
    let specs: Vec<_> = (0..50)
        .map(|i| {
            spec(
                &format!("r{i}"),
                &format!(
                    r#"FROM /messages/* WHERE $body.machine.temp > {i} AND $body.ambient.temperature = 21 INTO BrokeredEndpoint("/modules/m{i}/inputs/in")"#
                ),
                0,
                0,
            )
        })
        .collect();
    let set = RouteSet::new(&specs).unwrap();
    assert_eq!(set.route(&msg()).len(), 40);
}

#[test]
fn constant_folding_keeps_semantics() {
    let c = Condition::parse("1 + 2 = 3 AND upper('a') = 'A' AND alert = 'high'").unwrap();
    assert!(c.matches(&msg(), &mut Scratch::new()));
    assert!(!c.uses_body());
}

#[test]
fn display_round_trips_examples() {
    for s in [
        "a = 1",
        "NOT (a = 1)",
        "(NOT a) = 1",
        "-(1)",
        "-(-1)",
        "a - -1",
        "a - (b - c)",
        "(a ?? b) ?? c",
        "a ?? (b ?? c)",
        "x || 'it''s'".replace("''", "\\'").as_str(),
        "concat($body.a[0], {$messageId}, 'x\\u0001')",
        "twin_change_includes(properties.reported.x)",
        "power(-2, 3) * (1 + 2) % 4",
        "1e999 > 0",
    ] {
        let e = parse_condition(s).unwrap();
        let printed = e.to_string();
        assert_eq!(parse_condition(&printed).unwrap(), e, "{s} -> {printed}");
    }
}
