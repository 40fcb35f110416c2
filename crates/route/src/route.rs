//! Sources, sinks, routes and route sets.

use std::collections::BTreeMap;
use std::fmt;

use verge_core::manifest::RouteSpec;
use verge_core::message::{Message, MessageKind};

use crate::ast::Expr;
use crate::error::{ParseError, RouteError, RouteSetError};
use crate::eval::{Compiler, Ctx, Node, Scratch};
use crate::json::Trie;
use crate::parse::Parser;

/// Where a route sends messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// `$upstream`: IoT Hub.
    Upstream,
    /// `BrokeredEndpoint("/modules/{module}/inputs/{input}")`.
    ModuleInput {
        /// Target module id.
        module: String,
        /// Target input name.
        input: String,
    },
}

impl Endpoint {
    /// Parses a BrokeredEndpoint path: `/modules/{m}/inputs/{i}` (leading `/` optional; the
    /// words `modules` and `inputs` are case-insensitive; exactly four non-empty parts).
    pub fn from_brokered_path(path: &str) -> Option<Self> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let mut parts = trimmed.split('/');
        let (Some(m), Some(module), Some(i), Some(input), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let ok = m.eq_ignore_ascii_case("modules")
            && i.eq_ignore_ascii_case("inputs")
            && !module.is_empty()
            && !input.is_empty()
            && !module.contains(char::is_whitespace)
            && !input.contains(char::is_whitespace);
        ok.then(|| Self::ModuleInput {
            module: module.to_owned(),
            input: input.to_owned(),
        })
    }

    /// Stable identifier: `$upstream` or `modules/{m}/inputs/{i}` (also the `Display` form).
    pub fn id(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Upstream => f.write_str("$upstream"),
            Endpoint::ModuleInput { module, input } => write!(f, "modules/{module}/inputs/{input}"),
        }
    }
}

/// A route's FROM clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    text: String,
    /// ASCII-lower-cased, `*` stripped, ending in exactly one `/`.
    prefix: String,
}

impl Source {
    /// A source path as written (e.g. `/messages/modules/m/outputs/*`).
    pub fn new(text: &str) -> Self {
        let mut prefix = text.strip_suffix('*').unwrap_or(text).to_ascii_lowercase();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self {
            text: text.to_owned(),
            prefix,
        }
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Case-insensitive prefix match against the message's source path (see the crate docs).
    /// Does not allocate.
    pub fn matches(&self, msg: &Message) -> bool {
        let mut want = self.prefix.as_bytes();
        let mut eat = |piece: &str| -> bool {
            // Returns true when the whole prefix has been consumed.
            let n = piece.len().min(want.len());
            if !piece.as_bytes()[..n].eq_ignore_ascii_case(&want[..n]) {
                want = b"\xff"; // poison: can never match
                return false;
            }
            want = &want[n..];
            want.is_empty()
        };
        let done = match msg.kind {
            MessageKind::TwinChangeNotification => eat("/twinChangeNotifications/"),
            MessageKind::Telemetry => match nonempty(&msg.system.connection_module_id) {
                None => eat("/messages/"),
                Some(m) => {
                    eat("/messages/modules/")
                        || eat(m)
                        || match nonempty(&msg.system.output_name) {
                            None => eat("/"),
                            Some(o) => eat("/outputs/") || eat(o) || eat("/"),
                        }
                }
            },
        };
        done || want.is_empty()
    }

    /// [`Source::matches`] against the path [`source_path`] wrote: one prefix compare, for
    /// a route set that checks many sources against one message.
    pub(crate) fn matches_path(&self, lowered_path: &[u8]) -> bool {
        lowered_path.starts_with(self.prefix.as_bytes())
    }
}

/// Writes `msg`'s source path (see the crate docs), ASCII-lower-cased like every
/// [`Source`] prefix, into `out`.
pub(crate) fn source_path(msg: &Message, out: &mut Vec<u8>) {
    out.clear();
    match msg.kind {
        MessageKind::TwinChangeNotification => out.extend_from_slice(b"/twinChangeNotifications/"),
        MessageKind::Telemetry => match nonempty(&msg.system.connection_module_id) {
            None => out.extend_from_slice(b"/messages/"),
            Some(m) => {
                out.extend_from_slice(b"/messages/modules/");
                out.extend_from_slice(m.as_bytes());
                if let Some(o) = nonempty(&msg.system.output_name) {
                    out.extend_from_slice(b"/outputs/");
                    out.extend_from_slice(o.as_bytes());
                }
                out.push(b'/');
            }
        },
    }
    out.make_ascii_lowercase();
}

/// A parsed (not compiled) route.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRoute {
    /// FROM.
    pub source: Source,
    /// WHERE, if any.
    pub condition: Option<Expr>,
    /// INTO.
    pub endpoint: Endpoint,
}

