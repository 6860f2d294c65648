//! The guest agent's one-line answer to a port-forward request, as the host
//! reads it (`runv::sandbox::port_forward::answer_of`): guest bytes shown in
//! an error. It must not panic, and what it returns holds no control
//! character but the newline and tab `guest_text` keeps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = runv::sandbox::port_forward::answer_of(data) {
        assert!(!why.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{why:?}");
    }
});
