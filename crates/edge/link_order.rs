// Shared by the build scripts of verge-edge and verge-hub (`include!`d).

/// Links this package's executables with their functions ordered by `order`
/// (`crates/edge/symbol-order.txt`, written by `scripts/symbol-order.sh`):
/// the code the daemons run from start to idle is packed together, so the
/// kernel's 64 KiB fault-around maps a few MB of text instead of nearly all
/// of it (BENCHMARKS.md, "Runtime footprint").
///
/// Only where Rust links with lld by default (x86_64 Linux); elsewhere, or
/// with `VERGE_SYMBOL_ORDER=0` (e.g. for another linker), the order is left
/// to the linker. Names the build does not have are skipped, so a stale file
/// costs memory, never correctness.
fn link_in_order(relative: &str) {
    println!("cargo:rerun-if-changed={relative}");
    println!("cargo:rerun-if-env-changed=VERGE_SYMBOL_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    let enabled = !matches!(std::env::var("VERGE_SYMBOL_ORDER").as_deref(), Ok("0"));
    let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = std::path::PathBuf::from(dir).join(relative);
    if enabled && target == "x86_64-unknown-linux-gnu" && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
