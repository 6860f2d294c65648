//! A privileged container through `runv cri`, end to end: inside the VM it
//! gets what real workloads use in pods (a Linux bridge, a veth pair,
//! tun, netfilter with connection tracking, overlayfs, every cgroup
//! controller) and a writable /sys; the same pod's unprivileged container
//! gets none of the privileges. Needs root, the installed guest and
//! docker-registry; skips with a printed reason otherwise.

mod common;

use common::registry::registry_or_skip;
use common::registry_and_server;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;

/// Each line printed is one feature that worked.
const PROBE: &str = "\
brctl addbr br-probe && ip link show br-probe >/dev/null && echo bridge
ip link add vprobe type veth && echo veth
test -e /sys/devices/virtual/misc/tun && echo tun
test -e /proc/sys/net/netfilter/nf_conntrack_max && echo conntrack
grep -qw overlay /proc/filesystems && echo overlayfs
for c in cpuset cpu memory pids misc; do grep -q \"^$c\\b\" /proc/cgroups || exit 0; done; echo cgroups
grep ' /sys sysfs ' /proc/mounts | grep -q ' rw,' && echo sysfs-rw
test -c /dev/net/tun && echo dev-tun
test -c /dev/kmsg && echo dev-kmsg
true";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_privileged_container_gets_the_guest_kernels_features_and_others_do_not() {
    let test = "a_privileged_container_gets_the_guest_kernels_features_and_others_do_not";
    if !common::e2e_ready(test) || !registry_or_skip(test) {
        return;
    }
    let (_reg, cri, app) = registry_and_server().await;
    let channel = cri.channel().await;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut rt = RuntimeServiceClient::new(channel);
    let image = Some(ImageSpec { image: app.clone(), ..Default::default() });
    images.pull_image(PullImageRequest { image: image.clone(), ..Default::default() }).await.unwrap();
    let mut pod_config = common::cri::pod_config("priv", "default", &cri.dir.path().join("pod-logs"));
    // A privileged container needs a privileged pod (as the kubelet sends).
    pod_config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext { privileged: true, ..Default::default() }),
        ..Default::default()
    });
    let pod = common::cri::run_pod(&mut rt, &cri, &pod_config).await;

    let all = "bridge\nveth\ntun\nconntrack\noverlayfs\ncgroups\nsysfs-rw\ndev-tun\ndev-kmsg\n";
    // Unprivileged: the kernel has the features, the container may not
    // use them (no CAP_NET_ADMIN, /sys read-only).
    let confined = "tun\nconntrack\noverlayfs\ncgroups\n";
    for (name, privileged, want) in [("privileged", true, all), ("plain", false, confined)] {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: image.clone(),
            command: vec!["sleep".into(), "1000".into()],
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext { privileged, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = common::cri::start_container(&mut rt, &cri, &pod, &pod_config, config).await;
        let r = rt
            .exec_sync(ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["sh".into(), "-c".into(), PROBE.into()],
                timeout: 60,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(String::from_utf8_lossy(&r.stdout), want, "{name}: stderr {}", String::from_utf8_lossy(&r.stderr));
    }
    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    let left = cri.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
