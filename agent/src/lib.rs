//! runv-agent's pieces, as a library for its binary, its tests and its
//! fuzz targets.

pub mod container;
pub mod debug_console;
pub mod init;
pub mod network;
pub mod port_forward;
pub mod process;
pub mod service;
pub mod stream;

/// Everything the agent decodes from a request before acting on it: the
/// protobuf message and, for container calls, the OCI JSON inside. Used by
/// the fuzz target; never panics, whatever the bytes.
pub fn decode_request(kind: u8, bytes: &[u8]) {
    use protobuf::Message;
    use runv_proto::agent::*;
    let allowed = container::spec::AllowedRoots(vec![std::env::temp_dir().join("runv-fuzz-none")]);
    match kind % 6 {
        0 => {
            let _ = RunProcessRequest::parse_from_bytes(bytes);
        }
        1 => {
            if let Ok(req) = CreateContainerRequest::parse_from_bytes(bytes) {
                let _ = container::spec::check_id("container id", &req.container_id);
                let _ = container::spec::prepare("fuzz", &req.oci_spec, &allowed, None);
            }
        }
        2 => {
            if let Ok(req) = ExecProcessRequest::parse_from_bytes(bytes) {
                if let Ok(p) = serde_json::from_slice::<oci_spec::runtime::Process>(&req.process) {
                    let _ = container::spec::check_process(&p);
                }
            }
        }
        3 => {
            if let Ok(req) = UpdateContainerRequest::parse_from_bytes(bytes) {
                if let Ok(r) = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&req.resources) {
                    let _ = container::spec::check_resources(&r);
                }
            }
        }
        4 => {
            let _ = container::spec::prepare("fuzz", bytes, &allowed, Some(1));
        }
        _ => {
            let _ = WriteStdinRequest::parse_from_bytes(bytes);
            let _ = CreateSandboxRequest::parse_from_bytes(bytes);
        }
    }
}
