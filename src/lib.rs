//! runv: a lightweight VM sandbox runtime for Kubernetes. Each pod gets its
//! own KVM microVM; the pod's containers run inside it next to a guest
//! agent reached over vsock.

pub mod check;
pub mod config;
pub mod cri;
pub mod figures;
pub mod fsroot;
pub mod helper;
pub mod hypervisor;
pub mod image;
pub mod jailer;
pub mod monitor;
pub mod network;
pub mod overhead;
pub mod run;
pub mod sandbox;
pub mod vmm;
