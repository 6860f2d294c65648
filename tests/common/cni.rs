//! The CNI network every test and benchmark pod runs on: the bridge
//! plugin with host-local addresses. One definition, included by the
//! runv test helpers (`tests/common`) and by the containerd ones
//! (`shim-v2/tests/common`), which the examples bring too.

use std::path::Path;

/// A conflist named `name` for CNI's bridge plugin on `bridge`, the host as
/// gateway at 10.`subnet`.0.1, pod addresses from 10.`subnet`.0.0/24 kept
/// in `ipam_dir`.
pub fn bridge_conflist(name: &str, bridge: &str, subnet: u8, ipam_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": format!("10.{subnet}.0.0/24") }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": ipam_dir,
            }
        }]
    })
}
