#!/usr/bin/env python3
"""A CRI client runv did not write: Python grpcio, driving `runv cri` the
way a kubelet does, over grpcio's default `unix://` channel (which sends
the socket path, percent-encoded, as the HTTP/2 :authority).

It also calls Version with the two other :authority values clients send:
the raw socket path (grpc-go before 1.5x: crictl 1.26, kubelet 1.26) and
`localhost` (newer grpc-go).

Usage: cri_grpcio.py SOCKET PROTO IMAGE LOG_DIR [OTHER_TAG...]
OTHER_TAGs are more tags of IMAGE's image: ListImages must list the image
once with every tag, ImageStatus find it by any reference form, and
RemoveImage by id remove every tag.
Stubs are generated from PROTO (the CRI v1 api.proto) into a temporary
directory. Prints one JSON object with what each call returned; the Rust
test (tests/cri_clients.rs) asserts on it. Exits 1 on an unexpected error.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import grpc


def stubs(proto):
    out = tempfile.mkdtemp(prefix="cri-stubs-")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I" + os.path.dirname(proto),
         "--python_out=" + out, "--grpc_python_out=" + out, os.path.basename(proto)],
        check=True)
    sys.path.insert(0, out)
    import v1_pb2
    import v1_pb2_grpc
    # Loaded: the generated files are not needed again (a run leaves nothing).
    sys.path.remove(out)
    shutil.rmtree(out)
    return v1_pb2, v1_pb2_grpc


def main():
    socket, proto, image, log_dir = sys.argv[1:5]
    other_tags = sys.argv[5:]
    pb, rpc = stubs(proto)
    result = {"version": {}}
    for name, options in [("default", []),
                          ("socket path", [("grpc.default_authority", socket)]),
                          ("localhost", [("grpc.default_authority", "localhost")])]:
        with grpc.insecure_channel("unix://" + socket, options=options) as ch:
            v = rpc.RuntimeServiceStub(ch).Version(pb.VersionRequest(), timeout=10)
            result["version"][name] = [v.runtime_name, v.runtime_api_version]

    ch = grpc.insecure_channel("unix://" + socket)
    rt, im = rpc.RuntimeServiceStub(ch), rpc.ImageServiceStub(ch)
    spec = pb.ImageSpec(image=image)
    result["pulled"] = im.PullImage(pb.PullImageRequest(image=spec), timeout=120).image_ref
    for tag in other_tags:
        im.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=tag)), timeout=120)
    status = im.ImageStatus(pb.ImageStatusRequest(image=spec), timeout=10)
    result["image_tags"] = sorted(status.image.repo_tags)
    image_id = status.image.id
    listed = im.ListImages(pb.ListImagesRequest(), timeout=10).images
    result["listed_with_tag"] = [sorted(i.repo_tags) for i in listed if image in i.repo_tags]
    repo = image.rsplit(":", 1)[0]
    forms = {"tag": image, "repo@digest": status.image.repo_digests[0], "id": image_id,
             "id prefix": image_id[len("sha256:"):][:12], "untagged repo of :latest": repo}
    result["status_by"] = {
        name: im.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=10).image.id == image_id
        for name, ref in forms.items() if name != "untagged repo of :latest" or any(t.endswith(":latest") for t in other_tags)
    }

    pod_config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="grpcio", namespace="default", uid="uid-grpcio"),
        hostname="grpcio-host", log_directory=log_dir)
    pod = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config), timeout=300).pod_sandbox_id
    result["pod_state"] = pb.PodSandboxState.Name(
        rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=10).status.state)
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="app"), image=spec,
        command=["sh", "-c", "echo started; exec sleep 1000"], log_path="app.log")
    ctr = rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod, config=config, sandbox_config=pod_config), timeout=120).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=ctr), timeout=60)
    r = rt.ExecSync(pb.ExecSyncRequest(
        container_id=ctr, cmd=["sh", "-c", "hostname; echo to-stderr >&2; exit 3"], timeout=60), timeout=90)
    result["exec"] = {"stdout": r.stdout.decode(), "stderr": r.stderr.decode(), "exit_code": r.exit_code}
    # Ids as crictl prints them: their first 13 characters.
    result["by_prefix"] = {
        "container": rt.ContainerStatus(pb.ContainerStatusRequest(container_id=ctr[:13]), timeout=10).status.id == ctr,
        "pod": rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod[:13]), timeout=10).status.id == pod,
    }

    # Errors reach this client as gRPC statuses that name what was wrong.
    for name, call in [
        ("missing container", lambda: rt.ContainerStatus(
            pb.ContainerStatusRequest(container_id="no-such-container"), timeout=10)),
        ("pod without metadata", lambda: rt.RunPodSandbox(
            pb.RunPodSandboxRequest(config=pb.PodSandboxConfig()), timeout=10)),
    ]:
        try:
            call()
            result.setdefault("errors", {})[name] = ["OK", ""]
        except grpc.RpcError as e:
            result.setdefault("errors", {})[name] = [e.code().name, e.details()]

    rt.StopContainer(pb.StopContainerRequest(container_id=ctr, timeout=5), timeout=60)
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=ctr), timeout=60)
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    result["pods_after"] = len(rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items)
    # Removing the image by its id removes every tag of it.
    im.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)), timeout=30)
    left = [t for i in im.ListImages(pb.ListImagesRequest(), timeout=10).images for t in i.repo_tags]
    result["tags_after_remove"] = sorted(t for t in left if t in [image] + other_tags)
    ch.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
