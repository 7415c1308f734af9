//! The guest program: 64-bit ring-3 code, assembled at run time with iced-x86's
//! code assembler, that writes pages of guest memory in a pattern, counts its
//! writes in the control page, and exits to the host after each batch.
//!
//! The host gives orders through the control page (how many iterations the
//! next batch may run) and paces the guest between batches: that is where the
//! dirty rate and the auto-converge throttle are applied.
//!
//! ```text
//!         mov rbx, CONTROL                 ; the control page, identity-mapped
//!         mov r8,  [rbx+RNG]               ; xorshift64 state
//!         mov r9,  [rbx+CURSOR]            ; next page of a sequential sweep
//!         mov r10, [rbx+SPAN]              ; pages the pattern covers, from page 0
//!         mov r11, [rbx+PATTERN]
//! top:    mov rcx, [rbx+BATCH]             ; iterations the host allows
//!         test rcx, rcx / jz report
//!         cmp r11, IDLE / je idle
//!         cmp r11, SEQUENTIAL / je seq
//! random: r8 ^= r8 << 13; r8 ^= r8 >> 7; r8 ^= r8 << 17
//!         rdx = high half of r8 × r10      ; a page in [0, span)
//!         jmp write
//! seq:    rdx = r9; r9 = r9 + 1 < r10 ? r9 + 1 : 0
//! write:  rax = [rbx+COUNTER]
//!         [rdx×4096 + (rax mod 512)×8] = rax   ; the page changes
//!         inc qword [rbx+COUNTER]
//!         dec rcx / jnz (random or seq)
//!         jmp report
//! idle:   inc qword [rbx+COUNTER] / dec rcx / jnz idle
//! report: [rbx+RNG] = r8; [rbx+CURSOR] = r9
//!         mov dx, PORT / out dx, al        ; exit to the host
//!         jmp top
//! ```

use iced_x86::code_asm::*;

/// The I/O port the guest writes to exit to the host after a batch.
pub const EXIT_PORT: u16 = 0xf4;

/// Byte offsets of the control page's little-endian `u64` fields.
pub mod control {
    /// Iterations done since the guest first started (page writes, or idle
    /// loops): the counter that only grows.
    pub const COUNTER: u64 = 0x00;
    /// Iterations the host allows before the next exit.
    pub const BATCH: u64 = 0x08;
    /// What to write: see [`super::PATTERN_IDLE`] and the others.
    pub const PATTERN: u64 = 0x10;
    /// Pages the pattern covers, from page 0.
    pub const SPAN: u64 = 0x18;
    /// The xorshift64 state (never zero).
    pub const RNG: u64 = 0x20;
    /// The next page of a sequential sweep.
    pub const CURSOR: u64 = 0x28;
}

/// No page writes: the counter still grows.
pub const PATTERN_IDLE: u64 = 0;
/// Uniformly random pages in `[0, span)`.
pub const PATTERN_RANDOM: u64 = 1;
/// Page after page over `[0, span)`, wrapping around.
pub const PATTERN_SEQUENTIAL: u64 = 2;

/// Assembles the program to run at guest address `code` with its control page
/// at `control`.
pub fn assemble(code: u64, control: u64) -> Result<Vec<u8>, IcedError> {
    use control::*;
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    let mut random = a.create_label();
    let mut seq = a.create_label();
    let mut write = a.create_label();
    let mut idle = a.create_label();
    let mut report = a.create_label();

    a.mov(rbx, control)?;
    a.mov(r8, qword_ptr(rbx + RNG))?;
    a.mov(r9, qword_ptr(rbx + CURSOR))?;
    a.mov(r10, qword_ptr(rbx + SPAN))?;
    a.mov(r11, qword_ptr(rbx + PATTERN))?;

    a.set_label(&mut top)?;
    a.mov(rcx, qword_ptr(rbx + BATCH))?;
    a.test(rcx, rcx)?;
    a.jz(report)?;
    a.cmp(r11, PATTERN_IDLE as i32)?;
    a.je(idle)?;
    a.cmp(r11, PATTERN_SEQUENTIAL as i32)?;
    a.je(seq)?;

    // A random page: xorshift64, scaled to the span by a 64×64→128 multiply.
    a.set_label(&mut random)?;
    a.mov(rax, r8)?;
    a.shl(rax, 13)?;
    a.xor(r8, rax)?;
    a.mov(rax, r8)?;
    a.shr(rax, 7)?;
    a.xor(r8, rax)?;
    a.mov(rax, r8)?;
    a.shl(rax, 17)?;
    a.xor(r8, rax)?;
    a.mov(rax, r8)?;
    a.mul(r10)?; // rdx = floor(r8 × span / 2^64)
    a.jmp(write)?;

    // The next page of the sweep.
    a.set_label(&mut seq)?;
    a.mov(rdx, r9)?;
    a.inc(r9)?;
    a.cmp(r9, r10)?;
    a.jb(write)?;
    a.xor(r9, r9)?;

    // Write the counter into the page, at an offset that moves with it.
    a.set_label(&mut write)?;
    a.shl(rdx, 12)?;
    a.mov(rax, qword_ptr(rbx + COUNTER))?;
    a.mov(rsi, rax)?;
    a.and(rsi, 511)?;
    a.shl(rsi, 3)?;
    a.add(rdx, rsi)?;
    a.mov(qword_ptr(rdx), rax)?;
    a.inc(qword_ptr(rbx + COUNTER))?;
    a.dec(rcx)?;
    a.jz(report)?;
    a.cmp(r11, PATTERN_SEQUENTIAL as i32)?;
    a.je(seq)?;
    a.jmp(random)?;

    a.set_label(&mut idle)?;
    a.inc(qword_ptr(rbx + COUNTER))?;
    a.dec(rcx)?;
    a.jnz(idle)?;

    a.set_label(&mut report)?;
    a.mov(qword_ptr(rbx + RNG), r8)?;
    a.mov(qword_ptr(rbx + CURSOR), r9)?;
    a.mov(dx, EXIT_PORT as u32)?;
    a.out(dx, al)?;
    a.jmp(top)?;

    a.assemble(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_into_the_code_pages() {
        let bytes = assemble(0x7000_0000, 0x7000_2000).unwrap();
        assert!(!bytes.is_empty());
        assert!(bytes.len() < super::super::layout::CODE_PAGES as usize * 4096);
        // `out dx, al` is there: the exit to the host.
        assert!(bytes.contains(&0xee));
    }
}
