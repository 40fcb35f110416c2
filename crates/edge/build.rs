//! Links verge-edge in start-up order: see `link_order.rs`.

include!("link_order.rs");

fn main() {
    link_in_order("symbol-order.txt");
}
