//! The object is linked by bpf-linker, which cargo does not track: rebuild when it changes (e.g. after
//! `cargo xtask setup` rebuilt it against a new nightly's LLVM).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup`"),
    }
}
