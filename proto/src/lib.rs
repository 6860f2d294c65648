//! The runv agent protocol and the facts about the guest that both the host
//! and the agent rely on.

#[allow(
    clippy::all,
    unused_imports,
    unused_results,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_mut,
    unknown_lints
)]
mod generated {
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }

    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

pub use generated::{agent, agent_ttrpc};

pub mod guest;
