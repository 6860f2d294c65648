//! Pod networks for `runv cri`: a network namespace per pod, joined to the
//! CNI network configured in `cni_conf_dir` by running its plugins (the
//! CNI spec's ADD/DEL over stdin/stdout). The shim then moves the pod's
//! interface into the VM as for a containerd pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::PodSandboxConfig;
use serde_json::Value;
use tonic::Status;

use crate::config::Config;

/// Where pod network namespaces are bind-mounted (where `ip netns` looks).
const NETNS_DIR: &str = "/run/netns";
/// The pod's interface name inside its namespace.
const IFNAME: &str = "eth0";

pub struct PodNet {
    pub netns: PathBuf,
    pub ips: Vec<String>,
}

/// The first CNI configuration in `dir` by file name: a `.conflist`, or a
/// single-plugin `.conf`/`.json` turned into a list.
pub fn network_config(dir: &Path) -> Result<Option<Value>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json")))
        .collect();
    files.sort();
    let Some(file) = files.first() else { return Ok(None) };
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut conf: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    if conf.get("plugins").is_none() {
        let single = conf.clone();
        conf = serde_json::json!({"cniVersion": single["cniVersion"], "name": single["name"], "plugins": [single]});
    }
    if conf["name"].as_str().unwrap_or_default().is_empty() || !conf["plugins"].is_array() {
        return Err(format!("{}: a CNI network needs a name and plugins", file.display()));
    }
    Ok(Some(conf))
}

/// Whether a CNI network is configured (the NetworkReady condition).
pub fn network_ready(config: &Config) -> Result<(), String> {
    match network_config(&config.cni_conf_dir)? {
        Some(_) => Ok(()),
        None => Err(format!("no CNI network configuration in {}", config.cni_conf_dir.display())),
    }
}

fn netns_path(id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("runv-{}", &id[..id.len().min(16)]))
}

/// A new network namespace bind-mounted at `path` (made on a thread of its
/// own: unshare changes only the calling thread's namespace).
fn create_netns(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the netns thread panicked"))?;
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(path);
}

fn cni_args(id: &str, pod: &PodSandboxConfig) -> String {
    let meta = pod.metadata.clone().unwrap_or_default();
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={}",
        meta.namespace, meta.name, meta.uid
    )
}

/// One pod's CNI call: what every plugin of the list is run with.
struct Invocation<'a> {
    config: &'a Config,
    id: &'a str,
    netns: &'a Path,
    args: String,
    /// What plugins that declare a capability get in `runtimeConfig`.
    runtime_config: Value,
}

/// The CNI capability arguments of a pod: its host ports
/// (`portMappings`, what the portmap plugin reads), as containerd passes
/// them.
fn runtime_config(pod: &PodSandboxConfig) -> Value {
    let mappings: Vec<Value> = pod
        .port_mappings
        .iter()
        .filter(|m| m.host_port > 0)
        .map(|m| {
            let protocol = match k8s_cri::v1::Protocol::try_from(m.protocol) {
                Ok(k8s_cri::v1::Protocol::Udp) => "udp",
                Ok(k8s_cri::v1::Protocol::Sctp) => "sctp",
                _ => "tcp",
            };
            serde_json::json!({"hostPort": m.host_port, "containerPort": m.container_port, "protocol": protocol, "hostIP": m.host_ip})
        })
        .collect();
    serde_json::json!({ "portMappings": mappings })
}

/// `plugin`'s configuration for this call: the list's name and version,
/// the previous result, and the runtime arguments of each capability the
/// plugin declares (`capabilities: {"portMappings": true}`).
fn plugin_config(list: &Value, plugin: &Value, prev: Option<&Value>, runtime_config: &Value) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    let mut given = serde_json::Map::new();
    for (capability, on) in plugin["capabilities"].as_object().into_iter().flatten() {
        if on.as_bool() == Some(true) {
            if let Some(value) = runtime_config.get(capability) {
                given.insert(capability.clone(), value.clone());
            }
        }
    }
    if !given.is_empty() {
        conf["runtimeConfig"] = Value::Object(given);
    }
    conf
}

