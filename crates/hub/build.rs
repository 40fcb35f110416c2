//! Links the standalone `verge-hub` with verge-edge's start-up order (the
//! list covers the hub's start-up too; see `../edge/link_order.rs`), which
//! keeps its idle resident set small and steady across unrelated code
//! changes. The list's names of the other daemons are skipped here.

include!("../edge/link_order.rs");

fn main() {
    link_in_order("../edge/symbol-order.txt");
}
