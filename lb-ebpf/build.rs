//! Rebuilds the program when a different bpf-linker is installed (bpf-linker does the
//! code generation, so it is part of the compiler as far as the output is concerned).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