/// Runs one plugin of the list; returns its result.
async fn run_plugin(
    inv: &Invocation<'_>,
    command: &str,
    list: &Value,
    plugin: &Value,
    prev: Option<&Value>,
) -> Result<Value, String> {
    let (config, id, netns, args) = (inv.config, inv.id, inv.netns, inv.args.as_str());
    let kind = plugin["type"].as_str().ok_or("a CNI plugin without a type")?;
    if kind.contains('/') {
        return Err(format!("CNI plugin type {kind:?} is not a plain name"));
    }
    let conf = plugin_config(list, plugin, prev, &inv.runtime_config);
    let binary = config.cni_bin_dir.join(kind);
    let mut child = tokio::process::Command::new(&binary)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", &config.cni_bin_dir)
        .env("CNI_ARGS", args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("CNI plugin {}: {e}", binary.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(conf.to_string().as_bytes()).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .map_err(|_| format!("CNI plugin {kind} {command}: no answer within 60 s"))?
        .map_err(|e| format!("CNI plugin {kind} {command}: {e}"))?;
    let result: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        let msg = result["msg"].as_str().map(str::to_owned).unwrap_or_else(|| {
            format!("{} {}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim())
        });
        return Err(format!("CNI plugin {kind} {command}: {msg}"));
    }
    Ok(result)
}

/// Creates the pod's namespace and joins it to the CNI network; None when
/// no network is configured (the pod then has loopback only).
pub async fn setup(
    config: &Config,
    id: &str,
    pod: &PodSandboxConfig,
    pod_dir: &Path,
) -> Result<Option<PodNet>, Status> {
    let Some(list) = network_config(&config.cni_conf_dir).map_err(Status::failed_precondition)? else {
        return Ok(None);
    };
    std::fs::create_dir_all(pod_dir).map_err(|e| Status::internal(format!("creating {}: {e}", pod_dir.display())))?;
    // The configuration used, kept for the DEL at stop.
    std::fs::write(pod_dir.join("cni.json"), list.to_string())
        .map_err(|e| Status::internal(format!("saving the CNI configuration: {e}")))?;
    let netns = netns_path(id);
    create_netns(&netns).map_err(|e| Status::internal(format!("creating the network namespace: {e}")))?;
    let inv = Invocation { config, id, netns: &netns, args: cni_args(id, pod), runtime_config: runtime_config(pod) };
    let mut prev: Option<Value> = None;
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    for plugin in &plugins {
        match run_plugin(&inv, "ADD", &list, plugin, prev.as_ref()).await {
            Ok(r) => prev = Some(r),
            Err(e) => {
                teardown(config, id, &netns, pod, pod_dir).await;
                return Err(Status::failed_precondition(format!("pod network {}: {e}", list["name"])));
            }
        }
    }
    let ips = prev
        .as_ref()
        .and_then(|r| r["ips"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .collect();
    Ok(Some(PodNet { netns, ips }))
}

/// Leaves the CNI network (DEL, plugins in reverse) and removes the namespace.
pub async fn teardown(config: &Config, id: &str, netns: &Path, pod: &PodSandboxConfig, pod_dir: &Path) {
    let list: Option<Value> =
        std::fs::read(pod_dir.join("cni.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(list) = list {
        let inv = Invocation { config, id, netns, args: cni_args(id, pod), runtime_config: runtime_config(pod) };
        for plugin in list["plugins"].as_array().into_iter().flatten().rev() {
            if let Err(e) = run_plugin(&inv, "DEL", &list, plugin, None).await {
                tracing::warn!("pod {id}: {e}");
            }
        }
    }
    remove_netns(netns);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_reach_the_plugins_that_ask_for_them() {
        let pod = PodSandboxConfig {
            port_mappings: vec![
                k8s_cri::v1::PortMapping { protocol: 0, container_port: 80, host_port: 8080, host_ip: "".into() },
                k8s_cri::v1::PortMapping {
                    protocol: 1,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                // No host port: nothing to map.
                k8s_cri::v1::PortMapping { protocol: 0, container_port: 9000, host_port: 0, host_ip: "".into() },
            ],
            ..Default::default()
        };
        let list = serde_json::json!({"name": "pods", "cniVersion": "1.0.0"});
        let rc = runtime_config(&pod);
        let portmap = plugin_config(
            &list,
            &serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}}),
            None,
            &rc,
        );
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"],
            serde_json::json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}
            ])
        );
        assert_eq!(portmap["name"], "pods");
        let bridge = plugin_config(&list, &serde_json::json!({"type": "bridge"}), None, &rc);
        assert!(bridge.get("runtimeConfig").is_none());
    }

    #[test]
    fn the_first_configuration_by_name_is_used_and_a_conf_becomes_a_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(network_config(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join("20-b.conf"), r#"{"cniVersion":"0.4.0","name":"b","type":"bridge"}"#).unwrap();
        let conf = network_config(dir.path()).unwrap().unwrap();
        assert_eq!(conf["name"], "b");
        assert_eq!(conf["plugins"][0]["type"], "bridge");
        std::fs::write(dir.path().join("10-a.conflist"), r#"{"cniVersion":"0.4.0","name":"a","plugins":[]}"#).unwrap();
        assert_eq!(network_config(dir.path()).unwrap().unwrap()["name"], "a");
        std::fs::write(dir.path().join("05-bad.conflist"), "{").unwrap();
        assert!(network_config(dir.path()).unwrap_err().contains("05-bad.conflist"));
    }
}
