//! Printing a condition and parsing it again gives the same tree.

use proptest::prelude::*;
use verge_route::{BinaryOp, Expr, Func, Literal, UnaryOp, parse_condition};

const KEYWORDS: [&str; 11] = [
    "and",
    "or",
    "not",
    "true",
    "false",
    "null",
    "undefined",
    "select",
    "from",
    "where",
    "into",
];

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,6}(-[a-z]{1,3})?".prop_filter("keyword", |s| {
        !KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(s))
    })
}

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        any::<String>().prop_map(|s| Expr::Lit(Literal::Str(s))),
        prop_oneof![
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
            (0u32..1000).prop_map(f64::from),
        ]
        .prop_map(|n| Expr::Lit(Literal::Num(n))),
        any::<bool>().prop_map(|b| Expr::Lit(Literal::Bool(b))),
        Just(Expr::Lit(Literal::Null)),
        Just(Expr::Lit(Literal::Undefined)),
        name().prop_map(Expr::Prop),
        name()
            .prop_filter("twin", |s| !s.to_ascii_lowercase().starts_with("twin"))
            .prop_map(Expr::Dollar),
        name()
            .prop_filter("twin", |s| !s.to_ascii_lowercase().starts_with("twin"))
            .prop_map(Expr::SysOnly),
        ("[a-z]{1,5}", 0u32..9, "[a-z]{1,5}")
            .prop_map(|(a, i, b)| Expr::Dollar(format!("body.{a}[{i}].{b}"))),
        "[a-z]{1,5}(\\.[a-z]{1,5}){0,2}".prop_map(Expr::TwinChangeIncludes),
    ]
}

fn binop() -> impl Strategy<Value = BinaryOp> {
    use BinaryOp::*;
    prop::sample::select(vec![
        Coalesce, Or, And, Eq, Ne, Lt, Le, Gt, Ge, Add, Sub, Concat, Mul, Div, Mod,
    ])
}

fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(6, 64, 4, |inner| {
        prop_oneof![
            (
                prop::sample::select(vec![UnaryOp::Not, UnaryOp::Neg]),
                inner.clone()
            )
                .prop_map(|(op, e)| Expr::Unary(op, Box::new(e))),
            (binop(), inner.clone(), inner.clone()).prop_map(|(op, l, r)| Expr::Binary(
                op,
                Box::new(l),
                Box::new(r)
            )),
            (
                prop::sample::select(Func::ALL.to_vec()),
                prop::collection::vec(inner, 1..4)
            )
                .prop_map(|(f, mut args)| {
                    let (lo, hi) = f.arity();
                    while args.len() < lo {
                        args.push(Expr::Lit(Literal::Null));
                    }
                    if let Some(hi) = hi {
                        args.truncate(hi);
                    }
                    Expr::Call(f, args)
                }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn display_then_parse_is_identity(e in expr()) {
        let text = e.to_string();
        let back = parse_condition(&text);
        prop_assert_eq!(back.as_ref(), Ok(&e), "printed: {}", text);
    }

    #[test]
    fn parser_never_panics(s in "\\PC{0,80}") {
        let _ = parse_condition(&s);
        let _ = verge_route::parse_route(&s);
    }
}
