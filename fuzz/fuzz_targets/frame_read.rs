//! `frame::read` walked over a whole buffer the way recovery walks a WAL segment: never panics,
//! always moves forward, and ends in exactly one of End, TornTail or Corrupt. Payloads of valid
//! frames go through `Record::decode` too.
#![no_main]

use kv_core::frame::{self, FrameRead};
use kv_core::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut offset = 0;
    // Each step consumes at least a frame header, so this bound is never the one that stops.
    for _ in 0..=data.len() {
        match frame::read(data, offset) {
            FrameRead::Complete(payload, next) => {
                assert!(
                    next > offset && next <= data.len(),
                    "no progress at {offset}"
                );
                assert_eq!(next - offset, payload.len() + frame::FRAME_HEADER_LEN);
                let _ = Record::decode(payload);
                // Re-framing the payload gives back the same bytes.
                let mut again = Vec::new();
                frame::append(&mut again, |out| out.extend_from_slice(payload))
                    .expect("a payload read back can be framed again");
                assert_eq!(&again[..], &data[offset..next]);
                offset = next;
            }
            FrameRead::End => return,
            FrameRead::TornTail { offset: at } | FrameRead::Corrupt { offset: at, .. } => {
                assert_eq!(at, offset, "a bad frame is reported where it starts");
                return;
            }
        }
    }
    panic!("frame walk did not end");
});
