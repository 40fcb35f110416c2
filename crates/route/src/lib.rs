//! IoT Hub's route language, as IoT Edge's hub runs it: parse once, compile, evaluate fast.
//!
//! Pure and synchronous: no I/O, no async.
//!
//! # Language
//!
//! `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`. Keywords are case-insensitive.
//! `/* … */` comments may appear wherever whitespace may.
//!
//! **Sources.** A `/`-path. A trailing `*` is stripped and the result is made to end in exactly
//! one `/`. A message's source path is `/twinChangeNotifications/` for twin change notifications.
//! Telemetry from a module `m` through output `o` has `/messages/modules/{m}/outputs/{o}/`.
//! Telemetry from `m` without an output has `/messages/modules/{m}/`, and device telemetry has
//! `/messages/`. A route matches when its source is a case-insensitive (ASCII) prefix of the
//! message's path. So `/*` takes everything. `/messages/*` takes all telemetry.
//! `/messages/modules/m/outputs/o` matches output `o` but not `o2`. Matching does not allocate.
//! Unknown source paths are accepted and simply never match.
//!
//! **Sinks.** `$upstream` (case-insensitive) or `BrokeredEndpoint("/modules/{m}/inputs/{i}")`.
//! The function name is case-insensitive, and the path has exactly four parts. Anything else is
//! a parse error. See [`Endpoint`].
//!
//! **Conditions.** The operators, loosest first, are: `??` < `OR` < `AND` < `=` `!=` `<>` <
//! `<` `<=` `>` `>=` < `+` `-` `||` < `*` `/` `%` < prefix `NOT` and `-`. All binary operators
//! are left-associative. As in IoT Edge's grammar, `NOT` binds tighter than comparisons, so
//! `NOT a = b` means `(NOT a) = b`.
//!
//! Literals: `'…'` and `"…"` strings, with `\\ \' \" \/ \n \t \r \b \f \uXXXX` escapes.
//! Numbers come as integers, reals, exponents or `0x…` hex, and all are doubles. The other
//! literals are `true`, `false`, `null` and `undefined`. These four are lower-case only, as in
//! the grammar. `AND`/`OR`/`NOT` are case-insensitive.
//!
//! Names work as follows:
//! - A bare `name` reads the application property `name` (case-sensitive).
//! - `$name` reads the application property literally named `$name` if the message has one.
//!   Otherwise it reads the system property `name`, case-insensitively. The long forms such as
//!   `$iothub-connection-device-id` and `$dt-dataschema` also work.
//! - `{$name}` reads only the system property.
//! - `$body.a.b[0]` and `$body['a']` are body queries.
//! - Any `$name` with `[`/`]` that is not a body query is `undefined`.
//! - `$twin…` is rejected, because IoT Edge has no twin queries.
//! - A `-` between name characters is part of the name (`$dt-subject`, `a-b`). Write
//!   subtraction with spaces: `a - b`.
//!
//! Functions are case-insensitive. They are `abs exp power square ceiling floor sign sqrt
//! as_number is_bool is_defined is_null is_number is_string concat length lower upper
//! substring index_of starts_with ends_with contains twin_change_includes`. Arity is checked
//! at parse time.
//!
//! # Semantics
//!
//! Evaluation has three-valued logic:
//! - `undefined` propagates through every operator and function except `??`, `AND`/`OR` and
//!   the `is_*` functions.
//! - `AND` is `false` if either side is `false` and `true` if both are `true`. Otherwise it is
//!   `undefined`. `OR` is the dual.
//! - `a ?? b` is `a` unless `a` is `undefined`. `null` counts as defined.
//! - A route matches only when its condition is exactly boolean `true`.
//!
//! Choices made where IoT Hub's documentation is ambiguous:
//! - **Application and system properties are strings.** Comparing one with a number is a type
//!   mismatch and gives `undefined`, so `temperature > 30` never matches when `temperature` is
//!   the property `"31.5"`. IoT Edge's compiler types property access as `string` and turns
//!   mismatched comparisons into `undefined`. Use `as_number(temperature) > 30`. Time-valued
//!   system properties (`$enqueuedTime`, …) read as ISO 8601 strings.
//! - Comparisons work between two numbers, or two strings (ordinal, case-sensitive, compared
//!   by Unicode code point). `=`/`!=` also work between two booleans and between two `null`s.
//!   Every other pairing, and any use of a JSON object or array, is `undefined`.
//! - Arithmetic is IEEE double: `x / 0` is infinite. Math functions that give NaN give
//!   `undefined`.
//! - `||`/`concat` need strings. `length`, `substring` and `index_of` count Unicode scalar
//!   values. `substring(s, start[, len])` is `undefined` if the range is not made of whole
//!   numbers inside `s`. `as_number` accepts a number, or a decimal string with optional
//!   surrounding whitespace.
//! - `$body` values keep their JSON types. The body is readable only when contentType is
//!   `application/json` and contentEncoding is `utf-8`/`utf-16`/`utf-32` (both
//!   case-insensitive). Twin change notifications without a contentType are read as UTF-8
//!   JSON. UTF-16/32 honour a BOM and otherwise default to little-endian, as .NET does. A UTF-8
//!   BOM is skipped. A body that is not valid JSON makes every body query `undefined`. Invalid
//!   UTF-8 inside a JSON string is read lossily (U+FFFD), as .NET's decoder does. Key lookup is
//!   case-sensitive, and for duplicate keys the last one wins.
//! - `twin_change_includes(properties.reported.x)` is true on a twin change notification whose
//!   JSON body contains that path (any value, including `null`, which deletes a property), and
//!   false when it doesn't. It is `undefined` on telemetry or when the body is unreadable. The
//!   path is taken from the body root.
//! - Priority: for each endpoint, the matching route with the lowest priority number wins.
//!   Ties go to the lowest route name, and the winner supplies the TTL. 0 means "global TTL".
//!
//! # Evaluation design
//!
//! Text is parsed by a hand-written lexer and Pratt parser into an [`Expr`]. Errors carry
//! `line:column`. `Display` on [`Expr`] prints text that parses back to the same tree. The
//! tree is then compiled:
//! - System property names are resolved to [`verge_core::message::SystemProperty`].
//! - Literals are pre-parsed.
//! - Operators whose operands are all constants are folded.
//! - Every body path of a [`RouteSet`] (or [`Condition`]) goes into one path trie with a
//!   result slot per distinct path.
//!
//! The first condition that needs `$body` triggers a single pass over the body. UTF-8 bodies
//! are scanned in place, and UTF-16/32 bodies are first decoded into a reused buffer. The pass
//! checks that the body is valid JSON and records the value at every trie path, skipping other
//! subtrees without allocating. Subtrees no path reaches are only validated, by a loop that keeps
//! open containers as bits; strings are searched eight bytes at a time, and only numbers that
//! land in a slot are converted (plain decimals of up to 15 digits by one exact division).
//! Later body reads, from any route in the same [`RouteSet::evaluate`] call, are slot lookups.
//! A route set builds the message's lower-cased source path once per call, so each route's
//! source is one prefix compare.
//!
//! Property reads borrow `&str` from the message. With a warmed-up [`Scratch`], evaluation
//! allocates only for `||`, `concat`, `lower`, `upper`, JSON strings containing escapes, and
//! time-valued system properties.
//!
//! Routes are kept sorted by (priority, name). Once an endpoint has a match, later routes to
//! it are skipped without evaluating their conditions.

mod ast;
mod error;
mod eval;
mod json;
mod parse;
mod route;

#[cfg(test)]
mod tests;

pub use ast::{BinaryOp, Expr, Func, Literal, UNARY_PRECEDENCE, UnaryOp};
pub use error::{ParseError, RouteError, RouteSetError};
pub use eval::{Condition, Scratch, Value};
pub use parse::MAX_DEPTH;
pub use route::{Endpoint, ParsedRoute, RouteMatch, RouteSet, Source, parse_route};

/// Parses a condition (the text after WHERE) without compiling it.
pub fn parse_condition(text: &str) -> Result<Expr, ParseError> {
    parse::Parser::new(text).condition()
}
