//! virtio-blk on a raw image file (virtio 1.1, 5.2): read, write, flush and
//! get-id, optionally read-only. Every request is checked against the image
//! size and guest memory; a malformed one completes with an error status
//! (or, if even its header cannot be read, with nothing written), so a bad
//! guest never stops the VMM.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::ByteValued;

use super::{ActivateError, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};

pub const VIRTIO_ID_BLOCK: u32 = 2;
const QUEUE_SIZE: u16 = 256;
const SECTOR_SHIFT: u64 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The longest serial GET_ID returns.
const ID_BYTES: usize = 20;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RequestHeader {
    pub kind: u32,
    pub reserved: u32,
    pub sector: u64,
}
// SAFETY: plain integers, no padding.
unsafe impl ByteValued for RequestHeader {}

pub struct Block {
    file: File,
    read_only: bool,
    /// Size in bytes (a whole number of sectors is exposed).
    size: u64,
    id: String,
    active: Option<(Mem, Queue, Interrupt)>,
}

impl Block {
    pub fn open(path: &Path, read_only: bool, id: &str) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, read_only, id)
    }

    pub fn from_file(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        let size = file.metadata()?.len() & !(SECTOR_SIZE - 1);
        Ok(Self { file, read_only, size, id: id.chars().take(ID_BYTES).collect(), active: None })
    }

    /// Carries out one request; returns the status and the bytes written
    /// into guest buffers (the status byte not counted).
    fn execute(&self, header: RequestHeader, reader: &mut Reader, data: &mut Writer) -> (u8, u32) {
        let in_range = |len: u64| {
            header
                .sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len).map(|end| (start, end)))
                .filter(|&(_, end)| end <= self.size)
        };
        match header.kind {
            VIRTIO_BLK_T_IN => {
                let len = data.available_bytes() as u64;
                let Some((start, _)) = in_range(len) else { return (VIRTIO_BLK_S_IOERR, 0) };
                let mut buf = vec![0u8; len as usize];
                if self.file.read_exact_at(&mut buf, start).is_err() || data.write_all(&buf).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = reader.available_bytes() as u64;
                let Some((start, _)) = in_range(len) else { return (VIRTIO_BLK_S_IOERR, 0) };
                let mut buf = vec![0u8; len as usize];
                if reader.read_exact(&mut buf).is_err() || self.file.write_all_at(&buf, start).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only && self.file.sync_all().is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                id[..self.id.len()].copy_from_slice(self.id.as_bytes());
                let n = data.available_bytes().min(ID_BYTES);
                if data.write_all(&id[..n]).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Serves every available request of the queue.
    pub fn process_queue(&mut self) -> usize {
        let Some((mem, queue, interrupt)) = self.active.as_mut() else { return 0 };
        let mem = mem.clone();
        let mut done = Vec::new();
        {
            let Ok(iter) = queue.iter(&mem) else { return 0 };
            for chain in iter {
                done.push((chain.head_index(), chain));
            }
        }
        let interrupt = interrupt.clone();
        let count = done.len();
        for (head, chain) in done {
            let used = self.serve_chain(&mem, chain);
            let (_, queue, _) = self.active.as_mut().expect("active");
            let _ = queue.add_used(&mem, head, used);
        }
        if count > 0 {
            interrupt.signal_used_queue();
        }
        count
    }

    fn serve_chain(&self, mem: &Mem, chain: virtio_queue::DescriptorChain<&Mem>) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) else {
            return 0;
        };
        let Ok(header) = reader.read_obj::<RequestHeader>() else { return 0 };
        // The status byte is the last writable byte of the chain.
        let writable = writer.available_bytes();
        if writable == 0 {
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else { return 0 };
        let (status, len) = self.execute(header, &mut reader, &mut writer);
        if status_writer.write_all(&[status]).is_err() {
            return len;
        }
        len + 1
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only `capacity` (sectors, le64) at offset 0.
        let capacity = (self.size >> SECTOR_SHIFT).to_le_bytes();
        super::read_config_space(&capacity, offset, data);
    }

    fn activate(
        &mut self,
        mem: Mem,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
        _: u64,
    ) -> Result<(), ActivateError> {
        let queue = queues.pop().filter(|q| q.ready()).ok_or(ActivateError::BadQueue(0))?;
        self.active = Some((mem, queue, interrupt));
        Ok(())
    }

    fn notify(&mut self, _queue: u16) {
        self.process_queue();
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{desc, F_NEXT, F_WRITE};
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    fn mem() -> Mem {
        super::super::test_util::mem(0x10_0000)
    }

    fn image(sectors: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        f
    }

    /// Runs one chain through a fresh block device; returns (used len,
    /// status byte at `status_addr`).
    fn run(block: &mut Block, mem: &Mem, descs: &[RawDescriptor], status_addr: u64) -> (u32, u8) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        mem.write_obj(0xaau8, GuestAddress(status_addr)).ok();
        block.activate(mem.clone(), vec![queue], irq.clone(), 0).unwrap();
        assert_eq!(block.process_queue(), 1);
        assert_eq!(irq.status(), 1);
        let used_len = vq.used().ring().ref_at(0).unwrap().load().len();
        (used_len, mem.read_obj(GuestAddress(status_addr)).unwrap_or(0xee))
    }

    fn header(mem: &Mem, kind: u32, sector: u64) {
        mem.write_obj(RequestHeader { kind, reserved: 0, sector }, GuestAddress(0x1_0000)).unwrap();
    }

    #[test]
    fn reads_writes_flush_and_id_work() {
        let m = mem();
        let mut b = Block::from_file(image(4), false, "runv-disk").unwrap();
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 4);

        header(&m, VIRTIO_BLK_T_IN, 2);
        let chain =
            [desc(0x1_0000, 16, F_NEXT, 1), desc(0x2_0000, 512, F_NEXT | F_WRITE, 2), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (513, VIRTIO_BLK_S_OK));
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x2_0000)).unwrap();
        assert!(got.iter().all(|&x| x == 2));

        m.write_slice(&[9u8; 512], GuestAddress(0x2_0000)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 1);
        let chain = [desc(0x1_0000, 16, F_NEXT, 1), desc(0x2_0000, 512, F_NEXT, 2), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (1, VIRTIO_BLK_S_OK));
        let mut disk = [0u8; 512];
        b.file.read_exact_at(&mut disk, 512).unwrap();
        assert!(disk.iter().all(|&x| x == 9));

        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let chain = [desc(0x1_0000, 16, F_NEXT, 1), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (1, VIRTIO_BLK_S_OK));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let chain =
            [desc(0x1_0000, 16, F_NEXT, 1), desc(0x2_0000, 20, F_NEXT | F_WRITE, 2), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 9];
        m.read_slice(&mut id, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(&id, b"runv-disk");
    }

    #[test]
    fn out_of_range_read_only_and_unknown_requests_fail_cleanly() {
        let m = mem();
        let mut b = Block::from_file(image(4), false, "d").unwrap();
        // Past the end of the image, and a sector number that overflows.
        for sector in [4, u64::MAX / 2] {
            header(&m, VIRTIO_BLK_T_IN, sector);
            let chain = [
                desc(0x1_0000, 16, F_NEXT, 1),
                desc(0x2_0000, 512, F_NEXT | F_WRITE, 2),
                desc(0x3_0000, 1, F_WRITE, 0),
            ];
            assert_eq!(run(&mut b, &m, &chain, 0x3_0000).1, VIRTIO_BLK_S_IOERR);
        }
        header(&m, 77, 0);
        let chain = [desc(0x1_0000, 16, F_NEXT, 1), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000).1, VIRTIO_BLK_S_UNSUPP);

        let mut ro = Block::from_file(image(4), true, "d").unwrap();
        assert_ne!(ro.features() & VIRTIO_BLK_F_RO, 0);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let chain = [desc(0x1_0000, 16, F_NEXT, 1), desc(0x2_0000, 512, F_NEXT, 2), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut ro, &m, &chain, 0x3_0000).1, VIRTIO_BLK_S_IOERR);
        let mut disk = [0u8; 1];
        ro.file.read_exact_at(&mut disk, 0).unwrap();
        assert_eq!(disk, [0]);
    }

    #[test]
    fn malformed_chains_complete_without_touching_the_guest_or_crashing() {
        let m = mem();
        let mut b = Block::from_file(image(4), false, "d").unwrap();
        // A header buffer outside guest memory.
        let chain = [desc(0xfff_0000, 16, F_NEXT, 1), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (0, 0xaa));
        // A header too short to hold a request.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let chain = [desc(0x1_0000, 8, F_NEXT, 1), desc(0x3_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (0, 0xaa));
        // No writable byte for the status.
        let chain = [desc(0x1_0000, 16, 0, 0)];
        assert_eq!(run(&mut b, &m, &chain, 0x3_0000), (0, 0xaa));
        // A data buffer that runs past the end of guest memory.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let chain =
            [desc(0x1_0000, 16, F_NEXT, 1), desc(0xf_ff00, 0x1000, F_NEXT | F_WRITE, 2), desc(0x3_0000, 1, F_WRITE, 0)];
        let (len, _) = run(&mut b, &m, &chain, 0x3_0000);
        assert_eq!(len, 0);
    }
}
