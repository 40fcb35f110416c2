//! Links the standalone `verge-hub` with the start-up order of verge-edge
//! (`../edge/symbol-order.txt`, which covers the hub's start-up too; see
//! `crates/edge/build.rs`): the code it runs from start to idle is packed
//! together, so its idle resident set is small and does not move with
//! unrelated code changes. Names this build does not have are skipped.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=../edge/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=VERGE_SYMBOL_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    let enabled = !matches!(std::env::var("VERGE_SYMBOL_ORDER").as_deref(), Ok("0"));
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = PathBuf::from(dir).join("../edge/symbol-order.txt");
    if enabled && target == "x86_64-unknown-linux-gnu" && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
