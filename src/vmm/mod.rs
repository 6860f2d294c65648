//! The built-in VMM: a KVM microVM on the rust-vmm crates.

pub mod devices;
pub mod layout;
pub mod process;
pub mod seccomp;
mod syscall_names;
pub mod vm;
pub mod x86_64;
