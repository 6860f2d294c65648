//! GDT entries and the KVM segments that describe them (the format the
//! Intel SDM, vol. 3, 3.4.5 gives; Firecracker builds the same).

use kvm_bindings::kvm_segment;

/// A GDT entry from flags (access byte + the flags nibble, as
/// `0xFA9B`-style words), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With granularity set, the limit counts 4 KiB pages.
    if (entry >> 55) & 1 == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

/// The KVM segment for GDT entry `entry` at index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

/// The boot GDT for 64-bit entry: null, 64-bit code, data, TSS.
pub const GDT_LONG_MODE: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// The boot GDT for PVH entry (32-bit protected mode, flat 4 GiB): null,
/// 32-bit code, data, TSS.
pub const GDT_PVH: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_kvm_segments() {
        let code64 = kvm_segment_from_gdt(GDT_LONG_MODE[1], 1);
        assert_eq!((code64.selector, code64.l, code64.db, code64.g, code64.present), (8, 1, 0, 1, 1));
        assert_eq!((code64.type_, code64.s, code64.limit), (0xb, 1, 0xffff_ffff));
        let data = kvm_segment_from_gdt(GDT_LONG_MODE[2], 2);
        assert_eq!((data.selector, data.type_, data.db, data.l), (16, 3, 1, 0));
        let tss = kvm_segment_from_gdt(GDT_LONG_MODE[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (24, 0xb, 0));
        let null = kvm_segment_from_gdt(GDT_LONG_MODE[0], 0);
        assert_eq!(null.unusable, 1);
        let code32 = kvm_segment_from_gdt(GDT_PVH[1], 1);
        assert_eq!((code32.db, code32.l, code32.base, code32.limit), (1, 0, 0, 0xffff_ffff));
        // Base bits land where they belong.
        let odd = kvm_segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcd), 5);
        assert_eq!((odd.base, odd.limit, odd.selector), (0x1234_5678, 0xabcd, 40));
    }
}
