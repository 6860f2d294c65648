//! Seccomp through `runv cri`, end to end: a container asking for
//! RuntimeDefault runs under runv's default profile in the guest (one
//! filter more than the guest agent's own, for its init and for its
//! execs), a Localhost profile read on the host denies what it says, an
//! Unconfined container has only the agent's filter, and a missing or
//! misnamed profile fails CreateContainer naming it. Needs root, the
//! installed guest and docker-registry; skips with a printed reason
//! otherwise.

mod common;

use common::registry::registry_or_skip;
use common::registry_and_server;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::*;

fn with_seccomp(profile_type: ProfileType, localhost_ref: &str) -> LinuxContainerConfig {
    LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            seccomp: Some(SecurityProfile { profile_type: profile_type as i32, localhost_ref: localhost_ref.into() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_profiles_reach_the_guest_and_bad_ones_are_named() {
    let test = "seccomp_profiles_reach_the_guest_and_bad_ones_are_named";
    if !common::e2e_ready(test) || !registry_or_skip(test) {
        return;
    }
    let (_reg, cri, app) = registry_and_server().await;
    let channel = cri.channel().await;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut rt = RuntimeServiceClient::new(channel);
    let image = Some(ImageSpec { image: app.clone(), ..Default::default() });
    images.pull_image(PullImageRequest { image: image.clone(), ..Default::default() }).await.unwrap();
    let profile = cri.dir.path().join("deny-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}"#,
    )
    .unwrap();
    let pod_config = common::cri::pod_config("sec", "default", &cri.dir.path().join("pod-logs"));
    let pod = common::cri::run_pod(&mut rt, &cri, &pod_config).await;
    let create = |name: &str, linux: LinuxContainerConfig| CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: image.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "grep Seccomp_filters /proc/self/status | tr -dc 0-9 > /tmp/init-filters; exec sleep 1000".into(),
            ],
            log_path: format!("{name}.log"),
            linux: Some(linux),
            ..Default::default()
        }),
        sandbox_config: Some(pod_config.clone()),
    };
    let exec = {
        let rt = rt.clone();
        move |id: String, script: &'static str| {
            let mut rt = rt.clone();
            async move {
                let r = rt
                    .exec_sync(ExecSyncRequest {
                        container_id: id,
                        cmd: vec!["sh".into(), "-c".into(), script.into()],
                        timeout: 60,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (
                    String::from_utf8_lossy(&r.stdout).trim().to_string(),
                    String::from_utf8_lossy(&r.stderr).into_owned(),
                    r.exit_code,
                )
            }
        }
    };
    let mut started = Vec::new();
    for (name, linux, expected) in [
        ("unconfined", with_seccomp(ProfileType::Unconfined, ""), "1"),
        ("default", with_seccomp(ProfileType::RuntimeDefault, ""), "2"),
        ("localhost", with_seccomp(ProfileType::Localhost, &profile.to_string_lossy()), "2"),
    ] {
        let id = rt
            .create_container(create(name, linux))
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", cri.log()))
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest { container_id: id.clone() }).await.unwrap();
        // An exec runs under the same filters as the container's init.
        let (out, err, _) = exec(
            id.clone(),
            "while [ ! -s /tmp/init-filters ]; do sleep 0.1; done; cat /tmp/init-filters; echo; \
             grep Seccomp_filters /proc/self/status | tr -dc 0-9",
        )
        .await;
        let counts: Vec<&str> = out.lines().collect();
        assert_eq!(counts, [expected, expected], "{name}: filters of the init and of an exec ({err})");
        started.push(id);
    }
    // The Localhost profile denies mkdir; the others leave it alone.
    let (_, err, code) = exec(started[2].clone(), "mkdir /tmp/x").await;
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    // adjtimex(2) only reading the clock needs no capability; the default
    // profile refuses it without CAP_SYS_TIME, as containerd's does.
    let (_, err, code) = exec(started[0].clone(), "mkdir /tmp/x && adjtimex").await;
    assert_eq!(code, 0, "unconfined: {err}");
    let (_, err, code) = exec(started[1].clone(), "mkdir /tmp/x && adjtimex").await;
    assert_ne!(code, 0, "RuntimeDefault let a container without CAP_SYS_TIME call adjtimex");
    assert!(err.contains("Operation not permitted"), "{err}");

    for (name, linux, needle) in [
        ("missing", with_seccomp(ProfileType::Localhost, "/no/such/profile.json"), "/no/such/profile.json"),
        (
            "misnamed",
            LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    #[allow(deprecated)]
                    seccomp_profile_path: "my-profile".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "\"my-profile\"",
        ),
    ] {
        let e = rt.create_container(create(name, linux)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e}");
        assert!(e.message().contains(needle), "{name}: {e}");
    }
    rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
    let left = cri.settled_leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
