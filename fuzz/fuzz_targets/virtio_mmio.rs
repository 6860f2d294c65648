//! The built-in VMM's virtio devices as a guest drives them: the MMIO
//! transport's registers, then descriptor tables, rings and buffers the
//! guest fills, for virtio-blk, virtio-net and virtio-vsock. Whatever the
//! guest writes, the VMM must not panic, hang or touch memory outside the
//! guest's. Input: device (1 byte), queue size exponent (1), length of the
//! guest memory image (2, LE), the image (placed at guest address 0), then
//! register writes of 5 bytes (offset / 4, LE u32 value).
#![no_main]

use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use runv::vmm::devices::virtio::block::Block;
use runv::vmm::devices::virtio::mmio::{reg, MmioTransport};
use runv::vmm::devices::virtio::net::{Mac, Net, RateLimits};
use runv::vmm::devices::virtio::vsock::device::Vsock;
use runv::vmm::devices::virtio::{status, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};
use runv::vmm::devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let queue_size = 1u32 << (data[1] % 8 + 1);
    let image_len = usize::from(u16::from_le_bytes([data[2], data[3]])).min(data.len() - 4);
    let (image, ops) = data[4..].split_at(image_len);

    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(image, GuestAddress(0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The host side of the net device's tap, kept open for the iteration.
    let (host, tap) = UnixDatagram::pair().unwrap();
    let device: Box<dyn VirtioDevice> = match data[0] % 3 {
        0 => {
            let disk = tempfile::tempfile().unwrap();
            disk.set_len(8 * 512).unwrap();
            Box::new(Block::from_file(disk, data[0] & 0x80 != 0, "fuzz").unwrap())
        }
        1 => {
            let _ = host.send(&image[..image.len().min(1514)]);
            let tap = std::fs::File::from(std::os::fd::OwnedFd::from(tap));
            // Limited both ways, so frames over a limit go back to their queue
            // too; bare frames or, half the time, vnet headers and offloads
            // (the guest's headers checked against what it acked).
            let limits = RateLimits { rx: Some(1 << 20), tx: Some(64 << 10) };
            let mac = Mac([2, 0, 0, 0, 0, 1]);
            if data[0] & 0x40 != 0 {
                Box::new(Net::with_vnet_header(tap, mac, limits).unwrap())
            } else {
                Box::new(Net::new(tap, mac, limits).unwrap())
            }
        }
        _ => Box::new(Vsock::new(3, &dir.path().join("v.sock")).unwrap()),
    };
    let queues = device.queue_max_sizes().len() as u32;
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(device, mem, interrupt);

    // A well-behaved driver's initialisation, with the queues where the
    // image put their tables: queue i at i * 0x3000.
    write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    write(&mut t, reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    for q in 0..queues {
        let base = q * 0x3000;
        write(&mut t, reg::QUEUE_SEL, q);
        write(&mut t, reg::QUEUE_NUM, queue_size);
        write(&mut t, reg::QUEUE_DESC_LOW, base);
        write(&mut t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
        write(&mut t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
        write(&mut t, reg::QUEUE_READY, 1);
    }
    write(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    for q in 0..queues {
        write(&mut t, reg::QUEUE_NOTIFY, q);
    }
    // Then whatever the guest writes to the registers (notifies, resets,
    // queue changes, config space), and reads.
    for op in ops.chunks_exact(5) {
        let offset = u64::from(op[0]) * 4;
        write(&mut t, offset, u32::from_le_bytes([op[1], op[2], op[3], op[4]]));
        let mut back = [0u8; 4];
        t.read(offset, &mut back);
    }
    for q in 0..queues {
        write(&mut t, reg::QUEUE_NOTIFY, q);
    }
    // Reset stops the device's worker threads before the next input.
    write(&mut t, reg::STATUS, 0);
});
