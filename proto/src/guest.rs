//! Constants that describe the guest, shared by the host side and the agent.

/// vsock port the agent serves ttrpc on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// vsock port on the host the agent connects to once it serves, so the host
/// knows when to connect (a hybrid-vsock host side listens on
/// `<vsock socket>_<port>`). Connecting earlier, while the guest's vsock
/// driver is still starting, can lose the connection request.
pub const AGENT_READY_VSOCK_PORT: u32 = 1025;

/// What the agent sends on the readiness connection.
pub const AGENT_READY_MESSAGE: &[u8] = b"READY\n";

/// vsock port of the opt-in debug console (see the agent's `debug_console`).
pub const DEBUG_CONSOLE_VSOCK_PORT: u32 = 1026;

/// vsock port of port forwarding into the pod (see the agent's
/// `port_forward`): the host sends `<tcp port>\n`, the agent answers
/// `PORT_FORWARD_OK` or `error: <why>\n` and then relays the connection.
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1027;

/// The agent's answer when it reached the port.
pub const PORT_FORWARD_OK: &str = "ok\n";

/// Kernel command line flag that enables the debug console; the host adds
/// it only when runv's config sets `debug_console = true`.
pub const DEBUG_CONSOLE_CMDLINE_FLAG: &str = "runv.debug_console=1";

/// The debug console's last line: this prefix, then the exit status.
pub const DEBUG_CONSOLE_EXIT_PREFIX: &str = "runv-debug-console-exit: ";

/// The host's vsock context id, as the guest addresses it.
pub const HOST_CID: u32 = 2;

/// Guest context id given to the microVM.
pub const GUEST_CID: u32 = 3;

/// virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "runv";

/// Where the agent mounts the shared directory in the guest.
pub const SHARED_MOUNT_POINT: &str = "/run/runv/shared";

/// The agent binary in the guest; containers may bind-mount it and run it
/// as their init (`<path> init -- CMD...`).
pub const AGENT_BINARY: &str = "/init";

/// Where `runv run` mounts the agent as its container's init.
pub const CONTAINER_INIT_PATH: &str = "/dev/runv-init";

/// The agent's own state in the guest: container state and bundles.
pub const AGENT_STATE_DIR: &str = "/run/runv";

/// Kernel command line pieces every runv guest gets. `reboot=t` plus the
/// hypervisor's no-reboot mode turns a guest reboot into a VM exit (without
/// ACPI a poweroff would halt forever); `panic=-1` reboots on panic so a
/// crashed guest ends its VM instead of hanging. The root is the agent's
/// read-only image on the VM's first (and only) virtio-blk disk, with the
/// agent as init.
pub const KERNEL_CMDLINE_BASE: &str =
    "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 init=/init";

/// Command line flag asking the agent to report readiness on the console and
/// reboot at once (used to probe whether a hypervisor can boot the guest).
pub const PROBE_CMDLINE_FLAG: &str = "runv.probe=1";

/// What the agent prints on the console when started with the probe flag.
pub const PROBE_READY_MARKER: &str = "runv-agent: probe ok";

/// Longest chunk a single read call returns.
pub const MAX_READ_CHUNK: u32 = 64 * 1024;
