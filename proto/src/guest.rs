//! Constants that describe the guest, shared by the host side and the agent.

/// vsock port the agent serves ttrpc on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Guest context id given to the microVM.
pub const GUEST_CID: u32 = 3;

/// virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "runv";

/// Where the agent mounts the shared directory in the guest.
pub const SHARED_MOUNT_POINT: &str = "/run/runv/shared";

/// Kernel command line pieces every runv guest gets. `reboot=t` plus the
/// hypervisor's no-reboot mode turns a guest reboot into a VM exit (without
/// ACPI a poweroff would halt forever); `panic=-1` reboots on panic so a
/// crashed guest ends its VM instead of hanging.
pub const KERNEL_CMDLINE_BASE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

/// Command line flag asking the agent to report readiness on the console and
/// reboot at once (used to probe whether a hypervisor can boot the guest).
pub const PROBE_CMDLINE_FLAG: &str = "runv.probe=1";

/// What the agent prints on the console when started with the probe flag.
pub const PROBE_READY_MARKER: &str = "runv-agent: probe ok";

/// Longest chunk a single read call returns.
pub const MAX_READ_CHUNK: u32 = 64 * 1024;