/// Parses `[SELECT *] FROM <source> [WHERE <condition>] INTO <sink>`.
pub fn parse_route(text: &str) -> Result<ParsedRoute, ParseError> {
    let (source, condition, endpoint) = Parser::new(text).route()?;
    Ok(ParsedRoute {
        source: Source::new(&source),
        condition,
        endpoint,
    })
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    name: String,
    source: Source,
    condition: Option<Node>,
    uses_body: bool,
    endpoint: usize,
    priority: u32,
    ttl_secs: u32,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// One endpoint a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    /// The destination.
    pub endpoint: &'a Endpoint,
    /// Its id ([`Endpoint::id`]), formatted once per route set rather than once per message.
    pub endpoint_id: &'a str,
    /// Priority of the winning route (0 highest … 9, or `DEFAULT_ROUTE_PRIORITY`).
    pub priority: u32,
    /// The winning route's TTL in seconds; 0 means "use the global TTL".
    pub ttl_secs: u32,
    /// The winning route's name.
    pub route_name: &'a str,
}

/// A compiled set of routes (the `$edgeHub` `routes` section).
#[derive(Debug, Clone, Default)]
pub struct RouteSet {
    /// Sorted by (priority, name): the first match per endpoint is the winner.
    routes: Vec<CompiledRoute>,
    endpoints: Vec<Endpoint>,
    /// `endpoints[i].id()`.
    endpoint_ids: Vec<String>,
    trie: Trie,
}

impl RouteSet {
    /// Parses and compiles every route. If any route is bad, the whole set is rejected and
    /// every error is returned (in input order).
    pub fn new(specs: &[RouteSpec]) -> Result<Self, RouteSetError> {
        let mut errors = Vec::new();
        let mut parsed = Vec::with_capacity(specs.len());
        for spec in specs {
            match parse_route(&spec.route) {
                Ok(p) => parsed.push((spec, p)),
                Err(error) => errors.push(RouteError {
                    route: spec.name.clone(),
                    error,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(RouteSetError { errors });
        }
        let ids: BTreeMap<Endpoint, usize> = parsed
            .iter()
            .map(|(_, p)| (p.endpoint.clone(), 0))
            .collect();
        let endpoints: Vec<Endpoint> = ids.into_keys().collect();
        let mut trie = Trie::default();
        let mut routes: Vec<CompiledRoute> = parsed
            .into_iter()
            .map(|(spec, p)| {
                let mut c = Compiler {
                    trie: &mut trie,
                    uses_body: false,
                };
                let condition = p.condition.as_ref().map(|e| c.compile(e));
                let uses_body = c.uses_body;
                CompiledRoute {
                    name: spec.name.clone(),
                    source: p.source,
                    condition,
                    uses_body,
                    endpoint: endpoints.binary_search(&p.endpoint).unwrap_or(0),
                    priority: spec.priority,
                    ttl_secs: spec.time_to_live_secs,
                }
            })
            .collect();
        routes.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let endpoint_ids = endpoints.iter().map(Endpoint::id).collect();
        Ok(Self {
            routes,
            endpoints,
            endpoint_ids,
            trie,
        })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every distinct endpoint the set can send to, sorted.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Routes `msg`: clears `out` and writes one [`RouteMatch`] per distinct endpoint, in order
    /// of (priority, route name). When several routes reach one endpoint, the one with the
    /// highest priority (lowest number; ties: lowest route name) wins and supplies the TTL.
    ///
    /// The body is decoded and scanned at most once per call, only if a route whose source
    /// matches needs it. With a warmed-up `scratch` and `out`, this does not allocate unless a
    /// condition uses a string-building function (see the crate docs).
    pub fn evaluate<'a>(
        &'a self,
        msg: &Message,
        scratch: &mut Scratch,
        out: &mut Vec<RouteMatch<'a>>,
    ) {
        out.clear();
        self.evaluate_each(msg, scratch, |m| out.push(m));
    }

    /// [`RouteSet::evaluate`], handing each match to `each` instead of collecting them.
    pub fn evaluate_each<'a>(
        &'a self,
        msg: &Message,
        scratch: &mut Scratch,
        mut each: impl FnMut(RouteMatch<'a>),
    ) {
        scratch.reset();
        scratch.taken.clear();
        scratch.taken.resize(self.endpoints.len(), false);
        // The message's path is built once; each route's source is then a prefix compare.
        // Taken out of `scratch` (no allocation) because `load` below borrows it mutably.
        let mut path = std::mem::take(&mut scratch.path);
        source_path(msg, &mut path);
        for r in &self.routes {
            if scratch.taken.get(r.endpoint).copied().unwrap_or(true)
                || !r.source.matches_path(&path)
            {
                continue;
            }
            if let Some(cond) = &r.condition {
                if r.uses_body {
                    scratch.load(msg, &self.trie);
                }
                let cx = Ctx {
                    msg,
                    body: scratch.view(msg),
                };
                if !cond.eval(&cx).is_true() {
                    continue;
                }
            }
            if let Some(t) = scratch.taken.get_mut(r.endpoint) {
                *t = true;
            }
            if let (Some(endpoint), Some(endpoint_id)) = (
                self.endpoints.get(r.endpoint),
                self.endpoint_ids.get(r.endpoint),
            ) {
                each(RouteMatch {
                    endpoint,
                    endpoint_id,
                    priority: r.priority,
                    ttl_secs: r.ttl_secs,
                    route_name: &r.name,
                });
            }
        }
        scratch.path = path;
    }

    /// Convenience form of [`RouteSet::evaluate`] that allocates its own buffers.
    pub fn route(&self, msg: &Message) -> Vec<RouteMatch<'_>> {
        let mut out = Vec::new();
        self.evaluate(msg, &mut Scratch::new(), &mut out);
        out
    }
}
