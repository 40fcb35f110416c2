//! `$edgeHub` desired properties: routes and store-and-forward settings.

/// Priority of a route given as a plain string (schema 1.0) or an object
/// without `priority`: below every explicit priority 0–9.
pub const DEFAULT_ROUTE_PRIORITY: u32 = 2_000_000_000;

/// One named route, as the hub receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// The route's name (the key under `routes`).
    pub name: String,
    /// `FROM … [WHERE …] INTO …`.
    pub route: String,
    /// 0 (highest) to 9, or [`DEFAULT_ROUTE_PRIORITY`].
    pub priority: u32,
    /// Per-route TTL in seconds; 0 means "use the global TTL".
    pub time_to_live_secs: u32,
}
