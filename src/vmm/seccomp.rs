//! The built-in VMM's seccomp filters, one per thread role.
//!
//! `confine` installs the process filter (the union of every role's list)
//! on every thread; each thread then narrows itself to its role's list as it
//! starts (`enter`), and filters stack, so a thread can do only what both
//! allow. Threads a vCPU starts (device workers) inherit the vCPU's filter
//! before they narrow theirs, so the vCPU list holds what they need. The
//! lists were read off a Linux guest that activates every device, in the L1
//! rig (scripts/l1.sh; see scripts/l1/README.md for how to redo that).
//!
//! A violation is fatal: the syscall does not run, the SIGSYS handler writes
//! one line naming the thread and the system call to stderr and the process
//! exits with `EXIT_SECCOMP`. The caller's error carries that line.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a VMM that made a system call its filter forbids.
pub const EXIT_SECCOMP: i32 = 3;

/// What a thread of the VMM does, which decides what it may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every thread, from `confine` on: the union of the roles below.
    Process,
    /// The main thread once the vCPUs run: waits for them, kicks them.
    Main,
    /// The control socket.
    Api,
    /// A vCPU: KVM_RUN and device emulation, including device activation,
    /// which starts the workers below.
    Vcpu,
    /// The vsock device's worker: host sockets to and from the guest.
    VsockWorker,
    /// The virtio-fs interrupt relay: eventfds only.
    FsIrq,
    /// The virtio-net receive worker: reads the tap, polls it and its kick.
    NetWorker,
}

const ALL_ROLES: [Role; 6] = [Role::Main, Role::Api, Role::Vcpu, Role::VsockWorker, Role::FsIrq, Role::NetWorker];

/// Each role's compiled filter, set by `confine`: its presence is what
/// makes `enter` narrow a thread.
static FILTERS: OnceLock<Vec<(Role, BpfProgram)>> = OnceLock::new();

/// One allowed system call, with the argument conditions (any of which
/// allows it) or none for any arguments. Conditions compare the low 32
/// bits: every argument filtered here is an int (or ioctl's 32-bit command).
type Allow = (i64, Vec<Conditions>);
/// Conditions that must all hold: (argument index, comparison, value).
type Conditions = Vec<(u8, Op, u64)>;

const KVMIO: u64 = 0xAE;

fn any(nrs: &[i64]) -> Vec<Allow> {
    nrs.iter().map(|&nr| (nr, Vec::new())).collect()
}

/// What every thread does: memory, futexes, signals and thread teardown,
/// its name, the clock, writing stderr.
fn common() -> Vec<Allow> {
    let mut v = any(&[
        libc::SYS_futex,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_close,
        libc::SYS_getrandom,
        libc::SYS_write,
        // Narrowing a thread's own filter further.
        libc::SYS_seccomp,
    ]);
    // Thread names, and no_new_privs, which installing a filter sets
    // (it can only be set).
    v.push((
        libc::SYS_prctl,
        vec![
            vec![(0, Op::Eq, libc::PR_SET_NAME as u64)],
            vec![(0, Op::Eq, libc::PR_GET_NAME as u64)],
            vec![(0, Op::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)],
        ],
    ));
    v
}

/// ioctl: KVM's (type 0xAE) where `kvm`, and FIONBIO/FIOCLEX (std's
/// `set_nonblocking`, close-on-exec) everywhere.
fn ioctl(kvm: bool) -> Allow {
    let mut rules = vec![vec![(1, Op::Eq, libc::FIONBIO)], vec![(1, Op::Eq, libc::FIOCLEX)]];
    if kvm {
        rules.push(vec![(1, Op::MaskedEq(0xff00), KVMIO << 8)]);
    }
    (libc::SYS_ioctl, rules)
}

/// Unix sockets only (the vsock device's host side, vhost-user).
fn unix_socket() -> Allow {
    (libc::SYS_socket, vec![vec![(0, Op::Eq, libc::AF_UNIX as u64)]])
}

/// The allowed calls of one role.
pub fn allowed(role: Role) -> Vec<Allow> {
    let mut v = common();
    match role {
        Role::Process => {
            // The union, one entry per call: any-argument entries win over
            // conditional ones.
            let mut merged: BTreeMap<i64, Option<Vec<Conditions>>> = BTreeMap::new();
            for role in ALL_ROLES {
                for (nr, rules) in allowed(role) {
                    let entry = merged.entry(nr).or_insert_with(|| Some(Vec::new()));
                    match (entry.as_mut(), rules.is_empty()) {
                        (_, true) => *entry = None,
                        (Some(existing), false) => {
                            for r in rules {
                                if !existing.contains(&r) {
                                    existing.push(r);
                                }
                            }
                        }
                        (None, false) => {}
                    }
                }
            }
            return merged.into_iter().map(|(nr, rules)| (nr, rules.unwrap_or_default())).collect();
        }
        Role::Main => {}
        Role::Api => {
            v.extend(any(&[
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_read,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_fcntl,
                libc::SYS_poll,
            ]));
            v.push(ioctl(false));
        }
        Role::Vcpu => {
            v.extend(any(&[
                // Device emulation: eventfds, the console, disks.
                libc::SYS_read,
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_lseek,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_fstat,
                libc::SYS_statx,
                libc::SYS_fcntl,
                libc::SYS_dup,
                libc::SYS_poll,
                libc::SYS_ppoll,
                // Device activation: eventfds for vhost-user, the workers.
                libc::SYS_eventfd2,
                libc::SYS_clone,
                libc::SYS_clone3,
                // The vsock device's host side and vhost-user messages.
                libc::SYS_connect,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_shutdown,
                // Inherited by the vsock worker.
                libc::SYS_accept4,
                libc::SYS_accept,
            ]));
            let (nr, mut rules) = ioctl(true);
            // virtio-net's activation: the tap's offloads, as the guest acked them.
            rules.push(vec![(1, Op::Eq, crate::vmm::devices::virtio::net::TUNSETOFFLOAD)]);
            v.push((nr, rules));
            v.push(unix_socket());
        }
        Role::VsockWorker => {
            v.extend(any(&[
                libc::SYS_read,
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_connect,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_fcntl,
            ]));
            v.push(ioctl(false));
            v.push(unix_socket());
        }
        Role::FsIrq | Role::NetWorker => v.extend(any(&[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll])),
    }
    v
}

