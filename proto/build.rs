use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=agent.proto");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set for build scripts"));
    Codegen::new()
        .out_dir(&out)
        .input("agent.proto")
        .include(".")
        .rust_protobuf()
        .customize(Customize { async_all: true, ..Default::default() })
        .rust_protobuf_customize(ProtobufCustomize::default())
        .run()
        .expect("generating the agent protocol from agent.proto");

    // The generated files carry inner attributes, which `include!` inside a
    // module rejects; drop them (the crate root allows what they allowed).
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("#![") && !l.starts_with("//!")).collect();
        fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}