/// The compiled filter of `role`; a violation traps (see `on_sigsys`).
pub fn filter(role: Role) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, conds) in allowed(role) {
        let mut compiled = Vec::new();
        for cond in conds {
            let c: Result<Vec<Cond>, _> =
                cond.into_iter().map(|(arg, op, value)| Cond::new(arg, Len::Dword, op, value)).collect();
            let c = c.map_err(|e| format!("syscall {nr}: {e}"))?;
            compiled.push(SeccompRule::new(c).map_err(|e| format!("syscall {nr}: {e}"))?);
        }
        rules.insert(nr, compiled);
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("building the {role:?} seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("compiling the {role:?} seccomp filter: {e}"))
}

/// Installs the SIGSYS handler and the process filter on every thread;
/// from then on `enter` narrows each thread that calls it.
pub fn confine() -> Result<(), String> {
    install_sigsys_handler()?;
    let process = filter(Role::Process)?;
    // Every role's filter is compiled now, once, so a thread never fails
    // to build its own.
    let roles = ALL_ROLES.into_iter().map(|role| Ok((role, filter(role)?))).collect::<Result<Vec<_>, String>>()?;
    seccompiler::apply_filter_all_threads(&process).map_err(|e| format!("seccomp: {e}"))?;
    FILTERS.set(roles).map_err(|_| "seccomp: the VMM was confined twice".to_string())
}

/// Narrows the calling thread to `role` once the process is confined (a
/// no-op under `--no-sandbox`). A thread that cannot narrow itself ends
/// the process: it must not run with more than its role allows.
pub fn enter(role: Role) {
    let Some(filters) = FILTERS.get() else { return };
    let applied = match filters.iter().find(|(r, _)| *r == role) {
        Some((_, f)) => seccompiler::apply_filter(f).map_err(|e| e.to_string()),
        None => Err("no filter for this role".to_string()),
    };
    if let Err(e) = applied {
        eprintln!("runv vmm: error: confining the {role:?} thread: {e}");
        std::process::exit(1);
    }
}

/// The name of system call `nr` on x86_64.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| super::syscall_names::NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
        .unwrap_or("unknown")
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO shape.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!("installing the SIGSYS handler: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Async-signal-safe: formats into a stack buffer, writes it, exits.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t's SIGSYS member: `_call_addr` at 16, `_syscall` (int) at 24.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let thread = &name[..name.iter().position(|&b| b == 0).unwrap_or(16)];
    let mut buf = [0u8; 256];
    let mut len = 0;
    let mut put = |s: &[u8]| {
        let n = s.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&s[..n]);
        len += n;
    };
    put(b"runv vmm: error: seccomp: thread ");
    put(thread);
    put(b" made system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" (");
    put(syscall_name(i64::from(nr)).as_bytes());
    put(b"), which its filter does not allow\n");
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_filter_compiles_and_the_process_filter_is_their_union() {
        for role in ALL_ROLES.into_iter().chain([Role::Process]) {
            filter(role).unwrap();
        }
        let union: Vec<i64> = allowed(Role::Process).into_iter().map(|(nr, _)| nr).collect();
        for role in ALL_ROLES {
            for (nr, _) in allowed(role) {
                assert!(union.contains(&nr), "{role:?} allows {} but the process filter does not", syscall_name(nr));
            }
        }
    }

    #[test]
    fn the_vcpu_holds_what_the_workers_it_starts_need() {
        // Workers inherit the vCPU's filter before narrowing their own.
        let vcpu: Vec<i64> = allowed(Role::Vcpu).into_iter().map(|(nr, _)| nr).collect();
        for role in [Role::VsockWorker, Role::FsIrq, Role::NetWorker] {
            for (nr, _) in allowed(role) {
                assert!(vcpu.contains(&nr), "{role:?} needs {} which the vCPU filter lacks", syscall_name(nr));
            }
        }
    }

    #[test]
    fn no_role_may_open_files_exec_or_make_non_unix_sockets() {
        for role in ALL_ROLES.into_iter().chain([Role::Process]) {
            let list = allowed(role);
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
            ] {
                assert!(!list.iter().any(|(nr, _)| *nr == forbidden), "{role:?} allows {}", syscall_name(forbidden));
            }
            if let Some((_, rules)) = list.iter().find(|(nr, _)| *nr == libc::SYS_socket) {
                assert_eq!(rules, &vec![vec![(0, Op::Eq, libc::AF_UNIX as u64)]], "{role:?}");
            }
        }
    }

    #[test]
    fn syscalls_are_named() {
        assert_eq!(syscall_name(290), "eventfd2");
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(-1), "unknown");
        assert_eq!(syscall_name(100_000), "unknown");
    }
}
